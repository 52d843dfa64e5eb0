//! The HTTP surface: one module per area, merged into one router.

mod api;
mod auth;
mod oauth;
pub mod pages;
mod webhook;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::{CACHE_CONTROL, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use crate::config::Secret;
use crate::flow::Flow;
use crate::store::{StoreError, now};
use crate::tokens::TokenService;
use auth::Admin;
use pages::Lang;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub flow: Arc<Flow>,
    pub tokens: Arc<TokenService>,
    pub admin_token: Arc<Secret>,
    /// Session cookies get `Secure` when the public site is https.
    pub secure_cookies: bool,
}

/// The whole application. `request_timeout` bounds every route, amoCRM calls included.
pub fn router(state: AppState, request_timeout: Duration) -> Router {
    Router::new()
        .route("/", get(home))
        .route("/login", get(auth::login_page).post(auth::login_submit))
        .route("/logout", post(auth::logout))
        .route("/amocrm/install", get(oauth::install))
        .route("/amocrm/callback", get(oauth::callback))
        .route("/amocrm/webhook/uninstall", get(webhook::uninstall))
        .route("/api/v1/connections", get(api::connections))
        .route("/api/v1/connections/{account}/token", get(api::token))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
        .layer(DefaultBodyLimit::max(16 * 1024))
        .layer(TimeoutLayer::with_status_code(StatusCode::GATEWAY_TIMEOUT, request_timeout))
        // Pages can show tokens' metadata and the callback URL carries a code: never cache,
        // never leak the URL to another site through Referer.
        .layer(SetResponseHeaderLayer::overriding(CACHE_CONTROL, HeaderValue::from_static("no-store")))
        .layer(SetResponseHeaderLayer::overriding(REFERRER_POLICY, HeaderValue::from_static("no-referrer")))
        .layer(SetResponseHeaderLayer::overriding(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")))
        .layer(SetResponseHeaderLayer::overriding(X_FRAME_OPTIONS, HeaderValue::from_static("DENY")))
        .layer(
            TraceLayer::new_for_http()
                // The path only: the callback's query holds the authorization code.
                .make_span_with(|request: &Request<_>| {
                    let request_id = request
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id)
                })
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// The answer when the database fails: 503 with what happened and what to do.
pub(crate) fn store_unavailable(lang: Lang, err: &StoreError) -> Response {
    tracing::error!(error = %err, "database unavailable");
    let page = pages::error(
        lang,
        "База данных недоступна",
        "Database unavailable",
        "amoauth cannot reach its database right now; nothing was changed. Try again in a minute. / База данных amoauth сейчас недоступна, ничего не изменено. Повторите через минуту.",
    );
    (StatusCode::SERVICE_UNAVAILABLE, Html(page.into_string())).into_response()
}

async fn home(_admin: Admin, State(state): State<AppState>, headers: HeaderMap) -> Response {
    let lang = Lang::from_headers(&headers);
    let store = state.flow.store();
    let loaded = async {
        Ok::<_, StoreError>((store.connections().await?, store.recent_attempts(20).await?))
    }
    .await;
    match loaded {
        Ok((connections, attempts)) => {
            Html(pages::home(lang, &connections, &attempts, now()).into_string()).into_response()
        }
        Err(err) => store_unavailable(lang, &err),
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.flow.store().ping().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(err) => {
            tracing::warn!(error = %err, "not ready");
            (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n").into_response()
        }
    }
}
