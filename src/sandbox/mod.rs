//! The amoCRM OAuth sandbox: an in-process HTTP server that behaves like amoCRM's OAuth 2.0
//! (consent page, token endpoint, `/api/v4/account`, host rediscovery, the uninstall webhook)
//! so the demo and the tests run offline. This file owns the public handle, its configuration
//! and the webhook signature; `state` holds the token logic, `routes` the HTTP surface and
//! `page` the consent page markup.
//!
//! Public so that programs test against it offline: one origin serves every account, told
//! apart by the `Host` header, so point [`ClientConfig::with_override_origin`] at
//! [`Sandbox::spawn`]'s address and use the accounts' hosts as usual. The crate-level guide
//! runs a whole authorization against it.
//!
//! [`ClientConfig::with_override_origin`]: crate::amocrm::ClientConfig::with_override_origin

mod api;
mod page;
mod routes;
mod state;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use url::Url;

use crate::amocrm::Platform;

pub use api::{ApiAccountStats, ApiFault, ApiLimits, ApiStats};
use state::State;

/// amoCRM's `User-Agent` on the uninstall webhook.
const UNINSTALL_WEBHOOK_USER_AGENT: &str = "amoService-oAuth-Code-Sender/1.0";
/// amoCRM documents no timeout for the uninstall webhook (3 s for the install one); the
/// sandbox waits longer so a slow test machine fails on an assertion, not on a timeout.
const UNINSTALL_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the sandbox pretends to be: one registered integration and the accounts a user can
/// grant it access to.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// The integration's ID, which the client must send.
    pub client_id: String,
    /// The integration's secret key, which the client must send and which signs the
    /// uninstall webhook.
    pub client_secret: String,
    /// The integration's registered Redirect URI, e.g. `http://127.0.0.1:8080/amocrm/callback`.
    pub redirect_uri: String,
    /// Lifetime of access tokens (amoCRM: 24 hours).
    pub access_token_ttl: Duration,
    /// The accounts a user can grant access to; the first is preselected on the consent page.
    pub accounts: Vec<SandboxAccount>,
    /// The leads and contacts API's rate limit and IP block.
    pub api: ApiLimits,
    /// A Kommo integration beside the one above. When set, the sandbox is two platforms:
    /// `kommo.com` accounts know only this integration and the others only the one above,
    /// each consent page offers its platform's accounts and each token endpoint takes its
    /// platform's credentials. Unset: the one integration serves every account.
    pub kommo: Option<SandboxIntegration>,
}

/// An integration registered on a platform: what the client must send.
#[derive(Clone, Debug)]
pub struct SandboxIntegration {
    /// The integration's ID.
    pub client_id: String,
    /// The integration's secret key; it also signs the uninstall webhook.
    pub client_secret: String,
    /// The integration's registered Redirect URI.
    pub redirect_uri: String,
}

/// The integration a request named, with the platform it is registered on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Registered<'a> {
    pub platform: Platform,
    pub client_id: &'a str,
    pub client_secret: &'a str,
    pub redirect_uri: &'a str,
}

impl SandboxConfig {
    /// The integration whose ID this is, on its platform.
    pub(crate) fn integration(&self, client_id: &str) -> Option<Registered<'_>> {
        self.integrations().find(|i| i.client_id == client_id)
    }

    /// The integration an account's platform knows (with no Kommo one, the only one).
    pub(crate) fn integration_of(&self, account: &SandboxAccount) -> Registered<'_> {
        let platform = account.platform();
        self.integrations()
            .find(|i| i.platform == platform)
            .unwrap_or_else(|| self.main_integration())
    }

    /// Whether `integration` may be granted access to `account`: on its own platform only,
    /// once the sandbox has two.
    pub(crate) fn serves(&self, integration: Registered<'_>, account: &SandboxAccount) -> bool {
        self.kommo.is_none() || integration.platform == account.platform()
    }

    fn main_integration(&self) -> Registered<'_> {
        Registered {
            platform: Platform::Amocrm,
            client_id: &self.client_id,
            client_secret: &self.client_secret,
            redirect_uri: &self.redirect_uri,
        }
    }

    fn integrations(&self) -> impl Iterator<Item = Registered<'_>> {
        let kommo = self.kommo.as_ref().map(|k| Registered {
            platform: Platform::Kommo,
            client_id: &k.client_id,
            client_secret: &k.client_secret,
            redirect_uri: &k.redirect_uri,
        });
        std::iter::once(self.main_integration()).chain(kommo)
    }

    /// The demo configuration with a Kommo integration too (`amoauth demo`, the tests of
    /// both platforms side by side).
    pub fn with_kommo(
        mut self,
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
        redirect_uri: impl Into<String>,
    ) -> Self {
        self.kommo = Some(SandboxIntegration {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            redirect_uri: redirect_uri.into(),
        });
        self
    }
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
            api: ApiLimits::default(),
            kommo: None,
        }
    }
}

