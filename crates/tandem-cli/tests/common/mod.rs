//! What the end-to-end tests share: starting the system, HTTP calls with
//! problem checks, waiting with a deadline, an order load, and the checks
//! that the whole system has converged. Every wait is a poll with a
//! deadline that names what did not happen.
#![allow(dead_code)]

pub mod engines;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Client, RequestBuilder};
use serde_json::{json, Value};
use tandem_cli::serve::Service;
use tandem_cli::system::System;
use tokio::time::Instant;

/// Longest wait for anything promised to happen eventually.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// Time between two polls.
pub const STEP: Duration = Duration::from_millis(20);

pub const CUSTOMERS: [&str; 3] = ["1234", "2345", "3456"];
pub const PRODUCTS: [&str; 3] = ["widget", "gadget", "gizmo"];

// ---------------------------------------------------------------- harness

/// Starts the three services on free ports with their data in `dir`.
pub async fn start(dir: &Path) -> System {
    let mut system = System::new(dir, 0)
        .expect("prepare the system")
        .with_executable(env!("CARGO_BIN_EXE_tandem"));
    system
        .start_all()
        .await
        .expect("start the customer, inventory and order services");
    system
}

/// Starts the services, seeds the demo data and waits until the Order
/// Service knows every seeded customer and product.
pub async fn start_seeded(dir: &Path) -> System {
    let system = start(dir).await;
    seed(&system).await;
    system
}

/// Seeds the demo data through the services' APIs and waits until the
/// Order Service knows every seeded customer and product.
pub async fn seed(system: &System) {
    tandem_cli::up::seed(system)
        .await
        .expect("seed customers and products");
    let http = system.http().clone();
    let order = url(system, Service::Order);
    for customer in CUSTOMERS {
        local_customer_where(&http, &order, customer, "exists", |_| true).await;
    }
    for product in PRODUCTS {
        local_product_where(&http, &order, product, "exists", |_| true).await;
    }
}

pub fn url(system: &System, service: Service) -> String {
    system.url(service).expect("the service was started")
}

/// Polls `probe` every [`STEP`] until it returns `Ok`, for at most
/// [`DEADLINE`]; panics naming `what` and the last observation otherwise.
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(last) => {
                if Instant::now() >= deadline {
                    panic!("{what}: did not happen within {DEADLINE:?}; last observed: {last}");
                }
            }
        }
        tokio::time::sleep(STEP).await;
    }
}

/// A response: status, headers and the body as JSON (a JSON string of the
/// text if it is not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn content_type(&self) -> &str {
        self.headers
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
    }

    pub fn str(&self, key: &str) -> &str {
        self.body[key].as_str().unwrap_or("")
    }
}

pub async fn try_call(request: RequestBuilder) -> Result<Reply, reqwest::Error> {
    let response = request.send().await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(Reply {
        status,
        headers,
        body,
    })
}

pub async fn call(request: RequestBuilder) -> Reply {
    let described = format!("{request:?}");
    match try_call(request).await {
        Ok(reply) => reply,
        Err(error) => panic!("request failed: {described}: {error}"),
    }
}

/// Sends `request` and asserts its status; returns the body.
pub async fn expect(request: RequestBuilder, status: u16, what: &str) -> Value {
    let reply = call(request).await;
    assert_eq!(
        reply.status, status,
        "{what}: expected HTTP {status}, got {} {}",
        reply.status, reply.body
    );
    reply.body
}

/// Asserts `reply` is an `application/problem+json` with this status, a
/// type ending in `kind` and (if given) this field.
pub fn assert_problem(reply: &Reply, status: u16, kind: &str, field: Option<&str>, what: &str) {
    assert_eq!(
        reply.status, status,
        "{what}: expected HTTP {status}, got {} {}",
        reply.status, reply.body
    );
    assert!(
        reply.content_type().starts_with("application/problem+json"),
        "{what}: content-type is {:?}, not application/problem+json",
        reply.content_type()
    );
    assert!(
        reply.str("type").ends_with(&format!("/{kind}")),
        "{what}: problem type {:?} does not end with {kind}: {}",
        reply.str("type"),
        reply.body
    );
    assert_eq!(
        reply.body["status"].as_u64(),
        Some(u64::from(status)),
        "{what}: the problem's status member: {}",
        reply.body
    );
    if let Some(field) = field {
        assert_eq!(
            reply.body["field"].as_str(),
            Some(field),
            "{what}: the field at fault: {}",
            reply.body
        );
    }
}

