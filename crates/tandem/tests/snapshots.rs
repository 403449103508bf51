//! Snapshot events (what a re-publication sends where history was
//! pruned): a consumer applies one newer than what it applied, even across
//! a gap, and drops the events it sums up; it drops an older one, so a
//! copy never moves backwards; an event it applied, re-published, is a
//! duplicate. Real SQLite files, the embedded log.

use std::sync::Arc;
use std::time::Duration;

use tandem::bus::{Bus, OutgoingRecord};
use tandem::consumer::{Consumer, ConsumerConfig};
use tandem::store::{Store, StoreError, Tx};
use tandem::{params, Envelope, Handler, HandlerError};
use tandem_testkit::{eventually, open_log, open_store};

const TOPIC: &str = "gauges";
const WAIT: Duration = Duration::from_secs(20);

/// A copy of each gauge's value; `Set` and `GaugeSnapshot` both set it,
/// and every run of the handler is counted.
struct Copies;

impl Handler for Copies {
    fn handle(&self, tx: &mut dyn Tx, event: &Envelope) -> Result<(), HandlerError> {
        let value = event.data["value"].as_i64().unwrap_or_default();
        tx.execute(
            "INSERT INTO copies (gauge, value, sequence, runs) VALUES ($1, $2, $3, 1)
             ON CONFLICT (gauge) DO UPDATE SET value = excluded.value,
               sequence = excluded.sequence, runs = copies.runs + 1",
            params![&event.subject, value, event.sequence as i64],
        )?;
        Ok(())
    }
}

fn record(sequence: u64, value: i64, snapshot: bool) -> OutgoingRecord {
    let envelope = Envelope {
        id: tandem::envelope::new_event_id(),
        source: TOPIC.into(),
        event_type: if snapshot { "GaugeSnapshot" } else { "Set" }.into(),
        subject: "g1".into(),
        time: time::OffsetDateTime::now_utc(),
        dataschema: "tandem:test/Gauge/v1".into(),
        data: serde_json::json!({ "value": value }),
        sequence,
        traceparent: None,
        correlationid: None,
        causationid: None,
        snapshot,
    };
    OutgoingRecord {
        topic: TOPIC.into(),
        key: "g1".into(),
        payload: envelope.to_json(),
    }
}

async fn copy<S: Store>(store: &S) -> Option<(i64, i64, i64)> {
    store
        .read(|tx| -> Result<_, StoreError> {
            tx.query_opt(
                "SELECT value, sequence, runs FROM copies WHERE gauge = 'g1'",
                &[],
            )?
            .map(|row| Ok((row.i64(0)?, row.i64(1)?, row.i64(2)?)))
            .transpose()
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_newer_snapshot_applies_across_a_gap_and_an_older_one_never_moves_the_copy_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir.path().join("reader.db")).await;
    store
        .write(|tx| {
            tx.execute_batch(
                "CREATE TABLE copies (gauge TEXT PRIMARY KEY, value BIGINT NOT NULL,
                   sequence BIGINT NOT NULL, runs BIGINT NOT NULL)",
            )
        })
        .await
        .unwrap();
    let bus: Arc<dyn Bus> = Arc::new(open_log(&dir.path().join("bus.db")).await);
    let mut config = ConsumerConfig::new("copies", &[TOPIC]);
    // Long enough that the held event is not parked while the test runs.
    config.gap_timeout = Duration::from_secs(60);
    let consumer = Consumer::new(store.clone(), Arc::clone(&bus), Arc::new(Copies), config);
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { consumer.run(stop).await }
    });

    // 1 applies; 4 waits for 2 and 3, which the log lost.
    bus.publish(&[record(1, 10, false), record(4, 40, false)])
        .await
        .unwrap();
    eventually("event 1 is applied", WAIT, || async {
        copy(&store).await == Some((10, 1, 1))
    })
    .await;
    // A snapshot at 5 replaces the copy across the gap; the event it sums
    // up (4) is dropped with it, never applied.
    bus.publish(&[record(5, 50, true)]).await.unwrap();
    eventually("the snapshot at 5 replaces the copy", WAIT, || async {
        copy(&store).await == Some((50, 5, 2))
    })
    .await;
    // An older snapshot, a re-published event already applied, then the
    // next event: only the last changes anything.
    bus.publish(&[
        record(3, 30, true),
        record(5, 50, true),
        record(1, 10, false),
        record(6, 60, false),
    ])
    .await
    .unwrap();
    eventually("event 6 follows the snapshot", WAIT, || async {
        copy(&store).await == Some((60, 6, 3))
    })
    .await;
    let held: i64 = store
        .read(|tx| -> Result<i64, StoreError> {
            tx.query_opt("SELECT count(*) FROM tandem_pending", &[])?
                .unwrap()
                .i64(0)
        })
        .await
        .unwrap();
    assert_eq!(held, 0, "nothing waits for the gap the snapshot closed");
    stop.cancel();
    running.await.unwrap().unwrap();
}
