-- Events and alerts.
-- Events the vault raised: an item's health or RPO, an agent not heard
-- from, a failover's outcome. delivery: NULL (no webhook when raised),
-- 'Pending' (to POST to the webhook; next_attempt_ms says when) or
-- 'Delivered'.
CREATE TABLE events (
    name TEXT PRIMARY KEY,
    -- Raising order (the write lock serializes raisers).
    seq INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    severity TEXT NOT NULL,
    code TEXT NOT NULL,
    kind TEXT NOT NULL,
    object_name TEXT NOT NULL COLLATE NOCASE,
    correlation_id TEXT NOT NULL,
    fabric TEXT COLLATE NOCASE,
    summary TEXT NOT NULL,
    details TEXT NOT NULL,
    delivery TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER,
    last_delivery_error TEXT
);
CREATE UNIQUE INDEX events_by_seq ON events (seq);
CREATE INDEX events_to_deliver ON events (delivery, next_attempt_ms);
-- The conditions events were last raised for (siterec_core::events::Conditions).
CREATE TABLE event_conditions (
    subject TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    since_ms INTEGER NOT NULL
);
-- Alert settings (ARM replicationAlertSettings; only defaultAlertSetting).
CREATE TABLE alert_settings (
    name TEXT PRIMARY KEY COLLATE NOCASE,
    send_to_owners TEXT NOT NULL,
    emails TEXT NOT NULL,
    locale TEXT,
    webhook_url TEXT,
    updated_ms INTEGER NOT NULL
);
-- The heartbeat period an agent asked for (its wait_ms): not heard from
-- after three of them.
ALTER TABLE agents ADD COLUMN heartbeat_ms INTEGER;
