//! `tandem-lab bench dead-letters`: how fast the admin API lists dead
//! letters and their failure groups when many are parked.
//!
//! 1. fill: `--parked` letters are written straight into
//!    `tandem_dead_letters` of a fresh store (an SQLite file in a temporary
//!    directory, or a scratch database on the PostgreSQL server `--store`
//!    names), in transactions of `--batch` rows: three consumers, 36
//!    causes of realistic errors (ids, UUIDs and counts in them), each
//!    letter's cause drawn at random with a skew (the largest group is
//!    about 36 times the smallest), so every group's letters are spread
//!    over the whole table. Each row's failure group is
//!    `tandem::dead_letter::fingerprint`, as parking stores it. On
//!    PostgreSQL the table is then vacuumed and analysed, as autovacuum
//!    does soon after a bulk insert.
//! 2. serve: the service plumbing's real router (`tandem_service::Service`
//!    with an admin token, no consumers) on a TCP socket on loopback.
//! 3. measure: `--requests` sequential requests (after one to warm up) of
//!    each kind, with reqwest over that socket, timed from sending to the
//!    last byte of the body: the first page of `/admin/dead-letters`, the
//!    same for one consumer, for one failure group (the smallest with a
//!    full page), a page deep in the table (by its cursor), and
//!    `/admin/failure-groups`. Medians and 95th percentiles in ms.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use tandem::embedded::{EmbeddedLog, EmbeddedOptions};
use tandem::store::{Param, Store, StoreError};
use tandem::Bus;
use tandem_engines::AnyStore;
use tandem_service::admin::AdminTokens;
use tokio_util::sync::CancellationToken;

use crate::progress::Progress;

