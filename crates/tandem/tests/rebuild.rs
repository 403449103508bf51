//! Side-by-side rebuilds at the toolkit's level, on real SQLite files and
//! the embedded log: a read model whose handler publishes is refused the
//! outbox while it rebuilds (its events are parked, nothing is sent, and
//! the rebuild never switches to a model built without them); a rebuild
//! from a log pruned below its start fails and says so, and one begun at
//! the log's start switches once a snapshot fills what was pruned; an
//! operator's redrive and discard on the live consumer reach the new
//! version, which then levels with the live one and switches.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem::bus::{Bus, OutgoingRecord};
use tandem::consumer::{Consumer, ConsumerConfig};
use tandem::rebuild::{self, ModelTable, ReadModel, RebuildState, Rebuildable, TableNames};
use tandem::store::{Store, StoreError, Tx};
use tandem::{params, Envelope, Handler, HandlerError};
use tandem_testkit::{deposit_bytes, deposit_event, eventually, open_log, open_store, TOPIC};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
const CONSUMER: &str = "balances";

static TABLES: [ModelTable; 1] = [ModelTable {
    name: "balances",
    create: "CREATE TABLE IF NOT EXISTS {table} (
        account TEXT PRIMARY KEY, cents BIGINT NOT NULL);
        CREATE INDEX IF NOT EXISTS {table}_by_cents ON {table} (cents)",
}];

/// Each account's balance; with `publishes`, every deposit applied is
/// also announced on topic `announced` (a side effect); while `refusing`
/// holds, a deposit of 999 cents fails for good (a bug, until it is fixed).
#[derive(Default)]
struct Balances {
    publishes: bool,
    refusing: Arc<AtomicBool>,
}

struct BalancesIn {
    table: String,
    publishes: bool,
    refusing: Arc<AtomicBool>,
}

impl ReadModel for Balances {
    fn tables(&self) -> &'static [ModelTable] {
        &TABLES
    }

    fn handler(&self, names: &TableNames) -> Arc<dyn Handler> {
        Arc::new(BalancesIn {
            table: names.get("balances").to_owned(),
            publishes: self.publishes,
            refusing: Arc::clone(&self.refusing),
        })
    }
}

impl Handler for BalancesIn {
    fn handle(&self, tx: &mut dyn Tx, event: &Envelope) -> Result<(), HandlerError> {
        let cents = event.data["amountCents"].as_i64().unwrap_or_default();
        if cents == 999 && self.refusing.load(Ordering::SeqCst) {
            return Err(HandlerError::permanent("999 cents are refused"));
        }
        let table = &self.table;
        let sql = if event.snapshot {
            format!(
                "INSERT INTO {table} (account, cents) VALUES ($1, $2)
                 ON CONFLICT (account) DO UPDATE SET cents = excluded.cents"
            )
        } else {
            format!(
                "INSERT INTO {table} (account, cents) VALUES ($1, $2)
                 ON CONFLICT (account) DO UPDATE SET cents = {table}.cents + excluded.cents"
            )
        };
        tx.execute(&sql, params![&event.subject, cents])?;
        if self.publishes {
            tandem::outbox::append(tx, "announced", deposit_event(&event.subject, cents)?)?;
        }
        Ok(())
    }
}

struct Running {
    stop: CancellationToken,
    parts: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        for part in self.parts {
            part.await.unwrap();
        }
    }
}

/// The live consumer of `model` and the rebuild runner.
fn run<S: Store>(store: &S, bus: &Arc<dyn Bus>, model: Balances) -> Running {
    let stop = CancellationToken::new();
    let model: Arc<dyn ReadModel> = Arc::new(model);
    let config = ConsumerConfig::new(CONSUMER, &[TOPIC]);
    let live = Consumer::new(
        store.clone(),
        Arc::clone(bus),
        model.handler(&TableNames::live(&*model)),
        config.clone(),
    );
    let parts = vec![
        tokio::spawn({
            let stop = stop.clone();
            async move {
                live.run(stop).await.unwrap();
            }
        }),
        tokio::spawn(rebuild::run(
            store.clone(),
            Arc::clone(bus),
            vec![Rebuildable { config, model }],
            stop.clone(),
        )),
    ];
    Running { stop, parts }
}

async fn count<S: Store>(store: &S, sql: &'static str) -> i64 {
    store
        .read(move |tx| -> Result<i64, StoreError> { tx.query_opt(sql, &[])?.unwrap().i64(0) })
        .await
        .unwrap()
}

async fn latest<S: Store>(store: &S) -> rebuild::Rebuild {
    store
        .read(|tx| rebuild::latest(tx, CONSUMER))
        .await
        .unwrap()
        .expect("a rebuild on record")
}

async fn request<S: Store>(store: &S, from_log_start: bool) -> rebuild::Rebuild {
    store
        .write(move |tx| -> Result<_, StoreError> {
            Ok(rebuild::request(tx, CONSUMER, from_log_start, "test").unwrap())
        })
        .await
        .unwrap()
}

