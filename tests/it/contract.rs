//! The JSON API keeps its OpenAPI contract: every error under `/api/` is the documented JSON
//! error, the server enforces exactly what the document says, and schemathesis, driven by the
//! served document, finds no failure against a real `amoauth serve`.

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use crate::support::*;

const RETURN_ORIGIN: &str = "https://app.example.com";

/// An answer of amoauth: status, headers and body text.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    /// Asserts the documented JSON error with `status`; returns its `error` code.
    fn json_error(&self, status: u16) -> String {
        assert_eq!(self.status, status, "{}", self.body);
        let content_type = self.headers["content-type"].to_str().unwrap();
        assert_eq!(content_type, "application/json", "{}", self.body);
        let body: Value = serde_json::from_str(&self.body).expect("a JSON body");
        assert!(body["message"].is_string(), "{body}");
        body["error"].as_str().expect("an error code").to_owned()
    }
}

async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: Option<(&str, String)>,
) -> Answer {
    let mut request = app.client.request(method, format!("{}{path}", app.base));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some((content_type, body)) = body {
        request = request.header("content-type", content_type).body(body);
    }
    let response = request.send().await.unwrap();
    Answer {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.text().await.unwrap(),
    }
}

async fn connect_link(app: &TestApp, key: &str, body: Value) -> Answer {
    let body = Some(("application/json", body.to_string()));
    send(app, Method::POST, "/api/v1/connect-links", Some(key), body).await
}

async fn document(app: &TestApp) -> Value {
    let answer = send(app, Method::GET, "/api/v1/openapi.json", None, None).await;
    assert_eq!(answer.status, 200);
    serde_json::from_str(&answer.body).unwrap()
}

fn with_origins() -> Options {
    Options {
        return_origins: Some(RETURN_ORIGIN),
        ..Options::default()
    }
}

#[tokio::test]
async fn a_repeated_query_parameter_answers_the_json_error() {
    let app = TestApp::spawn(&Backend::Sqlite).await;
    let key = app.api_key().await;
    let path = "/api/v1/connections?external_id=a&external_id=b";
    let answer = send(&app, Method::GET, path, Some(&key), None).await;
    assert_eq!(answer.json_error(400), "invalid_request");
    app.stop().await;
}

#[tokio::test]
async fn a_path_that_is_not_utf8_answers_the_json_error() {
    let app = TestApp::spawn(&Backend::Sqlite).await;
    let key = app.api_key().await;
    let path = "/api/v1/connections/%ff/token";
    let answer = send(&app, Method::GET, path, Some(&key), None).await;
    assert_eq!(answer.json_error(400), "invalid_request");
    let path = "/api/v1/connections/a%00b/token";
    let answer = send(&app, Method::GET, path, Some(&key), None).await;
    assert_eq!(answer.json_error(400), "invalid_request", "NUL");
    app.stop().await;
}

/// 255 characters of two bytes each are one tenant id, in the body and in the query alike.
async fn external_ids_are_counted_in_characters(backend: Backend) {
    let app = TestApp::spawn_with(&backend, with_origins()).await;
    let key = app.api_key().await;
    let longest = "я".repeat(255);
    let link = |external_id: &str| serde_json::json!({ "external_id": external_id, "return_url": format!("{RETURN_ORIGIN}/done") });
    let answer = connect_link(&app, &key, link(&longest)).await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    let answer = connect_link(&app, &key, link(&"я".repeat(256))).await;
    assert_eq!(answer.json_error(400), "invalid_request");

    let query = |id: &str| format!("/api/v1/connections?external_id={}", percent(id));
    let answer = send(&app, Method::GET, &query(&longest), Some(&key), None).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body, "[]");
    let answer = send(
        &app,
        Method::GET,
        &query(&"я".repeat(256)),
        Some(&key),
        None,
    )
    .await;
    assert_eq!(answer.json_error(400), "invalid_request");
    app.stop().await;
}

on_all_backends!(external_ids_are_counted_in_characters);