#[derive(Debug, Args)]
pub struct DeadLettersArgs {
    /// Parked letters to fill the table with.
    #[arg(long, default_value_t = 100_000)]
    parked: u64,
    /// Timed requests of each kind (after one to warm up).
    #[arg(long, default_value_t = 50)]
    requests: usize,
    /// `limit` of each listing.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Rows per fill transaction.
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// The store (default: an SQLite file in a fresh temporary directory).
    /// A postgres:// URL names a server: the bench creates a scratch
    /// database there (`tandem_t_bench_dead_letters_...`) and drops it
    /// afterwards. A sqlite:// URL names a file, filled as it is.
    #[arg(long)]
    store: Option<String>,
    /// Keep the filled store afterwards (the scratch database, or the
    /// temporary directory of the SQLite file), to look into its plans.
    #[arg(long)]
    keep: bool,
    /// Print exactly one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

/// One cause of failure: letters of one cause share a failure group.
struct Cause {
    consumer: &'static str,
    topic: &'static str,
    /// `None`: the event did not decode.
    event_type: Option<&'static str>,
    reason: &'static str,
    /// The error of one letter, from a source of numbers.
    error: fn(&mut Random) -> String,
}

const CAUSES: [Cause; 36] = [
    // The Inventory Service's consumer of orders.
    Cause {
        consumer: "inventory-reservations",
        topic: "order",
        event_type: Some("OrderPlaced"),
        reason: "handler",
        error: |r| format!("unknown product \"{}\"", r.uuid()),
    },
    Cause {
        consumer: "inventory-reservations",
        topic: "order",
        event_type: Some("OrderPlaced"),
        reason: "handler",
        error: |r| {
            format!(
                "insufficient stock for product {}: asked {}, available {}",
                r.uuid(),
                r.below(50) + 2,
                r.below(2)
            )
        },
    },
    Cause {
        consumer: "inventory-reservations",
        topic: "order",
        event_type: Some("OrderCancelled"),
        reason: "handler",
        error: |r| format!("no reservation for order {}", r.uuid()),
    },
    Cause {
        consumer: "inventory-reservations",
        topic: "order",
        event_type: None,
        reason: "decode",
        error: |r| {
            format!(
                "invalid envelope: expected value at line {} column {}",
                r.below(3) + 1,
                r.below(400) + 1
            )
        },
    },
    Cause {
        consumer: "inventory-reservations",
        topic: "order",
        event_type: Some("OrderPlaced"),
        reason: "gap",
        error: |r| {
            format!(
                "gap: sequence {} did not arrive within 35 s",
                r.below(40) + 1
            )
        },
    },
    Cause {
        consumer: "inventory-reservations",
        topic: "order",
        event_type: Some("OrderPlaced"),
        reason: "blocked",
        error: |r| format!("blocked behind dead letter {}", r.below(90_000) + 1),
    },
    Cause {
        consumer: "inventory-reservations",
        topic: "order",
        event_type: Some("OrderCancelled"),
        reason: "blocked",
        error: |r| format!("blocked behind dead letter {}", r.below(90_000) + 1),
    },
    Cause {
        consumer: "inventory-reservations",
        topic: "order",
        event_type: Some("OrderPlaced"),
        reason: "store",
        error: |r| {
            format!(
                "the store refused it: value too long for type character varying({})",
                [64, 128, 255][r.below(3) as usize]
            )
        },
    },
    Cause {
        consumer: "inventory-reservations",
        topic: "order",
        event_type: Some("OrderConfirmed"),
        reason: "handler",
        error: |r| {
            format!(
                "reservation {} was released at offset {}",
                r.uuid(),
                r.below(1_000_000)
            )
        },
    },
    Cause {
        consumer: "inventory-reservations",
        topic: "order",
        event_type: Some("OrderPlaced"),
        reason: "handler",
        error: |r| format!("warehouse wh-{} is closed for stocktaking", r.below(12) + 1),
    },
    Cause {
        consumer: "inventory-reservations",
        topic: "order",
        event_type: Some("OrderPlaced"),
        reason: "handler",
        error: |r| {
            format!(
                "timeout after {} ms waiting for the stock lock of sku-{}",
                r.below(5000) + 1000,
                r.hex(6)
            )
        },
    },
    Cause {
        consumer: "inventory-reservations",
        topic: "order",
        event_type: Some("OrderCancelled"),
        reason: "handler",
        error: |r| {
            format!(
                "order ord-{} has {} lines, at most {} are allowed",
                r.hex(10),
                r.below(100) + 51,
                50
            )
        },
    },
    // The Order Service's local copies of customers and products.
    Cause {
        consumer: "order-local-copies",
        topic: "customer",
        event_type: Some("CustomerRegistered"),
        reason: "handler",
        error: |r| {
            format!(
                "customer {} is already registered with email user{}@example.com",
                r.uuid(),
                r.below(100_000)
            )
        },
    },
    Cause {
        consumer: "order-local-copies",
        topic: "customer",
        event_type: Some("CustomerUpdated"),
        reason: "handler",
        error: |r| format!("no local copy of customer {}", r.uuid()),
    },
    Cause {
        consumer: "order-local-copies",
        topic: "customer",
        event_type: None,
        reason: "decode",
        error: |r| {
            format!(
                "invalid envelope: attribute specversion is {}, expected 1.0",
                r.below(3) + 2
            )
        },
    },
    Cause {
        consumer: "order-local-copies",
        topic: "customer",
        event_type: Some("CustomerUpdated"),
        reason: "gap",
        error: |r| {
            format!(
                "gap: sequence {} did not arrive within 35 s",
                r.below(20) + 1
            )
        },
    },
    Cause {
        consumer: "order-local-copies",
        topic: "customer",
        event_type: Some("CustomerUpdated"),
        reason: "blocked",
        error: |r| format!("blocked behind dead letter {}", r.below(90_000) + 1),
    },
    Cause {
        consumer: "order-local-copies",
        topic: "inventory",
        event_type: Some("ProductAdded"),
        reason: "handler",
        error: |r| {
            format!(
                "product {} has a negative price: -{} cents",
                r.uuid(),
                r.below(10_000) + 1
            )
        },
    },
    Cause {
        consumer: "order-local-copies",
        topic: "inventory",
        event_type: Some("StockChanged"),
        reason: "handler",
        error: |r| format!("no local copy of product {}", r.uuid()),
    },
    Cause {
        consumer: "order-local-copies",
        topic: "inventory",
        event_type: Some("StockChanged"),
        reason: "store",
        error: |r| {
            format!(
                "the store refused it: integer out of range for stock {}",
                r.below(u64::from(u32::MAX)) + 2_147_483_648
            )
        },
    },
    Cause {
        consumer: "order-local-copies",
        topic: "inventory",
        event_type: Some("ProductRenamed"),
        reason: "handler",
        error: |r| {
            format!(
                "name of product {} is {} characters long, at most 200 are allowed",
                r.uuid(),
                r.below(300) + 201
            )
        },
    },
    Cause {
        consumer: "order-local-copies",
        topic: "inventory",
        event_type: Some("StockChanged"),
        reason: "gap",
        error: |r| {
            format!(
                "gap: sequence {} did not arrive within 35 s",
                r.below(200) + 1
            )
        },
    },
    Cause {
        consumer: "order-local-copies",
        topic: "inventory",
        event_type: Some("StockChanged"),
        reason: "blocked",
        error: |r| format!("blocked behind dead letter {}", r.below(90_000) + 1),
    },
    Cause {
        consumer: "order-local-copies",
        topic: "inventory",
        event_type: Some("ProductAdded"),
        reason: "handler",
        error: |r| {
            format!(
                "deadlock detected: process {} waits for ShareLock on transaction {}",
                r.below(60_000) + 100,
                r.below(10_000_000)
            )
        },
    },
    // The Order Service's settlement of orders.
    Cause {
        consumer: "order-settlement",
        topic: "inventory",
        event_type: Some("StockReserved"),
        reason: "handler",
        error: |r| format!("unknown order {}", r.uuid()),
    },
    Cause {
        consumer: "order-settlement",
        topic: "inventory",
        event_type: Some("StockReserved"),
        reason: "handler",
        error: |r| {
            format!(
                "order {} is CANCELLED, cannot confirm reservation {}",
                r.uuid(),
                r.uuid()
            )
        },
    },
    Cause {
        consumer: "order-settlement",
        topic: "inventory",
        event_type: Some("StockRejected"),
        reason: "handler",
        error: |r| format!("order {} was already rejected", r.uuid()),
    },
    Cause {
        consumer: "order-settlement",
        topic: "inventory",
        event_type: Some("StockReserved"),
        reason: "handler",
        error: |r| {
            format!(
                "payment provider answered 503 after {} ms for order {}",
                r.below(30_000) + 1,
                r.uuid()
            )
        },
    },
    Cause {
        consumer: "order-settlement",
        topic: "inventory",
        event_type: None,
        reason: "decode",
        error: |r| {
            format!(
                "invalid envelope: data is not JSON: invalid type: integer `{}`, expected a map",
                r.below(1_000_000)
            )
        },
    },
    Cause {
        consumer: "order-settlement",
        topic: "inventory",
        event_type: Some("StockReserved"),
        reason: "gap",
        error: |r| {
            format!(
                "gap: sequence {} did not arrive within 35 s",
                r.below(10) + 1
            )
        },
    },
    Cause {
        consumer: "order-settlement",
        topic: "inventory",
        event_type: Some("StockReserved"),
        reason: "blocked",
        error: |r| format!("blocked behind dead letter {}", r.below(90_000) + 1),
    },
    Cause {
        consumer: "order-settlement",
        topic: "inventory",
        event_type: Some("StockRejected"),
        reason: "blocked",
        error: |r| format!("blocked behind dead letter {}", r.below(90_000) + 1),
    },
    Cause {
        consumer: "order-settlement",
        topic: "inventory",
        event_type: Some("StockReserved"),
        reason: "store",
        error: |r| {
            format!(
                "the store refused it: numeric field overflow for total {}.{:02}",
                r.below(10_000_000_000),
                r.below(100)
            )
        },
    },
    Cause {
        consumer: "order-settlement",
        topic: "inventory",
        event_type: Some("StockReleased"),
        reason: "handler",
        error: |r| format!("reservation {} of order {} is not held", r.uuid(), r.uuid()),
    },
    Cause {
        consumer: "order-settlement",
        topic: "inventory",
        event_type: Some("StockRejected"),
        reason: "handler",
        error: |r| {
            format!(
                "customer cus_{} has {} open orders, at most 20 are allowed",
                r.hex(12),
                r.below(50) + 21
            )
        },
    },
    Cause {
        consumer: "order-settlement",
        topic: "inventory",
        event_type: Some("StockReserved"),
        reason: "handler",
        error: |r| {
            format!(
                "connection to notifications:{} refused (os error {})",
                8000 + r.below(100),
                111
            )
        },
    },
];

/// A small deterministic source of numbers (splitmix64): the same table
/// on every run.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }

