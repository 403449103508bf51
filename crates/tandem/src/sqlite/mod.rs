//! SQLite engine for the [`Store`] port: one file per service.
//!
//! One writer thread owns the only write connection, so writers in this
//! process never contend for SQLite's lock; writers in other processes wait
//! in a short-sleep busy handler. Writes begin with `BEGIN IMMEDIATE` (a
//! deferred transaction that upgrades to a writer fails at once with
//! `SQLITE_BUSY` in WAL mode). Reads run on a small pool of reader threads.
//! The journal is WAL; the `synchronous` setting is the caller's choice.

pub mod sql;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::watch;

use crate::executor::{run_transaction, EngineConnection, Executor};
use crate::store::{
    Cause, ExternalChanges, Lease, Param, Row, Store, StoreError, StoreFuture, Tx, Value,
};

/// SQLite's `synchronous` pragma, in WAL mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// fsync of the WAL on every commit: durable across power loss.
    #[default]
    Full,
    /// fsync only at checkpoints: durable across process crashes, the last
    /// commits may be lost on power loss.
    Normal,
    /// No fsync at all (benchmarks of the CPU path only).
    Off,
}

impl Synchronous {
    /// The pragma's value: `FULL`, `NORMAL` or `OFF`.
    pub fn pragma(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
            Synchronous::Off => "OFF",
        }
    }

    /// Reads `full`, `normal` or `off`, in any case; `None` for anything
    /// else.
    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "full" => Some(Self::Full),
            "normal" => Some(Self::Normal),
            "off" => Some(Self::Off),
            _ => None,
        }
    }
}

/// How to open a SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// How commits are made durable (default: [`Synchronous::Full`]).
    pub synchronous: Synchronous,
    /// Reader threads, each with a connection of its own, so that reads
    /// run beside each other and beside the writer (default 2; at least
    /// 1).
    pub readers: usize,
    /// How long a writer waits for another process's write lock.
    pub busy_timeout: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            synchronous: Synchronous::Full,
            readers: 2,
            busy_timeout: Duration::from_secs(30),
        }
    }
}

/// A store thread's SQLite connection, for the shared
/// [`Executor`](crate::executor::Executor): writes begin with
/// `BEGIN IMMEDIATE`, reads with a deferred `BEGIN` (ended by a rollback).
pub(crate) struct SqliteConnection(pub(crate) Connection);

impl EngineConnection for SqliteConnection {
    type Open = Connection;

    fn open(&mut self) -> Result<&mut Connection, StoreError> {
        Ok(&mut self.0)
    }

    fn begin(open: &mut Connection, write: bool) -> Result<(), StoreError> {
        let begin = if write { "BEGIN IMMEDIATE" } else { "BEGIN" };
        open.execute_batch(begin).map_err(map_error)
    }

    fn finish(open: &mut Connection, write: bool, _appended: bool) -> Result<(), StoreError> {
        let end = if write { "COMMIT" } else { "ROLLBACK" };
        open.execute_batch(end).map_err(|error| {
            let _ = open.execute_batch("ROLLBACK");
            map_error(error)
        })
    }

    fn rollback(open: &mut Connection) {
        let _ = open.execute_batch("ROLLBACK");
    }

    fn execute_batch(open: &mut Connection, sql: &str) -> Result<(), StoreError> {
        open.execute_batch(sql).map_err(map_error)
    }

    fn run_work<R, E, F>(open: &mut Connection, work: F) -> (Result<R, E>, bool)
    where
        E: From<StoreError>,
        F: FnOnce(&mut dyn Tx) -> Result<R, E>,
    {
        let mut tx = SqliteTx {
            connection: open,
            appended: false,
        };
        let result = work(&mut tx);
        (result, tx.appended)
    }
}

struct Shared {
    path: PathBuf,
    executor: Executor<SqliteConnection>,
    options: SqliteOptions,
    /// The checkpoint thread, taken by [`SqliteStore::close`].
    checkpointer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    closed: std::sync::atomic::AtomicBool,
}

/// A SQLite database file used as a service's store.
#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SqliteStore")
            .field("path", &self.shared.path)
            .finish()
    }
}

