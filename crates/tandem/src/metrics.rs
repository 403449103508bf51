//! The process's metrics, with the names, types and labels of
//! `OPERATIONS.md` (OpenTelemetry messaging names where one exists, the
//! `tandem_` prefix for Tandem's own), kept in one registry of the
//! `prometheus-client` crate and encoded by it, in the Prometheus text
//! format or OpenMetrics.
//!
//! The toolkit's parts record into [`metrics()`], one registry per process,
//! as the Prometheus clients of other languages do with their default
//! registry: a relay, a consumer and the HTTP server of one service share
//! it, and `tandem_service` serves it at `/metrics`. Labels are bounded
//! sets (consumer, topic, partition, outcome, error type, route): never an
//! event, aggregate or order id.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::encode_prometheus`].
pub const PROMETHEUS_CONTENT_TYPE: &str =
    prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// The content type of [`Metrics::encode_openmetrics`].
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Buckets of durations that resolve single milliseconds up to 10 ms, and
/// reach five minutes (seconds).
const LATENCY_BUCKETS: [f64; 24] = [
    0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Makes histograms with the toolkit's latency buckets (`LATENCY_BUCKETS`:
/// single milliseconds resolved up to 10 ms, and on to five minutes).
#[derive(Debug, Clone, Copy)]
pub struct Buckets;

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(LATENCY_BUCKETS)
    }
}

/// The labels of [`Metrics::sent_messages`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    /// The topic published to.
    pub messaging_destination_name: String,
}

/// The labels of [`Metrics::publish_failures`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicErrorLabels {
    /// The topic of the refused batch.
    pub topic: String,
    /// The bus error's kind ([`crate::BusError::kind`]).
    pub error_type: String,
}

/// A bus call, as OpenTelemetry's messaging conventions name it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Operation {
    /// A relay's publish of one batch.
    send,
    /// A consumer's fetch that returned records.
    receive,
}

/// The labels of [`Metrics::operation_duration`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// Which bus call.
    pub messaging_operation_name: Operation,
}

/// The label of a metric kept per consumer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    /// The consumer's name.
    pub consumer: String,
}

/// The labels of a metric kept per consumer and topic.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerTopicLabels {
    /// The consumer's name.
    pub consumer: String,
    /// A topic it reads.
    pub topic: String,
}

/// What became of an event a consumer received.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// Applied to the read model.
    applied,
    /// Dropped: its sequence was applied already.
    duplicate,
    /// Held ahead of a gap in its aggregate's sequence.
    held,
    /// Failed and tried again.
    retried,
    /// Parked as a dead letter (failed, undecodable, or behind a parked
    /// event of its aggregate).
    parked,
}

/// The labels of [`Metrics::consumer_events`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerOutcomeLabels {
    /// The consumer's name.
    pub consumer: String,
    /// What became of the events.
    pub outcome: Outcome,
}

/// The label of an outbox's metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    /// The outbox's topic.
    pub topic: String,
}

/// The labels of [`Metrics::consumer_lag_events`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerPartitionLabels {
    /// The consumer's name.
    pub consumer: String,
    /// The topic.
    pub topic: String,
    /// The partition of the topic.
    pub partition: u32,
}

/// The labels of [`Metrics::dead_letters`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerErrorLabels {
    /// The consumer's name.
    pub consumer: String,
    /// Why the letters were parked ([`crate::dead_letter::Reason::as_str`]).
    pub error_type: String,
}

/// A gauge of seconds.
pub type Seconds = Gauge<f64, AtomicU64>;

/// The label of [`Metrics::store_commit_duration`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    /// The database: a SQLite file's stem, a PostgreSQL database's name.
    pub store: String,
}

/// The labels of [`Metrics::http_duration`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The route's template (`/orders/{id}`), never the path itself.
    pub http_route: String,
    /// The request's method, such as `GET`.
    pub http_request_method: String,
    /// The status code answered.
    pub http_response_status_code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

