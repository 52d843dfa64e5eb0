//! The `amoauth` command line: one struct per command, each a thin call into the library.

mod flags;
mod log_lines;

use std::io::IsTerminal as _;
use std::net::SocketAddr;

use anyhow::Context as _;
use clap::{Args, CommandFactory as _, Parser, Subcommand};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::api_keys;
use crate::config::{ConfigError, DatabaseUrl, LogFormat, Settings, parse_duration};
use crate::crypto::TokenColumn;
use crate::crypto::random_token;
use crate::import::{self, ImportOutcome};
use crate::integrations::Integrations;
use crate::keys::{self, Rotated};
use crate::parts::{self, Keyed, Parts};
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::server;
use crate::store::{Backend, EventStatus};
use crate::store::{checked_earlier, now};
use flags::{
    AmoCrmFlags, DatabaseFlags, EventsFlags, IntegrationFlags, KeyFlags, LogFlags, RefreshFlags,
    RetentionFlags, ServerFlags,
};
use log_lines::{Flush, LogLines};

#[derive(Parser)]
#[command(
    name = "amoauth",
    version,
    about = "Connects web applications to amoCRM and Kommo through OAuth 2.0 and keeps the connections alive"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server and periodic cleanup; migrates the database on start
    Serve(Box<ServeArgs>),
    /// Run amoauth and the built-in amoCRM sandbox on SQLite, preconfigured, and print the URL to open
    Demo(DemoArgs),
    /// Apply the database schema and exit
    Migrate(StoreArgs),
    /// Delete expired OAuth states, and audit rows and delivered events past their retention; print how many were removed
    Cleanup(CleanupArgs),
    /// List connections: status, expiry, hours left, last refresh, last error, masked token
    Tokens(SealedStoreArgs),
    /// List active OAuth states (never the states themselves)
    States(StoreArgs),
    /// List events for the host app still pending or failed, and count the delivered ones
    Events(EventsArgs),
    /// Refresh one connection now (by account id or subdomain), or every connection that is due
    Refresh(RefreshArgs),
    /// Take over the connections of an earlier integration's amocrm_tokens table
    Import(ImportArgs),
    /// Re-encrypt every stored token with a new key (see README, "The encryption key")
    RotateKey(SealedStoreArgs),
    /// Manage API keys for the token API
    #[command(subcommand, name = "api-key")]
    ApiKey(ApiKeyCommand),
    /// Run only the amoCRM sandbox, for testing an integration offline
    Sandbox(SandboxArgs),
    /// Print a shell completion script (e.g. `amoauth completions bash > /etc/bash_completion.d/amoauth`)
    Completions { shell: clap_complete::Shell },
    /// Print the manual page in roff (e.g. `amoauth man > amoauth.1`)
    Man,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    database: DatabaseFlags,
    #[command(flatten)]
    key: KeyFlags,
    #[command(flatten)]
    integration: IntegrationFlags,
    #[command(flatten)]
    amocrm: AmoCrmFlags,
    #[command(flatten)]
    server: ServerFlags,
    #[command(flatten)]
    retention: RetentionFlags,
    #[command(flatten)]
    refresh: RefreshFlags,
    #[command(flatten)]
    events: EventsFlags,
    #[command(flatten)]
    log: LogFlags,
}

/// `serve`'s flags without the amoCRM ones: the demo is its own integration and amoCRM.
#[derive(Args)]
struct DemoArgs {
    #[command(flatten)]
    database: DatabaseFlags,
    #[command(flatten)]
    key: KeyFlags,
    #[command(flatten)]
    server: ServerFlags,
    #[command(flatten)]
    retention: RetentionFlags,
    #[command(flatten)]
    refresh: RefreshFlags,
    #[command(flatten)]
    events: EventsFlags,
    #[command(flatten)]
    log: LogFlags,
}

/// For commands that read or write rows but never a token.
#[derive(Args)]
struct StoreArgs {
    #[command(flatten)]
    database: DatabaseFlags,
    #[command(flatten)]
    log: LogFlags,
}

