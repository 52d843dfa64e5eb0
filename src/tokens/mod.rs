//! Keeping tokens alive: refresh exactly once per connection across every process (in-process
//! single flight, a database lease, a re-read, a version-checked write), amoCRM's grace rule,
//! `needs_reauth`, subdomain rename recovery, and fresh access tokens for the token API.

mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OnceCell;

pub use worker::run_worker;

use crate::amocrm::{AmoError, Grant, Platform, REFRESH_TOKEN_LIFETIME, TokenSet};
use crate::api_keys::PresentedKey;
use crate::config::Secret;
use crate::crypto::{Cipher, TokenColumn, jitter, random_token};
use crate::events::{ConnectionData, EventType, Events, grant_reason};
use crate::integrations::Integrations;
use crate::keys;
use crate::metrics::{Count, Metrics, RefreshOutcome};
use crate::store::{
    Attempt, AttemptKind, ConnectionRow, ConnectionStatus, Outcome, Records, RefreshedPair, Store,
    StoreError, Timestamp, checked_later, now, saturating_later,
};

/// The token API refreshes first when less than this is left of the access token.
const MIN_VALIDITY: chrono::Duration = chrono::Duration::minutes(5);
/// How often a process waiting for another's refresh looks at the row.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Backoff after failed refreshes: 30 s, doubling, at most an hour, with jitter.
const BACKOFF_BASE_SECS: f64 = 30.0;
const BACKOFF_MAX_SECS: f64 = 3600.0;

/// Why no fresh access token could be handed out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// No connection has this account id, subdomain or host.
    #[error("no connection for account `{0}`")]
    NotFound(String),
    /// amoCRM refused the refresh token: someone must install the integration again.
    #[error("the connection needs a new install: {reason}")]
    NeedsReauth {
        /// amoCRM's answer, or what the last error was.
        reason: String,
    },
    /// The account id or subdomain is connected on both amoCRM and Kommo: name the platform.
    #[error("account `{account}` is connected on more than one platform: ask for {}", qualified.join(" or "))]
    Ambiguous {
        /// The account as asked for.
        account: String,
        /// The platform-qualified forms that name each connection, e.g. `kommo:31337001`.
        qualified: Vec<String>,
    },
    /// The integration was uninstalled in amoCRM (or an admin disconnected the account).
    #[error("the account was disconnected (the integration was uninstalled)")]
    Disconnected,
    /// The refresh failed in a way that may pass (timeout, 5xx); the next try may work.
    #[error("refreshing the token at {host} failed: {message}")]
    Amo {
        /// The amoCRM host asked.
        host: String,
        /// A stable code for the failure, as in metrics and the audit trail.
        reason: &'static str,
        /// What happened, in words.
        message: String,
        /// Whether amoCRM did not answer in time.
        timeout: bool,
    },
    /// Another process is refreshing this connection; try again shortly.
    #[error("another process holds the refresh of this connection; try again shortly")]
    Busy,
    /// Refreshes failed lately and the stored access token has expired: amoauth waits out
    /// its backoff rather than call amoCRM on every request.
    #[error(
        "the access token expired and refreshing it at {host} failed ({reason}); the next try is not before {retry_at} UTC"
    )]
    BackingOff {
        /// The amoCRM host asked.
        host: String,
        /// The last refresh's error.
        reason: String,
        /// When the next refresh may be tried (UTC).
        retry_at: Timestamp,
    },
    /// amoauth's database failed.
    #[error("database unavailable: {0}")]
    Database(String),
    /// The stored tokens do not open with the configured keys.
    #[error("the stored tokens cannot be decrypted: {0}")]
    Corrupt(String),
}

impl From<StoreError> for TokenError {
    fn from(err: StoreError) -> Self {
        Self::Database(err.to_string())
    }
}

/// An access token ready to use.
#[derive(Debug, Clone)]
pub struct FreshToken {
    pub platform: Platform,
    pub account_id: Option<i64>,
    pub subdomain: String,
    pub domain: String,
    pub access_token: Secret,
    pub expires_at: Timestamp,
}

type SharedRefresh = Arc<OnceCell<Result<ConnectionRow, TokenError>>>;

