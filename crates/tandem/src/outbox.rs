//! The transactional outbox, which is also the service's event store.
//!
//! [`append`] runs inside the caller's own transaction: the state change and
//! its events commit together or not at all. Each aggregate's events get a
//! gap-free `sequence` kept in `tandem_aggregates`; of two concurrent
//! writers of one aggregate, the second gets [`StoreError::Conflict`], and so
//! does a writer whose expected sequence (`NewEvent::expect_sequence`) is
//! stale.

use std::collections::BTreeMap;

use serde_json::Value;
use time::OffsetDateTime;

use crate::envelope::{Envelope, EventPayload};
use crate::params;
use crate::schema::now_micros;
use crate::store::{Dialect, Param, StoreError, Tx};

/// Tracing and causality attributes carried with an event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventContext {
    pub traceparent: Option<String>,
    pub correlationid: Option<String>,
    pub causationid: Option<String>,
}

/// An event about to be appended.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub subject: String,
    pub event_type: String,
    pub dataschema: String,
    pub data: Value,
    /// The sequence the writer last saw for this aggregate (0 for a new
    /// one); `None` appends after whatever is there.
    pub expected_sequence: Option<u64>,
    pub context: EventContext,
}

impl NewEvent {
    /// An event for aggregate `subject` carrying a typed payload.
    pub fn new<T: EventPayload>(
        subject: impl Into<String>,
        payload: &T,
    ) -> Result<Self, StoreError> {
        let data = serde_json::to_value(payload)
            .map_err(|error| StoreError::Engine(format!("payload does not serialise: {error}")))?;
        Ok(Self {
            subject: subject.into(),
            event_type: T::TYPE.to_owned(),
            dataschema: T::SCHEMA.to_owned(),
            data,
            expected_sequence: None,
            context: EventContext::default(),
        })
    }

    pub fn expect_sequence(mut self, sequence: u64) -> Self {
        self.expected_sequence = Some(sequence);
        self
    }

    pub fn with_context(mut self, context: EventContext) -> Self {
        self.context = context;
        self
    }
}

/// Appends `event` to the outbox of `source` (the publishing service, also
/// the topic) inside `tx`, and returns the envelope that will be published.
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
/// batch instead of two or three each:
/// - PostgreSQL: one upsert takes every aggregate's sequences at once (its
///   row lock held to the end of the transaction, as with [`append`]), one
///   insert writes every row, fed by a JSON array.
/// - SQLite: one query reads the aggregates' sequences, one upsert writes
///   them back, and multi-row inserts write the events (one writer at a
///   time, so nothing moves between the read and the write).
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
    match tx.dialect() {
        Dialect::Postgres => append_all_postgres(tx, source, events),
        Dialect::Sqlite => append_all_sqlite(tx, source, events),
    }
}

fn append_all_postgres(
    tx: &mut dyn Tx,
    source: &str,
    events: Vec<NewEvent>,
) -> Result<Vec<Envelope>, StoreError> {
    // How many events each aggregate gets, then its sequence after them.
    let mut taken: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for event in &events {
        taken.entry(event.subject.clone()).or_default().0 += 1;
    }
    let counts: Vec<(&str, u64)> = taken
        .iter()
        .map(|(subject, (n, _))| (subject.as_str(), *n))
        .collect();
    let counts = serde_json::to_string(&counts)
        .map_err(|error| StoreError::Engine(format!("sequence request: {error}")))?;
    let rows = tx.query(
        "INSERT INTO tandem_aggregates AS a (topic, subject, sequence)
         SELECT $1, item->>0, (item->>1)::bigint FROM jsonb_array_elements($2::text::jsonb) AS item
         ON CONFLICT (topic, subject) DO UPDATE SET sequence = a.sequence + EXCLUDED.sequence
         RETURNING subject, sequence",
        params![source, counts.as_str()],
    )?;
    for row in &rows {
        let last = u64::try_from(row.i64(1)?).unwrap_or(0);
        if let Some((n, next)) = taken.get_mut(row.text(0)?) {
            *next = last + 1 - *n;
        }
    }
    let mut envelopes = Vec::with_capacity(events.len());
    let mut outbox_rows = Vec::with_capacity(events.len());
    for event in events {
        let Some((_, next)) = taken.get_mut(event.subject.as_str()) else {
            return Err(StoreError::Engine(
                "sequence upsert skipped an aggregate".into(),
            ));
        };
        let sequence = *next;
        *next += 1;
        let envelope = envelope_of(source, event, sequence);
        let bytes = String::from_utf8(envelope.to_json())
            .map_err(|error| StoreError::Engine(format!("envelope is not UTF-8: {error}")))?;
        outbox_rows.push(serde_json::json!([
            envelope.subject,
            sequence,
            envelope.id.to_string(),
            envelope.event_type,
            bytes
        ]));
        envelopes.push(envelope);
    }
    let outbox_rows = serde_json::Value::Array(outbox_rows).to_string();
    tx.execute(
        "INSERT INTO tandem_outbox (topic, subject, sequence, event_id, event_type, envelope, committed_at)
         SELECT $1, item->>0, (item->>1)::bigint, item->>2, item->>3, convert_to(item->>4, 'UTF8'), $3
         FROM jsonb_array_elements($2::text::jsonb) WITH ORDINALITY AS input(item, ord)
         ORDER BY ord",
        params![source, outbox_rows.as_str(), now_micros()],
    )?;
    tx.outbox_appended();
    Ok(envelopes)
}

