//! Install and callback: the seed's flow with the state in the database, independent of HTTP.

mod params;
pub mod reason;
mod result;
mod uninstall;

use crate::log_safe::log_safe;
use std::sync::Arc;
use std::time::Duration;

use url::Url;

pub use params::{CallbackParams, MAX_EXTERNAL_ID, is_valid_external_id};
pub use reason::CallbackReason;
pub use result::{Failure, Settled};
pub use uninstall::{UninstallError, Uninstalled};

use crate::amocrm::{
    Account, AccountHost, AmoClient, AmoError, ConsentMode, Platform, REFRESH_TOKEN_LIFETIME,
    TokenSet, account_host, is_dns_label,
};
use crate::config::Secret;
use crate::crypto::{Cipher, random_token, sha256_hex};
use crate::events::{ConnectionData, EventType, Events};
use crate::integrations::Integrations;
use crate::store::{
    Attempt, AttemptKind, Consumption, NewConnection, NewState, Outcome, Records, Saved, StateRow,
    Store, StoreError, Timestamp, now, saturating_later,
};
use crate::tokens::expiry;

/// User agents are cut to this many characters before they are stored.
const MAX_USER_AGENT: usize = 512;

/// Who made a request, for the audit trail.
#[derive(Debug, Clone, Default)]
pub struct Requester {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

impl Requester {
    pub(crate) fn user_agent(&self) -> Option<&str> {
        self.user_agent
            .as_deref()
            .map(|ua| match ua.char_indices().nth(MAX_USER_AGENT) {
                Some((cut, _)) => &ua[..cut],
                None => ua,
            })
    }
}

/// A connection saved by a callback.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Connected {
    /// Absent from results sealed before Kommo: those were amoCRM's.
    #[serde(default)]
    pub platform: Platform,
    pub account_id: i64,
    pub account_name: String,
    pub domain: String,
}

/// Where a connect link sends the browser back, and how.
#[derive(Debug, Clone)]
pub struct ReturnTo {
    /// Checked against `AMOAUTH_RETURN_ORIGINS` when the link was made.
    pub url: String,
    pub mode: ConsentMode,
    pub external_id: Option<String>,
}

/// A callback's result and, for flows started by a connect link, where to report it.
#[derive(Debug)]
pub struct Callback {
    pub result: Result<CallbackOutcome, CallbackError>,
    pub return_to: Option<ReturnTo>,
    /// The state was consumed: this request decided the flow's fate, and running it again
    /// could only end in `used_state`.
    pub state_consumed: bool,
}

impl Callback {
    fn without_return(result: Result<CallbackOutcome, CallbackError>) -> Self {
        Self {
            result,
            return_to: None,
            state_consumed: false,
        }
    }
}

/// What to start: an admin's install or a host app's connect link.
#[derive(Debug, Clone, Copy)]
pub struct InstallRequest<'a> {
    pub subdomain: Option<&'a str>,
    pub mode: ConsentMode,
    /// The host app's tenant id (connect links).
    pub external_id: Option<&'a str>,
    /// Where the browser goes after consent (connect links); must be on an allowed origin.
    pub return_url: Option<&'a str>,
    /// `?platform=`: `amocrm` or `kommo`; none is the deployment's default platform.
    pub platform: Option<&'a str>,
}

