//! Metric labels stay a bounded set whatever the traffic: after 10,000
//! orders through the real services, no label value is an order or
//! customer id, every label has a handful of values, and each service
//! exposes a bounded number of series, read by an outside parser
//! (tandem_testkit::exposition).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use common::{scrape, start_seeded, url, CUSTOMERS, PRODUCTS};
use tandem_cli::serve::Service;

const ORDERS: usize = 10_000;
/// Requests in flight at once.
const CONCURRENCY: usize = 16;
/// Most values any one label may take (consumers, topics, routes,
/// statuses, outcomes, reasons are all short lists).
const MOST_VALUES_PER_LABEL: usize = 16;
/// Most series one service may expose (a histogram's label set counts
/// once).
const MOST_SERIES: usize = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_stay_bounded_after_ten_thousand_orders() {
    let dir = tempfile::tempdir().unwrap();
    let system = start_seeded(dir.path()).await;
    let http = system.http().clone();
    let order = url(&system, Service::Order);
    // Room for every order on the customers' credit.
    let customers = url(&system, Service::Customer);
    for customer in CUSTOMERS {
        common::set_credit_limit(&http, &customers, &order, customer, 1_000_000_000).await;
    }

    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (http, order, next) = (http.clone(), order.clone(), Arc::clone(&next));
        workers.spawn(async move {
            let mut placed = Vec::new();
            loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if index >= ORDERS {
                    return placed;
                }
                let body = common::order_body(
                    CUSTOMERS[index % CUSTOMERS.len()],
                    &[(PRODUCTS[index % PRODUCTS.len()], 1)],
                );
                let reply = common::call(http.post(format!("{order}/orders")).json(&body)).await;
                assert_eq!(reply.status, 202, "order {index}: {}", reply.body);
                let id = reply.str("orderId").to_owned();
                // Now and then read one back, so that a route with an id
                // in its path is timed too.
                if index % 500 == 0 {
                    let read = common::call(http.get(format!("{order}/orders/{id}"))).await;
                    assert_eq!(read.status, 200, "{}", read.body);
                }
                placed.push(id);
            }
        });
    }
    let mut ids: BTreeSet<String> = BTreeSet::new();
    while let Some(placed) = workers.join_next().await {
        ids.extend(placed.expect("a worker"));
    }
    assert_eq!(ids.len(), ORDERS);
    ids.extend(CUSTOMERS.iter().map(|id| (*id).to_owned()));

    for service in Service::ALL {
        let scrape = scrape(&http, &url(&system, service)).await;
        let mut values: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for one in &scrape {
            for (name, value) in one.labels.iter() {
                assert!(
                    !ids.contains(value),
                    "{service:?}: {} has an id as label {name}={value}",
                    one.family
                );
                values
                    .entry(name.clone())
                    .or_default()
                    .insert(value.clone());
            }
        }
        for (name, seen) in &values {
            assert!(
                seen.len() <= MOST_VALUES_PER_LABEL,
                "{service:?}: label {name} has {} values: {seen:?}",
                seen.len()
            );
        }
        assert!(
            scrape.len() <= MOST_SERIES,
            "{service:?} exposes {} series",
            scrape.len()
        );
        if service == Service::Order {
            assert!(
                values["http_route"].contains("/orders/{id}"),
                "routes are templates: {:?}",
                values["http_route"]
            );
        }
    }
}
