//! The bench's databases: a fresh one per backend, and the bulk SQL that sets up what the
//! cleanup and refresh measurements start from (a million expired states, ten thousand due
//! connections) faster than the app could.

use std::time::Duration;

use anyhow::Context;
use sqlx::{AssertSqlSafe, Connection};

use amoauth::internal::now;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    Mysql,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
            Backend::Mysql => "MariaDB",
        }
    }
}

const BENCH_DATABASE: &str = "amoauth_bench";

pub struct Database {
    pub backend: Backend,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

enum Conn {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
    Mysql(sqlx::MySqlConnection),
}

impl Database {
    /// A new empty database: a file in a temporary directory, or `amoauth_bench` dropped and
    /// created again on the server that `server_url` reaches.
    pub async fn fresh(backend: Backend, server_url: &str) -> anyhow::Result<Self> {
        if backend == Backend::Sqlite {
            let dir = tempfile::tempdir()?;
            let url = format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("amoauth.db").display()
            );
            return Ok(Self {
                backend,
                url,
                _dir: Some(dir),
            });
        }
        let mut url = url::Url::parse(server_url).context("bench database URL")?;
        let drop = format!("DROP DATABASE IF EXISTS {BENCH_DATABASE}");
        let create = format!("CREATE DATABASE {BENCH_DATABASE}");
        match backend {
            Backend::Postgres => {
                let mut admin = sqlx::PgConnection::connect(server_url).await?;
                sqlx::query(AssertSqlSafe(format!("{drop} WITH (FORCE)")))
                    .execute(&mut admin)
                    .await?;
                sqlx::query(AssertSqlSafe(create.as_str()))
                    .execute(&mut admin)
                    .await?;
            }
            _ => {
                let mut admin = sqlx::MySqlConnection::connect(server_url).await?;
                sqlx::query(AssertSqlSafe(drop.as_str()))
                    .execute(&mut admin)
                    .await?;
                sqlx::query(AssertSqlSafe(create.as_str()))
                    .execute(&mut admin)
                    .await?;
            }
        }
        url.set_path(BENCH_DATABASE);
        Ok(Self {
            backend,
            url: url.to_string(),
            _dir: None,
        })
    }

    async fn connect(&self) -> anyhow::Result<Conn> {
        Ok(match self.backend {
            Backend::Sqlite => Conn::Sqlite(sqlx::SqliteConnection::connect(&self.url).await?),
            Backend::Postgres => Conn::Postgres(sqlx::PgConnection::connect(&self.url).await?),
            Backend::Mysql => Conn::Mysql(sqlx::MySqlConnection::connect(&self.url).await?),
        })
    }

    /// Inserts `count` states that expired two days ago (past `cleanup`'s 1-day grace), keyed
    /// as amoauth keys them: creation time in hex, then 64 random hex digits.
    pub async fn insert_expired_states(&self, count: i64) -> anyhow::Result<()> {
        let expired = now() - chrono::Duration::days(2);
        let created = expired - chrono::Duration::minutes(15);
        let micros = created.and_utc().timestamp_micros();
        const COLUMNS: &str = "INSERT INTO amocrm_oauth_states \
             (state_hash, subdomain, created_at, expires_at, ip, user_agent)";
        const VALUES: &str = "'demo', ?, ?, '203.0.113.7', 'Mozilla/5.0 (X11; Linux x86_64) bench'";
        match self.connect().await? {
            Conn::Sqlite(mut conn) => {
                let sql = format!(
                    "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < ?) \
                     {COLUMNS} SELECT printf('%016x', ? + x) || lower(hex(randomblob(32))), {VALUES} FROM n"
                );
                let query = sqlx::query(AssertSqlSafe(sql)).bind(count).bind(micros);
                let query = query.bind(created).bind(expired);
                query.execute(&mut conn).await?;
            }
            Conn::Postgres(mut conn) => {
                let values = VALUES.replacen('?', "$2", 1).replacen('?', "$3", 1);
                let sql = format!(
                    "{COLUMNS} SELECT lpad(to_hex($4 + x), 16, '0') || md5(random()::text) || \
                     md5(random()::text), {values} FROM generate_series(1, $1) AS x"
                );
                let query = sqlx::query(AssertSqlSafe(sql))
                    .bind(count)
                    .bind(created)
                    .bind(expired);
                let query = query.bind(micros);
                query.execute(&mut conn).await?;
            }
            Conn::Mysql(mut conn) => {
                // Six digit tables crossed give a million rows; MySQL caps recursive CTEs
                // at 1000 levels by default.
                let digits = "(SELECT 0 d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL \
                     SELECT 3 UNION ALL SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL \
                     SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9)";
                let sql = format!(
                    "{COLUMNS} SELECT CONCAT(LOWER(LPAD(HEX(? + n), 16, '0')), SHA2(CONCAT(RAND(), n), 256)), \
                     {VALUES} FROM \
                     (SELECT a.d + 10 * b.d + 100 * c.d + 1000 * e.d + 10000 * f.d \
                      + 100000 * g.d AS n FROM {digits} a, {digits} b, {digits} c, \
                      {digits} e, {digits} f, {digits} g) numbers WHERE n < ?"
                );
                let query = sqlx::query(AssertSqlSafe(sql)).bind(micros).bind(created);
                let query = query.bind(expired).bind(count);
                query.execute(&mut conn).await?;
            }
        }
        Ok(())
    }

