//! `amocrm_tokens`: connected accounts and their sealed tokens.

use super::{Context as _, Store, StoreError, Timestamp, on_pool};
use crate::crypto::Sealed;

/// A connection to save after a successful callback. Both tokens are sealed with one key.
pub struct NewConnection<'a> {
    pub account_id: i64,
    pub account_name: &'a str,
    pub domain: &'a str,
    pub subdomain: &'a str,
    pub access_token: &'a Sealed,
    pub refresh_token: &'a Sealed,
    pub expires_at: Timestamp,
    pub refresh_expires_at: Timestamp,
    /// The token and account responses with every token value removed.
    pub raw: &'a str,
    pub now: Timestamp,
}

#[derive(Clone, Debug)]
pub struct ConnectionRow {
    pub id: i64,
    pub account_id: Option<i64>,
    pub account_name: Option<String>,
    pub domain: String,
    pub subdomain: String,
    pub access_token: Option<Sealed>,
    pub refresh_token: Option<Sealed>,
    pub expires_at: Timestamp,
    pub refresh_expires_at: Timestamp,
    pub status: String,
    pub raw: Option<String>,
    pub last_refresh_at: Option<Timestamp>,
    pub last_error: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// Columns and values of an upsert; the conflict clause is per dialect.
macro_rules! upsert_insert {
    () => {
        "INSERT INTO amocrm_tokens (account_id, account_name, domain, subdomain, \
     access_token, refresh_token, key_id, expires_at, refresh_expires_at, status, raw, \
     last_refresh_at, last_error, version, created_at, updated_at) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'active', ?, NULL, NULL, 1, ?, ?) "
    };
}
const UPSERT_ON_CONFLICT: &str = concat!(
    upsert_insert!(),
    "ON CONFLICT (account_id) DO UPDATE SET \
     account_name = excluded.account_name, domain = excluded.domain, subdomain = excluded.subdomain, \
     access_token = excluded.access_token, refresh_token = excluded.refresh_token, \
     key_id = excluded.key_id, expires_at = excluded.expires_at, \
     refresh_expires_at = excluded.refresh_expires_at, status = 'active', raw = excluded.raw, \
     last_error = NULL, version = amocrm_tokens.version + 1, updated_at = excluded.updated_at"
);
const UPSERT_ON_DUPLICATE_KEY: &str = concat!(
    upsert_insert!(),
    "ON DUPLICATE KEY UPDATE \
     account_name = VALUES(account_name), domain = VALUES(domain), subdomain = VALUES(subdomain), \
     access_token = VALUES(access_token), refresh_token = VALUES(refresh_token), \
     key_id = VALUES(key_id), expires_at = VALUES(expires_at), \
     refresh_expires_at = VALUES(refresh_expires_at), status = 'active', raw = VALUES(raw), \
     last_error = NULL, version = version + 1, updated_at = VALUES(updated_at)"
);

impl Store {
    /// Inserts the account's connection or replaces its tokens when it reconnects;
    /// the account id is the key because subdomains can be renamed.
    pub async fn upsert_connection(&self, c: &NewConnection<'_>) -> Result<(), StoreError> {
        debug_assert_eq!(c.access_token.key_id, c.refresh_token.key_id);
        let sql = self.dialect(
            UPSERT_ON_CONFLICT,
            UPSERT_ON_CONFLICT,
            UPSERT_ON_DUPLICATE_KEY,
        );
        on_pool!(self, pool => sqlx::query(sql)
            .bind(c.account_id)
            .bind(c.account_name)
            .bind(c.domain)
            .bind(c.subdomain)
            .bind(&c.access_token.ciphertext)
            .bind(&c.refresh_token.ciphertext)
            .bind(&c.access_token.key_id)
            .bind(c.expires_at)
            .bind(c.refresh_expires_at)
            .bind(c.raw)
            .bind(c.now)
            .bind(c.now)
            .execute(pool)
            .await
            .map(drop))
        .during("saving the connection's tokens")
    }

    pub async fn connections(&self) -> Result<Vec<ConnectionRow>, StoreError> {
        let sql = self.sql(
            "SELECT id, account_id, account_name, domain, subdomain, access_token, refresh_token, \
             key_id, expires_at, refresh_expires_at, status, raw, last_refresh_at, last_error, \
             created_at, updated_at FROM amocrm_tokens ORDER BY id",
        );
        let rows: Vec<StoredConnection> =
            on_pool!(self, pool => sqlx::query_as(sql).fetch_all(pool).await)
                .during("listing connections")?;
        Ok(rows.into_iter().map(ConnectionRow::from).collect())
    }

    /// Ids of the keys that sealed stored tokens, with how many rows each sealed.
    pub async fn key_ids_in_use(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let sql = self.sql(
            "SELECT key_id, COUNT(*) AS n FROM amocrm_tokens WHERE key_id IS NOT NULL GROUP BY key_id",
        );
        on_pool!(self, pool => sqlx::query_as(sql).fetch_all(pool).await)
            .during("checking which keys sealed the tokens")
    }
}

/// A row as the database returns it, before the sealed columns are paired with their key.
#[derive(sqlx::FromRow)]
struct StoredConnection {
    id: i64,
    account_id: Option<i64>,
    account_name: Option<String>,
    domain: String,
    subdomain: String,
    access_token: Option<String>,
    refresh_token: Option<String>,
    key_id: Option<String>,
    expires_at: Timestamp,
    refresh_expires_at: Timestamp,
    status: String,
    raw: Option<String>,
    last_refresh_at: Option<Timestamp>,
    last_error: Option<String>,
    created_at: Timestamp,
    updated_at: Timestamp,
}

impl From<StoredConnection> for ConnectionRow {
    fn from(row: StoredConnection) -> Self {
        let sealed = |ciphertext: Option<String>| {
            Some(Sealed {
                key_id: row.key_id.clone()?,
                ciphertext: ciphertext?,
            })
        };
        Self {
            access_token: sealed(row.access_token),
            refresh_token: sealed(row.refresh_token),
            id: row.id,
            account_id: row.account_id,
            account_name: row.account_name,
            domain: row.domain,
            subdomain: row.subdomain,
            expires_at: row.expires_at,
            refresh_expires_at: row.refresh_expires_at,
            status: row.status,
            raw: row.raw,
            last_refresh_at: row.last_refresh_at,
            last_error: row.last_error,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}
