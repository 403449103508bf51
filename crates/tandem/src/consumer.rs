//! Consumers with an exactly-once effect.
//!
//! A [`Handler`] applies one event to a read model inside a transaction on
//! the consumer's own database. In that same transaction the consumer
//! records its position per partition and, per aggregate, the last sequence
//! it applied. So after any crash the read model, the dedup record and the
//! position agree, and redelivered events are dropped.
//!
//! Per event, by its aggregate's last applied sequence `n`:
//! - sequence `<= n`: a duplicate, dropped;
//! - sequence `n + 1`: applied (then any held successors are applied too);
//! - sequence `> n + 1`: held in `tandem_pending` until the gap fills; after
//!   `gap_timeout` it is parked with reason `gap` and reported.
//!
//! A failing handler is retried with exponential backoff and jitter; after
//! `max_attempts` (or at once for a permanent error) the event is parked as
//! a dead letter, its aggregate is blocked behind it, and the consumer moves
//! on. See [`crate::dead_letter`] for redrive and discard, and
//! [`crate::dead_letter::request_replay`] for rebuilding a read model.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::bus::{Bus, BusError, Delivery, Record, Subscription, TopicPartition};
use crate::dead_letter::{self, Command, DeadLetter, Reason};
use crate::envelope::{Envelope, PayloadError};
use crate::params;
use crate::schema::now_micros;
use crate::store::{Dialect, Store, StoreError, Tx};

/// Why a handler could not apply an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    pub message: String,
    /// Retrying cannot help (a payload the handler cannot read): park now.
    pub permanent: bool,
}

impl HandlerError {
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: true,
        }
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.message)
    }
}

impl From<StoreError> for HandlerError {
    fn from(error: StoreError) -> Self {
        HandlerError::transient(error.to_string())
    }
}

impl From<PayloadError> for HandlerError {
    fn from(error: PayloadError) -> Self {
        HandlerError::permanent(error.to_string())
    }
}

/// Applies events to a read model.
pub trait Handler: Send + Sync + 'static {
    /// Applies one event inside the consumer's transaction. Events of other
    /// types than the handler cares about should simply return `Ok`.
    fn handle(&self, tx: &mut dyn Tx, event: &Envelope) -> Result<(), HandlerError>;

    /// Applies the events of one batch, in the order given, inside the
    /// consumer's transaction: the events that passed the consumer's checks
    /// (no duplicates, each aggregate's in sequence order). The default
    /// calls [`Handler::handle`] for each. Override it to apply a batch in
    /// fewer statements (on PostgreSQL each statement is a round trip); the
    /// effect must be that of handling each event in turn. When it fails,
    /// the consumer rolls the batch back and applies its events one at a
    /// time with `handle`, so the event at fault is retried and parked
    /// alone.
    fn handle_batch(&self, tx: &mut dyn Tx, events: &[Envelope]) -> Result<(), HandlerError> {
        for event in events {
            self.handle(tx, event)?;
        }
        Ok(())
    }

    /// Empties the read model before a replay rebuilds it.
    fn reset(&self, tx: &mut dyn Tx) -> Result<(), HandlerError> {
        let _ = tx;
        Ok(())
    }
}

/// How a consumer runs.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The consumer's name: its group on the bus and its key in the tables.
    pub name: String,
    pub topics: Vec<String>,
    /// Most records applied in one transaction.
    pub batch_size: usize,
    /// Tries before an event is parked.
    pub max_attempts: u32,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Longest pause between attempts to rejoin an unreachable bus or store.
    pub retry_outage_max: Duration,
    /// How long an event ahead of a gap waits for the missing sequence.
    pub gap_timeout: Duration,
    /// How often requests (redrive, discard, replay) and gaps are checked.
    pub housekeeping_interval: Duration,
}

