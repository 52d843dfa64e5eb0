//! The database: SQLite, PostgreSQL or MySQL/MariaDB behind one API, with migrations per
//! backend and one module per table. Every query is written once with `?` placeholders;
//! the few statements whose SQL really differs have one constant per dialect.

mod api_keys;
mod attempts;
mod events;
mod inline;
mod pace;
mod retention;
mod seed;
mod sessions;
mod states;
mod tokens;

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDateTime;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, MySqlPool, PgPool, SqlitePool};

pub use attempts::{Attempt, AttemptKind, AttemptRecord, Outcome, Records};
pub use events::{EventRow, EventStatus, NewEvent};
pub use pace::Reservation;
pub use seed::SeedToken;
pub use states::{Consumption, NewState, StateRow};
pub use tokens::{
    ConnectionRow, ConnectionStatus, Disconnect, NewConnection, RefreshedPair, Saved,
};

use crate::config::DatabaseUrl;
use inline::InlineSqlite;

/// Times are stored as UTC without an offset, so operator SQL such as
/// `expires_at > NOW()` works as written on a UTC server.
pub type Timestamp = NaiveDateTime;

/// The current time, as stored.
pub fn now() -> Timestamp {
    chrono::Utc::now().naive_utc()
}

/// `at` plus `by`, or `None` when the sum is past the last time a timestamp can hold (a
/// duration from amoCRM or the configuration never panics the process).
pub fn checked_later(at: Timestamp, by: std::time::Duration) -> Option<Timestamp> {
    at.checked_add_signed(chrono::Duration::from_std(by).ok()?)
}

/// `at` plus `by`, at most the last representable time: for durations from the configuration,
/// which is bounded, so this never saturates in practice.
pub fn saturating_later(at: Timestamp, by: std::time::Duration) -> Timestamp {
    checked_later(at, by).unwrap_or(Timestamp::MAX)
}

/// `at` minus `by`, or `None` before the first time a timestamp can hold.
pub fn checked_earlier(at: Timestamp, by: std::time::Duration) -> Option<Timestamp> {
    at.checked_sub_signed(chrono::Duration::from_std(by).ok()?)
}

/// A stored time as RFC 3339 in UTC (`2026-11-27T09:00:00Z`), as the API and events show it.
pub fn rfc3339(at: Timestamp) -> String {
    at.and_utc()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
static MYSQL_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/mysql");

/// The tables amoauth's migrations create.
const OWN_TABLES: [&str; 8] = [
    "amocrm_oauth_states",
    "amocrm_tokens",
    "amocrm_oauth_attempts",
    "amoauth_sessions",
    "amoauth_login_links",
    "amoauth_api_keys",
    "amoauth_events",
    "amoauth_gateway_pace",
];

/// How long a request waits for a pooled connection before it is told the database is down.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Database failures. Each message already includes its cause, so none is chained as a
/// `source` (which would print it twice in a one-line error).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error while {operation}: {cause}")]
    Database {
        operation: &'static str,
        cause: sqlx::Error,
    },
    #[error("database error while {operation}: {cause}")]
    Sqlite {
        operation: &'static str,
        cause: rusqlite::Error,
    },
    #[error("DATABASE_URL: cannot open {url}: {cause}")]
    Connect { url: String, cause: sqlx::Error },
    #[error("cannot apply database migrations: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    #[error("{0}")]
    Duplicate(String),
    #[error(
        "DATABASE_URL: this database already has {0}, which amoauth did not create (the tables of \
         an earlier amoCRM integration?); amoauth changes nothing in it. Give amoauth its own \
         database or schema, then take the old connections over with `amoauth import --from <this \
         database's URL>`"
    )]
    ForeignTables(String),
}

pub(crate) trait Context<T> {
    fn during(self, operation: &'static str) -> Result<T, StoreError>;
}

impl<T> Context<T> for Result<T, sqlx::Error> {
    fn during(self, operation: &'static str) -> Result<T, StoreError> {
        self.map_err(|cause| StoreError::Database { operation, cause })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    MySql,
}

impl Backend {
    pub fn of(url: &DatabaseUrl) -> Option<Self> {
        match url.expose().split(':').next()? {
            "sqlite" => Some(Self::Sqlite),
            "postgres" | "postgresql" => Some(Self::Postgres),
            // MariaDB speaks MySQL's protocol; the driver knows only the `mysql` scheme.
            "mysql" | "mariadb" => Some(Self::MySql),
            _ => None,
        }
    }
}

/// A connection pool of any backend.
#[derive(Clone, Debug)]
pub enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
    MySql(MySqlPool),
}

impl Pool {
    /// A URL of the pool's backend that is never opened: it stands for a pool an embedding
    /// app handed over wherever the configuration checks a URL.
    pub(crate) fn placeholder_url(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite::memory:",
            Self::Postgres(_) => "postgres://the-host-apps-pool",
            Self::MySql(_) => "mysql://the-host-apps-pool",
        }
    }
}

