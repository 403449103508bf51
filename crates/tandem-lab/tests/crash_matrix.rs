//! The crash matrix: real `tandem-lab worker` child processes killed with
//! SIGKILL at named crash points (producer before and after commit, relay
//! before and after publishing, consumer in the middle of a batch). After
//! restarting, every committed event is applied exactly once and no
//! rolled-back one appears. The matrix runs on every pair of engines:
//! embedded log + SQLite, Kafka + PostgreSQL, NATS JetStream + PostgreSQL
//! (`scripts/engines up` starts the servers). Also: several processes
//! appending to the embedded log at once, one of them killed mid-way; and
//! a bulk redrive of 10,000 parked events whose consumer is killed
//! part-way.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tandem::bus::{Delivery, Record};
use tandem::store::{Store, StoreError};

const EVENTS: u64 = 400;
const BATCH: &str = "40";

fn lab() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem-lab"))
}

fn url(dir: &Path, file: &str) -> String {
    format!("sqlite://{}", dir.join(file).display())
}

/// A child process that is killed if the test fails before reaping it.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a worker to completion and fails the test on a non-zero exit.
fn run_worker(args: &[&str]) {
    let output = lab()
        .arg("worker")
        .args(args)
        .output()
        .expect("start tandem-lab worker");
    assert!(
        output.status.success(),
        "tandem-lab worker {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Starts a worker armed to stop at `fault`, waits (with a deadline) until
/// it reports reaching it, then kills it with SIGKILL.
fn run_worker_until_killed(fault: &str, args: &[&str]) {
    let mut child = KillOnDrop(
        lab()
            .arg("worker")
            .args(args)
            .env("TANDEM_FAULT", fault)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tandem-lab worker"),
    );
    let stdout = child.0.stdout.take().expect("piped stdout");
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("TANDEM_FAULT_REACHED") {
                let _ = sender.send(line);
                return;
            }
        }
    });
    let reached = receiver.recv_timeout(Duration::from_secs(60));
    child.0.kill().expect("SIGKILL the worker");
    let status = child.0.wait().expect("reap the worker");
    assert_eq!(
        reached.as_deref().ok(),
        Some(format!("TANDEM_FAULT_REACHED {fault}").as_str()),
        "worker {args:?} never reached {fault} (exit {status})"
    );
    assert!(!status.success(), "a killed worker cannot succeed");
}

