//! Issue 15's yardstick: the direct implementation (direct.rs) and amoauth on each backend,
//! driven by the same scenarios against the same kind of sandbox in the same run, every
//! amoauth figure also given as a ratio to the direct implementation's.

use std::fmt::Write as _;
use std::sync::Arc;

use anyhow::{Context, ensure};
use hyper::StatusCode;

use crate::client::Conn;

use crate::database::Database;
use crate::direct;
use crate::driver::Outcome;
use crate::process::{CpuShare, Server, free_addr};
use crate::scenario::{App, Env, Op};
use crate::{Bench, FLOW_ACCOUNTS, PEAK_CLIENTS, SCHEDULED_CLIENTS, mib};

/// Clients of the complete flows, as the issue measured them.
const FLOW_CLIENTS: usize = 16;

/// The work compared, in the order it runs: the flows connect the accounts the token calls ask
/// for.
const WORK: [(Op, usize, &str); 3] = [
    (Op::Flow, FLOW_CLIENTS, "complete flows/s"),
    (Op::Install, PEAK_CLIENTS, "install req/s"),
    (Op::Token, PEAK_CLIENTS, "token API req/s"),
];

/// One implementation's figures.
struct Figures {
    name: String,
    /// Each of `WORK` at its peak, with where the CPU went meanwhile.
    peaks: Vec<(Outcome, CpuShare)>,
    /// Each of `WORK` on a fixed schedule at half its peak.
    halves: Vec<Outcome>,
    /// The process's resident memory at its peak, in KiB.
    rss_peak: u64,
}

/// The direct implementation, then amoauth on each of `backends` (comma-separated), as a
/// report section.
pub async fn run(bench: &Bench, backends: &str) -> anyhow::Result<String> {
    let mut rows = vec![
        measure_direct(bench)
            .await
            .context("the direct implementation")?,
    ];
    eprintln!("direct: {:.0} flows/s", rows[0].peaks[0].0.rate());
    for name in backends.split(',').map(str::trim).filter(|b| !b.is_empty()) {
        let (backend, server_url) = crate::backend(name)?;
        let database = Database::fresh(backend, &server_url).await?;
        let figures = measure_amoauth(bench, &database).await.with_context(|| {
            format!(
                "{} against direct: logs in {}",
                backend.name(),
                bench.logs.path().display()
            )
        })?;
        eprintln!("{}: {:.0} flows/s", figures.name, figures.peaks[0].0.rate());
        rows.push(figures);
    }
    report(&rows)
}

async fn measure_direct(bench: &Bench) -> anyhow::Result<Figures> {
    let dir = tempfile::Builder::new()
        .prefix("amoauth-bench-direct-")
        .tempdir()?;
    let database = dir.path().join("direct.db");
    direct::create_database(&database)?;
    let api_key = direct::create_api_key(&database, "bench")?;
    let addr = free_addr()?;
    let redirect_uri = format!("http://{addr}/amocrm/callback");
    let (sandbox, sandbox_addr) = bench.sandbox(FLOW_ACCOUNTS, &redirect_uri).await?;
    let server = Server::direct(addr, sandbox_addr, &database).await?;
    let env = Arc::new(Env {
        app: App::Amoauth,
        app_addr: addr,
        sandbox,
        sandbox_addr,
        redirect_uri,
        session: None,
        api_key: Some(api_key),
        accounts: FLOW_ACCOUNTS.collect(),
    });
    let figures = measure(bench, &env, &server, "direct (SQLite)".to_owned()).await?;
    server.stop().await?;
    Ok(figures)
}

async fn measure_amoauth(bench: &Bench, database: &Database) -> anyhow::Result<Figures> {
    let backend = database.backend.name();
    let (sandbox, sandbox_addr) = bench.sandbox(FLOW_ACCOUNTS, &bench.redirect_uri()).await?;
    let vars = bench.amoauth_env(database, sandbox_addr);
    let server = bench
        .start_amoauth(&vars, &format!("{backend}-against-direct"))
        .await?;
    let env = crate::amoauth_load_env(bench, &vars, sandbox, sandbox_addr).await?;
    let figures = measure(bench, &env, &server, format!("amoauth on {backend}")).await?;
    server.stop().await?;
    Ok(figures)
}

async fn measure(
    bench: &Bench,
    env: &Arc<Env>,
    server: &Server,
    name: String,
) -> anyhow::Result<Figures> {
    // Every account is connected before anything is measured, so the token calls never depend
    // on how far the flows got (a slower build connects fewer in its flows phase).
    crate::scenario::connect_directly(env.app_addr, &env.sandbox, &env.accounts, PEAK_CLIENTS)
        .await
        .with_context(|| format!("{name}: connecting the accounts"))?;
    refuses_a_wrong_key(env)
        .await
        .with_context(|| format!("{name}: the token API"))?;
    let mut peaks = Vec::new();
    for (op, clients, _) in WORK {
        peaks.push(crate::peak_with(bench, env, op, clients, server.pid()).await?);
    }
    let mut halves = Vec::new();
    for ((op, _, _), (peak, _)) in WORK.into_iter().zip(&peaks) {
        halves.push(crate::scheduled(bench, env, op, peak.rate() / 2.0).await?);
    }
    let (_, rss_peak) = server.memory()?;
    Ok(Figures {
        name,
        peaks,
        halves,
        rss_peak,
    })
}

