//! Engines chosen by URL, the one place that knows every engine crate.
//!
//! | URL | engine |
//! |---|---|
//! | `sqlite:///path/bus.db[?partitions=N&synchronous=…]` | the embedded log ([`tandem::embedded`]) |
//! | `kafka://host:port[,host:port]?…` | Kafka ([`tandem_kafka`]) |
//! | `nats://[user:pass@]host:port?…` | NATS JetStream ([`tandem_nats`]) |
//! | `sqlite:///path/service.db[?synchronous=…]` | a SQLite store ([`tandem::sqlite`]) |
//! | `postgres://user@host:port/db?sslmode=…` | a PostgreSQL store ([`tandem_postgres`]) |
//! | `host=… dbname=… sslmode=…` | the same, in PostgreSQL's key=value form |
//!
//! Every engine reads its URL with the one parser,
//! [`tandem::engine::ParsedUrl`]: options percent-decoded once, a `+` kept
//! as a plus (write a space `%20`), a comma list of hosts for Kafka.
//!
//! [`open_bus`] gives an `Arc<dyn Bus>`. The `Store` trait has generic
//! methods, so it cannot be a trait object: [`AnyStore`] is an enum of the
//! store engines that implements `Store` by delegating to the one it holds.
//! A URL naming an unreachable engine fails here, with a message naming it
//! through [`redact`]: no user-info, no secret option's value, nothing of a
//! URL that does not parse.

#![warn(missing_docs)]

use std::sync::Arc;

use tandem::bus::{Bus, BusError, Delivery, OutgoingRecord, Record, Subscription, TopicPartition};
use tandem::sqlite::SqliteStore;
use tandem::store::{ExternalChanges, Lease, Store, StoreError, StoreFuture, Tx};
use tandem_postgres::PostgresStore;

use tandem::engine::{ParsedUrl, UrlError};

pub use tandem::engine::redact;

/// Why an engine URL could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URL does not parse, or its options are not the engine's; the
    /// URL in the message is already redacted.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The scheme is unknown, an option's value is wrong, or the engine
    /// could not be reached or opened. The message names the URL only
    /// through [`redact`].
    #[error("{0}")]
    Engine(String),
}

/// The URL's scheme, lower-cased, as the shared parser
/// ([`tandem::engine::ParsedUrl`]) reads it; a URL without one, or that
/// does not parse, is refused (without being shown).
fn scheme(url: &str) -> Result<String, OpenError> {
    Ok(parse(url)?.scheme().to_owned())
}

fn parse(url: &str) -> Result<ParsedUrl, OpenError> {
    ParsedUrl::parse(url).map_err(|error| UrlError::syntax(url, error).into())
}

/// Opens the bus a URL names. The option `namespace=NAME`, on any bus,
/// puts every topic and consumer group under `NAME-` (see [`Namespaced`]).
pub async fn open_bus(url: &str) -> Result<Arc<dyn Bus>, OpenError> {
    let (url, taken) = parse(url)?.without_options(&["namespace"]);
    let namespace = taken.into_iter().last().map(|option| option.value);
    let bus = open_engine_bus(&url).await?;
    Ok(match namespace {
        Some(namespace) if !namespace.is_empty() => Arc::new(Namespaced::new(bus, &namespace)),
        _ => bus,
    })
}

async fn open_engine_bus(url: &str) -> Result<Arc<dyn Bus>, OpenError> {
    match scheme(url)?.as_str() {
        "sqlite" => tandem::engine::open_bus(url)
            .await
            .map_err(|error| OpenError::Engine(error.to_string())),
        "kafka" => Ok(Arc::new(
            tandem_kafka::KafkaBus::connect(url)
                .await
                .map_err(|error| bus_error(url, error))?,
        )),
        "nats" | "tls" => Ok(Arc::new(
            tandem_nats::NatsBus::connect(url)
                .await
                .map_err(|error| bus_error(url, error))?,
        )),
        other => Err(OpenError::Engine(format!(
            "{}: unknown bus scheme {other}: (known: sqlite, kafka, nats)",
            redact(url)
        ))),
    }
}

