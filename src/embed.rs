//! The embedding API: amoauth inside a Rust web app, built from one builder, its routes
//! mounted in the app's own axum router and its tokens read in-process.

use crate::config::{Secret, ServerConfig, Settings};
use crate::parts::{Keyed, Parts, open_store};
use crate::server::{self, Background};
use crate::store::{Pool, Store, Timestamp};
use crate::tokens::TokenError;

/// amoauth built inside an application: its routes, its tokens and its background work.
///
/// ```no_run
/// # async fn run() -> anyhow::Result<()> {
/// let amoauth = amoauth::Amoauth::builder()
///     .database_url("sqlite://amoauth.db")
///     .amocrm("client-id", "client-secret", "https://app.example/amocrm/callback")
///     .admin_token("a-long-random-admin-token")
///     .base_path("/amocrm-auth")
///     .build()
///     .await?;
/// let app = axum::Router::new()
///     .route("/", axum::routing::get(|| async { "the host app" }))
///     .merge(amoauth.router());
/// let background = amoauth.spawn_background();
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
/// axum::serve(
///     listener,
///     app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
/// )
/// .await?;
/// background.stop().await;
/// # Ok(()) }
/// ```
pub struct Amoauth {
    parts: Parts,
    config: ServerConfig,
    admin_token: Secret,
}

/// Collects amoauth's settings; every one has the meaning of the environment variable of the
/// same name in the README (`DATABASE_URL`, `AMOCRM_CLIENT_ID`, `AMOAUTH_BASE_PATH`, …).
#[derive(Default)]
pub struct AmoauthBuilder {
    settings: Settings,
    pool: Option<Pool>,
}

impl AmoauthBuilder {
    /// The database amoauth opens itself: `sqlite://`, `postgres://`, `mysql://` or
    /// `mariadb://` (`DATABASE_URL`).
    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.settings.database_url = Some(url.into());
        self
    }

    /// The application's own sqlx pool (`SqlitePool`, `PgPool` or `MySqlPool`) instead of a
    /// URL; amoauth's tables are migrated into it. It needs `encryption_key`.
    pub fn database(mut self, pool: impl Into<DatabasePool>) -> Self {
        self.pool = Some(pool.into().0);
        self
    }

    /// The integration's id and secret and its redirect URI, as registered in amoCRM
    /// (`AMOCRM_CLIENT_ID`, `AMOCRM_CLIENT_SECRET`, `AMOCRM_REDIRECT_URI`); the redirect URI's
    /// path is `/amocrm/callback`.
    pub fn amocrm(
        mut self,
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
        redirect_uri: impl Into<String>,
    ) -> Self {
        self.settings.client_id = Some(client_id.into());
        self.settings.client_secret = Some(client_secret.into());
        self.settings.redirect_uri = Some(redirect_uri.into());
        self
    }

    /// A Kommo integration's id and secret and its redirect URI, as registered in Kommo
    /// (`KOMMO_CLIENT_ID`, `KOMMO_CLIENT_SECRET`, `KOMMO_REDIRECT_URI`), beside or instead of
    /// the amoCRM one; install links take `?platform=kommo`.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = tempfile::tempdir()?;
    /// // Kommo only; add `.amocrm(…)` for both platforms side by side.
    /// let amoauth = amoauth::Amoauth::builder()
    ///     .database_url(format!("sqlite://{}", dir.path().join("amoauth.db").display()))
    ///     .kommo("kommo-client-id", "kommo-secret", "https://app.example/amocrm/callback")
    ///     .build()
    ///     .await?;
    /// // A platform-qualified account: Kommo's account 31337002, not connected yet.
    /// assert!(matches!(
    ///     amoauth.access_token("kommo:31337002").await,
    ///     Err(amoauth::TokenError::NotFound(_))
    /// ));
    /// # Ok::<(), anyhow::Error>(()) }).unwrap();
    /// ```
    pub fn kommo(
        mut self,
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
        redirect_uri: impl Into<String>,
    ) -> Self {
        self.settings.kommo_client_id = Some(client_id.into());
        self.settings.kommo_client_secret = Some(client_secret.into());
        self.settings.kommo_redirect_uri = Some(redirect_uri.into());
        self
    }

    /// Sends every amoCRM request to this origin instead (`AMOAUTH_AMOCRM_URL`): for the
    /// sandbox in development and tests only.
    pub fn amocrm_url(mut self, origin: impl Into<String>) -> Self {
        self.settings.amocrm_url = Some(origin.into());
        self
    }

    /// The keys that seal the tokens, comma-separated base64 (`AMOAUTH_ENCRYPTION_KEY`);
    /// without them a SQLite database keeps a key file beside itself.
    pub fn encryption_key(mut self, keys: impl Into<String>) -> Self {
        self.settings.encryption_key = Some(keys.into());
        self
    }

    /// The admin token for the dashboard and `/metrics` (`AMOAUTH_ADMIN_TOKEN`); without it a
    /// random one is made, and only login links open the dashboard.
    pub fn admin_token(mut self, token: impl Into<String>) -> Self {
        self.settings.admin_token = Some(token.into());
        self
    }

    /// Where the dashboard, the token API and the probes live (`AMOAUTH_BASE_PATH`), e.g.
    /// `/amocrm-auth`; the install and callback routes stay at `/amocrm/…`.
    pub fn base_path(mut self, path: impl Into<String>) -> Self {
        self.settings.base_path = Some(path.into());
        self
    }

    /// Checks the settings, opens (or takes) the database, migrates it and loads the keys.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = tempfile::tempdir()?;
    /// let amoauth = amoauth::Amoauth::builder()
    ///     .database_url(format!("sqlite://{}", dir.path().join("amoauth.db").display()))
    ///     .amocrm("client-id", "client-secret", "https://app.example/amocrm/callback")
    ///     .build()
    ///     .await?;
    /// // Nobody has connected an account yet.
    /// assert!(matches!(
    ///     amoauth.access_token("mycompany").await,
    ///     Err(amoauth::TokenError::NotFound(_))
    /// ));
    /// # Ok::<(), anyhow::Error>(()) }).unwrap();
    /// ```
    pub async fn build(self) -> anyhow::Result<Amoauth> {
        let mut settings = self.settings;
        if let Some(pool) = &self.pool {
            // The URL is never opened: it names the backend for the checks that depend on it.
            settings.database_url = Some(pool.placeholder_url().to_owned());
        }
        let config = settings.server()?;
        let store = match self.pool {
            Some(pool) => {
                let store = Store::from_pool(pool);
                store.migrate().await?;
                store
            }
            None => open_store(&config.store).await?,
        };
        let keyed = Keyed::with_store(&config.store, store).await?;
        let parts = Parts::from_keyed(&config, keyed);
        let admin_token = config
            .admin_token
            .clone()
            .unwrap_or_else(|| Secret::new(crate::crypto::random_token()));
        Ok(Amoauth {
            parts,
            config,
            admin_token,
        })
    }
}

