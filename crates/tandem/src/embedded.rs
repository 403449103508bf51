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
//!
//! Segments: each partition's records live in a run of tables, one a
//! segment (`log_segment_{n}`, keyed by offset), listed in `log_segments`
//! with the offsets each holds. A partition's newest segment takes the
//! appends until it holds [`EmbeddedOptions::segment_bytes`] of payload;
//! the next append opens a new one. Retention drops a segment whole once
//! every record in it is past the rule, as Kafka deletes a segment file:
//! a `DROP TABLE` frees its pages in a fraction of what deleting its rows
//! one by one costs, so pruning stays off the appenders' backs. Only the
//! segment still being written is pruned record by record (a quiet
//! partition keeps its rule too), and so is `log_records`, where files made
//! before segments keep the records they had.

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
use crate::sqlite::{DataVersionWatcher, SqliteOptions, SqliteStore, Synchronous};
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
CREATE TABLE IF NOT EXISTS log_segments (
    topic            TEXT    NOT NULL,
    partition        INTEGER NOT NULL,
    segment          INTEGER NOT NULL,
    first_offset     INTEGER NOT NULL,
    next_offset      INTEGER NOT NULL,
    bytes            INTEGER NOT NULL,
    last_appended_at INTEGER NOT NULL,
    PRIMARY KEY (topic, partition, segment)
) WITHOUT ROWID;
";

/// A file made before segments: the records it holds in `log_records`
/// become each partition's segment 0, once.
const ADOPT_LEGACY: &str = "
INSERT INTO log_segments (topic, partition, segment, first_offset, next_offset, bytes,
  last_appended_at)
SELECT topic, partition, 0, MIN(record_offset), MAX(record_offset) + 1,
  SUM(length(payload)), MAX(appended_at)
FROM log_records GROUP BY topic, partition;
INSERT INTO log_meta (name, value) VALUES ('segments', 0);
";

/// The table of segment `segment` (0: the records of a file made before
/// segments, in the shared `log_records`).
fn segment_table(segment: i64) -> String {
    format!("log_segment_{segment}")
}

/// A segment of one partition, as `log_segments` lists it.
#[derive(Debug, Clone, Copy)]
struct Segment {
    number: i64,
    first_offset: i64,
    next_offset: i64,
    last_appended_at: i64,
}

impl Segment {
    const COLUMNS: &'static str = "segment, first_offset, next_offset, last_appended_at";

    fn from_row(row: &crate::store::Row) -> Result<Self, StoreError> {
        Ok(Self {
            number: row.i64(0)?,
            first_offset: row.i64(1)?,
            next_offset: row.i64(2)?,
            last_appended_at: row.i64(3)?,
        })
    }

    /// Reads up to `limit` records of `topic`/`partition` from `from` on.
    fn read(
        &self,
        tx: &mut dyn Tx,
        place: &TopicPartition,
        from: i64,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let rows = if self.number == 0 {
            tx.query(
                "SELECT record_offset, record_key, payload, appended_at FROM log_records
                 WHERE topic = $1 AND partition = $2 AND record_offset >= $3
                 ORDER BY record_offset LIMIT $4",
                params![&place.topic, place.partition, from, limit as u64],
            )?
        } else {
            tx.query(
                &format!(
                    "SELECT record_offset, record_key, payload, appended_at FROM {}
                     WHERE record_offset >= $1 ORDER BY record_offset LIMIT $2",
                    segment_table(self.number)
                ),
                params![from, limit as u64],
            )?
        };
        rows.into_iter()
            .map(|mut row| {
                Ok(Record {
                    topic: place.topic.clone(),
                    partition: place.partition,
                    offset: u64::try_from(row.i64(0)?).unwrap_or(0),
                    key: row.take_text(1)?,
                    payload: row.take_bytes(2)?,
                    appended_at_micros: row.i64(3)?,
                })
            })
            .collect()
    }
}

/// The segments of `topic`/`partition` holding records at or after
/// `offset`, oldest first.
fn segments_from(
    tx: &mut dyn Tx,
    topic: &str,
    partition: u32,
    offset: i64,
) -> Result<Vec<Segment>, StoreError> {
    tx.query(
        &format!(
            "SELECT {} FROM log_segments
             WHERE topic = $1 AND partition = $2 AND next_offset > $3
               AND next_offset > first_offset
             ORDER BY segment",
            Segment::COLUMNS
        ),
        params![topic, partition, offset],
    )?
    .iter()
    .map(Segment::from_row)
    .collect()
}

/// What a retention round prunes in a partition: every record below
/// offset `below`, and every record appended before `before`.
#[derive(Debug, Clone, Copy)]
struct Rule {
    below: i64,
    before: Option<i64>,
}

