//! Apache Kafka (and Kafka-compatible brokers) as Tandem's [`Bus`], on
//! rdkafka with its bundled librdkafka.
//!
//! ```no_run
//! # async fn example() -> Result<(), tandem::BusError> {
//! use tandem::bus::Bus;
//! let bus = tandem_kafka::KafkaBus::connect("kafka://127.0.0.1:19092?partitions=4").await?;
//! let ends = bus.end_offsets("order").await?;
//! # Ok(()) }
//! ```
//!
//! # What each guarantee rests on
//!
//! - **Nothing lost on publish.** The producer is idempotent
//!   (`enable.idempotence=true`, `acks=all`): [`Bus::publish`] enqueues the
//!   whole batch, then awaits every delivery report, and returns `Ok` only
//!   when the broker acknowledged every record (written to all in-sync
//!   replicas). Any failure, including a broker that stays away past
//!   `message.timeout.ms` (10 s by default here), is
//!   [`BusError::Unavailable`]: the relay keeps its cursor and publishes the
//!   batch again, and consumers drop the duplicates that may result.
//! - **Per-aggregate order.** The record key is the aggregate id and Kafka's
//!   default partitioner (`murmur2_random`, as the Java client) picks the
//!   partition from it, so one aggregate's events share a partition; the
//!   idempotent producer keeps their order within it across retries.
//! - **Dense offsets.** Kafka offsets are dense per partition as long as no
//!   transactional producer writes to the topic (control records take
//!   offsets) and the topic is not compacted; Tandem writes neither.
//! - **Positions outside Kafka.** Each subscription is a member of the
//!   consumer group named by the subscriber (`group.id`), with
//!   `enable.auto.commit=false`: Kafka's committed offsets are never read
//!   back. Assignment changes come out as [`Delivery::Assigned`](tandem::bus::Delivery::Assigned) and
//!   [`Delivery::Revoked`](tandem::bus::Delivery::Revoked) from the rebalance callback; a newly assigned
//!   partition is paused and delivers nothing until the subscriber sought it
//!   to the position in its own database (records fetched before, or below
//!   the position sought, are dropped). Revocation happens inside
//!   [`Subscription::next`], which a consumer calls only after its previous
//!   batch committed, so no batch is in flight for a revoked partition, and
//!   buffered records of revoked partitions are dropped. Duplicates after a
//!   rebalance (a member that stalled past `max.poll.interval.ms`) are
//!   absorbed by the consumer's per-aggregate sequences.
//! - **Topics.** Created on first use (publish, subscribe, end offsets) with
//!   the admin client, with the URL's `partitions` and `replication`; an
//!   existing topic is left as it is.
//!
//! # URL
//!
//! `kafka://host:port[,host:port]?partitions=4&replication=1&publish_depth=1&<librdkafka
//! property>=<value>...`; see [`KafkaConfig`]. Every other option is a
//! librdkafka property (`security.protocol=SASL_SSL`,
//! `sasl.mechanism=SCRAM-SHA-512`, `ssl.ca.location=...`), and so is every
//! `TANDEM_KAFKA_<PROPERTY>` environment variable (`TANDEM_KAFKA_SASL_PASSWORD`
//! is `sasl.password`), so secrets need not be in URLs. Use `127.0.0.1`
//! rather than `localhost` for a broker listening on IPv4 only: librdkafka
//! may try `::1` first.
//!
//! # CloudEvents
//!
//! A payload that decodes as a Tandem [`Envelope`] is sent in the
//! CloudEvents Kafka binding's structured mode: the value is the whole JSON
//! envelope, with headers `content-type: application/cloudevents+json` and
//! `ce_specversion`, `ce_id`, `ce_source`, `ce_type`, `ce_subject`,
//! `ce_time` for brokers' tooling to route and inspect without parsing.
//!
//! # tansu (the development broker)
//!
//! Tested against tansu 0.6 with its SQLite storage engine
//! (`--storage-engine sqlite:///abs/path/tansu.db`, which survives a broker
//! restart). Known limits there: DeleteTopics deletes every topic of the
//! cluster; an idempotent producer's epoch bump is unimplemented (this bus
//! replaces its producer after a failed publish instead); concurrent
//! CreateTopics of one topic corrupt its state (this bus creates topics one
//! request at a time); and its latency grows with the size of its database,
//! so use a fresh file per test session. The `memory://` engine reports
//! wrong high-water marks and fails the conformance suite. Unpatched, a
//! group whose leader is killed (no LeaveGroup) never rebalances its
//! partitions to the survivors; `scripts/engines` builds tansu with
//! `scripts/tansu-group-expiry.patch`, which fixes that, and with
//! `scripts/tansu-storage-header-index.patch`, an index without which each
//! fetched record scans every header stored.

