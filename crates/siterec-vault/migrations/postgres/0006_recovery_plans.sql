-- Recovery plans: ordered groups of protected items with their actions
-- (siterec_core::plan::RecoveryPlan as JSON in body). The last run of
-- each failover type is what the plan shows as lastTestFailoverTime and
-- so on. A manual action's step records when an operator resumed it.
CREATE TABLE recovery_plans (
    name TEXT PRIMARY KEY COLLATE nocase,
    primary_fabric TEXT NOT NULL COLLATE nocase,
    recovery_fabric TEXT NOT NULL COLLATE nocase,
    body TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    last_test_failover_ms BIGINT,
    last_planned_failover_ms BIGINT,
    last_unplanned_failover_ms BIGINT
);

ALTER TABLE job_steps ADD COLUMN resumed_ms BIGINT;
ALTER TABLE job_steps ADD COLUMN resume_comments TEXT;
