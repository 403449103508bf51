//! Files made by earlier versions open on the current schema with their
//! data intact: a file made by the build before schema versions were
//! recorded (a real one, from the commerce demo) is migrated and keeps
//! working; the per-aggregate sequence tables, once keyed by topic (or
//! consumer) first, are rebuilt keyed by subject first. Migrations are
//! recorded once, and a schema newer than the build is left alone.

use std::path::{Path, PathBuf};

use tandem::outbox::{self, Cursor};
use tandem::schema::{self, schema_version};
use tandem::sqlite::{SqliteOptions, SqliteStore};
use tandem::store::{Store, StoreError, Tx};
use tandem_testkit::{deposit_event, open_store as open};

/// The Order Service's database after `tandem demo`, made by commit
/// 4e02d96 (the last before schema versions) and compacted with
/// `VACUUM INTO`.
const FILE_BEFORE_VERSIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/order-4e02d96.sqlite"
);

/// A private copy of the fixture in `dir`, as a service's data file is.
fn copy_fixture(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("order.db");
    std::fs::copy(FILE_BEFORE_VERSIONS, &path).expect("copy the fixture");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn count(tx: &mut dyn Tx, table: &str) -> Result<i64, StoreError> {
    tx.query_opt(&format!("SELECT COUNT(*) FROM {table}"), &[])?
        .expect("a count")
        .i64(0)
}

/// Rows of the tables the demo filled, in the fixture as it was made.
const FIXTURE_COUNTS: [(&str, i64); 7] = [
    ("tandem_outbox", 10),
    ("tandem_aggregates", 5),
    ("tandem_relay_positions", 1),
    ("tandem_consumer_positions", 3),
    ("tandem_consumer_aggregates", 19),
    ("orders", 5),
    ("local_customers", 3),
];

#[tokio::test]
async fn a_file_made_before_schema_versions_is_migrated_and_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let path = copy_fixture(dir.path());
    {
        let connection = rusqlite::Connection::open(&path).unwrap();
        let versioned: i64 = connection
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'tandem_schema_version'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(versioned, 0, "the fixture predates schema versions");
    }

    // Admin tools open it as it is; a service's open migrates it.
    let existing = SqliteStore::open_existing(&path, SqliteOptions::default())
        .await
        .expect("an admin tool opens a file made before schema versions");
    drop(existing);
    let store = SqliteStore::open(&path, SqliteOptions::default())
        .await
        .expect("the file opens");
    let (version, recorded, counts) = store
        .read(|tx| {
            let counts = FIXTURE_COUNTS
                .iter()
                .map(|(table, _)| Ok((*table, count(tx, table)?)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok::<_, StoreError>((
                schema_version(tx)?,
                count(tx, schema::VERSION_TABLE)?,
                counts,
            ))
        })
        .await
        .unwrap();
    let latest = tandem::sql::EngineSql::migrations(&tandem::sqlite::sql::SQLITE)
        .last()
        .unwrap()
        .version;
    assert_eq!(version, latest);
    assert_eq!(recorded, latest, "one row per migration applied");
    assert_eq!(counts, FIXTURE_COUNTS.to_vec(), "no row lost or added");

    // Its aggregates go on from their sequences, and the relay's cursor
    // sees exactly the new events.
    let (subject, sequence, cursor) = store
        .read(|tx| {
            let row = tx
                .query_opt(
                    "SELECT subject, sequence FROM tandem_aggregates
                     WHERE topic = 'order' ORDER BY sequence DESC, subject LIMIT 1",
                    &[],
                )?
                .expect("an order aggregate");
            let cursor = tx
                .query_opt(
                    "SELECT xid, position FROM tandem_relay_positions WHERE relay = 'order'",
                    &[],
                )?
                .expect("the relay's cursor");
            Ok::<_, StoreError>((
                row.text(0)?.to_owned(),
                row.i64(1)?,
                Cursor {
                    xid: cursor.i64(0)?,
                    position: cursor.i64(1)?,
                },
            ))
        })
        .await
        .unwrap();
    let appended = store
        .write({
            let subject = subject.clone();
            move |tx| {
                let first = outbox::append(tx, "order", deposit_event(&subject, 1)?)?;
                let second = outbox::append_all(
                    tx,
                    "order",
                    vec![deposit_event(&subject, 2)?, deposit_event("new-order", 3)?],
                )?;
                Ok::<_, StoreError>(
                    std::iter::once(first)
                        .chain(second)
                        .map(|envelope| (envelope.subject, envelope.sequence))
                        .collect::<Vec<_>>(),
                )
            }
        })
        .await
        .unwrap();
    let next = u64::try_from(sequence).unwrap() + 1;
    assert_eq!(
        appended,
        vec![
            (subject.clone(), next),
            (subject.clone(), next + 1),
            ("new-order".to_owned(), 1)
        ]
    );
    let batch = store
        .read(move |tx| outbox::read_committed_after(tx, cursor, 100))
        .await
        .unwrap();
    let relayed: Vec<(String, u64)> = batch
        .events
        .into_iter()
        .map(|event| (event.subject, event.sequence))
        .collect();
    assert_eq!(
        relayed, appended,
        "the relay resumes after what it published"
    );
}

#[tokio::test]
async fn migrations_are_recorded_once_and_a_newer_schema_is_left_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.db");
    let versions = |store: SqliteStore| async move {
        store
            .read(|tx| {
                let rows = tx.query(
                    "SELECT version, description FROM tandem_schema_version ORDER BY version",
                    &[],
                )?;
                rows.iter()
                    .map(|row| Ok((row.i64(0)?, row.text(1)?.to_owned())))
                    .collect::<Result<Vec<_>, StoreError>>()
            })
            .await
            .unwrap()
    };
    let expected: Vec<(i64, String)> =
        tandem::sql::EngineSql::migrations(&tandem::sqlite::sql::SQLITE)
            .iter()
            .map(|step| (step.version, step.description.to_owned()))
            .collect();
    assert_eq!(
        expected
            .iter()
            .map(|(version, _)| *version)
            .collect::<Vec<_>>(),
        (1..=i64::try_from(expected.len()).unwrap()).collect::<Vec<_>>(),
        "steps are numbered from 1 without gaps"
    );
    for _ in 0..2 {
        let store = open(&path).await;
        assert_eq!(versions(store).await, expected);
    }

    // A newer build went further: this one opens it and changes nothing.
    let store = open(&path).await;
    store
        .write(|tx| {
            tx.execute(
                "INSERT INTO tandem_schema_version (version, description, applied_at)
                 VALUES (999, 'from a newer build', 0)",
                &[],
            )
        })
        .await
        .unwrap();
    drop(store);
    let store = open(&path).await;
    let migrated = store.write(schema::migrate).await.unwrap();
    assert_eq!((migrated.from, migrated.to), (999, 999));
    let mut with_newer = expected.clone();
    with_newer.push((999, "from a newer build".to_owned()));
    assert_eq!(versions(store).await, with_newer);
}

/// The first column of `table`'s primary key.
fn first_key_column(tx: &mut dyn Tx, table: &str) -> Result<String, StoreError> {
    let row = tx
        .query_opt(
            "SELECT info.name FROM pragma_index_list($1) AS list, pragma_index_info(list.name) AS info
             WHERE list.origin = 'pk' AND info.seqno = 0",
            tandem::params![table],
        )?
        .expect("a primary key");
    Ok(row.text(0)?.to_owned())
}

#[tokio::test]
async fn a_file_with_topic_first_sequence_keys_is_rebuilt_with_its_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    {
        let store = open(&path).await;
        store
            .write(|tx| {
                tx.execute_batch(
                    "DROP TABLE tandem_schema_version;
                     DROP TABLE tandem_aggregates;
                     CREATE TABLE tandem_aggregates (
                         topic    TEXT    NOT NULL,
                         subject  TEXT    NOT NULL,
                         sequence INTEGER NOT NULL,
                         PRIMARY KEY (topic, subject)
                     ) WITHOUT ROWID;
                     INSERT INTO tandem_aggregates VALUES ('t', 'a', 5), ('t', 'b', 2);
                     DROP TABLE tandem_consumer_aggregates;
                     CREATE TABLE tandem_consumer_aggregates (
                         consumer TEXT    NOT NULL,
                         source   TEXT    NOT NULL,
                         subject  TEXT    NOT NULL,
                         sequence INTEGER NOT NULL,
                         blocked_by INTEGER,
                         PRIMARY KEY (consumer, source, subject)
                     ) WITHOUT ROWID;
                     INSERT INTO tandem_consumer_aggregates VALUES ('c', 't', 'a', 4, NULL),
                                                                   ('c', 't', 'b', 1, 7);",
                )
            })
            .await
            .unwrap();
        assert_eq!(
            store
                .read(|tx| first_key_column(tx, "tandem_aggregates"))
                .await
                .unwrap(),
            "topic"
        );
    }

    for _ in 0..2 {
        let store = open(&path).await;
        let (aggregates, consumers) = store
            .read(|tx| {
                Ok::<_, StoreError>((
                    first_key_column(tx, "tandem_aggregates")?,
                    first_key_column(tx, "tandem_consumer_aggregates")?,
                ))
            })
            .await
            .unwrap();
        assert_eq!(
            (aggregates.as_str(), consumers.as_str()),
            ("subject", "subject")
        );
        let states = store
            .read(|tx| {
                tx.query(
                    "SELECT consumer, source, subject, sequence, blocked_by
                     FROM tandem_consumer_aggregates ORDER BY subject",
                    &[],
                )
            })
            .await
            .unwrap();
        let states: Vec<(String, String, String, i64, Option<i64>)> = states
            .iter()
            .map(|row| {
                (
                    row.text(0).unwrap().to_owned(),
                    row.text(1).unwrap().to_owned(),
                    row.text(2).unwrap().to_owned(),
                    row.i64(3).unwrap(),
                    row.opt_i64(4).unwrap(),
                )
            })
            .collect();
        assert_eq!(
            states,
            vec![
                ("c".into(), "t".into(), "a".into(), 4, None),
                ("c".into(), "t".into(), "b".into(), 1, Some(7)),
            ]
        );
    }

    // The sequences carried over: the next events follow them.
    let store = open(&path).await;
    let appended = store
        .write(|tx| {
            let events = ["a", "b", "c"]
                .into_iter()
                .map(|subject| deposit_event(subject, 1))
                .collect::<Result<Vec<_>, _>>()?;
            outbox::append_all(tx, "t", events)
        })
        .await
        .unwrap();
    let sequences: Vec<(String, u64)> = appended
        .into_iter()
        .map(|envelope| (envelope.subject, envelope.sequence))
        .collect();
    assert_eq!(
        sequences,
        vec![("a".into(), 6), ("b".into(), 3), ("c".into(), 1)]
    );
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
async fn a_file_at_migration_2_gets_the_failure_groups_of_its_letters() {
    use tandem_testkit::conformance::{
        assert_failure_groups_agree, insert_letters_without_groups, migrate_to,
    };
    // A file of a build at migration 2: the fixture made before versions,
    // taken there by that build's own steps, with letters parked as that
    // build parked them (no group), more than one batch of the backfill.
    let dir = tempfile::tempdir().unwrap();
    let path = copy_fixture(dir.path());
    let existing = SqliteStore::open_existing(&path, SqliteOptions::default())
        .await
        .expect("the fixture opens as it is");
    let (version, grouped) = existing
        .write(|tx| {
            migrate_to(tx, 2)?;
            insert_letters_without_groups(tx, 1234)?;
            let grouped = tx
                .query_opt(
                    "SELECT 1 FROM pragma_table_info('tandem_dead_letters')
                     WHERE name = 'failure_group'",
                    &[],
                )?
                .is_some();
            Ok::<_, StoreError>((schema_version(tx)?, grouped))
        })
        .await
        .unwrap();
    assert_eq!((version, grouped), (2, false), "a file at migration 2");
    drop(existing);

    let store = open(&path).await;
    let (version, left) = store
        .read(|tx| Ok::<_, StoreError>((schema_version(tx)?, ungrouped(tx)?)))
        .await
        .unwrap();
    assert_eq!(version, 5, "every step, up to the outbox set aside whole");
    assert_eq!(left, 0, "every letter has its group");
    assert_failure_groups_agree(&store, 50).await;
    let indexes = store
        .read(|tx| {
            tx.query(
                "SELECT name FROM sqlite_master
                 WHERE type = 'index' AND tbl_name = 'tandem_dead_letters' ORDER BY name",
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

    // A build still at migration 2 parks into the migrated file (a rolling
    // upgrade): its letters have no group until a store opens the file.
    store
        .write(|tx| insert_letters_without_groups(tx, 40))
        .await
        .unwrap();
    assert_eq!(store.read(ungrouped).await.unwrap(), 40);
    drop(store);
    let store = open(&path).await;
    assert_eq!(store.read(ungrouped).await.unwrap(), 0);
    assert_failure_groups_agree(&store, 50).await;
}
