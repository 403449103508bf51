//! The toolkit's SQL that differs between engines, behind one trait.
//!
//! The outbox, the relay and the consumers speak portable SQL through
//! [`Tx`] for everything that is the same on every engine. What is not —
//! how a batch takes aggregate sequences, how the outbox is read in commit
//! order, how a batch of consumer states is loaded and written, the schema
//! and its migrations — each engine implements in its own module or crate
//! ([`crate::sqlite::sql`], `tandem_postgres::sql`), and the toolkit reaches
//! it through [`Tx::engine`]. The toolkit's modules never ask which engine
//! they run on.

use crate::envelope::Envelope;
use crate::outbox::{Cursor, OutboxBatch, StoredEvent};
use crate::params;
use crate::store::{Dialect, Row, StoreError, Tx};

/// One numbered step of the toolkit's schema. An engine's migrations are
/// numbered from 1 without gaps; each runs once per database, inside the
/// write transaction that records it in `tandem_schema_version`, so a
/// migration that fails leaves nothing behind.
#[derive(Clone, Copy)]
pub struct Migration {
    /// The step's number: 1 for the first, one more for each after it.
    pub version: i64,
    /// What the step does, recorded beside its number.
    pub description: &'static str,
    /// Carries the step out, in the transaction that records it.
    pub apply: fn(&mut dyn Tx) -> Result<(), StoreError>,
}

impl std::fmt::Debug for Migration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("version", &self.version)
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

/// One event row for [`EngineSql::insert_events`].
#[derive(Debug, Clone, Copy)]
pub struct OutboxRow<'a> {
    /// The aggregate id.
    pub subject: &'a str,
    /// The event's sequence in its aggregate, already taken.
    pub sequence: u64,
    /// The envelope's id, as text.
    pub event_id: &'a str,
    /// The envelope's type.
    pub event_type: &'a str,
    /// The envelope's JSON (always UTF-8).
    pub envelope: &'a [u8],
}

impl<'a> OutboxRow<'a> {
    /// The row of `envelope`, whose JSON and id the caller keeps.
    pub fn of(envelope: &'a Envelope, json: &'a [u8], event_id: &'a str) -> Self {
        Self {
            subject: &envelope.subject,
            sequence: envelope.sequence,
            event_id,
            event_type: &envelope.event_type,
            envelope: json,
        }
    }
}

/// A consumer's record of one aggregate, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAggregateState {
    /// The aggregate id.
    pub subject: String,
    /// The last sequence applied.
    pub applied: u64,
    /// The dead letter that blocks the aggregate, if any.
    pub blocked_by: Option<i64>,
}

impl StoredAggregateState {
    /// From a row of `(subject, sequence, blocked_by)`.
    pub fn from_row(mut row: Row) -> Result<Self, StoreError> {
        Ok(Self {
            subject: row.take_text(0)?,
            applied: u64::try_from(row.i64(1)?).unwrap_or(0),
            blocked_by: row.opt_i64(2)?,
        })
    }
}

/// A consumer's record of one aggregate, to be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggregateStateRow<'a> {
    /// The topic (publishing service) the aggregate's events come from.
    pub source: &'a str,
    /// The aggregate id.
    pub subject: &'a str,
    /// The last sequence applied.
    pub applied: u64,
    /// The dead letter that blocks the aggregate, if any.
    pub blocked_by: Option<i64>,
    /// Whether the row exists already (an update) or not (an insert).
    pub stored: bool,
}

