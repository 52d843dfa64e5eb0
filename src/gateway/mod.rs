//! The amoCRM API gateway: forwards a host app's call to the account's current host with its
//! access token, paced across replicas through the database, and recovers from what amoCRM
//! answers (401: one refresh; 429: its Retry-After; 5xx and timeouts: jittered retries of
//! idempotent calls; 404 at an old host: rediscovery; 403 bursts: a circuit). No HTTP
//! framework here: `http::gateway` turns requests and answers into these types.

pub mod circuit;
pub mod path;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use serde::Serialize;

use crate::amocrm::{error_chain, sleep_until_due};
use crate::config::GatewayConfig;
use crate::crypto::jitter;
use crate::events::{EventType, Events};
use crate::integrations::Integrations;
use crate::metrics::{Count, GatewayRecovery, Metrics};
use crate::store::{Reservation, Store, StoreError, now, rfc3339, saturating_later};
use crate::tokens::{FreshToken, TokenError, TokenService};
use circuit::{Circuits, Open, Scope};

/// `rate` sends are spread over this long, not over one second: the margin is the send
/// jitter (a busy process, the network) that amoCRM's per-second count must absorb.
const SPACED_OVER: Duration = Duration::from_millis(1250);

/// Slots given up for a later one after waking too late, per send.
const MAX_RESLOTS: u32 = 2;
/// Retries of one call after 429s, 5xx answers and timeouts, together.
pub const MAX_RETRIES: u32 = 3;
/// First backoff after a 5xx or timeout; doubles per retry, times a jitter in [0.5, 1.5).
const RETRY_BASE: Duration = Duration::from_millis(200);
/// The longest amoCRM `Retry-After` the gateway waits out before retrying; a longer one is
/// passed to the caller with amoCRM's answer.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);
/// A 429 without a usable Retry-After waits this long.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Request headers never forwarded: the caller's credentials, amoauth's own hop, and what the
/// HTTP client sets itself. Hop-by-hop headers per RFC 9110 §7.6.1, plus any the caller's
/// `Connection` names.
const NOT_FORWARDED: &[&str] = &[
    "authorization",
    "cookie",
    "host",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
];

/// Response headers never returned: amoCRM's cookies and its hop-by-hop headers.
const NOT_RETURNED: &[&str] = &[
    "set-cookie",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A call as the host app made it, path already checked by [`path::forwardable`].
pub struct Call {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why the gateway answers itself instead of passing on amoCRM's answer.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(
        "the account's pace is full: its next free slot is in {} s, beyond AMOAUTH_PROXY_MAX_WAIT",
        retry_after.as_secs_f64()
    )]
    PacedOut { retry_after: Duration },
    #[error(
        "amoCRM refused this {} repeatedly with 403; calls are paused for {} s",
        if open.scope == Scope::All { "server (an IP block?)" } else { "account" },
        open.remaining.as_secs()
    )]
    CircuitOpen { open: Open },
    #[error("amoCRM did not answer: {message}")]
    Unreachable { message: String, timeout: bool },
    #[error("database unavailable: {0}")]
    Database(#[from] StoreError),
}

/// The `data` of `gateway.circuit_opened`.
#[derive(Serialize)]
struct CircuitData<'a> {
    platform: &'static str,
    account_id: i64,
    subdomain: &'a str,
    domain: &'a str,
    /// `account`, or `all` when several accounts were refused at once.
    scope: &'static str,
    until: String,
}

pub struct Gateway {
    tokens: Arc<TokenService>,
    integrations: Arc<Integrations>,
    store: Store,
    metrics: Arc<Metrics>,
    events: Arc<Events>,
    circuits: Circuits,
    /// Between two sends to one account: `SPACED_OVER` divided by the rate, so sends that
    /// reach amoCRM up to 250 ms apart from their slots still cannot put `rate + 1` in a
    /// second (the benchmark's 100-account run saw 8 with a tenth of margin).
    spacing: Duration,
    max_wait: Duration,
}

impl Gateway {
    pub fn new(
        store: Store,
        tokens: Arc<TokenService>,
        integrations: Arc<Integrations>,
        metrics: Arc<Metrics>,
        events: Arc<Events>,
        config: GatewayConfig,
    ) -> Self {
        let spacing = SPACED_OVER / config.rate;
        Self {
            store,
            tokens,
            integrations,
            metrics,
            events,
            circuits: Circuits::default(),
            spacing,
            max_wait: config.max_wait,
        }
    }

    pub fn circuits(&self) -> &Circuits {
        &self.circuits
    }

