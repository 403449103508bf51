//! The embedded log's segments: a partition's records fill a run of
//! tables, retention drops a segment whole once its rule takes every
//! record in it (and prunes the segment still being written record by
//! record), reads cross segments, offsets never repeat, and a file made
//! before segments keeps its records and is pruned like the rest.

use std::time::Duration;

use tandem::bus::{Bus, BusError, Delivery, OutgoingRecord, TopicPartition};
use tandem::embedded::{EmbeddedLog, EmbeddedOptions};
use tandem::sqlite::Synchronous;

const TOPIC: &str = "shelf";

/// A log that opens a new segment at every append.
async fn open(path: &std::path::Path) -> EmbeddedLog {
    EmbeddedLog::open(
        path,
        EmbeddedOptions {
            synchronous: Synchronous::Normal,
            partitions: 1,
            segment_bytes: 1,
        },
    )
    .await
    .expect("open embedded log")
}

async fn publish(log: &EmbeddedLog, offsets: std::ops::Range<u64>) {
    let records: Vec<OutgoingRecord> = offsets
        .map(|n| OutgoingRecord {
            topic: TOPIC.into(),
            key: "k".into(),
            payload: format!("record {n}").into_bytes(),
        })
        .collect();
    log.publish(&records).await.expect("publish");
}

fn segment_tables(path: &std::path::Path) -> i64 {
    rusqlite::Connection::open(path)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name LIKE 'log\\_segment\\_%' ESCAPE '\\'",
            [],
            |row| row.get(0),
        )
        .unwrap()
}

/// Every offset a member reads from `from`, until nothing more comes.
async fn read_from(log: &EmbeddedLog, from: u64) -> Result<Vec<u64>, BusError> {
    let mut member = log.subscribe("reader", &[TOPIC.to_owned()]).await?;
    let assigned = member.next(10, Duration::from_secs(5)).await?;
    assert!(matches!(assigned, Some(Delivery::Assigned(_))));
    member
        .seek(&TopicPartition::new(TOPIC, 0), from)
        .await
        .unwrap();
    let mut offsets = Vec::new();
    while let Some(Delivery::Records(records)) = member.next(3, Duration::from_millis(200)).await? {
        offsets.extend(records.iter().map(|record| record.offset));
    }
    Ok(offsets)
}

#[tokio::test(flavor = "multi_thread")]
async fn whole_segments_go_and_reads_cross_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let log = open(&path).await;
    for batch in 0..5 {
        publish(&log, batch * 2..batch * 2 + 2).await;
    }
    assert_eq!(segment_tables(&path), 5, "a segment an append");
    assert_eq!(
        read_from(&log, 0).await.unwrap(),
        (0..10).collect::<Vec<_>>()
    );

    // Keep 5: the segments of 0-1 and 2-3 go whole; that of 4-5 holds 5,
    // which the rule keeps, so it stays whole too.
    assert_eq!(log.prune(None, Some(5), 100).await.unwrap(), 4);
    assert_eq!(segment_tables(&path), 3);
    assert_eq!(log.start_offsets(TOPIC).await.unwrap(), vec![(0, 4)]);
    assert_eq!(log.payload_at(TOPIC, 0, 3).await.unwrap(), None);
    assert_eq!(
        log.payload_at(TOPIC, 0, 7).await.unwrap(),
        Some(b"record 7".to_vec())
    );
    let behind = read_from(&log, 0).await.unwrap_err().to_string();
    assert!(
        behind.contains("0") && behind.contains("pruned"),
        "{behind}"
    );
    assert_eq!(
        read_from(&log, 4).await.unwrap(),
        (4..10).collect::<Vec<_>>()
    );

    // Keep 1: full segments go whole, the one being written record by record.
    assert_eq!(log.prune(None, Some(1), 100).await.unwrap(), 5);
    assert_eq!(log.start_offsets(TOPIC).await.unwrap(), vec![(0, 9)]);
    assert_eq!(read_from(&log, 9).await.unwrap(), vec![9]);

    // By age, everything goes, the segment being written too; offsets go on.
    assert_eq!(log.prune(Some(Duration::ZERO), None, 100).await.unwrap(), 1);
    assert_eq!(segment_tables(&path), 0);
    assert_eq!(log.start_offsets(TOPIC).await.unwrap(), vec![(0, 10)]);
    publish(&log, 10..12).await;
    assert_eq!(log.end_offsets(TOPIC).await.unwrap(), vec![(0, 12)]);
    assert_eq!(read_from(&log, 10).await.unwrap(), vec![10, 11]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_made_before_segments_keeps_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    {
        // The log's tables as they were before segments, with three records.
        let file = rusqlite::Connection::open(&path).unwrap();
        file.execute_batch(
            "CREATE TABLE log_meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT INTO log_meta VALUES ('partitions', 1);
             CREATE TABLE log_topics (topic TEXT PRIMARY KEY, partitions INTEGER NOT NULL);
             INSERT INTO log_topics VALUES ('shelf', 1);
             CREATE TABLE log_heads (topic TEXT NOT NULL, partition INTEGER NOT NULL,
               next_offset INTEGER NOT NULL, PRIMARY KEY (topic, partition)) WITHOUT ROWID;
             INSERT INTO log_heads VALUES ('shelf', 0, 3);
             CREATE TABLE log_records (topic TEXT NOT NULL, partition INTEGER NOT NULL,
               record_offset INTEGER NOT NULL, record_key TEXT NOT NULL, payload BLOB NOT NULL,
               appended_at INTEGER NOT NULL, PRIMARY KEY (topic, partition, record_offset))
               WITHOUT ROWID;
             INSERT INTO log_records VALUES ('shelf', 0, 0, 'k', X'7265636f72642030', 1),
               ('shelf', 0, 1, 'k', X'7265636f72642031', 2),
               ('shelf', 0, 2, 'k', X'7265636f72642032', 3);",
        )
        .unwrap();
    }
    let log = open(&path).await;
    publish(&log, 3..5).await;
    assert_eq!(
        read_from(&log, 0).await.unwrap(),
        (0..5).collect::<Vec<_>>()
    );
    assert_eq!(
        log.payload_at(TOPIC, 0, 1).await.unwrap(),
        Some(b"record 1".to_vec())
    );
    // Opened again: the old records are adopted once, not twice.
    drop(log);
    let log = open(&path).await;
    assert_eq!(
        read_from(&log, 0).await.unwrap(),
        (0..5).collect::<Vec<_>>()
    );
    // The old records go first, a batch at a time, then the segments.
    assert_eq!(log.prune(None, Some(2), 2).await.unwrap(), 3);
    assert_eq!(log.start_offsets(TOPIC).await.unwrap(), vec![(0, 3)]);
    assert_eq!(read_from(&log, 3).await.unwrap(), vec![3, 4]);
    publish(&log, 5..6).await;
    assert_eq!(log.prune(None, Some(1), 2).await.unwrap(), 2);
    assert_eq!(read_from(&log, 5).await.unwrap(), vec![5]);
}
