//! Events to the host app: signed, delivered from the outbox exactly once to a receiver that
//! is up, retried while it is down, across restarts and replicas.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amoauth::sandbox::Fault;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use tokio::task::JoinHandle;

use crate::support::*;

const TOKEN_PATH: &str = "/api/v1/connections/31337001/token";

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Received {
    event: String,
    event_id: String,
    timestamp: i64,
    content_type: String,
    /// The signature matches HMAC-SHA256(EVENTS_SECRET, "{timestamp}.{body}").
    signature_valid: bool,
    raw: String,
    body: serde_json::Value,
}

#[derive(Default)]
struct ReceiverState {
    received: Mutex<Vec<Received>>,
    /// The status it answers with.
    status: AtomicU16,
}

/// The host app's endpoint: records every request and checks its signature, as a host app
/// would, independently of amoauth's code.
struct Receiver {
    addr: SocketAddr,
    state: Arc<ReceiverState>,
    task: JoinHandle<()>,
}

impl Receiver {
    /// Listens on `port` (0: any free port).
    async fn start(port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ReceiverState::default());
        state.status.store(200, Ordering::SeqCst);
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(record))
            .with_state(Arc::clone(&state));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state, task }
    }

    fn url(&self) -> String {
        receiver_url(self.addr.port())
    }

    fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.state.received.lock().unwrap().len()
    }

    fn answer(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn receiver_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}/hook")
}

