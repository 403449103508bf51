//! The `minimal` example's system on engines chosen by URL alone: the
//! services open their stores and the bus with
//! [`tandem_engines::open_store`] and [`tandem_engines::open_bus`], so
//! moving from the embedded engines to PostgreSQL and NATS or Kafka
//! changes the URLs and nothing else.
//!
//! ```sh
//! cargo run -p tandem-engines --example by_url       # embedded, in a temp dir
//! cargo run -p tandem-engines --example by_url -- nats://127.0.0.1:4222 postgres://postgres@127.0.0.1:5432/postgres
//! cargo run -p tandem-engines --example by_url -- kafka://127.0.0.1:19092 postgres://postgres@127.0.0.1:5432/postgres
//! ```
//!
//! The URLs come from the command line: `[BUS_URL [POSTGRES_URL]]`.
//!
//! - `BUS_URL`: any bus `open_bus` knows; by default an embedded log in a
//!   temporary directory. The example adds `namespace=by-url-<unique>`,
//!   so each run has topics and a consumer group of its own.
//! - `POSTGRES_URL`: a PostgreSQL server, reached through the database
//!   the URL names; the example creates a fresh database for each service
//!   on it (`tandem_t_<service>_<unique>`, made with
//!   `tandem_postgres::testing::ScratchDatabase`) and drops them at the
//!   end. Without it, each service has a SQLite file in the temporary
//!   directory. A deployed service is given its own store URL instead,
//!   as `tandem serve --db` is.
//!
//! A run's topics stay on a NATS or Kafka broker, under its namespace.
//!
//! An engine that cannot be reached ends the run with a message naming
//! it (`scripts/engines up` starts them all).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use serde::{Deserialize, Serialize};
use tandem::{outbox, params};
use tandem::{Consumer, ConsumerConfig, Envelope, EventPayload, Handler, HandlerError};
use tandem::{NewEvent, Relay, RelayConfig, Store, StoreError, Tx};
use tandem_engines::{open_bus, open_store, redact};
use tandem_postgres::testing::ScratchDatabase;
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "accounts";

#[derive(Serialize, Deserialize)]
struct AccountOpened {
    account: String,
    owner: String,
}

impl EventPayload for AccountOpened {
    const TYPE: &'static str = "AccountOpened";
    const SCHEMA: &'static str = "example:accounts/AccountOpened/v1";
}

/// The accounts service's command, for a store of any engine: the row
/// and its event commit together.
async fn open_account(store: &impl Store, account: &str, owner: &str) -> Result<(), StoreError> {
    let opened = AccountOpened {
        account: account.to_owned(),
        owner: owner.to_owned(),
    };
    let event = NewEvent::new(account, &opened)?;
    store
        .write(move |tx| {
            tx.execute(
                "INSERT INTO accounts (account, owner) VALUES ($1, $2)",
                params![&opened.account, &opened.owner],
            )?;
            outbox::append(tx, TOPIC, event).map(drop)
        })
        .await
}

/// The statements service's read model: owners by account. Portable SQL
/// (`$1` placeholders, plain types), so it runs on every store engine.
struct Owners;

impl Handler for Owners {
    fn handle(&self, tx: &mut dyn Tx, event: &Envelope) -> Result<(), HandlerError> {
        if event.event_type == AccountOpened::TYPE {
            let opened: AccountOpened = event.payload()?;
            tx.execute(
                "INSERT INTO owners (account, owner) VALUES ($1, $2)",
                params![&opened.account, &opened.owner],
            )?;
        }
        Ok(())
    }
}

async fn owners(store: &impl Store) -> anyhow::Result<Vec<(String, String)>> {
    let sql = "SELECT account, owner FROM owners ORDER BY account";
    let rows = store.read(move |tx| tx.query(sql, &[])).await?;
    let owner = |row: &tandem::Row| Ok((row.text(0)?.to_owned(), row.text(1)?.to_owned()));
    Ok(rows.iter().map(owner).collect::<Result<_, StoreError>>()?)
}

