-- As SQLite's migration 8: protected items in creation order (created_ms,
-- then name) for their paged lists.
CREATE INDEX protected_items_by_created ON protected_items (created_ms, name);