pub fn order_body(customer: &str, lines: &[(&str, i64)]) -> Value {
    json!({
        "customerId": customer,
        "lines": lines
            .iter()
            .map(|(product, quantity)| json!({"productId": product, "quantity": quantity}))
            .collect::<Vec<_>>(),
    })
}

/// Places an order that must be accepted (202, PENDING); returns its id.
pub async fn place(http: &Client, order: &str, customer: &str, lines: &[(&str, i64)]) -> String {
    let body = expect(
        http.post(format!("{order}/orders"))
            .json(&order_body(customer, lines)),
        202,
        &format!("placing an order of {lines:?} for customer {customer}"),
    )
    .await;
    assert_eq!(body["status"], "PENDING", "a new order is PENDING: {body}");
    assert_eq!(body["customerId"], customer, "the order's customer: {body}");
    body["orderId"]
        .as_str()
        .unwrap_or_else(|| panic!("no orderId in {body}"))
        .to_owned()
}

pub async fn get_order(http: &Client, order: &str, id: &str) -> Value {
    expect(
        http.get(format!("{order}/orders/{id}")),
        200,
        &format!("GET order {id}"),
    )
    .await
}

/// Waits until order `id` has left PENDING; returns it.
pub async fn settled(http: &Client, order: &str, id: &str) -> Value {
    eventually(&format!("order {id} leaving PENDING"), || async move {
        let body = get_order(http, order, id).await;
        if body["status"] == "PENDING" {
            Err(body.to_string())
        } else {
            Ok(body)
        }
    })
    .await
}

/// Waits until order `id` settles and asserts it settled as `status`.
pub async fn settles_as(http: &Client, order: &str, id: &str, status: &str) -> Value {
    let body = settled(http, order, id).await;
    assert_eq!(body["status"], status, "order {id} settled as: {body}");
    body
}

/// A customer's orders (at most 500, oldest first).
pub async fn orders_of(http: &Client, order: &str, customer: &str) -> Vec<Value> {
    let body = expect(
        http.get(format!("{order}/orders?customerId={customer}&limit=500")),
        200,
        &format!("listing the orders of {customer}"),
    )
    .await;
    body["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {body}"))
        .clone()
}

