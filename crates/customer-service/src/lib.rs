//! The Customer Service: owns customers and publishes their changes.
//!
//! - [`domain`]: customers and their rules (pure, no I/O).
//! - [`app`]: use cases; each write commits the row and its event together.
//! - [`storage`]: the customers table (portable SQL through `tandem::Tx`).
//! - [`http`]: the JSON API.
//!
//! It calls no other service and consumes no event: it is a pure publisher
//! on topic `customer`.

pub mod app;
pub mod domain;
pub mod http;
pub mod storage;

use std::sync::Arc;

use tandem::store::Store;
use tandem::Bus;
use tandem_contracts::topics;
use tandem_service::{Service, ServiceError};
use tokio_util::sync::CancellationToken;

/// Runs the service on `listener` until `shutdown` fires: the API and the
/// relay of its outbox.
pub async fn run<S: Store>(
    listener: tokio::net::TcpListener,
    store: S,
    bus: Arc<dyn Bus>,
    shutdown: CancellationToken,
) -> Result<(), ServiceError> {
    service(store, bus).run(listener, shutdown).await
}

/// The customer service's parts, to run as they are ([`run`]) or with more
/// settings first (the admin tokens `tandem serve` gives it).
pub fn service<S: Store>(store: S, bus: Arc<dyn Bus>) -> Service<S> {
    Service::new("customer", store, bus)
        .install(storage::install)
        .relay(topics::CUSTOMER)
        // Customers are few and long-lived: their whole history stays in
        // the outbox, from which it can be published again to a consumer
        // that lost the log. (Inventory and orders, many and short-lived,
        // keep a day.)
        .keep_event_history()
        .snapshots(storage::snapshots())
        .http(|store| http::router(app::Customers::new(store)))
}