/// An engine that did not open: say which, and how to start it.
fn engine_error(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{error}\n(is the engine running? `scripts/engines up` starts them)")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() > 2 || args.iter().any(|arg| arg.starts_with('-')) {
        bail!("usage: by_url [BUS_URL [POSTGRES_URL]] (see the example's doc)");
    }
    let dir = tempfile::tempdir()?;
    let in_dir = |file: &str| format!("sqlite://{}", dir.path().join(file).display());
    let run = format!("by-url-{}", uuid::Uuid::now_v7().simple());
    let bus_url = args.first().cloned().unwrap_or_else(|| in_dir("bus.db"));
    let separator = if bus_url.contains('?') { '&' } else { '?' };
    let bus_url = format!("{bus_url}{separator}namespace={run}");

    // One database per service. On PostgreSQL: two fresh ones on the
    // server, dropped when `_databases` is (after the stores close).
    let (store_urls, _databases) = match args.get(1) {
        None => (vec![in_dir("accounts.db"), in_dir("statements.db")], vec![]),
        Some(server) if server.starts_with("postgres") => {
            let mut databases = Vec::new();
            for service in ["accounts", "statements"] {
                let created = ScratchDatabase::create(server, service).await;
                databases.push(created.map_err(engine_error)?);
            }
            let urls = databases.iter().map(|db| db.url().to_owned()).collect();
            (urls, databases)
        }
        Some(other) => bail!("{}: expected a postgres:// server URL", redact(other)),
    };

    // From here on, nothing knows the engines: the URLs are all there is.
    let bus = open_bus(&bus_url).await.map_err(engine_error)?;
    let accounts = open_store(&store_urls[0]).await.map_err(engine_error)?;
    let statements = open_store(&store_urls[1]).await.map_err(engine_error)?;
    for (store, table) in [(&accounts, "accounts"), (&statements, "owners")] {
        let sql = format!("CREATE TABLE {table} (account TEXT PRIMARY KEY, owner TEXT NOT NULL)");
        store.write(move |tx| tx.execute_batch(&sql)).await?;
    }

    let started = Instant::now();
    let shutdown = CancellationToken::new();
    let relay = Relay::new(accounts.clone(), Arc::clone(&bus), RelayConfig::default());
    let config = ConsumerConfig::new("statements-owners", &[TOPIC]);
    let consumer = Consumer::new(
        statements.clone(),
        Arc::clone(&bus),
        Arc::new(Owners),
        config,
    );
    let relay = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await }
    });
    let consumer = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { consumer.run(shutdown).await }
    });

    let expected = [("acct-1", "Ada"), ("acct-2", "Grace"), ("acct-3", "Edsger")];
    for (account, owner) in expected {
        open_account(&accounts, account, owner).await?;
    }
    // The copy is eventually consistent: wait for it, with a deadline (a
    // broker's consumer group may take a few seconds to form).
    let expected: Vec<_> = expected
        .iter()
        .map(|(a, o)| (a.to_string(), o.to_string()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = owners(&statements).await?;
        if seen == expected {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "after 60 s the statements service has {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    let parked = tandem::dead_letter::depth(&statements, "statements-owners").await?;
    ensure!(parked == 0, "{parked} events parked as dead letters");

    shutdown.cancel();
    relay.await??;
    consumer.await??;
    accounts.close().await?;
    statements.close().await?;
    bus.close().await?;
    let engine = |url: &str| match url.split(':').next() {
        Some("sqlite") if url == bus_url => "the embedded log",
        Some("sqlite") => "SQLite",
        Some("nats") => "NATS JetStream",
        Some("kafka") => "Kafka",
        _ => "PostgreSQL",
    };
    let stores: Vec<_> = store_urls.iter().map(|url| redact(url)).collect();
    println!(
        "by_url on {} and {}: 3 accounts committed with their events in the accounts database \
         reached the statements database's read model, each once, in {} ms (bus {}; stores {})",
        engine(&bus_url),
        engine(&store_urls[0]),
        took.as_millis(),
        redact(&bus_url),
        stores.join(", "),
    );
    Ok(())
}
