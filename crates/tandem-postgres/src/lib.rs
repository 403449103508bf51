//! PostgreSQL engine for Tandem's [`Store`] port: a service's own database
//! on a PostgreSQL server (15 or later; 13 at the very least, for
//! `pg_current_xact_id`).
//!
//! ```ignore
//! let store = tandem_postgres::PostgresStore::connect(
//!     "postgres://app@db.internal:5432/orders?sslmode=require",
//! ).await?;
//! ```
//!
//! # How it works
//!
//! The synchronous `postgres` client runs on threads the store owns (it
//! drives a small runtime of its own, so it is never called from a tokio
//! worker): one writer thread and a pool of reader threads, each with its
//! own connection, run by the toolkit's shared executor
//! ([`tandem::executor`]); this crate supplies the connection. [`Store::write`] and [`Store::read`] hand a closure to
//! those threads over a channel and complete a oneshot.
//!
//! - **Writers are serialised per database, across processes.** Every write
//!   transaction begins with `SELECT pg_advisory_xact_lock(..)` on one key
//!   for all Tandem writers of the database, so several instances of a
//!   service sharing a database still write one at a time (the toolkit's
//!   invariants rely on it). The lock is released by the commit.
//! - **Group commit**, as on SQLite: the writer thread takes every queued
//!   write job, runs each under its own `SAVEPOINT` in one transaction (a
//!   failing job undoes only itself) and commits once; a lone job runs its
//!   own transaction.
//! - **Reads** run in `REPEATABLE READ READ ONLY` transactions on the
//!   reader pool ([`PostgresOptions::readers`]).
//! - **Wake-ups.** A commit that appended to the outbox runs
//!   `NOTIFY tandem_outbox` inside its transaction (delivered on commit) and
//!   bumps [`Store::outbox_signal`] in this process; [`Store::external_changes`]
//!   watches `LISTEN tandem_outbox` on a connection of its own, so relays of
//!   other processes sharing the database wake too.
//! - **Leases** ([`Store::try_lead`]): `pg_try_advisory_lock` on a session
//!   connection owned by the lease; it is lost when that connection dies, and
//!   the server releases it when the holding process dies.
//! - **Reconnects.** A broken connection (server restarted) fails the job
//!   that met it with [`StoreError::Unavailable`] and is replaced on the
//!   next job.
//!
//! # Values
//!
//! Parameters (`$1`, ...) are converted to the type PostgreSQL infers for
//! each of them: [`Param::Int`] binds as `BIGINT`, `INTEGER`, `SMALLINT` or
//! `BOOLEAN` (and as text or a float where the column is one), `Real` as
//! `DOUBLE PRECISION`/`REAL`, `Text` as any text type (or `BYTEA`), `Blob` as
//! `BYTEA` (or text, if UTF-8). Columns read back as [`Value::Int`]
//! (`BIGINT`, `INTEGER`, `SMALLINT`, `BOOLEAN`, `OID`, integral `NUMERIC`
//! such as `SUM(bigint)`), `Real` (`DOUBLE PRECISION`, `REAL`, other
//! `NUMERIC`), `Text` (text types, `JSON`, `JSONB`), `Blob` (`BYTEA`), `Null`.
//!
//! # Errors
//!
//! Unique violations (`23505`) are [`StoreError::Conflict`]; connection
//! failures, serialization failures (`40001`), deadlocks (`40P01`) and
//! server shutdowns (class `57P`) are [`StoreError::Unavailable`]; any other
//! constraint violation (NOT NULL, CHECK, foreign key) is
//! [`StoreError::Engine`], as on SQLite. A failed group commit is
//! `Unavailable` or `Engine` as the executor documents.
//!
//! # URLs and TLS
//!
//! `postgres://user[:password]@host[:port]/database?option=value` or the
//! key=value form (`host=db user=app dbname=orders sslmode=verify-full`);
//! options are those of the `postgres` crate, e.g. `connect_timeout=10`,
//! `application_name=orders`, plus libpq's `sslmode` and `sslrootcert`,
//! which this crate carries out:
//!
//! - `sslmode=disable`: plaintext.
//! - `sslmode=prefer` (the default, as in libpq and `psql`): TLS if the
//!   server offers it, else plaintext, which is logged as a warning (once a
//!   store). The certificate is not checked.
//! - `sslmode=require`: TLS or no connection; the certificate is not
//!   checked, unless `sslrootcert` is given (then as `verify-ca`, as in
//!   libpq).
//! - `sslmode=verify-ca`: TLS, with a certificate signed by a CA of
//!   `sslrootcert` (a PEM file; without it, or with `sslrootcert=system`,
//!   the system's CAs); any host name.
//! - `sslmode=verify-full`: `verify-ca`, and the certificate names the host
//!   connected to (the URL's host; with `hostaddr=`, still that name).
//!
//! `prefer` stays the default so that a URL means here what it means to
//! libpq and `psql`, and so that servers without TLS (a developer's) keep
//! working; it encrypts against eavesdropping but not against a server
//! impersonated on the way. Across networks you do not control, use
//! `sslmode=verify-full&sslrootcert=/path/to/ca.pem`.
//! Messages name `host:port/database`, never the password.

