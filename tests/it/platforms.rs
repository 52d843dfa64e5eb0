//! amoCRM and Kommo side by side (issue 17): each platform's integration connects, refreshes
//! and is uninstalled with its own client id and secret; callbacks that mix the platforms are
//! refused before anything is sent; a Kommo-only deployment works; an older database migrates.

use chrono::Utc;

use crate::support::*;

fn hours_ago(hours: i64) -> chrono::NaiveDateTime {
    Utc::now().naive_utc() - chrono::Duration::hours(hours)
}

/// The URL with one query parameter replaced.
fn with_param(url: &str, name: &str, value: &str) -> String {
    let mut parsed = url::Url::parse(url).unwrap();
    let pairs: Vec<(String, String)> = parsed
        .query_pairs()
        .into_owned()
        .map(|(k, v)| if k == name { (k, value.into()) } else { (k, v) })
        .collect();
    parsed.query_pairs_mut().clear().extend_pairs(pairs);
    parsed.to_string()
}

fn both() -> Options {
    Options {
        platforms: Platforms::Both,
        ..Options::default()
    }
}

/// Install (for `platform`), Allow as `account_id`, callback: connected, the result page
/// naming the platform.
async fn connect_on(app: &TestApp, install: &str, account_id: i64) {
    let consent = app.install_at(install).await;
    let callback = consent_as(
        &app.client,
        &app.sandbox_origin,
        &consent,
        "allow",
        account_id,
    )
    .await;
    let (status, body) = app.open_callback(&callback).await;
    assert_eq!(status, 200, "{body}");
    let platform = match account_id {
        KOMMO_ACCOUNT_ID => "Kommo",
        _ => "amoCRM",
    };
    assert!(
        body.contains(&format!("{platform} успешно подключена!")),
        "{body}"
    );
}

async fn both_platforms_connect_refresh_and_uninstall_with_their_own_integrations(
    backend: Backend,
) {
    let app = TestApp::spawn_with(&backend, both()).await;
    // Without ?platform= the install is amoCRM's; ?platform=kommo opens Kommo's consent.
    let consent = app.install().await;
    assert_eq!(
        query_param(&consent, "client_id").as_deref(),
        Some(CLIENT_ID)
    );
    let consent = app.install_at("/amocrm/install?platform=kommo").await;
    assert_eq!(
        query_param(&consent, "client_id").as_deref(),
        Some(KOMMO_CLIENT_ID)
    );

    connect_on(&app, "/amocrm/install", ACCOUNT_ID).await;
    connect_on(&app, "/amocrm/install?platform=kommo", KOMMO_ACCOUNT_ID).await;
    let platforms = app
        .db()
        .strings("SELECT platform FROM amocrm_tokens ORDER BY account_id")
        .await;
    assert_eq!(platforms, [Some("amocrm".into()), Some("kommo".into())]);
    assert_eq!(app.sandbox.stats().successful_code_exchanges, 2);

    // Each refresh is accepted only with its platform's own secret (the sandbox checks it).
    app.db().set_token_time("expires_at", hours_ago(1)).await;
    let key = app.api_key().await;
    for (account, platform, host) in [
        (ACCOUNT_ID, "amocrm", ACCOUNT_HOST),
        (KOMMO_ACCOUNT_ID, "kommo", KOMMO_ACCOUNT_HOST),
    ] {
        let (status, body) = app
            .api(&format!("/api/v1/connections/{account}/token"), &key)
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["platform"], platform);
        assert_eq!(body["domain"], host);
    }
    let stats = app.sandbox.stats();
    assert_eq!((stats.refreshes, stats.successful_refreshes), (2, 2));
    let (status, list) = app.api("/api/v1/connections", &key).await;
    assert_eq!(status, 200);
    let listed: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["platform"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, ["amocrm", "kommo"]);
    let metrics = app.get(&format!("{}/metrics", app.base)).await.1;
    for platform in ["amocrm", "kommo"] {
        for series in [
            format!("amoauth_flows_started_total{{platform=\"{platform}\"}} 2"),
            format!("amoauth_flows_completed_total{{platform=\"{platform}\"}} 1"),
            format!("amoauth_refreshes_total{{platform=\"{platform}\",outcome=\"success\"}} 1"),
            format!("amoauth_connections{{platform=\"{platform}\",status=\"active\"}} 1"),
        ] {
            assert!(
                metrics.lines().any(|line| line == series),
                "{series} in {metrics}"
            );
        }
    }

    // Each platform's uninstall webhook is signed with its own integration's secret.
    let webhook = format!("{}/amocrm/webhook/uninstall", app.base);
    for account in [ACCOUNT_ID, KOMMO_ACCOUNT_ID] {
        assert_eq!(
            app.sandbox
                .fire_uninstall_webhook(&webhook, account)
                .await
                .unwrap(),
            200
        );
    }
    let statuses = app
        .db()
        .strings("SELECT status FROM amocrm_tokens ORDER BY account_id")
        .await;
    assert_eq!(
        statuses,
        [Some("disconnected".into()), Some("disconnected".into())]
    );
    app.stop().await;
}