pub struct TokenService {
    store: Store,
    integrations: Arc<Integrations>,
    cipher: Arc<Cipher>,
    /// Names this process in `lease_owner`.
    owner: String,
    lease: Duration,
    inflight: Mutex<HashMap<i64, SharedRefresh>>,
    metrics: Arc<Metrics>,
    events: Arc<Events>,
}

impl TokenService {
    /// `lease` must outlast a whole refresh (amoCRM timeouts included), so a slow holder is
    /// never overtaken; a dead holder blocks others for at most this long.
    pub fn new(
        store: Store,
        integrations: Arc<Integrations>,
        cipher: Arc<Cipher>,
        lease: Duration,
        metrics: Arc<Metrics>,
        events: Arc<Events>,
    ) -> Self {
        let owner = format!("{}-{}", std::process::id(), &random_token()[..12]);
        Self {
            store,
            integrations,
            cipher,
            owner,
            lease,
            inflight: Mutex::new(HashMap::new()),
            metrics,
            events,
        }
    }

    /// A valid access token for the account (id, subdomain or host), refreshed first when
    /// it is close to expiry. A token that is still valid is served at once, without a
    /// refresh, while refreshes back off after failures or someone else is refreshing; only
    /// an expired token waits for a refresh, and inside the backoff it is refused at once.
    pub async fn access_token(self: &Arc<Self>, account: &str) -> Result<FreshToken, TokenError> {
        let row = self.usable_connection(account).await?;
        self.serve(row).await
    }

    /// `access_token` for the token API: the API key is checked in the statement that reads
    /// the connection (one round trip). `None` when `key` is not an active key, whether or
    /// not the account has a connection.
    pub(crate) async fn access_token_for_key(
        self: &Arc<Self>,
        key: &PresentedKey<'_>,
        account: &str,
    ) -> Result<Option<FreshToken>, TokenError> {
        let (stored_hash, rows) = self.store.keyed_connections(key.key_id(), account).await?;
        if rows.is_empty() {
            // No connection: a 404 is only for an active key.
            return match key.is_active(&self.store).await? {
                true => Err(TokenError::NotFound(account.to_owned())),
                false => Ok(None),
            };
        }
        if !key.matches(stored_hash.as_deref()) {
            return Ok(None);
        }
        let row = the_one_usable(account, rows)?;
        self.serve(row).await.map(Some)
    }

    /// The access token of a usable connection, refreshed first when close to expiry.
    async fn serve(self: &Arc<Self>, row: ConnectionRow) -> Result<FreshToken, TokenError> {
        let at = now();
        let still_valid = row.expires_at > at;
        let row =
            if row.expires_at - at > MIN_VALIDITY {
                row
            } else if let Some(backoff) = backing_off(&row, at) {
                if !still_valid {
                    return Err(backoff);
                }
                row
            } else if still_valid && self.refresh_in_progress(&row, at) {
                row
            } else {
                match self
                    .refresh_with(row.id, row.version, Backoff::Respect)
                    .await
                {
                    Ok(refreshed) => {
                        usable(&refreshed)?;
                        refreshed
                    }
                    // The refresh failed, but the stored token still works until it expires.
                    Err(
                        TokenError::Amo { .. } | TokenError::Busy | TokenError::BackingOff { .. },
                    ) if now() < row.expires_at => row,
                    Err(err) => return Err(err),
                }
            };
        self.fresh(row)
    }

    fn fresh(&self, row: ConnectionRow) -> Result<FreshToken, TokenError> {
        let access_token = self.open(&row, TokenColumn::AccessToken)?;
        Ok(FreshToken {
            platform: row.platform,
            account_id: row.account_id,
            subdomain: row.subdomain,
            domain: row.domain,
            access_token,
            expires_at: row.expires_at,
        })
    }

    /// After amoCRM refused `rejected` with a 401 (the gateway): a newer stored token if
    /// there is one, else one refresh through the single flight (respecting the backoff).
    pub async fn replace_rejected(
        self: &Arc<Self>,
        account: &str,
        rejected: &Secret,
    ) -> Result<FreshToken, TokenError> {
        let row = self.usable_connection(account).await?;
        if self.open(&row, TokenColumn::AccessToken)? != *rejected {
            return self.fresh(row);
        }
        let refreshed = self
            .refresh_with(row.id, row.version, Backoff::Respect)
            .await?;
        usable(&refreshed)?;
        self.fresh(refreshed)
    }

