//! `/metrics` of a running [`Service`] (SQLite store, embedded log, relay,
//! consumer, HTTP server on a real socket), read by an outside judge: the
//! Prometheus text and OpenMetrics are parsed with the `openmetrics-parser`
//! crate's grammars (tandem_testkit::exposition), and the
//! names, types and labels are those of OPERATIONS.md. A scraper that asks
//! for OpenMetrics gets OpenMetrics. The gauges read from the database
//! and the bus (backlog, lag, dead letters) tell a poison event apart.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tandem::consumer::ConsumerConfig;
use tandem::sqlite::SqliteStore;
use tandem::{Bus, Store};
use tandem_service::{probes, Service};
use tandem_testkit::exposition::{parse_openmetrics, parse_prometheus, sum};
use tandem_testkit::{deposit, eventually, install_ledger, open_log, Ledger, TOPIC};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// `GET path` with `accept`: the response's head and body.
async fn get(address: SocketAddr, path: &str, accept: &str) -> (String, String) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: test\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    (head.to_owned(), body.to_owned())
}

/// What OPERATIONS.md names, as `(sample name, type, label names)`; the
/// ones this flow must have produced a sample of.
fn expected() -> Vec<(&'static str, &'static str, Vec<&'static str>)> {
    vec![
        (
            "messaging_client_sent_messages_total",
            "counter",
            vec!["messaging_destination_name"],
        ),
        (
            "messaging_client_operation_duration_seconds",
            "histogram",
            vec!["messaging_operation_name"],
        ),
        (
            "tandem_consumer_end_to_end_seconds",
            "histogram",
            vec!["consumer", "topic"],
        ),
        (
            "messaging_process_duration_seconds",
            "histogram",
            vec!["consumer"],
        ),
        (
            "tandem_consumer_events_total",
            "counter",
            vec!["consumer", "outcome"],
        ),
        (
            "tandem_store_commit_duration_seconds",
            "histogram",
            vec!["store"],
        ),
        (
            "http_server_request_duration_seconds",
            "histogram",
            vec![
                "http_request_method",
                "http_response_status_code",
                "http_route",
            ],
        ),
        ("tandem_build_info", "gauge", vec!["version"]),
        ("tandem_outbox_pending_events", "gauge", vec!["topic"]),
        (
            "tandem_outbox_oldest_pending_age_seconds",
            "gauge",
            vec!["topic"],
        ),
        (
            "tandem_consumer_lag_events",
            "gauge",
            vec!["consumer", "partition", "topic"],
        ),
        ("tandem_consumer_gaps_open", "gauge", vec!["consumer"]),
        (
            "tandem_dead_letters",
            "gauge",
            vec!["consumer", "error_type"],
        ),
        (
            "tandem_dead_letter_oldest_age_seconds",
            "gauge",
            vec!["consumer"],
        ),
    ]
}

/// A ledger service with a relay named `relay` and one consumer, on a
/// real socket: its address, its shutdown and its task.
struct Running {
    address: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), tandem_service::ServiceError>>,
}

async fn run_ledger<S: Store>(
    store: S,
    bus: Arc<dyn Bus>,
    relay: &str,
    config: ConsumerConfig,
    ledger: Ledger,
) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(
        Service::new("ledger", store, bus)
            .install(install_ledger)
            .relay_with(tandem::relay::RelayConfig {
                name: relay.to_owned(),
                ..Default::default()
            })
            .consumer("balances", config, ledger)
            .http(|store| probes::for_store(store, "ledger database"))
            .run(listener, shutdown.clone()),
    );
    Running {
        address,
        shutdown,
        task,
    }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the service stops")
            .unwrap()
            .unwrap();
    }
}