fn deposits(account: &str, sequences: std::ops::RangeInclusive<u64>) -> Vec<OutgoingRecord> {
    sequences
        .map(|sequence| OutgoingRecord {
            topic: TOPIC.into(),
            key: account.into(),
            payload: deposit_bytes(account, sequence, 10),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_model_that_publishes_is_refused_the_outbox_while_it_rebuilds() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir.path().join("reader.db")).await;
    store
        .write(|tx| {
            rebuild::install(
                tx,
                &Balances {
                    publishes: true,
                    ..Balances::default()
                },
            )
        })
        .await
        .unwrap();
    let bus: Arc<dyn Bus> = Arc::new(open_log(&dir.path().join("bus.db")).await);
    let running = run(
        &store,
        &bus,
        Balances {
            publishes: true,
            ..Balances::default()
        },
    );
    let mut records = deposits("a1", 1..=3);
    records.extend(deposits("a2", 1..=2));
    bus.publish(&records).await.unwrap();
    eventually("the live model applied every deposit", WAIT, || async {
        count(&store, "SELECT count(*) FROM tandem_outbox").await == 5
    })
    .await;

    let started = request(&store, false).await;
    let builder = started.builder_name();
    let parked_sql: &'static str = Box::leak(
        format!(
            "SELECT count(*) FROM tandem_dead_letters WHERE consumer = '{builder}'
             AND status = 'parked'"
        )
        .into_boxed_str(),
    );
    eventually("the rebuild parked every deposit", WAIT, || async {
        count(&store, parked_sql).await == 5
    })
    .await;
    let refused: &'static str = Box::leak(
        format!(
            "SELECT count(*) FROM tandem_dead_letters WHERE consumer = '{builder}'
             AND error LIKE '%reproduces state, not side effects%'"
        )
        .into_boxed_str(),
    );
    assert_eq!(
        count(&store, refused).await,
        2,
        "each account's first deposit"
    );
    assert_eq!(
        count(&store, "SELECT count(*) FROM tandem_outbox").await,
        5,
        "the rebuild published nothing"
    );
    // Never level with the live model: it does not switch.
    tokio::time::sleep(rebuild::CHECK_EVERY * 3).await;
    assert_eq!(latest(&store).await.state, RebuildState::Building);

    store
        .write(|tx| -> Result<_, StoreError> { Ok(rebuild::cancel(tx, CONSUMER).unwrap()) })
        .await
        .unwrap();
    eventually("the cancel is carried out", WAIT, || async {
        latest(&store).await.state == RebuildState::Cancelled
    })
    .await;
    assert_eq!(
        count(&store, parked_sql).await,
        0,
        "the new version's letters go"
    );
    assert_eq!(
        count(
            &store,
            "SELECT count(*) FROM sqlite_master WHERE name LIKE 'balances\\_\\_r%' ESCAPE '\\'"
        )
        .await,
        0,
        "the new version's table goes"
    );
    assert_eq!(count(&store, "SELECT count(*) FROM balances").await, 2);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_from_a_pruned_log_fails_and_one_from_the_log_start_waits_for_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir.path().join("reader.db")).await;
    store
        .write(|tx| rebuild::install(tx, &Balances::default()))
        .await
        .unwrap();
    let bus: Arc<dyn Bus> = Arc::new(open_log(&dir.path().join("bus.db")).await);
    let running = run(&store, &bus, Balances::default());
    bus.publish(&deposits("a1", 1..=3)).await.unwrap();
    eventually("the live model applied every deposit", WAIT, || async {
        count(&store, "SELECT COALESCE(SUM(cents), 0) FROM balances").await == 30
    })
    .await;
    // The log keeps one record a partition: deposits 1 and 2 are gone.
    assert_eq!(bus.prune(None, Some(1), 100).await.unwrap(), 2);

    request(&store, false).await;
    eventually("the rebuild from offset 0 fails", WAIT, || async {
        latest(&store).await.state == RebuildState::Failed
    })
    .await;
    let failed = latest(&store).await;
    let why = failed.error.unwrap_or_default();
    assert!(why.contains("pruned"), "{why}");

    // From the log's start: deposit 3 waits for what was pruned, and the
    // switch waits too, until a snapshot at 3 (the balance, 30) comes.
    request(&store, true).await;
    tokio::time::sleep(rebuild::CHECK_EVERY * 5).await;
    assert_eq!(latest(&store).await.state, RebuildState::Building);
    let snapshot = {
        let mut envelope = Envelope::decode(&deposit_bytes("a1", 3, 30)).unwrap();
        envelope.snapshot = true;
        OutgoingRecord {
            topic: TOPIC.into(),
            key: "a1".into(),
            payload: envelope.to_json(),
        }
    };
    bus.publish(&[snapshot]).await.unwrap();
    eventually("the rebuild switches", WAIT, || async {
        latest(&store).await.state == RebuildState::Switched
    })
    .await;
    assert_eq!(
        count(&store, "SELECT cents FROM balances WHERE account = 'a1'").await,
        30
    );
    // The live consumer goes on from the new version's positions.
    bus.publish(&deposits("a1", 4..=4)).await.unwrap();
    eventually("deposit 4 is applied after the switch", WAIT, || async {
        count(&store, "SELECT cents FROM balances WHERE account = 'a1'").await == 40
    })
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operators_redrive_and_discard_during_a_rebuild_reach_the_new_version() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir.path().join("reader.db")).await;
    let refusing = Arc::new(AtomicBool::new(true));
    let model = {
        let refusing = Arc::clone(&refusing);
        move || Balances {
            refusing: Arc::clone(&refusing),
            ..Balances::default()
        }
    };
    store
        .write(|tx| rebuild::install(tx, &Balances::default()))
        .await
        .unwrap();
    let bus: Arc<dyn Bus> = Arc::new(open_log(&dir.path().join("bus.db")).await);
    let running = run(&store, &bus, model());
    // Each account's deposit 2 is refused; deposit 3 waits behind it.
    let records: Vec<OutgoingRecord> = ["a1", "a2"]
        .into_iter()
        .flat_map(|account| {
            [(1, 10), (2, 999), (3, 10)].map(|(sequence, cents)| OutgoingRecord {
                topic: TOPIC.into(),
                key: account.into(),
                payload: deposit_bytes(account, sequence, cents),
            })
        })
        .collect();
    bus.publish(&records).await.unwrap();
    let refused = |consumer: String| {
        let store = store.clone();
        async move {
            store
                .read(move |tx| -> Result<Vec<(String, i64)>, StoreError> {
                    tx.query(
                        "SELECT subject, id FROM tandem_dead_letters
                         WHERE consumer = $1 AND status = 'parked' AND sequence = 2
                         ORDER BY subject",
                        params![&consumer],
                    )?
                    .iter()
                    .map(|row| Ok((row.text(0)?.to_owned(), row.i64(1)?)))
                    .collect()
                })
                .await
                .unwrap()
        }
    };
    eventually(
        "the live model parked both refused deposits",
        WAIT,
        || async { refused(CONSUMER.to_owned()).await.len() == 2 },
    )
    .await;
    let builder = request(&store, false).await.builder_name();
    eventually("the new version parked them too", WAIT, || async {
        refused(builder.clone()).await.len() == 2
    })
    .await;

    // The operator gives up on a1's deposit, fixes the bug and redrives
    // a2's, on the live consumer only.
    let live = refused(CONSUMER.to_owned()).await;
    tandem::dead_letter::request_discard(&store, CONSUMER, Some(live[0].1))
        .await
        .unwrap();
    refusing.store(false, Ordering::SeqCst);
    tandem::dead_letter::request_redrive(&store, CONSUMER, Some(live[1].1))
        .await
        .unwrap();
    eventually("the new version levels and switches", WAIT, || async {
        latest(&store).await.state == RebuildState::Switched
    })
    .await;
    assert_eq!(
        count(&store, "SELECT cents FROM balances WHERE account = 'a1'").await,
        20,
        "a1's discarded deposit stays out of the new version"
    );
    assert_eq!(
        count(&store, "SELECT cents FROM balances WHERE account = 'a2'").await,
        1019,
        "a2's redriven deposit is in it"
    );
    assert_eq!(
        count(
            &store,
            "SELECT count(*) FROM tandem_dead_letters WHERE status = 'parked'"
        )
        .await,
        0
    );

    assert_eq!(
        count(
            &store,
            "SELECT count(*) FROM sqlite_master WHERE type = 'index'
             AND tbl_name = 'balances' AND name = 'balances_by_cents'"
        )
        .await,
        1,
        "the new version's index has its live name"
    );
    assert_eq!(
        count(
            &store,
            "SELECT count(*) FROM sqlite_master WHERE name LIKE '%\\_\\_r%' ESCAPE '\\'"
        )
        .await,
        0,
        "nothing keeps the built name"
    );

    // Once every process has stopped its builder, what it leaves goes.
    let models = vec![Rebuildable {
        config: ConsumerConfig::new(CONSUMER, &[TOPIC]),
        model: Arc::new(model()),
    }];
    let cleared = rebuild::clear_leftovers(&store, &*bus, &models, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(cleared, vec![builder.clone()]);
    let paused: &'static str = Box::leak(
        format!("SELECT count(*) FROM tandem_consumer_paused WHERE consumer = '{builder}'")
            .into_boxed_str(),
    );
    assert_eq!(
        count(&store, paused).await,
        0,
        "the builder's pause is gone"
    );
    assert!(
        rebuild::clear_leftovers(&store, &*bus, &models, Duration::ZERO)
            .await
            .unwrap()
            .is_empty()
    );
    running.stop().await;
}
