//! Test harness: amoauth and the amoCRM sandbox on real sockets, a fresh database per test
//! on SQLite, PostgreSQL or MariaDB.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use amoauth::internal::Settings;
use amoauth::internal::{Running, start_with_listener};
use amoauth::sandbox::{Sandbox, SandboxConfig};
use chrono::NaiveDateTime;
use sqlx::{AssertSqlSafe, MySqlPool, PgPool, SqlitePool};
use tempfile::TempDir;
use tokio::task::JoinHandle;

pub const CLIENT_ID: &str = "test-client-id";
pub const CLIENT_SECRET: &str = "test-client-secret-7f3a9c1e5b";
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";
/// base64 of 32 bytes of 7: the key server databases are given in tests.
pub const ENCRYPTION_KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
pub const ACCOUNT_ID: i64 = 31_337_001;
pub const ACCOUNT_HOST: &str = "demo.amocrm.ru";
/// The Kommo integration of tests with both platforms (`Options::platforms`).
pub const KOMMO_CLIENT_ID: &str = "test-kommo-client-id";
pub const KOMMO_CLIENT_SECRET: &str = "test-kommo-secret-4b8d2f6a0c";
/// The sandbox's Kommo account.
pub const KOMMO_ACCOUNT_ID: i64 = 31_337_002;
pub const KOMMO_ACCOUNT_HOST: &str = "kommodemo.kommo.com";
/// The key that signs events in tests.
pub const EVENTS_SECRET: &str = "test-events-secret-5c2e8d";

/// Where a test's database lives. PostgreSQL and MariaDB run when their URLs are set in
/// `AMOAUTH_TEST_POSTGRES_URL` / `AMOAUTH_TEST_MYSQL_URL`; each test gets its own database there.
#[derive(Clone, Debug)]
pub enum Backend {
    Sqlite,
    Postgres(String),
    MySql(String),
}

/// Fails the test, saying how to install them, when programs it needs are missing. Tests that
/// call this are ignored when build.rs found the programs missing, except in CI.
pub fn require_programs(paths: &[&str], install: &str) {
    let missing: Vec<&str> = paths
        .iter()
        .copied()
        .filter(|path| !std::path::Path::new(path).exists())
        .collect();
    assert!(
        missing.is_empty(),
        "{} not found: this test needs them ({install})",
        missing.join(" and ")
    );
}

impl Backend {
    /// The PostgreSQL server of `AMOAUTH_TEST_POSTGRES_URL`; tests calling this are ignored
    /// when it was unset at build time (build.rs), so here it must be set.
    pub fn postgres() -> Self {
        Self::Postgres(Self::from_env("AMOAUTH_TEST_POSTGRES_URL"))
    }

    /// The MySQL/MariaDB server of `AMOAUTH_TEST_MYSQL_URL`, as [`Backend::postgres`].
    pub fn mysql() -> Self {
        Self::MySql(Self::from_env("AMOAUTH_TEST_MYSQL_URL"))
    }

    fn from_env(variable: &str) -> String {
        std::env::var(variable)
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| panic!("{variable} is not set: it must name a server for this test"))
    }

    pub fn is_server(&self) -> bool {
        !matches!(self, Self::Sqlite)
    }

    /// Creates an empty database for one test.
    pub async fn fresh_database(&self) -> TestDatabase {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "amoauth_t{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::tempdir().unwrap();
        match self {
            Self::Sqlite => {
                let url = format!("sqlite://{}", dir.path().join("amoauth.db").display());
                let options: sqlx::sqlite::SqliteConnectOptions = url.parse().unwrap();
                let pool = SqlitePool::connect_with(options.create_if_missing(true))
                    .await
                    .unwrap();
                TestDatabase {
                    url,
                    db: TestDb::Sqlite(pool),
                    admin: None,
                    dir,
                }
            }
            Self::Postgres(admin_url) => {
                let admin = PgPool::connect(admin_url).await.unwrap();
                sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&admin)
                    .await
                    .unwrap();
                let url = with_database(admin_url, &name);
                let pool = PgPool::connect(&url).await.unwrap();
                TestDatabase {
                    url,
                    db: TestDb::Postgres(pool),
                    admin: Some((admin_url.clone(), name)),
                    dir,
                }
            }
            Self::MySql(admin_url) => {
                let admin = MySqlPool::connect(admin_url).await.unwrap();
                sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&admin)
                    .await
                    .unwrap();
                let url = with_database(admin_url, &name);
                let pool = MySqlPool::connect(&url).await.unwrap();
                TestDatabase {
                    url,
                    db: TestDb::MySql(pool),
                    admin: Some((admin_url.clone(), name)),
                    dir,
                }
            }
        }
    }
}

