//! Runs the parts (built by `parts`): the HTTP server, the refresh worker, event delivery and
//! the cleanup loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Secret, ServerConfig};
use crate::crypto::random_token;
use crate::events::run_delivery;
use crate::http::client::{PerIpRequests, RateLimiter};
use crate::http::{AppState, Shared, router};
use crate::parts::Parts;
use crate::store::{Store, now};
use crate::tokens::run_worker;

/// Expired states are kept this long, so a late callback is told "expired", not "unknown".
pub const DEFAULT_CLEANUP_GRACE: Duration = Duration::from_secs(86_400);
const CLEANUP_BATCH: i64 = 1000;
/// Delivered events are kept this long (for `amoauth events` and the host app's questions).
pub const DELIVERED_EVENTS_RETENTION: Duration = Duration::from_secs(30 * 86_400);

/// How many rows a retention pass deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    pub audit_rows: u64,
    pub delivered_events: u64,
}

/// The moment before which rows older than `age` were written; None when `age` reaches past
/// the calendar's start (nothing is that old).
pub fn older_than(age: Duration) -> Option<crate::store::Timestamp> {
    crate::store::checked_earlier(now(), age)
}

/// Deletes audit rows older than `audit_retention` and events delivered more than
/// `DELIVERED_EVENTS_RETENTION` ago, in batches; `progress` hears running totals.
pub async fn delete_past_retention(
    store: &Store,
    audit_retention: Duration,
    batch: i64,
    progress: &mut (dyn FnMut(u64) + Send),
) -> anyhow::Result<Purged> {
    let mut purged = Purged::default();
    if let Some(cutoff) = older_than(audit_retention) {
        purged.audit_rows = store
            .delete_attempts_before(cutoff, batch, progress)
            .await?;
    }
    if let Some(cutoff) = older_than(DELIVERED_EVENTS_RETENTION) {
        purged.delivered_events = store
            .delete_delivered_events_before(cutoff, batch, progress)
            .await?;
    }
    Ok(purged)
}

/// The background work of a running amoauth: the refresh worker, the cleanup loop and event
/// delivery. `serve` runs it beside its HTTP server; an embedding app runs it where it likes.
pub struct Background {
    stop: watch::Sender<bool>,
    /// The cleanup loop and the refresh worker.
    loops: Vec<JoinHandle<()>>,
    /// The event delivery loop: awaited, not aborted, so no delivery stops half-way.
    delivery: Option<JoinHandle<()>>,
}

impl Background {
    /// Starts the refresh worker, the cleanup loop and (when events are configured) delivery.
    pub(crate) fn spawn(parts: &Parts, config: &ServerConfig) -> Self {
        let (stop, _) = watch::channel(false);
        let worker = tokio::spawn(run_worker(
            Arc::clone(&parts.tokens),
            config.refresh.interval,
            config.refresh.margin,
            config.refresh.keepalive_age,
        ));
        let cleanup = tokio::spawn(cleanup_loop(
            parts.store.clone(),
            config.cleanup_interval,
            config.audit_retention,
        ));
        let delivery = parts
            .events
            .is_enabled()
            .then(|| tokio::spawn(run_delivery(Arc::clone(&parts.events), stop.subscribe())));
        Self {
            stop,
            loops: vec![cleanup, worker],
            delivery,
        }
    }

    /// Stops the loops; a delivery under way finishes first.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Some(delivery) = self.delivery {
            let _ = delivery.await;
        }
        for task in self.loops {
            task.abort();
        }
    }
}

/// The HTTP application of `parts`: every route, under `config.base_path` where they live
/// there.
pub fn app(parts: &Parts, config: &ServerConfig, admin_token: Secret) -> axum::Router {
    let secure_cookies = config
        .integrations
        .iter()
        .any(|integration| integration.redirect_uri.scheme() == "https");
    // A token request may wait for another process's lease, then refresh itself.
    let request_timeout = config
        .refresh
        .lease
        .saturating_add(config.integrations[0].timeout.saturating_mul(2))
        .saturating_add(Duration::from_secs(5));
    let state = AppState::new(Shared {
        store: parts.store.clone(),
        gateway: Arc::clone(&parts.gateway),
        flow: Arc::clone(&parts.flow),
        tokens: Arc::clone(&parts.tokens),
        metrics: Arc::clone(&parts.metrics),
        admin_token: Arc::new(admin_token),
        secure_cookies,
        login_throttle: Arc::default(),
        rate_limiter: Arc::new(RateLimiter::new(config.rate_limit)),
        per_ip_requests: Arc::new(PerIpRequests::new(config.per_ip_concurrency)),
        trusted_proxies: Arc::new(config.trusted_proxies.clone()),
        base_path: Arc::from(config.base_path.as_str()),
    });
    router(state, request_timeout, config.read_timeout)
}

