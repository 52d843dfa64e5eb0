//! The amoCRM API gateway's rows, on SQLite: what a call through
//! `/api/v1/connections/{account}/proxy/…` costs against calling the sandbox directly, and
//! 100 accounts driven at 20 requests a second each through the gateway, which must pace them
//! to amoCRM's 7 so that the sandbox answers no 429 and every caller gets an answer.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use hyper::{Method, StatusCode};
use tokio::time::Instant;

use amoauth::sandbox::{ApiLimits, ApiStats, Sandbox};

use crate::client::Conn;
use crate::database::{Backend, Database};
use crate::driver::{Outcome, Sample};
use crate::process::amoauth_command;
use crate::scenario::connect_directly;
use crate::{Bench, PEAK_CLIENTS, WARMUP};

/// The accounts both measurements connect.
const ACCOUNTS: std::ops::RangeInclusive<i64> = 3_000_001..=3_000_100;
/// Each account's leads, created in one batch before measuring, so lists carry a body.
const LEADS_PER_ACCOUNT: usize = 10;
/// The call measured: a small page of an account's leads.
const LEADS_PAGE: &str = "api/v4/leads?limit=5";
/// The paced run: this many requests a second to each account, for this long.
const DRIVEN_RATE: f64 = 20.0;
const DRIVEN_FOR: Duration = Duration::from_secs(30);
/// amoCRM's limit, which the sandbox enforces in the paced run.
const AMOCRM_RATE: usize = 7;
/// The overhead run lifts the pace (to the highest `AMOAUTH_PROXY_RATE` takes) and the
/// sandbox's limit, so the peak measures the gateway's work rather than the pacing.
const UNPACED_PROXY_RATE: &str = "1000";
/// How a 429 of amoauth's own (the caller waited its longest) reads, unlike amoCRM's.
const AMOAUTH_429: &[u8] = b"\"error\":\"rate_limited\"";

/// Both measurements as a report section.
pub async fn run(bench: &Bench) -> anyhow::Result<String> {
    let mut out = String::new();
    writeln!(out, "\n## The amoCRM API gateway on SQLite\n")?;
    overhead(bench, &mut out)
        .await
        .context("the gateway's overhead")?;
    paced(bench, &mut out)
        .await
        .context("the paced 100-account run")?;
    Ok(out)
}

/// A sandbox with the accounts and `limits`, an amoauth on a fresh SQLite database with them
/// all connected, an API key, and each account's access token (asked of amoauth, as a host
/// app would) with its leads created.
struct Setup {
    sandbox: Sandbox,
    sandbox_addr: SocketAddr,
    server: crate::process::Server,
    api_key: String,
    tokens: Arc<HashMap<i64, String>>,
    _database: Database,
}

async fn set_up(
    bench: &Bench,
    limits: ApiLimits,
    proxy_rate: &str,
    name: &str,
) -> anyhow::Result<Setup> {
    let accounts: Vec<i64> = ACCOUNTS.collect();
    let database = Database::fresh(Backend::Sqlite, "").await?;
    let (sandbox, sandbox_addr) = bench
        .sandbox_with(ACCOUNTS, &bench.redirect_uri(), limits)
        .await?;
    let mut vars = bench.amoauth_env(&database, sandbox_addr);
    vars.push(("AMOAUTH_PROXY_RATE", proxy_rate.to_owned()));
    // The bench is one client IP with thousands of calls waiting their turn at once.
    vars.push(("AMOAUTH_PER_IP_CONCURRENCY", "off".to_owned()));
    let server = bench.start_amoauth(&vars, name).await?;
    connect_directly(bench.amoauth_addr, &sandbox, &accounts, PEAK_CLIENTS).await?;
    let api_key = amoauth_command(&["api-key", "create", "bench"], &vars)
        .await?
        .trim()
        .to_owned();

    let mut tokens = HashMap::new();
    let mut app = Conn::new(bench.amoauth_addr);
    let mut direct = Conn::new(sandbox_addr);
    let leads: Vec<serde_json::Value> = (0..LEADS_PER_ACCOUNT)
        .map(|n| serde_json::json!({ "name": format!("Bench lead {n}"), "price": n * 1000 }))
        .collect();
    let leads = serde_json::Value::Array(leads);
    for account in accounts {
        let bearer = format!("Bearer {api_key}");
        let reply = app
            .get(
                &format!("/api/v1/connections/{account}/token"),
                &[("authorization", &bearer)],
            )
            .await?
            .expect(StatusCode::OK)?;
        let grant: serde_json::Value = serde_json::from_slice(&reply.body)?;
        let token = grant["access_token"]
            .as_str()
            .context("the token API gave no access token")?
            .to_owned();
        let bearer = format!("Bearer {token}");
        direct
            .json(
                Method::POST,
                "/api/v4/leads",
                &[("authorization", &bearer)],
                &leads,
            )
            .await?
            .expect(StatusCode::OK)
            .context("creating leads")?;
        tokens.insert(account, token);
    }
    Ok(Setup {
        sandbox,
        sandbox_addr,
        server,
        api_key,
        tokens: Arc::new(tokens),
        _database: database,
    })
}

