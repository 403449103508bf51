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
               (SELECT count(*) AS n FROM log_records GROUP BY topic, partition)",
        );
        let appended = count(
            &data.join("bus.db"),
            "SELECT COALESCE(SUM(next_offset), 0) FROM log_heads",
        );
        let kept = count(&data.join("bus.db"), "SELECT count(*) FROM log_records");
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
