//! `amoauth_api_keys`: keys of the host app's services, stored as SHA-256 hashes.

use rusqlite::OptionalExtension as _;

use super::{Context as _, Store, StoreError, Timestamp, on_hot_path, on_pool};

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ApiKeyRow {
    pub name: String,
    /// The public part of the key, shown in listings.
    pub key_id: String,
    pub created_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

/// The hash of an active (not revoked) key, by its public id; also a scalar subquery of the
/// token call's one statement (tokens.rs).
macro_rules! active_key_hash {
    () => {
        "SELECT key_hash FROM amoauth_api_keys WHERE key_id = ? AND revoked_at IS NULL"
    };
}
pub(super) use active_key_hash;
const ACTIVE_KEY_HASH: &str = active_key_hash!();

#[doc(hidden)]
impl Store {
    /// Saves a new key; a name is never reused, even after revocation, so logs stay unambiguous.
    pub async fn insert_api_key(
        &self,
        name: &str,
        key_id: &str,
        key_hash: &str,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let sql = self.sql(
            "INSERT INTO amoauth_api_keys (name, key_id, key_hash, created_at) VALUES (?, ?, ?, ?)",
        );
        let result = on_pool!(self, pool => sqlx::query(sql).bind(name).bind(key_id).bind(key_hash).bind(now).execute(pool).await.map(drop));
        match result {
            Err(sqlx::Error::Database(err)) if err.is_unique_violation() => {
                Err(StoreError::Duplicate(format!(
                    "an API key named `{name}` already exists (names are never reused); choose another name"
                )))
            }
            other => other.during("saving the API key"),
        }
    }

    /// The stored hash of an active (not revoked) key.
    pub async fn active_api_key_hash(&self, key_id: &str) -> Result<Option<String>, StoreError> {
        const OPERATION: &str = "checking the API key";
        on_hot_path!(self, db => {
                db.read(OPERATION, |conn| {
                    conn.prepare_cached(ACTIVE_KEY_HASH)?
                        .query_row([key_id], |row| row.get(0))
                        .optional()
                })
                .await
        }, pool => sqlx::query_scalar(self.sql(ACTIVE_KEY_HASH))
            .bind(key_id)
            .fetch_optional(pool)
            .await
            .during(OPERATION))
    }

    pub async fn api_keys(&self) -> Result<Vec<ApiKeyRow>, StoreError> {
        let sql = self
            .sql("SELECT name, key_id, created_at, revoked_at FROM amoauth_api_keys ORDER BY id");
        on_pool!(self, pool => sqlx::query_as(sql).fetch_all(pool).await).during("listing API keys")
    }

    /// Revokes the key at once: every later request with it is refused.
    pub async fn revoke_api_key(&self, name: &str, now: Timestamp) -> Result<bool, StoreError> {
        let sql = self.sql(
            "UPDATE amoauth_api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
        );
        on_pool!(self, pool => sqlx::query(sql)
            .bind(now)
            .bind(name)
            .execute(pool)
            .await
            .map(|done| done.rows_affected() == 1))
        .during("revoking the API key")
    }
}
