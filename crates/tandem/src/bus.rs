//! The `Bus` port: topics split into partitions of dense, ordered offsets.
//!
//! Records with the same key land in the same partition, so one aggregate's
//! events keep their order. A subscription belongs to a named group; the bus
//! tells it which partitions it owns ([`Delivery::Assigned`]) and the
//! consumer then [`Subscription::seek`]s each one to the position it keeps in
//! its own database. The bus never stores consumer positions that matter:
//! [`Subscription::ack`] only tells brokers with redelivery (NATS) to stop.

use crate::store::Cause;
use std::time::Duration;

/// A record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingRecord {
    /// The topic to append to.
    pub topic: String,
    /// The partition key: the aggregate id.
    pub key: String,
    /// The bytes to append: for the relay, an encoded [`crate::Envelope`].
    pub payload: Vec<u8>,
}

/// A record read back, with its place in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The topic it was read from.
    pub topic: String,
    /// The partition of the topic, chosen from the key.
    pub partition: u32,
    /// Its place in the partition: dense, from 0, never reused.
    pub offset: u64,
    /// The partition key it was appended with.
    pub key: String,
    /// The bytes as appended.
    pub payload: Vec<u8>,
    /// When the bus appended it, in microseconds since the Unix epoch.
    pub appended_at_micros: i64,
}

/// One partition of one topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// The topic.
    pub topic: String,
    /// The partition's number, from 0.
    pub partition: u32,
}

impl TopicPartition {
    /// Partition `partition` of `topic`.
    pub fn new(topic: impl Into<String>, partition: u32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

/// What a subscription hands out next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// These partitions are now this member's: seek each before records of
    /// it are delivered (unseeked partitions start at offset 0).
    Assigned(Vec<TopicPartition>),
    /// These partitions are no longer this member's. Work on them finished
    /// before this was delivered, since batches are handled one at a time.
    Revoked(Vec<TopicPartition>),
    /// Records in offset order within each partition.
    Records(Vec<Record>),
}

/// Errors at the bus boundary; the engine's own error stays reachable as
/// the [`std::error::Error::source`] (see [`Cause`]).
#[derive(Debug)]
pub enum BusError {
    /// The broker or the log file could not be reached, or refused to work
    /// for now (a timeout, a lost connection, a busy lock): retrying later
    /// may succeed.
    Unavailable(Cause),
    /// Any other failure of the engine, which retrying as such is not
    /// expected to cure.
    Engine(Cause),
    /// The request itself was refused: a topic or group name the engine
    /// does not take, a partition or offset out of range, a bad setting, a
    /// record the broker will not accept. The same request fails again.
    Invalid(Cause),
    /// Records a member has not read yet were pruned from the log by its
    /// retention: reading on would skip them, so the member stops there.
    Pruned(Cause),
}

impl std::fmt::Display for BusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BusError::Unavailable(cause) => write!(f, "bus unavailable: {cause}"),
            BusError::Engine(cause) => write!(f, "bus error: {cause}"),
            BusError::Invalid(cause) => write!(f, "invalid request: {cause}"),
            BusError::Pruned(cause) => write!(f, "fell behind the log's retention: {cause}"),
        }
    }
}

impl std::error::Error for BusError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause().source()
    }
}

/// What a consumer is told when records `from..to` of `topic/partition`
/// that it has not applied were deleted by the log's retention: one
/// wording on every engine, and in `tandem status`.
pub fn pruned_range(topic: &str, partition: u32, from: u64, to: u64) -> String {
    format!(
        "records {from}..{to} of {topic}/{partition} were pruned by the log's retention \
         before this consumer applied them; the source must publish them again \
         (tandem republish)"
    )
}

impl BusError {
    /// [`BusError::Pruned`] for records `from..to` of `topic/partition`
    /// (see [`pruned_range`]).
    pub fn pruned(topic: &str, partition: u32, from: u64, to: u64) -> Self {
        BusError::Pruned(pruned_range(topic, partition, from, to).into())
    }

    /// What the error says (without its kind).
    pub fn cause(&self) -> &Cause {
        match self {
            BusError::Unavailable(cause)
            | BusError::Engine(cause)
            | BusError::Invalid(cause)
            | BusError::Pruned(cause) => cause,
        }
    }

    /// The error's kind, as a bounded metric label: `unavailable`,
    /// `engine`, `invalid`, `pruned`.
    pub fn kind(&self) -> &'static str {
        match self {
            BusError::Unavailable(_) => "unavailable",
            BusError::Engine(_) => "engine",
            BusError::Invalid(_) => "invalid",
            BusError::Pruned(_) => "pruned",
        }
    }
}

impl From<crate::store::StoreError> for BusError {
    fn from(error: crate::store::StoreError) -> Self {
        match error {
            crate::store::StoreError::Unavailable(cause) => BusError::Unavailable(cause),
            other => BusError::Engine(Cause::with_source(other.to_string(), other)),
        }
    }
}

/// What resolves once the bus acknowledged every record of one
/// [`Bus::enqueue`] call: `Ok` when all of them are on the log.
pub type Acknowledgements =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BusError>> + Send + 'static>>;

