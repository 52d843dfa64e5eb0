//! amoCRM's OAuth 2.0 client, usable on its own: the consent URL, the code exchange, refreshes
//! with amoCRM's rotation and rename rules, the account lookup and typed problem+json errors.
//!
//! [`AmoClient`] is built from a [`ClientConfig`] (the integration's ID, secret key and
//! Redirect URI); amoauth's server uses the same client. The rules it follows:
//!
//! - **Hosts.** Token requests go to the account's own host (`{subdomain}.amocrm.ru`, from the
//!   callback's `referer`), never `www.`; the client refuses any host that is not one label on
//!   an allowed domain ([`AmoClient::account_host`]), so the secret key and tokens go nowhere
//!   else.
//! - **Pacing.** amoCRM allows 7 requests a second per account; a client spaces its requests
//!   to each host accordingly, whichever task makes them.
//! - **Rotation.** Every refresh returns a new refresh token. The old one stays valid until
//!   the new one is first used, so after a lost reply or a timeout the same old token may be
//!   sent again; after the new one was used, the old one gets "Token has been revoked".
//!   [`AmoClient::refresh_grant`] updates a [`Grant`] only on success, which is this rule.
//! - **Renames.** An account's subdomain can change. When a refresh at the stored host answers
//!   401 or 404 (and not about the token), [`AmoClient::refresh_grant`] asks amoCRM where the
//!   account lives now (the shared API host named in the access token, with the refresh
//!   token) and retries there once. [`AmoClient::moved_host`] is that lookup alone, for an
//!   API call's 404.
//! - **Errors.** amoCRM answers problem+json (`title`, `type`, `status`, `detail`, `hint`);
//!   [`AmoError::Rejected`] carries it as a [`Problem`], classified by [`ProblemKind`].
//! - **Secrets.** Codes, tokens and the secret key are [`Secret`]s: no `Debug` or error
//!   message of this module shows one.
//!
//! The crate-level guide walks through a whole authorization against the
//! [sandbox](crate::sandbox).

mod config;
mod host;
mod pacer;
mod platform;
mod problem;
mod secret;

use reqwest::header::{ACCEPT, AUTHORIZATION, HOST};
use serde::Deserialize;
use serde_json::Value;
use url::Url;

pub use config::ClientConfig;
pub use host::AccountHost;
pub(crate) use host::{account_host, is_dns_label};
pub use platform::Platform;
pub(crate) use problem::AmoFailure;
pub use problem::{AmoError, Problem, ProblemKind};
pub use secret::Secret;

use host::shared_api_host;
use pacer::Pacer;
pub(crate) use pacer::sleep_until_due;

/// amoCRM refresh tokens live 3 months from issue.
pub(crate) const REFRESH_TOKEN_LIFETIME: chrono::Duration = chrono::Duration::days(90);

/// The longest access-token lifetime believed: amoCRM issues 24 hours (`expires_in` 86400);
/// a longer one is a broken answer, and an absurd one must not overflow a timestamp.
const MAX_EXPIRES_IN: i64 = 10 * 366 * 86_400;

/// Largest response body we read from amoCRM; real ones are a few kilobytes.
const MAX_BODY: usize = 256 * 1024;

/// How the consent window hands control back (amoCRM's `mode` parameter).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentMode {
    /// The consent window closes and the main window goes to the Redirect URI.
    #[default]
    Popup,
    /// The consent window itself goes to the Redirect URI; the page there closes it.
    PostMessage,
}

impl ConsentMode {
    /// The value of the `mode` parameter: `popup` or `post_message`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Popup => "popup",
            Self::PostMessage => "post_message",
        }
    }
}

/// A fresh token pair from the token endpoint.
#[derive(Debug)]
#[non_exhaustive]
pub struct TokenSet {
    /// The access token (a JWT), sent as `Authorization: Bearer …`; amoCRM issues it for 24 hours.
    pub access_token: Secret,
    /// The refresh token: it lives 3 months and is replaced by every refresh.
    pub refresh_token: Secret,
    /// Seconds the access token lives, between 1 and ten years (longer answers are refused).
    pub expires_in: i64,
    /// amoCRM's whole answer with the token values removed (`token_type`, `server_time`, …).
    pub raw: Value,
}

/// The account behind an access token, from `GET /api/v4/account`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Account {
    /// The account's numeric id: the key that survives subdomain renames.
    pub id: i64,
    /// The account's display name.
    pub name: String,
    /// The account's current subdomain, e.g. `fastis02`.
    pub subdomain: String,
    /// amoCRM's whole answer.
    pub raw: Value,
}