/// A Kommo install, Allowed by the Kommo account: the callback URL.
async fn kommo_callback(app: &TestApp) -> String {
    let consent = app.install_at("/amocrm/install?platform=kommo").await;
    consent_as(
        &app.client,
        &app.sandbox_origin,
        &consent,
        "allow",
        KOMMO_ACCOUNT_ID,
    )
    .await
}

async fn callbacks_that_mix_the_platforms_are_refused_before_any_request(backend: Backend) {
    let app = TestApp::spawn_with(&backend, both()).await;
    let before = app.sandbox.stats().requests;

    // A Kommo install's callback carrying the amoCRM client id (with an amoCRM referer, so
    // only the state's platform tells it apart).
    let callback = kommo_callback(&app).await;
    let forged = with_param(&callback, "client_id", CLIENT_ID);
    let forged = with_param(&forged, "referer", ACCOUNT_HOST);
    let (status, body) = app.open_callback(&forged).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_request"), "{body}");

    // The Kommo client id with an amoCRM referer.
    let callback = kommo_callback(&app).await;
    let (status, body) = app
        .open_callback(&with_param(&callback, "referer", ACCOUNT_HOST))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("bad_referer"), "{body}");

    // An amoCRM install's callback from a Kommo account, no client id sent back.
    let consent = app.install().await;
    let callback = app.consent(&consent, "allow").await;
    let callback = with_param(&callback, "referer", KOMMO_ACCOUNT_HOST);
    let (status, body) = app.open_callback(&callback).await;
    assert_eq!(status, 400, "{body}");

    let stats = app.sandbox.stats();
    assert_eq!(stats.code_exchanges, 0, "no code was posted anywhere");
    assert!(stats.token_hosts.is_empty(), "{:?}", stats.token_hosts);
    // Only the consent pages and Allow clicks reached the sandbox: two requests per consent.
    assert_eq!(stats.requests - before, 6);
    assert_eq!(app.count("SELECT COUNT(*) FROM amocrm_tokens").await, 0);

    // The Kommo install still connects as it should.
    connect_on(&app, "/amocrm/install?platform=kommo", KOMMO_ACCOUNT_ID).await;
    app.stop().await;
}

