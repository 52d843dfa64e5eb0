//! The amoCRM OAuth sandbox: an in-process HTTP server that behaves like amoCRM's OAuth 2.0
//! (consent page, token endpoint, `/api/v4/account`) so the demo and the tests run offline.
//! This file owns the public handle and its configuration; `state` holds the token logic,
//! `routes` the HTTP surface and `page` the consent page markup.

mod page;
mod routes;
mod state;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use state::State;

/// What the sandbox pretends to be: one registered integration and the accounts a user can
/// grant it access to.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    pub client_id: String,
    pub client_secret: String,
    /// The integration's registered Redirect URI, e.g. `http://127.0.0.1:8080/amocrm/callback`.
    pub redirect_uri: String,
    /// Lifetime of access tokens (amoCRM: 24 hours).
    pub access_token_ttl: Duration,
    pub accounts: Vec<SandboxAccount>,
}

impl SandboxConfig {
    /// A ready-made configuration with one amoCRM and one Kommo account.
    pub fn demo(
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
        redirect_uri: impl Into<String>,
    ) -> Self {
        Self {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            redirect_uri: redirect_uri.into(),
            access_token_ttl: Duration::from_secs(86_400),
            accounts: vec![
                SandboxAccount {
                    id: 31_337_001,
                    name: "Демо-аккаунт".to_owned(),
                    subdomain: "demo".to_owned(),
                    domain: "amocrm.ru".to_owned(),
                },
                SandboxAccount {
                    id: 31_337_002,
                    name: "Kommo Demo".to_owned(),
                    subdomain: "kommodemo".to_owned(),
                    domain: "kommo.com".to_owned(),
                },
            ],
        }
    }
}

/// A fake amoCRM account.
#[derive(Clone, Debug)]
pub struct SandboxAccount {
    pub id: i64,
    pub name: String,
    pub subdomain: String,
    /// `amocrm.ru`, `amocrm.com`, `kommo.com`, ...
    pub domain: String,
}

impl SandboxAccount {
    /// The account host as amoCRM sends it in `referer`: `{subdomain}.{domain}`.
    pub fn host(&self) -> String {
        format!("{}.{}", self.subdomain, self.domain)
    }

    /// The shared API host carried in the access token's `api_domain` claim.
    fn api_domain(&self) -> String {
        if self.domain == "kommo.com" {
            "api-c.kommo.com".to_owned()
        } else {
            format!("api-b.{}", self.domain)
        }
    }
}

/// Counters of what reached the sandbox, for assertions in tests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SandboxStats {
    /// Every HTTP request of any kind.
    pub requests: u64,
    /// Token requests with `grant_type=authorization_code`, failed ones included.
    pub code_exchanges: u64,
    pub successful_code_exchanges: u64,
    /// Token requests with `grant_type=refresh_token`, failed ones included.
    pub refreshes: u64,
    pub successful_refreshes: u64,
    /// Requests to `GET /api/v4/account`, failed ones included.
    pub account_lookups: u64,
    /// The `Host` header of each token-endpoint request, in order.
    pub token_hosts: Vec<String>,
}

/// A misbehaviour to inject into an endpoint.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer problem+json with this status and hint.
    Problem { status: u16, hint: String },
    /// Plain 500 with a text body.
    ServerError,
    /// 200 with a body that is not JSON (`<html>oops</html>`, `text/html`).
    Garbage,
    /// Sleep this long, then behave normally.
    Delay(Duration),
}

/// Handle to a running or runnable sandbox; clones share the same state.
#[derive(Clone)]
pub struct Sandbox {
    shared: Arc<Shared>,
}

/// The configuration never changes after `new`, so only the mutable part sits behind the lock.
struct Shared {
    config: SandboxConfig,
    state: Mutex<State>,
}

impl Sandbox {
    pub fn new(config: SandboxConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The sandbox's routes, for mounting or serving yourself.
    pub fn router(&self) -> axum::Router {
        routes::router(self.clone())
    }

    /// Binds, spawns the server on the current tokio runtime, returns the bound address.
    pub async fn spawn(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let router = self.router();
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, router).await {
                tracing::error!(%error, "amoCRM sandbox server stopped");
            }
        });
        tracing::info!(%bound, "amoCRM sandbox listening");
        Ok(bound)
    }

    pub fn stats(&self) -> SandboxStats {
        self.state().stats.clone()
    }

    /// Every code, access token and refresh token the sandbox ever issued, in issue order
    /// (tests grep logs for them).
    pub fn issued_secrets(&self) -> Vec<String> {
        self.state().issued.clone()
    }

    /// Fault for the next and all following token-endpoint requests until cleared with `None`.
    pub fn set_token_fault(&self, fault: Option<Fault>) {
        self.state().token_fault = fault;
    }

    /// Fault for the next and all following `GET /api/v4/account` requests until cleared.
    pub fn set_account_fault(&self, fault: Option<Fault>) {
        self.state().account_fault = fault;
    }

    /// Moves the sandbox clock forward (codes expire after 20 minutes, refresh tokens after
    /// 90 days, access tokens after `access_token_ttl`).
    pub fn advance_clock(&self, by: Duration) {
        self.state().advance_clock(by);
    }

    /// Skips the consent page: issues a code for this account as if the user clicked Allow.
    ///
    /// # Panics
    /// If no configured account has this id: that is a mistake in the calling test.
    pub fn authorize(&self, account_id: i64) -> String {
        let account = self
            .account(account_id)
            .unwrap_or_else(|| panic!("the sandbox has no account with id {account_id}"));
        self.state().issue_code(account)
    }

    fn config(&self) -> &SandboxConfig {
        &self.shared.config
    }

    fn account(&self, id: i64) -> Option<&SandboxAccount> {
        self.config().accounts.iter().find(|a| a.id == id)
    }

    /// A poisoned lock only means another handler panicked mid-update; the maps stay usable,
    /// and one panic should not take the whole sandbox down with it.
    fn state(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
