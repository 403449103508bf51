//! rusqlite vs sqlx on Tandem's SQLite write workload. See README.md.
//!
//! Each run opens a fresh database file, creates the schema (untimed), then
//! times `events` events written in transactions of `batch`, one transaction
//! in flight at a time, from a tokio multi-thread runtime. Runs of the two
//! drivers alternate (A B, then B A next round) so that machine noise hits
//! both alike; the report gives medians and per-round ratios.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SCHEMA: &str = "
CREATE TABLE tandem_outbox (
    position     INTEGER PRIMARY KEY AUTOINCREMENT,
    topic        TEXT    NOT NULL,
    subject      TEXT    NOT NULL,
    sequence     INTEGER NOT NULL,
    event_id     TEXT    NOT NULL,
    event_type   TEXT    NOT NULL,
    envelope     BLOB    NOT NULL,
    committed_at INTEGER NOT NULL
);
CREATE TABLE tandem_aggregates (
    topic    TEXT    NOT NULL,
    subject  TEXT    NOT NULL,
    sequence INTEGER NOT NULL,
    PRIMARY KEY (topic, subject)
) WITHOUT ROWID;
CREATE TABLE tandem_consumer_positions (
    consumer    TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (consumer, topic, partition)
) WITHOUT ROWID;
CREATE TABLE tandem_consumer_aggregates (
    consumer   TEXT    NOT NULL,
    source     TEXT    NOT NULL,
    subject    TEXT    NOT NULL,
    sequence   INTEGER NOT NULL,
    blocked_by INTEGER,
    PRIMARY KEY (consumer, source, subject)
) WITHOUT ROWID;
CREATE TABLE ledger (
    account TEXT    PRIMARY KEY,
    balance INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE raw_events (
    id      INTEGER PRIMARY KEY,
    payload BLOB    NOT NULL
);
";

// The per-event statements of crates/tandem/src/{outbox,consumer}.rs when
// this comparison was measured (2026-11-28), with `?`; the toolkit has since
// keyed these tables by subject first and batches them per transaction.
const SELECT_AGGREGATE: &str =
    "SELECT sequence FROM tandem_aggregates WHERE topic = ? AND subject = ?";
const INSERT_AGGREGATE: &str =
    "INSERT INTO tandem_aggregates (topic, subject, sequence) VALUES (?, ?, 1)";
const UPDATE_AGGREGATE: &str = "UPDATE tandem_aggregates SET sequence = ?
     WHERE topic = ? AND subject = ? AND sequence = ?";
const INSERT_OUTBOX: &str = "INSERT INTO tandem_outbox
     (topic, subject, sequence, event_id, event_type, envelope, committed_at)
     VALUES (?, ?, ?, ?, ?, ?, ?)";
const SELECT_STATE: &str = "SELECT sequence, blocked_by FROM tandem_consumer_aggregates
     WHERE consumer = ? AND source = ? AND subject = ?";
const UPDATE_STATE: &str = "UPDATE tandem_consumer_aggregates SET sequence = ?, blocked_by = ?
     WHERE consumer = ? AND source = ? AND subject = ?";
const INSERT_STATE: &str = "INSERT INTO tandem_consumer_aggregates
     (consumer, source, subject, sequence, blocked_by) VALUES (?, ?, ?, ?, ?)";
const UPDATE_LEDGER: &str = "UPDATE ledger SET balance = balance + 1 WHERE account = ?";
const INSERT_LEDGER: &str = "INSERT INTO ledger (account, balance) VALUES (?, 1)";
const UPSERT_POSITION: &str = "INSERT INTO tandem_consumer_positions
     (consumer, topic, partition, next_offset, updated_at) VALUES (?, ?, ?, ?, ?)
     ON CONFLICT (consumer, topic, partition) DO UPDATE
     SET next_offset = excluded.next_offset, updated_at = excluded.updated_at";
const INSERT_RAW: &str = "INSERT INTO raw_events (payload) VALUES (?)";

const TOPIC: &str = "orders";
const EVENT_TYPE: &str = "OrderPlaced";
const CONSUMER: &str = "ledger";
const SUBJECTS: u64 = 10_000;
/// Stands for a ~330-byte JSON envelope.
const BLOB: &[u8] = &[b'j'; 330];

fn subject(event: u64) -> String {
    format!("acct-{}", event % SUBJECTS)
}

fn event_id(event: u64) -> String {
    format!("0198c5e2-7a10-7000-8000-{event:012x}")
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |now| now.as_micros() as i64)
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Workload {
    Producer,
    Consumer,
    Raw,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Driver {
    Rusqlite,
    Sqlx,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Sync {
    Full,
    Normal,
}

impl Sync {
    fn pragma(self) -> &'static str {
        match self {
            Sync::Full => "FULL",
            Sync::Normal => "NORMAL",
        }
    }
}

/// rusqlite as Tandem uses it (crates/tandem/src/sqlite/mod.rs): one thread owns
/// the connection; each transaction is one job sent over a channel, answered
/// on a oneshot; statements come from the prepared-statement cache.
mod with_rusqlite {
    use super::*;
    use rusqlite::{params, Connection, OptionalExtension};
    use tokio::sync::oneshot;

    type Job = Box<dyn FnOnce(&mut Connection) + Send>;

    pub struct Store {
        jobs: std::sync::mpsc::Sender<Job>,
        thread: std::thread::JoinHandle<()>,
    }

    impl Store {
        pub fn open(path: &Path, sync: Sync) -> rusqlite::Result<Self> {
            let connection = Connection::open(path)?;
            connection.execute_batch(&format!(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = {};
                 PRAGMA foreign_keys = ON;
                 PRAGMA cache_size = -16000;
                 PRAGMA temp_store = MEMORY;",
                sync.pragma()
            ))?;
            connection.set_prepared_statement_cache_capacity(64);
            connection.execute_batch(SCHEMA)?;
            let (jobs, received) = std::sync::mpsc::channel::<Job>();
            let thread = std::thread::Builder::new()
                .name("rusqlite-writer".into())
                .spawn(move || {
                    let mut connection = connection;
                    while let Ok(job) = received.recv() {
                        job(&mut connection);
                    }
                })
                .expect("writer thread");
            Ok(Self { jobs, thread })
        }

        /// Runs `work` in one `BEGIN IMMEDIATE` transaction on the writer.
        pub async fn write<R: Send + 'static>(
            &self,
            work: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
        ) -> rusqlite::Result<R> {
            let (reply, answer) = oneshot::channel();
            let job: Job = Box::new(move |connection| {
                let result = (|| {
                    connection.execute_batch("BEGIN IMMEDIATE")?;
                    match work(connection) {
                        Ok(value) => connection.execute_batch("COMMIT").map(|()| value),
                        Err(error) => {
                            let _ = connection.execute_batch("ROLLBACK");
                            Err(error)
                        }
                    }
                })();
                let _ = reply.send(result);
            });
            self.jobs.send(job).expect("writer thread alive");
            answer.await.expect("writer thread replied")
        }

        pub fn close(self) {
            drop(self.jobs);
            self.thread.join().expect("writer thread exits");
        }
    }

    pub fn producer(tx: &Connection, events: Range<u64>) -> rusqlite::Result<()> {
        for event in events {
            let subject = subject(event);
            let current: Option<i64> = tx
                .prepare_cached(SELECT_AGGREGATE)?
                .query_row(params![TOPIC, subject], |row| row.get(0))
                .optional()?;
            let sequence = match current {
                None => {
                    tx.prepare_cached(INSERT_AGGREGATE)?
                        .execute(params![TOPIC, subject])?;
                    1
                }
                Some(current) => {
                    let changed = tx.prepare_cached(UPDATE_AGGREGATE)?.execute(params![
                        current + 1,
                        TOPIC,
                        subject,
                        current
                    ])?;
                    assert_eq!(changed, 1);
                    current + 1
                }
            };
            tx.prepare_cached(INSERT_OUTBOX)?.execute(params![
                TOPIC,
                subject,
                sequence,
                event_id(event),
                EVENT_TYPE,
                BLOB,
                now_micros()
            ])?;
        }
        Ok(())
    }

    pub fn consumer(tx: &Connection, events: Range<u64>) -> rusqlite::Result<()> {
        let next_offset = events.end as i64;
        for event in events {
            let subject = subject(event);
            let state: Option<(i64, Option<i64>)> = tx
                .prepare_cached(SELECT_STATE)?
                .query_row(params![CONSUMER, TOPIC, subject], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })
                .optional()?;
            // The handler.
            if tx
                .prepare_cached(UPDATE_LEDGER)?
                .execute(params![subject])?
                == 0
            {
                tx.prepare_cached(INSERT_LEDGER)?
                    .execute(params![subject])?;
            }
            match state {
                Some((applied, blocked_by)) => tx
                    .prepare_cached(UPDATE_STATE)?
                    .execute(params![applied + 1, blocked_by, CONSUMER, TOPIC, subject])?,
                None => tx.prepare_cached(INSERT_STATE)?.execute(params![
                    CONSUMER,
                    TOPIC,
                    subject,
                    1,
                    None::<i64>
                ])?,
            };
        }
        tx.prepare_cached(UPSERT_POSITION)?.execute(params![
            CONSUMER,
            TOPIC,
            0,
            next_offset,
            now_micros()
        ])?;
        Ok(())
    }

    pub fn raw(tx: &Connection, events: Range<u64>) -> rusqlite::Result<()> {
        for _ in events {
            tx.prepare_cached(INSERT_RAW)?.execute(params![BLOB])?;
        }
        Ok(())
    }

    pub async fn run(
        path: &Path,
        sync: Sync,
        workload: Workload,
        events: u64,
        batch: u64,
    ) -> Duration {
        let store = Store::open(path, sync).expect("open rusqlite");
        let started = Instant::now();
        for start in (0..events).step_by(batch as usize) {
            let range = start..(start + batch).min(events);
            match workload {
                Workload::Producer => store.write(move |tx| producer(tx, range)).await,
                Workload::Consumer => store.write(move |tx| consumer(tx, range)).await,
                Workload::Raw => store.write(move |tx| raw(tx, range)).await,
            }
            .expect("rusqlite batch");
        }
        let elapsed = started.elapsed();
        store.close();
        elapsed
    }
}