async fn a_kommo_only_deployment_connects_kommo_accounts(backend: Backend) {
    let options = Options {
        platforms: Platforms::KommoOnly,
        ..Options::default()
    };
    let app = TestApp::spawn_with(&backend, options).await;
    let consent = app.install().await;
    assert_eq!(
        query_param(&consent, "client_id").as_deref(),
        Some(KOMMO_CLIENT_ID)
    );
    connect_on(&app, "/amocrm/install", KOMMO_ACCOUNT_ID).await;
    let key = app.api_key().await;
    let (status, body) = app
        .api(
            &format!("/api/v1/connections/kommo:{KOMMO_ACCOUNT_ID}/token"),
            &key,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["platform"], "kommo");

    // amoCRM is not configured: its install is a clear 400, not a consent page.
    let response = app
        .client
        .get(format!("{}/amocrm/install?platform=amocrm", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("kommo"));
    app.stop().await;
}

async fn the_same_account_number_on_both_platforms_is_two_connections(backend: Backend) {
    let app = TestApp::spawn_with(&backend, both()).await;
    connect_on(&app, "/amocrm/install", ACCOUNT_ID).await;
    connect_on(&app, "/amocrm/install?platform=kommo", KOMMO_ACCOUNT_ID).await;
    // The sandbox numbers its accounts apart; give the Kommo one the amoCRM one's number,
    // which the schema allows for another platform only.
    assert_eq!(
        app.db()
            .execute("UPDATE amocrm_tokens SET account_id = 31337001 WHERE platform = 'kommo'")
            .await,
        1
    );
    // The older connection is named first, whatever order the index gives: make the amoCRM
    // one (first in the (account_id, platform) index) the newer.
    assert_eq!(
        app.db()
            .execute("UPDATE amocrm_tokens SET id = 1000000 WHERE platform = 'amocrm'")
            .await,
        1
    );
    let key = app.api_key().await;
    let (status, body) = app.api("/api/v1/connections/31337001/token", &key).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "ambiguous_account");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("ask for kommo:31337001 or amocrm:31337001"),
        "{message}"
    );
    let (status, body) = app
        .api("/api/v1/connections/amocrm:31337001/token", &key)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["domain"], ACCOUNT_HOST);
    // A host names one connection, so it needs no platform.
    let (status, body) = app
        .api(&format!("/api/v1/connections/{ACCOUNT_HOST}/token"), &key)
        .await;
    assert_eq!(status, 200, "{body}");
    app.stop().await;
}

/// A database at the version before platforms, with a connection and a pending state,
/// migrates: both become amoCRM's, and account ids are unique per platform from then on.
async fn an_existing_single_integration_database_migrates_and_keeps_working(backend: Backend) {
    let database = backend.fresh_database().await;
    let folder = match &backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres(_) => "postgres",
        Backend::MySql(_) => "mysql",
    };
    let older = tempfile::tempdir().unwrap();
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(folder);
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.as_str() < "20261201000017" {
            std::fs::copy(&path, older.path().join(&name)).unwrap();
        }
    }
    let migrator = sqlx::migrate::Migrator::new(older.path()).await.unwrap();
    match &database.db {
        TestDb::Sqlite(pool) => migrator.run(pool).await.unwrap(),
        TestDb::Postgres(pool) => migrator.run(pool).await.unwrap(),
        TestDb::MySql(pool) => migrator.run(pool).await.unwrap(),
    }
    let db = &database.db;
    db.execute(
        "INSERT INTO amocrm_tokens (account_id, account_name, domain, subdomain, expires_at, \
         refresh_expires_at, issued_at, status, created_at, updated_at) VALUES (31337001, \
         'Old', 'demo.amocrm.ru', 'demo', '2030-01-01 00:00:00', '2030-01-01 00:00:00', \
         '2026-01-01 00:00:00', 'needs_reauth', '2026-01-01 00:00:00', '2026-01-01 00:00:00')",
    )
    .await;
    db.execute(
        "INSERT INTO amocrm_oauth_states (state_hash, created_at, expires_at) VALUES \
         ('0123abcd', '2026-01-01 00:00:00', '2030-01-01 00:00:00')",
    )
    .await;

    let store = amoauth::internal::Store::connect(&amoauth::internal::DatabaseUrl::new(
        database.url.clone(),
    ))
    .await
    .unwrap();
    store.migrate().await.unwrap();
    assert!(store.migrations_current().await.unwrap());

    let row = store.find_connection("31337001").await.unwrap().unwrap();
    assert_eq!(row.platform, amoauth::amocrm::Platform::Amocrm);
    assert_eq!(
        (row.domain.as_str(), row.account_name.as_deref()),
        ("demo.amocrm.ru", Some("Old"))
    );
    assert_eq!(
        db.strings("SELECT platform FROM amocrm_oauth_states").await,
        [Some("amocrm".into())]
    );
    let insert = |platform: &str| {
        format!(
            "INSERT INTO amocrm_tokens (account_id, domain, subdomain, expires_at, \
             refresh_expires_at, issued_at, created_at, updated_at, platform) VALUES (31337001, \
             'x.kommo.com', 'x', '2030-01-01 00:00:00', '2030-01-01 00:00:00', \
             '2026-01-01 00:00:00', '2026-01-01 00:00:00', '2026-01-01 00:00:00', '{platform}')"
        )
    };
    assert_eq!(db.execute_built(insert("kommo")).await, 1);
    assert_eq!(store.find_connections("31337001").await.unwrap().len(), 2);
    let duplicate = match db {
        TestDb::Sqlite(pool) => sqlx::query(sqlx::AssertSqlSafe(insert("amocrm")))
            .execute(pool)
            .await
            .is_err(),
        TestDb::Postgres(pool) => sqlx::query(sqlx::AssertSqlSafe(insert("amocrm")))
            .execute(pool)
            .await
            .is_err(),
        TestDb::MySql(pool) => sqlx::query(sqlx::AssertSqlSafe(insert("amocrm")))
            .execute(pool)
            .await
            .is_err(),
    };
    assert!(duplicate, "an account id is still unique within a platform");
    store.close().await;
    database.drop_database().await;
}

