//! Outgoing events to the host app: `connection.created`, `connection.refresh_failed`,
//! `connection.needs_reauth`, `connection.disconnected`, `gateway.circuit_opened` and (opt-in)
//! `connection.refreshed`.
//!
//! An event is written to the outbox (`amoauth_events`) where it happens, and `serve`
//! delivers it: a signed POST to `AMOAUTH_EVENTS_URL`, retried with backoff until the
//! receiver answers 2xx, so neither a receiver outage nor a restart loses one. Delivery is
//! at least once: a receiver deduplicates by the event id.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::CONTENT_TYPE;
use serde::Serialize;
use tokio::sync::watch;

use crate::amocrm::{AmoError, Platform, ProblemKind, error_chain};
use crate::config::EventsConfig;
use crate::crypto::{hmac_sha256_hex, jitter};
use crate::metrics::{Count, DeliveryOutcome, Metrics};
use crate::store::{ConnectionRow, EventRow, NewEvent, Store, StoreError, Timestamp, now, rfc3339};

/// Each delivery: connect and total timeout.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// A claimed delivery is this process's for this long: longer than any delivery.
const LEASE: chrono::Duration = chrono::Duration::seconds(30);
/// After this many failed attempts an event is `failed` and no longer retried.
pub const MAX_ATTEMPTS: i64 = 20;
/// Retries wait the poll interval (1 s by default), doubling, at most this long.
const MAX_BACKOFF_SECS: f64 = 600.0;
/// Due events read at once.
const BATCH: i64 = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
// The names follow the wire's `connection.*` event types one to one.
#[allow(clippy::enum_variant_names)]
pub enum EventType {
    ConnectionCreated,
    ConnectionRefreshFailed,
    ConnectionNeedsReauth,
    ConnectionDisconnected,
    /// Opt-in (`AMOAUTH_EVENTS_REFRESHED`): every successful refresh.
    ConnectionRefreshed,
    /// The gateway paused calls to an account (or all) after a burst of 403s from amoCRM.
    GatewayCircuitOpened,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConnectionCreated => "connection.created",
            Self::ConnectionRefreshFailed => "connection.refresh_failed",
            Self::ConnectionNeedsReauth => "connection.needs_reauth",
            Self::ConnectionDisconnected => "connection.disconnected",
            Self::ConnectionRefreshed => "connection.refreshed",
            Self::GatewayCircuitOpened => "gateway.circuit_opened",
        }
    }
}

/// The `data` of a connection event. Never a token, code or secret.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConnectionData {
    /// `amocrm` or `kommo`: with the account id, the connection's key.
    pub platform: &'static str,
    pub account_id: Option<i64>,
    pub subdomain: String,
    pub domain: String,
    /// The host app's tenant id, when a connect link made the connection.
    pub external_id: Option<String>,
    /// A stable code: `amocrm_timeout`, `token_revoked`, `uninstalled`, …
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The human-readable error, as in `amoauth tokens`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the refresh worker tries again (refresh_failed), RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<String>,
}

impl ConnectionData {
    pub fn new(platform: Platform, account_id: Option<i64>, subdomain: &str, domain: &str) -> Self {
        Self {
            platform: platform.as_str(),
            account_id,
            subdomain: subdomain.to_owned(),
            domain: domain.to_owned(),
            ..Self::default()
        }
    }

    pub fn of(row: &ConnectionRow) -> Self {
        let mut data = Self::new(row.platform, row.account_id, &row.subdomain, &row.domain);
        data.external_id = row.external_id.clone();
        data
    }

    pub fn because(mut self, reason: &str, last_error: Option<&str>) -> Self {
        self.reason = Some(reason.to_owned());
        self.last_error = last_error.map(str::to_owned);
        self
    }

    pub fn retry_at(mut self, at: Timestamp) -> Self {
        self.retry_at = Some(rfc3339(at));
        self
    }
}

/// Why amoCRM refused a refresh token for good, as a stable code.
pub fn grant_reason(err: &AmoError) -> &'static str {
    match err.problem_kind() {
        Some(ProblemKind::TokenExpired) => "token_expired",
        _ => "token_revoked",
    }
}

