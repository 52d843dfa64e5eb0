//! examples/embed.rs, built and run as a program: a host axum app with amoauth mounted
//! under `/amocrm-auth` beside its own routes, driven through an install on the sandbox to a
//! token read in-process.

use std::time::Duration;

use crate::support::*;

/// The example binary `cargo test` builds next to the test binaries' directory.
fn example_binary(name: &str) -> std::path::PathBuf {
    let deps = std::env::current_exe().unwrap();
    let profile_dir = deps.parent().unwrap().parent().unwrap();
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds it (or `cargo build --examples`)",
        path.display()
    );
    path
}

/// Kills the example when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_embed_example_mounts_amoauth_beside_its_routes_and_reads_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let origin = format!("http://127.0.0.1:{port}");
    let redirect_uri = format!("{origin}/amocrm/callback");
    let (_sandbox, sandbox_origin) = spawn_sandbox(&redirect_uri).await;
    let _example = Child(
        std::process::Command::new(example_binary("embed"))
            .env_clear()
            .current_dir(dir.path())
            .env("EMBED_LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "DATABASE_URL",
                format!("sqlite://{}", dir.path().join("embed.db").display()),
            )
            .env("AMOCRM_CLIENT_ID", CLIENT_ID)
            .env("AMOCRM_CLIENT_SECRET", CLIENT_SECRET)
            .env("AMOCRM_REDIRECT_URI", &redirect_uri)
            .env("AMOAUTH_AMOCRM_URL", &sandbox_origin)
            .env("AMOAUTH_ADMIN_TOKEN", ADMIN_TOKEN)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let client = http_client();
    let mut home = None;
    for _ in 0..200 {
        if let Ok(response) = client.get(format!("{origin}/")).send().await {
            home = Some(response.text().await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(home.as_deref(), Some("the host app's own page\n"));

    let health = client
        .get(format!("{origin}/amocrm-auth/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200, "amoauth answers under the prefix");
    let install = client
        .get(format!("{origin}/amocrm/install"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(install.status(), 303, "install redirects to consent");
    let callback = consent(&client, &sandbox_origin, &location(&install), "allow").await;
    let (status, page) = open_callback(&client, &callback).await;
    assert_eq!(status, 200, "{page}");

    let token = client
        .get(format!("{origin}/crm/{ACCOUNT_ID}"))
        .send()
        .await
        .unwrap();
    assert_eq!(token.status(), 200);
    let token: serde_json::Value = token.json().await.unwrap();
    assert_eq!(token["account_id"], ACCOUNT_ID);
    assert_eq!(token["domain"], ACCOUNT_HOST);
    assert!(token["token_length"].as_u64().unwrap() > 20, "{token}");
}

/// `.database(pool)`: amoauth migrates its tables into the host app's own pool and serves
/// from it, with the configured key (no key file: a pool names no file).
async fn the_builder_takes_the_host_apps_own_pool(backend: Backend) {
    let database = backend.fresh_database().await;
    let builder = amoauth::Amoauth::builder()
        .amocrm(
            CLIENT_ID,
            CLIENT_SECRET,
            "https://app.example/amocrm/callback",
        )
        .encryption_key(ENCRYPTION_KEY);
    let builder = match &database.db {
        TestDb::Sqlite(pool) => builder.database(pool.clone()),
        TestDb::Postgres(pool) => builder.database(pool.clone()),
        TestDb::MySql(pool) => builder.database(pool.clone()),
    };
    let amoauth = builder.build().await.unwrap();

    assert_eq!(
        database
            .db
            .count("SELECT COUNT(*) FROM amocrm_tokens")
            .await,
        0,
        "the tables were migrated into the host's pool"
    );
    assert!(matches!(
        amoauth.access_token("mycompany").await,
        Err(amoauth::TokenError::NotFound(_))
    ));
    database.drop_database().await;
}

on_all_backends!(the_builder_takes_the_host_apps_own_pool);
