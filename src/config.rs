//! Typed configuration from the environment, `.env` and flags, with one-line startup errors.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine as _;
use url::Url;

use crate::amocrm::{ClientConfig, Platform};

/// Raw settings, from the flags of a command (each of which falls back to its variable).
/// Everything is a string here so that validation can name the variable in its error;
/// a command leaves unset what it does not read, and defaults apply.
/// No Debug: the raw values include the client secret and the keys.
#[derive(Clone, Default)]
#[doc(hidden)]
pub struct Settings {
    pub database_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub redirect_uri: Option<String>,
    pub domains: Option<String>,
    pub kommo_client_id: Option<String>,
    pub kommo_client_secret: Option<String>,
    pub kommo_redirect_uri: Option<String>,
    pub listen: Option<String>,
    pub state_ttl: Option<String>,
    pub admin_token: Option<String>,
    pub encryption_key: Option<String>,
    pub amocrm_url: Option<String>,
    pub amocrm_timeout: Option<String>,
    pub log_format: Option<String>,
    pub widget_installs: Option<String>,
    pub rate_limit: Option<String>,
    pub trusted_proxies: Option<String>,
    pub per_ip_concurrency: Option<String>,
    pub read_timeout: Option<String>,
    pub base_path: Option<String>,
    pub return_origins: Option<String>,
    pub refresh_margin: Option<String>,
    pub keepalive_age: Option<String>,
    pub refresh_interval: Option<String>,
    pub cleanup_interval: Option<String>,
    pub audit_retention: Option<String>,
    pub events_url: Option<String>,
    pub events_secret: Option<String>,
    pub events_refreshed: Option<String>,
    pub events_interval: Option<String>,
    pub proxy_rate: Option<String>,
    pub proxy_max_wait: Option<String>,
}

/// A configuration problem, printed as one line: the variable and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

fn invalid(variable: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        variable,
        problem: problem.into(),
    }
}

/// Every problem found in a configuration, one line each, so one run shows them all.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        Self(vec![error])
    }
}

/// Rebinds each named check (a `Result` whose error is a `ConfigError` or `ConfigErrors`) to
/// its value when all passed; otherwise returns every problem they found.
macro_rules! all_valid {
    ($($check:ident),+ $(,)?) => {
        let ($($check,)+) = match ($($check,)+) {
            ($(Ok($check),)+) => ($($check,)+),
            ($($check,)+) => {
                let mut problems = Vec::new();
                $(if let Err(error) = $check {
                    problems.extend(ConfigErrors::from(error).0);
                })+
                return Err(ConfigErrors(problems));
            }
        };
    };
}

pub use crate::amocrm::Secret;

/// A database URL whose Debug and Display mask the password.
#[derive(Clone)]
#[doc(hidden)]
pub struct DatabaseUrl(String);

#[doc(hidden)]
impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The SQLite file, when this is a SQLite URL naming a file.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        let rest = self.0.strip_prefix("sqlite:")?;
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        let path = rest.split('?').next().unwrap_or_default();
        (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
    }
}

impl fmt::Display for DatabaseUrl {
    /// Masks the password textually, so even a URL too broken to parse never shows it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return f.write_str(&self.0);
        };
        // The last `@` before any query is where the user info ends, even when a password
        // holds `/` or `@`; masking too much is harmless, too little is not.
        let query_start = rest.find(['?', '#']).unwrap_or(rest.len());
        match rest[..query_start].rfind('@') {
            Some(at) => {
                let (userinfo, host_and_rest) = rest.split_at(at);
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                let masked = if userinfo.contains(':') { ":***" } else { "" };
                write!(f, "{scheme}://{user}{masked}{host_and_rest}")
            }
            None => f.write_str(&self.0),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// How the integrations reach their platforms: `AMOAUTH_AMOCRM_URL` and `AMOAUTH_AMOCRM_TIMEOUT`.
type Reach = (Option<Url>, Duration);

/// What every command needs: where the data lives and how it is sealed.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub database_url: DatabaseUrl,
    pub encryption_key: Option<Secret>,
}