fn with_database(url: &str, name: &str) -> String {
    let mut url = url::Url::parse(url).unwrap();
    url.set_path(&format!("/{name}"));
    url.to_string()
}

/// One test's database and a direct connection to it, as an operator's SQL shell would have.
pub struct TestDatabase {
    pub url: String,
    pub db: TestDb,
    admin: Option<(String, String)>,
    /// Holds the SQLite file (and amoauth's key file) for as long as the test runs.
    pub dir: TempDir,
}

impl TestDatabase {
    /// The host and port of the database server (None for SQLite).
    pub fn server_addr(&self) -> Option<SocketAddr> {
        let url = url::Url::parse(&self.url).ok()?;
        let host = url.host_str()?;
        let port = url.port_or_known_default().or(match self.db {
            TestDb::Postgres(_) => Some(5432),
            TestDb::MySql(_) => Some(3306),
            TestDb::Sqlite(_) => None,
        })?;
        format!("{host}:{port}").parse().ok()
    }

    /// The URL with another port, to reach the server through a proxy.
    pub fn url_via(&self, port: u16) -> String {
        let mut url = url::Url::parse(&self.url).unwrap();
        url.set_port(Some(port)).unwrap();
        url.to_string()
    }

    /// Drops the test's database on a server.
    pub async fn drop_database(self) {
        self.db.close().await;
        if let Some((admin_url, name)) = &self.admin {
            if admin_url.starts_with("postgres") {
                let admin = PgPool::connect(admin_url).await.unwrap();
                let _ = sqlx::query(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&admin)
                .await;
            } else {
                let admin = MySqlPool::connect(admin_url).await.unwrap();
                let _ = sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}")))
                    .execute(&admin)
                    .await;
            }
        }
    }
}

/// A direct connection to a test database of any backend.
pub enum TestDb {
    Sqlite(SqlitePool),
    Postgres(PgPool),
    MySql(MySqlPool),
}

/// The same code for every backend's pool.
macro_rules! on_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            TestDb::Sqlite($pool) => $body,
            TestDb::Postgres($pool) => $body,
            TestDb::MySql($pool) => $body,
        }
    };
}

impl TestDb {
    pub async fn count(&self, sql: &'static str) -> i64 {
        on_db!(self, pool => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap())
    }

    pub async fn strings(&self, sql: &'static str) -> Vec<Option<String>> {
        on_db!(self, pool => sqlx::query_scalar(sql).fetch_all(pool).await.unwrap())
    }

    pub async fn string(&self, sql: &'static str) -> String {
        on_db!(self, pool => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap())
    }

    pub async fn timestamp(&self, sql: &'static str) -> NaiveDateTime {
        on_db!(self, pool => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap())
    }

    /// Runs a statement as written; returns the rows it touched or returned.
    pub async fn execute(&self, sql: &'static str) -> u64 {
        on_db!(self, pool => sqlx::query(sql).execute(pool).await.unwrap().rows_affected())
    }

    /// Runs a statement built by the test (table layouts and values it chose itself).
    pub async fn execute_built(&self, sql: String) -> u64 {
        let sql = AssertSqlSafe(sql);
        on_db!(self, pool => sqlx::query(sql).execute(pool).await.unwrap().rows_affected())
    }

