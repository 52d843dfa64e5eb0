//! The one error shape of the JSON API: `{"error": code, "message": sentence}` as
//! `application/json`. Handlers build it with `error`; `as_json_error` gives the same shape to
//! what the framework answers under `/api/` by itself (rejected queries and paths, unknown
//! routes, other methods, the rate limit, timeouts), keeping the status and headers.

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// A framework's error text is a line or two; anything longer is cut here.
const MAX_MESSAGE_BYTES: usize = 1024;

/// A JSON error: a stable `error` code and a sentence saying what to do.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "error": code, "message": message.into() })),
    )
        .into_response()
}

/// A request body that is not the JSON the operation takes: 413 when over the body limit,
/// 415 without `Content-Type: application/json`, otherwise 400 (syntax, types, missing fields).
pub fn body_rejected(rejection: &JsonRejection) -> Response {
    let status = match rejection.status() {
        status @ (StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE) => status,
        _ => StatusCode::BAD_REQUEST,
    };
    error(status, code(status), rejection.body_text())
}

/// Marks a response as amoCRM's own (the gateway's), so [`as_json_error`] leaves it as it is.
#[derive(Clone, Copy, Debug)]
pub struct Forwarded;

/// Whether `path` is under `<base>/api/`, where every error is the JSON error.
pub fn is_api(base: &str, path: &str) -> bool {
    path.strip_prefix(base)
        .is_some_and(|path| path.starts_with("/api/"))
}

/// An API route's error that is not JSON yet (the framework's, a timeout's, a limit's)
/// becomes the JSON error, keeping its status and headers.
pub async fn as_json_error(response: Response) -> Response {
    let status = response.status();
    let from_amocrm = response.extensions().get::<Forwarded>().is_some();
    if from_amocrm || !(status.is_client_error() || status.is_server_error()) || is_json(&response)
    {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_MESSAGE_BYTES)
        .await
        .ok()
        .and_then(|bytes| String::from_utf8(bytes.to_vec()).ok())
        .map(|text| text.trim().to_owned())
        .filter(|text| !text.is_empty());
    let message = text.unwrap_or_else(|| default_message(status, &parts.headers));
    let json = json!({ "error": code(status), "message": message }).to_string();
    parts.headers.remove(CONTENT_LENGTH);
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Response::from_parts(parts, Body::from(json))
}

fn is_json(response: &Response) -> bool {
    response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// The `error` code of a status the framework answers with.
fn code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        StatusCode::GATEWAY_TIMEOUT => "timeout",
        status if status.is_client_error() => "client_error",
        _ => "internal_error",
    }
}

fn default_message(status: StatusCode, headers: &axum::http::HeaderMap) -> String {
    match status {
        StatusCode::NOT_FOUND => "no such API route; the routes are in /api/v1/openapi.json".into(),
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = headers
                .get(ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            format!("this route answers only {allowed}")
        }
        StatusCode::GATEWAY_TIMEOUT => {
            "amoauth did not finish the request in time; try again".into()
        }
        _ => status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A timeout answers 504 with no body; under /api/ it becomes the JSON error.
    async fn answer(path: &str, base: &str) -> Response {
        let timed_out = StatusCode::GATEWAY_TIMEOUT.into_response();
        if is_api(base, path) {
            as_json_error(timed_out).await
        } else {
            timed_out
        }
    }

    #[tokio::test]
    async fn empty_errors_under_the_api_become_json() {
        let response = answer("/amocrm/api/v1/connections", "/amocrm").await;
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "timeout");
        assert!(body["message"].is_string());

        let page = answer("/api/v1/connections", "/amocrm").await;
        assert!(
            page.headers().get(CONTENT_TYPE).is_none(),
            "outside the API"
        );
    }
}
