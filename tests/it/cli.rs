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
        stdout.lines().next().unwrap(),
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
    assert_eq!(stdout.lines().next().unwrap(), "removed 3 expired states");
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
    assert_eq!(stdout.lines().next().unwrap(), "removed 1 expired states");

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

/// A first `serve` with nothing configured names every missing variable at once.
#[test]
fn a_fresh_serve_reports_every_missing_variable_at_once() {
    let dir = tempfile::tempdir().unwrap();

    let (ok, stdout, stderr) = run(amoauth_command(dir.path())
        .env("HOME", dir.path())
        .arg("serve"));

    assert!(!ok);
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        "error: AMOCRM_CLIENT_ID: is required but not set\n\
         error: AMOCRM_CLIENT_SECRET: is required but not set\n\
         error: AMOCRM_REDIRECT_URI: is required but not set\n"
    );
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "nothing is created before the configuration is valid"
    );
}

#[test]
fn configuration_errors_are_one_line_each_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("a.db").display());

    let (ok, _, stderr) = run(amoauth_command(dir.path())
        .env("DATABASE_URL", &url)
        .env("AMOCRM_CLIENT_ID", "id")
        .env("AMOCRM_CLIENT_SECRET", "shh-secret-value")
        .env("AMOCRM_REDIRECT_URI", "example.ru/amocrm/callback")
        .env("AMOAUTH_STATE_TTL", "soon")
        .env("AMOAUTH_LISTEN", "everywhere")
        .arg("serve"));

    assert!(!ok);
    let variables: Vec<&str> = stderr
        .lines()
        .map(|line| {
            let line = line.strip_prefix("error: ").expect(&stderr);
            line.split(':').next().unwrap()
        })
        .collect();
    assert_eq!(
        variables,
        ["AMOCRM_REDIRECT_URI", "AMOAUTH_LISTEN", "AMOAUTH_STATE_TTL"],
        "{stderr}"
    );
    assert!(!stderr.contains("shh-secret-value"));

    let (ok, _, stderr) = run(amoauth_command(dir.path())
        .env("DATABASE_URL", "mongodb://user:pw@host/db")
        .arg("migrate"));
    assert!(!ok);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
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

/// Without AMOAUTH_ADMIN_TOKEN, `serve` makes one and prints a one-time login link that works
/// once and does not carry the token.
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
    let link = query_param(&url, "link").unwrap();
    assert_eq!(link.len(), 64, "a 256-bit link token");
    assert_eq!(query_param(&url, "token"), None, "not the admin token");

    // The printed URL points at the redirect URI's origin, which is this server.
    let login = http_client().get(&url).send().await.unwrap();

    assert_eq!(login.status(), 303);
    assert!(
        login.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .starts_with("amoauth_session=")
    );
    let again = http_client().get(&url).send().await.unwrap();
    assert_eq!(again.status(), 401, "a login link works once");
    let output = process.stop();
    assert_eq!(
        output.matches(link.as_str()).count(),
        1,
        "printed once, in no log line"
    );
}

/// A long-running command (`demo`, `sandbox`) as a real process, stdout and stderr each in a file.
struct LongRunning {
    child: std::process::Child,
    stdout: std::path::PathBuf,
    stderr: std::path::PathBuf,
}

