//! The smallest Tandem system, on the embedded engines (run it with
//! `cargo run -p tandem --example minimal`):
//!
//! - an *accounts* service commits each new account and its
//!   `AccountOpened` event in one transaction of its own SQLite file (the
//!   outbox);
//! - a relay moves committed events onto the bus (an embedded log, one
//!   more SQLite file);
//! - a *statements* service keeps its own copy of the owners, applied from
//!   the events with an exactly-once effect: the handler's write, the
//!   consumer's position and the aggregate's sequence commit together.
//!
//! Nothing is installed or started: three files in a temporary directory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tandem::embedded::{EmbeddedLog, EmbeddedOptions};
use tandem::sqlite::{SqliteOptions, SqliteStore};
use tandem::{outbox, params};
use tandem::{Bus, Consumer, ConsumerConfig, Envelope, EventPayload, Handler, HandlerError};
use tandem::{NewEvent, Relay, RelayConfig, Store, StoreError, Tx};
use tokio_util::sync::CancellationToken;

/// The topic the accounts service publishes on.
const TOPIC: &str = "accounts";

/// The event: its type and versioned schema name travel in the envelope.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AccountOpened {
    account_id: String,
    owner: String,
}

impl EventPayload for AccountOpened {
    const TYPE: &'static str = "AccountOpened";
    const SCHEMA: &'static str = "example:accounts/AccountOpened/v1";
}

/// The accounts service's one command: the row and its event, committed
/// together or not at all.
async fn open_account(store: &SqliteStore, id: &str, owner: &str) -> Result<(), StoreError> {
    let event = NewEvent::new(
        id,
        &AccountOpened {
            account_id: id.to_owned(),
            owner: owner.to_owned(),
        },
    )?;
    let (id, owner) = (id.to_owned(), owner.to_owned());
    store
        .write(move |tx| {
            tx.execute(
                "INSERT INTO accounts (account_id, owner) VALUES ($1, $2)",
                params![id.as_str(), owner.as_str()],
            )?;
            outbox::append(tx, TOPIC, event)?;
            Ok(())
        })
        .await
}

/// The statements service's read model: owners by account. It runs inside
/// the consumer's transaction, so it only touches the database it is given.
struct Owners;

impl Handler for Owners {
    fn handle(&self, tx: &mut dyn Tx, event: &Envelope) -> Result<(), HandlerError> {
        if event.event_type != AccountOpened::TYPE {
            return Ok(());
        }
        let opened: AccountOpened = event.payload()?;
        tx.execute(
            "INSERT INTO owners (account_id, owner) VALUES ($1, $2)",
            params![opened.account_id.as_str(), opened.owner.as_str()],
        )?;
        Ok(())
    }
}

async fn owners(store: &SqliteStore) -> Result<i64, StoreError> {
    store
        .read(|tx| -> Result<i64, StoreError> {
            tx.query_opt("SELECT COUNT(*) FROM owners", &[])?
                .map_or(Ok(0), |row| row.i64(0))
        })
        .await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let accounts =
        SqliteStore::open(dir.path().join("accounts.db"), SqliteOptions::default()).await?;
    let statements =
        SqliteStore::open(dir.path().join("statements.db"), SqliteOptions::default()).await?;
    let bus: Arc<dyn Bus> =
        Arc::new(EmbeddedLog::open(dir.path().join("bus.db"), EmbeddedOptions::default()).await?);
    accounts
        .write(|tx| {
            tx.execute_batch(
                "CREATE TABLE accounts (account_id TEXT PRIMARY KEY, owner TEXT NOT NULL)",
            )
        })
        .await?;
    statements
        .write(|tx| {
            tx.execute_batch(
                "CREATE TABLE owners (account_id TEXT PRIMARY KEY, owner TEXT NOT NULL)",
            )
        })
        .await?;

    // The relay and the consumer run until `shutdown` is cancelled.
    let shutdown = CancellationToken::new();
    let relay = Relay::new(accounts.clone(), Arc::clone(&bus), RelayConfig::default());
    let consumer = Consumer::new(
        statements.clone(),
        Arc::clone(&bus),
        Arc::new(Owners),
        ConsumerConfig::new("statements-owners", &[TOPIC]),
    );
    let relay = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await }
    });
    let consumer = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { consumer.run(shutdown).await }
    });

    for (id, owner) in [("acct-1", "Ada"), ("acct-2", "Grace"), ("acct-3", "Edsger")] {
        open_account(&accounts, id, owner).await?;
    }

    // The copy is eventually consistent: wait for it, with a deadline.
    let deadline = Instant::now() + Duration::from_secs(10);
    while owners(&statements).await? < 3 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the statements service did not get every owner within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("the statements service has the owners of all 3 accounts");

    shutdown.cancel();
    relay.await??;
    consumer.await??;
    accounts.close().await?;
    statements.close().await?;
    Ok(())
}