/// What an engine implements of the toolkit's SQL. Each method runs inside
/// the caller's transaction and may issue any statements its engine
/// understands; the contract is the tables of [`crate::schema`] and what
/// each method's documentation promises.
pub trait EngineSql: Send + Sync + 'static {
    /// The engine's name, for logs and errors: `sqlite`, `postgres`.
    fn name(&self) -> &'static str;

    /// The SQL family an application's own statements (its schema, mostly)
    /// must be written in. The toolkit's modules never branch on it.
    fn dialect(&self) -> Dialect;

    /// The toolkit's schema, as numbered steps from 1, oldest first. The
    /// first step also upgrades databases made before steps were numbered
    /// (so it is written to run on them as well as on an empty database).
    fn migrations(&self) -> &'static [Migration];

    /// Whether `table` exists where the toolkit's tables live.
    fn table_exists(&self, tx: &mut dyn Tx, table: &str) -> Result<bool, StoreError>;

    /// Renames index `from` to `to` (a rebuilt read model's index, which
    /// takes its live name at the switch); `false` when there is no index
    /// `from`.
    fn rename_index(&self, tx: &mut dyn Tx, from: &str, to: &str) -> Result<bool, StoreError>;

    /// The database's clock, in µs since the Unix epoch, for
    /// [`EngineSql::snapshots_older_than`]. The default is this host's.
    fn database_now_micros(&self, tx: &mut dyn Tx) -> Result<i64, StoreError> {
        let _ = tx;
        Ok(crate::schema::now_micros())
    }

    /// How many other sessions of the database read with a snapshot taken
    /// before `since_micros` (on [`EngineSql::database_now_micros`]'s
    /// clock). A rebuild's switch waits until there are none before it
    /// renames tables: a reader whose snapshot is older than the builder's
    /// last commit, and which meets the rename only after waiting for its
    /// lock, would otherwise read the renamed table as it was at that
    /// snapshot (PostgreSQL resolves the name anew, but keeps a
    /// repeatable-read transaction's snapshot). Engines whose readers see
    /// names and rows from one snapshot (SQLite) have none to count: the
    /// default.
    fn snapshots_older_than(&self, tx: &mut dyn Tx, since_micros: i64) -> Result<u64, StoreError> {
        let _ = (tx, since_micros);
        Ok(0)
    }

    /// Waits in `tx`, for at most `timeout`, until no other session reads
    /// with a snapshot older than this call ([`EngineSql::snapshots_older_than`]);
    /// `false` when some still does at the deadline. For a transaction
    /// that holds the writer lock, so that no writer commits meanwhile.
    fn wait_for_older_snapshots(
        &self,
        tx: &mut dyn Tx,
        timeout: std::time::Duration,
    ) -> Result<bool, StoreError> {
        let deadline = std::time::Instant::now() + timeout;
        let since = self.database_now_micros(tx)?;
        let mut pause = std::time::Duration::from_millis(1);
        loop {
            if self.snapshots_older_than(tx, since)? == 0 {
                return Ok(true);
            }
            if std::time::Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(20));
        }
    }

    /// Takes the next sequence of aggregate `subject` in `topic`. Two
    /// writers of one aggregate never both commit a sequence: the second
    /// waits for the first and takes the one after it, or fails with
    /// [`StoreError::Conflict`].
    fn next_sequence(&self, tx: &mut dyn Tx, topic: &str, subject: &str)
        -> Result<u64, StoreError>;

    /// Takes `count` consecutive sequences for each `(subject, count)` of
    /// `topic` (subjects distinct), with the same guarantee as
    /// [`EngineSql::next_sequence`]; returns the first of each, in order.
    fn take_sequences(
        &self,
        tx: &mut dyn Tx,
        topic: &str,
        counts: &[(&str, u64)],
    ) -> Result<Vec<u64>, StoreError>;

    /// Inserts event rows into `tandem_outbox` for `topic`, in order.
    fn insert_events(
        &self,
        tx: &mut dyn Tx,
        topic: &str,
        rows: &[OutboxRow<'_>],
        committed_at_micros: i64,
    ) -> Result<(), StoreError>;

    /// The columns of a [`StoredEvent`] as this engine selects them from
    /// `tandem_outbox`: position, xid, topic, subject, envelope,
    /// committed_at, sequence (see [`stored_event`]).
    fn outbox_columns(&self) -> &'static str;

    /// The next events after `after` whose order is final, as
    /// [`crate::outbox::read_committed_after`] promises.
    fn read_committed_after(
        &self,
        tx: &mut dyn Tx,
        after: Cursor,
        limit: u64,
    ) -> Result<OutboxBatch, StoreError>;

    /// Deletes at most `limit` of the oldest outbox rows that relay
    /// `relay` has published (at or below its cursor) and that committed
    /// before `before_micros`; returns how many. Looks at no more than
    /// `limit` rows, so a call costs the same however long the outbox.
    fn prune_published(
        &self,
        tx: &mut dyn Tx,
        relay: &str,
        before_micros: i64,
        limit: u64,
    ) -> Result<u64, StoreError>;

    /// How many events relay `relay` has not published yet, and when the
    /// oldest of them committed (microseconds since the epoch).
    fn relay_backlog(&self, tx: &mut dyn Tx, relay: &str)
        -> Result<(u64, Option<i64>), StoreError>;

    /// Whether the database's transaction ids restarted below `cursor`
    /// (see [`crate::outbox::xids_restarted`]). Engines whose cursors carry
    /// no transaction id never restart.
    fn xids_restarted(&self, _tx: &mut dyn Tx, _cursor: Cursor) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// Recovers relay cursors from restarted transaction ids (see
    /// [`crate::outbox::recover_restarted_xids`]); the number of rows
    /// renumbered.
    fn recover_restarted_xids(&self, _tx: &mut dyn Tx) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// The stored states of `consumer` for the aggregates `subjects` of
    /// `source` (sorted, distinct); subjects with no state are left out.
    fn load_aggregate_states(
        &self,
        tx: &mut dyn Tx,
        consumer: &str,
        source: &str,
        subjects: &[&str],
    ) -> Result<Vec<StoredAggregateState>, StoreError>;

    /// Writes `states` of `consumer` (sorted by source and subject).
    fn save_aggregate_states(
        &self,
        tx: &mut dyn Tx,
        consumer: &str,
        states: &[AggregateStateRow<'_>],
    ) -> Result<(), StoreError>;
}

/// Moves a row of [`EngineSql::outbox_columns`] into a [`StoredEvent`].
pub fn stored_event(mut row: Row) -> Result<StoredEvent, StoreError> {
    Ok(StoredEvent {
        position: row.i64(0)?,
        xid: row.i64(1)?,
        topic: row.take_text(2)?,
        subject: row.take_text(3)?,
        envelope: row.take_bytes(4)?,
        committed_at_micros: row.i64(5)?,
        sequence: u64::try_from(row.i64(6)?).unwrap_or(0),
    })
}

/// A relay's backlog from a row of `(COUNT(*), MIN(committed_at))`.
pub fn backlog_of(row: Option<Row>) -> Result<(u64, Option<i64>), StoreError> {
    let row = row.ok_or_else(|| StoreError::Decode("count returned nothing".into()))?;
    Ok((u64::try_from(row.i64(0)?).unwrap_or(0), row.opt_i64(1)?))
}

/// Writes one aggregate state with a plain insert or update (portable; an
/// upsert costs SQLite a statement journal).
pub fn save_aggregate_state(
    tx: &mut dyn Tx,
    consumer: &str,
    state: &AggregateStateRow<'_>,
) -> Result<(), StoreError> {
    let sql = if state.stored {
        "UPDATE tandem_consumer_aggregates SET sequence = $4, blocked_by = $5
         WHERE consumer = $1 AND source = $2 AND subject = $3"
    } else {
        "INSERT INTO tandem_consumer_aggregates (consumer, source, subject, sequence, blocked_by)
         VALUES ($1, $2, $3, $4, $5)"
    };
    tx.execute(
        sql,
        params![
            consumer,
            state.source,
            state.subject,
            state.applied,
            state.blocked_by
        ],
    )?;
    Ok(())
}

/// A JSON text of `value`, for the engines that feed a statement a list.
pub fn json_param<T: serde::Serialize + ?Sized>(
    value: &T,
    what: &str,
) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|error| StoreError::Engine(format!("{what}: {error}").into()))
}
