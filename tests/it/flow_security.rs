//! Issue 13, items 3, 4, 11 and 12: replayed uninstall webhooks, referers that are not the
//! account, reconnects and tenants, absurd durations.

use std::time::{Duration, Instant};

use amoauth::sandbox::{Fault, uninstall_signature};

use crate::support::*;

const RETURN_ORIGIN: &str = "https://app.example.com";

fn webhook_url(app: &TestApp) -> String {
    format!("{}/amocrm/webhook/uninstall", app.base)
}

/// The webhook exactly as amoCRM signed it, e.g. copied from an access log.
fn signed_webhook(app: &TestApp) -> String {
    let signature = uninstall_signature(CLIENT_ID, CLIENT_SECRET, ACCOUNT_ID);
    format!(
        "{}?client_uuid={CLIENT_ID}&account_id={ACCOUNT_ID}&signature={signature}",
        webhook_url(app)
    )
}

async fn status_of_connection(app: &TestApp) -> String {
    app.db()
        .string("SELECT status FROM amocrm_tokens WHERE account_id = 31337001")
        .await
}

async fn webhook_reasons(app: &TestApp) -> Vec<String> {
    app.db()
        .strings("SELECT reason FROM amocrm_oauth_attempts WHERE kind = 'webhook' ORDER BY id")
        .await
        .into_iter()
        .map(|r| r.unwrap_or_default())
        .collect()
}

async fn a_replayed_uninstall_webhook_changes_nothing_after_a_reconnect(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.connect().await;
    let genuine = app
        .sandbox
        .fire_uninstall_webhook(&webhook_url(&app), ACCOUNT_ID)
        .await
        .unwrap();
    assert_eq!(genuine, 200);
    assert_eq!(status_of_connection(&app).await, "disconnected");

    app.connect().await;
    let (status, body) = app.get(&signed_webhook(&app)).await;

    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("stale"), "{body}");
    assert_eq!(status_of_connection(&app).await, "active");
    let key = app.api_key().await;
    let (status, token) = app
        .api(&format!("/api/v1/connections/{ACCOUNT_ID}/token"), &key)
        .await;
    assert_eq!(status, 200, "{token}");
    assert_eq!(
        webhook_reasons(&app).await,
        ["disconnected", "stale_webhook"]
    );
    app.stop().await;
}

async fn an_uninstall_amocrm_cannot_confirm_wipes_nothing_and_asks_for_a_retry(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.connect().await;
    app.sandbox.set_account_fault(Some(Fault::ServerError));

    let status = app
        .sandbox
        .fire_uninstall_webhook(&webhook_url(&app), ACCOUNT_ID)
        .await
        .unwrap();

    assert_eq!(status, 503, "amoCRM may send it again");
    assert_eq!(status_of_connection(&app).await, "active");
    assert_eq!(webhook_reasons(&app).await, ["amocrm_error"]);

    app.sandbox.set_account_fault(None);
    let (status, _) = app.get(&signed_webhook(&app)).await;
    assert_eq!(status, 200);
    assert_eq!(status_of_connection(&app).await, "disconnected");
    app.stop().await;
}

/// The callback URL amoCRM sent, with another `referer`.
fn with_referer(callback: &str, referer: &str) -> String {
    let mut url = url::Url::parse(callback).unwrap();
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .into_owned()
        .map(|(k, v)| {
            if k == "referer" {
                (k, referer.into())
            } else {
                (k, v)
            }
        })
        .collect();
    url.query_pairs_mut().clear().extend_pairs(pairs);
    url.to_string()
}

async fn referers_that_are_amocrm_sites_not_accounts_get_no_secret(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    for site in [
        "www.amocrm.ru",
        "www.kommo.com",
        "developers.kommo.com",
        "es-developers.kommo.com",
        "api-b.amocrm.ru",
    ] {
        let callback = with_referer(&app.allowed_callback_url().await, site);
        let (status, body) = app.open_callback(&callback).await;
        assert_eq!(status, 400, "{site}: {body}");
        assert!(body.contains("bad_referer"), "{site}: {body}");
    }
    assert_eq!(app.sandbox.stats().code_exchanges, 0, "nothing was posted");
    app.stop().await;
}

