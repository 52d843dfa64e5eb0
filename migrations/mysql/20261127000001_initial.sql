-- OAuth states: the seed's fix. Only the SHA-256 of a state is stored, never the state.
-- external_id, return_url, mode: set when a host app started the flow with a connect link.
-- Times are UTC in DATETIME(6) columns; hashes compare byte for byte (ascii_bin).
CREATE TABLE amocrm_oauth_states (
    state_hash  VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    subdomain   VARCHAR(255),
    created_at  DATETIME(6) NOT NULL,
    expires_at  DATETIME(6) NOT NULL,
    ip          VARCHAR(64),
    user_agent  TEXT,
    external_id VARCHAR(255),
    return_url  TEXT,
    mode        VARCHAR(16),
    INDEX amocrm_oauth_states_expires_at (expires_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- One row per connected amoCRM account; token columns hold ciphertext sealed with key_id.
-- issued_at: when the current pair was issued (keep-alive age); lease_*: the one process
-- allowed to refresh right now; version: bumped by every write of the pair.
CREATE TABLE amocrm_tokens (
    id                  BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    account_id          BIGINT UNIQUE,
    account_name        TEXT,
    external_id         VARCHAR(255),
    domain              VARCHAR(255) NOT NULL,
    subdomain           VARCHAR(255) NOT NULL,
    access_token        TEXT,
    refresh_token       TEXT,
    key_id              VARCHAR(32),
    expires_at          DATETIME(6) NOT NULL,
    refresh_expires_at  DATETIME(6) NOT NULL,
    issued_at           DATETIME(6) NOT NULL,
    status              VARCHAR(32) NOT NULL DEFAULT 'active',
    raw                 LONGTEXT,
    last_refresh_at     DATETIME(6),
    last_error          TEXT,
    refresh_failures    BIGINT NOT NULL DEFAULT 0,
    next_refresh_at     DATETIME(6),
    lease_owner         VARCHAR(64),
    lease_until         DATETIME(6),
    version             BIGINT NOT NULL DEFAULT 1,
    created_at          DATETIME(6) NOT NULL,
    updated_at          DATETIME(6) NOT NULL,
    INDEX amocrm_tokens_expires_at (expires_at),
    INDEX amocrm_tokens_external_id (external_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Audit trail of every install and callback.
CREATE TABLE amocrm_oauth_attempts (
    id                 BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    kind               VARCHAR(32) NOT NULL,
    outcome            VARCHAR(32) NOT NULL,
    reason             VARCHAR(64),
    detail             TEXT,
    subdomain          VARCHAR(255),
    account_id         BIGINT,
    ip                 VARCHAR(64),
    user_agent         TEXT,
    state_fingerprint  VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin,
    state_consumed     BOOLEAN NOT NULL DEFAULT FALSE,
    created_at         DATETIME(6) NOT NULL,
    finished_at        DATETIME(6),
    INDEX amocrm_oauth_attempts_created_at (created_at),
    INDEX amocrm_oauth_attempts_state_fingerprint (state_fingerprint)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Admin browser sessions; only the SHA-256 of the cookie value is stored.
CREATE TABLE amoauth_sessions (
    id_hash     VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    created_at  DATETIME(6) NOT NULL,
    expires_at  DATETIME(6) NOT NULL,
    ip          VARCHAR(64),
    user_agent  TEXT,
    INDEX amoauth_sessions_expires_at (expires_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- API keys of the host app's services; only the SHA-256 of each secret is stored.
CREATE TABLE amoauth_api_keys (
    id          BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name        VARCHAR(255) NOT NULL UNIQUE,
    key_id      VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL UNIQUE,
    key_hash    VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    created_at  DATETIME(6) NOT NULL,
    revoked_at  DATETIME(6)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Outbox of events for the host app (AMOAUTH_EVENTS_URL): written where the event happens,
-- delivered by `serve` with retries. payload is the event's `data` as JSON; lease_until
-- claims a delivery so two replicas never send one event at the same time.
CREATE TABLE amoauth_events (
    id               BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    event_type       VARCHAR(64) NOT NULL,
    payload          LONGTEXT NOT NULL,
    created_at       DATETIME(6) NOT NULL,
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  DATETIME(6) NOT NULL,
    lease_until      DATETIME(6),
    delivered_at     DATETIME(6),
    status           VARCHAR(16) NOT NULL DEFAULT 'pending',
    last_error       TEXT,
    INDEX amoauth_events_status_next_attempt_at (status, next_attempt_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