#![warn(missing_docs)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use postgres::error::SqlState;
use postgres::types::{FromSql, IsNull, ToSql, Type};
use postgres::{Client, GenericClient, Statement};
use tandem::executor::{EngineConnection, Executor};
use tandem::store::{
    Cause, ExternalChanges, Lease, Param, Row, Store, StoreError, StoreFuture, Tx, Value,
};
use tokio::sync::{oneshot, watch};

pub mod sql;
pub mod testing;
mod tls;

/// The advisory lock key every Tandem write transaction takes (`"tandemW"`):
/// one writer at a time per database, across processes. Outside the range
/// of `hashtext`, which keys the leases.
pub const WRITER_LOCK_KEY: i64 = 0x0074_616e_6465_6d57;

/// The channel a commit that appended to the outbox notifies.
pub const OUTBOX_CHANNEL: &str = "tandem_outbox";

/// Prepared statements kept per connection.
const STATEMENT_CACHE: usize = 256;

/// How often a lease and a LISTEN watcher look at their connection.
const WATCH_EVERY: Duration = Duration::from_millis(250);

/// How to open a PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Reader connections (and threads); at least 1.
    pub readers: usize,
    /// Connect timeout, unless the URL sets `connect_timeout`.
    pub connect_timeout: Duration,
    /// Install the toolkit's tables on open.
    pub install_schema: bool,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            readers: 2,
            connect_timeout: Duration::from_secs(5),
            install_schema: true,
        }
    }
}

// ---------------------------------------------------------------------------
// Connecting.

/// Makes connections to one database: the parsed URL and its TLS mode.
#[derive(Clone)]
pub(crate) struct Connector {
    config: postgres::Config,
    tls: Option<postgres_openssl::MakeTlsConnector>,
    /// Whether a plaintext fallback of `prefer` was logged (once a store).
    warned: Arc<AtomicBool>,
    described: String,
}

impl Connector {
    pub(crate) fn new(url: &str, connect_timeout: Duration) -> Result<Self, StoreError> {
        let (rest, tls_options) = tls::take_tls_options(url)?;
        let mut config: postgres::Config = rest.parse().map_err(|error| {
            StoreError::Engine(
                format!(
                    "not a PostgreSQL URL ({}); expected postgres://user@host:port/database",
                    error_chain(&error)
                )
                .into(),
            )
        })?;
        config.ssl_mode(tls_options.mode.driver_mode());
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("tandem");
        }
        config.keepalives_idle(Duration::from_secs(15));
        let described = describe(&config);
        let tls = tls::connector(&tls_options)
            .map_err(|error| StoreError::Engine(format!("{described}: {error}").into()))?;
        Ok(Self {
            config,
            tls,
            warned: Arc::new(AtomicBool::new(false)),
            described,
        })
    }

    /// `host:port/database`, for messages.
    /// The database's name (the metric label of its commits).
    pub(crate) fn database(&self) -> &str {
        self.config.get_dbname().unwrap_or("postgres")
    }

    pub(crate) fn described(&self) -> &str {
        &self.described
    }

    /// Connects; blocking (call it from a plain thread).
    pub(crate) fn connect(&self) -> Result<Client, StoreError> {
        let connected = match &self.tls {
            Some(tls) => {
                let used = Arc::new(AtomicBool::new(false));
                let watched = tls::Watched {
                    inner: tls.clone(),
                    used: Arc::clone(&used),
                };
                // Only `prefer` goes on when the server refuses TLS.
                self.config.connect(watched).inspect(|_| {
                    if !used.load(Ordering::Acquire) && !self.warned.swap(true, Ordering::AcqRel) {
                        tracing::warn!(
                            "PostgreSQL at {} offers no TLS: sslmode=prefer goes on in plaintext \
                             (sslmode=verify-full requires TLS and checks the server)",
                            self.described
                        );
                    }
                })
            }
            None => self.config.connect(postgres::NoTls),
        };
        connected.map_err(|error| {
            let reason = match error.as_db_error() {
                Some(db) => db.message().to_owned(),
                None => error_chain(&error),
            };
            StoreError::Unavailable(
                format!("PostgreSQL not reachable at {}: {reason}", self.described).into(),
            )
        })
    }
}

