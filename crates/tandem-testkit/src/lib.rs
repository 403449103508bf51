//! A tiny ledger domain (deposits into accounts) and its read model, with
//! helpers to open engines and to wait for a condition with a deadline.
//! Shared by the toolkit's integration tests and by `tandem-lab` (the
//! crash-matrix workers and `tandem-lab bench pipeline`). Not a product
//! crate.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem::embedded::{EmbeddedLog, EmbeddedOptions};
use tandem::sqlite::{SqliteOptions, SqliteStore, Synchronous};
use tandem::store::{Store, StoreError, Tx};
use tandem::{params, Envelope, EventPayload, Handler, HandlerError};

pub mod behind;
pub mod conformance;
pub mod exposition;
pub mod faults;
pub mod tansu;

pub const TOPIC: &str = "ledger";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Deposited {
    pub account_id: String,
    pub amount_cents: i64,
}

impl EventPayload for Deposited {
    const TYPE: &'static str = "Deposited";
    const SCHEMA: &'static str = "tandem:test/Deposited/v1";
}

/// The read model: balance, number of events applied and the sequence of
/// the last one, per account. `applied` counts handler runs, so a duplicate
/// that slipped through would show.
pub struct Ledger {
    /// When set, deposits of this amount fail.
    pub poison_amount: Arc<AtomicU64>,
    pub fail_poison: Arc<AtomicBool>,
    /// When set, every deposit fails for good (and is parked at once).
    pub refuse_all: Arc<AtomicBool>,
}

impl Default for Ledger {
    fn default() -> Self {
        Self::new()
    }
}

impl Ledger {
    pub fn new() -> Self {
        Self {
            poison_amount: Arc::new(AtomicU64::new(u64::MAX)),
            fail_poison: Arc::new(AtomicBool::new(false)),
            refuse_all: Arc::new(AtomicBool::new(false)),
        }
    }
}

pub fn install_ledger(tx: &mut dyn Tx) -> Result<(), StoreError> {
    let clustered = match tx.engine().dialect() {
        tandem::store::Dialect::Sqlite => " WITHOUT ROWID",
        // Room for updates on the same page (HOT updates).
        tandem::store::Dialect::Postgres => " WITH (fillfactor = 70)",
    };
    tx.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS ledger (
            account_id    TEXT PRIMARY KEY,
            balance_cents BIGINT  NOT NULL,
            applied       BIGINT  NOT NULL,
            last_sequence BIGINT  NOT NULL
        ){clustered}"
    ))
}

impl Handler for Ledger {
    fn handle(&self, tx: &mut dyn Tx, event: &Envelope) -> Result<(), HandlerError> {
        let deposit: Deposited = event.payload()?;
        if self.refuse_all.load(Ordering::SeqCst) {
            return Err(HandlerError::permanent("every deposit is refused"));
        }
        if self.fail_poison.load(Ordering::SeqCst)
            && deposit.amount_cents as u64 == self.poison_amount.load(Ordering::SeqCst)
        {
            return Err(HandlerError::transient("poison deposit refused"));
        }
        // One statement per event, which also proves the order: the first
        // deposit inserts, each later one must find its predecessor applied.
        let changed = if event.sequence == 1 {
            tx.execute(
                "INSERT INTO ledger (account_id, balance_cents, applied, last_sequence)
                 VALUES ($1, $2, 1, 1) ON CONFLICT (account_id) DO NOTHING",
                params![&deposit.account_id, deposit.amount_cents],
            )?
        } else {
            tx.execute(
                "UPDATE ledger SET balance_cents = balance_cents + $2, applied = applied + 1,
                   last_sequence = $3
                 WHERE account_id = $1 AND last_sequence = $3 - 1",
                params![&deposit.account_id, deposit.amount_cents, event.sequence],
            )?
        };
        if changed != 1 {
            return Err(HandlerError::permanent(format!(
                "out of order: sequence {} of {} does not follow what was applied",
                event.sequence, deposit.account_id
            )));
        }
        Ok(())
    }

    /// On PostgreSQL, one statement for the whole batch. SQLite, where a
    /// statement costs no round trip, and a ledger armed with a poison
    /// amount handle each event in turn: the same batch in SQLite
    /// statements (no data-modifying CTEs, so a `GROUP BY` feeding an
    /// `UPDATE ... FROM` and an insert) cost 3.6 times the instructions.
    /// The same checks as `handle`: an account's deposits in the batch must
    /// follow what was applied without a gap, the first one inserting.
    fn handle_batch(&self, tx: &mut dyn Tx, events: &[Envelope]) -> Result<(), HandlerError> {
        if tx.engine().dialect() != tandem::store::Dialect::Postgres
            || events.len() < 2
            || self.fail_poison.load(Ordering::SeqCst)
            || self.refuse_all.load(Ordering::SeqCst)
        {
            for event in events {
                self.handle(tx, event)?;
            }
            return Ok(());
        }
        let mut deposits = Vec::with_capacity(events.len());
        for event in events {
            let deposit: Deposited = event.payload()?;
            deposits.push(serde_json::json!([
                deposit.account_id,
                deposit.amount_cents,
                event.sequence
            ]));
        }
        let deposits = serde_json::Value::Array(deposits).to_string();
        let row = tx.query_opt(
            "WITH input AS (
               SELECT item->>0 AS account_id, (item->>1)::bigint AS amount,
                      (item->>2)::bigint AS sequence
               FROM jsonb_array_elements($1::text::jsonb) AS item
             ), per_account AS (
               SELECT account_id, sum(amount)::bigint AS total, count(*) AS n,
                      min(sequence) AS first, max(sequence) AS last
               FROM input GROUP BY account_id
             ), updated AS (
               UPDATE ledger AS l SET balance_cents = l.balance_cents + p.total,
                 applied = l.applied + p.n, last_sequence = p.last
               FROM per_account AS p
               WHERE p.first > 1 AND l.account_id = p.account_id
                 AND l.last_sequence = p.first - 1 AND p.last - p.first + 1 = p.n
               RETURNING 1
             ), inserted AS (
               INSERT INTO ledger (account_id, balance_cents, applied, last_sequence)
               SELECT account_id, total, n, last FROM per_account WHERE first = 1 AND last = n
               ON CONFLICT (account_id) DO NOTHING
               RETURNING 1
             )
             SELECT (SELECT count(*) FROM updated) + (SELECT count(*) FROM inserted),
                    (SELECT count(*) FROM per_account)",
            params![deposits.as_str()],
        )?;
        let (changed, accounts) = match row {
            Some(row) => (row.i64(0)?, row.i64(1)?),
            None => (0, -1),
        };
        if changed != accounts {
            return Err(HandlerError::permanent(format!(
                "out of order: {} of {accounts} accounts in the batch do not follow what was applied",
                accounts - changed
            )));
        }
        Ok(())
    }

    fn reset(&self, tx: &mut dyn Tx) -> Result<(), HandlerError> {
        tx.execute("DELETE FROM ledger", &[])?;
        Ok(())
    }
}

