//! Faults of amoCRM, the database and the process: each ends with a clear error and leaves
//! nothing half-written.

use std::time::Duration;

use amoauth::sandbox::Fault;

use crate::support::*;

/// Install, then a code straight from the sandbox: the callback URL, without visiting consent.
async fn callback_url(app: &TestApp) -> String {
    let consent = app.install().await;
    let state = query_param(&consent, "state").unwrap();
    let code = app.sandbox.authorize(ACCOUNT_ID);
    format!(
        "{}/amocrm/callback?code={code}&state={state}&referer={ACCOUNT_HOST}",
        app.base
    )
}

async fn account_lookup_faults_are_reported_and_store_nothing(backend: Backend) {
    let options = Options {
        amocrm_timeout: Some("500ms"),
        ..Options::default()
    };
    let app = TestApp::spawn_with(&backend, options).await;
    for (fault, expected, reason) in [
        (Fault::ServerError, 502, "amocrm_error"),
        (Fault::Garbage, 502, "amocrm_bad_response"),
        (Fault::Delay(Duration::from_secs(2)), 504, "amocrm_timeout"),
        (
            Fault::Problem {
                status: 401,
                hint: "Unauthorized".into(),
            },
            502,
            "amocrm_rejected",
        ),
    ] {
        app.sandbox.set_account_fault(Some(fault.clone()));
        let url = callback_url(&app).await;

        let (status, body) = app.open_callback(&url).await;

        assert_eq!(status, expected, "{fault:?}: {body}");
        assert!(
            body.contains("Запрос данных аккаунта в demo.amocrm.ru"),
            "{fault:?}: {body}"
        );
        assert_eq!(app.callback_reasons().await.last().unwrap(), reason);
    }
    assert_eq!(
        app.count("SELECT COUNT(*) FROM amocrm_tokens").await,
        0,
        "nothing stored"
    );
    app.stop().await;
}

async fn an_amocrm_that_resets_the_connection_is_reported_as_unreachable(backend: Backend) {
    // A server that accepts and hangs up at once, at every step.
    let (listener, addr) = loopback_listener().await;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            drop(stream);
        }
    });
    let options = Options {
        amocrm_url: Some(format!("http://localhost:{}", addr.port())),
        ..Options::default()
    };
    let app = TestApp::spawn_with(&backend, options).await;
    let url = callback_url(&app).await;

    let (status, body) = app.open_callback(&url).await;

    assert_eq!(status, 502, "{body}");
    assert!(body.contains("amoCRM недоступна"), "{body}");
    assert_eq!(app.callback_reasons().await, ["amocrm_unreachable"]);
    assert_eq!(app.count("SELECT COUNT(*) FROM amocrm_tokens").await, 0);
    app.stop().await;
}

on_all_backends!(
    account_lookup_faults_are_reported_and_store_nothing,
    an_amocrm_that_resets_the_connection_is_reported_as_unreachable,
);

#[tokio::test]
async fn a_read_only_database_answers_503_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ro.db");
    let migrated = amoauth_command(dir.path())
        .env("DATABASE_URL", format!("sqlite://{}", file.display()))
        .arg("migrate")
        .output()
        .unwrap();
    assert!(migrated.status.success());
    let port = free_port();
    let redirect_uri = format!("http://127.0.0.1:{port}/amocrm/callback");
    let (_sandbox, sandbox_origin) = spawn_sandbox(&redirect_uri).await;
    let read_only = format!("sqlite://{}?mode=ro", file.display());
    let env = [("AMOAUTH_ENCRYPTION_KEY", ENCRYPTION_KEY)];
    let process = ServeProcess::start(port, &redirect_uri, &sandbox_origin, &read_only, &env).await;
    let client = http_client();

    let install = client
        .get(format!("{}/amocrm/install", process.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();

    assert_eq!(install.status(), 503);
    assert!(
        install
            .text()
            .await
            .unwrap()
            .contains("База данных недоступна")
    );
    let logs = process.stop();
    assert!(
        logs.contains("readonly database"),
        "the log says why: {logs}"
    );
    let db = sqlx::SqlitePool::connect(&format!("sqlite://{}", file.display()))
        .await
        .unwrap();
    let states: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM amocrm_oauth_states")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(states, 0);
}

/// SIGTERM: requests in flight finish, new connections are refused, the process exits 0.
#[tokio::test]
async fn sigterm_lets_requests_in_flight_finish_and_refuses_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = format!("sqlite://{}", dir.path().join("amoauth.db").display());
    let port = free_port();
    let redirect_uri = format!("http://127.0.0.1:{port}/amocrm/callback");
    let (sandbox, sandbox_origin) = spawn_sandbox(&redirect_uri).await;
    let mut process =
        ServeProcess::start(port, &redirect_uri, &sandbox_origin, &database_url, &[]).await;
    let client = http_client();
    let install = client
        .get(format!("{}/amocrm/install", process.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let callback = consent(&client, &sandbox_origin, &location(&install), "allow").await;
    sandbox.set_token_fault(Some(Fault::Delay(Duration::from_millis(1500))));
    let in_flight = tokio::spawn({
        let (client, callback) = (client.clone(), callback.clone());
        async move {
            client
                .get(callback)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    for _ in 0..100 {
        if sandbox.stats().code_exchanges == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        sandbox.stats().code_exchanges,
        1,
        "the callback is waiting on amoCRM"
    );

    let killed = std::process::Command::new("kill")
        .args(["-TERM", &process.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let fresh = http_client()
        .get(format!("{}/healthz", process.base))
        .send()
        .await;
    assert!(
        fresh.is_err(),
        "new connections are refused once shutting down"
    );
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        303,
        "the request in flight finished: the redirect to its result page"
    );
    assert_eq!(process.wait_exit(Duration::from_secs(10)).await, Some(0));
    let logs = process.stop();
    assert!(logs.contains("shutting down"), "{logs}");
    let db = sqlx::SqlitePool::connect(&database_url).await.unwrap();
    let tokens: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM amocrm_tokens")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(tokens, 1, "the finished request stored its connection");
}