/// Everything `serve` needs beyond the store.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub store: StoreConfig,
    /// The integrations, one per configured platform, amoCRM's first; never empty.
    pub integrations: Vec<ClientConfig>,
    pub listen: SocketAddr,
    pub state_ttl: Duration,
    /// None: generate one at start and print a login URL.
    pub admin_token: Option<Secret>,
    pub widget_installs: bool,
    pub cleanup_interval: Duration,
    /// Cleanup deletes audit rows older than this.
    pub audit_retention: Duration,
    pub refresh: RefreshConfig,
    /// Exact origins (`https://app.example.com`) a connect link may return to.
    pub return_origins: Vec<String>,
    /// None: AMOAUTH_EVENTS_URL is unset, so no event is written or sent.
    pub events: Option<EventsConfig>,
    /// `AMOAUTH_BASE_PATH` without its trailing slash: "" for `/`, else e.g. "/amocrm".
    pub base_path: String,
    /// None: no rate limit.
    pub rate_limit: Option<RateLimit>,
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Requests one client IP may have in flight at once; None: no bound.
    pub per_ip_concurrency: Option<usize>,
    /// How long a client may take to send a request's head, and then its body.
    pub read_timeout: Duration,
    pub gateway: GatewayConfig,
}

/// The amoCRM API gateway's pace (`AMOAUTH_PROXY_RATE`, `AMOAUTH_PROXY_MAX_WAIT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GatewayConfig {
    /// Requests per second per account, across every replica.
    pub rate: u32,
    /// How long a call may wait for its account's slot before amoauth answers 429.
    pub max_wait: Duration,
}

/// The longest `AMOAUTH_PROXY_MAX_WAIT`: well inside the route timeout, so a caller that
/// waited its turn still has time for amoCRM's answer.
const MAX_PROXY_WAIT: Duration = Duration::from_secs(30);

/// amoCRM allows 7 requests a second per account.
const DEFAULT_PROXY_RATE: &str = "7";

fn parse_proxy_rate(raw: &str) -> Result<u32, ConfigError> {
    raw.trim()
        .parse::<u32>()
        .ok()
        .filter(|rate| (1..=1000).contains(rate))
        .ok_or_else(|| {
            invalid(
                "AMOAUTH_PROXY_RATE",
                format!("expected requests per second per account from 1 to 1000, such as 7, got `{raw}`"),
            )
        })
}

/// At most `requests` per `per_seconds` seconds per client IP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub per_seconds: u64,
}

impl RateLimit {
    pub fn per_second(self) -> f64 {
        f64::from(self.requests) / self.per_seconds as f64
    }
}

/// Shorter admin tokens could be guessed despite the login backoff.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 32;

fn parse_per_ip_concurrency(raw: &str) -> Result<Option<usize>, ConfigError> {
    if raw == "off" {
        return Ok(None);
    }
    match raw.trim().parse::<usize>() {
        Ok(limit) if limit > 0 => Ok(Some(limit)),
        _ => Err(invalid(
            "AMOAUTH_PER_IP_CONCURRENCY",
            format!("expected a positive number of requests such as 64, or off, got `{raw}`"),
        )),
    }
}

fn parse_rate_limit(raw: &str) -> Result<Option<RateLimit>, ConfigError> {
    if raw == "off" {
        return Ok(None);
    }
    let parsed = raw.split_once('/').and_then(|(count, unit)| {
        let requests: u32 = count.trim().parse().ok().filter(|n| *n > 0)?;
        let per_seconds = match unit.trim() {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return None,
        };
        Some(RateLimit {
            requests,
            per_seconds,
        })
    });
    parsed.map(Some).ok_or_else(|| {
        invalid(
            "AMOAUTH_RATE_LIMIT",
            format!("expected e.g. 20/s, 600/m or off, got `{raw}`"),
        )
    })
}

fn parse_base_path(raw: &str) -> Result<String, ConfigError> {
    let trimmed = raw.trim_end_matches('/');
    let valid = raw.starts_with('/')
        && trimmed.split('/').skip(1).all(|segment| {
            !segment.is_empty()
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        });
    if !valid {
        return Err(invalid(
            "AMOAUTH_BASE_PATH",
            format!("expected a path such as / or /amocrm/, got `{raw}`"),
        ));
    }
    Ok(trimmed.to_owned())
}

fn parse_trusted_proxies(raw: &str) -> Result<Vec<std::net::IpAddr>, ConfigError> {
    raw.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            entry.parse().map_err(|_| {
                invalid(
                    "AMOAUTH_TRUSTED_PROXIES",
                    format!("`{entry}` is not an IP address"),
                )
            })
        })
        .collect()
}

/// Where and how events for the host app are delivered.
#[derive(Clone, Debug)]
pub struct EventsConfig {
    pub url: Url,
    /// The HMAC-SHA256 key of `X-Amoauth-Signature`.
    pub secret: Secret,
    /// Whether `connection.refreshed` is sent (it is frequent, so opt-in).
    pub refreshed: bool,
    /// How often the outbox is polled; also the delay before the first retry.
    pub interval: Duration,
}