/// An application's sqlx pool, for [`AmoauthBuilder::database`].
pub struct DatabasePool(Pool);

impl From<sqlx::SqlitePool> for DatabasePool {
    fn from(pool: sqlx::SqlitePool) -> Self {
        Self(pool.into())
    }
}

impl From<sqlx::PgPool> for DatabasePool {
    fn from(pool: sqlx::PgPool) -> Self {
        Self(pool.into())
    }
}

impl From<sqlx::MySqlPool> for DatabasePool {
    fn from(pool: sqlx::MySqlPool) -> Self {
        Self(pool.into())
    }
}

/// An access token ready to use, read in-process.
#[derive(Debug, Clone)]
pub struct AccessToken {
    /// The platform the account is on, amoCRM or Kommo.
    pub platform: crate::amocrm::Platform,
    /// The platform's id of the account.
    pub account_id: Option<i64>,
    /// The account's subdomain, e.g. `mycompany`.
    pub subdomain: String,
    /// The account's host, where its API lives, e.g. `mycompany.amocrm.ru`.
    pub domain: String,
    /// The token itself; `expose()` it only to send it to amoCRM.
    pub token: Secret,
    /// When it expires (UTC).
    pub expires_at: Timestamp,
}

impl Amoauth {
    /// A builder with nothing set.
    pub fn builder() -> AmoauthBuilder {
        AmoauthBuilder::default()
    }

    /// amoauth's routes (its dashboard, API and probes under the base path, the install,
    /// callback and webhook under `/amocrm/`), ready to `merge` into the app's router. Serve
    /// it with `into_make_service_with_connect_info::<SocketAddr>()`: the client's address
    /// feeds the rate limits and the audit trail.
    pub fn router(&self) -> axum::Router {
        server::app(&self.parts, &self.config, self.admin_token.clone())
    }

    /// A valid access token for the account (id, subdomain or host; `kommo:31337002` or
    /// `amocrm:…` where both platforms have the id), refreshed first when close to expiry,
    /// exactly as the token API hands it out.
    pub async fn access_token(&self, account: &str) -> Result<AccessToken, TokenError> {
        let fresh = self.parts.tokens.access_token(account).await?;
        Ok(AccessToken {
            platform: fresh.platform,
            account_id: fresh.account_id,
            subdomain: fresh.subdomain,
            domain: fresh.domain,
            token: fresh.access_token,
            expires_at: fresh.expires_at,
        })
    }

    /// Starts the refresh worker, the periodic cleanup and (when configured) event delivery
    /// on the current tokio runtime; they run until [`Background::stop`].
    pub fn spawn_background(&self) -> Background {
        Background::spawn(&self.parts, &self.config)
    }

    /// A one-time admin login link on the site at `public_origin` (e.g.
    /// `https://app.example`), valid for minutes.
    pub async fn login_link(&self, public_origin: &str) -> anyhow::Result<String> {
        let site = format!("{public_origin}{}", self.config.base_path);
        Ok(crate::http::new_login_link(&self.parts.store, &site).await?)
    }
}
