//! The processes under test (amoauth, the ceiling app and the direct implementation, each its
//! own process so its memory and CPU are its own) and what /proc says about them and about
//! this process's threads.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::client::Conn;

/// Names another amoauth binary to measure (e.g. an older build), so before and after come
/// from the same machine and the same bench code.
pub const AMOAUTH_BIN_VARIABLE: &str = "AMOAUTH_BENCH_AMOAUTH_BIN";

/// The amoauth binary under test: `AMOAUTH_BENCH_AMOAUTH_BIN`, else the one cargo built for
/// this bench.
pub fn amoauth_binary() -> PathBuf {
    std::env::var_os(AMOAUTH_BIN_VARIABLE)
        .map_or_else(|| env!("CARGO_BIN_EXE_amoauth").into(), PathBuf::from)
}

/// A server process, killed when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
}

impl Server {
    /// `amoauth serve` on `addr` with `env`, its output in `log`; returns once /healthz answers.
    pub async fn amoauth(
        addr: SocketAddr,
        env: &[(&str, String)],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let log = std::fs::File::create(log)?;
        let mut command = Command::new(amoauth_binary());
        command
            .arg("serve")
            .env("AMOAUTH_LISTEN", addr.to_string())
            .envs(env.iter().map(|(name, value)| (name, value)))
            .current_dir(std::env::temp_dir())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let mut server = Self {
            child: command
                .spawn()
                .with_context(|| format!("starting {} serve", amoauth_binary().display()))?,
            addr,
        };
        server.wait_healthy().await?;
        Ok(server)
    }

    /// This bench binary again, as the ceiling app on `addr`.
    pub async fn ceiling(addr: SocketAddr, sandbox: SocketAddr) -> anyhow::Result<Self> {
        let child = Command::new(std::env::current_exe()?)
            .env(crate::ceiling::ROLE_VARIABLE, format!("{addr} {sandbox}"))
            .kill_on_drop(true)
            .spawn()?;
        let mut server = Self { child, addr };
        server.wait_healthy().await?;
        Ok(server)
    }

    /// This bench binary again, as the direct implementation on `addr` with its database.
    pub async fn direct(
        addr: SocketAddr,
        sandbox: SocketAddr,
        database: &Path,
    ) -> anyhow::Result<Self> {
        let role = format!("{addr} {sandbox} {}", database.display());
        let child = Command::new(std::env::current_exe()?)
            .env(crate::direct::ROLE_VARIABLE, role)
            .kill_on_drop(true)
            .spawn()?;
        let mut server = Self { child, addr };
        server.wait_healthy().await?;
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or_default()
    }

    /// Resident memory now and at its peak, in KiB.
    pub fn memory(&self) -> anyhow::Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse().ok())
                .with_context(|| format!("{name} missing from /proc status"))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut conn = Conn::new(self.addr);
        loop {
            if let Ok(reply) = conn.get("/healthz", &[]).await
                && reply.status.is_success()
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the server at {} exited with {status}", self.addr);
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the server at {} did not become healthy in 60 s", self.addr);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Runs an amoauth command to its end; its stdout, or an error with its stderr.
pub async fn amoauth_command(args: &[&str], env: &[(&str, String)]) -> anyhow::Result<String> {
    let output = Command::new(amoauth_binary())
        .args(args)
        .envs(env.iter().map(|(name, value)| (name, value)))
        .current_dir(std::env::temp_dir())
        .output()
        .await?;
    if !output.status.success() {
        bail!(
            "amoauth {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// A free loopback address (bound and released; the port is reused right after).
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// CPU time used so far, in clock ticks, by the parts of the machine that share the cores.
#[derive(Clone, Copy, Default)]
pub struct CpuTicks {
    pub app: u64,
    pub sandbox: u64,
    pub load_generator: u64,
    pub database: u64,
}

/// Where the cores went during a measurement, in percent of one core.
pub struct CpuShare {
    pub app: f64,
    pub sandbox: f64,
    pub load_generator: f64,
    pub database: f64,
}

impl std::fmt::Display for CpuShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0}/{:.0}/{:.0}/{:.0}",
            self.app, self.sandbox, self.load_generator, self.database
        )
    }
}

/// Linux's USER_HZ, the unit of /proc's CPU times, on every architecture Rust targets.
const TICKS_PER_SECOND: f64 = 100.0;

impl CpuTicks {
    /// Reads the app process, this process's sandbox and load generator threads (by thread
    /// name) and every database server process.
    pub fn now(app_pid: u32) -> Self {
        let mut ticks = Self {
            app: stat(&format!("/proc/{app_pid}/stat")).map_or(0, |(_, t)| t),
            ..Self::default()
        };
        for (name, used) in entries("/proc/self/task") {
            if name.starts_with(crate::SANDBOX_THREADS) {
                ticks.sandbox += used;
            } else if name.starts_with(crate::LOAD_THREADS) {
                ticks.load_generator += used;
            }
        }
        for (name, used) in entries("/proc") {
            if ["postgres", "mariadbd", "mysqld"].contains(&name.as_str()) {
                ticks.database += used;
            }
        }
        ticks
    }

    pub fn share_since(&self, earlier: &Self, elapsed: Duration) -> CpuShare {
        let percent = |now: u64, then: u64| {
            now.saturating_sub(then) as f64 / TICKS_PER_SECOND / elapsed.as_secs_f64() * 100.0
        };
        CpuShare {
            app: percent(self.app, earlier.app),
            sandbox: percent(self.sandbox, earlier.sandbox),
            load_generator: percent(self.load_generator, earlier.load_generator),
            database: percent(self.database, earlier.database),
        }
    }
}

/// `(name, utime + stime)` of every numbered entry under `dir` (processes or threads).
fn entries(dir: &str) -> Vec<(String, u64)> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    read.flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|entry| stat(&format!("{}/stat", entry.path().display())))
        .collect()
}

/// The command name and user + system ticks from a `/proc/…/stat` file.
fn stat(path: &str) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    // The name is in parentheses and may hold spaces; the fields after it are plain.
    let (head, rest) = text.rsplit_once(") ")?;
    let name = head.split_once(" (")?.1.to_owned();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name come state (field 3) ... utime (14) and stime (15).
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some((name, user + system))
}