    /// After amoCRM answered as if the account were not at its host (the gateway): asks where
    /// it lives now (the rename rule of refreshes) and saves the new host. None when amoCRM
    /// names no other host.
    pub async fn follow_move(&self, account: &str) -> Result<Option<FreshToken>, TokenError> {
        let row = self.usable_connection(account).await?;
        let grant = Grant {
            host: row.domain.clone(),
            account_id: row.account_id,
            access_token: self.open(&row, TokenColumn::AccessToken)?,
            refresh_token: self.open(&row, TokenColumn::RefreshToken)?,
        };
        let Some(amo) = self.integrations.get(row.platform) else {
            return Ok(None);
        };
        let Some(host) = amo.moved_host(&grant).await else {
            return Ok(None);
        };
        tracing::info!(account_id = row.account_id, from = %row.domain, to = %host.host, "account moved to a new subdomain");
        self.store
            .update_host(row.id, &host.host, &host.subdomain, now())
            .await?;
        let mut token = self.fresh(row)?;
        (token.domain, token.subdomain) = (host.host, host.subdomain);
        Ok(Some(token))
    }

    /// The account's connection, when it has one that is neither disconnected nor waiting
    /// for a new consent.
    /// An id or subdomain both platforms have names no connection until it is qualified.
    async fn usable_connection(&self, account: &str) -> Result<ConnectionRow, TokenError> {
        let rows = self.store.find_connections(account).await?;
        the_one_usable(account, rows)
    }

    /// Whether a refresh of this connection is under way here or in another process.
    fn refresh_in_progress(&self, row: &ConnectionRow, at: Timestamp) -> bool {
        let here = self
            .inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(&row.id);
        here || row.lease_until.is_some_and(|until| until > at)
    }

    /// Refreshes the connection now, backoff or not (an admin's explicit `amoauth refresh`),
    /// unless its pair changed since `seen_version` (then whoever changed it already did the
    /// work). Callers in this process share one refresh.
    pub async fn refresh(
        self: &Arc<Self>,
        id: i64,
        seen_version: i64,
    ) -> Result<ConnectionRow, TokenError> {
        self.refresh_with(id, seen_version, Backoff::Ignore).await
    }

    async fn refresh_with(
        self: &Arc<Self>,
        id: i64,
        seen_version: i64,
        backoff: Backoff,
    ) -> Result<ConnectionRow, TokenError> {
        let cell = Arc::clone(
            self.inflight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(id)
                .or_default(),
        );
        let this = Arc::clone(self);
        let result = cell
            .get_or_init(|| async move {
                // Spawned, so a caller that goes away cannot abandon a refresh half-way.
                tokio::spawn(async move {
                    this.refresh_across_processes(id, seen_version, backoff)
                        .await
                })
                .await
                .unwrap_or_else(|err| {
                    Err(TokenError::Database(format!(
                        "the refresh task failed: {err}"
                    )))
                })
            })
            .await
            .clone();
        let mut inflight = self
            .inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if inflight
            .get(&id)
            .is_some_and(|current| Arc::ptr_eq(current, &cell))
        {
            inflight.remove(&id);
        }
        result
    }