    /// `digits` hex digits, the first a decimal one (so that masking
    /// takes the word for an id).
    fn hex(&mut self, digits: usize) -> String {
        let value = format!("{}{:016x}", self.below(10), self.next());
        value[..digits.clamp(1, 17)].to_owned()
    }

    fn uuid(&mut self) -> String {
        let (a, b) = (self.next(), self.next());
        format!(
            "{:08x}-{:04x}-7{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | ((b >> 48) & 0x3fff),
            b & 0xffff_ffff_ffff
        )
    }
}

/// One letter's row, as parking writes it.
struct Letter {
    consumer: &'static str,
    topic: &'static str,
    partition: i64,
    offset: i64,
    event_id: Option<String>,
    subject: Option<String>,
    sequence: Option<i64>,
    event_type: Option<&'static str>,
    payload: Vec<u8>,
    reason: &'static str,
    error: String,
    attempts: i64,
    first_failed_at: i64,
    last_failed_at: i64,
    group: String,
}

/// The cumulative weights of [`CAUSES`]: cause `k` weighs `1 / (k + 1)`.
fn cumulative_weights() -> Vec<f64> {
    let mut total = 0.0;
    CAUSES
        .iter()
        .enumerate()
        .map(|(index, _)| {
            total += 1.0 / (index as f64 + 1.0);
            total
        })
        .collect()
}