    pub async fn fetch_count(&self, sql: &'static str) -> usize {
        on_db!(self, pool => sqlx::query(sql).fetch_all(pool).await.unwrap().len())
    }

    /// Adds a state row directly, as if an install had made it.
    pub async fn insert_state(
        &self,
        hash: &str,
        created_at: NaiveDateTime,
        expires_at: NaiveDateTime,
    ) {
        let sql = if matches!(self, Self::Postgres(_)) {
            "INSERT INTO amocrm_oauth_states (state_hash, subdomain, created_at, expires_at) VALUES ($1, 'x', $2, $3)"
        } else {
            "INSERT INTO amocrm_oauth_states (state_hash, subdomain, created_at, expires_at) VALUES (?, 'x', ?, ?)"
        };
        on_db!(self, pool => sqlx::query(sql).bind(hash).bind(created_at).bind(expires_at).execute(pool).await.map(drop).unwrap());
    }

    /// Sets a time column of every connection (`expires_at` or `issued_at`), to age tokens.
    pub async fn set_token_time(&self, column: &str, at: NaiveDateTime) {
        assert!(matches!(column, "expires_at" | "issued_at"), "{column}");
        let placeholder = if matches!(self, Self::Postgres(_)) {
            "$1"
        } else {
            "?"
        };
        let sql = AssertSqlSafe(format!("UPDATE amocrm_tokens SET {column} = {placeholder}"));
        on_db!(self, pool => sqlx::query(sql).bind(at).execute(pool).await.map(drop).unwrap());
    }

    /// The stored refresh token, decrypted with the tests' server key.
    pub async fn stored_refresh_token(&self) -> String {
        let key_id = self.string("SELECT key_id FROM amocrm_tokens").await;
        let ciphertext = self.string("SELECT refresh_token FROM amocrm_tokens").await;
        let cipher = amoauth::internal::Cipher::new(&[7u8; 32]);
        let sealed = amoauth::internal::Sealed { key_id, ciphertext };
        cipher
            .open_token(
                &sealed,
                amoauth::internal::TokenColumn::RefreshToken,
                ACCOUNT_ID,
            )
            .unwrap()
            .expose()
            .to_owned()
    }

    /// Every text and integer value stored in `table`, for leak checks.
    pub async fn all_text(&self, table: &str) -> String {
        use sqlx::{Column as _, Row as _};
        let sql = AssertSqlSafe(format!("SELECT * FROM {table}"));
        on_db!(self, pool => {
            let rows = sqlx::query(sql).fetch_all(pool).await.unwrap();
            let mut text = String::new();
            for row in rows {
                for (i, column) in row.columns().iter().enumerate() {
                    let value: Option<String> = row
                        .try_get::<Option<String>, _>(i)
                        .or_else(|_| row.try_get::<Option<i64>, _>(i).map(|v| v.map(|v| v.to_string())))
                        .unwrap_or(None);
                    text.push_str(&format!("{}={} ", column.name(), value.unwrap_or_default()));
                }
                text.push('\n');
            }
            text
        })
    }

    pub async fn close(&self) {
        on_db!(self, pool => pool.close().await)
    }
}

