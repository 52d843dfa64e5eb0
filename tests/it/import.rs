//! Taking over the seed app's tables: `amoauth import`, and migrations that refuse to touch
//! tables amoauth did not create.

use std::time::Duration;

use amoauth::sandbox::{ApiLimits, Sandbox, SandboxAccount, SandboxConfig};

use crate::support::*;

/// The seed app's tables, as its Laravel migrations made them (plain-text tokens).
fn seed_schema(backend: &Backend) -> [&'static str; 2] {
    match backend {
        Backend::Sqlite => [
            "CREATE TABLE amocrm_oauth_states (state TEXT PRIMARY KEY, subdomain TEXT, created_at TEXT, expires_at TEXT)",
            "CREATE TABLE amocrm_tokens (id INTEGER PRIMARY KEY AUTOINCREMENT, domain TEXT, access_token TEXT, \
             refresh_token TEXT, expires_at TEXT, raw TEXT, created_at TEXT, updated_at TEXT)",
        ],
        Backend::Postgres(_) => [
            "CREATE TABLE amocrm_oauth_states (state VARCHAR(64) PRIMARY KEY, subdomain VARCHAR(255), created_at TIMESTAMP, expires_at TIMESTAMP)",
            "CREATE TABLE amocrm_tokens (id BIGSERIAL PRIMARY KEY, domain VARCHAR(255), access_token TEXT, \
             refresh_token TEXT, expires_at TIMESTAMP, raw JSON, created_at TIMESTAMP, updated_at TIMESTAMP)",
        ],
        Backend::MySql(_) => [
            "CREATE TABLE amocrm_oauth_states (state VARCHAR(64) PRIMARY KEY, subdomain VARCHAR(255), created_at TIMESTAMP NULL, expires_at TIMESTAMP NULL, INDEX (expires_at))",
            "CREATE TABLE amocrm_tokens (id BIGINT AUTO_INCREMENT PRIMARY KEY, domain VARCHAR(255), access_token TEXT, \
             refresh_token TEXT, expires_at TIMESTAMP NULL, raw JSON NULL, created_at TIMESTAMP NULL, updated_at TIMESTAMP NULL)",
        ],
    }
}

async fn migrations_refuse_the_seed_apps_tables_and_leave_them_alone(backend: Backend) {
    let database = backend.fresh_database().await;
    for statement in seed_schema(&backend) {
        database.db.execute_built(statement.to_owned()).await;
    }
    database
        .db
        .execute_built("INSERT INTO amocrm_tokens (domain, access_token, refresh_token) VALUES ('fastis02', 'a', 'r')".into())
        .await;
    let dir = tempfile::tempdir().unwrap();

    let output = amoauth_command(dir.path())
        .env("DATABASE_URL", &database.url)
        .env("AMOAUTH_ENCRYPTION_KEY", ENCRYPTION_KEY)
        .arg("migrate")
        .output()
        .unwrap();

    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(!output.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("amocrm_tokens") && stderr.contains("amoauth import"),
        "{stderr}"
    );
    assert_eq!(
        database
            .db
            .count("SELECT COUNT(*) FROM amocrm_tokens")
            .await,
        1,
        "the rows stay"
    );
    assert_eq!(
        database
            .db
            .string("SELECT refresh_token FROM amocrm_tokens")
            .await,
        "r"
    );
    // Not a column was added: amoauth's own `status` column is not there.
    assert_eq!(
        database
            .db
            .count("SELECT COUNT(*) FROM amocrm_oauth_states")
            .await,
        0
    );
    database.drop_database().await;
}

on_all_backends!(migrations_refuse_the_seed_apps_tables_and_leave_them_alone);

const ALPHA: i64 = 40_000_001;
const BETA: i64 = 40_000_002;
const GAMMA: i64 = 40_000_003;