/// [`append_all_sqlite`]'s event rows, 64 a statement.
static SQLITE_INSERT_EVENTS: crate::sqlite::MultiRowInsert = crate::sqlite::MultiRowInsert::new(
    "INSERT INTO tandem_outbox (topic, subject, sequence, event_id, event_type, envelope, committed_at) VALUES ",
    7,
    64,
);

fn append_all_sqlite(
    tx: &mut dyn Tx,
    source: &str,
    events: Vec<NewEvent>,
) -> Result<Vec<Envelope>, StoreError> {
    // Each aggregate's last sequence: the stored one (0 if none), moved on
    // by each of the batch's events of that aggregate.
    let mut last: std::collections::HashMap<&str, u64> =
        std::collections::HashMap::with_capacity(events.len());
    for event in &events {
        last.entry(event.subject.as_str()).or_insert(0);
    }
    let subjects = serde_json::to_string(&last.keys().collect::<Vec<_>>())
        .map_err(|error| StoreError::Engine(format!("sequence request: {error}")))?;
    let rows = tx.query(
        "SELECT a.subject, a.sequence
         FROM json_each($2) AS wanted CROSS JOIN tandem_aggregates AS a
         WHERE a.subject = wanted.value AND a.topic = $1",
        params![source, subjects.as_str()],
    )?;
    for row in &rows {
        if let Some(sequence) = last.get_mut(row.text(0)?) {
            *sequence = u64::try_from(row.i64(1)?).unwrap_or(0);
        }
    }
    let sequences: Vec<u64> = events
        .iter()
        .map(|event| {
            let slot = last
                .get_mut(event.subject.as_str())
                .expect("every subject has a slot");
            *slot += 1;
            *slot
        })
        .collect();
    // `{subject: last sequence}`: json_each gives each pair as `key` and
    // `value`, which cost no extraction.
    let last = serde_json::to_string(&last)
        .map_err(|error| StoreError::Engine(format!("sequence request: {error}")))?;
    tx.execute(
        "INSERT INTO tandem_aggregates (topic, subject, sequence)
         SELECT $1, key, value FROM json_each($2) WHERE true
         ON CONFLICT (subject, topic) DO UPDATE SET sequence = excluded.sequence",
        params![source, last.as_str()],
    )?;

    let envelopes: Vec<Envelope> = events
        .into_iter()
        .zip(sequences)
        .map(|(event, sequence)| envelope_of(source, event, sequence))
        .collect();
    let rows: Vec<(Vec<u8>, String)> = envelopes
        .iter()
        .map(|envelope| (envelope.to_json(), envelope.id.to_string()))
        .collect();
    let committed_at = now_micros();
    let per_statement = SQLITE_INSERT_EVENTS.rows_per_statement;
    let mut params: Vec<Param<'_>> = Vec::new();
    for (envelopes, rows) in envelopes
        .chunks(per_statement)
        .zip(rows.chunks(per_statement))
    {
        params.clear();
        for (envelope, (bytes, event_id)) in envelopes.iter().zip(rows) {
            params.extend([
                Param::Text(source),
                Param::Text(&envelope.subject),
                Param::from(envelope.sequence),
                Param::Text(event_id),
                Param::Text(&envelope.event_type),
                Param::Blob(bytes),
                Param::Int(committed_at),
            ]);
        }
        tx.execute(&SQLITE_INSERT_EVENTS.sql(envelopes.len()), &params)?;
    }
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
    Envelope {
        id: crate::envelope::new_event_id(),
        source: source.to_owned(),
        event_type: event.event_type,
        subject: event.subject,
        time: OffsetDateTime::now_utc(),
        dataschema: event.dataschema,
        data: event.data,
        sequence,
        traceparent: event.context.traceparent,
        correlationid: event.context.correlationid,
        causationid: event.context.causationid,
    }
}