/// An event bus engine: the embedded log, Kafka or NATS JetStream behind
/// one interface.
///
/// Every engine keeps each partition's records in append order, at dense
/// offsets from 0, and sends records of one key to one partition (the
/// embedded log by [`partition_for`], Kafka by its own partitioner, NATS
/// with one partition per topic), so one aggregate's events are read in
/// the order they were published. Delivery to a group is at least once: consumers
/// keep their own positions and drop what they applied already. A bus is
/// shared (`Arc<dyn Bus>`) by the relay and every consumer of a process.
#[async_trait::async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Appends records durably, keeping their order per key. When this
    /// returns `Ok` every record is on the log; on `Err` some may be.
    async fn publish(&self, records: &[OutgoingRecord]) -> Result<(), BusError>;

    /// Queues `records` for publishing behind the records of every earlier
    /// call, and returns what resolves once the bus acknowledged them all
    /// (when [`Bus::publish`] would have returned). A relay keeps up to
    /// [`Bus::publish_depth`] calls unacknowledged; because each call's
    /// records are queued before the next call starts, their order per key
    /// is the order of the calls. The default publishes the records to
    /// completion before it returns.
    async fn enqueue(&self, records: Vec<OutgoingRecord>) -> Result<Acknowledgements, BusError> {
        self.publish(&records).await?;
        Ok(Box::pin(std::future::ready(Ok(()))))
    }

    /// Joins `group` reading `topics`.
    async fn subscribe(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<Box<dyn Subscription>, BusError>;

    /// The next offset to be written in each partition of `topic`
    /// (the high-water marks), for lag and tests.
    async fn end_offsets(&self, topic: &str) -> Result<Vec<(u32, u64)>, BusError>;

    /// The payload of the record at `offset` of `partition` of `topic`,
    /// `None` when the bus holds none there (not written yet, or gone
    /// with retention). Consumers' lag in seconds reads the record at a
    /// consumer's position with it: the oldest event it has not applied.
    async fn payload_at(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<Option<Vec<u8>>, BusError>;

    /// How many [`Bus::enqueue`] calls the relay may leave unacknowledged
    /// at once: more than one only where the bus keeps the records of
    /// successive calls in call order per key on the log, as Kafka's
    /// idempotent producer and one NATS connection do. Overlapping calls hide the broker's round trip
    /// behind the next batch; a failed call makes the relay publish again
    /// from the last acknowledged batch, so the calls after it are
    /// published twice (consumers drop the duplicates by sequence, and
    /// hold an event that arrives ahead of its predecessor). The default
    /// is 1: each batch waits for the one before it.
    fn publish_depth(&self) -> usize {
        1
    }

    /// Whether the members of one group may be handed records of the same
    /// partition at once (NATS: one shared durable per topic). The
    /// consumer then cannot take its highest applied offset as its
    /// position: another member may still hold lower ones.
    fn shares_partitions(&self) -> bool {
        false
    }

    /// The longest the bus may take to deliver again a record that a
    /// member received and never acknowledged (NATS: the largest of
    /// `ack_wait` and the redelivery backoff). A consumer waits at least
    /// this long for a missing sequence before it reports a gap.
    fn redelivery_delay_max(&self) -> Duration {
        Duration::ZERO
    }

    /// Each partition's first offset still held, where retention pruned
    /// the records below it; partitions left out start at 0. The default
    /// says nothing (every partition starts at 0).
    async fn start_offsets(&self, topic: &str) -> Result<Vec<(u32, u64)>, BusError> {
        let _ = topic;
        Ok(Vec::new())
    }

    /// Prunes the records appended longer than `max_age` ago and those
    /// beyond the newest `max_records` of each partition, `batch` a
    /// transaction; returns how many. Only the embedded log does it here:
    /// Kafka and NATS prune by their own topic settings. The default does
    /// nothing.
    async fn prune(
        &self,
        max_age: Option<Duration>,
        max_records: Option<u64>,
        batch: u64,
    ) -> Result<u64, BusError> {
        let _ = (max_age, max_records, batch);
        Ok(0)
    }

    /// Deletes what the bus keeps for `group` on `topics`, a group that
    /// will never read again (a finished rebuild's builder). NATS deletes
    /// the group's durables; the embedded log and Kafka keep nothing that
    /// outlives it (Kafka expires an empty group's metadata by itself; the
    /// positions live in the consumer's database). The default does
    /// nothing.
    async fn forget_group(&self, group: &str, topics: &[String]) -> Result<(), BusError> {
        let _ = (group, topics);
        Ok(())
    }

    /// Closes the bus at a clean stop: what this process publishes from
    /// now fails, and what it holds open is released (the embedded log:
    /// its file is checkpointed and closed as [`crate::Store::close`]
    /// says). The default does nothing.
    async fn close(&self) -> Result<(), BusError> {
        Ok(())
    }
}

/// One member's view of a group.
///
/// Used by one task at a time: it asks for the [`Delivery`]s of the
/// partitions the group gives it, one after the other. Dropping it leaves
/// the group, and the bus hands its partitions to the other members.
#[async_trait::async_trait]
pub trait Subscription: Send {
    /// Waits up to `max_wait` for the next delivery; `None` if nothing came.
    async fn next(
        &mut self,
        max_records: usize,
        max_wait: Duration,
    ) -> Result<Option<Delivery>, BusError>;

    /// Sets the next offset to deliver from `partition`.
    async fn seek(&mut self, partition: &TopicPartition, offset: u64) -> Result<(), BusError>;

    /// Tells the bus these records are durably handled.
    async fn ack(&mut self, records: &[Record]) -> Result<(), BusError>;
}

/// Kafka's rule of thumb for keys to partitions, with a stable hash
/// (FNV-1a, 32 bit) so every process agrees.
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.as_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions.max(1)
}