/// A fake amoCRM account.
#[derive(Clone, Debug)]
pub struct SandboxAccount {
    /// The numeric account id, as `/api/v4/account` and the uninstall webhook give it.
    pub id: i64,
    /// The display name.
    pub name: String,
    /// The subdomain at the start, e.g. `demo` (see [`Sandbox::rename_account`]).
    pub subdomain: String,
    /// `amocrm.ru`, `amocrm.com`, `kommo.com`, ...
    pub domain: String,
}

impl SandboxAccount {
    /// The account host as amoCRM sends it in `referer`: `{subdomain}.{domain}`.
    pub fn host(&self) -> String {
        format!("{}.{}", self.subdomain, self.domain)
    }

    /// Whether `host` is this account's host, in any case; without building the host, as
    /// the token endpoint asks it of every account in turn.
    pub fn is_at(&self, host: &str) -> bool {
        host.get(..self.subdomain.len())
            .is_some_and(|label| label.eq_ignore_ascii_case(&self.subdomain))
            && host
                .get(self.subdomain.len()..)
                .and_then(|rest| rest.strip_prefix('.'))
                .is_some_and(|domain| domain.eq_ignore_ascii_case(&self.domain))
    }

    /// The platform the account lives on, by its domain.
    pub fn platform(&self) -> Platform {
        Platform::of_domain(&self.domain)
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
    /// Code exchanges that issued a pair.
    pub successful_code_exchanges: u64,
    /// Token requests with `grant_type=refresh_token`, failed ones included.
    pub refreshes: u64,
    /// Refreshes that issued a pair.
    pub successful_refreshes: u64,
    /// Requests to `GET /api/v4/account`, failed ones included.
    pub account_lookups: u64,
    /// Requests to `GET /oauth2/account/current/subdomain`, failed ones included.
    pub subdomain_lookups: u64,
    /// The `Host` header of each token-endpoint request, in order.
    pub token_hosts: Vec<String>,
}

/// A misbehaviour to inject into an endpoint.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer problem+json with this status and hint.
    Problem {
        /// The HTTP status, also put in the body.
        status: u16,
        /// The body's `hint`, e.g. `Token has been revoked`.
        hint: String,
    },
    /// Plain 500 with a text body.
    ServerError,
    /// 200 with a body that is not JSON (`<html>oops</html>`, `text/html`).
    Garbage,
    /// Sleep this long, then behave normally.
    Delay(Duration),
    /// Handle the request normally, then never answer, as when the network drops the reply:
    /// the answer is held back for an hour, so the client times out. On the token endpoint
    /// the pair is issued, the refresh token rotates and the counters count a success, which
    /// is what amoCRM's grace rule is for: the client retries with the refresh token it sent.
    LoseReply,
    /// Handle the request normally, but announce this `expires_in` (seconds) in the token
    /// answer, e.g. an absurd one that no timestamp can hold. Token endpoint only.
    ExpiresIn(u64),
}

impl Fault {
    /// One fault of every kind, for tests that must drive every failure the sandbox can
    /// inject; `Delay` sleeps for `delay` (make it longer than the client's timeout). A new
    /// variant does not compile until it is listed here.
    pub fn every_kind(delay: Duration) -> Vec<Fault> {
        let every = vec![
            Fault::Problem {
                status: 400,
                hint: "Authorization code has been revoked".into(),
            },
            Fault::ServerError,
            Fault::Garbage,
            Fault::Delay(delay),
            Fault::LoseReply,
            Fault::ExpiresIn(u64::MAX),
        ];
        for fault in &every {
            match fault {
                Fault::Problem { .. }
                | Fault::ServerError
                | Fault::Garbage
                | Fault::Delay(_)
                | Fault::LoseReply
                | Fault::ExpiresIn(_) => {}
            }
        }
        every
    }
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
    /// The leads and contacts API's records and traffic; always locked after `state`.
    api: Mutex<api::ApiState>,
}