    /// Takes the database lease, or waits for the process holding it to finish. A holder
    /// that died is taken over when its lease expires.
    async fn refresh_across_processes(
        &self,
        id: i64,
        seen_version: i64,
        backoff: Backoff,
    ) -> Result<ConnectionRow, TokenError> {
        let deadline = tokio::time::Instant::now() + self.lease.saturating_mul(2);
        let mut row = self.read(id).await?;
        loop {
            if row.version != seen_version || row.status != ConnectionStatus::Active {
                return Ok(row);
            }
            if row.lease_until.is_none_or(|until| until <= now()) {
                let at = now();
                if self
                    .store
                    .take_lease(id, &self.owner, at, saturating_later(at, self.lease))
                    .await?
                {
                    let result = self.refresh_holding_lease(id, seen_version, backoff).await;
                    if result.is_err() {
                        // Every write of the refresh releases the lease; this covers the paths
                        // that fail before one (database or decryption errors, backoff).
                        let _ = self.store.release_lease(id, &self.owner).await;
                    }
                    return result;
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(TokenError::Busy);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
            row = self.read(id).await?;
        }
    }

    async fn read(&self, id: i64) -> Result<ConnectionRow, TokenError> {
        self.store
            .connection(id)
            .await?
            .ok_or_else(|| TokenError::NotFound(id.to_string()))
    }

    async fn refresh_holding_lease(
        &self,
        id: i64,
        seen_version: i64,
        backoff: Backoff,
    ) -> Result<ConnectionRow, TokenError> {
        // Re-read under the lease: another process may have refreshed since we looked.
        let row = self.read(id).await?;
        if row.version != seen_version || row.status != ConnectionStatus::Active {
            self.store.release_lease(id, &self.owner).await?;
            return Ok(row);
        }
        // Another process may have failed a refresh since we looked.
        if backoff == Backoff::Respect
            && let Some(backing_off) = backing_off(&row, now())
        {
            return Err(backing_off);
        }
        let refresh_token = self.open(&row, TokenColumn::RefreshToken)?;
        match self.call_refresh(&row, &refresh_token).await {
            Ok((tokens, host)) => match expiry(&tokens) {
                Ok(expires_at) => self.save(&row, &tokens, &host, expires_at).await,
                Err(err) => self.failed(&row, err).await,
            },
            Err(err) if err.revokes_grant() => self.grant_rejected(&row, &err).await,
            Err(err) => self.failed(&row, err).await,
        }
    }

    fn open(&self, row: &ConnectionRow, column: TokenColumn) -> Result<Secret, TokenError> {
        keys::open_token(&self.cipher, row, column)
            .map_err(|err| TokenError::Corrupt(err.to_string()))
    }

    /// The refresh with amoCRM's rename rule (one retry at the account's new host), which
    /// the client applies; a new host is saved as soon as it is known, even if the retry
    /// there fails. Returns the new pair and the host it came from.
    async fn call_refresh(
        &self,
        row: &ConnectionRow,
        refresh_token: &Secret,
    ) -> Result<(TokenSet, String), AmoError> {
        // Without the access token (its `api_domain`) a rename cannot be followed, but the
        // refresh itself can still be made.
        let access_token = self
            .open(row, TokenColumn::AccessToken)
            .unwrap_or_else(|_| Secret::new(""));
        let mut grant = Grant {
            host: row.domain.clone(),
            account_id: row.account_id,
            access_token,
            refresh_token: refresh_token.clone(),
        };
        let amo = self
            .integrations
            .for_connection(row.platform, &row.domain)?;
        let result = amo.refresh_grant(&mut grant).await;
        if grant.host != row.domain
            && let Some(host) = self.integrations.account_host(row.platform, &grant.host)
            && let Err(store_err) = self
                .store
                .update_host(row.id, &host.host, &host.subdomain, now())
                .await
        {
            tracing::error!(error = %store_err, "could not save the account's new host");
        }
        let refreshed = result?;
        let tokens = TokenSet {
            access_token: grant.access_token,
            refresh_token: grant.refresh_token,
            expires_in: refreshed.expires_in,
            raw: refreshed.raw,
        };
        Ok((tokens, grant.host))
    }

    /// Stores the new pair before anyone uses it, with its audit row and event in the same
    /// transaction; a lost version race means another writer stored a newer pair, which wins.
    async fn save(
        &self,
        row: &ConnectionRow,
        tokens: &TokenSet,
        host: &str,
        (issued_at, expires_at): (Timestamp, Timestamp),
    ) -> Result<ConnectionRow, TokenError> {
        let account_id = account_id_of(row)?;
        let attempt = refresh_attempt(row, host, Outcome::Success, None, None);
        let mut data = ConnectionData::of(row);
        if let Some(moved) = self.integrations.account_host(row.platform, host) {
            (data.domain, data.subdomain) = (moved.host, moved.subdomain);
        }
        let event = self.events.prepare(EventType::ConnectionRefreshed, data);
        let stored = self
            .store
            .store_refreshed(
                row.id,
                row.version,
                &RefreshedPair {
                    tokens: &self.cipher.seal_pair(
                        &tokens.access_token,
                        &tokens.refresh_token,
                        account_id,
                    ),
                    expires_at,
                    refresh_expires_at: issued_at + REFRESH_TOKEN_LIFETIME,
                    issued_at,
                },
                &Records {
                    attempt: Some(&attempt),
                    event: event.as_ref(),
                    ..Records::default()
                },
            )
            .await?;
        if stored {
            self.audited(row, host, Outcome::Success, None);
        } else {
            tracing::warn!(
                account_id = row.account_id,
                "another process stored a newer pair first; keeping it"
            );
            self.store.release_lease(row.id, &self.owner).await?;
        }
        self.read(row.id).await
    }

    /// amoCRM refused the refresh token. Only when no newer pair was stored meanwhile is
    /// the connection marked `needs_reauth`; it is never deleted.
    async fn grant_rejected(
        &self,
        row: &ConnectionRow,
        err: &AmoError,
    ) -> Result<ConnectionRow, TokenError> {
        let reason = match err {
            AmoError::Rejected { problem, .. } => problem.summary(),
            other => other.to_string(),
        };
        let current = self.read(row.id).await?;
        if current.version != row.version {
            self.store.release_lease(row.id, &self.owner).await?;
            return Ok(current);
        }
        let attempt = refresh_attempt(
            row,
            &row.domain,
            Outcome::Failure,
            Some("needs_reauth"),
            Some(&reason),
        );
        let data = ConnectionData::of(row).because(grant_reason(err), Some(&reason));
        let event = self.events.prepare(EventType::ConnectionNeedsReauth, data);
        let records = Records {
            attempt: Some(&attempt),
            event: event.as_ref(),
            ..Records::default()
        };
        if self
            .store
            .mark_needs_reauth(row.id, row.version, &reason, now(), &records)
            .await?
        {
            tracing::warn!(account_id = row.account_id, host = %row.domain, %reason, "refresh token rejected; the connection needs a new install");
            self.audited(row, &row.domain, Outcome::Failure, Some("needs_reauth"));
            return Err(TokenError::NeedsReauth { reason });
        }
        self.store.release_lease(row.id, &self.owner).await?;
        self.read(row.id).await
    }

    /// A failure that may pass (timeout, lost reply, 5xx): the stored pair stays, so the
    /// next try uses the same refresh token, which amoCRM's grace rule still accepts.
    async fn failed(
        &self,
        row: &ConnectionRow,
        err: AmoError,
    ) -> Result<ConnectionRow, TokenError> {
        let at = now();
        let retry_at = at + backoff(row.refresh_failures + 1);
        let message = err.to_string();
        let attempt = refresh_attempt(
            row,
            &row.domain,
            Outcome::Failure,
            Some(err.reason()),
            Some(&message),
        );
        let data = ConnectionData::of(row)
            .because(err.reason(), Some(&message))
            .retry_at(retry_at);
        let event = self
            .events
            .prepare(EventType::ConnectionRefreshFailed, data);
        let records = Records {
            attempt: Some(&attempt),
            event: event.as_ref(),
            ..Records::default()
        };
        self.store
            .record_refresh_failure(row.id, &self.owner, &message, retry_at, at, &records)
            .await?;
        tracing::warn!(account_id = row.account_id, host = %row.domain, reason = err.reason(), error = %err, %retry_at, "refresh failed; will retry");
        self.audited(row, &row.domain, Outcome::Failure, Some(err.reason()));
        Err(TokenError::Amo {
            host: row.domain.clone(),
            reason: err.reason(),
            message,
            timeout: matches!(err, AmoError::Timeout(_)),
        })
    }

    /// Counts (and, for a success, logs) a refresh whose audit row was stored.
    fn audited(&self, row: &ConnectionRow, host: &str, outcome: Outcome, reason: Option<&str>) {
        let counted = match (outcome, reason) {
            (Outcome::Success, _) => RefreshOutcome::Success,
            (_, Some("needs_reauth")) => RefreshOutcome::NeedsReauth,
            _ => RefreshOutcome::Failure,
        };
        self.metrics.count(Count::Refresh(row.platform, counted));
        if outcome == Outcome::Success {
            tracing::info!(
                kind = AttemptKind::Refresh.as_str(),
                outcome = Outcome::Success.as_str(),
                account_id = row.account_id,
                host,
                "token refreshed"
            );
        }
    }
}

/// The audit row of a refresh.
fn refresh_attempt<'a>(
    row: &ConnectionRow,
    host: &'a str,
    outcome: Outcome,
    reason: Option<&'a str>,
    detail: Option<&'a str>,
) -> Attempt<'a> {
    Attempt::new(AttemptKind::Refresh, outcome)
        .because(reason, detail)
        .of_account(Some(host), row.account_id)
}

