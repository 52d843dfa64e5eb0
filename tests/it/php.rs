//! The host app's side in PHP, as README shows it: `examples/php` run by Debian's `php-cli`
//! against a real amoauth. Ignored without `/usr/bin/php`, except in CI.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::*;

const PHP: &str = "/usr/bin/php";
const RETURN_ORIGIN: &str = "https://app.example.com";

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/php")
}

/// `php cli.php ARGS…` against `app` with `key`: exit success, stdout, stderr. Async, as the
/// server it calls runs on this test's runtime.
async fn php_cli(app: &TestApp, key: &str, args: &[&str]) -> (bool, String, String) {
    let output = tokio::process::Command::new(PHP)
        .arg(examples().join("cli.php"))
        .args(args)
        .env("AMOAUTH_URL", &app.base)
        .env("AMOAUTH_API_KEY", key)
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// PHP's built-in web server running `events.php`; killed when dropped.
struct PhpServer {
    child: Child,
    url: String,
}

impl PhpServer {
    async fn start(events_log: &Path) -> Self {
        let port = free_port();
        let child = Command::new(PHP)
            .args(["-S", &format!("127.0.0.1:{port}")])
            .arg(examples().join("events.php"))
            .env("AMOAUTH_EVENTS_SECRET", EVENTS_SECRET)
            .env("EVENTS_LOG", events_log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            url: format!("http://127.0.0.1:{port}/"),
        }
    }
}

impl Drop for PhpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
#[cfg_attr(amoauth_lacks_php, ignore = "apt-get install -y php-cli")]
async fn the_php_client_gets_tokens_lists_connections_and_makes_connect_links() {
    require_programs(&[PHP], "apt-get install -y php-cli");
    let options = Options {
        return_origins: Some(RETURN_ORIGIN),
        ..Options::default()
    };
    let app = TestApp::spawn_with(&Backend::Sqlite, options).await;
    app.connect().await;
    let key = app.api_key().await;

    let (ok, stdout, stderr) = php_cli(&app, &key, &["token", &ACCOUNT_ID.to_string()]).await;
    assert!(ok, "{stderr}");
    let token: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let (_, from_rust) = app
        .api(&format!("/api/v1/connections/{ACCOUNT_ID}/token"), &key)
        .await;
    assert_eq!(token["access_token"], from_rust["access_token"]);
    assert_eq!(token["domain"], ACCOUNT_HOST);

    let (ok, stdout, stderr) = php_cli(&app, &key, &["connections"]).await;
    assert!(ok, "{stderr}");
    let list: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(list[0]["account_id"], ACCOUNT_ID, "{list}");

    let return_url = format!("{RETURN_ORIGIN}/amo/done");
    let (ok, stdout, stderr) =
        php_cli(&app, &key, &["connect-link", "tenant-42", &return_url]).await;
    assert!(ok, "{stderr}");
    let link: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let url = link["url"].as_str().unwrap();
    assert!(url.starts_with(&app.sandbox_origin), "{url}");
    let callback = app.consent(url, "allow").await;
    let back = location(&app.client.get(&callback).send().await.unwrap());
    assert!(back.starts_with(&return_url), "{back}");
    let (ok, stdout, stderr) = php_cli(&app, &key, &["connections", "tenant-42"]).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("\"external_id\":\"tenant-42\""), "{stdout}");
    app.stop().await;
}

#[tokio::test]
#[cfg_attr(amoauth_lacks_php, ignore = "apt-get install -y php-cli")]
async fn the_php_client_calls_amocrm_through_the_gateway() {
    require_programs(&[PHP], "apt-get install -y php-cli");
    let app = TestApp::spawn(&Backend::Sqlite).await;
    app.connect().await;
    let key = app.api_key().await;
    let account = ACCOUNT_ID.to_string();

    let created = r#"[{"name":"From PHP","price":1500}]"#;
    let (ok, stdout, stderr) = php_cli(
        &app,
        &key,
        &["amocrm", &account, "POST", "api/v4/leads", created],
    )
    .await;
    assert!(ok, "{stderr}");
    let answer: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(answer["status"], 200, "{answer}");
    let id = answer["body"]["_embedded"]["leads"][0]["id"].clone();
    assert!(id.is_i64(), "{answer}");

    let (ok, stdout, stderr) =
        php_cli(&app, &key, &["amocrm", &account, "GET", "api/v4/leads"]).await;
    assert!(ok, "{stderr}");
    let answer: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let lead = &answer["body"]["_embedded"]["leads"][0];
    assert_eq!(
        (&lead["id"], &lead["name"]),
        (&id, &serde_json::json!("From PHP"))
    );
    assert_eq!(app.sandbox.api_stats().account(ACCOUNT_ID).requests, 2);

    // amoauth's own refusals are exceptions with their code; amoCRM's answers are returned.
    let (ok, _, stderr) = php_cli(
        &app,
        &key,
        &["amocrm", &account, "POST", "oauth2/access_token"],
    )
    .await;
    assert!(!ok);
    assert!(
        stderr.starts_with("amoauth: path_not_forwarded: "),
        "{stderr}"
    );
    let (ok, stdout, stderr) =
        php_cli(&app, &key, &["amocrm", &account, "GET", "api/v4/leads/1"]).await;
    assert!(ok, "{stderr}");
    let answer: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(answer["status"], 204, "no such lead: amoCRM's empty answer");
    assert!(answer["body"].is_null(), "{answer}");
    app.stop().await;
}

