//! The amoCRM API gateway over real sockets: amoauth → a recording relay → the sandbox. The
//! relay notes what reached "amoCRM" (method, path, query, headers, body, arrival time), adds
//! a `Set-Cookie` to every answer, and can answer a status itself to play amoCRM failing.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use amoauth::sandbox::Fault;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::Response;
use reqwest::Method;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::support::*;

/// One request that reached the relay.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    method: String,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    body: Vec<u8>,
}

#[derive(Clone, Default)]
struct Relay {
    /// The sandbox's origin, known once the app (and its sandbox) started.
    target: Arc<OnceLock<String>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Answer API calls with this status instead of forwarding them.
    answer_with: Arc<Mutex<Option<u16>>>,
}

impl Relay {
    async fn spawn() -> (Self, String) {
        let relay = Self::default();
        let (listener, addr) = loopback_listener().await;
        let router = axum::Router::new()
            .fallback(relay_request)
            .with_state(relay.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        (relay, format!("http://{addr}"))
    }

    /// The API calls (not the OAuth ones) that reached amoCRM.
    fn api_calls(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|seen| seen.path.starts_with("/api/"))
            .cloned()
            .collect()
    }

    fn answer_with(&self, status: Option<u16>) {
        *self.answer_with.lock().unwrap() = status;
    }
}

async fn relay_request(State(relay): State<Relay>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let path = parts.uri.path().to_owned();
    relay.seen.lock().unwrap().push(Seen {
        at: Instant::now(),
        method: parts.method.to_string(),
        path: path.clone(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers.clone(),
        body: body.to_vec(),
    });
    let injected = *relay.answer_with.lock().unwrap();
    if let Some(status) = injected.filter(|_| path.starts_with("/api/")) {
        return Response::builder()
            .status(status)
            .header("content-type", "application/problem+json")
            .header("set-cookie", "amo_session=from-amocrm")
            .body(Body::from(format!(
                r#"{{"status":{status},"title":"injected"}}"#
            )))
            .unwrap();
    }
    let mut headers = parts.headers.clone();
    headers.remove("content-length");
    let target = relay.target.get().expect("the relay's target is set");
    let answer = http_client()
        .request(
            parts.method.clone(),
            format!("{target}{}", parts.uri.path_and_query().unwrap()),
        )
        .headers(headers)
        .body(body)
        .send()
        .await
        .unwrap();
    let mut response = Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        if name != "transfer-encoding" && name != "content-length" {
            response = response.header(name, value);
        }
    }
    response
        .header("set-cookie", "amo_session=from-amocrm")
        .body(Body::from(answer.bytes().await.unwrap()))
        .unwrap()
}

/// amoauth whose amoCRM is the relay in front of the sandbox, with the demo account connected.
async fn gateway_app(backend: &Backend, options: Options) -> (TestApp, Relay, String) {
    let (relay, origin) = Relay::spawn().await;
    let app = TestApp::spawn_with(
        backend,
        Options {
            amocrm_url: Some(origin),
            ..options
        },
    )
    .await;
    relay.target.set(app.sandbox_origin.clone()).unwrap();
    app.connect().await;
    // The install looked the account up; only the gateway's calls count from here.
    relay.seen.lock().unwrap().clear();
    let key = app.api_key().await;
    (app, relay, key)
}

fn proxy_url(base: &str, path: &str) -> String {
    format!("{base}/api/v1/connections/{ACCOUNT_ID}/proxy/{path}")
}

