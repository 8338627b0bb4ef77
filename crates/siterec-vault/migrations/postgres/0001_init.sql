-- siterec vault schema on PostgreSQL, version 1: the same tables and
-- columns as SQLite's migrations 1-7 (crates/siterec-vault/migrations/sqlite/).
-- Times are Unix milliseconds (BIGINT); JSON columns hold serde_json
-- documents as TEXT; flags are BIGINT 0/1, as on SQLite, so that one set of
-- statements serves both. Names compare case-insensitively, as SQLite's
-- COLLATE NOCASE does: the ICU collation below ignores case (level 2) and is
-- nondeterministic, so equality, uniqueness and DISTINCT ignore case too.

CREATE COLLATION IF NOT EXISTS nocase (provider = icu, locale = 'und-u-ks-level2', deterministic = false);

CREATE TABLE vault (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    subscription TEXT NOT NULL,
    resource_group TEXT NOT NULL,
    name TEXT NOT NULL,
    location TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE api_tokens (
    token_hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE registration_keys (
    key_id TEXT PRIMARY KEY,
    fabric TEXT NOT NULL COLLATE nocase,
    secret_hash TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    revoked_ms BIGINT
);

CREATE TABLE fabrics (
    name TEXT PRIMARY KEY COLLATE nocase,
    created_ms BIGINT NOT NULL
);

CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    fabric TEXT NOT NULL COLLATE nocase,
    hostname TEXT NOT NULL,
    key_id TEXT NOT NULL,
    cloud TEXT,
    data_url TEXT,
    version TEXT NOT NULL,
    counters TEXT NOT NULL DEFAULT '{}',
    enrolled_ms BIGINT NOT NULL,
    last_seen_ms BIGINT,
    store_encrypted BIGINT NOT NULL DEFAULT 0,
    transport_key TEXT,
    store_key_id TEXT
);

CREATE TABLE containers (
    fabric TEXT NOT NULL COLLATE nocase,
    name TEXT NOT NULL COLLATE nocase,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (fabric, name)
);

CREATE TABLE machines (
    fabric TEXT NOT NULL COLLATE nocase,
    container TEXT NOT NULL COLLATE nocase,
    name TEXT NOT NULL COLLATE nocase,
    agent_id TEXT NOT NULL,
    info TEXT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (fabric, name)
);

CREATE TABLE policies (
    name TEXT PRIMARY KEY COLLATE nocase,
    body TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE container_mappings (
    fabric TEXT NOT NULL COLLATE nocase,
    container TEXT NOT NULL COLLATE nocase,
    name TEXT NOT NULL COLLATE nocase,
    target_fabric TEXT NOT NULL COLLATE nocase,
    target_container TEXT NOT NULL COLLATE nocase,
    policy TEXT NOT NULL COLLATE nocase,
    state TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (fabric, container, name)
);

CREATE TABLE protected_items (
    name TEXT PRIMARY KEY COLLATE nocase,
    fabric TEXT NOT NULL COLLATE nocase,
    container TEXT NOT NULL COLLATE nocase,
    machine TEXT NOT NULL COLLATE nocase,
    policy TEXT NOT NULL COLLATE nocase,
    target_fabric TEXT NOT NULL COLLATE nocase,
    target_container TEXT NOT NULL COLLATE nocase,
    target_agent_id TEXT,
    state TEXT NOT NULL,
    last_error TEXT,
    failover_point_id TEXT,
    failover_output TEXT,
    failover_ms BIGINT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    test_failover_state TEXT NOT NULL DEFAULT 'None',
    test_failover_output TEXT,
    test_failover_point_id TEXT,
    test_failover_error TEXT,
    test_failover_ms BIGINT,
    multi_vm_group TEXT COLLATE nocase
);
CREATE INDEX protected_items_by_group ON protected_items (multi_vm_group);

CREATE TABLE recovery_points (
    item TEXT NOT NULL COLLATE nocase,
    point_id TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    consistency TEXT NOT NULL,
    bytes_sent BIGINT NOT NULL,
    bytes_read BIGINT NOT NULL,
    reported_ms BIGINT NOT NULL,
    pruned_ms BIGINT,
    PRIMARY KEY (item, point_id)
);
CREATE INDEX recovery_points_by_time ON recovery_points (item, created_ms);

CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    target_type TEXT NOT NULL,
    target_name TEXT NOT NULL,
    target_id TEXT NOT NULL,
    input TEXT NOT NULL,
    error_code TEXT,
    error_message TEXT,
    created_ms BIGINT NOT NULL,
    start_ms BIGINT,
    end_ms BIGINT,
    output TEXT,
    seq BIGINT
);
CREATE INDEX jobs_by_state ON jobs (state);
CREATE INDEX jobs_by_seq ON jobs (seq);

CREATE TABLE job_steps (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    idx BIGINT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    start_ms BIGINT,
    end_ms BIGINT,
    error TEXT,
    output TEXT,
    step TEXT,
    PRIMARY KEY (job_id, idx)
);

CREATE TABLE agent_tasks (
    id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    job_id TEXT,
    work TEXT NOT NULL,
    state TEXT NOT NULL,
    result TEXT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX agent_tasks_pending ON agent_tasks (agent_id, state);

CREATE TABLE networks (
    fabric TEXT NOT NULL COLLATE nocase,
    name TEXT NOT NULL COLLATE nocase,
    agent_id TEXT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (fabric, name, agent_id)
);

CREATE TABLE network_mappings (
    fabric TEXT NOT NULL COLLATE nocase,
    network TEXT NOT NULL COLLATE nocase,
    name TEXT NOT NULL COLLATE nocase,
    recovery_fabric TEXT NOT NULL COLLATE nocase,
    recovery_network TEXT NOT NULL COLLATE nocase,
    instance_type TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (fabric, network)
);
