//! One member of a Kafka consumer group as a [`Subscription`].
//!
//! A `BaseConsumer` is polled on tokio's blocking threads. Its rebalance
//! callback, which librdkafka runs inside `poll`, turns assignment changes
//! into [`Delivery::Assigned`] / [`Delivery::Revoked`] and pauses newly
//! assigned partitions; a partition delivers records only after
//! [`Subscription::seek`] (or, if the subscriber did not seek it before
//! asking for more, an implicit seek to 0), and records below the position
//! sought are dropped, so nothing fetched before the seek ever comes out.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tandem::bus::{BusError, Delivery, Record, Subscription, TopicPartition};

use crate::{log_to_tracing, now_micros};

/// How long a seek may wait for a just-assigned partition to become
/// seekable (librdkafka answers "erroneous state" until it started fetching).
const SEEK_SETTLE: Duration = Duration::from_secs(15);
/// How long one seek request may take.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);

/// Where one assigned partition stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// Assigned by a rebalance whose `Assigned` was not handed out yet.
    Announcing,
    /// `Assigned` was handed out; the subscriber has not sought it yet.
    Unsought,
    /// Sought: records from this offset on are delivered.
    From(i64),
}

#[derive(Default)]
struct State {
    /// Assignment changes not handed out yet, in the order they happened.
    changes: VecDeque<Delivery>,
    /// Records fetched and not handed out yet.
    buffer: VecDeque<Record>,
    /// The partitions this member holds now.
    assigned: BTreeMap<(String, i32), Position>,
    /// An error from the rebalance callback, handed out by the next `next`.
    failure: Option<String>,
    /// Records this member has not had were pruned from a partition it
    /// reads (what and why): every `next` from now on says so.
    pruned: Option<String>,
}

impl State {
    fn accept(&mut self, record: Record, partition: i32) {
        let key = (record.topic, partition);
        let Some(Position::From(expected)) = self.assigned.get_mut(&key) else {
            // Not assigned, or not sought yet: fetched before its position
            // was known.
            return;
        };
        let offset = record.offset as i64;
        if offset < *expected {
            // Prefetched before a seek moved the position.
            return;
        }
        if offset > *expected {
            // The offsets of the topics Tandem writes are dense (no
            // transactions, no compaction): a jump means the records in
            // between were deleted by the topic's retention before this
            // member read them. Say so rather than skip them; nothing of
            // this partition is handed out past the hole.
            if self.pruned.is_none() {
                self.pruned = Some(tandem::bus::pruned_range(
                    &key.0,
                    partition as u32,
                    *expected as u64,
                    offset as u64,
                ));
            }
            return;
        }
        *expected = offset + 1;
        let (topic, _) = key;
        self.buffer.push_back(Record { topic, ..record });
    }

    fn drop_buffered(&mut self, topic: &str, partition: i32) {
        self.buffer
            .retain(|record| !(record.topic == topic && record.partition as i32 == partition));
    }
}

/// The consumer's context: the rebalance callback and logging.
pub(crate) struct GroupContext {
    state: Arc<Mutex<State>>,
    group: String,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn partitions_of(list: &TopicPartitionList) -> Vec<(String, i32)> {
    list.elements()
        .iter()
        .map(|element| (element.topic().to_owned(), element.partition()))
        .collect()
}

fn to_bus(partitions: &[(String, i32)]) -> Vec<TopicPartition> {
    partitions
        .iter()
        .map(|(topic, partition)| TopicPartition::new(topic.clone(), *partition as u32))
        .collect()
}

impl ClientContext for GroupContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_to_tracing(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(group = %self.group, %error, reason, "kafka consumer error");
    }
}

impl ConsumerContext for GroupContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        list: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let partitions = partitions_of(list);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                tracing::debug!(group = %self.group, ?partitions, "partitions assigned");
                let result = if cooperative {
                    consumer.incremental_assign(list)
                } else {
                    consumer.assign(list)
                };
                // Nothing is fetched until the subscriber has sought each
                // partition; what slips through before the pause is dropped.
                let paused = result.and_then(|()| consumer.pause(list));
                let mut state = lock(&self.state);
                if let Err(error) = paused {
                    state.failure = Some(format!("assigning {partitions:?} failed: {error}"));
                }
                if !cooperative {
                    state.assigned.clear();
                }
                for partition in &partitions {
                    state
                        .assigned
                        .insert(partition.clone(), Position::Announcing);
                    state.drop_buffered(&partition.0, partition.1);
                }
                state
                    .changes
                    .push_back(Delivery::Assigned(to_bus(&partitions)));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::debug!(group = %self.group, ?partitions, "partitions revoked");
                {
                    // No batch is in flight: the subscriber asks for more
                    // (which is when this runs) only after its batch committed.
                    let mut state = lock(&self.state);
                    for partition in &partitions {
                        state.assigned.remove(partition);
                        state.drop_buffered(&partition.0, partition.1);
                    }
                    if !partitions.is_empty() {
                        state
                            .changes
                            .push_back(Delivery::Revoked(to_bus(&partitions)));
                    }
                }
                let result = if cooperative {
                    consumer.incremental_unassign(list)
                } else {
                    consumer.unassign()
                };
                if let Err(error) = result {
                    tracing::warn!(group = %self.group, %error, "unassign failed");
                }
            }
            other => {
                let code: RDKafkaErrorCode = other.into();
                tracing::warn!(group = %self.group, error = %code, "rebalance error");
                {
                    let mut state = lock(&self.state);
                    let revoked: Vec<(String, i32)> = state.assigned.keys().cloned().collect();
                    state.assigned.clear();
                    state.buffer.clear();
                    if !revoked.is_empty() {
                        state.changes.push_back(Delivery::Revoked(to_bus(&revoked)));
                    }
                }
                if cooperative {
                    let _ = consumer.incremental_unassign(list);
                } else {
                    let _ = consumer.unassign();
                }
            }
        }
    }
}

