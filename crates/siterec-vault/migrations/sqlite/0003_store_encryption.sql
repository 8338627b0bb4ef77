-- Whether an agent's replica store is encrypted (policies that encrypt
-- data stored only replicate to such agents).
ALTER TABLE agents ADD COLUMN store_encrypted INTEGER NOT NULL DEFAULT 0;