/// An error and its sources, `: `-separated (the TLS failure's reason, e.g.
/// a certificate that does not verify, is a source).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let shown = cause.to_string();
        if !text.contains(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        source = cause.source();
    }
    text
}

fn describe(config: &postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let database = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("{host}:{port}/{database}")
}

/// Maps a driver error; `closed` tells whether the connection is gone.
pub(crate) fn map_error(error: postgres::Error, closed: bool) -> StoreError {
    if let Some(code) = error.code() {
        let text = match error.as_db_error() {
            Some(db) => match db.detail() {
                Some(detail) => format!("{} ({}): {detail}", db.message(), code.code()),
                None => format!("{} ({})", db.message(), code.code()),
            },
            None => error.to_string(),
        };
        let unique = *code == SqlState::UNIQUE_VIOLATION;
        let class = &code.code()[..2];
        if *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::LOCK_NOT_AVAILABLE
            || *code == SqlState::TOO_MANY_CONNECTIONS
            || class == "08"
            || class == "57"
            || class == "53"
        {
            return StoreError::Unavailable(Cause::with_source(text, error));
        }
        let cause = Cause::with_source(text, error);
        return if unique {
            StoreError::Conflict(cause)
        } else {
            StoreError::Engine(cause)
        };
    }
    let io = std::error::Error::source(&error).is_some_and(|source| source.is::<std::io::Error>());
    if closed || io || error.is_closed() {
        StoreError::Unavailable(Cause::with_source(
            format!("connection lost: {error}"),
            error,
        ))
    } else {
        StoreError::Engine(Cause::with_source(error.to_string(), error))
    }
}

// ---------------------------------------------------------------------------
// Values.

/// A [`Param`] bound as whatever type PostgreSQL inferred for its slot.
#[derive(Debug)]
struct Bound<'p, 'a>(&'p Param<'a>);

type BoxError = Box<dyn std::error::Error + Sync + Send>;

fn refuse(param: &Param<'_>, ty: &Type) -> BoxError {
    format!("cannot bind {param:?} to a parameter of type {ty}").into()
}