/// When and how tokens are refreshed.
#[derive(Clone, Debug)]
pub struct RefreshConfig {
    pub margin: Duration,
    pub keepalive_age: Duration,
    pub interval: Duration,
    /// How long one process may hold a connection's refresh: longer than a refresh with a
    /// subdomain lookup and a retry (three amoCRM calls), so a slow holder is never overtaken.
    pub lease: Duration,
}

const DEFAULT_DATABASE_URL: &str = "sqlite://amoauth.db";
/// amoCRM's account domains; Kommo's (`kommo.com`) belong to the Kommo integration.
const DEFAULT_DOMAINS: &str = "amocrm.ru,amocrm.com";
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

impl Settings {
    pub fn log_format(&self) -> Result<LogFormat, ConfigError> {
        match self.log_format.as_deref().map(str::trim) {
            None | Some("") | Some("text") => Ok(LogFormat::Text),
            Some("json") => Ok(LogFormat::Json),
            Some(other) => Err(invalid(
                "AMOAUTH_LOG_FORMAT",
                format!("expected `text` or `json`, got `{other}`"),
            )),
        }
    }

    pub fn store(&self) -> Result<StoreConfig, ConfigErrors> {
        let raw = non_empty(&self.database_url).unwrap_or(DEFAULT_DATABASE_URL);
        let scheme = raw.split(':').next().unwrap_or_default();
        let database_url = if matches!(
            scheme,
            "sqlite" | "postgres" | "postgresql" | "mysql" | "mariadb"
        ) {
            Ok(DatabaseUrl(raw.to_owned()))
        } else {
            Err(invalid(
                "DATABASE_URL",
                "expected a sqlite://, postgres:// or mysql:// URL",
            ))
        };
        let encryption_key = non_empty(&self.encryption_key)
            .map(|keys| decode_keys(keys).map(|_| Secret::new(keys)))
            .transpose();
        all_valid!(database_url, encryption_key);
        Ok(StoreConfig {
            database_url,
            encryption_key,
        })
    }

    /// The amoCRM integration (`AMOCRM_*`).
    pub fn amocrm(&self) -> Result<ClientConfig, ConfigErrors> {
        let reach = self.reach();
        all_valid!(reach);
        self.amocrm_with(reach)
    }

    fn amocrm_with(&self, (override_origin, timeout): Reach) -> Result<ClientConfig, ConfigErrors> {
        let client_id = required(&self.client_id, "AMOCRM_CLIENT_ID").map(str::to_owned);
        let client_secret = required(&self.client_secret, "AMOCRM_CLIENT_SECRET").map(Secret::new);
        let redirect_uri = required(&self.redirect_uri, "AMOCRM_REDIRECT_URI")
            .and_then(|raw| parse_http_url(raw, "AMOCRM_REDIRECT_URI"));
        let domains = parse_domains(non_empty(&self.domains).unwrap_or(DEFAULT_DOMAINS));
        all_valid!(client_id, client_secret, redirect_uri, domains);
        Ok(ClientConfig {
            platform: Platform::Amocrm,
            client_id,
            client_secret,
            redirect_uri,
            domains,
            override_origin,
            timeout,
        })
    }

    /// The Kommo integration (`KOMMO_*`), on `kommo.com` with its consent at `www.kommo.com`.
    fn kommo_with(&self, (override_origin, timeout): Reach) -> Result<ClientConfig, ConfigErrors> {
        let client_id = required(&self.kommo_client_id, "KOMMO_CLIENT_ID").map(str::to_owned);
        let client_secret =
            required(&self.kommo_client_secret, "KOMMO_CLIENT_SECRET").map(Secret::new);
        let redirect_uri = required(&self.kommo_redirect_uri, "KOMMO_REDIRECT_URI")
            .and_then(|raw| parse_http_url(raw, "KOMMO_REDIRECT_URI"));
        all_valid!(client_id, client_secret, redirect_uri);
        let mut config =
            ClientConfig::for_platform(Platform::Kommo, client_id, client_secret, redirect_uri)
                .with_timeout(timeout);
        config.override_origin = override_origin;
        Ok(config)
    }

    /// How every integration reaches its platform: the development override and the timeout.
    fn reach(&self) -> Result<Reach, ConfigErrors> {
        let override_origin = non_empty(&self.amocrm_url)
            .map(|raw| parse_http_url(raw, "AMOAUTH_AMOCRM_URL"))
            .transpose();
        let timeout = parse_duration_var(&self.amocrm_timeout, "AMOAUTH_AMOCRM_TIMEOUT", "10s");
        all_valid!(override_origin, timeout);
        Ok((override_origin, timeout))
    }