/// For commands that open or seal tokens.
#[derive(Args)]
struct SealedStoreArgs {
    #[command(flatten)]
    database: DatabaseFlags,
    #[command(flatten)]
    key: KeyFlags,
    #[command(flatten)]
    log: LogFlags,
}

#[derive(Args)]
struct CleanupArgs {
    /// Keep states that expired less than this long ago, so late callbacks are told "expired"
    #[arg(long, default_value = "1d")]
    grace: String,
    /// Only count what would be removed
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    retention: RetentionFlags,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args)]
struct EventsArgs {
    #[command(subcommand)]
    action: Option<EventsAction>,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Subcommand)]
enum EventsAction {
    /// Deliver the failed events again: pending, attempts reset, due now; prints how many
    Retry {
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Args)]
struct RefreshArgs {
    /// Account id or subdomain; without it, every connection due by margin or keep-alive age
    account: Option<String>,
    #[command(flatten)]
    database: DatabaseFlags,
    #[command(flatten)]
    key: KeyFlags,
    #[command(flatten)]
    integration: IntegrationFlags,
    #[command(flatten)]
    amocrm: AmoCrmFlags,
    #[command(flatten)]
    refresh: RefreshFlags,
    #[command(flatten)]
    events: EventsFlags,
    #[command(flatten)]
    log: LogFlags,
}

#[derive(Args)]
struct ImportArgs {
    /// The database that holds the old amocrm_tokens (sqlite://, postgres://, mysql://); opened read-only
    #[arg(long = "from", value_name = "DATABASE_URL")]
    source: String,
    /// Report what would happen; refresh nothing, write nothing
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    database: DatabaseFlags,
    #[command(flatten)]
    key: KeyFlags,
    #[command(flatten)]
    integration: IntegrationFlags,
    #[command(flatten)]
    amocrm: AmoCrmFlags,
    #[command(flatten)]
    log: LogFlags,
}

#[derive(Args)]
struct SandboxArgs {
    /// Address the sandbox listens on
    // Its own id: `listen` is serve's AMOAUTH_LISTEN, a different setting with a different default.
    #[arg(
        long = "listen",
        id = "sandbox_listen",
        value_name = "ADDR",
        default_value = "127.0.0.1:8081"
    )]
    listen: SocketAddr,
    #[command(flatten)]
    integration: IntegrationFlags,
    #[command(flatten)]
    log: LogFlags,
}

