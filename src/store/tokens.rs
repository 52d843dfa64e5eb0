//! `amocrm_tokens`: connected accounts and their sealed tokens.

use sqlx::Row as _;

use super::{Context as _, Store, StoreError, Timestamp};
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

impl Store {
    /// Inserts the account's connection or replaces its tokens when it reconnects;
    /// the account id is the key because subdomains can be renamed.
    pub async fn upsert_connection(&self, c: &NewConnection<'_>) -> Result<(), StoreError> {
        debug_assert_eq!(c.access_token.key_id, c.refresh_token.key_id);
        sqlx::query(
            "INSERT INTO amocrm_tokens (account_id, account_name, domain, subdomain, access_token, \
             refresh_token, key_id, expires_at, refresh_expires_at, status, raw, last_refresh_at, \
             last_error, version, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'active', ?, NULL, NULL, 1, ?, ?) \
             ON CONFLICT (account_id) DO UPDATE SET account_name = excluded.account_name, \
             domain = excluded.domain, subdomain = excluded.subdomain, \
             access_token = excluded.access_token, refresh_token = excluded.refresh_token, \
             key_id = excluded.key_id, expires_at = excluded.expires_at, \
             refresh_expires_at = excluded.refresh_expires_at, status = 'active', \
             raw = excluded.raw, last_error = NULL, version = amocrm_tokens.version + 1, \
             updated_at = excluded.updated_at",
        )
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
        .execute(&self.pool)
        .await
        .during("saving the connection's tokens")?;
        Ok(())
    }

    pub async fn connections(&self) -> Result<Vec<ConnectionRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, account_id, account_name, domain, subdomain, access_token, refresh_token, \
             key_id, expires_at, refresh_expires_at, status, raw, last_refresh_at, last_error, \
             created_at, updated_at FROM amocrm_tokens ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .during("listing connections")?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let key_id: Option<String> = row.get("key_id");
                let sealed = |column: &str| {
                    let ciphertext: Option<String> = row.get(column);
                    Some(Sealed {
                        key_id: key_id.clone()?,
                        ciphertext: ciphertext?,
                    })
                };
                ConnectionRow {
                    id: row.get("id"),
                    account_id: row.get("account_id"),
                    account_name: row.get("account_name"),
                    domain: row.get("domain"),
                    subdomain: row.get("subdomain"),
                    access_token: sealed("access_token"),
                    refresh_token: sealed("refresh_token"),
                    expires_at: row.get("expires_at"),
                    refresh_expires_at: row.get("refresh_expires_at"),
                    status: row.get("status"),
                    raw: row.get("raw"),
                    last_refresh_at: row.get("last_refresh_at"),
                    last_error: row.get("last_error"),
                    created_at: row.get("created_at"),
                    updated_at: row.get("updated_at"),
                }
            })
            .collect())
    }

    /// Ids of the keys that sealed stored tokens, with how many rows each sealed.
    pub async fn key_ids_in_use(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT key_id, COUNT(*) AS n FROM amocrm_tokens WHERE key_id IS NOT NULL GROUP BY key_id",
        )
        .fetch_all(&self.pool)
        .await
        .during("checking which keys sealed the tokens")?;
        Ok(rows
            .into_iter()
            .map(|row| (row.get("key_id"), row.get("n")))
            .collect())
    }
}
