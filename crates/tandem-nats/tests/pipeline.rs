//! The whole toolkit on NATS: SQLite outbox → relay → JetStream → consumer
//! → ledger read model, with one consumer and with two instances of one
//! consumer sharing the durable.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{connect, unique_prefix, Namespace};
use tandem::bus::Bus;
use tandem::consumer::{CommittedBatch, Consumer, ConsumerConfig, ConsumerObserver};
use tandem::dead_letter;
use tandem::relay::{Relay, RelayConfig};
use tandem_testkit::*;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);
const NAME: &str = "ledger-view";

#[derive(Default)]
struct Counter(AtomicUsize);

impl ConsumerObserver for Counter {
    fn batch_committed(&self, batch: CommittedBatch<'_>) {
        self.0.fetch_add(batch.consumed, Ordering::SeqCst);
    }
}

/// Deposits 20 transactions of 50 events over 13 accounts; returns the
/// expected (balance, events) per account.
async fn produce(producer: &tandem::sqlite::SqliteStore) -> BTreeMap<String, (i64, i64)> {
    let mut expected = BTreeMap::new();
    for batch in 0..20 {
        let deposits: Vec<(String, i64)> = (0..50)
            .map(|index| {
                (
                    format!("acct-{}", (batch * 7 + index) % 13),
                    index as i64 + 1,
                )
            })
            .collect();
        for (account, amount) in &deposits {
            let entry = expected.entry(account.clone()).or_insert((0i64, 0i64));
            entry.0 += amount;
            entry.1 += 1;
        }
        deposit(producer, deposits).await;
    }
    expected
}

/// What else happens while the pipeline runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Twist {
    None,
    /// The second instance stops after the first half of the events.
    StopOneMidway,
    /// After everything is applied, a replay rebuilds the read model.
    Replay,
}

async fn wait_for(reader: &tandem::sqlite::SqliteStore, expected: &BTreeMap<String, (i64, i64)>) {
    let reader = reader.clone();
    let expected = expected.clone();
    eventually("every event applied", WAIT, || {
        let reader = reader.clone();
        let expected = expected.clone();
        async move {
            let rows = ledger_rows(&reader).await;
            rows.len() == expected.len()
                && rows.iter().all(|row| {
                    expected
                        .get(&row.0)
                        .is_some_and(|(_, count)| row.3 >= *count)
                })
        }
    })
    .await;
}

