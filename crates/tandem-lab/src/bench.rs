//! `tandem-lab bench pipeline`: how fast events move through the whole pipeline
//! with durable commits, beside a raw rate measured in the same run: on the
//! embedded default, batched SQLite inserts of the same payload size on the
//! same disk; with `--bus URL` (Kafka, NATS), a plain producer/consumer loop
//! of the same payloads against the same broker.
//!
//! Phases:
//! 1. raw: `batch`-row transactions of envelope-sized blobs into a plain
//!    table (three runs of `events` rows, each into a file of its own; the
//!    median counts, so one disturbed run does not move the ratio), or
//!    `batch`-record publishes read back by one subscriber;
//! 2. throughput: a producer commits `events` deposits in transactions of
//!    `batch` while the relay and the consumer run; the clock stops when the
//!    read model has applied the last one;
//! 3. latency: the producer commits every `tick_ms` (2) at half the
//!    measured rate (or `--latency-rate`); the delay from each producer
//!    commit, and from each event's creation, to the commit of the consumer
//!    transaction that applied it is recorded (p50, p99).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Serialize;
use tandem::bus::{Delivery, OutgoingRecord};
use tandem::consumer::{CommittedBatch, Consumer, ConsumerConfig, ConsumerObserver};
use tandem::embedded::{EmbeddedLog, EmbeddedOptions};
use tandem::relay::{Relay, RelayConfig};
use tandem::sqlite::{SqliteOptions, SqliteStore, Synchronous};
use tandem::store::{Param, Store, StoreError};
use tandem::{Bus, Handler};
use tandem_engines::AnyStore;
use tandem_testkit::{deposit_event, install_ledger, Ledger, TOPIC};
use tokio_util::sync::CancellationToken;

use crate::progress::Progress;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Events/s through outbox → relay → embedded log → consumer → read model.
    Pipeline(PipelineArgs),
    /// POST /orders throughput and latency under the built-in load
    /// generator, and the time from POST /orders to CONFIRMED.
    Orders(crate::bench_orders::OrdersArgs),
    /// The order flow on events against the same flow over synchronous
    /// REST calls: saturation, latency, confirmation, and outages of the
    /// Customer and Inventory Services.
    Compare(crate::bench_compare::CompareArgs),
    /// The admin API's dead-letter listings and failure groups with many
    /// letters parked, over a real socket.
    DeadLetters(crate::bench_dead_letters::DeadLettersArgs),
}

#[derive(Debug, Args)]
pub struct PipelineArgs {
    /// Events in the throughput phase.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Events per producer transaction, per relay batch and per consumer batch.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Distinct aggregates the events are spread over.
    #[arg(long, default_value_t = 10_000)]
    aggregates: u64,
    /// SQLite `synchronous` for every file: full (fsync per commit) or normal.
    #[arg(long, default_value = "full")]
    synchronous: String,
    /// Seconds of the fixed-rate latency phase.
    #[arg(long, default_value_t = 5)]
    latency_seconds: u64,
    /// Milliseconds between two producer commits in the latency phase.
    #[arg(long, default_value_t = 2)]
    tick_ms: u64,
    /// Events/s of the latency phase (default: half the rate the
    /// throughput phase measured). A fixed rate compares two builds or
    /// settings at the same load.
    #[arg(long)]
    latency_rate: Option<f64>,
    /// Where the database files go (default: a fresh temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The bus (default: an embedded log in --dir), e.g. kafka://127.0.0.1:19092
    /// or nats://127.0.0.1:4222. The raw baseline is then this broker's own
    /// produce/consume rate.
    #[arg(long)]
    bus: Option<String>,
    /// The service databases (default: SQLite files in --dir). A postgres://
    /// URL names a server: the bench creates its producer and reader
    /// databases there and drops them afterwards.
    #[arg(long)]
    db: Option<String>,
    /// Append and apply one event per call: the producer calls
    /// `outbox::append` for each event instead of `append_all` for its
    /// transaction, and the consumer's handler has only `handle`, not a
    /// `handle_batch` that applies a batch in one statement. On PostgreSQL
    /// each call is a round trip; on SQLite `append_all` saves the
    /// per-event sequence statements, and the ledger applies a batch one
    /// event at a time either way.
    #[arg(long)]
    one_by_one: bool,
    /// Record the toolkit's metrics (on, as every service does) or not
    /// (off): the two give what the instruments cost.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    metrics: String,
    /// Prune while the pipeline runs (a short rule: published outbox rows
    /// at once, the embedded log down to its newest --retain-log-records
    /// records), every --prune-every-ms.
    #[arg(long)]
    retain: bool,
    /// With --retain: what is pruned (both, or one of the two alone, to
    /// tell their costs apart).
    #[arg(long, default_value = "both", value_parser = ["both", "outbox", "log"])]
    retain_kinds: String,
    /// With --retain: records kept per log partition.
    #[arg(long, default_value_t = 50_000)]
    retain_log_records: u64,
    /// With --retain: milliseconds between pruning rounds.
    #[arg(long, default_value_t = 1000)]
    prune_every_ms: u64,
    /// With --retain: rows deleted per transaction.
    #[arg(long, default_value_t = 1000)]
    prune_batch: u64,
    /// Report the database files' sizes every this many events applied
    /// (0: never).
    #[arg(long, default_value_t = 0)]
    sizes_every: u64,
    /// Print exactly one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

/// The ledger with only `handle`: the default `handle_batch` calls it once
/// per event.
struct OneByOne(Ledger);

impl Handler for OneByOne {
    fn handle(
        &self,
        tx: &mut dyn tandem::Tx,
        event: &tandem::Envelope,
    ) -> Result<(), tandem::HandlerError> {
        self.0.handle(tx, event)
    }

