//! The reservations handler alone, in `tandem::testing`'s test bed: the
//! real consumer on a temporary SQLite file, fed order events in the order
//! a test chooses. A duplicate reserves nothing twice; an order's
//! cancellation that arrives before the order waits behind the gap, and
//! both then apply in sequence order, each publishing its events once.

use std::sync::Arc;
use std::time::Duration;

use inventory_service::reservations::{Reservations, CONSUMER};
use tandem::consumer::ConsumerConfig;
use tandem::store::{Store, StoreError};
use tandem::testing::{event, HandlerBed};
use tandem::EventPayload;
use tandem_contracts::inventory::{ProductStockChanged, StockReleased, StockReserved};
use tandem_contracts::order::{v1, OrderCancelled, OrderPlaced, PricedLine};
use tandem_contracts::topics;

fn placed(order_id: &str, quantity: i64) -> OrderPlaced {
    v1::OrderPlaced {
        order_id: order_id.into(),
        customer_id: "c-1".into(),
        lines: vec![PricedLine {
            product_id: "widget".into(),
            quantity,
            unit_price_cents: 250,
        }],
        total_cents: quantity * 250,
    }
    .into()
}

async fn bed() -> HandlerBed {
    let mut config = ConsumerConfig::new(CONSUMER, &[topics::ORDER]);
    // A gap is waited for as long as the test runs.
    config.gap_timeout = Duration::from_secs(3600);
    HandlerBed::new(Arc::new(Reservations), config, install_with_widget)
        .await
        .expect("the test bed")
}

/// The inventory's tables, with 10 widgets in stock.
fn install_with_widget(tx: &mut dyn tandem::Tx) -> Result<(), StoreError> {
    inventory_service::storage::install(tx)?;
    tx.execute(
        "INSERT INTO products (product_id, sku, name, price_cents, initial_stock,
           available, reserved, version, created_at, updated_at)
         VALUES ('widget', 'W-1', 'Widget', 250, 10, 10, 0, 1, 't', 't')",
        &[],
    )?;
    Ok(())
}

/// The widget's (available, reserved) in `store`.
async fn widget_stock(store: &impl Store) -> (i64, i64) {
    store
        .read(|tx| -> Result<(i64, i64), StoreError> {
            let row = tx
                .query_opt(
                    "SELECT available, reserved FROM products WHERE product_id = 'widget'",
                    &[],
                )?
                .expect("the widget");
            Ok((row.i64(0)?, row.i64(1)?))
        })
        .await
        .unwrap()
}

/// The widget's (available, reserved) in the bed.
async fn stock(bed: &HandlerBed) -> (i64, i64) {
    widget_stock(bed.store()).await
}

/// What the handler published, as (type, subject).
async fn published(bed: &HandlerBed) -> Vec<(String, String)> {
    bed.published()
        .await
        .unwrap()
        .into_iter()
        .map(|event| (event.event_type, event.subject))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_duplicate_order_reserves_once_and_publishes_once() {
    let bed = bed().await;
    let order = event(topics::ORDER, "o-1", 1, &placed("o-1", 3)).unwrap();
    bed.deliver(&[order.clone(), order]).await.unwrap();
    assert_eq!(stock(&bed).await, (7, 3));
    assert_eq!(
        published(&bed).await,
        [
            (ProductStockChanged::TYPE.to_owned(), "widget".to_owned()),
            (StockReserved::TYPE.to_owned(), "o-1".to_owned()),
        ]
    );
    assert!(bed.parked().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancellation_before_its_order_waits_then_both_apply_in_order() {
    let bed = bed().await;
    let cancelled = OrderCancelled {
        order_id: "o-2".into(),
    };
    bed.deliver(&[event(topics::ORDER, "o-2", 2, &cancelled).unwrap()])
        .await
        .unwrap();
    assert_eq!(bed.held().await.unwrap(), 1, "sequence 2 waits for 1");
    assert_eq!(stock(&bed).await, (10, 0));
    assert!(published(&bed).await.is_empty());

    bed.deliver(&[event(topics::ORDER, "o-2", 1, &placed("o-2", 4)).unwrap()])
        .await
        .unwrap();
    assert_eq!(bed.held().await.unwrap(), 0);
    assert_eq!(stock(&bed).await, (10, 0), "reserved, then released");
    let types: Vec<String> = published(&bed)
        .await
        .into_iter()
        .filter(|(_, subject)| subject == "o-2")
        .map(|(event_type, _)| event_type)
        .collect();
    assert_eq!(types, [StockReserved::TYPE, StockReleased::TYPE]);
}

/// A whole system in this process: a stand-in order outbox with its relay,
/// and the reservations consumer; `Quiescence` waits, with a deadline,
/// until the order is published and consumed.
#[tokio::test(flavor = "multi_thread")]
async fn a_system_waited_for_until_quiescent() {
    use tandem::embedded::{EmbeddedLog, EmbeddedOptions};
    use tandem::sqlite::{SqliteOptions, SqliteStore};
    use tandem::testing::Quiescence;
    use tandem::{Bus, Consumer, NewEvent, Relay, RelayConfig};
    use tokio_util::sync::CancellationToken;

    let dir = tempfile::tempdir().unwrap();
    let orders = SqliteStore::open(dir.path().join("orders.db"), SqliteOptions::default())
        .await
        .unwrap();
    let inventory = SqliteStore::open(dir.path().join("inventory.db"), SqliteOptions::default())
        .await
        .unwrap();
    inventory.write(install_with_widget).await.unwrap();
    let bus: Arc<dyn Bus> = Arc::new(
        EmbeddedLog::open(dir.path().join("bus.db"), EmbeddedOptions::default())
            .await
            .unwrap(),
    );
    let stop = CancellationToken::new();
    let relay = Relay::new(orders.clone(), Arc::clone(&bus), RelayConfig::default());
    let consumer = Consumer::new(
        inventory.clone(),
        Arc::clone(&bus),
        Arc::new(Reservations),
        ConsumerConfig::new(CONSUMER, &[topics::ORDER]),
    );
    let parts = [
        tokio::spawn({
            let stop = stop.clone();
            async move { relay.run(stop).await.map_err(|error| error.to_string()) }
        }),
        tokio::spawn({
            let stop = stop.clone();
            async move { consumer.run(stop).await.map_err(|error| error.to_string()) }
        }),
    ];
    orders
        .write(|tx| -> Result<(), StoreError> {
            tandem::outbox::append(tx, topics::ORDER, NewEvent::new("o-3", &placed("o-3", 2))?)?;
            Ok(())
        })
        .await
        .unwrap();
    Quiescence::new()
        .outbox(orders.clone(), &RelayConfig::default().name)
        .consumer(
            inventory.clone(),
            Arc::clone(&bus),
            CONSUMER,
            &[topics::ORDER.to_owned()],
        )
        .wait(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(widget_stock(&inventory).await, (8, 2));
    stop.cancel();
    for part in parts {
        part.await.unwrap().unwrap();
    }
}