/// The account a connection's tokens are sealed for.
fn account_id_of(row: &ConnectionRow) -> Result<i64, TokenError> {
    row.account_id
        .ok_or_else(|| TokenError::Corrupt("the connection has no account id".into()))
}

/// Whether a refresh waits out the backoff after failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backoff {
    /// The token API and the worker: no call to amoCRM before `next_refresh_at`.
    Respect,
    /// An admin's explicit refresh.
    Ignore,
}

/// The refusal to refresh while failed refreshes back off, or None outside a backoff.
fn backing_off(row: &ConnectionRow, at: Timestamp) -> Option<TokenError> {
    let retry_at = row.next_refresh_at.filter(|retry_at| *retry_at > at)?;
    (row.refresh_failures > 0).then(|| TokenError::BackingOff {
        host: row.domain.clone(),
        reason: row
            .last_error
            .clone()
            .unwrap_or_else(|| "an earlier refresh failed".into()),
        retry_at,
    })
}

/// The one connection `account` names, if usable: an id or subdomain both platforms have
/// names none until it is qualified.
fn the_one_usable(
    account: &str,
    mut rows: Vec<ConnectionRow>,
) -> Result<ConnectionRow, TokenError> {
    if rows.len() > 1 {
        return Err(TokenError::Ambiguous {
            account: account.to_owned(),
            qualified: rows
                .iter()
                .map(|row| format!("{}:{account}", row.platform))
                .collect(),
        });
    }
    let row = rows
        .pop()
        .ok_or_else(|| TokenError::NotFound(account.to_owned()))?;
    usable(&row)?;
    Ok(row)
}

