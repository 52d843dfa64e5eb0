//! `ClientConfig`: who the integration is at amoCRM and how the client reaches it.

use std::time::Duration;

use url::Url;

use super::{Platform, Secret};

/// amoCRM's and Kommo's account domains, the default allow-list.
const DEFAULT_DOMAINS: [&str; 3] = ["amocrm.ru", "amocrm.com", "kommo.com"];
/// How long one request to amoCRM may take, connecting included.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The integration's registration at amoCRM and how to reach amoCRM: everything
/// [`AmoClient`](super::AmoClient) needs, with nothing of amoauth's server.
///
/// Build it with [`new`](Self::new) and the `with_` methods; the fields are public to read.
///
/// ```
/// use amoauth::Secret;
/// use amoauth::amocrm::ClientConfig;
///
/// let redirect_uri = "https://app.example/amocrm/callback".parse().unwrap();
/// let config = ClientConfig::new("integration-id", Secret::new("client-secret"), redirect_uri)
///     .with_timeout(std::time::Duration::from_secs(5));
/// assert_eq!(config.domains, ["amocrm.ru", "amocrm.com", "kommo.com"]);
/// assert!(!format!("{config:?}").contains("client-secret"));
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientConfig {
    /// The platform the integration is registered on. Default: amoCRM.
    pub platform: Platform,
    /// The integration's ID, sent as `client_id` and in the `X-Client-UUID` header.
    pub client_id: String,
    /// The integration's secret key; posted only to allowed account hosts.
    pub client_secret: Secret,
    /// The integration's registered Redirect URI, sent unchanged on every token request
    /// (amoCRM compares it byte for byte, refreshes included).
    pub redirect_uri: Url,
    /// Lowercase account domains the client talks to, e.g. `amocrm.ru`: an account host is
    /// exactly one label on one of them. The first one also names the consent page's host,
    /// `www.{first}`. Default: `amocrm.ru`, `amocrm.com`, `kommo.com`.
    pub domains: Vec<String>,
    /// Sends every request to this origin instead of `https://{host}`, with the account host
    /// in the `Host` header: for the [sandbox](crate::sandbox) and development. Default: none.
    pub override_origin: Option<Url>,
    /// How long one request may take, connecting included. Default: 10 seconds.
    pub timeout: Duration,
}

impl ClientConfig {
    /// The integration's ID, secret key and registered Redirect URI, with the defaults for
    /// the rest.
    pub fn new(client_id: impl Into<String>, client_secret: Secret, redirect_uri: Url) -> Self {
        Self {
            platform: Platform::Amocrm,
            client_id: client_id.into(),
            client_secret,
            redirect_uri,
            domains: DEFAULT_DOMAINS.map(str::to_owned).to_vec(),
            override_origin: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// An integration registered on `platform`, reaching only that platform's account
    /// domains ([`Platform::default_domains`]), so its consent page is the platform's own
    /// (`www.amocrm.ru` or `www.kommo.com`).
    ///
    /// ```
    /// use amoauth::Secret;
    /// use amoauth::amocrm::{ClientConfig, Platform};
    ///
    /// let redirect_uri = "https://app.example/amocrm/callback".parse().unwrap();
    /// let config = ClientConfig::for_platform(Platform::Kommo, "kommo-id", Secret::new("s"), redirect_uri);
    /// assert_eq!(config.domains, ["kommo.com"]);
    /// ```
    pub fn for_platform(
        platform: Platform,
        client_id: impl Into<String>,
        client_secret: Secret,
        redirect_uri: Url,
    ) -> Self {
        Self {
            platform,
            ..Self::new(client_id, client_secret, redirect_uri)
        }
        .with_domains(platform.default_domains().iter().copied())
    }

    /// Replaces the allowed account domains (see [`domains`](Self::domains)).
    pub fn with_domains<D: Into<String>>(mut self, domains: impl IntoIterator<Item = D>) -> Self {
        self.domains = domains.into_iter().map(Into::into).collect();
        self
    }

    /// Sends every request to `origin`, e.g. a [sandbox](crate::sandbox)'s `http://127.0.0.1:port`.
    pub fn with_override_origin(mut self, origin: Url) -> Self {
        self.override_origin = Some(origin);
        self
    }

    /// Sets the per-request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}
