-- State keys are now 16 hex digits of creation time followed by the state's SHA-256.
ALTER TABLE amocrm_oauth_states ALTER COLUMN state_hash TYPE VARCHAR(80);