/// Both sides really check the API key: the same key with its secret's last digit changed
/// is refused.
async fn refuses_a_wrong_key(env: &Env) -> anyhow::Result<()> {
    let key = env.api_key.as_deref().context("no API key")?;
    let last = if key.ends_with('0') { '1' } else { '0' };
    let wrong = format!("Bearer {}{last}", &key[..key.len() - 1]);
    let path = format!("/api/v1/connections/{}/token", env.accounts[0]);
    let reply = Conn::new(env.app_addr)
        .get(&path, &[("authorization", &wrong)])
        .await?;
    ensure!(
        reply.status == StatusCode::UNAUTHORIZED,
        "a wrong API key got {}",
        reply.status
    );
    Ok(())
}

fn report(rows: &[Figures]) -> anyhow::Result<String> {
    let (direct, amoauth) = rows.split_first().context("no direct row")?;
    let mut out = String::new();
    writeln!(out, "\n## amoauth against a direct implementation\n")?;
    writeln!(
        out,
        "The direct implementation (benches/load/direct.rs) does the same work on SQLite with \
         rusqlite inline under a mutex; in parentheses: amoauth / direct (above 1: faster for \
         rates, slower for latencies).\n"
    )?;
    let works: Vec<&str> = WORK.iter().map(|(_, _, name)| *name).collect();
    header(
        &mut out,
        "at the peak",
        &[
            &format!("{} ({FLOW_CLIENTS} clients)", works[0]),
            &format!("{} ({PEAK_CLIENTS} clients)", works[1]),
            &format!("{} ({PEAK_CLIENTS} clients)", works[2]),
        ],
    )?;
    for row in rows {
        let cells = row.peaks.iter().zip(&direct.peaks).map(|((o, _), (d, _))| {
            with_ratio(
                &format!("{:.0}", o.rate()),
                &[(o.rate(), d.rate())],
                row,
                direct,
            )
        });
        line(&mut out, &row.name, cells)?;
    }

    writeln!(out)?;
    header(
        &mut out,
        &format!("p50 / p99 ms at half the peak ({SCHEDULED_CLIENTS} clients, fixed schedule)"),
        &["complete flows", "install", "token API"],
    )?;
    for row in rows {
        let cells = row.halves.iter().zip(&direct.halves).map(|(o, d)| {
            let ms = format!("{:.2} / {:.2}", o.ms(0.5), o.ms(0.99));
            let ratios = [(o.ms(0.5), d.ms(0.5)), (o.ms(0.99), d.ms(0.99))];
            with_ratio(&ms, &ratios, row, direct)
        });
        line(&mut out, &row.name, cells)?;
    }

    writeln!(out)?;
    header(
        &mut out,
        "CPU % app/sandbox/loadgen/db at the peak",
        &["complete flows", "install", "token API", "RSS at the peak"],
    )?;
    for row in rows {
        let cells = row
            .peaks
            .iter()
            .map(|(_, cpu)| cpu.to_string())
            .chain([mib(row.rss_peak)]);
        line(&mut out, &row.name, cells)?;
    }
    // Robust where the rates are not: other processes on the cores take CPU from every
    // process under test, but not the CPU each operation costs.
    writeln!(out)?;
    header(
        &mut out,
        "the app's CPU per operation at the peak, µs",
        &["complete flow", "install", "token API call"],
    )?;
    for row in rows {
        let cells = row
            .peaks
            .iter()
            .zip(&direct.peaks)
            .map(|((o, cpu), (d, d_cpu))| {
                let (used, direct_used) = (cpu_per_op(o, cpu), cpu_per_op(d, d_cpu));
                with_ratio(&format!("{used:.0}"), &[(used, direct_used)], row, direct)
            });
        line(&mut out, &row.name, cells)?;
    }
    let accounts = FLOW_ACCOUNTS.count();
    writeln!(
        out,
        "\nThe flows connect {accounts} accounts, the clients starting far apart in the list. \
         amoauth keeps to at most 7 requests in any 1.25 s per account and a flow makes two \
         (code exchange, account lookup), so at most {:.0} flows/s fit on {accounts} accounts. \
         The direct implementation does not pace.",
        accounts as f64 * 7.0 / 1.25 / 2.0
    )?;
    if amoauth.is_empty() {
        writeln!(
            out,
            "\n(No amoauth backend was asked for: AMOAUTH_BENCH_BACKENDS.)"
        )?;
    }
    Ok(out)
}

/// Microseconds of the app's CPU per completed operation.
fn cpu_per_op(outcome: &Outcome, cpu: &CpuShare) -> f64 {
    cpu.app / 100.0 / outcome.rate() * 1e6
}

/// `value`, and for an amoauth row its ratios to the direct row in parentheses.
fn with_ratio(value: &str, ratios: &[(f64, f64)], row: &Figures, direct: &Figures) -> String {
    if std::ptr::eq(row, direct) {
        return value.to_owned();
    }
    let ratios: Vec<String> = ratios
        .iter()
        .map(|(amoauth, direct)| format!("{:.2}", amoauth / direct))
        .collect();
    format!("{value} ({})", ratios.join(" / "))
}

fn header(out: &mut String, first: &str, columns: &[&str]) -> std::fmt::Result {
    writeln!(out, "| {first} | {} |", columns.join(" | "))?;
    writeln!(out, "|---|{}", "---:|".repeat(columns.len()))
}

fn line(out: &mut String, name: &str, cells: impl Iterator<Item = String>) -> std::fmt::Result {
    let cells: Vec<String> = cells.collect();
    writeln!(out, "| {name} | {} |", cells.join(" | "))
}
