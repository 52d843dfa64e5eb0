//! What the database holds stays whole: a sealed token opens only for its own account, key
//! rotation never drops a key that still opens a row, and a change is stored together with
//! its audit row and event or not at all.

use amoauth::config::Settings;
use amoauth::crypto::key_id;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload};
use chrono::Utc;
use sqlx::AssertSqlSafe;

use crate::support::*;

const TOKEN_PATH: &str = "/api/v1/connections/31337001/token";
/// base64 of 32 bytes of 9: the key rotated to.
const NEW_KEY: &str = "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The server's key as base64: the key file beside a SQLite database, else the configured one.
fn server_key(backend: &Backend, database_url: &str) -> String {
    match backend {
        Backend::Sqlite => {
            let file = format!("{}.key", database_url.trim_start_matches("sqlite://"));
            std::fs::read_to_string(file).unwrap()
        }
        _ => ENCRYPTION_KEY.to_owned(),
    }
}

/// Runs SQL as written, outside prepared statements (MySQL cannot prepare CREATE TRIGGER).
async fn run_script(db: &TestDb, sql: &str) {
    let sql = AssertSqlSafe(sql.to_owned());
    match db {
        TestDb::Sqlite(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
        TestDb::Postgres(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
        TestDb::MySql(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
    }
    .unwrap();
}

/// `amoauth <args>` on the test's database with `keys` as AMOAUTH_ENCRYPTION_KEY.
fn run(database_url: &str, keys: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut command = amoauth_command(dir.path());
    command.env("DATABASE_URL", database_url).args(args);
    if let Some(keys) = keys {
        command.env("AMOAUTH_ENCRYPTION_KEY", keys);
    }
    let output = command.output().unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// Makes every re-seal of the connection lose to a writer that keeps the old key, as a
/// replica running with the old key does: the re-sealed pair is put back and the version
/// bumped. With `once`, only the first re-seal (version 1) loses.
async fn old_key_writer(db: &TestDb, once: bool) {
    let condition = if once { " AND OLD.version = 1" } else { "" };
    match db {
        TestDb::Sqlite(_) => {
            run_script(
                db,
                &format!(
                    "CREATE TRIGGER old_key_writer AFTER UPDATE OF key_id ON amocrm_tokens \
                 WHEN NEW.key_id <> OLD.key_id{condition} BEGIN \
                 UPDATE amocrm_tokens SET access_token = OLD.access_token, \
                 refresh_token = OLD.refresh_token, key_id = OLD.key_id, version = OLD.version + 1 \
                 WHERE id = OLD.id; END"
                ),
            )
            .await
        }
        TestDb::Postgres(_) => {
            run_script(
                db,
                &format!(
                    "CREATE FUNCTION old_key_writer() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                 IF NEW.key_id <> OLD.key_id{condition} THEN \
                 NEW.access_token := OLD.access_token; NEW.refresh_token := OLD.refresh_token; \
                 NEW.key_id := OLD.key_id; NEW.version := OLD.version + 1; END IF; \
                 RETURN NEW; END $$; \
                 CREATE TRIGGER old_key_writer BEFORE UPDATE ON amocrm_tokens \
                 FOR EACH ROW EXECUTE FUNCTION old_key_writer()"
                ),
            )
            .await
        }
        TestDb::MySql(_) => run_script(
            db,
            &format!(
                "CREATE TRIGGER old_key_writer BEFORE UPDATE ON amocrm_tokens FOR EACH ROW BEGIN \
                 IF NEW.key_id <> OLD.key_id{condition} THEN \
                 SET NEW.access_token = OLD.access_token, NEW.refresh_token = OLD.refresh_token, \
                 NEW.key_id = OLD.key_id, NEW.version = OLD.version + 1; END IF; END"
            ),
        )
        .await,
    }
}

async fn a_token_copied_into_another_accounts_row_is_refused(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.connect().await;
    let key = app.api_key().await;
    let (status, body) = app.api(TOKEN_PATH, &key).await;
    assert_eq!(status, 200, "{body}");
    let victim_token = body["access_token"].as_str().unwrap().to_owned();
    // Someone with write access to the database (and no key) gives account 42 a row holding
    // account 31337001's sealed tokens.
    app.db()
        .execute(
            "INSERT INTO amocrm_tokens (account_id, account_name, domain, subdomain, access_token, \
             refresh_token, key_id, expires_at, refresh_expires_at, issued_at, status, \
             refresh_failures, version, created_at, updated_at) \
             SELECT 42, 'other', 'other.amocrm.ru', 'other', access_token, refresh_token, key_id, \
             expires_at, refresh_expires_at, issued_at, status, 0, 1, created_at, updated_at \
             FROM amocrm_tokens WHERE account_id = 31337001",
        )
        .await;

    let (status, body) = app.api("/api/v1/connections/42/token", &key).await;

    assert_ne!(status, 200, "{body}");
    assert!(!body.to_string().contains(&victim_token), "{body}");
    // The victim's own row still serves.
    assert_eq!(app.api(TOKEN_PATH, &key).await.0, 200);
    app.stop().await;
}

async fn tokens_sealed_before_account_binding_are_resealed_at_start(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.connect().await;
    let api_key = app.api_key().await;
    let (status, body) = app.api(TOKEN_PATH, &api_key).await;
    assert_eq!(status, 200, "{body}");
    let access = body["access_token"].as_str().unwrap().to_owned();
    // Write the pair as the earlier format did: bound to its column only.
    let key_b64 = server_key(&backend, &app.database_url);
    let key: [u8; 32] = B64.decode(key_b64.trim()).unwrap().try_into().unwrap();
    let aead = chacha20poly1305::XChaCha20Poly1305::new_from_slice(&key).unwrap();
    let unbound = |plaintext: &str, column: &str| {
        let nonce = [3u8; 24];
        let mut blob = nonce.to_vec();
        let payload = Payload {
            msg: plaintext.as_bytes(),
            aad: column.as_bytes(),
        };
        blob.extend(aead.encrypt(&nonce.into(), payload).unwrap());
        B64.encode(blob)
    };
    let sql = format!(
        "UPDATE amocrm_tokens SET access_token = '{}', refresh_token = '{}', key_id = '{}'",
        unbound(&access, "access_token"),
        unbound("old-refresh-token", "refresh_token"),
        key_id(&key)
    );
    app.db().execute_built(sql).await;
    let legacy = app
        .db()
        .string("SELECT access_token FROM amocrm_tokens")
        .await;
    assert_ne!(
        app.api(TOKEN_PATH, &api_key).await.0,
        200,
        "nothing reads the earlier format but the re-seal"
    );

    // Two replicas start at once.
    let config = Settings {
        database_url: Some(app.database_url.clone()),
        encryption_key: Some(key_b64.trim().to_owned()),
        ..Settings::default()
    }
    .store()
    .unwrap();
    let start = || async {
        let store = amoauth::server::open_store(&config).await.unwrap();
        amoauth::server::open_cipher(&config, &store).await.unwrap();
    };
    tokio::join!(start(), start());

    let resealed = app
        .db()
        .string("SELECT access_token FROM amocrm_tokens")
        .await;
    assert_ne!(resealed, legacy);
    assert!(resealed.starts_with("v2."), "{resealed}");
    let (status, body) = app.api(TOKEN_PATH, &api_key).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["access_token"], access.as_str());
    assert_eq!(app.count("SELECT version FROM amocrm_tokens").await, 1);
    app.stop().await;
}

async fn rotate_key_retries_a_row_written_during_the_reseal(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.connect().await;
    let old_key = server_key(&backend, &app.database_url);
    let both = format!("{NEW_KEY},{}", old_key.trim());
    let new_id = key_id(&[9u8; 32]);
    old_key_writer(app.db(), true).await;

    let (ok, stdout, stderr) = run(&app.database_url, Some(&both), &["rotate-key"]);

    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.starts_with(&format!("re-encrypted 1 connections with key {new_id}")),
        "{stdout}"
    );
    assert_eq!(
        app.db().string("SELECT key_id FROM amocrm_tokens").await,
        new_id
    );
    let (ok, listing, stderr) = run(&app.database_url, Some(NEW_KEY), &["tokens"]);
    assert!(ok, "the new key alone reads every token: {stderr}");
    assert!(listing.contains("eyJ"), "{listing}");
    app.stop().await;
}

async fn rotate_key_names_and_keeps_a_key_still_in_use(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.connect().await;
    let old_key = server_key(&backend, &app.database_url);
    let old_id = key_id(&B64.decode(old_key.trim()).unwrap().try_into().unwrap());
    let both = format!("{NEW_KEY},{}", old_key.trim());
    old_key_writer(app.db(), false).await;

    let (ok, stdout, stderr) = run(&app.database_url, Some(&both), &["rotate-key"]);

    assert!(!ok, "the old key still opens a row: {stdout}");
    assert!(
        stderr.contains(&format!(
            "key ids {old_id} (1 connections) still seal tokens"
        )),
        "{stderr}"
    );
    assert!(!stdout.contains("can be removed"), "{stdout}");
    let (ok, _, stderr) = run(&app.database_url, Some(&both), &["tokens"]);
    assert!(ok, "{stderr}");
    app.stop().await;
}

#[tokio::test]
async fn rotate_key_keeps_a_key_file_entry_still_in_use() {
    let app = TestApp::spawn(&Backend::Sqlite).await;
    app.connect().await;
    let file = format!("{}.key", app.database_url.trim_start_matches("sqlite://"));
    let before = std::fs::read_to_string(&file).unwrap();
    old_key_writer(app.db(), false).await;

    let (ok, stdout, stderr) = run(&app.database_url, None, &["rotate-key"]);

    assert!(!ok, "{stdout}");
    let old_id = key_id(&B64.decode(before.trim()).unwrap().try_into().unwrap());
    assert!(stderr.contains(&old_id), "{stderr}");
    let after = std::fs::read_to_string(&file).unwrap();
    assert!(after.contains(before.trim()), "the old key is kept");
    let (ok, listing, stderr) = run(&app.database_url, None, &["tokens"]);
    assert!(ok, "{stderr}");
    assert!(listing.contains("eyJ"), "{listing}");
    app.stop().await;
}

async fn a_refresh_whose_audit_row_cannot_be_written_is_not_stored(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.connect().await;
    let key = app.api_key().await;
    let sealed_before = app
        .db()
        .string("SELECT refresh_token FROM amocrm_tokens")
        .await;
    let expired = Utc::now().naive_utc() - chrono::Duration::hours(1);
    app.db().set_token_time("expires_at", expired).await;
    // The fault: the audit table is gone, so writing the refresh's audit row fails.
    app.db().execute("DROP TABLE amocrm_oauth_attempts").await;

    let (status, body) = app.api(TOKEN_PATH, &key).await;

    assert_ne!(status, 200, "{body}");
    assert_eq!(app.sandbox.stats().successful_refreshes, 1);
    assert_eq!(
        app.count("SELECT version FROM amocrm_tokens").await,
        1,
        "the refreshed pair was stored without its audit row"
    );
    assert_eq!(
        app.db()
            .string("SELECT refresh_token FROM amocrm_tokens")
            .await,
        sealed_before
    );
    app.stop().await;
}

async fn a_connection_whose_event_cannot_be_written_is_not_saved(backend: Backend) {
    let app = TestApp::spawn_with(
        &backend,
        Options {
            events_url: Some("http://127.0.0.1:9/events".into()),
            ..Options::default()
        },
    )
    .await;
    // The fault: the outbox is gone, so writing connection.created fails.
    app.db().execute("DROP TABLE amoauth_events").await;

    let callback = app.allowed_callback_url().await;
    let (status, body) = app.open_callback(&callback).await;

    assert_ne!(status, 200, "{body}");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM amocrm_tokens").await,
        0,
        "the connection was saved without its event"
    );
    assert_eq!(
        app.db()
            .string("SELECT outcome FROM amocrm_oauth_attempts WHERE kind = 'callback'")
            .await,
        "failure"
    );
    app.stop().await;
}

async fn a_disconnect_whose_event_cannot_be_written_changes_nothing(backend: Backend) {
    let app = TestApp::spawn_with(
        &backend,
        Options {
            events_url: Some("http://127.0.0.1:9/events".into()),
            ..Options::default()
        },
    )
    .await;
    app.connect().await;
    app.db().execute("DROP TABLE amoauth_events").await;
    let signature = amoauth::sandbox::uninstall_signature(CLIENT_ID, CLIENT_SECRET, ACCOUNT_ID);
    let url = format!(
        "{}/amocrm/webhook/uninstall?client_uuid={CLIENT_ID}&account_id={ACCOUNT_ID}&signature={signature}",
        app.base
    );

    let (status, body) = app.get(&url).await;

    assert_ne!(status, 200, "{body}");
    assert_eq!(
        app.db().string("SELECT status FROM amocrm_tokens").await,
        "active",
        "the tokens were wiped without the event"
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM amocrm_oauth_attempts WHERE kind = 'webhook' AND reason = 'disconnected'")
            .await,
        0
    );
    app.stop().await;
}

on_all_backends!(
    a_token_copied_into_another_accounts_row_is_refused,
    tokens_sealed_before_account_binding_are_resealed_at_start,
    rotate_key_retries_a_row_written_during_the_reseal,
    rotate_key_names_and_keeps_a_key_still_in_use,
    a_refresh_whose_audit_row_cannot_be_written_is_not_stored,
    a_connection_whose_event_cannot_be_written_is_not_saved,
    a_disconnect_whose_event_cannot_be_written_changes_nothing,
);
