//! `amocrm_oauth_attempts`: the audit trail of installs and callbacks.

use std::borrow::Cow;

use sqlx::AssertSqlSafe;

use super::{Context as _, Store, StoreError, Timestamp, on_pool};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptKind {
    Install,
    Callback,
    WidgetInstall,
    Refresh,
    Webhook,
}

impl AttemptKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Install => "install",
            Self::Callback => "callback",
            Self::WidgetInstall => "widget_install",
            Self::Refresh => "refresh",
            Self::Webhook => "webhook",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An install that redirected to consent.
    Started,
    /// A callback that consumed its state and is still talking to amoCRM.
    Pending,
    Success,
    Failure,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Pending => "pending",
            Self::Success => "success",
            Self::Failure => "failure",
        }
    }
}

/// An audit row to write.
#[derive(Clone, Debug)]
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

/// An audit row as stored.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct AttemptRecord {
    pub id: i64,
    pub kind: String,
    pub outcome: String,
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub subdomain: Option<String>,
    pub account_id: Option<i64>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub state_fingerprint: Option<String>,
    pub created_at: Timestamp,
}

/// Binds an attempt's fields, in the column order of `insert_attempt_sql`.
macro_rules! bind_attempt {
    ($query:expr, $attempt:expr, $state_consumed:expr) => {{
        let attempt: &$crate::store::Attempt<'_> = $attempt;
        let finished_at =
            (attempt.outcome != $crate::store::Outcome::Pending).then_some(attempt.created_at);
        $query
            .bind(attempt.kind.as_str())
            .bind(attempt.outcome.as_str())
            .bind(attempt.reason)
            .bind(attempt.detail)
            .bind(attempt.subdomain)
            .bind(attempt.account_id)
            .bind(attempt.ip)
            .bind(attempt.user_agent)
            .bind(attempt.state_fingerprint)
            .bind($state_consumed)
            .bind(attempt.created_at)
            .bind(finished_at)
    }};
}
pub(super) use bind_attempt;

impl Store {
    pub(super) fn insert_attempt_sql(&self) -> AssertSqlSafe<Cow<'static, str>> {
        self.sql(
            "INSERT INTO amocrm_oauth_attempts (kind, outcome, reason, detail, subdomain, account_id, \
             ip, user_agent, state_fingerprint, state_consumed, created_at, finished_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
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
