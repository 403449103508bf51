//! Re-publication: a source service re-emits what its consumers need to
//! catch up when the log no longer holds it (they fell behind its
//! retention, or they are new).
//!
//! - **Kept history** ([`history`]): a service that keeps its outbox as its
//!   event history publishes those envelopes again, byte for byte, in
//!   outbox order. Consumers meet events they applied as duplicates (same
//!   aggregate, same sequence) and drop them.
//! - **Snapshots** ([`snapshots`]): where history was pruned, the service
//!   describes each aggregate's current state as one event
//!   ([`Snapshots`]), and the toolkit sends it as a *snapshot event*: the
//!   aggregate's current `sequence`, extension attribute `snapshot: true`
//!   ([`Envelope::snapshot`]). A consumer applies a snapshot at sequence N
//!   when N is above what it applied, even across a gap (it replaces the
//!   state), and drops it otherwise; what waited for the gap is dropped
//!   with it. So a re-publication never moves a copy backwards, and never
//!   re-fires a handler's side effect for an event it already handled.
//!
//! Records go straight to the bus, keyed by the aggregate, so they land in
//! the partitions the original events went to. Nothing is written to the
//! outbox: a re-publication interrupted half-way is simply run again.
//!
//! A consumer that stopped because the log lost records it never applied
//! (see [`crate::bus::BusError::Pruned`]) still waits after the
//! re-publication: [`skip_pruned`] moves it to the start of the log, which
//! an operator does once the source re-published (`tandem republish` does
//! both, in that order).

use std::collections::BTreeMap;

use time::OffsetDateTime;

use crate::bus::{Bus, BusError, OutgoingRecord, TopicPartition};
use crate::envelope::Envelope;
use crate::outbox::NewEvent;
use crate::params;
use crate::schema::now_micros;
use crate::store::{Store, StoreError, Tx};

/// Why a re-publication stopped; what was sent before stays sent.
#[derive(Debug, thiserror::Error)]
pub enum RepublishError {
    /// The service's database failed (reading the history or the
    /// aggregates, or moving a consumer's positions).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The bus failed: a publish, or asking where its log starts.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// What a service provides to re-publish the state of its aggregates.
pub trait Snapshots: Send + Sync + 'static {
    /// The topics whose aggregates this describes.
    fn topics(&self) -> Vec<String>;

    /// Up to `limit` aggregates of `topic` whose subject sorts after
    /// `after`, in subject order, each as one event describing its whole
    /// current state (`NewEvent::subject` the aggregate id), read in `tx`.
    fn page(
        &self,
        tx: &mut dyn Tx,
        topic: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<NewEvent>, StoreError>;
}

/// [`Snapshots`] of one topic, from a function that reads a page of its
/// aggregates: `page(tx, after, limit)`, the snapshot events of up to
/// `limit` aggregates whose id sorts after `after`, in id order.
pub struct Pages<F> {
    topic: String,
    page: F,
}

impl<F> Pages<F>
where
    F: Fn(&mut dyn Tx, Option<&str>, u32) -> Result<Vec<NewEvent>, StoreError>
        + Send
        + Sync
        + 'static,
{
    /// The snapshots of `topic`'s aggregates, read a page at a time by
    /// `page`.
    pub fn new(topic: &str, page: F) -> Self {
        Self {
            topic: topic.to_owned(),
            page,
        }
    }
}

impl<F> Snapshots for Pages<F>
where
    F: Fn(&mut dyn Tx, Option<&str>, u32) -> Result<Vec<NewEvent>, StoreError>
        + Send
        + Sync
        + 'static,
{
    fn topics(&self) -> Vec<String> {
        vec![self.topic.clone()]
    }

    fn page(
        &self,
        tx: &mut dyn Tx,
        _topic: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<NewEvent>, StoreError> {
        (self.page)(tx, after, u32::try_from(limit).unwrap_or(u32::MAX))
    }
}

/// How many records a re-publication sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Republished {
    /// Envelopes of the kept history sent again.
    pub history: u64,
    /// Snapshot events sent.
    pub snapshots: u64,
}

/// Sends the outbox's envelopes of `topics` again, in outbox order,
/// `batch` at a time; `progress` hears the running count.
pub async fn history<S: Store>(
    store: &S,
    bus: &dyn Bus,
    topics: &[String],
    batch: usize,
    mut progress: impl FnMut(u64) + Send,
) -> Result<u64, RepublishError> {
    let batch = batch.max(1);
    let mut after = 0_i64;
    let mut sent = 0_u64;
    loop {
        let wanted = topics.to_vec();
        let rows = store
            .read(
                move |tx| -> Result<Vec<(i64, OutgoingRecord)>, StoreError> {
                    tx.query(
                        "SELECT position, topic, subject, envelope FROM tandem_outbox
                     WHERE position > $1 ORDER BY position LIMIT $2",
                        params![after, batch as i64],
                    )?
                    .iter()
                    .map(|row| {
                        Ok((
                            row.i64(0)?,
                            OutgoingRecord {
                                topic: row.text(1)?.to_owned(),
                                key: row.text(2)?.to_owned(),
                                payload: row.bytes(3)?.to_vec(),
                            },
                        ))
                    })
                    .filter(|row| {
                        row.as_ref()
                            .map_or(true, |(_, record)| wanted.contains(&record.topic))
                    })
                    .collect()
                },
            )
            .await?;
        let Some((last, _)) = rows.last() else {
            return Ok(sent);
        };
        after = *last;
        let records: Vec<OutgoingRecord> = rows.into_iter().map(|(_, record)| record).collect();
        bus.publish(&records).await?;
        sent += records.len() as u64;
        progress(sent);
    }
}

/// Sends a snapshot event of every aggregate `provider` describes, at the
/// aggregate's current sequence, `batch` at a time; `progress` hears the
/// running count.
pub async fn snapshots<S: Store>(
    store: &S,
    bus: &dyn Bus,
    provider: std::sync::Arc<dyn Snapshots>,
    batch: usize,
    mut progress: impl FnMut(u64) + Send,
) -> Result<u64, RepublishError> {
    let batch = batch.max(1);
    let mut sent = 0_u64;
    for topic in provider.topics() {
        let mut after: Option<String> = None;
        loop {
            let (provider, topic_name, cursor) = (
                std::sync::Arc::clone(&provider),
                topic.clone(),
                after.clone(),
            );
            // The state and its sequence in one snapshot of the database.
            let page = store
                .read(move |tx| -> Result<(Vec<OutgoingRecord>, Option<String>), StoreError> {
                    let events = provider.page(tx, &topic_name, cursor.as_deref(), batch)?;
                    let last = events.last().map(|event| event.subject.clone());
                    let mut records = Vec::with_capacity(events.len());
                    for event in events {
                        let Some(row) = tx.query_opt(
                            "SELECT sequence FROM tandem_aggregates WHERE topic = $1 AND subject = $2",
                            params![&topic_name, &event.subject],
                        )?
                        else {
                            // No event was ever published for it: nothing
                            // for a consumer to catch up with.
                            continue;
                        };
                        let sequence = u64::try_from(row.i64(0)?).unwrap_or(0);
                        if sequence == 0 {
                            continue;
                        }
                        records.push(snapshot_record(&topic_name, event, sequence));
                    }
                    Ok((records, last))
                })
                .await?;
            let (records, last) = page;
            if !records.is_empty() {
                bus.publish(&records).await?;
                sent += records.len() as u64;
                progress(sent);
            }
            match last {
                Some(last) => after = Some(last),
                None => break,
            }
        }
    }
    Ok(sent)
}

fn snapshot_record(topic: &str, event: NewEvent, sequence: u64) -> OutgoingRecord {
    let envelope = Envelope {
        id: crate::envelope::new_event_id(),
        source: topic.to_owned(),
        event_type: event.event_type,
        subject: event.subject,
        time: OffsetDateTime::now_utc(),
        dataschema: event.dataschema,
        data: event.data,
        sequence,
        traceparent: None,
        correlationid: None,
        causationid: None,
        snapshot: true,
    };
    OutgoingRecord {
        topic: topic.to_owned(),
        key: envelope.subject.clone(),
        payload: envelope.to_json(),
    }
}

/// One partition a consumer was moved along by [`skip_pruned`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Skipped {
    /// The topic.
    pub topic: String,
    /// The partition of the topic.
    pub partition: u32,
    /// Its position before.
    pub from: u64,
    /// The log's first offset, where it resumes.
    pub to: u64,
}

