//! How far behind each part of a service is, read from its own database
//! and the bus heads: an outbox's backlog, a consumer's lag per partition,
//! its open gaps and its dead letters. The figures behind the gauges of
//! [`crate::metrics`].

use std::collections::HashMap;

use crate::bus::{Bus, BusError};
use crate::params;
use crate::schema::now_micros;
use crate::store::{Store, StoreError};

/// An outbox's events not yet published by its relay.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxStatus {
    /// The relay's name (its topic, by the services' convention).
    pub topic: String,
    pub pending_events: u64,
    /// Age of the oldest pending event; 0 when none.
    pub oldest_pending_age_seconds: f64,
}

/// One partition a consumer reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: u32,
    /// The first offset the consumer has not applied (its stored position).
    pub position: u64,
    /// The bus's next offset to be written (its head).
    pub end: u64,
    /// The creation time (µs since the epoch) of the oldest event of the
    /// partition the consumer has not applied: the one at its position,
    /// or an older one it parked or holds ahead of a gap. `None` when it
    /// has applied everything (or that event's time cannot be read).
    pub oldest_unapplied_micros: Option<i64>,
}

impl PartitionLag {
    /// Records on the bus the consumer has not applied.
    pub fn lag_events(&self) -> u64 {
        self.end.saturating_sub(self.position)
    }

    /// Now − the time of the oldest event not applied; 0 when none.
    pub fn lag_seconds(&self) -> f64 {
        seconds_since(self.oldest_unapplied_micros)
    }
}

/// A consumer's progress and trouble, as its database and the bus tell.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerStatus {
    pub consumer: String,
    pub partitions: Vec<PartitionLag>,
    /// Aggregates waiting for a missing sequence.
    pub gaps_open: u64,
    /// Parked, unresolved dead letters by reason (`handler`, `decode`,
    /// `gap`, `blocked`, `store`).
    pub dead_letters: Vec<(String, u64)>,
    /// Age of the oldest of them; 0 when none.
    pub oldest_dead_letter_age_seconds: f64,
}

impl ConsumerStatus {
    /// Every record of the consumer's topics not yet applied.
    pub fn lag_events(&self) -> u64 {
        self.partitions.iter().map(PartitionLag::lag_events).sum()
    }

    /// Lag in seconds per topic: the largest of its partitions'.
    pub fn lag_seconds_by_topic(&self) -> Vec<(String, f64)> {
        let mut by_topic: Vec<(String, f64)> = Vec::new();
        for partition in &self.partitions {
            let lag = partition.lag_seconds();
            match by_topic
                .iter_mut()
                .find(|(topic, _)| *topic == partition.topic)
            {
                Some((_, worst)) => *worst = worst.max(lag),
                None => by_topic.push((partition.topic.clone(), lag)),
            }
        }
        by_topic
    }

    /// Parked, unresolved dead letters of every reason.
    pub fn parked(&self) -> u64 {
        self.dead_letters.iter().map(|(_, count)| count).sum()
    }
}

/// Why a status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// The event times found at consumers' positions, so that a scrape reads
/// a record from the bus only when a position moved.
#[derive(Debug, Default)]
pub struct LagCache {
    /// By (consumer, topic, partition): the position and its event's time.
    times: std::sync::Mutex<HashMap<PartitionOf, (u64, Option<i64>)>>,
}

/// A consumer's partition: (consumer, topic, partition).
type PartitionOf = (String, String, u32);

/// The creation time (µs) of the event in `payload`, if it is one.
fn event_micros(payload: &[u8]) -> Option<i64> {
    let envelope = crate::envelope::Envelope::decode(payload).ok()?;
    i64::try_from(envelope.time.unix_timestamp_nanos() / 1000).ok()
}

fn seconds_since(micros: Option<i64>) -> f64 {
    micros.map_or(0.0, |then| (now_micros() - then).max(0) as f64 / 1e6)
}

/// The backlog of relay `topic` in `store`.
pub async fn outbox_status<S: Store>(store: &S, topic: &str) -> Result<OutboxStatus, StoreError> {
    let relay = topic.to_owned();
    let (pending_events, oldest) = store
        .read(move |tx| tx.engine().relay_backlog(tx, &relay))
        .await?;
    Ok(OutboxStatus {
        topic: topic.to_owned(),
        pending_events,
        oldest_pending_age_seconds: if pending_events == 0 {
            0.0
        } else {
            seconds_since(oldest)
        },
    })
}

