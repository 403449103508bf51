//! The transactional outbox, which is also the service's event store.
//!
//! [`append`] runs inside the caller's own transaction: the state change and
//! its events commit together or not at all. Each aggregate's events get a
//! gap-free `sequence` kept in `tandem_aggregates`; of two concurrent
//! writers of one aggregate, the second waits for the first and appends
//! after it (or, where the engine cannot wait, gets
//! [`StoreError::Conflict`]), and a writer whose expected sequence
//! (`NewEvent::expect_sequence`) is stale gets [`StoreError::Conflict`].

use serde_json::Value;
use time::OffsetDateTime;

use crate::envelope::{Envelope, EventPayload};
use crate::params;
use crate::schema::now_micros;
use crate::sql::OutboxRow;
use crate::store::{Param, StoreError, Tx};

/// Tracing and causality attributes carried with an event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventContext {
    /// The W3C trace context to carry; when `None`, the event takes that
    /// of the span it is appended under, if any is being traced.
    pub traceparent: Option<String>,
    /// An id shared by every event of one piece of business (an order id,
    /// a request id), passed on from event to event by handlers.
    pub correlationid: Option<String>,
    /// The id of the event that caused this one, when a handler appends it.
    pub causationid: Option<String>,
}

/// An event about to be appended.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The aggregate id: the envelope's `subject` and the partition key.
    /// Must not be empty.
    pub subject: String,
    /// The CloudEvents `type` (see [`EventPayload::TYPE`]).
    pub event_type: String,
    /// The payload's schema and version (see [`EventPayload::SCHEMA`]).
    pub dataschema: String,
    /// The payload, as JSON.
    pub data: Value,
    /// The sequence the writer last saw for this aggregate (0 for a new
    /// one); `None` appends after whatever is there.
    pub expected_sequence: Option<u64>,
    /// Tracing and causality attributes to carry.
    pub context: EventContext,
}

impl NewEvent {
    /// An event for aggregate `subject` carrying a typed payload.
    pub fn new<T: EventPayload>(
        subject: impl Into<String>,
        payload: &T,
    ) -> Result<Self, StoreError> {
        let data = serde_json::to_value(payload).map_err(|error| {
            StoreError::Engine(format!("payload does not serialise: {error}").into())
        })?;
        Ok(Self {
            subject: subject.into(),
            event_type: T::TYPE.to_owned(),
            dataschema: T::SCHEMA.to_owned(),
            data,
            expected_sequence: None,
            context: EventContext::default(),
        })
    }

    /// Appends only if the aggregate is still at `sequence` (0: it must
    /// not exist yet), else fails with [`StoreError::Conflict`]: optimistic
    /// concurrency for a writer that decided on the state it read.
    pub fn expect_sequence(mut self, sequence: u64) -> Self {
        self.expected_sequence = Some(sequence);
        self
    }

    /// Carries `context` (trace, correlation and causation ids).
    pub fn with_context(mut self, context: EventContext) -> Self {
        self.context = context;
        self
    }
}

/// Appends `event` to the outbox of `source` (the publishing service, also
/// the topic) inside `tx`, and returns the envelope that will be published.
///
/// Nothing is sent here: the event is published by a [`crate::Relay`]
/// once `tx` commits, and never if it rolls back. The event takes its
/// aggregate's next sequence (gap-free, from 1) and a fresh id. Without an
/// expected sequence, a concurrent writer of the same aggregate makes this
/// call wait for it and then append after it (or fail with
/// [`StoreError::Conflict`], where the engine cannot wait); with one
/// ([`NewEvent::expect_sequence`]), an aggregate that moved on fails with
/// [`StoreError::Conflict`], and the caller's transaction should roll
/// back. An empty subject is refused ([`StoreError::Engine`]). The rows it
/// writes are the service's event store as well as its outbox.
pub fn append(tx: &mut dyn Tx, source: &str, event: NewEvent) -> Result<Envelope, StoreError> {
    check_subject(&event)?;
    let sequence = match event.expected_sequence {
        Some(expected) => take_expected_sequence(tx, source, &event.subject, expected)?,
        None => next_sequence(tx, source, &event.subject)?,
    };
    let envelope = envelope_of(source, event, sequence);
    let bytes = envelope.to_json();
    let event_id = envelope.id.to_string();
    tx.execute(
        "INSERT INTO tandem_outbox (topic, subject, sequence, event_id, event_type, envelope, committed_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            Param::Text(source),
            Param::Text(&envelope.subject),
            Param::from(sequence),
            Param::Text(&event_id),
            Param::Text(&envelope.event_type),
            Param::Blob(&bytes),
            Param::Int(now_micros()),
        ],
    )?;
    tx.outbox_appended();
    Ok(envelope)
}