fn letter(random: &mut Random, weights: &[f64], index: u64, start_micros: i64) -> Letter {
    let total = weights.last().copied().unwrap_or(1.0);
    let draw = (random.next() >> 11) as f64 / (1_u64 << 53) as f64 * total;
    let cause = &CAUSES[weights
        .partition_point(|weight| *weight < draw)
        .min(CAUSES.len() - 1)];
    let error = (cause.error)(random);
    let offset = i64::try_from(index).unwrap_or(i64::MAX);
    // A week of failures, oldest first.
    let first_failed_at = start_micros + offset * 6_000_000 + random.below(5_000_000) as i64;
    let attempts = 1 + random.below(5) as i64;
    let last_failed_at = first_failed_at + (attempts - 1) * 200_000;
    let subject = format!("{}-{}", &cause.topic[..3], random.hex(12));
    let sequence = 1 + random.below(40) as i64;
    let (event_id, subject, sequence, payload) = match cause.event_type {
        Some(event_type) => {
            let id = random.uuid();
            let payload = serde_json::json!({
                "specversion": "1.0",
                "id": id,
                "source": cause.topic,
                "type": event_type,
                "subject": subject,
                "time": "2025-06-01T12:00:00.000000Z",
                "datacontenttype": "application/json",
                "dataschema": format!("urn:tandem:{}:{event_type}:1", cause.topic),
                "sequence": sequence,
                "data": {
                    "id": subject,
                    "lines": [
                        { "product": random.uuid(), "quantity": 1 + random.below(5) },
                        { "product": random.uuid(), "quantity": 1 + random.below(5) },
                    ],
                    "total_cents": random.below(100_000),
                },
            });
            (
                Some(id),
                Some(subject),
                Some(sequence),
                serde_json::to_vec(&payload).unwrap_or_default(),
            )
        }
        None => (
            None,
            None,
            None,
            format!(
                "{{\"specversion\": \"0.3\", \"garbage\": {}}}",
                random.below(1000)
            )
            .into_bytes(),
        ),
    };
    Letter {
        consumer: cause.consumer,
        topic: cause.topic,
        partition: 0,
        offset: offset * 3 + random.below(3) as i64,
        event_id,
        subject,
        sequence,
        event_type: cause.event_type,
        payload,
        reason: cause.reason,
        group: tandem::dead_letter::fingerprint(
            cause.consumer,
            cause.event_type,
            cause.reason,
            &error,
        ),
        error,
        attempts,
        first_failed_at,
        last_failed_at,
    }
}

