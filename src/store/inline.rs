//! SQLite's hot path: the statements of an install, a callback's state consumption, an admin
//! session check and a token call run inline on rusqlite connections to amoauth's database,
//! instead of through sqlx's worker thread per connection (two thread wake-ups per statement,
//! BENCHMARKS.md). The SQL is the same constant the other backends run.
//!
//! One writer connection behind a mutex (SQLite has one writer anyway) and a few readers, which
//! WAL lets read while the writer commits. The critical sections are synchronous: nothing is
//! awaited while a connection is held, and nothing waits for a lock inside them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};
use sqlx::sqlite::SqliteConnectOptions;

use super::{StoreError, Timestamp};

/// How sqlx names its in-memory databases (sqlx-sqlite's options/parse.rs).
const SQLX_IN_MEMORY: &str = "file:sqlx-in-memory-";
/// Reader connections: one per core of a small server, and a spare.
const READERS: usize = 3;
/// Statements kept prepared per connection: every hot statement, with room to spare.
const PREPARED: usize = 32;
/// As long as sqlx's connections wait for the write lock (store/mod.rs).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause before trying a busy database again: about one short write transaction.
const BUSY_RETRY: Duration = Duration::from_micros(500);

/// The inline connections to one SQLite database, opened at first use.
pub(super) struct InlineSqlite {
    /// What `sqlite3_open_v2` opens: a path, or the `file:` URI of a shared in-memory database.
    target: PathBuf,
    /// Read-only, read-write or also create, as the pool opens it.
    flags: OpenFlags,
    connections: OnceLock<Connections>,
}

struct Connections {
    writer: Mutex<Connection>,
    readers: [Mutex<Connection>; READERS],
    next_reader: AtomicUsize,
}

impl std::fmt::Debug for InlineSqlite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InlineSqlite")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl InlineSqlite {
    /// The database the sqlx options open. sqlx names a `sqlite::memory:` database
    /// `file:sqlx-in-memory-N` and opens it shared in memory; the same URI reaches the same
    /// database here, in this process, while one of sqlx's connections keeps it alive.
    pub(super) fn of(options: &SqliteConnectOptions) -> Self {
        let filename = options.get_filename();
        let name = filename.to_string_lossy();
        if name.starts_with(SQLX_IN_MEMORY) {
            return Self {
                target: PathBuf::from(format!("{name}?mode=memory&cache=shared")),
                flags: OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_URI,
                connections: OnceLock::new(),
            };
        }
        // Opened as the pool opens it. sqlx has no getters for these; its derived Debug
        // names them (its URL form would panic on a file name with a colon).
        let described = format!("{options:?}");
        let flags = if described.contains("read_only: true") {
            OpenFlags::SQLITE_OPEN_READ_ONLY
        } else if described.contains("create_if_missing: true") {
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE
        };
        Self {
            target: filename.to_path_buf(),
            flags,
            connections: OnceLock::new(),
        }
    }

    fn connections(&self, operation: &'static str) -> Result<&Connections, StoreError> {
        if let Some(connections) = self.connections.get() {
            return Ok(connections);
        }
        let open = || self.open().during(operation);
        let opened = Connections {
            writer: Mutex::new(open()?),
            readers: [
                Mutex::new(open()?),
                Mutex::new(open()?),
                Mutex::new(open()?),
            ],
            next_reader: AtomicUsize::new(0),
        };
        // Two first calls at once both open; one set is kept and the other closed.
        Ok(self.connections.get_or_init(|| opened))
    }

    fn open(&self) -> rusqlite::Result<Connection> {
        let flags = self.flags | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let connection = Connection::open_with_flags(&self.target, flags)?;
        // Busy is retried asynchronously (`retrying_while_busy`), never waited for here.
        connection.busy_timeout(Duration::ZERO)?;
        // Per connection, as sqlx's: durable in WAL mode except for the last transactions
        // before a power loss.
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        connection.set_prepared_statement_cache_capacity(PREPARED);
        Ok(connection)
    }

    /// Runs `work` in a write transaction (`BEGIN IMMEDIATE`: the write lock up front) and
    /// commits it when `work` succeeds.
    pub(super) async fn write<T>(
        &self,
        operation: &'static str,
        work: impl Fn(&Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let connections = self.connections(operation)?;
        self.retrying_while_busy(operation, || {
            let mut writer = locked(&connections.writer);
            let tx = writer.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let done = work(&tx)?;
            tx.commit()?;
            Ok(done)
        })
        .await
    }

    /// Runs `work` on a reader connection: a free one, else the next in turn.
    pub(super) async fn read<T>(
        &self,
        operation: &'static str,
        work: impl Fn(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let connections = self.connections(operation)?;
        self.retrying_while_busy(operation, || {
            let free = connections
                .readers
                .iter()
                .find_map(|reader| reader.try_lock().ok());
            let reader = match free {
                Some(reader) => reader,
                None => {
                    let turn = connections.next_reader.fetch_add(1, Ordering::Relaxed);
                    locked(&connections.readers[turn % READERS])
                }
            };
            work(&reader)
        })
        .await
    }

    /// Runs `attempt` until the database is not busy. SQLite's own busy wait would sleep on
    /// this runtime thread, and the lock's holder may be an async sqlx transaction (a cold
    /// path) that needs this very thread to commit: so the connections wait for nothing
    /// (`busy_timeout` 0) and the retry sleeps asynchronously, up to `BUSY_TIMEOUT`.
    async fn retrying_while_busy<T>(
        &self,
        operation: &'static str,
        attempt: impl Fn() -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let deadline = tokio::time::Instant::now() + BUSY_TIMEOUT;
        loop {
            match attempt() {
                Err(err) if is_busy(&err) && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(BUSY_RETRY).await;
                }
                done => return done.during(operation),
            }
        }
    }
}