/// The status of `consumer` of `topics`: its stored positions against the
/// bus heads (a partition it has no position in yet counts from offset 0),
/// the time of the oldest event it has not applied (read from the bus at
/// its position, once per position thanks to `cache`, or from the oldest
/// event it parked or holds), its held aggregates and its dead letters.
pub async fn consumer_status<S: Store>(
    store: &S,
    bus: &dyn Bus,
    cache: &LagCache,
    consumer: &str,
    topics: &[String],
) -> Result<ConsumerStatus, StatusError> {
    let name = consumer.to_owned();
    let (positions, gaps_open, dead_letters, oldest, waiting) = store
        .read(move |tx| -> Result<_, StoreError> {
            let positions = tx
                .query(
                    "SELECT topic, partition, next_offset FROM tandem_consumer_positions
                     WHERE consumer = $1",
                    params![&name],
                )?
                .iter()
                .map(|row| {
                    Ok((
                        row.text(0)?.to_owned(),
                        u32::try_from(row.i64(1)?).unwrap_or(0),
                        u64::try_from(row.i64(2)?).unwrap_or(0),
                    ))
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            let gaps = tx
                .query_opt(
                    "SELECT COUNT(*) FROM (SELECT DISTINCT source, subject FROM tandem_pending
                     WHERE consumer = $1) AS held",
                    params![&name],
                )?
                .map_or(Ok(0), |row| row.i64(0))?;
            let mut oldest: Option<i64> = None;
            let dead_letters = tx
                .query(
                    "SELECT reason, COUNT(*), MIN(first_failed_at) FROM tandem_dead_letters
                     WHERE consumer = $1 AND status = 'parked'
                     GROUP BY reason ORDER BY reason",
                    params![&name],
                )?
                .iter()
                .map(|row| {
                    let first = row.opt_i64(2)?;
                    oldest = match (oldest, first) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    Ok((
                        row.text(0)?.to_owned(),
                        u64::try_from(row.i64(1)?).unwrap_or(0),
                    ))
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            // Per partition, the first event parked or held (not applied,
            // though the position passed it), with its bytes.
            let mut waiting: HashMap<(String, u32), (u64, Vec<u8>)> = HashMap::new();
            for table in ["tandem_dead_letters", "tandem_pending"] {
                let parked_only = if table == "tandem_dead_letters" {
                    " AND w.status = 'parked'"
                } else {
                    ""
                };
                let rows = tx.query(
                    &format!(
                        "SELECT w.topic, w.partition, w.record_offset, w.payload FROM {table} AS w
                         JOIN (SELECT topic, partition, MIN(record_offset) AS first FROM {table} AS w
                               WHERE consumer = $1{parked_only} GROUP BY topic, partition) AS f
                           ON w.topic = f.topic AND w.partition = f.partition
                          AND w.record_offset = f.first
                         WHERE w.consumer = $1{parked_only}"
                    ),
                    params![&name],
                )?;
                for mut row in rows {
                    let key = (
                        row.text(0)?.to_owned(),
                        u32::try_from(row.i64(1)?).unwrap_or(0),
                    );
                    let offset = u64::try_from(row.i64(2)?).unwrap_or(0);
                    let payload = row.take_bytes(3)?;
                    match waiting.get(&key) {
                        Some((first, _)) if *first <= offset => {}
                        _ => {
                            waiting.insert(key, (offset, payload));
                        }
                    }
                }
            }
            Ok((
                positions,
                u64::try_from(gaps).unwrap_or(0),
                dead_letters,
                oldest,
                waiting,
            ))
        })
        .await?;
    let mut partitions = Vec::new();
    for topic in topics {
        for (partition, end) in bus.end_offsets(topic).await? {
            let position = positions
                .iter()
                .find(|(t, p, _)| t == topic && *p == partition)
                .map_or(0, |(_, _, offset)| *offset);
            let waiting = waiting.get(&(topic.clone(), partition));
            let oldest_unapplied_micros = match waiting {
                // Parked or held before the position: older than it.
                Some((offset, payload)) if *offset < position || position >= end => {
                    event_micros(payload)
                }
                _ if position < end => {
                    let key = (consumer.to_owned(), topic.clone(), partition);
                    let cached = cache
                        .times
                        .lock()
                        .expect("lag cache")
                        .get(&key)
                        .filter(|(at, _)| *at == position)
                        .map(|(_, time)| *time);
                    match cached {
                        Some(time) => time,
                        None => {
                            let time = bus
                                .payload_at(topic, partition, position)
                                .await?
                                .and_then(|payload| event_micros(&payload));
                            cache
                                .times
                                .lock()
                                .expect("lag cache")
                                .insert(key, (position, time));
                            time
                        }
                    }
                }
                _ => None,
            };
            partitions.push(PartitionLag {
                topic: topic.clone(),
                partition,
                position,
                end,
                oldest_unapplied_micros,
            });
        }
    }
    Ok(ConsumerStatus {
        consumer: consumer.to_owned(),
        partitions,
        gaps_open,
        dead_letters,
        oldest_dead_letter_age_seconds: seconds_since(oldest),
    })
}