impl Sandbox {
    /// A sandbox with this integration and these accounts; [`spawn`](Self::spawn) serves it.
    pub fn new(config: SandboxConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::new(&config)),
                api: Mutex::default(),
                config,
            }),
        }
    }

    /// The sandbox's routes, for mounting or serving yourself.
    pub fn router(&self) -> axum::Router {
        routes::router(self.clone()).merge(api::router().with_state(self.clone()))
    }

    /// Binds, spawns the server on the current tokio runtime, returns the bound address.
    pub async fn spawn(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let router = self.router();
        tokio::spawn(async move {
            // The client's address is what the API's IP block keys on.
            let service = router.into_make_service_with_connect_info::<SocketAddr>();
            if let Err(error) = axum::serve(listener, service).await {
                tracing::error!(%error, "amoCRM sandbox server stopped");
            }
        });
        tracing::info!(%bound, "amoCRM sandbox listening");
        Ok(bound)
    }

    /// What reached the sandbox so far.
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
        // Bound first, so the lock is released before panicking and does not get poisoned.
        let code = self.state().issue_code(account_id);
        code.unwrap_or_else(|| panic!("the sandbox has no account with id {account_id}"))
    }

    /// The account moves to `{new_subdomain}.{domain}`, as when its owner renames it in
    /// amoCRM. Its codes and tokens stay valid, but only at the new host: requests at the old
    /// one get 404, and `GET /oauth2/account/current/subdomain` tells the new one.
    ///
    /// # Panics
    /// If no configured account has this id: that is a mistake in the calling test.
    pub fn rename_account(&self, account_id: i64, new_subdomain: &str) {
        let renamed = self.state().rename_account(account_id, new_subdomain);
        assert!(renamed, "the sandbox has no account with id {account_id}");
    }

    /// Revokes every access and refresh token of the account, as amoCRM does when the admin
    /// disables the integration: refreshes then get 401 "Token has been revoked" and
    /// `/api/v4/account` gets 401. Authorization codes not yet exchanged stay usable. An
    /// unknown id revokes nothing.
    pub fn revoke_tokens(&self, account_id: i64) {
        self.state().revoke_tokens(account_id);
    }

    /// Disables the integration in the account as an admin would: revokes its tokens (see
    /// [`revoke_tokens`](Self::revoke_tokens)), then sends amoCRM's uninstall webhook,
    /// `GET {url}?client_uuid=…&account_id=…&signature=…` (appended to any query `url` already
    /// has) with amoCRM's `User-Agent`, signed with [`uninstall_signature`]. Sent once, with no
    /// retry, for an unknown account id too. Returns the receiver's HTTP status, or why the
    /// request failed.
    pub async fn fire_uninstall_webhook(&self, url: &str, account_id: i64) -> Result<u16, String> {
        self.revoke_tokens(account_id);
        let config = self.config();
        // Sent by the account's platform, for the integration registered there.
        let account = self.state().account(account_id).cloned();
        let integration = match &account {
            Some(account) => config.integration_of(account),
            None => config.main_integration(),
        };
        let mut target =
            Url::parse(url).map_err(|error| format!("invalid webhook URL {url:?}: {error}"))?;
        let signature =
            uninstall_signature(integration.client_id, integration.client_secret, account_id);
        target
            .query_pairs_mut()
            .append_pair("client_uuid", integration.client_id)
            .append_pair("account_id", &account_id.to_string())
            .append_pair("signature", &signature);

        // reqwest is built without a crypto provider; an `Err` only means one is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .user_agent(UNINSTALL_WEBHOOK_USER_AGENT)
            .timeout(UNINSTALL_WEBHOOK_TIMEOUT)
            // The status the receiver chose is the answer, a redirect included.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|error| error_chain(&error))?;
        let response = client
            .get(target)
            .send()
            .await
            .map_err(|error| error_chain(&error))?;
        Ok(response.status().as_u16())
    }

    fn config(&self) -> &SandboxConfig {
        &self.shared.config
    }

    /// A poisoned lock only means another handler panicked mid-update; the maps stay usable,
    /// and one panic should not take the whole sandbox down with it.
    fn state(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The API's share of the state, under its own lock (taken after `state` when both are).
    fn api(&self) -> MutexGuard<'_, api::ApiState> {
        self.shared
            .api
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The signature of amoCRM's uninstall webhook: lowercase hex of
/// HMAC-SHA256(key = `client_secret`, message = `"{client_id}|{account_id}"`).
pub fn uninstall_signature(client_id: &str, client_secret: &str, account_id: i64) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(client_secret.as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(format!("{client_id}|{account_id}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// An error with its causes: reqwest's own message rarely says what went wrong
/// ("error sending request"), its sources do ("connection refused").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::SandboxAccount;

    #[test]
    fn an_account_is_at_its_own_host_in_any_case_and_nowhere_else() {
        let account = SandboxAccount {
            id: 1,
            name: "Demo".to_owned(),
            subdomain: "demo".to_owned(),
            domain: "amocrm.ru".to_owned(),
        };
        assert!(account.is_at("demo.amocrm.ru"));
        assert!(account.is_at("DEMO.AmoCRM.ru"));
        for elsewhere in [
            "demo2.amocrm.ru",
            "xdemo.amocrm.ru",
            "demo.amocrm.com",
            "demo.amocrm.ru.evil",
            "demoamocrm.ru",
            "demo",
            "",
            "дemo.amocrm.ru",
        ] {
            assert!(!account.is_at(elsewhere), "{elsewhere}");
        }
    }
}
