//! One member's view of a group: a durable pull consumer per topic, each
//! read by a pump task into one channel.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull, DeliverPolicy, PullConsumer};
use async_nats::jetstream::{self, AckKind};
use async_nats::Subject;
use futures_util::StreamExt;
use tandem::bus::{BusError, Delivery, Record, Subscription, TopicPartition};
use tokio::sync::{mpsc, Notify};

use crate::{decode_key, sanitise, Inner, KEY_HEADER};

/// How long one pull request waits on the server. Short, so that the
/// request of a member that went away does not linger.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// How long a member whose durable vanished waits for another member to
/// create it again before creating it itself.
const REBIND_WAIT: Duration = Duration::from_secs(2);
/// Pause after a failed pull before the next one.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

type NatsStream = jetstream::stream::Stream<()>;

/// A delivered message not acknowledged yet.
struct HeldMessage {
    reply: Subject,
    /// Handed to the caller by `next` (else still in the channel).
    returned: bool,
}

/// Everything delivered and not acked: (topic index, offset) → message.
type Held = Arc<Mutex<BTreeMap<(usize, u64), HeldMessage>>>;

fn lock(held: &Held) -> std::sync::MutexGuard<'_, BTreeMap<(usize, u64), HeldMessage>> {
    held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A record from a pump, tagged with the topic's generation when it came:
/// a seek bumps the generation and so drops what was buffered before.
struct Item {
    index: usize,
    generation: u64,
    record: Record,
}

/// Per topic: what the pump and the subscription share.
struct Topic {
    name: String,
    stream: String,
    generation: Arc<AtomicU64>,
    /// Records in the channel not taken by `next` yet.
    buffered: Arc<AtomicUsize>,
    /// Signalled when `next` takes records, to let the pump pull again.
    drained: Arc<Notify>,
    pump: Option<tokio::task::JoinHandle<()>>,
    /// The bound durable, until pulling starts.
    idle: Option<PullConsumer>,
    /// The highest offset this member acked on the current durable. The
    /// server applies acks asynchronously, after the flush that sent them,
    /// so its consumer info may not show them yet when a seek asks.
    acked: Option<u64>,
}

/// A member of a group on [`crate::NatsBus`]; see the crate docs.
pub struct NatsSubscription {
    inner: Arc<Inner>,
    durable: String,
    topics: Vec<Topic>,
    announced: bool,
    /// Pulling starts with the first `next` after the assignment, so that
    /// the seeks the assignment asks for come before any message.
    pulling: bool,
    held: Held,
    sender: mpsc::UnboundedSender<Item>,
    receiver: mpsc::UnboundedReceiver<Item>,
    keep_alive: tokio::task::JoinHandle<()>,
}

fn info_not_found(error: &jetstream::context::ConsumerInfoError) -> bool {
    error.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound
}

/// Whether the durable in `info` would never deliver again some message at
/// or after stream sequence `first`, because it was acknowledged already.
fn loses_from(info: &consumer::Info, first: u64) -> bool {
    let floor = info.ack_floor.stream_sequence;
    let delivered = info.delivered.stream_sequence;
    let acked_above_floor = delivered.saturating_sub(floor) > info.num_ack_pending as u64;
    first <= floor || (acked_above_floor && first <= delivered)
}

/// What a pump needs to (re)bind its durable and pull.
#[derive(Clone)]
struct PumpContext {
    inner: Arc<Inner>,
    durable: String,
    index: usize,
    topic: String,
    stream: String,
    generation: Arc<AtomicU64>,
    buffered: Arc<AtomicUsize>,
    drained: Arc<Notify>,
    held: Held,
    sender: mpsc::UnboundedSender<Item>,
}

impl PumpContext {
    async fn stream(&self) -> Result<NatsStream, BusError> {
        self.inner.ensure_stream(&self.topic, false).await?;
        self.inner
            .jetstream
            .get_stream_no_info(&self.stream)
            .await
            .map_err(|error| {
                self.inner
                    .error(&format!("stream of {}", self.topic), error)
            })
    }