/// What a callback ended with, when it did not connect an account.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error("access was denied in amoCRM")]
    AccessDenied,
    #[error("amoCRM reported an error: {0}")]
    AmoCrmReportedError(String),
    #[error("invalid callback request: {0}")]
    InvalidRequest(String),
    #[error("the referer is not an allowed amoCRM account host")]
    BadReferer,
    #[error("the referer {referer} is not the account {expected} the install was started for")]
    RefererMismatch { referer: String, expected: String },
    #[error(
        "this amoCRM account is connected for another external_id; an admin must disconnect it first"
    )]
    AccountTaken,
    #[error("unknown state")]
    UnknownState,
    #[error("the state was already used")]
    UsedState,
    #[error("the state has expired")]
    ExpiredState,
    #[error("widget installs are turned off (AMOAUTH_WIDGET_INSTALLS)")]
    WidgetInstallsOff,
    #[error("exchanging the code at {host} failed: {source}")]
    Exchange { host: String, source: AmoError },
    #[error("looking up the account at {host} failed: {source}")]
    AccountLookup { host: String, source: AmoError },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CallbackError {
    /// The stable reason of audit rows, metrics and pages.
    pub fn reason(&self) -> CallbackReason {
        Failure::from(self).reason()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(
        "`subdomain` must be an account name such as fastis02 or a host such as fastis02.amocrm.ru"
    )]
    BadSubdomain,
    #[error("`return_url` must be an http(s) URL on an origin listed in AMOAUTH_RETURN_ORIGINS")]
    ReturnUrlNotAllowed,
    #[error("`external_id` must be 1 to 255 characters, none of them NUL")]
    BadExternalId,
    #[error("`platform` must be one of the configured platforms: {configured}")]
    PlatformNotConfigured { configured: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Flow {
    store: Store,
    integrations: Arc<Integrations>,
    cipher: Arc<Cipher>,
    state_ttl: Duration,
    widget_installs: bool,
    return_origins: Vec<String>,
    events: Arc<Events>,
}

impl Flow {
    pub fn new(
        store: Store,
        integrations: Arc<Integrations>,
        cipher: Arc<Cipher>,
        state_ttl: Duration,
        widget_installs: bool,
        return_origins: Vec<String>,
        events: Arc<Events>,
    ) -> Self {
        Self {
            store,
            integrations,
            cipher,
            state_ttl,
            widget_installs,
            return_origins,
            events,
        }
    }

    /// The origins a connect link may return to (AMOAUTH_RETURN_ORIGINS).
    pub fn return_origins(&self) -> &[String] {
        &self.return_origins
    }

    /// The domains account hosts may be on, every configured platform's.
    pub fn account_domains(&self) -> Vec<String> {
        self.integrations
            .clients()
            .iter()
            .flat_map(|client| client.config().domains.iter().cloned())
            .collect()
    }

    /// The configured platforms, amoCRM's first.
    pub fn platforms(&self) -> Vec<Platform> {
        self.integrations.platforms().collect()
    }

    /// The integration an install link asked for (`?platform=`), or the default one.
    fn integration_for_install(
        &self,
        platform: Option<&str>,
    ) -> Result<&Arc<AmoClient>, InstallError> {
        let wanted = match platform.filter(|p| !p.is_empty()) {
            None => Some(self.integrations.default_platform()),
            Some(name) => Platform::parse(name),
        };
        wanted
            .and_then(|platform| self.integrations.get(platform))
            .ok_or_else(|| InstallError::PlatformNotConfigured {
                configured: self
                    .integrations
                    .platforms()
                    .map(Platform::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Seed steps 1-2: a 256-bit state saved (hashed) with its TTL, then the consent URL
    /// and when the state expires.
    pub async fn start_install(
        &self,
        request: &InstallRequest<'_>,
        requester: &Requester,
    ) -> Result<(Url, Timestamp, Platform), InstallError> {
        if let Some(external_id) = request.external_id
            && !is_valid_external_id(external_id)
        {
            return Err(InstallError::BadExternalId);
        }
        if let Some(return_url) = request.return_url {
            // The URL parser silently drops tabs and newlines; a return URL that has any
            // control character is refused instead of being quietly rewritten.
            let allowed = Url::parse(return_url).ok().filter(|url| {
                !return_url.chars().any(char::is_control)
                    && matches!(url.scheme(), "http" | "https")
                    && self
                        .return_origins
                        .contains(&url.origin().ascii_serialization())
            });
            if allowed.is_none() {
                return Err(InstallError::ReturnUrlNotAllowed);
            }
        }
        let amo = self.integration_for_install(request.platform)?;
        let domains = &amo.config().domains;
        let account = match request.subdomain.filter(|s| !s.is_empty()) {
            None => None,
            Some(s) if is_dns_label(s) => Some(
                account_host(&format!("{s}.{}", domains[0]), domains)
                    .ok_or(InstallError::BadSubdomain)?,
            ),
            Some(s) => Some(account_host(s, domains).ok_or(InstallError::BadSubdomain)?),
        };
        let created_at = now();
        let state = new_state(created_at);
        let state_hash = state_key(&state);
        let expires_at = saturating_later(created_at, self.state_ttl);
        let subdomain = account.as_ref().map(|a| a.subdomain.as_str());
        let fingerprint = fingerprint(&state);
        let state_row = NewState {
            state_hash: &state_hash,
            subdomain,
            created_at,
            expires_at,
            ip: requester.ip.as_deref(),
            user_agent: requester.user_agent(),
            external_id: request.external_id,
            return_url: request.return_url,
            mode: request.return_url.map(|_| request.mode.as_str()),
            platform: amo.config().platform,
        };
        let attempt = Attempt::new(AttemptKind::Install, Outcome::Started)
            .of_account(subdomain, None)
            .from_client(requester.ip.as_deref(), requester.user_agent())
            .with_state(Some(&fingerprint))
            .at(created_at);
        self.store.start_state(&state_row, &attempt).await?;
        tracing::info!(
            kind = AttemptKind::Install.as_str(),
            outcome = Outcome::Started.as_str(),
            platform = amo.config().platform.as_str(),
            subdomain,
            ip = requester.ip.as_deref(),
            user_agent = requester.user_agent(),
            state_fingerprint = %fingerprint,
            "install started"
        );
        let consent = amo.consent_url(
            &state,
            account.as_ref().map(|a| a.host.as_str()),
            request.mode,
        );
        Ok((consent, expires_at, amo.config().platform))
    }

    /// Seed steps 4-7 for a raw callback query, each failure told apart and audited.
    pub async fn callback(self: &Arc<Self>, query: &str, requester: &Requester) -> Callback {
        let params = match CallbackParams::parse(query) {
            Ok(params) => params,
            Err(why) => {
                let audit = Audit {
                    store: &self.store,
                    kind: AttemptKind::Callback,
                    subdomain: None,
                    requester,
                    fingerprint: None,
                };
                let err = audit.failed(CallbackError::InvalidRequest(why)).await;
                return Callback::without_return(Err(err));
            }
        };
        if params.from_widget.is_some() && params.state.is_none() && params.error.is_none() {
            let result = self.widget_install(params, requester).await;
            return Callback::without_return(result.map(|()| CallbackOutcome::WidgetAccepted));
        }
        let fingerprint = params.state.as_deref().map(fingerprint);
        let audit = Audit {
            store: &self.store,
            kind: AttemptKind::Callback,
            subdomain: params.referer.as_deref(),
            requester,
            fingerprint: fingerprint.as_deref(),
        };
        let result = self.check_and_consume(&params, &audit).await;
        let (attempt_id, host, code, state) = match result {
            Ok(consumed) => consumed,
            Err(err) => return Callback::without_return(Err(audit.failed(err).await)),
        };
        let return_to = state.return_url.clone().map(|url| ReturnTo {
            url,
            mode: if state.mode.as_deref() == Some("post_message") {
                ConsentMode::PostMessage
            } else {
                ConsentMode::Popup
            },
            external_id: state.external_id.clone(),
        });
        let connected = match self.integration_of(&state, &params, &host) {
            Ok((amo, host)) if referer_matches(&state, &host) => {
                self.connect(amo, &host, &code, state.external_id.as_deref(), attempt_id)
                    .await
            }
            Ok(_) => Err(CallbackError::RefererMismatch {
                referer: host.host.clone(),
                expected: state.subdomain.clone().unwrap_or_default(),
            }),
            Err(mismatch) => Err(mismatch.into()),
        };
        let result = match connected {
            Ok(connected) => {
                audit.finish(attempt_id, Ok(&connected)).await;
                Ok(CallbackOutcome::Connected(connected))
            }
            Err(err) => {
                audit.finish(attempt_id, Err(&err)).await;
                Err(err)
            }
        };
        Callback {
            result,
            return_to,
            state_consumed: true,
        }
    }

    /// Everything before the first outbound request: denial, parameters, referer, state.
    async fn check_and_consume(
        &self,
        params: &CallbackParams,
        audit: &Audit<'_>,
    ) -> Result<(i64, AccountHost, Secret, StateRow), CallbackError> {
        if let Some(error) = &params.error {
            return Err(if error == "access_denied" {
                CallbackError::AccessDenied
            } else {
                CallbackError::AmoCrmReportedError(error.chars().take(100).collect())
            });
        }
        let sent_for = match params.client_id.as_deref() {
            Some(id) => Some(self.integrations.by_client_id(id).ok_or_else(|| {
                CallbackError::InvalidRequest("client_id is not this integration's".into())
            })?),
            None => None,
        };
        let (Some(code), Some(state), Some(referer)) =
            (&params.code, &params.state, &params.referer)
        else {
            return Err(CallbackError::InvalidRequest(
                "code, state and referer are required".into(),
            ));
        };
        if code.is_empty() {
            return Err(CallbackError::InvalidRequest("code is empty".into()));
        }
        // The referer must be an account of the platform the client_id names, or without one
        // of any configured platform; the state's own platform is checked once it is read.
        let host = match sent_for {
            Some(amo) => account_host(referer, &amo.config().domains),
            None => self
                .integrations
                .clients()
                .iter()
                .find_map(|amo| account_host(referer, &amo.config().domains)),
        }
        .ok_or(CallbackError::BadReferer)?;
        if !params::is_well_formed_state(state) {
            return Err(CallbackError::UnknownState);
        }
        let started = now();
        let pending = audit.attempt(Outcome::Pending, None, None, None, started);
        match self
            .store
            .consume_state(&state_key(state), started, &pending)
            .await?
        {
            Consumption::Consumed { attempt_id, state } => {
                Ok((attempt_id, host, Secret::new(code.as_str()), state))
            }
            Consumption::Expired => Err(CallbackError::ExpiredState),
            Consumption::Used => Err(CallbackError::UsedState),
            Consumption::Unknown => Err(CallbackError::UnknownState),
        }
    }

    /// The integration the state was issued for, with the callback held to it: the
    /// `client_id` sent back (when present) must be that integration's and the referer on
    /// that platform's domains, all before any request leaves amoauth.
    fn integration_of(
        &self,
        state: &StateRow,
        params: &CallbackParams,
        host: &AccountHost,
    ) -> Result<(&Arc<AmoClient>, AccountHost), Mismatch> {
        let platform = state.platform;
        let amo = self
            .integrations
            .get(platform)
            .ok_or(Mismatch::NotConfigured(platform))?;
        if params
            .client_id
            .as_deref()
            .is_some_and(|id| id != amo.config().client_id)
        {
            return Err(Mismatch::OtherClient(platform));
        }
        let host = account_host(&host.host, &amo.config().domains).ok_or(Mismatch::Referer)?;
        Ok((amo, host))
    }

    /// Exchanges the code, looks up the account and saves the sealed tokens, closing the
    /// pending audit row `attempt_id` and queueing the event in the same transaction.
    async fn connect(
        &self,
        amo: &AmoClient,
        host: &AccountHost,
        code: &Secret,
        external_id: Option<&str>,
        attempt_id: i64,
    ) -> Result<Connected, CallbackError> {
        let exchange_failed = |source| CallbackError::Exchange {
            host: host.host.clone(),
            source,
        };
        let platform = amo.config().platform;
        let tokens = amo
            .exchange_code(&host.host, code.expose())
            .await
            .map_err(exchange_failed)?;
        let issued = expiry(&tokens).map_err(exchange_failed)?;
        let account = amo
            .account(&host.host, &tokens.access_token)
            .await
            .map_err(|source| CallbackError::AccountLookup {
                host: host.host.clone(),
                source,
            })?;
        let mut data = ConnectionData::new(platform, Some(account.id), &host.subdomain, &host.host);
        data.external_id = external_id.map(str::to_owned);
        let event = self.events.prepare(EventType::ConnectionCreated, data);
        let records = Records {
            finish_pending: Some(attempt_id),
            event: event.as_ref(),
            ..Records::default()
        };
        let grant = Grant {
            platform,
            host,
            tokens: &tokens,
            account: &account,
            lifetime: issued,
        };
        let saved =
            save_connection(&self.store, &self.cipher, &grant, external_id, &records).await?;
        if saved == Saved::AccountTaken {
            return Err(CallbackError::AccountTaken);
        }
        Ok(Connected {
            platform,
            account_id: account.id,
            account_name: account.name,
            domain: host.host.clone(),
        })
    }

    /// Marketplace installs carry no state, so they are off unless configured; amoCRM waits
    /// at most 3 seconds, so the exchange runs after the answer.
    async fn widget_install(
        self: &Arc<Self>,
        params: CallbackParams,
        requester: &Requester,
    ) -> Result<(), CallbackError> {
        let audit = Audit {
            store: &self.store,
            kind: AttemptKind::WidgetInstall,
            subdomain: params.referer.as_deref(),
            requester,
            fingerprint: None,
        };
        if !self.widget_installs {
            return Err(audit.failed(CallbackError::WidgetInstallsOff).await);
        }
        let checked = match (&params.code, &params.referer) {
            (Some(code), Some(referer)) if !code.is_empty() => self
                .widget_integration(params.client_id.as_deref(), referer)
                .map(|(amo, host)| (Arc::clone(amo), host, Secret::new(code.as_str())))
                .map_err(CallbackError::from),
            _ => Err(CallbackError::InvalidRequest(
                "code and referer are required".into(),
            )),
        };
        let (amo, host, code) = match checked {
            Ok(checked) => checked,
            Err(err) => return Err(audit.failed(err).await),
        };
        let pending = audit.attempt(Outcome::Pending, None, None, None, now());
        let attempt_id = self.store.record_attempt(&pending).await?;
        let flow = Arc::clone(self);
        let requester = requester.clone();
        tokio::spawn(async move {
            let result = flow.connect(&amo, &host, &code, None, attempt_id).await;
            let audit = Audit {
                store: &flow.store,
                kind: AttemptKind::WidgetInstall,
                subdomain: Some(&host.host),
                requester: &requester,
                fingerprint: None,
            };
            audit.finish(attempt_id, result.as_ref()).await;
        });
        Ok(())
    }
}

impl Flow {
    /// A widget install's integration: the one its `client_id` names (or, without one, the
    /// only one whose domains hold the referer), with the referer on that platform's domains.
    fn widget_integration(
        &self,
        client_id: Option<&str>,
        referer: &str,
    ) -> Result<(&Arc<AmoClient>, AccountHost), Mismatch> {
        let amo = match client_id {
            Some(id) => self
                .integrations
                .by_client_id(id)
                .ok_or(Mismatch::UnknownClient)?,
            None => {
                let mut on_domain = self
                    .integrations
                    .clients()
                    .iter()
                    .filter(|amo| account_host(referer, &amo.config().domains).is_some());
                match (on_domain.next(), on_domain.next()) {
                    (Some(amo), None) => amo,
                    (None, _) => return Err(Mismatch::Referer),
                    (Some(_), Some(_)) => return Err(Mismatch::ClientNeeded),
                }
            }
        };
        let host = account_host(referer, &amo.config().domains).ok_or(Mismatch::Referer)?;
        Ok((amo, host))
    }
}

/// Why a callback does not belong to the integration it must: each a refusal before any
/// request leaves amoauth.
#[derive(Debug, Clone, Copy)]
enum Mismatch {
    /// The state's platform has no integration any more.
    NotConfigured(Platform),
    /// The `client_id` sent back is another integration's than the state's platform's.
    OtherClient(Platform),
    /// The `client_id` is no integration's of this deployment.
    UnknownClient,
    /// A widget install without `client_id` whose referer's domain is on two integrations.
    ClientNeeded,
    /// The referer is not an account on the integration's platform.
    Referer,
}

impl From<Mismatch> for CallbackError {
    fn from(mismatch: Mismatch) -> Self {
        let invalid = CallbackError::InvalidRequest;
        match mismatch {
            Mismatch::NotConfigured(platform) => invalid(format!(
                "the install was started for {}, which is no longer configured",
                platform.title()
            )),
            Mismatch::OtherClient(platform) => invalid(format!(
                "client_id is not the {} integration's the install was started for",
                platform.title()
            )),
            Mismatch::UnknownClient => invalid("client_id is not this integration's".into()),
            Mismatch::ClientNeeded => invalid(
                "client_id is required: the referer's domain is on several integrations".into(),
            ),
            Mismatch::Referer => CallbackError::BadReferer,
        }
    }
}

/// A callback's happy endings.
#[derive(Debug)]
pub enum CallbackOutcome {
    Connected(Connected),
    /// A widget install was accepted; its code is being exchanged in the background.
    WidgetAccepted,
}

/// Writes the audit row and the one structured log line of a callback.
struct Audit<'a> {
    store: &'a Store,
    kind: AttemptKind,
    subdomain: Option<&'a str>,
    requester: &'a Requester,
    fingerprint: Option<&'a str>,
}

impl<'a> Audit<'a> {
    fn attempt(
        &self,
        outcome: Outcome,
        reason: Option<&'a str>,
        detail: Option<&'a str>,
        account_id: Option<i64>,
        at: crate::store::Timestamp,
    ) -> Attempt<'a> {
        Attempt::new(self.kind, outcome)
            .because(reason, detail)
            .of_account(self.subdomain, account_id)
            .from_client(self.requester.ip.as_deref(), self.requester.user_agent())
            .with_state(self.fingerprint)
            .at(at)
    }

    /// Records a failure that happened before any state was consumed.
    async fn failed(&self, err: CallbackError) -> CallbackError {
        let detail = err.to_string();
        self.log(Err(&err));
        let attempt = self.attempt(
            Outcome::Failure,
            Some(err.reason().as_str()),
            Some(&detail),
            None,
            now(),
        );
        if let Err(store_err) = self.store.record_attempt(&attempt).await {
            tracing::error!(error = %store_err, "could not write the audit row");
        }
        err
    }

    /// Closes the pending row opened when the state was consumed, after a failure; a success
    /// closed it in the transaction that saved the connection.
    async fn finish(&self, attempt_id: i64, result: Result<&Connected, &CallbackError>) {
        self.log(result);
        let Err(err) = result else {
            return;
        };
        let detail = err.to_string();
        if let Err(store_err) = self
            .store
            .finish_attempt(
                attempt_id,
                Outcome::Failure,
                Some(err.reason().as_str()),
                Some(&detail),
                None,
                now(),
            )
            .await
        {
            tracing::error!(error = %store_err, attempt_id, "could not update the audit row");
        }
    }

    fn log(&self, result: Result<&Connected, &CallbackError>) {
        let kind = self.kind.as_str();
        let ip = self.requester.ip.as_deref();
        let user_agent = self.requester.user_agent();
        match result {
            Ok(connected) => tracing::info!(
                kind,
                outcome = "success",
                subdomain = self.subdomain,
                account_id = connected.account_id,
                ip,
                user_agent,
                state_fingerprint = self.fingerprint,
                "amoCRM connected"
            ),
            Err(err) => tracing::warn!(
                kind,
                outcome = "failure",
                reason = err.reason().as_str(),
                error = %log_safe(&err.to_string()),
                subdomain = self.subdomain,
                ip,
                user_agent,
                state_fingerprint = self.fingerprint,
                "callback failed"
            ),
        }
    }
}

/// The first 16 hex characters of a state's SHA-256: enough to match an install with its
/// callback in the audit trail, useless for forging either.
fn fingerprint(state: &str) -> String {
    sha256_hex(state)[..16].to_owned()
}

/// A new state: its creation time (16 hex digits of microseconds since 1970), then 32
/// random bytes in hex. The time prefix makes the stored keys ascend with age, so a cleanup
/// deletes neighbouring index entries instead of one random page per row (BENCHMARKS.md).
fn new_state(created_at: Timestamp) -> String {
    let micros = created_at.and_utc().timestamp_micros().max(0);
    format!("{micros:016x}{}", random_token())
}

/// The key a state is stored under: its time prefix, then the SHA-256 of the whole state, so
/// the state itself is never stored. A state issued before time prefixes (64 hex characters,
/// at most one TTL before an upgrade) is keyed by its hash alone, as it was then.
fn state_key(state: &str) -> String {
    let hash = sha256_hex(state);
    if state.len() == params::STATE_LEN {
        format!("{}{hash}", &state[..params::TIME_PREFIX_LEN])
    } else {
        hash
    }
}

/// When an install named the account, the callback must come from that account (the state
/// keeps its subdomain): a referer on another host would receive the code exchange, and the
/// client secret, meant for it.
fn referer_matches(state: &StateRow, host: &AccountHost) -> bool {
    state
        .subdomain
        .as_deref()
        .is_none_or(|expected| expected == host.subdomain)
}

/// What amoCRM granted for an account at its host: the pair, the account, and the pair's
/// lifetime `(issued, expires_at)`.
pub(crate) struct Grant<'a> {
    pub platform: Platform,
    pub host: &'a AccountHost,
    pub tokens: &'a TokenSet,
    pub account: &'a Account,
    pub lifetime: (Timestamp, Timestamp),
}

/// Seals a fresh pair and saves the account's connection (inserted, or replaced on
/// reconnect) with `records` in the same transaction. `AccountTaken` when the account
/// belongs to another `external_id`: then nothing changed and nothing was recorded.
pub(crate) async fn save_connection(
    store: &Store,
    cipher: &Cipher,
    grant: &Grant<'_>,
    external_id: Option<&str>,
    records: &Records<'_>,
) -> Result<Saved, StoreError> {
    let Grant {
        platform,
        host,
        tokens,
        account,
        lifetime: (issued, expires_at),
    } = *grant;
    // Written from borrows, as `json!` would print it: `json!` would copy both answers first.
    let raw = format!(r#"{{"account":{},"token":{}}}"#, account.raw, tokens.raw);
    let raw = scrub(raw, tokens);
    store
        .upsert_connection(
            &NewConnection {
                platform,
                account_id: account.id,
                external_id,
                account_name: &account.name,
                domain: &host.host,
                subdomain: &host.subdomain,
                tokens: &cipher.seal_pair(&tokens.access_token, &tokens.refresh_token, account.id),
                expires_at,
                refresh_expires_at: issued + REFRESH_TOKEN_LIFETIME,
                raw: &raw,
                now: issued,
            },
            records,
        )
        .await
}

/// Removes any token value that survived into the raw JSON (e.g. echoed in another field).
fn scrub(mut raw: String, tokens: &TokenSet) -> String {
    for secret in [&tokens.access_token, &tokens.refresh_token] {
        // `replace` builds a new string even when it finds nothing, as it almost never does.
        if !secret.expose().is_empty() && raw.contains(secret.expose()) {
            raw = raw.replace(secret.expose(), "[removed]");
        }
    }
    raw
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_keys_ascend_with_age_and_never_hold_the_state() {
        let earlier = now();
        let later = earlier + chrono::Duration::milliseconds(1);
        let (first, second) = (new_state(earlier), new_state(later));
        assert_eq!(first.len(), params::STATE_LEN);
        assert!(params::is_well_formed_state(&first));
        let key = state_key(&first);
        assert_eq!(key, format!("{}{}", &first[..16], sha256_hex(&first)));
        assert!(
            !key.contains(&first[16..]),
            "the random part is never stored"
        );
        assert!(
            state_key(&first) < state_key(&second),
            "keys sort by creation time"
        );
    }

    #[test]
    fn a_token_value_echoed_in_the_raw_answers_is_removed_and_other_text_kept() {
        let tokens = TokenSet {
            access_token: Secret::new("access-AAA"),
            refresh_token: Secret::new("refresh-RRR"),
            expires_in: 86_400,
            raw: serde_json::json!({ "token_type": "Bearer" }),
        };
        let echoed = r#"{"account":{"note":"access-AAA and refresh-RRR"},"token":{}}"#;
        assert_eq!(
            scrub(echoed.to_owned(), &tokens),
            r#"{"account":{"note":"[removed] and [removed]"},"token":{}}"#
        );
        let clean = r#"{"account":{"id":7},"token":{"token_type":"Bearer"}}"#;
        assert_eq!(scrub(clean.to_owned(), &tokens), clean);
    }

    #[test]
    fn a_state_from_before_the_time_prefix_is_keyed_by_its_hash() {
        let legacy = random_token();
        assert!(params::is_well_formed_state(&legacy));
        assert_eq!(state_key(&legacy), sha256_hex(&legacy));
    }
}
