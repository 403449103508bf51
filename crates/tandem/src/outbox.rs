//! The transactional outbox, which is also the service's event store.
//!
//! [`append`] runs inside the caller's own transaction: the state change and
//! its events commit together or not at all. Each aggregate's events get a
//! gap-free `sequence` kept in `tandem_aggregates`; of two concurrent
//! writers of one aggregate, the second gets [`StoreError::Conflict`], and so
//! does a writer whose expected sequence (`NewEvent::expect_sequence`) is
//! stale.

use serde_json::Value;
use time::OffsetDateTime;

use crate::envelope::{Envelope, EventPayload};
use crate::params;
use crate::schema::now_micros;
use crate::store::{Param, StoreError, Tx};

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
    if event.subject.is_empty() {
        return Err(StoreError::Engine("event subject must not be empty".into()));
    }
    let sequence = next_sequence(tx, source, &event.subject)?;
    if let Some(expected) = event.expected_sequence {
        if sequence != expected + 1 {
            return Err(StoreError::Conflict(format!(
                "aggregate {source}/{} is at sequence {}, writer expected {expected}",
                event.subject,
                sequence - 1
            )));
        }
    }
    let envelope = Envelope {
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
    };
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

/// Takes the next sequence of aggregate `subject` in `topic`.
///
/// Read, then a conditional update (or an insert for a new aggregate): a
/// concurrent writer that took the same sequence first makes the update
/// change nothing, or the insert violate the key, and this writer gets
/// [`StoreError::Conflict`]. (An upsert with `RETURNING` would do it in one
/// statement, but SQLite builds a temporary table and a statement journal
/// for each such statement, which tripled the outbox's cost.)
fn next_sequence(tx: &mut dyn Tx, topic: &str, subject: &str) -> Result<u64, StoreError> {
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
    pub topic: String,
    pub subject: String,
    pub envelope: Vec<u8>,
    pub committed_at_micros: i64,
}

/// Events after `position`, in position order.
pub fn read_after(
    tx: &mut dyn Tx,
    position: i64,
    limit: usize,
) -> Result<Vec<StoredEvent>, StoreError> {
    let rows = tx.query(
        "SELECT position, topic, subject, envelope, committed_at FROM tandem_outbox
         WHERE position > $1 ORDER BY position LIMIT $2",
        params![position, limit as u64],
    )?;
    rows.into_iter()
        .map(|row| {
            Ok(StoredEvent {
                position: row.i64(0)?,
                topic: row.text(1)?.to_owned(),
                subject: row.text(2)?.to_owned(),
                envelope: row.bytes(3)?.to_vec(),
                committed_at_micros: row.i64(4)?,
            })
        })
        .collect()
}
