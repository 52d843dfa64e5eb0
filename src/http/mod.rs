//! The HTTP surface: one module per area, merged into one router.

mod api;
mod api_error;
mod auth;
mod body_deadline;
mod bounded;
pub mod client;
mod dashboard;
mod gateway;
mod oauth;
pub mod openapi;
pub mod pages;
mod suspicion;
pub mod throttle;
mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, REFERRER_POLICY, STRICT_TRANSPORT_SECURITY,
    X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::{HeaderValue, Request, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::Semaphore;
use tower::ServiceBuilder;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};

pub use auth::new_login_link;

use crate::config::Secret;
use crate::flow::Flow;
use crate::log_safe::log_safe;
use crate::metrics::{Metrics, StoredGauges};
use crate::store::{Store, StoreError, now};
use crate::tokens::TokenService;
use pages::Lang;

tokio::task_local! {
    /// The base path of the request being handled, for the links and redirects it answers.
    static BASE_PATH: Arc<str>;
}

/// `path` (starting with `/`) under the base path, e.g. `/login` → `/amocrm/login`.
pub(crate) fn local(path: &str) -> String {
    let base = BASE_PATH
        .try_with(Arc::clone)
        .unwrap_or_else(|_| Arc::from(""));
    format!("{base}{path}")
}

/// Requests handled at once, across all routes but the gateway (`admit`).
const MAX_IN_FLIGHT: usize = 512;
/// The largest request body any route takes.
pub(crate) const MAX_BODY_BYTES: usize = 16 * 1024;

/// What every handler shares, behind one reference count: axum clones the state for every
/// middleware and extractor that takes it, and a dozen contended counts per clone were an
/// eighth of a token call's CPU (BENCHMARKS.md).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct Shared {
    /// The database: handlers read and write it here, the flows and tokens through their own.
    pub store: Store,
    pub flow: Arc<Flow>,
    pub tokens: Arc<TokenService>,
    pub metrics: Arc<Metrics>,
    pub admin_token: Arc<Secret>,
    /// Session cookies get `Secure` when the public site is https.
    pub secure_cookies: bool,
    pub login_throttle: Arc<throttle::LoginThrottle>,
    pub rate_limiter: Arc<client::RateLimiter>,
    pub per_ip_requests: Arc<client::PerIpRequests>,
    pub trusted_proxies: Arc<Vec<std::net::IpAddr>>,
    /// `AMOAUTH_BASE_PATH` without its trailing slash: "" or e.g. "/amocrm".
    pub base_path: Arc<str>,
    pub gateway: Arc<crate::gateway::Gateway>,
}