/// Where a measured call goes.
#[derive(Clone)]
enum Target {
    /// Straight at the sandbox with the account's token.
    Direct {
        sandbox: SocketAddr,
        tokens: Arc<HashMap<i64, String>>,
    },
    /// Through amoauth's gateway with the API key.
    Gateway {
        amoauth: SocketAddr,
        api_key: String,
    },
}

impl Target {
    fn conn(&self) -> Conn {
        match self {
            Self::Direct { sandbox, .. } => Conn::new(*sandbox),
            Self::Gateway { amoauth, .. } => Conn::new(*amoauth),
        }
    }

    /// The account's page of leads; fails unless it came with the leads.
    async fn list_leads(&self, conn: &mut Conn, account: i64) -> anyhow::Result<()> {
        let (path, bearer) = match self {
            Self::Direct { tokens, .. } => (format!("/{LEADS_PAGE}"), &tokens[&account]),
            Self::Gateway { api_key, .. } => (
                format!("/api/v1/connections/{account}/proxy/{LEADS_PAGE}"),
                api_key,
            ),
        };
        let bearer = format!("Bearer {bearer}");
        let reply = conn.get(&path, &[("authorization", &bearer)]).await?;
        let reply = reply.expect(StatusCode::OK)?;
        const LEADS: &[u8] = b"\"_embedded\":{\"leads\":[{";
        ensure!(
            reply.body.windows(LEADS.len()).any(|w| w == LEADS),
            "a page of leads was expected"
        );
        Ok(())
    }
}

/// `clients` callers back to back over every account in turn, measured after the warmup.
async fn peak(target: &Target, clients: usize, duration: Duration) -> Outcome {
    let accounts: Vec<i64> = ACCOUNTS.collect();
    let measure_from = Instant::now() + WARMUP;
    let deadline = measure_from + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..clients {
        let (target, accounts) = (target.clone(), accounts.clone());
        tasks.spawn(async move {
            let mut conn = target.conn();
            let mut sample = Sample::default();
            for turn in (index..).step_by(clients) {
                let started = Instant::now();
                if started >= deadline {
                    break;
                }
                let result = target
                    .list_leads(&mut conn, accounts[turn % accounts.len()])
                    .await;
                if started >= measure_from {
                    sample.record(started.elapsed(), result);
                }
            }
            sample
        });
    }
    Outcome::merge(tasks.join_all().await, duration)
}