    /// Every configured integration, amoCRM's first. The amoCRM one is configured when any
    /// `AMOCRM_*` credential is set, or when no Kommo one is (so a deployment with neither
    /// is told about the amoCRM variables, as before Kommo); the Kommo one when any
    /// `KOMMO_*` credential is set.
    pub fn integrations(&self) -> Result<Vec<ClientConfig>, ConfigErrors> {
        let any_set =
            |values: [&Option<String>; 3]| values.into_iter().any(|v| non_empty(v).is_some());
        let kommo_set = any_set([
            &self.kommo_client_id,
            &self.kommo_client_secret,
            &self.kommo_redirect_uri,
        ]);
        let amocrm_set = any_set([&self.client_id, &self.client_secret, &self.redirect_uri]);
        let reach = self.reach();
        all_valid!(reach);
        let amocrm = (amocrm_set || !kommo_set)
            .then(|| self.amocrm_with(reach.clone()))
            .transpose();
        let kommo = kommo_set.then(|| self.kommo_with(reach)).transpose();
        let _distinct_ids = match (&amocrm, &kommo) {
            (Ok(Some(amocrm)), Ok(Some(kommo))) if amocrm.client_id == kommo.client_id => {
                Err(invalid(
                    "KOMMO_CLIENT_ID",
                    "is the same as AMOCRM_CLIENT_ID: amoCRM and Kommo register integrations \
                     separately, so each has its own id",
                ))
            }
            _ => Ok(()),
        };
        all_valid!(amocrm, kommo, _distinct_ids);
        Ok(amocrm.into_iter().chain(kommo).collect())
    }

    /// Everything `serve` needs; every problem is reported, not only the first.
    pub fn server(&self) -> Result<ServerConfig, ConfigErrors> {
        let store = self.store();
        let _key_present = match &store {
            Ok(store)
                if store.encryption_key.is_none() && store.database_url.sqlite_path().is_none() =>
            {
                Err(invalid(
                    "AMOAUTH_ENCRYPTION_KEY",
                    "is required with a PostgreSQL or MySQL database: generate one with \
                     `openssl rand -base64 32` and give every replica the same key",
                ))
            }
            _ => Ok(()),
        };
        let integrations = self.integrations();
        let listen_raw = non_empty(&self.listen).unwrap_or(DEFAULT_LISTEN);
        let listen = SocketAddr::from_str(listen_raw).map_err(|_| {
            invalid(
                "AMOAUTH_LISTEN",
                format!("expected host:port such as 127.0.0.1:8080, got `{listen_raw}`"),
            )
        });
        let state_ttl = parse_duration_var(&self.state_ttl, "AMOAUTH_STATE_TTL", "15m");
        let admin_token = match non_empty(&self.admin_token) {
            Some(token) if token.chars().count() < MIN_ADMIN_TOKEN_CHARS => Err(invalid(
                "AMOAUTH_ADMIN_TOKEN",
                format!(
                    "must be at least {MIN_ADMIN_TOKEN_CHARS} characters long; generate one with `openssl rand -hex 32`"
                ),
            )),
            other => Ok(other.map(Secret::new)),
        };
        let widget_installs = parse_switch(&self.widget_installs, "AMOAUTH_WIDGET_INSTALLS");
        let cleanup_interval =
            parse_duration_var(&self.cleanup_interval, "AMOAUTH_CLEANUP_INTERVAL", "1h");
        let audit_retention = self.audit_retention();
        let refresh_margin =
            parse_duration_var(&self.refresh_margin, "AMOAUTH_REFRESH_MARGIN", "1h");
        let keepalive_age = parse_duration_var(&self.keepalive_age, "AMOAUTH_KEEPALIVE_AGE", "30d");
        let refresh_interval =
            parse_duration_var(&self.refresh_interval, "AMOAUTH_REFRESH_INTERVAL", "1m");
        let return_origins = parse_origins(self.return_origins.as_deref().unwrap_or_default());
        let events = self.events();
        let base_path = parse_base_path(non_empty(&self.base_path).unwrap_or("/"));
        let rate_limit = parse_rate_limit(non_empty(&self.rate_limit).unwrap_or("20/s"));
        let trusted_proxies =
            parse_trusted_proxies(self.trusted_proxies.as_deref().unwrap_or_default());
        let per_ip_concurrency =
            parse_per_ip_concurrency(non_empty(&self.per_ip_concurrency).unwrap_or("64"));
        let read_timeout = parse_duration_var(&self.read_timeout, "AMOAUTH_READ_TIMEOUT", "10s");
        let proxy_rate =
            parse_proxy_rate(non_empty(&self.proxy_rate).unwrap_or(DEFAULT_PROXY_RATE));
        let proxy_max_wait =
            parse_duration_var(&self.proxy_max_wait, "AMOAUTH_PROXY_MAX_WAIT", "10s").and_then(
                |wait| {
                    // A caller waiting longer would meet the request timeout's 504 instead.
                    if wait > MAX_PROXY_WAIT {
                        Err(invalid("AMOAUTH_PROXY_MAX_WAIT", "must be at most 30s"))
                    } else {
                        Ok(wait)
                    }
                },
            );
        all_valid!(
            store,
            _key_present,
            integrations,
            listen,
            state_ttl,
            admin_token,
            widget_installs,
            cleanup_interval,
            audit_retention,
            refresh_margin,
            keepalive_age,
            refresh_interval,
            return_origins,
            events,
            base_path,
            rate_limit,
            trusted_proxies,
            per_ip_concurrency,
            read_timeout,
            proxy_rate,
            proxy_max_wait
        );
        let refresh = RefreshConfig {
            margin: refresh_margin,
            keepalive_age,
            interval: refresh_interval,
            lease: integrations[0]
                .timeout
                .saturating_mul(3)
                .saturating_add(Duration::from_secs(1)),
        };
        Ok(ServerConfig {
            store,
            integrations,
            listen,
            state_ttl,
            admin_token,
            widget_installs,
            cleanup_interval,
            audit_retention,
            refresh,
            return_origins,
            events,
            base_path,
            rate_limit,
            trusted_proxies,
            per_ip_concurrency,
            read_timeout,
            gateway: GatewayConfig {
                rate: proxy_rate,
                max_wait: proxy_max_wait,
            },
        })
    }

