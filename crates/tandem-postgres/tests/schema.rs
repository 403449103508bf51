//! A schema made by the build before schema versions were recorded (a real
//! one: the Order Service's database after a few orders, dumped with
//! `pg_dump --inserts` from commit 4e02d96) is migrated when a store
//! connects, keeps its rows, and its relay publishes what comes next.
//! Real PostgreSQL (`TANDEM_TEST_POSTGRES`, default 127.0.0.1:5432), a
//! scratch database per test; the bus is the embedded log.

use std::sync::Arc;
use std::time::Duration;

use tandem::bus::Bus;
use tandem::embedded::{EmbeddedLog, EmbeddedOptions};
use tandem::outbox::{self, NewEvent};
use tandem::relay::{Relay, RelayConfig};
use tandem::schema::{self, schema_version};
use tandem::sql::EngineSql;
use tandem::store::{Store, StoreError, Tx};
use tandem::Envelope;
use tandem_postgres::sql::POSTGRES;
use tandem_postgres::testing::{base_url, connect_raw, ScratchDatabase};

const SCHEMA_BEFORE_VERSIONS: &str = include_str!("fixtures/order-4e02d96.sql");
const DEADLINE: Duration = Duration::from_secs(20);

fn count(tx: &mut dyn Tx, table: &str) -> Result<i64, StoreError> {
    tx.query_opt(&format!("SELECT COUNT(*) FROM {table}"), &[])?
        .expect("a count")
        .i64(0)
}

/// Rows of the tables the orders filled, in the dump as it was made.
const FIXTURE_COUNTS: [(&str, i64); 6] = [
    ("tandem_outbox", 4),
    ("tandem_aggregates", 2),
    ("tandem_relay_positions", 1),
    ("tandem_consumer_positions", 3),
    ("tandem_consumer_aggregates", 10),
    ("orders", 2),
];

fn event(subject: &str) -> NewEvent {
    NewEvent {
        subject: subject.to_owned(),
        event_type: "OrderNoted".into(),
        dataschema: "urn:test:order-noted:1".into(),
        data: serde_json::json!({ "note": subject }),
        expected_sequence: None,
        context: Default::default(),
    }
}

