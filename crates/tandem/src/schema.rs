//! The toolkit's own tables in a service's database. Installed by every
//! store when it opens; each statement is idempotent.
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
//! - `tandem_dead_letters`: parked events with their error and attempts.
//! - `tandem_consumer_requests`: replay, redrive and discard orders for a
//!   running consumer, from any process.
//! - `tandem_consumer_generations`: per consumer, how many replays reset
//!   it; every member of a group checks it in each batch, so no member
//!   applies on top of a reset with the positions of before.
//! - `tandem_consumer_offsets_ahead`: on a bus whose members share a
//!   partition (NATS), the offset ranges applied beyond the position, which
//!   stays the first offset not yet applied by any member.

use crate::store::{Dialect, StoreError, Tx};

// On SQLite the tables keyed by text are `WITHOUT ROWID`: a lookup or an
// update by key touches one b-tree instead of an index and a table, which
// halved the cost of the per-event sequence bookkeeping.

const SQLITE: &str = "
CREATE TABLE IF NOT EXISTS tandem_outbox (
    position     INTEGER PRIMARY KEY AUTOINCREMENT,
    topic        TEXT    NOT NULL,
    subject      TEXT    NOT NULL,
    sequence     INTEGER NOT NULL,
    event_id     TEXT    NOT NULL,
    event_type   TEXT    NOT NULL,
    envelope     BLOB    NOT NULL,
    committed_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tandem_aggregates (
    topic    TEXT    NOT NULL,
    subject  TEXT    NOT NULL,
    sequence INTEGER NOT NULL,
    PRIMARY KEY (subject, topic)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tandem_relay_positions (
    relay      TEXT    PRIMARY KEY,
    position   INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    xid        INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tandem_consumer_positions (
    consumer    TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (consumer, topic, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tandem_consumer_aggregates (
    consumer TEXT    NOT NULL,
    source   TEXT    NOT NULL,
    subject  TEXT    NOT NULL,
    sequence INTEGER NOT NULL,
    blocked_by INTEGER,
    PRIMARY KEY (subject, source, consumer)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tandem_consumer_requests (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    consumer       TEXT    NOT NULL,
    command        TEXT    NOT NULL,
    dead_letter_id INTEGER,
    requested_at   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tandem_pending (
    consumer    TEXT    NOT NULL,
    source      TEXT    NOT NULL,
    subject     TEXT    NOT NULL,
    sequence    INTEGER NOT NULL,
    topic       TEXT    NOT NULL,
    partition   INTEGER NOT NULL,
    record_offset INTEGER NOT NULL,
    payload     BLOB    NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, source, subject, sequence)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tandem_dead_letters (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    consumer        TEXT    NOT NULL,
    topic           TEXT    NOT NULL,
    partition       INTEGER NOT NULL,
    record_offset   INTEGER NOT NULL,
    event_id        TEXT,
    source          TEXT,
    subject         TEXT,
    sequence        INTEGER,
    event_type      TEXT,
    payload         BLOB    NOT NULL,
    reason          TEXT    NOT NULL,
    error           TEXT    NOT NULL,
    attempts        INTEGER NOT NULL,
    first_failed_at INTEGER NOT NULL,
    last_failed_at  INTEGER NOT NULL,
    status          TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS tandem_dead_letters_consumer
    ON tandem_dead_letters (consumer, status);
CREATE INDEX IF NOT EXISTS tandem_dead_letters_aggregate
    ON tandem_dead_letters (consumer, subject, source, sequence);
CREATE TABLE IF NOT EXISTS tandem_consumer_generations (
    consumer   TEXT    PRIMARY KEY,
    generation INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tandem_consumer_offsets_ahead (
    consumer     TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    partition    INTEGER NOT NULL,
    first_offset INTEGER NOT NULL,
    end_offset   INTEGER NOT NULL,
    PRIMARY KEY (consumer, topic, partition, first_offset)
) WITHOUT ROWID;
";

const POSTGRES: &str = "
CREATE TABLE IF NOT EXISTS tandem_outbox (
    position     BIGSERIAL PRIMARY KEY,
    topic        TEXT    NOT NULL,
    subject      TEXT    NOT NULL,
    sequence     BIGINT  NOT NULL,
    event_id     TEXT    NOT NULL,
    event_type   TEXT    NOT NULL,
    envelope     BYTEA   NOT NULL,
    committed_at BIGINT  NOT NULL,
    xid          BIGINT  NOT NULL DEFAULT (pg_current_xact_id()::text::bigint)
);
ALTER TABLE tandem_outbox
    ADD COLUMN IF NOT EXISTS xid BIGINT NOT NULL DEFAULT (pg_current_xact_id()::text::bigint);
CREATE INDEX IF NOT EXISTS tandem_outbox_commit_order ON tandem_outbox (xid, position);
CREATE TABLE IF NOT EXISTS tandem_aggregates (
    topic    TEXT   NOT NULL,
    subject  TEXT   NOT NULL,
    sequence BIGINT NOT NULL,
    PRIMARY KEY (topic, subject)
);
CREATE TABLE IF NOT EXISTS tandem_relay_positions (
    relay      TEXT   PRIMARY KEY,
    position   BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    xid        BIGINT NOT NULL DEFAULT 0
);
ALTER TABLE tandem_relay_positions ADD COLUMN IF NOT EXISTS xid BIGINT NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS tandem_consumer_positions (
    consumer    TEXT   NOT NULL,
    topic       TEXT   NOT NULL,
    partition   BIGINT NOT NULL,
    next_offset BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (consumer, topic, partition)
);
CREATE TABLE IF NOT EXISTS tandem_consumer_aggregates (
    consumer TEXT   NOT NULL,
    source   TEXT   NOT NULL,
    subject  TEXT   NOT NULL,
    sequence BIGINT NOT NULL,
    blocked_by BIGINT,
    PRIMARY KEY (consumer, source, subject)
);
-- Rows updated in place all the time: room on each page lets an update
-- stay on its page (a HOT update), which skips the index insert a moved
-- row needs, more than halving the cost of a batch's upsert. Set once:
-- the ALTER waits for any vacuum of the table, so opening a store skips it
-- when the setting is there.
DO $tandem$
DECLARE
    relation text;
BEGIN
    FOREACH relation IN ARRAY ARRAY['tandem_aggregates', 'tandem_relay_positions',
                                'tandem_consumer_positions', 'tandem_consumer_aggregates']
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_class
                       WHERE oid = to_regclass(relation)
                         AND reloptions @> ARRAY['fillfactor=70']) THEN
            EXECUTE format('ALTER TABLE %I SET (fillfactor = 70)', relation);
        END IF;
    END LOOP;
END
$tandem$;
CREATE TABLE IF NOT EXISTS tandem_consumer_requests (
    id             BIGSERIAL PRIMARY KEY,
    consumer       TEXT   NOT NULL,
    command        TEXT   NOT NULL,
    dead_letter_id BIGINT,
    requested_at   BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS tandem_pending (
    consumer      TEXT   NOT NULL,
    source        TEXT   NOT NULL,
    subject       TEXT   NOT NULL,
    sequence      BIGINT NOT NULL,
    topic         TEXT   NOT NULL,
    partition     BIGINT NOT NULL,
    record_offset BIGINT NOT NULL,
    payload       BYTEA  NOT NULL,
    received_at   BIGINT NOT NULL,
    PRIMARY KEY (consumer, source, subject, sequence)
);
CREATE TABLE IF NOT EXISTS tandem_dead_letters (
    id              BIGSERIAL PRIMARY KEY,
    consumer        TEXT   NOT NULL,
    topic           TEXT   NOT NULL,
    partition       BIGINT NOT NULL,
    record_offset   BIGINT NOT NULL,
    event_id        TEXT,
    source          TEXT,
    subject         TEXT,
    sequence        BIGINT,
    event_type      TEXT,
    payload         BYTEA  NOT NULL,
    reason          TEXT   NOT NULL,
    error           TEXT   NOT NULL,
    attempts        BIGINT NOT NULL,
    first_failed_at BIGINT NOT NULL,
    last_failed_at  BIGINT NOT NULL,
    status          TEXT   NOT NULL
);
CREATE INDEX IF NOT EXISTS tandem_dead_letters_consumer
    ON tandem_dead_letters (consumer, status);
CREATE INDEX IF NOT EXISTS tandem_dead_letters_aggregate
    ON tandem_dead_letters (consumer, subject, source, sequence);
CREATE TABLE IF NOT EXISTS tandem_consumer_generations (
    consumer   TEXT    PRIMARY KEY,
    generation BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS tandem_consumer_offsets_ahead (
    consumer     TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    partition    BIGINT NOT NULL,
    first_offset BIGINT NOT NULL,
    end_offset   BIGINT NOT NULL,
    PRIMARY KEY (consumer, topic, partition, first_offset)
);
";

/// SQLite tables whose key starts with the subject (the column that tells
/// rows apart) rather than with the topic or consumer, which every row of a
/// service shares: a seek then settles most comparisons on the first
/// column. Key comparisons were a fifth of the pipeline's instructions,
/// and this halved them. `(table, columns in table order)`.
const REKEYED: [(&str, &str); 2] = [
    ("tandem_aggregates", "topic, subject, sequence"),
    (
        "tandem_consumer_aggregates",
        "consumer, source, subject, sequence, blocked_by",
    ),
];

/// Rebuilds `table` of a file made before its key started with `subject`.
fn rekey_sqlite_table(tx: &mut dyn Tx, table: &str, columns: &str) -> Result<(), StoreError> {
    let first = tx.query_opt(
        "SELECT info.name FROM pragma_index_list($1) AS list, pragma_index_info(list.name) AS info
         WHERE list.origin = 'pk' AND info.seqno = 0",
        crate::params![table],
    )?;
    let first = match &first {
        Some(row) => row.text(0)?,
        None => return Ok(()),
    };
    if first == "subject" {
        return Ok(());
    }
    let rekeyed = SQLITE
        .split(';')
        .find(|statement| {
            statement
                .trim()
                .starts_with(&format!("CREATE TABLE IF NOT EXISTS {table} ("))
        })
        .ok_or_else(|| StoreError::Engine(format!("no definition of {table}")))?
        .replacen(
            &format!("CREATE TABLE IF NOT EXISTS {table} ("),
            &format!("CREATE TABLE {table}_rekeyed ("),
            1,
        );
    tracing::info!(
        table,
        old_key_start = first,
        "rebuilding the table with its key led by subject"
    );
    tx.execute_batch(&format!(
        "{rekeyed};
         INSERT INTO {table}_rekeyed ({columns}) SELECT {columns} FROM {table};
         DROP TABLE {table};
         ALTER TABLE {table}_rekeyed RENAME TO {table};"
    ))
}

/// Creates the toolkit's tables if they do not exist yet.
pub fn install(tx: &mut dyn Tx) -> Result<(), StoreError> {
    match tx.dialect() {
        Dialect::Sqlite => {
            tx.execute_batch(SQLITE)?;
            // Files made before relay cursors had an `xid` (always 0 on
            // SQLite, whose writers commit in position order).
            let has_xid = tx
                .query_opt(
                    "SELECT 1 FROM pragma_table_info('tandem_relay_positions') WHERE name = 'xid'",
                    &[],
                )?
                .is_some();
            if !has_xid {
                tx.execute_batch(
                    "ALTER TABLE tandem_relay_positions ADD COLUMN xid INTEGER NOT NULL DEFAULT 0",
                )?;
            }
            for (table, columns) in REKEYED {
                rekey_sqlite_table(tx, table, columns)?;
            }
            Ok(())
        }
        Dialect::Postgres => tx.execute_batch(POSTGRES),
    }
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
    NotAServiceDatabase { missing: Vec<&'static str> },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks that the toolkit's tables are there, changing nothing.
pub fn check_installed(tx: &mut dyn Tx) -> Result<(), ExistingError> {
    let sql = match tx.dialect() {
        Dialect::Sqlite => "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = $1",
        Dialect::Postgres => {
            "SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = current_schema() AND tablename = $1"
        }
    };
    let mut missing = Vec::new();
    for table in TABLES {
        if tx.query_opt(sql, crate::params![table])?.is_none() {
            missing.push(table);
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ExistingError::NotAServiceDatabase { missing })
    }
}
