//! `* /api/v1/connections/{account}/proxy/{amoCRM path}`: the HTTP side of the amoCRM API
//! gateway (the flow is in `crate::gateway`). amoCRM's answers pass through unchanged: status,
//! headers (minus cookies and hop-by-hop ones) and the body, streamed.

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use std::time::Duration;

use super::AppState;
use super::api::{ApiKey, account_invalid, database_unavailable, token_error};
use super::api_error::{Forwarded, error};
use crate::gateway::path::{Refusal, forwardable};
use crate::gateway::{Call, GatewayError, returned_headers};
use crate::metrics::{Count, GatewayOutcome};

/// The largest request body the gateway forwards (amoCRM takes at most 250 entities per
/// batch call; 2 MiB holds that with room). Other routes keep the global 16 KiB.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

const CONNECTIONS: &str = "/api/v1/connections/";

/// The part after `/proxy/` of a gateway URL, still percent-encoded; None for other URLs.
pub fn proxied_path(path: &str) -> Option<&str> {
    let (_, after) = path.split_once(CONNECTIONS)?;
    let (_account, rest) = after.split_once('/')?;
    rest.strip_prefix("proxy/")
}

pub async fn proxy(
    _key: ApiKey,
    State(state): State<AppState>,
    Path((account, _)): Path<(String, String)>,
    request: Request,
) -> Response {
    let count = |outcome| state.metrics.count(Count::GatewayRequest(outcome));
    if let Some(refused) = account_invalid(&account) {
        count(GatewayOutcome::Refused);
        return refused;
    }
    tracing::Span::current().record("account", account.as_str());
    let (parts, body) = request.into_parts();
    let raw = proxied_path(parts.uri.path()).unwrap_or_default();
    let path = match forwardable(raw) {
        Ok(path) => path,
        Err(refusal) => {
            count(GatewayOutcome::Refused);
            let code = match refusal {
                Refusal::NotApi => "path_not_forwarded",
                Refusal::Traversal => "path_refused",
            };
            return error(StatusCode::BAD_REQUEST, code, refusal.to_string());
        }
    };
    // Already read within the read timeout by `body_deadline`, at most MAX_BODY_BYTES; kept
    // whole so an idempotent call can be retried.
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        count(GatewayOutcome::Refused);
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body exceeds {MAX_BODY_BYTES} bytes"),
        );
    };
    let call = Call {
        method: parts.method,
        path,
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers,
        body,
    };
    match state.gateway.forward(&account, &call).await {
        Ok(answer) => {
            count(GatewayOutcome::Answered);
            let status = answer.status();
            let headers = returned_headers(answer.headers());
            let mut response = Response::new(Body::from_stream(answer.bytes_stream()));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            response.extensions_mut().insert(Forwarded);
            response
        }
        Err(err) => {
            let outcome = match &err {
                GatewayError::PacedOut { .. } => GatewayOutcome::PacedOut,
                GatewayError::CircuitOpen { .. } => GatewayOutcome::CircuitOpen,
                _ => GatewayOutcome::Failed,
            };
            count(outcome);
            gateway_error(&err)
        }
    }
}

fn gateway_error(err: &GatewayError) -> Response {
    match err {
        GatewayError::Token(err) => token_error(err),
        GatewayError::PacedOut { retry_after } => with_retry_after(
            error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                err.to_string(),
            ),
            *retry_after,
        ),
        GatewayError::CircuitOpen { open } => with_retry_after(
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "circuit_open",
                err.to_string(),
            ),
            open.remaining,
        ),
        GatewayError::Unreachable { timeout: true, .. } => error(
            StatusCode::GATEWAY_TIMEOUT,
            "amocrm_timeout",
            err.to_string(),
        ),
        GatewayError::Unreachable { .. } => error(
            StatusCode::BAD_GATEWAY,
            "amocrm_unreachable",
            err.to_string(),
        ),
        GatewayError::Database(err) => database_unavailable(&err.to_string()),
    }
}

/// Whole seconds, rounded up and at least 1: a client that waits this long finds room.
fn with_retry_after(mut response: Response, wait: Duration) -> Response {
    let seconds = wait.as_millis().div_ceil(1000).max(1);
    if let Ok(value) = HeaderValue::try_from(seconds.to_string()) {
        response.headers_mut().insert(RETRY_AFTER, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxied_path_is_what_follows_proxy() {
        assert_eq!(
            proxied_path("/api/v1/connections/demo/proxy/api/v4/leads"),
            Some("api/v4/leads")
        );
        assert_eq!(
            proxied_path("/amocrm/api/v1/connections/31337/proxy/api/v4/proxy/x"),
            Some("api/v4/proxy/x")
        );
        assert_eq!(proxied_path("/api/v1/connections/demo/token"), None);
        assert_eq!(proxied_path("/api/v1/connections"), None);
    }
}
