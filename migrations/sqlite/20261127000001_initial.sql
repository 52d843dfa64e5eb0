-- OAuth states: the seed's fix. Only the SHA-256 of a state is stored, never the state.
-- external_id, return_url, mode: set when a host app started the flow with a connect link.
CREATE TABLE amocrm_oauth_states (
    state_hash  TEXT PRIMARY KEY NOT NULL,
    subdomain   TEXT,
    created_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    ip          TEXT,
    user_agent  TEXT,
    external_id TEXT,
    return_url  TEXT,
    mode        VARCHAR(16)
);
CREATE INDEX amocrm_oauth_states_expires_at ON amocrm_oauth_states (expires_at);

-- One row per connected amoCRM account; token columns hold ciphertext sealed with key_id.
-- issued_at: when the current pair was issued (keep-alive age); lease_*: the one process
-- allowed to refresh right now; version: bumped by every write of the pair.
CREATE TABLE amocrm_tokens (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id          INTEGER UNIQUE,
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
    updated_at          TEXT NOT NULL
);
CREATE INDEX amocrm_tokens_expires_at ON amocrm_tokens (expires_at);
CREATE INDEX amocrm_tokens_external_id ON amocrm_tokens (external_id);

-- Audit trail of every install and callback.
CREATE TABLE amocrm_oauth_attempts (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    kind               TEXT NOT NULL,
    outcome            TEXT NOT NULL,
    reason             TEXT,
    detail             TEXT,
    subdomain          TEXT,
    account_id         INTEGER,
    ip                 TEXT,
    user_agent         TEXT,
    state_fingerprint  TEXT,
    state_consumed     INTEGER NOT NULL DEFAULT 0,
    created_at         TEXT NOT NULL,
    finished_at        TEXT
);
CREATE INDEX amocrm_oauth_attempts_created_at ON amocrm_oauth_attempts (created_at);
CREATE INDEX amocrm_oauth_attempts_state_fingerprint ON amocrm_oauth_attempts (state_fingerprint);

-- Admin browser sessions; only the SHA-256 of the cookie value is stored.
CREATE TABLE amoauth_sessions (
    id_hash     TEXT PRIMARY KEY NOT NULL,
    created_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    ip          TEXT,
    user_agent  TEXT
);
CREATE INDEX amoauth_sessions_expires_at ON amoauth_sessions (expires_at);

-- API keys of the host app's services; only the SHA-256 of each secret is stored.
CREATE TABLE amoauth_api_keys (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    key_id      TEXT NOT NULL UNIQUE,
    key_hash    TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);

-- Outbox of events for the host app (AMOAUTH_EVENTS_URL): written where the event happens,
-- delivered by `serve` with retries. payload is the event's `data` as JSON; lease_until
-- claims a delivery so two replicas never send one event at the same time.
CREATE TABLE amoauth_events (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    event_type       TEXT NOT NULL,
    payload          TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT NOT NULL,
    lease_until      TEXT,
    delivered_at     TEXT,
    status           TEXT NOT NULL DEFAULT 'pending',
    last_error       TEXT
);
CREATE INDEX amoauth_events_status_next_attempt_at ON amoauth_events (status, next_attempt_at);