#[derive(Subcommand)]
enum ApiKeyCommand {
    /// Create a key and print it once (only its hash is stored)
    Create {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List keys: name, id, created, revoked
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke a key at once
    Revoke {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

impl StoreArgs {
    fn settings(&self) -> Settings {
        flags::settings(&[&self.database, &self.log])
    }
}

impl SealedStoreArgs {
    fn settings(&self) -> Settings {
        flags::settings(&[&self.database, &self.key, &self.log])
    }
}

/// Parses the command line (after `.env`) and runs the command.
#[doc(hidden)]
pub async fn run() -> anyhow::Result<()> {
    // A missing .env is normal; a malformed one is worth stopping for.
    match dotenvy::dotenv() {
        Ok(_) => {}
        Err(err) if err.not_found() => {}
        // dotenvy quotes the whole line, which may hold a secret: name the variable only.
        Err(dotenvy::Error::LineParse(line, _)) => {
            let variable = line.split('=').next().unwrap_or_default().trim();
            anyhow::bail!(".env: the line of `{variable}` cannot be parsed (check its quotes)");
        }
        Err(err) => anyhow::bail!(".env: {err}"),
    }
    match Cli::parse().command {
        Command::Serve(args) => {
            let settings = flags::settings(&[
                &args.database,
                &args.key,
                &args.integration,
                &args.amocrm,
                &args.server,
                &args.retention,
                &args.refresh,
                &args.events,
                &args.log,
            ]);
            let (settings, _flush) = with_batched_logging(settings)?;
            serve(&settings).await
        }
        Command::Demo(args) => {
            let settings = flags::settings(&[
                &args.database,
                &args.key,
                &args.server,
                &args.retention,
                &args.refresh,
                &args.events,
                &args.log,
            ]);
            let (settings, _flush) = with_batched_logging(settings)?;
            demo(&settings).await
        }
        Command::Migrate(args) => {
            let config = with_logging(args.settings())?.store()?;
            parts::open_store(&config).await?.close().await;
            println!("database {} is up to date", config.database_url);
            Ok(())
        }
        Command::Cleanup(args) => {
            let settings =
                flags::settings(&[&args.store.database, &args.store.log, &args.retention]);
            cleanup(&with_logging(settings)?, &args.grace, args.dry_run).await
        }
        Command::Tokens(args) => tokens(&with_logging(args.settings())?).await,
        Command::States(args) => states(&with_logging(args.settings())?).await,
        Command::Events(EventsArgs {
            action: Some(EventsAction::Retry { store }),
            store: before,
        }) => {
            // Flags given before `retry` count too (`events --database-url … retry`).
            let (mut settings, before) = (store.settings(), before.settings());
            settings.database_url = settings.database_url.or(before.database_url);
            settings.log_format = settings.log_format.or(before.log_format);
            retry_events(&with_logging(settings)?).await
        }
        Command::Events(args) => events(&with_logging(args.store.settings())?).await,
        Command::Refresh(args) => {
            let settings = flags::settings(&[
                &args.database,
                &args.key,
                &args.integration,
                &args.amocrm,
                &args.refresh,
                &args.events,
                &args.log,
            ]);
            refresh(&with_logging(settings)?, args.account.as_deref()).await
        }
        Command::ApiKey(command) => api_key(command).await,
        Command::RotateKey(args) => rotate_key(&with_logging(args.settings())?).await,
        Command::Import(args) => {
            let settings = flags::settings(&[
                &args.database,
                &args.key,
                &args.integration,
                &args.amocrm,
                &args.log,
            ]);
            import(&with_logging(settings)?, &args.source, args.dry_run).await
        }
        Command::Sandbox(args) => {
            let settings = flags::settings(&[&args.integration, &args.log]);
            run_sandbox(&with_logging(settings)?, args.listen).await
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "amoauth",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man => {
            match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                // `amoauth man | head` closes the pipe early: not an error of ours.
                Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                other => Ok(other?),
            }
        }
    }
}

/// Starts logging as the settings say, and hands them on.
fn with_logging(settings: Settings) -> anyhow::Result<Settings> {
    init_logging(settings.log_format()?, LogLines::direct());
    Ok(settings)
}

/// As `with_logging`, for the server: its info lines are written in batches, and what is
/// left of them when the returned `Flush` is dropped.
fn with_batched_logging(settings: Settings) -> anyhow::Result<(Settings, Flush)> {
    let format = settings.log_format()?;
    let (lines, flush) = LogLines::batched();
    init_logging(format, lines);
    Ok((settings, flush))
}

fn init_logging(format: LogFormat, lines: LogLines) {
    // `target=level` directives: what operators write, without the regex engine that EnvFilter's
    // span and field matching would add to every build. sqlx logs PostgreSQL notices (e.g. on
    // every migration check) at INFO: noise, not news.
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|directives| directives.parse::<Targets>().ok())
        .unwrap_or_else(|| {
            Targets::new()
                .with_default(tracing::Level::INFO)
                .with_target("sqlx", tracing::Level::WARN)
        });
    // Colour codes are for a person at a terminal; in a file or a pipe they are noise.
    let colours = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(colours)
        .with_writer(lines);
    let subscriber = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => subscriber.with(layer).init(),
        LogFormat::Json => subscriber
            .with(layer.json().flatten_event(true).with_current_span(true))
            .init(),
    }
}

async fn serve(settings: &Settings) -> anyhow::Result<()> {
    let config = settings.server()?;
    let public_origin = config.integrations[0]
        .redirect_uri
        .origin()
        .ascii_serialization();
    let running = server::start(config).await?;
    if running.admin_token_generated {
        // Printed, never logged, and never the token itself: a one-time link is spent once
        // used, so copies in the journal or a proxy's access log open nothing.
        println!(
            "No AMOAUTH_ADMIN_TOKEN set; generated one for this run. This link logs in once, \
             within 10 minutes (restart for a new one):"
        );
        println!("Log in at: {}", running.login_link(&public_origin).await?);
    }
    server::shutdown_signal().await;
    tracing::info!("shutting down; finishing requests in flight");
    running.stop().await
}

async fn demo(settings: &Settings) -> anyhow::Result<()> {
    let listen = settings
        .listen
        .clone()
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let redirect_uri = format!("http://{listen}/amocrm/callback");
    let client_id = "amoauth-demo".to_owned();
    let client_secret = random_token();
    let (kommo_client_id, kommo_client_secret) = ("amoauth-demo-kommo".to_owned(), random_token());
    // Both platforms, each with its own integration, as a vendor selling to both runs it.
    let sandbox = Sandbox::new(
        SandboxConfig::demo(&client_id, &client_secret, &redirect_uri).with_kommo(
            &kommo_client_id,
            &kommo_client_secret,
            &redirect_uri,
        ),
    );
    let sandbox_addr = sandbox
        .spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .context("cannot start the amoCRM sandbox")?;
    // `localhost` rather than 127.0.0.1: a different site, as amoCRM is, so cookies do not follow.
    let sandbox_origin = format!("http://localhost:{}", sandbox_addr.port());
    let demo_settings = Settings {
        client_id: Some(client_id),
        client_secret: Some(client_secret),
        redirect_uri: Some(redirect_uri.clone()),
        kommo_client_id: Some(kommo_client_id),
        kommo_client_secret: Some(kommo_client_secret),
        kommo_redirect_uri: Some(redirect_uri),
        listen: Some(listen),
        amocrm_url: Some(sandbox_origin.clone()),
        admin_token: settings
            .admin_token
            .clone()
            .or_else(|| Some(random_token())),
        ..settings.clone()
    };
    let config = demo_settings.server()?;
    let public_origin = config.integrations[0]
        .redirect_uri
        .origin()
        .ascii_serialization();
    let database = config.store.database_url.clone();
    let running = server::start(config).await?;
    println!();
    println!(
        "amoauth demo is running: amoauth on {public_origin}, the amoCRM sandbox on {sandbox_origin}"
    );
    println!("database: {database}");
    println!();
    println!("  1. Open {}", running.login_link(&public_origin).await?);
    println!("     (a login link: it works once, within 10 minutes)");
    println!(
        "  2. Click \"Подключить amoCRM\" (Connect amoCRM), then \"Разрешить\" (Allow) in the sandbox."
    );
    println!(
        "  3. See \"amoCRM успешно подключена!\", then list the connection: cargo run --release -- tokens"
    );
    println!(
        "  4. For the Kommo account: {public_origin}/amocrm/install?platform=kommo (as the admin)"
    );
    println!();
    println!("Press Ctrl-C to stop.");
    server::shutdown_signal().await;
    running.stop().await
}

async fn cleanup(settings: &Settings, grace: &str, dry_run: bool) -> anyhow::Result<()> {
    let grace = parse_duration(grace).ok_or_else(|| ConfigError {
        variable: "--grace",
        problem: format!("expected a duration such as 0s, 1h or 1d, got `{grace}`"),
    })?;
    let audit_retention = settings.audit_retention()?;
    let store = parts::open_store(&settings.store()?).await?;
    let cutoff = checked_earlier(now(), grace).context("--grace is too large")?;
    let audit_age = format_duration(audit_retention);
    let events_age = format_duration(server::DELIVERED_EVENTS_RETENTION);
    if dry_run {
        let expired = store.count_expired_states(cutoff).await?;
        let audit_rows = match server::older_than(audit_retention) {
            Some(cutoff) => store.count_attempts_before(cutoff).await?,
            None => 0,
        };
        let delivered = match server::older_than(server::DELIVERED_EVENTS_RETENTION) {
            Some(cutoff) => store.count_delivered_events_before(cutoff).await?,
            None => 0,
        };
        println!("would remove {expired} expired states (dry run; nothing was deleted)");
        println!("would remove {audit_rows} audit rows older than {audit_age}");
        println!("would remove {delivered} delivered events older than {events_age}");
        return Ok(());
    }
    // Small enough that one batch holds SQLite's write lock for milliseconds.
    const BATCH: i64 = 2_000;
    // Long purges report progress on stderr, so stdout keeps the one-line results.
    let mut progress = |removed: u64| {
        if removed >= BATCH.unsigned_abs() {
            eprintln!("… {removed} removed so far");
        }
    };
    let removed = store
        .delete_expired_states(cutoff, BATCH, &mut progress)
        .await?;
    println!("removed {removed} expired states");
    let purged =
        server::delete_past_retention(&store, audit_retention, BATCH, &mut progress).await?;
    println!(
        "removed {} audit rows older than {audit_age}",
        purged.audit_rows
    );
    println!(
        "removed {} delivered events older than {events_age}",
        purged.delivered_events
    );
    Ok(())
}

/// A retention as people write it: in days, hours or seconds, whichever is whole.
fn format_duration(duration: std::time::Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        0 => format!("{}ms", duration.as_millis()),
        _ if seconds.is_multiple_of(86_400) => format!("{}d", seconds / 86_400),
        _ if seconds.is_multiple_of(3_600) => format!("{}h", seconds / 3_600),
        _ => format!("{seconds}s"),
    }
}