async fn a_callback_from_another_account_than_the_install_named_is_refused(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let response = app
        .client
        .get(format!("{}/amocrm/install?subdomain=demo", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303);
    let consent = location(&response);
    let callback = with_referer(&app.consent(&consent, "allow").await, "other.amocrm.ru");

    let (status, body) = app.open_callback(&callback).await;

    assert_eq!(status, 400, "{body}");
    assert!(body.contains("referer_mismatch"), "{body}");
    assert_eq!(app.sandbox.stats().code_exchanges, 0, "nothing was posted");
    assert_eq!(app.callback_reasons().await, ["referer_mismatch"]);

    // The account the install named still connects.
    let response = app
        .client
        .get(format!("{}/amocrm/install?subdomain=demo", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let callback = app.consent(&location(&response), "allow").await;
    let (status, body) = app.open_callback(&callback).await;
    assert_eq!(status, 200, "{body}");
    app.stop().await;
}

async fn widget_install_exchanges_are_paced_per_account(backend: Backend) {
    let options = Options {
        widget_installs: true,
        ..Options::default()
    };
    let app = TestApp::spawn_with(&backend, options).await;
    for n in 0..15 {
        let url = format!(
            "{}/amocrm/callback?code=junk{n}&referer={ACCOUNT_HOST}&from_widget=1",
            app.base
        );
        let (status, _) = app.get(&url).await;
        assert_eq!(status, 200);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let early = app.sandbox.stats().code_exchanges;
    assert!(early <= 8, "{early} exchanges in half a second");
    for _ in 0..100 {
        if app.sandbox.stats().code_exchanges == 15 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.sandbox.stats().code_exchanges, 15, "each is still sent");
    app.stop().await;
}

async fn a_reconnect_resets_the_refresh_bookkeeping(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.connect().await;
    app.db()
        .execute(
            "UPDATE amocrm_tokens SET refresh_failures = 4, last_error = 'timed out', \
             issued_at = '2020-01-01 00:00:00', last_refresh_at = '2020-01-01 00:00:00', \
             next_refresh_at = '2999-01-01 00:00:00'",
        )
        .await;

    app.connect().await;

    assert_eq!(
        app.count(
            "SELECT COUNT(*) FROM amocrm_tokens WHERE refresh_failures = 0 AND last_error IS NULL \
             AND next_refresh_at IS NULL AND last_refresh_at IS NULL"
        )
        .await,
        1
    );
    let issued = app
        .db()
        .timestamp("SELECT issued_at FROM amocrm_tokens")
        .await;
    let age = chrono::Utc::now().naive_utc() - issued;
    assert!(age < chrono::Duration::minutes(1), "issued_at is {issued}");
    app.stop().await;
}

async fn connect_link(app: &TestApp, key: &str, tenant: &str) -> String {
    let response = app
        .client
        .post(format!("{}/api/v1/connect-links", app.base))
        .bearer_auth(key)
        .json(&serde_json::json!({ "external_id": tenant, "return_url": format!("{RETURN_ORIGIN}/done") }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let link: serde_json::Value = response.json().await.unwrap();
    let callback = app.consent(link["url"].as_str().unwrap(), "allow").await;
    location(&app.client.get(&callback).send().await.unwrap())
}

async fn owner(app: &TestApp) -> Option<String> {
    app.db()
        .strings("SELECT external_id FROM amocrm_tokens")
        .await
        .remove(0)
}

async fn a_connect_link_cannot_take_another_tenants_account(backend: Backend) {
    let options = Options {
        return_origins: Some(RETURN_ORIGIN),
        ..Options::default()
    };
    let app = TestApp::spawn_with(&backend, options).await;
    let key = app.api_key().await;
    let back = connect_link(&app, &key, "tenant-a").await;
    assert_eq!(
        query_param(&back, "amoauth_status").as_deref(),
        Some("connected")
    );
    let version = app.count("SELECT version FROM amocrm_tokens").await;

    let back = connect_link(&app, &key, "tenant-b").await;

    assert_eq!(
        query_param(&back, "amoauth_status").as_deref(),
        Some("error"),
        "{back}"
    );
    assert_eq!(
        query_param(&back, "reason").as_deref(),
        Some("account_taken")
    );
    assert_eq!(owner(&app).await.as_deref(), Some("tenant-a"));
    assert_eq!(
        app.count("SELECT version FROM amocrm_tokens").await,
        version,
        "nothing changed"
    );

    // The admin's own install keeps the owner; the same tenant reconnects.
    app.connect().await;
    assert_eq!(owner(&app).await.as_deref(), Some("tenant-a"));
    let back = connect_link(&app, &key, "tenant-a").await;
    assert_eq!(
        query_param(&back, "amoauth_status").as_deref(),
        Some("connected")
    );

    // Only the admin's Disconnect on the dashboard releases the account.
    let disconnect = app
        .client
        .post(format!("{}/connections/{ACCOUNT_ID}/disconnect", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(disconnect.status(), 303);
    assert_eq!(owner(&app).await, None);
    let back = connect_link(&app, &key, "tenant-b").await;
    assert_eq!(
        query_param(&back, "amoauth_status").as_deref(),
        Some("connected")
    );
    assert_eq!(owner(&app).await.as_deref(), Some("tenant-b"));
    app.stop().await;
}

/// Past any timestamp a database or chrono can hold.
const ABSURD_EXPIRES_IN: u64 = 1_000_000_000_000_000;

async fn an_absurd_expires_in_is_a_bad_response_at_callback_and_refresh(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.sandbox
        .set_token_fault(Some(Fault::ExpiresIn(ABSURD_EXPIRES_IN)));
    let callback = app.allowed_callback_url().await;

    let (status, body) = app.open_callback(&callback).await;

    assert_eq!(status, 502, "{body}");
    assert!(body.contains("amocrm_bad_response"), "{body}");
    assert_eq!(app.count("SELECT COUNT(*) FROM amocrm_tokens").await, 0);

    app.sandbox.set_token_fault(None);
    app.connect().await;
    app.db()
        .set_token_time("expires_at", chrono::Utc::now().naive_utc())
        .await;
    app.sandbox
        .set_token_fault(Some(Fault::ExpiresIn(ABSURD_EXPIRES_IN)));
    let key = app.api_key().await;
    let started = Instant::now();
    let (status, answer) = app
        .api(&format!("/api/v1/connections/{ACCOUNT_ID}/token"), &key)
        .await;

    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered at once"
    );
    assert_eq!(status, 502, "{answer}");
    assert_eq!(
        app.count(
            "SELECT COUNT(*) FROM amocrm_tokens WHERE refresh_failures = 1 \
             AND lease_owner IS NULL AND next_refresh_at IS NOT NULL"
        )
        .await,
        1,
        "a failure with backoff, the lease released"
    );
    assert_eq!(
        app.db()
            .strings("SELECT reason FROM amocrm_oauth_attempts WHERE kind = 'refresh'")
            .await,
        [Some("amocrm_bad_response".to_owned())]
    );
    app.stop().await;
}

on_all_backends!(
    a_replayed_uninstall_webhook_changes_nothing_after_a_reconnect,
    an_uninstall_amocrm_cannot_confirm_wipes_nothing_and_asks_for_a_retry,
    referers_that_are_amocrm_sites_not_accounts_get_no_secret,
    a_callback_from_another_account_than_the_install_named_is_refused,
    widget_install_exchanges_are_paced_per_account,
    a_reconnect_resets_the_refresh_bookkeeping,
    a_connect_link_cannot_take_another_tenants_account,
    an_absurd_expires_in_is_a_bad_response_at_callback_and_refresh,
);

/// `amoauth serve` with the setting; its exit code and output, or None if it kept running.
fn serve_with(variable: &str, value: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("out.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut child = amoauth_command(dir.path())
        .env(
            "DATABASE_URL",
            format!("sqlite://{}", dir.path().join("a.db").display()),
        )
        .env("AMOCRM_CLIENT_ID", CLIENT_ID)
        .env("AMOCRM_CLIENT_SECRET", CLIENT_SECRET)
        .env("AMOCRM_REDIRECT_URI", "https://example.com/amocrm/callback")
        .env("AMOAUTH_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("AMOAUTH_REFRESH_INTERVAL", "100ms")
        .env(variable, value)
        .arg("serve")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (code, std::fs::read_to_string(&log).unwrap())
}

#[test]
fn huge_durations_are_one_line_configuration_errors() {
    for (variable, value) in [
        ("AMOAUTH_AMOCRM_TIMEOUT", "100000000000000d"),
        ("AMOAUTH_KEEPALIVE_AGE", "200000000000d"),
        ("AMOAUTH_REFRESH_MARGIN", "200000000000d"),
        ("AMOAUTH_STATE_TTL", "200000000000d"),
        ("AMOAUTH_CLEANUP_INTERVAL", "3651d"),
    ] {
        let (code, output) = serve_with(variable, value);
        assert!(
            code.is_some_and(|c| c != 0),
            "{variable}={value} should stop serve: {code:?} {output}"
        );
        assert!(!output.contains("panicked"), "{variable}: {output}");
        let lines: Vec<&str> = output.lines().collect();
        assert_eq!(lines.len(), 1, "{variable}: {output}");
        assert!(
            lines[0].contains(variable) && lines[0].contains("3650d"),
            "{output}"
        );
    }
}