impl Rule {
    /// Whether a segment holding offsets up to `next_offset` (exclusive),
    /// last appended to at `last_appended_at`, is past the rule whole.
    fn takes_whole(&self, segment: &Segment) -> bool {
        segment.next_offset <= self.below
            || self
                .before
                .is_some_and(|before| segment.last_appended_at < before)
    }
}

/// What one pruning transaction did.
struct Step {
    records: u64,
    /// Whether another transaction may find more to prune.
    more: bool,
}

/// One transaction of pruning in `topic`/`partition`: the oldest segment
/// dropped whole when the rule takes all of it; otherwise, in the segment
/// being written (or the records of a file made before segments), up to
/// `batch` of the oldest records the rule takes.
fn prune_step(
    tx: &mut dyn Tx,
    topic: &str,
    partition: u32,
    rule: Rule,
    batch: u64,
) -> Result<Step, StoreError> {
    let segments: Vec<Segment> = tx
        .query(
            &format!(
                "SELECT {} FROM log_segments WHERE topic = $1 AND partition = $2
                 ORDER BY segment LIMIT 2",
                Segment::COLUMNS
            ),
            params![topic, partition],
        )?
        .iter()
        .map(Segment::from_row)
        .collect::<Result<_, _>>()?;
    let Some(oldest) = segments.first().copied() else {
        return Ok(Step {
            records: 0,
            more: false,
        });
    };
    let newest = segments.len() == 1;
    let held = u64::try_from(oldest.next_offset - oldest.first_offset).unwrap_or(0);
    if rule.takes_whole(&oldest) && oldest.number > 0 {
        tx.execute_batch(&format!("DROP TABLE {}", segment_table(oldest.number)))?;
        tx.execute(
            "DELETE FROM log_segments WHERE topic = $1 AND partition = $2 AND segment = $3",
            params![topic, partition, oldest.number],
        )?;
        return Ok(Step {
            records: held,
            more: true,
        });
    }
    if oldest.number > 0 && !newest {
        // A full segment the rule takes only part of: it goes whole later.
        return Ok(Step {
            records: 0,
            more: false,
        });
    }
    let before = rule.before.unwrap_or(i64::MIN);
    let deleted = if oldest.number == 0 {
        tx.execute(
            "DELETE FROM log_records
             WHERE topic = $1 AND partition = $2 AND record_offset IN (
               SELECT record_offset FROM (
                 SELECT record_offset, appended_at FROM log_records
                 WHERE topic = $1 AND partition = $2
                 ORDER BY record_offset LIMIT $5)
               WHERE record_offset < $3 OR appended_at < $4)",
            params![topic, partition, rule.below, before, batch as i64],
        )?
    } else {
        let table = segment_table(oldest.number);
        tx.execute(
            &format!(
                "DELETE FROM {table} WHERE record_offset IN (
                   SELECT record_offset FROM (
                     SELECT record_offset, appended_at FROM {table}
                     ORDER BY record_offset LIMIT $3)
                   WHERE record_offset < $1 OR appended_at < $2)"
            ),
            params![rule.below, before, batch as i64],
        )?
    };
    if deleted > 0 {
        let first = if oldest.number == 0 {
            tx.query_opt(
                "SELECT MIN(record_offset) FROM log_records WHERE topic = $1 AND partition = $2",
                params![topic, partition],
            )?
        } else {
            tx.query_opt(
                &format!(
                    "SELECT MIN(record_offset) FROM {}",
                    segment_table(oldest.number)
                ),
                &[],
            )?
        }
        .and_then(|row| row.opt_i64(0).transpose())
        .transpose()?
        .unwrap_or(oldest.next_offset);
        if oldest.number == 0 && first >= oldest.next_offset {
            // The records of a file made before segments are all gone.
            tx.execute(
                "DELETE FROM log_segments WHERE topic = $1 AND partition = $2 AND segment = 0",
                params![topic, partition],
            )?;
        } else {
            tx.execute(
                "UPDATE log_segments SET first_offset = $4
                 WHERE topic = $1 AND partition = $2 AND segment = $3",
                params![topic, partition, oldest.number, first],
            )?;
        }
    }
    Ok(Step {
        records: deleted,
        // The legacy records gone, the segments after them come next.
        more: deleted == batch || (oldest.number == 0 && deleted > 0 && !newest),
    })
}

/// Reads up to `limit` records of `place` from `offset` on, across its
/// segments.
fn read_partition(
    tx: &mut dyn Tx,
    place: &TopicPartition,
    offset: u64,
    limit: usize,
) -> Result<Vec<Record>, StoreError> {
    let from = i64::try_from(offset).unwrap_or(i64::MAX);
    let mut records: Vec<Record> = Vec::new();
    for segment in segments_from(tx, &place.topic, place.partition, from)? {
        if records.len() >= limit {
            break;
        }
        let start = records.last().map_or(from, |last| {
            i64::try_from(last.offset + 1).unwrap_or(i64::MAX)
        });
        records.extend(segment.read(tx, place, start, limit - records.len())?);
    }
    Ok(records)
}

