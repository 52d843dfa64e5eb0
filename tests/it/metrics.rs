//! `/metrics`: every documented series from the first scrape of a new process, only the right
//! ones moving with traffic, and text `promtool check metrics` accepts. promtool comes with
//! Debian's `prometheus` package; without it the promtool checks are skipped, except in CI
//! (`CI` set), where they fail.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};

use amoauth::sandbox::Fault;

use crate::support::*;

const PROMTOOL: &str = "promtool";
const DURATION: &str = "amoauth_http_request_duration_seconds";

/// The label values README documents, each exported at 0 from the start.
const FAILURE_REASONS: [&str; 16] = [
    "access_denied",
    "amocrm_callback_error",
    "invalid_request",
    "bad_referer",
    "referer_mismatch",
    "account_taken",
    "unknown_state",
    "used_state",
    "expired_state",
    "widget_installs_off",
    "amocrm_rejected",
    "amocrm_error",
    "amocrm_timeout",
    "amocrm_unreachable",
    "amocrm_bad_response",
    "database_error",
];
const REFRESH_OUTCOMES: [&str; 3] = ["success", "needs_reauth", "failure"];
const PLATFORMS: [&str; 2] = ["amocrm", "kommo"];
const TOKEN_API_OUTCOMES: [&str; 5] = ["ok", "not_found", "needs_reauth", "error", "unauthorized"];
const DELIVERY_OUTCOMES: [&str; 2] = ["delivered", "failed_attempt"];
const GATEWAY_OUTCOMES: [&str; 5] = ["answered", "paced_out", "circuit_open", "refused", "failed"];
const GATEWAY_RECOVERIES: [&str; 7] = [
    "refresh_on_401",
    "retry_after_429",
    "retry_on_5xx",
    "retry_on_timeout",
    "rediscover_host",
    "circuit_open_account",
    "circuit_open_all",
];
const CONNECTION_STATUSES: [&str; 3] = ["active", "needs_reauth", "disconnected"];

/// Every documented series but the histogram, as a new process with no connection shows it.
fn documented_at_start() -> BTreeMap<String, f64> {
    let labelled = |name: &str, label: &str, values: &[&str]| {
        values
            .iter()
            .map(|value| (format!("{name}{{{label}=\"{value}\"}}"), 0.0))
            .collect::<Vec<_>>()
    };
    let mut series: BTreeMap<String, f64> = [(
        "amoauth_seconds_until_earliest_expiry".to_owned(),
        f64::INFINITY,
    )]
    .into_iter()
    .collect();
    // Flows that started or connected, and refreshes, are per platform.
    for platform in PLATFORMS {
        for name in [
            "amoauth_flows_started_total",
            "amoauth_flows_completed_total",
        ] {
            series.insert(format!("{name}{{platform=\"{platform}\"}}"), 0.0);
        }
        for outcome in REFRESH_OUTCOMES {
            series.insert(
                format!("amoauth_refreshes_total{{platform=\"{platform}\",outcome=\"{outcome}\"}}"),
                0.0,
            );
        }
    }
    series.extend(labelled(
        "amoauth_flows_failed_total",
        "reason",
        &FAILURE_REASONS,
    ));
    series.extend(labelled(
        "amoauth_token_api_requests_total",
        "outcome",
        &TOKEN_API_OUTCOMES,
    ));
    series.extend(labelled(
        "amoauth_event_deliveries_total",
        "outcome",
        &DELIVERY_OUTCOMES,
    ));
    series.extend(labelled(
        "amoauth_gateway_requests_total",
        "outcome",
        &GATEWAY_OUTCOMES,
    ));
    series.extend(labelled(
        "amoauth_gateway_recoveries_total",
        "action",
        &GATEWAY_RECOVERIES,
    ));
    for platform in PLATFORMS {
        for status in CONNECTION_STATUSES {
            series.insert(
                format!("amoauth_connections{{platform=\"{platform}\",status=\"{status}\"}}"),
                0.0,
            );
        }
    }
    series
}

/// One scrape: the text as served and its samples by series.
struct Scrape {
    text: String,
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    /// The samples but the duration histogram's.
    fn without_histogram(&self) -> BTreeMap<String, f64> {
        self.samples
            .iter()
            .filter(|(series, _)| !series.starts_with(DURATION))
            .map(|(series, value)| (series.clone(), *value))
            .collect()
    }

