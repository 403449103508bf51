//! Helpers of the relay and retention tests: a scratch database, events,
//! an embedded log to relay to, and relay rounds run to a count.

use std::time::Duration;

use tandem::bus::Bus;
use tandem::embedded::{EmbeddedLog, EmbeddedOptions};
use tandem::outbox::NewEvent;
use tandem::relay::Relay;
use tandem::store::Store;
use tandem::Envelope;
use tandem_postgres::testing::{base_url, ScratchDatabase};

pub const TOPIC: &str = "orders";
pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn scratch(label: &str) -> ScratchDatabase {
    let base = base_url();
    ScratchDatabase::create_blocking(&base, label).unwrap_or_else(|error| {
        panic!("PostgreSQL not reachable at {base}: start it with scripts/engines up ({error})")
    })
}

pub fn event(subject: &str, amount: i64) -> NewEvent {
    NewEvent {
        subject: subject.to_owned(),
        event_type: "Deposited".into(),
        dataschema: "urn:test:deposited:1".into(),
        data: serde_json::json!({ "amount": amount }),
        expected_sequence: None,
        context: Default::default(),
    }
}

pub async fn embedded_log(dir: &tempfile::TempDir) -> EmbeddedLog {
    EmbeddedLog::open(
        dir.path().join("bus.db"),
        EmbeddedOptions {
            synchronous: tandem::sqlite::Synchronous::Normal,
            partitions: 1,
            ..Default::default()
        },
    )
    .await
    .expect("open embedded log")
}

/// Every record of `topic` on the bus, in offset order (one partition).
pub async fn published(bus: &dyn Bus) -> Vec<Envelope> {
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

pub fn uuid_like() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Runs relay rounds until `want` events moved in all, and checks that no
/// more did. The horizon is the oldest transaction running in the whole
/// cluster, so a transaction of a test running beside this one (creating
/// its scratch database, say) can hold a round back for a moment.
pub fn publish_until<S: Store>(runtime: &tokio::runtime::Runtime, relay: &Relay<S>, want: usize) {
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

pub fn ids(envelopes: &[Envelope]) -> Vec<String> {
    envelopes
        .iter()
        .map(|envelope| envelope.id.to_string())
        .collect()
}
