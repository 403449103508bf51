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
    /// Events committed to the outbox that the relay has not published.
    pub pending_events: u64,
    /// Age of the oldest pending event; 0 when none.
    pub oldest_pending_age_seconds: f64,
}

/// One partition a consumer reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// The topic.
    pub topic: String,
    /// The partition of the topic.
    pub partition: u32,
    /// The first offset the consumer has not applied (its stored position).
    pub position: u64,
    /// The bus's next offset to be written (its head).
    pub end: u64,
    /// The first offset the bus still holds (its retention pruned those
    /// below); 0 where the bus does not say.
    pub start: u64,
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

    /// The records the consumer has not applied that the bus pruned, if
    /// any: the consumer cannot go on without them being published again.
    pub fn pruned(&self) -> Option<String> {
        let gone_to = self.start.min(self.end);
        (self.position < gone_to)
            .then(|| crate::bus::pruned_range(&self.topic, self.partition, self.position, gone_to))
    }
}

/// A consumer's progress and trouble, as its database and the bus tell.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerStatus {
    /// The consumer's name.
    pub consumer: String,
    /// Each partition of its topics, with its position and the bus's
    /// offsets.
    pub partitions: Vec<PartitionLag>,
    /// Aggregates waiting for a missing sequence.
    pub gaps_open: u64,
    /// Parked, unresolved dead letters by reason (`handler`, `decode`,
    /// `gap`, `blocked`, `store`).
    pub dead_letters: Vec<(String, u64)>,
    /// Age of the oldest of them; 0 when none.
    pub oldest_dead_letter_age_seconds: f64,
    /// When the consumer last committed a batch (µs since the epoch).
    pub last_progress_micros: Option<i64>,
    /// An operator paused it (`tandem::consumer::pauses`).
    pub paused: bool,
}

/// A consumer's health, Burrow-style: from how its lag and its position
/// move, not from one threshold.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Caught up, or behind by less than [`LAGGING_AFTER`].
    Ok,
    /// Behind by [`LAGGING_AFTER`] or more, and moving.
    Lagging,
    /// Parked dead letters wait for an operator (redrive or discard).
    Error,
    /// Behind, and its position has not moved for [`STALLED_AFTER`].
    Stalled,
    /// Paused by an operator: applies nothing until resumed.
    Paused,
    /// Not running (its service is down).
    Stopped,
}

impl Health {
    /// The health's name, as reports and `tandem status` show it (`ok`,
    /// `lagging`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Lagging => "lagging",
            Health::Error => "error",
            Health::Stalled => "stalled",
            Health::Paused => "paused",
            Health::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lag in seconds from which a consumer is lagging.
pub const LAGGING_AFTER: f64 = 1.0;
/// How long a consumer with lag may go without committing a batch before
/// it is stalled.
pub const STALLED_AFTER: f64 = 5.0;

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

    /// Why the consumer cannot go on, if the bus pruned records it has not
    /// applied (the first such partition).
    pub fn pruned(&self) -> Option<String> {
        self.partitions.iter().find_map(PartitionLag::pruned)
    }

    /// Parked, unresolved dead letters of every reason.
    pub fn parked(&self) -> u64 {
        self.dead_letters.iter().map(|(_, count)| count).sum()
    }

    /// The largest lag in seconds of its topics; 0 when caught up.
    pub fn lag_seconds(&self) -> f64 {
        self.partitions
            .iter()
            .map(PartitionLag::lag_seconds)
            .fold(0.0, f64::max)
    }

    /// Its health; `running`: whether the consumer runs now.
    pub fn health(&self, running: bool) -> Health {
        let behind = self.lag_events() > 0 || self.lag_seconds() > 0.0;
        if !running {
            Health::Stopped
        } else if self.paused {
            Health::Paused
        } else if self.pruned().is_some() {
            Health::Error
        } else if behind && seconds_since(self.last_progress_micros) >= STALLED_AFTER {
            Health::Stalled
        } else if self.parked() > 0 {
            Health::Error
        } else if self.lag_seconds() >= LAGGING_AFTER {
            Health::Lagging
        } else {
            Health::Ok
        }
    }
}

/// Why a status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The service's database could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The bus did not tell its offsets.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// The event times found at consumers' positions, so that a scrape reads
/// a record from the bus only when a position moved.
#[derive(Debug, Default)]
pub struct LagCache {
    /// By (consumer, topic, partition): the position and its event's time.
    times: std::sync::Mutex<HashMap<PartitionOf, (u64, Option<i64>)>>,
    /// By topic: the bus heads and when they were read.
    heads: std::sync::Mutex<HashMap<String, (std::time::Instant, Heads)>>,
}

/// A topic's `(partition, next offset, first offset held)`.
type Heads = Vec<(u32, u64, u64)>;

