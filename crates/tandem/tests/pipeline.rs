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

/// Waits until `sql` finds a row (`present`) or none (`!present`).
async fn wait_for_rows(
    reader: &tandem::sqlite::SqliteStore,
    what: &str,
    sql: &'static str,
    present: bool,
) {
    eventually(what, WAIT, || {
        let reader = reader.clone();
        async move {
            reader
                .read(move |tx| -> Result<bool, StoreError> {
                    Ok(tx.query_opt(sql, &[])?.is_some() == present)
                })
                .await
                .unwrap()
        }
    })
    .await;
}

/// Waits until `consumer` has exactly `count` parked dead letters.
async fn wait_for_parked(reader: &tandem::sqlite::SqliteStore, count: usize, what: &str) {
    eventually(what, WAIT, || {
        let reader = reader.clone();
        async move {
            dead_letter::list(&reader, Some("ledger-view"), false)
                .await
                .unwrap()
                .len()
                == count
        }
    })
    .await;
}

fn account_row(rows: &[(String, i64, i64, i64)], account: &str) -> (i64, i64, i64) {
    let row = rows
        .iter()
        .find(|row| row.0 == account)
        .unwrap_or_else(|| panic!("no ledger row for {account}: {rows:?}"));
    (row.1, row.2, row.3)
}

/// The ledger for tests that discard events: an aggregate that skips a
/// discarded sequence still only moves forward (the testkit's ledger
/// insists on sequence `n + 1`).
struct SkippingLedger(Arc<Ledger>);

impl tandem::Handler for SkippingLedger {
    fn handle(
        &self,
        tx: &mut dyn tandem::Tx,
        event: &tandem::Envelope,
    ) -> Result<(), tandem::HandlerError> {
        let deposit: tandem_testkit::Deposited = event.payload()?;
        if self.0.fail_poison.load(Ordering::SeqCst)
            && deposit.amount_cents as u64 == self.0.poison_amount.load(Ordering::SeqCst)
        {
            return Err(tandem::HandlerError::transient("poison deposit refused"));
        }
        let changed = tx.execute(
            "INSERT INTO ledger (account_id, balance_cents, applied, last_sequence)
             VALUES ($1, $2, 1, $3)
             ON CONFLICT (account_id) DO UPDATE
             SET balance_cents = ledger.balance_cents + excluded.balance_cents,
                 applied = ledger.applied + 1, last_sequence = excluded.last_sequence
             WHERE ledger.last_sequence < excluded.last_sequence",
            tandem::params![&deposit.account_id, deposit.amount_cents, event.sequence],
        )?;
        if changed != 1 {
            return Err(tandem::HandlerError::permanent(format!(
                "backwards: sequence {} of {}",
                event.sequence, deposit.account_id
            )));
        }
        Ok(())
    }

    fn reset(&self, tx: &mut dyn tandem::Tx) -> Result<(), tandem::HandlerError> {
        self.0.reset(tx)
    }
}

async fn start_skipping() -> System {
    let ledger = Arc::new(Ledger::new());
    let handler = Arc::new(SkippingLedger(Arc::clone(&ledger)));
    start_with(quick_consumer(), ledger, handler).await
}

/// Issue 18, point 5: `discard --all` must settle every parked row, not
/// only the first of each aggregate, and what was merely blocked behind
/// the discarded event still applies.
#[tokio::test]
async fn discard_all_leaves_nothing_parked_and_applies_what_was_only_blocked() {
    let system = start_skipping().await;
    system.ledger.poison_amount.store(666, Ordering::SeqCst);
    system.ledger.fail_poison.store(true, Ordering::SeqCst);
    // Sequences 1-4 apply; 5 fails for good; 6 and 7 queue behind it.
    deposit(
        &system.producer,
        vec![
            ("victim".into(), 1),
            ("victim".into(), 2),
            ("victim".into(), 3),
            ("victim".into(), 4),
            ("victim".into(), 666),
            ("victim".into(), 6),
            ("victim".into(), 7),
        ],
    )
    .await;
    wait_for_parked(&system.reader, 3, "5 parked, 6 and 7 blocked behind it").await;
    dead_letter::request_discard(&system.reader, "ledger-view", None)
        .await
        .unwrap();
    wait_for_parked(&system.reader, 0, "nothing left parked after discard --all").await;
    system.wait_for_applied("victim", 7).await;
    let rows = ledger_rows(&system.reader).await;
    assert_eq!(
        account_row(&rows, "victim"),
        (1 + 2 + 3 + 4 + 6 + 7, 6, 7),
        "the discarded event is skipped, the blocked ones apply"
    );
    let settled = dead_letter::list(&system.reader, Some("ledger-view"), true)
        .await
        .unwrap();
    let status_of = |sequence: i64| {
        settled
            .iter()
            .find(|letter| letter.sequence == Some(sequence))
            .map(|letter| letter.status.clone())
    };
    assert_eq!(status_of(5).as_deref(), Some("discarded"), "{settled:?}");
    assert_eq!(status_of(6).as_deref(), Some("resolved"), "{settled:?}");
    assert_eq!(status_of(7).as_deref(), Some("resolved"), "{settled:?}");
    system.stop().await;
}

