//! The token API under faults: it waits out the refresh backoff during an amoCRM outage, and it
//! never stalls behind someone else's refresh (a dead replica's lease) while the stored token
//! is still valid.

use std::time::{Duration, Instant};

use amoauth::sandbox::Fault;
use chrono::{NaiveDateTime, Utc};

use crate::support::*;

const TOKEN_PATH: &str = "/api/v1/connections/31337001/token";

fn from_now(seconds: i64) -> NaiveDateTime {
    Utc::now().naive_utc() + chrono::Duration::seconds(seconds)
}

/// Sets the refresh bookkeeping of the (only) connection, as another replica would have.
async fn set_connection(db: &TestDb, column: &'static str, value: Option<NaiveDateTime>) {
    assert!(
        matches!(column, "expires_at" | "next_refresh_at" | "lease_until"),
        "{column}"
    );
    let placeholder = match db {
        TestDb::Postgres(_) => "$1",
        _ => "?",
    };
    let sql = sqlx::AssertSqlSafe(format!("UPDATE amocrm_tokens SET {column} = {placeholder}"));
    match db {
        TestDb::Sqlite(pool) => sqlx::query(sql).bind(value).execute(pool).await.map(drop),
        TestDb::Postgres(pool) => sqlx::query(sql).bind(value).execute(pool).await.map(drop),
        TestDb::MySql(pool) => sqlx::query(sql).bind(value).execute(pool).await.map(drop),
    }
    .unwrap();
}

/// Seconds from now to the stored `next_refresh_at`.
async fn backoff_left(db: &TestDb) -> i64 {
    let retry_at = db
        .timestamp("SELECT next_refresh_at FROM amocrm_tokens")
        .await;
    (retry_at - Utc::now().naive_utc()).num_seconds()
}

/// One token API answer: status, `Retry-After`, JSON body.
struct Answer {
    status: u16,
    retry_after: Option<u64>,
    body: serde_json::Value,
}

async fn ask(client: &reqwest::Client, url: &str, key: &str) -> Answer {
    let response = client.get(url).bearer_auth(key).send().await.unwrap();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    Answer {
        status: response.status().as_u16(),
        retry_after,
        body: response.json().await.unwrap_or(serde_json::Value::Null),
    }
}

/// Polls the token API at 50 requests a second for `duration`, every request in its own task
/// as independent clients would; every answer.
async fn poll_at_50_per_second(app: &TestApp, key: &str, duration: Duration) -> Vec<Answer> {
    let url = format!("{}{TOKEN_PATH}", app.base);
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let mut requests = tokio::task::JoinSet::new();
    let started = Instant::now();
    while started.elapsed() < duration {
        ticker.tick().await;
        let (client, url, key) = (app.client.clone(), url.clone(), key.to_owned());
        requests.spawn(async move { ask(&client, &url, &key).await });
    }
    requests.join_all().await
}

/// The access token the sandbox issued last.
fn newest_access_token(app: &TestApp) -> String {
    let issued = app.sandbox.issued_secrets();
    issued[issued.len() - 2].clone()
}