/// One account's authorization as a program keeps it between refreshes; give it to
/// [`AmoClient::refresh_grant`], which applies amoCRM's rotation and rename rules to it.
#[derive(Clone, Debug)]
pub struct Grant {
    /// The account host the tokens are used at, e.g. `fastis02.amocrm.ru`.
    pub host: String,
    /// The account's id ([`Account::id`]), when known: a rediscovered host is believed only
    /// when it belongs to this account.
    pub account_id: Option<i64>,
    /// The current access token; its `api_domain` claim says where to rediscover the host.
    pub access_token: Secret,
    /// The current refresh token.
    pub refresh_token: Secret,
}

/// What a successful [`AmoClient::refresh_grant`] did, besides updating the [`Grant`].
#[derive(Debug)]
#[non_exhaustive]
pub struct Refreshed {
    /// Seconds the new access token lives.
    pub expires_in: i64,
    /// amoCRM's answer with the token values removed.
    pub raw: Value,
    /// The host the grant had before, when the account was found under a new subdomain.
    pub moved_from: Option<String>,
}

/// Where an account lives now, from `/oauth2/account/current/subdomain`.
#[derive(Debug, Clone, Deserialize)]
struct AccountDomain {
    id: i64,
    /// The account's host, e.g. `fastis02.amocrm.ru`.
    domain: String,
}

/// The `api_domain` claim of an amoCRM access token (a JWT), read without verifying it:
/// it only says where to ask, and the answer is checked against the allow-list.
fn jwt_api_domain(access_token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = access_token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("api_domain")?.as_str().map(str::to_owned)
}

/// amoCRM's OAuth 2.0 client for one integration. Cheap to share behind an `Arc`; one client
/// per process keeps the per-account pacing right.
///
/// Its `Debug` shows the configuration with the secret key masked.
#[derive(Debug)]
pub struct AmoClient {
    http: reqwest::Client,
    config: ClientConfig,
    /// Shared by every caller (callbacks, widget installs, refreshes, webhook checks), so all
    /// requests to one account count against its 7 a second.
    pacer: Pacer,
}

impl AmoClient {
    /// A client for the integration `config` describes. Makes no request.
    pub fn new(config: ClientConfig) -> Self {
        // reqwest is built without a bundled crypto provider; ring serves both it and sqlx.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(config.timeout)
            .timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("amoauth/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the HTTP client configuration is static and valid");
        Self {
            http,
            config,
            pacer: Pacer::amocrm(),
        }
    }

    /// The configuration the client was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Checks a callback's `referer` (or any host) against the allow-list: exactly
    /// `{subdomain}.{domain}` with `domain` from [`ClientConfig::domains`], no scheme, port,
    /// path, userinfo or uppercase, and not one of amoCRM's own sites (`www`, `api-b`, …).
    pub fn account_host(&self, candidate: &str) -> Option<AccountHost> {
        account_host(candidate, &self.config.domains)
    }

    /// The consent page to send the user to: `https://www.{first domain}/oauth` (or the
    /// account's own host when known) with `client_id`, `state` and `mode`. amoCRM returns
    /// `state` unchanged to the Redirect URI with `code` and `referer`.
    pub fn consent_url(&self, state: &str, account_host: Option<&str>, mode: ConsentMode) -> Url {
        let host = account_host.map(str::to_owned).unwrap_or_else(|| {
            let domain = self
                .config
                .domains
                .first()
                .map_or("amocrm.ru", String::as_str);
            format!("www.{domain}")
        });
        let mut url = self.base_url(&host);
        url.set_path("/oauth");
        url.query_pairs_mut()
            .append_pair("client_id", &self.config.client_id)
            .append_pair("state", state)
            .append_pair("mode", mode.as_str());
        url
    }

    /// `https://{host}`, or the development override origin.
    fn base_url(&self, host: &str) -> Url {
        match &self.config.override_origin {
            Some(origin) => origin.clone(),
            None => Url::parse(&format!("https://{host}/")).expect("validated host"),
        }
    }

    fn request(&self, method: reqwest::Method, host: &str, path: &str) -> reqwest::RequestBuilder {
        let mut url = self.base_url(host);
        url.set_path(path);
        let request = self
            .http
            .request(method, url)
            .header("X-Client-UUID", &self.config.client_id);
        // With the override the account is still named, as a real amoCRM host would see it.
        if self.config.override_origin.is_some() {
            request.header(HOST, host)
        } else {
            request
        }
    }

