-- Issue 15: an OAuth state is one b-tree, keyed by its time-ordered state key, instead of a
-- rowid table plus the index of its primary key. An install writes, and a callback deletes,
-- one page fewer of it. The rows are copied as they are.
CREATE TABLE amocrm_oauth_states_by_key (
    state_hash  TEXT PRIMARY KEY NOT NULL,
    subdomain   TEXT,
    created_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    ip          TEXT,
    user_agent  TEXT,
    external_id TEXT,
    return_url  TEXT,
    mode        VARCHAR(16),
    platform    TEXT NOT NULL DEFAULT 'amocrm'
) WITHOUT ROWID;
INSERT INTO amocrm_oauth_states_by_key
    (state_hash, subdomain, created_at, expires_at, ip, user_agent, external_id, return_url, mode, platform)
    SELECT state_hash, subdomain, created_at, expires_at, ip, user_agent, external_id, return_url, mode, platform
    FROM amocrm_oauth_states;
DROP TABLE amocrm_oauth_states;
ALTER TABLE amocrm_oauth_states_by_key RENAME TO amocrm_oauth_states;
CREATE INDEX amocrm_oauth_states_expires_at ON amocrm_oauth_states (expires_at);