/// Issue 18, point 5: discarding a gap letter must not mark its late
/// predecessor resolved without applying it; and (point 11) a replay
/// afterwards must not bring the discarded event back.
#[tokio::test]
async fn discarding_a_gap_letter_applies_its_late_predecessor_and_replay_keeps_it_discarded() {
    let system = start_skipping().await;
    let record = |sequence: u64, amount: i64| OutgoingRecord {
        topic: TOPIC.into(),
        key: "g".into(),
        payload: tandem_testkit::deposit_bytes("g", sequence, amount),
    };
    system
        .bus
        .publish(&[record(1, 1), record(3, 30)])
        .await
        .unwrap();
    wait_for_parked(&system.reader, 1, "3 parked as a gap").await;
    system.bus.publish(&[record(2, 2)]).await.unwrap();
    wait_for_parked(&system.reader, 2, "late 2 parked behind the gap letter").await;
    let parked = dead_letter::list(&system.reader, Some("ledger-view"), false)
        .await
        .unwrap();
    let gap = parked
        .iter()
        .find(|letter| letter.reason == "gap")
        .expect("a gap letter");
    assert_eq!(gap.sequence, Some(3));
    dead_letter::request_discard(&system.reader, "ledger-view", Some(gap.id))
        .await
        .unwrap();
    wait_for_parked(&system.reader, 0, "nothing parked after the discard").await;
    system.wait_for_applied("g", 2).await;
    // 4 follows the discarded 3 and applies.
    system.bus.publish(&[record(4, 4)]).await.unwrap();
    system.wait_for_applied("g", 4).await;
    let rows = ledger_rows(&system.reader).await;
    assert_eq!(
        account_row(&rows, "g"),
        (1 + 2 + 4, 3, 4),
        "2 applied, 3 discarded, 4 applied"
    );

    dead_letter::request_replay(&system.reader, "ledger-view")
        .await
        .unwrap();
    wait_for_rows(
        &system.reader,
        "the consumer took the replay request",
        "SELECT 1 FROM tandem_consumer_requests",
        false,
    )
    .await;
    system.bus.publish(&[record(5, 5)]).await.unwrap();
    system.wait_for_applied("g", 5).await;
    let rows = ledger_rows(&system.reader).await;
    assert_eq!(
        account_row(&rows, "g"),
        (1 + 2 + 4 + 5, 4, 5),
        "the replayed model must not contain the discarded event"
    );
    let history = dead_letter::list(&system.reader, Some("ledger-view"), true)
        .await
        .unwrap();
    assert!(
        history
            .iter()
            .any(|letter| letter.sequence == Some(3) && letter.status == "discarded"),
        "replay kept the discard on record: {history:?}"
    );
    assert!(
        history.iter().all(|letter| letter.status != "parked"),
        "{history:?}"
    );
    system.stop().await;
}

/// An undecodable record that an operator discarded stays discarded when
/// a replay meets it again: it is not parked a second time.
#[tokio::test]
async fn a_discarded_undecodable_record_is_not_parked_again_by_a_replay() {
    let system = start_skipping().await;
    system
        .bus
        .publish(&[
            OutgoingRecord {
                topic: TOPIC.into(),
                key: "junk".into(),
                payload: b"not an envelope".to_vec(),
            },
            OutgoingRecord {
                topic: TOPIC.into(),
                key: "u".into(),
                payload: tandem_testkit::deposit_bytes("u", 1, 1),
            },
        ])
        .await
        .unwrap();
    wait_for_parked(&system.reader, 1, "the junk parked").await;
    system.wait_for_applied("u", 1).await;
    dead_letter::request_discard(&system.reader, "ledger-view", None)
        .await
        .unwrap();
    wait_for_parked(&system.reader, 0, "nothing parked after the discard").await;

    dead_letter::request_replay(&system.reader, "ledger-view")
        .await
        .unwrap();
    wait_for_rows(
        &system.reader,
        "the consumer took the replay request",
        "SELECT 1 FROM tandem_consumer_requests",
        false,
    )
    .await;
    // A record after the junk: once it is applied, the replay has passed
    // the junk's offset.
    system
        .bus
        .publish(&[OutgoingRecord {
            topic: TOPIC.into(),
            key: "u".into(),
            payload: tandem_testkit::deposit_bytes("u", 2, 2),
        }])
        .await
        .unwrap();
    system.wait_for_applied("u", 2).await;
    let history = dead_letter::list(&system.reader, Some("ledger-view"), true)
        .await
        .unwrap();
    assert_eq!(history.len(), 1, "one letter on record: {history:?}");
    assert_eq!(history[0].status, "discarded", "{history:?}");
    system.stop().await;
}

