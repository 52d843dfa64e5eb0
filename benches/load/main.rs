//! The load benchmark, `cargo bench --bench load`; BENCHMARKS.md explains the method and holds
//! the results.
//!
//! One run measures, side by side on this machine: the ceiling app (a do-nothing axum app on
//! the same stack), the amoCRM sandbox alone, then amoauth on each backend: complete flows,
//! installs and token API calls at their peak and at half of it, memory, a cleanup of a
//! million expired states under install load, and the refresh worker with 10,000 connections
//! due. amoauth and the ceiling app run as their own processes; the sandbox and the load
//! generator run here, on runtimes of their own so /proc tells their CPU apart.
//!
//! Then issue 15's yardstick (compare.rs): a direct implementation of the same work (direct.rs:
//! axum and rusqlite inline, its own process like the ceiling app) and amoauth on each backend,
//! the same flows, installs and token calls at their peak and at half of it, every amoauth
//! figure also as a ratio to the direct one.
//!
//! Then the amoCRM API gateway on SQLite (gateway.rs): its overhead against calling the
//! sandbox directly, and 100 accounts driven through it at 20 requests a second each.
//!
//! Variables: `AMOAUTH_BENCH_SECONDS` (each measurement, default 10),
//! `AMOAUTH_BENCH_BACKENDS` (default `sqlite,postgres,mysql`), `AMOAUTH_BENCH_POSTGRES_URL`
//! and `AMOAUTH_BENCH_MYSQL_URL` (servers on which the database `amoauth_bench` is dropped and
//! created; default the local test servers), `AMOAUTH_BENCH_SECTIONS` (which parts run, default
//! `ceilings,backends,direct,gateway`), `AMOAUTH_BENCH_PROXY_RATE` (the gateway's pace in its
//! paced run, default 7), `AMOAUTH_BENCH_AMOAUTH_BIN` (the amoauth binary to measure, e.g. an
//! older build, so before and after come from the same machine and bench code; default the one
//! cargo builds; it must take the same variables and commands: `serve`, `api-key create`,
//! `cleanup`). `AMOAUTH_BENCH_CEILING` and `AMOAUTH_BENCH_DIRECT` are set by the bench itself:
//! they turn this binary into the ceiling app or the direct implementation.

mod ceiling;
mod client;
mod compare;
mod database;
mod direct;
mod driver;
mod gateway;
mod process;
mod scenario;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use hyper::StatusCode;

use amoauth::sandbox::{ApiLimits, Sandbox, SandboxConfig};
use database::{Backend, Database};
use driver::{Outcome, closed_loop, open_loop};
use process::{CpuShare, CpuTicks, Server, amoauth_binary, amoauth_command, free_addr};
use scenario::{ADMIN_TOKEN, App, CLIENT_ID, CLIENT_SECRET, Env, Op};

/// Thread names, by which /proc tells the sandbox's CPU from the load generator's.
const SANDBOX_THREADS: &str = "sandbox";
const LOAD_THREADS: &str = "loadgen";
/// Clients at the peak: enough to keep both cores busy through every wait.
const PEAK_CLIENTS: usize = 32;
/// Clients on a fixed schedule: enough that a slow answer does not delay the next request.
const SCHEDULED_CLIENTS: usize = 64;
const WARMUP: Duration = Duration::from_secs(1);
/// Accounts the flows connect, all offered by one consent page as amoCRM offers a user's.
/// Enough that amoauth's pacing of each account (7 calls in any 1.25 s, two per flow) does not
/// bound thousands of flows a second.
const FLOW_ACCOUNTS: std::ops::RangeInclusive<i64> = 1_000_001..=1_001_600;
const REFRESH_ACCOUNTS: std::ops::RangeInclusive<i64> = 2_000_001..=2_010_000;
const EXPIRED_STATES: i64 = 1_000_000;
/// Installs per second while the cleanup runs: far above any real install rate.
const INSTALLS_DURING_CLEANUP: f64 = 200.0;
const ENCRYPTION_KEY: &str = "YmVuY2gtYmVuY2gtYmVuY2gtYmVuY2gtYmVuY2gtMDE=";