/// A pair issued by the sandbox for `account_id`, as the seed app would have stored it.
async fn pair_for(
    sandbox: &Sandbox,
    origin: &str,
    redirect_uri: &str,
    account_id: i64,
) -> (String, String) {
    let code = sandbox.authorize(account_id);
    let response: serde_json::Value = http_client()
        .post(format!("{origin}/oauth2/access_token"))
        .form(&[
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", redirect_uri),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        response["access_token"].as_str().unwrap().to_owned(),
        response["refresh_token"].as_str().unwrap().to_owned(),
    )
}

async fn run_import(target: &str, sandbox_origin: &str, source: &str, dry_run: bool) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut command = amoauth_command(dir.path());
    command
        .env("DATABASE_URL", target)
        .env("AMOAUTH_ENCRYPTION_KEY", ENCRYPTION_KEY)
        .env("AMOCRM_CLIENT_ID", CLIENT_ID)
        .env("AMOCRM_CLIENT_SECRET", CLIENT_SECRET)
        .env("AMOCRM_REDIRECT_URI", "http://127.0.0.1:1/amocrm/callback")
        .env("AMOAUTH_AMOCRM_URL", sandbox_origin)
        .args(["import", "--from", source]);
    if dry_run {
        command.arg("--dry-run");
    }
    // Awaited, not blocking: the sandbox it talks to runs on this test's runtime.
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::from(command).output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Three accounts in a table laid out like the seed's: one healthy, one whose access token has
/// expired, one whose refresh token amoCRM revoked.
async fn import_takes_over_the_seed_apps_connections(source_backend: Backend) {
    let redirect_uri = "http://127.0.0.1:1/amocrm/callback";
    let account = |id, subdomain: &str| SandboxAccount {
        id,
        name: format!("Account {subdomain}"),
        subdomain: subdomain.into(),
        domain: "amocrm.ru".into(),
    };
    let sandbox = Sandbox::new(SandboxConfig {
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.into(),
        redirect_uri: redirect_uri.into(),
        access_token_ttl: Duration::from_secs(86_400),
        accounts: vec![
            account(ALPHA, "alpha"),
            account(BETA, "beta"),
            account(GAMMA, "gamma"),
        ],
        api: ApiLimits::default(),
        kommo: None,
    });
    let addr = sandbox.spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let origin = format!("http://localhost:{}", addr.port());
    let source = source_backend.fresh_database().await;
    for statement in seed_schema(&source_backend) {
        source.db.execute_built(statement.to_owned()).await;
    }
    let mut plaintext = Vec::new();
    for (id, domain, expires) in [
        (ALPHA, "alpha", "2030-01-01 00:00:00"),
        (BETA, "beta.amocrm.ru", "2020-01-01 00:00:00"),
        (GAMMA, "gamma", "2030-01-01 00:00:00"),
    ] {
        let (access, refresh) = pair_for(&sandbox, &origin, redirect_uri, id).await;
        source
            .db
            .execute_built(format!(
                "INSERT INTO amocrm_tokens (domain, access_token, refresh_token, expires_at) \
                 VALUES ('{domain}', '{access}', '{refresh}', '{expires}')"
            ))
            .await;
        plaintext.extend([access, refresh]);
    }
    sandbox.revoke_tokens(GAMMA);
    let target = Backend::Sqlite.fresh_database().await;
    let refreshes_before = sandbox.stats().refreshes;
    let source_file = source_file(&source);
    let source_before = source_file.as_ref().map(|file| file_state(file));

    let dry = run_import(&target.url, &origin, &source.url, true).await;
    if let Some(file) = &source_file {
        assert_eq!(
            Some(file_state(file)),
            source_before,
            "a dry run opens the source read-only"
        );
    }
    assert!(
        dry.contains("would import alpha") && dry.contains("would import beta.amocrm.ru"),
        "{dry}"
    );
    assert_eq!(
        sandbox.stats().refreshes,
        refreshes_before,
        "a dry run refreshes nothing"
    );

    let report = run_import(&target.url, &origin, &source.url, false).await;
    if let Some(file) = &source_file {
        assert_eq!(
            Some(file_state(file)),
            source_before,
            "an import opens the source read-only"
        );
    }

    assert!(
        report.contains(&format!("imported alpha (account {ALPHA})")),
        "{report}"
    );
    assert!(
        report.contains(&format!("imported beta.amocrm.ru (account {BETA})")),
        "{report}"
    );
    assert!(
        report.contains("skipped gamma: ") && report.contains("Token has been revoked"),
        "{report}"
    );
    assert!(
        report
            .trim_end()
            .ends_with(&format!("imported 2, skipped 1 (from {})", source.url)),
        "{report}"
    );
    let db = &target.db;
    assert_eq!(
        db.count("SELECT COUNT(*) FROM amocrm_tokens WHERE status = 'active'")
            .await,
        2
    );
    let stored = db.all_text("amocrm_tokens").await;
    assert!(stored.contains("alpha.amocrm.ru") && stored.contains("beta.amocrm.ru"));
    for secret in plaintext.iter().chain(sandbox.issued_secrets().iter()) {
        assert!(
            !stored.contains(secret.as_str()),
            "tokens are stored sealed"
        );
    }

    let again = run_import(&target.url, &origin, &source.url, false).await;
    assert!(again.contains("skipped alpha: already imported"), "{again}");
    assert!(
        again
            .trim_end()
            .ends_with(&format!("imported 0, skipped 3 (from {})", source.url)),
        "{again}"
    );
    assert_eq!(
        db.count("SELECT SUM(version) FROM amocrm_tokens").await,
        2,
        "a second run changes nothing"
    );
    assert_eq!(
        source.db.count("SELECT COUNT(*) FROM amocrm_tokens").await,
        3,
        "the old table is untouched"
    );
    target.drop_database().await;
    source.drop_database().await;
}

/// The source's SQLite file, when it is one.
fn source_file(source: &TestDatabase) -> Option<std::path::PathBuf> {
    let path = source.url.strip_prefix("sqlite://")?;
    Some(std::path::PathBuf::from(path))
}

/// The SHA-256 of a SQLite file's bytes, and which of its `-wal`, `-shm` and `-journal`
/// companions exist: all unchanged means the database was only read.
fn file_state(file: &std::path::Path) -> (String, Vec<String>) {
    use sha2::Digest as _;
    let hash = hex::encode(sha2::Sha256::digest(std::fs::read(file).unwrap()));
    let companions = ["-wal", "-shm", "-journal"]
        .into_iter()
        .filter(|suffix| {
            let mut name = file.as_os_str().to_owned();
            name.push(suffix);
            std::path::Path::new(&name).exists()
        })
        .map(str::to_owned)
        .collect();
    (hash, companions)
}

/// The old table read through a view that reports the transaction's read-only setting as
/// its `domain`: PostgreSQL itself shows that the import's session cannot write.
#[tokio::test]
#[cfg_attr(amoauth_lacks_postgres, ignore = "set AMOAUTH_TEST_POSTGRES_URL")]
async fn the_import_reads_postgresql_in_a_read_only_transaction() {
    let backend = Backend::postgres();
    let source = backend.fresh_database().await;
    source
        .db
        .execute(
            "CREATE VIEW amocrm_tokens AS SELECT 1 AS id, \
             'read-only-' || current_setting('transaction_read_only') AS domain, \
             'a' AS access_token, 'r' AS refresh_token",
        )
        .await;
    let target = Backend::Sqlite.fresh_database().await;

    for dry_run in [true, false] {
        let report = run_import(&target.url, "http://127.0.0.1:1", &source.url, dry_run).await;
        let first = report.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("would import read-only-on")
                || first.starts_with("skipped read-only-on: amoCRM did not refresh"),
            "{report}"
        );
    }
    source.drop_database().await;
}