/// Opens a connection with Tandem's settings to a file that exists (see
/// [`SqliteStore::open`], which makes it): SQLite never creates a file
/// here, and refuses one that is a symbolic link.
pub(crate) fn open_connection(
    path: &Path,
    synchronous: Synchronous,
    busy_timeout: Duration,
) -> Result<Connection, StoreError> {
    let connection = open_unconfigured(path)?;
    install_busy_handler(&connection, busy_timeout)?;
    connection
        .execute_batch(&format!(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = {};
             PRAGMA foreign_keys = ON;
             PRAGMA cache_size = -16000;
             PRAGMA temp_store = MEMORY;
             PRAGMA journal_size_limit = {WAL_KEPT_BYTES};",
            synchronous.pragma()
        ))
        .map_err(map_error)?;
    connection.set_prepared_statement_cache_capacity(64);
    Ok(connection)
}

/// A connection to the existing file at `path`, with no setting changed.
fn open_unconfigured(path: &Path) -> Result<Connection, StoreError> {
    configure_library();
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_NOFOLLOW,
    )
    .map_err(|error| {
        StoreError::Unavailable(
            format!("cannot open sqlite file {}: {error}", path.display()).into(),
        )
    })
}

/// `path` with its directory resolved (SQLite's no-follow check counts a
/// link anywhere in the path, so it gets one with none but, perhaps, the
/// file itself, which it then refuses). Fails if the directory is missing.
fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "names no file"))?;
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    Ok(std::fs::canonicalize(parent)?.join(name))
}

/// Creates the directory a database goes in (mode 0700: the files in it
/// hold personal data) if it is missing.
fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir.as_os_str().is_empty() || dir.exists() {
        return Ok(());
    }
    let failed = |error: std::io::Error| {
        StoreError::Unavailable(
            format!("cannot create directory {}: {error}", dir.display()).into(),
        )
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(failed)?;
    // Exactly 0700, whatever the umask.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(failed)
}

/// Opens the file at `path` that Tandem keeps (a database, a lease),
/// creating it readable and writable by its owner only (0600, whatever the
/// umask) if it is missing. Never through a symbolic link: one planted in
/// its place is refused, and its target left alone. The mode of a file
/// that already exists is left as its owner set it.
pub(crate) fn open_private_file(path: &Path) -> Result<std::fs::File, StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let failed = |error: std::io::Error| {
        if error.raw_os_error() == Some(libc::ELOOP) {
            StoreError::Unavailable(
                format!("refusing {}: it is a symbolic link", path.display()).into(),
            )
        } else {
            StoreError::Unavailable(format!("cannot open {}: {error}", path.display()).into())
        }
    };
    let mut options = std::fs::OpenOptions::new();
    options
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    let file = match options.clone().create_new(true).open(path) {
        Ok(file) => {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(failed)?;
            file
        }
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            options.open(path).map_err(failed)?
        }
        Err(error) => return Err(failed(error)),
    };
    if !file.metadata().map_err(failed)?.is_file() {
        return Err(StoreError::Unavailable(
            format!("refusing {}: not a regular file", path.display()).into(),
        ));
    }
    Ok(file)
}

/// Process-wide SQLite settings, applied once before the first connection:
/// memory statistics off, so allocations from the store threads do not
/// contend for SQLite's global memory mutex.
fn configure_library() {
    static CONFIGURED: std::sync::Once = std::sync::Once::new();
    CONFIGURED.call_once(|| {
        // SAFETY: sqlite3_config is called before any connection exists in
        // this process (this runs ahead of the first open); if SQLite was
        // already initialised it returns SQLITE_MISUSE and changes nothing.
        let result = unsafe {
            rusqlite::ffi::sqlite3_config(
                rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS,
                0 as std::ffi::c_int,
            )
        };
        if result != rusqlite::ffi::SQLITE_OK {
            tracing::debug!(result, "sqlite memstatus left as it was");
        }
    });
}

