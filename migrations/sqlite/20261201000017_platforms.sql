-- amoCRM and Kommo integrations side by side: every state and connection names its platform
-- ('amocrm' or 'kommo'); rows from before are amoCRM's. An account id is unique per platform,
-- since the two platforms number their accounts apart. SQLite cannot drop a column's UNIQUE,
-- so amocrm_tokens is rebuilt with the same columns, ids and indexes. The id leads the unique
-- index, so a lookup by bare id (the token API's) uses it too.
ALTER TABLE amocrm_oauth_states ADD COLUMN platform TEXT NOT NULL DEFAULT 'amocrm';

CREATE TABLE amocrm_tokens_with_platforms (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id          INTEGER,
    account_name        TEXT,
    external_id         TEXT,
    domain              TEXT NOT NULL,
    subdomain           TEXT NOT NULL,
    access_token        TEXT,
    refresh_token       TEXT,
    key_id              TEXT,
    expires_at          TEXT NOT NULL,
    refresh_expires_at  TEXT NOT NULL,
    issued_at           TEXT NOT NULL,
    status              TEXT NOT NULL DEFAULT 'active',
    raw                 TEXT,
    last_refresh_at     TEXT,
    last_error          TEXT,
    refresh_failures    INTEGER NOT NULL DEFAULT 0,
    next_refresh_at     TEXT,
    lease_owner         TEXT,
    lease_until         TEXT,
    version             INTEGER NOT NULL DEFAULT 1,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    platform            TEXT NOT NULL DEFAULT 'amocrm'
);
INSERT INTO amocrm_tokens_with_platforms (id, account_id, account_name, external_id, domain,
    subdomain, access_token, refresh_token, key_id, expires_at, refresh_expires_at, issued_at,
    status, raw, last_refresh_at, last_error, refresh_failures, next_refresh_at, lease_owner,
    lease_until, version, created_at, updated_at)
SELECT id, account_id, account_name, external_id, domain, subdomain, access_token,
    refresh_token, key_id, expires_at, refresh_expires_at, issued_at, status, raw,
    last_refresh_at, last_error, refresh_failures, next_refresh_at, lease_owner, lease_until,
    version, created_at, updated_at
FROM amocrm_tokens;
DROP TABLE amocrm_tokens;
ALTER TABLE amocrm_tokens_with_platforms RENAME TO amocrm_tokens;
CREATE INDEX amocrm_tokens_expires_at ON amocrm_tokens (expires_at);
CREATE INDEX amocrm_tokens_external_id ON amocrm_tokens (external_id);
CREATE UNIQUE INDEX amocrm_tokens_account_id_platform ON amocrm_tokens (account_id, platform);
