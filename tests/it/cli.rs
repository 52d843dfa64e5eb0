//! The command line, run as a real process.

use crate::support::*;

fn run(command: &mut std::process::Command) -> (bool, String, String) {
    let output = command.output().unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

async fn cleanup_removes_exactly_the_states_expired_past_the_grace_period(backend: Backend) {
    let database = backend.fresh_database().await;
    let dir = database.dir.path().to_owned();
    let url = database.url.clone();
    let (ok, _, stderr) = run(amoauth_command(&dir)
        .env("DATABASE_URL", &url)
        .arg("migrate"));
    assert!(ok, "{stderr}");
    let now = chrono::Utc::now().naive_utc();
    for (hash, expires_in) in [
        ("still-valid", chrono::Duration::minutes(10)),
        ("expired-1h", chrono::Duration::hours(-1)),
        ("expired-25h", chrono::Duration::hours(-25)),
        ("expired-3d", chrono::Duration::days(-3)),
        ("expired-30d", chrono::Duration::days(-30)),
    ] {
        let expires_at = now + expires_in;
        database
            .db
            .insert_state(hash, expires_at - chrono::Duration::minutes(15), expires_at)
            .await;
    }

    let (ok, stdout, _) = run(amoauth_command(&dir)
        .env("DATABASE_URL", &url)
        .args(["cleanup", "--dry-run"]));
    assert!(ok);
    assert_eq!(
        stdout.trim(),
        "would remove 3 expired states (dry run; nothing was deleted)"
    );
    assert_eq!(
        database
            .db
            .count("SELECT COUNT(*) FROM amocrm_oauth_states")
            .await,
        5
    );

    let (ok, stdout, stderr) = run(amoauth_command(&dir)
        .env("DATABASE_URL", &url)
        .arg("cleanup"));

    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "removed 3 expired states");
    let left = database
        .db
        .strings("SELECT state_hash FROM amocrm_oauth_states ORDER BY state_hash")
        .await;
    assert_eq!(
        left,
        [Some("expired-1h".into()), Some("still-valid".into())]
    );

    let (ok, stdout, _) = run(amoauth_command(&dir)
        .env("DATABASE_URL", &url)
        .args(["cleanup", "--grace", "0s"]));
    assert!(ok);
    assert_eq!(stdout.trim(), "removed 1 expired states");

    let (ok, stdout, _) = run(amoauth_command(&dir)
        .env("DATABASE_URL", &url)
        .arg("states"));
    assert!(ok);
    assert!(stdout.starts_with("1 active states"), "{stdout}");
    assert!(
        !stdout.contains("still-valid"),
        "the state hash is never printed: {stdout}"
    );
    database.drop_database().await;
}

#[test]
fn configuration_errors_are_one_line_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("a.db").display());

    let (ok, _, stderr) = run(amoauth_command(dir.path())
        .env("DATABASE_URL", &url)
        .arg("serve"));

    assert!(!ok);
    assert_eq!(stderr, "error: AMOCRM_CLIENT_ID: is required but not set\n");

    let (ok, _, stderr) = run(amoauth_command(dir.path())
        .env("DATABASE_URL", &url)
        .env("AMOCRM_CLIENT_ID", "id")
        .env("AMOCRM_CLIENT_SECRET", "shh-secret-value")
        .env("AMOCRM_REDIRECT_URI", "https://example.ru/amocrm/callback")
        .env("AMOAUTH_STATE_TTL", "soon")
        .arg("serve"));
    assert!(!ok);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: AMOAUTH_STATE_TTL: "), "{stderr}");

    let (ok, _, stderr) = run(amoauth_command(dir.path())
        .env("DATABASE_URL", "mongodb://user:pw@host/db")
        .arg("migrate"));
    assert!(!ok);
    assert!(stderr.starts_with("error: DATABASE_URL: "), "{stderr}");
    assert!(
        !stderr.contains("pw@"),
        "the password is never shown: {stderr}"
    );
}

#[test]
fn a_flag_overrides_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let from_env = format!("sqlite://{}", dir.path().join("env.db").display());
    let from_flag = format!("sqlite://{}", dir.path().join("flag.db").display());

    let (ok, stdout, stderr) = run(amoauth_command(dir.path())
        .env("DATABASE_URL", &from_env)
        .args(["migrate", "--database-url", &from_flag]));

    assert!(ok, "{stderr}");
    assert!(stdout.contains("flag.db"), "{stdout}");
    assert!(dir.path().join("flag.db").exists());
    assert!(!dir.path().join("env.db").exists());
}

