//! The pipeline on the embedded engines: outbox → relay → embedded log →
//! consumer → read model, with poison events, gaps, malformed records and
//! replay.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tandem::bus::{Bus, OutgoingRecord};
use tandem::consumer::{Consumer, ConsumerConfig};
use tandem::dead_letter;
use tandem::relay::{Relay, RelayConfig};
use tandem::store::{Store, StoreError};
use tandem::NewEvent;
use tandem::StoreError as _StoreErrorAlias;
use tandem_testkit::*;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

struct System {
    _dir: tempfile::TempDir,
    producer: tandem::sqlite::SqliteStore,
    reader: tandem::sqlite::SqliteStore,
    bus: Arc<dyn Bus>,
    ledger: Arc<Ledger>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn quick_consumer() -> ConsumerConfig {
    let mut config = ConsumerConfig::new("ledger-view", &[TOPIC]);
    config.max_attempts = 3;
    config.retry_initial = Duration::from_millis(5);
    config.retry_max = Duration::from_millis(20);
    config.gap_timeout = Duration::from_millis(300);
    config.housekeeping_interval = Duration::from_millis(20);
    config
}

async fn start(config: ConsumerConfig) -> System {
    let ledger = Arc::new(Ledger::new());
    start_with(config, Arc::clone(&ledger), ledger).await
}

/// A system whose consumer runs `handler` (which may wrap `ledger`).
async fn start_with(
    config: ConsumerConfig,
    ledger: Arc<Ledger>,
    handler: Arc<dyn tandem::Handler>,
) -> System {
    let dir = tempfile::tempdir().unwrap();
    let producer = open_store(&dir.path().join("producer.db")).await;
    let reader = open_store(&dir.path().join("reader.db")).await;
    let bus: Arc<dyn Bus> = Arc::new(open_log(&dir.path().join("bus.db")).await);
    let shutdown = CancellationToken::new();
    let relay = Relay::new(producer.clone(), Arc::clone(&bus), RelayConfig::default());
    let consumer = Consumer::new(reader.clone(), Arc::clone(&bus), handler, config);
    let relay_shutdown = shutdown.clone();
    let consumer_shutdown = shutdown.clone();
    let tasks = vec![
        tokio::spawn(async move { relay.run(relay_shutdown).await.expect("relay") }),
        tokio::spawn(async move { consumer.run(consumer_shutdown).await.expect("consumer") }),
    ];
    System {
        _dir: dir,
        producer,
        reader,
        bus,
        ledger,
        shutdown,
        tasks,
    }
}

impl System {
    async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            task.await.unwrap();
        }
    }

    async fn wait_for_applied(&self, account: &str, sequence: i64) {
        let reader = self.reader.clone();
        eventually(&format!("{account} at sequence {sequence}"), WAIT, || {
            let reader = reader.clone();
            async move {
                ledger_rows(&reader)
                    .await
                    .iter()
                    .any(|row| row.0 == account && row.3 >= sequence)
            }
        })
        .await;
    }
}

#[tokio::test]
async fn committed_events_reach_the_read_model_exactly_once() {
    let system = start(quick_consumer()).await;
    let mut expected = std::collections::BTreeMap::new();
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
        deposit(&system.producer, deposits).await;
    }
    for (account, (_, count)) in &expected {
        system.wait_for_applied(account, *count).await;
    }
    let rows = ledger_rows(&system.reader).await;
    assert_eq!(rows.len(), expected.len());
    for (account, balance, applied, last) in rows {
        let (expected_balance, expected_count) = expected[&account];
        assert_eq!(balance, expected_balance, "balance of {account}");
        assert_eq!(applied, expected_count, "events applied to {account}");
        assert_eq!(last, expected_count, "last sequence of {account}");
    }
    system.stop().await;
}

/// A handler whose batch path always fails, as a set-based statement that
/// finds something it cannot apply would: the consumer must fall back to
/// one `handle` call per event and apply each exactly once.
struct BatchRefuser {
    ledger: Arc<Ledger>,
    batch_calls: std::sync::atomic::AtomicU64,
}

