//! Side-by-side rebuilds in the running commerce system, with real service
//! processes on each engine pair: the Order Service's local copies are
//! rebuilt by `tandem rebuild` while customers keep changing, and a reader
//! polling `GET /customers/{id}` on the Order Service never sees a
//! customer disappear or go back to an older version. After the switch
//! the copies equal the owner's. With the switch held back
//! (`TANDEM_FAULT=rebuild.switch`), the Order Service is killed -9 in the
//! middle of the rebuild and restarted: it resumes and ends the same. The
//! Inventory Service's reservations, which publish, are refused.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::engines::{databases, kafka, namespaced, nats, system_on};
use common::{eventually, try_call, url};
use serde_json::{json, Value};
use tandem_cli::serve::Service;
use tandem_cli::system::System;
use tokio::time::Instant;

const SECRET: &str = "rebuild-test-secret";

/// Longest wait for the switch: a Kafka group notices a killed member
/// only when its session times out.
const RECOVERY: Duration = Duration::from_secs(120);

/// Customers created beside the seeded ones, so the log has some length.
const EXTRA: usize = 12;

fn tandem(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .env("TANDEM_ADMIN_TOKEN", SECRET)
        .output()
        .expect("run tandem")
}

/// `tandem rebuild` of the Order Service's copies at `order`, with `more`.
fn rebuild_copies(order: &str, more: &[&str]) -> std::process::Output {
    let mut args = vec![
        "rebuild",
        "--url",
        order,
        "--consumer",
        "order-local-copies",
    ];
    args.extend_from_slice(more);
    tandem(&args)
}

fn with_token(system: &mut System) {
    for service in Service::ALL {
        system.set_env(
            service,
            "TANDEM_ADMIN_TOKEN",
            Some(&format!("ops:{SECRET}")),
        );
    }
}

/// Creates the extra customers and updates each a few times; their ids.
async fn more_customers(system: &System) -> Vec<String> {
    let http = system.http().clone();
    let customers = url(system, Service::Customer);
    let mut ids = Vec::new();
    for n in 0..EXTRA {
        let created = common::expect(
            http.post(format!("{customers}/customers")).json(&json!({
                "name": format!("Rebuild {n}"),
                "email": format!("rebuild{n}@example.com"),
                "address": format!("{n} Side Street"),
                "creditLimitCents": 10_000,
            })),
            201,
            "create a customer",
        )
        .await;
        ids.push(created["customerId"].as_str().expect("an id").to_owned());
    }
    for round in 1..=3 {
        for id in &ids {
            update(&http, &customers, id, round).await;
        }
    }
    ids
}

async fn update(http: &reqwest::Client, customers: &str, id: &str, n: i64) {
    common::expect(
        http.patch(format!("{customers}/customers/{id}"))
            .json(&json!({"creditLimitCents": 10_000 + n})),
        200,
        "update a customer",
    )
    .await;
}

/// What the reader saw go wrong.
#[derive(Default)]
struct Seen {
    /// The highest sequence seen of each customer.
    sequences: BTreeMap<String, i64>,
    reads: u64,
    violations: Vec<String>,
}

/// Where the Order Service the reader polls is, and what the test is doing
/// meanwhile (named in a violation, to tell when it happened).
struct Target {
    base: String,
    phase: &'static str,
}

