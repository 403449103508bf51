//! Helpers shared by the inventory's integration tests: a real SQLite store
//! in a temp dir, requests through the router, a snapshot of everything the
//! service owns, and a reader of the `inventory` topic.
#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use inventory_service::app::Products;
use inventory_service::{http, storage};
use serde_json::{json, Value};
use tandem::bus::{Bus, Delivery, Subscription};
use tandem::sqlite::{SqliteOptions, SqliteStore, Synchronous};
use tandem::store::{Store, StoreError};
use tandem::Envelope;
use tandem_contracts::topics;
use tower::ServiceExt;

/// How long any condition may take before a test gives up.
pub const WAIT: Duration = Duration::from_secs(20);

/// Opens the inventory's database at `path`, tables installed.
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
    store
        .write(storage::install)
        .await
        .expect("install inventory tables");
    store
}

/// A response: status, content type and the body as JSON (`Null` if empty
/// or not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Value,
}

impl Reply {
    /// Asserts a problem document with `status` naming `field`.
    #[track_caller]
    pub fn assert_problem(&self, status: u16, field: Option<&str>) {
        assert_eq!(self.status.as_u16(), status, "{self:?}");
        assert_eq!(self.content_type, "application/problem+json", "{self:?}");
        assert_eq!(self.body["status"], json!(status), "{self:?}");
        assert!(self.body["type"].as_str().is_some(), "{self:?}");
        assert!(self.body["detail"].as_str().is_some(), "{self:?}");
        assert_eq!(self.body["field"].as_str(), field, "{self:?}");
    }
}

impl Reply {
    /// Asserts a problem document with `status` whose field path starts
    /// with `field`.
    #[track_caller]
    pub fn assert_problem_about(&self, status: u16, field: &str) {
        let named = self.body["field"].as_str().unwrap_or_default().to_owned();
        assert_eq!(named.split('.').next(), Some(field), "{self:?}");
        self.assert_problem(status, Some(&named));
    }
}

/// The service's router over `store`, called in process.
#[derive(Clone)]
pub struct Api {
    router: Router,
}

impl Api {
    pub fn new(store: SqliteStore) -> Self {
        Self {
            router: http::router(Products::new(store)),
        }
    }

    pub async fn send(
        &self,
        method: Method,
        uri: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Reply {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        let response = self
            .router
            .clone()
            .oneshot(request.body(Body::from(body)).expect("request"))
            .await
            .expect("the router is infallible");
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        Reply {
            status,
            content_type,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    pub async fn get(&self, uri: &str) -> Reply {
        self.send(Method::GET, uri, None, Vec::new()).await
    }

    pub async fn post(&self, uri: &str, body: Value) -> Reply {
        self.post_raw(uri, serde_json::to_vec(&body).unwrap()).await
    }

    pub async fn post_raw(&self, uri: &str, body: Vec<u8>) -> Reply {
        self.send(Method::POST, uri, Some("application/json"), body)
            .await
    }

    /// Creates a product and returns its view.
    pub async fn create(&self, id: &str, stock: i64) -> Value {
        let reply = self
            .post(
                "/products",
                json!({"productId": id, "sku": format!("SKU-{id}"), "name": format!("Product {id}"),
                       "priceCents": 250, "stock": stock}),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
        reply.body
    }

    /// (available, reserved) of product `id`, read through `GET`.
    pub async fn stock(&self, id: &str) -> (i64, i64) {
        let reply = self.get(&format!("/products/{id}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        (
            reply.body["available"].as_i64().unwrap(),
            reply.body["reserved"].as_i64().unwrap(),
        )
    }
}

/// Everything the service owns, to compare before and after a request that
/// must change nothing: every row of its tables and of its outbox.
pub async fn snapshot(store: &SqliteStore) -> Vec<String> {
    store
        .read(|tx| -> Result<Vec<String>, StoreError> {
            let mut rows = Vec::new();
            for (table, order) in [
                ("products", "product_id"),
                ("stock_adjustments", "product_id, version"),
                ("reservations", "order_id"),
                ("reservation_lines", "order_id, product_id"),
                ("tandem_outbox", "position"),
            ] {
                for row in tx.query(&format!("SELECT * FROM {table} ORDER BY {order}"), &[])? {
                    rows.push(format!("{table}: {:?}", row.values));
                }
            }
            Ok(rows)
        })
        .await
        .expect("snapshot")
}

/// Asserts the stock rules hold over the whole inventory.
pub async fn assert_stock_rules(store: &SqliteStore) {
    let violations = inventory_service::app::stock_violations(store)
        .await
        .expect("audit");
    assert!(violations.is_empty(), "stock rules broken: {violations:#?}");
}

/// Reads topic `inventory` from the start as its own group, decoding every
/// record.
pub struct Feed {
    subscription: Box<dyn Subscription>,
    /// Next offset to read per partition.
    read_to: BTreeMap<u32, u64>,
    pub events: Vec<Envelope>,
}

impl Feed {
    pub async fn open(bus: &Arc<dyn Bus>) -> Self {
        let subscription = bus
            .subscribe("test-inventory-feed", &[topics::INVENTORY.to_owned()])
            .await
            .expect("subscribe");
        Self {
            subscription,
            read_to: BTreeMap::new(),
            events: Vec::new(),
        }
    }

    /// Takes what the bus hands out within `wait`.
    async fn pull(&mut self, wait: Duration) {
        match self.subscription.next(1000, wait).await.expect("feed") {
            Some(Delivery::Records(records)) => {
                for record in records {
                    self.read_to.insert(record.partition, record.offset + 1);
                    self.events
                        .push(Envelope::decode(&record.payload).expect("a valid envelope"));
                }
            }
            Some(Delivery::Assigned(_)) | Some(Delivery::Revoked(_)) | None => {}
        }
    }

    /// Reads until `condition` holds over the events read so far.
    pub async fn wait_until(&mut self, what: &str, condition: impl Fn(&[Envelope]) -> bool) {
        let give_up = tokio::time::Instant::now() + WAIT;
        while !condition(&self.events) {
            assert!(
                tokio::time::Instant::now() < give_up,
                "timed out after {WAIT:?} waiting for: {what}; read {:#?}",
                self.summary()
            );
            self.pull(Duration::from_millis(50)).await;
        }
    }

    /// Reads everything the topic holds now.
    pub async fn catch_up(&mut self, bus: &Arc<dyn Bus>) {
        let ends = bus.end_offsets(topics::INVENTORY).await.expect("offsets");
        let give_up = tokio::time::Instant::now() + WAIT;
        while ends
            .iter()
            .any(|(partition, end)| self.read_to.get(partition).copied().unwrap_or(0) < *end)
        {
            assert!(
                tokio::time::Instant::now() < give_up,
                "feed did not reach {ends:?}"
            );
            self.pull(Duration::from_millis(50)).await;
        }
    }

    /// The events of `event_type` about `subject`.
    pub fn of(&self, event_type: &str, subject: &str) -> Vec<&Envelope> {
        self.events
            .iter()
            .filter(|event| event.event_type == event_type && event.subject == subject)
            .collect()
    }

    /// Event types and subjects read so far, for failure messages.
    pub fn summary(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|event| format!("{} {} #{}", event.event_type, event.subject, event.sequence))
            .collect()
    }
}

/// Whether `events` holds an event of `event_type` about `subject`.
pub fn has(events: &[Envelope], event_type: &str, subject: &str) -> bool {
    events
        .iter()
        .any(|event| event.event_type == event_type && event.subject == subject)
}