/// sqlx the idiomatic async way: a one-connection pool, `begin_with("BEGIN
/// IMMEDIATE")`, one `query(..).bind(..).execute(&mut *tx).await` per
/// statement, `commit().await`.
mod with_sqlx {
    use super::*;
    use sqlx::sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
    };
    use sqlx::{SqliteConnection, SqlitePool};

    pub async fn open(path: &Path, sync: Sync) -> sqlx::Result<SqlitePool> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match sync {
                Sync::Full => SqliteSynchronous::Full,
                Sync::Normal => SqliteSynchronous::Normal,
            })
            .foreign_keys(true)
            .pragma("cache_size", "-16000")
            .pragma("temp_store", "MEMORY")
            .statement_cache_capacity(64);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        Ok(pool)
    }

    pub async fn producer(tx: &mut SqliteConnection, events: Range<u64>) -> sqlx::Result<()> {
        for event in events {
            let subject = subject(event);
            let current: Option<i64> = sqlx::query_scalar(SELECT_AGGREGATE)
                .bind(TOPIC)
                .bind(&subject)
                .fetch_optional(&mut *tx)
                .await?;
            let sequence = match current {
                None => {
                    sqlx::query(INSERT_AGGREGATE)
                        .bind(TOPIC)
                        .bind(&subject)
                        .execute(&mut *tx)
                        .await?;
                    1
                }
                Some(current) => {
                    let changed = sqlx::query(UPDATE_AGGREGATE)
                        .bind(current + 1)
                        .bind(TOPIC)
                        .bind(&subject)
                        .bind(current)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    assert_eq!(changed, 1);
                    current + 1
                }
            };
            sqlx::query(INSERT_OUTBOX)
                .bind(TOPIC)
                .bind(&subject)
                .bind(sequence)
                .bind(event_id(event))
                .bind(EVENT_TYPE)
                .bind(BLOB)
                .bind(now_micros())
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }

    pub async fn consumer(tx: &mut SqliteConnection, events: Range<u64>) -> sqlx::Result<()> {
        let next_offset = events.end as i64;
        for event in events {
            let subject = subject(event);
            let state: Option<(i64, Option<i64>)> = sqlx::query_as(SELECT_STATE)
                .bind(CONSUMER)
                .bind(TOPIC)
                .bind(&subject)
                .fetch_optional(&mut *tx)
                .await?;
            // The handler.
            let updated = sqlx::query(UPDATE_LEDGER)
                .bind(&subject)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if updated == 0 {
                sqlx::query(INSERT_LEDGER)
                    .bind(&subject)
                    .execute(&mut *tx)
                    .await?;
            }
            match state {
                Some((applied, blocked_by)) => {
                    sqlx::query(UPDATE_STATE)
                        .bind(applied + 1)
                        .bind(blocked_by)
                        .bind(CONSUMER)
                        .bind(TOPIC)
                        .bind(&subject)
                        .execute(&mut *tx)
                        .await?
                }
                None => {
                    sqlx::query(INSERT_STATE)
                        .bind(CONSUMER)
                        .bind(TOPIC)
                        .bind(&subject)
                        .bind(1i64)
                        .bind(None::<i64>)
                        .execute(&mut *tx)
                        .await?
                }
            };
        }
        sqlx::query(UPSERT_POSITION)
            .bind(CONSUMER)
            .bind(TOPIC)
            .bind(0i64)
            .bind(next_offset)
            .bind(now_micros())
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    pub async fn raw(tx: &mut SqliteConnection, events: Range<u64>) -> sqlx::Result<()> {
        for _ in events {
            sqlx::query(INSERT_RAW).bind(BLOB).execute(&mut *tx).await?;
        }
        Ok(())
    }

    pub async fn run(
        path: &Path,
        sync: Sync,
        workload: Workload,
        events: u64,
        batch: u64,
    ) -> Duration {
        let pool = open(path, sync).await.expect("open sqlx");
        let started = Instant::now();
        for start in (0..events).step_by(batch as usize) {
            let range = start..(start + batch).min(events);
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.expect("begin");
            match workload {
                Workload::Producer => producer(&mut tx, range).await,
                Workload::Consumer => consumer(&mut tx, range).await,
                Workload::Raw => raw(&mut tx, range).await,
            }
            .expect("sqlx batch");
            tx.commit().await.expect("commit");
        }
        let elapsed = started.elapsed();
        pool.close().await;
        elapsed
    }
}

/// Checks (untimed) that the run wrote what it should have.
fn verify(path: &Path, workload: Workload, events: u64) {
    let connection = rusqlite::Connection::open(path).expect("open for verify");
    let one = |sql: &str| -> i64 { connection.query_row(sql, [], |row| row.get(0)).expect(sql) };
    let events = events as i64;
    match workload {
        Workload::Producer => {
            assert_eq!(one("SELECT count(*) FROM tandem_outbox"), events);
            assert_eq!(one("SELECT sum(sequence) FROM tandem_aggregates"), events);
        }
        Workload::Consumer => {
            assert_eq!(one("SELECT sum(balance) FROM ledger"), events);
            assert_eq!(
                one("SELECT sum(sequence) FROM tandem_consumer_aggregates"),
                events
            );
            assert_eq!(
                one("SELECT next_offset FROM tandem_consumer_positions"),
                events
            );
        }
        Workload::Raw => assert_eq!(one("SELECT count(*) FROM raw_events"), events),
    }
}

struct Args {
    events: u64,
    batch: u64,
    rounds: usize,
    workloads: Vec<Workload>,
    drivers: Vec<Driver>,
    syncs: Vec<Sync>,
    on_main: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        events: 200_000,
        batch: 1000,
        rounds: 5,
        workloads: vec![Workload::Producer, Workload::Consumer, Workload::Raw],
        drivers: vec![Driver::Rusqlite, Driver::Sqlx],
        syncs: vec![Sync::Full, Sync::Normal],
        on_main: false,
    };
    let mut given = std::env::args().skip(1);
    while let (Some(flag), Some(value)) = (given.next(), given.next()) {
        let list = || value.split(',').map(str::to_owned).collect::<Vec<_>>();
        match flag.as_str() {
            "--events" => args.events = value.parse().expect("--events N"),
            "--batch" => args.batch = value.parse().expect("--batch N"),
            "--rounds" => args.rounds = value.parse().expect("--rounds N"),
            "--workloads" => {
                args.workloads = list()
                    .iter()
                    .map(|name| match name.as_str() {
                        "producer" => Workload::Producer,
                        "consumer" => Workload::Consumer,
                        "raw" => Workload::Raw,
                        other => panic!("unknown workload {other}"),
                    })
                    .collect()
            }
            "--drivers" => {
                args.drivers = list()
                    .iter()
                    .map(|name| match name.as_str() {
                        "rusqlite" => Driver::Rusqlite,
                        "sqlx" => Driver::Sqlx,
                        other => panic!("unknown driver {other}"),
                    })
                    .collect()
            }
            "--sync" => {
                args.syncs = list()
                    .iter()
                    .map(|name| match name.as_str() {
                        "full" => Sync::Full,
                        "normal" => Sync::Normal,
                        other => panic!("unknown synchronous {other}"),
                    })
                    .collect()
            }
            "--caller" => {
                args.on_main = match value.as_str() {
                    "task" => false,
                    "main" => true,
                    other => panic!("unknown caller {other}"),
                }
            }
            other => panic!(
                "unknown flag {other}; flags: --events N --batch N --rounds N \
                 --workloads producer,consumer,raw --drivers rusqlite,sqlx --sync full,normal \
                 --caller task|main"
            ),
        }
    }
    args
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// Events per second of one run, by (round, sync, workload, driver).
struct Sample {
    round: usize,
    sync: Sync,
    workload: Workload,
    driver: Driver,
    per_second: f64,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = parse_args();
    // As Tandem does before its first connection (sqlite/mod.rs,
    // configure_library); both drivers link this one SQLite library.
    // SAFETY: no connection exists yet in this process.
    unsafe {
        rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, 0 as std::ffi::c_int);
    }
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/drivers-data");
    std::fs::create_dir_all(&data).expect("data directory");
    let data = data.canonicalize().expect("data directory");
    println!(
        "sqlite {}, {} events, transactions of {}, {} rounds, caller on {}, data in {}",
        rusqlite::version(),
        args.events,
        args.batch,
        args.rounds,
        if args.on_main {
            "the main thread"
        } else {
            "a runtime worker (spawned task)"
        },
        data.display()
    );

    let mut samples = Vec::new();
    for round in 0..args.rounds {
        for &sync in &args.syncs {
            for &workload in &args.workloads {
                // A B in even rounds, B A in odd ones.
                let mut drivers = args.drivers.clone();
                if round % 2 == 1 {
                    drivers.reverse();
                }
                for driver in drivers {
                    let directory = data.join(format!("run-{}-{round}", std::process::id()));
                    let _ = std::fs::remove_dir_all(&directory);
                    std::fs::create_dir_all(&directory).expect("run directory");
                    let path = directory.join("bench.db");
                    let run = run_once(
                        driver,
                        path.clone(),
                        sync,
                        workload,
                        args.events,
                        args.batch,
                    );
                    let elapsed = if args.on_main {
                        run.await
                    } else {
                        tokio::spawn(run).await.expect("run task")
                    };
                    verify(&path, workload, args.events);
                    std::fs::remove_dir_all(&directory).expect("remove run directory");
                    let per_second = args.events as f64 / elapsed.as_secs_f64();
                    println!(
                        "round {round} sync={:<6} {:<8} {:<8} {:>9.0} events/s ({:.2} s)",
                        sync.pragma(),
                        format!("{workload:?}"),
                        format!("{driver:?}"),
                        per_second,
                        elapsed.as_secs_f64()
                    );
                    samples.push(Sample {
                        round,
                        sync,
                        workload,
                        driver,
                        per_second,
                    });
                }
            }
        }
    }
    report(&args, &samples);
}

