//! `amocrm_oauth_states`: create, consume once, list, purge.

use rusqlite::{OptionalExtension as _, params_from_iter};

use super::attempts::{self, Attempt, bind_attempt};
use super::inline::{IntoOwnedRow as _, SqlTimestamp};
use super::retention::Purge;
use super::{Context as _, Store, StoreError, Timestamp, on_hot_path, on_pool};
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

/// The columns of a new state, in the order of `NewState::values`.
macro_rules! insert_state {
    () => {
        "INSERT INTO amocrm_oauth_states (state_hash, subdomain, created_at, expires_at, ip, \
         user_agent, external_id, return_url, mode, platform) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    };
}
/// The columns a callback reads back, in `StateRow`'s order (`StateRow::from_sqlite`).
macro_rules! state_columns {
    () => {
        "subdomain, created_at, expires_at, ip, user_agent, external_id, return_url, mode, platform"
    };
}

/// A new state and its install's audit row: SQLite runs the two inserts in one transaction,
/// PostgreSQL in one statement, MySQL in one CALL of a procedure (its migration
/// 20261201000018 holds the same two inserts).
const INSERT_STATE: &str = insert_state!();
const START_POSTGRES: &str = concat!(
    "WITH state AS (",
    insert_state!(),
    ") ",
    attempts::insert_attempt!()
);
/// The conditional DELETE decides which callback consumes a state.
macro_rules! delete_state {
    () => {
        "DELETE FROM amocrm_oauth_states WHERE state_hash = ? AND expires_at > ?"
    };
}
const CONSUME_SQLITE: &str = concat!(delete_state!(), " RETURNING ", state_columns!());
/// PostgreSQL consumes the state and opens the audit row in one statement.
const CONSUME_POSTGRES: &str = concat!(
    "WITH consumed AS (",
    delete_state!(),
    " RETURNING ",
    state_columns!(),
    "), audit AS (INSERT INTO amocrm_oauth_attempts (",
    attempts::attempt_columns!(),
    ") SELECT ",
    attempts::attempt_placeholders!(),
    " FROM consumed RETURNING id) SELECT ",
    state_columns!(),
    ", audit.id AS attempt_id FROM consumed, audit"
);
const START_MYSQL: &str = concat!(
    "CALL amoauth_start_install(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ",
    attempts::attempt_placeholders!(),
    ")"
);
/// MySQL has no DELETE ... RETURNING: its procedure reads the row, then the DELETE decides.
const CONSUME_MYSQL: &str = concat!(
    "CALL amoauth_consume_state(?, ?, ",
    attempts::attempt_placeholders!(),
    ")"
);
const SELECT_STATE: &str = concat!(
    "SELECT ",
    state_columns!(),
    " FROM amocrm_oauth_states WHERE state_hash = ?"
);
/// A callback that consumed this state before left an audit row saying so. `TRUE` is
/// written out: it must match the partial index's condition word for word on SQLite.
const CONSUMED_BEFORE: &str = "SELECT id FROM amocrm_oauth_attempts \
     WHERE state_fingerprint = ? AND state_consumed = TRUE LIMIT 1";

/// Binds a new state's values (`NewState::values`) to a sqlx query.
macro_rules! bind_state {
    ($query:expr, $state:expr) => {{
        let v = $state.values();
        $query
            .bind(v.0)
            .bind(v.1)
            .bind(v.2)
            .bind(v.3)
            .bind(v.4)
            .bind(v.5)
            .bind(v.6)
            .bind(v.7)
            .bind(v.8)
            .bind(v.9)
    }};
}

/// A new state's values in the column order of `insert_state!`: the one place that order is
/// bound, for sqlx and SQLite's inline path alike.
type StateValues<'a> = (
    &'a str,
    Option<&'a str>,
    Timestamp,
    Timestamp,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    &'static str,
);

impl<'a> NewState<'a> {
    fn values(&self) -> StateValues<'a> {
        (
            self.state_hash,
            self.subdomain,
            self.created_at,
            self.expires_at,
            self.ip,
            self.user_agent,
            self.external_id,
            self.return_url,
            self.mode,
            self.platform.as_str(),
        )
    }
}

impl StateRow {
    /// A row of `state_columns!` from SQLite's inline path.
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            subdomain: row.get(0)?,
            created_at: super::inline::timestamp(row, 1)?,
            expires_at: super::inline::timestamp(row, 2)?,
            ip: row.get(3)?,
            user_agent: row.get(4)?,
            external_id: row.get(5)?,
            return_url: row.get(6)?,
            mode: row.get(7)?,
            platform: super::inline::named_value(row, 8)?,
        })
    }
}

/// A consumed state with the id of the audit row opened for it (PostgreSQL's statement,
/// MySQL's procedure).
#[derive(sqlx::FromRow)]
struct ConsumedRow {
    #[sqlx(flatten)]
    state: StateRow,
    attempt_id: i64,
}