/// SQLite's own busy timeout sleeps in steps of up to 100 ms; this handler
/// sleeps at most 2 ms between tries, so a writer waiting behind another
/// process's short transaction resumes quickly.
fn install_busy_handler(connection: &Connection, busy_timeout: Duration) -> Result<(), StoreError> {
    // The handler is a plain fn pointer: the timeout is fixed in tries.
    // 2 ms per try after the first few gives ~500 tries a second.
    let _ = busy_timeout;
    fn handler(tries: i32) -> bool {
        const MAX_TRIES: i32 = 15_000; // about 30 s
        if tries >= MAX_TRIES {
            return false;
        }
        let micros = 20u64 << tries.clamp(0, 6); // 20 µs .. 1.28 ms
        std::thread::sleep(Duration::from_micros(micros.min(2_000)));
        true
    }
    connection.busy_handler(Some(handler)).map_err(map_error)
}

/// Maps a SQLite error as every engine does: a unique or primary-key
/// violation is a [`StoreError::Conflict`] (any other constraint, such as
/// NOT NULL, CHECK or a foreign key, is an [`StoreError::Engine`] error);
/// a busy or locked database, a file that cannot be opened, a full disk or
/// an I/O failure is [`StoreError::Unavailable`].
pub(crate) fn map_error(error: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode;
    let kind: fn(Cause) -> StoreError = match &error {
        rusqlite::Error::SqliteFailure(failure, _) => match failure.code {
            ErrorCode::ConstraintViolation
                if failure.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    || failure.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
            {
                StoreError::Conflict
            }
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::CannotOpen
            | ErrorCode::DiskFull
            | ErrorCode::SystemIoFailure => StoreError::Unavailable,
            _ => StoreError::Engine,
        },
        _ => StoreError::Engine,
    };
    kind(Cause::with_source(error.to_string(), error))
}

/// Rewrites `$1` placeholders to SQLite's `?1`, leaving quoted text alone.
pub(crate) fn rewrite_placeholders(sql: &str) -> Cow<'_, str> {
    if !sql.contains('$') {
        return Cow::Borrowed(sql);
    }
    let mut rewritten = sql.as_bytes().to_vec();
    let mut quote: Option<u8> = None;
    for index in 0..rewritten.len() {
        let byte = rewritten[index];
        match quote {
            Some(open) if byte == open => quote = None,
            Some(_) => {}
            None if byte == b'\'' || byte == b'"' => quote = Some(byte),
            None if byte == b'$' && rewritten.get(index + 1).is_some_and(u8::is_ascii_digit) => {
                rewritten[index] = b'?';
            }
            None => {}
        }
    }
    // Only ASCII bytes were replaced by ASCII bytes.
    Cow::Owned(String::from_utf8(rewritten).unwrap_or_else(|_| sql.to_owned()))
}

/// Multi-row `INSERT ... VALUES (?1, ..., ?n), (?n+1, ...)` statements in
/// SQLite's numbered placeholders, for rows of `columns` parameters: a
/// batch is written `rows_per_statement` rows a statement, and the SQL of a
/// full statement is built once.
pub(crate) struct MultiRowInsert {
    /// `INSERT INTO table (columns...) VALUES `
    head: &'static str,
    columns: usize,
    pub(crate) rows_per_statement: usize,
    full: std::sync::OnceLock<String>,
}

impl MultiRowInsert {
    pub(crate) const fn new(head: &'static str, columns: usize, rows_per_statement: usize) -> Self {
        Self {
            head,
            columns,
            rows_per_statement,
            full: std::sync::OnceLock::new(),
        }
    }

    /// The statement for `rows` rows.
    pub(crate) fn sql(&self, rows: usize) -> Cow<'_, str> {
        if rows == self.rows_per_statement {
            Cow::Borrowed(self.full.get_or_init(|| self.build(rows)))
        } else {
            Cow::Owned(self.build(rows))
        }
    }

    fn build(&self, rows: usize) -> String {
        use std::fmt::Write;
        let mut sql = String::from(self.head);
        for row in 0..rows {
            sql.push_str(if row == 0 { "(" } else { ",(" });
            for column in 0..self.columns {
                let separator = if column == 0 { "" } else { "," };
                let _ = write!(sql, "{separator}?{}", row * self.columns + column + 1);
            }
            sql.push(')');
        }
        sql
    }
}