    /// How long audit rows are kept (`AMOAUTH_AUDIT_RETENTION`, default 90 days).
    pub fn audit_retention(&self) -> Result<Duration, ConfigError> {
        parse_duration_var(&self.audit_retention, "AMOAUTH_AUDIT_RETENTION", "90d")
    }

    pub fn events(&self) -> Result<Option<EventsConfig>, ConfigErrors> {
        let Some(raw) = non_empty(&self.events_url) else {
            return Ok(None);
        };
        let url = parse_http_url(raw, "AMOAUTH_EVENTS_URL");
        let secret = non_empty(&self.events_secret)
            .map(Secret::new)
            .ok_or_else(|| {
                invalid(
                    "AMOAUTH_EVENTS_SECRET",
                    "is required when AMOAUTH_EVENTS_URL is set (the key that signs the events)",
                )
            });
        let refreshed = parse_switch(&self.events_refreshed, "AMOAUTH_EVENTS_REFRESHED");
        let interval = parse_duration_var(&self.events_interval, "AMOAUTH_EVENTS_INTERVAL", "1s");
        all_valid!(url, secret, refreshed, interval);
        Ok(Some(EventsConfig {
            url,
            secret,
            refreshed,
            interval,
        }))
    }
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

fn required<'a>(value: &'a Option<String>, variable: &'static str) -> Result<&'a str, ConfigError> {
    non_empty(value).ok_or_else(|| invalid(variable, "is required but not set"))
}

/// `on`/`off` (also `true`/`false`, `1`/`0`); unset is off.
fn parse_switch(value: &Option<String>, variable: &'static str) -> Result<bool, ConfigError> {
    match non_empty(value) {
        None | Some("off") | Some("false") | Some("0") => Ok(false),
        Some("on") | Some("true") | Some("1") => Ok(true),
        Some(other) => Err(invalid(
            variable,
            format!("expected `on` or `off`, got `{other}`"),
        )),
    }
}

fn parse_http_url(raw: &str, variable: &'static str) -> Result<Url, ConfigError> {
    let url =
        Url::parse(raw).map_err(|err| invalid(variable, format!("not an absolute URL ({err})")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(invalid(variable, "must be an http:// or https:// URL"));
    }
    Ok(url)
}

/// `scheme://host[:port]`, exactly as `Url::origin` prints it, so comparison is exact.
fn parse_origins(raw: &str) -> Result<Vec<String>, ConfigError> {
    raw.split(',')
        .map(str::trim)
        .filter(|origin| !origin.is_empty())
        .map(|origin| {
            let url = parse_http_url(origin, "AMOAUTH_RETURN_ORIGINS")?;
            let canonical = url.origin().ascii_serialization();
            if canonical != origin.trim_end_matches('/') || url.path() != "/" {
                return Err(invalid(
                    "AMOAUTH_RETURN_ORIGINS",
                    format!("`{origin}` is not an origin; write it as {canonical}"),
                ));
            }
            Ok(canonical)
        })
        .collect()
}

fn parse_domains(raw: &str) -> Result<Vec<String>, ConfigError> {
    let domains: Vec<String> = raw
        .split(',')
        .map(|d| d.trim().to_ascii_lowercase())
        .filter(|d| !d.is_empty())
        .collect();
    if domains.is_empty() {
        return Err(invalid("AMOCRM_DOMAINS", "lists no domain"));
    }
    for domain in &domains {
        let valid = domain.contains('.')
            && domain.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            });
        if !valid {
            return Err(invalid(
                "AMOCRM_DOMAINS",
                format!("`{domain}` is not a domain such as amocrm.ru"),
            ));
        }
    }
    Ok(domains)
}