/// A SQLite store and an embedded log in `dir`.
async fn embedded(dir: &std::path::Path) -> (SqliteStore, Arc<dyn Bus>) {
    let store = SqliteStore::open(dir.join("ledger.db"), Default::default())
        .await
        .unwrap();
    let bus: Arc<dyn Bus> = Arc::new(open_log(&dir.join("bus.db")).await);
    (store, bus)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_names_types_and_labels_every_part_as_operations_md_does() {
    let dir = tempfile::tempdir().unwrap();
    let (store, bus) = embedded(dir.path()).await;
    let ledger = Ledger::new();
    ledger.poison_amount.store(13, Ordering::SeqCst);
    ledger.fail_poison.store(true, Ordering::SeqCst);
    let mut config = ConsumerConfig::new("ledger-balances", &[TOPIC]);
    config.max_attempts = 2;
    let service = run_ledger(store.clone(), bus, TOPIC, config, ledger).await;
    let address = service.address;
    deposit(
        &store,
        vec![("alice".into(), 5), ("bob".into(), 7), ("carol".into(), 13)],
    )
    .await;
    eventually(
        "two deposits applied, the poison parked",
        Duration::from_secs(20),
        || {
            let store = store.clone();
            async move {
                store
                    .read(|tx| {
                        Ok::<_, tandem::StoreError>((
                            tx.query("SELECT 1 FROM ledger", &[])?.len(),
                            tx.query("SELECT 1 FROM tandem_dead_letters", &[])?.len(),
                        ))
                    })
                    .await
                    .is_ok_and(|counts| counts == (2, 1))
            }
        },
    )
    .await;
    // The relay writes its cursor at most every 50 ms after the bus acked.
    eventually(
        "the relay's cursor caught up",
        Duration::from_secs(20),
        || {
            let store = store.clone();
            async move {
                tandem::relay::backlog(&store, TOPIC)
                    .await
                    .is_ok_and(|(pending, _)| pending == 0)
            }
        },
    )
    .await;
    let (ready, _) = get(address, "/ready", "*/*").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    let (head, body) = get(address, "/metrics", "text/plain").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let series = parse_prometheus(&body);
    let mut found: BTreeMap<&str, (&'static str, BTreeSet<String>)> = BTreeMap::new();
    for one in &series {
        let labels: BTreeSet<String> = one.labels.keys().cloned().collect();
        found.insert(one.family.as_str(), (one.kind, labels));
    }
    for (name, expected_kind, labels) in expected() {
        let (found_kind, found_labels) = found
            .get(name)
            .unwrap_or_else(|| panic!("no sample of {name} in\n{body}"));
        assert_eq!(*found_kind, expected_kind, "type of {name}");
        let labels: BTreeSet<String> = labels.into_iter().map(str::to_owned).collect();
        assert_eq!(found_labels, &labels, "labels of {name}");
    }
    // The figures say what happened: two events sent and applied, and the
    // route of the scrape before this one timed by its template.
    // Of this test's consumer (other tests of this binary share the
    // process's registry) where the metric has a consumer label.
    let value = |name: &str, label: (&str, &str)| -> f64 {
        series
            .iter()
            .find(|one| {
                one.family == name
                    && one.label(label.0) == Some(label.1)
                    && one
                        .label("consumer")
                        .is_none_or(|consumer| consumer == "ledger-balances")
            })
            .and_then(|one| one.value)
            .unwrap_or_else(|| panic!("no {name} with {label:?}"))
    };
    assert!(
        value(
            "messaging_client_sent_messages_total",
            ("messaging_destination_name", TOPIC)
        ) >= 3.0
    );
    assert!(value("tandem_consumer_events_total", ("outcome", "applied")) >= 2.0);
    assert!(value("tandem_consumer_events_total", ("outcome", "retried")) >= 1.0);
    assert!(value("tandem_consumer_events_total", ("outcome", "parked")) >= 1.0);
    assert_eq!(value("tandem_dead_letters", ("error_type", "handler")), 1.0);
    assert_eq!(value("tandem_dead_letters", ("error_type", "decode")), 0.0);
    assert_eq!(value("tandem_outbox_pending_events", ("topic", TOPIC)), 0.0);
    assert_eq!(
        value("tandem_consumer_gaps_open", ("consumer", "ledger-balances")),
        0.0
    );
    assert_eq!(
        sum(
            &series,
            "tandem_consumer_lag_events",
            &[("consumer", "ledger-balances")]
        ),
        Some(0.0),
        "the consumer applied or parked every record"
    );
    assert!(series
        .iter()
        .any(|one| one.family == "http_server_request_duration_seconds"
            && one.label("http_route") == Some("/ready")));

    // /status: the parked poison makes the consumer's health (and so the
    // service's) "error", with the figures beside it.
    let (head, body) = get(address, "/status", "application/json").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let status: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(status["health"], "error", "{status}");
    assert_eq!(status["outbox"]["pendingEvents"], 0, "{status}");
    let consumer = &status["consumers"][0];
    assert_eq!(consumer["consumer"], "ledger-balances", "{status}");
    assert_eq!(consumer["health"], "error", "{status}");
    assert_eq!(consumer["deadLetters"], 1, "{status}");
    assert_eq!(consumer["lagEvents"], 0, "{status}");

    // OpenMetrics on request, ending with its terminator.
    let (head, body) = get(
        address,
        "/metrics",
        "application/openmetrics-text; version=1.0.0,text/plain;q=0.5",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    let families = parse_openmetrics(&body);
    assert_eq!(
        families
            .get("messaging_client_sent_messages")
            .map(String::as_str),
        Some("counter"),
        "{families:?}"
    );
    assert_eq!(
        families
            .get("tandem_consumer_end_to_end_seconds")
            .map(String::as_str),
        Some("histogram"),
        "{families:?}"
    );

    service.stop().await;
}

/// The sum of the samples of gauge `name` whose labels include `label`
/// (over partitions, say), in a fresh scrape of `address`; `None` if there
/// is none.
async fn gauge(address: SocketAddr, name: &str, label: (&str, &str)) -> Option<f64> {
    let (_, body) = get(address, "/metrics", "text/plain").await;
    sum(&parse_prometheus(&body), name, &[label])
}

/// A consumer that cannot apply an event (its handler fails, again and
/// again, as if a downstream it needs were down) falls behind in seconds,
/// not only in events: its lag grows while nothing new arrives, and
/// returns to 0 once it applies the event. On the embedded engines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_in_seconds_grows_while_a_consumer_is_stuck_and_returns_to_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (store, bus) = embedded(dir.path()).await;
    lag_grows_while_stuck_and_returns(store, bus, "ledger-lagging").await;
}

/// The same on NATS JetStream and PostgreSQL (`scripts/engines up`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_in_seconds_on_nats_and_postgres() {
    let (_database, store) = postgres_store("lag_nats").await;
    let bus = namespaced_bus("nats://127.0.0.1:4222", "TANDEM_TEST_NATS").await;
    lag_grows_while_stuck_and_returns(store, bus, "ledger-lagging-nats").await;
}

/// The same on a Kafka-protocol broker (tansu) and PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_in_seconds_on_kafka_and_postgres() {
    let (_database, store) = postgres_store("lag_kafka").await;
    let bus = namespaced_bus("kafka://127.0.0.1:19092", "TANDEM_TEST_KAFKA").await;
    lag_grows_while_stuck_and_returns(store, bus, "ledger-lagging-kafka").await;
}