#![warn(missing_docs)]

mod config;
mod subscription;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, ClientContext};
use tandem::bus::{Bus, BusError, OutgoingRecord, Subscription};
use tandem::Envelope;

pub use config::{redact, KafkaConfig, DEFAULT_PUBLISH_DEPTH};
pub use subscription::KafkaSubscription;

/// The `content-type` of a structured-mode CloudEvent.
pub const CLOUDEVENTS_CONTENT_TYPE: &str = "application/cloudevents+json";

/// How long metadata and watermark requests may take once connected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The Kafka engine of the [`Bus`] port; see the crate docs.
pub struct KafkaBus {
    config: KafkaConfig,
    /// The producer, and how many times it was replaced.
    producer: RwLock<(u64, FutureProducer<LogContext>)>,
    /// One more than the generation of a producer whose delivery failed
    /// (0: none), replaced at the next [`Bus::enqueue`].
    failed_producer: Arc<std::sync::atomic::AtomicU64>,
    /// Whether a flush of the producer is running (see `queue_records`).
    flushing: Arc<std::sync::atomic::AtomicBool>,
    producer_config: ClientConfig,
    admin: AdminClient<LogContext>,
    /// Topics known to exist (created by this bus or found).
    topics: Mutex<BTreeSet<String>>,
    /// Topics this bus created.
    created: CreatedTopics,
    /// Held while creating topics: one CreateTopics request at a time
    /// from this bus (tansu 0.6's SQLite engine corrupts its state when
    /// two requests create the same topic at once).
    creating: tokio::sync::Mutex<()>,
}

/// The names of the topics a [`KafkaBus`] created (not those that already
/// existed), shared with the bus: for removing scratch topics after tests.
#[derive(Debug, Clone, Default)]
pub struct CreatedTopics(Arc<Mutex<BTreeSet<String>>>);

impl CreatedTopics {
    /// The topics created so far.
    pub fn names(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// Routes librdkafka's log lines and errors to `tracing`.
pub struct LogContext;

impl rdkafka::consumer::ConsumerContext for LogContext {}

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_to_tracing(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error");
    }
}

pub(crate) fn log_to_tracing(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", fac, "{message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
    }
}

pub(crate) fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_micros() as i64)
}

/// Kafka's rule for topic names.
fn check_topic(topic: &str) -> Result<(), BusError> {
    if topic.is_empty() {
        return Err(BusError::Invalid("topic must not be empty".into()));
    }
    if topic.len() > 249
        || topic == "."
        || topic == ".."
        || !topic
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
    {
        return Err(BusError::Invalid(
            format!(
                "{topic:?} is not a Kafka topic name (letters, digits, '.', '_', '-'; at most 249)"
            )
            .into(),
        ));
    }
    Ok(())
}