/// Rewritten statements by where the caller's text lives (address and
/// length), with the original text to check a hit against.
type RewriteCache = std::collections::HashMap<(usize, usize), (Box<str>, std::rc::Rc<str>)>;

thread_local! {
    /// Rewritten statements of this store thread (callers mostly pass
    /// literals, whose address is stable).
    static REWRITTEN: std::cell::RefCell<RewriteCache> = std::cell::RefCell::new(RewriteCache::new());
}

/// Calls `work` with the SQLite form of `sql`, rewriting each text once.
fn with_sqlite_sql<R>(sql: &str, work: impl FnOnce(&str) -> R) -> R {
    if !sql.contains('$') {
        return work(sql);
    }
    let key = (sql.as_ptr() as usize, sql.len());
    let cached = REWRITTEN.with(|cache| {
        cache
            .borrow()
            .get(&key)
            .filter(|(original, _)| **original == *sql)
            .map(|(_, rewritten)| rewritten.clone())
    });
    let rewritten = match cached {
        Some(rewritten) => rewritten,
        None => {
            let rewritten: std::rc::Rc<str> = rewrite_placeholders(sql).into();
            REWRITTEN.with(|cache| {
                let mut cache = cache.borrow_mut();
                if cache.len() >= 1024 {
                    cache.clear();
                }
                cache.insert(key, (sql.into(), rewritten.clone()));
            });
            rewritten
        }
    };
    work(&rewritten)
}

fn bind<'a>(param: &Param<'a>) -> rusqlite::types::ToSqlOutput<'a> {
    use rusqlite::types::{ToSqlOutput, ValueRef};
    ToSqlOutput::Borrowed(match *param {
        Param::Null => ValueRef::Null,
        Param::Int(value) => ValueRef::Integer(value),
        Param::Real(value) => ValueRef::Real(value),
        Param::Text(value) => ValueRef::Text(value.as_bytes()),
        Param::Blob(value) => ValueRef::Blob(value),
    })
}

struct BoundParam<'p, 'a>(&'p Param<'a>);

impl rusqlite::ToSql for BoundParam<'_, '_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(bind(self.0))
    }
}

/// A [`Tx`] over one rusqlite connection inside an open transaction.
pub(crate) struct SqliteTx<'c> {
    pub(crate) connection: &'c Connection,
    pub(crate) appended: bool,
}

impl Tx for SqliteTx<'_> {
    fn engine(&self) -> &'static dyn crate::sql::EngineSql {
        &sql::SQLITE
    }

    fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, StoreError> {
        with_sqlite_sql(sql, |sql| {
            let mut statement = self.connection.prepare_cached(sql).map_err(map_error)?;
            let changed = statement
                .execute(rusqlite::params_from_iter(params.iter().map(BoundParam)))
                .map_err(map_error)?;
            Ok(changed as u64)
        })
    }

    fn query(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, StoreError> {
        with_sqlite_sql(sql, |sql| self.query_sqlite(sql, params))
    }

    fn execute_batch(&mut self, sql: &str) -> Result<(), StoreError> {
        self.connection.execute_batch(sql).map_err(map_error)
    }

    fn savepoint(&mut self, name: &str) -> Result<(), StoreError> {
        self.execute(&format!("SAVEPOINT {name}"), &[]).map(|_| ())
    }

    fn release_savepoint(&mut self, name: &str) -> Result<(), StoreError> {
        self.execute(&format!("RELEASE SAVEPOINT {name}"), &[])
            .map(|_| ())
    }

    fn outbox_appended(&mut self) {
        self.appended = true;
    }
}

