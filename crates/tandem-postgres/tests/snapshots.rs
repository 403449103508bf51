//! A rebuild's switch waits for readers whose snapshot is older than its
//! transaction (`EngineSql::wait_for_older_snapshots`), and never for
//! writers queued behind it. Real PostgreSQL, scratch databases.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use tandem::store::{Store, StoreError, Tx};
use tandem_postgres::testing::{base_url, connect_raw, ScratchDatabase};

async fn scratch(label: &str) -> ScratchDatabase {
    let base = base_url();
    ScratchDatabase::create(&base, label)
        .await
        .unwrap_or_else(|error| {
            panic!("PostgreSQL not reachable at {base}: start it with scripts/engines up ({error})")
        })
}

fn wait(tx: &mut dyn Tx, timeout: Duration) -> Result<bool, StoreError> {
    tx.engine().wait_for_older_snapshots(tx, timeout)
}

/// Polls (from a connection of its own) until a session of `database`
/// waits for an advisory lock.
fn until_a_writer_waits(url: &str, database: &str) {
    let mut admin = connect_raw(url).expect("admin connection");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = admin
            .query_one(
                "SELECT COUNT(*) FROM pg_stat_activity
                 WHERE datname = $1 AND wait_event = 'advisory'",
                &[&database],
            )
            .expect("pg_stat_activity")
            .get(0);
        if waiting > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no writer queued on the writer lock"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_with_an_older_snapshot_is_waited_for_and_a_queued_writer_is_not() {
    let database = scratch("snapshots").await;
    let store = database.store().await.expect("store");
    let url = database.url().to_owned();

    // Nobody else reads: nothing to wait for.
    let alone = store
        .write(|tx| wait(tx, Duration::from_secs(1)))
        .await
        .expect("wait");
    assert!(alone, "no other session holds a snapshot");

    // A repeatable-read transaction that has read holds its snapshot
    // until it ends: the wait gives up at its deadline.
    let (ended_tx, ended_rx) = mpsc::channel::<()>();
    let (began_tx, began_rx) = mpsc::channel::<()>();
    let reader_url = url.clone();
    let reader = std::thread::spawn(move || {
        let mut client = connect_raw(&reader_url).expect("reader connection");
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT 1")
            .expect("take a snapshot");
        began_tx.send(()).unwrap();
        ended_rx.recv().unwrap();
        client.batch_execute("COMMIT").expect("end it");
    });
    began_rx.recv().unwrap();
    let started = Instant::now();
    let while_open = store
        .write(|tx| wait(tx, Duration::from_millis(300)))
        .await
        .expect("wait");
    assert!(!while_open, "the older snapshot was not seen");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "gave up before its deadline: {:?}",
        started.elapsed()
    );
    ended_tx.send(()).unwrap();
    reader.join().unwrap();
    let after = store
        .write(|tx| wait(tx, Duration::from_secs(5)))
        .await
        .expect("wait");
    assert!(after, "the snapshot ended, yet the wait did not end");

    // A writer of another store on the same database queues on the writer
    // lock (its statement holds a snapshot meanwhile): not waited for.
    let other = database.store().await.expect("a second store");
    let (locked_tx, locked_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let holding = store.write(move |tx| {
        locked_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        wait(tx, Duration::from_secs(2))
    });
    let holding = tokio::spawn(holding);
    tokio::task::spawn_blocking(move || locked_rx.recv().unwrap())
        .await
        .unwrap();
    let queued = tokio::spawn(other.write(|tx| tx.execute("SELECT 1", &[])));
    let (name, admin_url) = (database.name().to_owned(), url.clone());
    tokio::task::spawn_blocking(move || until_a_writer_waits(&admin_url, &name))
        .await
        .unwrap();
    go_tx.send(()).unwrap();
    let not_held_up = holding.await.unwrap().expect("wait");
    assert!(
        not_held_up,
        "the switch waited for a writer queued behind it"
    );
    queued.await.unwrap().expect("the queued writer goes on");
}