/// Widget installs carry no state: the `client_id` names the integration, whose platform the
/// referer must be on.
async fn widget_installs_are_matched_by_their_client_id(backend: Backend) {
    let options = Options {
        widget_installs: true,
        ..both()
    };
    let app = TestApp::spawn_with(&backend, options).await;
    let widget = |client_id: &str, referer: &str| {
        let code = app.sandbox.authorize(KOMMO_ACCOUNT_ID);
        format!(
            "{}/amocrm/callback?code={code}&referer={referer}&client_id={client_id}&from_widget=1",
            app.base
        )
    };
    let (status, body) = app.get(&widget(KOMMO_CLIENT_ID, ACCOUNT_HOST)).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = app.get(&widget(CLIENT_ID, KOMMO_ACCOUNT_HOST)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(app.sandbox.stats().code_exchanges, 0, "nothing was posted");

    let (status, _) = app.get(&widget(KOMMO_CLIENT_ID, KOMMO_ACCOUNT_HOST)).await;
    assert_eq!(status, 200);
    let mut connected = Vec::new();
    for _ in 0..100 {
        connected = app
            .db()
            .strings("SELECT platform FROM amocrm_tokens WHERE account_id = 31337002")
            .await;
        if !connected.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(connected, [Some("kommo".into())]);
    app.stop().await;
}

on_all_backends!(
    widget_installs_are_matched_by_their_client_id,
    both_platforms_connect_refresh_and_uninstall_with_their_own_integrations,
    callbacks_that_mix_the_platforms_are_refused_before_any_request,
    a_kommo_only_deployment_connects_kommo_accounts,
    the_same_account_number_on_both_platforms_is_two_connections,
    an_existing_single_integration_database_migrates_and_keeps_working,
);

/// README's Kommo block as an operator uses it: its `export KOMMO_…` lines (with this test's
/// integration for the `…`), first instead of the amoCRM variables, then beside them, given to
/// the real `amoauth serve`, whose install links then open each platform's consent.
#[tokio::test]
async fn readme_kommo_setup_runs_kommo_only_and_beside_amocrm() {
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let section = readme
        .split("### amoCRM, Kommo or both")
        .nth(1)
        .expect("README has the Kommo section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .unwrap();
    let port = free_port();
    let redirect_uri = format!("http://127.0.0.1:{port}/amocrm/callback");
    let exported: Vec<(String, String)> = block
        .lines()
        .filter_map(|line| line.strip_prefix("export "))
        .map(|line| {
            let (name, value) = line.split_once('=').unwrap();
            let value = value.split_whitespace().next().unwrap();
            let value = match (name, value) {
                ("KOMMO_CLIENT_ID", "…") => KOMMO_CLIENT_ID.to_owned(),
                ("KOMMO_CLIENT_SECRET", "…") => KOMMO_CLIENT_SECRET.to_owned(),
                // The site's address in README is this test's server.
                ("KOMMO_REDIRECT_URI", uri) => {
                    assert_eq!(uri, "https://example.ru/amocrm/callback");
                    redirect_uri.clone()
                }
                other => panic!("README exports {other:?}"),
            };
            (name.to_owned(), value)
        })
        .collect();
    assert_eq!(exported.len(), 3, "{block}");
    let (sandbox, origin) = spawn_sandbox_for(&redirect_uri, Platforms::Both).await;

    for (amocrm_set, setup) in [(false, "Kommo only"), (true, "both")] {
        let dir = tempfile::tempdir().unwrap();
        let database_url = format!("sqlite://{}", dir.path().join("amoauth.db").display());
        let mut env: Vec<(&str, &str)> = exported
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        if !amocrm_set {
            env.extend([
                ("AMOCRM_CLIENT_ID", ""),
                ("AMOCRM_CLIENT_SECRET", ""),
                ("AMOCRM_REDIRECT_URI", ""),
            ]);
        }
        let process = ServeProcess::start(port, &redirect_uri, &origin, &database_url, &env).await;
        let install = |query: &'static str| {
            let base = process.base.clone();
            async move {
                http_client()
                    .get(format!("{base}/amocrm/install{query}"))
                    .bearer_auth(ADMIN_TOKEN)
                    .send()
                    .await
                    .unwrap()
            }
        };
        let kommo = install("?platform=kommo").await;
        assert_eq!(kommo.status(), 303, "{setup}");
        let consent = location(&kommo);
        assert_eq!(
            query_param(&consent, "client_id").as_deref(),
            Some(KOMMO_CLIENT_ID),
            "{setup}"
        );
        let callback =
            consent_as(&http_client(), &origin, &consent, "allow", KOMMO_ACCOUNT_ID).await;
        let (status, body) = open_callback(&http_client(), &callback).await;
        assert_eq!(status, 200, "{setup}: {body}");
        let default = install("").await;
        let amocrm = install("?platform=amocrm").await;
        if amocrm_set {
            assert_eq!(
                query_param(&location(&default), "client_id").as_deref(),
                Some(CLIENT_ID),
                "with both, a link without a platform is amoCRM's"
            );
            assert_eq!(amocrm.status(), 303);
        } else {
            assert_eq!(
                query_param(&location(&default), "client_id").as_deref(),
                Some(KOMMO_CLIENT_ID),
                "Kommo only: a link without a platform is Kommo's"
            );
            assert_eq!(amocrm.status(), 400, "amoCRM is not configured");
        }
        process.stop();
    }
    assert_eq!(sandbox.stats().successful_code_exchanges, 2);
}

/// `--kommo-client-id`, `--kommo-client-secret` and `--kommo-redirect-uri` (README's
/// configuration table) configure the Kommo integration as the variables do: a Kommo-only
/// `amoauth serve` started with them alone connects a Kommo account.
#[tokio::test]
async fn the_kommo_flags_configure_a_kommo_only_serve() {
    let port = free_port();
    let redirect_uri = format!("http://127.0.0.1:{port}/amocrm/callback");
    let (sandbox, origin) = spawn_sandbox_for(&redirect_uri, Platforms::Both).await;
    let dir = tempfile::tempdir().unwrap();
    let database_url = format!("sqlite://{}", dir.path().join("amoauth.db").display());
    let no_amocrm = [
        ("AMOCRM_CLIENT_ID", ""),
        ("AMOCRM_CLIENT_SECRET", ""),
        ("AMOCRM_REDIRECT_URI", ""),
    ];
    let flags = [
        "--kommo-client-id",
        KOMMO_CLIENT_ID,
        "--kommo-client-secret",
        KOMMO_CLIENT_SECRET,
        "--kommo-redirect-uri",
        &redirect_uri,
    ];
    let process = ServeProcess::start_with_flags(
        port,
        &redirect_uri,
        &origin,
        &database_url,
        &no_amocrm,
        &flags,
    )
    .await;
    let install = http_client()
        .get(format!("{}/amocrm/install", process.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(install.status(), 303);
    let consent = location(&install);
    assert_eq!(
        query_param(&consent, "client_id").as_deref(),
        Some(KOMMO_CLIENT_ID)
    );
    let callback = consent_as(&http_client(), &origin, &consent, "allow", KOMMO_ACCOUNT_ID).await;
    let (status, body) = open_callback(&http_client(), &callback).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(sandbox.stats().successful_code_exchanges, 1);
    process.stop();
}
