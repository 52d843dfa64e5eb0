//! The hot path (an install, a callback's state, a token call) reads and writes the database
//! on every request: the next request on another replica sees a refreshed token, a revoked
//! API key and a disconnected account. On SQLite it runs on connections of its own
//! (store/inline.rs), also on an in-memory database an embedding app hands over, and a token
//! call's row is kept between calls until the next commit to the database by anyone: these
//! tests ask with a warm cache before each change.

use amoauth::internal::{Disconnect, Records, create_api_key, now};
use chrono::{NaiveDateTime, Utc};

use crate::support::*;

fn token_url(base: &str, account: &str) -> String {
    format!("{base}/api/v1/connections/{account}/token")
}

fn from_now(seconds: i64) -> NaiveDateTime {
    Utc::now().naive_utc() + chrono::Duration::seconds(seconds)
}

async fn the_next_token_call_on_a_replica_sees_every_change(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.connect().await;
    let revoked = create_api_key(app.store(), "to-revoke").await.unwrap().full;
    let kept = create_api_key(app.store(), "kept").await.unwrap().full;
    let replica = app.replica().await;
    let replica_base = format!("http://{}{}", replica.addr, replica.base_path);
    let by_id = ACCOUNT_ID.to_string();
    let ask = |base: &str, account: &str, key: &str| {
        let (client, url, key) = (app.client.clone(), token_url(base, account), key.to_owned());
        async move { api_get(&client, &url, &key).await }
    };

    let accounts = [by_id.as_str(), "demo", ACCOUNT_HOST];
    // Every replica answers every key for every spelling of the account with `token`: on
    // SQLite, each answer is now kept until the next commit.
    let all_serve = |token: serde_json::Value, keys: Vec<String>| {
        let bases = [app.base.clone(), replica_base.clone()];
        async move {
            for base in &bases {
                for account in accounts {
                    for key in &keys {
                        let (status, body) = ask(base, account, key).await;
                        assert_eq!(status, 200, "{base} {account}: {body}");
                        assert_eq!(body["access_token"], token, "{base} {account}");
                    }
                }
            }
        }
    };

    // Both replicas serve the stored token, by account id and by subdomain or host.
    let (status, first) = ask(&app.base, &by_id, &kept).await;
    assert_eq!(status, 200, "{first}");
    let both_keys = vec![kept.clone(), revoked.clone()];
    all_serve(first["access_token"].clone(), both_keys.clone()).await;

    // A token close to expiry (changed from outside amoauth) is refreshed by the next call on
    // this replica; the other serves the new one next.
    app.db().set_token_time("expires_at", from_now(30)).await;
    let (status, refreshed) = ask(&app.base, &by_id, &kept).await;
    assert_eq!(status, 200, "{refreshed}");
    assert_ne!(refreshed["access_token"], first["access_token"]);
    let (status, body) = ask(&replica_base, &by_id, &kept).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["access_token"], refreshed["access_token"]);
    all_serve(refreshed["access_token"].clone(), both_keys).await;

    // A revoked key is refused by the next call on either replica; another key still works.
    assert!(
        app.store()
            .revoke_api_key("to-revoke", now())
            .await
            .unwrap()
    );
    for base in [&replica_base, &app.base] {
        let (status, body) = ask(base, &by_id, &revoked).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"], "unauthorized");
        let (status, body) = ask(base, "no-such-account", &revoked).await;
        assert_eq!(
            status, 401,
            "a revoked key learns nothing of accounts: {body}"
        );
    }
    let (status, body) = ask(&replica_base, "no-such-account", &kept).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = ask(&replica_base, &"x".repeat(300), &revoked).await;
    assert_eq!(status, 401, "the key is checked before the account: {body}");
    let (status, body) = ask(&replica_base, &"x".repeat(300), &kept).await;
    assert_eq!(status, 400, "{body}");

    // An account disconnected here is refused by the next call on the other replica.
    all_serve(refreshed["access_token"].clone(), vec![kept.clone()]).await;
    let store = app.store();
    let records = Records::default();
    let disconnected = store
        .disconnect(
            amoauth::amocrm::Platform::Amocrm,
            ACCOUNT_ID,
            Disconnect::ByAdmin,
            now(),
            &records,
        )
        .await
        .unwrap();
    assert!(disconnected);
    let (status, body) = ask(&replica_base, &by_id, &kept).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "disconnected");

    replica.stop().await.unwrap();
    app.stop().await;
}

