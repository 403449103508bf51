//! Leases and relay leadership on SQLite: of two stores on one file (two
//! processes, as far as the lock is concerned), one relay publishes; when
//! it stops, the other takes over. Also: a file made before relay cursors
//! had an `xid` column opens and relays.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem::bus::{Bus, BusError, OutgoingRecord, Subscription};
use tandem::embedded::{EmbeddedLog, EmbeddedOptions};
use tandem::outbox::{self, NewEvent};
use tandem::relay::{Relay, RelayConfig};
use tandem::sqlite::{SqliteOptions, SqliteStore, Synchronous};
use tandem::store::Store;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(20);

async fn open(path: &std::path::Path) -> SqliteStore {
    SqliteStore::open(
        path,
        SqliteOptions {
            synchronous: Synchronous::Normal,
            ..SqliteOptions::default()
        },
    )
    .await
    .expect("open store")
}

fn event(subject: &str) -> NewEvent {
    NewEvent {
        subject: subject.to_owned(),
        event_type: "Deposited".into(),
        dataschema: "urn:test:deposited:1".into(),
        data: serde_json::json!({ "amount": 1 }),
        expected_sequence: None,
        context: Default::default(),
    }
}

struct Counting {
    inner: Arc<dyn Bus>,
    published: AtomicUsize,
}

#[async_trait::async_trait]
impl Bus for Counting {
    async fn publish(&self, records: &[OutgoingRecord]) -> Result<(), BusError> {
        self.inner.publish(records).await?;
        self.published.fetch_add(records.len(), Ordering::SeqCst);
        Ok(())
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
}

async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_file_lease_has_one_holder_and_is_released_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(&dir.path().join("store.db")).await;
    let second = open(&dir.path().join("store.db")).await;
    let mut lease = first.try_lead("relay").await.unwrap().expect("free");
    assert!(lease.held());
    assert!(second.try_lead("relay").await.unwrap().is_none());
    assert!(
        first.try_lead("relay").await.unwrap().is_none(),
        "not re-entrant"
    );
    assert!(second.try_lead("other/name").await.unwrap().is_some());
    drop(lease);
    assert!(second.try_lead("relay").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_relay_publishes_and_a_standby_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn Bus> = Arc::new(
        EmbeddedLog::open(
            dir.path().join("bus.db"),
            EmbeddedOptions {
                synchronous: Synchronous::Normal,
                partitions: 1,
            },
        )
        .await
        .unwrap(),
    );
    let store_a = open(&dir.path().join("store.db")).await;
    let store_b = open(&dir.path().join("store.db")).await;
    let bus_a = Arc::new(Counting {
        inner: Arc::clone(&log),
        published: AtomicUsize::new(0),
    });
    let bus_b = Arc::new(Counting {
        inner: Arc::clone(&log),
        published: AtomicUsize::new(0),
    });
    let config = RelayConfig {
        lead_retry: Duration::from_millis(50),
        ..RelayConfig::default()
    };
    let shutdown = CancellationToken::new();
    let relay_a = Relay::new(
        store_a.clone(),
        Arc::clone(&bus_a) as Arc<dyn Bus>,
        config.clone(),
    );
    let token = shutdown.clone();
    let leader = tokio::spawn(async move { relay_a.run(token).await });
    store_a
        .write(|tx| outbox::append(tx, "t", event("a")))
        .await
        .unwrap();
    wait_until("the first relay publishes", || {
        bus_a.published.load(Ordering::SeqCst) == 1
    })
    .await;

    let relay_b = Relay::new(store_b.clone(), Arc::clone(&bus_b) as Arc<dyn Bus>, config);
    let token = shutdown.clone();
    let standby = tokio::spawn(async move { relay_b.run(token).await });
    for index in 0..5 {
        store_b
            .write(move |tx| outbox::append(tx, "t", event(&format!("b{index}"))))
            .await
            .unwrap();
    }
    wait_until("the leader publishes", || {
        bus_a.published.load(Ordering::SeqCst) == 6
    })
    .await;
    assert_eq!(bus_b.published.load(Ordering::SeqCst), 0);

    leader.abort();
    let _ = leader.await;
    store_b
        .write(|tx| outbox::append(tx, "t", event("c")))
        .await
        .unwrap();
    wait_until("the standby takes over", || {
        bus_b.published.load(Ordering::SeqCst) >= 1
    })
    .await;
    shutdown.cancel();
    standby.await.unwrap().unwrap();
    let (backlog, _) = tandem::relay::backlog(&store_b, "relay").await.unwrap();
    assert_eq!(backlog, 0);
}

#[tokio::test]
async fn a_file_from_before_cursor_xids_opens_and_relays() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    {
        let connection = old_shaped_store(&path).await;
        drop(connection);
    }
    let store = open(&path).await;
    store
        .write(|tx| outbox::append(tx, "t", event("a")))
        .await
        .unwrap();
    let log: Arc<dyn Bus> = Arc::new(
        EmbeddedLog::open(
            dir.path().join("bus.db"),
            EmbeddedOptions {
                synchronous: Synchronous::Normal,
                partitions: 1,
            },
        )
        .await
        .unwrap(),
    );
    let relay = Relay::new(store.clone(), log, RelayConfig::default());
    assert_eq!(relay.publish_once().await.unwrap(), 1);
    assert_eq!(relay.publish_once().await.unwrap(), 0);
    // Opening again leaves the added column alone.
    drop(store);
    let store = open(&path).await;
    let (backlog, _) = tandem::relay::backlog(&store, "relay").await.unwrap();
    assert_eq!(backlog, 0);
}

/// Makes a store file whose `tandem_relay_positions` has the old shape
/// (no `xid`), with a cursor in it.
async fn old_shaped_store(path: &std::path::Path) -> SqliteStore {
    let store = open(path).await;
    store
        .write(|tx| {
            tx.execute_batch(
                "DROP TABLE tandem_relay_positions;
                 CREATE TABLE tandem_relay_positions (
                     relay      TEXT    PRIMARY KEY,
                     position   INTEGER NOT NULL,
                     updated_at INTEGER NOT NULL
                 );
                 INSERT INTO tandem_relay_positions VALUES ('relay', 0, 0);",
            )
        })
        .await
        .unwrap();
    store
}
