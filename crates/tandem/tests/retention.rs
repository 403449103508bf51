//! Retention on the embedded engines: pruning takes only what the rules
//! allow (published outbox rows, resolved dead letters, old log records)
//! and never what a service's promises rest on: after pruning, sequences
//! go on from where they were (across a restart, and a stale writer is
//! still refused), a relay that restarts publishes the rest exactly once,
//! and log offsets never repeat.

use std::sync::Arc;
use std::time::Duration;

use tandem::bus::{Bus, OutgoingRecord};
use tandem::relay::{Relay, RelayConfig};
use tandem::retention::{self, Retention};
use tandem::store::{Store, StoreError};
use tandem_testkit::*;

const WAIT: Duration = Duration::from_secs(20);

/// Rules that prune everything old enough at once (age zero), nothing
/// else.
fn prune_all() -> Retention {
    Retention {
        outbox_age: Some(Duration::ZERO),
        resolved_age: None,
        discarded_age: None,
        log_age: None,
        log_records: None,
        ..Retention::default()
    }
}

async fn count<S: Store>(store: &S, sql: &'static str) -> i64 {
    store
        .read(move |tx| -> Result<i64, StoreError> {
            tx.query_opt(sql, &[])?.expect("a count").i64(0)
        })
        .await
        .unwrap()
}

async fn last_sequence<S: Store>(store: &S, subject: &'static str) -> i64 {
    store
        .read(move |tx| -> Result<i64, StoreError> {
            tx.query_opt(
                "SELECT sequence FROM tandem_aggregates WHERE subject = $1",
                tandem::params![subject],
            )?
            .expect("the aggregate")
            .i64(0)
        })
        .await
        .unwrap()
}

/// `n` deposits of 1 cent to each of accounts `a` and `b`, interleaved.
fn a_and_b(n: usize) -> Vec<(String, i64)> {
    (0..n)
        .flat_map(|_| [("a".to_owned(), 1), ("b".to_owned(), 1)])
        .collect()
}

#[tokio::test]
async fn pruning_takes_only_published_rows_and_sequences_and_the_relay_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("producer.db");
    let store = open_store(&path).await;
    let bus: Arc<dyn Bus> = Arc::new(open_log(&dir.path().join("bus.db")).await);
    deposit(&store, a_and_b(5)).await;
    // The relay publishes the first 4 of the 10, as if it then crashed.
    let relay = Relay::new(
        store.clone(),
        Arc::clone(&bus),
        RelayConfig {
            batch_size: 4,
            ..RelayConfig::default()
        },
    );
    assert_eq!(relay.publish_once().await.unwrap(), 4);

    let pruned = retention::prune_once(&store, bus.as_ref(), Some("relay"), &prune_all())
        .await
        .unwrap();
    assert_eq!(pruned.outbox, 4, "only the published rows go");
    assert_eq!(count(&store, "SELECT count(*) FROM tandem_outbox").await, 6);

    // A relay starting again publishes the other 6, and nothing twice.
    let restarted = Relay::new(store.clone(), Arc::clone(&bus), RelayConfig::default());
    assert_eq!(restarted.drain().await.unwrap(), 6);
    let records = read_topic(bus.as_ref(), "check", TOPIC, 10, WAIT).await;
    let mut seen: Vec<(String, u64)> = records
        .iter()
        .map(|record| {
            let envelope = tandem::Envelope::decode(&record.payload).unwrap();
            (envelope.subject, envelope.sequence)
        })
        .collect();
    seen.sort();
    let expected: Vec<(String, u64)> = ["a", "b"]
        .iter()
        .flat_map(|subject| (1..=5).map(move |sequence| (subject.to_string(), sequence)))
        .collect();
    assert_eq!(seen, expected);
    retention::prune_once(&store, bus.as_ref(), Some("relay"), &prune_all())
        .await
        .unwrap();
    assert_eq!(count(&store, "SELECT count(*) FROM tandem_outbox").await, 0);

    // Sequences go on where they were, across a restart of the store.
    deposit(&store, vec![("a".to_owned(), 1)]).await;
    assert_eq!(last_sequence(&store, "a").await, 6);
    store.close().await.unwrap();
    drop(store);
    let store = open_store(&path).await;
    deposit(&store, vec![("a".to_owned(), 1)]).await;
    assert_eq!(last_sequence(&store, "a").await, 7);
    // A writer that read the aggregate at 5 is still refused.
    let stale = store
        .write(|tx| -> Result<_, StoreError> {
            tandem::outbox::append(tx, TOPIC, deposit_event("a", 1)?.expect_sequence(5))
        })
        .await;
    assert!(
        matches!(stale, Err(StoreError::Conflict(_))),
        "a stale writer after pruning: {stale:?}"
    );
}

