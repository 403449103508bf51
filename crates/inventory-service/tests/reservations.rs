//! Stock reservations through the bus: the service runs (`run`: API, relay
//! and the `inventory-reservations` consumer) against a real embedded log;
//! order events come from a stand-in order outbox with its own relay (the
//! Order Service does not exist yet) or are put on the log directly; the
//! outcome is read back from topic `inventory` and through `GET`.

mod common;

use std::sync::Arc;

use common::*;
use serde_json::json;
use tandem::bus::{Bus, OutgoingRecord};
use tandem::relay::{Relay, RelayConfig};
use tandem::sqlite::SqliteStore;
use tandem::store::{Store, StoreError};
use tandem::testing::Quiescence;
use tandem::{Envelope, EventPayload};
use tandem_contracts::inventory::{
    ProductStockChanged, StockReleased, StockReservationFailed, StockReserved,
};
use tandem_contracts::order::{
    v1, OrderCancelled, OrderConfirmed, OrderPlaced, OrderSnapshot, PricedLine,
};
use tandem_contracts::{topics, OrderLine};
use tandem_testkit::{eventually, open_log};
use tokio_util::sync::CancellationToken;

use inventory_service::reservations::CONSUMER;

/// The inventory service running beside a stand-in order outbox.
struct System {
    _dir: tempfile::TempDir,
    inventory: SqliteStore,
    orders: SqliteStore,
    bus: Arc<dyn Bus>,
    api: Api,
    feed: Feed,
    shutdown: CancellationToken,
    service: tokio::task::JoinHandle<Result<(), tandem_service::ServiceError>>,
    order_relay: tokio::task::JoinHandle<()>,
}

async fn start() -> System {
    let dir = tempfile::tempdir().unwrap();
    let inventory = open_store(&dir.path().join("inventory.db")).await;
    let orders = SqliteStore::open(dir.path().join("orders.db"), Default::default())
        .await
        .unwrap();
    let bus: Arc<dyn Bus> = Arc::new(open_log(&dir.path().join("bus.db")).await);
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service = tokio::spawn(inventory_service::run(
        listener,
        inventory.clone(),
        Arc::clone(&bus),
        shutdown.clone(),
    ));
    let order_relay = Relay::new(
        orders.clone(),
        Arc::clone(&bus),
        RelayConfig {
            name: topics::ORDER.into(),
            ..RelayConfig::default()
        },
    );
    let relay_shutdown = shutdown.clone();
    let order_relay =
        tokio::spawn(async move { order_relay.run(relay_shutdown).await.expect("order relay") });
    let feed = Feed::open(&bus).await;
    System {
        _dir: dir,
        api: Api::new(inventory.clone()),
        inventory,
        orders,
        bus,
        feed,
        shutdown,
        service,
        order_relay,
    }
}

fn placed(order_id: &str, lines: &[(&str, i64)]) -> OrderPlaced {
    placed_v1(order_id, lines).into()
}

/// The same order as `OrderPlaced` v1 published it: prices in bare cents.
fn placed_v1(order_id: &str, lines: &[(&str, i64)]) -> v1::OrderPlaced {
    v1::OrderPlaced {
        order_id: order_id.into(),
        customer_id: "c-1".into(),
        lines: priced_lines(lines),
        total_cents: lines.iter().map(|(_, quantity)| quantity * 250).sum(),
    }
}

fn priced_lines(lines: &[(&str, i64)]) -> Vec<PricedLine> {
    lines
        .iter()
        .map(|(product_id, quantity)| PricedLine {
            product_id: (*product_id).into(),
            quantity: *quantity,
            unit_price_cents: 250,
        })
        .collect()
}

fn lines(lines: &[(&str, i64)]) -> Vec<OrderLine> {
    lines
        .iter()
        .map(|(product_id, quantity)| OrderLine {
            product_id: (*product_id).into(),
            quantity: *quantity,
        })
        .collect()
}

/// A record carrying `payload` as event `sequence` of order `order_id`.
fn order_record<T: EventPayload>(order_id: &str, sequence: u64, payload: &T) -> OutgoingRecord {
    order_record_raw(
        order_id,
        sequence,
        T::TYPE,
        T::SCHEMA,
        serde_json::to_value(payload).unwrap(),
    )
}