/// Appends several events to the outbox of `source` inside `tx`, in order,
/// and returns their envelopes: the same as calling [`append`] for each,
/// with the same sequences and the same conflicts.
///
/// Events without an expected sequence cost a few statements for the whole
/// batch instead of two or three each: the engine takes every aggregate's
/// sequences at once ([`crate::sql::EngineSql::take_sequences`]) and
/// writes every row in a statement or a few
/// ([`crate::sql::EngineSql::insert_events`]).
pub fn append_all(
    tx: &mut dyn Tx,
    source: &str,
    events: Vec<NewEvent>,
) -> Result<Vec<Envelope>, StoreError> {
    let one_by_one =
        events.len() < 2 || events.iter().any(|event| event.expected_sequence.is_some());
    if one_by_one {
        return events
            .into_iter()
            .map(|event| append(tx, source, event))
            .collect();
    }
    events.iter().try_for_each(check_subject)?;
    // Under an unsampled trace every event carries the same traceparent:
    // worked out once, not once an event.
    let mut events = events;
    if let Some(traceparent) = crate::trace::unsampled_parent() {
        for event in events.iter_mut() {
            event
                .context
                .traceparent
                .get_or_insert_with(|| traceparent.clone());
        }
    }
    let engine = tx.engine();
    // Each aggregate's count in order of first appearance, then the
    // sequences the engine gave it.
    let mut slot_of: std::collections::HashMap<&str, usize> =
        std::collections::HashMap::with_capacity(events.len());
    let mut counts: Vec<(&str, u64)> = Vec::with_capacity(events.len());
    for event in &events {
        let slot = *slot_of.entry(event.subject.as_str()).or_insert_with(|| {
            counts.push((event.subject.as_str(), 0));
            counts.len() - 1
        });
        counts[slot].1 += 1;
    }
    let mut next = engine.take_sequences(tx, source, &counts)?;
    if next.len() != counts.len() {
        return Err(StoreError::Engine(
            format!(
                "{} gave sequences for {} of {} aggregates",
                engine.name(),
                next.len(),
                counts.len()
            )
            .into(),
        ));
    }
    let sequences: Vec<u64> = events
        .iter()
        .map(|event| {
            let slot = &mut next[slot_of[event.subject.as_str()]];
            *slot += 1;
            *slot - 1
        })
        .collect();
    drop(slot_of);
    let envelopes: Vec<Envelope> = events
        .into_iter()
        .zip(sequences)
        .map(|(event, sequence)| envelope_of(source, event, sequence))
        .collect();
    let written: Vec<(Vec<u8>, String)> = envelopes
        .iter()
        .map(|envelope| (envelope.to_json(), envelope.id.to_string()))
        .collect();
    let rows: Vec<OutboxRow<'_>> = envelopes
        .iter()
        .zip(&written)
        .map(|(envelope, (json, id))| OutboxRow::of(envelope, json, id))
        .collect();
    engine.insert_events(tx, source, &rows, now_micros())?;
    drop(rows);
    tx.outbox_appended();
    Ok(envelopes)
}

fn check_subject(event: &NewEvent) -> Result<(), StoreError> {
    if event.subject.is_empty() {
        return Err(StoreError::Engine("event subject must not be empty".into()));
    }
    Ok(())
}

fn envelope_of(source: &str, event: NewEvent, sequence: u64) -> Envelope {
    // An event appended under a trace (a request's, a consumer's) carries
    // its `create` span's context.
    let traceparent = event
        .context
        .traceparent
        .or_else(|| crate::trace::create(source, &event.event_type, &event.subject));
    Envelope {
        id: crate::envelope::new_event_id(),
        source: source.to_owned(),
        event_type: event.event_type,
        subject: event.subject,
        time: OffsetDateTime::now_utc(),
        dataschema: event.dataschema,
        data: event.data,
        sequence,
        traceparent,
        correlationid: event.context.correlationid,
        causationid: event.context.causationid,
        snapshot: false,
    }
}

