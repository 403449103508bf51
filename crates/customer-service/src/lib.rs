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

use tandem::relay::{Relay, RelayConfig};
use tandem::store::Store;
use tandem::Bus;
use tandem_contracts::topics;
use tokio_util::sync::CancellationToken;

/// Runs the service on `listener` until `shutdown` fires.
pub async fn run<S: Store>(
    listener: tokio::net::TcpListener,
    store: S,
    bus: Arc<dyn Bus>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    store
        .write(storage::install)
        .await
        .map_err(|error| format!("cannot set up the customer database: {error}"))?;
    let relay = Relay::new(
        store.clone(),
        bus,
        RelayConfig {
            name: topics::CUSTOMER.into(),
            ..RelayConfig::default()
        },
    );
    let relay_shutdown = shutdown.clone();
    tandem_service::run_parts(
        listener,
        http::router(app::Customers::new(store)),
        vec![(
            "relay",
            tandem_service::task(async move { relay.run(relay_shutdown).await }),
        )],
        shutdown,
    )
    .await
}
