//! The sandbox's mutable state and amoCRM's token rules: the shiftable clock, the accounts as
//! renamed so far, authorization codes, access tokens, the rotation chain of refresh tokens
//! (with the grace rule), revocation, host checks, counters and injected faults. Nothing here
//! knows about HTTP beyond status codes and the already parsed `Host`.

use std::collections::HashMap;
use std::time::Duration;

use axum::http::StatusCode;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use super::{Fault, SandboxAccount, SandboxConfig, SandboxStats};

/// amoCRM: "The code expires after 20 minutes."
const CODE_TTL: TimeDelta = TimeDelta::minutes(20);
/// amoCRM: refresh tokens live three months.
const REFRESH_TTL: TimeDelta = TimeDelta::days(90);
/// amoCRM codes and refresh tokens are opaque `def50200…` strings.
const OPAQUE_PREFIX: &str = "def50200";
/// Every sandbox account has the same single user, the one who clicked Allow.
pub(super) const CURRENT_USER_ID: i64 = 10_000_001;

#[derive(Default)]
pub(super) struct State {
    /// How far `advance_clock` has moved the sandbox ahead of the wall clock.
    clock_offset: TimeDelta,
    /// The configured accounts with their current subdomains. Grants refer to accounts by id,
    /// so a rename moves every grant to the new host at once, as on amoCRM.
    accounts: Vec<SandboxAccount>,
    codes: HashMap<String, Code>,
    access_tokens: HashMap<String, AccessToken>,
    refresh_tokens: HashMap<String, RefreshToken>,
    pub(super) issued: Vec<String>,
    pub(super) stats: SandboxStats,
    pub(super) token_fault: Option<Fault>,
    pub(super) account_fault: Option<Fault>,
}

struct Code {
    account_id: i64,
    issued_at: DateTime<Utc>,
    used: bool,
}

struct AccessToken {
    account_id: i64,
    expires_at: DateTime<Utc>,
    /// Set by `revoke_tokens`, when the admin disables the integration.
    revoked: bool,
}

/// One link of a rotation chain: each refresh issues a successor to the token it used.
struct RefreshToken {
    account_id: i64,
    issued_at: DateTime<Utc>,
    revoked: bool,
    predecessor: Option<String>,
    /// The refresh token issued in exchange for this one, while that one is still unused.
    successor: Option<String>,
}

/// The token endpoint's fields; the body may be JSON or form-encoded, so all are optional
/// strings and validated here.
#[derive(Debug, Default, Deserialize)]
pub(super) struct TokenRequest {
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub grant_type: Option<String>,
    pub code: Option<String>,
    pub refresh_token: Option<String>,
    pub redirect_uri: Option<String>,
}

#[derive(Clone, Copy)]
pub(super) enum GrantType {
    AuthorizationCode,
    RefreshToken,
}

impl GrantType {
    pub(super) fn parse(value: &str) -> Option<Self> {
        match value {
            "authorization_code" => Some(Self::AuthorizationCode),
            "refresh_token" => Some(Self::RefreshToken),
            _ => None,
        }
    }
}

/// The token endpoint's success body.
#[derive(Serialize)]
pub(super) struct TokenGrant {
    token_type: &'static str,
    expires_in: u64,
    access_token: String,
    refresh_token: String,
    server_time: i64,
}

impl TokenGrant {
    /// The same grant announcing another lifetime (`Fault::ExpiresIn`).
    pub(super) fn announcing(self, expires_in: u64) -> Self {
        Self { expires_in, ..self }
    }
}

/// Why the token endpoint refused a request.
#[derive(Clone, Copy, Debug)]
pub(super) enum TokenError {
    /// 401 "Некорректный клиент": wrong or missing client credentials.
    InvalidClient,
    /// An OAuth problem that amoCRM explains in its `hint`.
    Invalid {
        status: StatusCode,
        hint: &'static str,
    },
    /// 404 "Account not found": the grant belongs to an account served at another host.
    AccountNotFound,
}

/// Why `/api/v4/account` refused a Bearer token.
#[derive(Debug)]
pub(super) enum ApiError {
    /// 401: the token is unknown, expired or revoked.
    Unauthorized,
    /// 404 "Account not found": the token's account is served at another host.
    AccountNotFound,
}

