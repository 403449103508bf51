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

use tandem::consumer::{Consumer, ConsumerConfig};
use tandem::relay::{Relay, RelayConfig};
use tandem::store::Store;
use tandem::Bus;
use tandem_contracts::topics;
use tokio_util::sync::CancellationToken;

/// The port the service listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 8082;

/// The relay of the service's outbox onto topic `inventory`.
pub fn relay<S: Store>(store: S, bus: Arc<dyn Bus>) -> Relay<S> {
    Relay::new(
        store,
        bus,
        RelayConfig {
            name: topics::INVENTORY.into(),
            ..RelayConfig::default()
        },
    )
}

/// The consumer of topic `order` that reserves and releases stock.
pub fn consumer<S: Store>(store: S, bus: Arc<dyn Bus>) -> Consumer<S> {
    Consumer::new(
        store,
        bus,
        Arc::new(reservations::Reservations),
        ConsumerConfig::new(reservations::CONSUMER, &[topics::ORDER]),
    )
}

/// Runs the service on `listener` until `shutdown` fires: the API, the
/// relay of its outbox and the consumer of order events.
pub async fn run<S: Store>(
    listener: tokio::net::TcpListener,
    store: S,
    bus: Arc<dyn Bus>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    store
        .write(storage::install)
        .await
        .map_err(|error| format!("cannot set up the inventory database: {error}"))?;
    let relay = relay(store.clone(), Arc::clone(&bus));
    let consumer = consumer(store.clone(), bus);
    let relay_shutdown = shutdown.clone();
    let consumer_shutdown = shutdown.clone();
    tandem_service::run_parts(
        listener,
        http::router(app::Products::new(store)),
        vec![
            (
                "relay",
                tandem_service::task(async move { relay.run(relay_shutdown).await }),
            ),
            (
                "reservations consumer",
                tandem_service::task(async move { consumer.run(consumer_shutdown).await }),
            ),
        ],
        shutdown,
    )
    .await
}
