-- What a recovery agent reports so that a failover of an encrypted item can
-- hand it the operator's recovery key without the vault ever keeping that
-- key in the clear: its X25519 transport public key (base64), which the
-- vault seals the key to, and the key id of its store's recovery key, which
-- the vault checks the operator's key against.
ALTER TABLE agents ADD COLUMN transport_key TEXT;
ALTER TABLE agents ADD COLUMN store_key_id TEXT;
