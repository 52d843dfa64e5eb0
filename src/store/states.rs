//! `amocrm_oauth_states`: create, consume once, list, purge.

use super::attempts::{Attempt, insert_attempt};
use super::{Context as _, Store, StoreError, Timestamp};

pub struct NewState<'a> {
    pub state_hash: &'a str,
    pub subdomain: Option<&'a str>,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub ip: Option<&'a str>,
    pub user_agent: Option<&'a str>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StateRow {
    pub subdomain: Option<String>,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

/// What happened to a state presented by a callback.
#[derive(Debug)]
pub enum Consumption {
    /// This caller consumed it; the audit row `attempt_id` was opened in the same transaction.
    Consumed {
        attempt_id: i64,
        state: StateRow,
    },
    Expired,
    /// It existed and was consumed before (by an earlier or a concurrent callback).
    Used,
    Unknown,
}

impl Store {
    pub async fn insert_state(&self, state: &NewState<'_>) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO amocrm_oauth_states (state_hash, subdomain, created_at, expires_at, ip, user_agent) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(state.state_hash)
        .bind(state.subdomain)
        .bind(state.created_at)
        .bind(state.expires_at)
        .bind(state.ip)
        .bind(state.user_agent)
        .execute(&self.pool)
        .await
        .during("saving the OAuth state")?;
        Ok(())
    }

    /// Verifies and deletes the state in one transaction: the conditional DELETE decides,
    /// so of any number of concurrent callbacks exactly one sees a deleted row. The winner's
    /// audit row is written in the same transaction, so losers can tell "used" from "unknown".
    pub async fn consume_state(
        &self,
        state_hash: &str,
        now: Timestamp,
        attempt: &Attempt<'_>,
    ) -> Result<Consumption, StoreError> {
        const OPERATION: &str = "consuming the OAuth state";
        // IMMEDIATE takes SQLite's write lock up front, so concurrent consumers queue
        // instead of failing to upgrade a read lock.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .during(OPERATION)?;
        let state: Option<StateRow> = sqlx::query_as(
            "SELECT subdomain, created_at, expires_at, ip, user_agent \
             FROM amocrm_oauth_states WHERE state_hash = ?",
        )
        .bind(state_hash)
        .fetch_optional(&mut *tx)
        .await
        .during(OPERATION)?;
        let deleted =
            sqlx::query("DELETE FROM amocrm_oauth_states WHERE state_hash = ? AND expires_at > ?")
                .bind(state_hash)
                .bind(now)
                .execute(&mut *tx)
                .await
                .during(OPERATION)?
                .rows_affected();
        let outcome = match state {
            Some(state) if deleted == 1 => {
                let attempt_id = insert_attempt(&mut *tx, attempt, true)
                    .await
                    .during(OPERATION)?;
                Consumption::Consumed { attempt_id, state }
            }
            Some(state) if state.expires_at <= now => Consumption::Expired,
            _ => {
                let fingerprint = attempt.state_fingerprint;
                let used: Option<i64> = sqlx::query_scalar(
                    "SELECT id FROM amocrm_oauth_attempts \
                     WHERE state_fingerprint = ? AND state_consumed = 1 LIMIT 1",
                )
                .bind(fingerprint)
                .fetch_optional(&mut *tx)
                .await
                .during(OPERATION)?;
                if used.is_some() {
                    Consumption::Used
                } else {
                    Consumption::Unknown
                }
            }
        };
        tx.commit().await.during(OPERATION)?;
        Ok(outcome)
    }

    /// States that are still valid at `now`, newest first.
    pub async fn active_states(&self, now: Timestamp) -> Result<Vec<StateRow>, StoreError> {
        sqlx::query_as(
            "SELECT subdomain, created_at, expires_at, ip, user_agent FROM amocrm_oauth_states \
             WHERE expires_at > ? ORDER BY created_at DESC",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .during("listing active states")
    }

    /// Deletes states that expired before `cutoff`, in batches so a large purge never holds
    /// the write lock for long. Returns how many rows were removed.
    pub async fn delete_expired_states(
        &self,
        cutoff: Timestamp,
        batch: u32,
    ) -> Result<u64, StoreError> {
        let mut removed = 0;
        loop {
            let deleted = sqlx::query(
                "DELETE FROM amocrm_oauth_states WHERE state_hash IN \
                 (SELECT state_hash FROM amocrm_oauth_states WHERE expires_at < ? LIMIT ?)",
            )
            .bind(cutoff)
            .bind(batch)
            .execute(&self.pool)
            .await
            .during("deleting expired states")?
            .rows_affected();
            removed += deleted;
            if deleted < u64::from(batch) {
                return Ok(removed);
            }
        }
    }
}
