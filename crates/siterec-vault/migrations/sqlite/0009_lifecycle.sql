-- Where a protected machine runs (activeLocation): its site, or the
-- recovery site after a failover. Replication goes from there to the other
-- site. Items that failed over before this column existed run at the
-- recovery site.
ALTER TABLE protected_items ADD COLUMN active_location TEXT NOT NULL DEFAULT 'Primary';
UPDATE protected_items SET active_location = 'Recovery'
  WHERE state IN ('UnplannedFailoverCompleted', 'FailoverCommitInProgress', 'FailoverCommitted');
-- The planned failover job a point is the final point of (its source
-- reported it so).
ALTER TABLE recovery_points ADD COLUMN final_for TEXT;