/// Knobs a test may turn; everything else is the default configuration.
#[derive(Default, Clone)]
pub struct Options {
    pub state_ttl: Option<&'static str>,
    pub amocrm_timeout: Option<&'static str>,
    pub widget_installs: bool,
    /// Reach the database server through a proxy the test can cut.
    pub via_proxy: bool,
    /// How often the refresh worker runs (default: every minute, i.e. not during a test).
    pub refresh_interval: Option<&'static str>,
    /// AMOAUTH_RETURN_ORIGINS
    pub return_origins: Option<&'static str>,
    /// AMOAUTH_RATE_LIMIT; tests run without one unless they set it.
    pub rate_limit: Option<&'static str>,
    /// AMOAUTH_TRUSTED_PROXIES
    pub trusted_proxies: Option<&'static str>,
    /// AMOAUTH_PER_IP_CONCURRENCY
    pub per_ip_concurrency: Option<&'static str>,
    /// AMOAUTH_READ_TIMEOUT
    pub read_timeout: Option<&'static str>,
    /// Send amoCRM requests here instead of the sandbox (the sandbox still issues codes).
    pub amocrm_url: Option<String>,
    /// AMOAUTH_BASE_PATH
    pub base_path: Option<&'static str>,
    /// AMOAUTH_CLEANUP_INTERVAL (default: hourly, i.e. not during a test)
    pub cleanup_interval: Option<&'static str>,
    /// The site's public origin in front of amoauth (a proxy); default: amoauth's own address.
    pub public_url: Option<String>,
    /// Send events here (signed with `EVENTS_SECRET`, polled every 100 ms).
    pub events_url: Option<String>,
    /// Also send connection.refreshed.
    pub events_refreshed: bool,
    /// AMOAUTH_PROXY_RATE
    pub proxy_rate: Option<&'static str>,
    /// AMOAUTH_PROXY_MAX_WAIT
    pub proxy_max_wait: Option<&'static str>,
    /// Which integrations amoauth has (and the sandbox registers); default amoCRM's only.
    pub platforms: Platforms,
}

/// The integrations of a test deployment.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
pub enum Platforms {
    #[default]
    AmocrmOnly,
    KommoOnly,
    Both,
}

pub struct TestApp {
    pub base: String,
    pub sandbox: Sandbox,
    pub sandbox_origin: String,
    pub client: reqwest::Client,
    /// The URL amoauth was given.
    pub database_url: String,
    pub database: TestDatabase,
    pub proxy: Option<Proxy>,
    running: Option<Running>,
    settings: Settings,
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

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the sandbox for amoauth at `redirect_uri`; returns it and its origin on `localhost`
/// (another site than amoauth's 127.0.0.1, as amoCRM is).
pub async fn spawn_sandbox(redirect_uri: &str) -> (Sandbox, String) {
    spawn_sandbox_for(redirect_uri, Platforms::AmocrmOnly).await
}

/// The sandbox with the Kommo integration registered too unless `platforms` is amoCRM's only.
pub async fn spawn_sandbox_for(redirect_uri: &str, platforms: Platforms) -> (Sandbox, String) {
    let mut config = SandboxConfig::demo(CLIENT_ID, CLIENT_SECRET, redirect_uri);
    if platforms != Platforms::AmocrmOnly {
        config = config.with_kommo(KOMMO_CLIENT_ID, KOMMO_CLIENT_SECRET, redirect_uri);
    }
    let sandbox = Sandbox::new(config);
    let addr = sandbox.spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    (sandbox, format!("http://localhost:{}", addr.port()))
}

impl TestApp {
    pub async fn spawn(backend: &Backend) -> Self {
        Self::spawn_with(backend, Options::default()).await
    }