/// How to open the embedded log.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// How hard each append waits for the disk (`Full` by default: an
    /// append that returned survives a power cut; `Normal` may lose the
    /// last appends then, never corrupt the log).
    pub synchronous: Synchronous,
    /// Partitions of topics this file creates; fixed when the file is new.
    pub partitions: u32,
    /// The payload a partition's segment takes before the next append
    /// opens a new one. Retention frees a segment whole: smaller segments
    /// keep the log closer to its rule, larger ones make fewer tables.
    pub segment_bytes: u64,
}

/// The default [`EmbeddedOptions::segment_bytes`]: 64 MiB, some 100,000
/// records of the commerce system's size, so a log holds a handful of
/// segments a partition under a short rule and a few hundred under a
/// week's.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            synchronous: Synchronous::Full,
            partitions: 1,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
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
    segment_bytes: i64,
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
    /// Opens the log in the SQLite file at `path`, making it (and its
    /// tables) if it is not there; several processes may open one file at
    /// once. A file made before segments keeps its records (adopted as each
    /// partition's first segment, once).
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
                let adopted = tx
                    .query_opt("SELECT 1 FROM log_meta WHERE name = 'segments'", &[])?
                    .is_some();
                if !adopted {
                    tx.execute_batch(ADOPT_LEGACY)?;
                }
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
                segment_bytes: i64::try_from(options.segment_bytes.max(1)).unwrap_or(i64::MAX),
                topics: Mutex::new(HashMap::new()),
                appended: signal_for(&canonical),
            }),
        })
    }

    /// The log's file.
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

/// A batch's records by `(topic, partition)`: each one's `(key, payload)`,
/// in order.
type ByPartition<'a> = BTreeMap<(&'a str, u32), Vec<(&'a str, &'a [u8])>>;

fn append_batch(
    tx: &mut dyn Tx,
    records: &[(String, u32, String, Vec<u8>)],
    default_partitions: u32,
    segment_bytes: i64,
) -> Result<(), StoreError> {
    // Each partition's records, in order; offsets reserved with one upsert
    // each, then written to the partition's newest segment.
    let mut by_partition: ByPartition<'_> = BTreeMap::new();
    for (topic, partition, key, payload) in records {
        by_partition
            .entry((topic.as_str(), *partition))
            .or_default()
            .push((key.as_str(), payload.as_slice()));
    }
    let mut topics_seen: Vec<&str> = Vec::new();
    let appended_at = now_micros();
    let mut params: Vec<Param<'_>> = Vec::new();
    for ((topic, partition), records) in &by_partition {
        if !topics_seen.contains(topic) {
            tx.execute(
                "INSERT INTO log_topics (topic, partitions) VALUES ($1, $2)
                 ON CONFLICT (topic) DO NOTHING",
                params![*topic, default_partitions],
            )?;
            topics_seen.push(topic);
        }
        let count = records.len() as i64;
        let next = tx
            .query_opt(
                "INSERT INTO log_heads (topic, partition, next_offset) VALUES ($1, $2, $3)
                 ON CONFLICT (topic, partition) DO UPDATE SET next_offset = next_offset + $3
                 RETURNING next_offset",
                params![*topic, *partition, count],
            )?
            .ok_or_else(|| StoreError::Decode("log head upsert returned nothing".into()))?
            .i64(0)?;
        let first = next - count;
        let bytes: i64 = records
            .iter()
            .map(|(_, payload)| payload.len() as i64)
            .sum();
        let segment = writable_segment(tx, topic, *partition, first, segment_bytes)?;
        let table = segment_table(segment);
        let mut offset = first;
        for chunk in records.chunks(INSERT_ROWS) {
            params.clear();
            for (key, payload) in chunk {
                params.extend([
                    Param::Int(offset),
                    Param::Text(key),
                    Param::Blob(payload),
                    Param::Int(appended_at),
                ]);
                offset += 1;
            }
            tx.execute(&insert_records(&table, chunk.len()), &params)?;
        }
        tx.execute(
            "UPDATE log_segments SET next_offset = $4, bytes = bytes + $5, last_appended_at = $6
             WHERE topic = $1 AND partition = $2 AND segment = $3",
            params![*topic, *partition, segment, next, bytes, appended_at],
        )?;
    }
    Ok(())
}

