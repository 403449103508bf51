//! Retention on PostgreSQL: pruning follows the relay's commit order. In a
//! test binary of its own: it holds a transaction open across relay
//! rounds, which moves the cluster-wide horizon that the relay tests
//! beside it depend on.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{embedded_log, event, ids, publish_until, published, scratch, TOPIC};
use tandem::bus::Bus;
use tandem::outbox;
use tandem::relay::{Relay, RelayConfig};
use tandem_postgres::testing::{connect_raw, with_raw_tx};

/// Pruning follows commit order, not positions: T_b inserts first (lower
/// position) but took its transaction id after T_a, which inserts later
/// and commits first. Once T_a's event is published, the relay's cursor is
/// past T_b's position, yet T_b's event is not published: pruning must
/// keep it, and the relay then publishes it.
#[test]
fn pruning_keeps_an_unpublished_row_below_the_cursor_position() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let database = scratch("prune_order");
    let store = runtime.block_on(database.store()).expect("store");
    let dir = tempfile::tempdir().unwrap();
    let bus: Arc<dyn Bus> = Arc::new(runtime.block_on(embedded_log(&dir)));
    let relay = Relay::new(store.clone(), Arc::clone(&bus), RelayConfig::default());

    let mut first = connect_raw(database.url()).expect("raw connection");
    let mut second = connect_raw(database.url()).expect("raw connection");
    let mut t_a = first.transaction().expect("begin t_a");
    t_a.query_one("SELECT pg_current_xact_id()::text", &[])
        .expect("t_a takes its xid now");
    let mut t_b = second.transaction().expect("begin t_b");
    let e_b = with_raw_tx(&mut t_b, |tx| outbox::append(tx, TOPIC, event("b", 1))).expect("t_b");
    let e_a = with_raw_tx(&mut t_a, |tx| outbox::append(tx, TOPIC, event("a", 2))).expect("t_a");
    t_a.commit().expect("commit t_a");
    publish_until(&runtime, &relay, 1);
    t_b.commit().expect("commit t_b");

    let rules = tandem::retention::Retention {
        outbox_age: Some(Duration::ZERO),
        resolved_age: None,
        discarded_age: None,
        log_age: None,
        log_records: None,
        ..Default::default()
    };
    let pruned = runtime
        .block_on(tandem::retention::prune_once(
            &store,
            bus.as_ref(),
            Some("relay"),
            &rules,
        ))
        .expect("prune");
    assert_eq!(pruned.outbox, 1, "only the published row goes");
    publish_until(&runtime, &relay, 1);
    let on_bus = runtime.block_on(published(bus.as_ref()));
    assert_eq!(ids(&on_bus), ids(&[e_a, e_b]), "each once, in commit order");
    let pruned = runtime
        .block_on(tandem::retention::prune_once(
            &store,
            bus.as_ref(),
            Some("relay"),
            &rules,
        ))
        .expect("prune");
    assert_eq!(pruned.outbox, 1);
}