/// (account, balance, applied, last sequence), sorted by account.
pub type LedgerRows = Vec<(String, i64, i64, i64)>;

pub async fn ledger_rows<S: Store>(store: &S) -> LedgerRows {
    store
        .read(|tx| -> Result<LedgerRows, StoreError> {
            tx.query(
                "SELECT account_id, balance_cents, applied, last_sequence FROM ledger ORDER BY account_id",
                &[],
            )?
            .into_iter()
            .map(|row| Ok((row.text(0)?.to_owned(), row.i64(1)?, row.i64(2)?, row.i64(3)?)))
            .collect()
        })
        .await
        .expect("read ledger")
}

pub async fn open_store(path: &Path) -> SqliteStore {
    let store = SqliteStore::open(
        path,
        SqliteOptions {
            synchronous: Synchronous::Normal,
            ..SqliteOptions::default()
        },
    )
    .await
    .expect("open sqlite store");
    store.write(install_ledger).await.expect("install ledger");
    store
}

pub async fn open_log(path: &Path) -> EmbeddedLog {
    EmbeddedLog::open(
        path,
        EmbeddedOptions {
            synchronous: Synchronous::Normal,
            partitions: 2,
            ..Default::default()
        },
    )
    .await
    .expect("open embedded log")
}

/// A deposit of `amount_cents` into `account_id`, ready to append.
pub fn deposit_event(account_id: &str, amount_cents: i64) -> Result<tandem::NewEvent, StoreError> {
    tandem::NewEvent::new(
        account_id,
        &Deposited {
            account_id: account_id.to_owned(),
            amount_cents,
        },
    )
}

/// The bytes a relay would publish for deposit `sequence` of `account_id`
/// (source [`TOPIC`]), for tests that put records on a bus directly.
pub fn deposit_bytes(account_id: &str, sequence: u64, amount_cents: i64) -> Vec<u8> {
    let event = deposit_event(account_id, amount_cents).expect("a deposit serialises");
    Envelope {
        id: uuid::Uuid::now_v7(),
        source: TOPIC.into(),
        event_type: event.event_type,
        subject: event.subject,
        time: time::OffsetDateTime::now_utc(),
        dataschema: event.dataschema,
        data: event.data,
        sequence,
        traceparent: None,
        correlationid: None,
        causationid: None,
        snapshot: false,
    }
    .to_json()
}

/// Appends deposits in one transaction.
pub async fn deposit<S: Store>(store: &S, deposits: Vec<(String, i64)>) {
    store
        .write(move |tx| -> Result<(), StoreError> {
            let events = deposits
                .iter()
                .map(|(account_id, amount_cents)| deposit_event(account_id, *amount_cents))
                .collect::<Result<Vec<_>, _>>()?;
            tandem::outbox::append_all(tx, TOPIC, events)?;
            Ok(())
        })
        .await
        .expect("deposit");
}

/// Polls `condition` until it holds or `deadline` passes; panics then with
/// `what`.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        if condition().await {
            return;
        }
        if tokio::time::Instant::now() >= give_up {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The first `count` records of `topic` on `bus`, read from offset 0 of
/// every partition by a fresh group named `group`, in `(partition, offset)`
/// order; panics when they have not all come within `deadline`.
pub async fn read_topic(
    bus: &dyn tandem::Bus,
    group: &str,
    topic: &str,
    count: usize,
    deadline: Duration,
) -> Vec<tandem::Record> {
    use tandem::Delivery;
    let mut subscription = bus
        .subscribe(group, &[topic.to_owned()])
        .await
        .expect("subscribe");
    let give_up = tokio::time::Instant::now() + deadline;
    let mut records = Vec::new();
    while records.len() < count {
        assert!(
            tokio::time::Instant::now() < give_up,
            "only {} of {count} records of {topic} came back within {deadline:?}",
            records.len()
        );
        match subscription
            .next(1000, Duration::from_millis(200))
            .await
            .expect("next")
        {
            Some(Delivery::Assigned(partitions)) => {
                for partition in &partitions {
                    subscription.seek(partition, 0).await.expect("seek");
                }
            }
            Some(Delivery::Records(batch)) => records.extend(batch),
            _ => {}
        }
    }
    records.sort_by_key(|record| (record.partition, record.offset));
    records
}
