//! The database: connection, migrations and one module per table.

mod attempts;
mod sessions;
mod states;
mod tokens;

use std::str::FromStr;
use std::time::Duration;

use chrono::NaiveDateTime;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

pub use attempts::{Attempt, AttemptKind, AttemptRecord, Outcome};
pub use states::{Consumption, NewState, StateRow};
pub use tokens::{ConnectionRow, NewConnection};

use crate::config::DatabaseUrl;

/// Times are stored as UTC without an offset, so SQL like
/// `expires_at > datetime('now')` (SQLite) or `> NOW()` (UTC servers) works as written.
pub type Timestamp = NaiveDateTime;

pub fn now() -> Timestamp {
    chrono::Utc::now().naive_utc()
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error while {operation}: {source}")]
    Database {
        operation: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot open the database {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot apply database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Unsupported(String),
}

pub(crate) trait Context<T> {
    fn during(self, operation: &'static str) -> Result<T, StoreError>;
}

impl<T> Context<T> for Result<T, sqlx::Error> {
    fn during(self, operation: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Database { operation, source })
    }
}

/// A handle to amoauth's tables. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens the database (creating a SQLite file when missing). Does not migrate.
    pub async fn connect(url: &DatabaseUrl) -> Result<Self, StoreError> {
        let raw = url.expose();
        if !raw.starts_with("sqlite:") {
            return Err(StoreError::Unsupported(format!(
                "DATABASE_URL: {url} is not supported by this build yet; use a sqlite:// URL"
            )));
        }
        let connect_error = |source| StoreError::Connect {
            url: url.to_string(),
            source,
        };
        let options = SqliteConnectOptions::from_str(raw)
            .map_err(connect_error)?
            .create_if_missing(true)
            // WAL lets readers proceed while one writer commits; NORMAL is durable in WAL mode
            // except for the last transactions before a power loss.
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(connect_error)?;
        Ok(Self { pool })
    }

    /// Applies every pending migration.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        SQLITE_MIGRATIONS.run(&self.pool).await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .during("checking the connection")?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
