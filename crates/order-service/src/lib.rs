//! The Order Service: takes orders against its own local copies of
//! customers and products, built from their services' events, so it keeps
//! taking orders while those services are down.
//!
//! - [`domain`]: order rules and statuses (pure, no I/O).
//! - [`app`]: use cases; placing and cancelling commit the order and its
//!   event together.
//! - [`handlers`]: the local copies and the settlement of pending orders.
//! - [`storage`]: tables (portable SQL through `tandem::Tx`).
//! - [`http`]: the JSON API.

pub mod app;
pub mod domain;
pub mod handlers;
pub mod http;
pub mod storage;

use std::sync::Arc;

use tandem::consumer::ConsumerConfig;
use tandem::store::Store;
use tandem::Bus;
use tandem_contracts::topics;
use tandem_service::{Service, ServiceError};
use tokio_util::sync::CancellationToken;

/// Runs the service on `listener` until `shutdown` fires: the API, the
/// relay of its outbox, and the consumers that keep the local copies and
/// settle pending orders.
pub async fn run<S: Store>(
    listener: tokio::net::TcpListener,
    store: S,
    bus: Arc<dyn Bus>,
    shutdown: CancellationToken,
) -> Result<(), ServiceError> {
    service(store, bus).run(listener, shutdown).await
}

/// The order service's parts, to run as they are ([`run`]) or with more
/// settings first (the admin tokens `tandem serve` gives it).
pub fn service<S: Store>(store: S, bus: Arc<dyn Bus>) -> Service<S> {
    let copies = ConsumerConfig::new(
        handlers::LOCAL_COPIES,
        &[topics::CUSTOMER, topics::INVENTORY],
    );
    let settlement = ConsumerConfig::new(handlers::SETTLEMENT, &[topics::INVENTORY]);
    Service::new("order", store, bus)
        .install(storage::install)
        .relay(topics::ORDER)
        .snapshots(storage::snapshots())
        .read_model("local copies", copies, handlers::Copies)
        .consumer("settlement", settlement, handlers::Settlement)
        .http(|store| http::router(app::Orders::new(store)))
}