async fn tokens(settings: &Settings) -> anyhow::Result<()> {
    let Keyed { store, cipher } = Keyed::open(&settings.store()?).await?;
    let connections = store.connections().await?;
    if connections.is_empty() {
        println!(
            "no connections yet: open /amocrm/install (or run `amoauth demo`) to connect an account"
        );
        return Ok(());
    }
    let at = now();
    println!(
        "{:<24} {:<8} {:>10}  {:<20} {:<13} {:<20} {:>10}  {:<20} {:<13} last_error",
        "domain",
        "platform",
        "account",
        "name",
        "status",
        "expires_at (UTC)",
        "hours_left",
        "last_refresh (UTC)",
        "token"
    );
    for c in connections {
        let preview = match &c.access_token {
            Some(sealed) => match c
                .account_id
                .map(|account_id| cipher.open_token(sealed, TokenColumn::AccessToken, account_id))
            {
                Some(Ok(token)) => mask(token.expose()),
                Some(Err(err)) => format!("(cannot decrypt: {err})"),
                None => "(no account id)".into(),
            },
            None => "(none)".into(),
        };
        let hours_left = (c.expires_at - at).num_minutes() as f64 / 60.0;
        println!(
            "{:<24} {:<8} {:>10}  {:<20} {:<13} {:<20} {:>10.1}  {:<20} {:<13} {}",
            c.domain,
            c.platform,
            c.account_id
                .map(|id| id.to_string())
                .unwrap_or_else(|| "-".into()),
            c.account_name.unwrap_or_default(),
            c.status,
            c.expires_at.format("%Y-%m-%d %H:%M:%S"),
            hours_left,
            c.last_refresh_at
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_else(|| "never".into()),
            preview,
            c.last_error.as_deref().unwrap_or("-"),
        );
    }
    Ok(())
}