fn bad_request(hint: &'static str) -> TokenError {
    TokenError::Invalid {
        status: StatusCode::BAD_REQUEST,
        hint,
    }
}

fn bad_refresh(hint: &'static str) -> TokenError {
    TokenError::Invalid {
        status: StatusCode::UNAUTHORIZED,
        hint,
    }
}

/// An empty field counts as a missing one, as in a form with a blank input.
fn field(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.is_empty())
}

impl State {
    pub(super) fn new(config: &SandboxConfig) -> Self {
        Self {
            accounts: config.accounts.clone(),
            ..Self::default()
        }
    }

    /// The accounts as they are now, renames included.
    pub(super) fn accounts(&self) -> &[SandboxAccount] {
        &self.accounts
    }

    pub(super) fn account(&self, id: i64) -> Option<&SandboxAccount> {
        self.accounts.iter().find(|a| a.id == id)
    }

    /// Gives the account a new subdomain; `false` if there is no such account.
    pub(super) fn rename_account(&mut self, id: i64, new_subdomain: &str) -> bool {
        match self.accounts.iter_mut().find(|a| a.id == id) {
            Some(account) => {
                new_subdomain.clone_into(&mut account.subdomain);
                true
            }
            None => false,
        }
    }

    /// Revokes every access and refresh token of the account, as amoCRM does when the admin
    /// disables the integration. Codes are left alone: they are not tokens yet.
    pub(super) fn revoke_tokens(&mut self, account_id: i64) {
        for token in self.access_tokens.values_mut() {
            if token.account_id == account_id {
                token.revoked = true;
            }
        }
        for token in self.refresh_tokens.values_mut() {
            if token.account_id == account_id {
                token.revoked = true;
            }
        }
    }

