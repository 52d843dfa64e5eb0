//! The flags of the commands, in groups by concern: each command flattens only the groups it
//! reads, so its `--help` lists nothing it would ignore. Every flag falls back to its variable.

use clap::Args;

use crate::config::Settings;

/// A group of flags that fills its part of the raw settings.
pub trait Flags {
    fn fill(&self, settings: &mut Settings);
}

/// The raw settings from a command's groups; what no group sets keeps its default.
pub fn settings(groups: &[&dyn Flags]) -> Settings {
    let mut settings = Settings::default();
    for group in groups {
        group.fill(&mut settings);
    }
    settings
}

/// Copies each named field of a group into the settings field of the same name.
macro_rules! fills {
    ($group:ty: $($field:ident),+) => {
        impl Flags for $group {
            fn fill(&self, settings: &mut Settings) {
                $(settings.$field = self.$field.clone();)+
            }
        }
    };
}

#[derive(Args)]
pub struct DatabaseFlags {
    /// Database: sqlite://…, postgres://…, mysql://…
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}
fills!(DatabaseFlags: database_url);

/// For the commands that seal or open tokens.
#[derive(Args)]
pub struct KeyFlags {
    /// Base64 of 32 bytes (several comma-separated: the first seals); defaults to a key file beside a SQLite database
    #[arg(long, env = "AMOAUTH_ENCRYPTION_KEY", hide_env_values = true)]
    encryption_key: Option<String>,
}
fills!(KeyFlags: encryption_key);

/// Who amoauth is at amoCRM.
#[derive(Args)]
pub struct IntegrationFlags {
    /// amoCRM integration id
    #[arg(long, env = "AMOCRM_CLIENT_ID", hide_env_values = true)]
    client_id: Option<String>,
    /// amoCRM integration secret
    #[arg(long, env = "AMOCRM_CLIENT_SECRET", hide_env_values = true)]
    client_secret: Option<String>,
    /// Redirect URI exactly as registered in amoCRM
    #[arg(long, env = "AMOCRM_REDIRECT_URI", hide_env_values = true)]
    redirect_uri: Option<String>,
    /// Kommo integration id (a Kommo integration beside or instead of the amoCRM one)
    #[arg(long, env = "KOMMO_CLIENT_ID", hide_env_values = true)]
    kommo_client_id: Option<String>,
    /// Kommo integration secret
    #[arg(long, env = "KOMMO_CLIENT_SECRET", hide_env_values = true)]
    kommo_client_secret: Option<String>,
    /// Redirect URI exactly as registered in Kommo
    #[arg(long, env = "KOMMO_REDIRECT_URI", hide_env_values = true)]
    kommo_redirect_uri: Option<String>,
}
fills!(IntegrationFlags: client_id, client_secret, redirect_uri, kommo_client_id, kommo_client_secret, kommo_redirect_uri);

/// How amoCRM's accounts are reached.
#[derive(Args)]
pub struct AmoCrmFlags {
    /// Allowed amoCRM account domains (comma-separated); the first gives the consent host
    #[arg(long, env = "AMOCRM_DOMAINS", hide_env_values = true)]
    domains: Option<String>,
    /// Development only: send every amoCRM request to this origin
    #[arg(long, env = "AMOAUTH_AMOCRM_URL", hide_env_values = true)]
    amocrm_url: Option<String>,
    /// Connect and total timeout for each request to amoCRM (e.g. 10s)
    #[arg(long, env = "AMOAUTH_AMOCRM_TIMEOUT", hide_env_values = true)]
    amocrm_timeout: Option<String>,
}
fills!(AmoCrmFlags: domains, amocrm_url, amocrm_timeout);