async fn refresh(settings: &Settings, account: Option<&str>) -> anyhow::Result<()> {
    let config = settings.server()?;
    let Parts { store, tokens, .. } = Parts::open(&config).await?;
    match account {
        Some(account) => {
            let mut rows = store.find_connections(account).await?;
            if rows.len() > 1 {
                anyhow::bail!(
                    "account `{account}` is connected on both amoCRM and Kommo: name one, \
                     `amocrm:{account}` or `kommo:{account}`"
                );
            }
            let row = rows.pop().ok_or_else(|| {
                anyhow::anyhow!("no connection for account `{account}`; see `amoauth tokens`")
            })?;
            let refreshed = tokens.refresh(row.id, row.version).await?;
            println!(
                "refreshed {} (account {}): the access token expires at {} UTC",
                refreshed.domain,
                refreshed
                    .account_id
                    .map(|id| id.to_string())
                    .unwrap_or_else(|| "-".into()),
                refreshed.expires_at.format("%Y-%m-%d %H:%M:%S")
            );
        }
        None => {
            let summary = tokens
                .refresh_due(config.refresh.margin, config.refresh.keepalive_age)
                .await?;
            println!(
                "refreshed {} connections, {} failed",
                summary.refreshed, summary.failed
            );
            if summary.failed > 0 {
                anyhow::bail!(
                    "{} refreshes failed; see `amoauth tokens` for each last error",
                    summary.failed
                );
            }
        }
    }
    Ok(())
}

