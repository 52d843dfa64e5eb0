//! `amoauth_sessions`: admin browser logins, stored as hashes of the cookie value; and
//! `amoauth_login_links`: one-time links that open such a session, stored as hashes too.

use rusqlite::OptionalExtension as _;

use super::{Context as _, Store, StoreError, Timestamp, on_hot_path, on_pool};

#[doc(hidden)]
impl Store {
    pub async fn insert_session(
        &self,
        id_hash: &str,
        created_at: Timestamp,
        expires_at: Timestamp,
        ip: Option<&str>,
        user_agent: Option<&str>,
    ) -> Result<(), StoreError> {
        let sql = self.sql(
            "INSERT INTO amoauth_sessions (id_hash, created_at, expires_at, ip, user_agent) \
             VALUES (?, ?, ?, ?, ?)",
        );
        on_pool!(self, pool => sqlx::query(sql)
            .bind(id_hash)
            .bind(created_at)
            .bind(expires_at)
            .bind(ip)
            .bind(user_agent)
            .execute(pool)
            .await
            .map(drop))
        .during("saving the admin session")
    }

    pub async fn session_is_valid(
        &self,
        id_hash: &str,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        const OPERATION: &str = "checking the admin session";
        const VALID_SESSION: &str =
            "SELECT id_hash FROM amoauth_sessions WHERE id_hash = ? AND expires_at > ?";
        let found: Option<String> = on_hot_path!(self, db => {
                db.read(OPERATION, |conn| {
                    conn.prepare_cached(VALID_SESSION)?
                        .query_row((id_hash, super::inline::SqlTimestamp(now)), |row| row.get(0))
                        .optional()
                })
                .await?
        }, pool => sqlx::query_scalar(self.sql(VALID_SESSION))
            .bind(id_hash)
            .bind(now)
            .fetch_optional(pool)
            .await
            .during(OPERATION)?);
        Ok(found.is_some())
    }

    pub async fn delete_session(&self, id_hash: &str) -> Result<(), StoreError> {
        let sql = self.sql("DELETE FROM amoauth_sessions WHERE id_hash = ?");
        on_pool!(self, pool => sqlx::query(sql).bind(id_hash).execute(pool).await.map(drop))
            .during("deleting the admin session")
    }

    /// Deletes expired sessions and login links; returns how many sessions went.
    pub async fn delete_expired_sessions(&self, now: Timestamp) -> Result<u64, StoreError> {
        let sql = self.sql("DELETE FROM amoauth_login_links WHERE expires_at <= ?");
        on_pool!(self, pool => sqlx::query(sql).bind(now).execute(pool).await.map(drop))
            .during("deleting expired login links")?;
        let sql = self.sql("DELETE FROM amoauth_sessions WHERE expires_at <= ?");
        on_pool!(self, pool => sqlx::query(sql).bind(now).execute(pool).await.map(|done| done.rows_affected()))
            .during("deleting expired admin sessions")
    }

    pub async fn insert_login_link(
        &self,
        token_hash: &str,
        expires_at: Timestamp,
    ) -> Result<(), StoreError> {
        let sql =
            self.sql("INSERT INTO amoauth_login_links (token_hash, expires_at) VALUES (?, ?)");
        on_pool!(self, pool => sqlx::query(sql)
            .bind(token_hash)
            .bind(expires_at)
            .execute(pool)
            .await
            .map(drop))
        .during("saving the login link")
    }

    /// Uses up a login link: true for the one caller (on any replica) that deleted it unexpired.
    pub async fn redeem_login_link(
        &self,
        token_hash: &str,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let sql =
            self.sql("DELETE FROM amoauth_login_links WHERE token_hash = ? AND expires_at > ?");
        let deleted = on_pool!(self, pool => sqlx::query(sql)
            .bind(token_hash)
            .bind(now)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))
        .during("using the login link")?;
        Ok(deleted == 1)
    }
}