/// One timed run. Tandem's pipeline awaits its store from spawned tasks, on
/// the runtime's worker threads: the default here. `--caller main` awaits
/// from the main thread's `block_on` instead.
async fn run_once(
    driver: Driver,
    path: PathBuf,
    sync: Sync,
    workload: Workload,
    events: u64,
    batch: u64,
) -> Duration {
    match driver {
        Driver::Rusqlite => with_rusqlite::run(&path, sync, workload, events, batch).await,
        Driver::Sqlx => with_sqlx::run(&path, sync, workload, events, batch).await,
    }
}

fn report(args: &Args, samples: &[Sample]) {
    let rate = |round: usize, sync: Sync, workload: Workload, driver: Driver| {
        samples
            .iter()
            .find(|s| {
                s.round == round && s.sync == sync && s.workload == workload && s.driver == driver
            })
            .map(|s| s.per_second)
    };
    println!();
    println!("| synchronous | workload | rusqlite events/s | sqlx events/s | rusqlite/sqlx | per-round ratios |");
    println!("|---|---|---:|---:|---:|---|");
    for &sync in &args.syncs {
        for &workload in &args.workloads {
            let mut medians = Vec::new();
            for driver in [Driver::Rusqlite, Driver::Sqlx] {
                let mut rates: Vec<f64> = (0..args.rounds)
                    .filter_map(|r| rate(r, sync, workload, driver))
                    .collect();
                medians.push(if rates.is_empty() {
                    f64::NAN
                } else {
                    median(&mut rates)
                });
            }
            let mut ratios: Vec<f64> = (0..args.rounds)
                .filter_map(|r| {
                    Some(
                        rate(r, sync, workload, Driver::Rusqlite)?
                            / rate(r, sync, workload, Driver::Sqlx)?,
                    )
                })
                .collect();
            let listed: Vec<String> = ratios.iter().map(|ratio| format!("{ratio:.2}")).collect();
            let ratio = if ratios.is_empty() {
                f64::NAN
            } else {
                median(&mut ratios)
            };
            println!(
                "| {} | {:?} | {:.0} | {:.0} | {:.2} | {} |",
                sync.pragma(),
                workload,
                medians[0],
                medians[1],
                ratio,
                listed.join(" ")
            );
        }
    }
}
