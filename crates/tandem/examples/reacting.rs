//! A consumer that reacts to events with events of its own, on the
//! embedded engines (`cargo run -p tandem --example reacting`):
//!
//! - *payments* commits each deposit and its `Deposited` event together;
//! - *balances* consumes them: it keeps each account's balance and
//!   announces every new one as `BalanceChanged`, appended to its own
//!   outbox in the consumer's transaction and relayed on like any event;
//! - *statements* consumes those and keeps each account's statement lines.
//!
//! It shows, and exits non-zero unless it holds: an account's deposits
//! are applied in their order; a deposit the handler refuses is parked as
//! a dead letter, and the account's later deposits wait behind it while
//! other accounts flow; an operator lists the letters, approves the
//! deposit and redrives it, and the waiting deposits apply, each once.

use std::fmt::Debug;
use std::ops::AsyncFnMut;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use serde::{Deserialize, Serialize};
use tandem::embedded::{EmbeddedLog, EmbeddedOptions};
use tandem::sqlite::{SqliteOptions, SqliteStore};
use tandem::{dead_letter, outbox, params};
use tandem::{Bus, Consumer, ConsumerConfig, Envelope, EventContext, EventPayload, Handler};
use tandem::{HandlerError, NewEvent, Relay, RelayConfig, Store, StoreError, Tx};
use tokio_util::sync::CancellationToken;

/// Deposits above this wait for a person's approval.
const LIMIT: i64 = 10_000;

#[derive(Serialize, Deserialize)]
struct Deposited {
    amount: i64,
}

impl EventPayload for Deposited {
    const TYPE: &'static str = "Deposited";
    const SCHEMA: &'static str = "example:payments/Deposited/v1";
}

#[derive(Serialize, Deserialize)]
struct BalanceChanged {
    /// The sequence of the deposit that changed it.
    deposit: u64,
    balance: i64,
}

impl EventPayload for BalanceChanged {
    const TYPE: &'static str = "BalanceChanged";
    const SCHEMA: &'static str = "example:balances/BalanceChanged/v1";
}

/// The payments service's command: the row and its event, in one transaction.
async fn deposit(payments: &SqliteStore, account: &str, amount: i64) -> Result<(), StoreError> {
    let event = NewEvent::new(account, &Deposited { amount })?;
    let (sql, account) = ("INSERT INTO deposits VALUES ($1, $2)", account.to_owned());
    let work = move |tx: &mut dyn Tx| {
        tx.execute(sql, params![&account, amount])?;
        outbox::append(tx, "payments", event).map(drop)
    };
    payments.write(work).await
}

/// The balances service's handler. The consumer calls it inside the
/// transaction that also records the consumer's position and the account's
/// last applied sequence: the balance it writes and the event it appends
/// commit with them or not at all. That is the exactly-once effect. An
/// attempt that fails is rolled back whole, and an event delivered again
/// after a commit is recognised by its sequence and skipped. So the
/// handler acts only through `tx`, and reads only what `tx` holds: a mail
/// sent or a service called from here could happen twice, or for a
/// deposit that never commits. Its effect on the world is its event,
/// which the relay sends once the transaction has committed. (Not a read
/// model to replay, then: a replay would handle every deposit again and
/// announce every balance again.)
struct Balances;

impl Handler for Balances {
    fn handle(&self, tx: &mut dyn Tx, event: &Envelope) -> Result<(), HandlerError> {
        if event.event_type != Deposited::TYPE {
            return Ok(());
        }
        let Deposited { amount } = event.payload()?;
        let id = event.id.to_string();
        let approval = "SELECT 1 FROM approvals WHERE event_id = $1";
        if amount > LIMIT && tx.query_opt(approval, params![&id])?.is_none() {
            // Trying again cannot approve it: park it now, for a person.
            return Err(HandlerError::permanent(format!(
                "deposit of {amount} is over the limit of {LIMIT}: approve it, then redrive"
            )));
        }
        let account = event.subject.as_str();
        let current = "SELECT balance FROM balances WHERE account = $1";
        let balance = match tx.query_opt(current, params![account])? {
            Some(row) => row.i64(0)? + amount,
            None => amount,
        };
        let upsert = "INSERT INTO balances VALUES ($1, $2)
                      ON CONFLICT (account) DO UPDATE SET balance = excluded.balance";
        tx.execute(upsert, params![account, balance])?;
        let changed = BalanceChanged {
            deposit: event.sequence,
            balance,
        };
        // The reaction names its cause, so it can be traced back.
        let context = EventContext {
            causationid: Some(id),
            correlationid: event.correlationid.clone(),
            ..EventContext::default()
        };
        let reaction = NewEvent::new(account, &changed)?.with_context(context);
        outbox::append(tx, "balances", reaction)?;
        Ok(())
    }
}

/// The statements service's handler: a plain read model of the reactions.
struct Statements;

impl Handler for Statements {
    fn handle(&self, tx: &mut dyn Tx, event: &Envelope) -> Result<(), HandlerError> {
        if event.event_type == BalanceChanged::TYPE {
            let BalanceChanged { deposit, balance } = event.payload()?;
            let insert = "INSERT INTO lines (account, deposit, balance) VALUES ($1, $2, $3)";
            tx.execute(insert, params![event.subject.as_str(), deposit, balance])?;
        }
        Ok(())
    }
}

