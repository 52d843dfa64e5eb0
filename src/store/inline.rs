//! SQLite's hot path: the statements of an install, a callback's state consumption, an admin
//! session check and a token call run inline on rusqlite connections to amoauth's database,
//! instead of through sqlx's worker thread per connection (two thread wake-ups per statement,
//! BENCHMARKS.md). The SQL is the same constant the other backends run.
//!
//! One writer connection (SQLite has one writer anyway) and a few readers, which WAL lets read
//! while the writer commits. Writes that arrive while the writer is busy wait in a queue and
//! commit together in its next transaction (`write`: group commit). A token call's row is
//! kept between calls until anything commits to the database, from this process or another
//! (`read_cached`). The critical sections are synchronous: nothing is awaited while a
//! connection is held, and nothing waits for a lock inside them.

use std::any::Any;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use rusqlite::types::{ToSql, ToSqlOutput, Value};
use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};
use sqlx::sqlite::SqliteConnectOptions;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Context, StoreError, Timestamp};

/// How sqlx names its in-memory databases (sqlx-sqlite's options/parse.rs).
const SQLX_IN_MEMORY: &str = "file:sqlx-in-memory-";
/// Reader connections: one per core of a small server, and a spare.
const READERS: usize = 3;
/// Statements kept prepared per connection: every hot statement, with room to spare.
const PREPARED: usize = 32;
/// Results `read_cached` keeps: a token call's row for each of 4,096 accounts (a few MiB);
/// past this many, it forgets them all and starts over.
const MAX_CACHED: usize = 4096;
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
    connections: OnceLock<Arc<Connections>>,
}

/// Each lock on cache lines of its own (`Apart`): the runtime's threads take them at once.
struct Connections {
    writer: Apart<Mutex<Connection>>,
    /// Writes waiting for the writer (`InlineSqlite::write`).
    queue: Apart<Mutex<WriteQueue>>,
    readers: [Apart<Mutex<Reader>>; READERS],
    next_reader: Apart<AtomicUsize>,
    cached: Apart<Mutex<Cached>>,
}

/// `T` alone on its cache lines (two, as CPUs fetch lines in pairs), so a thread that takes
/// one lock does not stall another that takes its neighbour.
#[repr(align(128))]
struct Apart<T>(T);

impl<T> std::ops::Deref for Apart<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// A reader connection, and the data version it saw last (`read_cached`).
struct Reader {
    connection: Connection,
    seen_version: Option<i64>,
}

impl Reader {
    fn new(connection: Connection) -> Self {
        Self {
            connection,
            seen_version: None,
        }
    }

    /// Whether anything committed to the database since this reader last asked (always, the
    /// first time). SQLite's `data_version` changes with every commit by another
    /// connection, in this process or another; a reader never writes, so on a reader it
    /// changes with every commit there is.
    fn saw_a_commit(&mut self) -> rusqlite::Result<bool> {
        let version = self
            .connection
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |row| row.get(0))?;
        Ok(self.seen_version.replace(version) != Some(version))
    }
}

/// `read_cached`'s results, all read since the last commit any reader has seen.
#[derive(Default)]
struct Cached {
    /// Advances, and the results are forgotten, whenever a reader sees a commit.
    epoch: u64,
    results: HashMap<String, Arc<dyn Any + Send + Sync>>,
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

