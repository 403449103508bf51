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

mod batch;
mod handler;
mod ordering;
mod parking;
pub mod pauses;
mod positions;
mod requests;
mod run;
mod states;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

pub use crate::backoff::jitter;
pub use handler::{Handler, HandlerError};
pub use positions::positions;
pub(crate) use positions::{bump_generation, STATE_TABLES};

use crate::bus::{Bus, BusError, TopicPartition};
use crate::store::{Store, StoreError};

/// How a consumer runs.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The consumer's name: its group on the bus and its key in the tables.
    pub name: String,
    /// The topics it reads.
    pub topics: Vec<String>,
    /// Most records applied in one transaction.
    pub batch_size: usize,
    /// Tries before an event is parked.
    pub max_attempts: u32,
    /// The first pause before a failed event is tried again (and before
    /// the first attempt to rejoin after an outage); each pause after it
    /// doubles, jittered.
    pub retry_initial: Duration,
    /// Longest pause between two attempts at a failed event.
    pub retry_max: Duration,
    /// Longest pause between attempts to rejoin an unreachable bus or store.
    pub retry_outage_max: Duration,
    /// How long an event ahead of a gap waits for the missing sequence.
    pub gap_timeout: Duration,
    /// How often requests (redrive, discard, replay) and gaps are checked.
    pub housekeeping_interval: Duration,
}

impl ConsumerConfig {
    /// The consumer `name` of `topics`, with the defaults: batches of up
    /// to 1000 records, 5 attempts before an event is parked (pauses from
    /// 20 ms up to 2 s between them), outages retried up to every 5 s, a
    /// 5 s gap timeout and housekeeping every 100 ms.
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

/// Why [`Consumer::run`] stopped. Outages (errors of kind `Unavailable`)
/// and a log pruned under the consumer are waited out inside `run`, so
/// what comes out here is a fault that waiting will not cure. A handler's
/// failure never stops a consumer: the event is parked instead.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// The consumer's database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The bus failed.
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

/// What one committed consumer batch did.
#[derive(Debug, Clone, Copy)]
pub struct CommittedBatch<'a> {
    /// The consumer's name.
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
    /// Called once for each batch, after its transaction committed, on the
    /// consumer's task: it should return quickly, and what it does cannot
    /// undo the batch.
    fn batch_committed(&self, batch: CommittedBatch<'_>);
}

/// Whether `error` is the store being away for a while.
fn is_store_outage(error: &StoreError) -> bool {
    matches!(error, StoreError::Unavailable(_))
}

/// A consumer: one member of the group [`ConsumerConfig::name`] on the
/// bus, applying the records of its partitions with a [`Handler`] to the
/// store, [`Consumer::run`] until shutdown.
///
/// Any number of members (in one process or many) may run against the
/// same database: the bus shares the partitions out, and each batch's
/// effects, positions and per-aggregate sequences commit in one
/// transaction, so a record delivered twice, to one member or two, is
/// applied once. A member that joins seeks each partition it is given to
/// the position stored in the database, never to one the bus keeps.
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
    /// Held (shared) while the member writes: whoever takes it exclusively
    /// knows that no write of this member is queued or running until it
    /// lets go (a rebuild's switch, see [`Consumer::with_gate`]).
    gate: Option<Arc<tokio::sync::RwLock<()>>>,
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
            gate: None,
        }
    }

    /// Makes every write of this member to its store (a batch, a parking,
    /// an operator's request, an expired gap) hold `gate` shared while it
    /// runs; nothing else does (bus calls, retry pauses). A rebuild's runner takes
    /// it exclusively around the switch, so that the builder's last batch
    /// commits before the switch's transaction begins instead of inside it
    /// (a store may commit queued writes together), and no batch of it is
    /// queued meanwhile.
    pub(crate) fn with_gate(mut self, gate: Arc<tokio::sync::RwLock<()>>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Runs `work` in a write transaction of the store with the gate (if
    /// the member has one) held shared until it committed: every write of
    /// a consumer goes through here.
    pub(super) async fn gated_write<R, E, F>(&self, work: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&mut dyn crate::store::Tx) -> Result<R, E> + Send + 'static,
    {
        let _gate = match &self.gate {
            Some(gate) => Some(Arc::clone(gate).read_owned().await),
            None => None,
        };
        self.store.write(work).await
    }

    /// Reports every committed batch to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn ConsumerObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The settings it runs with: those given to [`Consumer::new`], with
    /// the gap timeout as raised there.
    pub fn config(&self) -> &ConsumerConfig {
        &self.config
    }
}

/// A consumer must be able to run on a multi-threaded runtime.
#[cfg(test)]
mod send_checks {
    use tokio_util::sync::CancellationToken;

    use super::*;

    fn assert_send<T: Send>(_: T) {}

    #[allow(dead_code)]
    fn consumer_future_is_send(consumer: &'static Consumer<crate::sqlite::SqliteStore>) {
        assert_send(consumer.run(CancellationToken::new()));
    }
}
