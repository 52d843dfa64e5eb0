//! Who is asking: the client IP (believing `X-Forwarded-For` only from trusted proxies), and
//! the per-IP bounds taken before any shared resource: requests in flight, and a rate limit on
//! every route but the probes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use axum::extract::Request;
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::bounded::make_room;
use crate::config::RateLimit;
use crate::log_safe::log_safe;

/// The client's address, as amoauth believes it; set on every request by `identify`.
#[derive(Clone, Copy, Debug)]
pub struct ClientIp(pub IpAddr);

/// The client behind `peer`: the right-most valid `X-Forwarded-For` entry that is not a
/// trusted proxy, when `peer` itself is one; otherwise `peer`. Entries a client wrote itself
/// sit to the left of what the trusted proxies appended, so they are never believed; an entry
/// that is not an address (`unknown`, garbage) is skipped rather than spoiling the header.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(forwarded_address)
        .collect();
    forwarded
        .iter()
        .rev()
        .find(|ip| !trusted.contains(ip))
        .or(forwarded.first())
        .copied()
        .unwrap_or(peer)
}

/// One `X-Forwarded-For` entry as an address: `203.0.113.5`, `2001:db8::1`, or with a port
/// as some proxies write it (`203.0.113.5:4711`, `[2001:db8::1]:4711`).
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|addr| addr.ip()))
}

/// Before the global limit on requests in flight: works out the client IP (recorded on the
/// request), applies the rate limit, and takes one of the IP's request slots, to be held
/// until the answer is ready, so one client cannot take every slot. The answer that refuses
/// the request otherwise.
pub async fn identify(
    state: &AppState,
    peer: SocketAddr,
    request: &mut Request,
) -> Result<Option<Slot>, Response> {
    let ip = client_ip(peer.ip(), request.headers(), &state.trusted_proxies);
    request.extensions_mut().insert(ClientIp(ip));
    if is_limited(request.uri().path(), &state.base_path)
        && let Some(wait) = state.rate_limiter.check(ip)
    {
        tracing::warn!(%ip, path = %log_safe(request.uri().path()), "rate limit exceeded");
        return Err((
            StatusCode::TOO_MANY_REQUESTS,
            [(RETRY_AFTER, wait.to_string())],
            "429 Too Many Requests: slow down\n",
        )
            .into_response());
    }
    state.per_ip_requests.admit(ip).await.map_err(|refusal| {
        tracing::warn!(%ip, "{}", refusal.log_line());
        refusal.into_response()
    })
}

/// Every route but the probes and metrics, under the base path (the seed's `/amocrm/…`
/// paths have no such exemption): admin pages too, so the admin token cannot be guessed at
/// full speed anywhere.
fn is_limited(path: &str, base_path: &str) -> bool {
    let own = path.strip_prefix(base_path).unwrap_or(path);
    !matches!(own, "/healthz" | "/readyz" | "/metrics")
}

/// Requests in flight per client IP, bounded by `AMOAUTH_PER_IP_CONCURRENCY`: past the bound
/// an IP's requests wait their turn (a host app's workers behind one address are served in
/// order, not refused), holding no shared slot; a few times the bound may wait, no more.
pub struct PerIpRequests {
    limit: Option<usize>,
    clients: Arc<Mutex<HashMap<IpAddr, Client>>>,
}

/// One IP's slots, and how many of its requests hold or wait for one.
struct Client {
    slots: Arc<Semaphore>,
    requests: usize,
}

/// Distinct IPs with requests in flight; past this, new IPs are told the server is busy
/// (the map must not grow with every address an attacker can use).
const MAX_CLIENTS_IN_FLIGHT: usize = 10_000;
/// Requests of one IP that may wait, per slot it has.
const WAITING_PER_SLOT: usize = 3;

/// Why a request was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// This IP already has its requests in flight and as many waiting as may wait.
    TooManyFromThisIp,
    /// Too many distinct IPs have requests in flight.
    TooManyClients,
}