    fn connections(&self, operation: &'static str) -> Result<&Arc<Connections>, StoreError> {
        if let Some(connections) = self.connections.get() {
            return Ok(connections);
        }
        let open = || self.open().during(operation);
        let opened = Arc::new(Connections {
            writer: Apart(Mutex::new(open()?)),
            queue: Apart(Mutex::default()),
            readers: [
                Apart(Mutex::new(Reader::new(open()?))),
                Apart(Mutex::new(Reader::new(open()?))),
                Apart(Mutex::new(Reader::new(open()?))),
            ],
            next_reader: Apart(AtomicUsize::new(0)),
            cached: Apart(Mutex::default()),
        });
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
    /// hands back its result once that transaction has committed.
    ///
    /// Group commit: writes that arrive while another is running wait in a queue, and the
    /// next transaction runs all of them, each in a savepoint of its own, so one COMMIT (and
    /// one WAL write of each page they share) serves the whole batch. A write that finds the
    /// queue idle runs at once on this thread. `work` owns its data: its caller may be gone
    /// (a cancelled request) by the time the batch runs, and then it commits or fails whole.
    pub(super) async fn write<T: Send + 'static>(
        &self,
        operation: &'static str,
        work: impl FnMut(&Transaction<'_>) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let connections = self.connections(operation)?;
        let (reply, outcome) = oneshot::channel();
        let queued = Box::new(QueuedWrite {
            work,
            outcome: None,
            reply,
            deadline: Instant::now() + BUSY_TIMEOUT,
        });
        let runs_here = {
            let mut queue = locked(&connections.queue);
            queue.writes.push(queued);
            !std::mem::replace(&mut queue.draining, true)
        };
        if runs_here && connections.run_batch() != Batch::Emptied {
            tokio::spawn(Arc::clone(connections).drain());
        }
        outcome
            .await
            .unwrap_or_else(|_| Err(abandoned("the writer stopped before this write ran")))
            .during(operation)
    }

    /// Runs `work` on a reader connection: a free one, else the next in turn.
    pub(super) async fn read<T>(
        &self,
        operation: &'static str,
        work: impl Fn(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let connections = self.connections(operation)?;
        self.retrying_while_busy(operation, || work(&connections.reader().connection))
            .await
    }

    /// As `read`, but the result is kept under `key` and given again, without running
    /// `work`, until anything commits to the database. Always what `work` would read now:
    ///
    /// - every call first asks its reader whether a commit happened since that reader last
    ///   asked, and if so forgets every result (SQLite's data version, seen by each reader);
    /// - so a commit after a result was read is seen by the next call on any reader, whose
    ///   previous question came before that commit;
    /// - a result is kept only if nothing was forgotten between its question and its
    ///   keeping, since its read may predate that commit.
    pub(super) async fn read_cached<T: Clone + Send + Sync + 'static>(
        &self,
        operation: &'static str,
        key: &str,
        work: impl Fn(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let connections = self.connections(operation)?;
        self.retrying_while_busy(operation, || connections.read_cached(key, &work))
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

impl Connections {
    /// `InlineSqlite::read_cached`'s one try.
    fn read_cached<T: Clone + Send + Sync + 'static>(
        &self,
        key: &str,
        work: impl Fn(&Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let mut reader = self.reader();
        let saw_a_commit = reader.saw_a_commit()?;
        let (kept, epoch) = {
            let mut cached = locked(&self.cached);
            if saw_a_commit {
                cached.epoch += 1;
                cached.results.clear();
            }
            (cached.results.get(key).map(Arc::clone), cached.epoch)
        };
        if let Some(result) = kept.and_then(|kept| kept.downcast::<T>().ok()) {
            return Ok(T::clone(&result));
        }
        let result = work(&reader.connection)?;
        drop(reader);
        let mut cached = locked(&self.cached);
        if cached.epoch == epoch {
            if cached.results.len() >= MAX_CACHED {
                cached.results.clear();
            }
            cached
                .results
                .insert(key.to_owned(), Arc::new(result.clone()));
        }
        Ok(result)
    }

    /// A free reader, else the next in turn.
    fn reader(&self) -> MutexGuard<'_, Reader> {
        let free = self
            .readers
            .iter()
            .find_map(|reader| reader.try_lock().ok());
        free.unwrap_or_else(|| {
            let turn = self.next_reader.fetch_add(1, Ordering::Relaxed);
            locked(&self.readers[turn % READERS])
        })
    }
}

#[derive(Default)]
struct WriteQueue {
    writes: Vec<Box<dyn PendingWrite>>,
    /// Whether a caller or a drain task is running the queue's batches: exactly one is, from
    /// the write that finds the queue idle until a batch leaves it empty.
    draining: bool,
}

/// What running one batch left behind.
#[derive(Debug, PartialEq, Eq)]
enum Batch {
    /// Nothing: the draining role is given up.
    Emptied,
    /// Writes queued while the batch ran.
    More,
    /// Writes that found the database busy, queued again.
    Busy,
}

impl Connections {
    /// Runs the queued writes in batches until the queue is empty, waiting asynchronously
    /// while the database is busy (see `retrying_while_busy`).
    async fn drain(self: Arc<Self>) {
        loop {
            match self.run_batch() {
                Batch::Emptied => return,
                // On at once: `yield_now` would wait for the runtime's next look at its I/O
                // driver (up to ms under load) while the queued writes' requests wait too.
                // Writes that arrived meanwhile are the next batch; the budget still yields
                // now and then to this thread's other tasks.
                Batch::More => tokio::task::consume_budget().await,
                Batch::Busy => tokio::time::sleep(BUSY_RETRY).await,
            }
        }
    }

    /// Runs every queued write in one transaction; only the holder of the draining role calls
    /// this. Writes that found the database busy go back to the head of the queue.
    fn run_batch(&self) -> Batch {
        let _unwinding = GivesUpOnPanic(&self.queue);
        let mut batch = std::mem::take(&mut locked(&self.queue).writes);
        self.commit(&mut batch);
        let mut queue = locked(&self.queue);
        let busy = !batch.is_empty();
        batch.append(&mut queue.writes);
        queue.writes = batch;
        if queue.writes.is_empty() {
            queue.draining = false;
            Batch::Emptied
        } else if busy {
            Batch::Busy
        } else {
            Batch::More
        }
    }

    /// Runs `batch` in one write transaction, each write in a savepoint, and hands every
    /// write its outcome once the transaction has committed. Leaves in `batch` the writes to
    /// try again because the database was busy.
    fn commit(&self, batch: &mut Vec<Box<dyn PendingWrite>>) {
        let mut writer = locked(&self.writer);
        let tx = match writer.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(err) => return fail_or_keep(batch, &err),
        };
        let mut ran = Vec::with_capacity(batch.len());
        let mut busy = Vec::new();
        let mut writes = std::mem::take(batch).into_iter();
        while let Some(mut write) = writes.next() {
            match write.run(&tx) {
                Ran::Done => ran.push(write),
                Ran::Busy(err) if write.deadline() <= Instant::now() => write.finish(Err(err)),
                Ran::Busy(_) => busy.push(write),
                Ran::Broken(err) => {
                    // The savepoints no longer tell the writes apart: nothing of the batch
                    // is kept (dropping the transaction rolls it back).
                    drop(tx);
                    let everyone = ran.into_iter().chain(busy).chain([write]).chain(writes);
                    for write in everyone {
                        write.finish(Err(copy_of(&err)));
                    }
                    return;
                }
            }
        }
        let committed = tx.commit();
        for write in ran {
            write.finish(committed.as_ref().map(|_| ()).map_err(copy_of));
        }
        *batch = busy;
    }
}

/// A busy database keeps the writes for another try until their deadline; any other failure
/// to begin is every write's outcome.
fn fail_or_keep(batch: &mut Vec<Box<dyn PendingWrite>>, err: &rusqlite::Error) {
    let now = Instant::now();
    let (kept, failed) = std::mem::take(batch)
        .into_iter()
        .partition(|write| is_busy(err) && now < write.deadline());
    *batch = kept;
    for write in failed {
        write.finish(Err(copy_of(err)));
    }
}

/// Clears the queue if a write's work panics while its batch runs, so later writes are not
/// stranded behind a drainer that is gone; the dropped writes' callers get an error.
struct GivesUpOnPanic<'a>(&'a Mutex<WriteQueue>);

impl Drop for GivesUpOnPanic<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut queue = locked(self.0);
        queue.writes.clear();
        queue.draining = false;
    }
}