    /// The secret key and tokens go only to account hosts on the allow-list.
    fn allowed(&self, host: &str) -> Result<(), AmoError> {
        match self.account_host(host) {
            Some(_) => Ok(()),
            None => Err(AmoError::HostNotAllowed {
                host: host.chars().take(100).collect(),
            }),
        }
    }

    /// A call to the account's API for the gateway: `path_and_query` as the host app sent it
    /// (already checked), at the account's host or the development override.
    pub(crate) fn api_request(
        &self,
        method: reqwest::Method,
        host: &str,
        path: &str,
        query: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let mut url = self.base_url(host);
        url.set_path(path);
        url.set_query(query);
        let request = self.http.request(method, url);
        if self.config.override_origin.is_some() {
            request.header(HOST, host)
        } else {
            request
        }
    }

    /// Exchanges an authorization code (single use, valid 20 minutes) at the account's own
    /// host, the callback's `referer`.
    #[tracing::instrument(skip(self, code), fields(host = %host))]
    pub async fn exchange_code(&self, host: &str, code: &str) -> Result<TokenSet, AmoError> {
        self.token_grant(host, "authorization_code", ("code", code))
            .await
    }

    /// Trades a refresh token for a new pair at `host`: one request, no rename handling.
    /// [`refresh_grant`](Self::refresh_grant) adds amoCRM's rename rule.
    #[tracing::instrument(skip(self, refresh_token), fields(host = %host))]
    pub async fn refresh(&self, host: &str, refresh_token: &Secret) -> Result<TokenSet, AmoError> {
        self.token_grant(
            host,
            "refresh_token",
            ("refresh_token", refresh_token.expose()),
        )
        .await
    }

    /// Refreshes the grant following amoCRM's rules, and on success replaces its tokens with
    /// the new pair: store the grant before using the new tokens, since the first use of the
    /// new refresh token revokes the old one.
    ///
    /// - **Grace rule.** On any error the grant's tokens stay as they were, and the old
    ///   refresh token stays valid until the new one is first used: after a timeout or a lost
    ///   reply, call again with the same grant. Only when [`AmoError::revokes_grant`] is true
    ///   is the authorization gone; the user must consent again.
    /// - **Renames.** When the stored host answers 401 or 404 not about the token, the account
    ///   may have a new subdomain: the client asks `GET https://{api_domain}/oauth2/account/current/subdomain`
    ///   (`api_domain` from the access token, the refresh token in `X-Refresh-Token`),
    ///   believes the answer only for an allowed host of the grant's account, sets
    ///   [`Grant::host`] to it (even if the retry there then fails, so store it) and retries
    ///   there once. [`Refreshed::moved_from`] tells the old host.
    #[tracing::instrument(skip(self, grant), fields(host = %grant.host))]
    pub async fn refresh_grant(&self, grant: &mut Grant) -> Result<Refreshed, AmoError> {
        let err = match self.refresh(&grant.host, &grant.refresh_token).await {
            Ok(tokens) => return Ok(grant.rotate(tokens, None)),
            Err(err) if err.account_may_have_moved() => err,
            Err(err) => return Err(err),
        };
        let Some(new_host) = self.moved_host(grant).await else {
            return Err(err);
        };
        tracing::info!(account_id = grant.account_id, from = %grant.host, to = %new_host.host, "account moved to a new subdomain");
        let old_host = std::mem::replace(&mut grant.host, new_host.host);
        let tokens = self.refresh(&grant.host, &grant.refresh_token).await?;
        Ok(grant.rotate(tokens, Some(old_host)))
    }

    /// Asks amoCRM where the grant's account lives now, for when its host answers 401 or 404
    /// as if the account were not there ([`refresh_grant`](Self::refresh_grant) does this
    /// itself): `GET https://{api_domain}/oauth2/account/current/subdomain` with the refresh
    /// token. The new host, or `None` when amoCRM names no allowed host of the grant's
    /// account other than [`Grant::host`] (a failed lookup is logged as a warning).
    pub async fn moved_host(&self, grant: &Grant) -> Option<AccountHost> {
        let api_domain = jwt_api_domain(grant.access_token.expose())?;
        // The refresh token goes in a header: never to a host outside the allow-list.
        let api_domain = shared_api_host(&api_domain, &self.config.domains)?;
        let found = match self
            .current_subdomain(&api_domain, &grant.refresh_token)
            .await
        {
            Ok(found) => found,
            Err(err) => {
                tracing::warn!(error = %err, account_id = grant.account_id, "subdomain lookup failed");
                return None;
            }
        };
        if grant.account_id.is_some_and(|id| id != found.id) {
            return None;
        }
        let host = self.account_host(&found.domain)?;
        (host.host != grant.host).then_some(host)
    }