/// Issue 18, point 6: a sequence above what a store can hold is refused
/// by the decoder and parked; the consumer goes on, and starts again.
#[tokio::test]
async fn a_sequence_beyond_i64_is_parked_and_the_consumer_keeps_running() {
    let system = start(quick_consumer()).await;
    let mut crafted: serde_json::Value =
        serde_json::from_slice(&tandem_testkit::deposit_bytes("huge", 1, 5)).unwrap();
    crafted["sequence"] = serde_json::Value::from(i64::MAX as u64 + 1);
    system
        .bus
        .publish(&[OutgoingRecord {
            topic: TOPIC.into(),
            key: "huge".into(),
            payload: serde_json::to_vec(&crafted).unwrap(),
        }])
        .await
        .unwrap();
    deposit(&system.producer, vec![("after".into(), 3)]).await;
    system.wait_for_applied("after", 1).await;
    wait_for_parked(&system.reader, 1, "the crafted event parked").await;
    let parked = dead_letter::list(&system.reader, Some("ledger-view"), false)
        .await
        .unwrap();
    assert_eq!(parked[0].reason, "decode", "{parked:?}");
    assert!(parked[0].error.contains("sequence"), "{}", parked[0].error);
    // A consumer started again on the same database works.
    let reader = system.reader.clone();
    let bus = Arc::clone(&system.bus);
    let ledger = Arc::clone(&system.ledger);
    let producer = system.producer.clone();
    let _dir = system._dir;
    system.shutdown.cancel();
    for task in system.tasks {
        task.await.unwrap();
    }
    let shutdown = CancellationToken::new();
    let consumer = Consumer::new(reader.clone(), Arc::clone(&bus), ledger, quick_consumer());
    let consumer_shutdown = shutdown.clone();
    let task =
        tokio::spawn(async move { consumer.run(consumer_shutdown).await.expect("consumer") });
    deposit(&producer, vec![("after".into(), 4)]).await;
    Relay::new(producer.clone(), bus, RelayConfig::default())
        .drain()
        .await
        .unwrap();
    eventually("the restarted consumer applies", WAIT, || {
        let reader = reader.clone();
        async move {
            ledger_rows(&reader)
                .await
                .iter()
                .any(|row| row.0 == "after" && row.3 >= 2)
        }
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
}

/// Issue 18, point 4: the time an event waits ahead of a gap is measured
/// on the consumer's own monotonic clock. A `received_at` written by a
/// host whose clock is an hour behind (or a clock that jumped) must not
/// get the event parked before the gap timeout has passed here.
#[tokio::test]
async fn a_held_event_waits_the_gap_timeout_whatever_the_wall_clock_says() {
    let mut config = quick_consumer();
    config.gap_timeout = Duration::from_secs(2);
    let system = start(config).await;
    let record = |sequence: u64| OutgoingRecord {
        topic: TOPIC.into(),
        key: "skew".into(),
        payload: tandem_testkit::deposit_bytes("skew", sequence, 1),
    };
    system.bus.publish(&[record(1), record(3)]).await.unwrap();
    let reader = system.reader.clone();
    wait_for_rows(
        &reader,
        "3 held ahead of the gap",
        "SELECT 1 FROM tandem_pending WHERE subject = 'skew'",
        true,
    )
    .await;
    let held_since = tokio::time::Instant::now();
    // As another host an hour behind would have written it.
    system
        .reader
        .write(|tx| -> Result<u64, StoreError> {
            tx.execute(
                "UPDATE tandem_pending SET received_at = received_at - 3600000000",
                &[],
            )
        })
        .await
        .unwrap();
    eventually("3 parked as a gap", WAIT, || {
        let reader = reader.clone();
        async move {
            !dead_letter::list(&reader, Some("ledger-view"), false)
                .await
                .unwrap()
                .is_empty()
        }
    })
    .await;
    let waited = held_since.elapsed();
    assert!(
        waited >= Duration::from_secs(1),
        "parked after {waited:?}, well before the 2 s gap timeout"
    );
    system.stop().await;
}