impl ToSql for Bound<'_, '_> {
    fn to_sql(&self, ty: &Type, out: &mut bytes::BytesMut) -> Result<IsNull, BoxError> {
        match *self.0 {
            Param::Null => Ok(IsNull::Yes),
            Param::Int(value) => match *ty {
                Type::INT8 => value.to_sql(ty, out),
                Type::INT4 => i32::try_from(value)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(value)?.to_sql(ty, out),
                Type::BOOL => (value != 0).to_sql(ty, out),
                Type::OID => u32::try_from(value)?.to_sql(ty, out),
                Type::FLOAT8 => (value as f64).to_sql(ty, out),
                Type::FLOAT4 => (value as f32).to_sql(ty, out),
                Type::NUMERIC => {
                    encode_numeric(value, out);
                    Ok(IsNull::No)
                }
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                    value.to_string().as_str().to_sql(&Type::TEXT, out)
                }
                _ => Err(refuse(self.0, ty)),
            },
            Param::Real(value) => match *ty {
                Type::FLOAT8 => value.to_sql(ty, out),
                Type::FLOAT4 => (value as f32).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::UNKNOWN => {
                    value.to_string().as_str().to_sql(&Type::TEXT, out)
                }
                _ => Err(refuse(self.0, ty)),
            },
            Param::Text(value) => match *ty {
                Type::BYTEA => value.as_bytes().to_sql(ty, out),
                Type::JSON => {
                    out.extend_from_slice(value.as_bytes());
                    Ok(IsNull::No)
                }
                Type::JSONB => {
                    out.extend_from_slice(&[1]);
                    out.extend_from_slice(value.as_bytes());
                    Ok(IsNull::No)
                }
                _ if <&str as ToSql>::accepts(ty) => value.to_sql(ty, out),
                Type::UNKNOWN => value.to_sql(&Type::TEXT, out),
                _ => Err(refuse(self.0, ty)),
            },
            Param::Blob(value) => match *ty {
                Type::BYTEA => value.to_sql(ty, out),
                _ if <&str as ToSql>::accepts(ty) => std::str::from_utf8(value)?.to_sql(ty, out),
                _ => Err(refuse(self.0, ty)),
            },
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

/// The type a value binds as where PostgreSQL cannot infer one.
fn type_of(param: &Param<'_>) -> Type {
    match param {
        Param::Int(_) => Type::INT8,
        Param::Real(_) => Type::FLOAT8,
        Param::Blob(_) => Type::BYTEA,
        Param::Null | Param::Text(_) => Type::TEXT,
    }
}

/// Writes an integer in `NUMERIC`'s binary form (base-10000 digits).
fn encode_numeric(value: i64, out: &mut bytes::BytesMut) {
    let negative = value < 0;
    let mut magnitude = value.unsigned_abs();
    let mut digits = Vec::new();
    while magnitude > 0 {
        digits.push((magnitude % 10_000) as i16);
        magnitude /= 10_000;
    }
    digits.reverse();
    let weight = digits.len() as i16 - 1;
    out.extend_from_slice(&(digits.len() as i16).to_be_bytes());
    out.extend_from_slice(&weight.max(0).to_be_bytes());
    out.extend_from_slice(&(if negative { 0x4000u16 } else { 0 }).to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    for digit in digits {
        out.extend_from_slice(&digit.to_be_bytes());
    }
}

/// A column read as a [`Value`].
struct Read(Value);

impl<'a> FromSql<'a> for Read {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        Ok(Read(match *ty {
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT2 => Value::Int(i16::from_sql(ty, raw)?.into()),
            Type::BOOL => Value::Int(bool::from_sql(ty, raw)?.into()),
            Type::OID => Value::Int(u32::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
            Type::FLOAT4 => Value::Real(f32::from_sql(ty, raw)?.into()),
            Type::NUMERIC => decode_numeric(raw)?,
            Type::BYTEA => Value::Blob(raw.to_vec()),
            Type::JSON => Value::Text(std::str::from_utf8(raw)?.to_owned()),
            Type::JSONB => {
                Value::Text(std::str::from_utf8(raw.get(1..).unwrap_or(&[]))?.to_owned())
            }
            _ if <&str as FromSql>::accepts(ty) || *ty == Type::UNKNOWN => {
                Value::Text(std::str::from_utf8(raw)?.to_owned())
            }
            _ => return Err(format!("cannot read a column of type {ty}").into()),
        }))
    }

    fn from_sql_null(_: &Type) -> Result<Self, BoxError> {
        Ok(Read(Value::Null))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// `NUMERIC` in binary form: an integer if it is one and fits, else a float.
fn decode_numeric(raw: &[u8]) -> Result<Value, BoxError> {
    let word = |index: usize| -> Result<u16, BoxError> {
        raw.get(index * 2..index * 2 + 2)
            .map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]))
            .ok_or_else(|| "short numeric".into())
    };
    let count = word(0)? as usize;
    let weight = word(1)? as i16;
    let sign = word(2)?;
    let scale = word(3)?;
    if sign == 0xC000 {
        return Ok(Value::Real(f64::NAN));
    }
    let mut float = 0f64;
    let mut integer: Option<i128> = Some(0);
    for index in 0..count {
        let digit = word(4 + index)?;
        let power = i32::from(weight) - index as i32;
        float += f64::from(digit) * 10_000f64.powi(power);
        integer = match integer {
            Some(sum) if power >= 0 => 10_000i128
                .checked_pow(power as u32)
                .and_then(|scale| sum.checked_add(i128::from(digit) * scale)),
            Some(sum) if digit == 0 => Some(sum),
            _ => None,
        };
    }
    let negative = sign == 0x4000;
    if scale == 0 {
        if let Some(value) = integer
            .map(|value| if negative { -value } else { value })
            .and_then(|value| i64::try_from(value).ok())
        {
            return Ok(Value::Int(value));
        }
    }
    Ok(Value::Real(if negative { -float } else { float }))
}

// ---------------------------------------------------------------------------
// Transactions.

/// A [`Tx`] over a PostgreSQL connection (a [`postgres::Client`] inside a
/// transaction the caller opened, or a [`postgres::Transaction`]).
///
/// The store makes these itself; [`PostgresTx::new`] is public so tests
/// (and tools) can run the toolkit's functions, such as
/// `tandem::outbox::append`, inside a transaction of their own, e.g. on a
/// connection that does not take the store's writer lock. A transaction
/// made that way does not notify relays unless its owner commits a
/// `NOTIFY tandem_outbox` ([`PostgresTx::appended`] tells whether one is
/// due).
pub struct PostgresTx<'c, C: GenericClient> {
    client: &'c mut C,
    statements: Option<&'c mut HashMap<String, Statement>>,
    appended: bool,
    /// Savepoints open, innermost last.
    savepoints: Vec<String>,
    /// How many savepoints were open when a statement failed: PostgreSQL
    /// refuses every statement after a failure until the transaction rolls
    /// back to a savepoint older than the failure.
    failed_within: Option<usize>,
}

impl<'c, C: GenericClient> PostgresTx<'c, C> {
    /// A `Tx` over `client`, which must be inside a transaction.
    pub fn new(client: &'c mut C) -> Self {
        Self {
            client,
            statements: None,
            appended: false,
            savepoints: Vec::new(),
            failed_within: None,
        }
    }

