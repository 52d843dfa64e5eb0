//! Test harness: amoauth and the amoCRM sandbox on real sockets, a fresh SQLite file per test.

use std::net::SocketAddr;

use amoauth::config::Settings;
use amoauth::sandbox::{Sandbox, SandboxConfig};
use amoauth::server::{Running, start_with_listener};
use sqlx::SqlitePool;
use sqlx::sqlite::SqliteConnectOptions;
use tempfile::TempDir;

pub const CLIENT_ID: &str = "test-client-id";
pub const CLIENT_SECRET: &str = "test-client-secret-7f3a9c1e5b";
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";
pub const ACCOUNT_ID: i64 = 31_337_001;
pub const ACCOUNT_HOST: &str = "demo.amocrm.ru";

/// Knobs a test may turn; everything else is the default configuration.
#[derive(Default, Clone)]
pub struct Options {
    pub state_ttl: Option<&'static str>,
    pub amocrm_timeout: Option<&'static str>,
    pub widget_installs: bool,
}

pub struct TestApp {
    pub base: String,
    pub sandbox: Sandbox,
    pub sandbox_origin: String,
    pub client: reqwest::Client,
    pub database_url: String,
    /// Keeps the database directory alive as long as the app.
    _dir: TempDir,
    running: Option<Running>,
}

pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Like a browser that loses its cookies between sites: no cookie store, no redirects.
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Binds a listener on a free loopback port.
pub async fn loopback_listener() -> (tokio::net::TcpListener, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// Starts the sandbox for amoauth at `redirect_uri`; returns it and its origin on `localhost`
/// (another site than amoauth's 127.0.0.1, as amoCRM is).
pub async fn spawn_sandbox(redirect_uri: &str) -> (Sandbox, String) {
    let sandbox = Sandbox::new(SandboxConfig::demo(CLIENT_ID, CLIENT_SECRET, redirect_uri));
    let addr = sandbox.spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    (sandbox, format!("http://localhost:{}", addr.port()))
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(options: Options) -> Self {
        let (listener, addr) = loopback_listener().await;
        let base = format!("http://{addr}");
        let redirect_uri = format!("{base}/amocrm/callback");
        let (sandbox, sandbox_origin) = spawn_sandbox(&redirect_uri).await;
        let dir = tempfile::tempdir().unwrap();
        let database_url = format!("sqlite://{}", dir.path().join("amoauth.db").display());
        let settings = Settings {
            database_url: Some(database_url.clone()),
            client_id: Some(CLIENT_ID.into()),
            client_secret: Some(CLIENT_SECRET.into()),
            redirect_uri: Some(redirect_uri),
            admin_token: Some(ADMIN_TOKEN.into()),
            amocrm_url: Some(sandbox_origin.clone()),
            state_ttl: options.state_ttl.map(Into::into),
            amocrm_timeout: options.amocrm_timeout.map(Into::into),
            widget_installs: Some(if options.widget_installs { "on" } else { "off" }.into()),
            ..Settings::default()
        };
        let running = start_with_listener(settings.server().unwrap(), listener)
            .await
            .unwrap();
        Self {
            base,
            sandbox,
            sandbox_origin,
            client: http_client(),
            database_url,
            _dir: dir,
            running: Some(running),
        }
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.unwrap();
        }
    }

    /// GET /amocrm/install as the admin; returns the consent URL it redirects to.
    pub async fn install(&self) -> String {
        let response = self
            .client
            .get(format!("{}/amocrm/install", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 303, "install should redirect to consent");
        location(&response)
    }

    /// Opens the sandbox's consent page and clicks Allow or Deny; returns the callback URL.
    pub async fn consent(&self, consent_url: &str, decision: &str) -> String {
        let page = self.client.get(consent_url).send().await.unwrap();
        assert_eq!(page.status(), 200, "consent page should render");
        let url = url::Url::parse(consent_url).unwrap();
        let mut form: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        form.push(("account_id".into(), ACCOUNT_ID.to_string()));
        form.push(("decision".into(), decision.into()));
        let response = self
            .client
            .post(format!("{}/oauth/decide", self.sandbox_origin))
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 302);
        location(&response)
    }

    /// Install, Allow, and the callback URL amoCRM sends the browser back to.
    pub async fn allowed_callback_url(&self) -> String {
        let consent = self.install().await;
        self.consent(&consent, "allow").await
    }

    pub async fn get(&self, url: &str) -> (u16, String) {
        let response = self.client.get(url).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    /// A separate connection to the database, as an operator with a SQL shell would have.
    pub async fn db(&self) -> SqlitePool {
        let options: SqliteConnectOptions = self.database_url.parse().unwrap();
        SqlitePool::connect_with(options).await.unwrap()
    }

    pub async fn count(&self, sql: &'static str) -> i64 {
        let db = self.db().await;
        let n = sqlx::query_scalar(sql).fetch_one(&db).await.unwrap();
        db.close().await;
        n
    }

    /// Reasons of the callback audit rows, oldest first.
    pub async fn callback_reasons(&self) -> Vec<String> {
        let db = self.db().await;
        let rows: Vec<Option<String>> = sqlx::query_scalar(
            "SELECT reason FROM amocrm_oauth_attempts WHERE kind = 'callback' ORDER BY id",
        )
        .fetch_all(&db)
        .await
        .unwrap();
        db.close().await;
        rows.into_iter()
            .map(|r| r.unwrap_or_else(|| "-".into()))
            .collect()
    }
}

pub fn location(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("location")
        .expect("a Location header")
        .to_str()
        .unwrap()
        .to_owned()
}

/// The value of one query parameter of a URL.
pub fn query_param(url: &str, name: &str) -> Option<String> {
    url::Url::parse(url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Every value stored in the given table, as text, for leak checks.
pub async fn all_text(db: &SqlitePool, table: &str) -> String {
    use sqlx::{Column as _, Row as _};
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT * FROM {table}")))
        .fetch_all(db)
        .await
        .unwrap();
    let mut text = String::new();
    for row in rows {
        for (i, column) in row.columns().iter().enumerate() {
            let value: Option<String> = row
                .try_get::<Option<String>, _>(i)
                .or_else(|_| {
                    row.try_get::<Option<i64>, _>(i)
                        .map(|v| v.map(|v| v.to_string()))
                })
                .unwrap_or(None);
            text.push_str(&format!("{}={} ", column.name(), value.unwrap_or_default()));
        }
        text.push('\n');
    }
    text
}

/// The `amoauth` binary with a clean environment, run in `dir` (so no stray `.env` is read).
pub fn amoauth_command(dir: &std::path::Path) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_amoauth"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .current_dir(dir);
    command
}

impl TestApp {
    /// A request to amoauth carrying only the given cookie.
    pub async fn with_cookie(
        &self,
        method: reqwest::Method,
        path: &str,
        cookie: &str,
    ) -> reqwest::Response {
        self.client
            .request(method, format!("{}{path}", self.base))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap()
    }
}