impl ConsumerConfig {
    pub fn new(name: impl Into<String>, topics: &[&str]) -> Self {
        Self {
            name: name.into(),
            topics: topics.iter().map(|topic| (*topic).to_owned()).collect(),
            batch_size: 1000,
            max_attempts: 5,
            retry_initial: Duration::from_millis(20),
            retry_max: Duration::from_secs(2),
            retry_outage_max: Duration::from_secs(5),
            gap_timeout: Duration::from_secs(5),
            housekeeping_interval: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// `topic/partition` list for logs.
fn describe(partitions: &[TopicPartition]) -> String {
    partitions
        .iter()
        .map(|partition| format!("{}/{}", partition.topic, partition.partition))
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether `error` is an engine being away for a while rather than a fault.
fn is_outage(error: &ConsumerError) -> bool {
    matches!(
        error,
        ConsumerError::Bus(BusError::Unavailable(_))
            | ConsumerError::Store(StoreError::Unavailable(_))
    )
}

pub use crate::backoff::jitter;

/// What became of one record.
enum Step {
    /// Applied to the read model; carries the event's `time` (µs).
    Applied(i64),
    /// Dropped as a duplicate, held ahead of a gap, or parked.
    Consumed,
    Failed(HandlerError),
}

/// What one committed consumer batch did.
#[derive(Debug, Clone, Copy)]
pub struct CommittedBatch<'a> {
    pub consumer: &'a str,
    /// Records consumed: applied, dropped as duplicates, held or parked.
    pub consumed: usize,
    /// When the batch's transaction committed (µs since the Unix epoch).
    pub committed_at_micros: i64,
    /// The creation time (`time`, µs) of each event the batch applied; the
    /// difference to `committed_at_micros` is its end-to-end propagation delay.
    pub applied_created_micros: &'a [i64],
}

/// Sees every committed batch: the hook for metrics and benchmarks.
pub trait ConsumerObserver: Send + Sync + 'static {
    fn batch_committed(&self, batch: CommittedBatch<'_>);
}

/// The last applied sequence of an aggregate, and the dead letter that
/// blocks it, if any.
#[derive(Debug, Clone, Copy, Default)]
struct AggregateState {
    applied: u64,
    blocked_by: Option<i64>,
    /// Whether the row exists yet (an insert or an update saves it).
    stored: bool,
    /// Saved in a batch but not written yet (see [`BatchContext::flush_states`]).
    dirty: bool,
}

fn aggregate_state(
    tx: &mut dyn Tx,
    consumer: &str,
    source: &str,
    subject: &str,
) -> Result<AggregateState, StoreError> {
    let row = tx.query_opt(
        "SELECT sequence, blocked_by FROM tandem_consumer_aggregates
         WHERE consumer = $1 AND source = $2 AND subject = $3",
        params![consumer, source, subject],
    )?;
    Ok(match row {
        None => AggregateState::default(),
        Some(row) => AggregateState {
            applied: u64::try_from(row.i64(0)?).unwrap_or(0),
            blocked_by: row.opt_i64(1)?,
            stored: true,
            dirty: false,
        },
    })
}

fn save_aggregate_state(
    tx: &mut dyn Tx,
    consumer: &str,
    source: &str,
    subject: &str,
    state: AggregateState,
) -> Result<(), StoreError> {
    // A plain insert or update: an upsert costs SQLite a statement journal.
    let sql = if state.stored {
        "UPDATE tandem_consumer_aggregates SET sequence = $4, blocked_by = $5
         WHERE consumer = $1 AND source = $2 AND subject = $3"
    } else {
        "INSERT INTO tandem_consumer_aggregates (consumer, source, subject, sequence, blocked_by)
         VALUES ($1, $2, $3, $4, $5)"
    };
    tx.execute(
        sql,
        params![consumer, source, subject, state.applied, state.blocked_by],
    )?;
    Ok(())
}

/// Runs the handler under a savepoint, so a failure leaves no trace.
fn apply_handler(
    tx: &mut dyn Tx,
    handler: &dyn Handler,
    envelope: &Envelope,
) -> Result<Result<(), HandlerError>, StoreError> {
    tx.savepoint("tandem_event")?;
    match handler.handle(tx, envelope) {
        Ok(()) => {
            tx.release_savepoint("tandem_event")?;
            Ok(Ok(()))
        }
        Err(error) => {
            tx.rollback_to_savepoint("tandem_event")?;
            Ok(Err(error))
        }
    }
}

/// The consumer's work inside one transaction.
struct BatchContext {
    consumer: String,
    handler: Arc<dyn Handler>,
    /// Whether `tandem_pending` may hold events of this consumer; when it
    /// cannot, applying an event skips the look for held successors.
    pending_possible: std::cell::Cell<bool>,
    /// Whether this consumer has discarded dead letters: sequences that an
    /// aggregate skips when it reaches them (after a discard of a gap
    /// letter, or when a replay meets a discarded event again).
    discarded_possible: std::cell::Cell<bool>,
    /// Run each handler call under a savepoint, so that a failure can be
    /// undone alone. Batches do without: on a failure the whole
    /// transaction rolls back and the records before it are applied again.
    isolate: bool,
    /// Aggregate states read or written in this transaction, by source
    /// and then subject (looked up by `&str`, without allocating): loaded
    /// for a whole batch with a few queries instead of one per event. In a
    /// batch (not isolated) a save only marks the state dirty and
    /// [`BatchContext::flush_states`] writes them all before the batch
    /// commits; isolated contexts write through.
    states: std::cell::RefCell<HashMap<String, HashMap<String, AggregateState>>>,
    /// When set, events that pass the checks are collected here for one
    /// [`Handler::handle_batch`] call instead of handled one by one.
    collected: Option<std::cell::RefCell<Vec<Envelope>>>,
}

impl BatchContext {
    /// Handles one record.
    fn new(consumer: String, handler: Arc<dyn Handler>, isolate: bool) -> Self {
        Self {
            consumer,
            handler,
            pending_possible: std::cell::Cell::new(true),
            discarded_possible: std::cell::Cell::new(true),
            isolate,
            states: std::cell::RefCell::new(HashMap::new()),
            collected: None,
        }
    }

    /// Events are collected for [`Handler::handle_batch`].
    fn collecting(mut self) -> Self {
        self.collected = Some(std::cell::RefCell::new(Vec::new()));
        self
    }

    /// Runs the handler on `envelope`, or collects it. Isolated contexts
    /// run it under a savepoint.
    fn run_handler(
        &self,
        tx: &mut dyn Tx,
        envelope: &Envelope,
        isolate: bool,
    ) -> Result<Result<(), HandlerError>, StoreError> {
        if let Some(collected) = &self.collected {
            collected.borrow_mut().push(envelope.clone());
            return Ok(Ok(()));
        }
        if isolate {
            apply_handler(tx, &*self.handler, envelope)
        } else {
            Ok(self.handler.handle(tx, envelope))
        }
    }

    /// Hands the collected events to [`Handler::handle_batch`].
    fn handle_collected(&self, tx: &mut dyn Tx) -> Result<(), HandlerError> {
        let Some(collected) = &self.collected else {
            return Ok(());
        };
        let events = std::mem::take(&mut *collected.borrow_mut());
        if events.is_empty() {
            return Ok(());
        }
        self.handler.handle_batch(tx, &events)
    }

    fn state(
        &self,
        tx: &mut dyn Tx,
        source: &str,
        subject: &str,
    ) -> Result<AggregateState, StoreError> {
        if let Some(state) = self
            .states
            .borrow()
            .get(source)
            .and_then(|subjects| subjects.get(subject))
        {
            return Ok(*state);
        }
        let state = aggregate_state(tx, &self.consumer, source, subject)?;
        self.put_state(source, subject, state);
        Ok(state)
    }

    fn put_state(&self, source: &str, subject: &str, state: AggregateState) {
        let mut states = self.states.borrow_mut();
        let subjects = match states.get_mut(source) {
            Some(subjects) => subjects,
            None => states.entry(source.to_owned()).or_default(),
        };
        match subjects.get_mut(subject) {
            Some(slot) => *slot = state,
            None => {
                subjects.insert(subject.to_owned(), state);
            }
        }
    }

    fn save_state(
        &self,
        tx: &mut dyn Tx,
        source: &str,
        subject: &str,
        mut state: AggregateState,
    ) -> Result<(), StoreError> {
        if !self.isolate {
            // `stored` keeps saying whether the row exists in the table.
            state.dirty = true;
        } else {
            save_aggregate_state(tx, &self.consumer, source, subject, state)?;
            state.stored = true;
        }
        self.put_state(source, subject, state);
        Ok(())
    }

    /// Writes the states saved since the last flush, in key order.
    /// PostgreSQL: one upsert fed by a JSON array (a round trip per
    /// aggregate was most of a batch's time). SQLite: an upsert per source
    /// fed by a JSON object (an update per aggregate cost more; so did an
    /// upsert that extracted four fields of each JSON array element).
    fn flush_states(&self, tx: &mut dyn Tx) -> Result<(), StoreError> {
        let mut states = self.states.borrow_mut();
        let mut dirty: Vec<(&str, &str, &mut AggregateState)> = states
            .iter_mut()
            .flat_map(|(source, subjects)| {
                subjects
                    .iter_mut()
                    .filter(|(_, state)| state.dirty)
                    .map(move |(subject, state)| (source.as_str(), subject.as_str(), state))
            })
            .collect();
        if dirty.is_empty() {
            return Ok(());
        }
        dirty.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        if tx.dialect() == Dialect::Postgres {
            let rows: Vec<(&str, &str, u64, Option<i64>)> = dirty
                .iter()
                .map(|(source, subject, state)| {
                    (*source, *subject, state.applied, state.blocked_by)
                })
                .collect();
            let rows = serde_json::to_string(&rows)
                .map_err(|error| StoreError::Engine(format!("aggregate states: {error}")))?;
            tx.execute(
                "INSERT INTO tandem_consumer_aggregates (consumer, source, subject, sequence, blocked_by)
                 SELECT $1, item->>0, item->>1, (item->>2)::bigint, (item->>3)::bigint
                 FROM jsonb_array_elements($2::text::jsonb) AS item
                 ON CONFLICT (consumer, source, subject)
                 DO UPDATE SET sequence = EXCLUDED.sequence, blocked_by = EXCLUDED.blocked_by",
                params![&self.consumer, rows.as_str()],
            )?;
        } else {
            // Per source, the unblocked states (nearly all) in one upsert
            // fed by a `{subject: sequence}` object, whose pairs json_each
            // gives as `key` and `value`; blocked ones one by one. (An
            // update of the stored ones plus an insert of the new ones
            // cost a fifth more: SQLite's UPDATE ... FROM materialises the
            // join first.)
            let mut unblocked: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
            for (source, subject, state) in &dirty {
                if state.blocked_by.is_none() {
                    unblocked
                        .entry(source)
                        .or_default()
                        .insert(subject, state.applied);
                } else {
                    save_aggregate_state(tx, &self.consumer, source, subject, **state)?;
                }
            }
            for (source, sequences) in unblocked {
                let sequences = serde_json::to_string(&sequences)
                    .map_err(|error| StoreError::Engine(format!("aggregate states: {error}")))?;
                tx.execute(
                    "INSERT INTO tandem_consumer_aggregates (consumer, source, subject, sequence, blocked_by)
                     SELECT $1, $2, key, value, NULL FROM json_each($3) WHERE true
                     ON CONFLICT (subject, source, consumer)
                     DO UPDATE SET sequence = excluded.sequence, blocked_by = NULL",
                    params![&self.consumer, source, sequences.as_str()],
                )?;
            }
        }
        for (_, _, state) in dirty {
            state.stored = true;
            state.dirty = false;
        }
        Ok(())
    }

    /// Loads the states of the aggregates `records` are about (by topic and
    /// key, which the relay sets to source and subject): one query per
    /// topic, a lookup in the key's index per subject of a JSON list.
    /// PostgreSQL: `LATERAL ... LIMIT 1` keeps the planner from a hash join
    /// that scans every state; `= ANY (array)` took three times as long; an
    /// `IN` list of hundreds of parameters got a generic plan that cost
    /// tens of milliseconds. SQLite: a join from `json_each` into the key
    /// (a quarter cheaper than `IN (SELECT ... json_each)`, which builds a
    /// temporary index first; `IN` lists of parameters took a statement per
    /// 200 subjects).
    fn preload_states(&self, tx: &mut dyn Tx, records: &[Record]) -> Result<(), StoreError> {
        let mut wanted: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for record in records {
            wanted.entry(&record.topic).or_default().push(&record.key);
        }
        let postgres = tx.dialect() == Dialect::Postgres;
        let mut states = self.states.borrow_mut();
        for (source, mut subjects) in wanted {
            subjects.sort_unstable();
            subjects.dedup();
            let known = states.entry(source.to_owned()).or_default();
            known.reserve(subjects.len());
            for subject in &subjects {
                if !known.contains_key(*subject) {
                    known.insert((*subject).to_owned(), AggregateState::default());
                }
            }
            let list = serde_json::to_string(&subjects)
                .map_err(|error| StoreError::Engine(error.to_string()))?;
            let rows = tx.query(
                if postgres {
                    "SELECT wanted.subject, a.sequence, a.blocked_by
                     FROM jsonb_array_elements_text($3::text::jsonb) AS wanted(subject)
                     CROSS JOIN LATERAL (
                       SELECT sequence, blocked_by FROM tandem_consumer_aggregates
                       WHERE consumer = $1 AND source = $2 AND subject = wanted.subject
                       LIMIT 1
                     ) AS a"
                } else {
                    "SELECT a.subject, a.sequence, a.blocked_by
                     FROM json_each($3) AS wanted CROSS JOIN tandem_consumer_aggregates AS a
                     WHERE a.subject = wanted.value AND a.source = $2 AND a.consumer = $1"
                },
                params![&self.consumer, source, list.as_str()],
            )?;
            for row in rows {
                // A state saved earlier in this transaction is newer than
                // the table's.
                if let Some(state) = known.get_mut(row.text(0)?) {
                    if !state.dirty {
                        *state = AggregateState {
                            applied: u64::try_from(row.i64(1)?).unwrap_or(0),
                            blocked_by: row.opt_i64(2)?,
                            stored: true,
                            dirty: false,
                        };
                    }
                }
            }
        }
        Ok(())
    }

    /// Learns whether any event of this consumer is held ahead of a gap,
    /// and whether it has discarded any dead letter.
    fn look_for_pending(&self, tx: &mut dyn Tx) -> Result<(), StoreError> {
        let row = tx.query_opt(
            "SELECT
               (SELECT 1 FROM tandem_pending WHERE consumer = $1 LIMIT 1),
               (SELECT 1 FROM tandem_dead_letters
                WHERE consumer = $1 AND status = 'discarded' LIMIT 1)",
            params![&self.consumer],
        )?;
        let (pending, discarded) = match row {
            Some(row) => (row.opt_i64(0)?.is_some(), row.opt_i64(1)?.is_some()),
            None => (false, false),
        };
        self.pending_possible.set(pending);
        self.discarded_possible.set(discarded);
        Ok(())
    }

    /// Moves `state.applied` over the discarded sequences that follow it
    /// without a gap: an aggregate skips an event an operator discarded
    /// when it reaches it. Returns whether it moved.
    fn skip_discarded(
        &self,
        tx: &mut dyn Tx,
        source: &str,
        subject: &str,
        state: &mut AggregateState,
    ) -> Result<bool, StoreError> {
        if !self.discarded_possible.get() {
            return Ok(false);
        }
        let rows = tx.query(
            "SELECT DISTINCT sequence FROM tandem_dead_letters
             WHERE consumer = $1 AND subject = $2 AND source = $3 AND sequence > $4
               AND status = 'discarded'
             ORDER BY sequence",
            params![&self.consumer, subject, source, state.applied],
        )?;
        let before = state.applied;
        for row in rows {
            let sequence = u64::try_from(row.i64(0)?).unwrap_or(0);
            if Some(sequence) != state.applied.checked_add(1) {
                break;
            }
            state.applied = sequence;
        }
        Ok(state.applied != before)
    }

    fn apply_record(&self, tx: &mut dyn Tx, record: &Record) -> Result<Step, StoreError> {
        let envelope = match Envelope::decode(&record.payload) {
            Ok(envelope) => envelope,
            Err(error) => {
                dead_letter::park(
                    tx,
                    &self.consumer,
                    record,
                    None,
                    Reason::Decode,
                    &error.to_string(),
                    1,
                    now_micros(),
                )?;
                return Ok(Step::Consumed);
            }
        };
        let mut state = self.state(tx, &envelope.source, &envelope.subject)?;
        if envelope.sequence <= state.applied {
            return Ok(Step::Consumed);
        }
        if state.blocked_by.is_none()
            && self.skip_discarded(tx, &envelope.source, &envelope.subject, &mut state)?
        {
            if envelope.sequence <= state.applied {
                // This very event was discarded (a replay meets it again).
                let (source, subject) = (envelope.source.clone(), envelope.subject.clone());
                self.drain_held(tx, &source, &subject, &mut state)?;
                self.save_state(tx, &source, &subject, state)?;
                return Ok(Step::Consumed);
            }
            self.save_state(tx, &envelope.source, &envelope.subject, state)?;
        }
        if let Some(head) = state.blocked_by {
            let already_parked = dead_letter::parked_of_aggregate(
                tx,
                &self.consumer,
                &envelope.source,
                &envelope.subject,
            )?
            .iter()
            .any(|parked| parked.sequence == Some(envelope.sequence as i64));
            if !already_parked {
                dead_letter::park(
                    tx,
                    &self.consumer,
                    record,
                    Some(&envelope),
                    Reason::Blocked,
                    &format!("aggregate is blocked behind dead letter {head}"),
                    0,
                    now_micros(),
                )?;
            }
            return Ok(Step::Consumed);
        }
        if Some(envelope.sequence) != state.applied.checked_add(1) {
            self.hold(tx, record, &envelope)?;
            return Ok(Step::Consumed);
        }
        let created_micros =
            i64::try_from(envelope.time.unix_timestamp_nanos() / 1000).unwrap_or(0);
        let (source, subject) = (envelope.source.clone(), envelope.subject.clone());
        state.applied = envelope.sequence;
        let handled = match &self.collected {
            // Moved, not cloned: the batch's handler call gets it later.
            Some(collected) => {
                collected.borrow_mut().push(envelope);
                Ok(())
            }
            None => self.run_handler(tx, &envelope, self.isolate)?,
        };
        if let Err(error) = handled {
            return Ok(Step::Failed(error));
        }
        self.drain_held(tx, &source, &subject, &mut state)?;
        self.save_state(tx, &source, &subject, state)?;
        Ok(Step::Applied(created_micros))
    }

    fn hold(
        &self,
        tx: &mut dyn Tx,
        record: &Record,
        envelope: &Envelope,
    ) -> Result<(), StoreError> {
        self.pending_possible.set(true);
        tx.execute(
            "INSERT INTO tandem_pending (consumer, source, subject, sequence, topic, partition,
               record_offset, payload, received_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (consumer, source, subject, sequence) DO NOTHING",
            &[
                self.consumer.as_str().into(),
                envelope.source.as_str().into(),
                envelope.subject.as_str().into(),
                envelope.sequence.into(),
                record.topic.as_str().into(),
                record.partition.into(),
                record.offset.into(),
                record.payload.as_slice().into(),
                now_micros().into(),
            ],
        )?;
        Ok(())
    }

    /// Applies held events that follow `state.applied` without a gap. A held
    /// event whose handler fails is parked at once (it already waited).
    fn drain_held(
        &self,
        tx: &mut dyn Tx,
        source: &str,
        subject: &str,
        state: &mut AggregateState,
    ) -> Result<(), StoreError> {
        if !self.pending_possible.get() {
            return Ok(());
        }
        loop {
            if self.skip_discarded(tx, source, subject, state)? {
                // A discarded event may be held too (a replay met it ahead
                // of its predecessor): it is skipped, not applied.
                tx.execute(
                    "DELETE FROM tandem_pending
                     WHERE consumer = $1 AND source = $2 AND subject = $3 AND sequence <= $4",
                    params![&self.consumer, source, subject, state.applied],
                )?;
            }
            let Some(next) = state.applied.checked_add(1) else {
                return Ok(());
            };
            let Some(row) = tx.query_opt(
                "SELECT topic, partition, record_offset, payload FROM tandem_pending
                 WHERE consumer = $1 AND source = $2 AND subject = $3 AND sequence = $4",
                params![&self.consumer, source, subject, next],
            )?
            else {
                return Ok(());
            };
            let record = Record {
                topic: row.text(0)?.to_owned(),
                partition: u32::try_from(row.i64(1)?).unwrap_or(0),
                offset: u64::try_from(row.i64(2)?).unwrap_or(0),
                key: subject.to_owned(),
                payload: row.bytes(3)?.to_vec(),
                appended_at_micros: 0,
            };
            tx.execute(
                "DELETE FROM tandem_pending
                 WHERE consumer = $1 AND source = $2 AND subject = $3 AND sequence = $4",
                params![&self.consumer, source, subject, next],
            )?;
            let envelope = Envelope::decode(&record.payload)
                .map_err(|error| StoreError::Decode(format!("held event: {error}")))?;
            match self.run_handler(tx, &envelope, true)? {
                Ok(()) => state.applied = envelope.sequence,
                Err(error) => {
                    let id = dead_letter::park(
                        tx,
                        &self.consumer,
                        &record,
                        Some(&envelope),
                        Reason::Handler,
                        &error.message,
                        1,
                        now_micros(),
                    )?;
                    state.blocked_by = Some(id);
                    return Ok(());
                }
            }
        }
    }

    /// Parks a record whose handler kept failing and blocks its aggregate.
    fn park_failed(
        &self,
        tx: &mut dyn Tx,
        record: &Record,
        error: &HandlerError,
        attempts: u32,
        first_failed_at: i64,
    ) -> Result<(), StoreError> {
        let envelope = Envelope::decode(&record.payload)
            .map_err(|error| StoreError::Decode(format!("failed event: {error}")))?;
        let mut state = self.state(tx, &envelope.source, &envelope.subject)?;
        if envelope.sequence <= state.applied {
            return Ok(());
        }
        let id = dead_letter::park(
            tx,
            &self.consumer,
            record,
            Some(&envelope),
            Reason::Handler,
            &error.message,
            attempts,
            first_failed_at,
        )?;
        state.blocked_by = Some(id);
        self.save_state(tx, &envelope.source, &envelope.subject, state)
    }

    /// Tries the parked events of one aggregate in sequence order, applying
    /// all it can; the first that still fails blocks the aggregate again.
    fn advance_aggregate(
        &self,
        tx: &mut dyn Tx,
        source: &str,
        subject: &str,
    ) -> Result<(), StoreError> {
        let mut state = self.state(tx, source, subject)?;
        state.blocked_by = None;
        for parked in dead_letter::parked_of_aggregate(tx, &self.consumer, source, subject)? {
            let envelope = Envelope::decode(&parked.payload)
                .map_err(|error| StoreError::Decode(format!("parked event: {error}")))?;
            if envelope.sequence > state.applied.saturating_add(1) {
                self.skip_discarded(tx, source, subject, &mut state)?;
            }
            if envelope.sequence <= state.applied {
                dead_letter::set_status(tx, parked.id, "resolved")?;
                continue;
            }
            if envelope.sequence > state.applied.saturating_add(1) {
                dead_letter::record_failure(
                    tx,
                    parked.id,
                    &format!(
                        "gap: sequence {} has not been applied yet",
                        state.applied.saturating_add(1)
                    ),
                    false,
                )?;
                state.blocked_by = Some(parked.id);
                break;
            }
            match apply_handler(tx, &*self.handler, &envelope)? {
                Ok(()) => {
                    state.applied = envelope.sequence;
                    dead_letter::set_status(tx, parked.id, "resolved")?;
                }
                Err(error) => {
                    dead_letter::record_failure(tx, parked.id, &error.message, true)?;
                    state.blocked_by = Some(parked.id);
                    break;
                }
            }
        }
        if state.blocked_by.is_none() {
            self.drain_held(tx, source, subject, &mut state)?;
        }
        self.save_state(tx, source, subject, state)
    }

    fn redrive(&self, tx: &mut dyn Tx, dead_letter: &DeadLetter) -> Result<(), StoreError> {
        match (&dead_letter.source, &dead_letter.subject) {
            (Some(source), Some(subject)) => self.advance_aggregate(tx, source, subject),
            _ => {
                // Never decoded: try decoding again (a newer version may).
                match Envelope::decode(&dead_letter.payload) {
                    Err(error) => {
                        dead_letter::record_failure(tx, dead_letter.id, &error.to_string(), true)
                    }
                    Ok(envelope) => {
                        dead_letter::set_status(tx, dead_letter.id, "resolved")?;
                        let record = Record {
                            topic: dead_letter.topic.clone(),
                            partition: u32::try_from(dead_letter.partition).unwrap_or(0),
                            offset: u64::try_from(dead_letter.offset).unwrap_or(0),
                            key: envelope.subject.clone(),
                            payload: dead_letter.payload.clone(),
                            appended_at_micros: 0,
                        };
                        match self.apply_record(tx, &record)? {
                            Step::Consumed | Step::Applied(_) => Ok(()),
                            Step::Failed(error) => {
                                self.park_failed(tx, &record, &error, 1, now_micros())
                            }
                        }
                    }
                }
            }
        }
    }

    fn discard(&self, tx: &mut dyn Tx, dead_letter: &DeadLetter) -> Result<(), StoreError> {
        dead_letter::set_status(tx, dead_letter.id, "discarded")?;
        let (Some(source), Some(subject), Some(sequence)) = (
            &dead_letter.source,
            &dead_letter.subject,
            dead_letter.sequence,
        ) else {
            return Ok(());
        };
        let _ = sequence;
        let state = self.state(tx, source, subject)?;
        if state.blocked_by != Some(dead_letter.id) {
            // Not the head: its sequence is skipped when the aggregate
            // reaches it.
            return Ok(());
        }
        // The discarded sequence is recorded (status `discarded`) and
        // skipped once everything before it has applied: a head parked for
        // a gap may have a late predecessor parked behind it, which still
        // applies first. What queued behind it flows.
        self.advance_aggregate(tx, source, subject)
    }

    /// Parks what is held for the aggregates in `expired`, whose gap this
    /// process has watched for `gap_timeout` on its own monotonic clock.
    fn expire_gaps(
        &self,
        tx: &mut dyn Tx,
        expired: &[(String, String)],
        gap_timeout: Duration,
    ) -> Result<(), StoreError> {
        for (source, subject) in expired {
            let (source, subject) = (source.clone(), subject.clone());
            let mut state = self.state(tx, &source, &subject)?;
            // The missing sequences may have been discarded meanwhile.
            if state.blocked_by.is_none() {
                self.drain_held(tx, &source, &subject, &mut state)?;
                self.save_state(tx, &source, &subject, state)?;
            }
            let held = tx.query(
                "SELECT sequence, topic, partition, record_offset, payload, received_at
                 FROM tandem_pending WHERE consumer = $1 AND source = $2 AND subject = $3
                 ORDER BY sequence",
                params![&self.consumer, &source, &subject],
            )?;
            for held_row in held {
                let sequence = held_row.i64(0)?;
                let record = Record {
                    topic: held_row.text(1)?.to_owned(),
                    partition: u32::try_from(held_row.i64(2)?).unwrap_or(0),
                    offset: u64::try_from(held_row.i64(3)?).unwrap_or(0),
                    key: subject.clone(),
                    payload: held_row.bytes(4)?.to_vec(),
                    appended_at_micros: 0,
                };
                let envelope = Envelope::decode(&record.payload)
                    .map_err(|error| StoreError::Decode(format!("held event: {error}")))?;
                let (reason, error) = match state.blocked_by {
                    None => (
                        Reason::Gap,
                        format!(
                            "sequence {} of {source}/{subject} did not arrive within {} ms; got {sequence}",
                            state.applied.saturating_add(1),
                            gap_timeout.as_millis()
                        ),
                    ),
                    Some(head) => (
                        Reason::Blocked,
                        format!("aggregate is blocked behind dead letter {head}"),
                    ),
                };
                let id = dead_letter::park(
                    tx,
                    &self.consumer,
                    &record,
                    Some(&envelope),
                    reason,
                    &error,
                    0,
                    held_row.i64(5)?,
                )?;
                if state.blocked_by.is_none() {
                    tracing::error!(consumer = &self.consumer, %source, %subject, dead_letter = id, "sequence gap persisted");
                    state.blocked_by = Some(id);
                }
            }
            tx.execute(
                "DELETE FROM tandem_pending WHERE consumer = $1 AND source = $2 AND subject = $3",
                params![&self.consumer, &source, &subject],
            )?;
            self.save_state(tx, &source, &subject, state)?;
        }
        Ok(())
    }
}

/// Records that `records` are consumed. On a bus whose partitions are
/// exclusive to one member, a batch continues from the position, so the
/// position becomes the highest offset + 1. On a bus whose members share a
/// partition ([`Bus::shares_partitions`]), see [`save_shared_positions`].
fn save_positions(
    tx: &mut dyn Tx,
    consumer: &str,
    records: &[Record],
    shared: bool,
) -> Result<(), StoreError> {
    if shared {
        return save_shared_positions(tx, consumer, records);
    }
    let mut next: BTreeMap<(&str, u32), u64> = BTreeMap::new();
    for record in records {
        let entry = next.entry((&record.topic, record.partition)).or_insert(0);
        *entry = (*entry).max(record.offset.saturating_add(1));
    }
    let now = now_micros();
    for ((topic, partition), offset) in next {
        tx.execute(
            "INSERT INTO tandem_consumer_positions (consumer, topic, partition, next_offset, updated_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (consumer, topic, partition) DO UPDATE
             SET next_offset = excluded.next_offset, updated_at = excluded.updated_at",
            params![consumer, topic, partition, offset, now],
        )?;
    }
    Ok(())
}

/// Merges half-open offset ranges; adjacent ones become one.
fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (first, end) in ranges {
        match merged.last_mut() {
            Some(last) if first <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((first, end)),
        }
    }
    merged
}

/// Positions on a shared partition: members are handed interleaved
/// records, so one member's highest offset says nothing of the lower
/// offsets another member still holds. The position stays the first offset
/// not consumed by any member (a safe place to seek to after an outage or a
/// crash: nothing before it is lost), and the ranges consumed beyond it
/// wait in `tandem_consumer_offsets_ahead` until the gap before them fills.
fn save_shared_positions(
    tx: &mut dyn Tx,
    consumer: &str,
    records: &[Record],
) -> Result<(), StoreError> {
    let mut offsets: BTreeMap<(&str, u32), Vec<u64>> = BTreeMap::new();
    for record in records {
        offsets
            .entry((&record.topic, record.partition))
            .or_default()
            .push(record.offset);
    }
    let now = now_micros();
    for ((topic, partition), mut batch) in offsets {
        let floor = tx
            .query_opt(
                "SELECT next_offset FROM tandem_consumer_positions
                 WHERE consumer = $1 AND topic = $2 AND partition = $3",
                params![consumer, topic, partition],
            )?
            .map(|row| row.i64(0))
            .transpose()?
            .map_or(0, |offset| u64::try_from(offset).unwrap_or(0));
        let mut ranges: Vec<(u64, u64)> = tx
            .query(
                "SELECT first_offset, end_offset FROM tandem_consumer_offsets_ahead
                 WHERE consumer = $1 AND topic = $2 AND partition = $3",
                params![consumer, topic, partition],
            )?
            .iter()
            .map(|row| {
                Ok((
                    u64::try_from(row.i64(0)?).unwrap_or(0),
                    u64::try_from(row.i64(1)?).unwrap_or(0),
                ))
            })
            .collect::<Result<_, StoreError>>()?;
        let stored = ranges.len();
        batch.sort_unstable();
        batch.dedup();
        ranges.extend(
            batch
                .into_iter()
                .filter(|offset| *offset >= floor)
                .map(|offset| (offset, offset.saturating_add(1))),
        );
        let mut ranges = merge_ranges(ranges);
        let mut next = floor;
        if let Some(&(first, end)) = ranges.first() {
            if first <= next {
                next = next.max(end);
                ranges.remove(0);
            }
        }
        if stored > 0 || !ranges.is_empty() {
            tx.execute(
                "DELETE FROM tandem_consumer_offsets_ahead
                 WHERE consumer = $1 AND topic = $2 AND partition = $3",
                params![consumer, topic, partition],
            )?;
            for (first, end) in &ranges {
                tx.execute(
                    "INSERT INTO tandem_consumer_offsets_ahead
                       (consumer, topic, partition, first_offset, end_offset)
                     VALUES ($1, $2, $3, $4, $5)",
                    params![consumer, topic, partition, *first, *end],
                )?;
            }
        }
        tx.execute(
            "INSERT INTO tandem_consumer_positions (consumer, topic, partition, next_offset, updated_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (consumer, topic, partition) DO UPDATE
             SET next_offset = excluded.next_offset, updated_at = excluded.updated_at",
            params![consumer, topic, partition, next, now],
        )?;
    }
    Ok(())
}

/// The replay generation of `consumer`: bumped by every replay, checked by
/// every member in each batch.
fn generation(tx: &mut dyn Tx, consumer: &str) -> Result<i64, StoreError> {
    tx.query_opt(
        "SELECT generation FROM tandem_consumer_generations WHERE consumer = $1",
        params![consumer],
    )?
    .map_or(Ok(0), |row| row.i64(0))
}

/// Where `consumer` resumes, per partition.
pub async fn positions<S: Store>(
    store: &S,
    consumer: &str,
) -> Result<BTreeMap<TopicPartition, u64>, StoreError> {
    let consumer = consumer.to_owned();
    store.read(move |tx| read_positions(tx, &consumer)).await
}

fn read_positions(
    tx: &mut dyn Tx,
    consumer: &str,
) -> Result<BTreeMap<TopicPartition, u64>, StoreError> {
    let rows = tx.query(
        "SELECT topic, partition, next_offset FROM tandem_consumer_positions WHERE consumer = $1",
        params![consumer],
    )?;
    let mut positions = BTreeMap::new();
    for row in rows {
        positions.insert(
            TopicPartition::new(row.text(0)?, u32::try_from(row.i64(1)?).unwrap_or(0)),
            u64::try_from(row.i64(2)?).unwrap_or(0),
        );
    }
    Ok(positions)
}

/// Why a batch transaction was rolled back.
enum BatchError {
    Store(StoreError),
    /// A replay reset the consumer since this member last sought: its
    /// buffered records and positions belong to the generation before.
    Stale,
    /// The handler failed on the record at `index`.
    Handler {
        index: usize,
        error: HandlerError,
    },
    /// [`Handler::handle_batch`] failed somewhere in the batch.
    Collected,
}

impl From<StoreError> for BatchError {
    fn from(error: StoreError) -> Self {
        BatchError::Store(error)
    }
}

/// Outcome of applying a run of records in one transaction.
struct BatchOutcome {
    /// Records consumed (applied, dropped, held or parked) and committed.
    consumed: usize,
    /// Creation times (µs) of the events applied.
    applied_times: Vec<i64>,
    /// The record at index `consumed` failed with this error.
    failure: Option<HandlerError>,
    /// A replay reset the consumer: nothing was applied, and the member
    /// must seek to the positions of the new generation.
    stale: bool,
}

impl BatchOutcome {
    fn nothing() -> Self {
        BatchOutcome {
            consumed: 0,
            applied_times: Vec::new(),
            failure: None,
            stale: false,
        }
    }
}

/// How [`Consumer::drain_buffer`] ended.
enum Drained {
    /// Everything buffered was consumed.
    Done,
    /// Shutdown interrupted a retry.
    Shutdown,
    /// A replay reset the consumer: seek again and drop the buffer.
    Stale,
}

/// Whether `error` is the store being away for a while.
fn is_store_outage(error: &StoreError) -> bool {
    matches!(error, StoreError::Unavailable(_))
}

/// A running consumer.
pub struct Consumer<S: Store> {
    store: S,
    bus: Arc<dyn Bus>,
    handler: Arc<dyn Handler>,
    config: ConsumerConfig,
    observer: Option<Arc<dyn ConsumerObserver>>,
    /// The bus hands one partition to several members ([`Bus::shares_partitions`]).
    shared: bool,
    /// The replay generation this member's seeks belong to.
    generation: std::sync::atomic::AtomicI64,
    /// Since when (on this process's monotonic clock) each aggregate with
    /// held events has been seen waiting: the gap timeout is measured here,
    /// never by comparing wall clocks of different hosts.
    gap_watch: std::sync::Mutex<HashMap<(String, String), Instant>>,
}

/// Margin added to a bus's redelivery delay for a gap timeout.
const GAP_MARGIN: Duration = Duration::from_secs(5);

impl<S: Store> Consumer<S> {
    /// A consumer of `config.topics` on `bus`. A `gap_timeout` that does
    /// not exceed the bus's longest redelivery delay
    /// ([`Bus::redelivery_delay_max`]) is raised above it: a predecessor
    /// still waiting for its redelivery would otherwise have its successors
    /// parked as gaps.
    pub fn new(
        store: S,
        bus: Arc<dyn Bus>,
        handler: Arc<dyn Handler>,
        mut config: ConsumerConfig,
    ) -> Self {
        let redelivery = bus.redelivery_delay_max();
        if !redelivery.is_zero() && config.gap_timeout <= redelivery {
            let raised = redelivery + GAP_MARGIN;
            tracing::info!(
                consumer = %config.name,
                gap_timeout_ms = config.gap_timeout.as_millis() as u64,
                redelivery_ms = redelivery.as_millis() as u64,
                raised_to_ms = raised.as_millis() as u64,
                "gap timeout raised above the bus's longest redelivery delay"
            );
            config.gap_timeout = raised;
        }
        Self {
            shared: bus.shares_partitions(),
            store,
            bus,
            handler,
            config,
            observer: None,
            generation: std::sync::atomic::AtomicI64::new(0),
            gap_watch: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Reports every committed batch to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn ConsumerObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    /// Consumes until `shutdown` fires. The batch in flight then commits or
    /// rolls back as a whole; nothing is half-applied.
    ///
    /// An engine that becomes unreachable (a bus or store error of kind
    /// `Unavailable`) is waited out: the consumer drops its subscription,
    /// backs off exponentially with jitter up to `retry_outage_max`, and
    /// joins its group again, which seeks every assigned partition back to
    /// the position stored with the effects; nothing is lost or applied
    /// twice. Any other error ends `run`.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), ConsumerError> {
        let mut backoff = Backoff::new(self.config.retry_initial, self.config.retry_outage_max);
        loop {
            let started = Instant::now();
            let error = match self.run_subscribed(&shutdown).await {
                Ok(()) => return Ok(()),
                Err(error) if is_outage(&error) => error,
                Err(error) => return Err(error),
            };
            // A subscription that worked for a while starts the backoff over.
            if started.elapsed() > self.config.retry_outage_max * 2 {
                backoff.reset();
            }
            let pause = backoff.next_delay();
            tracing::warn!(
                consumer = %self.config.name,
                %error,
                retry_in_ms = pause.as_millis() as u64,
                "engine unavailable; joining the group again after a pause"
            );
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    async fn run_subscribed(&self, shutdown: &CancellationToken) -> Result<(), ConsumerError> {
        let shutdown = shutdown.clone();
        let mut subscription = self
            .bus
            .subscribe(&self.config.name, &self.config.topics)
            .await?;
        let mut assigned: Vec<TopicPartition> = Vec::new();
        let mut buffer: VecDeque<Record> = VecDeque::new();
        let mut last_housekeeping = Instant::now() - self.config.housekeeping_interval;
        let mut last_gap_check = Instant::now();
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            if last_housekeeping.elapsed() >= self.config.housekeeping_interval {
                last_housekeeping = Instant::now();
                if self.run_requests(&mut subscription, &assigned).await? {
                    buffer.clear();
                }
                if last_gap_check.elapsed()
                    >= (self.config.gap_timeout / 4).max(Duration::from_millis(10))
                {
                    last_gap_check = Instant::now();
                    self.expire_gaps().await?;
                }
            }
            if buffer.is_empty() {
                let wait = self.config.housekeeping_interval;
                let delivery = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    delivery = subscription.next(self.config.batch_size, wait) => delivery?,
                };
                match delivery {
                    None => continue,
                    Some(Delivery::Assigned(partitions)) => {
                        tracing::info!(
                            consumer = %self.config.name,
                            partitions = %describe(&partitions),
                            "partitions assigned"
                        );
                        self.seek_to_positions(&mut subscription, &partitions)
                            .await?;
                        assigned.extend(partitions);
                        buffer.clear();
                        continue;
                    }
                    Some(Delivery::Revoked(partitions)) => {
                        tracing::info!(
                            consumer = %self.config.name,
                            partitions = %describe(&partitions),
                            "partitions revoked"
                        );
                        assigned.retain(|partition| !partitions.contains(partition));
                        buffer.retain(|record| {
                            !partitions.contains(&TopicPartition::new(
                                record.topic.clone(),
                                record.partition,
                            ))
                        });
                        continue;
                    }
                    Some(Delivery::Records(records)) => buffer.extend(records),
                }
            }
            match self
                .drain_buffer(&mut buffer, &mut subscription, &shutdown)
                .await?
            {
                Drained::Done => {}
                Drained::Shutdown => return Ok(()),
                Drained::Stale => {
                    tracing::info!(
                        consumer = %self.config.name,
                        "another member replayed the consumer; seeking to the new positions"
                    );
                    buffer.clear();
                    self.seek_to_positions(&mut subscription, &assigned).await?;
                }
            }
        }
    }

    /// Seeks `partitions` to the stored positions, and takes the replay
    /// generation they belong to (read in one snapshot with them).
    async fn seek_to_positions(
        &self,
        subscription: &mut Box<dyn Subscription>,
        partitions: &[TopicPartition],
    ) -> Result<(), ConsumerError> {
        let consumer = self.config.name.clone();
        let (saved, current) = self
            .store
            .read(move |tx| -> Result<_, StoreError> {
                Ok((read_positions(tx, &consumer)?, generation(tx, &consumer)?))
            })
            .await?;
        for partition in partitions {
            let offset = saved.get(partition).copied().unwrap_or(0);
            subscription.seek(partition, offset).await?;
        }
        self.generation
            .store(current, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Applies everything in `buffer`. A shutdown that interrupts a retry
    /// leaves the record unapplied (it is redelivered on restart).
    async fn drain_buffer(
        &self,
        buffer: &mut VecDeque<Record>,
        subscription: &mut Box<dyn Subscription>,
        shutdown: &CancellationToken,
    ) -> Result<Drained, ConsumerError> {
        while !buffer.is_empty() {
            let records: Arc<Vec<Record>> = Arc::new(buffer.iter().cloned().collect());
            let outcome = self.apply_batch(Arc::clone(&records)).await?;
            if outcome.stale {
                return Ok(Drained::Stale);
            }
            buffer.drain(..outcome.consumed);
            subscription.ack(&records[..outcome.consumed]).await?;
            let Some(error) = outcome.failure else {
                continue;
            };
            let failed = buffer.pop_front().expect("the failed record is buffered");
            match self
                .retry_then_park(failed, error, subscription, shutdown)
                .await?
            {
                Drained::Done => {}
                other => return Ok(other),
            }
        }
        Ok(Drained::Done)
    }

    async fn retry_then_park(
        &self,
        record: Record,
        first_error: HandlerError,
        subscription: &mut Box<dyn Subscription>,
        shutdown: &CancellationToken,
    ) -> Result<Drained, ConsumerError> {
        let first_failed_at = now_micros();
        let mut attempts: u32 = 1;
        let mut error = first_error;
        let mut backoff = Backoff::new(self.config.retry_initial, self.config.retry_max);
        let record = Arc::new(vec![record]);
        loop {
            tracing::debug!(consumer = %self.config.name, attempts, error = %error, "handler failed");
            if error.permanent || attempts >= self.config.max_attempts {
                let consumer = self.config.name.clone();
                let handler = Arc::clone(&self.handler);
                let parked = Arc::clone(&record);
                let shared = self.shared;
                let known = self.generation.load(std::sync::atomic::Ordering::SeqCst);
                let stale = self
                    .store
                    .write(move |tx: &mut dyn Tx| -> Result<bool, StoreError> {
                        if generation(tx, &consumer)? != known {
                            return Ok(true);
                        }
                        let context = BatchContext::new(consumer.clone(), handler, true);
                        tx.savepoint("tandem_park")?;
                        match context.park_failed(tx, &parked[0], &error, attempts, first_failed_at)
                        {
                            Ok(()) => tx.release_savepoint("tandem_park")?,
                            Err(failure) if is_store_outage(&failure) => return Err(failure),
                            // The store refuses what this record asks of it:
                            // park the bytes alone, so it never stops the consumer.
                            Err(failure) => {
                                tx.rollback_to_savepoint("tandem_park")?;
                                dead_letter::park(
                                    tx,
                                    &consumer,
                                    &parked[0],
                                    None,
                                    Reason::Store,
                                    &format!("{}; parking it: {failure}", error.message),
                                    attempts,
                                    first_failed_at,
                                )?;
                            }
                        }
                        save_positions(tx, &consumer, &parked, shared)?;
                        Ok(false)
                    })
                    .await?;
                if stale {
                    return Ok(Drained::Stale);
                }
                subscription.ack(&record).await?;
                return Ok(Drained::Done);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(Drained::Shutdown),
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
            let outcome = self.apply_batch(Arc::clone(&record)).await?;
            if outcome.stale {
                return Ok(Drained::Stale);
            }
            attempts += 1;
            match outcome.failure {
                None => {
                    subscription.ack(&record).await?;
                    return Ok(Drained::Done);
                }
                Some(next_error) => error = next_error,
            }
        }
    }

    /// Applies `records` in order in one transaction, stopping at the first
    /// handler failure; commits what came before it.
    ///
    /// A store error that is not an outage is taken to be tied to one of
    /// the records (a value the engine refuses): the records are applied
    /// one transaction each, and the one the store refuses is reported as a
    /// permanent failure, to be parked; it never stops the consumer.
    async fn apply_batch(&self, records: Arc<Vec<Record>>) -> Result<BatchOutcome, StoreError> {
        let outcome = match self.apply_records(Arc::clone(&records), true).await {
            // Find the event at fault: one `handle` call at a time.
            Err(BatchError::Collected) => self.apply_records(Arc::clone(&records), false).await,
            outcome => outcome,
        };
        match outcome {
            Err(BatchError::Store(error)) if !is_store_outage(&error) => {
                if records.len() == 1 {
                    tracing::warn!(consumer = %self.config.name, %error, "the store refused a record");
                    let mut outcome = BatchOutcome::nothing();
                    outcome.failure = Some(HandlerError::permanent(format!(
                        "the store refused the record: {error}"
                    )));
                    return Ok(outcome);
                }
                let mut total = BatchOutcome::nothing();
                for record in records.iter() {
                    let single = Box::pin(self.apply_batch(Arc::new(vec![record.clone()]))).await?;
                    total.consumed += single.consumed;
                    total.applied_times.extend(single.applied_times);
                    if single.failure.is_some() || single.stale {
                        total.failure = single.failure;
                        total.stale = single.stale;
                        break;
                    }
                }
                Ok(total)
            }
            outcome => self.batch_outcome(&records, outcome).await,
        }
    }

    /// Applies `records` in one transaction; `collect`: with one
    /// [`Handler::handle_batch`] call instead of a `handle` call each.
    async fn apply_records(
        &self,
        records: Arc<Vec<Record>>,
        collect: bool,
    ) -> Result<BatchOutcome, BatchError> {
        let consumer = self.config.name.clone();
        let handler = Arc::clone(&self.handler);
        let batch = Arc::clone(&records);
        let shared = self.shared;
        let known = self.generation.load(std::sync::atomic::Ordering::SeqCst);
        self.store
            .write(move |tx: &mut dyn Tx| -> Result<BatchOutcome, BatchError> {
                if generation(tx, &consumer)? != known {
                    return Err(BatchError::Stale);
                }
                let mut context = BatchContext::new(consumer, handler, false);
                if collect {
                    context = context.collecting();
                }
                context.look_for_pending(tx)?;
                context.preload_states(tx, &batch)?;
                let mut consumed = 0;
                let mut applied_times = Vec::with_capacity(batch.len());
                for record in batch.iter() {
                    match context.apply_record(tx, record)? {
                        Step::Consumed => consumed += 1,
                        Step::Applied(time) => {
                            consumed += 1;
                            applied_times.push(time);
                        }
                        // Roll the whole batch back; the caller applies the
                        // records before this one again, without it.
                        Step::Failed(error) => {
                            return Err(BatchError::Handler {
                                index: consumed,
                                error,
                            })
                        }
                    }
                }
                if context.handle_collected(tx).is_err() {
                    return Err(BatchError::Collected);
                }
                context.flush_states(tx)?;
                crate::fault::point("consumer.before_commit");
                save_positions(tx, &context.consumer, &batch, shared)?;
                Ok(BatchOutcome {
                    consumed,
                    applied_times,
                    failure: None,
                    stale: false,
                })
            })
            .await
    }

    /// What became of a batch: a handler failure at `index` commits the
    /// records before it (applied again without it) and reports the
    /// failure; a committed batch is told to the observer.
    async fn batch_outcome(
        &self,
        records: &[Record],
        outcome: Result<BatchOutcome, BatchError>,
    ) -> Result<BatchOutcome, StoreError> {
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(BatchError::Store(error)) => return Err(error),
            Err(BatchError::Stale) => {
                let mut outcome = BatchOutcome::nothing();
                outcome.stale = true;
                return Ok(outcome);
            }
            Err(BatchError::Collected) => {
                return Err(StoreError::Engine(
                    "a batch handler failure reached the one-by-one path".into(),
                ))
            }
            Err(BatchError::Handler { index, error }) => {
                let mut outcome = if index == 0 {
                    BatchOutcome::nothing()
                } else {
                    Box::pin(self.apply_batch(Arc::new(records[..index].to_vec()))).await?
                };
                if outcome.failure.is_none() && !outcome.stale && outcome.consumed == index {
                    outcome.failure = Some(error);
                }
                return Ok(outcome);
            }
        };
        if let Some(observer) = &self.observer {
            observer.batch_committed(CommittedBatch {
                consumer: &self.config.name,
                consumed: outcome.consumed,
                committed_at_micros: now_micros(),
                applied_created_micros: &outcome.applied_times,
            });
        }
        Ok(outcome)
    }

    /// Parks the events held for an aggregate whose gap this process has
    /// watched for `gap_timeout`. The wait is measured on this process's
    /// monotonic clock from when it first saw the aggregate waiting, not
    /// from `received_at`, which another host's wall clock may have
    /// written: a clock that jumps or runs apart from another host's then
    /// cannot park an event early. (A restart starts the watch again.)
    async fn expire_gaps(&self) -> Result<(), StoreError> {
        let consumer = self.config.name.clone();
        let waiting = self
            .store
            .read(
                move |tx: &mut dyn Tx| -> Result<Vec<(String, String)>, StoreError> {
                    tx.query(
                        "SELECT DISTINCT source, subject FROM tandem_pending WHERE consumer = $1",
                        params![&consumer],
                    )?
                    .iter()
                    .map(|row| Ok((row.text(0)?.to_owned(), row.text(1)?.to_owned())))
                    .collect()
                },
            )
            .await?;
        let gap_timeout = self.config.gap_timeout;
        let now = Instant::now();
        let expired: Vec<(String, String)> = {
            let mut watch = self
                .gap_watch
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let waiting: std::collections::HashSet<(String, String)> =
                waiting.into_iter().collect();
            watch.retain(|aggregate, _| waiting.contains(aggregate));
            for aggregate in waiting {
                watch.entry(aggregate).or_insert(now);
            }
            watch
                .iter()
                .filter(|(_, since)| now.duration_since(**since) >= gap_timeout)
                .map(|(aggregate, _)| aggregate.clone())
                .collect()
        };
        if expired.is_empty() {
            return Ok(());
        }
        let consumer = self.config.name.clone();
        let handler = Arc::clone(&self.handler);
        let parked = expired.clone();
        self.store
            .write(move |tx: &mut dyn Tx| -> Result<(), StoreError> {
                BatchContext::new(consumer, handler, true).expire_gaps(tx, &parked, gap_timeout)
            })
            .await?;
        let mut watch = self
            .gap_watch
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for aggregate in &expired {
            watch.remove(aggregate);
        }
        Ok(())
    }

    /// Carries out pending requests; returns true if a replay reset the
    /// positions (the caller drops what it had buffered).
    async fn run_requests(
        &self,
        subscription: &mut Box<dyn Subscription>,
        assigned: &[TopicPartition],
    ) -> Result<bool, ConsumerError> {
        let mut replayed = false;
        // A cheap read first: most of the time there is nothing to do, and
        // a write transaction would take the database's write lock for it.
        let consumer = self.config.name.clone();
        let pending = self
            .store
            .read(move |tx: &mut dyn Tx| -> Result<bool, StoreError> {
                Ok(tx
                    .query_opt(
                        "SELECT 1 FROM tandem_consumer_requests WHERE consumer = $1 LIMIT 1",
                        params![&consumer],
                    )?
                    .is_some())
            })
            .await?;
        if !pending {
            return Ok(false);
        }
        loop {
            let consumer = self.config.name.clone();
            let handler = Arc::clone(&self.handler);
            let done = self
                .store
                .write(
                    move |tx: &mut dyn Tx| -> Result<Option<(Option<Command>, i64)>, StoreError> {
                        let Some(command) = dead_letter::take_request(tx, &consumer)? else {
                            return Ok(None);
                        };
                        let context =
                            BatchContext::new(consumer.clone(), Arc::clone(&handler), true);
                        match command {
                            None => {}
                            Some(Command::Replay) => {
                                handler.reset(tx).map_err(|error| {
                                    StoreError::Engine(format!("read model reset failed: {error}"))
                                })?;
                                for table in [
                                    "tandem_consumer_positions",
                                    "tandem_consumer_offsets_ahead",
                                    "tandem_consumer_aggregates",
                                    "tandem_pending",
                                ] {
                                    tx.execute(
                                        &format!("DELETE FROM {table} WHERE consumer = $1"),
                                        params![&consumer],
                                    )?;
                                }
                                // Parked events come up again from the log;
                                // discarded and resolved ones stay on record, so
                                // a discarded event is skipped again.
                                tx.execute(
                                    "DELETE FROM tandem_dead_letters
                                     WHERE consumer = $1 AND status = 'parked'",
                                    params![&consumer],
                                )?;
                                // Every member sees the new generation in its
                                // next batch and seeks again before applying.
                                tx.execute(
                                    "INSERT INTO tandem_consumer_generations (consumer, generation)
                                     VALUES ($1, 1)
                                     ON CONFLICT (consumer) DO UPDATE
                                     SET generation = tandem_consumer_generations.generation + 1",
                                    params![&consumer],
                                )?;
                            }
                            Some(Command::Discard(None)) => {
                                // Every parked row goes: each aggregate's head
                                // is discarded, what was only blocked behind it
                                // applies (or, failing, is parked and then
                                // discarded in the next round).
                                loop {
                                    let heads = parked_heads(tx, &consumer)?;
                                    if heads.is_empty() {
                                        break;
                                    }
                                    for head in heads {
                                        let Some(current) = dead_letter::get_in(tx, head.id)?
                                        else {
                                            continue;
                                        };
                                        if current.status == "parked" {
                                            context.discard(tx, &current)?;
                                        }
                                    }
                                }
                            }
                            Some(Command::Redrive(id)) | Some(Command::Discard(id)) => {
                                let targets = match id {
                                    Some(id) => dead_letter::get_in(tx, id)?
                                        .into_iter()
                                        .filter(|letter| {
                                            letter.consumer == consumer && letter.status == "parked"
                                        })
                                        .collect(),
                                    None => parked_heads(tx, &consumer)?,
                                };
                                for target in targets {
                                    // An earlier step may have settled it already.
                                    let Some(current) = dead_letter::get_in(tx, target.id)? else {
                                        continue;
                                    };
                                    if current.status != "parked" {
                                        continue;
                                    }
                                    // A store error tied to this letter (a value the
                                    // engine refuses) is recorded on it; it never
                                    // stops the consumer.
                                    tx.savepoint("tandem_request")?;
                                    let outcome = if matches!(command, Some(Command::Discard(_))) {
                                        context.discard(tx, &current)
                                    } else {
                                        context.redrive(tx, &current)
                                    };
                                    match outcome {
                                        Ok(()) => tx.release_savepoint("tandem_request")?,
                                        Err(error) if is_store_outage(&error) => return Err(error),
                                        Err(error) => {
                                            tx.rollback_to_savepoint("tandem_request")?;
                                            // The cached states may hold what was undone.
                                            context.states.borrow_mut().clear();
                                            dead_letter::record_failure(
                                                tx,
                                                current.id,
                                                &format!("the store refused it: {error}"),
                                                true,
                                            )?;
                                        }
                                    }
                                }
                            }
                        }
                        Ok(Some((command, generation(tx, &consumer)?)))
                    },
                )
                .await?;
            match done {
                None => return Ok(replayed),
                Some((Some(Command::Replay), current)) => {
                    tracing::info!(consumer = %self.config.name, "replaying from the start of the log");
                    for partition in assigned {
                        subscription.seek(partition, 0).await?;
                    }
                    self.generation
                        .store(current, std::sync::atomic::Ordering::SeqCst);
                    replayed = true;
                }
                Some(_) => {}
            }
        }
    }
}

/// One parked row per blocked aggregate (its lowest sequence, whatever
/// order the rows were parked in), plus every
/// parked row that never decoded.
fn parked_heads(tx: &mut dyn Tx, consumer: &str) -> Result<Vec<DeadLetter>, StoreError> {
    let rows = tx.query(
        "SELECT id FROM tandem_dead_letters WHERE consumer = $1 AND status = 'parked'
         ORDER BY source, subject, sequence, id",
        params![consumer],
    )?;
    let mut heads = Vec::new();
    let mut seen: Vec<(String, String)> = Vec::new();
    for row in rows {
        let Some(letter) = dead_letter::get_in(tx, row.i64(0)?)? else {
            continue;
        };
        match (&letter.source, &letter.subject) {
            (Some(source), Some(subject)) => {
                let key = (source.clone(), subject.clone());
                if !seen.contains(&key) {
                    seen.push(key);
                    heads.push(letter);
                }
            }
            _ => heads.push(letter),
        }
    }
    Ok(heads)
}

/// A consumer must be able to run on a multi-threaded runtime.
#[cfg(test)]
mod send_checks {
    use super::*;

    fn assert_send<T: Send>(_: T) {}

    #[allow(dead_code)]
    fn consumer_future_is_send(consumer: &'static Consumer<crate::sqlite::SqliteStore>) {
        assert_send(consumer.run(CancellationToken::new()));
    }
}