/// The same call directly and through the gateway, each at its peak.
async fn overhead(bench: &Bench, out: &mut String) -> anyhow::Result<()> {
    let unlimited = ApiLimits {
        requests_per_second: usize::MAX,
        ..ApiLimits::default()
    };
    let setup = set_up(bench, unlimited, UNPACED_PROXY_RATE, "gateway-overhead").await?;
    let direct = Target::Direct {
        sandbox: setup.sandbox_addr,
        tokens: Arc::clone(&setup.tokens),
    };
    let gateway = Target::Gateway {
        amoauth: bench.amoauth_addr,
        api_key: setup.api_key.clone(),
    };
    let direct = peak(&direct, PEAK_CLIENTS, bench.seconds).await;
    crate::check(&direct, "leads directly")?;
    let through = peak(&gateway, PEAK_CLIENTS, bench.seconds).await;
    crate::check(&through, "leads through the gateway")?;
    setup.server.stop().await?;

    writeln!(
        out,
        "| GET /{LEADS_PAGE} at the peak ({PEAK_CLIENTS} clients over {} accounts) | req/s | p50 ms | p99 ms |",
        ACCOUNTS.count()
    )?;
    writeln!(out, "|---|---:|---:|---:|")?;
    for (name, outcome) in [
        ("directly at the sandbox", &direct),
        (
            "through the gateway (unpaced: AMOAUTH_PROXY_RATE=1000)",
            &through,
        ),
    ] {
        writeln!(
            out,
            "| {name} | {:.0} | {:.2} | {:.2} |",
            outcome.rate(),
            outcome.ms(0.5),
            outcome.ms(0.99)
        )?;
    }
    writeln!(
        out,
        "\nThe gateway adds {:.2} ms at p50 and {:.2} ms at p99 per request (its slot reservation \
         in SQLite, the token lookup and the second hop included); its throughput is {:.1}% of \
         the direct calls'.",
        through.ms(0.5) - direct.ms(0.5),
        through.ms(0.99) - direct.ms(0.99),
        through.rate() / direct.rate() * 100.0
    )?;
    Ok(())
}

/// What the callers of the paced run got back.
#[derive(Default)]
struct Answers {
    ok: u64,
    /// amoauth's own 429: the caller's turn was further away than `AMOAUTH_PROXY_MAX_WAIT`.
    paced_out: u64,
    /// Anything else: amoCRM's 429 passed on, other statuses, failed connections.
    other: u64,
    first_other: Option<String>,
    ok_latencies: Vec<Duration>,
    paced_out_latencies: Vec<Duration>,
}

impl Answers {
    fn ms(latencies: &mut [Duration], p: f64) -> f64 {
        latencies.sort_unstable();
        match latencies.len() {
            0 => 0.0,
            n => latencies[((n as f64 * p) as usize).min(n - 1)].as_secs_f64() * 1000.0,
        }
    }
}

