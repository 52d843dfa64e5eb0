//! `amocrm_oauth_attempts`: the audit trail of installs and callbacks.

use std::borrow::Cow;

use rusqlite::params_from_iter;
use sqlx::AssertSqlSafe;

use super::inline::{IntoOwnedRow as _, OwnedRow};
use super::{Context as _, Store, StoreError, Timestamp, on_pool};

crate::named_values::named_values! {
    /// The values of `amocrm_oauth_attempts.kind`: what the audit row is about.
    #[doc(hidden)]
    pub enum AttemptKind {
        Install => "install",
        Callback => "callback",
        WidgetInstall => "widget_install",
        Refresh => "refresh",
        Webhook => "webhook",
    }
}

crate::named_values::named_values! {
    /// The values of `amocrm_oauth_attempts.outcome`: `started` is an install that redirected
    /// to consent, `pending` a callback that consumed its state and still talks to amoCRM.
    #[doc(hidden)]
    pub enum Outcome {
        Started => "started",
        Pending => "pending",
        Success => "success",
        Failure => "failure",
    }
}

/// An audit row to write.
#[derive(Clone, Debug)]
#[doc(hidden)]
pub struct Attempt<'a> {
    pub kind: AttemptKind,
    pub outcome: Outcome,
    pub reason: Option<&'a str>,
    pub detail: Option<&'a str>,
    pub subdomain: Option<&'a str>,
    pub account_id: Option<i64>,
    pub ip: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub state_fingerprint: Option<&'a str>,
    pub created_at: Timestamp,
}

#[doc(hidden)]
impl<'a> Attempt<'a> {
    /// An audit row of `kind` and `outcome` written now, with every other field empty: the
    /// `with_*` methods fill what the caller knows.
    pub fn new(kind: AttemptKind, outcome: Outcome) -> Self {
        Self {
            kind,
            outcome,
            reason: None,
            detail: None,
            subdomain: None,
            account_id: None,
            ip: None,
            user_agent: None,
            state_fingerprint: None,
            created_at: super::now(),
        }
    }

    /// Why it failed (or what it did), and the longer story.
    pub fn because(mut self, reason: Option<&'a str>, detail: Option<&'a str>) -> Self {
        (self.reason, self.detail) = (reason, detail);
        self
    }

    /// The account it concerns and its subdomain or host.
    pub fn of_account(mut self, subdomain: Option<&'a str>, account_id: Option<i64>) -> Self {
        (self.subdomain, self.account_id) = (subdomain, account_id);
        self
    }

    /// Who made the request.
    pub fn from_client(mut self, ip: Option<&'a str>, user_agent: Option<&'a str>) -> Self {
        (self.ip, self.user_agent) = (ip, user_agent);
        self
    }

    /// The fingerprint of the OAuth state it used (never the state).
    pub fn with_state(mut self, state_fingerprint: Option<&'a str>) -> Self {
        self.state_fingerprint = state_fingerprint;
        self
    }

    /// When it happened, if not now.
    pub fn at(mut self, created_at: Timestamp) -> Self {
        self.created_at = created_at;
        self
    }
}

/// An audit row's values in the column order of `attempt_columns!`: the one place that order
/// is bound, for sqlx (`bind_attempt!`) and for SQLite's inline path alike.
type AttemptValues<'a> = (
    &'static str,
    &'static str,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<i64>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    bool,
    Timestamp,
    Option<Timestamp>,
);

impl<'a> Attempt<'a> {
    pub(super) fn values(&self, state_consumed: bool) -> AttemptValues<'a> {
        // A row that is not pending is finished when it is written.
        let finished_at = (self.outcome != Outcome::Pending).then_some(self.created_at);
        (
            self.kind.as_str(),
            self.outcome.as_str(),
            self.reason,
            self.detail,
            self.subdomain,
            self.account_id,
            self.ip,
            self.user_agent,
            self.state_fingerprint,
            state_consumed,
            self.created_at,
            finished_at,
        )
    }
}