    fn reset(&self, tx: &mut dyn tandem::Tx) -> Result<(), tandem::HandlerError> {
        self.0.reset(tx)
    }
}

/// The files' sizes in bytes (each with its `-wal`) after `applied`
/// events.
#[derive(Debug, Serialize)]
struct Sizes {
    applied: u64,
    producer: u64,
    bus: u64,
    reader: u64,
    /// Of which in the `-wal` files.
    producer_wal: u64,
    bus_wal: u64,
    reader_wal: u64,
}

fn size_of(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |metadata| metadata.len())
}

fn wal_of(path: &Path) -> u64 {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    size_of(Path::new(&wal))
}

fn size_with_wal(path: &Path) -> u64 {
    size_of(path) + wal_of(path)
}

#[derive(Debug, Serialize)]
struct Report {
    bus: String,
    db: String,
    /// What `raw_inserts_per_sec` measured: `sqlite-inserts` or
    /// `bus-produce-consume`.
    raw_kind: &'static str,
    /// `batch` (append_all, handle_batch) or `one-by-one`.
    calls: &'static str,
    /// Whether the toolkit recorded its metrics (`on`, `off`).
    metrics: String,
    events: u64,
    batch: usize,
    aggregates: u64,
    synchronous: String,
    events_per_sec: f64,
    raw_inserts_per_sec: f64,
    /// Every run of the raw SQLite baseline, whose median is the above.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    raw_runs: Vec<f64>,
    ratio: f64,
    latency_rate_per_sec: f64,
    latency_samples: usize,
    /// Producer commit to read model visible.
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Event creation (inside the producer's transaction) to visible.
    created_p50_ms: f64,
    created_p99_ms: f64,
    /// With --bus: the broker's own produce-to-consume delay at the same
    /// rate and tick, with its plain client ([`crate::raw_latency`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_p99_ms: Option<f64>,
    /// p50_ms ÷ raw_p50_ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_ratio: Option<f64>,
    payload_bytes: usize,
    retain: bool,
    sizes: Vec<Sizes>,
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Pipeline(args) => pipeline(args).await,
        BenchCommand::Orders(args) => crate::bench_orders::run(args).await,
        BenchCommand::Compare(args) => crate::bench_compare::run(args).await,
        BenchCommand::DeadLetters(args) => crate::bench_dead_letters::run(args).await,
    }
}

/// Counts applied events and, when armed, keeps (created, visible) times
/// of each applied event, in µs.
#[derive(Default)]
struct Recorder {
    consumed: AtomicU64,
    recording: std::sync::atomic::AtomicBool,
    applied: Mutex<Vec<(i64, i64)>>,
}