/// A write in the queue, whatever its result type.
trait PendingWrite: Send {
    /// Runs the work inside the batch's transaction, in a savepoint of its own.
    fn run(&mut self, tx: &Transaction<'_>) -> Ran;
    /// When a write that keeps finding the database busy gives up.
    fn deadline(&self) -> Instant;
    /// Hands the caller the outcome: the work's, or the commit's failure.
    fn finish(self: Box<Self>, committed: rusqlite::Result<()>);
}

enum Ran {
    Done,
    /// Rolled back to its savepoint, to run again: a table of a shared in-memory database
    /// was locked by a reader.
    Busy(rusqlite::Error),
    /// A savepoint could not be opened or closed.
    Broken(rusqlite::Error),
}

struct QueuedWrite<T, W> {
    work: W,
    outcome: Option<rusqlite::Result<T>>,
    reply: oneshot::Sender<rusqlite::Result<T>>,
    deadline: Instant,
}

impl<T, W> PendingWrite for QueuedWrite<T, W>
where
    T: Send,
    W: FnMut(&Transaction<'_>) -> rusqlite::Result<T> + Send,
{
    fn run(&mut self, tx: &Transaction<'_>) -> Ran {
        let step = |sql: &str| tx.prepare_cached(sql)?.execute([]).map(drop);
        if let Err(err) = step("SAVEPOINT queued_write") {
            return Ran::Broken(err);
        }
        let result = (self.work)(tx);
        let closed = match &result {
            Ok(_) => step("RELEASE queued_write"),
            Err(_) => step("ROLLBACK TO queued_write").and_then(|()| step("RELEASE queued_write")),
        };
        match (closed, result) {
            (Err(err), _) => Ran::Broken(err),
            (Ok(()), Err(err)) if is_busy(&err) => Ran::Busy(err),
            (Ok(()), result) => {
                self.outcome = Some(result);
                Ran::Done
            }
        }
    }

    fn deadline(&self) -> Instant {
        self.deadline
    }

    fn finish(self: Box<Self>, committed: rusqlite::Result<()>) {
        let outcome = match (self.outcome, committed) {
            (Some(Err(err)), _) | (_, Err(err)) => Err(err),
            (Some(Ok(done)), Ok(())) => Ok(done),
            (None, Ok(())) => Err(abandoned("the write never ran")),
        };
        // A caller that is gone (a cancelled request) no longer waits for it.
        let _ = self.reply.send(outcome);
    }
}

/// An outcome for a write that did not run to its end.
fn abandoned(why: &str) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
        Some(why.to_owned()),
    )
}