impl From<SqlitePool> for Pool {
    fn from(pool: SqlitePool) -> Self {
        Self::Sqlite(pool)
    }
}

impl From<PgPool> for Pool {
    fn from(pool: PgPool) -> Self {
        Self::Postgres(pool)
    }
}

impl From<MySqlPool> for Pool {
    fn from(pool: MySqlPool) -> Self {
        Self::MySql(pool)
    }
}

/// Runs the same code against whichever pool the store holds; the body is compiled once
/// per backend, so every query is type-checked against each driver.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.pool {
            $crate::store::Pool::Sqlite($pool) => $body,
            $crate::store::Pool::Postgres($pool) => $body,
            $crate::store::Pool::MySql($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// Reads a `named_values!` enum straight from a text column on every backend: a value this
/// build does not know fails the read with an error naming it.
macro_rules! decoded_from_text {
    ($($name:ty),+) => {$(
        impl<DB: sqlx::Database> sqlx::Type<DB> for $name
        where
            String: sqlx::Type<DB>,
        {
            fn type_info() -> DB::TypeInfo {
                <String as sqlx::Type<DB>>::type_info()
            }

            fn compatible(ty: &DB::TypeInfo) -> bool {
                <String as sqlx::Type<DB>>::compatible(ty)
            }
        }

        impl<'r, DB: sqlx::Database> sqlx::Decode<'r, DB> for $name
        where
            String: sqlx::Decode<'r, DB>,
        {
            fn decode(value: DB::ValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                Ok(Self::try_from(<String as sqlx::Decode<'r, DB>>::decode(value)?)?)
            }
        }
    )+};
}
decoded_from_text!(
    AttemptKind,
    Outcome,
    ConnectionStatus,
    EventStatus,
    crate::amocrm::Platform
);

/// A transaction that will write. SQLite takes its write lock up front (`BEGIN IMMEDIATE`),
/// so concurrent writers queue instead of failing to upgrade a read lock. MySQL's runs at READ
/// COMMITTED, PostgreSQL's default: at InnoDB's default (REPEATABLE READ) an update that finds
/// no row locks the gap where it would be, and two first connections of neighbouring accounts
/// then deadlock on each other's insert.
pub(crate) trait BeginWrite {
    type Db: sqlx::Database;
    fn begin_write(
        &self,
    ) -> impl Future<Output = Result<sqlx::Transaction<'static, Self::Db>, sqlx::Error>> + Send;
}

impl BeginWrite for SqlitePool {
    type Db = sqlx::Sqlite;
    fn begin_write(
        &self,
    ) -> impl Future<Output = Result<sqlx::Transaction<'static, Self::Db>, sqlx::Error>> + Send
    {
        self.begin_with("BEGIN IMMEDIATE")
    }
}

impl BeginWrite for PgPool {
    type Db = sqlx::Postgres;
    fn begin_write(
        &self,
    ) -> impl Future<Output = Result<sqlx::Transaction<'static, Self::Db>, sqlx::Error>> + Send
    {
        self.begin()
    }
}

impl BeginWrite for MySqlPool {
    type Db = sqlx::MySql;
    fn begin_write(
        &self,
    ) -> impl Future<Output = Result<sqlx::Transaction<'static, Self::Db>, sqlx::Error>> + Send
    {
        // Sets the level of the next transaction only; one round trip with the BEGIN.
        self.begin_with("SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION")
    }
}

/// A handle to amoauth's tables. Cheap to clone.
#[derive(Clone, Debug)]
#[doc(hidden)]
pub struct Store {
    pool: Pool,
    /// SQLite's hot path (inline.rs): set exactly when `pool` is SQLite's.
    inline: Option<Arc<InlineSqlite>>,
}

/// Where a hot operation runs: inline on SQLite, one round trip on the servers.
enum Hot<'a> {
    Sqlite(&'a InlineSqlite),
    Postgres(&'a PgPool),
    MySql(&'a MySqlPool),
}

/// Runs a hot operation: `$inline` on SQLite's inline connections, else `$server`, compiled
/// once per server driver (as `on_pool!`), so each query's sqlx code is written once.
macro_rules! on_hot_path {
    ($store:expr, $db:ident => $inline:expr, $pool:ident => $server:expr) => {
        match $store.hot() {
            $crate::store::Hot::Sqlite($db) => $inline,
            $crate::store::Hot::Postgres($pool) => $server,
            $crate::store::Hot::MySql($pool) => $server,
        }
    };
}
pub(crate) use on_hot_path;

#[doc(hidden)]
impl Store {
    /// Opens the database (creating a SQLite file when missing). Does not migrate.
    pub async fn connect(url: &DatabaseUrl) -> Result<Self, StoreError> {
        let connect_error = |cause| StoreError::Connect {
            url: url.to_string(),
            cause,
        };
        let raw = url.expose();
        let pool = match Backend::of(url) {
            Some(Backend::Sqlite) => {
                let options = SqliteConnectOptions::from_str(raw)
                    .map_err(connect_error)?
                    .create_if_missing(true)
                    // WAL lets readers proceed while one writer commits; NORMAL is durable in
                    // WAL mode except for the last transactions before a power loss.
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(10));
                check_connection::<sqlx::SqliteConnection>(&options)
                    .await
                    .map_err(connect_error)?;
                // One writer at a time anyway; a few connections serve concurrent readers.
                let pool = SqlitePoolOptions::new()
                    .max_connections(8)
                    // A ping per checkout doubled the round trips to SQLite's worker threads
                    // (BENCHMARKS.md); a broken connection still fails its query and is dropped.
                    .test_before_acquire(false)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_lazy_with(options);
                Pool::Sqlite(pool)
            }
            Some(Backend::Postgres) => {
                let options = PgConnectOptions::from_str(raw).map_err(connect_error)?;
                check_connection::<sqlx::PgConnection>(&options)
                    .await
                    .map_err(connect_error)?;
                // Several replicas share the server's max_connections (100 by default).
                let pool = PgPoolOptions::new()
                    .max_connections(16)
                    .test_before_acquire(false)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_lazy_with(options);
                Pool::Postgres(pool)
            }
            Some(Backend::MySql) => {
                let options = mysql_options(raw).map_err(connect_error)?;
                check_connection::<sqlx::MySqlConnection>(&options)
                    .await
                    .map_err(connect_error)?;
                let pool = MySqlPoolOptions::new()
                    .max_connections(16)
                    .test_before_acquire(false)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_lazy_with(options);
                Pool::MySql(pool)
            }
            None => {
                return Err(connect_error(sqlx::Error::Configuration(
                    "expected a sqlite://, postgres://, mysql:// or mariadb:// URL".into(),
                )));
            }
        };
        Ok(Self::from_pool(pool))
    }

    /// A store on a pool the caller opened (an embedding app's own). On SQLite the hot path
    /// opens its own connections to the pool's database file (or shared in-memory database).
    pub fn from_pool(pool: impl Into<Pool>) -> Self {
        let pool = pool.into();
        let inline = match &pool {
            Pool::Sqlite(pool) => Some(Arc::new(InlineSqlite::of(&pool.connect_options()))),
            Pool::Postgres(_) | Pool::MySql(_) => None,
        };
        Self { pool, inline }
    }

    fn hot(&self) -> Hot<'_> {
        match (&self.pool, &self.inline) {
            (Pool::Sqlite(_), Some(inline)) => Hot::Sqlite(inline),
            (Pool::Postgres(pool), _) => Hot::Postgres(pool),
            (Pool::MySql(pool), _) => Hot::MySql(pool),
            (Pool::Sqlite(_), None) => {
                unreachable!("from_pool sets the inline path with a SQLite pool")
            }
        }
    }

    /// Applies every pending migration (under the driver's lock on server databases, so
    /// replicas starting together migrate once).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.refuse_foreign_tables().await?;
        match &self.pool {
            Pool::Sqlite(pool) => SQLITE_MIGRATIONS.run(pool).await,
            Pool::Postgres(pool) => POSTGRES_MIGRATIONS.run(pool).await,
            Pool::MySql(pool) => MYSQL_MIGRATIONS.run(pool).await,
        }
        .map_err(StoreError::Migrate)
    }

    /// Stops before touching a database that already holds tables with amoauth's names that
    /// amoauth did not create (the seed app's `amocrm_tokens`, say): they are never altered.
    async fn refuse_foreign_tables(&self) -> Result<(), StoreError> {
        let sql = self.dialect(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name",
            "SELECT CAST(table_name AS TEXT) FROM information_schema.tables \
             WHERE table_schema = current_schema() ORDER BY 1",
            "SELECT CAST(table_name AS CHAR) FROM information_schema.tables \
             WHERE table_schema = DATABASE() ORDER BY 1",
        );
        let tables: Vec<String> =
            on_pool!(self, pool => sqlx::query_scalar(sql).fetch_all(pool).await)
                .during("listing the database's tables")?;
        if tables.iter().any(|t| t == "_sqlx_migrations") {
            return Ok(());
        }
        let foreign: Vec<&str> = tables
            .iter()
            .map(String::as_str)
            .filter(|t| OWN_TABLES.contains(t))
            .collect();
        if foreign.is_empty() {
            return Ok(());
        }
        Err(StoreError::ForeignTables(foreign.join(", ")))
    }

    /// True when every migration this build knows has been applied.
    pub async fn migrations_current(&self) -> Result<bool, StoreError> {
        let migrator = match self.pool {
            Pool::Sqlite(_) => &SQLITE_MIGRATIONS,
            Pool::Postgres(_) => &POSTGRES_MIGRATIONS,
            Pool::MySql(_) => &MYSQL_MIGRATIONS,
        };
        let expected = migrator.iter().map(|m| m.version).max().unwrap_or_default();
        let sql = self.sql("SELECT MAX(version) FROM _sqlx_migrations");
        let applied: Option<i64> =
            on_pool!(self, pool => sqlx::query_scalar(sql).fetch_one(pool).await)
                .during("checking the applied migrations")?;
        Ok(applied.unwrap_or_default() >= expected)
    }

    pub async fn close(&self) {
        on_pool!(self, pool => pool.close().await)
    }

    /// The SQL in this backend's placeholder style: PostgreSQL numbers them (`$1`).
    fn sql(&self, text: &'static str) -> AssertSqlSafe<Cow<'static, str>> {
        match self.pool {
            Pool::Postgres(_) => AssertSqlSafe(Cow::Owned(numbered_placeholders(text))),
            _ => AssertSqlSafe(Cow::Borrowed(text)),
        }
    }

    /// Picks the statement written for this server's dialect (SQLite's hot path runs its own).
    fn server_dialect(
        &self,
        postgres: &'static str,
        mysql: &'static str,
    ) -> AssertSqlSafe<Cow<'static, str>> {
        match self.pool {
            Pool::Postgres(_) => AssertSqlSafe(Cow::Owned(numbered_placeholders(postgres))),
            _ => AssertSqlSafe(Cow::Borrowed(mysql)),
        }
    }

    /// Picks the statement written for this backend's dialect.
    fn dialect(
        &self,
        sqlite: &'static str,
        postgres: &'static str,
        mysql: &'static str,
    ) -> AssertSqlSafe<Cow<'static, str>> {
        match self.pool {
            Pool::Sqlite(_) => AssertSqlSafe(Cow::Borrowed(sqlite)),
            Pool::Postgres(_) => AssertSqlSafe(Cow::Owned(numbered_placeholders(postgres))),
            Pool::MySql(_) => AssertSqlSafe(Cow::Borrowed(mysql)),
        }
    }
}

/// The options of a `mysql://` or `mariadb://` URL: MariaDB speaks MySQL's protocol, but the
/// driver parses only the `mysql` scheme.
pub(crate) fn mysql_options(url: &str) -> Result<MySqlConnectOptions, sqlx::Error> {
    match url.strip_prefix("mariadb:") {
        Some(rest) => MySqlConnectOptions::from_str(&format!("mysql:{rest}")),
        None => MySqlConnectOptions::from_str(url),
    }
}

/// Opens and closes one connection, so a start against a wrong or unreachable database fails
/// at once with the driver's reason (a pool would retry until its timeout and say only that).
async fn check_connection<C: sqlx::Connection>(options: &C::Options) -> Result<(), sqlx::Error> {
    C::connect_with(options).await?.close().await
}

/// `?` → `$1`, `$2`, …; our SQL has no `?` inside string literals.
fn numbered_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_for_postgres() {
        assert_eq!(
            numbered_placeholders("SELECT a FROM t WHERE b = ? AND c > ? LIMIT ?"),
            "SELECT a FROM t WHERE b = $1 AND c > $2 LIMIT $3"
        );
    }

    #[test]
    fn backend_follows_the_url_scheme() {
        let backend = |url: &str| Backend::of(&DatabaseUrl::new(url));
        assert_eq!(backend("sqlite://a.db"), Some(Backend::Sqlite));
        assert_eq!(backend("postgresql://u@h/db"), Some(Backend::Postgres));
        assert_eq!(backend("mysql://root@h/db"), Some(Backend::MySql));
        assert_eq!(backend("mariadb://root@h/db"), Some(Backend::MySql));
        assert_eq!(backend("redis://h"), None);
    }
}