/// A snapshot event (`snapshot: true`) of order `order_id` at `sequence`,
/// as a re-publication by the Order Service sends it.
fn snapshot_record(
    order_id: &str,
    sequence: u64,
    status: &str,
    lines: &[(&str, i64)],
) -> OutgoingRecord {
    let payload = OrderSnapshot {
        order_id: order_id.into(),
        customer_id: "c1".into(),
        status: status.into(),
        lines: priced_lines(lines),
        total_cents: 0,
        reason: None,
    };
    let mut envelope =
        Envelope::decode(&order_record(order_id, sequence, &payload).payload).unwrap();
    envelope.snapshot = true;
    OutgoingRecord {
        topic: topics::ORDER.into(),
        key: order_id.into(),
        payload: envelope.to_json(),
    }
}

fn order_record_raw(
    order_id: &str,
    sequence: u64,
    event_type: &str,
    dataschema: &str,
    data: serde_json::Value,
) -> OutgoingRecord {
    let envelope = Envelope {
        id: tandem::envelope::new_event_id(),
        source: topics::ORDER.into(),
        event_type: event_type.into(),
        subject: order_id.into(),
        time: time::OffsetDateTime::now_utc(),
        dataschema: dataschema.into(),
        data,
        sequence,
        traceparent: None,
        correlationid: None,
        causationid: None,
        snapshot: false,
    };
    OutgoingRecord {
        topic: topics::ORDER.into(),
        key: order_id.into(),
        payload: envelope.to_json(),
    }
}

impl System {
    /// Commits an order event to the stand-in order outbox.
    async fn order_event<T: EventPayload + Send + 'static>(&self, order_id: &str, payload: T) {
        let order_id = order_id.to_owned();
        self.orders
            .write(move |tx| -> Result<(), StoreError> {
                tandem::outbox::publish(tx, topics::ORDER, &order_id, &payload).map(|_| ())
            })
            .await
            .expect("order outbox");
    }

    async fn place(&self, order_id: &str, order_lines: &[(&str, i64)]) {
        self.order_event(order_id, placed(order_id, order_lines))
            .await;
    }

    async fn cancel(&self, order_id: &str) {
        self.order_event(
            order_id,
            OrderCancelled {
                order_id: order_id.into(),
            },
        )
        .await;
    }

    /// Waits until every order event is on the log and applied by the
    /// consumer, every inventory event it caused is on the log, and the
    /// feed has read them all: after this, nothing more is coming.
    async fn settle(&mut self) {
        Quiescence::new()
            .outbox(self.orders.clone(), topics::ORDER)
            .consumer(
                self.inventory.clone(),
                Arc::clone(&self.bus),
                CONSUMER,
                &[topics::ORDER.to_owned()],
            )
            .outbox(self.inventory.clone(), topics::INVENTORY)
            .wait(WAIT)
            .await
            .expect("the order events are consumed and what they caused is published");
        self.feed.catch_up(&self.bus).await;
    }

    async fn wait_for(&mut self, event_type: &str, subject: &str) {
        let what = format!("{event_type} {subject}");
        self.feed
            .wait_until(&what, |events| has(events, event_type, subject))
            .await;
    }

    /// The `ProductStockChanged` payloads of `product_id` read so far.
    fn stock_changes(&self, product_id: &str) -> Vec<ProductStockChanged> {
        self.feed
            .of(ProductStockChanged::TYPE, product_id)
            .iter()
            .map(|event| event.payload().unwrap())
            .collect()
    }

    async fn stop(self) {
        assert_stock_rules(&self.inventory).await;
        let parked = tandem::dead_letter::list(&self.inventory, Some(CONSUMER), false)
            .await
            .unwrap();
        self.shutdown.cancel();
        self.service
            .await
            .unwrap()
            .expect("the service stops cleanly");
        self.order_relay.await.unwrap();
        assert!(parked.is_empty(), "unexpected dead letters: {parked:#?}");
    }
}

fn one<'a>(events: Vec<&'a Envelope>, what: &str) -> &'a Envelope {
    assert_eq!(events.len(), 1, "expected exactly one {what}");
    events[0]
}

