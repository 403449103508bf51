//! Retention on PostgreSQL: pruning follows the relay's commit order. In a
//! test binary of its own: it holds a transaction open across relay
//! rounds, which moves the cluster-wide horizon that the relay tests
//! beside it depend on.

use std::sync::Arc;
use std::time::Duration;

use tandem::bus::Bus;
use tandem::embedded::{EmbeddedLog, EmbeddedOptions};
use tandem::outbox::{self, NewEvent};
use tandem::relay::{Relay, RelayConfig};
use tandem::store::Store;
use tandem::Envelope;
use tandem_postgres::testing::{base_url, connect_raw, with_raw_tx, ScratchDatabase};

const TOPIC: &str = "orders";
const DEADLINE: Duration = Duration::from_secs(20);

fn scratch(label: &str) -> ScratchDatabase {
    let base = base_url();
    ScratchDatabase::create_blocking(&base, label).unwrap_or_else(|error| {
        panic!("PostgreSQL not reachable at {base}: start it with scripts/engines up ({error})")
    })
}

fn event(subject: &str, amount: i64) -> NewEvent {
    NewEvent {
        subject: subject.to_owned(),
        event_type: "Deposited".into(),
        dataschema: "urn:test:deposited:1".into(),
        data: serde_json::json!({ "amount": amount }),
        expected_sequence: None,
        context: Default::default(),
    }
}

async fn embedded_log(dir: &tempfile::TempDir) -> EmbeddedLog {
    EmbeddedLog::open(
        dir.path().join("bus.db"),
        EmbeddedOptions {
            synchronous: tandem::sqlite::Synchronous::Normal,
            partitions: 1,
        },
    )
    .await
    .expect("open embedded log")
}

/// Every record of `topic` on the bus, in offset order (one partition).
async fn published(bus: &dyn Bus) -> Vec<Envelope> {
    let total: u64 = bus
        .end_offsets(TOPIC)
        .await
        .expect("end offsets")
        .iter()
        .map(|(_, end)| end)
        .sum();
    let records = tandem_testkit::read_topic(
        bus,
        &format!("check-{}", uuid_like()),
        TOPIC,
        usize::try_from(total).expect("a count"),
        DEADLINE,
    )
    .await;
    records
        .iter()
        .map(|record| Envelope::decode(&record.payload).expect("envelope"))
        .collect()
}

fn uuid_like() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Runs relay rounds until `want` events moved in all, and checks that no
/// more did. The horizon is the oldest transaction running in the whole
/// cluster, so a transaction of a test running beside this one (creating
/// its scratch database, say) can hold a round back for a moment.
fn publish_until<S: Store>(runtime: &tokio::runtime::Runtime, relay: &Relay<S>, want: usize) {
    let deadline = std::time::Instant::now() + DEADLINE;
    let mut moved = 0;
    while moved < want {
        assert!(
            std::time::Instant::now() < deadline,
            "only {moved} of {want} events were relayed within {DEADLINE:?}"
        );
        moved += runtime.block_on(relay.publish_once()).expect("relay round");
        if moved < want {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert_eq!(moved, want, "more events were relayed than were final");
}

fn ids(envelopes: &[Envelope]) -> Vec<String> {
    envelopes
        .iter()
        .map(|envelope| envelope.id.to_string())
        .collect()
}

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
