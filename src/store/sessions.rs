//! `amoauth_sessions`: admin browser logins, stored as hashes of the cookie value.

use super::{Context as _, Store, StoreError, Timestamp};

impl Store {
    pub async fn insert_session(
        &self,
        id_hash: &str,
        created_at: Timestamp,
        expires_at: Timestamp,
        ip: Option<&str>,
        user_agent: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO amoauth_sessions (id_hash, created_at, expires_at, ip, user_agent) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(id_hash)
        .bind(created_at)
        .bind(expires_at)
        .bind(ip)
        .bind(user_agent)
        .execute(&self.pool)
        .await
        .during("saving the admin session")?;
        Ok(())
    }

    pub async fn session_is_valid(
        &self,
        id_hash: &str,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM amoauth_sessions WHERE id_hash = ? AND expires_at > ?",
        )
        .bind(id_hash)
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .during("checking the admin session")?;
        Ok(found.is_some())
    }

    pub async fn delete_session(&self, id_hash: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM amoauth_sessions WHERE id_hash = ?")
            .bind(id_hash)
            .execute(&self.pool)
            .await
            .during("deleting the admin session")?;
        Ok(())
    }

    pub async fn delete_expired_sessions(&self, now: Timestamp) -> Result<u64, StoreError> {
        Ok(
            sqlx::query("DELETE FROM amoauth_sessions WHERE expires_at <= ?")
                .bind(now)
                .execute(&self.pool)
                .await
                .during("deleting expired admin sessions")?
                .rows_affected(),
        )
    }
}
