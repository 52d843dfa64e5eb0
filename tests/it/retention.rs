//! Retention: cleanup deletes audit rows past `AMOAUTH_AUDIT_RETENTION` and events delivered
//! more than 30 days ago (by hand and in `serve`), and `amoauth events retry` requeues the
//! failed events.

use std::time::Duration;

use amoauth::internal::DatabaseUrl;
use amoauth::internal::{Attempt, AttemptKind, Outcome, Store};
use chrono::{NaiveDateTime, Utc};

use crate::support::*;

fn days_ago(days: i64) -> NaiveDateTime {
    Utc::now().naive_utc() - chrono::Duration::days(days)
}

/// An audit row written `days` ago, with the age in its reason so the test can tell them apart.
async fn audit_row(store: &Store, days: i64) {
    let reason = format!("{days}-days-old");
    store
        .record_attempt(&Attempt {
            kind: AttemptKind::Install,
            outcome: Outcome::Failure,
            reason: Some(&reason),
            detail: None,
            subdomain: None,
            account_id: None,
            ip: Some("203.0.113.9"),
            user_agent: None,
            state_fingerprint: None,
            created_at: days_ago(days),
        })
        .await
        .unwrap();
}

/// An event written and settled `days` ago: `delivered`, `failed` or left `pending`.
async fn event(store: &Store, days: i64, status: &str) {
    let at = days_ago(days);
    // Event types are static names in amoauth; a test's own are leaked, a few bytes each.
    let event_type: &'static str = format!("test.{status}.{days}").leak();
    let id = store
        .enqueue_event(&amoauth::internal::NewEvent {
            event_type,
            payload: "{}".into(),
            created_at: at,
        })
        .await
        .unwrap();
    match status {
        "delivered" => store.mark_event_delivered(id, at).await.unwrap(),
        "failed" => store.mark_event_failed(id, "HTTP 500").await.unwrap(),
        _ => {}
    }
}

/// Rows of every age on either side of the retention limits.
async fn seed_history(store: &Store) {
    for days in [100, 40, 10] {
        audit_row(store, days).await;
    }
    for (days, status) in [
        (40, "delivered"),
        (10, "delivered"),
        (40, "failed"),
        (40, "pending"),
    ] {
        event(store, days, status).await;
    }
}

async fn audit_reasons(db: &TestDb) -> Vec<Option<String>> {
    db.strings("SELECT reason FROM amocrm_oauth_attempts ORDER BY id")
        .await
}

async fn event_types(db: &TestDb) -> Vec<Option<String>> {
    db.strings("SELECT event_type FROM amoauth_events ORDER BY id")
        .await
}

fn amoauth(
    database_url: &str,
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> String {
    let output = amoauth_command(dir)
        .env("DATABASE_URL", database_url)
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

async fn cleanup_deletes_history_past_its_retention_and_failed_events_can_be_retried(
    backend: Backend,
) {
    // No server: its own periodic cleanup would get there first.
    let database = backend.fresh_database().await;
    let store = Store::connect(&DatabaseUrl::new(&database.url))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    seed_history(&store).await;
    store.close().await;
    let (db, url) = (&database.db, database.url.as_str());
    let dir = tempfile::tempdir().unwrap();

    let dry = amoauth(url, dir.path(), &["cleanup", "--dry-run"], &[]);
    assert!(
        dry.contains("would remove 1 audit rows older than 90d")
            && dry.contains("would remove 1 delivered events older than 30d"),
        "{dry}"
    );
    assert_eq!(
        audit_reasons(db).await.len(),
        3,
        "a dry run deletes nothing"
    );

    let out = amoauth(url, dir.path(), &["cleanup"], &[]);

    assert!(
        out.contains("removed 1 audit rows older than 90d")
            && out.contains("removed 1 delivered events older than 30d"),
        "{out}"
    );
    assert_eq!(
        audit_reasons(db).await,
        [Some("40-days-old".into()), Some("10-days-old".into())]
    );
    assert_eq!(
        event_types(db).await,
        [
            Some("test.delivered.10".into()),
            Some("test.failed.40".into()),
            Some("test.pending.40".into())
        ],
        "undelivered events are never deleted, however old"
    );

    // A shorter retention, from the variable or the flag.
    let out = amoauth(
        url,
        dir.path(),
        &["cleanup"],
        &[("AMOAUTH_AUDIT_RETENTION", "30d")],
    );
    assert!(out.contains("removed 1 audit rows older than 30d"), "{out}");
    let out = amoauth(
        url,
        dir.path(),
        &["cleanup", "--audit-retention", "5d"],
        &[],
    );
    assert!(out.contains("removed 1 audit rows older than 5d"), "{out}");
    assert!(audit_reasons(db).await.is_empty());

    // The failed event is requeued: pending, no attempts, due now.
    let out = amoauth(url, dir.path(), &["events", "retry"], &[]);
    assert!(out.starts_with("requeued 1 failed events"), "{out}");
    assert_eq!(
        db.count(
            "SELECT COUNT(*) FROM amoauth_events WHERE event_type = 'test.failed.40' \
             AND status = 'pending' AND attempts = 0"
        )
        .await,
        1
    );
    let due = db
        .timestamp("SELECT next_attempt_at FROM amoauth_events WHERE event_type = 'test.failed.40'")
        .await;
    assert!(
        (Utc::now().naive_utc() - due).num_seconds().abs() < 60,
        "due now, not {due}"
    );
    let out = amoauth(url, dir.path(), &["events", "retry"], &[]);
    assert!(out.starts_with("requeued 0 failed events"), "{out}");
    database.drop_database().await;
}

async fn serve_deletes_history_past_its_retention_periodically(backend: Backend) {
    let app = TestApp::spawn_with(
        &backend,
        Options {
            cleanup_interval: Some("200ms"),
            ..Options::default()
        },
    )
    .await;
    seed_history(app.store()).await;

    let mut left = Vec::new();
    for _ in 0..50 {
        left = audit_reasons(app.db()).await;
        if left.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert_eq!(
        left,
        [Some("40-days-old".into()), Some("10-days-old".into())]
    );
    for _ in 0..20 {
        if event_types(app.db()).await.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        event_types(app.db()).await,
        [
            Some("test.delivered.10".into()),
            Some("test.failed.40".into()),
            Some("test.pending.40".into())
        ]
    );
    app.stop().await;
}

on_all_backends!(
    cleanup_deletes_history_past_its_retention_and_failed_events_can_be_retried,
    serve_deletes_history_past_its_retention_periodically
);