#[tokio::test]
async fn enough_stock_is_reserved_and_cancelling_releases_it() {
    let mut system = start().await;
    system.api.create("apple", 10).await;
    system.api.create("pear", 5).await;

    system.place("o-1", &[("apple", 3), ("pear", 2)]).await;
    system.wait_for(StockReserved::TYPE, "o-1").await;
    let reserved: StockReserved = system.feed.of(StockReserved::TYPE, "o-1")[0]
        .payload()
        .unwrap();
    assert_eq!(
        reserved,
        StockReserved {
            order_id: "o-1".into(),
            lines: lines(&[("apple", 3), ("pear", 2)]),
        }
    );
    assert_eq!(system.api.stock("apple").await, (7, 3));
    assert_eq!(system.api.stock("pear").await, (3, 2));
    // Lines naming one product twice are summed; all of pear goes.
    system.place("o-2", &[("pear", 1), ("pear", 2)]).await;
    system.wait_for(StockReserved::TYPE, "o-2").await;
    assert_eq!(
        system.feed.of(StockReserved::TYPE, "o-2")[0]
            .payload::<StockReserved>()
            .unwrap()
            .lines,
        lines(&[("pear", 3)])
    );
    assert_eq!(system.api.stock("pear").await, (0, 5));
    assert_stock_rules(&system.inventory).await;

    system.cancel("o-1").await;
    system.wait_for(StockReleased::TYPE, "o-1").await;
    let released: StockReleased = system.feed.of(StockReleased::TYPE, "o-1")[0]
        .payload()
        .unwrap();
    assert_eq!(released.lines, lines(&[("apple", 3), ("pear", 2)]));
    assert_eq!(system.api.stock("apple").await, (10, 0));
    assert_eq!(system.api.stock("pear").await, (2, 3));

    // A second cancellation of the same order releases nothing more.
    system.cancel("o-1").await;
    system.settle().await;
    assert_eq!(system.feed.of(StockReleased::TYPE, "o-1").len(), 1);
    assert_eq!(system.api.stock("apple").await, (10, 0));

    // Every move was announced per product, with the stock after it.
    let reason = |verb: &str, order: &str| format!("{verb} for order {order}");
    assert_eq!(
        system.stock_changes("apple"),
        vec![
            ProductStockChanged {
                product_id: "apple".into(),
                available: 7,
                reserved: 3,
                delta: -3,
                reason: reason("reserved", "o-1"),
            },
            ProductStockChanged {
                product_id: "apple".into(),
                available: 10,
                reserved: 0,
                delta: 3,
                reason: reason("released", "o-1"),
            },
        ]
    );
    assert_eq!(
        system
            .stock_changes("pear")
            .iter()
            .map(|change| (change.available, change.reserved, change.delta))
            .collect::<Vec<_>>(),
        vec![(3, 2, -2), (0, 5, -3), (2, 3, 2)]
    );
    // Product events carry the product's version as their sequence.
    let apple = system.api.get("/products/apple").await.body;
    assert_eq!(apple["version"], 3);
    system.stop().await;
}

