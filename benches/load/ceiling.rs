//! The ceiling app: the same HTTP stack as amoauth (tokio's multi-threaded runtime, hyper,
//! axum) doing nothing but answer. Its rates are the most amoauth could reach on this machine
//! with this load generator.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::{CONTENT_TYPE, LOCATION};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use crate::scenario::CLIENT_ID;

/// Set to `LISTEN_ADDRESS SANDBOX_ADDRESS`, it makes this bench binary the ceiling app.
pub const ROLE_VARIABLE: &str = "AMOAUTH_BENCH_CEILING";

/// As long as the access tokens the sandbox issues, so both bodies weigh the same.
const FIXED_TOKEN_BODY: &str = concat!(
    r#"{"access_token":""#,
    "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJhdWQiOiJiZW5jaC1jbGllbnQiLCJqdGkiOiIwMDAwMDAwMDAw",
    "MDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwIiwiaWF0IjoxNzk1NzgwMDAwLCJuYmYiOjE3OTU3ODAwMDAsImV4",
    "cCI6MTc5NTg2NjQwMCwic3ViIjoiMSIsImdyYW50X3R5cGUiOiIiLCJhY2NvdW50X2lkIjoxMDAwMDAxLCJiYXNlX2Rv",
    "bWFpbiI6ImFtb2NybS5ydSIsInZlcnNpb24iOjIsInNjb3BlcyI6WyJjcm0iXSwiYXBpX2RvbWFpbiI6ImFwaS1iLmFt",
    "b2NybS5ydSJ9.c2lnbmF0dXJlLWZpeGVkLWxlbmd0aC1zaWduYXR1cmUtZml4ZWQ",
    r#"","account_id":1000001,"domain":"amocrm.ru","expires_at":"2026-11-28T00:00:00Z","subdomain":"bench1"}"#
);

struct Ceiling {
    consent: String,
    fixed_consent: String,
    states: AtomicU64,
}

/// Serves until killed, as `role` (the variable's value) says.
pub fn serve(role: &str) -> anyhow::Result<()> {
    let (listen, sandbox) = role
        .split_once(' ')
        .context("expected `LISTEN_ADDRESS SANDBOX_ADDRESS`")?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let consent = format!("http://{sandbox}/oauth?client_id={CLIENT_ID}&mode=popup&state=");
        let ceiling = Arc::new(Ceiling {
            fixed_consent: format!("{consent}fixed"),
            consent,
            states: AtomicU64::new(0),
        });
        let router = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/fixed/redirect", get(fixed_redirect))
            .route(
                "/fixed/json",
                get(|| async { ([(CONTENT_TYPE, "application/json")], FIXED_TOKEN_BODY) }),
            )
            .route("/amocrm/install", get(install))
            .route("/amocrm/callback", get(callback))
            .route("/amocrm/callback/result", get(callback_result))
            .with_state(ceiling);
        axum::serve(listener, router).await?;
        Ok(())
    })
}

async fn fixed_redirect(State(ceiling): State<Arc<Ceiling>>) -> Response {
    (
        StatusCode::FOUND,
        [(LOCATION, ceiling.fixed_consent.clone())],
    )
        .into_response()
}

/// Straight to consent, with a state that is only a counter.
async fn install(State(ceiling): State<Arc<Ceiling>>) -> Response {
    let state = ceiling.states.fetch_add(1, Ordering::Relaxed);
    let location = format!("{}{state:064x}", ceiling.consent);
    (StatusCode::FOUND, [(LOCATION, location)]).into_response()
}

/// Post/Redirect/Get to a fixed result page, as amoauth answers a callback.
async fn callback() -> Response {
    (
        StatusCode::SEE_OTHER,
        [(LOCATION, "/amocrm/callback/result?r=fixed")],
    )
        .into_response()
}

async fn callback_result() -> Html<&'static str> {
    Html("<!doctype html><title>amoCRM подключён</title><p>Готово: аккаунт amoCRM подключён.</p>")
}