/// The HTTP server and its background loops.
#[derive(Args)]
pub struct ServerFlags {
    /// HTTP listen address
    #[arg(long, env = "AMOAUTH_LISTEN", hide_env_values = true)]
    listen: Option<String>,
    /// Lifetime of an OAuth state (e.g. 15m)
    #[arg(long, env = "AMOAUTH_STATE_TTL", hide_env_values = true)]
    state_ttl: Option<String>,
    /// Admin token for the dashboard and install; generated at start when unset
    #[arg(long, env = "AMOAUTH_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Accept marketplace widget installs (on/off)
    #[arg(long, env = "AMOAUTH_WIDGET_INSTALLS", hide_env_values = true)]
    widget_installs: Option<String>,
    /// Requests per client IP on the routes the internet reaches: 20/s, 600/m, or off
    #[arg(long, env = "AMOAUTH_RATE_LIMIT", hide_env_values = true)]
    rate_limit: Option<String>,
    /// Proxy addresses whose X-Forwarded-For is believed (comma-separated IPs)
    #[arg(long, env = "AMOAUTH_TRUSTED_PROXIES", hide_env_values = true)]
    trusted_proxies: Option<String>,
    /// Requests one client IP may have in flight at once (e.g. 64), or off
    #[arg(long, env = "AMOAUTH_PER_IP_CONCURRENCY", hide_env_values = true)]
    per_ip_concurrency: Option<String>,
    /// Time a client has to send a request's headers, and again its body (e.g. 10s)
    #[arg(long, env = "AMOAUTH_READ_TIMEOUT", hide_env_values = true)]
    read_timeout: Option<String>,
    /// Prefix of the dashboard, API, health and metrics (e.g. /amocrm/); install and callback keep their paths
    #[arg(long, env = "AMOAUTH_BASE_PATH", hide_env_values = true)]
    base_path: Option<String>,
    /// Origins allowed in connect-link return URLs (scheme://host[:port], comma-separated)
    #[arg(long, env = "AMOAUTH_RETURN_ORIGINS", hide_env_values = true)]
    return_origins: Option<String>,
    /// How often the refresh worker looks for due connections (e.g. 1m)
    #[arg(long, env = "AMOAUTH_REFRESH_INTERVAL", hide_env_values = true)]
    refresh_interval: Option<String>,
    /// How often expired states and sessions are deleted (e.g. 1h)
    #[arg(long, env = "AMOAUTH_CLEANUP_INTERVAL", hide_env_values = true)]
    cleanup_interval: Option<String>,
    /// Gateway: requests per second per amoCRM account, across every replica (e.g. 7)
    #[arg(long, env = "AMOAUTH_PROXY_RATE", hide_env_values = true)]
    proxy_rate: Option<String>,
    /// Gateway: how long a call waits for its account's slot before answering 429 (e.g. 10s)
    #[arg(long, env = "AMOAUTH_PROXY_MAX_WAIT", hide_env_values = true)]
    proxy_max_wait: Option<String>,
}
fills!(
    ServerFlags: listen,
    state_ttl,
    admin_token,
    widget_installs,
    rate_limit,
    trusted_proxies,
    per_ip_concurrency,
    read_timeout,
    base_path,
    return_origins,
    refresh_interval,
    cleanup_interval,
    proxy_rate,
    proxy_max_wait
);

/// How long cleanup keeps the audit trail.
#[derive(Args)]
pub struct RetentionFlags {
    /// Cleanup deletes audit rows older than this (e.g. 90d); delivered events go after 30 days
    #[arg(long, env = "AMOAUTH_AUDIT_RETENTION", hide_env_values = true)]
    audit_retention: Option<String>,
}
fills!(RetentionFlags: audit_retention);

/// Which connections are due for a refresh.
#[derive(Args)]
pub struct RefreshFlags {
    /// Refresh access tokens this long before they expire (e.g. 1h)
    #[arg(long, env = "AMOAUTH_REFRESH_MARGIN", hide_env_values = true)]
    refresh_margin: Option<String>,
    /// Refresh any refresh token older than this, used or not (e.g. 30d)
    #[arg(long, env = "AMOAUTH_KEEPALIVE_AGE", hide_env_values = true)]
    keepalive_age: Option<String>,
}
fills!(RefreshFlags: refresh_margin, keepalive_age);

/// Events for the host app.
#[derive(Args)]
pub struct EventsFlags {
    /// Where events for the host app are POSTed; unset: no events
    #[arg(long, env = "AMOAUTH_EVENTS_URL", hide_env_values = true)]
    events_url: Option<String>,
    /// HMAC-SHA256 key of the events' signatures; required with AMOAUTH_EVENTS_URL
    #[arg(long, env = "AMOAUTH_EVENTS_SECRET", hide_env_values = true)]
    events_secret: Option<String>,
    /// Also send connection.refreshed after every refresh (on/off)
    #[arg(long, env = "AMOAUTH_EVENTS_REFRESHED", hide_env_values = true)]
    events_refreshed: Option<String>,
    /// How often `serve` looks for events to deliver (e.g. 1s)
    #[arg(
        long,
        env = "AMOAUTH_EVENTS_INTERVAL",
        hide_env_values = true,
        hide = true
    )]
    events_interval: Option<String>,
}
fills!(
    EventsFlags: events_url,
    events_secret,
    events_refreshed,
    events_interval
);

#[derive(Args)]
pub struct LogFlags {
    /// Log format: text or json
    #[arg(long, env = "AMOAUTH_LOG_FORMAT", hide_env_values = true)]
    log_format: Option<String>,
}
fills!(LogFlags: log_format);
