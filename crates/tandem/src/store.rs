//! The `Store` port: a service's own database, reached through transactions.
//!
//! Every engine (SQLite today, PostgreSQL later) implements [`Store`] and
//! [`Tx`]. Application code and the toolkit's own tables (outbox, consumer
//! positions, dead letters) speak to the database only through [`Tx`], with
//! portable SQL whose parameters are written `$1`, `$2`, ... (PostgreSQL's
//! style; the SQLite adapter rewrites them). No engine type crosses this
//! boundary.
//!
//! Work runs as a synchronous closure on a thread owned by the store, so a
//! transaction never spans an `.await` and never blocks the async runtime.

use std::future::Future;
use std::pin::Pin;

/// The future of a store operation: owns everything it needs, so it can be
/// sent to any task and outlive the handle that made it.
pub type StoreFuture<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send + 'static>>;

/// A parameter bound to a statement. Borrowed, so binding costs no copy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Param<'a> {
    /// SQL `NULL` (what `None` of any value becomes).
    Null,
    /// A 64-bit integer; booleans bind as 0 and 1, and `u64` values
    /// saturate at `i64::MAX`.
    Int(i64),
    /// A double-precision float.
    Real(f64),
    /// UTF-8 text.
    Text(&'a str),
    /// Raw bytes (a binary column on every engine).
    Blob(&'a [u8]),
}

impl From<i64> for Param<'_> {
    fn from(value: i64) -> Self {
        Param::Int(value)
    }
}
impl From<i32> for Param<'_> {
    fn from(value: i32) -> Self {
        Param::Int(value.into())
    }
}
impl From<u32> for Param<'_> {
    fn from(value: u32) -> Self {
        Param::Int(value.into())
    }
}
impl From<u64> for Param<'_> {
    /// Values above `i64::MAX` saturate; no Tandem quantity comes near it.
    fn from(value: u64) -> Self {
        Param::Int(i64::try_from(value).unwrap_or(i64::MAX))
    }
}
impl From<bool> for Param<'_> {
    fn from(value: bool) -> Self {
        Param::Int(value.into())
    }
}
impl From<f64> for Param<'_> {
    fn from(value: f64) -> Self {
        Param::Real(value)
    }
}
impl<'a> From<&'a str> for Param<'a> {
    fn from(value: &'a str) -> Self {
        Param::Text(value)
    }
}
impl<'a> From<&'a String> for Param<'a> {
    fn from(value: &'a String) -> Self {
        Param::Text(value)
    }
}
impl<'a> From<&'a [u8]> for Param<'a> {
    fn from(value: &'a [u8]) -> Self {
        Param::Blob(value)
    }
}
impl<'a> From<&'a Vec<u8>> for Param<'a> {
    fn from(value: &'a Vec<u8>) -> Self {
        Param::Blob(value)
    }
}
impl<'a, T> From<Option<T>> for Param<'a>
where
    T: Into<Param<'a>>,
{
    fn from(value: Option<T>) -> Self {
        value.map_or(Param::Null, Into::into)
    }
}