async fn run_pipeline(consumers: usize, twist: Twist) {
    let dir = tempfile::tempdir().unwrap();
    let producer = open_store(&dir.path().join("producer.db")).await;
    let reader = open_store(&dir.path().join("reader.db")).await;
    // Small pulls, so that two instances both get work.
    let nats = connect(&unique_prefix(), "&fetch_batch=20").await;
    let _namespace = Namespace(nats.clone());
    let bus: Arc<dyn Bus> = Arc::new(nats);
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    let relay = Relay::new(producer.clone(), Arc::clone(&bus), RelayConfig::default());
    let relay_shutdown = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        relay.run(relay_shutdown).await.expect("relay")
    }));
    let ledger = Arc::new(Ledger::new());
    let mut counters = Vec::new();
    let mut instance_shutdowns = Vec::new();
    for _ in 0..consumers {
        let mut config = ConsumerConfig::new(NAME, &[TOPIC]);
        config.batch_size = 50;
        config.housekeeping_interval = Duration::from_millis(20);
        let counter = Arc::new(Counter::default());
        counters.push(Arc::clone(&counter));
        // Instances of one service: same store, same consumer name.
        let consumer = Consumer::new(
            reader.clone(),
            Arc::clone(&bus),
            Arc::clone(&ledger) as Arc<dyn tandem::Handler>,
            config,
        )
        .with_observer(counter);
        let consumer_shutdown = shutdown.child_token();
        instance_shutdowns.push(consumer_shutdown.clone());
        tasks.push(tokio::spawn(async move {
            consumer.run(consumer_shutdown).await.expect("consumer")
        }));
    }

    let mut expected = produce(&producer).await;
    if twist == Twist::StopOneMidway {
        wait_for(&reader, &expected).await;
        instance_shutdowns[1].cancel();
        for (account, (balance, count)) in produce(&producer).await {
            let entry = expected.entry(account).or_insert((0, 0));
            entry.0 += balance;
            entry.1 += count;
        }
    }
    let total: i64 = expected.values().map(|(_, count)| count).sum();
    wait_for(&reader, &expected).await;
    if twist == Twist::Replay {
        dead_letter::request_replay(&reader, NAME).await.unwrap();
        let counter = Arc::clone(&counters[0]);
        let before = counter.0.load(Ordering::SeqCst);
        eventually("the replay consumed every event again", WAIT, || {
            let consumed = counter.0.load(Ordering::SeqCst);
            async move { consumed as i64 >= before as i64 + total }
        })
        .await;
        wait_for(&reader, &expected).await;
    }
    // Let redeliveries, if any, arrive: they must change nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let rows = ledger_rows(&reader).await;
    assert_eq!(rows.len(), expected.len());
    for (account, balance, applied, last) in rows {
        let (expected_balance, expected_count) = expected[&account];
        assert_eq!(balance, expected_balance, "balance of {account}");
        assert_eq!(
            applied, expected_count,
            "events applied to {account}, each once"
        );
        assert_eq!(last, expected_count, "last sequence of {account}");
    }
    let parked = dead_letter::list(&reader, Some(NAME), true).await.unwrap();
    assert!(parked.is_empty(), "no dead letters: {parked:?}");
    // Records consumed (applied, held or dropped as duplicates) per instance.
    let consumed: Vec<usize> = counters
        .iter()
        .map(|counter| counter.0.load(Ordering::SeqCst))
        .collect();
    assert!(
        consumed.iter().sum::<usize>() as i64 >= total,
        "consumed per instance: {consumed:?}"
    );
    if consumers > 1 && twist == Twist::None {
        assert!(
            consumed.iter().all(|count| *count > 0),
            "every instance did some of the work: {consumed:?}"
        );
    }
    shutdown.cancel();
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_applied_exactly_once() {
    run_pipeline(1, Twist::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_rebuilds_the_read_model_from_the_start_of_the_stream() {
    run_pipeline(1, Twist::Replay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_one_instance_stops_the_other_carries_on() {
    run_pipeline(2, Twist::StopOneMidway).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_sharing_the_durable_apply_every_event_once_in_order() {
    run_pipeline(2, Twist::None).await;
}

/// Issue 18, point 1: two members of one consumer, one store, on NATS.
/// Member A holds its first batch while B commits later offsets; then the
/// store goes away for a moment. Both rejoin and seek to the stored
/// position, which must be a safe prefix: every event applied exactly
/// once, nothing parked. (Before, the position was B's highest offset + 1,
/// and the rejoining seek recreated the durable past A's events.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_while_a_member_holds_a_batch_loses_nothing() {
    use std::sync::atomic::AtomicBool;
    use tandem_testkit::faults::{FlakyStore, Gate, HoldingBus};

    let dir = tempfile::tempdir().unwrap();
    let producer = open_store(&dir.path().join("producer.db")).await;
    let reader = open_store(&dir.path().join("reader.db")).await;
    let nats = connect(&unique_prefix(), "&fetch_batch=2").await;
    let _namespace = Namespace(nats.clone());
    let bus: Arc<dyn Bus> = Arc::new(nats);
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    let relay = Relay::new(producer.clone(), Arc::clone(&bus), RelayConfig::default());
    let relay_shutdown = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        relay.run(relay_shutdown).await.expect("relay")
    }));

    let down = Arc::new(AtomicBool::new(false));
    let gate = Gate::new();
    let ledger = Arc::new(Ledger::new());
    let members: [Arc<dyn Bus>; 2] = [
        Arc::new(HoldingBus::new(Arc::clone(&bus), Arc::clone(&gate))),
        Arc::clone(&bus),
    ];
    for member_bus in members {
        let mut config = ConsumerConfig::new(NAME, &[TOPIC]);
        config.batch_size = 2;
        config.housekeeping_interval = Duration::from_millis(20);
        config.retry_outage_max = Duration::from_millis(200);
        let consumer = Consumer::new(
            FlakyStore::new(reader.clone(), Arc::clone(&down)),
            member_bus,
            Arc::clone(&ledger) as Arc<dyn tandem::Handler>,
            config,
        );
        let consumer_shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            consumer.run(consumer_shutdown).await.expect("consumer")
        }));
    }

    // Single-event aggregates, produced until the outage is over, so that
    // members always have records in flight.
    let producing = CancellationToken::new();
    let made = Arc::new(AtomicUsize::new(0));
    let producer_task = {
        let producing = producing.clone();
        let made = Arc::clone(&made);
        let producer = producer.clone();
        tokio::spawn(async move {
            while !producing.is_cancelled() {
                let index = made.fetch_add(1, Ordering::SeqCst);
                deposit(&producer, vec![(format!("single-{index}"), 1)]).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    eventually("member A holds its first batch", WAIT, || {
        let holding = gate.is_holding();
        async move { holding }
    })
    .await;
    eventually("member B applied events after A's", WAIT, || {
        let reader = reader.clone();
        async move { ledger_rows(&reader).await.len() >= 10 }
    })
    .await;
    down.store(true, Ordering::SeqCst);
    gate.open();
    // The outage lasts about 200 ms: its length is the fault, not a wait
    // for something to happen.
    tokio::time::sleep(Duration::from_millis(200)).await;
    down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    producing.cancel();
    producer_task.await.unwrap();
    let total = made.load(Ordering::SeqCst);

    eventually(&format!("all {total} aggregates applied"), WAIT, || {
        let reader = reader.clone();
        async move { ledger_rows(&reader).await.len() == total }
    })
    .await;
    // Let redeliveries, if any, arrive: they must change nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rows = ledger_rows(&reader).await;
    assert_eq!(rows.len(), total);
    for (account, balance, applied, last) in rows {
        assert_eq!(
            (balance, applied, last),
            (1, 1, 1),
            "{account} applied exactly once"
        );
    }
    let parked = dead_letter::list(&reader, Some(NAME), true).await.unwrap();
    assert!(parked.is_empty(), "nothing parked: {parked:?}");
    shutdown.cancel();
    for task in tasks {
        task.await.unwrap();
    }
}

/// Issue 18, point 4: a member that went away has its records delivered
/// again only after `ack_wait` and then the backoff (2 s, 5 s, 30 s by
/// default): the consumer's gap timeout must outlast the longest of
/// those, or a successor is parked while its predecessor waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gap_timeout_outlasts_the_longest_redelivery_delay() {
    let dir = tempfile::tempdir().unwrap();
    let reader = open_store(&dir.path().join("reader.db")).await;
    for (extra, longest) in [
        ("", Duration::from_secs(30)),
        ("&backoff_ms=1000,90000", Duration::from_secs(90)),
    ] {
        let nats = connect(&unique_prefix(), extra).await;
        assert_eq!(nats.redelivery_delay_max(), longest, "options {extra:?}");
        let consumer = Consumer::new(
            reader.clone(),
            Arc::new(nats) as Arc<dyn Bus>,
            Arc::new(Ledger::new()) as Arc<dyn tandem::Handler>,
            ConsumerConfig::new(NAME, &[TOPIC]),
        );
        assert!(
            consumer.config().gap_timeout > longest,
            "gap timeout {:?} must exceed the redelivery delay {longest:?} (options {extra:?})",
            consumer.config().gap_timeout
        );
    }
}
