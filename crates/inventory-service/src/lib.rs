//! The Inventory Service: owns products and their stock, and reserves stock
//! for orders, all lines or none.
//!
//! - [`domain`]: products, stock and reservation rules (pure, no I/O).
//! - [`app`]: the API's use cases; each write commits rows and events
//!   together.
//! - [`reservations`]: the consumer of topic `order` (`OrderPlaced`,
//!   `OrderCancelled`), applied in the consumer's own transaction.
//! - [`storage`]: the tables (portable SQL through `tandem::Tx`), and
//!   [`storage::stock_violations`], the audit of the stock rules.
//! - [`http`]: the JSON API.
//!
//! It publishes on topic `inventory`: product events with the product id as
//! subject, reservation events with the order id as subject. Both kinds of
//! id share that topic's aggregates, so product events are appended after
//! whatever the subject holds instead of at an expected sequence: a product
//! and an order with the same id then interleave their sequences (a
//! product's `version` skips) rather than block each other.

pub mod app;
pub mod domain;
pub mod http;
pub mod reservations;
pub mod storage;

use std::sync::Arc;

use tandem::consumer::ConsumerConfig;
use tandem::store::Store;
use tandem::Bus;
use tandem_contracts::topics;
use tandem_service::{Service, ServiceError};
use tokio_util::sync::CancellationToken;

/// The port the service listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 8082;

/// Runs the service on `listener` until `shutdown` fires: the API, the
/// relay of its outbox and the consumer of order events.
pub async fn run<S: Store>(
    listener: tokio::net::TcpListener,
    store: S,
    bus: Arc<dyn Bus>,
    shutdown: CancellationToken,
) -> Result<(), ServiceError> {
    service(store, bus).run(listener, shutdown).await
}

/// The inventory service's parts, to run as they are ([`run`]) or with more
/// settings first (the admin tokens `tandem serve` gives it).
pub fn service<S: Store>(store: S, bus: Arc<dyn Bus>) -> Service<S> {
    let orders = ConsumerConfig::new(reservations::CONSUMER, &[topics::ORDER]);
    Service::new("inventory", store, bus)
        .install(storage::install)
        .relay(topics::INVENTORY)
        .consumer("reservations consumer", orders, reservations::Reservations)
        .snapshots(storage::snapshots())
        .http(|store| http::router(app::Products::new(store)))
}