/// One failure, told to every write of a batch.
fn copy_of(err: &rusqlite::Error) -> rusqlite::Error {
    match err {
        rusqlite::Error::SqliteFailure(code, message) => {
            rusqlite::Error::SqliteFailure(*code, message.clone())
        }
        other => abandoned(&other.to_string()),
    }
}

/// A statement's parameters copied out of the caller's borrowed values, for a write that
/// owns its data (`InlineSqlite::write`). Bound with `rusqlite::params_from_iter`.
pub(super) type OwnedRow = Vec<Value>;

/// A tuple of parameters as an `OwnedRow`.
pub(super) trait IntoOwnedRow {
    fn owned(&self) -> rusqlite::Result<OwnedRow>;
}

macro_rules! owned_tuple {
    ($($field:tt: $kind:ident),+) => {
        impl<$($kind: OwnedParam),+> IntoOwnedRow for ($($kind,)+) {
            fn owned(&self) -> rusqlite::Result<OwnedRow> {
                Ok(vec![$(self.$field.owned_param()?),+])
            }
        }
    };
}

owned_tuple!(0: A, 1: B, 2: C, 3: D);
owned_tuple!(0: A, 1: B, 2: C, 3: D, 4: E, 5: F, 6: G, 7: H, 8: I, 9: J);
owned_tuple!(0: A, 1: B, 2: C, 3: D, 4: E, 5: F, 6: G, 7: H, 8: I, 9: J, 10: K, 11: L);
owned_tuple!(0: A, 1: B, 2: C, 3: D, 4: E, 5: F, 6: G, 7: H, 8: I, 9: J, 10: K, 11: L, 12: M);
owned_tuple!(
    0: A, 1: B, 2: C, 3: D, 4: E, 5: F, 6: G, 7: H, 8: I, 9: J, 10: K, 11: L, 12: M, 13: N, 14: O
);