/// 100 accounts at 20 requests a second each, every request on its own schedule whether or
/// not earlier ones answered (a caller waiting its turn holds a connection of its own).
async fn paced(bench: &Bench, out: &mut String) -> anyhow::Result<()> {
    // `AMOAUTH_BENCH_PROXY_RATE` tries another pace against amoCRM's 7, e.g. to find the
    // margin the pacing needs.
    let pace = std::env::var("AMOAUTH_BENCH_PROXY_RATE").unwrap_or_else(|_| "7".to_owned());
    let setup = set_up(bench, ApiLimits::default(), &pace, "gateway-paced").await?;
    let before = setup.sandbox.api_stats();
    let amoauth = bench.amoauth_addr;
    let bearer: Arc<str> = format!("Bearer {}", setup.api_key).into();
    let answers = Arc::new(Mutex::new(Answers::default()));
    let idle: Arc<Mutex<Vec<Conn>>> = Arc::default();
    let period = Duration::from_secs_f64(1.0 / DRIVEN_RATE);
    let started = Instant::now();
    let mut requests = tokio::task::JoinSet::new();
    let mut sent = 0u64;
    let accounts: Vec<i64> = ACCOUNTS.collect();
    let mut tick = tokio::time::interval(period);
    // A late tick sends what it owes at once: the offered load stays 20/s per account.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while started.elapsed() < DRIVEN_FOR {
        tick.tick().await;
        for &account in &accounts {
            let (bearer, answers, idle) =
                (Arc::clone(&bearer), Arc::clone(&answers), Arc::clone(&idle));
            sent += 1;
            requests.spawn(async move {
                let mut conn = idle
                    .lock()
                    .expect("no holder panics")
                    .pop()
                    .unwrap_or_else(|| Conn::new(amoauth));
                let asked = Instant::now();
                let path = format!("/api/v1/connections/{account}/proxy/{LEADS_PAGE}");
                let reply = conn.get(&path, &[("authorization", &bearer)]).await;
                let took = asked.elapsed();
                let mut answers = answers.lock().expect("no holder panics");
                match reply {
                    Ok(reply) if reply.status == StatusCode::OK => {
                        answers.ok += 1;
                        answers.ok_latencies.push(took);
                    }
                    Ok(reply)
                        if reply.status == StatusCode::TOO_MANY_REQUESTS
                            && reply
                                .body
                                .windows(AMOAUTH_429.len())
                                .any(|w| w == AMOAUTH_429) =>
                    {
                        answers.paced_out += 1;
                        answers.paced_out_latencies.push(took);
                    }
                    Ok(reply) => {
                        answers.other += 1;
                        let body =
                            String::from_utf8_lossy(&reply.body[..reply.body.len().min(200)])
                                .into_owned();
                        answers
                            .first_other
                            .get_or_insert_with(|| format!("{}: {body}", reply.status));
                    }
                    Err(error) => {
                        answers.other += 1;
                        answers
                            .first_other
                            .get_or_insert_with(|| format!("{error:#}"));
                    }
                }
                drop(answers);
                idle.lock().expect("no holder panics").push(conn);
            });
        }
    }
    while requests.join_next().await.is_some() {}
    let took = started.elapsed();
    let connections = idle.lock().expect("no holder panics").len();
    let after = setup.sandbox.api_stats();
    setup.server.stop().await?;

    let mut answers = Arc::into_inner(answers)
        .context("every request has ended")?
        .into_inner()
        .expect("no holder panics");
    let seen = Seen::between(&before, &after);
    writeln!(
        out,
        "\n{} accounts driven through the gateway at {DRIVEN_RATE:.0} requests a second each for \
         {} s (amoauth paced at {pace}/s per account, `AMOAUTH_PROXY_MAX_WAIT` 10 s; {sent} requests \
         over up to {connections} connections, all answered after {:.1} s):\n",
        accounts.len(),
        DRIVEN_FOR.as_secs(),
        took.as_secs_f64(),
    )?;
    writeln!(out, "| answer | count | p50 ms | p99 ms | max ms |")?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    for (name, count, latencies) in [
        ("200 from amoCRM", answers.ok, &mut answers.ok_latencies),
        (
            "429 from amoauth (turn beyond the longest wait)",
            answers.paced_out,
            &mut answers.paced_out_latencies,
        ),
    ] {
        writeln!(
            out,
            "| {name} | {count} | {:.0} | {:.0} | {:.0} |",
            Answers::ms(latencies, 0.5),
            Answers::ms(latencies, 0.99),
            Answers::ms(latencies, 1.0),
        )?;
    }
    writeln!(out, "| anything else | {} | | | |", answers.other)?;
    writeln!(
        out,
        "\nThe sandbox (amoCRM) served {} requests ({:.0}/s per account over the run): **{} \
         answered 429**, {} answered 403, and the most any account received in any one second \
         was **{}** (amoCRM allows {AMOCRM_RATE}).",
        seen.requests,
        seen.requests as f64 / accounts.len() as f64 / took.as_secs_f64(),
        seen.too_many_requests,
        seen.forbidden,
        seen.max_per_second,
    )?;
    eprintln!("{out}");
    ensure!(
        answers.other == 0 && answers.ok + answers.paced_out == sent,
        "{} of {sent} callers got neither 200 nor amoauth's 429; first: {}",
        answers.other,
        answers.first_other.as_deref().unwrap_or_default()
    );
    ensure!(
        seen.too_many_requests == 0 && seen.max_per_second <= AMOCRM_RATE,
        "the sandbox answered {} 429s and saw up to {} requests per account in a second",
        seen.too_many_requests,
        seen.max_per_second
    );
    Ok(())
}

/// The sandbox's counters over the paced run only (its setup created leads first).
struct Seen {
    requests: u64,
    too_many_requests: u64,
    forbidden: u64,
    max_per_second: usize,
}

impl Seen {
    fn between(before: &ApiStats, after: &ApiStats) -> Self {
        Self {
            requests: after.requests() - before.requests(),
            too_many_requests: after.too_many_requests() - before.too_many_requests(),
            forbidden: after.forbidden() - before.forbidden(),
            // The setup's one batch per account cannot raise the maximum past 1.
            max_per_second: after.max_per_second(),
        }
    }
}