#[tokio::test]
async fn orders_that_cannot_be_met_in_full_reserve_nothing() {
    let mut system = start().await;
    system.api.create("apple", 2).await;
    system.api.create("pear", 5).await;

    // Not enough of the only line.
    system.place("short", &[("apple", 3)]).await;
    // The first line fits, the second is short: neither is reserved.
    system
        .place("second-short", &[("apple", 1), ("pear", 6)])
        .await;
    // Each line fits alone, but together they need 3 apples.
    system
        .place("summed-short", &[("apple", 2), ("pear", 1), ("apple", 1)])
        .await;
    // A product that does not exist.
    system.place("unknown", &[("pear", 1), ("plum", 1)]).await;
    // Lines that make no sense.
    system.place("zero", &[("pear", 0)]).await;
    system.place("empty", &[]).await;
    system.settle().await;

    let reasons: Vec<(String, String)> = [
        "short",
        "second-short",
        "summed-short",
        "unknown",
        "zero",
        "empty",
    ]
    .iter()
    .map(|order| {
        let failed: StockReservationFailed =
            one(system.feed.of(StockReservationFailed::TYPE, order), order)
                .payload()
                .unwrap();
        assert_eq!(failed.order_id, *order);
        ((*order).to_owned(), failed.reason)
    })
    .collect();
    let expect = |order: &str, needle: &str| {
        let reason = &reasons.iter().find(|(id, _)| id == order).unwrap().1;
        assert!(
            reason.contains(needle),
            "{order}: {reason:?} lacks {needle:?}"
        );
    };
    expect(
        "short",
        "product apple: 3 requested, 2 available (short by 1)",
    );
    expect(
        "second-short",
        "product pear: 6 requested, 5 available (short by 1)",
    );
    expect("summed-short", "product apple: 3 requested, 2 available");
    expect("unknown", "product plum does not exist");
    expect("zero", "quantity must be positive");
    expect("empty", "no lines");
    assert!(system
        .feed
        .of(StockReserved::TYPE, "second-short")
        .is_empty());
    assert!(
        system
            .feed
            .events
            .iter()
            .all(|event| event.event_type != ProductStockChanged::TYPE),
        "stock moved: {:#?}",
        system.feed.summary()
    );
    assert_eq!(system.api.stock("apple").await, (2, 0));
    assert_eq!(system.api.stock("pear").await, (5, 0));

    // Cancelling a failed or an unknown order does nothing.
    system.cancel("short").await;
    system.cancel("never-placed").await;
    system.settle().await;
    assert!(
        system
            .feed
            .events
            .iter()
            .all(|event| event.event_type != StockReleased::TYPE
                && event.event_type != ProductStockChanged::TYPE),
        "{:#?}",
        system.feed.summary()
    );
    assert_eq!(system.api.stock("apple").await, (2, 0));

    // The stock that was refused is still there to be reserved.
    system.place("fits", &[("apple", 2), ("pear", 5)]).await;
    system.wait_for(StockReserved::TYPE, "fits").await;
    assert_eq!(system.api.stock("apple").await, (0, 2));
    assert_eq!(system.api.stock("pear").await, (0, 5));
    system.stop().await;
}

#[tokio::test]
async fn a_duplicated_order_placed_reserves_once() {
    let mut system = start().await;
    system.api.create("apple", 10).await;

    // The same record twice, as a relay republishing after a crash would.
    let record = order_record("dup", 1, &placed("dup", &[("apple", 4)]));
    system
        .bus
        .publish(std::slice::from_ref(&record))
        .await
        .unwrap();
    system.bus.publish(&[record]).await.unwrap();
    // The same order placed again under a new event and sequence: the
    // toolkit cannot tell it is a duplicate; the reservation record can.
    system
        .bus
        .publish(&[order_record("dup", 2, &placed("dup", &[("apple", 4)]))])
        .await
        .unwrap();
    system.settle().await;

    one(system.feed.of(StockReserved::TYPE, "dup"), "StockReserved");
    assert!(system
        .feed
        .of(StockReservationFailed::TYPE, "dup")
        .is_empty());
    assert_eq!(system.stock_changes("apple").len(), 1);
    assert_eq!(system.api.stock("apple").await, (6, 4));

    // And a duplicated cancellation releases once.
    let cancel = order_record(
        "dup",
        3,
        &OrderCancelled {
            order_id: "dup".into(),
        },
    );
    system
        .bus
        .publish(std::slice::from_ref(&cancel))
        .await
        .unwrap();
    system.bus.publish(&[cancel]).await.unwrap();
    system.settle().await;
    one(system.feed.of(StockReleased::TYPE, "dup"), "StockReleased");
    assert_eq!(system.api.stock("apple").await, (10, 0));
    system.stop().await;
}