    async fn create(
        &self,
        stream: &NatsStream,
        policy: DeliverPolicy,
    ) -> Result<PullConsumer, BusError> {
        stream
            .create_consumer(
                self.inner
                    .consumer_config(&self.durable, &self.topic, policy),
            )
            .await
            .map_err(|error| {
                self.inner.error(
                    &format!("create durable {} on {}", self.durable, self.topic),
                    error,
                )
            })
    }

    /// Binds the durable by name. When it does not exist: creates it at
    /// once (delivering everything) if `fresh`, else waits up to
    /// [`REBIND_WAIT`] for the member that deleted it to create it again.
    async fn bind(&self, fresh: bool) -> Result<PullConsumer, BusError> {
        let stream = self.stream().await?;
        let started = tokio::time::Instant::now();
        let mut last_error = String::from("no answer");
        loop {
            match stream.consumer_info(&self.durable).await {
                Ok(_) => {
                    return stream
                        .get_consumer::<pull::Config>(&self.durable)
                        .await
                        .map_err(|error| {
                            self.inner.error(
                                &format!("durable {} on {}", self.durable, self.topic),
                                error,
                            )
                        })
                }
                Err(error) if info_not_found(&error) => {
                    if fresh || started.elapsed() >= REBIND_WAIT {
                        match self.create(&stream, DeliverPolicy::All).await {
                            Ok(consumer) => return Ok(consumer),
                            // Another member created it meanwhile: bind that.
                            Err(error) => last_error = error.to_string(),
                        }
                    } else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                Err(error) => {
                    if error.kind() == jetstream::context::ConsumerInfoErrorKind::StreamNotFound {
                        // Deleted behind our back: create it again next time.
                        self.inner.forget_stream(&self.topic);
                    }
                    return Err(self.inner.error(
                        &format!("durable {} on {}", self.durable, self.topic),
                        error,
                    ));
                }
            }
            if started.elapsed() >= REBIND_WAIT * 3 {
                return Err(BusError::Engine(
                    format!(
                        "NATS durable {} on {} can be neither bound nor created: {last_error}",
                        self.durable, self.topic
                    )
                    .into(),
                ));
            }
        }
    }

    /// Turns a message into a record and, in one step under the lock,
    /// remembers it as held and queues it for `next`.
    fn deliver(&self, message: jetstream::Message) {
        let (sequence, published) = match message.info() {
            Ok(info) => (info.stream_sequence, info.published),
            Err(error) => {
                tracing::warn!(%error, "message without JetStream metadata skipped");
                return;
            }
        };
        let Some(reply) = message.message.reply.clone() else {
            return;
        };
        let offset = sequence.saturating_sub(1);
        let key = message
            .message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(KEY_HEADER))
            .map(|value| decode_key(value.as_str()))
            .unwrap_or_default();
        let record = Record {
            topic: self.topic.clone(),
            partition: 0,
            offset,
            key,
            payload: message.message.payload.to_vec(),
            appended_at_micros: i64::try_from(published.unix_timestamp_nanos() / 1000).unwrap_or(0),
        };
        let mut held = lock(&self.held);
        held.insert(
            (self.index, offset),
            HeldMessage {
                reply,
                returned: false,
            },
        );
        let generation = self.generation.load(Ordering::SeqCst);
        self.buffered.fetch_add(1, Ordering::SeqCst);
        let _ = self.sender.send(Item {
            index: self.index,
            generation,
            record,
        });
    }

