//! Helpers for tests against a real PostgreSQL server: scratch databases
//! that vanish with their guard, raw connections, and running the toolkit's
//! functions inside a transaction of one's own.
//!
//! The server is the one `TANDEM_TEST_POSTGRES` names (a URL whose
//! database is used to create and drop the scratch databases), by default
//! [`DEFAULT_BASE_URL`]. A test that cannot reach it should fail, naming
//! the address, never skip.

use std::time::Duration;

use postgres::GenericClient;
use tandem::store::{StoreError, Tx};

use crate::{Connector, PostgresStore, PostgresTx};

/// The server tests use when `TANDEM_TEST_POSTGRES` is not set.
pub const DEFAULT_BASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// `TANDEM_TEST_POSTGRES`, or [`DEFAULT_BASE_URL`].
pub fn base_url() -> String {
    std::env::var("TANDEM_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_BASE_URL.to_owned())
}

/// A database created for one test (`tandem_t_<label>_<uuid>`), dropped
/// `WITH (FORCE)` (closing any connection still open to it) when the guard
/// is dropped. Safe to create and drop inside or outside a tokio runtime.
#[derive(Debug)]
pub struct ScratchDatabase {
    base: String,
    name: String,
    url: String,
}

impl ScratchDatabase {
    /// Creates a scratch database on the server of `base` (a URL whose
    /// database the guard connects to for `CREATE`/`DROP DATABASE`).
    pub async fn create(base: &str, label: &str) -> Result<Self, StoreError> {
        let base = base.to_owned();
        let label = label.to_owned();
        crate::off_runtime("tandem-pg-scratch", move || Self::create_now(&base, &label)).await
    }

    /// [`ScratchDatabase::create`], blocking the calling thread (the work
    /// runs on a thread of its own, so this may be called from a runtime).
    pub fn create_blocking(base: &str, label: &str) -> Result<Self, StoreError> {
        let base = base.to_owned();
        let label = label.to_owned();
        std::thread::spawn(move || Self::create_now(&base, &label))
            .join()
            .map_err(|_| StoreError::Engine("scratch database thread panicked".into()))?
    }

    fn create_now(base: &str, label: &str) -> Result<Self, StoreError> {
        let safe: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(20)
            .collect();
        let name = format!("tandem_t_{safe}_{}", uuid::Uuid::now_v7().simple());
        let mut admin = admin_connect(base)?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .map_err(|error| crate::map_error(error, false))?;
        Ok(Self {
            base: base.to_owned(),
            url: with_database(base, &name)?,
            name,
        })
    }

    /// The URL of the scratch database (the base URL's options kept).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The scratch database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Opens a store on the scratch database (toolkit tables installed).
    pub async fn store(&self) -> Result<PostgresStore, StoreError> {
        PostgresStore::connect(&self.url).await
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        let base = self.base.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || -> Result<(), StoreError> {
            let mut admin = admin_connect(&base)?;
            admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .map_err(|error| crate::map_error(error, false))
        })
        .join();
        if let Ok(Err(error)) = dropped {
            eprintln!("cannot drop scratch database {}: {error}", self.name);
        }
    }
}

fn admin_connect(base: &str) -> Result<postgres::Client, StoreError> {
    Connector::new(base, Duration::from_secs(5))?
        .connect()
        .map_err(|error| {
            StoreError::Unavailable(format!("{error}: start it with scripts/engines up").into())
        })
}

/// `url` with its database (the path) replaced by `database`.
pub fn with_database(url: &str, database: &str) -> Result<String, StoreError> {
    let parsed = tandem::engine::ParsedUrl::parse(url).map_err(|_| {
        StoreError::Engine("expected a postgres:// URL for scratch databases".into())
    })?;
    let mut url = format!("{}/{database}", parsed.scheme_and_authority());
    if let Some(query) = parsed.query() {
        url.push('?');
        url.push_str(&query);
    }
    Ok(url)
}

/// A raw connection to `url` (same TLS and timeout rules as the store),
/// taking no lock: for tests that need transactions the store would
/// serialise. Blocking: call it from a plain thread, not a tokio worker.
pub fn connect_raw(url: &str) -> Result<postgres::Client, StoreError> {
    Connector::new(url, Duration::from_secs(5))?.connect()
}

/// Runs `work` on a [`Tx`] over `transaction` (any open transaction, e.g. a
/// [`postgres::Transaction`]); the caller commits or rolls back. If the work
/// appended to the outbox, `NOTIFY tandem_outbox` is queued in the same
/// transaction, so relays listening wake when it commits. Blocking.
pub fn with_raw_tx<C, R>(transaction: &mut C, work: impl FnOnce(&mut dyn Tx) -> R) -> R
where
    C: GenericClient,
{
    let mut tx = PostgresTx::new(transaction);
    let result = work(&mut tx);
    if tx.appended() && !tx.failed() {
        let _ = transaction.batch_execute("NOTIFY tandem_outbox");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_the_database_and_keeps_options() {
        assert_eq!(
            with_database("postgres://u:p@h:1/postgres?sslmode=disable", "x").unwrap(),
            "postgres://u:p@h:1/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://u@h", "x").unwrap(),
            "postgres://u@h/x"
        );
    }
}
