//! The toolkit's pipeline on Kafka: SQLite outbox → relay → Kafka →
//! `tandem::consumer` → ledger read model, every event applied exactly
//! once, also with two consumers of one group sharing a database (two
//! instances of one service) when one of them stops midway.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem::bus::Bus;
use tandem::consumer::{CommittedBatch, Consumer, ConsumerConfig, ConsumerObserver};
use tandem::relay::{Relay, RelayConfig};
use tandem::sqlite::SqliteStore;
use tandem::store::{Store, StoreError};
use tandem_testkit::conformance::unique;
use tandem_testkit::{eventually, ledger_rows, open_store, Deposited, Ledger};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

/// Appends deposits to `topic` in one transaction.
async fn deposit(store: &SqliteStore, topic: &str, deposits: Vec<(String, i64)>) {
    let topic = topic.to_owned();
    store
        .write(move |tx| -> Result<(), StoreError> {
            for (account_id, amount_cents) in &deposits {
                tandem::outbox::publish(
                    tx,
                    &topic,
                    account_id,
                    &Deposited {
                        account_id: account_id.clone(),
                        amount_cents: *amount_cents,
                    },
                )?;
            }
            Ok(())
        })
        .await
        .expect("deposit");
}

#[derive(Default)]
struct Counter(AtomicUsize);

impl ConsumerObserver for Counter {
    fn batch_committed(&self, batch: CommittedBatch<'_>) {
        self.0
            .fetch_add(batch.applied_created_micros.len(), Ordering::SeqCst);
    }
}

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    applied: Arc<Counter>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("task");
    }
}

fn start_consumer(store: &SqliteStore, bus: &Arc<dyn Bus>, name: &str, topic: &str) -> Running {
    let mut config = ConsumerConfig::new(name, &[topic]);
    config.housekeeping_interval = Duration::from_millis(20);
    let applied = Arc::new(Counter::default());
    let consumer = Consumer::new(
        store.clone(),
        Arc::clone(bus),
        Arc::new(Ledger::new()) as Arc<dyn tandem::Handler>,
        config,
    )
    .with_observer(Arc::clone(&applied) as Arc<dyn ConsumerObserver>);
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    Running {
        shutdown,
        task: tokio::spawn(async move { consumer.run(token).await.expect("consumer") }),
        applied,
    }
}

fn start_relay(store: &SqliteStore, bus: &Arc<dyn Bus>) -> Running {
    let relay = Relay::new(store.clone(), Arc::clone(bus), RelayConfig::default());
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    Running {
        shutdown,
        task: tokio::spawn(async move { relay.run(token).await.expect("relay") }),
        applied: Arc::default(),
    }
}

/// Deposits `rounds` transactions of `size` over 13 accounts, adding the
/// expected (balance, count) per account to `expected`.
async fn deposit_rounds(
    store: &SqliteStore,
    topic: &str,
    rounds: std::ops::Range<usize>,
    size: usize,
    expected: &mut BTreeMap<String, (i64, i64)>,
) {
    for round in rounds {
        let deposits: Vec<(String, i64)> = (0..size)
            .map(|index| {
                (
                    format!("acct-{}", (round * 7 + index) % 13),
                    index as i64 + 1,
                )
            })
            .collect();
        for (account, amount) in &deposits {
            let entry = expected.entry(account.clone()).or_insert((0, 0));
            entry.0 += amount;
            entry.1 += 1;
        }
        deposit(store, topic, deposits).await;
    }
}