/// One parameter of an `OwnedRow`: as rusqlite's `ToSql` gives it, but a timestamp as
/// `timestamp_text` writes it.
pub(super) trait OwnedParam {
    fn owned_param(&self) -> rusqlite::Result<Value>;
}

macro_rules! owned_as_to_sql {
    ($($kind:ty),+) => {
        $(impl OwnedParam for $kind {
            fn owned_param(&self) -> rusqlite::Result<Value> {
                owned_value(self)
            }
        })+
    };
}

owned_as_to_sql!(&str, Option<&str>, i64, Option<i64>, bool);

impl OwnedParam for Timestamp {
    fn owned_param(&self) -> rusqlite::Result<Value> {
        Ok(Value::Text(timestamp_text(*self)))
    }
}

impl OwnedParam for Option<Timestamp> {
    fn owned_param(&self) -> rusqlite::Result<Value> {
        Ok(self.map_or(Value::Null, |at| Value::Text(timestamp_text(at))))
    }
}

/// A timestamp parameter bound in place, as `timestamp_text` writes it.
pub(super) struct SqlTimestamp(pub Timestamp);

impl ToSql for SqlTimestamp {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(timestamp_text(self.0)))
    }
}

/// A timestamp as sqlx and rusqlite write it, chrono's `%F %T%.f`
/// (`2026-12-01 04:00:00.123456789`, the fraction in 3, 6 or 9 digits as needed, none when
/// zero), digit by digit: chrono walks its format string for every value, a fiftieth of a
/// flow's CPU. A year outside 0-9999 or a leap second still goes to chrono.
pub(super) fn timestamp_text(at: Timestamp) -> String {
    use chrono::{Datelike as _, Timelike as _};
    let nanos = at.nanosecond();
    let year = match u32::try_from(at.year()) {
        Ok(year) if year <= 9999 && nanos < 1_000_000_000 => year,
        _ => return at.format("%F %T%.f").to_string(),
    };
    let mut text = [0u8; 29];
    let mut put = |offset: usize, value: u32, width: usize| {
        let mut value = value;
        for slot in text[offset..offset + width].iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, year, 4);
    put(5, at.month(), 2);
    put(8, at.day(), 2);
    put(11, at.hour(), 2);
    put(14, at.minute(), 2);
    put(17, at.second(), 2);
    let length = match nanos {
        0 => 19,
        _ if nanos.is_multiple_of(1_000_000) => {
            put(20, nanos / 1_000_000, 3);
            23
        }
        _ if nanos.is_multiple_of(1_000) => {
            put(20, nanos / 1_000, 6);
            26
        }
        _ => {
            put(20, nanos, 9);
            29
        }
    };
    for (offset, separator) in [
        (4, b'-'),
        (7, b'-'),
        (10, b' '),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
    ] {
        text[offset] = separator;
    }
    String::from_utf8_lossy(&text[..length]).into_owned()
}