/// The CloudEvents Kafka binding's headers for a payload that is a Tandem
/// envelope; `None` for any other payload.
pub fn cloudevents_headers(payload: &[u8]) -> Option<OwnedHeaders> {
    let envelope = Envelope::decode(payload).ok()?;
    let id = envelope.id.to_string();
    let time = tandem::envelope::format_time(envelope.time);
    let pairs: [(&str, &str); 7] = [
        ("content-type", CLOUDEVENTS_CONTENT_TYPE),
        ("ce_specversion", tandem::envelope::SPEC_VERSION),
        ("ce_id", &id),
        ("ce_source", &envelope.source),
        ("ce_type", &envelope.event_type),
        ("ce_subject", &envelope.subject),
        ("ce_time", &time),
    ];
    let mut headers = OwnedHeaders::new_with_capacity(pairs.len());
    for (key, value) in pairs {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    Some(headers)
}

/// The Kafka error stays the source.
fn unavailable(
    what: &str,
    brokers: &str,
    error: impl std::error::Error + Send + Sync + 'static,
) -> BusError {
    BusError::Unavailable(tandem::Cause::with_source(
        format!("{what} (Kafka brokers {brokers}): {error}"),
        error,
    ))
}

impl KafkaBus {
    /// Connects to the brokers a `kafka://` URL names (see [`KafkaConfig`]),
    /// failing within the connect timeout (8 s by default) with an error
    /// naming the broker list if none answers.
    pub async fn connect(url: &str) -> Result<KafkaBus, BusError> {
        Self::connect_with(KafkaConfig::from_url(url)?).await
    }

    /// [`connect`](Self::connect) with settings already parsed.
    pub async fn connect_with(config: KafkaConfig) -> Result<KafkaBus, BusError> {
        let mut producer_config = base_config(&config);
        producer_config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "10000")
            .set("partitioner", "murmur2_random")
            // librdkafka's own default. The relay hands over a whole batch
            // at once and then flushes (`queue_records`), so the linger only
            // holds records of other senders; at 2 ms without the flush the
            // first partitions' requests left before the batch was queued,
            // and the pipeline on tansu ran 8 % slower. `?linger.ms=`
            // overrides it.
            .set("linger.ms", "5");
        apply_properties(&mut producer_config, &config);
        let producer: FutureProducer<LogContext> = producer_config
            .create_with_context(LogContext)
            .map_err(|error| {
                BusError::Invalid(format!("kafka producer configuration: {error}").into())
            })?;
        let mut admin_config = base_config(&config);
        apply_properties(&mut admin_config, &config);
        let admin: AdminClient<LogContext> =
            admin_config
                .create_with_context(LogContext)
                .map_err(|error| {
                    BusError::Invalid(format!("kafka admin configuration: {error}").into())
                })?;

        // Fail now, naming the brokers, rather than at the first publish.
        let probe = producer.clone();
        let timeout = config.connect_timeout;
        let metadata = tokio::task::spawn_blocking(move || {
            probe
                .client()
                .fetch_metadata(None, timeout)
                .map(|metadata| metadata.brokers().len())
        })
        .await
        .map_err(|error| BusError::Engine(format!("kafka metadata thread: {error}").into()))?;
        match metadata {
            Ok(brokers) if brokers > 0 => {}
            Ok(_) => {
                return Err(BusError::Unavailable(
                    format!(
                        "Kafka brokers {} answered with no broker in the cluster",
                        config.brokers
                    )
                    .into(),
                ))
            }
            Err(error) => {
                return Err(BusError::Unavailable(
                    format!(
                        "Kafka brokers {} not reachable within {:?}: {error}",
                        config.brokers, config.connect_timeout
                    )
                    .into(),
                ))
            }
        }
        Ok(KafkaBus {
            config,
            producer: RwLock::new((0, producer)),
            failed_producer: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            flushing: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            producer_config,
            admin,
            topics: Mutex::new(BTreeSet::new()),
            created: CreatedTopics::default(),
            creating: tokio::sync::Mutex::new(()),
        })
    }

    /// The topics this bus created, as a handle that stays valid.
    pub fn created_topics(&self) -> CreatedTopics {
        self.created.clone()
    }

    fn producer(&self) -> (u64, FutureProducer<LogContext>) {
        self.producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces producer `generation` after a failed publish. An
    /// idempotent producer whose messages timed out goes on to bump its
    /// epoch or may be fenced for good (librdkafka's fatal errors); a new
    /// one starts clean, and the relay publishes the batch again anyway.
    /// Brokers without epoch bumps (tansu 0.6) are spared them too.
    fn renew_producer(&self, generation: u64) {
        let Ok(fresh) = self
            .producer_config
            .create_with_context::<_, FutureProducer<LogContext>>(LogContext)
        else {
            return;
        };
        let old = {
            let mut current = self.producer.write().unwrap_or_else(|p| p.into_inner());
            if current.0 != generation {
                return;
            }
            std::mem::replace(&mut *current, (generation + 1, fresh))
        };
        tracing::info!(brokers = %self.config.brokers, "kafka producer replaced after a failed publish");
        // Dropping purges and flushes for up to 500 ms: not on this thread.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(move || drop(old));
            }
            Err(_) => drop(old),
        }
    }

    /// The settings this bus runs with.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// Creates the topics that this bus has not seen yet, with the
    /// configured partitions and replication; existing topics are fine.
    pub async fn ensure_topics(&self, topics: &[&str]) -> Result<(), BusError> {
        if self.missing_topics(topics).is_empty() {
            return Ok(());
        }
        let _creating = self.creating.lock().await;
        // Another task may have created them while this one waited.
        let missing = self.missing_topics(topics);
        if missing.is_empty() {
            return Ok(());
        }
        for topic in &missing {
            check_topic(topic)?;
        }
        let retention_ms = self
            .config
            .retain_log
            .map_or_else(|| "-1".to_owned(), |age| age.as_millis().max(1).to_string());
        let retention_bytes = self.config.retain_log_bytes.map(|bytes| bytes.to_string());
        let new_topics: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|topic| {
                NewTopic::new(
                    topic,
                    self.config.partitions,
                    TopicReplication::Fixed(self.config.replication),
                )
                // Record timestamps say when the broker appended them.
                .set("message.timestamp.type", "LogAppendTime")
                // Retention by age (and size, if set): README, Retention.
                .set("cleanup.policy", "delete")
                .set("retention.ms", &retention_ms)
            })
            .map(|topic| match &retention_bytes {
                Some(bytes) => topic.set("retention.bytes", bytes),
                None => topic,
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
        let results = self
            .admin
            .create_topics(&new_topics, &options)
            .await
            .map_err(|error| unavailable("creating topics", &self.config.brokers, error))?;
        let mut created = Vec::new();
        for result in results {
            match result {
                Ok(topic) => {
                    self.created
                        .0
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(topic.clone());
                    created.push(topic)
                }
                Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => created.push(topic),
                Err((topic, code)) => {
                    return Err(unavailable(
                        &format!("creating topic {topic}"),
                        &self.config.brokers,
                        code,
                    ))
                }
            }
        }
        self.topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(created);
        Ok(())
    }

    fn missing_topics<'a>(&self, topics: &[&'a str]) -> Vec<&'a str> {
        let known = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let mut missing: Vec<&str> = topics
            .iter()
            .copied()
            .filter(|topic| !known.contains(*topic))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        missing
    }

    /// Deletes topics (for tests and scratch namespaces on real Kafka).
    ///
    /// Never against tansu 0.6 with a SQL storage engine: there one
    /// DeleteTopics request deletes every topic of the cluster and leaves
    /// the broker failing every request until it is restarted.
    pub async fn delete_topics(&self, topics: &[&str]) -> Result<(), BusError> {
        let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
        let results = self
            .admin
            .delete_topics(topics, &options)
            .await
            .map_err(|error| unavailable("deleting topics", &self.config.brokers, error))?;
        let mut known = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        for result in results {
            match result {
                Ok(topic) => {
                    known.remove(&topic);
                }
                Err((topic, code)) => {
                    return Err(BusError::Engine(
                        format!("deleting topic {topic}: {code}").into(),
                    ))
                }
            }
        }
        Ok(())
    }

    /// The partition numbers of `topic` as the cluster's metadata lists them.
    async fn partitions(&self, topic: &str) -> Result<Vec<i32>, BusError> {
        let (_, producer) = self.producer();
        let name = topic.to_owned();
        let brokers = self.config.brokers.clone();
        let give_up = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            let producer = producer.clone();
            let name = name.clone();
            let listed = tokio::task::spawn_blocking(move || {
                let metadata = producer
                    .client()
                    .fetch_metadata(Some(&name), REQUEST_TIMEOUT)?;
                Ok::<_, KafkaError>(
                    metadata
                        .topics()
                        .iter()
                        .filter(|found| found.name() == name && found.error().is_none())
                        .flat_map(|found| found.partitions().iter().map(|p| p.id()))
                        .collect::<Vec<i32>>(),
                )
            })
            .await
            .map_err(|error| BusError::Engine(format!("kafka metadata thread: {error}").into()))?
            .map_err(|error| unavailable(&format!("metadata of {topic}"), &brokers, error))?;
            if !listed.is_empty() {
                let mut listed = listed;
                listed.sort_unstable();
                return Ok(listed);
            }
            // Just created: the metadata may lag behind for a moment.
            if tokio::time::Instant::now() >= give_up {
                return Err(BusError::Unavailable(
                    format!(
                    "topic {topic} has no partitions in the metadata of Kafka brokers {brokers}"
                )
                    .into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Each partition's low or high watermark.
    async fn watermarks(&self, topic: &str, which: Watermark) -> Result<Vec<(u32, u64)>, BusError> {
        check_topic(topic)?;
        self.ensure_topics(&[topic]).await?;
        let partitions = self.partitions(topic).await?;
        let (_, producer) = self.producer();
        let name = topic.to_owned();
        let brokers = self.config.brokers.clone();
        tokio::task::spawn_blocking(move || {
            partitions
                .into_iter()
                .map(|partition| {
                    let (low, high) = producer
                        .client()
                        .fetch_watermarks(&name, partition, REQUEST_TIMEOUT)
                        .map_err(|error| {
                            unavailable(
                                &format!("watermarks of {name}/{partition}"),
                                &brokers,
                                error,
                            )
                        })?;
                    let mark = match which {
                        Watermark::Low => low,
                        Watermark::High => high,
                    };
                    Ok((partition as u32, mark.max(0) as u64))
                })
                .collect()
        })
        .await
        .map_err(|error| BusError::Engine(format!("kafka watermark thread: {error}").into()))?
    }

    fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut config = base_config(&self.config);
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Positions are the consumer's own and every partition is
            // sought before it is read. A position below the log's start
            // is refused at the seek, and should librdkafka reset one that
            // retention overtook later, the hole in the offsets is seen
            // (`State::accept`): never a silent jump. (`error` instead
            // puts a partition of a group with no committed offsets in an
            // error state before the first seek.)
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "100")
            // Small fetches: a consumer handles at most a batch at a time,
            // and some Kafka-compatible brokers (tansu 0.6) read a fetch's
            // whole byte budget from storage while every other request
            // waits for them.
            .set("fetch.max.bytes", "1048576")
            .set("queued.max.messages.kbytes", "4096");
        apply_properties(&mut config, &self.config);
        config
    }
}

#[derive(Clone, Copy)]
enum Watermark {
    Low,
    High,
}

fn base_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("client.id", "tandem");
    // librdkafka's lines go to `tracing`: ask for what it would keep.
    let level = if tracing::enabled!(target: "librdkafka", tracing::Level::DEBUG) {
        RDKafkaLogLevel::Debug
    } else if tracing::enabled!(target: "librdkafka", tracing::Level::INFO) {
        RDKafkaLogLevel::Info
    } else {
        RDKafkaLogLevel::Warning
    };
    client.set_log_level(level);
    client
}