/// How long bus heads read for a status are used before being read again:
/// scrapes and several consumers of one topic share one read.
pub const HEADS_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

impl LagCache {
    /// The heads of `topic` (and where each partition starts), read from
    /// `bus` at most every [`HEADS_REFRESH`].
    async fn heads(&self, bus: &dyn Bus, topic: &str) -> Result<Heads, BusError> {
        if let Some((read, heads)) = self.heads.lock().expect("heads cache").get(topic) {
            if read.elapsed() < HEADS_REFRESH {
                return Ok(heads.clone());
            }
        }
        let starts = bus.start_offsets(topic).await?;
        let heads: Heads = bus
            .end_offsets(topic)
            .await?
            .into_iter()
            .map(|(partition, end)| {
                let start = starts
                    .iter()
                    .find(|(p, _)| *p == partition)
                    .map_or(0, |(_, start)| *start);
                (partition, end, start)
            })
            .collect();
        self.heads
            .lock()
            .expect("heads cache")
            .insert(topic.to_owned(), (std::time::Instant::now(), heads.clone()));
        Ok(heads)
    }
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
    let (positions, gaps_open, dead_letters, oldest, waiting, paused) = store
        .read(move |tx| -> Result<_, StoreError> {
            let positions = tx
                .query(
                    "SELECT topic, partition, next_offset, updated_at FROM tandem_consumer_positions
                     WHERE consumer = $1",
                    params![&name],
                )?
                .iter()
                .map(|row| {
                    Ok((
                        row.text(0)?.to_owned(),
                        u32::try_from(row.i64(1)?).unwrap_or(0),
                        u64::try_from(row.i64(2)?).unwrap_or(0),
                        row.i64(3)?,
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
            // A database older than the pauses' table has none.
            let paused = crate::schema::schema_version(tx)? >= 2
                && crate::consumer::pauses::paused_in(tx, &name)?;
            Ok((
                positions,
                u64::try_from(gaps).unwrap_or(0),
                dead_letters,
                oldest,
                waiting,
                paused,
            ))
        })
        .await?;
    let mut partitions = Vec::new();
    for topic in topics {
        for (partition, end, start) in cache.heads(bus, topic).await? {
            let position = positions
                .iter()
                .find(|(t, p, _, _)| t == topic && *p == partition)
                .map_or(0, |(_, _, offset, _)| *offset);
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
                start,
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
        last_progress_micros: positions.iter().map(|(_, _, _, at)| *at).max(),
        paused,
    })
}

/// The consumers a service database has a trace of, with the topics they
/// read: the names and topics in its stored positions (a consumer that has
/// not committed a batch yet is not there; the consumer filling a
/// rebuild's new version is shown with the rebuild, not as a consumer).
pub async fn known_consumers<S: Store>(
    store: &S,
) -> Result<Vec<(String, Vec<String>)>, StoreError> {
    store
        .read(|tx| {
            let rows = tx.query(
                "SELECT DISTINCT consumer, topic FROM tandem_consumer_positions
                 WHERE consumer NOT IN
                   (SELECT consumer || '-rebuild-' || number FROM tandem_rebuilds)
                 ORDER BY consumer, topic",
                &[],
            )?;
            let mut consumers: Vec<(String, Vec<String>)> = Vec::new();
            for row in rows {
                let (consumer, topic) = (row.text(0)?.to_owned(), row.text(1)?.to_owned());
                match consumers.last_mut() {
                    Some((name, topics)) if *name == consumer => topics.push(topic),
                    _ => consumers.push((consumer, vec![topic])),
                }
            }
            Ok(consumers)
        })
        .await
}

/// What a service reports at `/status` and `tandem status` prints: its
/// outbox, each consumer with its lag and health, and the worst health.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceReport {
    /// The service's name.
    pub service: String,
    /// The worst of its consumers' healths (in the order of [`Health`]'s
    /// variants); `stopped` when the service does not run, `ok` when it
    /// has no consumer.
    pub health: Health,
    /// Its outbox's backlog, when it publishes.
    pub outbox: Option<OutboxReport>,
    /// Each of its consumers.
    pub consumers: Vec<ConsumerReport>,
}

/// An outbox's backlog in a [`ServiceReport`] (see [`OutboxStatus`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxReport {
    /// The relay's name (its topic).
    pub topic: String,
    /// Events committed that the relay has not published.
    pub pending_events: u64,
    /// Age of the oldest of them; 0 when none.
    pub oldest_pending_age_seconds: f64,
}

/// One consumer in a [`ServiceReport`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerReport {
    /// The consumer's name.
    pub consumer: String,
    /// The topics it reads.
    pub topics: Vec<String>,
    /// Its health (see [`ConsumerStatus::health`]).
    pub health: Health,
    /// Records on the bus it has not applied, over all its partitions.
    pub lag_events: u64,
    /// The largest lag in seconds of its partitions; 0 when caught up.
    pub lag_seconds: f64,
    /// Aggregates waiting for a missing sequence.
    pub gaps_open: u64,
    /// Parked, unresolved dead letters.
    pub dead_letters: u64,
    /// Age of the oldest of them; 0 when none.
    pub oldest_dead_letter_age_seconds: f64,
    /// Each partition it reads.
    pub partitions: Vec<PartitionReport>,
    /// Events this process has applied, and the sum of their end-to-end
    /// delays (event time to the commit of the effect), since it started:
    /// two readings make the mean propagation between them. Only a
    /// running service knows them (not `tandem status --data-dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_to_end: Option<EndToEnd>,
    /// Why the consumer cannot go on, when a running service knows it
    /// (it fell behind the log's retention): the health is then `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_by: Option<String>,
    /// The consumer's newest side-by-side rebuild, under way or finished
    /// (see [`crate::rebuild`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<crate::rebuild::RebuildReport>,
}

/// Running totals of a consumer's end-to-end delays in this process.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndToEnd {
    /// Events applied.
    pub count: u64,
    /// The sum of their end-to-end delays, in seconds.
    pub sum_seconds: f64,
}

