//! A deadline for reading a request's body: a client trickling its body a byte at a time is
//! answered 408 and cut off after `AMOAUTH_READ_TIMEOUT`, instead of holding a request slot
//! for the whole route timeout. (tower-http's body timeout restarts with every byte read.)

use std::time::Duration;

use axum::body::{Body, HttpBody as _};
use axum::extract::Request;
use axum::http::StatusCode;
use axum::http::header::CONNECTION;
use axum::response::{IntoResponse, Response};

use super::MAX_BODY_BYTES;

/// Reads the whole body (at most `MAX_BODY_BYTES`, the gateway's own limit on its route)
/// within `read_timeout`, before the request takes one of the shared slots; the request with
/// its body in hand, or the answer that refuses it.
pub async fn read_body(read_timeout: Duration, request: Request) -> Result<Request, Response> {
    // Most requests (GETs) have no body: nothing to wait for.
    if request.body().is_end_stream() {
        return Ok(request);
    }
    let (parts, body) = request.into_parts();
    let limit = match super::gateway::proxied_path(parts.uri.path()) {
        Some(_) => super::gateway::MAX_BODY_BYTES,
        None => MAX_BODY_BYTES,
    };
    match tokio::time::timeout(read_timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(Request::from_parts(parts, Body::from(bytes))),
        Ok(Err(err)) if is_too_large(&err) => Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            [(CONNECTION, "close")],
            format!("413 Payload Too Large: the body exceeds {limit} bytes\n"),
        )
            .into_response()),
        Ok(Err(_)) => Err((
            StatusCode::BAD_REQUEST,
            [(CONNECTION, "close")],
            "400 Bad Request: the request body could not be read\n",
        )
            .into_response()),
        Err(_) => Err((
            StatusCode::REQUEST_TIMEOUT,
            [(CONNECTION, "close")],
            format!(
                "408 Request Timeout: the body did not arrive within {} s\n",
                read_timeout.as_secs_f64()
            ),
        )
            .into_response()),
    }
}

fn is_too_large(err: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(error) = source {
        if error.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = error.source();
    }
    false
}