async fn call(app: &TestApp, key: &str, method: Method, path: &str) -> reqwest::Response {
    app.client
        .request(method, proxy_url(&app.base, path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

/// A counter's value from `/metrics`, e.g. `amoauth_gateway_requests_total{outcome="answered"}`.
async fn metric(app: &TestApp, series: &str) -> f64 {
    let text = app.get(&format!("{}/metrics", app.base)).await.1;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} is not exported"))
}

async fn recoveries(app: &TestApp, action: &str) -> f64 {
    metric(
        app,
        &format!("amoauth_gateway_recoveries_total{{action=\"{action}\"}}"),
    )
    .await
}

async fn forwards_method_query_body_and_answer_without_credentials(backend: Backend) {
    let (app, relay, key) = gateway_app(&backend, Options::default()).await;
    let response = app
        .client
        .get(proxy_url(&app.base, "api/v4/account?with=amojo_id,version"))
        .bearer_auth(&key)
        .header("cookie", "host_app_session=secret-cookie")
        .header("x-custom", "kept")
        .header("connection", "x-hop")
        .header("x-hop", "dropped")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers().get("set-cookie").is_none(),
        "amoCRM's cookie is not returned"
    );
    assert_eq!(
        response.headers()["content-type"],
        "application/hal+json",
        "amoCRM's headers are"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["id"], ACCOUNT_ID);
    let calls = relay.api_calls();
    assert_eq!(calls.len(), 1);
    let seen = &calls[0];
    assert_eq!(
        (
            seen.method.as_str(),
            seen.path.as_str(),
            seen.query.as_deref()
        ),
        ("GET", "/api/v4/account", Some("with=amojo_id,version"))
    );
    assert_eq!(
        seen.headers["host"], ACCOUNT_HOST,
        "sent to the account's host"
    );
    assert_eq!(seen.headers["x-custom"], "kept");
    let authorization = seen.headers["authorization"].to_str().unwrap();
    assert!(
        authorization.starts_with("Bearer ") && !authorization.contains(&key),
        "the account's token, never the API key"
    );
    for dropped in ["cookie", "x-hop", "proxy-authorization"] {
        assert!(
            !seen.headers.contains_key(dropped),
            "{dropped} was forwarded"
        );
    }

    // Another method, a body, and amoCRM's error status passed through as it is.
    relay.answer_with(Some(422));
    let body = "x".repeat(100 * 1024);
    let response = app
        .client
        .patch(proxy_url(&app.base, "api/v4/leads/17"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "not rewritten into amoauth's own error shape"
    );
    let calls = relay.api_calls();
    let seen = calls.last().unwrap();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("PATCH", "/api/v4/leads/17")
    );
    assert_eq!(
        seen.body,
        body.as_bytes(),
        "a body above the global 16 KiB passes"
    );
    assert_eq!(seen.headers["content-type"], "application/json");

    let too_large = app
        .client
        .post(proxy_url(&app.base, "api/v4/leads"))
        .bearer_auth(&key)
        .body(vec![b'x'; 2 * 1024 * 1024 + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(too_large.status(), 413);
    assert_eq!(relay.api_calls().len(), 2, "nothing more reached amoCRM");
    app.stop().await;
}

/// The raw status line amoauth answers to a request line sent byte for byte (HTTP clients
/// would normalise the `..` away before sending).
async fn raw_status(base: &str, target: &str, key: &str) -> String {
    let addr = base.strip_prefix("http://").unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer.lines().next().unwrap_or_default().to_owned()
}

async fn refuses_oauth_paths_traversal_and_callers_without_a_key(backend: Backend) {
    let (app, relay, key) = gateway_app(&backend, Options::default()).await;
    let oauth_calls_before = relay.seen.lock().unwrap().len();
    for path in [
        "oauth2/access_token",
        "oauth2/account/current/subdomain",
        "oauth",
        "private/api/v2/json/leads",
    ] {
        let response = call(&app, &key, Method::POST, path).await;
        assert_eq!(response.status(), 400, "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"], "path_not_forwarded", "{path}");
    }
    let prefix = format!("/api/v1/connections/{ACCOUNT_ID}/proxy/");
    for path in [
        "api/v4/../../oauth2/access_token",
        "api/v4/%2e%2e/%2e%2e/oauth2/access_token",
        "api/v4/leads%2f..%2f..%2foauth2%2faccess_token",
        "api/v4//leads",
    ] {
        let status = raw_status(&app.base, &format!("{prefix}{path}"), &key).await;
        assert!(status.contains(" 400 "), "{path}: {status}");
    }
    for presented in [None, Some("not-a-key")] {
        let mut request = app.client.get(proxy_url(&app.base, "api/v4/account"));
        if let Some(presented) = presented {
            request = request.bearer_auth(presented);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
    }
    let unknown = app
        .client
        .get(format!(
            "{}/api/v1/connections/nobody/proxy/api/v4/account",
            app.base
        ))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        relay.seen.lock().unwrap().len(),
        oauth_calls_before,
        "nothing reached amoCRM"
    );
    assert_eq!(
        metric(&app, "amoauth_gateway_requests_total{outcome=\"refused\"}").await,
        8.0
    );
    app.stop().await;
}

async fn a_stale_token_is_refreshed_once_and_the_call_retried(backend: Backend) {
    let (app, relay, key) = gateway_app(&backend, Options::default()).await;
    // amoCRM's clock passes the token's day; amoauth's copy still looks valid to it.
    app.sandbox.advance_clock(Duration::from_secs(25 * 3600));
    let refreshes = app.sandbox.stats().refreshes;
    let response = call(&app, &key, Method::GET, "api/v4/account").await;
    assert_eq!(response.status(), 200);
    assert_eq!(app.sandbox.stats().refreshes, refreshes + 1);
    let calls = relay.api_calls();
    assert_eq!(calls.len(), 2, "the 401, then the retry");
    assert_ne!(
        calls[0].headers["authorization"], calls[1].headers["authorization"],
        "the retry carries the new token"
    );
    assert_eq!(recoveries(&app, "refresh_on_401").await, 1.0);

    // A token amoCRM keeps refusing is refreshed once per call, not in a loop.
    relay.answer_with(Some(401));
    let response = call(&app, &key, Method::GET, "api/v4/account").await;
    assert_eq!(response.status(), 401);
    assert_eq!(relay.api_calls().len(), 4);
    assert_eq!(recoveries(&app, "refresh_on_401").await, 2.0);
    app.stop().await;
}

async fn a_renamed_account_is_found_at_its_new_host(backend: Backend) {
    let (app, relay, key) = gateway_app(&backend, Options::default()).await;
    app.sandbox.rename_account(ACCOUNT_ID, "renamed");
    let response = call(&app, &key, Method::GET, "api/v4/account").await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["subdomain"], "renamed");
    let hosts: Vec<_> = relay
        .api_calls()
        .iter()
        .map(|seen| seen.headers["host"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(hosts, [ACCOUNT_HOST, "renamed.amocrm.ru"]);
    assert_eq!(
        app.db().string("SELECT domain FROM amocrm_tokens").await,
        "renamed.amocrm.ru"
    );
    assert_eq!(recoveries(&app, "rediscover_host").await, 1.0);
    app.stop().await;
}

async fn server_errors_are_retried_for_get_and_not_for_post(backend: Backend) {
    let (app, relay, key) = gateway_app(&backend, Options::default()).await;
    app.sandbox.set_account_fault(Some(Fault::ServerError));
    let response = call(&app, &key, Method::GET, "api/v4/account").await;
    assert_eq!(response.status(), 500, "amoCRM's last answer");
    assert_eq!(
        relay.api_calls().len(),
        1 + amoauth::internal::GATEWAY_MAX_RETRIES as usize
    );
    assert_eq!(
        recoveries(&app, "retry_on_5xx").await,
        f64::from(amoauth::internal::GATEWAY_MAX_RETRIES)
    );
    app.sandbox.set_account_fault(None);

    // amoCRM's 429 (no Retry-After: a second) is waited out and the GET retried.
    relay.answer_with(Some(429));
    let before = relay.api_calls().len();
    let response = call(&app, &key, Method::GET, "api/v4/account").await;
    assert_eq!(response.status(), 429, "amoCRM's last answer");
    assert_eq!(
        relay.api_calls().len(),
        before + 1 + amoauth::internal::GATEWAY_MAX_RETRIES as usize
    );
    assert_eq!(
        recoveries(&app, "retry_after_429").await,
        f64::from(amoauth::internal::GATEWAY_MAX_RETRIES)
    );

    relay.answer_with(Some(502));
    let before = relay.api_calls().len();
    let response = call(&app, &key, Method::POST, "api/v4/leads").await;
    assert_eq!(response.status(), 502);
    assert_eq!(relay.api_calls().len(), before + 1, "a POST is sent once");
    relay.answer_with(Some(429));
    let response = call(&app, &key, Method::POST, "api/v4/leads").await;
    assert_eq!(
        response.status(),
        429,
        "amoCRM's 429 for a POST is the caller's"
    );
    assert_eq!(relay.api_calls().len(), before + 2);
    app.stop().await;
}

async fn a_timeout_is_retried_for_get_and_answered_504_for_post(backend: Backend) {
    use amoauth::sandbox::ApiFault;
    let options = Options {
        amocrm_timeout: Some("2s"),
        ..Options::default()
    };
    let (app, _relay, key) = gateway_app(&backend, options).await;
    let slow = || Some(ApiFault::times(Fault::Delay(Duration::from_secs(5)), 1));
    app.sandbox.set_api_fault(slow());
    let response = call(&app, &key, Method::GET, "api/v4/leads").await;
    assert!(response.status().is_success(), "{}", response.status());
    assert_eq!(app.sandbox.api_stats().account(ACCOUNT_ID).requests, 2);
    assert_eq!(recoveries(&app, "retry_on_timeout").await, 1.0);

    app.sandbox.set_api_fault(slow());
    let response = app
        .client
        .post(proxy_url(&app.base, "api/v4/leads"))
        .bearer_auth(&key)
        .json(&serde_json::json!([{ "name": "sent once" }]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "amocrm_timeout");
    assert_eq!(
        app.sandbox.api_stats().account(ACCOUNT_ID).requests,
        3,
        "the POST was not sent again"
    );
    app.stop().await;
}

async fn a_403_burst_opens_the_accounts_circuit(backend: Backend) {
    // Events go to the outbox whether or not this receiver (nobody) takes them.
    let options = Options {
        events_url: Some(format!("http://127.0.0.1:{}/events", free_port())),
        ..Options::default()
    };
    let (app, relay, key) = gateway_app(&backend, options).await;
    relay.answer_with(Some(403));
    for _ in 0..amoauth::internal::CIRCUIT_BURST {
        assert_eq!(
            call(&app, &key, Method::GET, "api/v4/account")
                .await
                .status(),
            403
        );
    }
    let paused = call(&app, &key, Method::GET, "api/v4/account").await;
    assert_eq!(paused.status(), 503);
    assert!(
        paused.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    let body: serde_json::Value = paused.json().await.unwrap();
    assert_eq!(body["error"], "circuit_open");
    assert_eq!(
        relay.api_calls().len(),
        amoauth::internal::CIRCUIT_BURST,
        "no more calls while the circuit is open"
    );
    assert_eq!(recoveries(&app, "circuit_open_account").await, 1.0);
    let payload = app
        .db()
        .string("SELECT payload FROM amoauth_events WHERE event_type = 'gateway.circuit_opened'")
        .await;
    let data: serde_json::Value = serde_json::from_str(&payload).unwrap();
    assert_eq!(
        (&data["account_id"], &data["scope"]),
        (
            &serde_json::json!(ACCOUNT_ID),
            &serde_json::json!("account")
        )
    );
    let page = app
        .client
        .get(format!("{}/", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .header("accept-language", "en")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(&format!("API gateway paused for account {ACCOUNT_ID}")),
        "the dashboard shows the pause"
    );
    app.stop().await;
}

/// 403 bursts on two accounts at once look like an IP block: the all-accounts circuit opens,
/// is counted and sent as an event, and nothing reaches amoCRM while it is open. (The sandbox
/// has two accounts, so that a third account is held back too is the unit test's in
/// `gateway/circuit.rs`.)
async fn bursts_of_403_on_two_accounts_pause_every_account(backend: Backend) {
    // The sandbox's other account is on Kommo, so the deployment has both integrations.
    let options = Options {
        events_url: Some(format!("http://127.0.0.1:{}/events", free_port())),
        platforms: Platforms::Both,
        ..Options::default()
    };
    let (app, relay, key) = gateway_app(&backend, options).await;
    const OTHER_ACCOUNT_ID: i64 = 31_337_002;
    app.connect_account_at("/amocrm/install?platform=kommo", OTHER_ACCOUNT_ID)
        .await;
    let other_url =
        |base: &str| format!("{base}/api/v1/connections/{OTHER_ACCOUNT_ID}/proxy/api/v4/leads");
    relay.answer_with(Some(403));
    for _ in 0..amoauth::internal::CIRCUIT_BURST {
        assert_eq!(
            call(&app, &key, Method::GET, "api/v4/leads").await.status(),
            403
        );
    }
    assert_eq!(
        recoveries(&app, "circuit_open_all").await,
        0.0,
        "one account is no IP block"
    );
    for _ in 0..amoauth::internal::CIRCUIT_BURST {
        let status = app
            .client
            .get(other_url(&app.base))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 403);
    }
    assert_eq!(recoveries(&app, "circuit_open_all").await, 1.0);
    let sent = relay.api_calls().len();

    // The relay would answer 200 now; the pause holds the calls back all the same.
    relay.answer_with(None);
    let paused = app
        .client
        .get(other_url(&app.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(paused.status(), 503);
    assert_eq!(
        relay.api_calls().len(),
        sent,
        "nothing reaches amoCRM while paused"
    );
    let scopes: Vec<serde_json::Value> = app
        .db()
        .strings("SELECT payload FROM amoauth_events WHERE event_type = 'gateway.circuit_opened'")
        .await
        .into_iter()
        .flatten()
        .map(|payload| {
            serde_json::from_str::<serde_json::Value>(&payload).unwrap()["scope"].clone()
        })
        .collect();
    assert!(scopes.contains(&serde_json::json!("all")), "{scopes:?}");
    app.stop().await;
}

/// Requests in the busiest one-second window.
fn busiest_second(mut times: Vec<Instant>) -> usize {
    times.sort();
    let mut busiest = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] >= Duration::from_secs(1) {
            start += 1;
        }
        busiest = busiest.max(end - start + 1);
    }
    busiest
}

async fn two_replicas_share_the_accounts_pace(backend: Backend) {
    let (app, relay, key) = gateway_app(&backend, Options::default()).await;
    let replica = app.replica().await;
    let bases = [app.base.clone(), format!("http://{}", replica.addr)];
    // Each replica's pools are open before the burst: a process still starting sends late,
    // then catches up.
    for base in &bases {
        let warm_up = app
            .client
            .get(proxy_url(base, "api/v4/account"))
            .bearer_auth(&key);
        assert_eq!(warm_up.send().await.unwrap().status(), 200);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    relay.seen.lock().unwrap().clear();
    let calls = (0..21).map(|n| {
        let url = proxy_url(&bases[n % 2], "api/v4/account");
        let (client, key) = (app.client.clone(), key.clone());
        async move {
            client
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    let statuses = futures_join_all(calls).await;
    assert!(statuses.iter().all(|status| *status == 200), "{statuses:?}");
    let times: Vec<Instant> = relay.api_calls().iter().map(|seen| seen.at).collect();
    assert_eq!(times.len(), 21);
    let first = *times.iter().min().unwrap();
    let offsets: Vec<u128> = times.iter().map(|at| (*at - first).as_millis()).collect();
    let busiest = busiest_second(times);
    assert!(
        busiest <= 7,
        "{busiest} requests reached amoCRM within one second: {offsets:?}"
    );
    replica.stop().await.unwrap();
    app.stop().await;
}

async fn callers_beyond_the_wait_get_amoauths_own_429(backend: Backend) {
    let options = Options {
        proxy_max_wait: Some("1s"),
        ..Options::default()
    };
    let (app, relay, key) = gateway_app(&backend, options).await;
    let calls = (0..30).map(|_| {
        let url = proxy_url(&app.base, "api/v4/account");
        let (client, key) = (app.client.clone(), key.clone());
        async move {
            let response = client.get(url).bearer_auth(key).send().await.unwrap();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|value| value.to_str().unwrap().parse::<u64>().unwrap());
            let body: serde_json::Value = response.json().await.unwrap();
            (body, retry_after)
        }
    });
    let answers = futures_join_all(calls).await;
    let refused: Vec<_> = answers
        .iter()
        .filter(|(body, _)| body["error"] == "rate_limited")
        .collect();
    let answered = answers
        .iter()
        .filter(|(body, _)| body["id"] == ACCOUNT_ID)
        .count();
    assert_eq!(answered + refused.len(), 30);
    // Reservations spread over the time the 30 take to arrive, so a few more than a
    // second's worth fit; far from all.
    assert!((1..=15).contains(&answered), "{answered} answered");
    assert!(
        refused
            .iter()
            .all(|(_, retry_after)| retry_after.is_some_and(|s| s >= 1))
    );
    assert_eq!(
        relay.api_calls().len(),
        answered,
        "refused calls never reached amoCRM"
    );
    assert_eq!(
        metric(
            &app,
            "amoauth_gateway_requests_total{outcome=\"paced_out\"}"
        )
        .await,
        refused.len() as f64
    );
    app.stop().await;
}

/// Leads created and listed through two replicas at once: amoCRM (the sandbox, which counts
/// in a sliding second) never sees more than 7 a second and never answers 429.
async fn leads_through_two_replicas_never_meet_amocrms_429(backend: Backend) {
    let (app, _relay, key) = gateway_app(&backend, Options::default()).await;
    let replica = app.replica().await;
    let bases = [app.base.clone(), format!("http://{}", replica.addr)];
    let calls = (0..24).map(|n| {
        let base = bases[n % 2].clone();
        let (client, key) = (app.client.clone(), key.clone());
        async move {
            let request = if n % 3 == 0 {
                client
                    .post(proxy_url(&base, "api/v4/leads"))
                    .json(&serde_json::json!([{ "name": format!("lead {n}"), "price": n }]))
            } else {
                client.get(proxy_url(&base, "api/v4/leads?limit=5&page=1"))
            };
            request.bearer_auth(key).send().await.unwrap().status()
        }
    });
    let statuses = futures_join_all(calls).await;
    assert!(
        statuses.iter().all(|status| status.is_success()),
        "{statuses:?}"
    );
    let listed: serde_json::Value = call(&app, &key, Method::GET, "api/v4/leads?limit=50")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed["_embedded"]["leads"].as_array().unwrap().len(),
        8,
        "every POST created its lead once"
    );
    let stats = app.sandbox.api_stats().account(ACCOUNT_ID);
    assert_eq!(stats.too_many_requests, 0, "{stats:?}");
    assert!(stats.max_per_second <= 7, "{stats:?}");
    replica.stop().await.unwrap();
    app.stop().await;
}

/// The store's reservation: one account's full pace takes nothing and slows no other account.
/// Also prints what a reservation costs (`--nocapture`), sequential and 16 at once.
async fn a_full_pace_takes_no_slot_and_slows_no_other_account(backend: Backend) {
    use amoauth::internal::Reservation;
    let app = TestApp::spawn(&backend).await;
    let store = app.store().clone();
    // Half a spacing between the wait allowed and the next slot: time for the refused calls.
    let (spacing, max_wait) = (Duration::from_secs(1), Duration::from_millis(2500));
    let mut reserved = 0;
    let first_full = loop {
        match store.reserve_send_slot(1, spacing, max_wait).await.unwrap() {
            Reservation::Reserved { .. } => reserved += 1,
            Reservation::Full { next_free_in } => break next_free_in,
        }
        assert!(reserved < 100, "the pace never filled");
    };
    assert_eq!(reserved, 3, "slots now, in 1 s and in 2 s fit in 2.5 s");
    assert!(first_full > max_wait);
    // Refused calls consume nothing: the next free slot only comes closer.
    for _ in 0..5 {
        let Reservation::Full { next_free_in } =
            store.reserve_send_slot(1, spacing, max_wait).await.unwrap()
        else {
            panic!("a refused call made room")
        };
        assert!(next_free_in <= first_full);
    }
    assert_eq!(
        store.reserve_send_slot(2, spacing, max_wait).await.unwrap(),
        Reservation::Reserved {
            wait: Duration::ZERO
        },
        "another account is not slowed"
    );

    let rounds = 200;
    let started = Instant::now();
    for account in 0..rounds {
        store
            .reserve_send_slot(1000 + account, spacing, max_wait)
            .await
            .unwrap();
    }
    let sequential = started.elapsed() / rounds as u32;
    let started = Instant::now();
    let concurrent = (0..16).map(|task| {
        let store = store.clone();
        async move {
            for n in 0..rounds / 16 {
                let account = 5000 + task * 100 + n;
                store
                    .reserve_send_slot(account, spacing, max_wait)
                    .await
                    .unwrap();
            }
        }
    });
    futures_join_all(concurrent).await;
    let per_call_concurrent = started.elapsed() / (16 * (rounds / 16)) as u32;
    // One hot row: 16 callers on one account, as a busy account's callers are.
    let started = Instant::now();
    let hot = (0..16).map(|_| {
        let store = store.clone();
        async move {
            for _ in 0..rounds / 16 {
                let reservation = store
                    .reserve_send_slot(9999, Duration::from_micros(1), Duration::from_secs(30))
                    .await
                    .unwrap();
                assert!(matches!(reservation, Reservation::Reserved { .. }));
            }
        }
    });
    futures_join_all(hot).await;
    let per_call_hot = started.elapsed() / (16 * (rounds / 16)) as u32;
    eprintln!(
        "reservation cost on {backend:?}: {sequential:?} per call sequential, {per_call_concurrent:?} per call amortised with 16 at once on 16 accounts, {per_call_hot:?} with 16 at once on one account"
    );
    app.stop().await;
}

/// Runs the futures concurrently (spawned) and collects their outputs, in completion order.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    for future in futures {
        tasks.spawn(future);
    }
    tasks.join_all().await
}

on_all_backends!(
    forwards_method_query_body_and_answer_without_credentials,
    refuses_oauth_paths_traversal_and_callers_without_a_key,
    a_stale_token_is_refreshed_once_and_the_call_retried,
    a_renamed_account_is_found_at_its_new_host,
    server_errors_are_retried_for_get_and_not_for_post,
    a_timeout_is_retried_for_get_and_answered_504_for_post,
    a_403_burst_opens_the_accounts_circuit,
    bursts_of_403_on_two_accounts_pause_every_account,
    two_replicas_share_the_accounts_pace,
    callers_beyond_the_wait_get_amoauths_own_429,
    leads_through_two_replicas_never_meet_amocrms_429,
    a_full_pace_takes_no_slot_and_slows_no_other_account,
);

/// README's curl lines for the gateway, run by curl as written, with the test's key, address
/// and account put in: the list reaches amoCRM, and the POST creates the lead it shows.
#[tokio::test]
async fn readmes_curl_lines_reach_amocrm_through_amoauth() {
    let (app, _relay, key) = gateway_app(&Backend::Sqlite, Options::default()).await;
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let section = readme
        .split("## Call amoCRM through amoauth")
        .nth(1)
        .expect("README has the gateway section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the section starts with a sh block");
    assert!(block.contains("curl"), "{block}");
    let script = block
        .replace("ak_…", &key)
        .replace("http://127.0.0.1:8080", &app.base)
        .replace("/connections/fastis02/", "/connections/demo/");

    let output = tokio::process::Command::new("curl")
        .arg("--version")
        .output()
        .await;
    assert!(output.is_ok(), "curl is needed: apt-get install -y curl");
    let output = tokio::process::Command::new("sh")
        .args(["-e", "-c", &script])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("\"_embedded\""),
        "the POST's answer: {stdout}"
    );

    let stats = app.sandbox.api_stats().account(ACCOUNT_ID);
    assert_eq!(
        stats.requests, 2,
        "both lines reached amoCRM once: {stats:?}"
    );
    let listed: serde_json::Value = call(&app, &key, Method::GET, "api/v4/leads?limit=50")
        .await
        .json()
        .await
        .unwrap();
    let leads = listed["_embedded"]["leads"].as_array().unwrap();
    assert_eq!(leads.len(), 1, "{listed}");
    assert_eq!(leads[0]["name"], "New lead");
    assert_eq!(leads[0]["price"], 1500);
    app.stop().await;
}