/// Every metric the toolkit records.
pub struct Metrics {
    registry: Registry,
    /// `messaging_client_sent_messages`: events the relay published and
    /// the bus acknowledged.
    pub sent_messages: Family<DestinationLabels, Counter>,
    /// `tandem_relay_publish_failures`: relay batches the bus refused
    /// (each is retried).
    pub publish_failures: Family<TopicErrorLabels, Counter>,
    /// `messaging_client_operation_duration_seconds`: bus calls, a relay
    /// batch's publish and a consumer's fetch that returned records.
    pub operation_duration: Family<OperationLabels, Histogram, Buckets>,
    /// `tandem_consumer_end_to_end_seconds`: from an event's `time` to the
    /// commit of its effect.
    pub end_to_end: Family<ConsumerTopicLabels, Histogram, Buckets>,
    /// `messaging_process_duration_seconds`: a consumer batch's apply and
    /// commit.
    pub process_duration: Family<ConsumerLabels, Histogram, Buckets>,
    /// `tandem_consumer_events`: events a consumer received, by what
    /// became of them.
    pub consumer_events: Family<ConsumerOutcomeLabels, Counter>,
    /// `tandem_store_commit_duration_seconds`: one commit of a store's
    /// writer (a group of write jobs).
    pub store_commit_duration: Family<StoreLabels, Histogram, Buckets>,
    /// `http_server_request_duration_seconds`: HTTP requests served.
    pub http_duration: Family<HttpLabels, Histogram, Buckets>,
    /// `tandem_outbox_pending_events`: events committed to the outbox and
    /// not yet acknowledged by the bus.
    pub outbox_pending: Family<TopicLabels, Gauge>,
    /// `tandem_outbox_oldest_pending_age_seconds`: the age of the oldest
    /// of those; 0 when there is none.
    pub outbox_oldest_age: Family<TopicLabels, Seconds>,
    /// `tandem_consumer_lag_events`: records on the bus a consumer has not
    /// applied, per partition (the head offset less its stored position).
    pub consumer_lag_events: Family<ConsumerPartitionLabels, Gauge>,
    /// `tandem_consumer_lag_seconds`: the age of the oldest event of a
    /// topic a consumer has not applied; 0 when it has caught up.
    pub consumer_lag_seconds: Family<ConsumerTopicLabels, Seconds>,
    /// `tandem_consumer_gaps_open`: aggregates waiting for a missing
    /// sequence.
    pub gaps_open: Family<ConsumerLabels, Gauge>,
    /// `tandem_dead_letters`: parked dead letters, by reason.
    pub dead_letters: Family<ConsumerErrorLabels, Gauge>,
    /// `tandem_dead_letter_oldest_age_seconds`: the age of the oldest
    /// parked dead letter; 0 when there is none.
    pub dead_letter_oldest_age: Family<ConsumerLabels, Seconds>,
    /// `tandem_rebuild_events_applied`: records the new version of a read
    /// model has consumed in its side-by-side rebuild; 0 when none is
    /// under way.
    pub rebuild_applied: Family<ConsumerLabels, Gauge>,
    /// `tandem_rebuild_events_remaining`: records the new version has yet
    /// to consume before it can switch; 0 when no rebuild is under way.
    pub rebuild_to_go: Family<ConsumerLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether the toolkit records metrics (on unless switched off).
pub fn enabled() -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Switches recording on or off for the whole process: for measuring what
/// the instruments cost (`tandem-lab bench pipeline --metrics off`).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let sent_messages = Family::default();
        registry.register(
            "messaging_client_sent_messages",
            "Events the relay published, acknowledged by the bus",
            sent_messages.clone(),
        );
        let publish_failures = Family::default();
        registry.register(
            "tandem_relay_publish_failures",
            "Relay batches the bus refused (retried)",
            publish_failures.clone(),
        );
        let operation_duration = Family::new_with_constructor(Buckets);
        registry.register(
            "messaging_client_operation_duration_seconds",
            "Bus calls: a relay batch's publish (send), a consumer's fetch that returned events (receive)",
            operation_duration.clone(),
        );
        let end_to_end = Family::new_with_constructor(Buckets);
        registry.register(
            "tandem_consumer_end_to_end_seconds",
            "From an event's time to the commit of its effect",
            end_to_end.clone(),
        );
        let process_duration = Family::new_with_constructor(Buckets);
        registry.register(
            "messaging_process_duration_seconds",
            "A consumer batch's apply and commit",
            process_duration.clone(),
        );
        let consumer_events = Family::default();
        registry.register(
            "tandem_consumer_events",
            "Events a consumer received, by what became of them",
            consumer_events.clone(),
        );
        let store_commit_duration = Family::new_with_constructor(Buckets);
        registry.register(
            "tandem_store_commit_duration_seconds",
            "One commit of a store's writer (a group of write jobs)",
            store_commit_duration.clone(),
        );
        let http_duration = Family::new_with_constructor(Buckets);
        registry.register(
            "http_server_request_duration_seconds",
            "HTTP requests served, by route template, method and status",
            http_duration.clone(),
        );
        let outbox_pending = Family::default();
        registry.register(
            "tandem_outbox_pending_events",
            "Events committed to the outbox, not yet acknowledged by the bus",
            outbox_pending.clone(),
        );
        let outbox_oldest_age = Family::default();
        registry.register(
            "tandem_outbox_oldest_pending_age_seconds",
            "Age of the oldest event not yet acknowledged by the bus; 0 when none",
            outbox_oldest_age.clone(),
        );
        let consumer_lag_events = Family::default();
        registry.register(
            "tandem_consumer_lag_events",
            "Records on the bus a consumer has not applied: head offset - stored position",
            consumer_lag_events.clone(),
        );
        let consumer_lag_seconds = Family::default();
        registry.register(
            "tandem_consumer_lag_seconds",
            "Now - the time of the oldest event on the topic a consumer has not applied (at its position, parked or held); 0 when caught up",
            consumer_lag_seconds.clone(),
        );
        let gaps_open = Family::default();
        registry.register(
            "tandem_consumer_gaps_open",
            "Aggregates waiting for a missing sequence",
            gaps_open.clone(),
        );
        let dead_letters = Family::default();
        registry.register(
            "tandem_dead_letters",
            "Parked, unresolved dead letters, by reason",
            dead_letters.clone(),
        );
        let dead_letter_oldest_age = Family::default();
        registry.register(
            "tandem_dead_letter_oldest_age_seconds",
            "Age of the oldest parked, unresolved dead letter; 0 when none",
            dead_letter_oldest_age.clone(),
        );
        let rebuild_applied = Family::default();
        registry.register(
            "tandem_rebuild_events_applied",
            "Records the new version of a consumer's read model has consumed in its side-by-side rebuild; 0 when none is under way",
            rebuild_applied.clone(),
        );
        let rebuild_to_go = Family::default();
        registry.register(
            "tandem_rebuild_events_remaining",
            "Records on the bus the new version of a consumer's read model has yet to consume before it can switch; 0 when no rebuild is under way",
            rebuild_to_go.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        registry.register("tandem_build_info", "The running build", build_info);
        Self {
            registry,
            sent_messages,
            publish_failures,
            operation_duration,
            end_to_end,
            process_duration,
            consumer_events,
            store_commit_duration,
            http_duration,
            outbox_pending,
            outbox_oldest_age,
            consumer_lag_events,
            consumer_lag_seconds,
            gaps_open,
            dead_letters,
            dead_letter_oldest_age,
            rebuild_applied,
            rebuild_to_go,
        }
    }