fn apply_properties(client: &mut ClientConfig, config: &KafkaConfig) {
    for (name, value) in &config.properties {
        client.set(name, value);
    }
}

fn delivery_error(error: &KafkaError, brokers: &str) -> BusError {
    match error.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::InvalidMessage,
        ) => {
            BusError::Invalid(format!("publish refused by Kafka brokers {brokers}: {error}").into())
        }
        _ => unavailable("publish", brokers, error.clone()),
    }
}

/// Queues every record on the producer, in order; on a failure, awaits
/// what was queued before reporting it.
async fn queue_records(
    producer: &FutureProducer<LogContext>,
    records: &[OutgoingRecord],
    brokers: &str,
    flushing: &Arc<std::sync::atomic::AtomicBool>,
) -> Result<Vec<DeliveryFuture>, BusError> {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut deliveries = Vec::with_capacity(records.len());
    for record in records {
        let mut outgoing = FutureRecord::to(&record.topic)
            .key(record.key.as_bytes())
            .payload(record.payload.as_slice());
        if let Some(headers) = cloudevents_headers(&record.payload) {
            outgoing = outgoing.headers(headers);
        }
        loop {
            match producer.send_result(outgoing) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if tokio::time::Instant::now() < give_up =>
                {
                    // The local queue is full: let deliveries drain.
                    outgoing = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((error, _)) => {
                    for delivery in deliveries {
                        let _ = delivery.await;
                    }
                    return Err(delivery_error(&error, brokers));
                }
            }
        }
    }
    // The whole batch is queued: send it now instead of after linger.ms
    // (while a flush runs, librdkafka treats the linger as over). A flush
    // blocks until every delivery is settled, so it runs on a blocking
    // thread, left to finish on its own: the delivery reports are what
    // count. One flush at a time: what is queued while it runs is sent
    // at once too.
    if !flushing.swap(true, std::sync::atomic::Ordering::SeqCst) {
        let (producer, flushing) = (producer.clone(), Arc::clone(flushing));
        drop(tokio::task::spawn_blocking(move || {
            let _ = producer.flush(Duration::from_secs(30));
            flushing.store(false, std::sync::atomic::Ordering::SeqCst);
        }));
    }
    Ok(deliveries)
}

