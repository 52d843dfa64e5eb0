//! What the server databases add: shared state across processes, the operator's SQL,
//! outages and clear startup errors.

use std::time::Duration;

use amoauth::sandbox::Fault;

use crate::support::*;

/// The seed's point: the state lives in the database, so the process that answers the
/// callback need not be the one that started the install.
async fn a_state_created_by_one_process_is_consumed_by_another(backend: Backend) {
    let database = backend.fresh_database().await;
    let (port_a, port_b) = (free_port(), free_port());
    // amoCRM sends the browser back to the registered redirect URI: process B.
    let redirect_uri = format!("http://127.0.0.1:{port_b}/amocrm/callback");
    let (sandbox, sandbox_origin) = spawn_sandbox(&redirect_uri).await;
    let env = [("AMOAUTH_ENCRYPTION_KEY", ENCRYPTION_KEY)];
    let a = ServeProcess::start(port_a, &redirect_uri, &sandbox_origin, &database.url, &env).await;
    let b = ServeProcess::start(port_b, &redirect_uri, &sandbox_origin, &database.url, &env).await;
    let client = http_client();

    let install = client
        .get(format!("{}/amocrm/install", a.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(install.status(), 303);
    let callback = consent(&client, &sandbox_origin, &location(&install), "allow").await;
    assert!(callback.starts_with(&b.base), "{callback}");
    let result = result_url(&client, &callback).await;
    let (status, body) = open_callback(&client, &callback.replace(&b.base, &a.base)).await;
    assert_eq!(status, 409, "the state is consumed: {body}");

    // Sealed by B, shown by A too: the replicas share the key, and nothing is stored.
    for base in [&b.base, &a.base] {
        let page = client
            .get(result.replace(&b.base, base))
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), 200, "{base}");
        assert!(
            page.text()
                .await
                .unwrap()
                .contains("amoCRM успешно подключена!")
        );
    }
    assert_eq!(
        database
            .db
            .count("SELECT COUNT(*) FROM amocrm_tokens")
            .await,
        1
    );
    assert_eq!(
        database
            .db
            .count("SELECT COUNT(*) FROM amocrm_oauth_states")
            .await,
        0
    );
    assert_eq!(sandbox.stats().successful_code_exchanges, 1);
    a.stop();
    b.stop();
    database.drop_database().await;
}

/// The seed's operator queries (MariaDB, as written) and their equivalents, from README.
async fn operator_sql_works_as_written(backend: Backend) {
    let (select, delete) = match backend {
        Backend::MySql(_) => (
            "SELECT * FROM amocrm_oauth_states WHERE expires_at > NOW();",
            "DELETE FROM amocrm_oauth_states WHERE expires_at < DATE_SUB(NOW(), INTERVAL 1 DAY);",
        ),
        Backend::Postgres(_) => (
            "SELECT * FROM amocrm_oauth_states WHERE expires_at > NOW();",
            "DELETE FROM amocrm_oauth_states WHERE expires_at < NOW() - INTERVAL '1 day';",
        ),
        Backend::Sqlite => (
            "SELECT * FROM amocrm_oauth_states WHERE expires_at > datetime('now');",
            "DELETE FROM amocrm_oauth_states WHERE expires_at < datetime('now', '-1 day');",
        ),
    };
    let app = TestApp::spawn(&backend).await;
    app.install().await;
    app.install().await;
    let now = chrono::Utc::now().naive_utc();
    for (hash, age) in [
        ("an-hour-ago", 1),
        ("two-days-ago", 48),
        ("a-month-ago", 720),
    ] {
        let expires_at = now - chrono::Duration::hours(age);
        app.db()
            .insert_state(hash, expires_at - chrono::Duration::minutes(15), expires_at)
            .await;
    }

    assert_eq!(
        app.db().fetch_count(select).await,
        2,
        "the two states from the installs are active"
    );
    assert_eq!(
        app.db().execute(delete).await,
        2,
        "two states expired more than a day ago"
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM amocrm_oauth_states").await,
        3
    );
    app.stop().await;
}

on_all_backends!(
    a_state_created_by_one_process_is_consumed_by_another,
    operator_sql_works_as_written,
);

