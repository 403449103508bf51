//! A rebuild's switch waits for readers whose snapshot is older than its
//! transaction (`EngineSql::wait_for_older_snapshots`), and never for
//! writers queued behind it; a session that holds a snapshot for long
//! defers a rebuild's switch but not the service's writes. Real
//! PostgreSQL, scratch databases, the embedded log.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem::bus::{Bus, OutgoingRecord};
use tandem::consumer::{Consumer, ConsumerConfig};
use tandem::rebuild::{self, ModelTable, ReadModel, RebuildState, Rebuildable, TableNames};
use tandem::store::{Store, StoreError, Tx};
use tandem::{Envelope, Handler, HandlerError};
use tandem_postgres::testing::{base_url, connect_raw, ScratchDatabase};
use tandem_testkit::{deposit_bytes, eventually, open_log, TOPIC};
use tokio_util::sync::CancellationToken;

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

/// One row per account: how many of its deposits were applied.
struct Counts;

static COUNT_TABLES: [ModelTable; 1] = [ModelTable {
    name: "deposit_counts",
    create: "CREATE TABLE IF NOT EXISTS {table} (account TEXT PRIMARY KEY, n BIGINT NOT NULL)",
}];

struct CountsIn(String);

impl ReadModel for Counts {
    fn tables(&self) -> &'static [ModelTable] {
        &COUNT_TABLES
    }

    fn handler(&self, names: &TableNames) -> Arc<dyn Handler> {
        Arc::new(CountsIn(names.get("deposit_counts").to_owned()))
    }
}

impl Handler for CountsIn {
    fn handle(&self, tx: &mut dyn Tx, event: &Envelope) -> Result<(), HandlerError> {
        tx.execute(
            &format!(
                "INSERT INTO {table} (account, n) VALUES ($1, 1)
                 ON CONFLICT (account) DO UPDATE SET n = {table}.n + 1",
                table = self.0
            ),
            tandem::params![&event.subject],
        )?;
        Ok(())
    }
}

fn deposits(sequences: std::ops::RangeInclusive<u64>) -> Vec<OutgoingRecord> {
    sequences
        .map(|sequence| OutgoingRecord {
            topic: TOPIC.into(),
            key: "acct".into(),
            payload: deposit_bytes("acct", sequence, 10),
        })
        .collect()
}

async fn applied<S: Store>(store: &S, table: &str) -> i64 {
    let table = table.to_owned();
    store
        .read(move |tx| -> Result<i64, StoreError> {
            // The new version's table appears at the runner's next check.
            let exists = tx
                .query_opt("SELECT to_regclass($1)::text", tandem::params![&table])?
                .map(|row| row.opt_text(0).map(|name| name.is_some()))
                .transpose()?
                .unwrap_or(false);
            if !exists {
                return Ok(0);
            }
            tx.query_opt(&format!("SELECT COALESCE(MAX(n), 0) FROM {table}"), &[])?
                .map_or(Ok(0), |row| row.i64(0))
        })
        .await
        .unwrap()
}

async fn state<S: Store>(store: &S) -> RebuildState {
    store
        .read(|tx| rebuild::latest(tx, "counts"))
        .await
        .unwrap()
        .expect("a rebuild on record")
        .state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_held_snapshot_defers_a_rebuilds_switch_but_not_the_services_writes() {
    const WAIT: Duration = Duration::from_secs(30);
    let database = scratch("deferred").await;
    let store = database.store().await.expect("store");
    let dir = tempfile::tempdir().unwrap();
    let bus: Arc<dyn Bus> = Arc::new(open_log(&dir.path().join("bus.db")).await);
    store
        .write(|tx| rebuild::install(tx, &Counts))
        .await
        .unwrap();
    bus.publish(&deposits(1..=20)).await.unwrap();
    let stop = CancellationToken::new();
    let model: Arc<dyn ReadModel> = Arc::new(Counts);
    let config = ConsumerConfig::new("counts", &[TOPIC]);
    let live = Consumer::new(
        store.clone(),
        Arc::clone(&bus),
        model.handler(&TableNames::live(&*model)),
        config.clone(),
    );
    let parts = [
        tokio::spawn({
            let stop = stop.clone();
            async move { live.run(stop).await.unwrap() }
        }),
        tokio::spawn(rebuild::run(
            store.clone(),
            Arc::clone(&bus),
            vec![Rebuildable { config, model }],
            stop.clone(),
        )),
    ];
    eventually("the live copy applies the deposits", WAIT, || {
        let store = store.clone();
        async move { applied(&store, "deposit_counts").await == 20 }
    })
    .await;

    // An operator's session holds a repeatable-read snapshot open.
    let (end_tx, end_rx) = mpsc::channel::<()>();
    let (began_tx, began_rx) = mpsc::channel::<()>();
    let url = database.url().to_owned();
    let operator = std::thread::spawn(move || {
        let mut client = connect_raw(&url).expect("operator connection");
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
            .expect("take a snapshot");
        began_tx.send(()).unwrap();
        end_rx.recv().unwrap();
        client.batch_execute("COMMIT").expect("end it");
    });
    tokio::task::spawn_blocking(move || began_rx.recv().unwrap())
        .await
        .unwrap();
    let number = store
        .write(|tx| -> Result<_, StoreError> {
            Ok(rebuild::request(tx, "counts", false, "test").unwrap())
        })
        .await
        .unwrap()
        .number;
    let built = format!("deposit_counts__r{number}");
    eventually("the new version is level", WAIT, || {
        let (store, built) = (store.clone(), built.clone());
        async move { applied(&store, &built).await == 20 }
    })
    .await;
    // The service's writes go on meanwhile.
    bus.publish(&deposits(21..=30)).await.unwrap();
    eventually("the live copy applies new deposits", WAIT, || {
        let store = store.clone();
        async move { applied(&store, "deposit_counts").await == 30 }
    })
    .await;
    // And the switch waits: for ten of the runner's checks, still building.
    let until = Instant::now() + rebuild::CHECK_EVERY * 10;
    while Instant::now() < until {
        assert_eq!(
            state(&store).await,
            RebuildState::Building,
            "switched under an older snapshot"
        );
        tokio::time::sleep(rebuild::CHECK_EVERY / 2).await;
    }
    // Once the session ends, it switches, with everything applied.
    end_tx.send(()).unwrap();
    operator.join().unwrap();
    eventually("the rebuild switches", WAIT, || {
        let store = store.clone();
        async move { state(&store).await == RebuildState::Switched }
    })
    .await;
    assert_eq!(applied(&store, "deposit_counts").await, 30);
    stop.cancel();
    for part in parts {
        part.await.unwrap();
    }
}