/// The retention rules given as URL options, which win over `rules`
/// (flags, environment, defaults): `retain_outbox`, `retain_resolved` and
/// `retain_discarded` on the store URL, `retain_log` and
/// `retain_log_records` on the bus URL. Returns the URLs to open.
///
/// The embedded log is pruned by the service, so its options are taken
/// out of the URL. Kafka and NATS keep `retain_log` (and their other
/// `retain_log_*` options) in theirs: it becomes the topic's or stream's
/// own setting when the bus creates it, and `rules.log_age` fills it in
/// when the URL does not say.
pub fn retention_from_urls(
    store_url: &str,
    bus_url: &str,
    rules: &mut tandem::retention::Retention,
) -> Result<(String, String), OpenError> {
    let age = |option: &tandem::engine::UrlOption| {
        tandem::retention::parse_age(&option.value)
            .map_err(|why| OpenError::Engine(format!("URL option {}: {why}", option.name)))
    };
    let store = if is_key_value_form(store_url) {
        store_url.to_owned()
    } else {
        let (rest, taken) = parse(store_url)?.without_options(&[
            "retain_outbox",
            "retain_resolved",
            "retain_discarded",
        ]);
        for option in &taken {
            let value = age(option)?;
            match option.name.as_str() {
                "retain_outbox" => rules.outbox_age = value,
                "retain_resolved" => rules.resolved_age = value,
                _ => rules.discarded_age = value,
            }
        }
        rest
    };
    let parsed = parse(bus_url)?;
    let bus = match parsed.scheme() {
        "sqlite" => {
            let (rest, taken) = parsed.without_options(&["retain_log", "retain_log_records"]);
            for option in &taken {
                if option.name == "retain_log" {
                    rules.log_age = age(option)?;
                } else {
                    rules.log_records = Some(option.value.parse().map_err(|_| {
                        OpenError::Engine(format!(
                            "URL option retain_log_records={}: a count expected",
                            option.value
                        ))
                    })?);
                }
            }
            rest
        }
        _ => {
            if let Some(option) = parsed.options().iter().find(|o| o.name == "retain_log") {
                rules.log_age = age(option)?;
                bus_url.to_owned()
            } else {
                let written = match rules.log_age {
                    None => "keep".to_owned(),
                    Some(age) if age.subsec_millis() != 0 || age.as_secs() == 0 => {
                        format!("{}ms", age.as_millis())
                    }
                    Some(age) => format!("{}s", age.as_secs()),
                };
                let separator = if parsed.options().is_empty() && !bus_url.contains('?') {
                    '?'
                } else {
                    '&'
                };
                format!("{bus_url}{separator}retain_log={written}")
            }
        }
    };
    Ok((store, bus))
}

fn bus_error(url: &str, error: BusError) -> OpenError {
    OpenError::Engine(format!("cannot open bus {}: {error}", redact(url)))
}

/// Whether `url` is a PostgreSQL key=value connection string
/// (`host=db user=app dbname=orders`), which names no scheme.
fn is_key_value_form(url: &str) -> bool {
    !tandem::engine::has_scheme(url)
        && tandem::engine::parse_key_values(url).is_some_and(|params| !params.is_empty())
}

/// Opens the store a URL (or a PostgreSQL key=value connection string)
/// names.
pub async fn open_store(url: &str) -> Result<AnyStore, OpenError> {
    let scheme = if is_key_value_form(url) {
        "postgres".to_owned()
    } else {
        scheme(url)?
    };
    match scheme.as_str() {
        "sqlite" => tandem::engine::open_sqlite_store(url)
            .await
            .map(AnyStore::Sqlite)
            .map_err(|error| OpenError::Engine(error.to_string())),
        "postgres" | "postgresql" => PostgresStore::connect(url)
            .await
            .map(AnyStore::Postgres)
            .map_err(|error| {
                OpenError::Engine(format!("cannot open store {}: {error}", redact(url)))
            }),
        other => Err(OpenError::Engine(format!(
            "{}: unknown store scheme {other}: (known: sqlite, postgres)",
            redact(url)
        ))),
    }
}

