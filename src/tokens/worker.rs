//! The background refresh worker of `amoauth serve`: refreshes tokens before they expire and
//! refresh tokens before amoCRM's 3-month idle expiry, with bounded concurrency.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::{Backoff, TokenError, TokenService};
use crate::store::{Timestamp, checked_earlier, now, saturating_later};

/// Refreshes in flight at once, across all accounts.
const CONCURRENCY: usize = 8;
const BATCH: i64 = 500;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RefreshSummary {
    pub refreshed: u64,
    pub failed: u64,
}

impl TokenService {
    /// Refreshes every active connection whose access token expires within `margin` or whose
    /// pair is older than `keepalive_age`, skipping those in backoff or leased elsewhere.
    pub async fn refresh_due(
        self: &Arc<Self>,
        margin: Duration,
        keepalive_age: Duration,
    ) -> Result<RefreshSummary, TokenError> {
        let mut summary = RefreshSummary::default();
        let permits = Arc::new(Semaphore::new(CONCURRENCY));
        loop {
            let at = now();
            let due = self
                .store
                .due_for_refresh(
                    at,
                    saturating_later(at, margin),
                    checked_earlier(at, keepalive_age).unwrap_or(Timestamp::MIN),
                    BATCH,
                )
                .await?;
            let batch_len = due.len();
            let mut tasks = tokio::task::JoinSet::new();
            for (id, version) in due {
                let permit = Arc::clone(&permits)
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                let service = Arc::clone(self);
                tasks.spawn(async move {
                    let _permit = permit;
                    service.refresh_with(id, version, Backoff::Respect).await
                });
            }
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok(Ok(_)) => summary.refreshed += 1,
                    _ => summary.failed += 1,
                }
            }
            // Failed rows are in backoff and refreshed ones are no longer due, so a full
            // batch means more are waiting, not the same ones again.
            if batch_len < BATCH as usize {
                return Ok(summary);
            }
        }
    }
}

/// Runs `refresh_due` every `interval` until the process stops.
pub async fn run_worker(
    service: Arc<TokenService>,
    interval: Duration,
    margin: Duration,
    keepalive_age: Duration,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match service.refresh_due(margin, keepalive_age).await {
            Ok(RefreshSummary {
                refreshed: 0,
                failed: 0,
            }) => {}
            Ok(summary) => tracing::info!(
                refreshed = summary.refreshed,
                failed = summary.failed,
                "refresh worker pass"
            ),
            Err(err) => tracing::error!(error = %err, "refresh worker pass failed; will retry"),
        }
    }
}
