//! Child processes for the crash-matrix and multi-process tests. Each one
//! does one job on real files and can be killed at a named crash point
//! (`TANDEM_FAULT`, see `tandem::fault`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use tandem::bus::OutgoingRecord;
use tandem::consumer::{Consumer, ConsumerConfig};
use tandem::relay::{Relay, RelayConfig};
use tandem::store::{Store, StoreError};
use tandem::{params, Handler};
use tandem_testkit::{install_ledger, Deposited, Ledger, TOPIC};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Subcommand)]
pub enum WorkerCommand {
    /// Deposits `count` events in transactions of `batch`, resuming after
    /// the last committed one.
    Produce {
        #[arg(long)]
        db: String,
        /// The topic (default: the ledger's); tests on shared brokers use
        /// one of their own.
        #[arg(long, default_value = TOPIC)]
        topic: String,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 50)]
        batch: u64,
    },
    /// Relays until the outbox is drained.
    Relay {
        #[arg(long)]
        db: String,
        #[arg(long)]
        bus: String,
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Prune the outbox meanwhile, as a service's pruner does, with a
        /// rule of zero age, 7 rows a transaction, every 5 ms.
        #[arg(long)]
        prune: bool,
    },
    /// Consumes into the ledger until `expect` events have been applied.
    Consume {
        #[arg(long)]
        db: String,
        #[arg(long)]
        bus: String,
        /// The topic (default: the ledger's); tests on shared brokers use
        /// one of their own.
        #[arg(long, default_value = TOPIC)]
        topic: String,
        /// The consumer's name, which is also its group on the bus.
        #[arg(long, default_value = "ledger-view")]
        group: String,
        #[arg(long)]
        expect: i64,
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Refuse every deposit (parked at once), and stop when `expect`
        /// events are parked instead of applied.
        #[arg(long)]
        refuse: bool,
    },
    /// Appends `count` records keyed `w<writer>-<n>` straight to the bus.
    Append {
        #[arg(long)]
        bus: String,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        writer: u32,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 10)]
        batch: u64,
    },
}

/// The account a deposit number goes to, and its amount.
pub fn deposit_number(number: u64) -> (String, i64) {
    (format!("acct-{}", number % 17), number as i64 + 1)
}

pub async fn run(command: WorkerCommand) -> anyhow::Result<()> {
    match command {
        WorkerCommand::Produce {
            db,
            topic,
            count,
            batch,
        } => produce(&db, &topic, count, batch).await,
        WorkerCommand::Relay {
            db,
            bus,
            batch,
            prune,
        } => relay(&db, &bus, batch, prune).await,
        WorkerCommand::Consume {
            db,
            bus,
            topic,
            group,
            expect,
            batch,
            refuse,
        } => consume(&db, &bus, &topic, &group, expect, batch, refuse).await,
        WorkerCommand::Append {
            bus,
            topic,
            writer,
            count,
            batch,
        } => append(&bus, &topic, writer, count, batch).await,
    }
}

async fn produce(db: &str, topic: &str, count: u64, batch: u64) -> anyhow::Result<()> {
    let store = tandem_engines::open_store(db).await?;
    store
        .write(|tx| {
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS worker_progress (id BIGINT PRIMARY KEY, next BIGINT NOT NULL);
                 INSERT INTO worker_progress (id, next) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;",
            )
        })
        .await?;
    loop {
        let topic = topic.to_owned();
        let done = store
            .write(move |tx| -> Result<bool, StoreError> {
                let next = tx
                    .query_opt("SELECT next FROM worker_progress WHERE id = 1", &[])?
                    .map(|row| row.i64(0))
                    .transpose()?
                    .unwrap_or(0) as u64;
                if next >= count {
                    return Ok(true);
                }
                let end = (next + batch).min(count);
                for number in next..end {
                    let (account_id, amount_cents) = deposit_number(number);
                    tandem::outbox::publish(
                        tx,
                        &topic,
                        &account_id,
                        &Deposited {
                            account_id: account_id.clone(),
                            amount_cents,
                        },
                    )?;
                }
                tx.execute(
                    "UPDATE worker_progress SET next = $1 WHERE id = 1",
                    params![end],
                )?;
                tandem::fault::point("producer.before_commit");
                Ok(false)
            })
            .await?;
        if done {
            return Ok(());
        }
        tandem::fault::point("producer.after_commit");
    }
}