    /// Forwards the call and returns amoCRM's final answer (its body not yet read).
    pub async fn forward(
        &self,
        account: &str,
        call: &Call,
    ) -> Result<reqwest::Response, GatewayError> {
        let mut token = self.tokens.access_token(account).await?;
        let account_id = token
            .account_id
            .ok_or_else(|| TokenError::Corrupt("the connection has no account id".into()))?;
        let idempotent = matches!(
            call.method,
            Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
        );
        let (mut refreshed, mut rediscovered, mut retries) = (false, false, 0);
        loop {
            self.circuits
                .check(account_id)
                .map_err(|open| GatewayError::CircuitOpen { open })?;
            self.wait_for_slot(account_id).await?;
            let sent = self.send(&token, call).await;
            let response = match sent {
                Ok(response) => response,
                Err(err) => {
                    let timeout = err.is_timeout();
                    if idempotent && retries < MAX_RETRIES {
                        retries += 1;
                        self.recovered(if timeout {
                            GatewayRecovery::RetryOnTimeout
                        } else {
                            GatewayRecovery::RetryOn5xx
                        });
                        tokio::time::sleep(jittered(retries)).await;
                        continue;
                    }
                    return Err(GatewayError::Unreachable {
                        message: error_chain(&err),
                        timeout,
                    });
                }
            };
            let status = response.status();
            if status == StatusCode::FORBIDDEN {
                self.forbidden(&token, account_id).await;
                return Ok(response);
            }
            self.circuits.answered(account_id);
            match status {
                StatusCode::UNAUTHORIZED if !refreshed => {
                    refreshed = true;
                    self.recovered(GatewayRecovery::RefreshOn401);
                    token = self
                        .tokens
                        .replace_rejected(account, &token.access_token)
                        .await?;
                }
                StatusCode::NOT_FOUND if !rediscovered => {
                    rediscovered = true;
                    match self.tokens.follow_move(account).await {
                        Ok(Some(moved)) => {
                            self.recovered(GatewayRecovery::RediscoverHost);
                            token = moved;
                        }
                        Ok(None) => return Ok(response),
                        Err(err) => {
                            tracing::warn!(error = %err, account_id, "could not look for the account's new host");
                            return Ok(response);
                        }
                    }
                }
                StatusCode::TOO_MANY_REQUESTS if idempotent && retries < MAX_RETRIES => {
                    let Some(wait) = retry_after(response.headers()) else {
                        return Ok(response);
                    };
                    retries += 1;
                    self.recovered(GatewayRecovery::RetryAfter429);
                    tokio::time::sleep(wait).await;
                }
                status if status.is_server_error() && idempotent && retries < MAX_RETRIES => {
                    retries += 1;
                    self.recovered(GatewayRecovery::RetryOn5xx);
                    tokio::time::sleep(jittered(retries)).await;
                }
                _ => return Ok(response),
            }
        }
    }

    /// Reserves the account's next send slot in the database and sleeps until it. The slot's
    /// moment is known only within the statement's round trip: the sleep ends at its latest
    /// reading (never early), and a wake-up later than `spacing / 4` after its earliest one
    /// (a starved process) gives the slot up for a later one, so late sends cannot bunch up
    /// with punctual ones. After `MAX_RESLOTS` the call goes anyway.
    async fn wait_for_slot(&self, account_id: i64) -> Result<(), GatewayError> {
        let tolerance = self.spacing / 4;
        for reslot in 0..=MAX_RESLOTS {
            let asked = tokio::time::Instant::now();
            let reservation = self
                .store
                .reserve_send_slot(account_id, self.spacing, self.max_wait)
                .await?;
            let answered = tokio::time::Instant::now();
            match reservation {
                Reservation::Reserved { wait } => {
                    sleep_until_due(answered + wait).await;
                    let late = asked.elapsed().saturating_sub(wait);
                    if late <= tolerance || reslot == MAX_RESLOTS {
                        return Ok(());
                    }
                    tracing::debug!(
                        account_id,
                        late_ms = late.as_millis(),
                        "woke late for the slot; taking a later one"
                    );
                }
                Reservation::Full { next_free_in } => {
                    return Err(GatewayError::PacedOut {
                        retry_after: next_free_in.saturating_sub(self.max_wait),
                    });
                }
            }
        }
        Ok(())
    }