#[tokio::test]
async fn a_busy_outbox_is_set_aside_whole_and_its_rows_still_published_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir.path().join("producer.db")).await;
    let bus: Arc<dyn Bus> = Arc::new(open_log(&dir.path().join("bus.db")).await);
    deposit(&store, a_and_b(5)).await;
    let relay = Relay::new(
        store.clone(),
        Arc::clone(&bus),
        RelayConfig {
            batch_size: 4,
            ..RelayConfig::default()
        },
    );
    assert_eq!(relay.publish_once().await.unwrap(), 4);

    // Ten rows, batches of three: the table is set aside whole, and as 6
    // of its rows are not published yet, it stays.
    let rules = Retention {
        batch: 3,
        ..prune_all()
    };
    let pruned = retention::prune_once(&store, bus.as_ref(), Some("relay"), &rules)
        .await
        .unwrap();
    assert_eq!(pruned.outbox, 0);
    assert_eq!(count(&store, "SELECT count(*) FROM tandem_outbox").await, 0);
    let aside = "SELECT count(*) FROM sqlite_master WHERE name LIKE 'tandem\\_outbox\\_upto\\_%' ESCAPE '\\'";
    assert_eq!(count(&store, aside).await, 1);
    let backlog = store
        .read(|tx| tx.engine().relay_backlog(tx, "relay"))
        .await
        .unwrap();
    assert_eq!(backlog.0, 6, "the rows set aside are still to publish");

    // New rows go on from position 11 in a new table; a relay publishes
    // the rows set aside first, then the new ones, each once, in order.
    deposit(&store, a_and_b(1)).await;
    let restarted = Relay::new(store.clone(), Arc::clone(&bus), RelayConfig::default());
    assert_eq!(restarted.drain().await.unwrap(), 8);
    let records = read_topic(bus.as_ref(), "check", TOPIC, 12, WAIT).await;
    let mut per_subject: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for record in &records {
        let envelope = tandem::Envelope::decode(&record.payload).unwrap();
        per_subject
            .entry(envelope.subject)
            .or_default()
            .push(envelope.sequence);
    }
    assert_eq!(per_subject["a"], (1..=6).collect::<Vec<_>>());
    assert_eq!(per_subject["b"], (1..=6).collect::<Vec<_>>());

    // All published: the table set aside goes whole, the two new rows one
    // by one (fewer than a batch).
    let pruned = retention::prune_once(&store, bus.as_ref(), Some("relay"), &rules)
        .await
        .unwrap();
    assert_eq!(pruned.outbox, 12);
    assert_eq!(count(&store, aside).await, 0);
    assert_eq!(count(&store, "SELECT count(*) FROM tandem_outbox").await, 0);
    deposit(&store, vec![("a".to_owned(), 1)]).await;
    assert_eq!(last_sequence(&store, "a").await, 7);
    assert_eq!(
        count(&store, "SELECT position FROM tandem_outbox").await,
        13,
        "positions never repeat"
    );
}

#[tokio::test]
async fn pruning_dead_letters_takes_the_resolved_keeps_the_discarded_by_default_and_never_the_parked(
) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir.path().join("reader.db")).await;
    let bus: Arc<dyn Bus> = Arc::new(open_log(&dir.path().join("bus.db")).await);
    store
        .write(|tx| -> Result<(), StoreError> {
            for (offset, status) in [(1, "parked"), (2, "resolved"), (3, "discarded")] {
                tx.execute(
                    "INSERT INTO tandem_dead_letters (consumer, topic, partition, record_offset,
                       payload, reason, error, attempts, first_failed_at, last_failed_at, status)
                     VALUES ('view', 'ledger', 0, $1, $2, 'handler', 'boom', 1, 1, 1, $3)",
                    &[
                        tandem::store::Param::from(offset),
                        tandem::store::Param::Blob(b"x"),
                        tandem::store::Param::Text(status),
                    ],
                )?;
            }
            Ok(())
        })
        .await
        .unwrap();
    let rules = Retention {
        outbox_age: None,
        resolved_age: Some(Duration::from_secs(1)),
        ..prune_all()
    };
    let pruned = retention::prune_once(&store, bus.as_ref(), None, &rules)
        .await
        .unwrap();
    assert_eq!(pruned.dead_letters, 1);
    let statuses = |store: tandem::sqlite::SqliteStore| async move {
        store
            .read(|tx| -> Result<Vec<String>, StoreError> {
                tx.query("SELECT status FROM tandem_dead_letters ORDER BY id", &[])?
                    .iter()
                    .map(|row| Ok(row.text(0)?.to_owned()))
                    .collect()
            })
            .await
            .unwrap()
    };
    assert_eq!(statuses(store.clone()).await, ["parked", "discarded"]);
    let rules = Retention {
        discarded_age: Some(Duration::from_secs(1)),
        ..rules
    };
    retention::prune_once(&store, bus.as_ref(), None, &rules)
        .await
        .unwrap();
    assert_eq!(
        statuses(store.clone()).await,
        ["parked"],
        "parked is never pruned"
    );
    let refused = store
        .write(|tx| retention::prune_dead_letters_in(tx, "parked", Duration::ZERO, 10))
        .await;
    assert!(refused.is_err(), "{refused:?}");
}

