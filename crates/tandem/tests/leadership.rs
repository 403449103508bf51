//! Relay leadership on SQLite beyond the shared suite: a file made before
//! relay cursors had an `xid` column opens and relays. The lease (one
//! holder, free as soon as dropped) and the standby taking over are checked
//! on every store engine by the store conformance suite
//! (`store_lease_checks` in `tandem_testkit::conformance`).

use std::sync::Arc;

use tandem::bus::Bus;
use tandem::embedded::{EmbeddedLog, EmbeddedOptions};
use tandem::outbox::{self, NewEvent};
use tandem::relay::{Relay, RelayConfig};
use tandem::sqlite::{SqliteOptions, SqliteStore, Synchronous};
use tandem::store::Store;

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
                ..Default::default()
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
/// (no `xid`), with a cursor in it, and no schema version (as files of
/// that time had none).
async fn old_shaped_store(path: &std::path::Path) -> SqliteStore {
    let store = open(path).await;
    store
        .write(|tx| {
            tx.execute_batch(
                "DROP TABLE tandem_schema_version;
                 DROP TABLE tandem_relay_positions;
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
