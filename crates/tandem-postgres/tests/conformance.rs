//! The store conformance suite (`tandem_testkit::conformance`) against
//! PostgreSQL: each test on a scratch database of its own, dropped after.
//! The server is `TANDEM_TEST_POSTGRES` (default 127.0.0.1:5432); a test
//! that cannot reach it fails.

use tandem_postgres::testing::{base_url, ScratchDatabase};
use tandem_postgres::PostgresStore;
use tandem_testkit::conformance::Fresh;

async fn fresh_postgres() -> Fresh<PostgresStore> {
    let base = base_url();
    let database = ScratchDatabase::create(&base, "conformance")
        .await
        .unwrap_or_else(|error| {
            panic!("PostgreSQL not reachable at {base}: start it with scripts/engines up ({error})")
        });
    let store = database.store().await.expect("open the scratch database");
    Fresh::new(store, database)
}

tandem_testkit::store_conformance!(postgres, fresh_postgres());