/// Takes the next sequence of aggregate `subject` in `topic`, the
/// engine's way ([`crate::sql::EngineSql::next_sequence`]): a concurrent
/// writer of the same aggregate makes this one wait and take the sequence
/// after it, so two writers never commit the same sequence, and a writer
/// that must not append behind another says so with an expected sequence
/// ([`take_expected_sequence`]).
fn next_sequence(tx: &mut dyn Tx, topic: &str, subject: &str) -> Result<u64, StoreError> {
    tx.engine().next_sequence(tx, topic, subject)
}

/// Takes sequence `expected + 1` of aggregate `subject`, or fails with
/// [`StoreError::Conflict`] when the aggregate is elsewhere: a conditional
/// update (or, for `expected == 0`, an insert that does nothing when the row
/// exists) changes one row exactly when the writer's view was current, also
/// against a concurrent writer, whose change the update waits for and then
/// re-checks.
fn take_expected_sequence(
    tx: &mut dyn Tx,
    topic: &str,
    subject: &str,
    expected: u64,
) -> Result<u64, StoreError> {
    let expected = i64::try_from(expected).map_err(|_| {
        StoreError::Engine(format!("expected sequence {expected} is too large").into())
    })?;
    let changed = if expected == 0 {
        tx.execute(
            "INSERT INTO tandem_aggregates (topic, subject, sequence) VALUES ($1, $2, 1)
             ON CONFLICT (topic, subject) DO NOTHING",
            params![topic, subject],
        )?
    } else {
        tx.execute(
            "UPDATE tandem_aggregates SET sequence = $3
             WHERE topic = $1 AND subject = $2 AND sequence = $4",
            params![topic, subject, expected + 1, expected],
        )?
    };
    if changed == 1 {
        return Ok(u64::try_from(expected + 1).unwrap_or(0));
    }
    let current = tx
        .query_opt(
            "SELECT sequence FROM tandem_aggregates WHERE topic = $1 AND subject = $2",
            params![topic, subject],
        )?
        .map(|row| row.i64(0))
        .transpose()?
        .unwrap_or(0);
    Err(StoreError::Conflict(
        format!("aggregate {topic}/{subject} is at sequence {current}, writer expected {expected}")
            .into(),
    ))
}

/// Appends a typed payload: `publish(tx, "customer", &id, &CustomerCreated {..})`.
pub fn publish<T: EventPayload>(
    tx: &mut dyn Tx,
    source: &str,
    subject: &str,
    payload: &T,
) -> Result<Envelope, StoreError> {
    append(tx, source, NewEvent::new(subject, payload)?)
}

/// One row of the event store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// The row's place in the order of insertion (not commit order on
    /// PostgreSQL; see [`read_committed_after`]).
    pub position: i64,
    /// The transaction that wrote the row (PostgreSQL); 0 on SQLite.
    pub xid: i64,
    /// The topic it is published on (the publishing service).
    pub topic: String,
    /// The aggregate id.
    pub subject: String,
    /// The event's place in its aggregate (the envelope's `sequence`).
    pub sequence: u64,
    /// The encoded envelope, the bytes the relay publishes.
    pub envelope: Vec<u8>,
    /// When it was appended, in microseconds since the Unix epoch (the
    /// clock of the writing process, read before the commit).
    pub committed_at_micros: i64,
}

impl StoredEvent {
    /// Where this event stands in commit order.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            xid: self.xid,
            position: self.position,
        }
    }
}

/// A relay's place in the outbox, in commit order: `(xid, position)`
/// compared as a pair. On SQLite `xid` is always 0 and `position` alone
/// orders commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Cursor {
    /// The transaction id of the last event passed (always 0 on SQLite;
    /// 0 too after [`recover_restarted_xids`]).
    pub xid: i64,
    /// The position of the last event passed.
    pub position: i64,
}

impl Cursor {
    /// Before every event.
    pub const START: Cursor = Cursor {
        xid: 0,
        position: 0,
    };
}

/// Events after `position`, in position order: the event store's order of
/// insertion. On PostgreSQL this is not commit order; relays use
/// [`read_committed_after`], which also reads the rows a busy SQLite outbox
/// has set aside for retention (this reads the outbox's current table
/// only: a service that keeps its history is never pruned, so for it the
/// two hold the same).
pub fn read_after(
    tx: &mut dyn Tx,
    position: i64,
    limit: usize,
) -> Result<Vec<StoredEvent>, StoreError> {
    let sql = format!(
        "SELECT {} FROM tandem_outbox WHERE position > $1 ORDER BY position LIMIT $2",
        tx.engine().outbox_columns()
    );
    let rows = tx.query(&sql, params![position, limit as u64])?;
    rows.into_iter().map(crate::sql::stored_event).collect()
}

