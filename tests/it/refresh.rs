//! Tokens that never die: the token API, refresh exactly once across processes, the grace
//! rule, needs_reauth, keep-alive, subdomain renames and the uninstall webhook.

use std::time::Duration;

use amoauth::sandbox::{Fault, uninstall_signature};
use chrono::Utc;

use crate::support::*;

const TOKEN_PATH: &str = "/api/v1/connections/31337001/token";

fn hours_ago(hours: i64) -> chrono::NaiveDateTime {
    Utc::now().naive_utc() - chrono::Duration::hours(hours)
}

/// The access token the sandbox issued last (it issues an access token, then its refresh token).
fn newest_issued(app_sandbox: &amoauth::sandbox::Sandbox) -> (String, String) {
    let issued = app_sandbox.issued_secrets();
    (
        issued[issued.len() - 2].clone(),
        issued[issued.len() - 1].clone(),
    )
}

async fn token_api_needs_an_active_key_and_never_returns_a_refresh_token(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.connect().await;
    let key = app.api_key().await;

    let (status, body) = app.api(TOKEN_PATH, &key).await;

    assert_eq!(status, 200, "{body}");
    let (access, refresh) = newest_issued(&app.sandbox);
    assert_eq!(body["access_token"], access.as_str());
    assert_eq!(body["account_id"], ACCOUNT_ID);
    assert_eq!(body["domain"], ACCOUNT_HOST);
    assert!(
        !body.to_string().contains(&refresh),
        "never a refresh token"
    );
    assert_eq!(
        app.api("/api/v1/connections/demo/token", &key).await.0,
        200,
        "by subdomain too"
    );
    let (status, list) = app.api("/api/v1/connections", &key).await;
    assert_eq!(status, 200);
    assert_eq!(list[0]["status"], "active");
    assert!(!list.to_string().contains(&access) && !list.to_string().contains(&refresh));
    assert_eq!(app.api("/api/v1/connections/999/token", &key).await.0, 404);
    assert_eq!(
        app.api("/api/v1/connections/nobody/token", &key).await.0,
        404
    );
    let no_key = app
        .client
        .get(format!("{}{TOKEN_PATH}", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 401);
    let (id, _) = key.strip_prefix("ak_").unwrap().split_once('_').unwrap();
    for wrong in [
        "wrong",
        "ak_0123456789abcdef_00",
        &format!("ak_{id}_{}", "0".repeat(64)),
        ADMIN_TOKEN,
    ] {
        assert_eq!(app.api(TOKEN_PATH, wrong).await.0, 401, "{wrong}");
    }

    // Revoked with the CLI: refused at once.
    let dir = tempfile::tempdir().unwrap();
    let name: String = app.db().string("SELECT name FROM amoauth_api_keys").await;
    let revoked = amoauth_command(dir.path())
        .env("DATABASE_URL", &app.database_url)
        .args(["api-key", "revoke", &name])
        .output()
        .unwrap();
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    assert_eq!(app.api(TOKEN_PATH, &key).await.0, 401);
    app.stop().await;
}

async fn expired_token_is_refreshed_before_it_is_handed_out(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.connect().await;
    let key = app.api_key().await;
    let (old_access, _) = newest_issued(&app.sandbox);
    app.db().set_token_time("expires_at", hours_ago(1)).await;

    let (status, body) = app.api(TOKEN_PATH, &key).await;

    assert_eq!(status, 200, "{body}");
    let (new_access, _) = newest_issued(&app.sandbox);
    assert_ne!(new_access, old_access);
    assert_eq!(body["access_token"], new_access.as_str());
    assert_eq!(app.sandbox.stats().successful_refreshes, 1);
    assert_eq!(app.count("SELECT version FROM amocrm_tokens").await, 2);
    // The next call is served from the stored, fresh pair.
    assert_eq!(
        app.api(TOKEN_PATH, &key).await.1["access_token"],
        new_access.as_str()
    );
    assert_eq!(app.sandbox.stats().refreshes, 1);
    let reasons = app
        .db()
        .strings("SELECT outcome FROM amocrm_oauth_attempts WHERE kind = 'refresh'")
        .await;
    assert_eq!(reasons, [Some("success".to_owned())]);
    app.stop().await;
}

/// The classic failure: several processes refresh one rotating token at once.
async fn three_processes_and_300_callers_refresh_exactly_once(backend: Backend) {
    let database = backend.fresh_database().await;
    let ports = [free_port(), free_port(), free_port()];
    let redirect_uri = format!("http://127.0.0.1:{}/amocrm/callback", ports[0]);
    let (sandbox, sandbox_origin) = spawn_sandbox(&redirect_uri).await;
    let env = [("AMOAUTH_ENCRYPTION_KEY", ENCRYPTION_KEY)];
    let mut processes = Vec::new();
    for port in ports {
        processes.push(
            ServeProcess::start(port, &redirect_uri, &sandbox_origin, &database.url, &env).await,
        );
    }
    let client = http_client();
    let install = client
        .get(format!("{}/amocrm/install", processes[1].base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let callback = consent(&client, &sandbox_origin, &location(&install), "allow").await;
    assert_eq!(open_callback(&client, &callback).await.0, 200);
    let dir = tempfile::tempdir().unwrap();
    let created = amoauth_command(dir.path())
        .env("DATABASE_URL", &database.url)
        .args(["api-key", "create", "crm-sync"])
        .output()
        .unwrap();
    assert!(created.status.success());
    let key = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    database.db.set_token_time("expires_at", hours_ago(2)).await;

    let mut calls = tokio::task::JoinSet::new();
    for i in 0..300 {
        let url = format!("{}{TOKEN_PATH}", processes[i % 3].base);
        let (client, key) = (client.clone(), key.clone());
        calls.spawn(async move { api_get(&client, &url, &key).await });
    }
    let answers = calls.join_all().await;

    let stats = sandbox.stats();
    assert_eq!(stats.refreshes, 1, "the sandbox saw exactly one refresh");
    let (new_access, new_refresh) = newest_issued(&sandbox);
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(
            body["access_token"],
            new_access.as_str(),
            "every caller gets the new token"
        );
    }
    assert_eq!(
        database.db.stored_refresh_token().await,
        new_refresh,
        "the newest refresh token is stored"
    );
    assert_eq!(
        database.db.string("SELECT status FROM amocrm_tokens").await,
        "active"
    );
    for process in processes {
        process.stop();
    }
    database.drop_database().await;
}

/// A process dies holding the lease; another finishes the refresh once the lease expires.
async fn a_refresh_killed_mid_flight_is_completed_by_another_process(backend: Backend) {
    let database = backend.fresh_database().await;
    let ports = [free_port(), free_port()];
    let redirect_uri = format!("http://127.0.0.1:{}/amocrm/callback", ports[0]);
    let (sandbox, sandbox_origin) = spawn_sandbox(&redirect_uri).await;
    // 1 s amoCRM timeout: the lease lasts 4 s.
    let env = [
        ("AMOAUTH_ENCRYPTION_KEY", ENCRYPTION_KEY),
        ("AMOAUTH_AMOCRM_TIMEOUT", "1s"),
    ];
    let a = ServeProcess::start(
        ports[0],
        &redirect_uri,
        &sandbox_origin,
        &database.url,
        &env,
    )
    .await;
    let b = ServeProcess::start(
        ports[1],
        &redirect_uri,
        &sandbox_origin,
        &database.url,
        &env,
    )
    .await;
    let client = http_client();
    let install = client
        .get(format!("{}/amocrm/install", a.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let callback = consent(&client, &sandbox_origin, &location(&install), "allow").await;
    assert_eq!(open_callback(&client, &callback).await.0, 200);
    let dir = tempfile::tempdir().unwrap();
    let created = amoauth_command(dir.path())
        .env("DATABASE_URL", &database.url)
        .args(["api-key", "create", "svc"])
        .output()
        .unwrap();
    let key = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    database.db.set_token_time("expires_at", hours_ago(2)).await;
    sandbox.set_token_fault(Some(Fault::Delay(Duration::from_secs(3))));
    let stuck = tokio::spawn({
        let (client, url, key) = (
            client.clone(),
            format!("{}{TOKEN_PATH}", a.base),
            key.clone(),
        );
        async move { client.get(url).bearer_auth(key).send().await }
    });
    for _ in 0..100 {
        if sandbox.stats().refreshes == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sandbox.stats().refreshes, 1, "process A is refreshing");
    assert!(
        database
            .db
            .count("SELECT COUNT(*) FROM amocrm_tokens WHERE lease_owner IS NOT NULL")
            .await
            == 1
    );

    a.kill(); // holding the lease
    sandbox.set_token_fault(None);
    assert!(
        stuck.await.unwrap().is_err(),
        "A's caller lost its connection"
    );
    let (status, body) = api_get(&client, &format!("{}{TOKEN_PATH}", b.base), &key).await;

    assert_eq!(status, 200, "{body}");
    let (new_access, new_refresh) = newest_issued(&sandbox);
    assert_eq!(body["access_token"], new_access.as_str());
    assert_eq!(
        database.db.string("SELECT status FROM amocrm_tokens").await,
        "active"
    );
    assert_eq!(database.db.stored_refresh_token().await, new_refresh);
    b.stop();
    database.drop_database().await;
}

/// amoCRM issued a pair but the reply never arrived; the same refresh token still works.
async fn a_lost_refresh_reply_is_recovered_through_the_grace_rule(backend: Backend) {
    let app = TestApp::spawn_with(
        &backend,
        Options {
            amocrm_timeout: Some("500ms"),
            ..Options::default()
        },
    )
    .await;
    app.connect().await;
    let key = app.api_key().await;
    app.db().set_token_time("expires_at", hours_ago(1)).await;
    app.sandbox.set_token_fault(Some(Fault::LoseReply));

    let (status, body) = app.api(TOKEN_PATH, &key).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"], "refresh_failed");
    assert_eq!(
        app.sandbox.stats().successful_refreshes,
        1,
        "amoCRM issued a pair we never saw"
    );
    app.sandbox.set_token_fault(None);
    // The failure's backoff is over.
    app.db()
        .execute("UPDATE amocrm_tokens SET next_refresh_at = NULL")
        .await;

    let (status, body) = app.api(TOKEN_PATH, &key).await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(body["access_token"], newest_issued(&app.sandbox).0.as_str());
    assert_eq!(
        app.db().string("SELECT status FROM amocrm_tokens").await,
        "active"
    );
    let outcomes = app
        .db()
        .strings("SELECT reason FROM amocrm_oauth_attempts WHERE kind = 'refresh' ORDER BY id")
        .await;
    assert_eq!(outcomes, [Some("amocrm_timeout".to_owned()), None]);
    app.stop().await;
}

async fn a_revoked_refresh_token_marks_needs_reauth_and_keeps_the_row(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.connect().await;
    let key = app.api_key().await;
    app.sandbox.revoke_tokens(ACCOUNT_ID);
    app.db().set_token_time("expires_at", hours_ago(1)).await;

    let (status, body) = app.api(TOKEN_PATH, &key).await;

    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "needs_reauth");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("Token has been revoked"),
        "{body}"
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM amocrm_tokens").await,
        1,
        "the row stays"
    );
    assert_eq!(
        app.db().string("SELECT status FROM amocrm_tokens").await,
        "needs_reauth"
    );
    let refreshes = app.sandbox.stats().refreshes;
    assert_eq!(app.api(TOKEN_PATH, &key).await.0, 409);
    assert_eq!(
        app.sandbox.stats().refreshes,
        refreshes,
        "no retry against a revoked token"
    );
    let dir = tempfile::tempdir().unwrap();
    let key_env = if backend.is_server() {
        ENCRYPTION_KEY
    } else {
        ""
    };
    let tokens = amoauth_command(dir.path())
        .env("DATABASE_URL", &app.database_url)
        .env("AMOAUTH_ENCRYPTION_KEY", key_env)
        .arg("tokens")
        .output()
        .unwrap();
    let listing = String::from_utf8(tokens.stdout).unwrap();
    assert!(
        listing.contains("needs_reauth") && listing.contains("Token has been revoked"),
        "{listing}"
    );
    // Connecting again brings the connection back.
    app.connect().await;
    assert_eq!(app.api(TOKEN_PATH, &key).await.0, 200);
    app.stop().await;
}

async fn the_worker_refreshes_expiring_and_idle_tokens_without_any_call(backend: Backend) {
    let app = TestApp::spawn_with(
        &backend,
        Options {
            refresh_interval: Some("200ms"),
            ..Options::default()
        },
    )
    .await;
    app.connect().await;
    // Idle: the pair is 31 days old but the access token is still valid for hours.
    app.db()
        .set_token_time("issued_at", hours_ago(31 * 24))
        .await;

    // The sandbox counts a refresh before amoauth has stored its answer, so wait for the row.
    let stored =
        wait_for(|| async { app.count("SELECT version FROM amocrm_tokens").await == 2 }).await;

    assert!(stored, "the keep-alive refresh ran and was stored");
    assert_eq!(app.sandbox.stats().successful_refreshes, 1);
    let issued_at = app
        .db()
        .timestamp("SELECT issued_at FROM amocrm_tokens")
        .await;
    assert!(issued_at > hours_ago(1), "the pair is new");
    // Expiring within the 1 h margin.
    app.db()
        .set_token_time(
            "expires_at",
            Utc::now().naive_utc() + chrono::Duration::minutes(30),
        )
        .await;
    assert!(wait_for(|| async { app.count("SELECT version FROM amocrm_tokens").await == 3 }).await);
    assert_eq!(app.sandbox.stats().successful_refreshes, 2);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        app.sandbox.stats().refreshes,
        2,
        "fresh tokens are left alone"
    );
    app.stop().await;
}

async fn wait_for<F: Future<Output = bool>>(check: impl Fn() -> F) -> bool {
    for _ in 0..100 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn a_renamed_account_is_found_at_its_new_host(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.connect().await;
    let key = app.api_key().await;
    app.sandbox.rename_account(ACCOUNT_ID, "renamed");
    app.db().set_token_time("expires_at", hours_ago(1)).await;

    let (status, body) = app.api(TOKEN_PATH, &key).await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(body["domain"], "renamed.amocrm.ru");
    assert_eq!(
        app.db().string("SELECT domain FROM amocrm_tokens").await,
        "renamed.amocrm.ru"
    );
    assert_eq!(
        app.db().string("SELECT subdomain FROM amocrm_tokens").await,
        "renamed"
    );
    let stats = app.sandbox.stats();
    assert_eq!(stats.subdomain_lookups, 1);
    assert_eq!(stats.successful_refreshes, 1);
    assert_eq!(stats.token_hosts.last().unwrap(), "renamed.amocrm.ru");
    app.stop().await;
}

async fn the_uninstall_webhook_wipes_tokens_once_and_refuses_forgeries(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.connect().await;
    let key = app.api_key().await;
    let url = format!("{}/amocrm/webhook/uninstall", app.base);
    let good = uninstall_signature(CLIENT_ID, CLIENT_SECRET, ACCOUNT_ID);
    let forged = uninstall_signature(CLIENT_ID, "not-the-secret", ACCOUNT_ID);
    let other_account = uninstall_signature(CLIENT_ID, CLIENT_SECRET, ACCOUNT_ID + 1);
    for (query, expected) in [
        (
            format!("client_uuid={CLIENT_ID}&account_id={ACCOUNT_ID}&signature={forged}"),
            401,
        ),
        (
            format!("client_uuid={CLIENT_ID}&account_id={ACCOUNT_ID}&signature={other_account}"),
            401,
        ),
        (
            format!(
                "client_uuid={CLIENT_ID}&account_id={ACCOUNT_ID}&signature={}",
                good.to_uppercase()
            ),
            401,
        ),
        (
            format!("client_uuid=someone-else&account_id={ACCOUNT_ID}&signature={good}"),
            403,
        ),
        (
            format!("client_uuid={CLIENT_ID}&account_id={ACCOUNT_ID}"),
            400,
        ),
        (format!("account_id={ACCOUNT_ID}&signature={good}"), 400),
        (format!("client_uuid={CLIENT_ID}&signature={good}"), 400),
        (
            format!("client_uuid={CLIENT_ID}&account_id=abc&signature={good}"),
            400,
        ),
        (
            format!(
                "client_uuid={CLIENT_ID}&account_id={ACCOUNT_ID}&account_id=1&signature={good}"
            ),
            400,
        ),
    ] {
        let (status, _) = app.get(&format!("{url}?{query}")).await;
        assert_eq!(status, expected, "{query}");
    }
    assert_eq!(
        app.db().string("SELECT status FROM amocrm_tokens").await,
        "active",
        "forgeries change nothing"
    );
    assert_eq!(app.count("SELECT version FROM amocrm_tokens").await, 1);

    let status = app
        .sandbox
        .fire_uninstall_webhook(&url, ACCOUNT_ID)
        .await
        .unwrap();

    assert_eq!(status, 200);
    assert_eq!(
        app.db().string("SELECT status FROM amocrm_tokens").await,
        "disconnected"
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM amocrm_tokens WHERE access_token IS NULL AND refresh_token IS NULL").await, 1);
    assert_eq!(app.count("SELECT version FROM amocrm_tokens").await, 2);
    assert_eq!(
        app.sandbox
            .fire_uninstall_webhook(&url, ACCOUNT_ID)
            .await
            .unwrap(),
        200,
        "a repeat is fine"
    );
    assert_eq!(
        app.count("SELECT version FROM amocrm_tokens").await,
        2,
        "and changes nothing"
    );
    let (status, body) = app.api(TOKEN_PATH, &key).await;
    assert_eq!(status, 409);
    assert_eq!(body["error"], "disconnected");
    let audit = app
        .db()
        .strings("SELECT reason FROM amocrm_oauth_attempts WHERE kind = 'webhook' ORDER BY id")
        .await;
    assert_eq!(audit.len(), 11);
    assert_eq!(audit[9].as_deref(), Some("disconnected"));
    assert_eq!(audit[0].as_deref(), Some("bad_signature"));
    app.stop().await;
}

/// `amoauth refresh ARGS` as a process against the app's database and sandbox; its stdout.
async fn run_refresh(app: &TestApp, key_env: &str, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut command = amoauth_command(dir.path());
    command
        .env("DATABASE_URL", &app.database_url)
        .env("AMOAUTH_ENCRYPTION_KEY", key_env)
        .env("AMOCRM_CLIENT_ID", CLIENT_ID)
        .env("AMOCRM_CLIENT_SECRET", CLIENT_SECRET)
        .env(
            "AMOCRM_REDIRECT_URI",
            format!("{}/amocrm/callback", app.base),
        )
        .env("AMOAUTH_AMOCRM_URL", &app.sandbox_origin)
        .arg("refresh")
        .args(args);
    // Awaited, not blocking: the sandbox it talks to runs on this test's runtime.
    let output = tokio::process::Command::from(command)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

async fn the_refresh_command_refreshes_one_account_now(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.connect().await;
    let key_env = if backend.is_server() {
        ENCRYPTION_KEY
    } else {
        ""
    };

    let stdout = run_refresh(&app, key_env, &["demo"]).await;

    assert!(
        stdout.starts_with("refreshed demo.amocrm.ru (account 31337001)"),
        "{stdout}"
    );
    assert_eq!(app.sandbox.stats().successful_refreshes, 1);
    assert_eq!(app.count("SELECT version FROM amocrm_tokens").await, 2);

    // Without an account: every connection that is due, and only those.
    let stdout = run_refresh(&app, key_env, &[]).await;
    assert_eq!(stdout.trim(), "refreshed 0 connections, 0 failed");
    let soon = chrono::Utc::now().naive_utc() + chrono::Duration::minutes(5);
    app.db().set_token_time("expires_at", soon).await;
    let stdout = run_refresh(&app, key_env, &[]).await;
    assert_eq!(stdout.trim(), "refreshed 1 connections, 0 failed");
    assert_eq!(app.sandbox.stats().successful_refreshes, 2);
    assert_eq!(app.count("SELECT version FROM amocrm_tokens").await, 3);
    app.stop().await;
}

on_all_backends!(
    token_api_needs_an_active_key_and_never_returns_a_refresh_token,
    expired_token_is_refreshed_before_it_is_handed_out,
    three_processes_and_300_callers_refresh_exactly_once,
    a_refresh_killed_mid_flight_is_completed_by_another_process,
    a_lost_refresh_reply_is_recovered_through_the_grace_rule,
    a_revoked_refresh_token_marks_needs_reauth_and_keeps_the_row,
    the_worker_refreshes_expiring_and_idle_tokens_without_any_call,
    a_renamed_account_is_found_at_its_new_host,
    the_uninstall_webhook_wipes_tokens_once_and_refuses_forgeries,
    the_refresh_command_refreshes_one_account_now,
);
