//! Encryption key rotation: several keys read, one writes, `amoauth rotate-key` re-seals.

use amoauth::internal::key_id;

use crate::support::*;

/// base64 of 32 bytes of 9: the key rotated to.
const NEW_KEY: &str = "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=";

fn run(
    dir: &std::path::Path,
    database_url: &str,
    keys: &str,
    args: &[&str],
) -> (bool, String, String) {
    let output = amoauth_command(dir)
        .env("DATABASE_URL", database_url)
        .env("AMOAUTH_ENCRYPTION_KEY", keys)
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

async fn rotate_key_reseals_every_token_with_the_new_key(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.connect().await;
    let old_key = match backend {
        Backend::Sqlite => {
            let file = format!("{}.key", app.database_url.trim_start_matches("sqlite://"));
            std::fs::read_to_string(file).unwrap()
        }
        _ => ENCRYPTION_KEY.to_owned(),
    };
    let dir = tempfile::tempdir().unwrap();
    let both = format!("{NEW_KEY},{old_key}");
    let new_id = key_id(&[9u8; 32]);

    let (ok, stdout, stderr) = run(dir.path(), &app.database_url, &both, &["rotate-key"]);

    assert!(ok, "{stderr}");
    assert!(
        stdout.starts_with(&format!("re-encrypted 1 connections with key {new_id}")),
        "{stdout}"
    );
    assert_eq!(
        app.db().string("SELECT key_id FROM amocrm_tokens").await,
        new_id
    );
    let (ok, listing, stderr) = run(dir.path(), &app.database_url, NEW_KEY, &["tokens"]);
    assert!(ok, "the new key alone reads every token: {stderr}");
    assert!(listing.contains("eyJ"), "{listing}");
    // The old key alone is refused with a clear line, not garbage tokens.
    let (ok, _, stderr) = run(dir.path(), &app.database_url, &old_key, &["tokens"]);
    assert!(!ok);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("AMOAUTH_ENCRYPTION_KEY")
            && stderr.contains("not among the configured keys"),
        "{stderr}"
    );
    // A second rotation with the same keys has nothing left to do.
    let (ok, stdout, _) = run(dir.path(), &app.database_url, &both, &["rotate-key"]);
    assert!(ok);
    assert!(stdout.starts_with("re-encrypted 0 connections"), "{stdout}");
    app.stop().await;
}

on_all_backends!(rotate_key_reseals_every_token_with_the_new_key);

#[tokio::test]
async fn rotate_key_replaces_the_sqlite_key_file() {
    let app = TestApp::spawn(&Backend::Sqlite).await;
    app.connect().await;
    let file = format!("{}.key", app.database_url.trim_start_matches("sqlite://"));
    let before = std::fs::read_to_string(&file).unwrap();
    let dir = tempfile::tempdir().unwrap();

    let output = amoauth_command(dir.path())
        .env("DATABASE_URL", &app.database_url)
        .arg("rotate-key")
        .output()
        .unwrap();

    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let after = std::fs::read_to_string(&file).unwrap();
    assert_ne!(after, before);
    assert!(!after.contains(','), "only the new key is left");
    let tokens = amoauth_command(dir.path())
        .env("DATABASE_URL", &app.database_url)
        .arg("tokens")
        .output()
        .unwrap();
    assert!(
        tokens.status.success(),
        "{}",
        String::from_utf8_lossy(&tokens.stderr)
    );
    assert!(String::from_utf8(tokens.stdout).unwrap().contains("eyJ"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    app.stop().await;
}
