-- siterec vault schema, version 1 (SQLite).
-- Times are Unix milliseconds. JSON columns hold serde_json documents.

CREATE TABLE vault (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    subscription TEXT NOT NULL,
    resource_group TEXT NOT NULL,
    name TEXT NOT NULL,
    location TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);

CREATE TABLE api_tokens (
    token_hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);

CREATE TABLE registration_keys (
    key_id TEXT PRIMARY KEY,
    fabric TEXT NOT NULL COLLATE NOCASE,
    secret_hash TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);

CREATE TABLE fabrics (
    name TEXT PRIMARY KEY COLLATE NOCASE,
    created_ms INTEGER NOT NULL
);

CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    fabric TEXT NOT NULL COLLATE NOCASE,
    hostname TEXT NOT NULL,
    key_id TEXT NOT NULL,
    cloud TEXT,
    data_url TEXT,
    version TEXT NOT NULL,
    counters TEXT NOT NULL DEFAULT '{}',
    enrolled_ms INTEGER NOT NULL,
    last_seen_ms INTEGER
);

CREATE TABLE containers (
    fabric TEXT NOT NULL COLLATE NOCASE,
    name TEXT NOT NULL COLLATE NOCASE,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (fabric, name)
);

CREATE TABLE machines (
    fabric TEXT NOT NULL COLLATE NOCASE,
    container TEXT NOT NULL COLLATE NOCASE,
    name TEXT NOT NULL COLLATE NOCASE,
    agent_id TEXT NOT NULL,
    info TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (fabric, name)
);

CREATE TABLE policies (
    name TEXT PRIMARY KEY COLLATE NOCASE,
    body TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);

CREATE TABLE container_mappings (
    fabric TEXT NOT NULL COLLATE NOCASE,
    container TEXT NOT NULL COLLATE NOCASE,
    name TEXT NOT NULL COLLATE NOCASE,
    target_fabric TEXT NOT NULL COLLATE NOCASE,
    target_container TEXT NOT NULL COLLATE NOCASE,
    policy TEXT NOT NULL COLLATE NOCASE,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (fabric, container, name)
);

CREATE TABLE protected_items (
    name TEXT PRIMARY KEY COLLATE NOCASE,
    fabric TEXT NOT NULL COLLATE NOCASE,
    container TEXT NOT NULL COLLATE NOCASE,
    machine TEXT NOT NULL COLLATE NOCASE,
    policy TEXT NOT NULL COLLATE NOCASE,
    target_fabric TEXT NOT NULL COLLATE NOCASE,
    target_container TEXT NOT NULL COLLATE NOCASE,
    target_agent_id TEXT,
    state TEXT NOT NULL,
    last_error TEXT,
    failover_point_id TEXT,
    failover_output TEXT,
    failover_ms INTEGER,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);

CREATE TABLE recovery_points (
    item TEXT NOT NULL COLLATE NOCASE,
    point_id TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    consistency TEXT NOT NULL,
    bytes_sent INTEGER NOT NULL,
    bytes_read INTEGER NOT NULL,
    reported_ms INTEGER NOT NULL,
    pruned_ms INTEGER,
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
    created_ms INTEGER NOT NULL,
    start_ms INTEGER,
    end_ms INTEGER
);
CREATE INDEX jobs_by_state ON jobs (state);

CREATE TABLE job_steps (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    start_ms INTEGER,
    end_ms INTEGER,
    error TEXT,
    PRIMARY KEY (job_id, idx)
);

CREATE TABLE agent_tasks (
    id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    job_id TEXT,
    work TEXT NOT NULL,
    state TEXT NOT NULL,
    result TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX agent_tasks_pending ON agent_tasks (agent_id, state);