impl SqliteTx<'_> {
    fn query_sqlite(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, StoreError> {
        let mut statement = self.connection.prepare_cached(sql).map_err(map_error)?;
        let columns = statement.column_count();
        let mut rows = statement
            .query(rusqlite::params_from_iter(params.iter().map(BoundParam)))
            .map_err(map_error)?;
        let mut result = Vec::new();
        while let Some(row) = rows.next().map_err(map_error)? {
            let mut values = Vec::with_capacity(columns);
            for index in 0..columns {
                use rusqlite::types::ValueRef;
                values.push(match row.get_ref(index).map_err(map_error)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(value) => Value::Int(value),
                    ValueRef::Real(value) => Value::Real(value),
                    ValueRef::Text(value) => {
                        Value::Text(String::from_utf8_lossy(value).into_owned())
                    }
                    ValueRef::Blob(value) => Value::Blob(value.to_vec()),
                });
            }
            result.push(Row { values });
        }
        Ok(result)
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and installs the
    /// toolkit's tables.
    pub async fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self, StoreError> {
        let store = Self::open_plain(path, options).await?;
        store.write(|tx| crate::schema::install(tx)).await?;
        Ok(store)
    }

    /// Opens the file without installing the toolkit's tables (the embedded
    /// log keeps its own schema).
    pub(crate) async fn open_plain(
        path: impl AsRef<Path>,
        options: SqliteOptions,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        tokio::task::spawn_blocking(move || {
            if let Some(parent) = path.parent() {
                create_private_dir(parent)?;
            }
            let path = resolve(&path).map_err(|error| {
                StoreError::Unavailable(format!("cannot open {}: {error}", path.display()).into())
            })?;
            // Made here, private, so that SQLite (whose WAL and shared-memory
            // files take the database's mode) never creates it.
            drop(open_private_file(&path)?);
            Self::open_blocking(path, options)
        })
        .await
        .map_err(|error| StoreError::Engine(format!("open task failed: {error}").into()))?
    }

    /// Opens the database at `path` only if it exists and is a service's
    /// (it has the toolkit's tables), without creating, installing or
    /// changing anything otherwise: for tools that work on a service's
    /// database, where a mistyped path or the bus file must be refused.
    pub async fn open_existing(
        path: impl AsRef<Path>,
        options: SqliteOptions,
    ) -> Result<Self, crate::schema::ExistingError> {
        use crate::schema::ExistingError;
        let path = path.as_ref().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let looked = resolve(&path).and_then(|resolved| {
                std::fs::symlink_metadata(&resolved).map(|metadata| (resolved, metadata))
            });
            let path = match looked {
                Ok((_, metadata)) if metadata.file_type().is_symlink() => {
                    return Err(StoreError::Unavailable(
                        format!("refusing {}: it is a symbolic link", path.display()).into(),
                    )
                    .into())
                }
                Ok((resolved, _)) => resolved,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ExistingError::Missing)
                }
                Err(error) => {
                    return Err(StoreError::Unavailable(
                        format!("cannot open {}: {error}", path.display()).into(),
                    )
                    .into())
                }
            };
            // Look before any setting or table is written.
            let mut probe = open_unconfigured(&path)?;
            run_transaction::<SqliteConnection, _, _, _>(
                &mut probe,
                false,
                crate::schema::check_installed,
                &watch::channel(0).0,
            )?;
            drop(probe);
            Ok(Self::open_blocking(path, options)?)
        })
        .await
        .map_err(|error| StoreError::Engine(format!("open task failed: {error}").into()))?
    }

    fn open_blocking(path: PathBuf, options: SqliteOptions) -> Result<Self, StoreError> {
        let writer_connection = open_connection(&path, options.synchronous, options.busy_timeout)?;
        // Checkpoints run on a thread of their own (below), not inside a
        // writer's commit, where they would stall the pipeline.
        writer_connection
            .execute_batch("PRAGMA wal_autocheckpoint = 0")
            .map_err(map_error)?;
        let readers = (0..options.readers.max(1))
            .map(|_| {
                open_connection(&path, options.synchronous, options.busy_timeout)
                    .map(SqliteConnection)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let label = path.file_stem().map_or_else(
            || "sqlite".into(),
            |stem| stem.to_string_lossy().into_owned(),
        );
        let executor = Executor::start(
            "tandem-sqlite",
            &label,
            SqliteConnection(writer_connection),
            readers,
        )?;
        let checkpoint_connection =
            open_connection(&path, options.synchronous, options.busy_timeout)?;
        let shared = Arc::new(Shared {
            path,
            executor,
            options,
            checkpointer: std::sync::Mutex::new(None),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        let watched = Arc::downgrade(&shared);
        let checkpointer = std::thread::Builder::new()
            .name("tandem-sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpoint_connection, watched))
            .map_err(|error| {
                StoreError::Engine(format!("cannot start checkpoint thread: {error}").into())
            })?;
        *shared.checkpointer.lock().expect("checkpointer lock") = Some(checkpointer);
        Ok(Self { shared })
    }

    /// The database file, its directory made absolute when it was opened.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// [`Store::close`], blocking: ends the store's threads (closing their
    /// connections), then checkpoints the WAL into the database file and
    /// truncates it on a last connection of its own, whose close removes
    /// the WAL unless another process still has the file open.
    fn close_blocking(shared: &Shared) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        if shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        shared.executor.close();
        let checkpointer = shared
            .checkpointer
            .lock()
            .expect("checkpointer lock")
            .take();
        if let Some(checkpointer) = checkpointer {
            let _ = checkpointer.join();
        }
        let last = open_connection(
            &shared.path,
            shared.options.synchronous,
            shared.options.busy_timeout,
        )?;
        // (busy, WAL frames, frames checkpointed); busy when another
        // process reads or writes the file now: it checkpoints when it
        // closes.
        let (busy, frames, copied): (i64, i64, i64) = last
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .map_err(map_error)?;
        tracing::debug!(
            path = %shared.path.display(),
            busy = busy != 0,
            frames,
            copied,
            "store closed"
        );
        last.close().map_err(|(_, error)| map_error(error))
    }
}

impl Store for SqliteStore {
    fn write<R, E, F>(&self, work: F) -> StoreFuture<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&mut dyn Tx) -> Result<R, E> + Send + 'static,
    {
        self.shared.executor.run(true, work)
    }

    fn read<R, E, F>(&self, work: F) -> StoreFuture<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&mut dyn Tx) -> Result<R, E> + Send + 'static,
    {
        self.shared.executor.run(false, work)
    }

    fn outbox_signal(&self) -> watch::Receiver<u64> {
        self.shared.executor.outbox_signal()
    }

    fn external_changes(&self) -> Result<Box<dyn ExternalChanges>, StoreError> {
        Ok(Box::new(DataVersionWatcher::open(
            &self.shared.path,
            &self.shared.options,
        )?))
    }

    /// An exclusive `flock` on `<database file>.<name>.lease`: one holder
    /// among every process (and every store handle) opening that file; the
    /// kernel releases it when the holder closes it or dies.
    fn close(&self) -> StoreFuture<(), StoreError> {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || Self::close_blocking(&shared))
                .await
                .map_err(|error| StoreError::Engine(format!("close task failed: {error}").into()))?
        })
    }

    fn try_lead(&self, name: &str) -> StoreFuture<Option<Box<dyn Lease>>, StoreError> {
        let path = lease_path(&self.shared.path, name);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || FileLease::try_acquire(&path))
                .await
                .map_err(|error| StoreError::Engine(format!("lease task failed: {error}").into()))?
                .map(|lease| lease.map(|lease| Box::new(lease) as Box<dyn Lease>))
        })
    }
}