    pub async fn spawn_with(backend: &Backend, options: Options) -> Self {
        let (listener, addr) = loopback_listener().await;
        let base = format!("http://{addr}");
        let public = options.public_url.clone().unwrap_or_else(|| base.clone());
        let redirect_uri = format!("{public}/amocrm/callback");
        let (sandbox, sandbox_origin) = spawn_sandbox_for(&redirect_uri, options.platforms).await;
        let database = backend.fresh_database().await;
        let proxy = match options.via_proxy {
            true => Some(Proxy::start(database.server_addr().expect("a server database")).await),
            false => None,
        };
        let database_url = match &proxy {
            Some(proxy) => database.url_via(proxy.addr.port()),
            None => database.url.clone(),
        };
        let amocrm = options.platforms != Platforms::KommoOnly;
        let kommo = options.platforms != Platforms::AmocrmOnly;
        let settings = Settings {
            database_url: Some(database_url.clone()),
            encryption_key: backend.is_server().then(|| ENCRYPTION_KEY.into()),
            client_id: amocrm.then(|| CLIENT_ID.into()),
            client_secret: amocrm.then(|| CLIENT_SECRET.into()),
            redirect_uri: amocrm.then(|| redirect_uri.clone()),
            kommo_client_id: kommo.then(|| KOMMO_CLIENT_ID.into()),
            kommo_client_secret: kommo.then(|| KOMMO_CLIENT_SECRET.into()),
            kommo_redirect_uri: kommo.then(|| redirect_uri.clone()),
            admin_token: Some(ADMIN_TOKEN.into()),
            amocrm_url: Some(
                options
                    .amocrm_url
                    .clone()
                    .unwrap_or_else(|| sandbox_origin.clone()),
            ),
            state_ttl: options.state_ttl.map(Into::into),
            amocrm_timeout: options.amocrm_timeout.map(Into::into),
            widget_installs: Some(if options.widget_installs { "on" } else { "off" }.into()),
            refresh_interval: options.refresh_interval.map(Into::into),
            return_origins: options.return_origins.map(Into::into),
            rate_limit: Some(options.rate_limit.unwrap_or("off").into()),
            trusted_proxies: options.trusted_proxies.map(Into::into),
            per_ip_concurrency: options.per_ip_concurrency.map(Into::into),
            read_timeout: options.read_timeout.map(Into::into),
            base_path: options.base_path.map(Into::into),
            cleanup_interval: options.cleanup_interval.map(Into::into),
            events_url: options.events_url.clone(),
            events_secret: options.events_url.as_ref().map(|_| EVENTS_SECRET.into()),
            events_refreshed: options.events_refreshed.then(|| "on".into()),
            events_interval: options.events_url.as_ref().map(|_| "100ms".into()),
            proxy_rate: options.proxy_rate.map(Into::into),
            proxy_max_wait: options.proxy_max_wait.map(Into::into),
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
            database,
            proxy,
            running: Some(running),
            settings,
        }
    }

    /// Stops amoauth and starts it again on the same address and database.
    pub async fn restart(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.unwrap();
        }
        let addr: SocketAddr = self.base.strip_prefix("http://").unwrap().parse().unwrap();
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let running = start_with_listener(self.settings.server().unwrap(), listener)
            .await
            .unwrap();
        self.running = Some(running);
    }

    /// A second amoauth on the same database and settings, at its own address (a replica).
    pub async fn replica(&self) -> amoauth::internal::Running {
        let (listener, _) = loopback_listener().await;
        start_with_listener(self.settings.server().unwrap(), listener)
            .await
            .unwrap()
    }

    pub fn db(&self) -> &TestDb {
        &self.database.db
    }

    /// amoauth's own store, for setup a test would otherwise do with the CLI.
    pub fn store(&self) -> &amoauth::internal::Store {
        &self.running.as_ref().expect("running").store
    }

    /// Install, Allow and callback: the demo account is connected.
    pub async fn connect(&self) {
        let callback = self.allowed_callback_url().await;
        let (status, body) = self.open_callback(&callback).await;
        assert_eq!(status, 200, "{body}");
    }

    /// Install from a link such as `/amocrm/install?platform=kommo`, Allow as one of the
    /// sandbox's accounts, and callback: it is connected.
    pub async fn connect_account_at(&self, install: &str, account_id: i64) {
        let consent_url = self.install_at(install).await;
        let callback = consent_as(
            &self.client,
            &self.sandbox_origin,
            &consent_url,
            "allow",
            account_id,
        )
        .await;
        let (status, body) = self.open_callback(&callback).await;
        assert_eq!(status, 200, "{body}");
    }

    /// A new API key for the token API.
    pub async fn api_key(&self) -> String {
        amoauth::internal::create_api_key(self.store(), &format!("test-{}", free_port()))
            .await
            .unwrap()
            .full
    }