async fn relay(db: &str, bus: &str, batch: usize, prune: bool) -> anyhow::Result<()> {
    let store = tandem_engines::open_store(db).await?;
    let bus = tandem_engines::open_bus(bus).await?;
    let config = RelayConfig {
        batch_size: batch,
        ..RelayConfig::default()
    };
    let stop_pruning = tokio_util::sync::CancellationToken::new();
    let _stop_on_return = stop_pruning.clone().drop_guard();
    let rules = tandem::retention::Retention {
        outbox_age: Some(Duration::ZERO),
        batch: 7,
        every: Duration::from_millis(5),
        ..tandem::retention::Retention::default()
    };
    let relay_name = config.name.clone();
    let relay = Relay::new(store.clone(), std::sync::Arc::clone(&bus), config);
    // Not "until a round moves nothing": on PostgreSQL a transaction running
    // anywhere in the cluster (a test creating its scratch database, say)
    // holds committed events back until it ends.
    if prune {
        tokio::spawn(tandem::retention::run(
            store.clone(),
            std::sync::Arc::clone(&bus),
            Some(relay_name.clone()),
            rules.clone(),
            stop_pruning,
        ));
    }
    tokio::time::timeout(Duration::from_secs(60), relay.drain())
        .await
        .context("relay: committed events still held back after 60 s")??;
    if prune {
        // One last round once everything is published: the outbox ends
        // holding nothing the bus has.
        tandem::retention::prune_once(&store, bus.as_ref(), Some(&relay_name), &rules).await?;
    }
    Ok(())
}

async fn consume(
    db: &str,
    bus: &str,
    topic: &str,
    group: &str,
    expect: i64,
    batch: usize,
    refuse: bool,
) -> anyhow::Result<()> {
    let store = tandem_engines::open_store(db).await?;
    store.write(install_ledger).await?;
    let ledger = Ledger::new();
    ledger
        .refuse_all
        .store(refuse, std::sync::atomic::Ordering::SeqCst);
    // What counts as done: events applied, or (refusing) parked.
    let progress = if refuse {
        "SELECT COUNT(*) FROM tandem_dead_letters WHERE status = 'parked'"
    } else {
        "SELECT COALESCE(SUM(applied), 0) FROM ledger"
    };
    let bus = tandem_engines::open_bus(bus).await?;
    let mut config = ConsumerConfig::new(group, &[topic]);
    config.batch_size = batch;
    let consumer = Consumer::new(
        store.clone(),
        bus,
        Arc::new(ledger) as Arc<dyn Handler>,
        config,
    );
    let shutdown = CancellationToken::new();
    let running = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move { consumer.run(shutdown).await })
    };
    let stop = tokio::spawn(tandem_cli::shutdown_signal());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        let applied = store
            .read(|tx| -> Result<i64, StoreError> {
                Ok(tx
                    .query_opt(progress, &[])?
                    .map(|row| row.i64(0))
                    .transpose()?
                    .unwrap_or(0))
            })
            .await?;
        if applied >= expect {
            break;
        }
        if stop.is_finished() {
            tracing::info!(applied, "stopping on signal");
            break;
        }
        if running.is_finished() {
            anyhow::bail!("consumer stopped before applying {expect} events");
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {applied} of {expect} events applied after 600 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shutdown.cancel();
    running.await.context("consumer task")??;
    Ok(())
}

async fn append(bus: &str, topic: &str, writer: u32, count: u64, batch: u64) -> anyhow::Result<()> {
    let bus = tandem_engines::open_bus(bus).await?;
    let mut number = 0;
    while number < count {
        let end = (number + batch).min(count);
        let records: Vec<OutgoingRecord> = (number..end)
            .map(|n| OutgoingRecord {
                topic: topic.to_owned(),
                key: format!("w{writer}-{}", n % 7),
                payload: format!("{writer}:{n}").into_bytes(),
            })
            .collect();
        bus.publish(&records).await?;
        number = end;
    }
    Ok(())
}