impl ConsumerObserver for Recorder {
    fn batch_committed(&self, batch: CommittedBatch<'_>) {
        self.consumed
            .fetch_add(batch.consumed as u64, Ordering::SeqCst);
        if self.recording.load(Ordering::SeqCst) {
            self.applied
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .extend(
                    batch
                        .applied_created_micros
                        .iter()
                        .map(|created| (*created, batch.committed_at_micros)),
                );
        }
    }
}

/// Producer transactions of the latency phase: (start, commit) in µs. An
/// event created at `t` was committed by the transaction whose span holds it.
fn commit_time_of(transactions: &[(i64, i64)], created: i64) -> Option<i64> {
    let index = transactions.partition_point(|(start, _)| *start <= created);
    let (start, commit) = *transactions.get(index.checked_sub(1)?)?;
    (start <= created && created <= commit).then_some(commit)
}

fn percentile(sorted: &[i64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)] as f64 / 1000.0
}

fn sample_envelope_size() -> usize {
    tandem_testkit::deposit_bytes("acct-4242", 12, 4243).len()
}

/// Runs of the raw SQLite baseline; their median is the baseline.
const RAW_RUNS: usize = 3;

async fn raw_inserts(
    path: &Path,
    options: &SqliteOptions,
    events: u64,
    batch: usize,
    payload_bytes: usize,
) -> anyhow::Result<f64> {
    let store = SqliteStore::open(path, options.clone()).await?;
    store
        .write(|tx| tx.execute_batch("CREATE TABLE raw (id INTEGER PRIMARY KEY, key TEXT NOT NULL, payload BLOB NOT NULL)"))
        .await?;
    let payload = Arc::new(vec![b'x'; payload_bytes]);
    let started = Instant::now();
    let mut written = 0;
    while written < events {
        let end = (written + batch as u64).min(events);
        let payload = Arc::clone(&payload);
        store
            .write(move |tx| -> Result<(), StoreError> {
                for number in written..end {
                    let key = format!("acct-{number}");
                    tx.execute(
                        "INSERT INTO raw (key, payload) VALUES ($1, $2)",
                        &[Param::Text(&key), Param::Blob(&payload)],
                    )?;
                }
                Ok(())
            })
            .await?;
        written = end;
    }
    let rate = events as f64 / started.elapsed().as_secs_f64();
    drop(store);
    remove_when_closed(path).await;
    Ok(rate)
}

/// Waits (up to 30 s) until the store's connections closed, which shows as
/// SQLite deleting the WAL after its final checkpoint, then deletes the
/// file. What the kernel had not written back yet goes with it, so neither
/// that writeback nor the final checkpoint competes with the next phase.
async fn remove_when_closed(path: &Path) {
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while wal.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(&wal);
    let _ = std::fs::remove_file(format!("{}-shm", path.display()));
}

/// The broker's own rate: `events` records of `payload_bytes` published in
/// batches of `batch` while one subscriber reads them back; the clock
/// stops when the last one is read.
async fn raw_bus(
    bus: &Arc<dyn Bus>,
    events: u64,
    batch: usize,
    aggregates: u64,
    payload_bytes: usize,
) -> anyhow::Result<f64> {
    let topic = format!("bench-raw-{}", uuid::Uuid::now_v7().simple());
    let mut subscription = bus
        .subscribe(&format!("{topic}-reader"), std::slice::from_ref(&topic))
        .await?;
    let started = Instant::now();
    let publisher = {
        let bus = Arc::clone(bus);
        let topic = topic.clone();
        tokio::spawn(async move {
            let mut first = 0;
            while first < events {
                let end = (first + batch as u64).min(events);
                // Distinct payloads: brokers that de-duplicate by content
                // must not drop any.
                let records: Vec<OutgoingRecord> = (first..end)
                    .map(|number| OutgoingRecord {
                        topic: topic.clone(),
                        key: format!("acct-{}", number % aggregates),
                        payload: format!("{number:0payload_bytes$}").into_bytes(),
                    })
                    .collect();
                bus.publish(&records).await?;
                first = end;
            }
            Ok::<_, tandem::bus::BusError>(())
        })
    };
    let mut received = 0u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while received < events {
        anyhow::ensure!(
            Instant::now() < deadline,
            "raw loop: only {received} of {events} records came back within 600 s"
        );
        if publisher.is_finished() && received == 0 && started.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("raw loop: nothing came back within 60 s of publishing");
        }
        match subscription.next(batch, Duration::from_millis(500)).await? {
            Some(Delivery::Assigned(partitions)) => {
                for partition in &partitions {
                    subscription.seek(partition, 0).await?;
                }
            }
            Some(Delivery::Records(records)) => {
                received += records.len() as u64;
                subscription.ack(&records).await?;
            }
            Some(Delivery::Revoked(_)) | None => {}
        }
    }
    let elapsed = started.elapsed();
    publisher.await.context("raw publisher task")??;
    Ok(events as f64 / elapsed.as_secs_f64())
}