/// The lock file of lease `name` beside the database at `path`; names are
/// reduced to characters safe in a file name.
fn lease_path(path: &Path, name: &str) -> PathBuf {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut file = path.as_os_str().to_owned();
    file.push(format!(".{safe}.lease"));
    PathBuf::from(file)
}

/// A lease held as an exclusive `flock` on an open file.
struct FileLease {
    // Closing the file releases the lock.
    _file: std::fs::File,
}

impl FileLease {
    fn try_acquire(path: &Path) -> Result<Option<Self>, StoreError> {
        use std::os::fd::AsRawFd;
        let file = open_private_file(path)?;
        // SAFETY: flock on a file descriptor this function owns and keeps
        // open for as long as the lock is meant to last.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked == 0 {
            return Ok(Some(Self { _file: file }));
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(StoreError::Unavailable(
                format!("cannot lock lease file {}: {error}", path.display()).into(),
            ))
        }
    }
}

impl Lease for FileLease {
    /// A file lock cannot be taken away while the file stays open.
    fn held(&mut self) -> bool {
        true
    }
}

/// How often the checkpointer looks at the WAL, and the size that makes it
/// copy the WAL back into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);
const CHECKPOINT_AT_BYTES: u64 = 4 << 20;
/// A WAL this large is checkpointed with RESTART, which waits for the
/// readers of older frames to finish so that the next commit writes the
/// WAL from its start again: under a steady load some reader always holds
/// an old frame, and PASSIVE checkpoints alone let the WAL grow without
/// bound (seen: 900 MB after a million events at 110,000 a second).
const CHECKPOINT_RESTART_AT_BYTES: u64 = 256 << 20;
/// What is left of a WAL file when it starts over (`journal_size_limit`).
const WAL_KEPT_BYTES: u64 = 64 << 20;