/// Where one crash test runs: the two service databases, the bus, and a
/// topic and consumer group of its own (brokers are shared by tests).
struct Setup {
    producer: String,
    reader: String,
    bus: String,
    topic: String,
    group: String,
    /// Whether a batch published twice (relay killed after publishing)
    /// shows twice on the log. NATS drops the second copy by message id.
    republished_batch_shows: bool,
    _keep_alive: Vec<Box<dyn std::any::Any>>,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// A scratch PostgreSQL database for one test, dropped with the guard.
fn scratch_postgres(label: &str) -> (String, Box<dyn std::any::Any>) {
    let base = std::env::var("TANDEM_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let database = runtime()
        .block_on(tandem_postgres::testing::ScratchDatabase::create(
            &base, label,
        ))
        .unwrap_or_else(|error| {
            panic!("PostgreSQL not reachable at {base}: start it with scripts/engines up ({error})")
        });
    (database.url().to_owned(), Box::new(database))
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

impl Setup {
    fn embedded() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            producer: url(dir.path(), "producer.db"),
            reader: url(dir.path(), "reader.db"),
            bus: url(dir.path(), "bus.db"),
            topic: tandem_testkit::TOPIC.into(),
            group: "ledger-view".into(),
            republished_batch_shows: true,
            _keep_alive: vec![Box::new(dir)],
        }
    }

    fn on_postgres(bus: String, republished_batch_shows: bool) -> Self {
        let (producer, producer_guard) = scratch_postgres("crash_producer");
        let (reader, reader_guard) = scratch_postgres("crash_reader");
        Self {
            producer,
            reader,
            bus,
            topic: unique("ledger"),
            group: unique("ledger-view"),
            republished_batch_shows,
            _keep_alive: vec![producer_guard, reader_guard],
        }
    }

    fn kafka_postgres() -> Self {
        let bus =
            std::env::var("TANDEM_TEST_KAFKA").unwrap_or_else(|_| "kafka://127.0.0.1:19092".into());
        // A new producer process is a new idempotent-producer session:
        // Kafka keeps both copies of a republished batch.
        Self::on_postgres(bus, true)
    }

    fn nats_postgres() -> Self {
        let bus =
            std::env::var("TANDEM_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
        Self::on_postgres(bus, false)
    }

    /// (account, balance, applied, last sequence) per account, as built by
    /// `tandem-lab worker consume`.
    fn ledger(&self) -> Vec<(String, i64, i64, i64)> {
        runtime().block_on(async {
            let store = tandem_engines::open_store(&self.reader).await.unwrap();
            store.write(tandem_testkit::install_ledger).await.unwrap();
            tandem_testkit::ledger_rows(&store).await
        })
    }

    fn outbox_count(&self) -> i64 {
        runtime().block_on(async {
            let store = tandem_engines::open_store(&self.producer).await.unwrap();
            store
                .read(|tx| -> Result<i64, StoreError> {
                    tx.query_opt("SELECT COUNT(*) FROM tandem_outbox", &[])?
                        .unwrap()
                        .i64(0)
                })
                .await
                .unwrap()
        })
    }

    fn log_length(&self) -> u64 {
        runtime().block_on(async {
            let bus = tandem_engines::open_bus(&self.bus).await.unwrap();
            bus.end_offsets(&self.topic)
                .await
                .unwrap()
                .iter()
                .map(|(_, end)| end)
                .sum()
        })
    }

    fn produce(&self) -> Vec<&str> {
        vec![
            "produce",
            "--db",
            &self.producer,
            "--topic",
            &self.topic,
            "--count",
            "400",
            "--batch",
            BATCH,
        ]
    }

    fn relay(&self) -> Vec<&str> {
        vec![
            "relay",
            "--db",
            &self.producer,
            "--bus",
            &self.bus,
            "--batch",
            BATCH,
        ]
    }

    /// The relay with the outbox pruned beside it, as in a service.
    fn relay_pruning(&self) -> Vec<&str> {
        let mut args = self.relay();
        args.push("--prune");
        args
    }

    fn consume_expecting<'a>(&'a self, expect: &'a str, batch: &'a str) -> Vec<&'a str> {
        vec![
            "consume",
            "--db",
            &self.reader,
            "--bus",
            &self.bus,
            "--topic",
            &self.topic,
            "--group",
            &self.group,
            "--expect",
            expect,
            "--batch",
            batch,
        ]
    }

    fn consume(&self) -> Vec<&str> {
        self.consume_expecting("400", BATCH)
    }

    fn assert_exactly_once(&self) {
        assert_eq!(
            self.outbox_count(),
            EVENTS as i64,
            "committed events in the outbox"
        );
        assert_eq!(
            self.ledger(),
            expected_ledger(),
            "read model after recovery"
        );
    }
}

/// What the ledger must hold after `EVENTS` deposits, each applied once.
fn expected_ledger() -> Vec<(String, i64, i64, i64)> {
    let mut accounts = std::collections::BTreeMap::<String, (i64, i64)>::new();
    for number in 0..EVENTS {
        let account = format!("acct-{}", number % 17);
        let entry = accounts.entry(account).or_default();
        entry.0 += number as i64 + 1;
        entry.1 += 1;
    }
    accounts
        .into_iter()
        .map(|(account, (balance, count))| (account, balance, count, count))
        .collect()
}

fn producer_killed_before_commit_loses_nothing_and_publishes_no_rolled_back_event(setup: Setup) {
    run_worker_until_killed("producer.before_commit", &setup.produce());
    assert_eq!(
        setup.outbox_count(),
        0,
        "the open transaction must roll back"
    );
    run_worker(&setup.produce());
    run_worker(&setup.relay());
    run_worker(&setup.consume());
    setup.assert_exactly_once();
    assert_eq!(setup.log_length(), EVENTS);
}

fn producer_killed_after_commit_keeps_the_committed_batch(setup: Setup) {
    run_worker_until_killed("producer.after_commit", &setup.produce());
    assert_eq!(setup.outbox_count(), 40, "the first batch committed");
    run_worker(&setup.produce());
    run_worker(&setup.relay());
    run_worker(&setup.consume());
    setup.assert_exactly_once();
}