/// An audit row as stored.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct AttemptRecord {
    pub id: i64,
    pub kind: AttemptKind,
    pub outcome: Outcome,
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub subdomain: Option<String>,
    pub account_id: Option<i64>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub state_fingerprint: Option<String>,
    pub created_at: Timestamp,
}

/// What a change to a connection records about itself: written in the change's transaction,
/// so a crash or a failed write keeps all of them or none.
#[derive(Clone, Copy, Debug, Default)]
pub struct Records<'a> {
    /// A new audit row.
    pub attempt: Option<&'a Attempt<'a>>,
    /// The pending audit row (opened when a callback consumed its state) to close as a success.
    pub finish_pending: Option<i64>,
    /// An event for the outbox.
    pub event: Option<&'a super::NewEvent>,
}

/// Writes `Records` inside the transaction `$tx`; `$account_id` and `$at` close a pending row.
macro_rules! write_records {
    ($store:expr, $tx:expr, $records:expr, $account_id:expr, $at:expr, $operation:expr) => {{
        let records: &$crate::store::Records<'_> = $records;
        if let Some(attempt) = records.attempt {
            $crate::store::attempts::bind_attempt!(
                sqlx::query($store.insert_attempt_sql()),
                attempt,
                false
            )
            .execute(&mut *$tx)
            .await
            .during($operation)?;
        }
        if let Some(attempt_id) = records.finish_pending {
            sqlx::query($store.finish_pending_sql())
                .bind($crate::store::Outcome::Success.as_str())
                .bind($account_id)
                .bind($at)
                .bind(attempt_id)
                .execute(&mut *$tx)
                .await
                .during($operation)?;
        }
        if let Some(event) = records.event {
            $crate::store::events::bind_event!(sqlx::query($store.insert_event_sql()), event)
                .execute(&mut *$tx)
                .await
                .during($operation)?;
        }
    }};
}
pub(super) use write_records;

/// Closes a pending audit row: outcome, account id, finished at, by id.
const FINISH_PENDING: &str = "UPDATE amocrm_oauth_attempts SET outcome = ?, reason = NULL, \
     detail = NULL, account_id = ?, finished_at = ? WHERE id = ?";

/// `write_records!` on SQLite's inline path, with the same statements.
pub(super) fn write_records_inline(
    tx: &rusqlite::Transaction<'_>,
    records: &InlineRecords,
) -> rusqlite::Result<()> {
    if let Some(attempt) = &records.attempt {
        tx.prepare_cached(insert_attempt!())?
            .execute(params_from_iter(attempt))?;
    }
    if let Some(finish) = &records.finish_pending {
        tx.prepare_cached(FINISH_PENDING)?
            .execute(params_from_iter(finish))?;
    }
    if let Some(event) = &records.event {
        tx.prepare_cached(super::events::INSERT_EVENT)?
            .execute(params_from_iter(event))?;
    }
    Ok(())
}

/// `Records` with their values owned, for SQLite's queued writes (`InlineSqlite::write`).
pub(super) struct InlineRecords {
    attempt: Option<OwnedRow>,
    finish_pending: Option<OwnedRow>,
    event: Option<OwnedRow>,
}

impl Records<'_> {
    /// The records' rows; `account_id` and `at` close a pending row.
    pub(super) fn owned(&self, account_id: i64, at: Timestamp) -> rusqlite::Result<InlineRecords> {
        let finish = |attempt_id| (Outcome::Success.as_str(), account_id, at, attempt_id).owned();
        Ok(InlineRecords {
            attempt: self.attempt.map(|a| a.values(false).owned()).transpose()?,
            finish_pending: self.finish_pending.map(finish).transpose()?,
            event: self
                .event
                .map(|event| super::events::event_values(event).owned())
                .transpose()?,
        })
    }
}