fn percent(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// README promises a few KiB per query parameter; `external_id` is held to its 255 characters.
#[tokio::test]
async fn an_overlong_or_empty_query_parameter_is_refused() {
    let app = TestApp::spawn(&Backend::Sqlite).await;
    let key = app.api_key().await;
    let path = format!("/api/v1/connections?external_id={}", "a".repeat(60_000));
    let answer = send(&app, Method::GET, &path, Some(&key), None).await;
    assert_eq!(answer.json_error(400), "invalid_request");
    let answer = send(
        &app,
        Method::GET,
        "/api/v1/connections?external_id=",
        Some(&key),
        None,
    )
    .await;
    assert_eq!(answer.json_error(400), "invalid_request", "empty");

    let document = document(&app).await;
    let parameter = &document["paths"]["/api/v1/connections"]["get"]["parameters"][0]["schema"];
    assert_eq!(parameter["minLength"], 1);
    assert_eq!(parameter["maxLength"], 255);
    app.stop().await;
}

/// `subdomain` is typed as a string and `null` is refused, as for `mode`; the document says
/// where empty strings are refused.
#[tokio::test]
async fn null_members_and_empty_tenant_ids_are_refused_as_documented() {
    let app = TestApp::spawn_with(&Backend::Sqlite, with_origins()).await;
    let key = app.api_key().await;
    let return_url = format!("{RETURN_ORIGIN}/done");
    for body in [
        serde_json::json!({ "external_id": "t", "return_url": return_url, "subdomain": null }),
        serde_json::json!({ "external_id": "t", "return_url": return_url, "mode": null }),
        serde_json::json!({ "external_id": "", "return_url": return_url }),
    ] {
        let answer = connect_link(&app, &key, body.clone()).await;
        assert_eq!(answer.json_error(400), "invalid_request", "{body}");
    }
    let answer = connect_link(
        &app,
        &key,
        serde_json::json!({ "external_id": "t", "return_url": return_url, "subdomain": "" }),
    )
    .await;
    assert_eq!(
        answer.status, 201,
        "an empty subdomain is none: {}",
        answer.body
    );

    let document = document(&app).await;
    let body = &document["paths"]["/api/v1/connect-links"]["post"]["requestBody"]["content"]["application/json"]
        ["schema"]["properties"];
    assert_eq!(body["external_id"]["minLength"], 1);
    assert_eq!(body["subdomain"]["type"], "string", "not nullable");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM amocrm_oauth_states").await,
        1,
        "only the valid link made a state"
    );
    app.stop().await;
}