/// The write lock is held elsewhere (`SQLITE_BUSY`), or a table of a shared in-memory
/// database is (`SQLITE_LOCKED`).
fn is_busy(err: &rusqlite::Error) -> bool {
    matches!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// A connection whose holder panicked is still usable: its open transaction was rolled back
/// when the holder's `Transaction` was dropped.
fn locked(connection: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    connection.lock().unwrap_or_else(PoisonError::into_inner)
}

trait During<T> {
    fn during(self, operation: &'static str) -> Result<T, StoreError>;
}

impl<T> During<T> for rusqlite::Result<T> {
    fn during(self, operation: &'static str) -> Result<T, StoreError> {
        self.map_err(|cause| StoreError::Sqlite { operation, cause })
    }
}

/// Reads a `named_values!` enum from a text column, as `decoded_from_text!` does for sqlx: a
/// value this build does not know fails the read with an error naming it.
pub(super) fn named_value<T>(row: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<T>
where
    T: TryFrom<String>,
    T::Error: std::error::Error + Send + Sync + 'static,
{
    T::try_from(row.get::<_, String>(column)?).map_err(|unknown| {
        rusqlite::Error::FromSqlConversionFailure(
            column,
            rusqlite::types::Type::Text,
            Box::new(unknown),
        )
    })
}

/// A timestamp column read as sqlx and rusqlite write it (`YYYY-MM-DD HH:MM:SS[.fraction]`) by
/// a fixed-layout reader: chrono's, which walks a format string per value, was half of a
/// token call's row decoding. Any other spelling still goes to chrono's reader.
struct SqlTime(Timestamp);

impl rusqlite::types::FromSql for SqlTime {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        if let rusqlite::types::ValueRef::Text(text) = value
            && let Some(at) = fixed_layout_timestamp(text)
        {
            return Ok(Self(at));
        }
        Timestamp::column_result(value).map(Self)
    }
}

/// A timestamp column (`SqlTime`).
pub(super) fn timestamp(row: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<Timestamp> {
    row.get::<_, SqlTime>(column).map(|at| at.0)
}

/// A timestamp column that may be NULL (`SqlTime`).
pub(super) fn optional_timestamp(
    row: &rusqlite::Row<'_>,
    column: usize,
) -> rusqlite::Result<Option<Timestamp>> {
    row.get::<_, Option<SqlTime>>(column)
        .map(|at| at.map(|at| at.0))
}

/// `YYYY-MM-DD HH:MM:SS` (or `T` between date and time), then optionally `.` and 1 to 9
/// digits; None for anything else.
fn fixed_layout_timestamp(text: &[u8]) -> Option<Timestamp> {
    let number = |digits: &[u8]| {
        digits.iter().try_fold(0u32, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    let (head, fraction) = text.split_at_checked(19)?;
    if head[4] != b'-'
        || head[7] != b'-'
        || !matches!(head[10], b' ' | b'T')
        || head[13] != b':'
        || head[16] != b':'
    {
        return None;
    }
    let nanos = match fraction {
        [] => 0,
        [b'.', digits @ ..] if (1..=9).contains(&digits.len()) => {
            number(digits)? * 10u32.pow(9 - digits.len() as u32)
        }
        _ => return None,
    };
    let year = i32::try_from(number(&head[..4])?).ok()?;
    chrono::NaiveDate::from_ymd_opt(year, number(&head[5..7])?, number(&head[8..10])?)?
        .and_hms_nano_opt(
            number(&head[11..13])?,
            number(&head[14..16])?,
            number(&head[17..19])?,
            nanos,
        )
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    #[test]
    fn timestamps_read_by_the_fixed_layout_equal_chronos_reading() {
        let connection = Connection::open_in_memory().unwrap();
        let written = [
            "2026-12-01 04:00:00",
            "2026-12-01 04:00:00.5",
            "2026-12-01 04:00:00.123456",
            "2026-12-01T23:59:59.999999999",
            "1999-02-28 00:00:01.000001",
        ];
        for text in written {
            let fixed = fixed_layout_timestamp(text.as_bytes()).unwrap();
            let chrono: Timestamp = connection
                .query_row("SELECT ?", [text], |row| row.get(0))
                .unwrap();
            assert_eq!(fixed, chrono, "{text}");
        }
        // What rusqlite binds comes back as it was, to the nanosecond.
        let at = crate::store::now();
        let read: SqlTime = connection
            .query_row("SELECT ?", [at], |row| row.get(0))
            .unwrap();
        assert_eq!(read.0, at);
        // Other spellings are not guessed at: chrono's reader gets them, or refuses them.
        for other in [
            "2026-12-01 04:00",
            "2026-13-01 04:00:00",
            "2026-12-01 04:00:00.",
            "2026-12-01 04:00:00+03:00",
            "2026-12-01 4:00:00",
            "2026-12-01 04:00:00.1234567890",
            "２026-12-01 04:00:00",
        ] {
            assert_eq!(fixed_layout_timestamp(other.as_bytes()), None, "{other}");
        }
        let short_hour: SqlTime = connection
            .query_row("SELECT '2026-12-01 4:00:00'", [], |row| row.get(0))
            .unwrap();
        assert_eq!(short_hour.0.to_string(), "2026-12-01 04:00:00");
        assert!(
            connection
                .query_row("SELECT 'not a time'", [], |row| row.get::<_, SqlTime>(0))
                .is_err()
        );
    }

    fn opened(url: &str) -> InlineSqlite {
        InlineSqlite::of(&SqliteConnectOptions::from_str(url).unwrap())
    }

    /// Guards the reading of sqlx's options through their Debug form across sqlx upgrades.
    #[test]
    fn the_inline_connections_open_the_database_as_the_pool_does() {
        assert_eq!(
            opened("sqlite://a.db?mode=ro").flags,
            OpenFlags::SQLITE_OPEN_READ_ONLY
        );
        assert_eq!(
            opened("sqlite://a.db").flags,
            OpenFlags::SQLITE_OPEN_READ_WRITE
        );
        assert_eq!(
            opened("sqlite://a.db?mode=rwc").flags,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
        );
        let memory = opened("sqlite::memory:");
        let target = memory.target.to_string_lossy();
        assert!(target.starts_with(SQLX_IN_MEMORY), "{target}");
        assert!(target.ends_with("?mode=memory&cache=shared"), "{target}");
        assert!(memory.flags.contains(OpenFlags::SQLITE_OPEN_URI));
    }
}
