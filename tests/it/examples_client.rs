//! examples/oauth_client.rs, the bare amoCRM client, run as a built binary against the sandbox.

use std::path::PathBuf;

use crate::support::{CLIENT_ID, CLIENT_SECRET, spawn_sandbox};

/// `cargo test` builds the examples next to the test binary: target/<profile>/examples.
fn example_binary(name: &str) -> PathBuf {
    let test_binary = std::env::current_exe().unwrap();
    let profile_dir = test_binary.parent().unwrap().parent().unwrap();
    let path = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds it (`--test it` alone does not; run `cargo build --examples`)",
        path.display()
    );
    path
}

#[tokio::test]
async fn the_oauth_client_example_connects_an_account_and_prints_no_secret() {
    let redirect_uri = "https://app.example/amocrm/callback";
    let (sandbox, origin) = spawn_sandbox(redirect_uri).await;

    let output = tokio::process::Command::new(example_binary("oauth_client"))
        .arg(&origin)
        .env("AMOCRM_CLIENT_ID", CLIENT_ID)
        .env("AMOCRM_CLIENT_SECRET", CLIENT_SECRET)
        .env("AMOCRM_REDIRECT_URI", redirect_uri)
        .env_remove("AMOAUTH_AMOCRM_URL")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");

    let consent = format!("consent page: {origin}/oauth?client_id={CLIENT_ID}&state=example-");
    assert!(stdout.contains(&consent), "{stdout}");
    for line in [
        "callback from: demo.amocrm.ru",
        "exchanged the code: the access token lives 86400 s",
        "account: id 31337001, subdomain demo, name Демо-аккаунт",
        "refreshed at demo.amocrm.ru: new refresh token yes, the access token lives 86400 s",
        "the new access token works: account id 31337001",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    let stats = sandbox.stats();
    assert_eq!(stats.successful_code_exchanges, 1);
    assert_eq!(stats.successful_refreshes, 1);
    assert_eq!(stats.account_lookups, 2);

    let issued = sandbox.issued_secrets();
    assert_eq!(issued.len(), 5, "a code and two pairs: {}", issued.len());
    for secret in issued.iter().map(String::as_str).chain([CLIENT_SECRET]) {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "a secret was printed"
        );
    }
}
