//! `amoauth_gateway_pace`: one row per amoCRM account holding the next free send time. A
//! gateway call reserves its slot with one atomic statement, so every replica on the same
//! database shares one pace per account.

use std::time::Duration;

use super::{BeginWrite as _, Context as _, Pool, Store, StoreError};

/// The outcome of asking for a send slot.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// The slot is taken: send after sleeping this long (zero when it is already due).
    Reserved { wait: Duration },
    /// The next free slot is further away than allowed; nothing was reserved.
    Full { next_free_in: Duration },
}

const OPERATION: &str = "reserving a gateway send slot";

/// The database clock in microseconds since the Unix epoch, so replicas with skewed clocks
/// still share one timeline.
const POSTGRES_NOW_US: &str = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)";

impl Store {
    /// Reserves the account's next send slot, `spacing` after the previous one, unless it is
    /// more than `max_wait` away (then nothing changes and the wait is reported).
    pub async fn reserve_send_slot(
        &self,
        account_id: i64,
        spacing: Duration,
        max_wait: Duration,
    ) -> Result<Reservation, StoreError> {
        let spacing = micros(spacing);
        let max_wait = micros(max_wait);
        let reserved: Option<(i64, i64)> = match &self.pool {
            // One file, one machine: the process clock is the shared clock.
            Pool::Sqlite(pool) => {
                let now = chrono::Utc::now().timestamp_micros();
                sqlx::query_as(
                    "INSERT INTO amoauth_gateway_pace (account_id, next_free_us) VALUES (?1, ?2 + ?3) \
                     ON CONFLICT (account_id) DO UPDATE SET next_free_us = MAX(next_free_us, ?2) + ?3 \
                     WHERE MAX(next_free_us, ?2) - ?2 <= ?4 \
                     RETURNING next_free_us - ?3, ?2",
                )
                .bind(account_id)
                .bind(now)
                .bind(spacing)
                .bind(max_wait)
                .fetch_optional(pool)
                .await
            }
            Pool::Postgres(pool) => {
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "WITH clock AS (SELECT {POSTGRES_NOW_US} AS now_us) \
                     INSERT INTO amoauth_gateway_pace AS pace (account_id, next_free_us) \
                     SELECT $1, clock.now_us + $2 FROM clock \
                     ON CONFLICT (account_id) DO UPDATE \
                     SET next_free_us = GREATEST(pace.next_free_us, EXCLUDED.next_free_us - $2) + $2 \
                     WHERE GREATEST(pace.next_free_us, EXCLUDED.next_free_us - $2) \
                           - (EXCLUDED.next_free_us - $2) <= $3 \
                     RETURNING pace.next_free_us - $2, (SELECT now_us FROM clock)"
                )))
                .bind(account_id)
                .bind(spacing)
                .bind(max_wait)
                .fetch_optional(pool)
                .await
            }
            // No UPDATE … RETURNING: the same in one transaction holding the row's lock.
            Pool::MySql(pool) => async {
                let mut tx = pool.begin_write().await?;
                // Locks the row exclusively at once (INSERT IGNORE's shared lock would deadlock
                // two callers upgrading it together); the locking read then sees the latest.
                sqlx::query(
                    "INSERT INTO amoauth_gateway_pace (account_id, next_free_us) VALUES (?, 0) \
                     ON DUPLICATE KEY UPDATE next_free_us = next_free_us",
                )
                .bind(account_id)
                .execute(&mut *tx)
                .await?;
                let (next_free, now): (i64, i64) = sqlx::query_as(
                    "SELECT next_free_us, CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED) \
                     FROM amoauth_gateway_pace WHERE account_id = ? FOR UPDATE",
                )
                .bind(account_id)
                .fetch_one(&mut *tx)
                .await?;
                let slot = next_free.max(now);
                if slot - now > max_wait {
                    tx.rollback().await?;
                    return Ok(None);
                }
                sqlx::query("UPDATE amoauth_gateway_pace SET next_free_us = ? WHERE account_id = ?")
                    .bind(slot + spacing)
                    .bind(account_id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(Some((slot, now)))
            }
            .await,
        }
        .during(OPERATION)?;
        if let Some((slot, now)) = reserved {
            return Ok(Reservation::Reserved {
                wait: from_micros(slot - now),
            });
        }
        let next_free_in = self.next_free_in(account_id).await?;
        Ok(Reservation::Full { next_free_in })
    }

    /// How far away the account's next free slot is, on the clock `reserve_send_slot` uses.
    async fn next_free_in(&self, account_id: i64) -> Result<Duration, StoreError> {
        let micros_left: Option<i64> = match &self.pool {
            Pool::Sqlite(pool) => {
                sqlx::query_scalar(
                    "SELECT next_free_us - ? FROM amoauth_gateway_pace WHERE account_id = ?",
                )
                .bind(chrono::Utc::now().timestamp_micros())
                .bind(account_id)
                .fetch_optional(pool)
                .await
            }
            Pool::Postgres(pool) => {
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT next_free_us - {POSTGRES_NOW_US} FROM amoauth_gateway_pace WHERE account_id = $1"
                )))
                .bind(account_id)
                .fetch_optional(pool)
                .await
            }
            Pool::MySql(pool) => {
                sqlx::query_scalar(
                    "SELECT next_free_us - CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED) \
                     FROM amoauth_gateway_pace WHERE account_id = ? FOR UPDATE",
                )
                .bind(account_id)
                .fetch_optional(pool)
                .await
            }
        }
        .during(OPERATION)?;
        Ok(from_micros(micros_left.unwrap_or_default()))
    }
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

fn from_micros(micros: i64) -> Duration {
    Duration::from_micros(u64::try_from(micros).unwrap_or_default())
}
