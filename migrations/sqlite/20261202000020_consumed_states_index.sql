-- Issue 15: only a callback that consumed its state is ever looked up by fingerprint (to tell
-- a used state from an unknown one), so only those rows are indexed. An install's audit row
-- no longer inserts a random fingerprint into an index: it writes only appended pages.
DROP INDEX amocrm_oauth_attempts_state_fingerprint;
CREATE INDEX amocrm_oauth_attempts_consumed_state ON amocrm_oauth_attempts (state_fingerprint)
    WHERE state_consumed = TRUE;