    /// Sets the gauges of a consumer's rebuild (both 0 when none is under
    /// way).
    pub fn record_rebuild(&self, consumer: &str, rebuild: Option<&crate::rebuild::RebuildReport>) {
        let (applied, to_go) = rebuild
            .filter(|rebuild| rebuild.state.active())
            .map_or((0, 0), |rebuild| {
                (rebuild.events_applied, rebuild.events_to_go)
            });
        let labels = ConsumerLabels {
            consumer: consumer.to_owned(),
        };
        self.rebuild_applied
            .get_or_create(&labels)
            .set(i64::try_from(applied).unwrap_or(i64::MAX));
        self.rebuild_to_go
            .get_or_create(&labels)
            .set(i64::try_from(to_go).unwrap_or(i64::MAX));
    }

    /// Sets the gauges of an outbox.
    pub fn record_outbox(&self, status: &crate::status::OutboxStatus) {
        let labels = TopicLabels {
            topic: status.topic.clone(),
        };
        self.outbox_pending
            .get_or_create(&labels)
            .set(i64::try_from(status.pending_events).unwrap_or(i64::MAX));
        self.outbox_oldest_age
            .get_or_create(&labels)
            .set(status.oldest_pending_age_seconds);
    }

    /// Sets the gauges of a consumer: lag per partition, open gaps, and
    /// dead letters for every reason (0 for those with none).
    pub fn record_consumer(&self, status: &crate::status::ConsumerStatus) {
        for partition in &status.partitions {
            self.consumer_lag_events
                .get_or_create(&ConsumerPartitionLabels {
                    consumer: status.consumer.clone(),
                    topic: partition.topic.clone(),
                    partition: partition.partition,
                })
                .set(i64::try_from(partition.lag_events()).unwrap_or(i64::MAX));
        }
        for (topic, seconds) in status.lag_seconds_by_topic() {
            self.consumer_lag_seconds
                .get_or_create(&ConsumerTopicLabels {
                    consumer: status.consumer.clone(),
                    topic,
                })
                .set(seconds);
        }
        let consumer = ConsumerLabels {
            consumer: status.consumer.clone(),
        };
        self.gaps_open
            .get_or_create(&consumer)
            .set(i64::try_from(status.gaps_open).unwrap_or(i64::MAX));
        for reason in crate::dead_letter::Reason::ALL {
            let count = status
                .dead_letters
                .iter()
                .find(|(name, _)| name == reason.as_str())
                .map_or(0, |(_, count)| *count);
            self.dead_letters
                .get_or_create(&ConsumerErrorLabels {
                    consumer: status.consumer.clone(),
                    error_type: reason.as_str().to_owned(),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        self.dead_letter_oldest_age
            .get_or_create(&consumer)
            .set(status.oldest_dead_letter_age_seconds);
    }

    /// The Prometheus text format (version 0.0.4).
    pub fn encode_prometheus(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    /// OpenMetrics text (1.0.0), ending in `# EOF`.
    pub fn encode_openmetrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    /// Counts `count` events of `consumer` with `outcome`.
    pub fn consumer_events(&self, consumer: &str, outcome: Outcome, count: u64) {
        if count > 0 && enabled() {
            self.consumer_events
                .get_or_create(&ConsumerOutcomeLabels {
                    consumer: consumer.to_owned(),
                    outcome,
                })
                .inc_by(count);
        }
    }

    /// Records one bus call of `operation` that took `elapsed`.
    pub fn bus_operation(&self, operation: Operation, elapsed: Duration) {
        if !enabled() {
            return;
        }
        self.operation_duration
            .get_or_create(&OperationLabels {
                messaging_operation_name: operation,
            })
            .observe(elapsed.as_secs_f64());
    }
}

/// Whether an HTTP `Accept` header asks for OpenMetrics rather than the
/// Prometheus text format.
pub fn wants_openmetrics(accept: &str) -> bool {
    accept
        .split(',')
        .any(|kind| kind.trim().starts_with("application/openmetrics-text"))
}

/// Running totals of end-to-end delays per consumer, for `/status` (a
/// histogram cannot be read back): applied events and the sum of their
/// delays in microseconds.
#[derive(Debug, Default)]
struct Propagation {
    count: AtomicU64,
    sum_micros: AtomicU64,
}

fn propagation_of(consumer: &str) -> std::sync::Arc<Propagation> {
    static ALL: OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<Propagation>>>,
    > = OnceLock::new();
    let mut all = ALL
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    std::sync::Arc::clone(all.entry(consumer.to_owned()).or_default())
}

type FellBehind = std::collections::HashMap<String, (String, std::time::Instant)>;

/// Consumers of this process that cannot go on, with why, until when the
/// reading holds (the consumer says it again each time it tries).
fn fell_behind_map() -> &'static std::sync::Mutex<FellBehind> {
    static MAP: std::sync::OnceLock<std::sync::Mutex<FellBehind>> = std::sync::OnceLock::new();
    MAP.get_or_init(Default::default)
}

/// Records that `consumer` cannot go on because of `why`, for `valid_for`.
pub fn record_fell_behind(consumer: &str, why: &str, valid_for: std::time::Duration) {
    fell_behind_map()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .insert(
            consumer.to_owned(),
            (why.to_owned(), std::time::Instant::now() + valid_for),
        );
}

/// Why `consumer` cannot go on, if it said so recently.
pub fn fell_behind(consumer: &str) -> Option<String> {
    let map = fell_behind_map()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    map.get(consumer)
        .filter(|(_, until)| *until > std::time::Instant::now())
        .map(|(why, _)| why.clone())
}

/// Adds a committed batch's `count` end-to-end delays, `sum_micros` in all.
pub fn record_propagation(consumer: &str, count: u64, sum_micros: u64) {
    use std::sync::atomic::Ordering;
    let totals = propagation_of(consumer);
    totals.count.fetch_add(count, Ordering::Relaxed);
    totals.sum_micros.fetch_add(sum_micros, Ordering::Relaxed);
}

/// The totals of `consumer` in this process.
pub fn propagation(consumer: &str) -> crate::status::EndToEnd {
    use std::sync::atomic::Ordering;
    let totals = propagation_of(consumer);
    crate::status::EndToEnd {
        count: totals.count.load(Ordering::Relaxed),
        sum_seconds: totals.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
    }
}
