//! The store conformance suite (`tandem_testkit::conformance`) against
//! PostgreSQL: each test on a scratch database of its own, dropped after.
//! The server is `TANDEM_TEST_POSTGRES` (default 127.0.0.1:5432); a test
//! that cannot reach it fails.

use tandem_postgres::testing::{base_url, ScratchDatabase};
use tandem_postgres::PostgresStore;
use tandem_testkit::conformance::{Fresh, StoreFeatures};

async fn fresh_postgres() -> Fresh<PostgresStore> {
    let base = base_url();
    let database = ScratchDatabase::create(&base, "conformance")
        .await
        .unwrap_or_else(|error| {
            panic!("PostgreSQL not reachable at {base}: start it with scripts/engines up ({error})")
        });
    let store = database.store().await.expect("open the scratch database");
    // A peer connects again, as another process of the service would.
    let url = database.url().to_owned();
    Fresh::new(store, database).with_peer(move || {
        let url = url.clone();
        async move {
            PostgresStore::connect(&url)
                .await
                .expect("open the scratch database again")
        }
    })
}

tandem_testkit::store_conformance!(
    postgres,
    fresh_postgres(),
    StoreFeatures {
        // The lease's own thread unlocks on its connection after the drop.
        lease_free_as_soon_as_dropped: false,
    }
);