fn main() -> anyhow::Result<()> {
    if let Ok(sandbox) = std::env::var(ceiling::ROLE_VARIABLE) {
        return ceiling::serve(&sandbox);
    }
    if let Ok(role) = std::env::var(direct::ROLE_VARIABLE) {
        return direct::serve(&role);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sandbox_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(SANDBOX_THREADS)
        .enable_all()
        .build()?;
    let load_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(LOAD_THREADS)
        .enable_all()
        .build()?;
    let report = load_runtime.block_on(run(sandbox_runtime.handle().clone()))?;
    println!("\n{report}");
    Ok(())
}

struct Bench {
    seconds: Duration,
    sandbox_runtime: tokio::runtime::Handle,
    /// amoauth's address, the same for every start: it is the sandboxes' Redirect URI.
    amoauth_addr: SocketAddr,
    logs: tempfile::TempDir,
}

impl Bench {
    fn redirect_uri(&self) -> String {
        format!("http://{}/amocrm/callback", self.amoauth_addr)
    }

    /// A sandbox with these accounts, served on its own runtime.
    async fn sandbox(
        &self,
        accounts: impl Iterator<Item = i64>,
        redirect_uri: &str,
    ) -> anyhow::Result<(Sandbox, SocketAddr)> {
        self.sandbox_with(accounts, redirect_uri, ApiLimits::default())
            .await
    }

    /// A sandbox with these accounts and these limits on its leads and contacts API.
    async fn sandbox_with(
        &self,
        accounts: impl Iterator<Item = i64>,
        redirect_uri: &str,
        api: ApiLimits,
    ) -> anyhow::Result<(Sandbox, SocketAddr)> {
        let mut config = SandboxConfig::demo(CLIENT_ID, CLIENT_SECRET, redirect_uri);
        config.accounts = accounts.map(scenario::sandbox_account).collect();
        config.api = api;
        let sandbox = Sandbox::new(config);
        let serving = sandbox.clone();
        let bind = "127.0.0.1:0".parse()?;
        let addr = self
            .sandbox_runtime
            .spawn(async move { serving.spawn(bind).await })
            .await??;
        Ok((sandbox, addr))
    }

    fn amoauth_env(&self, database: &Database, sandbox: SocketAddr) -> Vec<(&'static str, String)> {
        vec![
            ("DATABASE_URL", database.url.clone()),
            ("AMOCRM_CLIENT_ID", CLIENT_ID.to_owned()),
            ("AMOCRM_CLIENT_SECRET", CLIENT_SECRET.to_owned()),
            ("AMOCRM_REDIRECT_URI", self.redirect_uri()),
            ("AMOAUTH_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
            ("AMOAUTH_ENCRYPTION_KEY", ENCRYPTION_KEY.to_owned()),
            ("AMOAUTH_AMOCRM_URL", format!("http://{sandbox}")),
            // The bench is one client IP sending thousands of requests a second.
            ("AMOAUTH_RATE_LIMIT", "off".to_owned()),
            // Only the cleanup measurement's own `amoauth cleanup` purges states.
            ("AMOAUTH_CLEANUP_INTERVAL", "30d".to_owned()),
            ("RUST_LOG", "info,sqlx=warn".to_owned()),
        ]
    }

    async fn start_amoauth(&self, env: &[(&str, String)], name: &str) -> anyhow::Result<Server> {
        let log = self.logs.path().join(format!("{name}.log"));
        Server::amoauth(self.amoauth_addr, env, &log)
            .await
            .with_context(|| format!("amoauth's log: {}", log.display()))
    }
}

/// A closed-loop measurement with where the CPU went meanwhile.
async fn peak(
    bench: &Bench,
    env: &Arc<Env>,
    op: Op,
    app_pid: u32,
) -> anyhow::Result<(Outcome, CpuShare)> {
    peak_with(bench, env, op, PEAK_CLIENTS, app_pid).await
}

/// `peak` with `clients` clients.
async fn peak_with(
    bench: &Bench,
    env: &Arc<Env>,
    op: Op,
    clients: usize,
    app_pid: u32,
) -> anyhow::Result<(Outcome, CpuShare)> {
    let before = CpuTicks::now(app_pid);
    let started = Instant::now();
    let outcome = closed_loop(env, op, clients, WARMUP, bench.seconds).await;
    let cpu = CpuTicks::now(app_pid).share_since(&before, started.elapsed());
    check(&outcome, format!("{op:?}"))?;
    Ok((outcome, cpu))
}

async fn scheduled(bench: &Bench, env: &Arc<Env>, op: Op, rate: f64) -> anyhow::Result<Outcome> {
    let never = Arc::new(AtomicBool::new(false));
    let outcome = open_loop(env, op, rate, SCHEDULED_CLIENTS, bench.seconds, never).await;
    check(&outcome, format!("{op:?}"))?;
    Ok(outcome)
}

/// A measurement with failed requests measured something else: stop and say what failed.
fn check(outcome: &Outcome, what: impl std::fmt::Display) -> anyhow::Result<()> {
    if outcome.errors > 0 {
        bail!(
            "{what}: {} of {} requests failed, first: {}",
            outcome.errors,
            outcome.errors + outcome.done,
            outcome.first_error.as_deref().unwrap_or_default()
        );
    }
    ensure!(outcome.done > 0, "{what}: nothing was measured");
    Ok(())
}

async fn run(sandbox_runtime: tokio::runtime::Handle) -> anyhow::Result<String> {
    let seconds = std::env::var("AMOAUTH_BENCH_SECONDS").map_or(Ok(10), |s| s.parse())?;
    let backends = std::env::var("AMOAUTH_BENCH_BACKENDS")
        .unwrap_or_else(|_| "sqlite,postgres,mysql".to_owned());
    let bench = Bench {
        seconds: Duration::from_secs(seconds),
        sandbox_runtime,
        amoauth_addr: free_addr()?,
        logs: tempfile::Builder::new()
            .prefix("amoauth-bench-")
            .tempdir()?,
    };
    let sections = std::env::var("AMOAUTH_BENCH_SECTIONS")
        .unwrap_or_else(|_| "ceilings,backends,direct,gateway".to_owned());
    let wanted: Vec<&str> = sections.split(',').map(str::trim).collect();
    if let Some(unknown) = wanted
        .iter()
        .find(|s| !["ceilings", "backends", "direct", "gateway"].contains(s))
    {
        bail!("AMOAUTH_BENCH_SECTIONS: unknown section `{unknown}`");
    }
    let mut report = String::new();
    writeln!(report, "# amoauth load benchmark\n\n{}", machine())?;
    writeln!(report, "\namoauth: {}", amoauth_binary().display())?;
    // The backends' rows compare with the ceilings, so they need them.
    if wanted.contains(&"ceilings") || wanted.contains(&"backends") {
        let backends = match wanted.contains(&"backends") {
            true => backends.as_str(),
            false => "",
        };
        ceilings_and_backends(&bench, backends, &mut report).await?;
    }
    if wanted.contains(&"direct") {
        let section = compare::run(&bench, &backends).await?;
        eprintln!("{section}");
        report.push_str(&section);
    }
    if wanted.contains(&"gateway") {
        let section = gateway::run(&bench)
            .await
            .with_context(|| format!("gateway: logs in {}", bench.logs.path().display()))?;
        report.push_str(&section);
    }
    Ok(report)
}

/// The ceilings, the sandbox alone, then amoauth on each of `backends` (comma-separated).
async fn ceilings_and_backends(
    bench: &Bench,
    backends: &str,
    report: &mut String,
) -> anyhow::Result<()> {
    let flow_accounts: Vec<i64> = FLOW_ACCOUNTS.collect();

    // The ceiling app and a sandbox of its own, which sends the consent decision back to it.
    let ceiling_addr = free_addr()?;
    let ceiling_redirect = format!("http://{ceiling_addr}/amocrm/callback");
    let (ceiling_sandbox, ceiling_sandbox_addr) =
        bench.sandbox(FLOW_ACCOUNTS, &ceiling_redirect).await?;
    let ceiling = Server::ceiling(ceiling_addr, ceiling_sandbox_addr).await?;
    let ceiling_env = Arc::new(Env {
        app: App::Ceiling,
        app_addr: ceiling.addr,
        sandbox: ceiling_sandbox,
        sandbox_addr: ceiling_sandbox_addr,
        redirect_uri: ceiling_redirect,
        session: None,
        api_key: None,
        accounts: flow_accounts.clone(),
    });
    let mut ceilings = Vec::new();
    writeln!(
        report,
        "\n## Ceilings: the do-nothing app on the same stack\n"
    )?;
    writeln!(
        report,
        "| ceiling | req/s | p50 ms | p99 ms | CPU % app/sandbox/loadgen/db |"
    )?;
    writeln!(report, "|---|---:|---:|---:|---|")?;
    for (op, name) in [
        (
            Op::Flow,
            "do-nothing flow (install, consent page, Allow, callback, result page)",
        ),
        (Op::Install, "fixed redirect"),
        (Op::Token, "fixed JSON"),
    ] {
        let (outcome, cpu) = peak(bench, &ceiling_env, op, ceiling.pid()).await?;
        writeln!(report, "{}", row(name, &outcome, &cpu))?;
        eprintln!("ceiling {name}: {:.0}/s", outcome.rate());
        ceilings.push(outcome.rate());
    }
    let (ceiling_rss, ceiling_hwm) = ceiling.memory()?;
    writeln!(
        report,
        "\nThe ceiling app's RSS: {} now, {} at its peak.",
        mib(ceiling_rss),
        mib(ceiling_hwm)
    )?;

    writeln!(report, "\n## The sandbox alone\n")?;
    writeln!(
        report,
        "| sandbox endpoint | req/s | p50 ms | p99 ms | CPU % app/sandbox/loadgen/db |"
    )?;
    writeln!(report, "|---|---:|---:|---:|---|")?;
    let mut seconds_per_flow = 0.0;
    for (op, name) in [
        (Op::SandboxConsent, "consent page"),
        (Op::SandboxDecide, "Allow (redirect with a code)"),
        (Op::SandboxExchange, "code exchange"),
        (Op::SandboxAccount, "GET /api/v4/account"),
    ] {
        let (outcome, cpu) = peak(bench, &ceiling_env, op, ceiling.pid()).await?;
        writeln!(report, "{}", row(name, &outcome, &cpu))?;
        seconds_per_flow += 1.0 / outcome.rate();
    }
    writeln!(
        report,
        "\nA flow needs one of each from the sandbox: alone, it could serve {:.0} flows/s.",
        1.0 / seconds_per_flow
    )?;
    ceiling.stop().await?;

    for name in backends.split(',').map(str::trim).filter(|b| !b.is_empty()) {
        let (backend, server_url) = backend(name)?;
        let database = Database::fresh(backend, &server_url).await?;
        let section = run_backend(bench, &database, &flow_accounts, &ceilings)
            .await
            .with_context(|| {
                format!(
                    "{}: logs in {}",
                    backend.name(),
                    bench.logs.path().display()
                )
            })?;
        eprintln!("{section}");
        report.push_str(&section);
    }
    Ok(())
}

/// A backend of `AMOAUTH_BENCH_BACKENDS` and the URL of its server (empty for SQLite).
fn backend(name: &str) -> anyhow::Result<(Backend, String)> {
    Ok(match name {
        "sqlite" => (Backend::Sqlite, String::new()),
        "postgres" => (
            Backend::Postgres,
            std::env::var("AMOAUTH_BENCH_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned()),
        ),
        "mysql" => (
            Backend::Mysql,
            std::env::var("AMOAUTH_BENCH_MYSQL_URL")
                .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned()),
        ),
        other => bail!("AMOAUTH_BENCH_BACKENDS: unknown backend `{other}`"),
    })
}

/// What the load scenarios need of a running amoauth: an API key and the admin's session.
async fn amoauth_load_env(
    bench: &Bench,
    vars: &[(&str, String)],
    sandbox: Sandbox,
    sandbox_addr: SocketAddr,
) -> anyhow::Result<Arc<Env>> {
    let api_key = amoauth_command(&["api-key", "create", "bench"], vars).await?;
    Ok(Arc::new(Env {
        app: App::Amoauth,
        app_addr: bench.amoauth_addr,
        sandbox,
        sandbox_addr,
        redirect_uri: bench.redirect_uri(),
        session: Some(log_in(bench.amoauth_addr).await?),
        api_key: Some(api_key.trim().to_owned()),
        accounts: FLOW_ACCOUNTS.collect(),
    }))
}

/// Everything measured on one backend, as a report section.
async fn run_backend(
    bench: &Bench,
    database: &Database,
    flow_accounts: &[i64],
    ceilings: &[f64],
) -> anyhow::Result<String> {
    let backend = database.backend.name();
    let mut out = String::new();
    writeln!(out, "\n## amoauth on {backend}\n")?;
    let (sandbox, sandbox_addr) = bench
        .sandbox(flow_accounts.iter().copied(), &bench.redirect_uri())
        .await?;
    let vars = bench.amoauth_env(database, sandbox_addr);
    let server = bench
        .start_amoauth(&vars, &format!("{backend}-serve"))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (idle_rss, _) = server.memory()?;

    let env = amoauth_load_env(bench, &vars, sandbox, sandbox_addr).await?;

    writeln!(
        out,
        "| at the peak ({PEAK_CLIENTS} clients) | req/s | of ceiling | p50 ms | p99 ms | CPU % amoauth/sandbox/loadgen/db |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---|")?;
    let mut peaks = Vec::new();
    for ((op, name), ceiling) in [
        (Op::Flow, "complete flows"),
        (Op::Install, "install"),
        (Op::Token, "token API, fresh token"),
    ]
    .into_iter()
    .zip(ceilings)
    {
        if matches!(op, Op::Token) {
            // Every account is connected before the token calls, so they never depend on how
            // far the flows got (in short runs a slower backend's left some unconnected).
            scenario::connect_directly(env.app_addr, &env.sandbox, &env.accounts, PEAK_CLIENTS)
                .await
                .context("connecting the accounts")?;
        }
        let (outcome, cpu) = peak(bench, &env, op, server.pid()).await?;
        writeln!(
            out,
            "| {name} | {:.0} | {:.0}% | {:.2} | {:.2} | {cpu} |",
            outcome.rate(),
            outcome.rate() / ceiling * 100.0,
            outcome.ms(0.5),
            outcome.ms(0.99),
        )?;
        peaks.push((op, name, outcome.rate()));
    }

    writeln!(
        out,
        "\n| at half the peak ({SCHEDULED_CLIENTS} clients, fixed schedule) | req/s | p50 ms | p99 ms | max ms |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    for (op, name, rate) in &peaks {
        let outcome = scheduled(bench, &env, *op, rate / 2.0).await?;
        writeln!(
            out,
            "| {name} | {:.0} | {:.2} | {:.2} | {:.2} |",
            outcome.rate(),
            outcome.ms(0.5),
            outcome.ms(0.99),
            outcome.ms(1.0),
        )?;
    }
    let (_, load_hwm) = server.memory()?;
    writeln!(
        out,
        "\nRSS: {} idle after start, {} at the peak under load.",
        mib(idle_rss),
        mib(load_hwm)
    )?;

    cleanup(database, &env, &vars, &mut out).await?;
    server.stop().await?;
    refresh(bench, database, &mut out).await?;
    Ok(out)
}

/// `amoauth cleanup` of a million expired states while installs keep coming.
async fn cleanup(
    database: &Database,
    env: &Arc<Env>,
    vars: &[(&str, String)],
    out: &mut String,
) -> anyhow::Result<()> {
    let started = Instant::now();
    database.insert_expired_states(EXPIRED_STATES).await?;
    let inserted = started.elapsed();
    let expired = database.expired_states().await?;
    ensure!(
        expired >= EXPIRED_STATES,
        "only {expired} expired states were inserted"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (env, stop) = (Arc::clone(env), Arc::clone(&stop));
        tokio::spawn(async move {
            let forever = Duration::from_secs(3600);
            open_loop(
                &env,
                Op::Install,
                INSTALLS_DURING_CLEANUP,
                16,
                forever,
                stop,
            )
            .await
        })
    };
    // Installs alone for a second first, so the cleanup starts under steady load.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let printed = amoauth_command(&["cleanup"], vars).await?;
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let installs = load.await?;
    check(&installs, "Install")?;
    let left = database.expired_states().await?;
    ensure!(
        left == 0,
        "{left} expired states are left after cleanup ({printed})"
    );
    writeln!(
        out,
        "\n`amoauth cleanup` of {expired} expired states: {:.2} s (`{}`; inserting them took {:.1} s). \
         Installs meanwhile at {INSTALLS_DURING_CLEANUP:.0}/s: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms.",
        took.as_secs_f64(),
        printed.trim(),
        inserted.as_secs_f64(),
        installs.ms(0.5),
        installs.ms(0.99),
        installs.ms(1.0),
    )?;
    Ok(())
}

/// The refresh worker of a fresh `amoauth serve` with 10,000 connections due at once.
async fn refresh(bench: &Bench, database: &Database, out: &mut String) -> anyhow::Result<()> {
    let backend = database.backend.name();
    let (first, last) = (*REFRESH_ACCOUNTS.start(), *REFRESH_ACCOUNTS.end());
    let count = last - first + 1;
    let (sandbox, sandbox_addr) = bench
        .sandbox(REFRESH_ACCOUNTS, &bench.redirect_uri())
        .await?;
    let vars = bench.amoauth_env(database, sandbox_addr);

    let server = bench
        .start_amoauth(&vars, &format!("{backend}-connect"))
        .await?;
    let started = Instant::now();
    let accounts: Vec<i64> = REFRESH_ACCOUNTS.collect();
    scenario::connect_directly(bench.amoauth_addr, &sandbox, &accounts, PEAK_CLIENTS).await?;
    let connecting = started.elapsed();
    server.stop().await?;
    ensure!(database.connections_at_version(first, last, 1).await? == count);
    let due = database
        .make_due(first, last, Duration::from_secs(600))
        .await?;
    ensure!(
        due == count.unsigned_abs(),
        "{due} connections made due, not {count}"
    );

    let before = sandbox.stats();
    let started = Instant::now();
    let server = bench
        .start_amoauth(&vars, &format!("{backend}-refresh"))
        .await?;
    let ticks = CpuTicks::now(server.pid());
    let measured = Instant::now();
    loop {
        if database.connections_at_version(first, last, 2).await? == count {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the refresh worker did not refresh {count} connections in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    let cpu = CpuTicks::now(server.pid()).share_since(&ticks, measured.elapsed());
    let (_, hwm) = server.memory()?;
    // Anything refreshed twice would show by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = sandbox.stats();
    let refreshes = after.refreshes - before.refreshes;
    let successful = after.successful_refreshes - before.successful_refreshes;
    let once = database.connections_at_version(first, last, 2).await?;
    server.stop().await?;
    ensure!(
        refreshes == count.unsigned_abs() && successful == refreshes && once == count,
        "expected exactly one refresh per connection: {refreshes} refresh requests, \
         {successful} successful, {once} of {count} connections written once"
    );
    writeln!(
        out,
        "\nRefresh worker, {count} connections due at once: all refreshed {:.2} s after `amoauth serve` \
         started ({:.0}/s); the sandbox saw {refreshes} refresh requests, all successful, and every \
         connection's pair was written exactly once more. CPU % amoauth/sandbox/loadgen/db: {cpu}; \
         amoauth's RSS peaked at {}. (Connecting them first took {:.1} s: {:.0} installs + callbacks/s.)",
        took.as_secs_f64(),
        count as f64 / took.as_secs_f64(),
        mib(hwm),
        connecting.as_secs_f64(),
        count as f64 / connecting.as_secs_f64(),
    )?;
    Ok(())
}

/// Logs in as the admin and returns the session cookie, `amoauth_session=…`.
async fn log_in(app: SocketAddr) -> anyhow::Result<String> {
    let mut conn = client::Conn::new(app);
    let reply = conn
        .post_form("/login", &[], &[("token", ADMIN_TOKEN)])
        .await?;
    ensure!(
        reply.status == StatusCode::SEE_OTHER,
        "login answered {}",
        reply.status
    );
    reply
        .headers
        .get_all(hyper::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok()?.split(';').next())
        .find(|pair| pair.starts_with("amoauth_session="))
        .map(str::to_owned)
        .context("login set no session cookie")
}

fn row(name: &str, outcome: &Outcome, cpu: &CpuShare) -> String {
    format!(
        "| {name} | {:.0} | {:.2} | {:.2} | {cpu} |",
        outcome.rate(),
        outcome.ms(0.5),
        outcome.ms(0.99)
    )
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// The machine, as the report's first line.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores of {cpu}, Linux {}", kernel.trim())
}