fn owned_value(value: &dyn ToSql) -> rusqlite::Result<Value> {
    match value.to_sql()? {
        ToSqlOutput::Owned(value) => Ok(value),
        ToSqlOutput::Borrowed(value) => Value::try_from(value)
            .map_err(|err| rusqlite::Error::ToSqlConversionFailure(Box::new(err))),
        _ => Err(rusqlite::Error::ToSqlConversionFailure(
            "a parameter that has no owned form".into(),
        )),
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
/// when the holder's `Transaction` was dropped. So is the write queue, which its drainer
/// clears when a write panics (`GivesUpOnPanic`).
fn locked<T>(guarded: &Mutex<T>) -> MutexGuard<'_, T> {
    guarded.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<T> Context<T> for rusqlite::Result<T> {
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

    /// rusqlite's own `ToSql` for a timestamp: what the stored text was before, and what
    /// sqlx's SQLite driver still writes on the cold paths.
    fn chronos_text(at: Timestamp) -> String {
        at.format("%F %T%.f").to_string()
    }

    #[test]
    fn timestamps_are_written_as_chrono_writes_them() {
        let day = chrono::NaiveDate::from_ymd_opt(2026, 12, 1).unwrap();
        let at = |h, m, s, nanos| day.and_hms_nano_opt(h, m, s, nanos).unwrap();
        let cases = [
            at(4, 0, 0, 0),
            at(4, 0, 0, 500_000_000),
            at(23, 59, 59, 123_456_000),
            at(0, 0, 1, 1),
            at(9, 5, 7, 999_999_999),
            // A leap second, and years chrono writes with a sign: chrono's own text.
            at(23, 59, 59, 1_500_000_000),
            chrono::NaiveDate::from_ymd_opt(10_000, 1, 1)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap(),
            chrono::NaiveDate::from_ymd_opt(-1, 1, 1)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap(),
            chrono::NaiveDate::from_ymd_opt(0, 2, 29)
                .unwrap()
                .and_hms_opt(1, 2, 3)
                .unwrap(),
            Timestamp::MIN,
            Timestamp::MAX,
            crate::store::now(),
        ];
        for at in cases {
            assert_eq!(timestamp_text(at), chronos_text(at), "{at:?}");
        }
        // The fraction's three shapes and none, over the whole 0-9999 range of years.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for round in 0..20_000u32 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let seconds = (seed % 315_569_520_000) as i64 - 62_167_219_200; // 0000-01-01 to 9999-12-31
            let nanos = match round % 4 {
                0 => 0,
                1 => (seed >> 40) as u32 % 1_000 * 1_000_000,
                2 => (seed >> 34) as u32 % 1_000_000 * 1_000,
                _ => (seed >> 32) as u32 % 1_000_000_000,
            };
            let at = chrono::DateTime::from_timestamp(seconds, nanos)
                .unwrap()
                .naive_utc();
            assert_eq!(timestamp_text(at), chronos_text(at), "{at:?}");
        }
        // Bound in place and in an owned row, the text is the same, and reads back exactly.
        let connection = Connection::open_in_memory().unwrap();
        let at = crate::store::now();
        let (in_place, owned): (String, String) = connection
            .query_row(
                "SELECT ?, ?",
                (SqlTimestamp(at), at.owned_param().unwrap()),
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .unwrap();
        assert_eq!(
            (in_place.as_str(), owned.as_str()),
            (chronos_text(at).as_str(), chronos_text(at).as_str())
        );
        assert_eq!(fixed_layout_timestamp(in_place.as_bytes()), Some(at));
        assert_eq!(None::<Timestamp>.owned_param().unwrap(), Value::Null);
    }

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

    /// A WAL database with one table, an empty WAL, and a connection holding its write lock,
    /// so the inline writes queue up until the test commits it.
    fn blocked_database(dir: &tempfile::TempDir) -> (Arc<InlineSqlite>, Connection) {
        let path = dir.path().join("queued.db");
        let blocker = Connection::open(&path).unwrap();
        blocker
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL UNIQUE);
                 INSERT INTO t VALUES (-5, 'taken');
                 PRAGMA wal_checkpoint(TRUNCATE);
                 BEGIN IMMEDIATE;",
            )
            .unwrap();
        let db = Arc::new(opened(&format!("sqlite://{}", path.display())));
        (db, blocker)
    }

    fn insert(db: &Arc<InlineSqlite>, k: i64) -> tokio::task::JoinHandle<Result<i64, StoreError>> {
        let db = Arc::clone(db);
        tokio::spawn(async move {
            db.write("inserting", move |tx| {
                tx.execute("INSERT INTO t VALUES (?, ?)", (k, format!("row {k}")))?;
                // The second row collides, after the first went in.
                if k == 10 {
                    tx.execute("INSERT INTO t VALUES (1000, 'taken')", [])?;
                }
                assert_ne!(k, -1, "write -1 panics");
                Ok(k)
            })
            .await
        })
    }

    async fn until_queued(db: &InlineSqlite, writes: usize) {
        let connections = db.connections("waiting").unwrap();
        for _ in 0..10_000 {
            if locked(&connections.queue).writes.len() == writes {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("{writes} writes never queued up");
    }

    fn rows(connection: &Connection) -> Vec<i64> {
        let mut rows = connection.prepare("SELECT k FROM t ORDER BY k").unwrap();
        rows.query_map([], |row| row.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_writes_commit_together_each_in_a_savepoint_even_when_their_caller_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (db, blocker) = blocked_database(&dir);
        let mut writes: Vec<_> = (0..64).map(|k| insert(&db, k)).collect();
        let cancelled = insert(&db, 100);
        until_queued(&db, 65).await;
        cancelled.abort();
        assert!(cancelled.await.unwrap_err().is_cancelled());
        blocker.execute_batch("COMMIT").unwrap();

        let failed = writes.remove(10).await.unwrap().unwrap_err();
        assert!(failed.to_string().contains("UNIQUE"), "{failed}");
        for (write, k) in writes.into_iter().zip((0..64).filter(|k| *k != 10)) {
            assert_eq!(write.await.unwrap().unwrap(), k);
        }
        // Write 10's first row went with its savepoint; the cancelled caller's row stayed.
        let expected: Vec<i64> = [-5]
            .into_iter()
            .chain((0..64).filter(|k| *k != 10))
            .chain([100])
            .collect();
        assert_eq!(rows(&blocker), expected);
        // One commit: 64 commits of their own would have written at least 64 WAL frames.
        let frames: i64 = blocker
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| row.get(1))
            .unwrap();
        assert!((1..8).contains(&frames), "{frames} WAL frames");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_that_panics_fails_its_batch_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (db, blocker) = blocked_database(&dir);
        let writes: Vec<_> = [12, -1, 14].map(|k| insert(&db, k)).into();
        until_queued(&db, 3).await;
        blocker.execute_batch("COMMIT").unwrap();
        for write in writes {
            let err = write.await.unwrap().unwrap_err();
            assert!(err.to_string().contains("the writer stopped"), "{err}");
        }
        assert_eq!(rows(&blocker), [-5]);
        assert_eq!(insert(&db, 15).await.unwrap().unwrap(), 15);
        assert_eq!(rows(&blocker), [-5, 15]);
    }

    /// A table `t` of one row on `target`, kept alive (an in-memory database lives while a
    /// connection to it is open) by the connection returned, which commits as another
    /// process would.
    fn cached_reads_database(target: &str, flags: OpenFlags) -> (InlineSqlite, Connection) {
        let outside = Connection::open_with_flags(target, flags).unwrap();
        outside
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL);
                 CREATE TABLE other (k INTEGER PRIMARY KEY);
                 INSERT INTO t VALUES (1, 'first');",
            )
            .unwrap();
        let db = InlineSqlite {
            target: PathBuf::from(target),
            flags,
            connections: OnceLock::new(),
        };
        (db, outside)
    }

    #[tokio::test]
    async fn a_cached_read_is_answered_again_until_anything_commits() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cached.db");
        let databases = [
            (
                file.to_string_lossy().into_owned(),
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
            ),
            (
                "file:cached-reads?mode=memory&cache=shared".to_owned(),
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_URI,
            ),
        ];
        for (target, flags) in databases {
            let (db, outside) = cached_reads_database(&target, flags);
            let runs = AtomicUsize::new(0);
            let read = |key: &str| {
                let key = key.to_owned();
                let runs = &runs;
                let db = &db;
                async move {
                    db.read_cached("reading t", &key, |conn| {
                        runs.fetch_add(1, Ordering::Relaxed);
                        conn.query_row("SELECT v FROM t WHERE k = 1", [], |row| {
                            row.get::<_, String>(0)
                        })
                    })
                    .await
                    .unwrap()
                }
            };
            let ran = || runs.load(Ordering::Relaxed);

            assert_eq!(read("a").await, "first", "{target}");
            assert_eq!(read("a").await, "first", "{target}");
            assert_eq!(
                ran(),
                1,
                "{target}: the second read was answered from the cache"
            );
            assert_eq!(read("b").await, "first", "{target}");
            assert_eq!(ran(), 2, "{target}: another key is read for itself");

            // A commit by the inline writer, by another connection, or to another table:
            // the next read runs again and sees the database as it is now.
            db.write("updating t", |tx| {
                tx.execute("UPDATE t SET v = 'by the writer'", [])
            })
            .await
            .unwrap();
            assert_eq!(read("a").await, "by the writer", "{target}");
            outside
                .execute("UPDATE t SET v = 'from outside'", [])
                .unwrap();
            assert_eq!(read("a").await, "from outside", "{target}");
            assert_eq!(ran(), 4, "{target}");
            outside.execute("INSERT INTO other VALUES (1)", []).unwrap();
            assert_eq!(read("a").await, "from outside", "{target}");
            assert_eq!(ran(), 5, "{target}: any commit forgets what was kept");
            assert_eq!(read("a").await, "from outside", "{target}");
            assert_eq!(ran(), 5, "{target}");

            // Each reader has asked; a commit comes; whichever reader the next call finds
            // free sees it, and the others then agree.
            let connections = db.connections("reading t").unwrap();
            let through_reader = |at: usize| {
                let others: Vec<_> = (0..READERS)
                    .filter(|other| *other != at)
                    .map(|other| locked(&connections.readers[other]))
                    .collect();
                let value = connections
                    .read_cached("a", |conn| {
                        runs.fetch_add(1, Ordering::Relaxed);
                        conn.query_row("SELECT v FROM t", [], |row| row.get::<_, String>(0))
                    })
                    .unwrap();
                drop(others);
                value
            };
            for at in 0..READERS {
                assert_eq!(through_reader(at), "from outside", "{target}");
            }
            let before = ran();
            outside.execute("UPDATE t SET v = 'seen by 1'", []).unwrap();
            assert_eq!(through_reader(1), "seen by 1", "{target}");
            assert_eq!(through_reader(2), "seen by 1", "{target}");
            assert_eq!(through_reader(0), "seen by 1", "{target}");
            assert!(ran() > before, "{target}");
        }
    }

    /// A read that began before a commit, which another reader saw while it ran, is answered
    /// but not kept: else that reader, having seen the commit already, would serve it stale.
    #[test]
    fn a_read_overtaken_by_a_seen_commit_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("overtaken.db");
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE;
        let (db, outside) = cached_reads_database(&file.to_string_lossy(), flags);
        let connections = db.connections("reading t").unwrap();
        let value = |conn: &Connection| {
            conn.query_row("SELECT v FROM t", [], |row| row.get::<_, String>(0))
        };
        // Every reader asks once, so none counts its next question as its first.
        let warm: Vec<_> = (0..READERS)
            .map(|at| {
                let others: Vec<_> = (0..READERS)
                    .filter(|other| *other != at)
                    .map(|other| locked(&connections.readers[other]))
                    .collect();
                let read = connections.read_cached("warm", value).unwrap();
                drop(others);
                read
            })
            .collect();
        assert_eq!(warm, ["first"; READERS]);

        // Reader 0 reads "first"; meanwhile a commit lands and reader 1 sees it.
        let overtaken = connections
            .read_cached("a", |conn| {
                let read = value(conn)?;
                outside.execute("UPDATE t SET v = 'second'", [])?;
                let seen = connections.read_cached("b", value)?;
                assert_eq!(seen, "second");
                Ok(read)
            })
            .unwrap();
        assert_eq!(overtaken, "first", "read before the commit");

        // Reader 1 has seen the commit already: only a read of its own answers it now.
        let held = [
            locked(&connections.readers[0]),
            locked(&connections.readers[2]),
        ];
        let next = connections.read_cached("a", value).unwrap();
        drop(held);
        assert_eq!(next, "second");
    }

    #[tokio::test]
    async fn kept_results_stay_bounded_whatever_the_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bounded.db");
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE;
        let (db, _outside) = cached_reads_database(&file.to_string_lossy(), flags);
        for n in 0..=MAX_CACHED {
            let key = format!("junk {n}");
            let read = db
                .read_cached("reading t", &key, |conn| {
                    conn.query_row("SELECT v || ?1 FROM t", [n as i64], |row| {
                        row.get::<_, String>(0)
                    })
                })
                .await
                .unwrap();
            assert_eq!(read, format!("first{n}"));
        }
        let connections = db.connections("reading t").unwrap();
        let kept = locked(&connections.cached).results.len();
        assert!((1..=MAX_CACHED).contains(&kept), "{kept} results kept");
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