async fn postgres_store(
    label: &str,
) -> (
    tandem_postgres::testing::ScratchDatabase,
    tandem_postgres::PostgresStore,
) {
    let base = tandem_postgres::testing::base_url();
    let database = tandem_postgres::testing::ScratchDatabase::create(&base, label)
        .await
        .unwrap_or_else(|error| {
            panic!("PostgreSQL not reachable at {base}: start it with scripts/engines up ({error})")
        });
    let store = database.store().await.expect("store");
    (database, store)
}

/// The bus at `$variable` (or `default`), in a namespace of its own.
async fn namespaced_bus(default: &str, variable: &str) -> Arc<dyn Bus> {
    let address = std::env::var(variable).unwrap_or_else(|_| default.to_owned());
    let namespace = format!(
        "lag{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let separator = if address.contains('?') { '&' } else { '?' };
    tandem_engines::open_bus(&format!("{address}{separator}namespace={namespace}"))
        .await
        .unwrap_or_else(|error| {
            panic!("{address} not reachable: start it with scripts/engines up ({error})")
        })
}

async fn lag_grows_while_stuck_and_returns<S: Store>(
    store: S,
    bus: Arc<dyn Bus>,
    consumer: &'static str,
) {
    const PAUSE: f64 = 2.0;
    let ledger = Ledger::new();
    ledger.poison_amount.store(21, Ordering::SeqCst);
    ledger.fail_poison.store(true, Ordering::SeqCst);
    let failing = Arc::clone(&ledger.fail_poison);
    let mut config = ConsumerConfig::new(consumer, &[TOPIC]);
    config.max_attempts = u32::MAX;
    config.retry_max = Duration::from_millis(50);
    let service = run_ledger(
        store.clone(),
        bus,
        &format!("{consumer}-relay"),
        config,
        ledger,
    )
    .await;
    let address = service.address;
    deposit(&store, vec![("dave".into(), 21)]).await;

    let label = ("consumer", consumer);
    eventually(
        "the lag in seconds reaches the pause",
        Duration::from_secs(30),
        || async move {
            gauge(address, "tandem_consumer_lag_seconds", label)
                .await
                .is_some_and(|lag| lag >= PAUSE)
        },
    )
    .await;
    assert_eq!(
        gauge(address, "tandem_consumer_lag_events", label).await,
        Some(1.0),
        "the event it cannot apply"
    );
    let health = |body: String| -> (String, f64) {
        let status: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let consumer = &status["consumers"][0];
        (
            consumer["health"].as_str().expect("a health").to_owned(),
            consumer["lagSeconds"].as_f64().expect("lag seconds"),
        )
    };
    let (stuck, lag) = health(get(address, "/status", "application/json").await.1);
    assert!(
        ["lagging", "stalled"].contains(&stuck.as_str()) && lag >= PAUSE,
        "a stuck consumer is {stuck} with {lag} s of lag"
    );

    failing.store(false, Ordering::SeqCst);
    eventually(
        "the lag returns to 0 once the event is applied",
        Duration::from_secs(30),
        || async move {
            gauge(address, "tandem_consumer_lag_seconds", label).await == Some(0.0)
                && gauge(address, "tandem_consumer_lag_events", label).await == Some(0.0)
        },
    )
    .await;
    assert_eq!(
        health(get(address, "/status", "application/json").await.1),
        ("ok".to_owned(), 0.0)
    );

    service.stop().await;
}