/// Rows of one INSERT statement (17 parameters each).
const ROWS_PER_STATEMENT: usize = 100;

fn insert_letters(tx: &mut dyn tandem::Tx, letters: &[Letter]) -> Result<(), StoreError> {
    for chunk in letters.chunks(ROWS_PER_STATEMENT) {
        let values = (0..chunk.len())
            .map(|row| {
                let first = row * 16;
                format!(
                    "({})",
                    (1..=16)
                        .map(|column| {
                            if column == 16 {
                                format!("'parked', ${}", first + 16)
                            } else {
                                format!("${}", first + column)
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut params: Vec<Param<'_>> = Vec::with_capacity(chunk.len() * 16);
        for letter in chunk {
            params.extend([
                Param::Text(letter.consumer),
                Param::Text(letter.topic),
                Param::Int(letter.partition),
                Param::Int(letter.offset),
                Param::from(letter.event_id.as_deref()),
                letter
                    .subject
                    .as_ref()
                    .map_or(Param::Null, |_| Param::Text(letter.topic)),
                Param::from(letter.subject.as_deref()),
                Param::from(letter.sequence),
                Param::from(letter.event_type),
                Param::Blob(&letter.payload),
                Param::Text(letter.reason),
                Param::Text(&letter.error),
                Param::Int(letter.attempts),
                Param::Int(letter.first_failed_at),
                Param::Int(letter.last_failed_at),
                Param::Text(&letter.group),
            ]);
        }
        tx.execute(
            &format!(
                "INSERT INTO tandem_dead_letters (consumer, topic, partition, record_offset,
                   event_id, source, subject, sequence, event_type, payload, reason, error,
                   attempts, first_failed_at, last_failed_at, status, failure_group)
                 VALUES {values}"
            ),
            &params,
        )?;
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct Timing {
    name: &'static str,
    path: String,
    /// Letters (or groups) in the answer.
    items: usize,
    median_ms: f64,
    p95_ms: f64,
    max_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    store: String,
    parked: u64,
    consumers: usize,
    groups: usize,
    requests: usize,
    limit: usize,
    fill_seconds: f64,
    results: Vec<Timing>,
}

/// The `fraction` percentile of `sorted` (nearest rank).
fn percentile(sorted: &[Duration], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}

const SECRET: &str = "bench-secret-0123456789abcdef";

/// The items of an answer: a page's `items`, or the groups.
fn items_of(body: &serde_json::Value) -> usize {
    match body {
        serde_json::Value::Array(groups) => groups.len(),
        page => page["items"].as_array().map_or(0, Vec::len),
    }
}

async fn fetch(
    http: &reqwest::Client,
    base: &str,
    path: &str,
) -> anyhow::Result<(Duration, serde_json::Value)> {
    let started = Instant::now();
    let response = http
        .get(format!("{base}{path}"))
        .bearer_auth(SECRET)
        .send()
        .await
        .with_context(|| format!("GET {path}"))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .with_context(|| format!("GET {path}"))?;
    let took = started.elapsed();
    anyhow::ensure!(
        status.is_success(),
        "GET {path}: {status} {}",
        String::from_utf8_lossy(&body)
    );
    Ok((took, serde_json::from_slice(&body)?))
}

pub async fn run(args: DeadLettersArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.parked >= 1, "--parked must be at least 1");
    anyhow::ensure!(args.requests >= 1, "--requests must be at least 1");
    anyhow::ensure!(args.batch >= 1, "--batch must be at least 1");
    anyhow::ensure!(
        (1..=500).contains(&args.limit),
        "--limit must be 1 to 500, as the admin API takes"
    );
    let temporary = tempfile::tempdir().context("cannot create a temporary directory")?;
    let dir: PathBuf = temporary.path().to_path_buf();
    let (url, scratch) = match &args.store {
        Some(url) if !url.starts_with("sqlite:") => {
            let scratch =
                tandem_postgres::testing::ScratchDatabase::create(url, "bench_dead_letters")
                    .await
                    .context("cannot create a scratch database")?;
            (scratch.url().to_owned(), Some(scratch))
        }
        Some(url) => (url.clone(), None),
        None => (
            format!("sqlite://{}", dir.join("service.db").display()),
            None,
        ),
    };
    let store: AnyStore = tandem_engines::open_store(&url).await?;
    let shown = match &scratch {
        Some(scratch) => format!("postgres, scratch database {}", scratch.name()),
        None => format!("sqlite, {}", tandem_engines::redact(&url)),
    };
    eprintln!(
        "tandem-lab bench dead-letters: {} parked letters of {} causes, {} requests of each kind, store {shown}",
        args.parked,
        CAUSES.len(),
        args.requests
    );

    // 1. Fill.
    let progress = Progress::new();
    progress.count("[1/3] parking letters", args.parked);
    let filled = Instant::now();
    let weights = cumulative_weights();
    let mut random = Random(0x7a4d_e2c1);
    let start_micros = tandem::schema::now_micros() - 7 * 24 * 3600 * 1_000_000;
    let mut written = 0_u64;
    while written < args.parked {
        let rows = (args.parked - written).min(args.batch as u64);
        let letters: Vec<Letter> = (written..written + rows)
            .map(|index| letter(&mut random, &weights, index, start_micros))
            .collect();
        store
            .write(move |tx| insert_letters(tx, &letters))
            .await
            .context("cannot park the letters")?;
        written += rows;
        progress.set(written);
    }
    if let Some(scratch) = &scratch {
        // What autovacuum does soon after a bulk insert: the visibility map
        // (index-only scans) and the planner's statistics.
        let url = scratch.url().to_owned();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut client = tandem_postgres::testing::connect_raw(&url)?;
            client.batch_execute("VACUUM ANALYZE tandem_dead_letters")?;
            Ok(())
        })
        .await??;
    }
    let fill_seconds = filled.elapsed().as_secs_f64();
    progress.done(format!(
        "[1/3] parked {} letters in {fill_seconds:.1} s",
        args.parked
    ));

    // 2. Serve the admin API on loopback.
    progress.spin("[2/3] starting the service ...");
    let bus: Arc<dyn Bus> = Arc::new(
        EmbeddedLog::open(
            dir.join("bus.db"),
            EmbeddedOptions {
                synchronous: tandem::sqlite::Synchronous::Normal,
                partitions: 1,
                ..Default::default()
            },
        )
        .await?,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let service = tandem_service::Service::new("bench", store.clone(), bus)
        .admin(AdminTokens::parse(&format!("bench:{SECRET}"))?);
    let server = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { service.run(listener, shutdown).await }
    });
    let http = reqwest::Client::new();
    let (_, groups) = fetch(&http, &base, "/admin/failure-groups").await?;
    let groups = groups.as_array().cloned().unwrap_or_default();
    let counted: u64 = groups
        .iter()
        .map(|group| group["count"].as_u64().unwrap_or(0))
        .sum();
    anyhow::ensure!(
        args.store.is_some() || counted == args.parked,
        "the failure groups count {counted} letters, {} were parked",
        args.parked
    );
    let consumers: std::collections::BTreeSet<&str> = groups
        .iter()
        .filter_map(|group| group["consumer"].as_str())
        .collect();
    let consumers = consumers.len();
    // The smallest group with a full page: its letters are the sparsest.
    let group = groups
        .iter()
        .rev()
        .find(|group| group["count"].as_u64().unwrap_or(0) > args.limit as u64)
        .or(groups.first())
        .context("no failure group")?;
    let group_id = group["group"].as_str().unwrap_or_default().to_owned();
    let group_count = group["count"].as_u64().unwrap_or(0);
    let consumer = group["consumer"].as_str().unwrap_or_default().to_owned();
    let deep = store
        .read({
            let skip = i64::try_from(args.parked * 9 / 10).unwrap_or(0);
            move |tx| {
                Ok::<_, StoreError>(
                    tx.query_opt(
                        "SELECT id FROM tandem_dead_letters WHERE status = 'parked'
                         ORDER BY id LIMIT 1 OFFSET $1",
                        tandem::params![skip],
                    )?
                    .map(|row| row.i64(0))
                    .transpose()?
                    .unwrap_or(0),
                )
            }
        })
        .await?;
    progress.done(format!(
        "[2/3] admin API on {base}: {} failure groups of {consumers} consumers; \
         group {group_id} ({group_count} letters of {consumer}); deep cursor {deep}",
        groups.len()
    ));

    // 3. Measure.
    let limit = args.limit;
    let kinds: Vec<(&'static str, String)> = vec![
        ("first page", format!("/admin/dead-letters?limit={limit}")),
        (
            "consumer",
            format!("/admin/dead-letters?limit={limit}&consumer={consumer}"),
        ),
        (
            "group",
            format!("/admin/dead-letters?limit={limit}&group={group_id}"),
        ),
        (
            "deep page",
            format!("/admin/dead-letters?limit={limit}&cursor={deep}"),
        ),
        ("failure groups", "/admin/failure-groups".to_owned()),
    ];
    let mut results = Vec::new();
    for (index, (name, path)) in kinds.into_iter().enumerate() {
        progress.count(
            format!("[3/3] {} of 5: {name}", index + 1),
            args.requests as u64,
        );
        let (_, body) = fetch(&http, &base, &path).await?;
        let items = items_of(&body);
        let mut times = Vec::with_capacity(args.requests);
        for done in 0..args.requests {
            let (took, body) = fetch(&http, &base, &path).await?;
            anyhow::ensure!(
                items_of(&body) == items,
                "GET {path}: {} items, then {items}",
                items_of(&body)
            );
            times.push(took);
            progress.set(done as u64 + 1);
        }
        times.sort();
        results.push(Timing {
            name,
            path,
            items,
            median_ms: percentile(&times, 0.5),
            p95_ms: percentile(&times, 0.95),
            max_ms: percentile(&times, 1.0),
        });
    }
    drop(progress);
    shutdown.cancel();
    server.await??;
    drop(store);

    let report = Report {
        store: match &args.store {
            Some(url) => tandem_engines::redact(url),
            None => "sqlite".to_owned(),
        },
        parked: args.parked,
        consumers,
        groups: groups.len(),
        requests: args.requests,
        limit,
        fill_seconds,
        results,
    };
    println!();
    println!(
        "{:<16} {:>10} {:>10} {:>10} {:>6}  request",
        "kind", "median ms", "p95 ms", "max ms", "items"
    );
    for timing in &report.results {
        println!(
            "{:<16} {:>10.2} {:>10.2} {:>10.2} {:>6}  GET {}",
            timing.name, timing.median_ms, timing.p95_ms, timing.max_ms, timing.items, timing.path
        );
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    if args.keep {
        match scratch {
            Some(scratch) => {
                eprintln!("kept the scratch database {}", scratch.name());
                std::mem::forget(scratch);
            }
            None => eprintln!("kept {}", temporary.keep().display()),
        }
    }
    Ok(())
}
