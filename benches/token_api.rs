//! Token API throughput on a fresh token: `cargo bench --bench token_api`.
//!
//! Starts the sandbox and amoauth (SQLite in a temporary directory, or
//! `AMOAUTH_BENCH_DATABASE_URL` with `AMOAUTH_ENCRYPTION_KEY`), connects one account, then
//! `CONNECTIONS` keep-alive clients call `GET /api/v1/connections/{id}/token` for `SECONDS`
//! and the requests per second and latency percentiles are printed. The load generator runs
//! in the same process, so both share the machine's cores.

use std::time::{Duration, Instant};

use amoauth::config::Settings;
use amoauth::sandbox::{Sandbox, SandboxConfig};
use amoauth::server::start_with_listener;

const CONNECTIONS: usize = 32;
const SECONDS: u64 = 10;

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let redirect_uri = format!("{base}/amocrm/callback");
    let sandbox = Sandbox::new(SandboxConfig::demo("bench", "bench-secret", &redirect_uri));
    let sandbox_addr = sandbox.spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let database_url = std::env::var("AMOAUTH_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| format!("sqlite://{}", dir.path().join("bench.db").display()));
    let settings = Settings {
        database_url: Some(database_url.clone()),
        encryption_key: std::env::var("AMOAUTH_ENCRYPTION_KEY").ok(),
        client_id: Some("bench".into()),
        client_secret: Some("bench-secret".into()),
        redirect_uri: Some(redirect_uri),
        admin_token: Some("bench-admin-token-0123456789".into()),
        amocrm_url: Some(format!("http://localhost:{}", sandbox_addr.port())),
        ..Settings::default()
    };
    let running = start_with_listener(settings.server().unwrap(), listener)
        .await
        .unwrap();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let install = client
        .get(format!("{base}/amocrm/install"))
        .bearer_auth("bench-admin-token-0123456789")
        .send()
        .await
        .unwrap();
    let consent = install.headers()["location"].to_str().unwrap().to_owned();
    let state = url::Url::parse(&consent)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let code = sandbox.authorize(31_337_001);
    let callback = client
        .get(format!(
            "{base}/amocrm/callback?code={code}&state={state}&referer=demo.amocrm.ru"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(callback.status(), 200);
    let key = amoauth::api_keys::create(&running.store, "bench")
        .await
        .unwrap()
        .full;
    let url = format!("{base}/api/v1/connections/31337001/token");

    // Warm up connections and caches.
    for _ in 0..100 {
        assert!(
            client
                .get(&url)
                .bearer_auth(&key)
                .send()
                .await
                .unwrap()
                .status()
                .is_success()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let (url, key) = (url.clone(), key.clone());
        let client = reqwest::Client::new();
        workers.spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let started = Instant::now();
                let response = client.get(&url).bearer_auth(&key).send().await.unwrap();
                assert!(response.status().is_success());
                response.bytes().await.unwrap();
                latencies.push(started.elapsed());
            }
            latencies
        });
    }
    let mut latencies: Vec<Duration> = workers.join_all().await.into_iter().flatten().collect();
    latencies.sort();
    let percentile =
        |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "token API, {}, {CONNECTIONS} keep-alive clients, {SECONDS} s: {} requests, {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; sandbox saw {} refreshes",
        database_url.split(':').next().unwrap_or_default(),
        latencies.len(),
        latencies.len() as f64 / SECONDS as f64,
        percentile(0.50).as_secs_f64() * 1000.0,
        percentile(0.99).as_secs_f64() * 1000.0,
        latencies.last().unwrap().as_secs_f64() * 1000.0,
        sandbox.stats().refreshes,
    );
    running.stop().await.unwrap();
}