/// Opens the existing service database a URL names, for tools that work
/// on one (`tandem replay`, `tandem dead-letters`): nothing is created,
/// installed or changed, and a database that is missing or lacks the
/// toolkit's tables (a mistyped path, the bus file, another database on
/// the server) is refused.
pub async fn open_existing_store(url: &str) -> Result<AnyStore, OpenError> {
    match scheme(url)?.as_str() {
        "sqlite" => tandem::engine::open_existing_sqlite_store(url)
            .await
            .map(AnyStore::Sqlite)
            .map_err(|error| OpenError::Engine(error.to_string())),
        "postgres" | "postgresql" => {
            let failed = |error: &dyn std::fmt::Display| {
                OpenError::Engine(format!("cannot open store {}: {error}", redact(url)))
            };
            let options = tandem_postgres::PostgresOptions {
                install_schema: false,
                ..Default::default()
            };
            let store = PostgresStore::connect_with(url, options)
                .await
                .map_err(|error| failed(&error))?;
            store
                .read(tandem::schema::check_installed)
                .await
                .map_err(|error| failed(&error))?;
            Ok(AnyStore::Postgres(store))
        }
        other => Err(OpenError::Engine(format!(
            "{}: unknown store scheme {other}: (known: sqlite, postgres)",
            redact(url)
        ))),
    }
}

/// A bus whose topics and groups live under a prefix: `order` is
/// `NAME-order` on the engine, and group `inventory-reservations` is
/// `NAME-inventory-reservations`. Several systems (environments, test runs)
/// can thus share one broker without reading each other's events. Services
/// see their plain topic names.
pub struct Namespaced {
    inner: Arc<dyn Bus>,
    prefix: String,
}

impl Namespaced {
    /// Wraps `inner` so that every topic and group is named
    /// `{namespace}-{name}` on it. Records, assignments and revocations
    /// come back with the prefix taken off.
    pub fn new(inner: Arc<dyn Bus>, namespace: &str) -> Self {
        Self {
            inner,
            prefix: format!("{namespace}-"),
        }
    }
}

fn strip(prefix: &str, topic: String) -> String {
    match topic.strip_prefix(prefix) {
        Some(plain) => plain.to_owned(),
        None => topic,
    }
}

fn strip_partitions(prefix: &str, partitions: Vec<TopicPartition>) -> Vec<TopicPartition> {
    partitions
        .into_iter()
        .map(|partition| TopicPartition::new(strip(prefix, partition.topic), partition.partition))
        .collect()
}

#[async_trait::async_trait]
impl Bus for Namespaced {
    async fn publish(&self, records: &[OutgoingRecord]) -> Result<(), BusError> {
        let records: Vec<OutgoingRecord> = records
            .iter()
            .map(|record| OutgoingRecord {
                topic: format!("{}{}", self.prefix, record.topic),
                key: record.key.clone(),
                payload: record.payload.clone(),
            })
            .collect();
        self.inner.publish(&records).await
    }

    async fn enqueue(
        &self,
        records: Vec<OutgoingRecord>,
    ) -> Result<tandem::bus::Acknowledgements, BusError> {
        let records: Vec<OutgoingRecord> = records
            .into_iter()
            .map(|record| OutgoingRecord {
                topic: format!("{}{}", self.prefix, record.topic),
                ..record
            })
            .collect();
        self.inner.enqueue(records).await
    }

