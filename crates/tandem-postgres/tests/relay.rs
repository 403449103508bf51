//! The relay on PostgreSQL: commit order (ids are taken at insert, not at
//! commit), and a cursor ahead of restarted transaction ids. Leases and a
//! standby relay taking over are checked on every store engine by the
//! store conformance suite (`store_lease_checks` in
//! `tandem_testkit::conformance`). Real PostgreSQL (`TANDEM_TEST_POSTGRES`, default 127.0.0.1:5432), a scratch
//! database per test; the bus is the embedded log in a temporary directory.

mod common;

use std::sync::Arc;

use common::{embedded_log, event, ids, publish_until, published, scratch, DEADLINE, TOPIC};
use tandem::bus::Bus;
use tandem::outbox;
use tandem::relay::{Relay, RelayConfig};
use tandem::store::Store;
use tandem::Envelope;
use tandem_postgres::testing::{connect_raw, with_raw_tx};
use tandem_postgres::PostgresStore;

/// The pitfall, shown and avoided. T1 appends first (lower `position`), T2
/// appends and commits first. A relay reading `position > cursor` would
/// publish T2's event and move its cursor past T1's position; when T1
/// commits, its event sits behind the cursor and is never published. The
/// relay reads in `(xid, position)` order below the snapshot's xmin: while
/// T1 runs it publishes nothing, and after T1's commit it publishes both,
/// each once.
#[test]
fn an_event_committed_after_a_later_insert_is_relayed_exactly_once() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let database = scratch("out_of_order");
    let store = runtime.block_on(database.store()).expect("store");
    let dir = tempfile::tempdir().unwrap();
    let bus: Arc<dyn Bus> = Arc::new(runtime.block_on(embedded_log(&dir)));
    let relay = Relay::new(store.clone(), Arc::clone(&bus), RelayConfig::default());

    // Raw connections: they do not take the store's writer lock, as a
    // second writer process without it (or any writer whose commit is
    // slow) would not be serialised in insert order.
    let mut first = connect_raw(database.url()).expect("raw connection");
    let mut second = connect_raw(database.url()).expect("raw connection");
    let mut t1 = first.transaction().expect("begin t1");
    let e1 = with_raw_tx(&mut t1, |tx| outbox::append(tx, TOPIC, event("a", 1))).expect("t1");
    let mut t2 = second.transaction().expect("begin t2");
    let e2 = with_raw_tx(&mut t2, |tx| outbox::append(tx, TOPIC, event("b", 2))).expect("t2");
    t2.commit().expect("commit t2");

    // What a naive relay would see: only T2's event, at the higher position.
    let naive = runtime
        .block_on(store.read(|tx| outbox::read_after(tx, 0, 100)))
        .expect("read");
    assert_eq!(naive.len(), 1, "only T2 has committed");
    let naive_cursor = naive[0].position;

    let moved = runtime.block_on(relay.publish_once()).expect("relay round");
    assert_eq!(moved, 0, "nothing is final while T1 (older xid) runs");
    assert!(runtime.block_on(published(bus.as_ref())).is_empty());

    t1.commit().expect("commit t1");
    let behind = runtime
        .block_on(store.read(move |tx| outbox::read_after(tx, naive_cursor, 100)))
        .expect("read");
    assert!(
        behind.is_empty(),
        "T1's event is behind the naive cursor: a position relay would lose it"
    );

    publish_until(&runtime, &relay, 2);
    assert_eq!(
        runtime.block_on(relay.publish_once()).expect("relay round"),
        0
    );
    let on_bus = runtime.block_on(published(bus.as_ref()));
    assert_eq!(
        ids(&on_bus),
        ids(&[e1, e2]),
        "each committed event once, in commit order"
    );
    let (backlog, _) = runtime
        .block_on(tandem::relay::backlog(&store, "relay"))
        .expect("backlog");
    assert_eq!(backlog, 0);
}

