-- One-time admin login links printed at start; only the SHA-256 of the link's token is stored,
-- so any replica can redeem a link once.
CREATE TABLE amoauth_login_links (
    token_hash  VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    expires_at  DATETIME(6) NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