/// Polls the Order Service's copy of every customer in `ids` until `stop`:
/// once seen, a customer must stay, and its sequence never goes down.
/// Connection errors (the service killed and restarting) are not reads.
async fn read_until(
    http: reqwest::Client,
    order: Arc<std::sync::Mutex<Target>>,
    ids: Vec<String>,
    stop: Arc<AtomicBool>,
) -> Seen {
    let mut seen = Seen::default();
    while !stop.load(Ordering::SeqCst) {
        for id in &ids {
            let (base, phase) = {
                let target = order.lock().unwrap();
                (target.base.clone(), target.phase)
            };
            let Ok(reply) = try_call(http.get(format!("{base}/customers/{id}"))).await else {
                continue;
            };
            seen.reads += 1;
            match reply.status {
                200 => {
                    let sequence = reply.body["sequence"].as_i64().unwrap_or(-1);
                    let before = seen.sequences.insert(id.clone(), sequence);
                    if let Some(before) = before {
                        if sequence < before {
                            seen.violations
                                .push(format!(
                                "{id}: sequence {sequence} after {before} ({phase}, read {}, at {}, {})",
                                seen.reads,
                                tandem::envelope::format_time(time::OffsetDateTime::now_utc()),
                                reply.body
                            ));
                        }
                    }
                }
                404 if seen.sequences.contains_key(id) => {
                    seen.violations.push(format!(
                        "{id}: gone (404) after sequence {} ({phase})",
                        seen.sequences[id]
                    ));
                }
                404 => {}
                503 => {} // shutting down or starting
                other => seen
                    .violations
                    .push(format!("{id}: {other} {} ({phase})", reply.body)),
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    seen
}

/// The rebuild of the Order Service's copies, as its admin API tells.
async fn rebuild_state(http: &reqwest::Client, order: &str) -> Result<Value, String> {
    let reply = try_call(
        http.get(format!(
            "{order}/admin/consumers/order-local-copies/rebuild"
        ))
        .bearer_auth(SECRET),
    )
    .await
    .map_err(|error| error.to_string())?;
    if reply.status == 200 {
        Ok(reply.body)
    } else {
        Err(format!("{} {}", reply.status, reply.body))
    }
}

/// How the Order Service is killed -9 in the middle of the rebuild (if at
/// all), and how long it stays down before it restarts.
#[derive(Clone, Copy)]
enum Kill {
    No,
    RestartAfter(Duration),
}

/// On Kafka the killed service restarts once its members' sessions have
/// expired: tansu 0.6 can strand a group's partitions with a member that
/// joins while a killed one's session is still open (seen with the
/// Order Service's settlement group as well as the rebuild's), which is
/// the broker's fault, not what this test is about.
const KAFKA_SESSION_OVER: Duration = Duration::from_secs(50);

async fn rebuild_under_steady_writes(mut system: System, kill: Kill) {
    let kill_after = match kill {
        Kill::No => None,
        Kill::RestartAfter(pause) => Some(pause),
    };
    let kill = kill_after.is_some();
    with_token(&mut system);
    if kill {
        system.set_env(Service::Order, "TANDEM_FAULT", Some("rebuild.switch"));
    }
    system.start_all().await.expect("start the services");
    common::seed(&system).await;
    let http = system.http().clone();
    let customers = url(&system, Service::Customer);
    let order = url(&system, Service::Order);
    let mut ids: Vec<String> = common::CUSTOMERS
        .iter()
        .map(|id| (*id).to_owned())
        .collect();
    ids.extend(more_customers(&system).await);
    for id in &ids {
        let owner = common::customer(&http, &customers, id).await;
        common::local_customer_where(&http, &order, id, "caught up", |copy| {
            copy["sequence"] == owner["version"]
        })
        .await;
    }

    // Steady writes, and a reader, for the whole rebuild.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (http, customers, ids, stop) = (
            http.clone(),
            customers.clone(),
            ids.clone(),
            Arc::clone(&stop),
        );
        tokio::spawn(async move {
            let mut n = 100;
            while !stop.load(Ordering::SeqCst) {
                let id = &ids[n as usize % ids.len()];
                update(&http, &customers, id, n).await;
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            n - 100
        })
    };
    let order_base = Arc::new(std::sync::Mutex::new(Target {
        base: order.clone(),
        phase: "building",
    }));
    let reader = tokio::spawn(read_until(
        http.clone(),
        Arc::clone(&order_base),
        ids.clone(),
        Arc::clone(&stop),
    ));

    let output = rebuild_copies(&order, &["--no-wait"]);
    assert!(output.status.success(), "tandem rebuild: {output:?}");
    let said = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(said.contains("started"), "{said}");

    if kill {
        // In the middle: the new version has applied events, and cannot
        // switch while the fault holds it.
        eventually("the new version applies events", || async {
            let state = rebuild_state(&http, &order).await?;
            if state["state"] == "building" && state["eventsApplied"].as_u64() > Some(0) {
                Ok(())
            } else {
                Err(state.to_string())
            }
        })
        .await;
        system
            .kill(Service::Order)
            .await
            .expect("kill -9 the order service");
        order_base.lock().unwrap().phase = "killed";
        tokio::time::sleep(kill_after.unwrap_or_default()).await;
        system.set_env(Service::Order, "TANDEM_FAULT", None);
        system.start(Service::Order).await.expect("restart it");
        *order_base.lock().unwrap() = Target {
            base: url(&system, Service::Order),
            phase: "restarted",
        };
    }
    let order = url(&system, Service::Order);
    // After a kill, a Kafka group hands the dead member's partitions on
    // only when its session times out.
    let deadline = Instant::now() + RECOVERY;
    let finished = loop {
        let state = rebuild_state(&http, &order).await;
        match state {
            Ok(state) if state["state"] == "switched" => {
                order_base.lock().unwrap().phase = "switched";
                break state;
            }
            last if Instant::now() >= deadline => {
                panic!("the rebuild did not switch within {RECOVERY:?}; last observed: {last:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    // Reads go on across the switch for a moment, then the writes stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let writes = writer.await.expect("the writer");
    let seen = reader.await.expect("the reader");
    eprintln!(
        "rebuild {}: {writes} writes and {} reads meanwhile",
        finished["number"], seen.reads
    );
    assert!(writes > 0, "no writes during the rebuild");
    assert!(seen.reads > 0, "no reads during the rebuild");
    assert!(
        seen.violations.is_empty(),
        "the reader saw the copies go back ({} of {} reads): {:?}",
        seen.violations.len(),
        seen.reads,
        &seen.violations[..seen.violations.len().min(10)]
    );
    assert!(finished["finishedAt"].is_string(), "{finished}");

    // After the switch, the copies equal the owner's data (after a kill
    // on Kafka, once the live group has its partitions back too).
    for id in &ids {
        let owner = common::customer(&http, &customers, id).await;
        let deadline = Instant::now() + RECOVERY;
        loop {
            let copy = try_call(http.get(format!("{order}/customers/{id}"))).await;
            let equal = copy.as_ref().is_ok_and(|copy| {
                copy.body["sequence"] == owner["version"]
                    && ["name", "email", "address", "creditLimitCents"]
                        .iter()
                        .all(|field| copy.body[field] == owner[field])
            });
            if equal {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the copy of {id} is not the owner's {owner} within {RECOVERY:?}: {copy:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for id in common::PRODUCTS {
        let inventory = url(&system, Service::Inventory);
        let owner = common::product(&http, &inventory, id).await;
        common::local_product_where(&http, &order, id, "equal to the owner's", |copy| {
            ["sku", "name", "priceCents", "available", "reserved"]
                .iter()
                .all(|field| copy[field] == owner[field])
        })
        .await;
    }
    // The status tells how the rebuild ended; the new version is the live
    // consumer, which goes on: an order placed now settles.
    let status = common::expect(http.get(format!("{order}/status")), 200, "status").await;
    let copies = status["consumers"]
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|consumer| consumer["consumer"] == "order-local-copies")
        })
        .cloned()
        .expect("the copies consumer in /status");
    assert_eq!(copies["rebuild"]["state"], "switched", "{copies}");
    assert!(
        !status.to_string().contains("-rebuild-"),
        "the builder is not a consumer of its own: {status}"
    );
    let id = common::place(
        &http,
        &order,
        common::CUSTOMERS[0],
        &[(common::PRODUCTS[1], 1)],
    )
    .await;
    common::settles_as(&http, &order, &id, "CONFIRMED").await;
    system.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_rebuild_under_steady_writes_never_goes_back() {
    let dir = tempfile::tempdir().unwrap();
    let system = System::new(dir.path(), 0)
        .unwrap()
        .with_executable(env!("CARGO_BIN_EXE_tandem"));
    rebuild_under_steady_writes(system, Kill::No).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_rebuild_killed_in_the_middle_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let system = System::new(dir.path(), 0)
        .unwrap()
        .with_executable(env!("CARGO_BIN_EXE_tandem"));
    rebuild_under_steady_writes(system, Kill::RestartAfter(Duration::ZERO)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_postgres_rebuild_under_steady_writes_never_goes_back() {
    let dir = tempfile::tempdir().unwrap();
    let (dbs, _guards) = databases();
    let system = system_on(dir.path(), namespaced(&nats()), &dbs).await;
    rebuild_under_steady_writes(system, Kill::No).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_postgres_rebuild_killed_in_the_middle_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (dbs, _guards) = databases();
    let system = system_on(dir.path(), namespaced(&nats()), &dbs).await;
    rebuild_under_steady_writes(system, Kill::RestartAfter(Duration::ZERO)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_postgres_rebuild_under_steady_writes_never_goes_back() {
    let dir = tempfile::tempdir().unwrap();
    let (dbs, _guards) = databases();
    let system = system_on(dir.path(), namespaced(&kafka()), &dbs).await;
    rebuild_under_steady_writes(system, Kill::No).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_postgres_rebuild_killed_in_the_middle_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (dbs, _guards) = databases();
    let system = system_on(dir.path(), namespaced(&kafka()), &dbs).await;
    rebuild_under_steady_writes(system, Kill::RestartAfter(KAFKA_SESSION_OVER)).await;
}

/// A consumer that publishes is refused, a cancelled rebuild leaves the
/// live copies as they were, and bad input gets problem+json naming the
/// field; a rebuild without the token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_cancellation() {
    let dir = tempfile::tempdir().unwrap();
    let mut system = System::new(dir.path(), 0)
        .unwrap()
        .with_executable(env!("CARGO_BIN_EXE_tandem"));
    with_token(&mut system);
    // The switch is held back, so the rebuild is still under way to cancel.
    system.set_env(Service::Order, "TANDEM_FAULT", Some("rebuild.switch"));
    system.start_all().await.expect("start the services");
    common::seed(&system).await;
    let http = system.http().clone();
    let (inventory, order) = (
        url(&system, Service::Inventory),
        url(&system, Service::Order),
    );

    let output = tandem(&[
        "rebuild",
        "--url",
        &inventory,
        "--consumer",
        "inventory-reservations",
    ]);
    assert!(!output.status.success(), "{output:?}");
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains("409") && said.contains("read model"),
        "{said}"
    );

    let unauthenticated = try_call(http.post(format!(
        "{order}/admin/consumers/order-local-copies/rebuild"
    )))
    .await
    .unwrap();
    assert_eq!(unauthenticated.status, 401, "{:?}", unauthenticated.body);
    let bad = try_call(
        http.post(format!(
            "{order}/admin/consumers/order-local-copies/rebuild?from=yesterday"
        ))
        .bearer_auth(SECRET),
    )
    .await
    .unwrap();
    common::assert_problem(&bad, 422, "invalid-field", Some("from"), "a bad from");
    let unknown = try_call(
        http.post(format!("{order}/admin/consumers/nobody/rebuild"))
            .bearer_auth(SECRET),
    )
    .await
    .unwrap();
    assert_eq!(unknown.status, 404, "{:?}", unknown.body);

    let before = common::expect(
        http.get(format!("{order}/customers/{}", common::CUSTOMERS[0])),
        200,
        "the copy before",
    )
    .await;
    let output = rebuild_copies(&order, &["--no-wait"]);
    assert!(output.status.success(), "{output:?}");
    let again = try_call(
        http.post(format!(
            "{order}/admin/consumers/order-local-copies/rebuild"
        ))
        .bearer_auth(SECRET),
    )
    .await
    .unwrap();
    assert_eq!(again.status, 409, "{:?}", again.body);
    eventually("the new version level but held", || async {
        let state = rebuild_state(&http, &order).await?;
        if state["eventsToGo"] == 0 && state["eventsApplied"].as_u64() > Some(0) {
            Ok(())
        } else {
            Err(state.to_string())
        }
    })
    .await;
    // The gauges, read by an outside parser, show its progress.
    let gauge = |metrics: &[tandem_testkit::exposition::Series], family: &str| {
        metrics
            .iter()
            .find(|one| one.family == family && one.label("consumer") == Some("order-local-copies"))
            .and_then(|one| one.value)
    };
    let metrics = common::scrape(&http, &order).await;
    assert!(
        gauge(&metrics, "tandem_rebuild_events_applied") > Some(0.0),
        "{:?}",
        gauge(&metrics, "tandem_rebuild_events_applied")
    );
    assert_eq!(
        gauge(&metrics, "tandem_rebuild_events_remaining"),
        Some(0.0)
    );
    // `tandem status` shows the rebuild under way with its progress.
    let output = tandem(&["status", "--url", &order]);
    let table = String::from_utf8_lossy(&output.stdout);
    let line = table
        .lines()
        .skip_while(|line| !line.starts_with("REBUILDING"))
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    assert!(
        line.starts_with("order-local-copies") && line.contains("building"),
        "{table}"
    );
    let output = rebuild_copies(&order, &["--cancel"]);
    assert!(output.status.success(), "{output:?}");
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("cancelled"), "{said}");
    let state = rebuild_state(&http, &order).await.unwrap();
    assert_eq!(state["state"], "cancelled", "{state}");
    let metrics = common::scrape(&http, &order).await;
    assert_eq!(gauge(&metrics, "tandem_rebuild_events_applied"), Some(0.0));
    let after = common::expect(
        http.get(format!("{order}/customers/{}", common::CUSTOMERS[0])),
        200,
        "the copy after",
    )
    .await;
    assert_eq!(before, after);
    // Nothing of the new version is left in the database.
    let left: i64 = rusqlite::Connection::open(dir.path().join("order.db"))
        .unwrap()
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name LIKE '%\\_\\_r%' ESCAPE '\\'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(left, 0, "the new version's tables are dropped");
    let audit = common::expect(
        http.get(format!("{order}/admin/audit")).bearer_auth(SECRET),
        200,
        "the audit trail",
    )
    .await;
    let text = audit.to_string();
    assert!(
        text.contains("consumer.rebuild.cancel") && text.contains("consumer.rebuild.cancelled"),
        "{text}"
    );
    system.stop_all().await;
}
