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

use tandem::consumer::{Consumer, ConsumerConfig};
use tandem::relay::{Relay, RelayConfig};
use tandem::store::Store;
use tandem::{Bus, Handler};
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
        .map_err(|error| format!("cannot set up the order database: {error}"))?;
    let relay = Relay::new(
        store.clone(),
        Arc::clone(&bus),
        RelayConfig {
            name: topics::ORDER.into(),
            ..RelayConfig::default()
        },
    );
    let copies = Consumer::new(
        store.clone(),
        Arc::clone(&bus),
        Arc::new(handlers::LocalCopies) as Arc<dyn Handler>,
        ConsumerConfig::new(
            handlers::LOCAL_COPIES,
            &[topics::CUSTOMER, topics::INVENTORY],
        ),
    );
    let settlement = Consumer::new(
        store.clone(),
        bus,
        Arc::new(handlers::Settlement) as Arc<dyn Handler>,
        ConsumerConfig::new(handlers::SETTLEMENT, &[topics::INVENTORY]),
    );
    let (relay_stop, copies_stop, settlement_stop) =
        (shutdown.clone(), shutdown.clone(), shutdown.clone());
    tandem_service::run_parts(
        listener,
        http::router(app::Orders::new(store)),
        vec![
            (
                "relay",
                tandem_service::task(async move { relay.run(relay_stop).await }),
            ),
            (
                "local copies",
                tandem_service::task(async move { copies.run(copies_stop).await }),
            ),
            (
                "settlement",
                tandem_service::task(async move { settlement.run(settlement_stop).await }),
            ),
        ],
        shutdown,
    )
    .await
}