/// Awaits every delivery report; the first failure, if any.
async fn settle(deliveries: Vec<DeliveryFuture>, brokers: &str) -> Result<(), BusError> {
    let mut failure = None;
    for delivery in deliveries {
        let result = match delivery.await {
            Ok(Ok(_)) => continue,
            Ok(Err((error, _))) => delivery_error(&error, brokers),
            Err(_) => BusError::Unavailable("kafka producer dropped a delivery".into()),
        };
        failure.get_or_insert(result);
    }
    match failure {
        None => Ok(()),
        Some(error) => Err(error),
    }
}

#[async_trait::async_trait]
impl Bus for KafkaBus {
    async fn publish(&self, records: &[OutgoingRecord]) -> Result<(), BusError> {
        self.enqueue(records.to_vec()).await?.await
    }

    /// Queues the records on the producer (creating missing topics first)
    /// and returns their delivery reports to await: librdkafka keeps each
    /// partition's queue in call order and the idempotent producer keeps
    /// it on the broker. After a failed delivery the producer is replaced
    /// at the next call (see `renew_producer`).
    async fn enqueue(
        &self,
        records: Vec<OutgoingRecord>,
    ) -> Result<tandem::bus::Acknowledgements, BusError> {
        if records.is_empty() {
            return Ok(Box::pin(std::future::ready(Ok(()))));
        }
        for record in &records {
            check_topic(&record.topic)?;
        }
        let topics: Vec<&str> = records.iter().map(|record| record.topic.as_str()).collect();
        self.ensure_topics(&topics).await?;
        let failed = self
            .failed_producer
            .swap(0, std::sync::atomic::Ordering::SeqCst);
        if failed > 0 {
            self.renew_producer(failed - 1);
        }
        let (generation, producer) = self.producer();
        let brokers = self.config.brokers.clone();
        let deliveries = match queue_records(&producer, &records, &brokers, &self.flushing).await {
            Ok(deliveries) => deliveries,
            Err(error) => {
                if let BusError::Unavailable(_) = &error {
                    self.renew_producer(generation);
                }
                return Err(error);
            }
        };
        let failed = Arc::clone(&self.failed_producer);
        Ok(Box::pin(async move {
            let settled = settle(deliveries, &brokers).await;
            if let Err(BusError::Unavailable(_)) = &settled {
                failed.store(generation + 1, std::sync::atomic::Ordering::SeqCst);
            }
            settled
        }))
    }