    /// Pulls for ever: one pull request of up to `fetch_batch` messages at
    /// a time, and only while fewer than that wait in the channel, so a
    /// member never takes much more than it can handle.
    async fn pump(self, mut consumer: PullConsumer) {
        let limit = self.inner.config.fetch_batch.max(1);
        loop {
            while self.buffered.load(Ordering::SeqCst) >= limit {
                self.drained.notified().await;
            }
            let batch = consumer
                .batch()
                .max_messages(limit)
                .expires(PULL_EXPIRES)
                .messages()
                .await;
            let mut failure = match batch {
                Err(error) => Some(error.to_string()),
                Ok(mut messages) => {
                    let mut failure = None;
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(message) => self.deliver(message),
                            Err(error) => {
                                failure = Some(error.to_string());
                                break;
                            }
                        }
                    }
                    failure
                }
            };
            if let Some(error) = failure.take() {
                tracing::debug!(topic = %self.topic, durable = %self.durable, %error, "NATS pull failed; binding again");
                tokio::time::sleep(RETRY_PAUSE).await;
                match self.bind(false).await {
                    Ok(bound) => consumer = bound,
                    Err(error) => {
                        tracing::warn!(topic = %self.topic, durable = %self.durable, %error, "NATS durable not bound")
                    }
                }
            }
        }
    }
}

impl NatsSubscription {
    pub(crate) fn new(inner: Arc<Inner>, group: &str, topics: Vec<String>) -> Self {
        let held: Held = Arc::default();
        let period = (inner.config.ack_wait / 3).max(Duration::from_millis(100));
        let keep_alive = tokio::spawn(keep_alive(inner.client.clone(), Arc::clone(&held), period));
        let (sender, receiver) = mpsc::unbounded_channel();
        let topics = topics
            .into_iter()
            .map(|name| Topic {
                stream: inner.stream_name(&name),
                name,
                generation: Arc::default(),
                buffered: Arc::default(),
                drained: Arc::default(),
                pump: None,
                idle: None,
                acked: None,
            })
            .collect();
        Self {
            durable: sanitise(group),
            inner,
            topics,
            announced: false,
            pulling: false,
            held,
            sender,
            receiver,
            keep_alive,
        }
    }

    fn context(&self, index: usize) -> PumpContext {
        let topic = &self.topics[index];
        PumpContext {
            inner: Arc::clone(&self.inner),
            durable: self.durable.clone(),
            index,
            topic: topic.name.clone(),
            stream: topic.stream.clone(),
            generation: Arc::clone(&topic.generation),
            buffered: Arc::clone(&topic.buffered),
            drained: Arc::clone(&topic.drained),
            held: Arc::clone(&self.held),
            sender: self.sender.clone(),
        }
    }

    fn start_pump(&mut self, index: usize, consumer: PullConsumer) {
        if !self.pulling {
            self.topics[index].idle = Some(consumer);
            return;
        }
        let context = self.context(index);
        if let Some(old) = self.topics[index]
            .pump
            .replace(tokio::spawn(context.pump(consumer)))
        {
            old.abort();
        }
    }

    /// Binds (creating if needed) the durable of every topic and starts
    /// pulling.
    pub(crate) async fn start(&mut self) -> Result<(), BusError> {
        for index in 0..self.topics.len() {
            let consumer = self.context(index).bind(true).await?;
            self.start_pump(index, consumer);
        }
        Ok(())
    }

    fn index_of(&self, partition: &TopicPartition) -> Result<usize, BusError> {
        self.topics
            .iter()
            .position(|topic| topic.name == partition.topic)
            .filter(|_| partition.partition == 0)
            .ok_or_else(|| {
                BusError::Invalid(
                    format!(
                        "partition {}/{} is not assigned to this member",
                        partition.topic, partition.partition
                    )
                    .into(),
                )
            })
    }

    /// Accepts one item from the channel, unless a seek made it stale.
    fn take(&self, item: Item, records: &mut Vec<Record>) {
        let topic = &self.topics[item.index];
        topic.buffered.fetch_sub(1, Ordering::SeqCst);
        topic.drained.notify_one();
        if item.generation != topic.generation.load(Ordering::SeqCst) {
            return;
        }
        if let Some(held) = lock(&self.held).get_mut(&(item.index, item.record.offset)) {
            held.returned = true;
        }
        records.push(item.record);
    }