/// T1 (older xid) takes aggregate `a`'s row only after T2 appended `a`#1
/// and committed: T1's `a`#2 comes first in xid order. The batch puts the
/// aggregate back in sequence order. A transaction rolled back publishes
/// nothing, and a relay running meanwhile publishes only what is final.
#[test]
fn one_batch_never_publishes_an_aggregate_backwards() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let database = scratch("aggregate_order");
    let store = runtime.block_on(database.store()).expect("store");
    let dir = tempfile::tempdir().unwrap();
    let bus: Arc<dyn Bus> = Arc::new(runtime.block_on(embedded_log(&dir)));
    let relay = Relay::new(store.clone(), Arc::clone(&bus), RelayConfig::default());

    let before = runtime
        .block_on(store.write(|tx| outbox::append(tx, TOPIC, event("z", 0))))
        .expect("append");
    let mut first = connect_raw(database.url()).expect("raw connection");
    let mut second = connect_raw(database.url()).expect("raw connection");
    let mut third = connect_raw(database.url()).expect("raw connection");
    let mut t1 = first.transaction().expect("begin t1");
    t1.query_one("SELECT pg_current_xact_id()::text", &[])
        .expect("t1 takes its xid now");
    let mut rolled_back = third.transaction().expect("begin t3");
    with_raw_tx(&mut rolled_back, |tx| {
        outbox::append(tx, TOPIC, event("c", 9))
    })
    .expect("t3");
    let mut t2 = second.transaction().expect("begin t2");
    let a1 = with_raw_tx(&mut t2, |tx| outbox::append(tx, TOPIC, event("a", 1))).expect("t2");
    t2.commit().expect("commit t2");

    // Only the event committed before T1 began is final.
    publish_until(&runtime, &relay, 1);

    let a2 = with_raw_tx(&mut t1, |tx| outbox::append(tx, TOPIC, event("a", 2))).expect("t1");
    assert_eq!((a1.sequence, a2.sequence), (1, 2));
    t1.commit().expect("commit t1");
    rolled_back.rollback().expect("rollback t3");

    publish_until(&runtime, &relay, 2);
    let on_bus = runtime.block_on(published(bus.as_ref()));
    assert_eq!(ids(&on_bus), ids(&[before, a1, a2]));
}

async fn append(store: &PostgresStore, subject: &str) -> Envelope {
    let subject = subject.to_owned();
    store
        .write(move |tx| outbox::append(tx, TOPIC, event(&subject, 1)))
        .await
        .expect("append")
}

/// Issue 18, point 3: after a dump and restore (or an upgrade by logical
/// replication) transaction ids start again far below the relay's stored
/// `xid`. The relay must notice and recover, not pass over every new event
/// while reporting no backlog. Each event goes out once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_ahead_of_restarted_transaction_ids_is_recovered() {
    let database = scratch("xid_restart");
    let store = database.store().await.expect("store");
    let dir = tempfile::tempdir().unwrap();
    let bus: Arc<dyn Bus> = Arc::new(embedded_log(&dir).await);
    let relay = Relay::new(store.clone(), Arc::clone(&bus), RelayConfig::default());
    let before = append(&store, "before-restore").await;
    let moved = tokio::time::timeout(DEADLINE, relay.drain())
        .await
        .expect("drain in time")
        .expect("drain");
    assert_eq!(moved, 1);
    // As a restore leaves it: the cursor's xid is far beyond the server's.
    store
        .write(|tx| {
            tx.execute(
                "UPDATE tandem_relay_positions SET xid = xid + 1000000000",
                &[],
            )
        })
        .await
        .expect("move the cursor's xid ahead");
    let after = append(&store, "after-restore").await;
    let moved = tokio::time::timeout(DEADLINE, relay.drain())
        .await
        .expect("drain in time")
        .expect("drain");
    assert_eq!(moved, 1, "the event appended after the restore is relayed");
    let (backlog, _) = tandem::relay::backlog(&store, &RelayConfig::default().name)
        .await
        .expect("backlog");
    assert_eq!(backlog, 0);
    assert_eq!(
        ids(&published(bus.as_ref()).await),
        ids(&[before, after]),
        "each event on the bus once"
    );
}