    /// The URL's `publish_depth` (default 1, see
    /// [`DEFAULT_PUBLISH_DEPTH`]): librdkafka appends the
    /// records of overlapping calls to each partition's queue in call
    /// order, and the idempotent producer keeps that order on the broker.
    fn publish_depth(&self) -> usize {
        self.config.publish_depth
    }

    async fn subscribe(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<Box<dyn Subscription>, BusError> {
        if group.is_empty() {
            return Err(BusError::Invalid("group must not be empty".into()));
        }
        if topics.is_empty() {
            return Err(BusError::Invalid(
                format!("group {group} names no topic").into(),
            ));
        }
        for topic in topics {
            check_topic(topic)?;
        }
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        self.ensure_topics(&names).await?;
        // The group's assignment covers only partitions in the metadata:
        // wait until every topic lists its partitions.
        for topic in topics {
            self.partitions(topic).await?;
        }
        let subscription = KafkaSubscription::new(self.consumer_config(group), group, topics)?;
        Ok(Box::new(subscription))
    }

    async fn end_offsets(&self, topic: &str) -> Result<Vec<(u32, u64)>, BusError> {
        self.watermarks(topic, Watermark::High).await
    }

    /// The low watermarks: the first offset each partition still holds.
    async fn start_offsets(&self, topic: &str) -> Result<Vec<(u32, u64)>, BusError> {
        self.watermarks(topic, Watermark::Low).await
    }

    /// A consumer of no group's offsets (it never subscribes or commits)
    /// assigned to the one offset, polled until the record comes; `None`
    /// without a fetch when the offset lies outside the watermarks.
    async fn payload_at(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<Option<Vec<u8>>, BusError> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::Message;
        check_topic(topic)?;
        let config = self.consumer_config("tandem-payload-at");
        let brokers = self.config.brokers.clone();
        let name = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let what = format!("record {offset} of {name}/{partition}");
            let consumer: BaseConsumer<LogContext> = config
                .create_with_context(LogContext)
                .map_err(|error| unavailable(&what, &brokers, error))?;
            let (low, high) = consumer
                .fetch_watermarks(&name, partition as i32, REQUEST_TIMEOUT)
                .map_err(|error| unavailable(&what, &brokers, error))?;
            let wanted = i64::try_from(offset).unwrap_or(i64::MAX);
            if wanted < low || wanted >= high {
                return Ok(None);
            }
            let mut assignment = rdkafka::TopicPartitionList::new();
            assignment
                .add_partition_offset(&name, partition as i32, rdkafka::Offset::Offset(wanted))
                .map_err(|error| BusError::Engine(format!("{what}: {error}").into()))?;
            consumer
                .assign(&assignment)
                .map_err(|error| unavailable(&what, &brokers, error))?;
            let give_up = std::time::Instant::now() + REQUEST_TIMEOUT;
            while std::time::Instant::now() < give_up {
                match consumer.poll(Duration::from_millis(200)) {
                    Some(Ok(message)) if message.offset() == wanted => {
                        return Ok(Some(message.payload().unwrap_or_default().to_vec()))
                    }
                    Some(Ok(_)) | None => {}
                    Some(Err(error)) => return Err(unavailable(&what, &brokers, error)),
                }
            }
            Err(BusError::Unavailable(
                format!(
                    "{what}: not fetched from Kafka brokers {brokers} within {REQUEST_TIMEOUT:?}"
                )
                .into(),
            ))
        })
        .await
        .map_err(|error| BusError::Engine(format!("payload task failed: {error}").into()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        assert!(check_topic("order").is_ok());
        assert!(check_topic("a.b_c-D9").is_ok());
        for bad in ["", ".", "..", "a b", "a/b", "é", &"x".repeat(250)] {
            assert!(
                matches!(check_topic(bad), Err(BusError::Invalid(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn non_envelopes_get_no_headers() {
        assert!(cloudevents_headers(b"plain bytes").is_none());
        assert!(cloudevents_headers(b"{}").is_none());
    }
}