    /// GET on the token API with an API key; the status and the JSON body.
    pub async fn api(&self, path: &str, key: &str) -> (u16, serde_json::Value) {
        api_get(&self.client, &format!("{}{path}", self.base), key).await
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.unwrap();
        }
        self.database.drop_database().await;
    }

    /// GET /amocrm/install as the admin; returns the consent URL it redirects to.
    pub async fn install(&self) -> String {
        self.install_at("/amocrm/install").await
    }

    /// GET of an install link (path and query) as the admin; the consent URL.
    pub async fn install_at(&self, path_and_query: &str) -> String {
        let response = self
            .client
            .get(format!("{}{path_and_query}", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 303, "install should redirect to consent");
        location(&response)
    }

    /// Opens the sandbox's consent page and clicks Allow or Deny; returns the callback URL.
    pub async fn consent(&self, consent_url: &str, decision: &str) -> String {
        consent(&self.client, &self.sandbox_origin, consent_url, decision).await
    }

    /// Install, Allow, and the callback URL amoCRM sends the browser back to.
    pub async fn allowed_callback_url(&self) -> String {
        let consent = self.install().await;
        self.consent(&consent, "allow").await
    }

    /// GET of a callback URL as a browser makes it (see `open_callback`).
    pub async fn open_callback(&self, url: &str) -> (u16, String) {
        open_callback(&self.client, url).await
    }

    pub async fn get(&self, url: &str) -> (u16, String) {
        let response = self.client.get(url).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

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

    pub async fn count(&self, sql: &'static str) -> i64 {
        self.db().count(sql).await
    }

    /// Reasons of the callback audit rows, oldest first.
    pub async fn callback_reasons(&self) -> Vec<String> {
        let rows = self
            .db()
            .strings("SELECT reason FROM amocrm_oauth_attempts WHERE kind = 'callback' ORDER BY id")
            .await;
        rows.into_iter()
            .map(|r| r.unwrap_or_else(|| "-".into()))
            .collect()
    }
}

/// GET with `Authorization: Bearer <key>`; the status and the JSON body (null when not JSON).
pub async fn api_get(client: &reqwest::Client, url: &str, key: &str) -> (u16, serde_json::Value) {
    let response = client.get(url).bearer_auth(key).send().await.unwrap();
    let status = response.status().as_u16();
    let body = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// Opens the sandbox's consent page and clicks Allow or Deny; returns the callback URL.
pub async fn consent(
    client: &reqwest::Client,
    sandbox_origin: &str,
    consent_url: &str,
    decision: &str,
) -> String {
    consent_as(client, sandbox_origin, consent_url, decision, ACCOUNT_ID).await
}

/// The sandbox's consent page answered for one of its accounts.
pub async fn consent_as(
    client: &reqwest::Client,
    sandbox_origin: &str,
    consent_url: &str,
    decision: &str,
    account_id: i64,
) -> String {
    let page = client.get(consent_url).send().await.unwrap();
    assert_eq!(page.status(), 200, "consent page should render");
    let url = url::Url::parse(consent_url).unwrap();
    let mut form: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    form.push(("account_id".into(), account_id.to_string()));
    form.push(("decision".into(), decision.into()));
    let response = client
        .post(format!("{sandbox_origin}/oauth/decide"))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 302);
    location(&response)
}

/// GET of a callback URL as a browser makes it: a 303 to amoauth's result page is followed
/// (resolved against the callback URL, as a browser does); the status and body of the page the
/// browser ends on.
pub async fn open_callback(client: &reqwest::Client, url: &str) -> (u16, String) {
    let response = client.get(url).send().await.unwrap();
    let response = match response.status().as_u16() {
        303 if location(&response).starts_with(RESULT_PATH) => {
            let page = url::Url::parse(url).unwrap().join(&location(&response));
            client.get(page.unwrap()).send().await.unwrap()
        }
        _ => response,
    };
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// Where amoauth sends the browser after a callback, with no code or state in it.
pub const RESULT_PATH: &str = "/amocrm/callback/result?r=";

/// GET of a callback URL that must answer 303 to its result page; the page's absolute URL.
pub async fn result_url(client: &reqwest::Client, callback: &str) -> String {
    let response = client.get(callback).send().await.unwrap();
    assert_eq!(
        response.status(),
        303,
        "the callback redirects to its result"
    );
    let location = location(&response);
    assert!(location.starts_with(RESULT_PATH), "{location}");
    url::Url::parse(callback)
        .unwrap()
        .join(&location)
        .unwrap()
        .to_string()
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

/// The `amoauth` binary with a clean environment, run in `dir` (so no stray `.env` is read).
pub fn amoauth_command(dir: &Path) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_amoauth"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .current_dir(dir);
    command
}

/// `amoauth serve` as a real process; stdout and stderr go to one log file.
pub struct ServeProcess {
    child: std::process::Child,
    pub base: String,
    log: std::path::PathBuf,
    _dir: TempDir,
}

impl ServeProcess {
    /// Starts it on `port` with the test's client, talking to the sandbox, plus `env`.
    pub async fn start(
        port: u16,
        redirect_uri: &str,
        sandbox_origin: &str,
        database_url: &str,
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_with_flags(port, redirect_uri, sandbox_origin, database_url, env, &[]).await
    }

    /// `start`, with `flags` after `serve` on the command line.
    pub async fn start_with_flags(
        port: u16,
        redirect_uri: &str,
        sandbox_origin: &str,
        database_url: &str,
        env: &[(&str, &str)],
        flags: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("amoauth.log");
        let file = std::fs::File::create(&log).unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let mut command = amoauth_command(dir.path());
        command
            .env("DATABASE_URL", database_url)
            .env("AMOCRM_CLIENT_ID", CLIENT_ID)
            .env("AMOCRM_CLIENT_SECRET", CLIENT_SECRET)
            .env("AMOCRM_REDIRECT_URI", redirect_uri)
            .env("AMOAUTH_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("AMOAUTH_AMOCRM_URL", sandbox_origin)
            .env("AMOAUTH_LISTEN", format!("127.0.0.1:{port}"))
            .env("AMOAUTH_RATE_LIMIT", "off")
            .envs(env.iter().copied())
            .arg("serve")
            .args(flags)
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file));
        let mut child = command.spawn().unwrap();
        let client = http_client();
        for _ in 0..300 {
            if client.get(format!("{base}/healthz")).send().await.is_ok() {
                return Self {
                    child,
                    base,
                    log,
                    _dir: dir,
                };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "amoauth serve did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// What it wrote so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The output once it holds `needle`: a line printed after the server began answering
    /// may reach the log a moment after /healthz did. All of it after 10 s without.
    pub async fn output_with(&self, needle: &str) -> String {
        for _ in 0..200 {
            let output = self.output();
            if output.contains(needle) {
                return output;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.output()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (up to `limit`) for the process to exit by itself; its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Kills the process (SIGKILL: a crash) and returns everything it wrote.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// Stops the process as a service manager would (SIGTERM, then SIGKILL after 10 s) and
    /// returns everything it wrote: the server writes its last batch of log lines as it exits.
    pub fn stop(mut self) -> String {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for ServeProcess {
    /// A test that fails before `stop` leaves no server running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy to a database server that a test can cut (every connection dropped, new ones
/// refused) and restore, to play a database outage or restart.
pub struct Proxy {
    pub addr: SocketAddr,
    upstream: SocketAddr,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let (listener, addr) = loopback_listener().await;
        let proxy = Self {
            addr,
            upstream,
            task: Mutex::new(None),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let upstream = self.upstream;
        let task = tokio::spawn(async move {
            // Owned by this task: aborting it drops every proxied connection too.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }

    /// The database "goes away": open connections reset, new ones refused.
    pub async fn cut(&self) {
        let task = self.task.lock().unwrap().take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// The database is back on the same address.
    pub async fn restore(&self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }
}