/// Commits `count` deposits starting at number `first`, in one transaction.
async fn produce<S: Store>(
    store: &S,
    topic: &str,
    first: u64,
    count: u64,
    aggregates: u64,
    one_by_one: bool,
) -> Result<(), StoreError> {
    let topic = topic.to_owned();
    // With tracing on, each producer transaction runs in a span, as a
    // request's would: its events get `create` spans and carry the trace,
    // and the consumer processes them in `process` spans.
    let span = if tandem::trace::enabled() {
        tracing::info_span!("produce", otel.name = "produce deposits")
    } else {
        tracing::Span::none()
    };
    // Current while the work is handed to the store (which takes the
    // span along), not across the await.
    let write = {
        let _entered = span.enter();
        store.write(move |tx| -> Result<(), StoreError> {
            let events = (first..first + count)
                .map(|number| deposit_event(&format!("acct-{}", number % aggregates), 1))
                .collect::<Result<Vec<_>, _>>()?;
            if one_by_one {
                for event in events {
                    tandem::outbox::append(tx, &topic, event)?;
                }
            } else {
                tandem::outbox::append_all(tx, &topic, events)?;
            }
            Ok(())
        })
    };
    write.await
}

async fn pipeline(args: PipelineArgs) -> anyhow::Result<()> {
    let synchronous = Synchronous::parse(&args.synchronous).with_context(|| {
        format!(
            "--synchronous {}: expected full, normal or off",
            args.synchronous
        )
    })?;
    anyhow::ensure!(args.batch >= 1, "--batch must be at least 1");
    anyhow::ensure!(args.events >= 1, "--events must be at least 1");
    anyhow::ensure!(args.aggregates >= 1, "--aggregates must be at least 1");
    tandem::metrics::set_enabled(args.metrics == "on");
    let temporary = tempfile::tempdir().context("cannot create a temporary directory")?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| temporary.path().to_path_buf());
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let options = SqliteOptions {
        synchronous,
        ..SqliteOptions::default()
    };
    let payload_bytes = sample_envelope_size();
    let calls = if args.one_by_one {
        "one-by-one"
    } else {
        "batch"
    };
    eprintln!(
        "tandem-lab bench pipeline: {} events, batch {}, {} aggregates, {} calls, synchronous={}, files in {}",
        args.events,
        args.batch,
        args.aggregates,
        calls,
        synchronous.pragma(),
        dir.display()
    );

    let bus_url = args.bus.clone();
    let bus: Arc<dyn Bus> = match &bus_url {
        Some(url) => tandem_engines::open_bus(url).await?,
        None => Arc::new(
            EmbeddedLog::open(
                dir.join("bus.db"),
                EmbeddedOptions {
                    synchronous,
                    partitions: 1,
                    ..Default::default()
                },
            )
            .await?,
        ),
    };
    let progress = Progress::new();
    let mut raw_runs: Vec<f64> = Vec::new();
    let (raw_kind, raw_per_sec) = if bus_url.is_some() {
        progress.spin("[1/3] raw produce/consume loop on the bus ...");
        let rate = raw_bus(
            &bus,
            args.events,
            args.batch,
            args.aggregates,
            payload_bytes,
        )
        .await?;
        progress.done(format!(
            "[1/3] raw produce/consume loop on the bus: {rate:.0}/s"
        ));
        ("bus-produce-consume", rate)
    } else {
        for run in 0..RAW_RUNS {
            progress.spin(format!(
                "[1/3] raw batched SQLite inserts, run {} of {RAW_RUNS} ...",
                run + 1
            ));
            let path = dir.join(format!("raw-{run}.db"));
            raw_runs
                .push(raw_inserts(&path, &options, args.events, args.batch, payload_bytes).await?);
        }
        let mut sorted = raw_runs.clone();
        sorted.sort_by(f64::total_cmp);
        let rate = sorted[RAW_RUNS / 2];
        progress.done(format!(
            "[1/3] raw batched SQLite inserts: {rate:.0}/s (median of {})",
            raw_runs
                .iter()
                .map(|run| format!("{run:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        ("sqlite-inserts", rate)
    };

    let (producer, reader, _scratch) = match &args.db {
        Some(url) if !url.starts_with("sqlite:") => {
            let producer = tandem_postgres::testing::ScratchDatabase::create(url, "bench_producer")
                .await
                .context("cannot create the producer's database")?;
            let reader = tandem_postgres::testing::ScratchDatabase::create(url, "bench_reader")
                .await
                .context("cannot create the reader's database")?;
            (
                tandem_engines::open_store(producer.url()).await?,
                tandem_engines::open_store(reader.url()).await?,
                Some((producer, reader)),
            )
        }
        _ => (
            AnyStore::Sqlite(SqliteStore::open(dir.join("producer.db"), options.clone()).await?),
            AnyStore::Sqlite(SqliteStore::open(dir.join("reader.db"), options.clone()).await?),
            None,
        ),
    };
    reader.write(install_ledger).await?;
    // A topic of its own, so a shared broker's earlier runs do not count.
    let topic = match &bus_url {
        Some(_) => format!("{TOPIC}-{}", uuid::Uuid::now_v7().simple()),
        None => TOPIC.to_owned(),
    };
    let recorder = Arc::new(Recorder::default());
    let shutdown = CancellationToken::new();
    let relay = Relay::new(
        producer.clone(),
        Arc::clone(&bus),
        RelayConfig {
            batch_size: args.batch,
            ..RelayConfig::default()
        },
    );
    let mut config = ConsumerConfig::new("bench-ledger", &[topic.as_str()]);
    config.batch_size = args.batch;
    let consumer = Consumer::new(
        reader.clone(),
        Arc::clone(&bus),
        if args.one_by_one {
            Arc::new(OneByOne(Ledger::new())) as Arc<dyn Handler>
        } else {
            Arc::new(Ledger::new()) as Arc<dyn Handler>
        },
        config,
    )
    .with_observer(Arc::clone(&recorder) as Arc<dyn ConsumerObserver>);
    let relay_task = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move { relay.run(shutdown).await })
    };
    let consumer_task = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move { consumer.run(shutdown).await })
    };

    let pruner_task = args.retain.then(|| {
        let (producer, bus, shutdown) = (producer.clone(), Arc::clone(&bus), shutdown.clone());
        let rules = tandem::retention::Retention {
            outbox_age: (args.retain_kinds != "log").then_some(Duration::ZERO),
            resolved_age: None,
            discarded_age: None,
            log_age: None,
            log_records: (args.retain_kinds != "outbox").then_some(args.retain_log_records),
            every: Duration::from_millis(args.prune_every_ms.max(1)),
            batch: args.prune_batch.max(1),
        };
        tokio::spawn(tandem::retention::run(
            producer,
            bus,
            Some("relay".to_owned()),
            rules,
            shutdown,
        ))
    });
    let mut sizes = Vec::new();
    let mut next_sizes = args.sizes_every;
    let measure_sizes = |applied: u64| Sizes {
        applied,
        producer: size_with_wal(&dir.join("producer.db")),
        bus: size_with_wal(&dir.join("bus.db")),
        reader: size_with_wal(&dir.join("reader.db")),
        producer_wal: wal_of(&dir.join("producer.db")),
        bus_wal: wal_of(&dir.join("bus.db")),
        reader_wal: wal_of(&dir.join("reader.db")),
    };

    // Phase 2: throughput.
    progress.count("[2/3] pipeline: applied", args.events);
    let started = Instant::now();
    let producer_task = {
        let producer = producer.clone();
        let (events, batch, aggregates) = (args.events, args.batch as u64, args.aggregates);
        let one_by_one = args.one_by_one;
        let topic = topic.clone();
        tokio::spawn(async move {
            let mut first = 0;
            while first < events {
                let count = batch.min(events - first);
                produce(&producer, &topic, first, count, aggregates, one_by_one).await?;
                first += count;
            }
            Ok::<_, StoreError>(())
        })
    };
    let mut last_report = Instant::now();
    while recorder.consumed.load(Ordering::SeqCst) < args.events {
        anyhow::ensure!(!consumer_task.is_finished(), "the consumer stopped early");
        anyhow::ensure!(!relay_task.is_finished(), "the relay stopped early");
        if let Some(why) = tandem::metrics::fell_behind("bench-ledger") {
            anyhow::bail!(
                "the consumer fell behind the log's retention: {why} (keep more records)"
            );
        }
        if last_report.elapsed() >= Duration::from_millis(100) {
            last_report = Instant::now();
            progress.set(recorder.consumed.load(Ordering::SeqCst));
        }
        let consumed = recorder.consumed.load(Ordering::SeqCst);
        if next_sizes > 0 && consumed >= next_sizes {
            sizes.push(measure_sizes(consumed));
            next_sizes += args.sizes_every;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    producer_task.await.context("producer task")??;
    let events_per_sec = args.events as f64 / elapsed.as_secs_f64();
    progress.done(format!(
        "[2/3] pipeline: {} events in {:.2} s = {events_per_sec:.0} events/s",
        args.events,
        elapsed.as_secs_f64()
    ));

    // Phase 3: propagation delay at half the measured rate (or the rate asked for).
    let rate = args.latency_rate.unwrap_or(events_per_sec / 2.0).max(1.0);
    let tick = Duration::from_millis(args.tick_ms.max(1));
    let per_tick = (rate * tick.as_secs_f64()).round().max(1.0) as u64;
    let actual_rate = per_tick as f64 / tick.as_secs_f64();
    progress.spin(format!(
        "[3/3] latency at {actual_rate:.0} events/s for {} s ...",
        args.latency_seconds
    ));
    recorder.recording.store(true, Ordering::SeqCst);
    let consumed_before = recorder.consumed.load(Ordering::SeqCst);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let latency_started = Instant::now();
    let mut produced = 0u64;
    let mut transactions: Vec<(i64, i64)> = Vec::new();
    while latency_started.elapsed() < Duration::from_secs(args.latency_seconds) {
        interval.tick().await;
        let start = tandem::schema::now_micros();
        produce(
            &producer,
            &topic,
            args.events + produced,
            per_tick,
            args.aggregates,
            args.one_by_one,
        )
        .await?;
        transactions.push((start, tandem::schema::now_micros()));
        produced += per_tick;
    }
    let drain_deadline = Instant::now() + Duration::from_secs(60);
    while recorder.consumed.load(Ordering::SeqCst) < consumed_before + produced {
        anyhow::ensure!(
            Instant::now() < drain_deadline,
            "the consumer did not catch up within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    shutdown.cancel();
    if let Some(pruner) = pruner_task {
        pruner.await.context("pruner task")?;
    }
    relay_task.await.context("relay task")??;
    consumer_task.await.context("consumer task")??;

    let applied_times = std::mem::take(
        &mut *recorder
            .applied
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    );
    // From the producer's commit (the measure) and from the event's
    // creation inside the producer's transaction (what a user waits).
    let mut from_commit: Vec<i64> = applied_times
        .iter()
        .filter_map(|(created, visible)| {
            commit_time_of(&transactions, *created).map(|commit| (visible - commit).max(0))
        })
        .collect();
    let mut from_creation: Vec<i64> = applied_times
        .iter()
        .map(|(created, visible)| (visible - created).max(0))
        .collect();
    from_commit.sort_unstable();
    from_creation.sort_unstable();
    let delays = from_commit;
    let p50_ms = percentile(&delays, 0.50);
    let p99_ms = percentile(&delays, 0.99);
    let max_ms = percentile(&delays, 1.0);
    let created_p50_ms = percentile(&from_creation, 0.50);
    let created_p99_ms = percentile(&from_creation, 0.99);
    progress.done(format!(
        "[3/3] latency at {actual_rate:.0} events/s: commit to visible p50 {p50_ms:.2} ms, p99 {p99_ms:.2} ms ({} samples)",
        delays.len()
    ));
    // The broker's own delay at the same rate and tick, after the
    // pipeline has stopped (so the two do not share the broker).
    let raw_delays = match &bus_url {
        Some(url) => {
            progress.spin(format!(
                "[3/3] the broker's plain client at {actual_rate:.0} records/s for {} s ...",
                args.latency_seconds
            ));
            let schedule = crate::raw_latency::Schedule {
                per_tick,
                tick,
                seconds: args.latency_seconds,
                payload_bytes,
            };
            let delays = if url.starts_with("kafka") {
                crate::raw_latency::kafka(url, schedule).await?
            } else {
                crate::raw_latency::nats(url, schedule).await?
            };
            progress.done(format!(
                "[3/3] the broker's plain client: produce to consume p50 {:.2} ms, p99 {:.2} ms",
                percentile(&delays, 0.50),
                percentile(&delays, 0.99)
            ));
            Some(delays)
        }
        None => None,
    };
    // The live line goes before the report is printed.
    drop(progress);

    // The read model must hold every event exactly once.
    let applied: i64 = reader
        .read(|tx| -> Result<i64, StoreError> {
            Ok(tx
                .query_opt("SELECT COALESCE(SUM(applied), 0) FROM ledger", &[])?
                .map(|row| row.i64(0))
                .transpose()?
                .unwrap_or(0))
        })
        .await?;
    anyhow::ensure!(
        applied as u64 == args.events + produced,
        "read model applied {applied} events, expected {}",
        args.events + produced
    );

    let report = Report {
        bus: bus_url
            .as_deref()
            .map_or_else(|| "embedded".to_owned(), tandem_engines::redact),
        db: args
            .db
            .as_deref()
            .map_or_else(|| "sqlite".to_owned(), tandem_engines::redact),
        raw_kind,
        calls,
        metrics: args.metrics.clone(),
        events: args.events,
        batch: args.batch,
        aggregates: args.aggregates,
        synchronous: synchronous.pragma().to_lowercase(),
        events_per_sec,
        raw_inserts_per_sec: raw_per_sec,
        raw_runs,
        ratio: events_per_sec / raw_per_sec,
        latency_rate_per_sec: actual_rate,
        latency_samples: delays.len(),
        p50_ms,
        p99_ms,
        max_ms,
        created_p50_ms,
        created_p99_ms,
        raw_p50_ms: raw_delays.as_ref().map(|d| percentile(d, 0.50)),
        raw_p99_ms: raw_delays.as_ref().map(|d| percentile(d, 0.99)),
        latency_ratio: raw_delays.as_ref().map(|d| p50_ms / percentile(d, 0.50)),
        payload_bytes,
        retain: args.retain,
        sizes,
    };
    println!();
    println!("pipeline      {:>10.0} events/s", report.events_per_sec);
    if raw_kind == "sqlite-inserts" {
        println!(
            "raw inserts   {:>10.0} rows/s (median of {RAW_RUNS} runs; same payload size, same disk)",
            report.raw_inserts_per_sec
        );
    } else {
        println!(
            "raw bus       {:>10.0} records/s (plain produce/consume, same payload size, same broker)",
            report.raw_inserts_per_sec
        );
    }
    println!("ratio         {:>10.3}", report.ratio);
    println!(
        "propagation   commit to visible p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms at {:.0} events/s",
        report.p50_ms, report.p99_ms, report.max_ms, report.latency_rate_per_sec
    );
    println!(
        "              creation to visible p50 {:.2} ms, p99 {:.2} ms",
        report.created_p50_ms, report.created_p99_ms
    );
    if let (Some(p50), Some(p99), Some(ratio)) =
        (report.raw_p50_ms, report.raw_p99_ms, report.latency_ratio)
    {
        println!(
            "raw bus       produce to consume p50 {p50:.2} ms, p99 {p99:.2} ms (the broker's plain client, same rate); pipeline p50 ÷ raw p50 {ratio:.2}"
        );
    }
    if !report.sizes.is_empty() {
        println!(
            "file sizes    (MB with -wal, of which -wal{}) applied: producer / bus / reader",
            if report.retain { ", pruning" } else { "" }
        );
        for row in &report.sizes {
            let mb = |bytes: u64| bytes as f64 / 1e6;
            println!(
                "              {:>9}: {:>7.1} ({:>5.1}) / {:>7.1} ({:>5.1}) / {:>7.1} ({:>5.1})",
                row.applied,
                mb(row.producer),
                mb(row.producer_wal),
                mb(row.bus),
                mb(row.bus_wal),
                mb(row.reader),
                mb(row.reader_wal)
            );
        }
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}