/// An account's statement: `(deposit, balance)` lines in the order applied.
async fn statement(statements: &SqliteStore, account: &str) -> anyhow::Result<Vec<(i64, i64)>> {
    let account = account.to_owned();
    let sql = "SELECT deposit, balance FROM lines WHERE account = $1 ORDER BY line";
    let rows = statements.read(move |tx| tx.query(sql, params![&account]));
    let line = |row: &tandem::Row| Ok((row.i64(0)?, row.i64(1)?));
    Ok(rows
        .await?
        .iter()
        .map(line)
        .collect::<Result<_, StoreError>>()?)
}

/// Waits until `read` gives `expected`, or fails after 10 s showing what
/// it gave: the read models are eventually consistent, so the example
/// looks again after a short pause, within a deadline.
async fn eventually<T, E>(
    what: &str,
    expected: E,
    mut read: impl AsyncFnMut() -> anyhow::Result<T>,
) -> anyhow::Result<()>
where
    T: PartialEq<E> + Debug,
    E: Debug,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = read().await?;
        if seen == expected {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: still {seen:?}, not {expected:?}, after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let open = |name: &str| SqliteStore::open(dir.path().join(name), SqliteOptions::default());
    let payments = open("payments.db").await?;
    let balances = open("balances.db").await?;
    let statements = open("statements.db").await?;
    let bus: Arc<dyn Bus> =
        Arc::new(EmbeddedLog::open(dir.path().join("bus.db"), EmbeddedOptions::default()).await?);
    let tables = [
        "CREATE TABLE deposits (account TEXT NOT NULL, amount INTEGER NOT NULL)",
        "CREATE TABLE balances (account TEXT PRIMARY KEY, balance INTEGER NOT NULL);
         CREATE TABLE approvals (event_id TEXT PRIMARY KEY)",
        "CREATE TABLE lines (line INTEGER PRIMARY KEY, account TEXT NOT NULL,
                             deposit INTEGER NOT NULL, balance INTEGER NOT NULL)",
    ];
    for (store, sql) in [&payments, &balances, &statements].into_iter().zip(tables) {
        store.write(move |tx| tx.execute_batch(sql)).await?;
    }

    // Two outboxes, so two relays; two consumers. All run until `shutdown`.
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for store in [&payments, &balances] {
        let relay = Relay::new(store.clone(), Arc::clone(&bus), RelayConfig::default());
        let shutdown = shutdown.clone();
        tasks.spawn(async move { anyhow::Ok(relay.run(shutdown).await?) });
    }
    let reacting: Arc<dyn Handler> = Arc::new(Balances);
    for (store, handler, name, topic) in [
        (&balances, reacting, "balances", "payments"),
        (&statements, Arc::new(Statements), "statements", "balances"),
    ] {
        let config = ConsumerConfig::new(name, &[topic]);
        let consumer = Consumer::new(store.clone(), Arc::clone(&bus), handler, config);
        let shutdown = shutdown.clone();
        tasks.spawn(async move { anyhow::Ok(consumer.run(shutdown).await?) });
    }

    // Each account's events carry a gap-free sequence, and the consumer
    // applies them in it: ada's balances are running totals. Bob's second
    // deposit is refused and parked; his third is parked behind it
    // (`blocked`), never applied out of order; ada's flow meanwhile.
    for (ada, bob) in [(100, 50), (200, 20_000), (300, 70)] {
        deposit(&payments, "ada", ada).await?;
        deposit(&payments, "bob", bob).await?;
    }
    let depth = async || Ok(dead_letter::depth(&balances, "balances").await?);
    let ada = async || statement(&statements, "ada").await;
    let bob = async || statement(&statements, "bob").await;
    eventually("letters parked", 2, depth).await?;
    eventually("bob's lines", [(1, 50)], bob).await?;
    eventually("ada's lines", [(1, 100), (2, 300), (3, 600)], ada).await?;
    println!("in order: ada's (deposit, balance) lines 1..3 are running totals, bob's stop at 1");

    // The operator lists the letters, approves the deposit (in the balances
    // service's own database, where its handler reads it) and redrives it.
    // The running consumer carries the request out: the deposit applies,
    // then the one that waited behind it.
    let parked = dead_letter::list(&balances, Some("balances"), false).await?;
    for letter in &parked {
        let (id, sequence) = (letter.id, letter.sequence.unwrap_or_default());
        let (reason, error) = (&letter.reason, &letter.error);
        println!("parked: letter {id}, bob's deposit {sequence}, {reason}: {error}");
    }
    let shown: Vec<_> = parked.iter().map(|l| (l.sequence, &*l.reason)).collect();
    let expected = [(Some(2), "handler"), (Some(3), "blocked")];
    ensure!(shown == expected, "{parked:?}");
    let event_id = parked[0].event_id.clone().unwrap_or_default();
    let approve = "INSERT INTO approvals VALUES ($1)";
    balances
        .write(move |tx| tx.execute(approve, params![&event_id]))
        .await?;
    dead_letter::request_redrive(&balances, "balances", Some(parked[0].id)).await?;
    eventually("bob's lines", [(1, 50), (2, 20_050), (3, 20_120)], bob).await?;
    eventually("letters parked", 0, depth).await?;
    println!("redriven: bob's deposits 2 and 3 applied, each once, in order");

    shutdown.cancel();
    while let Some(task) = tasks.join_next().await {
        task??;
    }
    for store in [payments, balances, statements] {
        store.close().await?;
    }
    bus.close().await?;
    Ok(())
}