impl LongRunning {
    fn start(command: &mut std::process::Command, dir: &std::path::Path) -> Self {
        let stdout = dir.join("stdout.log");
        let stderr = dir.join("stderr.log");
        let child = command
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// The stdout line that starts with `prefix`, without it, once printed (10 s at most).
    async fn printed(&mut self, prefix: &str) -> String {
        for _ in 0..200 {
            let stdout = std::fs::read_to_string(&self.stdout).unwrap();
            if let Some(rest) = stdout.lines().find_map(|l| l.trim().strip_prefix(prefix)) {
                return rest.to_owned();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("exited with {status}: {}", self.stderr());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!(
            "`{prefix}` was never printed:\n{stdout}\n{}",
            self.stderr(),
            stdout = std::fs::read_to_string(&self.stdout).unwrap()
        );
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap()
    }

    /// Sends SIGTERM to its PID, as an operator or a service manager would; its exit code.
    async fn terminate(&mut self) -> Option<i32> {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("did not stop within 10 s of SIGTERM");
    }
}

impl Drop for LongRunning {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `amoauth demo` as a user runs it: the printed URL logs in, and the whole connect flow
/// works against its own sandbox; `tokens` then lists the account.
#[tokio::test]
async fn demo_prints_a_url_that_connects_the_demo_account() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut demo = LongRunning::start(
        amoauth_command(dir.path()).env("HOME", dir.path()).args([
            "demo",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ]),
        dir.path(),
    );
    let login_url = demo.printed("1. Open ").await;
    let base = format!("http://127.0.0.1:{port}");
    assert!(
        login_url.starts_with(&format!("{base}/login?link=")),
        "{login_url}"
    );
    let client = http_client();

    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let login = client.get(&login_url).send().await.unwrap();
    assert_eq!(login.status(), 303);
    let cookie = login.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let install = client
        .get(format!("{base}/amocrm/install"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(install.status(), 303);
    let consent_url = location(&install);
    let sandbox_origin = url::Url::parse(&consent_url)
        .unwrap()
        .origin()
        .ascii_serialization();
    let callback = consent(&client, &sandbox_origin, &consent_url, "allow").await;
    let (status, page) = open_callback(&client, &callback).await;
    assert_eq!(status, 200);
    assert!(page.contains("amoCRM успешно подключена!"), "{page}");

    let (ok, listing, stderr) = run(amoauth_command(dir.path()).arg("tokens"));
    assert!(ok, "{stderr}");
    assert!(
        listing.contains(ACCOUNT_HOST) && listing.contains("active"),
        "{listing}"
    );
    assert_eq!(demo.terminate().await, Some(0), "{}", demo.stderr());
    let logs = demo.stderr();
    assert!(logs.contains("INFO"), "it logged: {logs}");
    assert!(!logs.contains("\x1b["), "no colour codes in a file: {logs}");
}

/// `amoauth sandbox --listen`: the sandbox alone serves its consent page for the integration
/// it was given (by flag and by variable) and hands out codes to the redirect URI.
#[tokio::test]
async fn sandbox_serves_its_consent_page() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let redirect_uri = "http://127.0.0.1:1/amocrm/callback";
    let mut sandbox = LongRunning::start(
        amoauth_command(dir.path())
            .env("AMOCRM_CLIENT_SECRET", CLIENT_SECRET)
            .env("AMOCRM_REDIRECT_URI", redirect_uri)
            .args([
                "sandbox",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--client-id",
                "sandbox-cli-client",
            ]),
        dir.path(),
    );
    let consent_page = sandbox.printed("amoCRM sandbox on ").await;
    let consent_page = consent_page
        .split_once("consent page: ")
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .unwrap()
        .to_owned();
    assert_eq!(consent_page, format!("http://127.0.0.1:{port}/oauth"));
    let client = http_client();

    let page = client
        .get(format!(
            "{consent_page}?client_id=sandbox-cli-client&state=st-42"
        ))
        .send()
        .await
        .unwrap();

    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("Предоставить доступ"), "{html}");
    assert!(html.contains("<code>sandbox-cli-client</code>"), "{html}");
    assert!(html.contains(r#"name="state" value="st-42""#), "{html}");
    let unknown = client
        .get(format!("{consent_page}?client_id=someone-else"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 400);
    let decided = client
        .post(format!("http://127.0.0.1:{port}/oauth/decide"))
        .form(&[
            ("client_id", "sandbox-cli-client"),
            ("state", "st-42"),
            ("account_id", &ACCOUNT_ID.to_string()),
            ("decision", "allow"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(decided.status(), 302);
    let callback = location(&decided);
    assert!(callback.starts_with(redirect_uri), "{callback}");
    assert!(query_param(&callback, "code").is_some(), "{callback}");
    assert_eq!(query_param(&callback, "state").as_deref(), Some("st-42"));
    assert_eq!(sandbox.terminate().await, Some(0), "{}", sandbox.stderr());
    assert!(!sandbox.stderr().contains("\x1b["));
}

/// `api-key create`, `list` and `revoke` on one database, as an operator runs them.
async fn api_key_commands_create_list_and_revoke(backend: Backend) {
    let database = backend.fresh_database().await;
    let dir = database.dir.path().to_owned();
    let api_key = |args: &[&str]| {
        run(amoauth_command(&dir)
            .env("DATABASE_URL", &database.url)
            .arg("api-key")
            .args(args))
    };
    let (ok, _, stderr) = run(amoauth_command(&dir)
        .env("DATABASE_URL", &database.url)
        .arg("migrate"));
    assert!(ok, "{stderr}");

    let (ok, key, stderr) = api_key(&["create", "crm-sync"]);
    assert!(ok, "{stderr}");
    assert!(key.starts_with("ak_"), "{key}");
    let (ok, listing, _) = api_key(&["list"]);
    assert!(ok);
    let line = listing
        .lines()
        .find(|l| l.starts_with("crm-sync"))
        .expect(&listing);
    assert!(line.ends_with("active"), "{line}");
    assert!(!listing.contains(key.trim()), "the key is shown only once");
    let (ok, stdout, _) = api_key(&["revoke", "crm-sync"]);
    assert!(ok);
    assert_eq!(stdout.trim(), "revoked API key `crm-sync`");
    let (_, listing, _) = api_key(&["list"]);
    assert!(listing.contains(" revoked "), "{listing}");
    let (ok, _, stderr) = api_key(&["revoke", "crm-sync"]);
    assert!(!ok, "a revoked key cannot be revoked again");
    assert!(
        stderr.contains("no active API key named `crm-sync`"),
        "{stderr}"
    );
    database.drop_database().await;
}

on_all_backends!(api_key_commands_create_list_and_revoke);
