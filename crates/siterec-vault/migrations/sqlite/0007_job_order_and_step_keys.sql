-- Jobs are listed newest first; jobs created in the same millisecond in
-- the order they were created. That order was SQLite's rowid, which
-- PostgreSQL does not have: an explicit sequence number, the same on both.
ALTER TABLE jobs ADD COLUMN seq INTEGER;
UPDATE jobs SET seq = rowid;
CREATE INDEX jobs_by_seq ON jobs (seq);
-- A step's stable name (siterec_core's StepKey, serialized by name), so
-- that a job written by one build resumes at the same step in the next
-- even if the step lists change. NULL on rows written before: those are
-- known by their index.
ALTER TABLE job_steps ADD COLUMN step TEXT;