    /// Deletes the durable and creates it again delivering from `first`.
    async fn recreate(&mut self, index: usize, first: u64) -> Result<(), BusError> {
        if let Some(pump) = self.topics[index].pump.take() {
            pump.abort();
            // Wait until it stopped, so it hands out nothing more.
            let _ = pump.await;
        }
        {
            // Messages of the old durable are neither acked nor kept alive,
            // and what of them is buffered is dropped.
            let mut held = lock(&self.held);
            held.retain(|(held_index, _), _| *held_index != index);
            self.topics[index].generation.fetch_add(1, Ordering::SeqCst);
        }
        self.topics[index].acked = None;
        let context = self.context(index);
        let stream = context.stream().await?;
        let policy = if first <= 1 {
            DeliverPolicy::All
        } else {
            DeliverPolicy::ByStartSequence {
                start_sequence: first,
            }
        };
        let mut last_error = String::new();
        for _attempt in 0..5 {
            if let Err(error) = stream.delete_consumer(&self.durable).await {
                tracing::debug!(%error, "durable delete (may be gone already)");
            }
            match context.create(&stream, policy).await {
                Ok(consumer) => {
                    tracing::info!(topic = %context.topic, durable = %self.durable, first_sequence = first, "durable recreated");
                    self.start_pump(index, consumer);
                    return Ok(());
                }
                Err(error) => {
                    // Another member bound it again first; accept it if it
                    // still has everything from `first`.
                    last_error = error.to_string();
                    if let Ok(info) = stream.consumer_info(&self.durable).await {
                        if !loses_from(&info, first) {
                            let consumer = context.bind(false).await?;
                            self.start_pump(index, consumer);
                            return Ok(());
                        }
                    }
                }
            }
        }
        Err(BusError::Engine(
            format!(
                "NATS durable {} on {} could not be recreated: {last_error}",
                self.durable, context.topic
            )
            .into(),
        ))
    }
}

/// Tells the server every `period` that held messages are being worked on.
async fn keep_alive(client: async_nats::Client, held: Held, period: Duration) {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let replies: Vec<Subject> = lock(&held)
            .values()
            .map(|held| held.reply.clone())
            .collect();
        for reply in replies {
            if client
                .publish(reply, AckKind::Progress.into())
                .await
                .is_err()
            {
                break;
            }
        }
    }
}

#[async_trait::async_trait]
impl Subscription for NatsSubscription {
    async fn next(
        &mut self,
        max_records: usize,
        max_wait: Duration,
    ) -> Result<Option<Delivery>, BusError> {
        if !self.announced {
            self.announced = true;
            let assigned = self
                .topics
                .iter()
                .map(|topic| TopicPartition::new(topic.name.clone(), 0))
                .collect();
            return Ok(Some(Delivery::Assigned(assigned)));
        }
        if !self.pulling {
            self.pulling = true;
            for index in 0..self.topics.len() {
                if let Some(consumer) = self.topics[index].idle.take() {
                    self.start_pump(index, consumer);
                }
            }
        }
        let max = max_records.max(1);
        let deadline = tokio::time::Instant::now() + max_wait;
        let mut records = Vec::new();
        while records.is_empty() {
            match tokio::time::timeout_at(deadline, self.receiver.recv()).await {
                Err(_) => {
                    if self.inner.client.connection_state()
                        != async_nats::connection::State::Connected
                    {
                        return Err(BusError::Unavailable(
                            format!(
                                "NATS at {} is disconnected (reconnecting)",
                                self.inner.config.display_url()
                            )
                            .into(),
                        ));
                    }
                    return Ok(None);
                }
                Ok(None) => return Err(BusError::Engine("NATS pumps stopped".into())),
                Ok(Some(item)) => self.take(item, &mut records),
            }
            while records.len() < max {
                match self.receiver.try_recv() {
                    Ok(item) => self.take(item, &mut records),
                    Err(_) => break,
                }
            }
        }
        // One partition per topic: sort by topic then offset, and keep one
        // copy of a message delivered twice (a redelivery racing the first).
        let order: BTreeMap<&str, usize> = self
            .topics
            .iter()
            .enumerate()
            .map(|(index, topic)| (topic.name.as_str(), index))
            .collect();
        records.sort_by_key(|record| (order.get(record.topic.as_str()).copied(), record.offset));
        records.dedup_by(|later, earlier| {
            later.topic == earlier.topic && later.offset == earlier.offset
        });
        Ok(Some(Delivery::Records(records)))
    }