#[tokio::test]
async fn the_log_keeps_its_newest_records_and_its_offsets_never_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir.path().join("producer.db")).await;
    let bus: Arc<dyn Bus> = Arc::new(open_log(&dir.path().join("bus.db")).await);
    let record = |n: usize| OutgoingRecord {
        topic: TOPIC.into(),
        key: "one-key".into(),
        payload: format!("record {n}").into_bytes(),
    };
    bus.publish(&(0..10).map(record).collect::<Vec<_>>())
        .await
        .unwrap();
    let rules = Retention {
        outbox_age: None,
        log_records: Some(3),
        batch: 2,
        ..prune_all()
    };
    let pruned = retention::prune_once(&store, bus.as_ref(), None, &rules)
        .await
        .unwrap();
    assert_eq!(
        pruned.log, 7,
        "small batches, until only the newest 3 are left"
    );
    bus.publish(&[record(10)]).await.unwrap();
    let ends = bus.end_offsets(TOPIC).await.unwrap();
    let end = ends.iter().map(|(_, end)| *end).max().unwrap();
    assert_eq!(end, 11, "offsets go on from the head: {ends:?}");
    let partition = ends.iter().find(|(_, end)| *end == 11).unwrap().0;
    for offset in 0..7 {
        assert_eq!(
            bus.payload_at(TOPIC, partition, offset).await.unwrap(),
            None,
            "offset {offset} is pruned"
        );
    }
    for offset in 7..11 {
        assert_eq!(
            bus.payload_at(TOPIC, partition, offset).await.unwrap(),
            Some(format!("record {offset}").into_bytes()),
        );
    }
}

/// A member whose next record was pruned is told so, with the topic and
/// the missing range, instead of being handed what comes after; a
/// consumer then applies nothing and says why (in the log, and in what
/// its service reports), and never skips.
#[tokio::test]
async fn a_consumer_behind_the_retention_stops_with_the_missing_range_and_skips_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let reader = open_store(&dir.path().join("reader.db")).await;
    let bus: Arc<dyn Bus> = Arc::new(open_log(&dir.path().join("bus.db")).await);
    let records: Vec<OutgoingRecord> = (1..=5)
        .map(|sequence| OutgoingRecord {
            topic: TOPIC.into(),
            key: "late".into(),
            payload: deposit_bytes("late", sequence, 1),
        })
        .collect();
    bus.publish(&records).await.unwrap();
    let rules = Retention {
        outbox_age: None,
        log_records: Some(2),
        ..prune_all()
    };
    let pruned = retention::prune_once(&reader, bus.as_ref(), None, &rules)
        .await
        .unwrap();
    assert_eq!(pruned.log, 3);

    // The bus itself: the missing range, named.
    let mut member = bus
        .subscribe("late-reader", &[TOPIC.to_owned()])
        .await
        .unwrap();
    let mut refused = None;
    for _ in 0..4 {
        match member.next(10, Duration::from_millis(200)).await {
            Ok(_) => continue,
            Err(error) => {
                refused = Some(error);
                break;
            }
        }
    }
    let refused = refused.expect("the member is told its records were pruned");
    assert_eq!(refused.kind(), "pruned", "{refused}");
    let text = refused.to_string();
    assert!(text.contains("records 0..3 of ledger/"), "{text}");

    // A consumer: nothing applied, the reason reported, not skipped.
    let ledger = Arc::new(Ledger::new());
    let mut config = tandem::consumer::ConsumerConfig::new("late-view", &[TOPIC]);
    config.retry_outage_max = Duration::from_millis(200);
    let consumer =
        tandem::consumer::Consumer::new(reader.clone(), Arc::clone(&bus), ledger, config);
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { consumer.run(stop).await }
    });
    eventually("the consumer says why it cannot go on", WAIT, || async {
        tandem::metrics::fell_behind("late-view")
            .is_some_and(|why| why.contains("records 0..3 of ledger/"))
    })
    .await;
    assert!(
        ledger_rows(&reader).await.is_empty(),
        "nothing applied past the gap"
    );
    // What a status of the consumer says, from its database and the log
    // (as `tandem status --data-dir` reads them): error, and why.
    let status = tandem::status::consumer_status(
        &reader,
        bus.as_ref(),
        &tandem::status::LagCache::default(),
        "late-view",
        &[TOPIC.to_owned()],
    )
    .await
    .unwrap();
    assert_eq!(status.health(true), tandem::status::Health::Error);
    let why = status.pruned().expect("the pruned range");
    assert!(why.contains("records 0..3 of ledger/"), "{why}");
    stop.cancel();
    running.await.unwrap().unwrap();
}
