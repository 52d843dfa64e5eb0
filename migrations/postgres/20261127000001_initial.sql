-- OAuth states: the seed's fix. Only the SHA-256 of a state is stored, never the state.
-- external_id, return_url, mode: set when a host app started the flow with a connect link.
-- Times are UTC in TIMESTAMP columns (sqlx sessions run with TimeZone=UTC).
CREATE TABLE amocrm_oauth_states (
    state_hash  VARCHAR(64) PRIMARY KEY,
    subdomain   VARCHAR(255),
    created_at  TIMESTAMP NOT NULL,
    expires_at  TIMESTAMP NOT NULL,
    ip          VARCHAR(64),
    user_agent  TEXT,
    external_id VARCHAR(255),
    return_url  TEXT,
    mode        VARCHAR(16)
);
CREATE INDEX amocrm_oauth_states_expires_at ON amocrm_oauth_states (expires_at);

-- One row per connected amoCRM account; token columns hold ciphertext sealed with key_id.
-- issued_at: when the current pair was issued (keep-alive age); lease_*: the one process
-- allowed to refresh right now; version: bumped by every write of the pair.
CREATE TABLE amocrm_tokens (
    id                  BIGSERIAL PRIMARY KEY,
    account_id          BIGINT UNIQUE,
    account_name        TEXT,
    external_id         VARCHAR(255),
    domain              VARCHAR(255) NOT NULL,
    subdomain           VARCHAR(255) NOT NULL,
    access_token        TEXT,
    refresh_token       TEXT,
    key_id              VARCHAR(32),
    expires_at          TIMESTAMP NOT NULL,
    refresh_expires_at  TIMESTAMP NOT NULL,
    issued_at           TIMESTAMP NOT NULL,
    status              VARCHAR(32) NOT NULL DEFAULT 'active',
    raw                 TEXT,
    last_refresh_at     TIMESTAMP,
    last_error          TEXT,
    refresh_failures    BIGINT NOT NULL DEFAULT 0,
    next_refresh_at     TIMESTAMP,
    lease_owner         VARCHAR(64),
    lease_until         TIMESTAMP,
    version             BIGINT NOT NULL DEFAULT 1,
    created_at          TIMESTAMP NOT NULL,
    updated_at          TIMESTAMP NOT NULL
);
CREATE INDEX amocrm_tokens_expires_at ON amocrm_tokens (expires_at);
CREATE INDEX amocrm_tokens_external_id ON amocrm_tokens (external_id);

-- Audit trail of every install and callback.
CREATE TABLE amocrm_oauth_attempts (
    id                 BIGSERIAL PRIMARY KEY,
    kind               VARCHAR(32) NOT NULL,
    outcome            VARCHAR(32) NOT NULL,
    reason             VARCHAR(64),
    detail             TEXT,
    subdomain          VARCHAR(255),
    account_id         BIGINT,
    ip                 VARCHAR(64),
    user_agent         TEXT,
    state_fingerprint  VARCHAR(64),
    state_consumed     BOOLEAN NOT NULL DEFAULT FALSE,
    created_at         TIMESTAMP NOT NULL,
    finished_at        TIMESTAMP
);
CREATE INDEX amocrm_oauth_attempts_created_at ON amocrm_oauth_attempts (created_at);
CREATE INDEX amocrm_oauth_attempts_state_fingerprint ON amocrm_oauth_attempts (state_fingerprint);

-- Admin browser sessions; only the SHA-256 of the cookie value is stored.
CREATE TABLE amoauth_sessions (
    id_hash     VARCHAR(64) PRIMARY KEY,
    created_at  TIMESTAMP NOT NULL,
    expires_at  TIMESTAMP NOT NULL,
    ip          VARCHAR(64),
    user_agent  TEXT
);
CREATE INDEX amoauth_sessions_expires_at ON amoauth_sessions (expires_at);

-- API keys of the host app's services; only the SHA-256 of each secret is stored.
CREATE TABLE amoauth_api_keys (
    id          BIGSERIAL PRIMARY KEY,
    name        VARCHAR(255) NOT NULL UNIQUE,
    key_id      VARCHAR(64) NOT NULL UNIQUE,
    key_hash    VARCHAR(64) NOT NULL,
    created_at  TIMESTAMP NOT NULL,
    revoked_at  TIMESTAMP
);

-- Outbox of events for the host app (AMOAUTH_EVENTS_URL): written where the event happens,
-- delivered by `serve` with retries. payload is the event's `data` as JSON; lease_until
-- claims a delivery so two replicas never send one event at the same time.
CREATE TABLE amoauth_events (
    id               BIGSERIAL PRIMARY KEY,
    event_type       VARCHAR(64) NOT NULL,
    payload          TEXT NOT NULL,
    created_at       TIMESTAMP NOT NULL,
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  TIMESTAMP NOT NULL,
    lease_until      TIMESTAMP,
    delivered_at     TIMESTAMP,
    status           VARCHAR(16) NOT NULL DEFAULT 'pending',
    last_error       TEXT
);
CREATE INDEX amoauth_events_status_next_attempt_at ON amoauth_events (status, next_attempt_at);