/// What axum answers by itself under /api/ is the JSON error too, with its status and headers.
#[tokio::test]
async fn the_frameworks_own_rejections_are_json_errors() {
    let app = TestApp::spawn_with(&Backend::Sqlite, with_origins()).await;
    let key = app.api_key().await;
    fn link<'a>(body: &str, content_type: &'a str) -> Option<(&'a str, String)> {
        Some((content_type, body.to_owned()))
    }

    let answer = send(
        &app,
        Method::DELETE,
        "/api/v1/connections",
        Some(&key),
        None,
    )
    .await;
    assert_eq!(answer.json_error(405), "method_not_allowed");
    assert!(answer.headers.contains_key("allow"), "{:?}", answer.headers);
    let answer = send(&app, Method::GET, "/api/v1/nothing-here", Some(&key), None).await;
    assert_eq!(answer.json_error(404), "not_found");
    let answer = send(&app, Method::GET, "/api/v1/connections", None, None).await;
    assert_eq!(answer.json_error(401), "unauthorized");

    let cases = [
        (link(r#"{"external_id": "#, "application/json"), 400),
        (link(r#"{"return_url": "x"}"#, "application/json"), 400),
        (
            link(
                r#"{"external_id": 1, "return_url": "x"}"#,
                "application/json",
            ),
            400,
        ),
        (
            link(
                r#"{"external_id": "t", "external_id": "u", "return_url": "x"}"#,
                "application/json",
            ),
            400,
        ),
        (link(r#"{"external_id": "t"}"#, "text/plain"), 415),
        (
            link(
                &format!(r#"{{"external_id": "{}"}}"#, "t".repeat(40_000)),
                "application/json",
            ),
            413,
        ),
    ];
    for (body, status) in cases {
        let answer = send(
            &app,
            Method::POST,
            "/api/v1/connect-links",
            Some(&key),
            body,
        )
        .await;
        answer.json_error(status);
    }
    // The pages keep their own shape.
    let answer = send(&app, Method::GET, "/nothing-here", None, None).await;
    assert_eq!(answer.status, 404);
    let content_type = answer.headers.get("content-type");
    assert!(content_type.is_none_or(|v| v != "application/json"));
    app.stop().await;
}

#[tokio::test]
async fn the_rate_limit_answers_the_json_error_with_retry_after() {
    let options = Options {
        rate_limit: Some("1/m"),
        ..Options::default()
    };
    let app = TestApp::spawn_with(&Backend::Sqlite, options).await;
    let key = app.api_key().await;
    let first = send(&app, Method::GET, "/api/v1/connections", Some(&key), None).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let second = send(&app, Method::GET, "/api/v1/connections", Some(&key), None).await;
    assert_eq!(second.json_error(429), "rate_limited");
    assert!(second.headers.contains_key("retry-after"));
    app.stop().await;
}

/// The schemathesis CLI, in the venv `.ci/run` makes
/// (`python3 -m venv /opt/schemathesis && /opt/schemathesis/bin/pip install 'schemathesis>=4,<5'`).
const SCHEMATHESIS: &str = "/opt/schemathesis/bin/st";

/// Whole-run bound, above schemathesis's own `--max-time`.
const SCHEMATHESIS_LIMIT: Duration = Duration::from_secs(150);

/// schemathesis generates requests from the served document, valid and invalid, and runs
/// every check it has (status codes, content types, headers, schemas, negative data
/// rejected, positive data accepted, other methods refused with `Allow`, auth not ignored).
#[tokio::test]
#[cfg_attr(
    amoauth_lacks_schemathesis,
    ignore = "install schemathesis as .ci/run does"
)]
async fn schemathesis_finds_no_failure() {
    require_programs(&[SCHEMATHESIS], "see .ci/run");
    let port = free_port();
    let redirect_uri = format!("http://127.0.0.1:{port}/amocrm/callback");
    let (_sandbox, sandbox_origin) = spawn_sandbox(&redirect_uri).await;
    let dir = tempfile::tempdir().unwrap();
    let database_url = format!("sqlite://{}", dir.path().join("amoauth.db").display());
    let server = ServeProcess::start(
        port,
        &redirect_uri,
        &sandbox_origin,
        &database_url,
        &[("AMOAUTH_RETURN_ORIGINS", RETURN_ORIGIN)],
    )
    .await;
    let client = http_client();
    let install = client
        .get(format!("{}/amocrm/install", server.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(install.status(), 303);
    let callback = consent(&client, &sandbox_origin, &location(&install), "allow").await;
    assert_eq!(open_callback(&client, &callback).await.0, 200);
    let created = amoauth_command(dir.path())
        .env("DATABASE_URL", &database_url)
        .args(["api-key", "create", "schemathesis"])
        .output()
        .unwrap();
    assert!(created.status.success(), "{created:?}");
    let key = String::from_utf8(created.stdout).unwrap().trim().to_owned();

    // The connected account's id, so the token operation reaches its 200 and not only 404s.
    std::fs::write(
        dir.path().join("schemathesis.toml"),
        format!(
            "[[operations]]\ninclude-name = \"GET /api/v1/connections/{{account}}/token\"\nparameters = {{ account = \"{ACCOUNT_ID}\" }}\n"
        ),
    )
    .unwrap();
    let mut command = tokio::process::Command::new(SCHEMATHESIS);
    command
        .arg("run")
        .arg(format!("{}/api/v1/openapi.json", server.base))
        .args(["--checks", "all"])
        .args(["--max-examples", "40", "--max-time", "90"])
        .args(["--seed", "12"])
        // The gateway's answers are amoCRM's (any status, any content type), so fuzzing it
        // would test the sandbox, not amoauth's contract, and its pace of 7 calls a second
        // would eat the time budget; tests/it/gateway.rs covers it.
        .args(["--exclude-path-regex", "/proxy/"])
        // One worker: Hypothesis's source inspection is not thread-safe on Python 3.11.
        .args(["--workers", "1"])
        .args(["--request-timeout", "10"])
        .arg("--header")
        .arg(format!("Authorization: Bearer {key}"))
        .env("NO_COLOR", "1")
        // It reads schemathesis.toml from, and keeps Hypothesis's database in, this directory.
        .current_dir(dir.path())
        .kill_on_drop(true);
    let output = tokio::time::timeout(SCHEMATHESIS_LIMIT, command.output())
        .await
        .unwrap_or_else(|_| panic!("schemathesis ran over {SCHEMATHESIS_LIMIT:?}"))
        .unwrap();
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        let log = server.stop();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "schemathesis found failures ({}):\n{report}\nthe end of amoauth's log:\n{}",
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let summary: Vec<&str> = report.lines().rev().take(12).collect();
    eprintln!(
        "schemathesis: {}",
        summary.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}
