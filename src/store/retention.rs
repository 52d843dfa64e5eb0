//! Purges in batches: expired states, and (retention) audit rows and delivered events older
//! than their keep-time, so no table grows without bound from requests anyone can make.

use super::{Context as _, Store, StoreError, Timestamp, on_pool};

/// What a purge deletes, in each dialect: MySQL allows LIMIT on DELETE but not in an IN
/// subquery; SQLite and PostgreSQL the reverse. Each statement binds the cutoff, then the batch.
pub(super) struct Purge {
    pub in_subquery: &'static str,
    pub mysql: &'static str,
    pub count: &'static str,
    pub operation: &'static str,
}

const OLD_ATTEMPTS: Purge = Purge {
    in_subquery: "DELETE FROM amocrm_oauth_attempts WHERE id IN \
         (SELECT id FROM amocrm_oauth_attempts WHERE created_at < ? ORDER BY id LIMIT ?)",
    mysql: "DELETE FROM amocrm_oauth_attempts WHERE created_at < ? ORDER BY id LIMIT ?",
    count: "SELECT COUNT(*) FROM amocrm_oauth_attempts WHERE created_at < ?",
    operation: "deleting old audit rows",
};

const OLD_DELIVERED_EVENTS: Purge = Purge {
    in_subquery: "DELETE FROM amoauth_events WHERE id IN (SELECT id FROM amoauth_events \
         WHERE status = 'delivered' AND delivered_at < ? ORDER BY id LIMIT ?)",
    mysql: "DELETE FROM amoauth_events WHERE status = 'delivered' AND delivered_at < ? \
         ORDER BY id LIMIT ?",
    count: "SELECT COUNT(*) FROM amoauth_events WHERE status = 'delivered' AND delivered_at < ?",
    operation: "deleting old delivered events",
};

#[doc(hidden)]
impl Store {
    /// Deletes audit rows written before `cutoff`, `batch` rows at a time; returns how many.
    pub async fn delete_attempts_before(
        &self,
        cutoff: Timestamp,
        batch: i64,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<u64, StoreError> {
        self.purge(&OLD_ATTEMPTS, cutoff, batch, progress).await
    }

    pub async fn count_attempts_before(&self, cutoff: Timestamp) -> Result<i64, StoreError> {
        self.count_purgeable(&OLD_ATTEMPTS, cutoff).await
    }

    /// Deletes events delivered before `cutoff` (never pending or failed ones), `batch` rows
    /// at a time; returns how many.
    pub async fn delete_delivered_events_before(
        &self,
        cutoff: Timestamp,
        batch: i64,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<u64, StoreError> {
        self.purge(&OLD_DELIVERED_EVENTS, cutoff, batch, progress)
            .await
    }

    pub async fn count_delivered_events_before(
        &self,
        cutoff: Timestamp,
    ) -> Result<i64, StoreError> {
        self.count_purgeable(&OLD_DELIVERED_EVENTS, cutoff).await
    }

    /// Deletes what `purge` names before `cutoff`, `batch` rows at a time, so a large purge
    /// never holds a lock for long; `progress` hears the running total after each batch.
    /// After each batch it waits as long as the batch took: SQLite's waiting writers only
    /// poll for the lock, so back-to-back batches starved installs for seconds (BENCHMARKS.md).
    pub(super) async fn purge(
        &self,
        purge: &Purge,
        cutoff: Timestamp,
        batch: i64,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<u64, StoreError> {
        let mut removed = 0;
        loop {
            let started = std::time::Instant::now();
            let sql = self.dialect(purge.in_subquery, purge.in_subquery, purge.mysql);
            let deleted = on_pool!(self, pool => sqlx::query(sql)
                .bind(cutoff)
                .bind(batch)
                .execute(pool)
                .await
                .map(|done| done.rows_affected()))
            .during(purge.operation)?;
            removed += deleted;
            progress(removed);
            if deleted < batch.unsigned_abs() {
                return Ok(removed);
            }
            tokio::time::sleep(started.elapsed()).await;
        }
    }

    pub(super) async fn count_purgeable(
        &self,
        purge: &Purge,
        cutoff: Timestamp,
    ) -> Result<i64, StoreError> {
        let sql = self.sql(purge.count);
        on_pool!(self, pool => sqlx::query_scalar(sql).bind(cutoff).fetch_one(pool).await)
            .during(purge.operation)
    }
}