    fn cached(client: &'c mut C, statements: &'c mut HashMap<String, Statement>) -> Self {
        Self {
            statements: Some(statements),
            ..Self::new(client)
        }
    }

    /// Whether the work appended to the outbox.
    pub fn appended(&self) -> bool {
        self.appended
    }

    /// Whether a statement failed and was not undone by rolling back to a
    /// savepoint: committing would silently roll everything back.
    pub fn failed(&self) -> bool {
        self.failed_within.is_some()
    }

    fn note<T>(&mut self, result: Result<T, postgres::Error>) -> Result<T, StoreError> {
        result.map_err(|error| {
            if self.failed_within.is_none() {
                self.failed_within = Some(self.savepoints.len());
            }
            map_error(error, false)
        })
    }

    fn statement(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Statement, StoreError> {
        if let Some(statement) = self.statements.as_ref().and_then(|cache| cache.get(sql)) {
            return Ok(statement.clone());
        }
        let (statement, typed) = self.prepare(sql, params)?;
        if !typed {
            if let Some(cache) = self.statements.as_mut() {
                if cache.len() >= STATEMENT_CACHE {
                    cache.clear();
                }
                cache.insert(sql.to_owned(), statement.clone());
            }
        }
        Ok(statement)
    }

    /// Prepares `sql` with the parameter types PostgreSQL infers. Where it
    /// cannot infer one (`$1 IS NULL OR column = $1`), prepares again with
    /// types taken from the values given (then `true`: not cached, the
    /// types depend on the values). Runs under a savepoint, so a statement
    /// that does not prepare leaves the transaction usable.
    fn prepare(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<(Statement, bool), StoreError> {
        let begun = self.client.batch_execute("SAVEPOINT tandem_prepare");
        self.note(begun)?;
        let mut typed = false;
        let mut prepared = self.client.prepare(sql);
        if prepared
            .as_ref()
            .err()
            .and_then(postgres::Error::code)
            .is_some_and(|code| {
                *code == SqlState::INDETERMINATE_DATATYPE || *code == SqlState::AMBIGUOUS_PARAMETER
            })
        {
            let undone = self
                .client
                .batch_execute("ROLLBACK TO SAVEPOINT tandem_prepare");
            self.note(undone)?;
            let types: Vec<Type> = params.iter().map(type_of).collect();
            prepared = self.client.prepare_typed(sql, &types);
            typed = true;
        }
        let end = match prepared {
            Ok(_) => "RELEASE SAVEPOINT tandem_prepare",
            Err(_) => "ROLLBACK TO SAVEPOINT tandem_prepare; RELEASE SAVEPOINT tandem_prepare",
        };
        let ended = self.client.batch_execute(end);
        self.note(ended)?;
        prepared
            .map(|statement| (statement, typed))
            .map_err(|error| map_error(error, false))
    }

    fn forget(&mut self, sql: &str) {
        if let Some(cache) = self.statements.as_mut() {
            cache.remove(sql);
        }
    }

    fn with_params<R>(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
        run: impl FnOnce(&mut C, &Statement, &[&(dyn ToSql + Sync)]) -> Result<R, postgres::Error>,
    ) -> Result<R, StoreError> {
        let statement = self.statement(sql, params)?;
        let bound: Vec<Bound<'_, '_>> = params.iter().map(Bound).collect();
        let refs: Vec<&(dyn ToSql + Sync)> = bound
            .iter()
            .map(|param| param as &(dyn ToSql + Sync))
            .collect();
        let result = run(self.client, &statement, &refs);
        if result.is_err() {
            self.forget(sql);
        }
        self.note(result)
    }

    fn savepoint_sql(&mut self, sql: &str) -> Result<(), StoreError> {
        let result = self.client.batch_execute(sql);
        self.note(result)
    }
}

impl<C: GenericClient> Tx for PostgresTx<'_, C> {
    fn engine(&self) -> &'static dyn tandem::sql::EngineSql {
        &sql::POSTGRES
    }

    fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, StoreError> {
        self.with_params(sql, params, |client, statement, params| {
            client.execute(statement, params)
        })
    }