/// A server running in the background (tests and `serve` both use it).
#[doc(hidden)]
pub struct Running {
    pub addr: SocketAddr,
    pub admin_token: Secret,
    /// True when the token was generated at start and must be shown to the operator.
    pub admin_token_generated: bool,
    pub store: Store,
    /// `AMOAUTH_BASE_PATH` without its trailing slash.
    pub base_path: String,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<std::io::Result<()>>,
    background: Background,
}

#[doc(hidden)]
impl Running {
    /// A one-time admin login link on the site at `public_origin`, valid for minutes; it
    /// stands in for printing the admin token, which would end up in proxy logs.
    pub async fn login_link(&self, public_origin: &str) -> anyhow::Result<String> {
        let site = format!("{public_origin}{}", self.base_path);
        Ok(crate::http::new_login_link(&self.store, &site).await?)
    }

    /// Stops accepting connections, lets in-flight requests finish, and closes the pool.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.server
            .await
            .context("the HTTP server task panicked")??;
        self.background.stop().await;
        self.store.close().await;
        Ok(())
    }
}

/// Binds `AMOAUTH_LISTEN` and starts serving.
pub async fn start(config: ServerConfig) -> anyhow::Result<Running> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("AMOAUTH_LISTEN: cannot listen on {}", config.listen))?;
    start_with_listener(config, listener).await
}

/// Starts serving on a bound listener (tests bind port 0 first to learn the redirect URI).
#[doc(hidden)]
pub async fn start_with_listener(
    config: ServerConfig,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<Running> {
    if let Some(origin) = &config.integrations[0].override_origin {
        tracing::warn!(
            origin = %origin,
            "AMOAUTH_AMOCRM_URL is set: every amoCRM request goes to this origin instead of amoCRM; for development and tests only"
        );
    }
    let parts = Parts::open(&config).await?;
    let (admin_token, admin_token_generated) = match config.admin_token.clone() {
        Some(token) => (token, false),
        None => (Secret::new(random_token()), true),
    };
    let background = Background::spawn(&parts, &config);
    let addr = listener.local_addr()?;
    let (shutdown, mut stopped) = watch::channel(false);
    let app = app(&parts, &config, admin_token.clone());
    let read_timeout = config.read_timeout;
    let server = tokio::spawn(async move {
        serve_http(listener, app, read_timeout, async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        })
        .await
    });
    tracing::info!(%addr, "amoauth listening");
    Ok(Running {
        addr,
        admin_token,
        admin_token_generated,
        store: parts.store,
        base_path: config.base_path,
        shutdown,
        server,
        background,
    })
}

/// Serves HTTP/1.1 on `listener` until `stop` resolves, then lets requests in flight finish.
/// hyper's own connection builder rather than `axum::serve`: a client that trickles its
/// request head is cut after `read_timeout` (the body's deadline is the router's).
async fn serve_http(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    read_timeout: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use tower::ServiceExt as _;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors, typically: wait instead of spinning.
                    tracing::warn!(error = %err, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(request)
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(read_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // A client that goes away or is too slow is its own problem, not the server's.
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Deletes expired states and sessions, and rows past their retention, periodically, so no
/// cron is needed.
async fn cleanup_loop(store: Store, interval: Duration, audit_retention: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let cutoff = now() - chrono::Duration::from_std(DEFAULT_CLEANUP_GRACE).unwrap_or_default();
        match store
            .delete_expired_states(cutoff, CLEANUP_BATCH, &mut |_| {})
            .await
        {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "periodic cleanup removed expired states"),
            Err(err) => {
                tracing::error!(error = %err, "periodic cleanup of states failed; will retry")
            }
        }
        if let Err(err) = store.delete_expired_sessions(now()).await {
            tracing::error!(error = %err, "periodic cleanup of admin sessions failed; will retry");
        }
        match delete_past_retention(&store, audit_retention, CLEANUP_BATCH, &mut |_| {}).await {
            Ok(Purged {
                audit_rows: 0,
                delivered_events: 0,
            }) => {}
            Ok(purged) => tracing::info!(
                audit_rows = purged.audit_rows,
                delivered_events = purged.delivered_events,
                "periodic cleanup removed rows past their retention"
            ),
            Err(err) => {
                tracing::error!(error = %err, "periodic retention cleanup failed; will retry")
            }
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