    async fn seek(&mut self, partition: &TopicPartition, offset: u64) -> Result<(), BusError> {
        let index = self.index_of(partition)?;
        let first = offset + 1;
        // A position below the stream's first message: retention deleted
        // what this consumer has not read. Say so; a durable would simply
        // start at the first message still there.
        let start = self.inner.start_offset(&partition.topic).await?;
        if offset < start {
            return Err(BusError::pruned(&partition.topic, 0, offset, start));
        }
        let stream = self.context(index).stream().await?;
        // What this member acked itself counts even before the server's
        // consumer info shows it; what other members acked, once it does.
        let acked_here = self.topics[index]
            .acked
            .is_some_and(|acked| acked >= offset);
        let recreate = match stream.consumer_info(&self.durable).await {
            Ok(info) => acked_here || loses_from(&info, first),
            Err(error) if info_not_found(&error) => true,
            Err(error) => {
                return Err(self.inner.error(
                    &format!("durable {} on {}", self.durable, partition.topic),
                    error,
                ))
            }
        };
        if recreate {
            return self.recreate(index, first).await;
        }
        // Nothing wanted is lost. NAK, in offset order, what this member
        // handed out from `offset` on and everything still buffered, so
        // it all comes again at once; the buffered copies are dropped.
        let naks: Vec<Subject> = {
            let mut held = lock(&self.held);
            self.topics[index].generation.fetch_add(1, Ordering::SeqCst);
            let keys: Vec<(usize, u64)> = held
                .range((index, 0)..=(index, u64::MAX))
                .filter(|((_, held_offset), message)| !message.returned || *held_offset >= offset)
                .map(|(key, _)| *key)
                .collect();
            keys.iter()
                .filter_map(|key| held.remove(key))
                .map(|message| message.reply)
                .collect()
        };
        for reply in naks {
            self.inner
                .client
                .publish(reply, AckKind::Nak(None).into())
                .await
                .map_err(|error| self.inner.error("nak", error))?;
        }
        self.inner
            .client
            .flush()
            .await
            .map_err(|error| self.inner.error("flush", error))?;
        Ok(())
    }

    async fn ack(&mut self, records: &[Record]) -> Result<(), BusError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut replies: Vec<Subject> = Vec::with_capacity(records.len());
        {
            let mut held = lock(&self.held);
            for record in records {
                let Some(index) = self
                    .topics
                    .iter()
                    .position(|topic| topic.name == record.topic)
                else {
                    continue;
                };
                if let Some(message) = held.remove(&(index, record.offset)) {
                    replies.push(message.reply);
                    let acked = &mut self.topics[index].acked;
                    *acked = (*acked).max(Some(record.offset));
                }
            }
        }
        for reply in replies {
            if let Err(error) = self.inner.client.publish(reply, AckKind::Ack.into()).await {
                tracing::warn!(%error, "NATS ack not sent; the message will be redelivered and dropped as a duplicate");
                return Ok(());
            }
        }
        if let Err(error) = self.inner.client.flush().await {
            tracing::warn!(%error, "NATS acks not flushed; unacked messages will be redelivered");
        }
        Ok(())
    }
}

impl Drop for NatsSubscription {
    fn drop(&mut self) {
        self.keep_alive.abort();
        for topic in &mut self.topics {
            if let Some(pump) = topic.pump.take() {
                pump.abort();
            }
        }
        // Hand what this member held to the others at once. The pumps'
        // inboxes are unsubscribed by spawned tasks; wait a moment so the
        // server does not redeliver to a pull request nobody reads.
        let replies: Vec<Subject> = std::mem::take(&mut *lock(&self.held))
            .into_values()
            .map(|message| message.reply)
            .collect();
        if replies.is_empty() {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let client = self.inner.client.clone();
            handle.spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = client.flush().await;
                for reply in replies {
                    if client
                        .publish(reply, AckKind::Nak(None).into())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                let _ = client.flush().await;
            });
        }
    }
}
