-- Replication in either direction (reprotect).
-- The reprotect job that set up the item's current replication direction
-- (NULL: none yet, or a reprotect still seeding). Agents start over from
-- what the target store holds when it changes.
ALTER TABLE protected_items ADD COLUMN replication_epoch TEXT;
-- The site whose replica store holds a point: the recovery site's for
-- points replicated from the primary site, the primary site's for points
-- of the reverse direction.
ALTER TABLE recovery_points ADD COLUMN site TEXT NOT NULL DEFAULT 'Recovery';
-- The replication epoch the point was reported in.
ALTER TABLE recovery_points ADD COLUMN epoch TEXT;