/// Builds a `&[Param]` from values: `params![id, name, 42_i64]`.
#[macro_export]
macro_rules! params {
    () => { &[] as &[$crate::store::Param<'_>] };
    ($($value:expr),+ $(,)?) => { &[$($crate::store::Param::from($value)),+] as &[$crate::store::Param<'_>] };
}

/// A value read from a row. Each engine reads its column types into
/// these five; integers and booleans both come back as [`Value::Int`].
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL `NULL`.
    Null,
    /// An integer (or a boolean, as 0 or 1).
    Int(i64),
    /// A float (or, on PostgreSQL, a `NUMERIC` that is not a whole
    /// `i64`).
    Real(f64),
    /// Text (on PostgreSQL also `JSON` and `JSONB`).
    Text(String),
    /// Raw bytes.
    Blob(Vec<u8>),
}

/// One row of a query result. Its typed getters take the column's index
/// (from 0, in the order of the `SELECT`) and fail with
/// [`StoreError::Decode`] when the column is missing or holds another
/// kind of value: they never convert one kind into another, except that
/// [`Row::bytes`] and [`Row::take_bytes`] also read text.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Row {
    /// The row's columns, in the order of the query.
    pub values: Vec<Value>,
}

impl Row {
    fn value(&self, index: usize) -> Result<&Value, StoreError> {
        self.values
            .get(index)
            .ok_or_else(|| StoreError::Decode(format!("no column {index}").into()))
    }

    /// An integer column; `NULL` is an error (see [`Row::opt_i64`]).
    pub fn i64(&self, index: usize) -> Result<i64, StoreError> {
        match self.value(index)? {
            Value::Int(value) => Ok(*value),
            other => Err(StoreError::Decode(
                format!("column {index}: expected integer, found {other:?}").into(),
            )),
        }
    }

    /// An integer column that may be `NULL` (`None`).
    pub fn opt_i64(&self, index: usize) -> Result<Option<i64>, StoreError> {
        match self.value(index)? {
            Value::Null => Ok(None),
            _ => self.i64(index).map(Some),
        }
    }

    /// A text column, borrowed; `NULL` is an error (see
    /// [`Row::opt_text`]).
    pub fn text(&self, index: usize) -> Result<&str, StoreError> {
        match self.value(index)? {
            Value::Text(value) => Ok(value),
            other => Err(StoreError::Decode(
                format!("column {index}: expected text, found {other:?}").into(),
            )),
        }
    }

    /// A text column that may be `NULL` (`None`).
    pub fn opt_text(&self, index: usize) -> Result<Option<&str>, StoreError> {
        match self.value(index)? {
            Value::Null => Ok(None),
            _ => self.text(index).map(Some),
        }
    }

    /// Moves a text column out of the row (leaving it empty), without a copy.
    pub fn take_text(&mut self, index: usize) -> Result<String, StoreError> {
        match self.values.get_mut(index) {
            Some(Value::Text(value)) => Ok(std::mem::take(value)),
            _ => self.text(index).map(str::to_owned),
        }
    }

    /// Moves a blob or text column out of the row (leaving it empty), without a
    /// copy.
    pub fn take_bytes(&mut self, index: usize) -> Result<Vec<u8>, StoreError> {
        match self.values.get_mut(index) {
            Some(Value::Blob(value)) => Ok(std::mem::take(value)),
            Some(Value::Text(value)) => Ok(std::mem::take(value).into_bytes()),
            _ => self.bytes(index).map(<[u8]>::to_vec),
        }
    }

    /// Bytes of a blob or text column.
    pub fn bytes(&self, index: usize) -> Result<&[u8], StoreError> {
        match self.value(index)? {
            Value::Blob(value) => Ok(value),
            Value::Text(value) => Ok(value.as_bytes()),
            other => Err(StoreError::Decode(
                format!("column {index}: expected bytes, found {other:?}").into(),
            )),
        }
    }
}

/// What an error of a port says, and the error underneath it, if any: an
/// engine's own error (`rusqlite::Error`, `postgres::Error`, a Kafka or
/// NATS error, an I/O error) stays reachable through
/// [`std::error::Error::source`], so a log line that follows the chain
/// says what failed underneath. Made from a message (`"...".into()`,
/// `format!(..).into()`) or with [`Cause::with_source`].
pub struct Cause {
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Cause {
    /// `message`, with `source` as the error underneath it.
    pub fn with_source(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// `message`, with an already boxed `source` (`async_nats::Error`, say).
    pub fn with_boxed_source(
        message: impl Into<String>,
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    ) -> Self {
        Self {
            message: message.into(),
            source: Some(source),
        }
    }

    /// The message alone.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The error underneath, if any.
    pub fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::fmt::Debug for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{:?} (source: {source:?})", self.message),
            None => write!(f, "{:?}", self.message),
        }
    }
}

impl From<String> for Cause {
    fn from(message: String) -> Self {
        Self {
            message,
            source: None,
        }
    }
}

impl From<&str> for Cause {
    fn from(message: &str) -> Self {
        message.to_owned().into()
    }
}

impl PartialEq<&str> for Cause {
    fn eq(&self, other: &&str) -> bool {
        self.message == *other
    }
}

/// Errors at the store boundary.
#[derive(Debug)]
pub enum StoreError {
    /// A uniqueness rule refused the write: for the outbox, another writer
    /// committed the same aggregate sequence first.
    Conflict(Cause),
    /// The engine could not be reached or refused to work (locked, I/O).
    Unavailable(Cause),
    /// A column did not hold what the caller expected.
    Decode(Cause),
    /// Any other engine error.
    Engine(Cause),
}

impl StoreError {
    /// What the error says (without its kind).
    pub fn cause(&self) -> &Cause {
        match self {
            StoreError::Conflict(cause)
            | StoreError::Unavailable(cause)
            | StoreError::Decode(cause)
            | StoreError::Engine(cause) => cause,
        }
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Conflict(cause) => write!(f, "conflict: {cause}"),
            StoreError::Unavailable(cause) => write!(f, "store unavailable: {cause}"),
            StoreError::Decode(cause) => write!(f, "unexpected column value: {cause}"),
            StoreError::Engine(cause) => write!(f, "store error: {cause}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause().source()
    }
}

/// Which SQL family an engine speaks, for an application's own statements
/// that differ (schema definitions, mostly); see
/// [`crate::sql::EngineSql::dialect`]. The toolkit's own SQL that differs
/// lives with each engine, behind [`crate::sql::EngineSql`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// A transaction (or a read-only snapshot) on the service's database.
///
/// A `Tx` exists only inside the closure given to [`Store::write`] or
/// [`Store::read`], on the store's own thread: its calls block that thread,
/// never the async runtime, and it cannot be kept past the closure. SQL is
/// portable, with `$1`, `$2`, ... for parameters on every engine. After a
/// statement fails, the transaction may be unusable (PostgreSQL aborts it):
/// return the error, or run a statement that may fail under a savepoint
/// and roll back to it.
pub trait Tx {
    /// The engine's implementation of the toolkit's SQL that differs
    /// between engines (and, through it, the engine's [`Dialect`]).
    fn engine(&self) -> &'static dyn crate::sql::EngineSql;
    /// Runs one statement; returns the number of rows changed.
    fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, StoreError>;
    /// Runs a query and returns all its rows.
    fn query(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, StoreError>;
    /// Runs several statements without parameters (schema set-up).
    fn execute_batch(&mut self, sql: &str) -> Result<(), StoreError>;
    /// Marks a point that [`Tx::rollback_to_savepoint`] can return to.
    fn savepoint(&mut self, name: &str) -> Result<(), StoreError> {
        self.execute_batch(&format!("SAVEPOINT {name}"))
    }
    /// Forgets the savepoint `name`, keeping what was done since it.
    fn release_savepoint(&mut self, name: &str) -> Result<(), StoreError> {
        self.execute_batch(&format!("RELEASE SAVEPOINT {name}"))
    }
    /// Undoes what was done since the savepoint `name`, then releases it:
    /// the transaction goes on as if the work between had not run.
    fn rollback_to_savepoint(&mut self, name: &str) -> Result<(), StoreError> {
        self.execute_batch(&format!("ROLLBACK TO SAVEPOINT {name}"))?;
        self.release_savepoint(name)
    }
    /// Tells the store that this transaction appended to the outbox, so that
    /// relays waiting in this process are woken when it commits.
    fn outbox_appended(&mut self);

    /// The first row of a query, if any.
    fn query_opt(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }
}

/// A service's database. Cloning is cheap and shares the connections.
///
/// Work is a synchronous closure run on a thread the store owns, so a
/// transaction never spans an `.await`; the returned future only waits for
/// its answer. The trait has generic methods and cannot be a trait object:
/// code that must choose an engine at run time holds an enum of them
/// (`tandem_engines::AnyStore`). The toolkit's own tables (outbox,
/// positions, dead letters, ...) live in the same database, so a service's
/// state change and what it publishes or applies commit together.
pub trait Store: Clone + Send + Sync + 'static {
    /// Runs `work` in one write transaction and commits it if `work` returns
    /// `Ok`; rolls back otherwise. Writers are serialised per store. When
    /// several writes are queued the store may commit them together, each
    /// under a savepoint of its own: a failing `work` still undoes only
    /// itself, but a commit that fails fails all of them (as
    /// [`StoreError::Unavailable`] or [`StoreError::Engine`], never
    /// `Conflict`). An `Err` therefore does not always mean `work` failed:
    /// work that is retried must be safe to run again.
    fn write<R, E, F>(&self, work: F) -> StoreFuture<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&mut dyn Tx) -> Result<R, E> + Send + 'static;

    /// Runs `work` on a read-only snapshot; it may run beside writers.
    fn read<R, E, F>(&self, work: F) -> StoreFuture<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&mut dyn Tx) -> Result<R, E> + Send + 'static;

    /// A counter bumped whenever a transaction of this process that
    /// appended to the outbox commits: relays in this process wait on it.
    fn outbox_signal(&self) -> tokio::sync::watch::Receiver<u64>;

    /// A cheap way to learn of commits made by other processes (for SQLite,
    /// `PRAGMA data_version` on a connection of its own). Each caller gets
    /// its own watcher.
    fn external_changes(&self) -> Result<Box<dyn ExternalChanges>, StoreError>;

    /// Tries to become the one leader named `name` among every process
    /// sharing this database (relays use it so that one instance of a
    /// service publishes). `Ok(None)`: another holder has it now. The lease
    /// is released when dropped, and by the engine when the holding process
    /// dies (PostgreSQL: a session advisory lock on a connection of its own;
    /// SQLite: an OS file lock beside the database file).
    fn try_lead(&self, name: &str) -> StoreFuture<Option<Box<dyn Lease>>, StoreError>;

    /// Closes the store at a clean stop, for every handle: what was queued
    /// is done, the connections are closed and, for a file, everything
    /// written is in the database file itself (SQLite: the WAL is
    /// checkpointed and, unless another process has the file open,
    /// removed), so that a copy of the file alone is a whole backup. Any
    /// use afterwards fails as unavailable. The default does nothing.
    fn close(&self) -> StoreFuture<(), StoreError> {
        Box::pin(async { Ok(()) })
    }
}

/// A leadership held by this process; released on drop.
pub trait Lease: Send {
    /// Whether the lease is still held. Cheap and never blocks: an engine
    /// whose lease can be lost (a connection that died) watches it on a
    /// thread of its own and reports the loss here within about a second.
    fn held(&mut self) -> bool;
}

/// Tells whether other processes may have committed since the last call.
pub trait ExternalChanges: Send {
    /// Whether another process may have committed since the previous call
    /// (at least: appended to the outbox); the first call says `true`. It
    /// may say `true` for nothing new, never `false` after such a commit.
    /// Cheap: one pragma on SQLite, a flag set by a listening thread on
    /// PostgreSQL.
    fn changed(&mut self) -> Result<bool, StoreError>;
}