async fn token_api_waits_out_the_refresh_backoff_during_an_outage(backend: Backend) {
    let app = TestApp::spawn_with(
        &backend,
        Options {
            refresh_interval: Some("1h"),
            ..Options::default()
        },
    )
    .await;
    app.connect().await;
    let key = app.api_key().await;
    let stored = newest_access_token(&app);
    // Two minutes left: inside the token API's refresh margin, still valid.
    set_connection(app.db(), "expires_at", Some(from_now(120))).await;
    app.sandbox.set_token_fault(Some(Fault::ServerError));

    let answers = poll_at_50_per_second(&app, &key, Duration::from_secs(3)).await;

    assert!(answers.len() >= 140, "{} requests", answers.len());
    for answer in &answers {
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.body["access_token"], stored.as_str());
    }
    // The first backoff is 30 s (±50 %): one refresh for the whole burst.
    assert_eq!(app.sandbox.stats().refreshes, 1);
    assert_eq!(
        app.count("SELECT refresh_failures FROM amocrm_tokens")
            .await,
        1
    );
    let left = backoff_left(app.db()).await;
    assert!((10..=45).contains(&left), "first backoff {left} s");

    // The token expires inside the backoff: refused at once, without a call to amoCRM.
    set_connection(app.db(), "expires_at", Some(from_now(-60))).await;
    let answers = poll_at_50_per_second(&app, &key, Duration::from_secs(1)).await;
    for answer in &answers {
        assert_eq!(answer.status, 503, "{}", answer.body);
        assert_eq!(answer.body["error"], "refresh_backoff", "{}", answer.body);
        assert!(
            answer.body["reason"].as_str().unwrap().contains("500"),
            "{}",
            answer.body
        );
        assert!(answer.body["message"].is_string());
        let retry_after = answer.retry_after.expect("Retry-After");
        assert!(
            (1..=46).contains(&retry_after) && retry_after.abs_diff(left as u64) <= 3,
            "Retry-After {retry_after}, backoff {left} s"
        );
    }
    assert_eq!(
        app.sandbox.stats().refreshes,
        1,
        "no call inside the backoff"
    );

    // The backoff is over: exactly one more try, which fails and doubles the backoff.
    set_connection(app.db(), "next_refresh_at", Some(from_now(-1))).await;
    let answers = poll_at_50_per_second(&app, &key, Duration::from_secs(1)).await;
    assert!(
        answers.iter().all(|a| matches!(a.status, 502 | 503)),
        "an expired token is never served"
    );
    assert_eq!(app.sandbox.stats().refreshes, 2);
    assert_eq!(
        app.count("SELECT refresh_failures FROM amocrm_tokens")
            .await,
        2
    );
    let left = backoff_left(app.db()).await;
    assert!((25..=90).contains(&left), "second backoff {left} s");

    // amoCRM is back and the backoff over: the next request refreshes and succeeds.
    app.sandbox.set_token_fault(None);
    set_connection(app.db(), "next_refresh_at", Some(from_now(-1))).await;
    let answer = ask(&app.client, &format!("{}{TOKEN_PATH}", app.base), &key).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.body["access_token"],
        newest_access_token(&app).as_str()
    );
    assert_ne!(answer.body["access_token"], stored.as_str());
    let stats = app.sandbox.stats();
    assert_eq!((stats.refreshes, stats.successful_refreshes), (3, 1));
    app.stop().await;
}

async fn a_valid_token_never_waits_for_someone_elses_refresh(backend: Backend) {
    // A long amoCRM timeout makes the lease long (3 × 20 s + 1 s), so a stall would show.
    let app = TestApp::spawn_with(
        &backend,
        Options {
            amocrm_timeout: Some("20s"),
            refresh_interval: Some("1h"),
            ..Options::default()
        },
    )
    .await;
    app.connect().await;
    let key = app.api_key().await;
    let url = format!("{}{TOKEN_PATH}", app.base);
    let stored = newest_access_token(&app);
    set_connection(app.db(), "expires_at", Some(from_now(120))).await;

    // This process refreshes slowly; a second caller does not wait for it.
    app.sandbox
        .set_token_fault(Some(Fault::Delay(Duration::from_secs(3))));
    let slow = {
        let (client, url, key) = (app.client.clone(), url.clone(), key.clone());
        tokio::spawn(async move { ask(&client, &url, &key).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let answer = ask(&app.client, &url, &key).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "answered after {:?} behind a refresh in this process",
        started.elapsed()
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["access_token"], stored.as_str());
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, 200, "{}", slow.body);
    let refreshed = newest_access_token(&app);
    assert_eq!(slow.body["access_token"], refreshed.as_str());
    app.sandbox.set_token_fault(None);
    assert_eq!(app.sandbox.stats().refreshes, 1);

    // A replica died holding the lease for a minute; the token is close to expiry but valid.
    set_connection(app.db(), "expires_at", Some(from_now(120))).await;
    app.db()
        .execute("UPDATE amocrm_tokens SET lease_owner = 'dead-replica'")
        .await;
    set_connection(app.db(), "lease_until", Some(from_now(60))).await;
    let started = Instant::now();
    let answer = ask(&app.client, &url, &key).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "answered after {:?} behind a dead replica's lease",
        started.elapsed()
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["access_token"], refreshed.as_str());
    assert_eq!(
        app.sandbox.stats().refreshes,
        1,
        "the lease holder refreshes"
    );

    // Expired: the call waits, but only until the dead holder's lease can be taken over.
    set_connection(app.db(), "expires_at", Some(from_now(-60))).await;
    set_connection(app.db(), "lease_until", Some(from_now(3))).await;
    let started = Instant::now();
    let answer = ask(&app.client, &url, &key).await;
    let waited = started.elapsed();
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.body["access_token"],
        newest_access_token(&app).as_str()
    );
    assert_ne!(answer.body["access_token"], refreshed.as_str());
    assert!(
        (Duration::from_secs(2)..Duration::from_secs(6)).contains(&waited),
        "an expired token waits for the 3 s lease, no longer: {waited:?}"
    );
    assert_eq!(app.sandbox.stats().refreshes, 2);
    app.stop().await;
}

on_all_backends!(
    token_api_waits_out_the_refresh_backoff_during_an_outage,
    a_valid_token_never_waits_for_someone_elses_refresh
);