#[tokio::test]
#[cfg_attr(amoauth_lacks_postgres, ignore = "set AMOAUTH_TEST_POSTGRES_URL")]
async fn import_from_a_postgresql_seed_database() {
    import_takes_over_the_seed_apps_connections(Backend::postgres()).await;
}

#[tokio::test]
async fn import_from_a_sqlite_seed_database() {
    import_takes_over_the_seed_apps_connections(Backend::Sqlite).await;
}

#[tokio::test]
#[cfg_attr(amoauth_lacks_mysql, ignore = "set AMOAUTH_TEST_MYSQL_URL")]
async fn import_from_a_mariadb_seed_database() {
    import_takes_over_the_seed_apps_connections(Backend::mysql()).await;
}

/// The seed's table held amoCRM and Kommo accounts alike: a `kommo.com` row becomes a Kommo
/// connection, refreshed with the Kommo integration; without that integration it is skipped,
/// named, and nothing is sent for it.
#[tokio::test]
async fn import_takes_the_platform_from_the_rows_domain() {
    let redirect_uri = "http://127.0.0.1:1/amocrm/callback";
    let (sandbox, origin) = spawn_sandbox_for(redirect_uri, Platforms::Both).await;
    let source = Backend::Sqlite.fresh_database().await;
    for statement in seed_schema(&Backend::Sqlite) {
        source.db.execute_built(statement.to_owned()).await;
    }
    for (account, host, (client_id, secret)) in [
        (ACCOUNT_ID, "demo", (CLIENT_ID, CLIENT_SECRET)),
        (
            KOMMO_ACCOUNT_ID,
            KOMMO_ACCOUNT_HOST,
            (KOMMO_CLIENT_ID, KOMMO_CLIENT_SECRET),
        ),
    ] {
        let code = sandbox.authorize(account);
        let response: serde_json::Value = http_client()
            .post(format!("{origin}/oauth2/access_token"))
            .form(&[
                ("client_id", client_id),
                ("client_secret", secret),
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", redirect_uri),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let (access, refresh) = (&response["access_token"], &response["refresh_token"]);
        source
            .db
            .execute_built(format!(
                "INSERT INTO amocrm_tokens (domain, access_token, refresh_token, expires_at) \
                 VALUES ('{host}', {access}, {refresh}, '2030-01-01 00:00:00')"
            ))
            .await;
    }
    let import = |kommo: bool| {
        let (origin, source) = (origin.clone(), source.url.clone());
        async move {
            let dir = tempfile::tempdir().unwrap();
            let database = format!("sqlite://{}", dir.path().join("amoauth.db").display());
            let mut command = amoauth_command(dir.path());
            command
                .env("DATABASE_URL", &database)
                .env("AMOAUTH_ENCRYPTION_KEY", ENCRYPTION_KEY)
                .env("AMOCRM_CLIENT_ID", CLIENT_ID)
                .env("AMOCRM_CLIENT_SECRET", CLIENT_SECRET)
                .env("AMOCRM_REDIRECT_URI", redirect_uri)
                .env("AMOAUTH_AMOCRM_URL", &origin)
                .args(["import", "--from", &source]);
            if kommo {
                command
                    .env("KOMMO_CLIENT_ID", KOMMO_CLIENT_ID)
                    .env("KOMMO_CLIENT_SECRET", KOMMO_CLIENT_SECRET)
                    .env("KOMMO_REDIRECT_URI", redirect_uri);
            }
            let output = tokio::process::Command::from(command)
                .output()
                .await
                .unwrap();
            assert!(output.status.success(), "{output:?}");
            let store =
                amoauth::internal::Store::connect(&amoauth::internal::DatabaseUrl::new(database))
                    .await
                    .unwrap();
            let platforms: Vec<_> = store
                .connections()
                .await
                .unwrap()
                .into_iter()
                .map(|row| (row.platform.as_str(), row.domain))
                .collect();
            store.close().await;
            (String::from_utf8(output.stdout).unwrap(), platforms)
        }
    };

    let before = sandbox.stats().refreshes;
    let (report, imported) = import(false).await;
    assert!(
        report.contains("skipped kommodemo.kommo.com: `kommodemo.kommo.com` is a Kommo account, but no Kommo integration is configured"),
        "{report}"
    );
    assert_eq!(imported, [("amocrm", ACCOUNT_HOST.to_owned())]);
    assert_eq!(
        sandbox.stats().refreshes - before,
        1,
        "only amoCRM's row was refreshed"
    );

    let (report, imported) = import(true).await;
    assert!(report.contains("imported 2, skipped 0"), "{report}");
    assert_eq!(
        imported,
        [
            ("amocrm", ACCOUNT_HOST.to_owned()),
            ("kommo", KOMMO_ACCOUNT_HOST.to_owned())
        ]
    );
    source.drop_database().await;
}