async fn import(settings: &Settings, source: &str, dry_run: bool) -> anyhow::Result<()> {
    let source = DatabaseUrl::new(source);
    if Backend::of(&source).is_none() {
        anyhow::bail!("--from: expected a sqlite://, postgres:// or mysql:// URL");
    }
    let integrations = Integrations::new(&settings.integrations()?);
    let Keyed { store, cipher } = Keyed::open(&settings.store()?).await?;
    let report = import::import(&source, &store, &integrations, &cipher, dry_run).await?;
    let (mut imported, mut skipped) = (0, 0);
    for line in &report {
        match &line.outcome {
            ImportOutcome::Imported { account_id } => {
                imported += 1;
                println!("imported {} (account {account_id})", line.domain);
            }
            ImportOutcome::WouldImport => {
                imported += 1;
                println!("would import {}", line.domain);
            }
            ImportOutcome::Skipped(why) => {
                skipped += 1;
                println!("skipped {}: {why}", line.domain);
            }
        }
    }
    let verb = if dry_run { "would import" } else { "imported" };
    println!("{verb} {imported}, skipped {skipped} (from {source})");
    Ok(())
}

/// Rotates the key (see `keys::rotate`) and says what is left to do.
async fn rotate_key(settings: &Settings) -> anyhow::Result<()> {
    let config = settings.store()?;
    let store = parts::open_store(&config).await?;
    let rotated = keys::rotate(&config, &store).await?;
    let Rotated {
        resealed,
        write_key_id,
        still_in_use,
        ..
    } = &rotated;
    match &rotated.key_file {
        None => {
            println!("re-encrypted {resealed} connections with key {write_key_id}");
            if !still_in_use.is_empty() {
                anyhow::bail!(
                    "{still_in_use}: keep them in AMOAUTH_ENCRYPTION_KEY, make every replica write \
                     with key {write_key_id} (restart them with the new key first), then run \
                     rotate-key again"
                );
            }
            println!(
                "every token now reads with that key alone, so the other keys can be removed from \
                 AMOAUTH_ENCRYPTION_KEY"
            );
        }
        Some(path) => {
            println!("re-encrypted {resealed} connections with new key {write_key_id}");
            if !still_in_use.is_empty() {
                anyhow::bail!(
                    "{still_in_use}: {} keeps them; stop every running amoauth (it writes with the \
                     old key), then run rotate-key again",
                    path.display()
                );
            }
            println!("{} now holds only that key (back it up)", path.display());
        }
    }
    Ok(())
}

async fn api_key(command: ApiKeyCommand) -> anyhow::Result<()> {
    let (ApiKeyCommand::Create { store, .. }
    | ApiKeyCommand::List { store }
    | ApiKeyCommand::Revoke { store, .. }) = &command;
    let store = parts::open_store(&with_logging(store.settings())?.store()?).await?;
    match command {
        ApiKeyCommand::Create { name, .. } => {
            let key = api_keys::create(&store, &name).await?;
            println!("{}", key.full);
            eprintln!(
                "API key `{name}` (id {}) created; it is shown only this once.",
                key.key_id
            );
        }
        ApiKeyCommand::List { .. } => {
            for key in store.api_keys().await? {
                let revoked = key
                    .revoked_at
                    .map(|t| format!("revoked {}", t.format("%Y-%m-%d %H:%M:%S")))
                    .unwrap_or_else(|| "active".into());
                println!(
                    "{:<24} {}  created {}  {revoked}",
                    key.name,
                    key.key_id,
                    key.created_at.format("%Y-%m-%d %H:%M:%S")
                );
            }
        }
        ApiKeyCommand::Revoke { name, .. } => {
            if !store.revoke_api_key(&name, now()).await? {
                anyhow::bail!("no active API key named `{name}`; see `amoauth api-key list`");
            }
            println!("revoked API key `{name}`");
        }
    }
    Ok(())
}

