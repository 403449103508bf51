//! A relay on a bus that takes several publishes at once
//! ([`Bus::publish_depth`]) keeps batches in flight while the ones before
//! them await their acknowledgements, and a failed batch among them is
//! published again with the batches after it: the consumer applies every
//! event once, in each aggregate's order. Real SQLite files and the
//! embedded log, behind a bus that acknowledges slowly and refuses one
//! batch (a fault the log cannot produce on demand).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem::bus::{Acknowledgements, Bus, BusError, OutgoingRecord, Subscription};
use tandem::consumer::{Consumer, ConsumerConfig};
use tandem::relay::{Relay, RelayConfig};
use tandem::store::Store;
use tandem_testkit::*;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// The embedded log, acknowledging each batch 30 ms after appending it,
/// with room for `depth` unacknowledged batches; when `fail_third`, its
/// third batch is not appended and its acknowledgement fails.
struct SlowAcks {
    inner: Arc<dyn Bus>,
    depth: usize,
    fail_third: bool,
    calls: AtomicUsize,
    in_flight: Arc<AtomicUsize>,
    most_in_flight: Arc<AtomicUsize>,
    failed: AtomicBool,
}

#[async_trait::async_trait]
impl Bus for SlowAcks {
    async fn publish(&self, records: &[OutgoingRecord]) -> Result<(), BusError> {
        self.enqueue(records.to_vec()).await?.await
    }

    async fn enqueue(&self, records: Vec<OutgoingRecord>) -> Result<Acknowledgements, BusError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let refused = self.fail_third && call == 3;
        if refused {
            self.failed.store(true, Ordering::SeqCst);
        } else {
            self.inner.publish(&records).await?;
        }
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        let in_flight = Arc::clone(&self.in_flight);
        Ok(Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            in_flight.fetch_sub(1, Ordering::SeqCst);
            if refused {
                Err(BusError::Unavailable("the third batch is refused".into()))
            } else {
                Ok(())
            }
        }))
    }

    async fn subscribe(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<Box<dyn Subscription>, BusError> {
        self.inner.subscribe(group, topics).await
    }

    async fn end_offsets(&self, topic: &str) -> Result<Vec<(u32, u64)>, BusError> {
        self.inner.end_offsets(topic).await
    }

    async fn payload_at(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<Option<Vec<u8>>, BusError> {
        self.inner.payload_at(topic, partition, offset).await
    }

    fn publish_depth(&self) -> usize {
        self.depth
    }
}

/// Deposits `rounds` × 40 events over 7 accounts in small relay batches,
/// relayed through a [`SlowAcks`] bus, and consumed; returns the bus once
/// the read model holds every event.
async fn relay_through(depth: usize, fail_third: bool, rounds: usize) -> Arc<SlowAcks> {
    let dir = tempfile::tempdir().unwrap();
    let producer = open_store(&dir.path().join("producer.db")).await;
    let reader = open_store(&dir.path().join("reader.db")).await;
    let log: Arc<dyn Bus> = Arc::new(open_log(&dir.path().join("bus.db")).await);
    let bus = Arc::new(SlowAcks {
        inner: Arc::clone(&log),
        depth,
        fail_third,
        calls: AtomicUsize::new(0),
        in_flight: Arc::new(AtomicUsize::new(0)),
        most_in_flight: Arc::new(AtomicUsize::new(0)),
        failed: AtomicBool::new(false),
    });
    let mut expected = std::collections::BTreeMap::new();
    // Committed before the relay starts, so that it finds many batches.
    for round in 0..rounds {
        let deposits: Vec<(String, i64)> = (0..40)
            .map(|index| (format!("acct-{}", (round + index) % 7), index as i64 + 1))
            .collect();
        for (account, amount) in &deposits {
            let entry = expected.entry(account.clone()).or_insert((0_i64, 0_i64));
            entry.0 += amount;
            entry.1 += 1;
        }
        deposit(&producer, deposits).await;
    }
    let shutdown = CancellationToken::new();
    let relay_config = RelayConfig {
        batch_size: 25,
        retry_initial: Duration::from_millis(5),
        ..RelayConfig::default()
    };
    let relay = Relay::new(
        producer.clone(),
        Arc::clone(&bus) as Arc<dyn Bus>,
        relay_config,
    );
    let mut consumer_config = ConsumerConfig::new("ledger-view", &[TOPIC]);
    consumer_config.housekeeping_interval = Duration::from_millis(20);
    let consumer = Consumer::new(
        reader.clone(),
        Arc::clone(&log),
        Arc::new(Ledger::new()),
        consumer_config,
    );
    let tasks = [
        tokio::spawn({
            let shutdown = shutdown.clone();
            async move { relay.run(shutdown).await.expect("relay") }
        }),
        tokio::spawn({
            let shutdown = shutdown.clone();
            async move { consumer.run(shutdown).await.expect("consumer") }
        }),
    ];
    eventually("the read model holds every deposit", WAIT, || {
        let (reader, expected) = (reader.clone(), expected.clone());
        async move {
            let rows = ledger_rows(&reader).await;
            rows.len() == expected.len()
                && rows.iter().all(|(account, balance, applied, last)| {
                    let (balance_wanted, count) = expected[account];
                    *balance == balance_wanted && *applied == count && *last == count
                })
        }
    })
    .await;
    shutdown.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    let parked: i64 = reader
        .read(|tx| {
            tx.query_opt("SELECT COUNT(*) FROM tandem_dead_letters", &[])?
                .map_or(Ok(0), |row| row.i64(0))
        })
        .await
        .unwrap();
    assert_eq!(parked, 0, "nothing parked");
    bus
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_overlap_up_to_the_bus_depth_and_never_beyond() {
    let deep = relay_through(4, false, 10).await;
    let most = deep.most_in_flight.load(Ordering::SeqCst);
    assert!(
        (2..=4).contains(&most),
        "publishes in flight at once on a bus of depth 4: {most}"
    );
    let shallow = relay_through(1, false, 4).await;
    assert_eq!(
        shallow.most_in_flight.load(Ordering::SeqCst),
        1,
        "a bus of depth 1 gets one publish at a time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_among_those_in_flight_is_published_again_and_applied_once() {
    let bus = relay_through(4, true, 10).await;
    assert!(
        bus.failed.load(Ordering::SeqCst),
        "the third publish failed"
    );
    assert!(
        bus.most_in_flight.load(Ordering::SeqCst) >= 2,
        "batches overlapped"
    );
}
