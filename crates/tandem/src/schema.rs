//! The toolkit's own tables in a service's database, and the migrations
//! that make and upgrade them. Every store migrates its database when it
//! opens; each engine writes the tables in its own SQL
//! ([`crate::sql::EngineSql::migrations`]), and every database records the
//! steps applied in `tandem_schema_version` (see [`migrate`]).
//!
//! - `tandem_outbox`: the event store and outbox. On SQLite `position` is
//!   the relay's cursor (writers commit in position order); on PostgreSQL
//!   each row also records the id of the transaction that wrote it (`xid`),
//!   and the relay reads in `(xid, position)` order up to the oldest
//!   transaction still running (see [`crate::outbox::read_committed_after`]).
//! - `tandem_aggregates`: the last sequence given to each aggregate. Its row
//!   serialises writers of one aggregate, which is what keeps
//!   `(topic, subject, sequence)` unique in the outbox (no index needed), and
//!   sequences stay gap-free even after published rows are pruned.
//! - `tandem_relay_positions`: how far each relay has published, as
//!   `(xid, position)` (`xid` is 0 on SQLite).
//! - `tandem_consumer_positions`: next offset per consumer and partition.
//! - `tandem_consumer_aggregates`: last sequence applied per consumer and
//!   aggregate (the dedup and ordering record).
//! - `tandem_pending`: events that arrived ahead of a gap, waiting.
//! - `tandem_dead_letters`: parked events with their error and attempts,
//!   and their failure group (a fingerprint of the cause, computed in Rust
//!   and stored when the letter is parked; indexed for a group's page and
//!   for counting the parked letters by group).
//! - `tandem_consumer_requests`: replay, redrive and discard orders for a
//!   running consumer, from any process.
//! - `tandem_consumer_generations`: per consumer, how many replays reset
//!   it; every member of a group checks it in each batch, so no member
//!   applies on top of a reset with the positions of before.
//! - `tandem_consumer_offsets_ahead`: on a bus whose members share a
//!   partition (NATS), the offset ranges applied beyond the position, which
//!   stays the first offset not yet applied by any member.

use crate::store::{StoreError, Tx};

/// Where each database records the migrations applied to it: one row per
/// step, by number, with what it did and when.
pub const VERSION_TABLE: &str = "tandem_schema_version";

/// What [`migrate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// The schema version found (0: a new database, or one made before
    /// versions were recorded).
    pub from: i64,
    /// The version now recorded.
    pub to: i64,
}

/// Creates the toolkit's tables, or brings them up to date: see
/// [`migrate`]. Then stores the failure group of any dead letter parked
/// without one by a build older than migration 3 since this database was
/// migrated (a rolling upgrade): otherwise one seek in the index of the
/// groups, which finds none.
pub fn install(tx: &mut dyn Tx) -> Result<(), StoreError> {
    migrate(tx)?;
    crate::dead_letter::fill_failure_groups(tx)?;
    Ok(())
}

/// Applies, in order, each of the engine's migrations
/// ([`crate::sql::EngineSql::migrations`]) above the version recorded in
/// [`VERSION_TABLE`], recording each in the same transaction. Run it in a
/// write transaction: writers are serialised, so two processes opening one
/// database never apply a step twice. A database whose version is above
/// every step this build knows (a newer build migrated it) is left as it
/// is, with a warning: steps only add, so an older build keeps working
/// during a rolling upgrade.
pub fn migrate(tx: &mut dyn Tx) -> Result<Migrated, StoreError> {
    let engine = tx.engine();
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS tandem_schema_version (
             version     BIGINT PRIMARY KEY,
             description TEXT   NOT NULL,
             applied_at  BIGINT NOT NULL
         )",
    )?;
    let from = schema_version(tx)?;
    let migrations = engine.migrations();
    let latest = migrations.last().map_or(0, |step| step.version);
    if from > latest {
        tracing::warn!(
            engine = engine.name(),
            version = from,
            known = latest,
            "the database's schema is newer than this build knows; using it as it is"
        );
        return Ok(Migrated { from, to: from });
    }
    for step in migrations.iter().filter(|step| step.version > from) {
        tracing::info!(
            engine = engine.name(),
            version = step.version,
            description = step.description,
            "applying schema migration"
        );
        (step.apply)(tx)?;
        tx.execute(
            "INSERT INTO tandem_schema_version (version, description, applied_at)
             VALUES ($1, $2, $3)",
            crate::params![step.version, step.description, now_micros()],
        )?;
    }
    Ok(Migrated { from, to: latest })
}

/// The highest migration recorded (0 when none is, or when the version
/// table is missing).
pub fn schema_version(tx: &mut dyn Tx) -> Result<i64, StoreError> {
    if !tx.engine().table_exists(tx, VERSION_TABLE)? {
        return Ok(0);
    }
    let row = tx.query_opt(
        "SELECT COALESCE(MAX(version), 0) FROM tandem_schema_version",
        &[],
    )?;
    row.map_or(Ok(0), |row| row.i64(0))
}

/// Microseconds since the Unix epoch: the toolkit's timestamp column type.
pub fn now_micros() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_micros()).unwrap_or(i64::MAX)
}

/// The toolkit's tables: a service database has every one.
pub const TABLES: [&str; 8] = [
    "tandem_outbox",
    "tandem_aggregates",
    "tandem_relay_positions",
    "tandem_consumer_positions",
    "tandem_consumer_aggregates",
    "tandem_consumer_requests",
    "tandem_pending",
    "tandem_dead_letters",
];

/// Why a database is not a service's that tools may work on as it is.
#[derive(Debug, thiserror::Error)]
pub enum ExistingError {
    /// Nothing is there (no such file, or no such database).
    #[error("no such database")]
    Missing,
    /// A database, but the toolkit's tables are not in it (the bus file,
    /// another program's database): nothing was installed.
    #[error("not a tandem service database (it has no table {})", .missing.join(", "))]
    NotAServiceDatabase {
        /// The toolkit's tables it lacks.
        missing: Vec<&'static str>,
    },
    /// The database could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks that the toolkit's tables are there, changing nothing.
pub fn check_installed(tx: &mut dyn Tx) -> Result<(), ExistingError> {
    let engine = tx.engine();
    let mut missing = Vec::new();
    for table in TABLES {
        if !engine.table_exists(tx, table)? {
            missing.push(table);
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ExistingError::NotAServiceDatabase { missing })
    }
}