/// What [`read_committed_after`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxBatch {
    /// The events to publish, in commit order, except that the events of
    /// one aggregate are in sequence order.
    pub events: Vec<StoredEvent>,
    /// The cursor after this batch (the `after` given when it is empty).
    pub end: Cursor,
    /// Whether rows beyond the batch exist that are not final yet (their
    /// transaction, or an older one, may still be running): look again
    /// soon rather than waiting for a signal.
    pub held_back: bool,
}

/// The next events after `after` whose order is final: a relay that moves
/// its cursor to [`OutboxBatch::end`] never passes over an event that
/// commits later.
///
/// - SQLite: writers commit one at a time, so `position` order is commit
///   order and everything visible is final.
/// - PostgreSQL: `position` (a sequence) is taken at insert, not at commit,
///   so `position > cursor` could skip a row whose transaction commits
///   later with a lower position. Each row records the id of its
///   transaction (`xid`), and only rows of transactions older than the
///   snapshot's `xmin` (the oldest transaction still running, in the whole
///   cluster) are read, in `(xid, position)` order: those are final, and any
///   transaction still running or yet to write has an `xid` at or above
///   `xmin`, so nothing can later appear behind the cursor. A long-running
///   write transaction anywhere in the cluster therefore holds the relay
///   back until it ends. Run it in one statement of a snapshot (a
///   `Store::read`).
///
/// Within the batch, events of one aggregate are put in sequence order (a
/// transaction with a lower `xid` can take an aggregate's row lock after
/// one with a higher `xid`), so one batch never publishes an aggregate
/// backwards.
pub fn read_committed_after(
    tx: &mut dyn Tx,
    after: Cursor,
    limit: usize,
) -> Result<OutboxBatch, StoreError> {
    let limit = limit.max(1) as u64;
    tx.engine().read_committed_after(tx, after, limit)
}

/// Whether the database's transaction ids restarted below `cursor`
/// (PostgreSQL after a dump and restore, a logical-replication upgrade or
/// a blue/green switch): the cursor's `xid` is then at or beyond the next
/// id the server will hand out, and every new row would sort behind it.
/// Never on SQLite, whose cursors carry no `xid`.
pub fn xids_restarted(tx: &mut dyn Tx, cursor: Cursor) -> Result<bool, StoreError> {
    tx.engine().xids_restarted(tx, cursor)
}

/// Recovers relay cursors from restarted transaction ids (see
/// [`xids_restarted`]), in one write transaction: rows every relay of the
/// database has published get `xid` 0, rows whose `xid` lies beyond the
/// server's next id get 1 (so they sort first and pass the horizon), and
/// every cursor becomes `(0, position)` of the lowest one. What no relay
/// had published is relayed; a few published rows may go again, and
/// consumers drop them as duplicates. Returns the number of rows renumbered.
pub fn recover_restarted_xids(tx: &mut dyn Tx) -> Result<u64, StoreError> {
    tx.engine().recover_restarted_xids(tx)
}

/// Keeps the batch's order, except that the slots taken by one aggregate's
/// events get those events in `sequence` order.
pub fn in_sequence_per_aggregate(mut events: Vec<StoredEvent>) -> Vec<StoredEvent> {
    use std::collections::HashMap;
    let mut slots: HashMap<(&str, &str), Vec<(usize, u64)>> = HashMap::new();
    for (index, event) in events.iter().enumerate() {
        slots
            .entry((event.topic.as_str(), event.subject.as_str()))
            .or_default()
            .push((index, event.sequence));
    }
    let mut moves: Vec<(usize, usize)> = Vec::new();
    for (_, members) in slots {
        if members.windows(2).all(|pair| pair[0].1 <= pair[1].1) {
            continue;
        }
        let mut sorted = members.clone();
        sorted.sort_by_key(|&(_, sequence)| sequence);
        for ((slot, _), (source, _)) in members.iter().zip(&sorted) {
            moves.push((*slot, *source));
        }
    }
    if moves.is_empty() {
        return events;
    }
    let original = events.clone();
    for (slot, source) in moves {
        events[slot] = original[source].clone();
    }
    events
}