/// Copies the WAL into the database whenever it passed a few megabytes, for
/// as long as the store is open. PASSIVE: it never waits for readers or
/// writers, so it never stalls them; SQLite restarts the WAL from the top
/// once a checkpoint has caught up and no reader still needs old frames.
/// Past [`CHECKPOINT_RESTART_AT_BYTES`] it waits for those readers
/// (RESTART: writers pause for as long as that takes), so the file stops
/// growing.
fn checkpoint_loop(connection: Connection, store: std::sync::Weak<Shared>) {
    let wal = connection.path().map(|path| format!("{path}-wal"));
    loop {
        std::thread::sleep(CHECKPOINT_EVERY);
        match store.upgrade() {
            None => return,
            Some(shared) if shared.closed.load(std::sync::atomic::Ordering::Acquire) => return,
            Some(_) => {}
        }
        let wal_bytes = wal
            .as_deref()
            .and_then(|wal| std::fs::metadata(wal).ok())
            .map_or(u64::MAX, |metadata| metadata.len());
        if wal_bytes < CHECKPOINT_AT_BYTES {
            continue;
        }
        let mode = if wal_bytes >= CHECKPOINT_RESTART_AT_BYTES {
            "PRAGMA wal_checkpoint(RESTART)"
        } else {
            "PRAGMA wal_checkpoint(PASSIVE)"
        };
        if let Err(error) = connection.execute_batch(mode) {
            tracing::debug!(%error, "checkpoint skipped");
        }
    }
}

/// Learns of commits by other connections through `PRAGMA data_version`,
/// which changes when another connection commits and touches no disk.
pub(crate) struct DataVersionWatcher {
    connection: Connection,
    last_version: Option<i64>,
}

impl DataVersionWatcher {
    pub(crate) fn open(path: &Path, options: &SqliteOptions) -> Result<Self, StoreError> {
        Ok(Self {
            connection: open_connection(path, options.synchronous, options.busy_timeout)?,
            last_version: None,
        })
    }
}

impl ExternalChanges for DataVersionWatcher {
    fn changed(&mut self) -> Result<bool, StoreError> {
        let version: i64 = self
            .connection
            .query_row("PRAGMA data_version", [], |row| row.get(0))
            .map_err(map_error)?;
        let changed = self.last_version != Some(version);
        self.last_version = Some(version);
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::{rewrite_placeholders, MultiRowInsert};

    #[test]
    fn multi_row_inserts_number_their_placeholders_and_keep_the_full_statement() {
        let insert = MultiRowInsert::new("INSERT INTO t (a, b) VALUES ", 2, 3);
        assert_eq!(insert.sql(1), "INSERT INTO t (a, b) VALUES (?1,?2)");
        assert_eq!(
            insert.sql(3),
            "INSERT INTO t (a, b) VALUES (?1,?2),(?3,?4),(?5,?6)"
        );
        assert!(matches!(insert.sql(3), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn rewrites_placeholders_outside_quotes() {
        assert_eq!(
            rewrite_placeholders("SELECT '$1', $1, \"$2\" FROM t WHERE a = $12"),
            "SELECT '$1', ?1, \"$2\" FROM t WHERE a = ?12"
        );
        assert_eq!(rewrite_placeholders("SELECT 1"), "SELECT 1");
    }
}
