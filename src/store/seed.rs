//! Reading an earlier integration's `amocrm_tokens` (the seed app's layout: `domain`,
//! `access_token`, `refresh_token` in plain text) for `amoauth import`. Read only: the old
//! app's database is not migrated, and not a byte of it changes.

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection as _, MySqlConnection, PgConnection, SqliteConnection};

use super::{Backend, Context as _, Store, StoreError};
use crate::config::DatabaseUrl;

/// One row of the old table.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SeedToken {
    pub domain: String,
    pub access_token: String,
    pub refresh_token: String,
}

const SELECT_SEED_TOKENS: &str = "SELECT COALESCE(domain, '') AS domain, \
     COALESCE(access_token, '') AS access_token, COALESCE(refresh_token, '') AS refresh_token \
     FROM amocrm_tokens ORDER BY id";

/// Reads the old rows on one connection, inside a transaction begun by `$begin`, which
/// the server enforces as read-only; the transaction is rolled back, the connection closed.
macro_rules! read_rows {
    ($connection:ty, $options:expr, $begin:literal, $connect_error:expr) => {{
        let mut connection = <$connection>::connect_with(&$options)
            .await
            .map_err($connect_error)?;
        let mut transaction = connection
            .begin_with($begin)
            .await
            .during("opening a read-only transaction on the old database")?;
        let rows = sqlx::query_as(SELECT_SEED_TOKENS)
            .fetch_all(&mut *transaction)
            .await
            .during("reading the old amocrm_tokens table");
        let _ = transaction.rollback().await;
        let _ = connection.close().await;
        rows
    }};
}

#[doc(hidden)]
impl Store {
    /// Every row of `amocrm_tokens` in the database at `url`, opened read-only.
    pub async fn read_seed_tokens(url: &DatabaseUrl) -> Result<Vec<SeedToken>, StoreError> {
        let connect_error = |cause| StoreError::Connect {
            url: url.to_string(),
            cause,
        };
        let raw = url.expose();
        match Backend::of(url) {
            Some(Backend::Sqlite) => {
                // `mode=ro`, no file created, and no journal-mode pragma: the file stays as it is.
                let options = SqliteConnectOptions::from_str(raw)
                    .map_err(connect_error)?
                    .read_only(true)
                    .create_if_missing(false);
                read_rows!(SqliteConnection, options, "BEGIN", connect_error)
            }
            Some(Backend::Postgres) => {
                let options = PgConnectOptions::from_str(raw).map_err(connect_error)?;
                read_rows!(PgConnection, options, "BEGIN READ ONLY", connect_error)
            }
            Some(Backend::MySql) => {
                let options = super::mysql_options(raw).map_err(connect_error)?;
                read_rows!(
                    MySqlConnection,
                    options,
                    "START TRANSACTION READ ONLY",
                    connect_error
                )
            }
            None => Err(connect_error(sqlx::Error::Configuration(
                "expected a sqlite://, postgres:// or mysql:// URL".into(),
            ))),
        }
    }
}