#[tokio::test]
async fn twenty_orders_for_seven_units_reserve_exactly_seven() {
    let mut system = start().await;
    system.api.create("scarce", 7).await;
    system.api.create("busy", 100).await;

    // Twenty orders committed concurrently by the order side, while the
    // API adjusts another product's stock.
    let mut writers = tokio::task::JoinSet::new();
    for index in 0..20 {
        let orders = system.orders.clone();
        writers.spawn(async move {
            let order_id = format!("race-{index:02}");
            orders
                .write(move |tx| -> Result<(), StoreError> {
                    tandem::outbox::publish(
                        tx,
                        topics::ORDER,
                        &order_id,
                        &placed(&order_id, &[("scarce", 1), ("busy", 1)]),
                    )
                    .map(|_| ())
                })
                .await
                .unwrap();
        });
    }
    for delta in [5, -3, 7, -2] {
        let api = system.api.clone();
        writers.spawn(async move {
            let reply = api
                .post(
                    "/products/busy/stock-adjustments",
                    json!({"delta": delta, "reason": "meanwhile"}),
                )
                .await;
            assert_eq!(reply.status.as_u16(), 200, "{reply:?}");
        });
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    system
        .feed
        .wait_until("an outcome for each of the 20 orders", |events| {
            events
                .iter()
                .filter(|event| {
                    event.event_type == StockReserved::TYPE
                        || event.event_type == StockReservationFailed::TYPE
                })
                .count()
                >= 20
        })
        .await;
    system.settle().await;

    let count = |event_type: &str| {
        system
            .feed
            .events
            .iter()
            .filter(|event| event.event_type == event_type)
            .count()
    };
    assert_eq!(
        count(StockReserved::TYPE),
        7,
        "{:#?}",
        system.feed.summary()
    );
    assert_eq!(count(StockReservationFailed::TYPE), 13);
    for index in 0..20 {
        let order = format!("race-{index:02}");
        let outcomes = system.feed.of(StockReserved::TYPE, &order).len()
            + system.feed.of(StockReservationFailed::TYPE, &order).len();
        assert_eq!(outcomes, 1, "{order} must have exactly one outcome");
    }
    assert_eq!(system.api.stock("scarce").await, (0, 7));
    // 100 + 5 - 3 + 7 - 2 = 107, of which 7 went to the orders that got
    // scarce stock too (the others reserved nothing, busy included).
    assert_eq!(system.api.stock("busy").await, (100, 7));
    let scarce_changes = system.stock_changes("scarce");
    assert_eq!(scarce_changes.len(), 7);
    assert!(scarce_changes
        .iter()
        .all(|change| change.available + change.reserved == 7 && change.available >= 0));
    system.stop().await;
}

#[tokio::test]
async fn unreadable_order_events_are_parked_and_others_ignored() {
    let mut system = start().await;
    system.api.create("apple", 3).await;

    // An OrderPlaced whose payload breaks the contract: parked at once.
    system
        .bus
        .publish(&[order_record_raw(
            "broken",
            1,
            OrderPlaced::TYPE,
            OrderPlaced::SCHEMA,
            json!({"orderId": "broken", "lines": "three apples"}),
        )])
        .await
        .unwrap();
    // Order events the inventory does not care about: ignored.
    system
        .bus
        .publish(&[order_record(
            "other",
            1,
            &OrderConfirmed {
                order_id: "other".into(),
            },
        )])
        .await
        .unwrap();
    // Other orders still flow.
    system.place("fine", &[("apple", 1)]).await;
    system.wait_for(StockReserved::TYPE, "fine").await;
    system.settle().await;

    let parked = tandem::dead_letter::list(&system.inventory, Some(CONSUMER), false)
        .await
        .unwrap();
    assert_eq!(parked.len(), 1, "{parked:#?}");
    assert_eq!(parked[0].subject.as_deref(), Some("broken"));
    assert_eq!(parked[0].reason, "handler");
    assert_eq!(parked[0].attempts, 1, "a permanent error is not retried");
    assert!(
        parked[0].error.contains("does not match its contract"),
        "{}",
        parked[0].error
    );
    assert!(system
        .feed
        .of(StockReservationFailed::TYPE, "broken")
        .is_empty());
    assert!(system.feed.of(StockReserved::TYPE, "other").is_empty());
    assert_eq!(system.api.stock("apple").await, (2, 1));
    discard_all_parked(&system).await;
    system.stop().await;
}

/// The log holds `OrderPlaced` in both versions: v1 records written before
/// the Order Service moved to v2 are upcast and applied like v2 ones; a
/// version the service does not read is parked, naming it, and nothing of
/// it is applied.
#[tokio::test]
async fn order_placed_v1_and_v2_on_one_log_are_both_applied_and_v3_is_parked() {
    let mut system = start().await;
    system.api.create("apple", 10).await;

    // Written by an Order Service from before the change.
    let old = order_record("old", 1, &placed_v1("old", &[("apple", 2)]));
    let envelope = Envelope::decode(&old.payload).unwrap();
    assert_eq!(envelope.dataschema, "tandem:order/OrderPlaced/v1");
    assert!(
        envelope.data.get("totalCents").is_some(),
        "{:?}",
        envelope.data
    );
    system.bus.publish(&[old]).await.unwrap();
    // From one after it.
    system.place("new", &[("apple", 3)]).await;
    // From a future one, in a version this service does not know yet.
    system
        .bus
        .publish(&[order_record_raw(
            "future",
            1,
            OrderPlaced::TYPE,
            "tandem:order/OrderPlaced/v3",
            json!({"orderId": "future", "customerId": "c-1", "items": [{"sku": "apple", "count": 4}]}),
        )])
        .await
        .unwrap();
    system.wait_for(StockReserved::TYPE, "old").await;
    system.wait_for(StockReserved::TYPE, "new").await;
    system.settle().await;

    let reserved = |order: &str| {
        let event = one(system.feed.of(StockReserved::TYPE, order), order).clone();
        event.payload::<StockReserved>().unwrap().lines
    };
    assert_eq!(reserved("old"), lines(&[("apple", 2)]));
    assert_eq!(reserved("new"), lines(&[("apple", 3)]));
    assert_eq!(system.api.stock("apple").await, (5, 5));

    let parked = tandem::dead_letter::list(&system.inventory, Some(CONSUMER), false)
        .await
        .unwrap();
    assert_eq!(parked.len(), 1, "{parked:#?}");
    assert_eq!(parked[0].subject.as_deref(), Some("future"));
    assert_eq!(parked[0].attempts, 1, "an unknown version is not retried");
    assert!(
        parked[0].error.contains("tandem:order/OrderPlaced/v3")
            && parked[0].error.contains("does not read"),
        "{}",
        parked[0].error
    );
    assert!(system.feed.of(StockReserved::TYPE, "future").is_empty());
    assert!(system
        .feed
        .of(StockReservationFailed::TYPE, "future")
        .is_empty());
    assert_eq!(system.api.stock("apple").await, (5, 5));
    discard_all_parked(&system).await;
    system.stop().await;
}

/// Discards every parked event of the consumer and waits until it is gone.
async fn discard_all_parked(system: &System) {
    tandem::dead_letter::request_discard(&system.inventory, CONSUMER, None)
        .await
        .unwrap();
    let inventory = system.inventory.clone();
    eventually("the dead letters are discarded", WAIT, || {
        let inventory = inventory.clone();
        async move {
            tandem::dead_letter::list(&inventory, Some(CONSUMER), false)
                .await
                .unwrap()
                .is_empty()
        }
    })
    .await;
}

/// A re-publication by snapshot: an order the service answered is not
/// answered again (its snapshot at the same sequence is a duplicate, a
/// newer CONFIRMED one changes nothing); a pending order it never saw is
/// answered once, even when its snapshot comes twice; a CANCELLED
/// snapshot of a reserved order gives the stock back.
#[tokio::test]
async fn order_snapshots_answer_what_was_missed_and_nothing_twice() {
    let mut system = start().await;
    system.api.create("apple", 10).await;
    system
        .bus
        .publish(&[order_record("seen", 1, &placed("seen", &[("apple", 2)]))])
        .await
        .unwrap();
    system.settle().await;
    one(system.feed.of(StockReserved::TYPE, "seen"), "StockReserved");

    system
        .bus
        .publish(&[
            snapshot_record("seen", 1, "PENDING", &[("apple", 2)]),
            snapshot_record("seen", 2, "CONFIRMED", &[("apple", 2)]),
            snapshot_record("missed", 4, "PENDING", &[("apple", 3)]),
            snapshot_record("missed", 4, "PENDING", &[("apple", 3)]),
        ])
        .await
        .unwrap();
    system.settle().await;
    one(system.feed.of(StockReserved::TYPE, "seen"), "StockReserved");
    one(
        system.feed.of(StockReserved::TYPE, "missed"),
        "StockReserved",
    );
    assert_eq!(system.api.stock("apple").await, (5, 5));

    system
        .bus
        .publish(&[snapshot_record("missed", 6, "CANCELLED", &[("apple", 3)])])
        .await
        .unwrap();
    system.settle().await;
    one(
        system.feed.of(StockReleased::TYPE, "missed"),
        "StockReleased",
    );
    assert_eq!(system.api.stock("apple").await, (8, 2));
    system.stop().await;
}
