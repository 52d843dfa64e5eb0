//! The amoCRM client: consent URL, code exchange and account lookup, over a small typed
//! wrapper of reqwest (amoCRM's token URL differs per account and its errors are problem+json).

mod host;
mod pacer;
mod problem;

use reqwest::header::{ACCEPT, AUTHORIZATION, HOST};
use serde::Deserialize;
use serde_json::Value;
use url::Url;

pub use host::{AccountHost, account_host, is_dns_label, shared_api_host};
pub use problem::{AmoError, AmoFailure, Problem, ProblemKind};

use crate::config::{AmoCrmConfig, Secret};
use pacer::Pacer;

/// amoCRM refresh tokens live 3 months from issue.
pub const REFRESH_TOKEN_LIFETIME: chrono::Duration = chrono::Duration::days(90);

/// The longest access-token lifetime believed: amoCRM issues 24 hours (`expires_in` 86400);
/// a longer one is a broken answer, and an absurd one must not overflow a timestamp.
pub const MAX_EXPIRES_IN: i64 = 10 * 366 * 86_400;

/// Largest response body we read from amoCRM; real ones are a few kilobytes.
const MAX_BODY: usize = 256 * 1024;

/// How the consent window hands control back (amoCRM's `mode`): `popup` or `post_message`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentMode {
    #[default]
    Popup,
    PostMessage,
}

impl ConsentMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Popup => "popup",
            Self::PostMessage => "post_message",
        }
    }
}

/// A fresh token pair. `raw` is amoCRM's response with the token values removed.
#[derive(Debug)]
pub struct TokenSet {
    pub access_token: Secret,
    pub refresh_token: Secret,
    pub expires_in: i64,
    pub raw: Value,
}

/// The account behind a token, from `/api/v4/account`.
#[derive(Debug, Clone)]
pub struct Account {
    pub id: i64,
    pub name: String,
    pub subdomain: String,
    pub raw: Value,
}

/// Where an account lives now, from `/oauth2/account/current/subdomain`.
#[derive(Debug, Clone, Deserialize)]
pub struct AccountDomain {
    pub id: i64,
    pub subdomain: String,
    /// The account's host, e.g. `fastis02.amocrm.ru`.
    pub domain: String,
}

/// The `api_domain` claim of an amoCRM access token (a JWT), read without verifying it:
/// it only says where to ask, and the answer is checked against the allow-list.
pub fn jwt_api_domain(access_token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = access_token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("api_domain")?.as_str().map(str::to_owned)
}

#[derive(Debug)]
pub struct AmoClient {
    http: reqwest::Client,
    config: AmoCrmConfig,
    /// Shared by every caller (callbacks, widget installs, refreshes, webhook checks), so all
    /// requests to one account count against its 7 a second.
    pacer: Pacer,
}

impl AmoClient {
    pub fn new(config: AmoCrmConfig) -> Self {
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

    /// Waits for the account host's next free request slot (amoCRM allows 7 a second).
    pub async fn pace(&self, host: &str) {
        self.pacer.wait(host).await;
    }

    pub fn config(&self) -> &AmoCrmConfig {
        &self.config
    }

    /// The consent page: `www.<first domain>` unless the account's host is known.
    pub fn consent_url(&self, state: &str, account_host: Option<&str>, mode: ConsentMode) -> Url {
        let host = account_host
            .map(str::to_owned)
            .unwrap_or_else(|| format!("www.{}", self.config.domains[0]));
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

    /// A call to the account's API for the gateway: `path_and_query` as the host app sent it
    /// (already checked), at the account's host or the development override.
    pub fn api_request(
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

    /// Exchanges an authorization code at the account's own host.
    #[tracing::instrument(skip(self, code), fields(host = %host))]
    pub async fn exchange_code(&self, host: &str, code: &str) -> Result<TokenSet, AmoError> {
        self.token_grant(host, "authorization_code", ("code", code))
            .await
    }

    /// Trades the refresh token for a new pair (amoCRM rotates refresh tokens).
    #[tracing::instrument(skip(self, refresh_token), fields(host = %host))]
    pub async fn refresh(&self, host: &str, refresh_token: &Secret) -> Result<TokenSet, AmoError> {
        self.token_grant(
            host,
            "refresh_token",
            ("refresh_token", refresh_token.expose()),
        )
        .await
    }

    /// `POST /oauth2/access_token`, form-encoded, with the registered redirect URI (amoCRM
    /// wants it on refreshes too).
    async fn token_grant(
        &self,
        host: &str,
        grant_type: &str,
        (field, value): (&str, &str),
    ) -> Result<TokenSet, AmoError> {
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
    /// host named in the access token (`api_domain`).
    #[tracing::instrument(skip(self, refresh_token), fields(api_domain = %api_domain))]
    pub async fn current_subdomain(
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

    /// Looks up the account the access token belongs to.
    #[tracing::instrument(skip(self, access_token), fields(host = %host))]
    pub async fn account(&self, host: &str, access_token: &Secret) -> Result<Account, AmoError> {
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
        let parsed: AccountBody = serde_json::from_value(raw.clone()).map_err(|err| {
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

    /// Sends the request and returns a 2xx body, or the typed error.
    async fn send(
        &self,
        host: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<Vec<u8>, AmoError> {
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
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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
