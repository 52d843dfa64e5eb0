//! `amocrm_oauth_attempts`: the audit trail of installs and callbacks.

use super::{Context as _, Store, StoreError, Timestamp};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptKind {
    Install,
    Callback,
    WidgetInstall,
}

impl AttemptKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Install => "install",
            Self::Callback => "callback",
            Self::WidgetInstall => "widget_install",
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

pub(super) async fn insert_attempt(
    executor: impl sqlx::SqliteExecutor<'_>,
    attempt: &Attempt<'_>,
    state_consumed: bool,
) -> Result<i64, sqlx::Error> {
    let finished_at = (attempt.outcome != Outcome::Pending).then_some(attempt.created_at);
    let result = sqlx::query(
        "INSERT INTO amocrm_oauth_attempts (kind, outcome, reason, detail, subdomain, account_id, \
         ip, user_agent, state_fingerprint, state_consumed, created_at, finished_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(attempt.kind.as_str())
    .bind(attempt.outcome.as_str())
    .bind(attempt.reason)
    .bind(attempt.detail)
    .bind(attempt.subdomain)
    .bind(attempt.account_id)
    .bind(attempt.ip)
    .bind(attempt.user_agent)
    .bind(attempt.state_fingerprint)
    .bind(state_consumed)
    .bind(attempt.created_at)
    .bind(finished_at)
    .execute(executor)
    .await?;
    Ok(result.last_insert_rowid())
}

impl Store {
    pub async fn record_attempt(&self, attempt: &Attempt<'_>) -> Result<i64, StoreError> {
        insert_attempt(&self.pool, attempt, false)
            .await
            .during("writing the audit row")
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
        sqlx::query(
            "UPDATE amocrm_oauth_attempts SET outcome = ?, reason = ?, detail = ?, \
             account_id = COALESCE(?, account_id), finished_at = ? WHERE id = ?",
        )
        .bind(outcome.as_str())
        .bind(reason)
        .bind(detail)
        .bind(account_id)
        .bind(finished_at)
        .bind(id)
        .execute(&self.pool)
        .await
        .during("updating the audit row")?;
        Ok(())
    }

    pub async fn recent_attempts(&self, limit: u32) -> Result<Vec<AttemptRecord>, StoreError> {
        sqlx::query_as(
            "SELECT id, kind, outcome, reason, detail, subdomain, account_id, ip, user_agent, \
             state_fingerprint, created_at FROM amocrm_oauth_attempts ORDER BY id DESC LIMIT ?",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .during("listing audit rows")
    }
}
