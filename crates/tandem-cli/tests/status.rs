//! Monitoring the commerce system as an operator would, with real service
//! processes: `/metrics` of all three services read by a Prometheus text
//! parser during an order flow, and `tandem status --data-dir` (the files
//! read directly) while the Inventory Service is down, after it is back,
//! and with a poison event parked: its table, its JSON and its exit code.

mod common;

use std::path::Path;

use common::{place, scrape, start_seeded, url};
use serde_json::Value;
use tandem::bus::OutgoingRecord;
use tandem_cli::serve::Service;
use tandem_testkit::exposition::{sum, Series};

/// How long the Inventory Service stays down.
const PAUSE: f64 = 2.0;

/// `tandem status --data-dir DIR --json`: the exit code and the reports.
fn status(dir: &Path) -> (i32, Vec<Value>) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["status", "--json", "--data-dir"])
        .arg(dir)
        .output()
        .expect("run tandem status");
    let code = output.status.code().expect("an exit code");
    assert!(
        code == 0 || code == 1,
        "tandem status failed ({code}): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reports: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "tandem status --json printed no JSON ({error}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    (code, reports)
}

/// The consumers of `service` in `reports`.
fn consumers_of<'a>(reports: &'a [Value], service: &str) -> Vec<&'a Value> {
    reports
        .iter()
        .find(|report| report["service"] == service)
        .unwrap_or_else(|| panic!("no {service} in {reports:?}"))["consumers"]
        .as_array()
        .expect("consumers")
        .iter()
        .collect()
}

/// Polls `tandem status` until `holds` accepts what it says.
async fn status_until(
    dir: &Path,
    what: &str,
    holds: impl Fn(i32, &[Value]) -> bool,
) -> (i32, Vec<Value>) {
    common::eventually(what, || {
        let (code, reports) = status(dir);
        let held = holds(code, &reports);
        async move {
            if held {
                Ok((code, reports))
            } else {
                Err(format!("exit {code}: {reports:?}"))
            }
        }
    })
    .await
}

fn kind_of(series: &[Series], family: &str) -> Option<&'static str> {
    series
        .iter()
        .find(|one| one.family == family)
        .map(|one| one.kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_follow_a_service_that_goes_down_comes_back_and_parks_a_poison_event() {
    let dir = tempfile::tempdir().unwrap();
    let mut system = start_seeded(dir.path()).await;
    let http = system.http().clone();
    let order = url(&system, Service::Order);
    let id = place(&http, &order, "1234", &[("widget", 1)]).await;
    common::settled(&http, &order, &id).await;

    // Every service serves its metrics during the flow; each runs its
    // relay, and those that consume report their lag.
    for service in Service::ALL {
        let metrics = scrape(&http, &url(&system, service)).await;
        assert_eq!(
            kind_of(&metrics, "tandem_outbox_pending_events"),
            Some("gauge"),
            "{service:?}"
        );
        assert_eq!(
            kind_of(&metrics, "http_server_request_duration_seconds"),
            Some("histogram"),
            "{service:?}"
        );
        assert_eq!(kind_of(&metrics, "tandem_build_info"), Some("gauge"));
        if service != Service::Customer {
            assert_eq!(
                kind_of(&metrics, "tandem_consumer_lag_seconds"),
                Some("gauge"),
                "{service:?}"
            );
            assert_eq!(
                kind_of(&metrics, "tandem_consumer_end_to_end_seconds"),
                Some("histogram"),
                "{service:?}"
            );
        }
    }
    let (code, _) = status_until(dir.path(), "every service ok", |code, reports| {
        code == 0 && reports.iter().all(|report| report["health"] == "ok")
    })
    .await;
    assert_eq!(code, 0);

    // Down: its consumer is stopped, and its lag in seconds grows while
    // orders wait for it.
    system.kill(Service::Inventory).await.unwrap();
    place(&http, &order, "2345", &[("gadget", 1)]).await;
    let (code, reports) = status_until(
        dir.path(),
        "the Inventory Service's lag grows",
        |_, reports| {
            consumers_of(reports, "inventory")
                .iter()
                .any(|consumer| consumer["lagSeconds"].as_f64().unwrap_or(0.0) >= PAUSE)
        },
    )
    .await;
    assert_eq!(code, 1, "a stopped service is not ok");
    let inventory = reports
        .iter()
        .find(|report| report["service"] == "inventory")
        .unwrap();
    assert_eq!(inventory["health"], "stopped", "{inventory}");
    for consumer in consumers_of(&reports, "inventory") {
        assert_eq!(consumer["health"], "stopped", "{consumer}");
    }
    let behind: u64 = consumers_of(&reports, "inventory")
        .iter()
        .map(|consumer| consumer["lagEvents"].as_u64().unwrap())
        .sum();
    assert!(
        behind >= 1,
        "the order placed while it was down: {reports:?}"
    );

    // Back: it catches up, and both the files and its /metrics say so.
    system.start(Service::Inventory).await.unwrap();
    status_until(dir.path(), "everything ok again", |code, reports| {
        code == 0
            && consumers_of(reports, "inventory")
                .iter()
                .all(|consumer| consumer["health"] == "ok" && consumer["lagSeconds"] == 0.0)
    })
    .await;
    let after = scrape(&http, &url(&system, Service::Inventory)).await;
    for one in after
        .iter()
        .filter(|one| one.family == "tandem_consumer_lag_seconds")
    {
        assert_eq!(one.value, Some(0.0), "{one:?}");
    }

    // A poison event (bytes that are no event) on the order topic: the
    // Inventory Service parks it, and both the metric and the exit code
    // tell.
    let bus = tandem_engines::open_bus(&system.bus_url())
        .await
        .expect("open the bus");
    bus.publish(&[OutgoingRecord {
        topic: "order".into(),
        key: "poison".into(),
        payload: b"not an event".to_vec(),
    }])
    .await
    .expect("publish the poison");
    let (code, _) = status_until(dir.path(), "the poison parked", |_, reports| {
        consumers_of(reports, "inventory")
            .iter()
            .any(|consumer| consumer["deadLetters"] == 1 && consumer["health"] == "error")
    })
    .await;
    assert_eq!(code, 1, "a parked event is not ok");
    let inventory = url(&system, Service::Inventory);
    common::eventually("tandem_dead_letters counts the poison", || {
        let http = http.clone();
        let inventory = inventory.clone();
        async move {
            let metrics = scrape(&http, &inventory).await;
            let parked =
                sum(&metrics, "tandem_dead_letters", &[("error_type", "decode")]) == Some(1.0);
            if parked {
                Ok(())
            } else {
                Err("no tandem_dead_letters{error_type=\"decode\"} 1".to_owned())
            }
        }
    })
    .await;

    // The table a person reads names the service and the trouble.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["status", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("run tandem status");
    assert_eq!(output.status.code(), Some(1));
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.starts_with("SERVICE"), "{table}");
    assert!(
        table
            .lines()
            .any(|line| line.starts_with("inventory") && line.contains("error")),
        "{table}"
    );
    system.stop_all().await;
}