struct Inner {
    consumer: BaseConsumer<GroupContext>,
    state: Arc<Mutex<State>>,
    /// Held by whoever polls or seeks, so that a poll orphaned by a
    /// cancelled `next` cannot interleave with a seek.
    polling: Mutex<()>,
    group: String,
}

impl Inner {
    /// Polls until a change or the first records arrive (at most `max_wait`),
    /// then takes what is immediately available, up to `max_records`.
    fn poll(&self, max_records: usize, max_wait: Duration) -> Result<(), BusError> {
        let _polling = self.polling.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + max_wait;
        loop {
            {
                let state = lock(&self.state);
                if !state.changes.is_empty()
                    || state.failure.is_some()
                    || state.pruned.is_some()
                    || state.buffer.len() >= max_records
                {
                    return Ok(());
                }
            }
            let have_records = !lock(&self.state).buffer.is_empty();
            let now = Instant::now();
            let wait = if have_records || now >= deadline {
                Duration::ZERO
            } else {
                (deadline - now).min(Duration::from_millis(250))
            };
            match self.consumer.poll(wait) {
                Some(Ok(message)) => {
                    let record = Record {
                        topic: message.topic().to_owned(),
                        partition: message.partition() as u32,
                        offset: message.offset() as u64,
                        key: String::from_utf8_lossy(message.key().unwrap_or_default())
                            .into_owned(),
                        payload: message.payload().unwrap_or_default().to_vec(),
                        appended_at_micros: message
                            .timestamp()
                            .to_millis()
                            .map_or_else(now_micros, |millis| millis.saturating_mul(1000)),
                    };
                    lock(&self.state).accept(record, message.partition());
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(error)) => {
                    if let KafkaError::MessageConsumptionFatal(_) = error {
                        return Err(BusError::Engine(
                            format!("kafka consumer of group {}: {error}", self.group).into(),
                        ));
                    }
                    // Broker hiccups: librdkafka reconnects by itself.
                    tracing::warn!(group = %self.group, %error, "kafka consumer error");
                    if have_records {
                        return Ok(());
                    }
                }
                None => {
                    if have_records || Instant::now() >= deadline {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Makes `offset` the next record delivered from `partition`.
    fn seek(&self, topic: &str, partition: i32, offset: i64) -> Result<(), BusError> {
        let _polling = self.polling.lock().unwrap_or_else(|p| p.into_inner());
        let key = (topic.to_owned(), partition);
        if !lock(&self.state).assigned.contains_key(&key) {
            // Revoked meanwhile (the `Revoked` is queued): nothing to do.
            tracing::debug!(group = %self.group, topic, partition, "seek of a partition not held");
            return Ok(());
        }
        // A position below the log's start: retention deleted what this
        // member has not read. Say so with the range (a fetch from there
        // would be reset to the oldest record, a hole in the offsets).
        if let Ok((low, _)) = self
            .consumer
            .fetch_watermarks(topic, partition, SEEK_TIMEOUT)
        {
            if offset < low {
                let why =
                    tandem::bus::pruned_range(topic, partition as u32, offset as u64, low as u64);
                lock(&self.state).pruned.get_or_insert(why.clone());
                return Err(BusError::Pruned(why.into()));
            }
        }
        let give_up = Instant::now() + SEEK_SETTLE;
        loop {
            match self
                .consumer
                .seek(topic, partition, Offset::Offset(offset), SEEK_TIMEOUT)
            {
                Ok(()) => break,
                Err(error) if Instant::now() < give_up => {
                    // A partition assigned a moment ago is not seekable until
                    // librdkafka started fetching it ("erroneous state").
                    tracing::debug!(group = %self.group, topic, partition, %error, "seek retried");
                    // Rebalance callbacks only run inside poll; one may
                    // have revoked the partition.
                    if !lock(&self.state).assigned.contains_key(&key) {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(error) => {
                    return Err(BusError::Unavailable(
                        format!(
                            "seeking {topic}/{partition} to {offset} in group {}: {error}",
                            self.group
                        )
                        .into(),
                    ))
                }
            }
        }
        {
            let mut state = lock(&self.state);
            if let Some(position) = state.assigned.get_mut(&key) {
                *position = Position::From(offset);
            }
            state.drop_buffered(topic, partition);
        }
        let mut list = TopicPartitionList::new();
        list.add_partition(topic, partition);
        self.consumer.resume(&list).map_err(|error| {
            BusError::Engine(format!("resuming {topic}/{partition}: {error}").into())
        })
    }
}

/// A member of a consumer group; see the module docs.
pub struct KafkaSubscription {
    inner: Option<Arc<Inner>>,
}

impl KafkaSubscription {
    pub(crate) fn new(
        config: rdkafka::ClientConfig,
        group: &str,
        topics: &[String],
    ) -> Result<Self, BusError> {
        let state = Arc::new(Mutex::new(State::default()));
        let context = GroupContext {
            state: Arc::clone(&state),
            group: group.to_owned(),
        };
        let consumer: BaseConsumer<GroupContext> =
            config.create_with_context(context).map_err(|error| {
                BusError::Invalid(format!("kafka consumer configuration: {error}").into())
            })?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).map_err(|error| {
            BusError::Engine(format!("subscribing to {topics:?}: {error}").into())
        })?;
        Ok(Self {
            inner: Some(Arc::new(Inner {
                consumer,
                state,
                polling: Mutex::new(()),
                group: group.to_owned(),
            })),
        })
    }

    fn inner(&self) -> Arc<Inner> {
        Arc::clone(self.inner.as_ref().expect("subscription open"))
    }

    /// Hands out a pending change or buffered records, if any.
    fn take(&self, max_records: usize) -> Result<Option<Delivery>, BusError> {
        let inner = self.inner.as_ref().expect("subscription open");
        let mut state = lock(&inner.state);
        if let Some(failure) = state.failure.take() {
            return Err(BusError::Engine(failure.into()));
        }
        if let Some(pruned) = &state.pruned {
            return Err(BusError::Pruned(pruned.clone().into()));
        }
        if let Some(change) = state.changes.pop_front() {
            if let Delivery::Assigned(partitions) = &change {
                for partition in partitions {
                    let key = (partition.topic.clone(), partition.partition as i32);
                    if let Some(position) = state.assigned.get_mut(&key) {
                        if *position == Position::Announcing {
                            *position = Position::Unsought;
                        }
                    }
                }
            }
            return Ok(Some(change));
        }
        if state.buffer.is_empty() {
            return Ok(None);
        }
        let count = state.buffer.len().min(max_records.max(1));
        Ok(Some(Delivery::Records(
            state.buffer.drain(..count).collect(),
        )))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> Result<T, BusError> + Send + 'static,
    ) -> Result<T, BusError> {
        let inner = self.inner();
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|error| BusError::Engine(format!("kafka consumer thread: {error}").into()))?
    }
}

#[async_trait::async_trait]
impl Subscription for KafkaSubscription {
    async fn next(
        &mut self,
        max_records: usize,
        max_wait: Duration,
    ) -> Result<Option<Delivery>, BusError> {
        // Partitions handed out and not sought start at 0, as on every bus.
        let unsought: Vec<(String, i32)> = {
            let inner = self.inner.as_ref().expect("subscription open");
            let state = lock(&inner.state);
            state
                .assigned
                .iter()
                .filter(|(_, position)| **position == Position::Unsought)
                .map(|(key, _)| key.clone())
                .collect()
        };
        if !unsought.is_empty() {
            self.blocking(move |inner| {
                for (topic, partition) in &unsought {
                    inner.seek(topic, *partition, 0)?;
                }
                Ok(())
            })
            .await?;
        }
        if let Some(delivery) = self.take(max_records)? {
            return Ok(Some(delivery));
        }
        let max_records = max_records.max(1);
        self.blocking(move |inner| inner.poll(max_records, max_wait))
            .await?;
        self.take(max_records)
    }

    async fn seek(&mut self, partition: &TopicPartition, offset: u64) -> Result<(), BusError> {
        let topic = partition.topic.clone();
        let number = i32::try_from(partition.partition).map_err(|_| {
            BusError::Invalid(format!("partition {} out of range", partition.partition).into())
        })?;
        let offset = i64::try_from(offset)
            .map_err(|_| BusError::Invalid(format!("offset {offset} out of range").into()))?;
        self.blocking(move |inner| inner.seek(&topic, number, offset))
            .await
    }

    async fn ack(&mut self, _records: &[Record]) -> Result<(), BusError> {
        // Positions live in the subscriber's database, committed with its
        // effects; Kafka's committed offsets are never relied upon.
        Ok(())
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        // Closing leaves the group, which waits for the broker: not on an
        // async thread. A blocking task also keeps the runtime (and so a
        // test's process) alive until the consumer is closed.
        if let Some(inner) = self.inner.take() {
            let close = move || {
                let polling = inner.polling.lock().unwrap_or_else(|p| p.into_inner());
                drop(polling);
                drop(inner);
            };
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn_blocking(close);
                }
                Err(_) => close(),
            }
        }
    }
}