    /// States that expired before now and are still stored.
    pub async fn expired_states(&self) -> anyhow::Result<i64> {
        let sql = "SELECT COUNT(*) FROM amocrm_oauth_states WHERE expires_at < ?";
        Ok(match self.connect().await? {
            Conn::Sqlite(mut c) => {
                sqlx::query_scalar(sql)
                    .bind(now())
                    .fetch_one(&mut c)
                    .await?
            }
            Conn::Postgres(mut c) => {
                let sql = sql.replace('?', "$1");
                sqlx::query_scalar(AssertSqlSafe(sql))
                    .bind(now())
                    .fetch_one(&mut c)
                    .await?
            }
            Conn::Mysql(mut c) => {
                sqlx::query_scalar(sql)
                    .bind(now())
                    .fetch_one(&mut c)
                    .await?
            }
        })
    }

    /// Makes the access tokens of accounts `first..=last` expire in `within`: due for the
    /// refresh worker, which refreshes what expires within its margin (1 hour).
    pub async fn make_due(&self, first: i64, last: i64, within: Duration) -> anyhow::Result<u64> {
        let at = now() + chrono::Duration::from_std(within)?;
        let sql = "UPDATE amocrm_tokens SET expires_at = ? WHERE account_id BETWEEN ? AND ?";
        let pg = "UPDATE amocrm_tokens SET expires_at = $1 WHERE account_id BETWEEN $2 AND $3";
        Ok(match self.connect().await? {
            Conn::Sqlite(mut c) => {
                let done = sqlx::query(sql).bind(at).bind(first).bind(last);
                done.execute(&mut c).await?.rows_affected()
            }
            Conn::Postgres(mut c) => {
                let done = sqlx::query(pg).bind(at).bind(first).bind(last);
                done.execute(&mut c).await?.rows_affected()
            }
            Conn::Mysql(mut c) => {
                let done = sqlx::query(sql).bind(at).bind(first).bind(last);
                done.execute(&mut c).await?.rows_affected()
            }
        })
    }

    /// How many connections of accounts `first..=last` are at `version` (1 when connected;
    /// every refresh adds one).
    pub async fn connections_at_version(
        &self,
        first: i64,
        last: i64,
        version: i64,
    ) -> anyhow::Result<i64> {
        let sql =
            "SELECT COUNT(*) FROM amocrm_tokens WHERE account_id BETWEEN ? AND ? AND version = ?";
        let pg = "SELECT COUNT(*) FROM amocrm_tokens WHERE account_id BETWEEN $1 AND $2 AND version = $3";
        Ok(match self.connect().await? {
            Conn::Sqlite(mut c) => {
                let count = sqlx::query_scalar(sql).bind(first).bind(last).bind(version);
                count.fetch_one(&mut c).await?
            }
            Conn::Postgres(mut c) => {
                let count = sqlx::query_scalar(pg).bind(first).bind(last).bind(version);
                count.fetch_one(&mut c).await?
            }
            Conn::Mysql(mut c) => {
                let count = sqlx::query_scalar(sql).bind(first).bind(last).bind(version);
                count.fetch_one(&mut c).await?
            }
        })
    }
}
