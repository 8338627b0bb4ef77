-- Lists of protected items come in pages in creation order (created_ms,
-- then name; the page's skipToken resumes after one): an index in that
-- order, so that a page does not sort the whole table.
CREATE INDEX protected_items_by_created ON protected_items (created_ms, name);