/// An embedding app's `sqlite::memory:` pool: the hot path opens the same shared in-memory
/// database, so a state saved by an install is the one sqlx's connections see.
#[tokio::test]
async fn an_in_memory_sqlite_pool_serves_the_hot_path_too() {
    let pool = sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap();
    let amoauth = amoauth::Amoauth::builder()
        .amocrm(
            CLIENT_ID,
            CLIENT_SECRET,
            "http://127.0.0.1:9/amocrm/callback",
        )
        .admin_token(ADMIN_TOKEN)
        .encryption_key(ENCRYPTION_KEY)
        .database(pool.clone())
        .build()
        .await
        .unwrap();
    let (listener, addr) = loopback_listener().await;
    let app = amoauth
        .router()
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let client = http_client();

    for _ in 0..3 {
        let response = client
            .get(format!("http://{addr}/amocrm/install"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 303);
    }
    let states: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM amocrm_oauth_states")
        .fetch_one(&pool)
        .await
        .unwrap();
    let installs: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM amocrm_oauth_attempts WHERE kind = 'install'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((states, installs), (3, 3));

    let key = create_api_key(&amoauth::internal::Store::from_pool(pool.clone()), "memory")
        .await
        .unwrap()
        .full;
    let (status, body) = api_get(&client, &token_url(&format!("http://{addr}"), "42"), &key).await;
    assert_eq!(status, 404, "the key made through sqlx is seen: {body}");
    server.abort();
}

on_all_backends!(the_next_token_call_on_a_replica_sees_every_change);

/// The token call finds a connection by its bare account id through an index, not a scan of
/// every connection: the unique index per platform has the id first.
#[tokio::test]
async fn a_token_lookup_by_account_id_uses_an_index() {
    let pool = sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap();
    amoauth::internal::Store::from_pool(pool.clone())
        .migrate()
        .await
        .unwrap();
    assert_plan_uses(
        &pool,
        "SELECT id FROM amocrm_tokens WHERE account_id = 7",
        "INDEX amocrm_tokens_account_id_platform",
    )
    .await;
}

/// SQLite's plan for `statement` has a step that names `index`.
async fn assert_plan_uses(pool: &sqlx::SqlitePool, statement: &str, index: &str) {
    // EXPLAIN QUERY PLAN's rows are (id, parent, notused, detail).
    let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "EXPLAIN QUERY PLAN {statement}"
    )))
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(
        plan.iter().any(|step| step.3.contains(index)),
        "{statement}: {plan:?}"
    );
}

#[tokio::test]
async fn sqlite_keeps_a_state_in_one_b_tree_and_the_migration_copies_pending_states() {
    let pool = sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap();
    let migrations = sqlx::migrate!("./migrations/sqlite");
    const CLUSTERED: i64 = 20261201000019;
    // The schema just before, with a pending install's state in it.
    for migration in migrations.iter().filter(|m| m.version < CLUSTERED) {
        sqlx::raw_sql(migration.sql.clone())
            .execute(&pool)
            .await
            .unwrap();
    }
    sqlx::query(
        "INSERT INTO amocrm_oauth_states (state_hash, subdomain, created_at, expires_at, ip, \
         user_agent, platform) VALUES ('0000019abc-key', 'example', '2026-12-01 04:00:00', \
         '2026-12-01 04:15:00', '203.0.113.7', 'Firefox', 'kommo')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let clustered = migrations.iter().find(|m| m.version == CLUSTERED).unwrap();
    sqlx::raw_sql(clustered.sql.clone())
        .execute(&pool)
        .await
        .unwrap();

    let kept: (String, String, String, String) = sqlx::query_as(
        "SELECT subdomain, expires_at, user_agent, platform FROM amocrm_oauth_states \
         WHERE state_hash = '0000019abc-key'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        kept,
        (
            "example".to_owned(),
            "2026-12-01 04:15:00".to_owned(),
            "Firefox".to_owned(),
            "kommo".to_owned()
        )
    );
    let table: (String,) =
        sqlx::query_as("SELECT sql FROM sqlite_master WHERE name = 'amocrm_oauth_states'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(table.0.ends_with("WITHOUT ROWID"), "{}", table.0);
    // Cleanup still finds expired states by the index, not by reading every state.
    assert_plan_uses(
        &pool,
        "DELETE FROM amocrm_oauth_states WHERE expires_at < '2026-12-01'",
        "INDEX amocrm_oauth_states_expires_at",
    )
    .await;
}
