//! Retention in the running commerce system, with real service processes:
//! under a rule of zero age, the Order and Inventory Services prune their
//! outboxes once the bus has the events, and the embedded log keeps its
//! newest records per partition, while the Customer Service keeps its
//! outbox whole as its event history; orders still settle throughout.

mod common;

use common::{eventually, place, settles_as, url, CUSTOMERS, PRODUCTS};
use tandem_cli::serve::Service;

fn count(path: &std::path::Path, sql: &str) -> i64 {
    rusqlite::Connection::open(path)
        .unwrap()
        .query_row(sql, [], |row| row.get(0))
        .unwrap_or_else(|error| panic!("{}: {sql}: {error}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_rows_go_the_log_keeps_its_newest_and_the_customer_history_stays() {
    let dir = tempfile::tempdir().unwrap();
    let mut system = tandem_cli::system::System::new(dir.path(), 0)
        .unwrap()
        .with_executable(env!("CARGO_BIN_EXE_tandem"));
    for service in Service::ALL {
        system.set_env(service, "TANDEM_RETAIN_OUTBOX", Some("0s"));
        system.set_env(service, "TANDEM_PRUNE_EVERY", Some("100ms"));
        system.set_env(service, "TANDEM_RETAIN_LOG_RECORDS", Some("5"));
    }
    system.start_all().await.expect("start the services");
    common::seed(&system).await;
    let http = system.http().clone();
    let order = url(&system, Service::Order);
    for n in 0..6 {
        let id = place(&http, &order, CUSTOMERS[n % 3], &[(PRODUCTS[0], 1)]).await;
        settles_as(&http, &order, &id, "CONFIRMED").await;
    }
    let data = dir.path();
    eventually("the Order and Inventory outboxes are pruned", || async {
        let left = (
            count(&data.join("order.db"), "SELECT count(*) FROM tandem_outbox"),
            count(
                &data.join("inventory.db"),
                "SELECT count(*) FROM tandem_outbox",
            ),
        );
        if left == (0, 0) {
            Ok(())
        } else {
            Err(format!("rows left (order, inventory): {left:?}"))
        }
    })
    .await;
    eventually("the log keeps at most 5 records a partition", || async {
        let most = count(
            &data.join("bus.db"),
            "SELECT COALESCE(MAX(n), 0) FROM
               (SELECT SUM(next_offset - first_offset) AS n FROM log_segments
                GROUP BY topic, partition)",
        );
        let appended = count(
            &data.join("bus.db"),
            "SELECT COALESCE(SUM(next_offset), 0) FROM log_heads",
        );
        let kept = count(
            &data.join("bus.db"),
            "SELECT COALESCE(SUM(next_offset - first_offset), 0) FROM log_segments",
        );
        if most <= 5 && kept < appended {
            Ok(())
        } else {
            Err(format!(
                "a partition holds {most} records; {kept} of {appended} kept"
            ))
        }
    })
    .await;
    // The Customer Service keeps every event it ever published: the three
    // seeded customers' creations at least.
    assert!(
        count(
            &data.join("customer.db"),
            "SELECT count(*) FROM tandem_outbox"
        ) >= 3,
        "the Customer Service's event history"
    );
    // The system still works after pruning.
    let id = place(&http, &order, CUSTOMERS[0], &[(PRODUCTS[1], 1)]).await;
    settles_as(&http, &order, &id, "CONFIRMED").await;
    system.stop_all().await;
}

const SECRET: &str = "republish-test-secret-0123456789";

/// Whether the embedded log no longer holds the next record of some
/// partition of `topic` for the Order Service's copies consumer.
fn behind(data: &std::path::Path, topic: &str) -> bool {
    let pairs = |path: &std::path::Path, sql: &str| -> Vec<(i64, i64)> {
        let connection = rusqlite::Connection::open(path).unwrap();
        let mut statement = connection.prepare(sql).unwrap();
        statement
            .query_map([topic], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let starts = pairs(
        &data.join("bus.db"),
        "SELECT partition, min(first_offset) FROM log_segments
         WHERE topic = ?1 AND next_offset > first_offset GROUP BY partition",
    );
    let positions = pairs(
        &data.join("order.db"),
        "SELECT partition, next_offset FROM tandem_consumer_positions
         WHERE consumer = 'order-local-copies' AND topic = ?1",
    );
    starts.iter().any(|(partition, start)| {
        let position = positions
            .iter()
            .find(|(p, _)| p == partition)
            .map_or(0, |(_, next)| *next);
        *start > position
    })
}

/// The Order Service is down while customers and stock change and the
/// log keeps only its newest records: when it comes back, its copies
/// consumer stops with the pruned range (status error), applies nothing
/// out of order, and `tandem republish` of the Customer Service (its kept
/// history) and of the Inventory Service (product snapshots) brings the
/// copies level with the owners', checked over HTTP; the system goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_behind_the_retention_is_caught_up_by_republish() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let mut system = tandem_cli::system::System::new(data, 0)
        .unwrap()
        .with_executable(env!("CARGO_BIN_EXE_tandem"));
    // The log keeps 2 records a partition while the Order Service is
    // away (the Customer and Inventory Services prune it).
    for service in Service::ALL {
        system.set_env(
            service,
            "TANDEM_ADMIN_TOKEN",
            Some(&format!("ops:{SECRET}")),
        );
        system.set_env(service, "TANDEM_PRUNE_EVERY", Some("100ms"));
    }
    for service in [Service::Customer, Service::Inventory] {
        system.set_env(service, "TANDEM_RETAIN_LOG_RECORDS", Some("2"));
    }
    system.start_all().await.expect("start the services");
    common::seed(&system).await;
    let http = system.http().clone();
    let (customers, inventory, order) = (
        url(&system, Service::Customer),
        url(&system, Service::Inventory),
        url(&system, Service::Order),
    );
    for id in CUSTOMERS {
        common::local_customer_where(&http, &order, id, "copied", |_| true).await;
    }

    system.stop(Service::Order).await;
    change_customers_and_stock(&http, &customers, &inventory).await;
    eventually(
        "the log dropped records the Order Service never read",
        || async {
            if behind(data, "customer") && behind(data, "inventory") {
                Ok(())
            } else {
                Err("not yet".to_owned())
            }
        },
    )
    .await;

    // Back to the default rule (7 days), so that what is re-published
    // stays in the log long enough to be read.
    catch_up_by_republish(system, "TANDEM_RETAIN_LOG_RECORDS").await;
}

/// The same on NATS JetStream and PostgreSQL: the streams are created
/// under a rule of 8 s, and the Order Service is down until they hold
/// none of what it missed; the Customer and Inventory Services restart
/// with the default rule (a publisher brings its stream to its rule), and
/// the re-publication catches the Order Service up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_nats_and_postgres_a_consumer_behind_the_retention_is_caught_up_by_republish() {
    let bus = common::engines::namespaced(&common::engines::nats());
    behind_the_retention_then_republish(bus, "8s").await;
}

/// The same on Kafka and PostgreSQL, on a tansu of the test's own whose
/// retention runs every second: the topics are created under a rule of
/// 30 s (a consumer group takes a few seconds to form on tansu, so the
/// first copies need longer than NATS's 8 s), which they keep (an
/// existing Kafka topic keeps its settings), so the Order Service reads
/// what is re-published within that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_and_postgres_a_consumer_behind_the_retention_is_caught_up_by_republish() {
    let dir = tempfile::tempdir().unwrap();
    let broker = tandem_testkit::tansu::start(dir.path()).await;
    let bus = common::engines::namespaced(&format!("kafka://{}", broker.address));
    behind_the_retention_then_republish(bus, "30s").await;
}

async fn behind_the_retention_then_republish(bus: String, rule: &str) {
    use common::engines::{databases, system_on};
    let dir = tempfile::tempdir().unwrap();
    let (dbs, _guards) = databases();
    let mut system = system_on(dir.path(), bus.clone(), &dbs).await;
    for service in Service::ALL {
        system.set_env(
            service,
            "TANDEM_ADMIN_TOKEN",
            Some(&format!("ops:{SECRET}")),
        );
    }
    // Whichever service creates a topic first gives it its rule.
    for service in Service::ALL {
        system.set_env(service, "TANDEM_RETAIN_LOG", Some(rule));
    }
    system.start_all().await.expect("start the services");
    common::seed(&system).await;
    let http = system.http().clone();
    let (customers, inventory) = (
        url(&system, Service::Customer),
        url(&system, Service::Inventory),
    );
    system.stop(Service::Order).await;
    let mut ends_read = std::collections::BTreeMap::new();
    {
        let probe = tandem_engines::open_bus(&bus).await.expect("open the bus");
        for topic in ["customer", "inventory"] {
            ends_read.insert(
                topic,
                probe.end_offsets(topic).await.expect("the log's end"),
            );
        }
    }
    change_customers_and_stock(&http, &customers, &inventory).await;
    // The Order Service had read everything up to these ends; once a
    // partition of each topic starts past its end, it missed records.
    let probe = tandem_engines::open_bus(&bus).await.expect("open the bus");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let mut behind = true;
        let mut seen = Vec::new();
        for topic in ["customer", "inventory"] {
            let starts = probe.start_offsets(topic).await.expect("the log's start");
            let read = ends_read.get(topic).cloned().unwrap_or_default();
            behind &= starts.iter().any(|(partition, start)| {
                read.iter().any(|(p, end)| p == partition && start > end)
            });
            seen.push((topic, starts, read));
        }
        if behind {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the log did not drop what the Order Service missed within 90 s under a rule of \
             {rule}: (topic, starts, ends read) {seen:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    catch_up_by_republish(system, "TANDEM_RETAIN_LOG").await;
}

/// Four rounds of changes to every customer and product while the Order
/// Service is away.
async fn change_customers_and_stock(http: &reqwest::Client, customers: &str, inventory: &str) {
    for round in 0..4 {
        for id in CUSTOMERS {
            common::expect(
                http.patch(format!("{customers}/customers/{id}"))
                    .json(&serde_json::json!({"creditLimitCents": 100_000 + round})),
                200,
                "raising a credit limit",
            )
            .await;
        }
        for id in PRODUCTS {
            common::adjust_stock(http, inventory, id, 1).await;
        }
    }
}

/// Restarts the Order Service after the log dropped what it had not read:
/// its copies consumer stops with the pruned range (status error), and
/// `tandem republish` of the Customer Service (its kept history) and of
/// the Inventory Service (product snapshots) brings the copies level with
/// the owners', checked over HTTP, and the consumer healthy again; an
/// order placed then confirms. First the Customer and Inventory Services
/// restart without the short retention rule `short_rule`, so that what
/// is re-published stays in the log long enough to be read.
async fn catch_up_by_republish(mut system: tandem_cli::system::System, short_rule: &str) {
    for service in [Service::Customer, Service::Inventory] {
        system.stop(service).await;
        system.set_env(service, short_rule, None);
        system.start(service).await.expect("restart");
    }
    let system = &mut system;
    let http = system.http().clone();
    let (customers, inventory) = (
        url(system, Service::Customer),
        url(system, Service::Inventory),
    );
    system.start(Service::Order).await.expect("restart order");
    let order = url(system, Service::Order);
    let status = eventually("the copies consumer reports the pruned range", || async {
        let reply = common::try_call(http.get(format!("{order}/status")))
            .await
            .map_err(|error| error.to_string())?;
        let text = reply.body.to_string();
        if text.contains("were pruned") || text.contains("deleted by") {
            Ok(text)
        } else {
            Err(text)
        }
    })
    .await;
    assert!(status.contains("error"), "{status}");

    let tandem = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(args)
            .env("TANDEM_ADMIN_TOKEN", SECRET)
            .output()
            .expect("run tandem");
        assert!(output.status.success(), "tandem {args:?}: {output:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let said = tandem(&["republish", "--url", &customers, "--consumers-at", &order]);
    assert!(said.contains("from its history"), "{said}");
    assert!(said.contains("order-local-copies"), "{said}");
    let said = tandem(&["republish", "--url", &inventory, "--consumers-at", &order]);
    assert!(said.contains("from its snapshots"), "{said}");

    for id in CUSTOMERS {
        let owner = common::customer(&http, &customers, id).await;
        common::local_customer_where(&http, &order, id, "equal to the owner's", |copy| {
            ["name", "email", "address", "creditLimitCents"]
                .iter()
                .all(|field| copy[field] == owner[field])
        })
        .await;
    }
    for id in PRODUCTS {
        let owner = common::product(&http, &inventory, id).await;
        common::local_product_where(&http, &order, id, "equal to the owner's", |copy| {
            ["sku", "name", "priceCents", "available", "reserved"]
                .iter()
                .all(|field| copy[field] == owner[field])
        })
        .await;
    }
    // Healthy again, and the system goes on.
    eventually("the copies consumer is healthy", || async {
        let reply = common::try_call(http.get(format!("{order}/status")))
            .await
            .map_err(|error| error.to_string())?;
        let text = reply.body.to_string();
        if !text.contains("were pruned") && !text.contains("deleted by") {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;
    let id = place(&http, &order, CUSTOMERS[0], &[(PRODUCTS[1], 1)]).await;
    settles_as(&http, &order, &id, "CONFIRMED").await;
    system.stop_all().await;
}

/// The Order Service re-publishes a snapshot of every order: the
/// Inventory Service, which answered them all, reserves nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_snapshots_reserve_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut system = tandem_cli::system::System::new(dir.path(), 0)
        .unwrap()
        .with_executable(env!("CARGO_BIN_EXE_tandem"));
    for service in Service::ALL {
        system.set_env(
            service,
            "TANDEM_ADMIN_TOKEN",
            Some(&format!("ops:{SECRET}")),
        );
    }
    system.start_all().await.expect("start the services");
    common::seed(&system).await;
    let http = system.http().clone();
    let (inventory, order) = (
        url(&system, Service::Inventory),
        url(&system, Service::Order),
    );
    for customer in CUSTOMERS {
        let id = place(&http, &order, customer, &[(PRODUCTS[0], 1)]).await;
        settles_as(&http, &order, &id, "CONFIRMED").await;
    }
    let before = common::product(&http, &inventory, PRODUCTS[0]).await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["republish", "--url", &order, "--mode", "snapshots"])
        .args(["--consumers-at", &inventory])
        .env("TANDEM_ADMIN_TOKEN", SECRET)
        .output()
        .expect("run tandem");
    assert!(output.status.success(), "{output:?}");
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("re-published 3 record(s)"), "{said}");
    // Once the reservations consumer has read them, the stock is as it was.
    eventually("the snapshots are consumed", || async {
        let reply = common::try_call(http.get(format!("{inventory}/status")))
            .await
            .map_err(|error| error.to_string())?;
        let lag = reply.body["consumers"]
            .as_array()
            .and_then(|all| {
                all.iter()
                    .find(|c| c["consumer"] == "inventory-reservations")
            })
            .map(|c| c["lagEvents"].clone());
        if lag == Some(serde_json::json!(0)) {
            Ok(())
        } else {
            Err(format!("{lag:?}"))
        }
    })
    .await;
    let after = common::product(&http, &inventory, PRODUCTS[0]).await;
    assert_eq!(
        (&before["available"], &before["reserved"]),
        (&after["available"], &after["reserved"]),
        "stock moved: {before} -> {after}"
    );
    system.stop_all().await;
}
