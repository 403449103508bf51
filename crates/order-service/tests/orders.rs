//! The Order Service's use cases and handlers on a real SQLite file:
//! pricing from local copies, the credit rule with its running open total,
//! settlement, cancellation and idempotency keys.

use order_service::app::{AppError, Orders, PlaceOrder};
use order_service::handlers::{LocalCopies, Settlement};
use order_service::storage;
use serde::Serialize;
use tandem::sqlite::{SqliteOptions, SqliteStore};
use tandem::store::{Store, StoreError};
use tandem::{Envelope, EventPayload, Handler};
use tandem_contracts::customer::CustomerCreated;
use tandem_contracts::inventory::{ProductCreated, StockReservationFailed, StockReserved};

fn envelope<T: EventPayload + Serialize>(
    source: &str,
    subject: &str,
    sequence: u64,
    payload: &T,
) -> Envelope {
    Envelope {
        id: tandem::envelope::new_event_id(),
        source: source.into(),
        event_type: T::TYPE.into(),
        subject: subject.into(),
        time: time::OffsetDateTime::now_utc(),
        dataschema: T::SCHEMA.into(),
        data: serde_json::to_value(payload).unwrap(),
        sequence,
        traceparent: None,
        correlationid: None,
        causationid: None,
        snapshot: false,
    }
}

async fn apply(store: &SqliteStore, handler: impl Handler, event: Envelope) {
    store
        .write(move |tx| {
            handler
                .handle(tx, &event)
                .map_err(|error| StoreError::Engine(error.message.into()))
        })
        .await
        .unwrap();
}

async fn setup() -> (tempfile::TempDir, SqliteStore, Orders<SqliteStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("order.db"), SqliteOptions::default())
        .await
        .unwrap();
    store.write(storage::install).await.unwrap();
    let customer = CustomerCreated {
        customer_id: "c1".into(),
        name: "Ada".into(),
        email: "ada@example.com".into(),
        address: "1 Old Road".into(),
        credit_limit_cents: 10_000,
    };
    apply(
        &store,
        LocalCopies::live(),
        envelope("customer", "c1", 1, &customer),
    )
    .await;
    let product = ProductCreated {
        product_id: "p1".into(),
        sku: "P1".into(),
        name: "Widget".into(),
        price_cents: 3_000,
        stock: 10,
    };
    apply(
        &store,
        LocalCopies::live(),
        envelope("inventory", "p1", 1, &product),
    )
    .await;
    let orders = Orders::new(store.clone());
    (dir, store, orders)
}

fn one_widget(key: Option<&str>) -> PlaceOrder {
    PlaceOrder {
        customer_id: "c1".into(),
        lines: vec![("p1".into(), 1)],
        idempotency_key: key.map(str::to_owned),
    }
}

async fn open_total(store: &SqliteStore) -> i64 {
    store
        .read(|tx| storage::open_total(tx, "c1"))
        .await
        .unwrap()
}

#[tokio::test]
async fn the_credit_rule_counts_open_orders_and_frees_what_settles_or_is_cancelled() {
    let (_dir, store, orders) = setup().await;
    let mut placed = Vec::new();
    for _ in 0..3 {
        let order = orders.place(one_widget(None)).await.unwrap().order;
        assert_eq!(
            (order.total_cents, order.lines[0].unit_price_cents),
            (3_000, 3_000)
        );
        placed.push(order.order_id);
    }
    assert_eq!(open_total(&store).await, 9_000);
    match orders.place(one_widget(None)).await {
        Err(AppError::Invalid(invalid)) => assert_eq!(invalid.kind, "credit-limit-exceeded"),
        other => panic!("expected a credit refusal, got {other:?}"),
    }

    // Inventory refuses the first: it is rejected and no longer counts.
    let failed = StockReservationFailed {
        order_id: placed[0].clone(),
        reason: "short".into(),
    };
    apply(
        &store,
        Settlement,
        envelope("inventory", &placed[0], 1, &failed),
    )
    .await;
    assert_eq!(
        orders
            .get(placed[0].clone())
            .await
            .unwrap()
            .0
            .status
            .as_str(),
        "REJECTED"
    );
    assert_eq!(open_total(&store).await, 6_000);

    // The second is confirmed (still counts), then cancelled (does not).
    let reserved = StockReserved {
        order_id: placed[1].clone(),
        lines: vec![],
    };
    apply(
        &store,
        Settlement,
        envelope("inventory", &placed[1], 1, &reserved),
    )
    .await;
    assert_eq!(
        orders
            .get(placed[1].clone())
            .await
            .unwrap()
            .0
            .status
            .as_str(),
        "CONFIRMED"
    );
    assert_eq!(open_total(&store).await, 6_000);
    orders.cancel(placed[1].clone()).await.unwrap();
    assert_eq!(open_total(&store).await, 3_000);
    assert!(matches!(
        orders.cancel(placed[1].clone()).await,
        Err(AppError::Invalid(_))
    ));
    assert_eq!(
        open_total(&store).await,
        3_000,
        "a refused cancel frees nothing"
    );

    // A late answer for a cancelled order changes nothing.
    apply(
        &store,
        Settlement,
        envelope("inventory", &placed[1], 2, &failed),
    )
    .await;
    assert_eq!(
        orders
            .get(placed[1].clone())
            .await
            .unwrap()
            .0
            .status
            .as_str(),
        "CANCELLED"
    );
    assert_eq!(open_total(&store).await, 3_000);
    orders.place(one_widget(None)).await.unwrap();
    assert_eq!(open_total(&store).await, 6_000);
}

#[tokio::test]
async fn an_idempotency_key_returns_the_first_order_and_refuses_another_body() {
    let (_dir, store, orders) = setup().await;
    let first = orders.place(one_widget(Some("k-1"))).await.unwrap();
    let again = orders.place(one_widget(Some("k-1"))).await.unwrap();
    assert!(!first.replayed && again.replayed);
    assert_eq!(first.order.order_id, again.order.order_id);
    assert_eq!(open_total(&store).await, 3_000, "the retry placed nothing");
    let other_body = PlaceOrder {
        lines: vec![("p1".into(), 2)],
        ..one_widget(Some("k-1"))
    };
    assert!(matches!(
        orders.place(other_body).await,
        Err(AppError::KeyReused(_))
    ));
    let listed = orders.of_customer("c1".into(), 100).await.unwrap();
    assert_eq!(listed.len(), 1);
}

#[tokio::test]
async fn unknown_customers_and_products_are_named() {
    let (_dir, _store, orders) = setup().await;
    let unknown_customer = PlaceOrder {
        customer_id: "nobody".into(),
        ..one_widget(None)
    };
    match orders.place(unknown_customer).await {
        Err(AppError::Invalid(invalid)) => {
            assert_eq!(
                (invalid.kind, invalid.field.as_str()),
                ("unknown-customer", "customerId")
            )
        }
        other => panic!("{other:?}"),
    }
    let unknown_product = PlaceOrder {
        lines: vec![("p1".into(), 1), ("p9".into(), 1)],
        ..one_widget(None)
    };
    match orders.place(unknown_product).await {
        Err(AppError::Invalid(invalid)) => {
            assert_eq!(
                (invalid.kind, invalid.field.as_str()),
                ("unknown-product", "lines[1].productId")
            )
        }
        other => panic!("{other:?}"),
    }
}