async fn record(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    raw: String,
) -> StatusCode {
    use hmac::{KeyInit as _, Mac as _};
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let timestamp = header("x-amoauth-timestamp");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(EVENTS_SECRET.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.{raw}").as_bytes());
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    state.received.lock().unwrap().push(Received {
        event: header("x-amoauth-event"),
        event_id: header("x-amoauth-event-id"),
        timestamp: timestamp.parse().unwrap_or_default(),
        content_type: header("content-type"),
        signature_valid: header("x-amoauth-signature") == expected,
        body: serde_json::from_str(&raw).unwrap_or_default(),
        raw,
    });
    StatusCode::from_u16(state.status.load(Ordering::SeqCst)).unwrap()
}

/// Waits up to 15 s for `check`.
async fn eventually<F: Future<Output = bool>>(what: &str, check: impl Fn() -> F) {
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Several delivery ticks (100 ms in tests), for anything that should not arrive.
async fn a_few_ticks() {
    tokio::time::sleep(Duration::from_millis(600)).await;
}

fn with_events(url: String) -> Options {
    Options {
        events_url: Some(url),
        ..Options::default()
    }
}

/// `amoauth events`: its output.
fn events_command(app: &TestApp) -> String {
    let dir = tempfile::tempdir().unwrap();
    let output = amoauth_command(dir.path())
        .env("DATABASE_URL", &app.database_url)
        .arg("events")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn hours_ago(hours: i64) -> chrono::NaiveDateTime {
    Utc::now().naive_utc() - chrono::Duration::hours(hours)
}

async fn fire_uninstall(app: &TestApp) -> u16 {
    app.sandbox
        .fire_uninstall_webhook(
            &format!("{}/amocrm/webhook/uninstall", app.base),
            ACCOUNT_ID,
        )
        .await
        .unwrap()
}

async fn a_connect_sends_connection_created_once_and_signed(backend: Backend) {
    let receiver = Receiver::start(0).await;
    let app = TestApp::spawn_with(&backend, with_events(receiver.url())).await;

    app.connect().await;

    eventually("connection.created", || async { receiver.count() == 1 }).await;
    a_few_ticks().await;
    let received = receiver.received();
    assert_eq!(received.len(), 1, "exactly once: {received:?}");
    let event = &received[0];
    assert!(event.signature_valid, "{event:?}");
    assert_eq!(event.event, "connection.created");
    assert_eq!(event.content_type, "application/json");
    assert!((Utc::now().timestamp() - event.timestamp).abs() < 60);
    let body = &event.body;
    assert_eq!(body["type"], "connection.created");
    assert_eq!(body["id"].to_string(), event.event_id);
    let created_at = chrono::DateTime::parse_from_rfc3339(body["created_at"].as_str().unwrap());
    assert!(created_at.is_ok(), "{body}");
    assert_eq!(
        body["data"],
        serde_json::json!({
            "platform": "amocrm",
            "account_id": ACCOUNT_ID,
            "subdomain": "demo",
            "domain": ACCOUNT_HOST,
            "external_id": null,
        })
    );
    for secret in app.sandbox.issued_secrets() {
        assert!(!event.raw.contains(&secret), "no token in an event");
    }
    assert!(!event.raw.contains(CLIENT_SECRET) && !event.raw.contains(EVENTS_SECRET));
    assert_eq!(
        app.count("SELECT COUNT(*) FROM amoauth_events WHERE status = 'delivered' AND attempts = 1 AND delivered_at IS NOT NULL")
            .await,
        1
    );

    // connection.refreshed is opt-in: a refresh sends nothing by default.
    let key = app.api_key().await;
    app.db().set_token_time("expires_at", hours_ago(1)).await;
    assert_eq!(app.api(TOKEN_PATH, &key).await.0, 200);
    assert_eq!(app.sandbox.stats().successful_refreshes, 1);
    a_few_ticks().await;
    assert_eq!(receiver.count(), 1);
    assert!(events_command(&app).starts_with("1 delivered, 0 pending, 0 failed"));
    app.stop().await;
}

async fn without_an_events_url_nothing_is_written(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.connect().await;
    assert_eq!(fire_uninstall(&app).await, 200);
    assert_eq!(app.count("SELECT COUNT(*) FROM amoauth_events").await, 0);
    app.stop().await;
}

async fn refreshes_send_refreshed_refresh_failed_and_needs_reauth(backend: Backend) {
    let receiver = Receiver::start(0).await;
    let app = TestApp::spawn_with(
        &backend,
        Options {
            events_refreshed: true,
            ..with_events(receiver.url())
        },
    )
    .await;
    app.connect().await;
    let key = app.api_key().await;
    // A refresh that works.
    app.db().set_token_time("expires_at", hours_ago(1)).await;
    assert_eq!(app.api(TOKEN_PATH, &key).await.0, 200);
    // One that fails and will be retried.
    app.db().set_token_time("expires_at", hours_ago(1)).await;
    app.sandbox.set_token_fault(Some(Fault::ServerError));
    assert_eq!(app.api(TOKEN_PATH, &key).await.0, 502);
    app.sandbox.set_token_fault(None);
    // One amoCRM refuses for good, once the failure's backoff is over.
    app.db()
        .execute("UPDATE amocrm_tokens SET next_refresh_at = NULL")
        .await;
    app.sandbox.revoke_tokens(ACCOUNT_ID);
    let (status, body) = app.api(TOKEN_PATH, &key).await;
    assert_eq!(status, 409, "{body}");

    eventually("four events", || async { receiver.count() == 4 }).await;
    a_few_ticks().await;
    let mut received = receiver.received();
    assert_eq!(received.len(), 4, "{received:?}");
    received.sort_by_key(|r| r.body["id"].as_i64());
    let types: Vec<&str> = received.iter().map(|r| r.event.as_str()).collect();
    assert_eq!(
        types,
        [
            "connection.created",
            "connection.refreshed",
            "connection.refresh_failed",
            "connection.needs_reauth"
        ]
    );
    assert!(received.iter().all(|r| r.signature_valid));
    let refreshed = &received[1].body["data"];
    assert_eq!(refreshed["account_id"], ACCOUNT_ID);
    assert_eq!(refreshed["domain"], ACCOUNT_HOST);
    let failed = &received[2].body["data"];
    assert_eq!(failed["reason"], "amocrm_error", "{failed}");
    assert!(
        failed["last_error"].as_str().unwrap().contains("500"),
        "{failed}"
    );
    assert!(failed["retry_at"].is_string(), "{failed}");
    let reauth = &received[3].body["data"];
    assert_eq!(reauth["reason"], "token_revoked", "{reauth}");
    assert!(
        reauth["last_error"]
            .as_str()
            .unwrap()
            .contains("Token has been revoked"),
        "{reauth}"
    );
    assert_eq!(reauth["subdomain"], "demo");
    for secret in app.sandbox.issued_secrets() {
        assert!(received.iter().all(|r| !r.raw.contains(&secret)));
    }
    app.stop().await;
}

async fn the_uninstall_webhook_sends_connection_disconnected_once(backend: Backend) {
    let receiver = Receiver::start(0).await;
    let app = TestApp::spawn_with(&backend, with_events(receiver.url())).await;
    app.connect().await;

    assert_eq!(fire_uninstall(&app).await, 200);
    assert_eq!(fire_uninstall(&app).await, 200, "a repeat");

    eventually("two events", || async { receiver.count() == 2 }).await;
    a_few_ticks().await;
    let received = receiver.received();
    assert_eq!(received.len(), 2, "{received:?}");
    let disconnected = received
        .iter()
        .find(|r| r.event == "connection.disconnected")
        .expect("connection.disconnected");
    assert!(disconnected.signature_valid);
    assert_eq!(
        disconnected.body["data"],
        serde_json::json!({
            "platform": "amocrm",
            "account_id": ACCOUNT_ID,
            "subdomain": "demo",
            "domain": ACCOUNT_HOST,
            "external_id": null,
            "reason": "uninstalled",
        })
    );
    app.stop().await;
}

async fn events_wait_for_a_receiver_that_is_down_even_across_a_restart(backend: Backend) {
    let port = free_port(); // nothing listens there yet
    let mut app = TestApp::spawn_with(&backend, with_events(receiver_url(port))).await;
    app.connect().await;

    eventually("a few failed attempts", || async {
        app.count("SELECT COUNT(*) FROM amoauth_events WHERE attempts >= 2")
            .await
            == 1
    })
    .await;
    assert_eq!(
        app.db().string("SELECT status FROM amoauth_events").await,
        "pending"
    );
    let error = app
        .db()
        .string("SELECT last_error FROM amoauth_events")
        .await;
    assert!(!error.contains("127.0.0.1"), "no URL in the error: {error}");
    let listing = events_command(&app);
    assert!(
        listing.starts_with("0 delivered, 1 pending, 0 failed"),
        "{listing}"
    );
    assert!(
        listing.contains("connection.created") && listing.contains(&error),
        "{listing}"
    );

    app.restart().await;
    assert_eq!(fire_uninstall(&app).await, 200);
    eventually("the new event failing too", || async {
        app.count("SELECT COUNT(*) FROM amoauth_events WHERE attempts >= 1")
            .await
            == 2
    })
    .await;
    let receiver = Receiver::start(port).await;

    eventually("both events", || async { receiver.count() == 2 }).await;
    eventually("both marked delivered", || async {
        app.count("SELECT COUNT(*) FROM amoauth_events WHERE status = 'delivered'")
            .await
            == 2
    })
    .await;
    a_few_ticks().await;
    let received = receiver.received();
    let types: HashSet<&str> = received.iter().map(|r| r.event.as_str()).collect();
    assert_eq!(received.len(), 2, "exactly once: {received:?}");
    assert_eq!(
        types,
        HashSet::from(["connection.created", "connection.disconnected"])
    );
    assert!(received.iter().all(|r| r.signature_valid));
    assert!(events_command(&app).starts_with("2 delivered, 0 pending, 0 failed"));
    app.stop().await;
}

async fn a_receiver_that_keeps_failing_ends_in_failed(backend: Backend) {
    let receiver = Receiver::start(0).await;
    receiver.answer(500);
    let app = TestApp::spawn_with(&backend, with_events(receiver.url())).await;
    app.connect().await;
    eventually("retries", || async { receiver.count() >= 2 }).await;
    assert_eq!(
        app.db().string("SELECT status FROM amoauth_events").await,
        "pending"
    );

    // Skip ahead to the last of the 20 attempts.
    app.db()
        .execute("UPDATE amoauth_events SET attempts = 19")
        .await;
    eventually("failed", || async {
        app.count("SELECT COUNT(*) FROM amoauth_events WHERE status = 'failed' AND attempts >= 20")
            .await
            == 1
    })
    .await;
    let attempts = receiver.count();
    receiver.answer(200);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.count(), attempts, "a failed event is not retried");
    let listing = events_command(&app);
    assert!(
        listing.starts_with("0 delivered, 0 pending, 1 failed"),
        "{listing}"
    );
    assert!(
        listing.contains("the receiver answered 500 Internal Server Error"),
        "{listing}"
    );
    app.stop().await;
}

/// Two replicas share the outbox; each event is sent once.
async fn two_replicas_send_each_event_once(backend: Backend) {
    let receiver = Receiver::start(0).await;
    let app = TestApp::spawn_with(&backend, with_events(receiver.url())).await;
    let url = receiver.url();
    let key_env = if backend.is_server() {
        ENCRYPTION_KEY
    } else {
        ""
    };
    let other = ServeProcess::start(
        free_port(),
        &format!("{}/amocrm/callback", app.base),
        &app.sandbox_origin,
        &app.database_url,
        &[
            ("AMOAUTH_ENCRYPTION_KEY", key_env),
            ("AMOAUTH_EVENTS_URL", &url),
            ("AMOAUTH_EVENTS_SECRET", EVENTS_SECRET),
            ("AMOAUTH_EVENTS_INTERVAL", "100ms"),
        ],
    )
    .await;
    let store = app.store();
    for i in 0..60 {
        let payload = format!(r#"{{"n":{i}}}"#);
        store
            .enqueue_event(&amoauth::internal::NewEvent {
                event_type: "test.event",
                payload,
                created_at: amoauth::internal::now(),
            })
            .await
            .unwrap();
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    eventually("60 events", || async { receiver.count() >= 60 }).await;
    eventually("all marked delivered", || async {
        app.count("SELECT COUNT(*) FROM amoauth_events WHERE status = 'delivered'")
            .await
            == 60
    })
    .await;
    a_few_ticks().await;
    let received = receiver.received();
    let ids: HashSet<&str> = received.iter().map(|r| r.event_id.as_str()).collect();
    assert_eq!(received.len(), 60, "no event twice");
    assert_eq!(ids.len(), 60);
    assert!(received.iter().all(|r| r.signature_valid));
    let log = other.stop();
    assert!(!log.contains(EVENTS_SECRET));
    app.stop().await;
}

on_all_backends!(
    a_connect_sends_connection_created_once_and_signed,
    without_an_events_url_nothing_is_written,
    refreshes_send_refreshed_refresh_failed_and_needs_reauth,
    the_uninstall_webhook_sends_connection_disconnected_once,
    events_wait_for_a_receiver_that_is_down_even_across_a_restart,
    a_receiver_that_keeps_failing_ends_in_failed,
    two_replicas_send_each_event_once,
);