    /// `POST /oauth2/access_token`, form-encoded, with the registered redirect URI (amoCRM
    /// wants it on refreshes too).
    async fn token_grant(
        &self,
        host: &str,
        grant_type: &str,
        (field, value): (&str, &str),
    ) -> Result<TokenSet, AmoError> {
        self.allowed(host)?;
        let form = [
            ("client_id", self.config.client_id.as_str()),
            ("client_secret", self.config.client_secret.expose()),
            ("grant_type", grant_type),
            (field, value),
            ("redirect_uri", self.config.redirect_uri.as_str()),
        ];
        let request = self
            .request(reqwest::Method::POST, host, "/oauth2/access_token")
            .header(ACCEPT, "application/json")
            .form(&form);
        let body = self.send(host, request).await?;
        parse_token_set(&body)
    }

    /// Finds the account's current host after a subdomain rename, through the shared API
    /// host named in the access token (`api_domain`), which the caller checked.
    #[tracing::instrument(skip(self, refresh_token), fields(api_domain = %api_domain))]
    async fn current_subdomain(
        &self,
        api_domain: &str,
        refresh_token: &Secret,
    ) -> Result<AccountDomain, AmoError> {
        let request = self
            .request(
                reqwest::Method::GET,
                api_domain,
                "/oauth2/account/current/subdomain",
            )
            .header(ACCEPT, "application/json")
            .header("X-Refresh-Token", refresh_token.expose());
        let body = self.send(api_domain, request).await?;
        serde_json::from_slice(&body).map_err(|err| {
            AmoError::BadResponse(format!(
                "the subdomain lookup answered unexpected JSON ({err})"
            ))
        })
    }

    /// Looks up the account the access token belongs to, at its host.
    #[tracing::instrument(skip(self, access_token), fields(host = %host))]
    pub async fn account(&self, host: &str, access_token: &Secret) -> Result<Account, AmoError> {
        self.allowed(host)?;
        let request = self
            .request(reqwest::Method::GET, host, "/api/v4/account")
            .header(ACCEPT, "application/hal+json, application/json")
            .header(AUTHORIZATION, format!("Bearer {}", access_token.expose()));
        let body = self.send(host, request).await?;
        #[derive(Deserialize)]
        struct AccountBody {
            id: i64,
            name: String,
            subdomain: String,
        }
        let raw: Value = serde_json::from_slice(&body)
            .map_err(|_| AmoError::BadResponse("the account lookup answered non-JSON".into()))?;
        let parsed = AccountBody::deserialize(&raw).map_err(|err| {
            AmoError::BadResponse(format!(
                "the account lookup lacks id, name or subdomain ({err})"
            ))
        })?;
        Ok(Account {
            id: parsed.id,
            name: parsed.name,
            subdomain: parsed.subdomain,
            raw,
        })
    }