    fn query(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, StoreError> {
        let rows = self.with_params(sql, params, |client, statement, params| {
            client.query(statement, params)
        })?;
        rows.iter()
            .map(|row| {
                (0..row.len())
                    .map(|index| {
                        row.try_get::<_, Read>(index)
                            .map(|read| read.0)
                            .map_err(|error| {
                                StoreError::Decode(format!("column {index}: {error}").into())
                            })
                    })
                    .collect::<Result<Vec<Value>, StoreError>>()
                    .map(|values| Row { values })
            })
            .collect()
    }

    fn execute_batch(&mut self, sql: &str) -> Result<(), StoreError> {
        let result = self.client.batch_execute(sql);
        self.note(result)
    }

    fn savepoint(&mut self, name: &str) -> Result<(), StoreError> {
        self.savepoint_sql(&format!("SAVEPOINT {}", quote(name)))?;
        self.savepoints.push(name.to_owned());
        Ok(())
    }

    fn release_savepoint(&mut self, name: &str) -> Result<(), StoreError> {
        self.savepoint_sql(&format!("RELEASE SAVEPOINT {}", quote(name)))?;
        if let Some(index) = self.savepoints.iter().rposition(|open| open == name) {
            self.savepoints.truncate(index);
        }
        Ok(())
    }

    fn rollback_to_savepoint(&mut self, name: &str) -> Result<(), StoreError> {
        self.savepoint_sql(&format!("ROLLBACK TO SAVEPOINT {}", quote(name)))?;
        if let Some(index) = self.savepoints.iter().rposition(|open| open == name) {
            // The failure happened with `within` savepoints open: rolling
            // back to one of those (index below `within`) undoes it.
            if self.failed_within.is_some_and(|within| index < within) {
                self.failed_within = None;
            }
        }
        self.release_savepoint(name)
    }

    fn outbox_appended(&mut self) {
        self.appended = true;
    }
}

// ---------------------------------------------------------------------------
// Store threads.

/// A connection of a store thread and its prepared statements.
struct Conn {
    client: Client,
    statements: HashMap<String, Statement>,
}

/// A store thread's connection, opened on demand and replaced when broken.
struct Slot {
    connector: Connector,
    conn: Option<Conn>,
}

impl Slot {
    fn get(&mut self) -> Result<&mut Conn, StoreError> {
        if self
            .conn
            .as_ref()
            .is_some_and(|conn| conn.client.is_closed())
        {
            self.conn = None;
        }
        if self.conn.is_none() {
            let client = self.connector.connect()?;
            self.conn = Some(Conn {
                client,
                statements: HashMap::new(),
            });
        }
        Ok(self.conn.as_mut().expect("connected"))
    }

    /// The open connection, without reconnecting (inside a transaction,
    /// a new connection would not be in it).
    fn current(&mut self) -> Result<&mut Conn, StoreError> {
        match self.conn.as_mut() {
            Some(conn) if !conn.client.is_closed() => Ok(conn),
            _ => Err(StoreError::Unavailable(
                "connection lost during the transaction".into(),
            )),
        }
    }

    /// Drops a connection that broke while in use.
    fn check(&mut self) {
        if self
            .conn
            .as_ref()
            .is_some_and(|conn| conn.client.is_closed())
        {
            self.conn = None;
        }
    }
}

fn begin_write(client: &mut Client) -> Result<(), StoreError> {
    client
        .batch_execute("BEGIN")
        .and_then(|()| {
            client
                .execute("SELECT pg_advisory_xact_lock($1)", &[&WRITER_LOCK_KEY])
                .map(|_| ())
        })
        .map_err(|error| {
            let closed = client.is_closed();
            let _ = client.batch_execute("ROLLBACK");
            map_error(error, closed)
        })
}

fn commit(client: &mut Client, appended: bool) -> Result<(), StoreError> {
    let sql = if appended {
        "NOTIFY tandem_outbox; COMMIT"
    } else {
        "COMMIT"
    };
    client.batch_execute(sql).map_err(|error| {
        let closed = client.is_closed();
        let _ = client.batch_execute("ROLLBACK");
        map_error(error, closed)
    })
}

/// The store threads' connections run on the shared
/// [`Executor`]: a write begins with `BEGIN` and the writer lock, a read is
/// `REPEATABLE READ READ ONLY`, and a commit that appended to the outbox
/// sends `NOTIFY tandem_outbox` with it.
impl EngineConnection for Slot {
    type Open = Conn;

    fn open(&mut self) -> Result<&mut Conn, StoreError> {
        self.get()
    }

