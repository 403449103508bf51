//! Connections: failing fast and clearly, and recovering from a server that
//! dropped them (as a restart does). Real PostgreSQL, scratch databases.

use std::time::{Duration, Instant};

use tandem::store::{Store, StoreError};
use tandem_postgres::testing::{base_url, connect_raw, ScratchDatabase};
use tandem_postgres::PostgresStore;

async fn scratch(label: &str) -> ScratchDatabase {
    let base = base_url();
    ScratchDatabase::create(&base, label)
        .await
        .unwrap_or_else(|error| {
            panic!("PostgreSQL not reachable at {base}: start it with scripts/engines up ({error})")
        })
}

/// Ends every other session on `database`, as a server restart would.
async fn terminate_sessions(database: &ScratchDatabase) {
    let url = database.url().to_owned();
    let name = database.name().to_owned();
    std::thread::spawn(move || {
        let mut admin = connect_raw(&url).expect("admin connection");
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&name],
            )
            .expect("terminate");
    })
    .join()
    .unwrap();
}

#[tokio::test]
async fn an_unreachable_server_fails_fast_naming_it_without_the_password() {
    let started = Instant::now();
    let error = PostgresStore::connect("postgres://app:hunter2@127.0.0.1:1/orders?sslmode=disable")
        .await
        .expect_err("nothing listens on port 1");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    let message = error.to_string();
    assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
    assert!(message.contains("127.0.0.1:1/orders"), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_fails_one_job_and_is_replaced() {
    let database = scratch("reconnect").await;
    let store = database.store().await.expect("store");
    store
        .write(|tx| tx.execute_batch("CREATE TABLE items (id BIGINT PRIMARY KEY)"))
        .await
        .expect("create");
    // Warm the readers too.
    for _ in 0..4 {
        store
            .read(|tx| tx.query("SELECT COUNT(*) FROM items", &[]))
            .await
            .expect("read");
    }
    terminate_sessions(&database).await;
    let first = store
        .write(|tx| tx.execute("INSERT INTO items (id) VALUES ($1)", tandem::params![1_i64]))
        .await;
    assert!(
        matches!(first, Err(StoreError::Unavailable(_))),
        "the job that met the dropped connection: {first:?}"
    );
    store
        .write(|tx| tx.execute("INSERT INTO items (id) VALUES ($1)", tandem::params![2_i64]))
        .await
        .expect("the next job reconnects");
    let mut reads_ok = 0;
    for _ in 0..6 {
        if store
            .read(|tx| tx.query("SELECT COUNT(*) FROM items", &[]))
            .await
            .is_ok()
        {
            reads_ok += 1;
        }
    }
    assert!(
        reads_ok >= 4,
        "readers reconnect after one failure each: {reads_ok} of 6"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_connection_dies_is_lost() {
    let database = scratch("lease_lost").await;
    let store = database.store().await.expect("store");
    let mut lease = store.try_lead("relay").await.expect("try").expect("free");
    assert!(lease.held());
    terminate_sessions(&database).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while lease.held() {
        assert!(
            Instant::now() < deadline,
            "the lease still claims to be held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        store.try_lead("relay").await.expect("try").is_some(),
        "the server released the lock with the session"
    );
}

/// `sslmode` decides: `require` encrypts (the server has TLS on, as
/// Debian's package sets it up), `disable` does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_is_honoured() {
    let database = scratch("tls").await;
    let base = database.url().split('?').next().unwrap().to_owned();
    for (mode, encrypted) in [("require", 1), ("disable", 0)] {
        let store = PostgresStore::connect(&format!("{base}?sslmode={mode}"))
            .await
            .unwrap_or_else(|error| panic!("sslmode={mode}: {error}"));
        let row = store
            .read(|tx| {
                tx.query_opt(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
            })
            .await
            .expect("read")
            .expect("a row");
        assert_eq!(row.i64(0).unwrap(), encrypted, "sslmode={mode}");
    }
}

/// The tables updated in place leave room on each page (HOT updates), and
/// opening the store again keeps the setting without altering the table.
#[tokio::test]
async fn in_place_tables_get_a_fillfactor_once() {
    let database = scratch("fillfactor").await;
    let _first = database.store().await.expect("open");
    let _again = database.store().await.expect("open again");
    let store = database.store().await.expect("open a third time");
    let options = store
        .read(|tx| -> Result<Vec<(String, String)>, StoreError> {
            tx.query(
                "SELECT relname::text, array_to_string(reloptions, ',') FROM pg_class
                 WHERE relname IN ('tandem_aggregates', 'tandem_relay_positions',
                                   'tandem_consumer_positions', 'tandem_consumer_aggregates')
                 ORDER BY relname",
                &[],
            )?
            .iter()
            .map(|row| Ok((row.text(0)?.to_owned(), row.text(1)?.to_owned())))
            .collect()
        })
        .await
        .expect("read pg_class");
    assert_eq!(
        options,
        vec![
            ("tandem_aggregates".to_owned(), "fillfactor=70".to_owned()),
            (
                "tandem_consumer_aggregates".to_owned(),
                "fillfactor=70".to_owned()
            ),
            (
                "tandem_consumer_positions".to_owned(),
                "fillfactor=70".to_owned()
            ),
            (
                "tandem_relay_positions".to_owned(),
                "fillfactor=70".to_owned()
            ),
        ]
    );
}