impl tandem::Handler for BatchRefuser {
    fn handle(
        &self,
        tx: &mut dyn tandem::Tx,
        event: &tandem::Envelope,
    ) -> Result<(), tandem::HandlerError> {
        self.ledger.handle(tx, event)
    }

    fn handle_batch(
        &self,
        tx: &mut dyn tandem::Tx,
        events: &[tandem::Envelope],
    ) -> Result<(), tandem::HandlerError> {
        self.batch_calls.fetch_add(1, Ordering::SeqCst);
        // Half done, then failing: the rollback must undo the half.
        if let Some(first) = events.first() {
            self.ledger.handle(tx, first)?;
        }
        Err(tandem::HandlerError::transient(
            "the batch statement failed",
        ))
    }
}

#[tokio::test]
async fn a_failing_batch_handler_falls_back_to_one_event_at_a_time() {
    let ledger = Arc::new(Ledger::new());
    let refuser = Arc::new(BatchRefuser {
        ledger: Arc::clone(&ledger),
        batch_calls: std::sync::atomic::AtomicU64::new(0),
    });
    let system = start_with(
        quick_consumer(),
        ledger,
        Arc::clone(&refuser) as Arc<dyn tandem::Handler>,
    )
    .await;
    for round in 0..5_i64 {
        let deposits = (0..40)
            .map(|index| (format!("acct-{index}"), round + 1))
            .collect();
        deposit(&system.producer, deposits).await;
    }
    for index in 0..40 {
        system.wait_for_applied(&format!("acct-{index}"), 5).await;
    }
    assert!(
        refuser.batch_calls.load(Ordering::SeqCst) > 0,
        "the batch path was tried"
    );
    let rows = ledger_rows(&system.reader).await;
    assert_eq!(rows.len(), 40);
    assert!(
        rows.iter().all(|row| (row.1, row.2, row.3) == (15, 5, 5)),
        "each deposit applied once: {rows:?}"
    );
    let parked = dead_letter::depth(&system.reader, "ledger-view")
        .await
        .unwrap();
    assert_eq!(parked, 0, "nothing parked");
    system.stop().await;
}

#[tokio::test]
async fn rolled_back_transactions_publish_nothing() {
    let system = start(quick_consumer()).await;
    let result: Result<(), StoreError> = system
        .producer
        .write(|tx| {
            tandem::outbox::publish(
                tx,
                TOPIC,
                "ghost",
                &Deposited {
                    account_id: "ghost".into(),
                    amount_cents: 5,
                },
            )?;
            Err(StoreError::Engine("the business rule said no".into()))
        })
        .await;
    assert!(result.is_err());
    deposit(&system.producer, vec![("real".into(), 1)]).await;
    system.wait_for_applied("real", 1).await;
    let rows = ledger_rows(&system.reader).await;
    assert!(rows.iter().all(|row| row.0 != "ghost"), "{rows:?}");
    system.stop().await;
}

#[tokio::test]
async fn a_stale_writer_gets_a_typed_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir.path().join("s.db")).await;
    deposit(&store, vec![("a".into(), 1)]).await;
    let event = |expected: u64| {
        NewEvent::new(
            "a",
            &Deposited {
                account_id: "a".into(),
                amount_cents: 2,
            },
        )
        .unwrap()
        .expect_sequence(expected)
    };
    // Two writers both read sequence 1; the first commits 2, the second must fail.
    let first = event(1);
    store
        .write(move |tx| tandem::outbox::append(tx, TOPIC, first).map(|_| ()))
        .await
        .unwrap();
    let second = event(1);
    let error = store
        .write(move |tx| tandem::outbox::append(tx, TOPIC, second).map(|_| ()))
        .await
        .unwrap_err();
    assert!(matches!(error, _StoreErrorAlias::Conflict(_)), "{error:?}");
    let sequences: Vec<i64> = store
        .read(|tx| -> Result<Vec<i64>, StoreError> {
            tx.query("SELECT sequence FROM tandem_outbox ORDER BY position", &[])?
                .iter()
                .map(|row| row.i64(0))
                .collect()
        })
        .await
        .unwrap();
    assert_eq!(sequences, vec![1, 2]);
}