/// The whole application. `request_timeout` bounds every route, amoCRM calls included;
/// `read_timeout` bounds reading a request's body.
pub fn router(state: AppState, request_timeout: Duration, read_timeout: Duration) -> Router {
    let secure = state.secure_cookies;
    let base = Arc::clone(&state.base_path);
    // The dashboard, API, health and metrics live under the base path; the seed's paths
    // (/amocrm/install, /amocrm/callback and the webhook) stay where amoCRM expects them.
    let own = Router::new()
        .route("/", get(dashboard::home))
        .route(
            "/connections/{account_id}/refresh",
            post(dashboard::refresh_now),
        )
        .route(
            "/connections/{account_id}/disconnect",
            post(dashboard::disconnect),
        )
        .route("/login", get(auth::login_page).post(auth::login_submit))
        .route("/logout", post(auth::logout))
        .route("/api/v1/connections", get(api::connections))
        .route("/api/v1/connect-links", post(api::connect_link))
        .route("/api/v1/openapi.json", get(openapi::serve))
        .route("/api/v1/connections/{account}/token", get(api::token))
        .route(
            "/api/v1/connections/{account}/proxy/{*path}",
            get(gateway::proxy)
                .post(gateway::proxy)
                .patch(gateway::proxy)
                .put(gateway::proxy)
                .delete(gateway::proxy),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    let seed = Router::new()
        .route("/amocrm/install", get(oauth::install))
        .route("/amocrm/callback", get(oauth::callback))
        .route(oauth::RESULT_PATH, get(oauth::callback_result))
        .route("/amocrm/webhook/uninstall", get(webhook::uninstall));
    let routes = if base.is_empty() {
        own.merge(seed)
    } else {
        // A proxy routing `/amocrm/` sends the dashboard as `/amocrm/`: serve that too.
        let dashboard_slash = Router::new().route(&format!("{base}/"), get(dashboard::home));
        Router::new()
            .nest(&base, own)
            .merge(seed)
            .merge(dashboard_slash)
    };
    let front_door = Arc::new(FrontDoor {
        state: state.clone(),
        slots: Semaphore::new(MAX_IN_FLIGHT),
        request_timeout,
        read_timeout,
    });
    // One layer of composed services rather than a `.layer` call each: axum boxes every
    // `.layer` around each route and clones and boxes them all again per request, which was
    // a fifth of a token call's CPU (BENCHMARKS.md).
    let layers = ServiceBuilder::new()
        // Only over https: the browser then refuses plain http to this host for a year.
        .option_layer(secure.then(|| {
            SetResponseHeaderLayer::overriding(
                STRICT_TRANSPORT_SECURITY,
                HeaderValue::from_static("max-age=31536000"),
            )
        }))
        .layer(SetRequestIdLayer::x_request_id(RequestIds::new()))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http()
                // The path only: the callback's query holds the authorization code.
                .make_span_with(|request: &Request<_>| {
                    let request_id = request
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    let route = request
                        .extensions()
                        .get::<axum::extract::MatchedPath>()
                        .map_or("", |path| path.as_str());
                    // `account` is filled in by the handlers that know it.
                    tracing::info_span!(
                        "request",
                        method = %request.method(),
                        path = %log_safe(request.uri().path()),
                        route,
                        request_id,
                        account = tracing::field::Empty,
                    )
                })
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
        )
        // No script runs but by hash; a page that needs one sets its own policy.
        .layer(SetResponseHeaderLayer::if_not_present(
            CONTENT_SECURITY_POLICY,
            HeaderValue::from_str(&pages::content_security_policy(None)).expect("ASCII policy"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        // Pages can show tokens' metadata and the callback URL carries a code: never cache,
        // never leak the URL to another site through Referer.
        .layer(SetResponseHeaderLayer::overriding(
            REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .layer(axum::middleware::from_fn_with_state(front_door, admit))
        // The gateway takes its body whole (`Request`), to its own limit, so this limit of
        // the extractors does not apply to it.
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    routes.layer(layers).with_state(state)
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

/// `X-Request-Id`s shaped like random UUIDs, without a system call for each: a random start
/// per process, then a count, so they stay unique across replicas and restarts.
#[derive(Clone)]
struct RequestIds {
    start: u64,
    count: Arc<AtomicU64>,
}

impl RequestIds {
    fn new() -> Self {
        let mut start = [0u8; 8];
        crate::crypto::fill_random(&mut start);
        Self {
            start: u64::from_le_bytes(start),
            count: Arc::default(),
        }
    }
}

impl MakeRequestId for RequestIds {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let count = self.count.fetch_add(1, Ordering::Relaxed);
        let bits = (u128::from(self.start) << 64) | u128::from(count);
        // Version 4 and the RFC 9562 variant, as a random UUID has them.
        let bits = (bits & !(0xf << 76) & !(0b11 << 62)) | (0x4 << 76) | (0b10 << 62);
        let mut hex = [0u8; 32];
        hex::encode_to_slice(bits.to_be_bytes(), &mut hex).expect("16 bytes are 32 hex digits");
        // 8-4-4-4-12, the dashes in between.
        let mut id = [b'-'; 36];
        for (digits, at) in [
            (0..8, 0),
            (8..12, 9),
            (12..16, 14),
            (16..20, 19),
            (20..32, 24),
        ] {
            id[at..at + digits.len()].copy_from_slice(&hex[digits]);
        }
        HeaderValue::from_bytes(&id).ok().map(RequestId::new)
    }
}

/// What `admit` needs beside the handlers' state.
struct FrontDoor {
    state: AppState,
    /// Requests handled at once, across all routes but the gateway.
    slots: Semaphore,
    request_timeout: Duration,
    read_timeout: Duration,
}

/// Every request's way in, as one middleware (each of axum's boxes a future and clones the
/// service behind it, per request): within the route timeout, the client's IP and its bounds
/// (client.rs), then the body within its own deadline (body_deadline.rs), then a shared
/// slot, which past `MAX_IN_FLIGHT` requests is waited for, so memory and database
/// connections stay bounded however many clients arrive at once. Under /api/ whatever the
/// framework, a limit or the timeout answers becomes the JSON error. The route is known
/// here (the layers wrap each route): the handler runs under the base path for the links it
/// answers with, and the request's time goes into the histogram under its route template
/// (`/api/v1/connections/{account}/token`), so the labels stay few whatever the URLs.
///
/// Gateway calls take no shared slot: they spend most of their time asleep until their
/// account's pacing slot, which bounds them already (a slot further than
/// `AMOAUTH_PROXY_MAX_WAIT` away is refused at once), and queueing them here would hold
/// callers past that promise.
async fn admit(
    State(door): State<Arc<FrontDoor>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    let state = &door.state;
    let is_api = api_error::is_api(&state.base_path, request.uri().path());
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .cloned();
    let admitted = async {
        let mut request = request;
        let _ip_slot = match client::identify(state, peer, &mut request).await {
            Ok(slot) => slot,
            Err(refused) => return refused,
        };
        let request = match body_deadline::read_body(door.read_timeout, request).await {
            Ok(request) => request,
            Err(refused) => return refused,
        };
        let _slot = match gateway::proxied_path(request.uri().path()) {
            Some(_) => None,
            None => Some(
                door.slots
                    .acquire()
                    .await
                    .expect("the semaphore is never closed"),
            ),
        };
        next.run(request).await
    };
    let within_time = tokio::time::timeout(door.request_timeout, admitted);
    let response = BASE_PATH
        .scope(Arc::clone(&state.base_path), within_time)
        .await
        .unwrap_or_else(|_| StatusCode::GATEWAY_TIMEOUT.into_response());
    let response = if is_api {
        api_error::as_json_error(response).await
    } else {
        response
    };
    let route = route.as_ref().map_or("unmatched", |path| path.as_str());
    state.metrics.observe_request(route, started.elapsed());
    response
}

async fn metrics(State(state): State<AppState>) -> Response {
    let store = &state.store;
    let gauges = async {
        let counts = store.connection_counts().await?;
        let earliest = store.earliest_expiry().await?;
        Ok::<_, StoreError>((counts, earliest))
    }
    .await;
    let (counts, earliest) = match gauges {
        Ok(gauges) => gauges,
        Err(err) => {
            tracing::error!(error = %err, "metrics: database unavailable");
            return (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n").into_response();
        }
    };
    let gauges = StoredGauges {
        connections: counts,
        seconds_until_earliest_expiry: earliest
            .map(|at| (at - now()).num_milliseconds() as f64 / 1000.0),
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(&gauges),
    )
        .into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.store.migrations_current().await {
        Ok(true) => (StatusCode::OK, "ready\n").into_response(),
        Ok(false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "database migrations are not current; run `amoauth migrate`\n",
        )
            .into_response(),
        Err(err) => {
            tracing::warn!(error = %err, "not ready");
            (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n").into_response()
        }
    }
}
