//! `amocrm_oauth_states`: create, consume once, list, purge.

use super::attempts::{Attempt, bind_attempt};
use super::retention::Purge;
use super::{BeginWrite as _, Context as _, Store, StoreError, Timestamp, on_pool};
use crate::amocrm::Platform;

pub struct NewState<'a> {
    pub state_hash: &'a str,
    pub subdomain: Option<&'a str>,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub ip: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    /// Set when a host app started the flow with a connect link.
    pub external_id: Option<&'a str>,
    pub return_url: Option<&'a str>,
    pub mode: Option<&'a str>,
    /// Whose integration the consent page was opened for.
    pub platform: Platform,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StateRow {
    pub subdomain: Option<String>,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub external_id: Option<String>,
    pub return_url: Option<String>,
    pub mode: Option<String>,
    pub platform: Platform,
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

const EXPIRED_STATES: Purge = Purge {
    in_subquery: "DELETE FROM amocrm_oauth_states WHERE state_hash IN \
         (SELECT state_hash FROM amocrm_oauth_states WHERE expires_at < ? LIMIT ?)",
    mysql: "DELETE FROM amocrm_oauth_states WHERE expires_at < ? LIMIT ?",
    count: "SELECT COUNT(*) FROM amocrm_oauth_states WHERE expires_at < ?",
    operation: "deleting expired states",
};

#[doc(hidden)]
impl Store {
    pub async fn insert_state(&self, state: &NewState<'_>) -> Result<(), StoreError> {
        let sql = self.sql(
            "INSERT INTO amocrm_oauth_states (state_hash, subdomain, created_at, expires_at, ip, \
             user_agent, external_id, return_url, mode, platform) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        );
        on_pool!(self, pool => sqlx::query(sql)
            .bind(state.state_hash)
            .bind(state.subdomain)
            .bind(state.created_at)
            .bind(state.expires_at)
            .bind(state.ip)
            .bind(state.user_agent)
            .bind(state.external_id)
            .bind(state.return_url)
            .bind(state.mode)
            .bind(state.platform.as_str())
            .execute(pool)
            .await
            .map(drop))
        .during("saving the OAuth state")
    }

    /// Verifies and deletes the state in one transaction: the conditional DELETE decides,
    /// so of any number of concurrent callbacks exactly one sees a deleted row. The winner's
    /// audit row is written in the same transaction, so later callbacks can tell "used"
    /// from "unknown".
    pub async fn consume_state(
        &self,
        state_hash: &str,
        now: Timestamp,
        attempt: &Attempt<'_>,
    ) -> Result<Consumption, StoreError> {
        const OPERATION: &str = "consuming the OAuth state";
        let select = self.sql(
            "SELECT subdomain, created_at, expires_at, ip, user_agent, external_id, return_url, mode, platform \
             FROM amocrm_oauth_states WHERE state_hash = ?",
        );
        let delete =
            self.sql("DELETE FROM amocrm_oauth_states WHERE state_hash = ? AND expires_at > ?");
        let used = self.sql(
            "SELECT id FROM amocrm_oauth_attempts \
             WHERE state_fingerprint = ? AND state_consumed = ? LIMIT 1",
        );
        let (insert, last_id) = (self.insert_attempt_sql(), self.last_insert_id_sql());
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await.during(OPERATION)?;
            let state: Option<StateRow> = sqlx::query_as(select)
                .bind(state_hash)
                .fetch_optional(&mut *tx)
                .await
                .during(OPERATION)?;
            let deleted = sqlx::query(delete)
                .bind(state_hash)
                .bind(now)
                .execute(&mut *tx)
                .await
                .during(OPERATION)?
                .rows_affected();
            let outcome = match state {
                Some(state) if deleted == 1 => {
                    bind_attempt!(sqlx::query(insert), attempt, true)
                        .execute(&mut *tx)
                        .await
                        .during(OPERATION)?;
                    let attempt_id: i64 = sqlx::query_scalar(last_id)
                        .fetch_one(&mut *tx)
                        .await
                        .during(OPERATION)?;
                    Consumption::Consumed { attempt_id, state }
                }
                Some(state) if state.expires_at <= now => Consumption::Expired,
                // Seen but not deleted by us: a concurrent callback consumed it first.
                Some(_) => Consumption::Used,
                None => {
                    let consumed_before: Option<i64> = sqlx::query_scalar(used)
                        .bind(attempt.state_fingerprint)
                        .bind(true)
                        .fetch_optional(&mut *tx)
                        .await
                        .during(OPERATION)?;
                    if consumed_before.is_some() {
                        Consumption::Used
                    } else {
                        Consumption::Unknown
                    }
                }
            };
            tx.commit().await.during(OPERATION)?;
            Ok(outcome)
        })
    }

    /// States that are still valid at `now`, newest first.
    pub async fn active_states(&self, now: Timestamp) -> Result<Vec<StateRow>, StoreError> {
        let sql = self.sql(
            "SELECT subdomain, created_at, expires_at, ip, user_agent, external_id, return_url, mode, platform \
             FROM amocrm_oauth_states WHERE expires_at > ? ORDER BY created_at DESC",
        );
        on_pool!(self, pool => sqlx::query_as(sql).bind(now).fetch_all(pool).await)
            .during("listing active states")
    }

    /// How many states expired before `cutoff` (what a cleanup would remove).
    pub async fn count_expired_states(&self, cutoff: Timestamp) -> Result<i64, StoreError> {
        self.count_purgeable(&EXPIRED_STATES, cutoff).await
    }

    /// Deletes states that expired before `cutoff`, `batch` rows at a time (see `purge`);
    /// returns how many rows were removed.
    pub async fn delete_expired_states(
        &self,
        cutoff: Timestamp,
        batch: i64,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<u64, StoreError> {
        self.purge(&EXPIRED_STATES, cutoff, batch, progress).await
    }
}
