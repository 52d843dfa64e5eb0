//! The flow in a real browser: headless Chromium, driven over W3C WebDriver, logs in to amoauth
//! on 127.0.0.1, clicks Connect, allows at the sandbox on localhost (another site, as amoCRM
//! is) and comes back. Needs Debian's `chromium` and `chromium-driver`; ignored without them,
//! except in CI (`CI` set), where it fails.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::support::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How W3C WebDriver names an element reference in JSON.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

#[tokio::test]
#[cfg_attr(
    amoauth_lacks_chromium,
    ignore = "apt-get install -y chromium chromium-driver"
)]
async fn connects_the_demo_account_in_headless_chromium_across_two_sites() {
    require_programs(
        &[CHROMIUM, CHROMEDRIVER],
        "apt-get install -y chromium chromium-driver",
    );
    let app = TestApp::spawn(&Backend::Sqlite).await;
    let browser = Browser::start().await;

    browser.goto(&format!("{}/login", app.base)).await;
    let token = browser.find("#token").await;
    browser.send_keys(&token, ADMIN_TOKEN).await;
    browser
        .click(&browser.find("button[type=submit]").await)
        .await;
    browser.wait_for("Подключения amoCRM").await;

    browser
        .click(&browser.link("Подключить amoCRM").await)
        .await;
    browser.wait_for("Предоставить доступ").await;
    assert_eq!(
        host(&browser.url().await),
        "localhost",
        "the sandbox's consent page"
    );

    let allow = browser.find("button[name=decision][value=allow]").await;
    browser.click(&allow).await;
    let page = browser.wait_for("amoCRM успешно подключена!").await;
    let result = browser.url().await;
    assert_eq!(host(&result), "127.0.0.1", "{result}");
    assert!(result.contains(RESULT_PATH), "{result}");
    assert!(
        !result.contains("code=") && !result.contains("state="),
        "{result}"
    );
    assert!(page.contains("Демо-аккаунт"), "{page}");
    let attempts = app
        .count("SELECT COUNT(*) FROM amocrm_oauth_attempts")
        .await;

    // F5, then Back (to amoCRM's consent page) and Forward: the same page every time, and the
    // callback never runs again.
    browser.post("/refresh", json!({})).await;
    assert!(
        browser
            .wait_for("Демо-аккаунт")
            .await
            .contains("amoCRM успешно подключена!")
    );
    browser.post("/back", json!({})).await;
    assert_eq!(
        host(&browser.url().await),
        "localhost",
        "amoCRM's consent page"
    );
    browser.post("/forward", json!({})).await;
    browser.wait_for("amoCRM успешно подключена!").await;
    assert_eq!(browser.url().await, result);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM amocrm_oauth_attempts")
            .await,
        attempts,
        "no reload added an attempt"
    );

    browser.goto(&format!("{}/", app.base)).await;
    let dashboard = browser.wait_for("Демо-аккаунт").await;
    assert!(dashboard.contains("demo.amocrm.ru"), "{dashboard}");
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("dashboard.png");
    browser.screenshot(&screenshot).await;
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 5_000, "a blank screenshot? {} bytes", png.len());

    assert_eq!(app.count("SELECT COUNT(*) FROM amocrm_tokens").await, 1);
    let agent = app
        .db()
        .string("SELECT user_agent FROM amocrm_oauth_attempts WHERE kind = 'callback'")
        .await;
    assert!(
        agent.contains("Chrome"),
        "the callback came from Chromium: {agent}"
    );
    browser.quit().await;
    app.stop().await;
}

fn host(url: &str) -> String {
    url::Url::parse(url).unwrap().host_str().unwrap().to_owned()
}

/// `chromedriver` as a child process in its own process group, with a private temp dir for
/// Chromium's profile and scratch files. Dropping it kills the group and waits, so no browser
/// outlives the test, whatever path it ends by.
struct Driver {
    child: Child,
    url: String,
    dir: TempDir,
}