/// Errors that are about the connection, not the request.
fn usable(row: &ConnectionRow) -> Result<(), TokenError> {
    match row.status {
        ConnectionStatus::Active => Ok(()),
        ConnectionStatus::Disconnected => Err(TokenError::Disconnected),
        ConnectionStatus::NeedsReauth => Err(TokenError::NeedsReauth {
            reason: row
                .last_error
                .clone()
                .unwrap_or_else(|| row.status.to_string()),
        }),
    }
}

/// `BACKOFF_BASE_SECS · 2^(failures-1)`, capped, times a random factor in [0.5, 1.5) so
/// replicas that failed together do not retry together.
fn backoff(failures: i64) -> chrono::Duration {
    let exponent = failures.clamp(1, 20) - 1;
    let base = (BACKOFF_BASE_SECS * 2f64.powi(exponent as i32)).min(BACKOFF_MAX_SECS);
    chrono::Duration::milliseconds((base * jitter(0.5, 1.5) * 1000.0) as i64)
}

/// When a pair issued now expires; an `expires_in` past any representable time is a bad
/// answer from amoCRM, not a reason to panic.
pub(crate) fn expiry(tokens: &TokenSet) -> Result<(Timestamp, Timestamp), AmoError> {
    let issued_at = now();
    u64::try_from(tokens.expires_in)
        .ok()
        .and_then(|secs| checked_later(issued_at, Duration::from_secs(secs)))
        .map(|expires_at| (issued_at, expires_at))
        .ok_or_else(|| AmoError::BadResponse("the token's `expires_in` is out of range".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        for _ in 0..50 {
            let first = backoff(1).num_milliseconds();
            assert!((15_000..45_000).contains(&first), "{first}");
            let third = backoff(3).num_milliseconds();
            assert!((60_000..180_000).contains(&third), "{third}");
            assert!(backoff(40).num_milliseconds() < 5_400_000);
        }
    }
}
