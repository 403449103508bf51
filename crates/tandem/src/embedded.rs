//! The embedded bus: a durable log in one SQLite file that several OS
//! processes on one machine append to and read from at once, with no server.
//!
//! Appends run in `BEGIN IMMEDIATE` transactions, so appenders (in any
//! process) are serialised by SQLite's write lock and offsets are dense and
//! strictly increasing per partition; a crash at any moment leaves either
//! the whole batch or none of it. Readers in this process are woken by an
//! in-process signal the moment a batch commits; readers in other processes
//! notice through `PRAGMA data_version`, polled with a backoff that stays
//! at or under 2 ms and costs no disk I/O.
//!
//! Groups: every member of a group is assigned every partition (one member
//! per group is the embedded engine's deployment; several instances of a
//! service belong on Kafka or NATS).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::bus::{
    partition_for, Bus, BusError, Delivery, OutgoingRecord, Record, Subscription, TopicPartition,
};
use crate::params;
use crate::schema::now_micros;
use crate::sqlite::{DataVersionWatcher, MultiRowInsert, SqliteOptions, SqliteStore, Synchronous};
use crate::store::{ExternalChanges, Param, Store, StoreError, StoreFuture, Tx};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS log_meta (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS log_topics (
    topic      TEXT    PRIMARY KEY,
    partitions INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS log_heads (
    topic       TEXT    NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log_records (
    topic         TEXT    NOT NULL,
    partition     INTEGER NOT NULL,
    record_offset INTEGER NOT NULL,
    record_key    TEXT    NOT NULL,
    payload       BLOB    NOT NULL,
    appended_at   INTEGER NOT NULL,
    PRIMARY KEY (topic, partition, record_offset)
) WITHOUT ROWID;
";

/// How to open the embedded log.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    pub synchronous: Synchronous,
    /// Partitions of topics this file creates; fixed when the file is new.
    pub partitions: u32,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            synchronous: Synchronous::Full,
            partitions: 1,
        }
    }
}

/// The embedded durable log.
#[derive(Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

struct Inner {
    file: SqliteStore,
    options: SqliteOptions,
    default_partitions: u32,
    topics: Mutex<HashMap<String, u32>>,
    appended: watch::Sender<u64>,
}

/// One signal per log file in this process, shared by every handle on it.
fn signal_for(path: &Path) -> watch::Sender<u64> {
    static SIGNALS: OnceLock<Mutex<HashMap<PathBuf, watch::Sender<u64>>>> = OnceLock::new();
    let mut signals = SIGNALS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    signals
        .entry(path.to_path_buf())
        .or_insert_with(|| watch::channel(0).0)
        .clone()
}