    /// The routes the duration histogram has series for.
    fn timed_routes(&self) -> Vec<String> {
        let prefix = format!("{DURATION}_count{{route=\"");
        self.samples
            .keys()
            .filter_map(|series| series.strip_prefix(&prefix)?.strip_suffix("\"}"))
            .map(str::to_owned)
            .collect()
    }
}

/// GET /metrics; checks the content type, that each family has one HELP and one TYPE before
/// its samples, and that no series appears twice (promtool does not check that).
async fn scrape(client: &reqwest::Client, base: &str) -> Scrape {
    let response = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = response.text().await.unwrap();
    let mut samples = BTreeMap::new();
    let mut families: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').unwrap();
            families.entry(name.to_owned()).or_default().0 += 1;
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(matches!(kind, "counter" | "gauge" | "histogram"), "{line}");
            assert!(
                kind != "counter" || name.ends_with("_total"),
                "counters end in _total: {line}"
            );
            families.entry(name.to_owned()).or_default().1 += 1;
        } else {
            let (series, value) = parse_sample(line);
            let family = [DURATION]
                .into_iter()
                .find(|histogram| series.starts_with(histogram))
                .unwrap_or_else(|| series.split('{').next().unwrap());
            assert_eq!(
                families.get(family),
                Some(&(1, 1)),
                "HELP and TYPE come once, before {line}"
            );
            assert!(
                samples.insert(series, value).is_none(),
                "a series twice: {line}\n{text}"
            );
        }
    }
    Scrape { text, samples }
}

/// One sample line: `name{labels} value`.
fn parse_sample(line: &str) -> (String, f64) {
    let (series, value) = line
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("no value: {line}"));
    let name_end = series.find('{').unwrap_or(series.len());
    let name = &series[..name_end];
    assert!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
        "bad metric name in {line}"
    );
    if name_end < series.len() {
        assert!(series.ends_with('}'), "unclosed labels in {line}");
        for pair in series[name_end + 1..series.len() - 1].split("\",") {
            let (label, quoted) = pair
                .split_once('=')
                .unwrap_or_else(|| panic!("bad label in {line}"));
            assert!(
                label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line}"
            );
            assert!(quoted.starts_with('"'), "{line}");
        }
    }
    // The format's spelling only: Rust's and Go's parsers also take `inf`, Prometheus' spec not.
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        number
            if number
                .chars()
                .all(|c| c.is_ascii_digit() || "+-.e".contains(c)) =>
        {
            number
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line}"))
        }
        _ => panic!("bad value in {line}"),
    };
    (series.to_owned(), value)
}

/// `promtool check metrics` reads `text` on stdin and must exit 0 printing nothing (no lint).
fn promtool_accepts(text: &str) {
    let child = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var_os("CI").is_none_or(|v| v.is_empty()),
                "promtool not found: CI must check the metrics text (apt-get install -y prometheus)"
            );
            eprintln!(
                "skipped: install promtool (apt-get install -y prometheus) to check the metrics text"
            );
            return;
        }
        Err(err) => panic!("cannot run promtool: {err}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.is_empty(),
        "promtool check metrics: {}\n{said}\non:\n{text}",
        output.status
    );
}

/// A new `amoauth serve` process, scraped before any request but the start-up check of
/// /healthz: every documented series with every label value, at 0.
async fn a_new_process_exports_every_documented_series_at_zero(backend: Backend) {
    let database = backend.fresh_database().await;
    let port = free_port();
    let redirect_uri = format!("http://127.0.0.1:{port}/amocrm/callback");
    let (_sandbox, sandbox_origin) = spawn_sandbox(&redirect_uri).await;
    let env = [("AMOAUTH_ENCRYPTION_KEY", ENCRYPTION_KEY)];
    let process =
        ServeProcess::start(port, &redirect_uri, &sandbox_origin, &database.url, &env).await;

    let first = scrape(&http_client(), &process.base).await;

    assert_eq!(
        first.without_histogram(),
        documented_at_start(),
        "{}",
        first.text
    );
    assert!(
        first
            .text
            .contains(&format!("# TYPE {DURATION} histogram\n")),
        "{}",
        first.text
    );
    assert_eq!(first.timed_routes(), ["/healthz"], "{}", first.text);
    promtool_accepts(&first.text);
    process.stop();
    database.drop_database().await;
}

