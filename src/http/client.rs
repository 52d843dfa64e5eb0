//! Who is asking: the client IP (believing `X-Forwarded-For` only from trusted proxies), and
//! per-IP rate limits on the routes the internet reaches.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::config::RateLimit;

/// The client's address, as amoauth believes it; set on every request by `identify`.
#[derive(Clone, Copy, Debug)]
pub struct ClientIp(pub IpAddr);

/// The client behind `peer`: the right-most `X-Forwarded-For` entry that is not a trusted
/// proxy, when `peer` itself is one; otherwise `peer`. Entries a client wrote itself sit to
/// the left of what the trusted proxies appended, so they are never believed.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|entry| entry.trim().parse::<IpAddr>())
        .collect::<Result<_, _>>()
        .unwrap_or_default();
    forwarded
        .iter()
        .rev()
        .find(|ip| !trusted.contains(ip))
        .or(forwarded.first())
        .copied()
        .unwrap_or(peer)
}

/// Middleware: works out the client IP, and applies the rate limit to limited routes.
pub async fn identify(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
    next: Next,
) -> Response {
    let ip = client_ip(peer.ip(), request.headers(), &state.trusted_proxies);
    request.extensions_mut().insert(ClientIp(ip));
    if is_limited(request.uri().path())
        && let Some(wait) = state.rate_limiter.check(ip)
    {
        tracing::warn!(%ip, path = request.uri().path(), "rate limit exceeded");
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(RETRY_AFTER, wait.to_string())],
            "429 Too Many Requests: slow down\n",
        )
            .into_response();
    }
    next.run(request).await
}

/// The routes the internet reaches; probes and metrics are left alone.
fn is_limited(path: &str) -> bool {
    path.starts_with("/amocrm/") || path.starts_with("/api/") || path == "/login"
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

/// Buckets kept before idle (full) ones are dropped.
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
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() > MAX_BUCKETS {
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.last).as_secs_f64() * per_second < capacity
            });
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
