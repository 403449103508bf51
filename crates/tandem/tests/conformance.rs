//! The bus and store conformance suites (`tandem_testkit::conformance`)
//! against the engines of this crate: the embedded log (also with a new
//! segment at every append, so that reads cross segments) and SQLite.

use tandem_testkit::conformance::{BusFeatures, Fresh, StoreFeatures};

async fn embedded_log() -> Fresh<tandem::embedded::EmbeddedLog> {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = tandem::embedded::EmbeddedLog::open(
        dir.path().join("bus.db"),
        tandem::embedded::EmbeddedOptions {
            synchronous: tandem::sqlite::Synchronous::Normal,
            partitions: 4,
            ..Default::default()
        },
    )
    .await
    .expect("open embedded log");
    Fresh::new(log, dir)
}

/// The embedded log with a new segment for every append: every read
/// crosses segments.
async fn embedded_log_in_small_segments() -> Fresh<tandem::embedded::EmbeddedLog> {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = tandem::embedded::EmbeddedLog::open(
        dir.path().join("bus.db"),
        tandem::embedded::EmbeddedOptions {
            synchronous: tandem::sqlite::Synchronous::Normal,
            partitions: 4,
            segment_bytes: 1,
        },
    )
    .await
    .expect("open embedded log");
    Fresh::new(log, dir)
}

async fn open_sqlite(path: std::path::PathBuf) -> tandem::sqlite::SqliteStore {
    tandem::sqlite::SqliteStore::open(
        path,
        tandem::sqlite::SqliteOptions {
            synchronous: tandem::sqlite::Synchronous::Normal,
            ..tandem::sqlite::SqliteOptions::default()
        },
    )
    .await
    .expect("open sqlite store")
}

/// A store on a new file; its peers open the same file again (two
/// processes, as far as SQLite and the lease's file lock are concerned).
async fn sqlite_store() -> Fresh<tandem::sqlite::SqliteStore> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store.db");
    let store = open_sqlite(path.clone()).await;
    Fresh::new(store, dir).with_peer(move || open_sqlite(path.clone()))
}

tandem_testkit::bus_conformance!(
    embedded,
    embedded_log(),
    BusFeatures {
        every_member_reads_every_partition: true,
        members_split_partitions: false,
        shares_partitions: false,
        redelivers_unacked_to_other_members: false,
    }
);
tandem_testkit::bus_conformance!(
    embedded_small_segments,
    embedded_log_in_small_segments(),
    BusFeatures {
        every_member_reads_every_partition: true,
        members_split_partitions: false,
        shares_partitions: false,
        redelivers_unacked_to_other_members: false,
    }
);
tandem_testkit::store_conformance!(
    sqlite,
    sqlite_store(),
    StoreFeatures {
        // Closing the lock file releases the flock.
        lease_free_as_soon_as_dropped: true,
    }
);
