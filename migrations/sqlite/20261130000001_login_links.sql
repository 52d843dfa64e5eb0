-- One-time admin login links printed at start; only the SHA-256 of the link's token is stored,
-- so any replica can redeem a link once.
CREATE TABLE amoauth_login_links (
    token_hash  TEXT PRIMARY KEY NOT NULL,
    expires_at  TEXT NOT NULL
);