/// The columns of an audit row as written, in the order of `Attempt::values`.
macro_rules! attempt_columns {
    () => {
        "kind, outcome, reason, detail, subdomain, account_id, ip, user_agent, state_fingerprint, \
         state_consumed, created_at, finished_at"
    };
}
pub(super) use attempt_columns;

/// One placeholder per column of `attempt_columns!`.
macro_rules! attempt_placeholders {
    () => {
        "?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?"
    };
}
pub(super) use attempt_placeholders;

/// Writes one audit row.
macro_rules! insert_attempt {
    () => {
        concat!(
            "INSERT INTO amocrm_oauth_attempts (",
            $crate::store::attempts::attempt_columns!(),
            ") VALUES (",
            $crate::store::attempts::attempt_placeholders!(),
            ")"
        )
    };
}
pub(super) use insert_attempt;

/// Binds an attempt's values (`Attempt::values`) to a sqlx query.
macro_rules! bind_attempt {
    ($query:expr, $attempt:expr, $state_consumed:expr) => {{
        let v = $crate::store::Attempt::values($attempt, $state_consumed);
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
            .bind(v.10)
            .bind(v.11)
    }};
}
pub(super) use bind_attempt;

#[doc(hidden)]
impl Store {
    pub(super) fn insert_attempt_sql(&self) -> AssertSqlSafe<Cow<'static, str>> {
        self.sql(insert_attempt!())
    }

    pub(super) fn finish_pending_sql(&self) -> AssertSqlSafe<Cow<'static, str>> {
        self.sql(FINISH_PENDING)
    }

    /// The id the last INSERT on this connection generated (MySQL has no RETURNING).
    pub(super) fn last_insert_id_sql(&self) -> AssertSqlSafe<Cow<'static, str>> {
        self.dialect(
            "SELECT last_insert_rowid()",
            "SELECT lastval()",
            "SELECT CAST(LAST_INSERT_ID() AS SIGNED)",
        )
    }

    /// Writes an audit row and returns its id.
    pub async fn record_attempt(&self, attempt: &Attempt<'_>) -> Result<i64, StoreError> {
        const OPERATION: &str = "writing the audit row";
        let (insert, last_id) = (self.insert_attempt_sql(), self.last_insert_id_sql());
        on_pool!(self, pool => {
            // The id is read on the connection that inserted the row.
            let mut conn = pool.acquire().await.during(OPERATION)?;
            bind_attempt!(sqlx::query(insert), attempt, false)
                .execute(&mut *conn)
                .await
                .during(OPERATION)?;
            sqlx::query_scalar(last_id).fetch_one(&mut *conn).await.during(OPERATION)
        })
    }

    /// Closes an audit row opened as pending when its state was consumed.
    pub async fn finish_attempt(
        &self,
        id: i64,
        outcome: Outcome,
        reason: Option<&str>,
        detail: Option<&str>,
        account_id: Option<i64>,
        finished_at: Timestamp,
    ) -> Result<(), StoreError> {
        let sql = self.sql(
            "UPDATE amocrm_oauth_attempts SET outcome = ?, reason = ?, detail = ?, \
             account_id = COALESCE(?, account_id), finished_at = ? WHERE id = ?",
        );
        on_pool!(self, pool => sqlx::query(sql)
            .bind(outcome.as_str())
            .bind(reason)
            .bind(detail)
            .bind(account_id)
            .bind(finished_at)
            .bind(id)
            .execute(pool)
            .await
            .map(drop))
        .during("updating the audit row")
    }

    pub async fn recent_attempts(&self, limit: i64) -> Result<Vec<AttemptRecord>, StoreError> {
        let sql = self.sql(
            "SELECT id, kind, outcome, reason, detail, subdomain, account_id, ip, user_agent, \
             state_fingerprint, created_at FROM amocrm_oauth_attempts ORDER BY id DESC LIMIT ?",
        );
        on_pool!(self, pool => sqlx::query_as(sql).bind(limit).fetch_all(pool).await)
            .during("listing audit rows")
    }
}