/// The database disappears (connections reset, new ones refused) and comes back.
async fn database_outage_answers_503_and_recovers(backend: Backend) {
    let app = TestApp::spawn_with(
        &backend,
        Options {
            via_proxy: true,
            ..Options::default()
        },
    )
    .await;
    let proxy = app.proxy.as_ref().unwrap();
    let callback = app.allowed_callback_url().await;
    proxy.cut().await;

    let (status, body) = app.get(&callback).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("База данных недоступна"), "{body}");
    let install = app
        .client
        .get(format!("{}/amocrm/install", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(install.status(), 503);
    assert_eq!(app.get(&format!("{}/readyz", app.base)).await.0, 503);
    assert_eq!(
        app.sandbox.stats().code_exchanges,
        0,
        "nothing was sent to amoCRM"
    );

    proxy.restore().await;

    // The state and the code survived: the same callback now connects, without a restart.
    let (status, body) = app.open_callback(&callback).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(app.get(&format!("{}/readyz", app.base)).await.0, 200);

    // An outage between consuming the state and saving the tokens leaves the old
    // connection as it was: nothing is half-written.
    let callback = app.allowed_callback_url().await;
    app.sandbox
        .set_token_fault(Some(Fault::Delay(Duration::from_millis(700))));
    let pending = tokio::spawn({
        let (client, callback) = (app.client.clone(), callback.clone());
        async move { open_callback(&client, &callback).await.0 }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut().await;
    assert_eq!(pending.await.unwrap(), 503);
    proxy.restore().await;
    assert_eq!(
        app.count("SELECT version FROM amocrm_tokens").await,
        1,
        "the stored pair was not replaced"
    );
    app.sandbox.set_token_fault(None);
    let (status, _) = app.open_callback(&app.allowed_callback_url().await).await;
    assert_eq!(status, 200);
    assert_eq!(app.count("SELECT version FROM amocrm_tokens").await, 2);
    app.stop().await;
}

#[tokio::test]
#[cfg_attr(amoauth_lacks_postgres, ignore = "set AMOAUTH_TEST_POSTGRES_URL")]
async fn postgres_outage_answers_503_and_recovers() {
    database_outage_answers_503_and_recovers(Backend::postgres()).await;
}

#[tokio::test]
#[cfg_attr(amoauth_lacks_mysql, ignore = "set AMOAUTH_TEST_MYSQL_URL")]
async fn mysql_outage_answers_503_and_recovers() {
    database_outage_answers_503_and_recovers(Backend::mysql()).await;
}

fn run_serve(env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let output = amoauth_command(dir.path())
        .env("AMOCRM_CLIENT_ID", CLIENT_ID)
        .env("AMOCRM_CLIENT_SECRET", CLIENT_SECRET)
        .env("AMOCRM_REDIRECT_URI", "https://example.ru/amocrm/callback")
        .env("AMOAUTH_LISTEN", "127.0.0.1:0")
        .envs(env.iter().copied())
        .arg("serve")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[test]
fn unreachable_databases_stop_the_start_with_the_password_masked() {
    for url in [
        "postgres://amo:hunter2@127.0.0.1:1/amo",
        "mysql://amo:hunter2@127.0.0.1:1/amo",
    ] {
        let (ok, stderr) = run_serve(&[
            ("DATABASE_URL", url),
            ("AMOAUTH_ENCRYPTION_KEY", ENCRYPTION_KEY),
        ]);

        assert!(!ok);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("error: DATABASE_URL: cannot open "),
            "{stderr}"
        );
        assert!(stderr.contains("amo:***@127.0.0.1:1"), "{stderr}");
        assert!(stderr.contains("refused"), "says why: {stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }
}

#[test]
fn malformed_database_urls_are_refused_clearly() {
    let (ok, stderr) = run_serve(&[
        ("DATABASE_URL", "postgres://amo:hunter2@[::1/amo"),
        ("AMOAUTH_ENCRYPTION_KEY", ENCRYPTION_KEY),
    ]);

    assert!(!ok);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: DATABASE_URL: "), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn server_databases_require_the_encryption_key() {
    let (ok, stderr) = run_serve(&[("DATABASE_URL", "postgres://amo:hunter2@127.0.0.1:5432/amo")]);

    assert!(!ok);
    assert!(
        stderr.starts_with(
            "error: AMOAUTH_ENCRYPTION_KEY: is required with a PostgreSQL or MySQL database"
        ),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1);
}

/// `mariadb://` is what MariaDB's own documentation writes; amoauth opens it as MySQL.
#[tokio::test]
#[cfg_attr(amoauth_lacks_mysql, ignore = "set AMOAUTH_TEST_MYSQL_URL")]
async fn mariadb_urls_open_the_mysql_backend() {
    let database = Backend::mysql().fresh_database().await;
    let mariadb_url = database.url.replacen("mysql://", "mariadb://", 1);
    let dir = tempfile::tempdir().unwrap();
    let output = amoauth_command(dir.path())
        .env("DATABASE_URL", &mariadb_url)
        .arg("migrate")
        .output()
        .unwrap();

    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tables: i64 = match &database.db {
        TestDb::MySql(pool) => sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = DATABASE() AND table_name = 'amocrm_tokens'",
        )
        .fetch_one(pool)
        .await
        .unwrap(),
        _ => unreachable!("a MySQL database"),
    };
    assert_eq!(
        tables, 1,
        "migrate created amoauth's tables through mariadb://"
    );
    database.drop_database().await;
}
