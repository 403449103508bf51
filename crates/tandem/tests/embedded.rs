//! The embedded log's read-ahead: a subscription starts reading the records
//! after a delivery as it hands the delivery out. What it read ahead must
//! never outlive a seek, a different batch size, or hide a later append.

use std::time::Duration;

use tandem::bus::{Bus, Delivery, OutgoingRecord, Subscription, TopicPartition};
use tandem::embedded::{EmbeddedLog, EmbeddedOptions};
use tandem::sqlite::Synchronous;

const TOPIC: &str = "read-ahead";

async fn open(dir: &tempfile::TempDir) -> EmbeddedLog {
    EmbeddedLog::open(
        dir.path().join("bus.db"),
        EmbeddedOptions {
            synchronous: Synchronous::Normal,
            partitions: 1,
            ..Default::default()
        },
    )
    .await
    .expect("open embedded log")
}

async fn publish(log: &EmbeddedLog, numbers: std::ops::Range<u64>) {
    let records: Vec<OutgoingRecord> = numbers
        .map(|number| OutgoingRecord {
            topic: TOPIC.to_owned(),
            key: "k".to_owned(),
            payload: format!("p{number}").into_bytes(),
        })
        .collect();
    log.publish(&records).await.expect("publish");
}

/// Subscribes and takes the assignment.
async fn subscribe(log: &EmbeddedLog) -> Box<dyn Subscription> {
    let mut subscription = log
        .subscribe("group", &[TOPIC.to_owned()])
        .await
        .expect("subscribe");
    let first = subscription
        .next(10, Duration::from_secs(1))
        .await
        .expect("next");
    assert_eq!(
        first,
        Some(Delivery::Assigned(vec![TopicPartition::new(TOPIC, 0)]))
    );
    subscription
}

/// The offsets of the next delivery, which must come within 5 s.
async fn offsets(subscription: &mut dyn Subscription, max_records: usize) -> Vec<u64> {
    match subscription
        .next(max_records, Duration::from_secs(5))
        .await
        .expect("next")
    {
        Some(Delivery::Records(records)) => records.iter().map(|record| record.offset).collect(),
        other => panic!("expected records, got {other:?}"),
    }
}

#[tokio::test]
async fn a_seek_drops_what_was_read_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(&dir).await;
    publish(&log, 0..10).await;
    let mut subscription = subscribe(&log).await;
    assert_eq!(offsets(&mut *subscription, 3).await, vec![0, 1, 2]);
    // 3, 4 and 5 are being read ahead now.
    subscription
        .seek(&TopicPartition::new(TOPIC, 0), 1)
        .await
        .unwrap();
    assert_eq!(offsets(&mut *subscription, 3).await, vec![1, 2, 3]);
    assert_eq!(offsets(&mut *subscription, 3).await, vec![4, 5, 6]);
}

#[tokio::test]
async fn a_different_batch_size_is_read_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(&dir).await;
    publish(&log, 0..10).await;
    let mut subscription = subscribe(&log).await;
    assert_eq!(offsets(&mut *subscription, 3).await, vec![0, 1, 2]);
    assert_eq!(offsets(&mut *subscription, 5).await, vec![3, 4, 5, 6, 7]);
    assert_eq!(offsets(&mut *subscription, 5).await, vec![8, 9]);
}

#[tokio::test]
async fn an_append_after_an_empty_read_ahead_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(&dir).await;
    publish(&log, 0..3).await;
    let mut subscription = subscribe(&log).await;
    assert_eq!(offsets(&mut *subscription, 10).await, vec![0, 1, 2]);
    // Let the read ahead find nothing, then append.
    let quiet = subscription
        .next(10, Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!(quiet, None);
    publish(&log, 3..5).await;
    assert_eq!(offsets(&mut *subscription, 10).await, vec![3, 4]);
    // Again, without the quiet look in between: the read ahead started with
    // the last delivery may have found nothing before this append.
    publish(&log, 5..6).await;
    assert_eq!(offsets(&mut *subscription, 10).await, vec![5]);
}
