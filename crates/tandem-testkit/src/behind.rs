//! The falling-behind check every engine must pass: a consumer whose next
//! record was deleted by the log's retention stops, says why (in the log,
//! its metrics and its status) and applies nothing past the hole.

use std::sync::Arc;
use std::time::Duration;

use tandem::bus::Bus;
use tandem::consumer::{Consumer, ConsumerConfig};
use tokio_util::sync::CancellationToken;

use crate::{eventually, ledger_rows, open_store, Ledger, TOPIC};

/// Runs a new consumer of [`TOPIC`] from offset 0 on `bus`, whose log
/// must no longer hold the first records of some partition, and checks
/// that it stops with `missing` (for example `records 0..3 of ledger/0`)
/// in what it reports, applying nothing.
pub async fn a_consumer_behind_the_log_start_stops_and_says_why(
    bus: Arc<dyn Bus>,
    missing: &str,
    deadline: Duration,
) {
    let dir = tempfile::tempdir().expect("temp dir");
    let reader = open_store(&dir.path().join("reader.db")).await;
    let name = format!("late-view-{}", uuid::Uuid::now_v7().simple());
    let mut config = ConsumerConfig::new(&name, &[TOPIC]);
    config.retry_outage_max = Duration::from_millis(300);
    let consumer = Consumer::new(
        reader.clone(),
        Arc::clone(&bus),
        Arc::new(Ledger::new()),
        config,
    );
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { consumer.run(stop).await }
    });
    eventually(
        &format!("consumer {name} reports that {missing} are gone"),
        deadline,
        || async { tandem::metrics::fell_behind(&name).is_some_and(|why| why.contains(missing)) },
    )
    .await;
    assert!(
        ledger_rows(&reader).await.is_empty(),
        "nothing may be applied past the hole"
    );
    let status = tandem::status::consumer_status(
        &reader,
        bus.as_ref(),
        &tandem::status::LagCache::default(),
        &name,
        &[TOPIC.to_owned()],
    )
    .await
    .expect("status");
    assert_eq!(status.health(true), tandem::status::Health::Error);
    stop.cancel();
    running
        .await
        .expect("consumer task")
        .expect("the consumer waits; it does not fail");
}