    /// Whether a request that arrived at `host` (lowercase, without port) may act for
    /// `account`. amoCRM serves each account only at its own host, so a host shaped like
    /// `<label>.<domain>` for a domain of the sandbox's accounts must be exactly that
    /// account's: a client still posting to the old host after a rename, or to the shared
    /// `api-b` host, finds no account there. Other hosts (localhost, IPs, none) are how tests
    /// and the demo reach the sandbox, so they stand for every account.
    fn serves_account(&self, host: Option<&str>, account: &SandboxAccount) -> bool {
        let Some(host) = host else {
            return true;
        };
        let account_shaped = self.accounts.iter().any(|a| {
            host.len()
                .checked_sub(a.domain.len())
                .and_then(|at| host.split_at_checked(at))
                .filter(|(_, domain)| domain.eq_ignore_ascii_case(&a.domain))
                .and_then(|(rest, _)| rest.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.'))
        });
        !account_shaped || account.is_at(host)
    }

    /// Sandbox time: the wall clock plus whatever tests skipped ahead.
    pub(super) fn now(&self) -> DateTime<Utc> {
        Utc::now()
            .checked_add_signed(self.clock_offset)
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    pub(super) fn advance_clock(&mut self, by: Duration) {
        let by = TimeDelta::from_std(by).unwrap_or(TimeDelta::MAX);
        self.clock_offset = self.clock_offset.checked_add(&by).unwrap_or(TimeDelta::MAX);
    }

    /// A fresh authorization code for the account, or `None` if there is no such account.
    pub(super) fn issue_code(&mut self, account_id: i64) -> Option<String> {
        self.account(account_id)?;
        let code = opaque_secret::<64>();
        self.codes.insert(
            code.clone(),
            Code {
                account_id,
                issued_at: self.now(),
                used: false,
            },
        );
        self.issued.push(code.clone());
        Some(code)
    }

    /// Counts a token-endpoint request before anything can fail, faults included.
    pub(super) fn note_token_request(&mut self, host: String, grant_type: Option<GrantType>) {
        self.stats.token_hosts.push(host);
        match grant_type {
            Some(GrantType::AuthorizationCode) => self.stats.code_exchanges += 1,
            Some(GrantType::RefreshToken) => self.stats.refreshes += 1,
            None => {}
        }
    }

    /// `POST /oauth2/access_token` arriving at `host` (lowercase, without port), checked in
    /// the order amoCRM's OAuth server does: grant type, client, redirect URI, then the grant
    /// itself: known, at its account's host, still valid.
    pub(super) fn token(
        &mut self,
        config: &SandboxConfig,
        request: &TokenRequest,
        host: Option<&str>,
    ) -> Result<TokenGrant, TokenError> {
        let grant_type = field(&request.grant_type)
            .and_then(GrantType::parse)
            .ok_or(bad_request("Check the `grant_type` parameter"))?;
        let client_id =
            field(&request.client_id).ok_or(bad_request("Check the `client_id` parameter"))?;
        let Some(integration) = config
            .integration(client_id)
            .filter(|i| field(&request.client_secret) == Some(i.client_secret))
        else {
            return Err(TokenError::InvalidClient);
        };
        // Another platform's servers do not know the integration at all.
        let account_at_host =
            host.and_then(|host| self.accounts.iter().find(|account| account.is_at(host)));
        if account_at_host.is_some_and(|account| !config.serves(integration, account)) {
            return Err(TokenError::InvalidClient);
        }
        let redirect_uri = field(&request.redirect_uri)
            .ok_or(bad_request("Check the `redirect_uri` parameter"))?;
        // amoCRM wants the registered Redirect URI byte for byte, on refreshes too.
        if redirect_uri != integration.redirect_uri {
            return Err(bad_request("Redirect URI mismatch"));
        }
        match grant_type {
            GrantType::AuthorizationCode => {
                let code = field(&request.code).ok_or(bad_request("Check the `code` parameter"))?;
                self.exchange_code(config, code, host)
            }
            GrantType::RefreshToken => {
                let token = field(&request.refresh_token)
                    .ok_or(bad_request("Check the `refresh_token` parameter"))?;
                self.refresh(config, token, host)
            }
        }
    }

    /// Every check comes before the code is marked used, so a refused request leaves it
    /// usable.
    fn exchange_code(
        &mut self,
        config: &SandboxConfig,
        code: &str,
        host: Option<&str>,
    ) -> Result<TokenGrant, TokenError> {
        let unknown = bad_request("Cannot decrypt the authorization code");
        let now = self.now();
        let &Code {
            account_id,
            issued_at,
            used,
        } = self.codes.get(code).ok_or(unknown)?;
        let account = self.account(account_id).cloned().ok_or(unknown)?;
        if !self.serves_account(host, &account) {
            return Err(TokenError::AccountNotFound);
        }
        if used {
            return Err(bad_request("Authorization code has been revoked"));
        }
        if now - issued_at > CODE_TTL {
            return Err(bad_request("Authorization code has expired"));
        }
        if let Some(entry) = self.codes.get_mut(code) {
            entry.used = true;
        }
        self.stats.successful_code_exchanges += 1;
        Ok(self.issue_pair(config, &account, None))
    }

    /// Rotation with amoCRM's grace rule: the used token stays valid until its successor is
    /// first used, so a client that lost the reply can retry with it. Nothing changes before
    /// every check has passed.
    fn refresh(
        &mut self,
        config: &SandboxConfig,
        token: &str,
        host: Option<&str>,
    ) -> Result<TokenGrant, TokenError> {
        let unknown = bad_refresh("Cannot decrypt the refresh token");
        let now = self.now();
        let entry = self.refresh_tokens.get(token).ok_or(unknown)?;
        let account = self.account(entry.account_id).cloned().ok_or(unknown)?;
        if !self.serves_account(host, &account) {
            return Err(TokenError::AccountNotFound);
        }
        if entry.revoked {
            return Err(bad_refresh("Token has been revoked"));
        }
        if now - entry.issued_at > REFRESH_TTL {
            return Err(bad_refresh("Token has expired"));
        }
        let predecessor = entry.predecessor.clone();
        let lost_successor = entry.successor.clone();

        // This is the first use of the predecessor's successor: the older chain dies now.
        self.revoke_chain(predecessor);
        // A retry while the successor is still unused: the client never got it, replace it.
        if let Some(lost) = lost_successor.and_then(|s| self.refresh_tokens.get_mut(&s)) {
            lost.revoked = true;
        }

        let grant = self.issue_pair(config, &account, Some(token));
        if let Some(entry) = self.refresh_tokens.get_mut(token) {
            entry.successor = Some(grant.refresh_token.clone());
        }
        self.stats.successful_refreshes += 1;
        Ok(grant)
    }

    /// Revokes `first` and its ancestors. Stops at the first already revoked one: a token is
    /// only revoked together with all its ancestors (by rotation or by `revoke_tokens`, which
    /// takes the whole account), or as an unused successor, which is nobody's ancestor.
    fn revoke_chain(&mut self, first: Option<String>) {
        let mut next = first;
        while let Some(entry) = next.and_then(|t| self.refresh_tokens.get_mut(&t)) {
            if entry.revoked {
                break;
            }
            entry.revoked = true;
            next = entry.predecessor.clone();
        }
    }

    fn issue_pair(
        &mut self,
        config: &SandboxConfig,
        account: &SandboxAccount,
        predecessor: Option<&str>,
    ) -> TokenGrant {
        let now = self.now();
        let ttl = TimeDelta::from_std(config.access_token_ttl).unwrap_or(TimeDelta::MAX);
        let expires_at = now
            .checked_add_signed(ttl)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);

        let access_token = access_jwt(config, account, now, expires_at);
        self.access_tokens.insert(
            access_token.clone(),
            AccessToken {
                account_id: account.id,
                expires_at,
                revoked: false,
            },
        );
        let refresh_token = opaque_secret::<128>();
        self.refresh_tokens.insert(
            refresh_token.clone(),
            RefreshToken {
                account_id: account.id,
                issued_at: now,
                revoked: false,
                predecessor: predecessor.map(str::to_owned),
                successor: None,
            },
        );
        self.issued.push(access_token.clone());
        self.issued.push(refresh_token.clone());

        TokenGrant {
            token_type: "Bearer",
            expires_in: config.access_token_ttl.as_secs(),
            access_token,
            refresh_token,
            server_time: now.timestamp(),
        }
    }

    /// The account behind a Bearer token that arrived at `host` (lowercase, without port).
    /// The host is checked first: at another account's host amoCRM finds no account at all,
    /// whatever the token.
    pub(super) fn account_for_access_token(
        &self,
        token: &str,
        host: Option<&str>,
    ) -> Result<SandboxAccount, ApiError> {
        let now = self.now();
        let entry = self
            .access_tokens
            .get(token)
            .ok_or(ApiError::Unauthorized)?;
        let account = self
            .account(entry.account_id)
            .cloned()
            .ok_or(ApiError::Unauthorized)?;
        if !self.serves_account(host, &account) {
            return Err(ApiError::AccountNotFound);
        }
        if entry.revoked || now >= entry.expires_at {
            return Err(ApiError::Unauthorized);
        }
        Ok(account)
    }

    /// The account behind a refresh token that is known, not revoked and not expired, for
    /// host rediscovery. Only reads: looking the host up is not a use of the token, so the
    /// grace rule does not move.
    pub(super) fn account_for_refresh_token(&self, token: &str) -> Option<SandboxAccount> {
        let now = self.now();
        let entry = self
            .refresh_tokens
            .get(token)
            .filter(|t| !t.revoked && now - t.issued_at <= REFRESH_TTL)?;
        self.account(entry.account_id).cloned()
    }
}

/// A JWT-shaped access token like amoCRM's; the signature part is random since nobody checks it.
fn access_jwt(
    config: &SandboxConfig,
    account: &SandboxAccount,
    issued_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> String {
    let header = serde_json::json!({ "typ": "JWT", "alg": "RS256" });
    let payload = serde_json::json!({
        "aud": config.integration_of(account).client_id,
        "jti": hex::encode(random_bytes::<16>()),
        "iat": issued_at.timestamp(),
        "nbf": issued_at.timestamp(),
        "exp": expires_at.timestamp(),
        "sub": CURRENT_USER_ID.to_string(),
        "account_id": account.id,
        "base_domain": account.domain,
        "api_domain": account.api_domain(),
    });
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload.to_string()),
        URL_SAFE_NO_PAD.encode(random_bytes::<32>()),
    )
}

/// `def50200` followed by `N` random bytes in hex, like amoCRM's codes and refresh tokens.
fn opaque_secret<const N: usize>() -> String {
    format!("{OPAQUE_PREFIX}{}", hex::encode(random_bytes::<N>()))
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // Without an OS random source no secret could be issued at all.
    getrandom::fill(&mut bytes).expect("the OS random source is unavailable");
    bytes
}