/// The longest duration any setting accepts: every one is added to times and multiplied
/// (timeouts, leases), and ten years is beyond any sensible value of each.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);

fn parse_duration_var(
    value: &Option<String>,
    variable: &'static str,
    default: &str,
) -> Result<Duration, ConfigError> {
    let raw = non_empty(value).unwrap_or(default);
    match parse_duration(raw) {
        Some(d) if d > MAX_DURATION => Err(invalid(
            variable,
            format!("must be at most 3650d (ten years), got `{raw}`"),
        )),
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(invalid(
            variable,
            format!("expected a duration such as 500ms, 90s, 15m, 1h or 30d, got `{raw}`"),
        )),
    }
}

/// Parses `500ms`, `90s`, `15m`, `1h`, `30d`.
pub fn parse_duration(raw: &str) -> Option<Duration> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = raw.split_at(split);
    let number: u64 = number.parse().ok()?;
    let seconds = |factor: u64| number.checked_mul(factor).map(Duration::from_secs);
    match unit {
        "ms" => Some(Duration::from_millis(number)),
        "s" => seconds(1),
        "m" => seconds(60),
        "h" => seconds(3600),
        "d" => seconds(86_400),
        _ => None,
    }
}

/// Decodes comma-separated base64 32-byte keys; the first is the one that seals.
pub fn decode_keys(raw: &str) -> Result<Vec<[u8; 32]>, ConfigError> {
    let keys = raw
        .split(',')
        .map(str::trim)
        .filter(|key| !key.is_empty())
        .map(decode_key)
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err(invalid("AMOAUTH_ENCRYPTION_KEY", "holds no key"));
    }
    Ok(keys)
}