/// Deposits a round at a time until both instances have applied something
/// (the group has split the partitions between them); returns the rounds
/// deposited.
async fn until_both_apply(
    producer: &SqliteStore,
    topic: &str,
    instances: [&Running; 2],
    expected: &mut BTreeMap<String, (i64, i64)>,
) -> usize {
    let applied = |index: usize| instances[index].applied.0.load(Ordering::SeqCst);
    let mut round = 0;
    let give_up = tokio::time::Instant::now() + WAIT;
    while applied(0) == 0 || applied(1) == 0 {
        assert!(
            tokio::time::Instant::now() < give_up,
            "both instances should apply events: {} and {}",
            applied(0),
            applied(1)
        );
        deposit_rounds(producer, topic, round..round + 1, 13, expected).await;
        round += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    round
}

async fn wait_for_all(reader: &SqliteStore, expected: &BTreeMap<String, (i64, i64)>) {
    for (account, (_, count)) in expected {
        let reader = reader.clone();
        eventually(&format!("{account} at sequence {count}"), WAIT, || {
            let reader = reader.clone();
            async move {
                ledger_rows(&reader)
                    .await
                    .iter()
                    .any(|row| row.0 == *account && row.3 >= *count)
            }
        })
        .await;
    }
}

async fn assert_exactly_once(reader: &SqliteStore, expected: &BTreeMap<String, (i64, i64)>) {
    let rows = ledger_rows(reader).await;
    assert_eq!(rows.len(), expected.len());
    for (account, balance, applied, last) in rows {
        let (expected_balance, expected_count) = expected[&account];
        assert_eq!(balance, expected_balance, "balance of {account}");
        assert_eq!(applied, expected_count, "events applied to {account}");
        assert_eq!(last, expected_count, "last sequence of {account}");
    }
    let parked = tandem::dead_letter::list(reader, None, true)
        .await
        .expect("dead letters");
    assert!(parked.is_empty(), "nothing parked: {parked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_events_reach_the_read_model_exactly_once() {
    let kafka = common::connect().await;
    let _scratch = common::Scratch::new(&kafka);
    let bus: Arc<dyn Bus> = Arc::new(kafka);
    let dir = tempfile::tempdir().unwrap();
    let producer = open_store(&dir.path().join("producer.db")).await;
    let reader = open_store(&dir.path().join("reader.db")).await;
    let topic = unique("ledger");
    let relay = start_relay(&producer, &bus);
    let consumer = start_consumer(&reader, &bus, &unique("ledger-view"), &topic);
    let mut expected = BTreeMap::new();
    deposit_rounds(&producer, &topic, 0..20, 50, &mut expected).await;
    wait_for_all(&reader, &expected).await;
    assert_exactly_once(&reader, &expected).await;
    consumer.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_of_one_consumer_share_the_work_and_one_stopping_loses_nothing() {
    let kafka = common::connect().await;
    let _scratch = common::Scratch::new(&kafka);
    let bus: Arc<dyn Bus> = Arc::new(kafka);
    let dir = tempfile::tempdir().unwrap();
    let producer = open_store(&dir.path().join("producer.db")).await;
    // One database, two instances of the consuming service.
    let reader = open_store(&dir.path().join("reader.db")).await;
    let topic = unique("ledger");
    let name = unique("ledger-view");
    let relay = start_relay(&producer, &bus);
    let first = start_consumer(&reader, &bus, &name, &topic);
    let second = start_consumer(&reader, &bus, &name, &topic);

    let mut expected = BTreeMap::new();
    let mut round = until_both_apply(&producer, &topic, [&first, &second], &mut expected).await;
    // More while the first instance stops midway.
    deposit_rounds(&producer, &topic, round..round + 10, 13, &mut expected).await;
    round += 10;
    first.stop().await;
    deposit_rounds(&producer, &topic, round..round + 10, 13, &mut expected).await;
    wait_for_all(&reader, &expected).await;
    assert_exactly_once(&reader, &expected).await;
    let total: i64 = expected.values().map(|(_, count)| count).sum();
    assert!(
        second.applied.0.load(Ordering::SeqCst) < total as usize,
        "the first instance did part of the work"
    );
    second.stop().await;
    relay.stop().await;
}

/// Issue 18, point 2: a replay requested while two instances of one
/// consumer split 4 partitions must rebuild every partition, not only
/// those of the member that took the request: every member sees the new
/// generation before it applies again, and seeks to the reset positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_with_two_instances_rebuilds_every_partition_exactly_once() {
    let url = format!("{}?partitions=4", common::test_url());
    let kafka = match tandem_kafka::KafkaBus::connect(&url).await {
        Ok(bus) => bus,
        Err(error) => panic!(
            "Kafka-compatible broker not reachable: start it with scripts/engines up ({error})"
        ),
    };
    let _scratch = common::Scratch::new(&kafka);
    let bus: Arc<dyn Bus> = Arc::new(kafka);
    let dir = tempfile::tempdir().unwrap();
    let producer = open_store(&dir.path().join("producer.db")).await;
    let reader = open_store(&dir.path().join("reader.db")).await;
    let topic = unique("ledger");
    let name = unique("ledger-view");
    let relay = start_relay(&producer, &bus);
    let first = start_consumer(&reader, &bus, &name, &topic);
    let second = start_consumer(&reader, &bus, &name, &topic);

    let mut expected = BTreeMap::new();
    let mut round = until_both_apply(&producer, &topic, [&first, &second], &mut expected).await;
    deposit_rounds(&producer, &topic, round..round + 5, 13, &mut expected).await;
    round += 5;
    wait_for_all(&reader, &expected).await;
    let applied_before =
        first.applied.0.load(Ordering::SeqCst) + second.applied.0.load(Ordering::SeqCst);

    tandem::dead_letter::request_replay(&reader, &name)
        .await
        .expect("replay requested");
    // Events keep coming during the rebuild.
    deposit_rounds(&producer, &topic, round..round + 5, 13, &mut expected).await;
    let total: usize = expected.values().map(|(_, count)| *count as usize).sum();
    eventually("the replay applied every event again", WAIT, || {
        let applied =
            first.applied.0.load(Ordering::SeqCst) + second.applied.0.load(Ordering::SeqCst);
        async move { applied >= applied_before + total }
    })
    .await;
    wait_for_all(&reader, &expected).await;
    assert_exactly_once(&reader, &expected).await;
    first.stop().await;
    second.stop().await;
    relay.stop().await;
}