impl EmbeddedLog {
    pub async fn open(path: impl AsRef<Path>, options: EmbeddedOptions) -> Result<Self, BusError> {
        let sqlite_options = SqliteOptions {
            synchronous: options.synchronous,
            readers: 2,
            ..SqliteOptions::default()
        };
        let file = SqliteStore::open_plain(path.as_ref(), sqlite_options.clone()).await?;
        let requested = options.partitions.max(1);
        let default_partitions = file
            .write(move |tx| -> Result<u32, StoreError> {
                tx.execute_batch(SCHEMA)?;
                tx.execute(
                    "INSERT INTO log_meta (name, value) VALUES ('partitions', $1)
                     ON CONFLICT (name) DO NOTHING",
                    params![requested],
                )?;
                let row = tx
                    .query_opt("SELECT value FROM log_meta WHERE name = 'partitions'", &[])?
                    .ok_or_else(|| StoreError::Decode("log_meta lost its partitions".into()))?;
                Ok(u32::try_from(row.i64(0)?).unwrap_or(1))
            })
            .await?;
        let canonical =
            std::fs::canonicalize(path.as_ref()).unwrap_or_else(|_| path.as_ref().to_path_buf());
        Ok(Self {
            inner: Arc::new(Inner {
                file,
                options: sqlite_options,
                default_partitions,
                topics: Mutex::new(HashMap::new()),
                appended: signal_for(&canonical),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        self.inner.file.path()
    }

    fn known_partitions(&self, topic: &str) -> Option<u32> {
        self.inner
            .topics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(topic)
            .copied()
    }

    async fn partitions_of(&self, topic: &str) -> Result<u32, BusError> {
        if let Some(partitions) = self.known_partitions(topic) {
            return Ok(partitions);
        }
        let owned_topic = topic.to_owned();
        let stored = self
            .inner
            .file
            .read(move |tx| -> Result<Option<u32>, StoreError> {
                let row = tx.query_opt(
                    "SELECT partitions FROM log_topics WHERE topic = $1",
                    params![&owned_topic],
                )?;
                row.map(|row| row.i64(0).map(|value| u32::try_from(value).unwrap_or(1)))
                    .transpose()
            })
            .await?;
        let partitions = stored.unwrap_or(self.inner.default_partitions);
        if stored.is_some() {
            self.inner
                .topics
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(topic.to_owned(), partitions);
        }
        Ok(partitions)
    }
}

fn append_batch(
    tx: &mut dyn Tx,
    records: &[(String, u32, String, Vec<u8>)],
    default_partitions: u32,
) -> Result<(), StoreError> {
    // Count per partition, reserve offsets with one upsert each, then insert.
    let mut counts: BTreeMap<(&str, u32), i64> = BTreeMap::new();
    for (topic, partition, _, _) in records {
        *counts.entry((topic.as_str(), *partition)).or_default() += 1;
    }
    let mut next_offsets: HashMap<(&str, u32), i64> = HashMap::with_capacity(counts.len());
    let mut topics_seen: Vec<&str> = Vec::new();
    for ((topic, partition), count) in &counts {
        if !topics_seen.contains(topic) {
            tx.execute(
                "INSERT INTO log_topics (topic, partitions) VALUES ($1, $2)
                 ON CONFLICT (topic) DO NOTHING",
                params![*topic, default_partitions],
            )?;
            topics_seen.push(topic);
        }
        let row = tx
            .query_opt(
                "INSERT INTO log_heads (topic, partition, next_offset) VALUES ($1, $2, $3)
                 ON CONFLICT (topic, partition) DO UPDATE SET next_offset = next_offset + $3
                 RETURNING next_offset",
                params![*topic, *partition, *count],
            )?
            .ok_or_else(|| StoreError::Decode("log head upsert returned nothing".into()))?;
        next_offsets.insert((topic, *partition), row.i64(0)? - count);
    }
    let appended_at = now_micros();
    let mut params: Vec<Param<'_>> = Vec::new();
    for chunk in records.chunks(INSERT_RECORDS.rows_per_statement) {
        params.clear();
        for (topic, partition, key, payload) in chunk {
            let next = next_offsets
                .get_mut(&(topic.as_str(), *partition))
                .ok_or_else(|| StoreError::Decode("partition without a reserved offset".into()))?;
            params.extend([
                Param::Text(topic),
                Param::from(*partition),
                Param::Int(*next),
                Param::Text(key),
                Param::Blob(payload),
                Param::Int(appended_at),
            ]);
            *next += 1;
        }
        tx.execute(&INSERT_RECORDS.sql(chunk.len()), &params)?;
    }
    Ok(())
}

/// The log's appends, 64 records a statement.
static INSERT_RECORDS: MultiRowInsert = MultiRowInsert::new(
    "INSERT INTO log_records (topic, partition, record_offset, record_key, payload, appended_at) VALUES ",
    6,
    64,
);

#[async_trait::async_trait]
impl Bus for EmbeddedLog {
    async fn close(&self) -> Result<(), BusError> {
        Ok(self.inner.file.close().await?)
    }

    /// The lowest offset left in each partition (its next offset when all
    /// were pruned): one seek of the primary key each.
    async fn start_offsets(&self, topic: &str) -> Result<Vec<(u32, u64)>, BusError> {
        let topic = topic.to_owned();
        Ok(self
            .inner
            .file
            .read(move |tx| -> Result<Vec<(u32, u64)>, StoreError> {
                tx.query(
                    "SELECT h.partition, COALESCE(
                       (SELECT MIN(r.record_offset) FROM log_records AS r
                        WHERE r.topic = h.topic AND r.partition = h.partition),
                       h.next_offset)
                     FROM log_heads AS h WHERE h.topic = $1",
                    params![&topic],
                )?
                .iter()
                .map(|row| {
                    Ok((
                        u32::try_from(row.i64(0)?).unwrap_or(0),
                        u64::try_from(row.i64(1)?).unwrap_or(0),
                    ))
                })
                .collect()
            })
            .await?)
    }

    /// Under the file's `tandem-log-pruner` lease, so that of the processes
    /// sharing the log one prunes at a time; a partition's oldest records
    /// go first, `batch` a transaction. `log_heads` keeps each partition's
    /// next offset, so offsets never repeat, however much is pruned.
    async fn prune(
        &self,
        max_age: Option<Duration>,
        max_records: Option<u64>,
        batch: u64,
    ) -> Result<u64, BusError> {
        let Some(_lease) = self.inner.file.try_lead("tandem-log-pruner").await? else {
            return Ok(0);
        };
        let before = max_age.map(|age| {
            crate::schema::now_micros()
                .saturating_sub(i64::try_from(age.as_micros()).unwrap_or(i64::MAX))
        });
        let keep = max_records.map(|records| i64::try_from(records).unwrap_or(i64::MAX));
        let heads = self
            .inner
            .file
            .read(|tx| -> Result<Vec<(String, i64, i64)>, StoreError> {
                tx.query(
                    "SELECT topic, partition, next_offset FROM log_heads ORDER BY topic, partition",
                    &[],
                )?
                .iter()
                .map(|row| Ok((row.text(0)?.to_owned(), row.i64(1)?, row.i64(2)?)))
                .collect()
            })
            .await?;
        // Each round looks at the `batch` oldest records of a partition
        // only (offsets follow append times), however long the log.
        let mut pruned = 0;
        for (topic, partition, next) in heads {
            // Below this offset every record goes, whatever its age.
            let below = keep.map_or(0, |keep| next.saturating_sub(keep));
            loop {
                let topic = topic.clone();
                let deleted = self
                    .inner
                    .file
                    .write(move |tx| {
                        tx.execute(
                            "DELETE FROM log_records
                             WHERE topic = $1 AND partition = $2 AND record_offset IN (
                               SELECT record_offset FROM (
                                 SELECT record_offset, appended_at FROM log_records
                                 WHERE topic = $1 AND partition = $2
                                 ORDER BY record_offset LIMIT $5)
                               WHERE record_offset < $3 OR appended_at < $4)",
                            params![
                                &topic,
                                partition,
                                below,
                                before.unwrap_or(i64::MIN),
                                batch as i64
                            ],
                        )
                    })
                    .await?;
                pruned += deleted;
                if deleted < batch {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        Ok(pruned)
    }

    async fn publish(&self, records: &[OutgoingRecord]) -> Result<(), BusError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut placed = Vec::with_capacity(records.len());
        for record in records {
            if record.topic.is_empty() {
                return Err(BusError::Invalid("topic must not be empty".into()));
            }
            let partitions = match self.known_partitions(&record.topic) {
                Some(partitions) => partitions,
                None => self.partitions_of(&record.topic).await?,
            };
            placed.push((
                record.topic.clone(),
                partition_for(&record.key, partitions),
                record.key.clone(),
                record.payload.clone(),
            ));
        }
        let default_partitions = self.inner.default_partitions;
        self.inner
            .file
            .write(move |tx| append_batch(tx, &placed, default_partitions))
            .await?;
        self.inner
            .appended
            .send_modify(|count| *count = count.wrapping_add(1));
        Ok(())
    }

    async fn subscribe(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<Box<dyn Subscription>, BusError> {
        if topics.is_empty() {
            return Err(BusError::Invalid(
                format!("group {group} names no topic").into(),
            ));
        }
        let watcher = DataVersionWatcher::open(self.path(), &self.inner.options)?;
        Ok(Box::new(EmbeddedSubscription {
            log: self.clone(),
            topics: topics.to_vec(),
            positions: BTreeMap::new(),
            announced: false,
            signal: self.inner.appended.subscribe(),
            external: Box::new(watcher),
            ahead: None,
        }))
    }

    async fn end_offsets(&self, topic: &str) -> Result<Vec<(u32, u64)>, BusError> {
        let partitions = self.partitions_of(topic).await?;
        let owned_topic = topic.to_owned();
        let heads = self
            .inner
            .file
            .read(move |tx| -> Result<HashMap<u32, u64>, StoreError> {
                let rows = tx.query(
                    "SELECT partition, next_offset FROM log_heads WHERE topic = $1",
                    params![&owned_topic],
                )?;
                let mut heads = HashMap::new();
                for row in rows {
                    heads.insert(
                        u32::try_from(row.i64(0)?).unwrap_or(0),
                        u64::try_from(row.i64(1)?).unwrap_or(0),
                    );
                }
                Ok(heads)
            })
            .await?;
        Ok((0..partitions)
            .map(|partition| (partition, heads.get(&partition).copied().unwrap_or(0)))
            .collect())
    }

    async fn payload_at(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<Option<Vec<u8>>, BusError> {
        let topic = topic.to_owned();
        let found = self
            .inner
            .file
            .read(move |tx| {
                tx.query_opt(
                    "SELECT payload FROM log_records
                     WHERE topic = $1 AND partition = $2 AND record_offset = $3",
                    params![&topic, partition, offset],
                )
            })
            .await?;
        Ok(match found {
            Some(mut row) => Some(row.take_bytes(0)?),
            None => None,
        })
    }
}

struct EmbeddedSubscription {
    log: EmbeddedLog,
    topics: Vec<String>,
    positions: BTreeMap<TopicPartition, u64>,
    announced: bool,
    signal: watch::Receiver<u64>,
    external: Box<dyn ExternalChanges>,
    /// The read of the records after the last delivery, started when that
    /// delivery was handed out, so that it runs while the caller applies
    /// it. A seek drops it.
    ahead: Option<ReadAhead>,
}

struct ReadAhead {
    max_records: usize,
    /// The in-process append counter when the read started.
    appends_seen: u64,
    read: StoreFuture<Vec<Record>, StoreError>,
}

impl EmbeddedSubscription {
    /// Reads up to `max_records` from the current positions, on a reader
    /// thread, starting at once.
    fn start_read(&self, max_records: usize) -> StoreFuture<Vec<Record>, StoreError> {
        let positions: Vec<(TopicPartition, u64)> = self
            .positions
            .iter()
            .map(|(partition, offset)| (partition.clone(), *offset))
            .collect();
        let per_partition = (max_records / positions.len().max(1)).max(1);
        self.log
            .inner
            .file
            .read(move |tx| -> Result<Vec<Record>, StoreError> {
                let mut records = Vec::new();
                for (partition, offset) in &positions {
                    let rows = tx.query(
                        "SELECT record_offset, record_key, payload, appended_at FROM log_records
                         WHERE topic = $1 AND partition = $2 AND record_offset >= $3
                         ORDER BY record_offset LIMIT $4",
                        params![
                            &partition.topic,
                            partition.partition,
                            *offset,
                            per_partition as u64
                        ],
                    )?;
                    for mut row in rows {
                        records.push(Record {
                            topic: partition.topic.clone(),
                            partition: partition.partition,
                            offset: u64::try_from(row.i64(0)?).unwrap_or(0),
                            key: row.take_text(1)?,
                            payload: row.take_bytes(2)?,
                            appended_at_micros: row.i64(3)?,
                        });
                    }
                }
                Ok(records)
            })
    }

    /// Refuses `records` (read from the current positions) if any
    /// partition's first one is beyond its position: offsets are dense, so
    /// the records between were pruned by the log's retention, and
    /// reading on would skip them.
    fn check_unbroken(&self, records: &[Record]) -> Result<(), BusError> {
        // A read returns each partition's records together, in offset
        // order: only the first of each run is looked at.
        let mut previous: Option<(&str, u32)> = None;
        for record in records {
            let here = (record.topic.as_str(), record.partition);
            if previous == Some(here) {
                continue;
            }
            previous = Some(here);
            let place = TopicPartition::new(record.topic.clone(), record.partition);
            let expected = self.positions.get(&place).copied().unwrap_or(0);
            if record.offset > expected {
                return Err(BusError::pruned(
                    &record.topic,
                    record.partition,
                    expected,
                    record.offset,
                ));
            }
        }
        Ok(())
    }

    fn advance(&mut self, records: &[Record]) {
        for record in records {
            let place = TopicPartition::new(record.topic.clone(), record.partition);
            self.positions.insert(place, record.offset + 1);
        }
    }

    /// The records read ahead, if that read found any; topped up by a new
    /// read when it came back short and more was appended since it started.
    async fn take_read_ahead(&mut self, max_records: usize) -> Result<Vec<Record>, BusError> {
        let Some(ahead) = self.ahead.take() else {
            return Ok(Vec::new());
        };
        if ahead.max_records != max_records {
            return Ok(Vec::new());
        }
        let mut records = ahead.read.await?;
        self.check_unbroken(&records)?;
        self.advance(&records);
        if !records.is_empty()
            && records.len() < max_records
            && *self.signal.borrow() != ahead.appends_seen
        {
            let more = self.start_read(max_records - records.len()).await?;
            self.check_unbroken(&more)?;
            self.advance(&more);
            records.extend(more);
        }
        Ok(records)
    }

    fn read_ahead(&mut self, max_records: usize) {
        self.ahead = Some(ReadAhead {
            max_records,
            appends_seen: *self.signal.borrow(),
            read: self.start_read(max_records),
        });
    }
}

#[async_trait::async_trait]
impl Subscription for EmbeddedSubscription {
    async fn next(
        &mut self,
        max_records: usize,
        max_wait: Duration,
    ) -> Result<Option<Delivery>, BusError> {
        if !self.announced {
            let mut assigned = Vec::new();
            for topic in self.topics.clone() {
                let partitions = self.log.partitions_of(&topic).await?;
                for partition in 0..partitions {
                    let place = TopicPartition::new(topic.clone(), partition);
                    self.positions.entry(place.clone()).or_insert(0);
                    assigned.push(place);
                }
            }
            self.announced = true;
            return Ok(Some(Delivery::Assigned(assigned)));
        }
        let max_records = max_records.max(1);
        let deadline = tokio::time::Instant::now() + max_wait;
        // What was read ahead counts only if it found records: an empty
        // answer may predate an append whose signal is already consumed.
        let records = self.take_read_ahead(max_records).await?;
        if !records.is_empty() {
            self.read_ahead(max_records);
            return Ok(Some(Delivery::Records(records)));
        }
        loop {
            self.signal.borrow_and_update();
            self.external.changed()?;
            let records = self.start_read(max_records).await?;
            self.check_unbroken(&records)?;
            self.advance(&records);
            if !records.is_empty() {
                self.read_ahead(max_records);
                return Ok(Some(Delivery::Records(records)));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            crate::wait::wait_for_change(
                &mut self.signal,
                Some(&mut self.external),
                deadline - now,
                crate::wait::LONGEST_POLL,
            )
            .await?;
        }
    }

    async fn seek(&mut self, partition: &TopicPartition, offset: u64) -> Result<(), BusError> {
        if !self.positions.contains_key(partition) {
            return Err(BusError::Invalid(
                format!(
                    "partition {}/{} is not assigned to this member",
                    partition.topic, partition.partition
                )
                .into(),
            ));
        }
        self.positions.insert(partition.clone(), offset);
        self.ahead = None;
        Ok(())
    }

    async fn ack(&mut self, _records: &[Record]) -> Result<(), BusError> {
        Ok(())
    }
}
