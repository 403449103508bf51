//! The consumer on PostgreSQL with records the engine refuses: a record
//! tied to a store error is parked, and the consumer (and the service with
//! it) keeps running. Real PostgreSQL, a scratch database per test; the bus
//! is the embedded log in a temporary directory.

use std::sync::Arc;
use std::time::Duration;

use tandem::bus::{Bus, OutgoingRecord};
use tandem::consumer::{Consumer, ConsumerConfig};
use tandem::dead_letter;
use tandem::embedded::{EmbeddedLog, EmbeddedOptions};
use tandem::store::Store;
use tandem_postgres::testing::{base_url, ScratchDatabase};
use tandem_testkit::{deposit_bytes, eventually, install_ledger, ledger_rows, Ledger, TOPIC};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

fn record(account: &str, sequence: u64, amount: i64) -> OutgoingRecord {
    OutgoingRecord {
        topic: TOPIC.into(),
        key: account.into(),
        payload: deposit_bytes(account, sequence, amount),
    }
}

/// Issue 18, point 6: PostgreSQL cannot store a NUL character in text. An
/// event whose subject carries one used to fail the whole batch with a
/// store error that ended the consumer, on every restart. It is parked now,
/// the other events flow, and a redrive of it fails on the letter alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_store_refuses_is_parked_and_the_consumer_keeps_running() {
    let base = base_url();
    let database =
        ScratchDatabase::create_blocking(&base, "refused_record").unwrap_or_else(|error| {
            panic!("PostgreSQL not reachable at {base}: start it with scripts/engines up ({error})")
        });
    let store = database.store().await.expect("store");
    store.write(install_ledger).await.expect("ledger table");
    let dir = tempfile::tempdir().unwrap();
    let bus: Arc<dyn Bus> = Arc::new(
        EmbeddedLog::open(
            dir.path().join("bus.db"),
            EmbeddedOptions {
                synchronous: tandem::sqlite::Synchronous::Normal,
                partitions: 1,
                ..Default::default()
            },
        )
        .await
        .expect("embedded log"),
    );
    let mut config = ConsumerConfig::new("ledger-view", &[TOPIC]);
    config.retry_initial = Duration::from_millis(5);
    config.retry_max = Duration::from_millis(20);
    config.housekeeping_interval = Duration::from_millis(20);
    let consumer = Consumer::new(
        store.clone(),
        Arc::clone(&bus),
        Arc::new(Ledger::new()),
        config,
    );
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move { consumer.run(token).await });

    bus.publish(&[
        record("before", 1, 1),
        record("nul\u{0}subject", 1, 5),
        record("after", 1, 3),
    ])
    .await
    .unwrap();
    let wait_for = |account: &'static str, sequence: i64| {
        let store = store.clone();
        async move {
            eventually(&format!("{account} at {sequence}"), WAIT, || {
                let store = store.clone();
                async move {
                    ledger_rows(&store)
                        .await
                        .iter()
                        .any(|row| row.0 == account && row.3 >= sequence)
                }
            })
            .await
        }
    };
    wait_for("after", 1).await;
    wait_for("before", 1).await;
    let parked = dead_letter::list(&store, Some("ledger-view"), false)
        .await
        .unwrap();
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].reason, "store", "{parked:?}");

    // A redrive meets the same refusal: recorded on the letter, and the
    // consumer goes on.
    dead_letter::request_redrive(&store, "ledger-view", None)
        .await
        .unwrap();
    bus.publish(&[record("after", 2, 4)]).await.unwrap();
    wait_for("after", 2).await;
    let parked = dead_letter::list(&store, Some("ledger-view"), false)
        .await
        .unwrap();
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert!(parked[0].error.contains("refused"), "{}", parked[0].error);
    assert!(!task.is_finished(), "the consumer stopped");
    shutdown.cancel();
    task.await.unwrap().expect("consumer");
}