/// Decodes a base64 32-byte key.
fn decode_key(raw: &str) -> Result<[u8; 32], ConfigError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(raw.trim())
        .map_err(|_| invalid("AMOAUTH_ENCRYPTION_KEY", "is not valid base64"))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
        invalid(
            "AMOAUTH_ENCRYPTION_KEY",
            format!("must decode to 32 bytes, got {}", bytes.len()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            client_id: Some("client".into()),
            client_secret: Some("secret-value".into()),
            redirect_uri: Some("https://example.ru/amocrm/callback".into()),
            ..Settings::default()
        }
    }

    /// The single problem a configuration has (fails when there are several or none).
    fn the_only_problem<T>(result: Result<T, ConfigErrors>) -> ConfigError {
        let Err(ConfigErrors(mut problems)) = result else {
            panic!("the configuration was accepted");
        };
        assert_eq!(problems.len(), 1, "{}", ConfigErrors(problems));
        problems.remove(0)
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let s = Settings {
            redirect_uri: Some("example.ru/callback".into()),
            state_ttl: Some("soon".into()),
            events_url: Some("https://app.example/events".into()),
            ..Settings::default()
        };
        let problems = s.server().err().unwrap();
        let variables: Vec<_> = problems.0.iter().map(|p| p.variable).collect();
        assert_eq!(
            variables,
            [
                "AMOCRM_CLIENT_ID",
                "AMOCRM_CLIENT_SECRET",
                "AMOCRM_REDIRECT_URI",
                "AMOAUTH_STATE_TTL",
                "AMOAUTH_EVENTS_SECRET"
            ]
        );
        assert_eq!(problems.to_string().lines().count(), 5);
    }

    fn kommo(mut s: Settings) -> Settings {
        s.kommo_client_id = Some("kommo-client".into());
        s.kommo_client_secret = Some("kommo-secret-value".into());
        s.kommo_redirect_uri = Some("https://example.ru/amocrm/callback".into());
        s
    }

    #[test]
    fn kommo_beside_or_instead_of_amocrm_each_on_its_own_domains() {
        let both = kommo(settings()).server().unwrap().integrations;
        let platforms: Vec<_> = both.iter().map(|i| i.platform).collect();
        assert_eq!(platforms, [Platform::Amocrm, Platform::Kommo]);
        assert_eq!(both[0].domains, ["amocrm.ru", "amocrm.com"]);
        assert_eq!(both[1].domains, ["kommo.com"]);
        assert_eq!(both[1].client_id, "kommo-client");

        let only = kommo(Settings::default()).server().unwrap().integrations;
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].platform, Platform::Kommo);
        assert!(!format!("{only:?}").contains("kommo-secret-value"));

        let mut s = settings();
        s.amocrm_url = Some("http://127.0.0.1:9/".into());
        let both = kommo(s).server().unwrap().integrations;
        assert!(
            both.iter().all(|i| i.override_origin.is_some()),
            "the override reaches both"
        );
    }

    #[test]
    fn a_partial_kommo_integration_names_what_is_missing() {
        let mut s = settings();
        s.kommo_client_id = Some("kommo-client".into());
        let Err(ConfigErrors(problems)) = s.server() else {
            panic!("accepted");
        };
        let variables: Vec<_> = problems.iter().map(|p| p.variable).collect();
        assert_eq!(variables, ["KOMMO_CLIENT_SECRET", "KOMMO_REDIRECT_URI"]);

        let mut s = kommo(settings());
        s.kommo_client_id = s.client_id.clone();
        assert_eq!(the_only_problem(s.server()).variable, "KOMMO_CLIENT_ID");
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(
            parse_duration("30d"),
            Some(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(parse_duration("15"), None);
        assert_eq!(parse_duration("m"), None);
        assert_eq!(parse_duration("10x"), None);
    }

    #[test]
    fn missing_secret_names_the_variable() {
        let mut s = settings();
        s.client_secret = None;
        let err = the_only_problem(s.server());
        assert_eq!(
            err.to_string(),
            "AMOCRM_CLIENT_SECRET: is required but not set"
        );
    }

    #[test]
    fn invalid_values_name_the_variable() {
        let mut s = settings();
        s.state_ttl = Some("soon".into());
        assert_eq!(the_only_problem(s.server()).variable, "AMOAUTH_STATE_TTL");
        let mut s = settings();
        s.redirect_uri = Some("example.ru/callback".into());
        assert_eq!(the_only_problem(s.server()).variable, "AMOCRM_REDIRECT_URI");
        let mut s = settings();
        s.encryption_key = Some("c2hvcnQ=".into());
        let err = the_only_problem(s.server());
        assert_eq!(err.variable, "AMOAUTH_ENCRYPTION_KEY");
        assert!(err.problem.contains("32 bytes"), "{err}");
        let mut s = settings();
        s.domains = Some("amocrm.ru,evil..com".into());
        assert_eq!(the_only_problem(s.server()).variable, "AMOCRM_DOMAINS");
    }

    #[test]
    fn database_url_masks_its_password() {
        let url = DatabaseUrl("postgres://amo:hunter2@db.local:5432/amo".into());
        assert_eq!(url.to_string(), "postgres://amo:***@db.local:5432/amo");
        assert!(!format!("{url:?}").contains("hunter2"));
        let broken = DatabaseUrl("mysql://amo:p@ss:w0rd@[::1/amo?x=1".into());
        assert_eq!(broken.to_string(), "mysql://amo:***@[::1/amo?x=1");
        let slash = DatabaseUrl("postgres://amo:pa/ss@db/amo".into());
        assert_eq!(slash.to_string(), "postgres://amo:***@db/amo");
        let no_password = DatabaseUrl("mysql://root@127.0.0.1/test".into());
        assert_eq!(no_password.to_string(), "mysql://root@127.0.0.1/test");
    }

    #[test]
    fn return_origins_must_be_plain_origins() {
        let mut s = settings();
        s.return_origins = Some("https://app.example.com, http://localhost:3000".into());
        assert_eq!(
            s.server().unwrap().return_origins,
            ["https://app.example.com", "http://localhost:3000"]
        );
        s.return_origins = Some("https://app.example.com/callback".into());
        assert_eq!(
            the_only_problem(s.server()).variable,
            "AMOAUTH_RETURN_ORIGINS"
        );
        s.return_origins = Some("https://App.Example.com".into());
        assert!(
            the_only_problem(s.server())
                .problem
                .contains("https://app.example.com")
        );
    }

    #[test]
    fn base_paths_are_plain_prefixes() {
        let mut s = settings();
        assert_eq!(s.server().unwrap().base_path, "");
        s.base_path = Some("/amocrm/".into());
        assert_eq!(s.server().unwrap().base_path, "/amocrm");
        s.base_path = Some("/a/b".into());
        assert_eq!(s.server().unwrap().base_path, "/a/b");
        for bad in ["amocrm", "/amo crm/", "/../x", "//x", "/x?y"] {
            s.base_path = Some(bad.into());
            assert_eq!(
                the_only_problem(s.server()).variable,
                "AMOAUTH_BASE_PATH",
                "{bad}"
            );
        }
    }

    #[test]
    fn the_gateway_pace_defaults_to_amocrms_limit_and_is_checked() {
        let mut s = settings();
        let gateway = s.server().unwrap().gateway;
        assert_eq!(gateway.rate, 7);
        assert_eq!(gateway.max_wait, Duration::from_secs(10));
        s.proxy_rate = Some("3".into());
        s.proxy_max_wait = Some("500ms".into());
        let gateway = s.server().unwrap().gateway;
        assert_eq!(
            (gateway.rate, gateway.max_wait),
            (3, Duration::from_millis(500))
        );
        for bad in ["0", "fast", "-1", "1001"] {
            s.proxy_rate = Some(bad.into());
            assert_eq!(
                the_only_problem(s.server()).variable,
                "AMOAUTH_PROXY_RATE",
                "{bad}"
            );
        }
        s.proxy_rate = None;
        for bad in ["31s", "1h", "soon"] {
            s.proxy_max_wait = Some(bad.into());
            assert_eq!(
                the_only_problem(s.server()).variable,
                "AMOAUTH_PROXY_MAX_WAIT",
                "{bad}"
            );
        }
    }

    #[test]
    fn rate_limits_and_proxies_parse() {
        let mut s = settings();
        assert_eq!(
            s.server().unwrap().rate_limit,
            Some(RateLimit {
                requests: 20,
                per_seconds: 1
            })
        );
        s.rate_limit = Some("off".into());
        assert_eq!(s.server().unwrap().rate_limit, None);
        s.rate_limit = Some("600/m".into());
        assert_eq!(
            s.server().unwrap().rate_limit,
            Some(RateLimit {
                requests: 600,
                per_seconds: 60
            })
        );
        s.rate_limit = Some("fast".into());
        assert_eq!(the_only_problem(s.server()).variable, "AMOAUTH_RATE_LIMIT");
        s.rate_limit = None;
        s.trusted_proxies = Some("127.0.0.1, ::1".into());
        assert_eq!(s.server().unwrap().trusted_proxies.len(), 2);
        s.trusted_proxies = Some("10.0.0.0/8".into());
        assert_eq!(
            the_only_problem(s.server()).variable,
            "AMOAUTH_TRUSTED_PROXIES"
        );
    }

    #[test]
    fn server_databases_need_the_encryption_key() {
        let mut s = settings();
        s.database_url = Some("postgres://postgres@127.0.0.1/test".into());
        assert_eq!(
            the_only_problem(s.server()).variable,
            "AMOAUTH_ENCRYPTION_KEY"
        );
        s.encryption_key = Some("BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=".into());
        assert!(s.server().is_ok());
    }

    #[test]
    fn events_need_a_secret_and_are_off_without_a_url() {
        let mut s = settings();
        s.events_secret = Some("hook-secret".into());
        assert!(s.server().unwrap().events.is_none());
        s.events_secret = None;
        s.events_url = Some("https://app.example/amoauth/events".into());
        assert_eq!(
            the_only_problem(s.server()).to_string(),
            "AMOAUTH_EVENTS_SECRET: is required when AMOAUTH_EVENTS_URL is set (the key that signs the events)"
        );
        s.events_secret = Some("hook-secret".into());
        let events = s.server().unwrap().events.unwrap();
        assert!(!events.refreshed);
        assert_eq!(events.interval, Duration::from_secs(1));
        assert!(!format!("{events:?}").contains("hook-secret"));
        s.events_refreshed = Some("maybe".into());
        assert_eq!(
            the_only_problem(s.server()).variable,
            "AMOAUTH_EVENTS_REFRESHED"
        );
        s.events_refreshed = Some("on".into());
        assert!(s.server().unwrap().events.unwrap().refreshed);
        s.events_url = Some("app.example/events".into());
        assert_eq!(the_only_problem(s.server()).variable, "AMOAUTH_EVENTS_URL");
    }

    #[test]
    fn secrets_debug_as_stars() {
        let config = settings().server().unwrap();
        assert!(!format!("{config:?}").contains("secret-value"));
    }

    #[test]
    fn sqlite_path_is_found_in_the_url() {
        let url = |s: &str| DatabaseUrl(s.into()).sqlite_path();
        assert_eq!(
            url("sqlite://amoauth.db"),
            Some(PathBuf::from("amoauth.db"))
        );
        assert_eq!(
            url("sqlite:///var/lib/a.db?mode=rwc"),
            Some(PathBuf::from("/var/lib/a.db"))
        );
        assert_eq!(url("sqlite::memory:"), None);
        assert_eq!(url("postgres://x/y"), None);
    }
}
