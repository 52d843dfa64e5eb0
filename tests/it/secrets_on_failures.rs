//! The secret checks on the failure paths: every fault the sandbox can inject, at the callback
//! and at refresh (token API and `amoauth refresh`), with text and JSON logs; no secret may
//! reach a page, an API error, the audit trail, the stored raw JSON or last error, an event,
//! a command's output or a log line.

use std::time::Duration;

use amoauth::sandbox::Fault;

use crate::support::*;

const TOKEN_PATH: &str = "/api/v1/connections/31337001/token";

/// Everything a secret must never reach, gathered as text.
#[derive(Default)]
struct Exposed {
    places: Vec<(String, String)>,
}

impl Exposed {
    fn add(&mut self, place: impl Into<String>, text: impl Into<String>) {
        self.places.push((place.into(), text.into()));
    }

    async fn add_column(&mut self, db: &TestDb, sql: &'static str) {
        for value in db.strings(sql).await.into_iter().flatten() {
            self.add(sql, value);
        }
    }
}

async fn secrets_stay_hidden_under_every_fault(backend: Backend) {
    for log_format in ["text", "json"] {
        check_every_fault(&backend, log_format).await;
    }
}

async fn check_every_fault(backend: &Backend, log_format: &str) {
    let port = free_port();
    let redirect_uri = format!("http://127.0.0.1:{port}/amocrm/callback");
    let (sandbox, sandbox_origin) = spawn_sandbox(&redirect_uri).await;
    let database = backend.fresh_database().await;
    let mut env = vec![
        ("AMOAUTH_AMOCRM_TIMEOUT", "500ms"),
        ("AMOAUTH_LOG_FORMAT", log_format),
        ("RUST_LOG", "trace"),
        ("AMOAUTH_REFRESH_INTERVAL", "1h"),
        // Nothing listens there: events stay in the outbox, retried, for the checks.
        ("AMOAUTH_EVENTS_URL", "http://127.0.0.1:9/events"),
        ("AMOAUTH_EVENTS_SECRET", EVENTS_SECRET),
    ];
    if backend.is_server() {
        env.push(("AMOAUTH_ENCRYPTION_KEY", ENCRYPTION_KEY));
    }
    let process =
        ServeProcess::start(port, &redirect_uri, &sandbox_origin, &database.url, &env).await;
    let client = http_client();
    let base = process.base.clone();
    let dir = tempfile::tempdir().unwrap();
    let cli = |args: &[&str]| {
        let output = amoauth_command(dir.path())
            .env("DATABASE_URL", &database.url)
            .env("AMOCRM_CLIENT_ID", CLIENT_ID)
            .env("AMOCRM_CLIENT_SECRET", CLIENT_SECRET)
            .env("AMOCRM_REDIRECT_URI", &redirect_uri)
            .env("AMOAUTH_AMOCRM_URL", &sandbox_origin)
            .envs(env.iter().copied())
            .args(args)
            .output()
            .unwrap();
        (
            output.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        )
    };
    let (created, api_key) = cli(&["api-key", "create", "secrets-test"]);
    assert!(created, "{api_key}");
    let api_key = api_key.lines().next().unwrap().trim().to_owned();
    let mut exposed = Exposed::default();
    let mut states = Vec::new();

    // Install as the admin, Allow in the sandbox: the callback URL amoCRM sends back.
    let allowed_callback = async |states: &mut Vec<String>| {
        let install = client
            .get(format!("{base}/amocrm/install"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let consent_url = location(&install);
        states.push(query_param(&consent_url, "state").unwrap());
        consent(&client, &sandbox_origin, &consent_url, "allow").await
    };
    let mut faults = Fault::every_kind(Duration::from_secs(1));
    // At refresh, amoCRM's refusal of the refresh token takes its own path (needs_reauth).
    faults.push(Fault::Problem {
        status: 401,
        hint: "Token has been revoked".into(),
    });
    for fault in faults {
        // The callback under the fault.
        let callback = allowed_callback(&mut states).await;
        sandbox.set_token_fault(Some(fault.clone()));
        let (status, page) = open_callback(&client, &callback).await;
        assert!(status >= 400, "{fault:?}: {status} {page}");
        exposed.add(format!("callback page under {fault:?}"), page);

        // A clean connection whose access token has expired, outside any backoff.
        sandbox.set_token_fault(None);
        let callback = allowed_callback(&mut states).await;
        let (status, page) = open_callback(&client, &callback).await;
        assert_eq!(status, 200, "{page}");
        let expire = || async {
            database
                .db
                .set_token_time("expires_at", chrono::Utc::now().naive_utc())
                .await;
            database
                .db
                .execute("UPDATE amocrm_tokens SET next_refresh_at = NULL")
                .await;
        };

        // The refresh under the fault: through the token API, then the command.
        expire().await;
        sandbox.set_token_fault(Some(fault.clone()));
        let response = client
            .get(format!("{base}{TOKEN_PATH}"))
            .bearer_auth(&api_key)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert!(!status.is_success(), "{fault:?}: {status} {body}");
        exposed.add(format!("token API under {fault:?}"), body);
        expire().await;
        database
            .db
            .execute("UPDATE amocrm_tokens SET status = 'active'")
            .await;
        let (refreshed, output) = cli(&["refresh", "31337001"]);
        assert!(!refreshed, "{fault:?}: {output}");
        exposed.add(format!("`amoauth refresh` under {fault:?}"), output);
        sandbox.set_token_fault(None);
    }

    let dashboard = client
        .get(format!("{base}/"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    exposed.add("dashboard", dashboard.text().await.unwrap());
    let connections = client
        .get(format!("{base}/api/v1/connections"))
        .bearer_auth(&api_key)
        .send()
        .await
        .unwrap();
    exposed.add("connections API", connections.text().await.unwrap());
    let db = &database.db;
    for column in [
        "SELECT reason FROM amocrm_oauth_attempts",
        "SELECT detail FROM amocrm_oauth_attempts",
        "SELECT user_agent FROM amocrm_oauth_attempts",
        "SELECT raw FROM amocrm_tokens",
        "SELECT last_error FROM amocrm_tokens",
        "SELECT payload FROM amoauth_events",
        "SELECT last_error FROM amoauth_events",
    ] {
        exposed.add_column(db, column).await;
    }
    let (_, listed) = cli(&["tokens"]);
    exposed.add("`amoauth tokens`", listed);
    let (_, events) = cli(&["events"]);
    exposed.add("`amoauth events`", events);
    exposed.add(format!("{log_format} log"), process.stop());

    // The failures really happened, each with its own reason.
    let reasons: Vec<String> = db
        .strings("SELECT reason FROM amocrm_oauth_attempts")
        .await
        .into_iter()
        .flatten()
        .collect();
    for reason in [
        "amocrm_rejected",
        "amocrm_error",
        "amocrm_bad_response",
        "amocrm_timeout",
        "needs_reauth",
    ] {
        assert!(reasons.iter().any(|r| r == reason), "{reason}: {reasons:?}");
    }
    let mut secrets = vec![
        CLIENT_SECRET.to_owned(),
        ADMIN_TOKEN.to_owned(),
        EVENTS_SECRET.to_owned(),
        api_key,
    ];
    if backend.is_server() {
        secrets.push(ENCRYPTION_KEY.to_owned());
    }
    secrets.extend(sandbox.issued_secrets());
    secrets.extend(states);
    assert!(secrets.len() > 30, "{} secrets", secrets.len());
    for (place, text) in &exposed.places {
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{place} ({log_format} logs) shows a secret ({}…)",
                &secret[..6]
            );
        }
    }
    database.drop_database().await;
}

on_all_backends!(secrets_stay_hidden_under_every_fault);