/// Flows, failed callbacks, token API calls and a refresh: exactly the series they concern
/// move, by as much as they should; nothing appears that a new process did not show.
async fn metrics_move_with_the_traffic_and_stay_valid(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let before = scrape(&app.client, &app.base).await;
    assert_eq!(before.without_histogram(), documented_at_start());

    let callback = app.allowed_callback_url().await;
    assert_eq!(app.open_callback(&callback).await.0, 200);
    assert_eq!(app.open_callback(&callback).await.0, 409);
    let denied = app.consent(&app.install().await, "deny").await;
    assert_eq!(app.open_callback(&denied).await.0, 403);
    app.sandbox.set_token_fault(Some(Fault::ServerError));
    let failing = app.allowed_callback_url().await;
    assert_eq!(app.open_callback(&failing).await.0, 502);
    app.sandbox.set_token_fault(None);
    let key = app.api_key().await;
    let token = format!("/api/v1/connections/{ACCOUNT_ID}/token");
    assert_eq!(app.api(&token, &key).await.0, 200);
    assert_eq!(app.api("/api/v1/connections/42/token", &key).await.0, 404);
    assert_eq!(app.api(&token, "wrong").await.0, 401);
    let refresh = app
        .client
        .post(format!("{}/connections/{ACCOUNT_ID}/refresh", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(refresh.status(), 303);
    let nowhere = app
        .client
        .get(format!("{}/no-such-page", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(nowhere.status(), 404);
    let after = scrape(&app.client, &app.base).await;

    let mut expected = documented_at_start();
    for (series, value) in [
        ("amoauth_flows_started_total{platform=\"amocrm\"}", 3.0),
        ("amoauth_flows_completed_total{platform=\"amocrm\"}", 1.0),
        ("amoauth_flows_failed_total{reason=\"used_state\"}", 1.0),
        ("amoauth_flows_failed_total{reason=\"access_denied\"}", 1.0),
        ("amoauth_flows_failed_total{reason=\"amocrm_error\"}", 1.0),
        ("amoauth_token_api_requests_total{outcome=\"ok\"}", 1.0),
        (
            "amoauth_token_api_requests_total{outcome=\"not_found\"}",
            1.0,
        ),
        (
            "amoauth_token_api_requests_total{outcome=\"unauthorized\"}",
            1.0,
        ),
        (
            "amoauth_refreshes_total{platform=\"amocrm\",outcome=\"success\"}",
            1.0,
        ),
        (
            "amoauth_connections{platform=\"amocrm\",status=\"active\"}",
            1.0,
        ),
    ] {
        expected.insert(series.to_owned(), value);
    }
    let mut moved = after.without_histogram();
    let until_expiry = moved
        .insert(
            "amoauth_seconds_until_earliest_expiry".to_owned(),
            f64::INFINITY,
        )
        .unwrap();
    assert_eq!(moved, expected, "{}", after.text);
    assert!(
        (86_000.0..86_401.0).contains(&until_expiry),
        "{until_expiry}"
    );
    let callbacks = |le: &str| {
        after.samples[&format!("{DURATION}_bucket{{route=\"/amocrm/callback\",le=\"{le}\"}}")]
    };
    assert_eq!(callbacks("+Inf"), 4.0);
    assert!(callbacks("0.001") <= callbacks("10"));
    assert_eq!(
        after.samples[&format!("{DURATION}_count{{route=\"/amocrm/callback\"}}")],
        4.0
    );
    assert!(after.samples[&format!("{DURATION}_sum{{route=\"/amocrm/callback\"}}")] > 0.0);
    assert!(
        after
            .timed_routes()
            .contains(&"/api/v1/connections/{account}/token".to_owned()),
        "routes are labelled by template: {:?}",
        after.timed_routes()
    );
    // A path no route matches is timed under one label, whatever the path.
    assert_eq!(
        after.samples[&format!("{DURATION}_count{{route=\"unmatched\"}}")],
        1.0,
        "{}",
        after.text
    );
    promtool_accepts(&after.text);
    app.stop().await;
}

on_all_backends!(
    a_new_process_exports_every_documented_series_at_zero,
    metrics_move_with_the_traffic_and_stay_valid,
);