/// Emits events into the outbox and delivers them. Without `AMOAUTH_EVENTS_URL` it does
/// nothing at all.
#[derive(Debug)]
pub struct Events {
    store: Store,
    sender: Option<Sender>,
    metrics: Arc<Metrics>,
}

#[derive(Debug)]
struct Sender {
    config: EventsConfig,
    http: reqwest::Client,
}

impl Events {
    pub fn new(store: Store, config: Option<EventsConfig>, metrics: Arc<Metrics>) -> Self {
        let sender = config.map(|config| {
            // reqwest is built without a bundled crypto provider; ring serves both it and sqlx.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let http = reqwest::Client::builder()
                .connect_timeout(DELIVERY_TIMEOUT)
                .timeout(DELIVERY_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("amoauth/", env!("CARGO_PKG_VERSION")))
                .build()
                .expect("the HTTP client configuration is static and valid");
            Sender { config, http }
        });
        Self {
            store,
            sender,
            metrics,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.sender.is_some()
    }

    /// The outbox row for an event, when events are configured (and, for
    /// `connection.refreshed`, opted in); the caller writes it in the transaction of the
    /// change it reports. An event that cannot be encoded is logged and dropped: it must
    /// not fail the flow that caused it.
    pub fn prepare(&self, event_type: EventType, data: impl Serialize) -> Option<NewEvent> {
        let sender = self.sender.as_ref()?;
        if event_type == EventType::ConnectionRefreshed && !sender.config.refreshed {
            return None;
        }
        let event = event_type.as_str();
        match serde_json::to_string(&data) {
            Ok(payload) => Some(NewEvent {
                event_type: event,
                payload,
                created_at: now(),
            }),
            Err(err) => {
                tracing::error!(event, error = %err, "could not encode the event; it is dropped");
                None
            }
        }
    }

    /// Sends every due event once (claiming each first), until none is due or `stop` is
    /// set. Returns how many were delivered.
    pub async fn deliver_due(&self, stop: &watch::Receiver<bool>) -> Result<u64, StoreError> {
        let Some(sender) = &self.sender else {
            return Ok(0);
        };
        let mut delivered = 0;
        loop {
            let due = self.store.due_events(now(), BATCH).await?;
            let batch_len = due.len();
            for event in due {
                // Stopping between deliveries leaves no claim behind.
                if *stop.borrow() {
                    return Ok(delivered);
                }
                let at = now();
                if !self.store.claim_event(&event, at, at + LEASE).await? {
                    continue;
                }
                if self.deliver(sender, &event).await? {
                    delivered += 1;
                }
            }
            // Each event read was delivered, rescheduled or taken by another process, so
            // a full batch means more are due, not the same ones again.
            if batch_len < BATCH as usize {
                return Ok(delivered);
            }
        }
    }

    /// One attempt at a claimed event, and its outcome stored. True when delivered.
    async fn deliver(&self, sender: &Sender, event: &EventRow) -> Result<bool, StoreError> {
        let attempt = event.attempts + 1;
        let error = match sender.send(event).await {
            Ok(()) => {
                self.metrics
                    .count(Count::EventDelivery(DeliveryOutcome::Delivered));
                self.store.mark_event_delivered(event.id, now()).await?;
                tracing::info!(event = %event.event_type, event_id = event.id, attempt, "event delivered");
                return Ok(true);
            }
            Err(error) => error,
        };
        self.metrics
            .count(Count::EventDelivery(DeliveryOutcome::FailedAttempt));
        if attempt >= MAX_ATTEMPTS {
            self.store.mark_event_failed(event.id, &error).await?;
            tracing::error!(event = %event.event_type, event_id = event.id, attempt, %error, "event delivery failed for good; see `amoauth events`");
        } else {
            let retry_at = now() + backoff(sender.config.interval, attempt);
            self.store
                .mark_event_retry(event.id, retry_at, &error)
                .await?;
            tracing::warn!(event = %event.event_type, event_id = event.id, attempt, %error, %retry_at, "event delivery failed; will retry");
        }
        Ok(false)
    }
}

impl Sender {
    /// POSTs the event, signed. Err carries a one-line reason for `last_error`.
    async fn send(&self, event: &EventRow) -> Result<(), String> {
        let data: serde_json::Value = serde_json::from_str(&event.payload)
            .map_err(|err| format!("the stored payload is not JSON: {err}"))?;
        let body = serde_json::json!({
            "id": event.id,
            "type": event.event_type,
            "created_at": rfc3339(event.created_at),
            "data": data,
        })
        .to_string();
        let timestamp = chrono::Utc::now().timestamp();
        let signature = sign(self.config.secret.expose(), timestamp, &body);
        let response = self
            .http
            .post(self.config.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("X-Amoauth-Event", &event.event_type)
            .header("X-Amoauth-Event-Id", event.id.to_string())
            .header("X-Amoauth-Timestamp", timestamp.to_string())
            .header("X-Amoauth-Signature", format!("sha256={signature}"))
            .body(body)
            .send()
            .await
            .map_err(describe)?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the receiver answered {status}"))
        }
    }
}

/// `X-Amoauth-Signature` without its `sha256=` prefix: lowercase hex HMAC-SHA256 keyed with
/// the secret over `{timestamp}.{body}`.
pub fn sign(secret: &str, timestamp: i64, body: &str) -> String {
    hmac_sha256_hex(secret, &format!("{timestamp}.{body}"))
}

/// A delivery error in one line, without the URL (it may carry a token of the host app).
fn describe(err: reqwest::Error) -> String {
    if err.is_timeout() {
        return format!("timed out after {}s", DELIVERY_TIMEOUT.as_secs());
    }
    error_chain(&err.without_url())
}

/// `interval · 2^(attempt-1)`, at most 10 minutes, times a random factor in [0.8, 1.0) so
/// replicas that failed together do not retry together.
fn backoff(first: Duration, attempt: i64) -> chrono::Duration {
    let exponent = (attempt.clamp(1, 40) - 1) as i32;
    let base = (first.as_secs_f64() * 2f64.powi(exponent)).min(MAX_BACKOFF_SECS);
    chrono::Duration::milliseconds((base * jitter(0.8, 1.0) * 1000.0) as i64)
}

/// The delivery loop of `amoauth serve`: every interval, sends what is due. Returns when
/// `stop` turns true, after the delivery in progress (so no claim is left behind).
pub async fn run_delivery(events: Arc<Events>, mut stop: watch::Receiver<bool>) {
    let Some(sender) = &events.sender else {
        return;
    };
    tracing::info!(
        host = sender.config.url.host_str(),
        "events are delivered to the host app"
    );
    let mut ticker = tokio::time::interval(sender.config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        if let Err(err) = events.deliver_due(&stop).await {
            tracing::error!(error = %err, "event delivery pass failed; will retry");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_interval_with_jitter_and_is_capped() {
        let second = Duration::from_secs(1);
        for _ in 0..50 {
            let first = backoff(second, 1).num_milliseconds();
            assert!((800..=1000).contains(&first), "{first}");
            let third = backoff(second, 3).num_milliseconds();
            assert!((3200..=4000).contains(&third), "{third}");
            let late = backoff(second, 19).num_milliseconds();
            assert!((480_000..=600_000).contains(&late), "{late}");
        }
    }

    #[test]
    fn the_signature_covers_timestamp_and_body() {
        let body = r#"{"id":1}"#;
        assert_eq!(
            sign("secret", 1_700_000_000, body),
            hmac_sha256_hex("secret", r#"1700000000.{"id":1}"#)
        );
        assert_ne!(
            sign("secret", 1_700_000_001, body),
            sign("secret", 1_700_000_000, body)
        );
    }

    #[test]
    fn connection_data_carries_no_empty_extras() {
        let data = ConnectionData::new(Platform::Amocrm, Some(7), "demo", "demo.amocrm.ru");
        assert_eq!(
            serde_json::to_value(&data).unwrap(),
            serde_json::json!({"platform": "amocrm", "account_id": 7, "subdomain": "demo", "domain": "demo.amocrm.ru", "external_id": null})
        );
    }
}