/// The first characters of a token and an ellipsis: enough to tell tokens apart, not to use one.
fn mask(token: &str) -> String {
    let shown: String = token.chars().take(10).collect();
    format!("{shown}…")
}

async fn states(settings: &Settings) -> anyhow::Result<()> {
    let store = parts::open_store(&settings.store()?).await?;
    let states = store.active_states(now()).await?;
    println!("{} active states", states.len());
    for s in states {
        println!(
            "{:<20} {:<6} created {}  expires {}  ip {}",
            s.subdomain.as_deref().unwrap_or("-"),
            s.platform,
            s.created_at.format("%Y-%m-%d %H:%M:%S"),
            s.expires_at.format("%Y-%m-%d %H:%M:%S"),
            s.ip.as_deref().unwrap_or("-"),
        );
    }
    Ok(())
}

async fn events(settings: &Settings) -> anyhow::Result<()> {
    let store = parts::open_store(&settings.store()?).await?;
    let counts = store.event_counts().await?;
    let count = |status: EventStatus| {
        counts
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n)
    };
    let (pending, failed) = (count(EventStatus::Pending), count(EventStatus::Failed));
    println!(
        "{} delivered, {pending} pending, {failed} failed",
        count(EventStatus::Delivered)
    );
    if pending + failed == 0 {
        return Ok(());
    }
    const SHOWN: i64 = 1000;
    let undelivered = store.undelivered_events(SHOWN).await?;
    if pending + failed > SHOWN {
        println!("the oldest {SHOWN}:");
    }
    println!(
        "{:>8}  {:<26} {:<8} {:>8}  {:<20} last_error",
        "id", "type", "status", "attempts", "next_attempt (UTC)"
    );
    for e in undelivered {
        let next = match e.status {
            EventStatus::Pending => e.next_attempt_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            EventStatus::Delivered | EventStatus::Failed => "-".into(),
        };
        println!(
            "{:>8}  {:<26} {:<8} {:>8}  {:<20} {}",
            e.id,
            e.event_type,
            e.status,
            e.attempts,
            next,
            e.last_error.as_deref().unwrap_or("-"),
        );
    }
    Ok(())
}

async fn retry_events(settings: &Settings) -> anyhow::Result<()> {
    let store = parts::open_store(&settings.store()?).await?;
    let requeued = store.retry_failed_events(now()).await?;
    println!("requeued {requeued} failed events; `amoauth serve` delivers them now");
    Ok(())
}

async fn run_sandbox(settings: &Settings, listen: SocketAddr) -> anyhow::Result<()> {
    let integrations = settings.integrations()?;
    let (amocrm, kommo) = (&integrations[0], integrations.get(1));
    let mut config = SandboxConfig::demo(
        &amocrm.client_id,
        amocrm.client_secret.expose(),
        amocrm.redirect_uri.as_str(),
    );
    // Both platforms when both integrations are given; with only Kommo's, it serves all.
    if let Some(kommo) = kommo {
        config = config.with_kommo(
            &kommo.client_id,
            kommo.client_secret.expose(),
            kommo.redirect_uri.as_str(),
        );
    }
    let sandbox = Sandbox::new(config);
    let addr = sandbox
        .spawn(listen)
        .await
        .context("cannot start the amoCRM sandbox")?;
    println!("amoCRM sandbox on http://{addr} (consent page: http://{addr}/oauth)");
    server::shutdown_signal().await;
    Ok(())
}