#[tokio::test]
async fn a_poison_event_is_parked_others_flow_and_redrive_applies_it_once() {
    let system = start(quick_consumer()).await;
    system.ledger.poison_amount.store(666, Ordering::SeqCst);
    system.ledger.fail_poison.store(true, Ordering::SeqCst);
    deposit(
        &system.producer,
        vec![
            ("victim".into(), 1),
            ("victim".into(), 666),
            ("victim".into(), 2),
        ],
    )
    .await;
    deposit(&system.producer, vec![("bystander".into(), 10)]).await;
    system.wait_for_applied("bystander", 1).await;
    system.wait_for_applied("victim", 1).await;

    let reader = system.reader.clone();
    eventually("poison parked with its follower", WAIT, || {
        let reader = reader.clone();
        async move {
            dead_letter::list(&reader, Some("ledger-view"), false)
                .await
                .unwrap()
                .len()
                == 2
        }
    })
    .await;
    let parked = dead_letter::list(&system.reader, Some("ledger-view"), false)
        .await
        .unwrap();
    assert_eq!(parked[0].reason, "handler");
    assert_eq!(parked[0].attempts, 3);
    assert!(parked[0].error.contains("poison"), "{}", parked[0].error);
    assert_eq!(parked[0].sequence, Some(2));
    assert_eq!(parked[1].reason, "blocked");
    assert_eq!(parked[1].sequence, Some(3));
    // Other aggregates keep flowing while the victim is blocked.
    deposit(&system.producer, vec![("bystander".into(), 5)]).await;
    system.wait_for_applied("bystander", 2).await;
    let victim = ledger_rows(&system.reader)
        .await
        .into_iter()
        .find(|row| row.0 == "victim")
        .unwrap();
    assert_eq!(
        victim.1, 1,
        "blocked aggregate must not move past the poison event"
    );

    system.ledger.fail_poison.store(false, Ordering::SeqCst);
    dead_letter::request_redrive(&system.reader, "ledger-view", Some(parked[0].id))
        .await
        .unwrap();
    system.wait_for_applied("victim", 3).await;
    // A second redrive of the same event changes nothing.
    dead_letter::request_redrive(&system.reader, "ledger-view", None)
        .await
        .unwrap();
    deposit(&system.producer, vec![("victim".into(), 100)]).await;
    system.wait_for_applied("victim", 4).await;
    let victim = ledger_rows(&system.reader)
        .await
        .into_iter()
        .find(|row| row.0 == "victim")
        .unwrap();
    assert_eq!((victim.1, victim.2), (1 + 666 + 2 + 100, 4));
    let settled = dead_letter::list(&system.reader, Some("ledger-view"), true)
        .await
        .unwrap();
    assert!(
        settled.iter().all(|letter| letter.status == "resolved"),
        "{settled:?}"
    );
    system.stop().await;
}

#[tokio::test]
async fn malformed_records_are_parked_with_the_field_at_fault() {
    let system = start(quick_consumer()).await;
    system
        .bus
        .publish(&[
            OutgoingRecord {
                topic: TOPIC.into(),
                key: "x".into(),
                payload: b"{not json".to_vec(),
            },
            OutgoingRecord {
                topic: TOPIC.into(),
                key: "x".into(),
                payload: br#"{"specversion":"1.0","id":"nope"}"#.to_vec(),
            },
        ])
        .await
        .unwrap();
    deposit(&system.producer, vec![("after".into(), 3)]).await;
    system.wait_for_applied("after", 1).await;
    let parked = dead_letter::list(&system.reader, Some("ledger-view"), false)
        .await
        .unwrap();
    assert_eq!(parked.len(), 2, "{parked:?}");
    assert!(parked.iter().all(|letter| letter.reason == "decode"));
    assert!(parked[0].error.contains("not JSON"), "{}", parked[0].error);
    assert!(
        parked[1].error.contains("id: not a UUID"),
        "{}",
        parked[1].error
    );
    system.stop().await;
}