#[tokio::test]
#[cfg_attr(amoauth_lacks_php, ignore = "apt-get install -y php-cli")]
async fn the_php_client_reports_amoauths_errors_by_code() {
    require_programs(&[PHP], "apt-get install -y php-cli");
    let app = TestApp::spawn(&Backend::Sqlite).await;
    let key = app.api_key().await;

    let (ok, _, stderr) = php_cli(&app, &key, &["token", "nobody"]).await;
    assert!(!ok);
    assert!(stderr.starts_with("amoauth: not_found: "), "{stderr}");

    let (ok, _, stderr) = php_cli(&app, "ak_wrong", &["token", "nobody"]).await;
    assert!(!ok);
    assert!(stderr.starts_with("amoauth: unauthorized: "), "{stderr}");

    let (ok, _, stderr) = php_cli(
        &app,
        &key,
        &["connect-link", "tenant-1", "https://evil.example/x"],
    )
    .await;
    assert!(!ok);
    assert!(
        stderr.starts_with("amoauth: return_url_not_allowed: "),
        "{stderr}"
    );
    app.stop().await;
}

#[tokio::test]
#[cfg_attr(amoauth_lacks_php, ignore = "apt-get install -y php-cli")]
async fn a_php_endpoint_accepts_amoauths_signed_events_and_refuses_forgeries() {
    require_programs(&[PHP], "apt-get install -y php-cli");
    let dir = tempfile::tempdir().unwrap();
    let events_log = dir.path().join("events.jsonl");
    let php = PhpServer::start(&events_log).await;
    let options = Options {
        events_url: Some(php.url.clone()),
        ..Options::default()
    };
    let app = TestApp::spawn_with(&Backend::Sqlite, options).await;
    app.connect().await;

    let mut received = String::new();
    for _ in 0..200 {
        received = std::fs::read_to_string(&events_log).unwrap_or_default();
        if !received.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let event: serde_json::Value = serde_json::from_str(received.lines().next().unwrap()).unwrap();
    assert_eq!(event["type"], "connection.created");
    assert_eq!(event["data"]["account_id"], ACCOUNT_ID);
    // The endpoint logs before it answers, so amoauth's bookkeeping may lag a moment.
    let mut delivered = 0;
    for _ in 0..200 {
        delivered = app
            .count("SELECT COUNT(*) FROM amoauth_events WHERE status = 'delivered'")
            .await;
        if delivered == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(delivered, 1, "the PHP endpoint's 204 counts as delivered");

    let now = chrono::Utc::now().timestamp().to_string();
    let body = r#"{"id":9,"type":"connection.disconnected","data":{"account_id":1}}"#;
    let forged = app
        .client
        .post(&php.url)
        .header("X-Amoauth-Timestamp", &now)
        .header("X-Amoauth-Signature", format!("sha256={}", "0".repeat(64)))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401, "a wrong signature is refused");
    let old = (chrono::Utc::now().timestamp() - 3600).to_string();
    let signature = hmac_hex(EVENTS_SECRET, &format!("{old}.{body}"));
    let replayed = app
        .client
        .post(&php.url)
        .header("X-Amoauth-Timestamp", &old)
        .header("X-Amoauth-Signature", format!("sha256={signature}"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(replayed.status(), 401, "an hour-old timestamp is refused");
    assert_eq!(
        std::fs::read_to_string(&events_log)
            .unwrap()
            .lines()
            .count(),
        1,
        "neither reached the log"
    );
    app.stop().await;
}

fn hmac_hex(key: &str, message: &str) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Every PHP block README shows is a piece of the tested examples, or (Laravel's wiring, which
/// needs a Laravel app) at least parses.
#[test]
#[cfg_attr(amoauth_lacks_php, ignore = "apt-get install -y php-cli")]
fn readme_php_blocks_are_the_tested_examples_or_parse() {
    require_programs(&[PHP], "apt-get install -y php-cli");
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let examples: String = ["Amoauth.php", "events.php", "cli.php"]
        .iter()
        .map(|name| std::fs::read_to_string(examples().join(name)).unwrap())
        .collect();
    let blocks: Vec<&str> = readme
        .split("```php\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap())
        .collect();
    assert!(blocks.len() >= 2, "README shows PHP");
    let dir = tempfile::tempdir().unwrap();
    for (index, block) in blocks.iter().enumerate() {
        if examples.contains(block.trim()) {
            continue;
        }
        let file = dir.path().join(format!("block{index}.php"));
        std::fs::write(&file, format!("<?php\n{block}")).unwrap();
        let lint = Command::new(PHP).arg("-l").arg(&file).output().unwrap();
        assert!(
            lint.status.success(),
            "README's PHP block {index} does not parse:\n{block}\n{}",
            String::from_utf8_lossy(&lint.stdout)
        );
    }
}