pub async fn order_ids_of(http: &Client, order: &str, customer: &str) -> Vec<String> {
    orders_of(http, order, customer)
        .await
        .iter()
        .map(|order| order["orderId"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Waits until the Order Service's copy of `customer` satisfies `holds`.
pub async fn local_customer_where(
    http: &Client,
    order: &str,
    customer: &str,
    what: &str,
    holds: impl Fn(&Value) -> bool,
) -> Value {
    let holds = &holds;
    eventually(
        &format!("the Order Service's copy of customer {customer}: {what}"),
        || async move {
            let reply = try_call(http.get(format!("{order}/customers/{customer}")))
                .await
                .map_err(|error| error.to_string())?;
            if reply.status == 200 && holds(&reply.body) {
                Ok(reply.body)
            } else {
                Err(format!("{} {}", reply.status, reply.body))
            }
        },
    )
    .await
}

/// Waits until the Order Service's copy of `product` satisfies `holds`.
pub async fn local_product_where(
    http: &Client,
    order: &str,
    product: &str,
    what: &str,
    holds: impl Fn(&Value) -> bool,
) -> Value {
    let holds = &holds;
    eventually(
        &format!("the Order Service's copy of product {product}: {what}"),
        || async move {
            let reply = try_call(http.get(format!("{order}/products/{product}")))
                .await
                .map_err(|error| error.to_string())?;
            if reply.status == 200 && holds(&reply.body) {
                Ok(reply.body)
            } else {
                Err(format!("{} {}", reply.status, reply.body))
            }
        },
    )
    .await
}

pub async fn product(http: &Client, inventory: &str, product: &str) -> Value {
    expect(
        http.get(format!("{inventory}/products/{product}")),
        200,
        &format!("GET product {product} on the inventory service"),
    )
    .await
}

pub async fn customer(http: &Client, customers: &str, customer: &str) -> Value {
    expect(
        http.get(format!("{customers}/customers/{customer}")),
        200,
        &format!("GET customer {customer} on the customer service"),
    )
    .await
}

/// Waits until the inventory shows `product` with this stock.
pub async fn stock_is(http: &Client, inventory: &str, id: &str, available: i64, reserved: i64) {
    eventually(
        &format!("inventory showing {id} with available {available}, reserved {reserved}"),
        || async move {
            let body = product(http, inventory, id).await;
            if body["available"] == available && body["reserved"] == reserved {
                Ok(())
            } else {
                Err(body.to_string())
            }
        },
    )
    .await
}

pub async fn adjust_stock(http: &Client, inventory: &str, id: &str, delta: i64) -> Value {
    expect(
        http.post(format!("{inventory}/products/{id}/stock-adjustments"))
            .json(&json!({"delta": delta, "reason": "e2e top-up"})),
        200,
        &format!("adjusting the stock of {id} by {delta}"),
    )
    .await
}

/// Raises a customer's credit limit and waits until the Order Service has it.
pub async fn set_credit_limit(
    http: &Client,
    customers: &str,
    order: &str,
    customer: &str,
    limit_cents: i64,
) {
    let updated = expect(
        http.patch(format!("{customers}/customers/{customer}"))
            .json(&json!({"creditLimitCents": limit_cents})),
        200,
        &format!("raising the credit limit of {customer}"),
    )
    .await;
    assert_eq!(updated["creditLimitCents"], limit_cents, "{updated}");
    local_customer_where(
        http,
        order,
        customer,
        &format!("credit limit {limit_cents}"),
        |copy| copy["creditLimitCents"] == limit_cents,
    )
    .await;
}

/// Asserts every request sent to `base` fails to connect (the service is down).
pub async fn is_down(http: &Client, base: &str, name: &str) {
    assert!(
        http.get(format!("{base}/health")).send().await.is_err(),
        "the {name} service still answers after kill -9"
    );
}

// ---------------------------------------------------------- crash under load

/// A small deterministic generator (PCG-style LCG), so a failing run can
/// be replayed with `TANDEM_E2E_SEED`.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    /// A number in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.next() as usize % items.len()]
    }
}

#[derive(Debug, Default)]
pub struct LoadReport {
    /// Orders the load got 202 for.
    pub accepted: Vec<String>,
    /// Requests that failed at the transport or got a 5xx (a service down).
    pub failed: usize,
    pub cancels: usize,
    /// Answers no outage explains.
    pub unexpected: Vec<String>,
}

/// Places orders until `stop`, cancelling one now and then; tolerates
/// connection errors and 5xx while services are down.
pub async fn order_load(
    http: Client,
    order: String,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> LoadReport {
    const MAX_ORDERS: usize = 400;
    let mut random = Lcg(seed);
    let mut report = LoadReport::default();
    while !stop.load(Ordering::Relaxed) && report.accepted.len() < MAX_ORDERS {
        if !report.accepted.is_empty() && random.between(0, 6) == 0 {
            let id = random.pick(&report.accepted).clone();
            match try_call(http.post(format!("{order}/orders/{id}/cancel"))).await {
                Ok(reply) if reply.status == 200 => report.cancels += 1,
                Ok(reply)
                    if reply.status == 409 && reply.str("type").ends_with("/not-cancellable") => {}
                Ok(reply) if reply.status == 409 || reply.status >= 500 => report.failed += 1,
                Ok(reply) => report
                    .unexpected
                    .push(format!("cancel {id}: {} {}", reply.status, reply.body)),
                Err(_) => report.failed += 1,
            }
        } else {
            let customer = *random.pick(&CUSTOMERS);
            let first = *random.pick(&PRODUCTS);
            let mut lines = vec![(first, random.between(1, 3) as i64)];
            if random.between(0, 3) == 0 {
                let second = *random.pick(&PRODUCTS);
                if second != first {
                    lines.push((second, random.between(1, 3) as i64));
                }
            }
            let body = order_body(customer, &lines);
            match try_call(http.post(format!("{order}/orders")).json(&body)).await {
                Ok(reply) if reply.status == 202 => {
                    report.accepted.push(reply.str("orderId").to_owned())
                }
                Ok(reply) if reply.status >= 500 => report.failed += 1,
                Ok(reply) => report
                    .unexpected
                    .push(format!("order {body}: {} {}", reply.status, reply.body)),
                Err(_) => report.failed += 1,
            }
        }
        // Pacing, so the orders per customer stay within one listing.
        tokio::time::sleep(Duration::from_millis(8)).await;
    }
    report
}

/// Everything observable through the public APIs, for the final checks.
#[derive(Debug)]
pub struct Snapshot {
    pub orders: Vec<Value>,
    pub customers: BTreeMap<&'static str, (Value, Value)>,
    pub products: BTreeMap<&'static str, (Value, Value)>,
}

pub async fn observe(http: &Client, customers: &str, inventory: &str, order: &str) -> Snapshot {
    let mut snapshot = Snapshot {
        orders: Vec::new(),
        customers: BTreeMap::new(),
        products: BTreeMap::new(),
    };
    for id in CUSTOMERS {
        let orders = orders_of(http, order, id).await;
        assert!(
            orders.len() < 500,
            "customer {id} has {} orders, more than one listing shows",
            orders.len()
        );
        snapshot.orders.extend(orders);
        let local = expect(
            http.get(format!("{order}/customers/{id}")),
            200,
            "local customer",
        )
        .await;
        snapshot
            .customers
            .insert(id, (customer(http, customers, id).await, local));
    }
    for id in PRODUCTS {
        let local = expect(
            http.get(format!("{order}/products/{id}")),
            200,
            "local product",
        )
        .await;
        snapshot
            .products
            .insert(id, (product(http, inventory, id).await, local));
    }
    snapshot
}

/// Units of `product` in orders with `status`.
pub fn units(orders: &[Value], product: &str, status: &str) -> i64 {
    orders
        .iter()
        .filter(|order| order["status"] == status)
        .flat_map(|order| order["lines"].as_array().cloned().unwrap_or_default())
        .filter(|line| line["productId"] == product)
        .map(|line| line["quantity"].as_i64().unwrap_or_default())
        .sum()
}

/// Every way the system is not (yet) consistent; empty when it is.
pub fn inconsistencies(snapshot: &Snapshot, stock: &BTreeMap<&str, i64>) -> Vec<String> {
    let mut found = Vec::new();
    let pending = snapshot
        .orders
        .iter()
        .filter(|order| order["status"] == "PENDING")
        .count();
    if pending > 0 {
        found.push(format!("{pending} orders still PENDING"));
    }
    for (id, (owner, local)) in &snapshot.customers {
        for (owner_key, local_key) in [
            ("customerId", "customerId"),
            ("name", "name"),
            ("email", "email"),
            ("address", "address"),
            ("creditLimitCents", "creditLimitCents"),
            ("version", "sequence"),
        ] {
            if owner[owner_key] != local[local_key] {
                found.push(format!(
                    "customer {id}: owner {owner_key} {} != local {local_key} {}",
                    owner[owner_key], local[local_key]
                ));
            }
        }
    }
    for (id, (owner, local)) in &snapshot.products {
        for (owner_key, local_key) in [
            ("productId", "productId"),
            ("sku", "sku"),
            ("name", "name"),
            ("priceCents", "priceCents"),
            ("available", "available"),
            ("reserved", "reserved"),
            ("version", "sequence"),
        ] {
            if owner[owner_key] != local[local_key] {
                found.push(format!(
                    "product {id}: owner {owner_key} {} != local {local_key} {}",
                    owner[owner_key], local[local_key]
                ));
            }
        }
        let available = owner["available"].as_i64().unwrap_or(-1);
        let reserved = owner["reserved"].as_i64().unwrap_or(-1);
        if available + reserved != stock[id] {
            found.push(format!(
                "product {id}: available {available} + reserved {reserved} != initial + adjustments {}",
                stock[id]
            ));
        }
        let confirmed = units(&snapshot.orders, id, "CONFIRMED");
        if reserved != confirmed {
            found.push(format!(
                "product {id}: reserved {reserved} != {confirmed} units in CONFIRMED orders"
            ));
        }
    }
    found
}

/// The series of `/metrics` at `base`, read by an outside parser
/// (tandem_testkit::exposition).
pub async fn scrape(http: &Client, base: &str) -> Vec<tandem_testkit::exposition::Series> {
    let body = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("a body");
    tandem_testkit::exposition::parse_prometheus(&body)
}