#[tokio::test]
async fn a_schema_made_before_versions_is_migrated_and_its_relay_goes_on() {
    let base = base_url();
    let database = ScratchDatabase::create(&base, "before_versions")
        .await
        .unwrap_or_else(|error| {
            panic!("PostgreSQL not reachable at {base}: start it with scripts/engines up ({error})")
        });
    let url = database.url().to_owned();
    tokio::task::spawn_blocking(move || {
        let mut client = connect_raw(&url).expect("raw connection");
        client
            .batch_execute(SCHEMA_BEFORE_VERSIONS)
            .expect("restore the dump");
        let versioned = client
            .query_opt(
                "SELECT to_regclass('public.tandem_schema_version')::text",
                &[],
            )
            .expect("look for the version table")
            .and_then(|row| row.get::<_, Option<String>>(0));
        assert_eq!(versioned, None, "the dump predates schema versions");
    })
    .await
    .unwrap();

    let store = database.store().await.expect("the schema opens");
    let (version, counts) = store
        .read(|tx| {
            let counts = FIXTURE_COUNTS
                .iter()
                .map(|(table, _)| Ok((*table, count(tx, table)?)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok::<_, StoreError>((schema_version(tx)?, counts))
        })
        .await
        .unwrap();
    assert_eq!(version, POSTGRES.migrations().last().unwrap().version);
    assert_eq!(counts, FIXTURE_COUNTS.to_vec(), "no row lost or added");

    // Opening again applies nothing twice.
    drop(store);
    let store = database.store().await.expect("the schema opens again");
    let migrated = store.write(schema::migrate).await.unwrap();
    assert_eq!(migrated.from, migrated.to);

    // The relay named after the service resumes from its cursor (recovered
    // first if this server's transaction ids are below the dump's): the
    // new events move, exactly, and the aggregate's sequence goes on.
    let (subject, sequence) = store
        .read(|tx| {
            let row = tx
                .query_opt(
                    "SELECT subject, sequence FROM tandem_aggregates ORDER BY subject LIMIT 1",
                    &[],
                )?
                .expect("an aggregate");
            Ok::<_, StoreError>((row.text(0)?.to_owned(), row.i64(1)?))
        })
        .await
        .unwrap();
    let appended = store
        .write({
            let subject = subject.clone();
            move |tx| outbox::append_all(tx, "order", vec![event(&subject), event("a-new-order")])
        })
        .await
        .unwrap();
    let sequences: Vec<(String, u64)> = appended
        .iter()
        .map(|envelope| (envelope.subject.clone(), envelope.sequence))
        .collect();
    let next = u64::try_from(sequence).unwrap() + 1;
    assert_eq!(
        sequences,
        vec![(subject, next), ("a-new-order".to_owned(), 1)]
    );

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
        .expect("open embedded log"),
    );
    let relay = Relay::new(
        store.clone(),
        Arc::clone(&bus),
        RelayConfig {
            name: "order".into(),
            ..RelayConfig::default()
        },
    );
    let moved = tokio::time::timeout(DEADLINE, relay.drain())
        .await
        .expect("the relay drains within the deadline")
        .expect("relay");
    assert_eq!(moved, 2, "exactly the events after the cursor move");

    let published: Vec<_> = tandem_testkit::read_topic(bus.as_ref(), "check", "order", 2, DEADLINE)
        .await
        .iter()
        .map(|record| Envelope::decode(&record.payload).expect("envelope").id)
        .collect();
    let ids: Vec<_> = appended.iter().map(|envelope| envelope.id).collect();
    assert_eq!(published, ids);
}

/// How many letters have no failure group.
fn ungrouped(tx: &mut dyn Tx) -> Result<i64, StoreError> {
    tx.query_opt(
        "SELECT COUNT(*) FROM tandem_dead_letters WHERE failure_group IS NULL",
        &[],
    )?
    .expect("a count")
    .i64(0)
}

#[tokio::test]
async fn a_schema_at_migration_2_gets_the_failure_groups_of_its_letters() {
    use tandem_testkit::conformance::{
        assert_failure_groups_agree, insert_letters_without_groups, migrate_to,
    };
    let base = base_url();
    let database = ScratchDatabase::create(&base, "at_migration_2")
        .await
        .unwrap_or_else(|error| {
            panic!("PostgreSQL not reachable at {base}: start it with scripts/engines up ({error})")
        });
    // A schema of a build at migration 2, made by that build's own steps,
    // with letters parked as that build parked them (no group), more than
    // one batch of the backfill.
    let url = database.url().to_owned();
    tokio::task::spawn_blocking(move || {
        let mut client = connect_raw(&url).expect("raw connection");
        let mut transaction = client.transaction().expect("begin");
        let (version, grouped) = tandem_postgres::testing::with_raw_tx(&mut transaction, |tx| {
            migrate_to(tx, 2)?;
            insert_letters_without_groups(tx, 1234)?;
            let grouped = tx
                .query_opt(
                    "SELECT 1 FROM information_schema.columns
                     WHERE table_name = 'tandem_dead_letters' AND column_name = 'failure_group'",
                    &[],
                )?
                .is_some();
            Ok::<_, StoreError>((schema_version(tx)?, grouped))
        })
        .expect("a schema at migration 2");
        transaction.commit().expect("commit");
        assert_eq!((version, grouped), (2, false), "a schema at migration 2");
    })
    .await
    .unwrap();

    let store = database.store().await.expect("the schema opens");
    let (version, left) = store
        .read(|tx| Ok::<_, StoreError>((schema_version(tx)?, ungrouped(tx)?)))
        .await
        .unwrap();
    assert_eq!(version, POSTGRES.migrations().last().unwrap().version);
    assert_eq!(version, 4);
    assert_eq!(left, 0, "every letter has its group");
    assert_failure_groups_agree(&store, 50).await;
    let indexes = store
        .read(|tx| {
            tx.query(
                "SELECT indexname::text FROM pg_indexes
                 WHERE schemaname = current_schema() AND tablename = 'tandem_dead_letters'",
                &[],
            )?
            .iter()
            .map(|row| Ok(row.text(0)?.to_owned()))
            .collect::<Result<Vec<_>, StoreError>>()
        })
        .await
        .unwrap();
    for index in [
        "tandem_dead_letters_group",
        "tandem_dead_letters_parked_groups",
    ] {
        assert!(indexes.iter().any(|name| name == index), "{indexes:?}");
    }

    // A build still at migration 2 parks into the migrated schema (a
    // rolling upgrade): its letters have no group until a store connects.
    store
        .write(|tx| insert_letters_without_groups(tx, 40))
        .await
        .unwrap();
    assert_eq!(store.read(ungrouped).await.unwrap(), 40);
    drop(store);
    let store = database.store().await.expect("the schema opens again");
    assert_eq!(store.read(ungrouped).await.unwrap(), 0);
    assert_failure_groups_agree(&store, 50).await;
}