    fn current(&mut self) -> Result<&mut Conn, StoreError> {
        Slot::current(self)
    }

    fn settle(&mut self) {
        self.check();
    }

    fn begin(conn: &mut Conn, write: bool) -> Result<(), StoreError> {
        if write {
            begin_write(&mut conn.client)
        } else {
            conn.client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .map_err(|error| map_error(error, false))
        }
    }

    fn finish(conn: &mut Conn, write: bool, appended: bool) -> Result<(), StoreError> {
        if write {
            commit(&mut conn.client, appended)
        } else {
            let _ = conn.client.batch_execute("ROLLBACK");
            Ok(())
        }
    }

    fn rollback(conn: &mut Conn) {
        let _ = conn.client.batch_execute("ROLLBACK");
    }

    fn execute_batch(conn: &mut Conn, sql: &str) -> Result<(), StoreError> {
        conn.client
            .batch_execute(sql)
            .map_err(|error| map_error(error, false))
    }

    fn run_work<R, E, F>(conn: &mut Conn, work: F) -> (Result<R, E>, bool)
    where
        E: From<StoreError>,
        F: FnOnce(&mut dyn Tx) -> Result<R, E>,
    {
        let mut tx = PostgresTx::cached(&mut conn.client, &mut conn.statements);
        let result = finish(work(&mut tx), &tx);
        (result, tx.appended)
    }
}

/// Refuses to commit work that swallowed a failed statement.
fn finish<R, E, C>(result: Result<R, E>, tx: &PostgresTx<'_, C>) -> Result<R, E>
where
    E: From<StoreError>,
    C: GenericClient,
{
    match result {
        Ok(_) if tx.failed() => Err(E::from(StoreError::Engine(
            "a statement failed inside the transaction and was not rolled back to a savepoint; \
             the transaction was rolled back"
                .into(),
        ))),
        other => other,
    }
}

struct Shared {
    connector: Connector,
    executor: Executor<Slot>,
}

/// A PostgreSQL database used as a service's store. Cloning is cheap and
/// shares the connections; the threads and connections close when the last
/// clone is dropped.
#[derive(Clone)]
pub struct PostgresStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PostgresStore")
            .field("database", &self.shared.connector.described)
            .finish()
    }
}

/// Runs `work` on a plain thread (the `postgres` client must not run on a
/// tokio worker) and awaits its result.
pub(crate) async fn off_runtime<R: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> Result<R, StoreError> + Send + 'static,
) -> Result<R, StoreError> {
    let (reply, answer) = oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _ = reply.send(work());
        })
        .map_err(|error| {
            StoreError::Engine(format!("cannot start thread {name}: {error}").into())
        })?;
    answer
        .await
        .map_err(|_| StoreError::Engine(format!("thread {name} stopped").into()))?
}

impl PostgresStore {
    /// Connects to the database `url` names with the default options and
    /// installs the toolkit's tables. Fails within about 5 s (or the URL's
    /// `connect_timeout`) when the server cannot be reached, with a message
    /// naming `host:port/database` (never the password).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, PostgresOptions::default()).await
    }

    /// [`PostgresStore::connect`] with options.
    pub async fn connect_with(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        let url = url.to_owned();
        let install = options.install_schema;
        let store = off_runtime("tandem-pg-connect", move || {
            Self::open_blocking(&url, options)
        })
        .await?;
        if install {
            store.write(|tx| tandem::schema::install(tx)).await?;
        }
        Ok(store)
    }

    fn open_blocking(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        let connector = Connector::new(url, options.connect_timeout)?;
        // Connect the writer now, so an unreachable server fails here.
        let writer = Slot {
            conn: Some(Conn {
                client: connector.connect()?,
                statements: HashMap::new(),
            }),
            connector: connector.clone(),
        };
        let readers = (0..options.readers.max(1))
            .map(|_| Slot {
                connector: connector.clone(),
                conn: None,
            })
            .collect();
        let executor = Executor::start("tandem-pg", connector.database(), writer, readers)?;
        Ok(Self {
            shared: Arc::new(Shared {
                connector,
                executor,
            }),
        })
    }

    /// `host:port/database` of this store, for messages.
    pub fn described(&self) -> &str {
        self.shared.connector.described()
    }
}

impl Store for PostgresStore {
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

    /// A `LISTEN tandem_outbox` connection on a thread of its own; reports a
    /// change when a notification arrived (and, conservatively, when its
    /// connection had to be made again).
    fn external_changes(&self) -> Result<Box<dyn ExternalChanges>, StoreError> {
        Ok(Box::new(NotifyWatcher::start(
            self.shared.connector.clone(),
        )?))
    }

