//! Files made by earlier versions open on the current schema with their
//! data intact: the per-aggregate sequence tables, once keyed by topic (or
//! consumer) first, are rebuilt keyed by subject first.

use tandem::outbox;
use tandem::store::{Store, StoreError, Tx};
use tandem_testkit::{deposit_event, open_store as open};

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
                    "DROP TABLE tandem_aggregates;
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
