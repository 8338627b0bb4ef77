-- VM networks, network mappings and test failover.

-- The VM networks each agent reports in its heartbeat (its [[networks]] and
-- its VMs' NIC networks). A fabric's networks are those of its agents.
CREATE TABLE networks (
    fabric TEXT NOT NULL COLLATE NOCASE,
    name TEXT NOT NULL COLLATE NOCASE,
    agent_id TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (fabric, name, agent_id)
);

-- Source VM network -> recovery network. One mapping per primary network
-- (the primary key), as in Site Recovery. State: Pairing while its job
-- runs, Paired once in force, Unpairing while it is being removed; only
-- Paired mappings connect replica NICs.
CREATE TABLE network_mappings (
    fabric TEXT NOT NULL COLLATE NOCASE,
    network TEXT NOT NULL COLLATE NOCASE,
    name TEXT NOT NULL COLLATE NOCASE,
    recovery_fabric TEXT NOT NULL COLLATE NOCASE,
    recovery_network TEXT NOT NULL COLLATE NOCASE,
    instance_type TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (fabric, network)
);

-- Test failover runs beside protection: its own state, the test VM the
-- recovery agent started (its StartReplica output), the point it used,
-- why it failed, and when one last completed.
ALTER TABLE protected_items ADD COLUMN test_failover_state TEXT NOT NULL DEFAULT 'None';
ALTER TABLE protected_items ADD COLUMN test_failover_output TEXT;
ALTER TABLE protected_items ADD COLUMN test_failover_point_id TEXT;
ALTER TABLE protected_items ADD COLUMN test_failover_error TEXT;
ALTER TABLE protected_items ADD COLUMN test_failover_ms INTEGER;

-- What a step wants the operator to know beyond success (e.g. a NIC left
-- on an isolated network for want of a network mapping), JSON.
ALTER TABLE job_steps ADD COLUMN output TEXT;