/// Moves `consumer` past what the log of `topics` no longer holds: each
/// partition whose position is below the log's start resumes at the
/// start. Only for after a re-publication of the source (or when an
/// operator accepts the loss): the records skipped are gone for good.
/// A running consumer that waits on [`BusError::Pruned`] picks the new
/// positions up when it joins its group again (within its outage backoff).
pub async fn skip_pruned<S: Store>(
    store: &S,
    bus: &dyn Bus,
    consumer: &str,
    topics: &[String],
) -> Result<Vec<Skipped>, RepublishError> {
    let mut starts: BTreeMap<TopicPartition, u64> = BTreeMap::new();
    for topic in topics {
        for (partition, start) in bus.start_offsets(topic).await? {
            starts.insert(TopicPartition::new(topic.clone(), partition), start);
        }
    }
    let consumer = consumer.to_owned();
    let skipped = store
        .write(move |tx| -> Result<Vec<Skipped>, StoreError> {
            let mut skipped = Vec::new();
            for (partition, start) in starts {
                let position = tx
                    .query_opt(
                        "SELECT next_offset FROM tandem_consumer_positions
                         WHERE consumer = $1 AND topic = $2 AND partition = $3",
                        params![&consumer, &partition.topic, partition.partition],
                    )?
                    .map(|row| row.i64(0))
                    .transpose()?
                    .map_or(0, |offset| u64::try_from(offset).unwrap_or(0));
                if position >= start {
                    continue;
                }
                tx.execute(
                    "INSERT INTO tandem_consumer_positions (consumer, topic, partition, next_offset, updated_at)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (consumer, topic, partition) DO UPDATE
                     SET next_offset = excluded.next_offset, updated_at = excluded.updated_at",
                    params![&consumer, &partition.topic, partition.partition, start, now_micros()],
                )?;
                // Offsets a member of a shared partition applied beyond the
                // old position and below the new one are behind it now.
                tx.execute(
                    "DELETE FROM tandem_consumer_offsets_ahead
                     WHERE consumer = $1 AND topic = $2 AND partition = $3 AND end_offset <= $4",
                    params![&consumer, &partition.topic, partition.partition, start],
                )?;
                skipped.push(Skipped {
                    topic: partition.topic,
                    partition: partition.partition,
                    from: position,
                    to: start,
                });
            }
            Ok(skipped)
        })
        .await?;
    Ok(skipped)
}