    /// `pg_try_advisory_lock(hashtext('tandem-lead:' || name))` on a
    /// connection owned by the lease, which a thread checks every 250 ms.
    /// Ends the store's threads, each closing its connection (the
    /// server sees a clean disconnect, not a dropped socket).
    fn close(&self) -> StoreFuture<(), StoreError> {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || shared.executor.close())
                .await
                .map_err(|error| StoreError::Engine(format!("close task failed: {error}").into()))
        })
    }

    fn try_lead(&self, name: &str) -> StoreFuture<Option<Box<dyn Lease>>, StoreError> {
        let connector = self.shared.connector.clone();
        let name = name.to_owned();
        Box::pin(async move {
            let lease = off_runtime("tandem-pg-lease", move || {
                AdvisoryLease::try_acquire(&connector, &name)
            })
            .await?;
            Ok(lease.map(|lease| Box::new(lease) as Box<dyn Lease>))
        })
    }
}

// ---------------------------------------------------------------------------
// LISTEN/NOTIFY.

struct NotifyWatcher {
    notified: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl NotifyWatcher {
    fn start(connector: Connector) -> Result<Self, StoreError> {
        let notified = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_notified, thread_stop) = (Arc::clone(&notified), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("tandem-pg-listen".into())
            .spawn(move || listen_loop(&connector, &thread_notified, &thread_stop))
            .map_err(|error| {
                StoreError::Engine(format!("cannot start listen thread: {error}").into())
            })?;
        Ok(Self { notified, stop })
    }
}

fn listen_loop(connector: &Connector, notified: &AtomicBool, stop: &AtomicBool) {
    use postgres::fallible_iterator::FallibleIterator;
    let mut pause = Duration::from_millis(100);
    while !stop.load(Ordering::Relaxed) {
        let mut client = match connector.connect().and_then(|mut client| {
            match client.batch_execute("LISTEN tandem_outbox") {
                Ok(()) => Ok(client),
                Err(error) => Err(map_error(error, false)),
            }
        }) {
            Ok(client) => client,
            Err(error) => {
                tracing::debug!(%error, "outbox listener cannot connect; retrying");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        pause = Duration::from_millis(100);
        // Commits may have happened while no one listened.
        notified.store(true, Ordering::Release);
        while !stop.load(Ordering::Relaxed) && !client.is_closed() {
            let mut notifications = client.notifications();
            let mut iter = notifications.timeout_iter(WATCH_EVERY);
            loop {
                match iter.next() {
                    Ok(Some(_)) => notified.store(true, Ordering::Release),
                    Ok(None) => break,
                    Err(_) => break,
                }
            }
        }
    }
}

impl ExternalChanges for NotifyWatcher {
    fn changed(&mut self) -> Result<bool, StoreError> {
        Ok(self.notified.swap(false, Ordering::AcqRel))
    }
}

impl Drop for NotifyWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// Leases.

/// A session advisory lock on a connection of its own, watched by a thread.
struct AdvisoryLease {
    held: Arc<AtomicBool>,
    // Dropping the sender stops the watcher, which closes the connection
    // (and so releases the lock).
    _stop: mpsc::Sender<()>,
}

impl AdvisoryLease {
    fn try_acquire(connector: &Connector, name: &str) -> Result<Option<Self>, StoreError> {
        let mut client = connector.connect()?;
        let key = format!("tandem-lead:{name}");
        let acquired: bool = client
            .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key])
            .and_then(|row| row.try_get(0))
            .map_err(|error| map_error(error, false))?;
        if !acquired {
            return Ok(None);
        }
        let held = Arc::new(AtomicBool::new(true));
        let (stop, stopped) = mpsc::channel::<()>();
        let watched = Arc::clone(&held);
        std::thread::Builder::new()
            .name("tandem-pg-lease".into())
            .spawn(move || {
                // Until the lease is dropped (the sender goes away).
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(WATCH_EVERY) {
                    if client.is_valid(Duration::from_secs(1)).is_err() {
                        watched.store(false, Ordering::Release);
                        return;
                    }
                }
                let _ = client.batch_execute("SELECT pg_advisory_unlock_all()");
            })
            .map_err(|error| {
                StoreError::Engine(format!("cannot start lease thread: {error}").into())
            })?;
        Ok(Some(Self { held, _stop: stop }))
    }
}

impl Lease for AdvisoryLease {
    fn held(&mut self) -> bool {
        self.held.load(Ordering::Acquire)
    }
}

/// A savepoint name as a quoted identifier (names such as `inner` are
/// reserved words in PostgreSQL).
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