fn relay_killed_before_publishing_resumes_from_its_cursor(setup: Setup) {
    run_worker(&setup.produce());
    run_worker_until_killed("relay.before_publish", &setup.relay());
    assert_eq!(setup.log_length(), 0);
    run_worker(&setup.relay());
    run_worker(&setup.consume());
    setup.assert_exactly_once();
    assert_eq!(setup.log_length(), EVENTS);
}

fn relay_killed_after_publishing_republishes_and_consumers_absorb_duplicates(setup: Setup) {
    run_worker(&setup.produce());
    run_worker_until_killed("relay.after_publish", &setup.relay());
    assert_eq!(setup.log_length(), 40, "the first batch reached the log");
    run_worker(&setup.relay());
    let expected = if setup.republished_batch_shows {
        // The batch published before the kill went out twice.
        EVENTS + 40
    } else {
        EVENTS
    };
    assert_eq!(setup.log_length(), expected);
    run_worker(&setup.consume());
    setup.assert_exactly_once();
}

/// The two relay crash points again, with the outbox pruned while the
/// relay runs: pruning takes only what the bus acknowledged, so the
/// restarted relay still finds everything it had not published, and the
/// outbox ends empty.
fn relay_killed_while_pruning_loses_nothing_and_duplicates_nothing(setup: Setup) {
    run_worker(&setup.produce());
    run_worker_until_killed("relay.before_publish", &setup.relay_pruning());
    run_worker_until_killed("relay.after_publish", &setup.relay_pruning());
    run_worker(&setup.relay_pruning());
    run_worker(&setup.consume());
    // The outbox is pruned, so the ledger alone shows exactly once.
    assert_eq!(
        setup.ledger(),
        expected_ledger(),
        "read model after recovery"
    );
    // What was published and pruned is only what the bus acknowledged.
    assert!(setup.log_length() >= EVENTS);
    assert_eq!(setup.outbox_count(), 0, "every published row pruned");
}

fn consumer_killed_in_the_middle_of_a_batch_applies_it_once_after_restart(setup: Setup) {
    run_worker(&setup.produce());
    run_worker(&setup.relay());
    assert_eq!(
        setup.log_length(),
        EVENTS,
        "the relay published every event"
    );
    run_worker_until_killed("consumer.before_commit", &setup.consume());
    assert!(
        setup.ledger().is_empty(),
        "the half-applied batch must have rolled back"
    );
    run_worker(&setup.consume());
    setup.assert_exactly_once();
}