/// One partition in a [`ConsumerReport`] (see [`PartitionLag`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionReport {
    /// The topic.
    pub topic: String,
    /// The partition of the topic.
    pub partition: u32,
    /// The first offset the consumer has not applied.
    pub position: u64,
    /// The bus's next offset to be written.
    pub end: u64,
    /// Records the consumer has not applied (`end - position`).
    pub lag_events: u64,
    /// Now less the time of the oldest event it has not applied; 0 when
    /// none.
    pub lag_seconds: f64,
}

impl ServiceReport {
    /// The report of `status`es; `running`: whether the service runs now.
    pub fn new(
        service: &str,
        outbox: Option<&OutboxStatus>,
        consumers: &[(ConsumerStatus, Vec<String>)],
        running: bool,
    ) -> Self {
        let consumers: Vec<ConsumerReport> = consumers
            .iter()
            .map(|(status, topics)| ConsumerReport {
                consumer: status.consumer.clone(),
                topics: topics.clone(),
                health: status.health(running),
                lag_events: status.lag_events(),
                lag_seconds: status.lag_seconds(),
                gaps_open: status.gaps_open,
                dead_letters: status.parked(),
                oldest_dead_letter_age_seconds: status.oldest_dead_letter_age_seconds,
                partitions: status
                    .partitions
                    .iter()
                    .map(|partition| PartitionReport {
                        topic: partition.topic.clone(),
                        partition: partition.partition,
                        position: partition.position,
                        end: partition.end,
                        lag_events: partition.lag_events(),
                        lag_seconds: partition.lag_seconds(),
                    })
                    .collect(),
                end_to_end: None,
                stopped_by: status.pruned(),
                rebuild: None,
            })
            .collect();
        let worst = consumers
            .iter()
            .map(|consumer| consumer.health)
            .max()
            .unwrap_or(Health::Ok);
        Self {
            service: service.to_owned(),
            health: if running { worst } else { Health::Stopped },
            outbox: outbox.map(|outbox| OutboxReport {
                topic: outbox.topic.clone(),
                pending_events: outbox.pending_events,
                oldest_pending_age_seconds: outbox.oldest_pending_age_seconds,
            }),
            consumers,
        }
    }
}

/// Reads a whole service's report: the backlog of relay `relay` and the
/// status of each `(consumer, topics)`.
pub async fn service_report<S: Store>(
    service: &str,
    store: &S,
    bus: &dyn Bus,
    cache: &LagCache,
    relay: Option<&str>,
    consumers: &[(String, Vec<String>)],
    running: bool,
) -> Result<(ServiceReport, Option<OutboxStatus>, Vec<ConsumerStatus>), StatusError> {
    let outbox = match relay {
        Some(topic) => Some(outbox_status(store, topic).await?),
        None => None,
    };
    let mut statuses = Vec::with_capacity(consumers.len());
    for (consumer, topics) in consumers {
        statuses.push((
            consumer_status(store, bus, cache, consumer, topics).await?,
            topics.clone(),
        ));
    }
    let mut report = ServiceReport::new(service, outbox.as_ref(), &statuses, running);
    for (consumer, (_, topics)) in report.consumers.iter_mut().zip(&statuses) {
        consumer.rebuild = crate::rebuild::report(store, bus, &consumer.consumer, topics).await?;
    }
    Ok((
        report,
        outbox,
        statuses.into_iter().map(|(status, _)| status).collect(),
    ))
}