#[doc(hidden)]
impl Store {
    /// Saves an install's state together with its audit row `attempt`: one transaction on
    /// SQLite and MySQL, one statement on PostgreSQL.
    pub async fn start_state(
        &self,
        state: &NewState<'_>,
        attempt: &Attempt<'_>,
    ) -> Result<(), StoreError> {
        const OPERATION: &str = "saving the OAuth state";
        on_hot_path!(self, db => {
            let state = state.values().owned().during(OPERATION)?;
            let attempt = attempt.values(false).owned().during(OPERATION)?;
            db.write(OPERATION, move |tx| {
                tx.prepare_cached(INSERT_STATE)?.execute(params_from_iter(&state))?;
                tx.prepare_cached(attempts::insert_attempt!())?
                    .execute(params_from_iter(&attempt))?;
                Ok(())
            })
            .await
        }, pool => {
            let sql = self.server_dialect(START_POSTGRES, START_MYSQL);
            let query = bind_state!(sqlx::query(sql), state);
            bind_attempt!(query, attempt, false)
                .execute(pool)
                .await
                .map(drop)
                .during(OPERATION)
        })
    }

    /// Verifies and deletes the state: the conditional DELETE decides, so of any number of
    /// concurrent callbacks exactly one consumes it. The winner's audit row is written with
    /// it (one transaction: inline on SQLite, one statement on PostgreSQL, one CALL on MySQL),
    /// so later callbacks can tell "used"
    /// from "unknown". Only a callback that consumes nothing reads more.
    pub async fn consume_state(
        &self,
        state_hash: &str,
        now: Timestamp,
        attempt: &Attempt<'_>,
    ) -> Result<Consumption, StoreError> {
        const OPERATION: &str = "consuming the OAuth state";
        let consumed = on_hot_path!(self, db => {
            let state_hash = state_hash.to_owned();
            let attempt = attempt.values(true).owned().during(OPERATION)?;
            db.write(OPERATION, move |tx| {
                let state = tx
                    .prepare_cached(CONSUME_SQLITE)?
                    .query_row((&state_hash, SqlTimestamp(now)), StateRow::from_sqlite)
                    .optional()?;
                let Some(state) = state else {
                    return Ok(None);
                };
                tx.prepare_cached(attempts::insert_attempt!())?
                    .execute(params_from_iter(&attempt))?;
                Ok(Some((tx.last_insert_rowid(), state)))
            })
            .await?
        }, pool => {
            let sql = self.server_dialect(CONSUME_POSTGRES, CONSUME_MYSQL);
            let query = sqlx::query_as(sql).bind(state_hash).bind(now);
            let row: Option<ConsumedRow> = bind_attempt!(query, attempt, true)
                .fetch_optional(pool)
                .await
                .during(OPERATION)?;
            row.map(|row| (row.attempt_id, row.state))
        });
        match consumed {
            Some((attempt_id, state)) => Ok(Consumption::Consumed { attempt_id, state }),
            None => self.why_not_consumed(state_hash, now, attempt).await,
        }
    }

    /// Why a callback consumed nothing: the state expired, was used, or never existed.
    async fn why_not_consumed(
        &self,
        state_hash: &str,
        now: Timestamp,
        attempt: &Attempt<'_>,
    ) -> Result<Consumption, StoreError> {
        const OPERATION: &str = "consuming the OAuth state";
        let state: Option<StateRow> = on_pool!(self, pool => sqlx::query_as(self.sql(SELECT_STATE))
            .bind(state_hash)
            .fetch_optional(pool)
            .await)
        .during(OPERATION)?;
        match state {
            Some(state) if state.expires_at <= now => return Ok(Consumption::Expired),
            // Still valid, yet the DELETE did not take it: a concurrent callback's did.
            Some(_) => return Ok(Consumption::Used),
            None => {}
        }
        let consumed_before: Option<i64> =
            on_pool!(self, pool => sqlx::query_scalar(self.sql(CONSUMED_BEFORE))
                .bind(attempt.state_fingerprint)
                .fetch_optional(pool)
                .await)
            .during(OPERATION)?;
        Ok(match consumed_before {
            Some(_) => Consumption::Used,
            None => Consumption::Unknown,
        })
    }

    /// States that are still valid at `now`, newest first.
    pub async fn active_states(&self, now: Timestamp) -> Result<Vec<StateRow>, StoreError> {
        let sql = self.sql(concat!(
            "SELECT ",
            state_columns!(),
            " FROM amocrm_oauth_states WHERE expires_at > ? ORDER BY created_at DESC"
        ));
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

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::AssertSqlSafe;

    /// Telling a used state from an unknown one reads the index of consumed states' audit
    /// rows, which an install's row (its state not consumed) never enters.
    #[tokio::test]
    async fn a_replayed_state_is_looked_up_in_the_index_of_consumed_states() {
        let pool = sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap();
        Store::from_pool(pool.clone()).migrate().await.unwrap();
        // EXPLAIN QUERY PLAN's rows are (id, parent, notused, detail).
        let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(AssertSqlSafe(format!(
            "EXPLAIN QUERY PLAN {CONSUMED_BEFORE}"
        )))
        .bind("0123456789abcdef")
        .fetch_all(&pool)
        .await
        .unwrap();
        assert!(
            plan.iter().any(|step| step
                .3
                .contains("INDEX amocrm_oauth_attempts_consumed_state")),
            "{plan:?}"
        );
        let index: (String,) = sqlx::query_as(
            "SELECT sql FROM sqlite_master WHERE name = 'amocrm_oauth_attempts_consumed_state'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert!(
            index.0.ends_with("WHERE state_consumed = TRUE"),
            "{}",
            index.0
        );
    }
}