async fn tokens_lists_connections_with_a_masked_preview(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let callback = app.allowed_callback_url().await;
    assert_eq!(app.open_callback(&callback).await.0, 200);
    let dir = tempfile::tempdir().unwrap();

    let key = if backend.is_server() {
        ENCRYPTION_KEY
    } else {
        ""
    };
    let (ok, stdout, stderr) = run(amoauth_command(dir.path())
        .env("DATABASE_URL", &app.database_url)
        .env("AMOAUTH_ENCRYPTION_KEY", key)
        .arg("tokens"));

    assert!(ok, "{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.contains(ACCOUNT_HOST))
        .expect("a row for the account");
    assert!(
        line.contains("31337001") && line.contains("active") && line.contains('…'),
        "{line}"
    );
    for secret in app.sandbox.issued_secrets() {
        assert!(!stdout.contains(&secret), "a whole token was printed");
    }
    app.stop().await;
}

on_all_backends!(
    cleanup_removes_exactly_the_states_expired_past_the_grace_period,
    tokens_lists_connections_with_a_masked_preview,
);

#[test]
fn a_malformed_env_file_is_reported_without_its_values() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        "AMOCRM_CLIENT_SECRET='topsecret-value\n",
    )
    .unwrap();

    let (ok, _, stderr) = run(amoauth_command(dir.path()).arg("migrate"));

    assert!(!ok);
    assert_eq!(
        stderr,
        "error: .env: the line of `AMOCRM_CLIENT_SECRET` cannot be parsed (check its quotes)\n"
    );
    assert!(!stderr.contains("topsecret"));
}

/// `serve` purges expired states by itself, keeping those within the 1-day grace period.
#[tokio::test]
async fn serve_cleans_up_expired_states_periodically() {
    let options = Options {
        cleanup_interval: Some("200ms"),
        ..Options::default()
    };
    let app = TestApp::spawn_with(&Backend::Sqlite, options).await;
    let now = chrono::Utc::now().naive_utc();
    for (hash, expired_hours_ago) in [("two-days-old", 48), ("an-hour-old", 1)] {
        let expires_at = now - chrono::Duration::hours(expired_hours_ago);
        app.db()
            .insert_state(hash, expires_at - chrono::Duration::minutes(15), expires_at)
            .await;
    }

    let mut left = Vec::new();
    for _ in 0..50 {
        left = app
            .db()
            .strings("SELECT state_hash FROM amocrm_oauth_states")
            .await;
        if left.len() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    assert_eq!(left, [Some("an-hour-old".to_owned())]);
    app.stop().await;
}

/// Without AMOAUTH_ADMIN_TOKEN, `serve` makes one and prints a login URL that works.
#[tokio::test]
async fn serve_without_an_admin_token_prints_a_working_login_url() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = format!("sqlite://{}", dir.path().join("amoauth.db").display());
    let port = free_port();
    let redirect_uri = format!("http://127.0.0.1:{port}/amocrm/callback");
    let (_sandbox, origin) = spawn_sandbox(&redirect_uri).await;
    let process = ServeProcess::start(
        port,
        &redirect_uri,
        &origin,
        &database_url,
        &[("AMOAUTH_ADMIN_TOKEN", "")],
    )
    .await;
    let output = process.output_with("Log in at: ").await;
    let url = output
        .lines()
        .find_map(|line| line.strip_prefix("Log in at: "))
        .unwrap_or_else(|| panic!("no login URL printed:\n{output}"))
        .to_owned();
    let token = query_param(&url, "token").unwrap();
    assert_eq!(token.len(), 64, "a 256-bit token");

    // The printed URL points at the redirect URI's origin, which is this server.
    let login = http_client().get(&url).send().await.unwrap();

    assert_eq!(login.status(), 303);
    assert!(
        login.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .starts_with("amoauth_session=")
    );
    let output = process.stop();
    assert_eq!(
        output.matches(token.as_str()).count(),
        1,
        "printed once, in no log line"
    );
}