impl Refusal {
    fn log_line(&self) -> &'static str {
        match self {
            Self::TooManyFromThisIp => "request refused: too many in flight from this IP",
            Self::TooManyClients => "request refused: too many clients in flight",
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, text) = match self {
            Self::TooManyFromThisIp => (
                StatusCode::TOO_MANY_REQUESTS,
                "429 Too Many Requests: too many requests in flight from your address; wait for them to finish\n",
            ),
            Self::TooManyClients => (
                StatusCode::SERVICE_UNAVAILABLE,
                "503 Service Unavailable: too many clients at once; try again in a second\n",
            ),
        };
        (status, [(RETRY_AFTER, "1")], text).into_response()
    }
}

/// One request of an IP, holding or waiting for a slot; the last one gone removes the IP.
struct Counted {
    ip: IpAddr,
    clients: Arc<Mutex<HashMap<IpAddr, Client>>>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut clients = lock(&self.clients);
        if let Some(client) = clients.get_mut(&self.ip) {
            client.requests -= 1;
            if client.requests == 0 {
                clients.remove(&self.ip);
            }
        }
    }
}

/// One admitted request of an IP; dropping it frees the slot.
pub struct Slot {
    // Declared first, so the slot is given back before the request stops being counted.
    _permit: OwnedSemaphorePermit,
    _counted: Counted,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl PerIpRequests {
    pub fn new(limit: Option<usize>) -> Self {
        Self {
            limit,
            clients: Arc::default(),
        }
    }

    /// A slot for one request of `ip` once one is free, or why not; None when unbounded.
    pub async fn admit(&self, ip: IpAddr) -> Result<Option<Slot>, Refusal> {
        let Some(limit) = self.limit else {
            return Ok(None);
        };
        let slots = {
            let mut clients = lock(&self.clients);
            if !clients.contains_key(&ip) && clients.len() >= MAX_CLIENTS_IN_FLIGHT {
                return Err(Refusal::TooManyClients);
            }
            let client = clients.entry(ip).or_insert_with(|| Client {
                slots: Arc::new(Semaphore::new(limit)),
                requests: 0,
            });
            if client.requests >= limit * (1 + WAITING_PER_SLOT) {
                return Err(Refusal::TooManyFromThisIp);
            }
            client.requests += 1;
            Arc::clone(&client.slots)
        };
        let counted = Counted {
            ip,
            clients: Arc::clone(&self.clients),
        };
        let permit = slots
            .acquire_owned()
            .await
            .expect("an IP's semaphore is never closed");
        Ok(Some(Slot {
            _permit: permit,
            _counted: counted,
        }))
    }
}

/// Token buckets per IP.
pub struct RateLimiter {
    limit: Option<RateLimit>,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Buckets kept at most; past this, full ones are dropped, then the longest idle.
const MAX_BUCKETS: usize = 10_000;

impl RateLimiter {
    pub fn new(limit: Option<RateLimit>) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// None when the request may go on; otherwise the seconds to wait.
    pub fn check(&self, ip: IpAddr) -> Option<u64> {
        let limit = self.limit?;
        let per_second = limit.per_second();
        // A burst of twice the rate: a page load with a redirect or two never trips it.
        let capacity = (per_second * 2.0).max(1.0);
        let now = Instant::now();
        let mut buckets = lock(&self.buckets);
        if !buckets.contains_key(&ip) && buckets.len() >= MAX_BUCKETS {
            // A full bucket is the same as none.
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.last).as_secs_f64() * per_second < capacity
            });
            make_room(&mut buckets, MAX_BUCKETS, |bucket| bucket.last);
        }
        let bucket = buckets.entry(ip).or_insert(Bucket {
            tokens: capacity,
            last: now,
        });
        bucket.tokens = (bucket.tokens
            + now.duration_since(bucket.last).as_secs_f64() * per_second)
            .min(capacity);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            None
        } else {
            Some(((1.0 - bucket.tokens) / per_second).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn headers(xff: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", xff.parse().unwrap());
        headers
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let peer: IpAddr = "198.51.100.9".parse().unwrap();
        let client: IpAddr = "203.0.113.5".parse().unwrap();
        assert_eq!(
            client_ip(peer, &headers("203.0.113.5"), &[proxy]),
            peer,
            "untrusted peer"
        );
        assert_eq!(client_ip(proxy, &headers("203.0.113.5"), &[proxy]), client);
        // A client that forges the header gets its own address appended by the proxy.
        assert_eq!(
            client_ip(proxy, &headers("1.2.3.4, 203.0.113.5"), &[proxy]),
            client
        );
        assert_eq!(client_ip(proxy, &headers("garbage"), &[proxy]), proxy);
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &[proxy]), proxy);
    }

    #[test]
    fn junk_forwarded_for_entries_are_skipped_not_fatal() {
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let client: IpAddr = "203.0.113.5".parse().unwrap();
        for xff in [
            "203.0.113.5, unknown",
            "garbage, 203.0.113.5",
            "1.2.3.4, 203.0.113.5, not-an-ip, 10.0.0.1",
            "203.0.113.5:4711",
            ", 203.0.113.5,,",
        ] {
            assert_eq!(client_ip(proxy, &headers(xff), &[proxy]), client, "{xff}");
        }
        assert_eq!(
            client_ip(proxy, &headers("[2001:db8::1]:4711, junk"), &[proxy]),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn probes_alone_escape_the_rate_limit() {
        for path in [
            "/",
            "/login",
            "/connections/1/refresh",
            "/logout",
            "/api/v1/connections",
        ] {
            assert!(is_limited(path, ""), "{path}");
            assert!(is_limited(&format!("/amocrm{path}"), "/amocrm"), "{path}");
        }
        assert!(is_limited("/amocrm/install", "/x"));
        assert!(!is_limited("/healthz", ""));
        assert!(!is_limited("/x/metrics", "/x"));
    }

    #[tokio::test]
    async fn each_ip_has_its_own_slots_and_waits_for_them() {
        let requests = PerIpRequests::new(Some(2));
        let ip: IpAddr = "203.0.113.5".parse().unwrap();
        let first = requests.admit(ip).await.unwrap();
        let second = requests.admit(ip).await.unwrap();
        let short = Duration::from_millis(50);
        assert!(
            tokio::time::timeout(short, requests.admit(ip))
                .await
                .is_err(),
            "a third request waits"
        );
        let other = tokio::time::timeout(short, requests.admit("203.0.113.6".parse().unwrap()));
        assert!(other.await.is_ok(), "another IP does not wait");
        drop(first);
        let third = tokio::time::timeout(short, requests.admit(ip)).await;
        assert!(third.is_ok(), "a finished request frees its slot");
        drop((second, third));
        assert!(
            lock(&requests.clients).is_empty(),
            "no entry outlives its requests"
        );
    }

    #[tokio::test]
    async fn only_a_few_requests_of_an_ip_may_wait() {
        let requests = Arc::new(PerIpRequests::new(Some(1)));
        let ip: IpAddr = "203.0.113.5".parse().unwrap();
        let _held = requests.admit(ip).await.unwrap();
        let mut waiting = Vec::new();
        for _ in 0..WAITING_PER_SLOT {
            let requests = Arc::clone(&requests);
            waiting.push(tokio::spawn(
                async move { requests.admit(ip).await.map(drop) },
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            requests.admit(ip).await.err(),
            Some(Refusal::TooManyFromThisIp)
        );
        for task in waiting {
            task.abort();
        }
    }

    #[test]
    fn buckets_stay_bounded_whatever_the_number_of_addresses() {
        let limiter = RateLimiter::new(Some(RateLimit {
            requests: 1,
            per_seconds: 3600,
        }));
        for n in 0..(MAX_BUCKETS as u32 + 500) {
            // Each address spends its bucket, so none is full and could simply be dropped.
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
            limiter.check(ip);
            limiter.check(ip);
        }
        assert!(lock(&limiter.buckets).len() <= MAX_BUCKETS);
    }

    #[test]
    fn buckets_allow_a_burst_then_refuse() {
        let limiter = RateLimiter::new(Some(RateLimit {
            requests: 2,
            per_seconds: 1,
        }));
        let ip: IpAddr = "203.0.113.5".parse().unwrap();
        for _ in 0..4 {
            assert_eq!(limiter.check(ip), None);
        }
        assert_eq!(limiter.check(ip), Some(1));
        assert_eq!(
            limiter.check("203.0.113.6".parse().unwrap()),
            None,
            "per IP"
        );
        assert_eq!(RateLimiter::new(None).check(ip), None, "off");
    }
}