/// Takes the next sequence of aggregate `subject` in `topic`.
///
/// PostgreSQL: one upsert that returns the new sequence. A concurrent
/// writer of the same aggregate holds the row until it ends, so this writer
/// waits and then takes the sequence after it: two writers never commit the
/// same sequence, and a writer that must not append behind another says so
/// with an expected sequence ([`take_expected_sequence`]).
///
/// SQLite: writers are serialised per database, so a read and a plain
/// insert or update suffice (an upsert with `RETURNING` builds a temporary
/// table and a statement journal there, which tripled the outbox's cost).
fn next_sequence(tx: &mut dyn Tx, topic: &str, subject: &str) -> Result<u64, StoreError> {
    if tx.dialect() == Dialect::Postgres {
        let row = tx.query_opt(
            "INSERT INTO tandem_aggregates AS a (topic, subject, sequence) VALUES ($1, $2, 1)
             ON CONFLICT (topic, subject) DO UPDATE SET sequence = a.sequence + 1
             RETURNING sequence",
            params![topic, subject],
        )?;
        let sequence = row
            .ok_or_else(|| StoreError::Engine("sequence upsert returned no row".into()))?
            .i64(0)?;
        return Ok(u64::try_from(sequence).unwrap_or(0));
    }
    let current = tx
        .query_opt(
            "SELECT sequence FROM tandem_aggregates WHERE topic = $1 AND subject = $2",
            params![topic, subject],
        )?
        .map(|row| row.i64(0))
        .transpose()?;
    match current {
        None => {
            tx.execute(
                "INSERT INTO tandem_aggregates (topic, subject, sequence) VALUES ($1, $2, 1)",
                params![topic, subject],
            )?;
            Ok(1)
        }
        Some(current) => {
            let changed = tx.execute(
                "UPDATE tandem_aggregates SET sequence = $3
                 WHERE topic = $1 AND subject = $2 AND sequence = $4",
                params![topic, subject, current + 1, current],
            )?;
            if changed != 1 {
                return Err(StoreError::Conflict(format!(
                    "aggregate {topic}/{subject} moved past sequence {current} during this transaction"
                )));
            }
            Ok(u64::try_from(current + 1).unwrap_or(0))
        }
    }
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
    let expected = i64::try_from(expected)
        .map_err(|_| StoreError::Engine(format!("expected sequence {expected} is too large")))?;
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
    Err(StoreError::Conflict(format!(
        "aggregate {topic}/{subject} is at sequence {current}, writer expected {expected}"
    )))
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
    pub position: i64,
    /// The transaction that wrote the row (PostgreSQL); 0 on SQLite.
    pub xid: i64,
    pub topic: String,
    pub subject: String,
    /// The event's place in its aggregate (the envelope's `sequence`).
    pub sequence: u64,
    pub envelope: Vec<u8>,
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
    pub xid: i64,
    pub position: i64,
}

impl Cursor {
    /// Before every event.
    pub const START: Cursor = Cursor {
        xid: 0,
        position: 0,
    };
}

/// The columns of a [`StoredEvent`], in its dialect.
fn event_columns(tx: &dyn Tx) -> &'static str {
    match tx.dialect() {
        Dialect::Sqlite => "position, 0, topic, subject, envelope, committed_at, sequence",
        Dialect::Postgres => "position, xid, topic, subject, envelope, committed_at, sequence",
    }
}

