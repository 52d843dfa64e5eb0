//! The integrations of one deployment: at most one per platform (amoCRM, Kommo), each its own
//! client id, secret, redirect URI and account domains, picked per flow and per connection.

use std::sync::Arc;

use crate::amocrm::{AccountHost, AmoClient, AmoError, ClientConfig, Platform, account_host};

/// The configured integrations, amoCRM's first when it is configured; never empty.
#[derive(Debug, Clone)]
pub struct Integrations {
    clients: Vec<Arc<AmoClient>>,
}

impl Integrations {
    /// One client per configuration; `configs` holds at most one per platform (config.rs
    /// checks that) and at least one.
    pub fn new(configs: &[ClientConfig]) -> Self {
        assert!(
            !configs.is_empty(),
            "at least one integration is configured"
        );
        Self {
            clients: configs
                .iter()
                .map(|config| Arc::new(AmoClient::new(config.clone())))
                .collect(),
        }
    }

    /// The integration of `platform`, when it is configured.
    pub fn get(&self, platform: Platform) -> Option<&Arc<AmoClient>> {
        self.clients
            .iter()
            .find(|client| client.config().platform == platform)
    }

    /// The platform of links that name none: the only one configured, or amoCRM when both are.
    pub fn default_platform(&self) -> Platform {
        self.clients[0].config().platform
    }

    /// The configured platforms, amoCRM's first.
    pub fn platforms(&self) -> impl Iterator<Item = Platform> + '_ {
        self.clients.iter().map(|client| client.config().platform)
    }

    /// Every configured client.
    pub fn clients(&self) -> &[Arc<AmoClient>] {
        &self.clients
    }

    /// The integration whose client id amoCRM or Kommo sent back (a widget install's).
    pub fn by_client_id(&self, client_id: &str) -> Option<&Arc<AmoClient>> {
        self.clients
            .iter()
            .find(|client| client.config().client_id == client_id)
    }

    /// The integration a stored connection belongs to; a platform no longer configured is
    /// refused before any request, as a host off the allow-list is.
    pub fn for_connection(
        &self,
        platform: Platform,
        host: &str,
    ) -> Result<&Arc<AmoClient>, AmoError> {
        self.get(platform).ok_or_else(|| AmoError::HostNotAllowed {
            host: host.chars().take(100).collect(),
        })
    }

    /// The client that sends a gateway call for a connection of `platform`: its own, or when
    /// that platform is no longer configured any other, since an API call carries only the
    /// account's access token, never an integration's secret.
    pub fn api_client(&self, platform: Platform) -> &Arc<AmoClient> {
        self.get(platform).unwrap_or(&self.clients[0])
    }

    /// `candidate` as an account host of `platform`'s integration (its domains only).
    pub fn account_host(&self, platform: Platform, candidate: &str) -> Option<AccountHost> {
        let client = self.get(platform)?;
        account_host(candidate, &client.config().domains)
    }
}