fn sigterm_stops_a_consumer_cleanly_with_every_batch_whole(setup: Setup) {
    run_worker(&setup.produce());
    run_worker(&setup.relay());
    // Expect more than exists, so the consumer keeps waiting for events.
    let mut consumer = KillOnDrop(
        lab()
            .arg("worker")
            .args(setup.consume_expecting("1000000", "7"))
            .spawn()
            .expect("start consumer"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while setup.ledger().iter().map(|row| row.2).sum::<i64>() < EVENTS as i64 {
        assert!(
            std::time::Instant::now() < deadline,
            "consumer did not catch up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) with a pid we own and a valid signal number.
    let sent = unsafe { libc::kill(consumer.0.id() as i32, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = consumer.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "consumer ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "graceful stop exits 0, got {status}");
    setup.assert_exactly_once();
}

/// The whole matrix, as one `#[test]` per crash point, in `mod $engines`.
macro_rules! crash_matrix {
    ($engines:ident, $setup:expr) => {
        mod $engines {
            use super::*;
            crash_matrix!(@tests $setup,
                producer_killed_before_commit_loses_nothing_and_publishes_no_rolled_back_event,
                producer_killed_after_commit_keeps_the_committed_batch,
                relay_killed_before_publishing_resumes_from_its_cursor,
                relay_killed_after_publishing_republishes_and_consumers_absorb_duplicates,
                relay_killed_while_pruning_loses_nothing_and_duplicates_nothing,
                consumer_killed_in_the_middle_of_a_batch_applies_it_once_after_restart,
                sigterm_stops_a_consumer_cleanly_with_every_batch_whole,
            );
        }
    };
    (@tests $setup:expr, $($check:ident),+ $(,)?) => {
        $(
            #[test]
            fn $check() {
                super::$check($setup);
            }
        )+
    };
}

crash_matrix!(embedded_sqlite, Setup::embedded());
crash_matrix!(kafka_postgres, Setup::kafka_postgres());
crash_matrix!(nats_postgres, Setup::nats_postgres());

/// Reads every record of `topic` from the start.
fn read_all(bus_url: &str, topic: &str) -> Vec<Record> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let bus = tandem_engines::open_bus(bus_url).await.unwrap();
        let total: u64 = bus
            .end_offsets(topic)
            .await
            .unwrap()
            .iter()
            .map(|(_, end)| end)
            .sum();
        let mut subscription = bus.subscribe("reader", &[topic.to_owned()]).await.unwrap();
        let mut records = Vec::new();
        while (records.len() as u64) < total {
            match subscription
                .next(10_000, Duration::from_secs(5))
                .await
                .unwrap()
            {
                Some(Delivery::Records(batch)) => records.extend(batch),
                Some(_) => {}
                None => panic!("log ended early at {} of {total}", records.len()),
            }
        }
        records
    })
}

#[test]
fn processes_appending_at_once_get_dense_offsets_and_a_killed_one_tears_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bus = format!(
        "sqlite://{}?partitions=3",
        dir.path().join("bus.db").display()
    );
    // Create the file first so every writer sees three partitions.
    run_worker(&[
        "append", "--bus", &bus, "--topic", "t", "--writer", "0", "--count", "10",
    ]);
    let writers: Vec<KillOnDrop> = (1..=4)
        .map(|writer| {
            KillOnDrop(
                lab()
                    .args(["worker", "append", "--bus", &bus, "--topic", "t"])
                    .args([
                        "--writer",
                        &writer.to_string(),
                        "--count",
                        "1500",
                        "--batch",
                        "10",
                    ])
                    .spawn()
                    .expect("start writer"),
            )
        })
        .collect();
    // A fifth writer is killed at a random moment while the others append.
    let mut victim = KillOnDrop(
        lab()
            .args(["worker", "append", "--bus", &bus, "--topic", "t"])
            .args(["--writer", "9", "--count", "1000000", "--batch", "10"])
            .spawn()
            .expect("start victim"),
    );
    for mut writer in writers {
        assert!(writer.0.wait().unwrap().success());
    }
    victim.0.kill().unwrap();
    victim.0.wait().unwrap();

    let records = read_all(&bus, "t");
    // Offsets are dense and strictly increasing in every partition.
    let mut next_offset = std::collections::BTreeMap::<u32, u64>::new();
    for record in &records {
        let expected = next_offset.entry(record.partition).or_insert(0);
        assert_eq!(
            record.offset, *expected,
            "partition {} offsets",
            record.partition
        );
        *expected += 1;
        assert_eq!(
            record.partition,
            tandem::bus::partition_for(&record.key, 3),
            "key {} in the wrong partition",
            record.key
        );
    }
    // Per key: records in the order their writer appended them.
    let mut last_of_key = std::collections::HashMap::<&str, u64>::new();
    for record in &records {
        let text = std::str::from_utf8(&record.payload).unwrap();
        let number: u64 = text.split_once(':').unwrap().1.parse().unwrap();
        if let Some(previous) = last_of_key.insert(&record.key, number) {
            assert!(
                previous < number,
                "key {} out of order: {previous} then {number}",
                record.key
            );
        }
    }
    // Per writer: nothing lost, nothing duplicated.
    let mut by_writer = std::collections::BTreeMap::<u32, Vec<u64>>::new();
    for record in &records {
        let text = String::from_utf8(record.payload.clone()).unwrap();
        let (writer, number) = text.split_once(':').unwrap();
        by_writer
            .entry(writer.parse().unwrap())
            .or_default()
            .push(number.parse().unwrap());
    }
    for writer in 1..=4 {
        let mut numbers = by_writer.remove(&writer).unwrap_or_default();
        numbers.sort_unstable();
        assert_eq!(numbers, (0..1500).collect::<Vec<u64>>(), "writer {writer}");
    }
    let mut victim_numbers = by_writer.remove(&9).unwrap_or_default();
    victim_numbers.sort_unstable();
    assert_eq!(
        victim_numbers.len() % 10,
        0,
        "a torn batch of the killed writer"
    );
    assert_eq!(
        victim_numbers,
        (0..victim_numbers.len() as u64).collect::<Vec<u64>>(),
        "the killed writer's records are a prefix"
    );
}

/// What the ledger must hold after deposits `0..count`, each applied once.
fn ledger_after(count: u64) -> Vec<(String, i64, i64, i64)> {
    let mut accounts = std::collections::BTreeMap::<String, (i64, i64)>::new();
    for number in 0..count {
        let entry = accounts.entry(format!("acct-{}", number % 17)).or_default();
        entry.0 += number as i64 + 1;
        entry.1 += 1;
    }
    accounts
        .into_iter()
        .map(|(account, (balance, applied))| (account, balance, applied, applied))
        .collect()
}

/// A bulk redrive as the admin API records it (one request per parked
/// letter, in one transaction), carried out by a consumer killed with
/// SIGKILL part-way: after a restart every one of the 10,000 events is
/// applied exactly once, and every letter is resolved.
#[test]
fn a_bulk_redrive_of_10000_parked_events_killed_part_way_applies_each_once() {
    const PARKED: u64 = 10_000;
    let setup = Setup::embedded();
    let count = PARKED.to_string();
    let mut produce = setup.produce();
    produce[6] = &count;
    produce[8] = "500";
    run_worker(&produce);
    let mut relay = setup.relay();
    relay[6] = "500";
    run_worker(&relay);
    // Every deposit refused: each account's first parked, the rest parked
    // behind it.
    let mut refusing = setup.consume_expecting(&count, "500");
    refusing.push("--refuse");
    run_worker(&refusing);

    // One store for every look: opening one takes the write lock (its
    // migrations check), which queued behind the consumer's redrives
    // and let a whole run of them finish between two looks.
    let reader =
        runtime().block_on(async { tandem_engines::open_store(&setup.reader).await.unwrap() });
    let letters = |status: &'static str| -> i64 {
        runtime().block_on(async {
            reader
                .read(move |tx| -> Result<i64, StoreError> {
                    tx.query_opt(
                        "SELECT COUNT(*) FROM tandem_dead_letters WHERE status = $1",
                        tandem::params![status],
                    )?
                    .unwrap()
                    .i64(0)
                })
                .await
                .unwrap()
        })
    };
    assert_eq!(letters("parked"), PARKED as i64);
    let asked = runtime().block_on(async {
        let store = tandem_engines::open_store(&setup.reader).await.unwrap();
        store
            .write(|tx| {
                let filter = tandem::dead_letter::Filter {
                    status: Some("parked".into()),
                    ..Default::default()
                };
                let ids: Vec<i64> = tandem::dead_letter::page_in(tx, &filter, None, 100_000)?
                    .iter()
                    .map(|letter| letter.id)
                    .collect();
                tandem::dead_letter::request_in(
                    tx,
                    &ids,
                    tandem::dead_letter::Command::Redrive(None),
                )
            })
            .await
            .unwrap()
    });
    assert_eq!(asked.len() as u64, PARKED);

    // The consumer carries the requests out; it is killed once a good
    // part, not all, is resolved.
    let consume = setup.consume_expecting(&count, "500");
    let mut child = KillOnDrop(
        lab()
            .arg("worker")
            .args(&consume)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tandem-lab worker"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        // Each account's parked events resolve in one transaction (17
        // accounts): killed after the first, the kill is part-way.
        let resolved = letters("resolved");
        if resolved >= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {resolved} letters resolved after 300 s"
        );
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "the consumer exited before it was killed"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.0.kill().expect("SIGKILL the consumer");
    child.0.wait().unwrap();
    let resolved_at_kill = letters("resolved");
    assert!(
        resolved_at_kill < PARKED as i64,
        "the kill came after the last redrive ({resolved_at_kill} resolved): not part-way"
    );

    // Restarted, it finishes what was asked.
    run_worker(&consume);
    assert_eq!(letters("resolved"), PARKED as i64);
    assert_eq!(letters("parked"), 0);
    assert_eq!(
        setup.ledger(),
        ledger_after(PARKED),
        "each event applied once"
    );
}
