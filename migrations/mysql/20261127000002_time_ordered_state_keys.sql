-- State keys are now 16 hex digits of creation time followed by the state's SHA-256.
ALTER TABLE amocrm_oauth_states
    MODIFY state_hash VARCHAR(80) CHARACTER SET ascii COLLATE ascii_bin NOT NULL;
