//! The bus and store conformance suites (`tandem_testkit::conformance`)
//! against the engines of this crate: the embedded log and SQLite.

use tandem_testkit::conformance::Fresh;

async fn embedded_log() -> Fresh<tandem::embedded::EmbeddedLog> {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = tandem::embedded::EmbeddedLog::open(
        dir.path().join("bus.db"),
        tandem::embedded::EmbeddedOptions {
            synchronous: tandem::sqlite::Synchronous::Normal,
            partitions: 4,
        },
    )
    .await
    .expect("open embedded log");
    Fresh::new(log, dir)
}

async fn sqlite_store() -> Fresh<tandem::sqlite::SqliteStore> {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = tandem::sqlite::SqliteStore::open(
        dir.path().join("store.db"),
        tandem::sqlite::SqliteOptions {
            synchronous: tandem::sqlite::Synchronous::Normal,
            ..tandem::sqlite::SqliteOptions::default()
        },
    )
    .await
    .expect("open sqlite store");
    Fresh::new(store, dir)
}

tandem_testkit::bus_conformance!(embedded, embedded_log());
tandem_testkit::store_conformance!(sqlite, sqlite_store());