impl Driver {
    async fn start(http: &reqwest::Client) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = File::create(dir.path().join("chromedriver.log")).unwrap();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .env("TMPDIR", dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap();
        let driver = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(response) = http.get(format!("{}/status", driver.url)).send().await
                && let Ok(status) = response.json::<Value>().await
                && status["value"]["ready"] == true
            {
                return driver;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("chromedriver did not start: {}", driver.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chromedriver.log")).unwrap_or_default()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Chromium outlives a killed chromedriver: kill the whole group (its id is the child's).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal W3C WebDriver client for one headless Chromium session.
struct Browser {
    http: reqwest::Client,
    /// `{driver}/session/{id}`
    session: String,
    driver: Driver,
}

impl Browser {
    async fn start() -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let driver = Driver::start(&http).await;
        let profile = driver.dir.path().join("profile");
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "pageLoadStrategy": "normal",
            "timeouts": {"pageLoad": 30_000, "script": 10_000, "implicit": 0},
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-quic",
                    format!("--user-data-dir={}", profile.display()), "--window-size=1280,900",
                    // Nothing leaves the machine: no proxy, and no name resolves but localhost.
                    "--no-proxy-server",
                    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
                    "--lang=ru-RU",
                ],
                "prefs": {
                    "intl": {"accept_languages": "ru-RU,ru"},
                    "credentials_enable_service": false,
                    "profile": {"password_manager_enabled": false},
                    "safebrowsing": {"enabled": false},
                },
            },
        }}});
        let response = http
            .post(format!("{}/session", driver.url))
            .json(&capabilities)
            .send()
            .await
            .unwrap();
        let body: Value = response.json().await.unwrap();
        let Some(id) = body["value"]["sessionId"].as_str() else {
            panic!("no WebDriver session: {body}\n{}", driver.log());
        };
        Self {
            session: format!("{}/session/{id}", driver.url),
            http,
            driver,
        }
    }

    /// One WebDriver command; its `value`, or a panic with WebDriver's error.
    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.session));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert!(status.is_success(), "WebDriver {path}: {status} {body}");
        body["value"].clone()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.command(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> Value {
        self.command(reqwest::Method::GET, path, None).await
    }

    async fn goto(&self, url: &str) {
        self.post("/url", json!({"url": url})).await;
    }

    async fn find_by(&self, using: &str, value: &str) -> String {
        let found = self
            .post("/element", json!({"using": using, "value": value}))
            .await;
        found[ELEMENT].as_str().unwrap().to_owned()
    }

    /// The element matching a CSS selector.
    async fn find(&self, css: &str) -> String {
        self.find_by("css selector", css).await
    }

    /// The link whose text is exactly `text`.
    async fn link(&self, text: &str) -> String {
        self.find_by("link text", text).await
    }

    async fn send_keys(&self, element: &str, text: &str) {
        let path = format!("/element/{element}/value");
        self.post(&path, json!({"text": text})).await;
    }

    async fn click(&self, element: &str) {
        self.post(&format!("/element/{element}/click"), json!({}))
            .await;
    }

    async fn url(&self) -> String {
        self.get("/url").await.as_str().unwrap().to_owned()
    }

    async fn source(&self) -> String {
        self.get("/source").await.as_str().unwrap().to_owned()
    }

    /// Waits (up to 10 s) for the page to contain `text`; returns the page source.
    async fn wait_for(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let source = self.source().await;
            if source.contains(text) {
                return source;
            }
            if Instant::now() > deadline {
                panic!("{text:?} not on {}:\n{source}", self.url().await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG of the viewport.
    async fn screenshot(&self, path: &Path) {
        let png = self.get("/screenshot").await;
        let png = STANDARD.decode(png.as_str().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// Ends the session (Chromium quits), then chromedriver.
    async fn quit(self) {
        self.command(reqwest::Method::DELETE, "", None).await;
        drop(self.driver);
    }
}