    /// Waits for the host's turn (amoCRM allows 7 requests a second), sends the request and
    /// returns a 2xx body, or the typed error.
    async fn send(
        &self,
        host: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<Vec<u8>, AmoError> {
        self.pacer.wait(host).await;
        let transport = |err: reqwest::Error| {
            if err.is_timeout() {
                AmoError::Timeout(self.config.timeout)
            } else {
                AmoError::Unreachable {
                    host: host.to_owned(),
                    reason: error_chain(&err),
                }
            }
        };
        let mut response = request.send().await.map_err(transport)?;
        let status = response.status();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(AmoError::BadResponse(format!(
                    "the response is larger than {MAX_BODY} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        if status.is_success() {
            Ok(body)
        } else if status.is_redirection() {
            Err(AmoError::Redirect {
                status: status.as_u16(),
            })
        } else {
            match Problem::parse(&body) {
                Some(problem) => Err(AmoError::Rejected {
                    status: status.as_u16(),
                    problem,
                }),
                None => Err(AmoError::Http {
                    status: status.as_u16(),
                }),
            }
        }
    }
}

/// The error and its causes on one line (reqwest hides the useful part in `source`).
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl Grant {
    /// Takes the new pair of a successful refresh.
    fn rotate(&mut self, tokens: TokenSet, moved_from: Option<String>) -> Refreshed {
        self.access_token = tokens.access_token;
        self.refresh_token = tokens.refresh_token;
        Refreshed {
            expires_in: tokens.expires_in,
            raw: tokens.raw,
            moved_from,
        }
    }
}

fn parse_token_set(body: &[u8]) -> Result<TokenSet, AmoError> {
    let mut raw: Value = serde_json::from_slice(body)
        .map_err(|_| AmoError::BadResponse("the token endpoint answered non-JSON".into()))?;
    let Some(object) = raw.as_object_mut() else {
        return Err(AmoError::BadResponse(
            "the token endpoint answered JSON that is not an object".into(),
        ));
    };
    let mut take = |field: &str| match object.remove(field) {
        Some(Value::String(value)) if !value.is_empty() => Ok(Secret::new(value)),
        _ => Err(AmoError::BadResponse(format!(
            "the token response has no `{field}`"
        ))),
    };
    let access_token = take("access_token")?;
    let refresh_token = take("refresh_token")?;
    let expires_in = object
        .get("expires_in")
        .and_then(Value::as_i64)
        .filter(|secs| (1..=MAX_EXPIRES_IN).contains(secs))
        .ok_or_else(|| {
            AmoError::BadResponse(format!(
                "the token response has no `expires_in` between 1 and {MAX_EXPIRES_IN} seconds"
            ))
        })?;
    object.remove("id_token");
    Ok(TokenSet {
        access_token,
        refresh_token,
        expires_in,
        raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_platforms_client_opens_its_own_consent_page_and_hosts() {
        let redirect_uri: Url = "https://app.example/amocrm/callback".parse().unwrap();
        for (platform, consent, account, foreign) in [
            (
                Platform::Amocrm,
                "https://www.amocrm.ru/oauth?client_id=id&state=s&mode=popup",
                "shop.amocrm.ru",
                "shop.kommo.com",
            ),
            (
                Platform::Kommo,
                "https://www.kommo.com/oauth?client_id=id&state=s&mode=popup",
                "shop.kommo.com",
                "shop.amocrm.ru",
            ),
        ] {
            let config =
                ClientConfig::for_platform(platform, "id", Secret::new("s"), redirect_uri.clone());
            let client = AmoClient::new(config);
            assert_eq!(
                client.consent_url("s", None, ConsentMode::Popup).as_str(),
                consent
            );
            assert!(client.account_host(account).is_some(), "{platform}");
            assert!(client.account_host(foreign).is_none(), "{platform}");
        }
    }

    #[test]
    fn token_response_keeps_no_token_values_in_raw() {
        let body = br#"{"token_type":"Bearer","expires_in":86400,"access_token":"AAA","refresh_token":"RRR","server_time":1}"#;
        let set = parse_token_set(body).unwrap();
        assert_eq!(set.access_token.expose(), "AAA");
        assert_eq!(set.refresh_token.expose(), "RRR");
        assert_eq!(set.expires_in, 86400);
        let raw = set.raw.to_string();
        assert!(!raw.contains("AAA") && !raw.contains("RRR"), "{raw}");
        assert!(raw.contains("server_time"));
    }

    #[test]
    fn api_domain_is_read_from_the_jwt() {
        use base64::Engine as _;
        let encode = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let token = format!(
            "{}.{}.sig",
            encode("{}"),
            encode(r#"{"api_domain":"api-b.amocrm.ru"}"#)
        );
        assert_eq!(jwt_api_domain(&token).as_deref(), Some("api-b.amocrm.ru"));
        assert_eq!(jwt_api_domain("not-a-jwt"), None);
        assert_eq!(jwt_api_domain(&format!("x.{}.y", encode("{}"))), None);
    }

    #[test]
    fn incomplete_token_responses_are_errors() {
        assert!(parse_token_set(br#"{"access_token":"A","expires_in":10}"#).is_err());
        assert!(parse_token_set(br#"{"access_token":"A","refresh_token":"R"}"#).is_err());
        assert!(parse_token_set(b"<html>").is_err());
        assert!(parse_token_set(b"[]").is_err());
        for absurd in [
            "0",
            "-5",
            "1000000000000000",
            "9223372036854775807",
            "1e300",
        ] {
            let body =
                format!(r#"{{"access_token":"A","refresh_token":"R","expires_in":{absurd}}}"#);
            assert!(
                matches!(
                    parse_token_set(body.as_bytes()),
                    Err(AmoError::BadResponse(_))
                ),
                "{absurd}"
            );
        }
    }
}