/// The segment of `topic`/`partition` that takes records from offset
/// `first` on: its newest, or a new one when that is full (or is the
/// records of a file made before segments, or there is none).
fn writable_segment(
    tx: &mut dyn Tx,
    topic: &str,
    partition: u32,
    first: i64,
    segment_bytes: i64,
) -> Result<i64, StoreError> {
    let newest = tx.query_opt(
        "SELECT segment, bytes FROM log_segments WHERE topic = $1 AND partition = $2
         ORDER BY segment DESC LIMIT 1",
        params![topic, partition],
    )?;
    if let Some(row) = newest {
        let (segment, bytes) = (row.i64(0)?, row.i64(1)?);
        if segment > 0 && bytes < segment_bytes {
            return Ok(segment);
        }
    }
    let segment = tx
        .query_opt(
            "UPDATE log_meta SET value = value + 1 WHERE name = 'segments' RETURNING value",
            &[],
        )?
        .ok_or_else(|| StoreError::Decode("log_meta lost its segment count".into()))?
        .i64(0)?;
    tx.execute_batch(&format!(
        "CREATE TABLE {} (
           record_offset INTEGER PRIMARY KEY,
           record_key    TEXT    NOT NULL,
           payload       BLOB    NOT NULL,
           appended_at   INTEGER NOT NULL)",
        segment_table(segment)
    ))?;
    tx.execute(
        "INSERT INTO log_segments (topic, partition, segment, first_offset, next_offset, bytes,
           last_appended_at)
         VALUES ($1, $2, $3, $4, $4, 0, $5)",
        params![topic, partition, segment, first, now_micros()],
    )?;
    Ok(segment)
}

/// Rows a statement of the log's appends.
const INSERT_ROWS: usize = 64;

/// The statement that appends `rows` records to segment table `table`.
fn insert_records(table: &str, rows: usize) -> String {
    use std::fmt::Write;
    let mut sql =
        format!("INSERT INTO {table} (record_offset, record_key, payload, appended_at) VALUES ");
    for row in 0..rows {
        let at = row * 4;
        let _ = write!(
            sql,
            "{}(?{},?{},?{},?{})",
            if row == 0 { "" } else { "," },
            at + 1,
            at + 2,
            at + 3,
            at + 4
        );
    }
    sql
}

#[async_trait::async_trait]
impl Bus for EmbeddedLog {
    async fn close(&self) -> Result<(), BusError> {
        Ok(self.inner.file.close().await?)
    }

    /// The lowest offset left in each partition (its next offset when all
    /// were pruned), from its segments' list.
    async fn start_offsets(&self, topic: &str) -> Result<Vec<(u32, u64)>, BusError> {
        let topic = topic.to_owned();
        Ok(self
            .inner
            .file
            .read(move |tx| -> Result<Vec<(u32, u64)>, StoreError> {
                tx.query(
                    "SELECT h.partition, COALESCE(
                       (SELECT MIN(s.first_offset) FROM log_segments AS s
                        WHERE s.topic = h.topic AND s.partition = h.partition
                          AND s.next_offset > s.first_offset),
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
    /// sharing the log one prunes at a time. A partition's oldest segment
    /// goes whole (one transaction, a `DROP TABLE`) once every record in it
    /// is past the rule; the segment still being written, and the records
    /// of a file made before segments, are pruned oldest first, `batch` a
    /// transaction. `log_heads` keeps each partition's next offset, so
    /// offsets never repeat, however much is pruned.
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
            .read(|tx| -> Result<Vec<(String, u32, i64)>, StoreError> {
                tx.query(
                    "SELECT topic, partition, next_offset FROM log_heads ORDER BY topic, partition",
                    &[],
                )?
                .iter()
                .map(|row| {
                    Ok((
                        row.text(0)?.to_owned(),
                        u32::try_from(row.i64(1)?).unwrap_or(0),
                        row.i64(2)?,
                    ))
                })
                .collect()
            })
            .await?;
        let mut pruned = 0;
        for (topic, partition, next) in heads {
            // Below this offset every record goes, whatever its age.
            let below = keep.map_or(0, |keep| next.saturating_sub(keep));
            let rule = Rule { below, before };
            loop {
                let topic = topic.clone();
                let step = self
                    .inner
                    .file
                    .write(move |tx| prune_step(tx, &topic, partition, rule, batch))
                    .await?;
                pruned += step.records;
                if !step.more {
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
        let (default_partitions, segment_bytes) =
            (self.inner.default_partitions, self.inner.segment_bytes);
        self.inner
            .file
            .write(move |tx| append_batch(tx, &placed, default_partitions, segment_bytes))
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
            .read(move |tx| -> Result<Option<Vec<u8>>, StoreError> {
                let place = TopicPartition::new(topic, partition);
                Ok(read_partition(tx, &place, offset, 1)?
                    .into_iter()
                    .next()
                    .filter(|record| record.offset == offset)
                    .map(|record| record.payload))
            })
            .await?;
        Ok(found)
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
                    records.extend(read_partition(tx, partition, *offset, per_partition)?);
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