#[tokio::test]
async fn an_event_ahead_of_a_gap_waits_then_is_reported() {
    let system = start(quick_consumer()).await;
    let record = |sequence: u64| OutgoingRecord {
        topic: TOPIC.into(),
        key: "g".into(),
        payload: tandem_testkit::deposit_bytes("g", sequence, sequence as i64),
    };
    // 1, then 3 (ahead of a gap), then 2 fills it: all three apply in order.
    system.bus.publish(&[record(1), record(3)]).await.unwrap();
    system.wait_for_applied("g", 1).await;
    system.bus.publish(&[record(2)]).await.unwrap();
    system.wait_for_applied("g", 3).await;
    // 5 arrives without 4: held, then parked with reason gap.
    system.bus.publish(&[record(5)]).await.unwrap();
    let reader = system.reader.clone();
    eventually("gap reported", WAIT, || {
        let reader = reader.clone();
        async move {
            dead_letter::list(&reader, Some("ledger-view"), false)
                .await
                .unwrap()
                .iter()
                .any(|letter| letter.reason == "gap" && letter.sequence == Some(5))
        }
    })
    .await;
    let row = ledger_rows(&system.reader)
        .await
        .into_iter()
        .find(|row| row.0 == "g")
        .unwrap();
    assert_eq!(
        (row.1, row.3),
        (1 + 2 + 3, 3),
        "5 must not be applied over the gap"
    );
    // 4 arrives late: it is parked behind the gap; redrive applies 4 then 5.
    system.bus.publish(&[record(4)]).await.unwrap();
    eventually("late event parked behind the gap", WAIT, || {
        let reader = system.reader.clone();
        async move {
            dead_letter::list(&reader, Some("ledger-view"), false)
                .await
                .unwrap()
                .len()
                == 2
        }
    })
    .await;
    dead_letter::request_redrive(&system.reader, "ledger-view", None)
        .await
        .unwrap();
    system.wait_for_applied("g", 5).await;
    let row = ledger_rows(&system.reader)
        .await
        .into_iter()
        .find(|row| row.0 == "g")
        .unwrap();
    assert_eq!((row.1, row.2), (15, 5));
    system.stop().await;
}

#[tokio::test]
async fn replay_rebuilds_the_same_read_model_while_serving() {
    let system = start(quick_consumer()).await;
    for round in 0..10 {
        let deposits = (0..30)
            .map(|index| (format!("r-{}", index % 7), round * 100 + index))
            .collect();
        deposit(&system.producer, deposits).await;
    }
    let expected_last: i64 = 10 * 30 / 7 + 1;
    let _ = expected_last;
    let producer_count: i64 = 300;
    let reader = system.reader.clone();
    eventually("all 300 deposits applied", WAIT, || {
        let reader = reader.clone();
        async move {
            ledger_rows(&reader)
                .await
                .iter()
                .map(|row| row.2)
                .sum::<i64>()
                == producer_count
        }
    })
    .await;
    let live = ledger_rows(&system.reader).await;
    dead_letter::request_replay(&system.reader, "ledger-view")
        .await
        .unwrap();
    // The read model is being rebuilt; the process keeps serving reads and writes.
    deposit(&system.producer, vec![("r-new".into(), 1)]).await;
    system.wait_for_applied("r-new", 1).await;
    eventually("replay caught up", WAIT, || {
        let reader = reader.clone();
        async move {
            ledger_rows(&reader)
                .await
                .iter()
                .map(|row| row.2)
                .sum::<i64>()
                == producer_count + 1
        }
    })
    .await;
    let mut rebuilt = ledger_rows(&system.reader).await;
    rebuilt.retain(|row| row.0 != "r-new");
    assert_eq!(rebuilt, live);
    system.stop().await;
}