    async fn subscribe(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<Box<dyn Subscription>, BusError> {
        let topics: Vec<String> = topics
            .iter()
            .map(|topic| format!("{}{topic}", self.prefix))
            .collect();
        let inner = self
            .inner
            .subscribe(&format!("{}{group}", self.prefix), &topics)
            .await?;
        Ok(Box::new(NamespacedSubscription {
            inner,
            prefix: self.prefix.clone(),
        }))
    }

    async fn end_offsets(&self, topic: &str) -> Result<Vec<(u32, u64)>, BusError> {
        self.inner
            .end_offsets(&format!("{}{topic}", self.prefix))
            .await
    }

    async fn payload_at(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<Option<Vec<u8>>, BusError> {
        self.inner
            .payload_at(&format!("{}{topic}", self.prefix), partition, offset)
            .await
    }

    // What the engine guarantees does not change with the names: a
    // consumer on a namespaced NATS bus must still know that members share
    // a partition, and how late a record may come again.
    fn shares_partitions(&self) -> bool {
        self.inner.shares_partitions()
    }

    fn publish_depth(&self) -> usize {
        self.inner.publish_depth()
    }

    fn redelivery_delay_max(&self) -> std::time::Duration {
        self.inner.redelivery_delay_max()
    }
    async fn close(&self) -> Result<(), BusError> {
        self.inner.close().await
    }

    async fn start_offsets(&self, topic: &str) -> Result<Vec<(u32, u64)>, BusError> {
        self.inner
            .start_offsets(&format!("{}{topic}", self.prefix))
            .await
    }

    async fn prune(
        &self,
        max_age: Option<std::time::Duration>,
        max_records: Option<u64>,
        batch: u64,
    ) -> Result<u64, BusError> {
        self.inner.prune(max_age, max_records, batch).await
    }

    async fn forget_group(&self, group: &str, topics: &[String]) -> Result<(), BusError> {
        let topics: Vec<String> = topics
            .iter()
            .map(|topic| format!("{}{topic}", self.prefix))
            .collect();
        self.inner
            .forget_group(&format!("{}{group}", self.prefix), &topics)
            .await
    }
}

struct NamespacedSubscription {
    inner: Box<dyn Subscription>,
    prefix: String,
}

#[async_trait::async_trait]
impl Subscription for NamespacedSubscription {
    async fn next(
        &mut self,
        max_records: usize,
        max_wait: std::time::Duration,
    ) -> Result<Option<Delivery>, BusError> {
        let prefix = &self.prefix;
        Ok(match self.inner.next(max_records, max_wait).await? {
            Some(Delivery::Assigned(partitions)) => {
                Some(Delivery::Assigned(strip_partitions(prefix, partitions)))
            }
            Some(Delivery::Revoked(partitions)) => {
                Some(Delivery::Revoked(strip_partitions(prefix, partitions)))
            }
            Some(Delivery::Records(records)) => Some(Delivery::Records(
                records
                    .into_iter()
                    .map(|mut record| {
                        record.topic = strip(prefix, std::mem::take(&mut record.topic));
                        record
                    })
                    .collect(),
            )),
            None => None,
        })
    }

    async fn seek(&mut self, partition: &TopicPartition, offset: u64) -> Result<(), BusError> {
        let prefixed = TopicPartition::new(
            format!("{}{}", self.prefix, partition.topic),
            partition.partition,
        );
        self.inner.seek(&prefixed, offset).await
    }

    async fn ack(&mut self, records: &[Record]) -> Result<(), BusError> {
        let records: Vec<Record> = records
            .iter()
            .map(|record| Record {
                topic: format!("{}{}", self.prefix, record.topic),
                ..record.clone()
            })
            .collect();
        self.inner.ack(&records).await
    }
}

/// A store of any engine of this build.
#[derive(Clone)]
pub enum AnyStore {
    /// A SQLite database file.
    Sqlite(SqliteStore),
    /// A PostgreSQL database.
    Postgres(PostgresStore),
}

macro_rules! delegate {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            AnyStore::Sqlite($store) => $call,
            AnyStore::Postgres($store) => $call,
        }
    };
}

