//! The crash matrix: real `tandem worker` child processes killed with
//! SIGKILL at named crash points (producer before and after commit, relay
//! before and after publishing, consumer in the middle of a batch). After
//! restarting, every committed event is applied exactly once and no
//! rolled-back one appears. Also: several processes appending to the
//! embedded log at once, one of them killed mid-way.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tandem::bus::{Delivery, Record};
use tandem::store::{Store, StoreError};

const EVENTS: u64 = 400;
const BATCH: &str = "40";

fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
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
    let output = tandem()
        .arg("worker")
        .args(args)
        .output()
        .expect("start tandem worker");
    assert!(
        output.status.success(),
        "tandem worker {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Starts a worker armed to stop at `fault`, waits (with a deadline) until
/// it reports reaching it, then kills it with SIGKILL.
fn run_worker_until_killed(fault: &str, args: &[&str]) {
    let mut child = KillOnDrop(
        tandem()
            .arg("worker")
            .args(args)
            .env("TANDEM_FAULT", fault)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tandem worker"),
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

/// (account, balance, applied, last sequence) per account, as built by
/// `tandem worker consume`.
fn ledger(dir: &Path) -> Vec<(String, i64, i64, i64)> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = tandem::engine::open_sqlite_store(&url(dir, "reader.db"))
            .await
            .unwrap();
        store.write(tandem_testkit::install_ledger).await.unwrap();
        tandem_testkit::ledger_rows(&store).await
    })
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

fn outbox_count(dir: &Path) -> i64 {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = tandem::engine::open_sqlite_store(&url(dir, "producer.db"))
            .await
            .unwrap();
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

fn log_length(dir: &Path) -> u64 {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let bus = tandem::engine::open_bus(&url(dir, "bus.db")).await.unwrap();
        bus.end_offsets("ledger")
            .await
            .unwrap()
            .iter()
            .map(|(_, end)| end)
            .sum()
    })
}

struct Files {
    _dir: tempfile::TempDir,
    producer: String,
    reader: String,
    bus: String,
}

impl Files {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            producer: url(dir.path(), "producer.db"),
            reader: url(dir.path(), "reader.db"),
            bus: url(dir.path(), "bus.db"),
            _dir: dir,
        }
    }

    fn path(&self) -> &Path {
        self._dir.path()
    }

    fn produce(&self) -> Vec<&str> {
        vec![
            "produce",
            "--db",
            &self.producer,
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

    fn consume(&self) -> Vec<&str> {
        vec![
            "consume",
            "--db",
            &self.reader,
            "--bus",
            &self.bus,
            "--expect",
            "400",
            "--batch",
            BATCH,
        ]
    }

    fn assert_exactly_once(&self) {
        assert_eq!(
            outbox_count(self.path()),
            EVENTS as i64,
            "committed events in the outbox"
        );
        assert_eq!(
            ledger(self.path()),
            expected_ledger(),
            "read model after recovery"
        );
    }
}

#[test]
fn producer_killed_before_commit_loses_nothing_and_publishes_no_rolled_back_event() {
    let files = Files::new();
    run_worker_until_killed("producer.before_commit", &files.produce());
    assert_eq!(
        outbox_count(files.path()),
        0,
        "the open transaction must roll back"
    );
    run_worker(&files.produce());
    run_worker(&files.relay());
    run_worker(&files.consume());
    files.assert_exactly_once();
    assert_eq!(log_length(files.path()), EVENTS);
}

#[test]
fn producer_killed_after_commit_keeps_the_committed_batch() {
    let files = Files::new();
    run_worker_until_killed("producer.after_commit", &files.produce());
    assert_eq!(outbox_count(files.path()), 40, "the first batch committed");
    run_worker(&files.produce());
    run_worker(&files.relay());
    run_worker(&files.consume());
    files.assert_exactly_once();
}

#[test]
fn relay_killed_before_publishing_resumes_from_its_cursor() {
    let files = Files::new();
    run_worker(&files.produce());
    run_worker_until_killed("relay.before_publish", &files.relay());
    assert_eq!(log_length(files.path()), 0);
    run_worker(&files.relay());
    run_worker(&files.consume());
    files.assert_exactly_once();
    assert_eq!(log_length(files.path()), EVENTS);
}

#[test]
fn relay_killed_after_publishing_republishes_and_consumers_absorb_duplicates() {
    let files = Files::new();
    run_worker(&files.produce());
    run_worker_until_killed("relay.after_publish", &files.relay());
    assert_eq!(
        log_length(files.path()),
        40,
        "the first batch reached the log"
    );
    run_worker(&files.relay());
    // The batch published before the kill went out twice.
    assert_eq!(log_length(files.path()), EVENTS + 40);
    run_worker(&files.consume());
    files.assert_exactly_once();
}

#[test]
fn consumer_killed_in_the_middle_of_a_batch_applies_it_once_after_restart() {
    let files = Files::new();
    run_worker(&files.produce());
    run_worker(&files.relay());
    run_worker_until_killed("consumer.before_commit", &files.consume());
    assert!(
        ledger(files.path()).is_empty(),
        "the half-applied batch must have rolled back"
    );
    run_worker(&files.consume());
    files.assert_exactly_once();
}

/// Reads every record of `topic` from the start.
fn read_all(bus_url: &str, topic: &str) -> Vec<Record> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let bus = tandem::engine::open_bus(bus_url).await.unwrap();
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
                tandem()
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
        tandem()
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

#[test]
fn sigterm_stops_a_consumer_cleanly_with_every_batch_whole() {
    let files = Files::new();
    run_worker(&files.produce());
    run_worker(&files.relay());
    // Expect more than exists, so the consumer keeps waiting for events.
    let mut consumer = KillOnDrop(
        tandem()
            .args([
                "worker",
                "consume",
                "--db",
                &files.reader,
                "--bus",
                &files.bus,
            ])
            .args(["--expect", "1000000", "--batch", "7"])
            .spawn()
            .expect("start consumer"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while ledger(files.path()).iter().map(|row| row.2).sum::<i64>() < EVENTS as i64 {
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
    files.assert_exactly_once();
}
