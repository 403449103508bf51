//! The commerce system at scale: the same `tandem serve` processes on
//! PostgreSQL (a database per service) and Kafka or NATS JetStream, with two
//! instances each of the Order and Inventory services sharing their
//! database and their consumer groups. `scripts/engines up` starts the
//! servers; a test that cannot reach one fails naming it.
//!
//! - kill -9 one instance of each under order load: no accepted order is
//!   lost or settled twice, and the stock invariant holds;
//! - the broker stops under load (a private broker of the test's own):
//!   writes keep being accepted, and once it is back everything drains.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::engines::{databases, kafka, namespaced, nats, system_on};
use common::*;
use reqwest::Client;
use tandem_cli::serve::Service;
use tandem_cli::system::System;
use tokio::process::{Child, Command};

/// The consumers each instance of a service runs.
fn consumers(service: Service) -> &'static [&'static str] {
    match service {
        Service::Customer => &[],
        Service::Inventory => &["inventory-reservations"],
        Service::Order => &["order-local-copies", "order-settlement"],
    }
}

/// Waits until every consumer of `service` in every one of its `instances`
/// holds partitions (its log's last assignment event is an assignment), so
/// that a kill takes partitions away from a live group rather than from
/// one still forming.
async fn groups_formed(system: &System, service: Service, instances: usize) {
    let deadline = tokio::time::Instant::now() + GROUPS_FORM;
    loop {
        let mut waiting = Vec::new();
        for instance in 0..instances {
            let path = system.log_file(service, instance).expect("log files");
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            for consumer in consumers(service) {
                let field = format!("consumer={consumer} ");
                let last = log.lines().rfind(|line| {
                    line.contains(&field)
                        && (line.contains("partitions assigned")
                            || line.contains("partitions revoked"))
                });
                if !last.is_some_and(|line| line.contains("partitions assigned")) {
                    waiting.push(format!("{} {instance} {consumer}", service.name()));
                }
            }
        }
        if waiting.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "consumer groups not formed within {GROUPS_FORM:?}; no partitions held by: {}",
            waiting.join(", ")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Longest wait for every member of the groups to hold partitions.
const GROUPS_FORM: Duration = Duration::from_secs(60);

/// Waits, with [`QUIESCENCE`], until every accepted order has settled and
/// every copy and stock figure agrees; panics with what still differs.
async fn converged(
    http: &Client,
    system: &System,
    stock: &BTreeMap<&str, i64>,
    accepted: &[String],
    what: &str,
) -> Snapshot {
    let customers = url(system, Service::Customer);
    let inventory = url(system, Service::Inventory);
    let order = url(system, Service::Order);
    let deadline = tokio::time::Instant::now() + QUIESCENCE;
    loop {
        let snapshot = observe(http, &customers, &inventory, &order).await;
        let mut found = inconsistencies(&snapshot, stock);
        let mut seen = BTreeMap::<&str, usize>::new();
        for order in &snapshot.orders {
            *seen
                .entry(order["orderId"].as_str().unwrap_or_default())
                .or_default() += 1;
        }
        for id in accepted {
            match seen.get(id.as_str()) {
                Some(1) => {}
                Some(count) => found.push(format!("order {id} listed {count} times")),
                None => found.push(format!("accepted order {id} is missing")),
            }
        }
        if found.is_empty() {
            return snapshot;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not converged within {QUIESCENCE:?}: {}",
            found.join("; ")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Longest wait for a system to settle after a crash or an outage (a
/// Kafka group notices a killed member only when its session times out).
const QUIESCENCE: Duration = Duration::from_secs(120);

/// Raises every customer's credit limit so that stock alone decides.
async fn unlimited_credit(http: &Client, system: &System) {
    let customers = url(system, Service::Customer);
    let order = url(system, Service::Order);
    for id in CUSTOMERS {
        set_credit_limit(http, &customers, &order, id, 100_000_000_000).await;
    }
}

/// Initial stock plus adjustments, per product, as seeded.
fn seeded_stock() -> BTreeMap<&'static str, i64> {
    BTreeMap::from([("widget", 100), ("gadget", 25), ("gizmo", 5)])
}

async fn collect(loads: Vec<tokio::task::JoinHandle<LoadReport>>) -> LoadReport {
    let mut report = LoadReport::default();
    for load in loads {
        let part = load.await.expect("the load task");
        report.accepted.extend(part.accepted);
        report.failed += part.failed;
        report.cancels += part.cancels;
        report.unexpected.extend(part.unexpected);
    }
    report
}

/// Waits until the loads have had `count` more orders accepted than
/// `before`, reading the Order Service's listing.
async fn accepted_at_least(http: &Client, system: &System, count: usize, what: &str) {
    let order = url(system, Service::Order);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut total = 0;
        for id in CUSTOMERS {
            total += orders_of(http, &order, id).await.len();
        }
        if total >= count {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: only {total} of {count} orders within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn kill_one_instance_of_each_under_load(bus: String) {
    let dir = tempfile::tempdir().unwrap();
    let (dbs, _guards) = databases();
    let mut system = system_on(dir.path(), namespaced(&bus), &dbs).await;
    system.start(Service::Customer).await.expect("customer");
    for service in [Service::Inventory, Service::Order] {
        for instance in 0..2 {
            system
                .start_instance(service, instance)
                .await
                .unwrap_or_else(|error| {
                    panic!("{} instance {instance}: {error:#}", service.name())
                });
        }
    }
    for service in [Service::Inventory, Service::Order] {
        groups_formed(&system, service, 2).await;
    }
    seed(&system).await;
    let http = system.http().clone();
    unlimited_credit(&http, &system).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load_client = Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let loads: Vec<_> = (0..2)
        .map(|instance| {
            let order = system
                .instance_url(Service::Order, instance)
                .expect("order instance");
            tokio::spawn(order_load(
                load_client.clone(),
                order,
                0x5eed + instance as u64,
                Arc::clone(&stop),
            ))
        })
        .collect();
    accepted_at_least(&http, &system, 30, "orders before the kills").await;
    system.kill_instance(Service::Order, 1).await.unwrap();
    system.kill_instance(Service::Inventory, 1).await.unwrap();
    accepted_at_least(&http, &system, 90, "orders after the kills").await;
    stop.store(true, Ordering::Relaxed);
    let report = collect(loads).await;
    println!(
        "load: {} accepted, {} cancelled, {} failed (instance killed)",
        report.accepted.len(),
        report.cancels,
        report.failed
    );
    assert!(
        report.unexpected.is_empty(),
        "answers no crash explains: {:#?}",
        report.unexpected
    );
    let snapshot = converged(
        &http,
        &system,
        &seeded_stock(),
        &report.accepted,
        "after kill -9 of one order and one inventory instance",
    )
    .await;
    let confirmed = snapshot
        .orders
        .iter()
        .filter(|order| order["status"] == "CONFIRMED")
        .count();
    assert!(confirmed > 0, "no order was confirmed");
    system.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_postgres_survives_kill_9_of_one_instance_of_each() {
    // The group notices the killed member when its session times out
    // (librdkafka's default 45 s; 10 s keeps the test short).
    let bus = kafka();
    let separator = if bus.contains('?') { '&' } else { '?' };
    kill_one_instance_of_each_under_load(format!("{bus}{separator}session.timeout.ms=10000")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_postgres_survives_kill_9_of_one_instance_of_each() {
    kill_one_instance_of_each_under_load(nats()).await;
}

// ------------------------------------------------------------ broker outage

/// A broker of this test's own, which it may stop and start at will.
struct PrivateBroker {
    command: Vec<String>,
    child: Option<Child>,
    port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PrivateBroker {
    fn nats(store: &Path) -> Self {
        let port = free_port();
        let server = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|path| Path::new(path).exists())
            .expect("nats-server not installed: run scripts/engines up");
        Self {
            command: vec![
                server.into(),
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
                "-js".into(),
                "-sd".into(),
                store.display().to_string(),
            ],
            child: None,
            port,
        }
    }

    /// tansu keeping its log in a SQLite file, so a restart keeps it.
    fn tansu(store: &Path) -> Self {
        let port = free_port();
        // The broker scripts/engines builds (with Tandem's fixes).
        let binary = tandem_testkit::tansu::binary();
        let listener = format!("tcp://127.0.0.1:{port}");
        Self {
            command: vec![
                binary,
                "broker".into(),
                "--listener-url".into(),
                listener.clone(),
                "--advertised-listener-url".into(),
                listener,
                "--storage-engine".into(),
                // An absolute path needs the fourth slash.
                format!("sqlite:///{}", store.join("tansu.db").display()),
            ],
            child: None,
            port,
        }
    }

    async fn start(&mut self) {
        let child = Command::new(&self.command[0])
            .args(&self.command[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| panic!("starting {:?}: {error}", self.command));
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?} did not listen within {DEADLINE:?}",
                self.command
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) on our own child's pid with a valid signal.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            let _ = tokio::time::timeout(DEADLINE, child.wait()).await;
            let _ = child.kill().await;
        }
    }
}

/// How long the broker stays away.
const OUTAGE: Duration = Duration::from_secs(5);

async fn broker_outage_under_load(mut broker: PrivateBroker, bus: String) {
    let dir = tempfile::tempdir().unwrap();
    let (dbs, _guards) = databases();
    broker.start().await;
    let mut system = system_on(dir.path(), bus, &dbs).await;
    system.start_all().await.expect("start the services");
    seed(&system).await;
    let http = system.http().clone();
    unlimited_credit(&http, &system).await;
    let order = url(&system, Service::Order);

    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(order_load(
        http.clone(),
        order.clone(),
        0xb0b,
        Arc::clone(&stop),
    ));
    accepted_at_least(&http, &system, 20, "orders before the outage").await;
    broker.stop().await;
    // With the broker gone for a while (long enough for clients to give up
    // a connection attempt or two), orders are still accepted as PENDING.
    let outage = tokio::time::Instant::now();
    let mut during_outage = Vec::new();
    while during_outage.len() < 10 || outage.elapsed() < OUTAGE {
        during_outage.push(place(&http, &order, CUSTOMERS[0], &[(PRODUCTS[0], 1)]).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = during_outage.last().unwrap();
    let pending = get_order(&http, &order, last).await;
    assert_eq!(pending["status"], "PENDING", "{pending}");
    broker.start().await;
    accepted_at_least(&http, &system, 60, "orders after the outage").await;
    stop.store(true, Ordering::Relaxed);
    let mut report = collect(vec![load]).await;
    assert!(
        report.unexpected.is_empty(),
        "answers no outage explains: {:#?}",
        report.unexpected
    );
    report.accepted.extend(during_outage.iter().cloned());
    let snapshot = converged(
        &http,
        &system,
        &seeded_stock(),
        &report.accepted,
        "after the broker came back",
    )
    .await;
    let settled: BTreeSet<&str> = snapshot
        .orders
        .iter()
        .filter(|order| order["status"] != "PENDING")
        .filter_map(|order| order["orderId"].as_str())
        .collect();
    for id in &during_outage {
        assert!(
            settled.contains(id.as_str()),
            "order {id} placed during the outage never settled"
        );
    }
    system.stop_all().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_outage_under_load_drains_when_the_broker_returns() {
    let store = tempfile::tempdir().unwrap();
    let broker = PrivateBroker::tansu(store.path());
    let bus = format!("kafka://127.0.0.1:{}", broker.port);
    broker_outage_under_load(broker, bus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_under_load_drains_when_the_broker_returns() {
    let store = tempfile::tempdir().unwrap();
    let broker = PrivateBroker::nats(store.path());
    let bus = format!("nats://127.0.0.1:{}", broker.port);
    broker_outage_under_load(broker, bus).await;
}