/// Moves a row of [`event_columns`] into a [`StoredEvent`].
fn stored_event(mut row: crate::store::Row) -> Result<StoredEvent, StoreError> {
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

/// Events after `position`, in position order: the event store's order of
/// insertion. On PostgreSQL this is not commit order; relays use
/// [`read_committed_after`].
pub fn read_after(
    tx: &mut dyn Tx,
    position: i64,
    limit: usize,
) -> Result<Vec<StoredEvent>, StoreError> {
    let sql = format!(
        "SELECT {} FROM tandem_outbox WHERE position > $1 ORDER BY position LIMIT $2",
        event_columns(tx)
    );
    let rows = tx.query(&sql, params![position, limit as u64])?;
    rows.into_iter().map(stored_event).collect()
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
    let (events, held_back) = match tx.dialect() {
        Dialect::Sqlite => {
            let rows = tx.query(
                "SELECT position, 0, topic, subject, envelope, committed_at, sequence
                 FROM tandem_outbox WHERE position > $1 ORDER BY position LIMIT $2",
                params![after.position, limit],
            )?;
            (
                rows.into_iter()
                    .map(stored_event)
                    .collect::<Result<Vec<_>, _>>()?,
                false,
            )
        }
        Dialect::Postgres => {
            // One statement, so the rows and the horizon come from one
            // snapshot; the last column tells whether rows wait beyond it.
            // Every row at or above the horizon is past the cursor (the
            // cursor only ever passed rows below an older horizon), so the
            // test is `max(xid)`, one step down the index: an `EXISTS` with
            // the cursor got a generic plan that scanned the whole table.
            let rows = tx.query(
                "WITH horizon AS (
                   SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin
                 ), batch AS (
                   SELECT position, xid, topic, subject, envelope, committed_at, sequence
                   FROM tandem_outbox
                   WHERE (xid, position) > ($1, $2) AND xid < (SELECT xmin FROM horizon)
                   ORDER BY xid, position LIMIT $3
                 )
                 SELECT position, xid, topic, subject, envelope, committed_at, sequence, NULL
                 FROM batch
                 UNION ALL
                 SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                   CASE WHEN (SELECT max(xid) FROM tandem_outbox) >= (SELECT xmin FROM horizon)
                        THEN 1 ELSE 0 END
                 ORDER BY 2, 1",
                params![after.xid, after.position, limit],
            )?;
            let mut events = Vec::with_capacity(rows.len());
            let mut held_back = false;
            for row in rows {
                match row.opt_i64(7)? {
                    Some(flag) => held_back = flag != 0,
                    None => events.push(stored_event(row)?),
                }
            }
            (events, held_back)
        }
    };
    let end = events.last().map_or(after, StoredEvent::cursor);
    // On SQLite one writer at a time takes sequences and positions, so
    // position order is already each aggregate's sequence order.
    let events = match tx.dialect() {
        Dialect::Sqlite => events,
        Dialect::Postgres => in_sequence_per_aggregate(events),
    };
    Ok(OutboxBatch {
        events,
        end,
        held_back,
    })
}

/// Whether the database's transaction ids restarted below `cursor`
/// (PostgreSQL after a dump and restore, a logical-replication upgrade or
/// a blue/green switch): the cursor's `xid` is then at or beyond the next
/// id the server will hand out, and every new row would sort behind it.
/// Never on SQLite, whose cursors carry no `xid`.
pub fn xids_restarted(tx: &mut dyn Tx, cursor: Cursor) -> Result<bool, StoreError> {
    if tx.dialect() != Dialect::Postgres || cursor.xid == 0 {
        return Ok(false);
    }
    let next = tx
        .query_opt(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
            &[],
        )?
        .ok_or_else(|| StoreError::Decode("no snapshot".into()))?
        .i64(0)?;
    Ok(cursor.xid >= next)
}

/// Recovers relay cursors from restarted transaction ids (see
/// [`xids_restarted`]), in one write transaction: rows every relay of the
/// database has published get `xid` 0, rows whose `xid` lies beyond the
/// server's next id get 1 (so they sort first and pass the horizon), and
/// every cursor becomes `(0, position)` of the lowest one. What no relay
/// had published is relayed; a few published rows may go again, and
/// consumers drop them as duplicates. Returns the number of rows renumbered.
pub fn recover_restarted_xids(tx: &mut dyn Tx) -> Result<u64, StoreError> {
    if tx.dialect() != Dialect::Postgres {
        return Ok(0);
    }
    let Some(row) = tx.query_opt(
        "SELECT xid, position, pg_snapshot_xmax(pg_current_snapshot())::text::bigint
         FROM tandem_relay_positions ORDER BY xid, position LIMIT 1 FOR UPDATE",
        &[],
    )?
    else {
        return Ok(0);
    };
    let (xid, position, next) = (row.i64(0)?, row.i64(1)?, row.i64(2)?);
    if xid < next {
        return Ok(0);
    }
    let published = tx.execute(
        "UPDATE tandem_outbox SET xid = 0
         WHERE xid <> 0 AND position <= $2 AND (xid, position) <= ($1, $2)",
        params![xid, position],
    )?;
    let beyond = tx.execute(
        "UPDATE tandem_outbox SET xid = 1 WHERE xid >= $1",
        params![next],
    )?;
    tx.execute(
        "UPDATE tandem_relay_positions SET xid = 0, position = $1",
        params![position],
    )?;
    tracing::warn!(
        cursor_xid = xid,
        next_xid = next,
        renumbered = published + beyond,
        "transaction ids restarted below the relay cursor (a restore or an upgrade?); cursors recovered"
    );
    Ok(published + beyond)
}

/// Keeps the batch's order, except that the slots taken by one aggregate's
/// events get those events in `sequence` order.
fn in_sequence_per_aggregate(mut events: Vec<StoredEvent>) -> Vec<StoredEvent> {
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