impl Store for AnyStore {
    fn write<R, E, F>(&self, work: F) -> StoreFuture<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&mut dyn Tx) -> Result<R, E> + Send + 'static,
    {
        delegate!(self, store => store.write(work))
    }

    fn read<R, E, F>(&self, work: F) -> StoreFuture<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&mut dyn Tx) -> Result<R, E> + Send + 'static,
    {
        delegate!(self, store => store.read(work))
    }

    fn outbox_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        delegate!(self, store => store.outbox_signal())
    }

    fn external_changes(&self) -> Result<Box<dyn ExternalChanges>, StoreError> {
        delegate!(self, store => store.external_changes())
    }

    fn try_lead(&self, name: &str) -> StoreFuture<Option<Box<dyn Lease>>, StoreError> {
        delegate!(self, store => store.try_lead(name))
    }

    fn close(&self) -> StoreFuture<(), StoreError> {
        delegate!(self, store => store.close())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take_namespace(url: &str) -> (String, Option<String>) {
        let (url, taken) = parse(url).unwrap().without_options(&["namespace"]);
        (url, taken.into_iter().last().map(|option| option.value))
    }

    #[test]
    fn retention_options_win_over_the_flags_and_reach_kafka_and_nats_topics() {
        use std::time::Duration;
        use tandem::retention::Retention;
        let mut rules = Retention::default();
        let (store, bus) = retention_from_urls(
            "sqlite:///d/order.db?retain_outbox=keep&synchronous=full&retain_resolved=2d",
            "sqlite:///d/bus.db?retain_log=1h&partitions=4&retain_log_records=500",
            &mut rules,
        )
        .unwrap();
        assert_eq!(store, "sqlite:///d/order.db?synchronous=full");
        assert_eq!(bus, "sqlite:///d/bus.db?partitions=4");
        assert_eq!(rules.outbox_age, None);
        assert_eq!(rules.resolved_age, Some(Duration::from_secs(2 * 86_400)));
        assert_eq!(rules.log_age, Some(Duration::from_secs(3600)));
        assert_eq!(rules.log_records, Some(500));

        // Kafka and NATS: the flag's age written into the URL for topic
        // creation, unless the URL says.
        let mut rules = Retention {
            log_age: Some(Duration::from_secs(36 * 3600)),
            ..Retention::default()
        };
        let (_, bus) =
            retention_from_urls("postgres://u@h/db", "kafka://h:1?partitions=2", &mut rules)
                .unwrap();
        assert_eq!(bus, "kafka://h:1?partitions=2&retain_log=129600s");
        let (_, bus) = retention_from_urls("postgres://u@h/db", "nats://h:1", &mut rules).unwrap();
        assert_eq!(bus, "nats://h:1?retain_log=129600s");
        let (_, bus) = retention_from_urls(
            "postgres://u@h/db",
            "nats://h:1?retain_log=keep",
            &mut rules,
        )
        .unwrap();
        assert_eq!(bus, "nats://h:1?retain_log=keep");
        assert_eq!(rules.log_age, None);
        assert!(
            retention_from_urls("sqlite:///a.db?retain_outbox=soon", "nats://h", &mut rules)
                .is_err()
        );
    }

    #[test]
    fn the_namespace_option_leaves_the_rest_of_the_url() {
        assert_eq!(
            take_namespace("kafka://h:1?partitions=4&namespace=t1&acks=all"),
            (
                "kafka://h:1?partitions=4&acks=all".to_owned(),
                Some("t1".to_owned())
            )
        );
        assert_eq!(
            take_namespace("nats://h:1?namespace=t1"),
            ("nats://h:1".to_owned(), Some("t1".to_owned()))
        );
        assert_eq!(
            take_namespace("nats://h:1"),
            ("nats://h:1".to_owned(), None)
        );
        // Multi-host Kafka and a sqlite path keep their text.
        assert_eq!(
            take_namespace("kafka://h1:9092,h2:9092?namespace=t%2D1&sasl.password=a+b%2B"),
            (
                "kafka://h1:9092,h2:9092?sasl.password=a+b%2B".to_owned(),
                Some("t-1".to_owned())
            )
        );
        assert_eq!(
            take_namespace("sqlite://./data/bus.db?namespace=t1&partitions=2"),
            (
                "sqlite://./data/bus.db?partitions=2".to_owned(),
                Some("t1".to_owned())
            )
        );
    }

    #[tokio::test]
    async fn a_namespace_hides_other_namespaces_topics() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("bus.db").display());
        let first = open_bus(&format!("{url}?namespace=a")).await.unwrap();
        let second = open_bus(&format!("{url}?namespace=b")).await.unwrap();
        let record = OutgoingRecord {
            topic: "order".into(),
            key: "o-1".into(),
            payload: b"x".to_vec(),
        };
        first.publish(&[record.clone(), record]).await.unwrap();
        assert_eq!(first.end_offsets("order").await.unwrap(), vec![(0, 2)]);
        assert_eq!(second.end_offsets("order").await.unwrap(), vec![(0, 0)]);
        let mut subscription = first.subscribe("g", &["order".to_owned()]).await.unwrap();
        let mut records = Vec::new();
        while records.len() < 2 {
            match subscription
                .next(10, std::time::Duration::from_secs(5))
                .await
                .unwrap()
            {
                Some(Delivery::Assigned(partitions)) => {
                    assert_eq!(partitions, vec![TopicPartition::new("order", 0)]);
                    subscription.seek(&partitions[0], 0).await.unwrap();
                }
                Some(Delivery::Records(batch)) => records.extend(batch),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(records.iter().all(|record| record.topic == "order"));
    }

    #[tokio::test]
    async fn unknown_schemes_are_refused_by_name() {
        let error = open_bus("amqp://127.0.0.1:5672").await.err().unwrap();
        assert!(
            error.to_string().contains("unknown bus scheme amqp"),
            "{error}"
        );
        let error = open_store("mysql://127.0.0.1/x").await.err().unwrap();
        assert!(
            error.to_string().contains("unknown store scheme mysql"),
            "{error}"
        );
    }
}