    async fn send(
        &self,
        token: &FreshToken,
        call: &Call,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let mut headers = forwarded_headers(&call.headers);
        let bearer = HeaderValue::try_from(format!("Bearer {}", token.access_token.expose()));
        if let Ok(mut bearer) = bearer {
            bearer.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, bearer);
        }
        self.integrations
            .api_client(token.platform)
            .api_request(
                call.method.clone(),
                &token.domain,
                &call.path,
                call.query.as_deref(),
            )
            .headers(headers)
            .body(call.body.clone())
            .send()
            .await
    }

    /// A 403: counted toward the account's circuit; an opened circuit is logged, counted and
    /// sent as an event.
    async fn forbidden(&self, token: &FreshToken, account_id: i64) {
        for scope in self.circuits.forbidden(account_id) {
            let action = match scope {
                Scope::Account => GatewayRecovery::CircuitOpenAccount,
                Scope::All => GatewayRecovery::CircuitOpenAll,
            };
            self.recovered(action);
            let until = saturating_later(now(), circuit::COOLDOWN);
            tracing::warn!(
                account_id,
                host = %token.domain,
                scope = scope.as_str(),
                until = %rfc3339(until),
                "amoCRM answers 403 repeatedly; gateway calls are paused"
            );
            let data = CircuitData {
                platform: token.platform.as_str(),
                account_id,
                subdomain: &token.subdomain,
                domain: &token.domain,
                scope: scope.as_str(),
                until: rfc3339(until),
            };
            if let Some(event) = self.events.prepare(EventType::GatewayCircuitOpened, data)
                && let Err(err) = self.store.enqueue_event(&event).await
            {
                tracing::error!(error = %err, "could not write the circuit event");
            }
        }
    }

    fn recovered(&self, action: GatewayRecovery) {
        self.metrics.count(Count::GatewayRecovery(action));
    }
}

/// The caller's headers minus those never forwarded (and those its `Connection` names).
pub fn forwarded_headers(incoming: &HeaderMap) -> HeaderMap {
    let named_by_connection: Vec<String> = incoming
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    filtered(incoming, |name| {
        NOT_FORWARDED.contains(&name)
            || name.starts_with("proxy-")
            || named_by_connection.iter().any(|named| named == name)
    })
}

/// amoCRM's headers minus its cookies and hop-by-hop headers.
pub fn returned_headers(answered: &HeaderMap) -> HeaderMap {
    filtered(answered, |name| {
        NOT_RETURNED.contains(&name) || name.starts_with("proxy-")
    })
}

fn filtered(headers: &HeaderMap, dropped: impl Fn(&str) -> bool) -> HeaderMap {
    let mut kept = HeaderMap::new();
    for (name, value) in headers {
        if !dropped(name.as_str()) {
            kept.append(HeaderName::clone(name), value.clone());
        }
    }
    kept
}

/// amoCRM's `Retry-After` in seconds, or the default; None when it asks for longer than the
/// gateway waits (the caller gets amoCRM's 429 and its header).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let wait = headers
        .get(header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        .map_or(DEFAULT_RETRY_AFTER, Duration::from_secs);
    (wait <= MAX_RETRY_AFTER).then_some(wait)
}

/// `RETRY_BASE · 2^(retry-1)` times a random factor in [0.5, 1.5), so callers that failed
/// together do not retry together.
fn jittered(retry: u32) -> Duration {
    RETRY_BASE
        .saturating_mul(1 << retry.clamp(1, 8).saturating_sub(1))
        .mul_f64(jitter(0.5, 1.5))
}

/// The access token must never show in a log line about the call.
impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call")
            .field("method", &self.method)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_hop_by_hop_headers_stay_behind() {
        let mut incoming = HeaderMap::new();
        for (name, value) in [
            ("authorization", "Bearer host-app-api-key"),
            ("cookie", "session=1"),
            ("host", "amoauth.example"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic eA=="),
            ("x-forwarded-for", "10.0.0.1"),
            ("content-type", "application/json"),
            ("accept", "application/hal+json"),
            ("if-modified-since", "Mon, 30 Nov 2026 00:00:00 GMT"),
        ] {
            incoming.append(name, HeaderValue::from_static(value));
        }
        let forwarded = forwarded_headers(&incoming);
        let names: Vec<&str> = forwarded.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-type", "accept", "if-modified-since"]);

        let mut answered = HeaderMap::new();
        answered.append("set-cookie", HeaderValue::from_static("amo=1"));
        answered.append("transfer-encoding", HeaderValue::from_static("chunked"));
        answered.append(
            "content-type",
            HeaderValue::from_static("application/hal+json"),
        );
        let returned = returned_headers(&answered);
        assert_eq!(
            returned.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["content-type"]
        );
    }

    #[test]
    fn retry_after_is_believed_up_to_a_bound() {
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static(value));
            retry_after(&headers)
        };
        assert_eq!(with("2"), Some(Duration::from_secs(2)));
        assert_eq!(with("3600"), None);
        assert_eq!(retry_after(&HeaderMap::new()), Some(DEFAULT_RETRY_AFTER));
    }

    #[test]
    fn backoff_doubles_within_its_jitter() {
        for _ in 0..50 {
            let first = jittered(1);
            assert!((100..300).contains(&first.as_millis()), "{first:?}");
            let third = jittered(3);
            assert!((400..1200).contains(&third.as_millis()), "{third:?}");
        }
    }
}
