//! Testing a handler of your own with `tandem::testing`
//! (`cargo run -p tandem --example testing --features testing`).
//!
//! The handler gives a customer a point per whole euro of each `OrderPaid`
//! and announces the new total as `PointsEarned`. `HandlerBed` runs it in
//! the real consumer, on a SQLite file and an embedded log in a temporary
//! directory, fed in the order this program chooses. It checks, and panics
//! unless it holds: an event delivered twice applies once; an event after
//! a gap waits for it; a refused event is parked as a dead letter, with
//! its customer's later events behind it. In your own crate, enable
//! tandem's `testing` feature in `[dev-dependencies]` and put these lines
//! in a `#[tokio::test]`. For a whole system in one process,
//! `tandem::testing::Quiescence` waits until it has consumed all it
//! published: the Inventory Service's `tests/handler_bed.rs` shows it.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem::testing::{event, HandlerBed};
use tandem::{outbox, params, ConsumerConfig, Envelope, EventPayload, Handler};
use tandem::{HandlerError, NewEvent, Store, StoreError, Tx};

/// The topic the shop publishes payments on, keyed by customer.
const SHOP: &str = "shop";
/// The topic the loyalty service publishes on.
const LOYALTY: &str = "loyalty";

#[derive(Serialize, Deserialize)]
struct OrderPaid {
    amount_cents: i64,
}

impl EventPayload for OrderPaid {
    const TYPE: &'static str = "OrderPaid";
    const SCHEMA: &'static str = "example:shop/OrderPaid/v1";
}

#[derive(Serialize, Deserialize)]
struct PointsEarned {
    points: i64,
    total: i64,
}

impl EventPayload for PointsEarned {
    const TYPE: &'static str = "PointsEarned";
    const SCHEMA: &'static str = "example:loyalty/PointsEarned/v1";
}

/// The handler under test. It acts only through `tx`, the consumer's
/// transaction, so its write and its event commit with the consumer's
/// position, or not at all.
struct Loyalty;

impl Handler for Loyalty {
    fn handle(&self, tx: &mut dyn Tx, event: &Envelope) -> Result<(), HandlerError> {
        if event.event_type != OrderPaid::TYPE {
            return Ok(());
        }
        let OrderPaid { amount_cents } = event.payload()?;
        if amount_cents <= 0 {
            // Trying again cannot fix this one: park it now, for a person.
            let refused = format!("a payment of {amount_cents} cents earns nothing");
            return Err(HandlerError::permanent(refused));
        }
        let (customer, points) = (event.subject.as_str(), amount_cents / 100);
        let current = "SELECT total FROM points WHERE customer = $1";
        let total = match tx.query_opt(current, params![customer])? {
            Some(row) => row.i64(0)? + points,
            None => points,
        };
        let upsert = "INSERT INTO points VALUES ($1, $2)
                      ON CONFLICT (customer) DO UPDATE SET total = excluded.total";
        tx.execute(upsert, params![customer, total])?;
        let earned = NewEvent::new(customer, &PointsEarned { points, total })?;
        outbox::append(tx, LOYALTY, earned)?;
        Ok(())
    }
}

/// The handler's table, created in the bed's database before it starts.
fn install(tx: &mut dyn Tx) -> Result<(), StoreError> {
    tx.execute_batch("CREATE TABLE points (customer TEXT PRIMARY KEY, total INTEGER NOT NULL)")
}

/// A customer's points, as the handler left them in the bed's database.
async fn points(bed: &HandlerBed, customer: &str) -> anyhow::Result<i64> {
    let sql = "SELECT total FROM points WHERE customer = $1";
    let customer = customer.to_owned();
    let read = move |tx: &mut dyn Tx| tx.query_opt(sql, params![&customer]);
    let row = bed.store().read(read).await?;
    Ok(row.map(|row| row.i64(0)).transpose()?.unwrap_or(0))
}

/// The totals the handler announced, in order, as `(customer, total)`.
async fn announced(bed: &HandlerBed) -> anyhow::Result<Vec<(String, i64)>> {
    let mut totals = Vec::new();
    for event in bed.published().await? {
        let PointsEarned { total, .. } = event.payload()?;
        totals.push((event.subject, total));
    }
    Ok(totals)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The consumer's name and topics, as the service would configure them.
    // A gap is waited for 5 s by default, then the event held behind it is
    // parked; here the program fills the gap itself, so no time limit.
    let mut config = ConsumerConfig::new("loyalty", &[SHOP]);
    config.gap_timeout = Duration::from_secs(3600);
    let bed = HandlerBed::new(Arc::new(Loyalty), config, install).await?;
    // `event` builds an envelope as the shop would publish it (a fresh id,
    // the time now, the payload's type and schema): you choose the subject
    // (here the customer) and its sequence.
    let paid = |customer: &str, sequence, amount_cents| {
        event(SHOP, customer, sequence, &OrderPaid { amount_cents })
    };
    let ada = |total| ("ada".to_owned(), total);

    // `deliver` puts the events on the log in the order given and returns
    // once the consumer has consumed them all: then look at the effect.
    let first = paid("ada", 1, 2_550)?;
    bed.deliver(std::slice::from_ref(&first)).await?;
    assert_eq!(points(&bed, "ada").await?, 25);
    assert_eq!(announced(&bed).await?, [ada(25)]);
    println!("applied: ada paid 25.50 and has 25 points, announced once");

    // The same event again, as a bus may redeliver it: ada's sequence 1 is
    // already applied, so the consumer skips it.
    bed.deliver(&[first]).await?;
    assert_eq!(points(&bed, "ada").await?, 25);
    assert_eq!(announced(&bed).await?, [ada(25)]);
    assert!(bed.parked().await?.is_empty(), "a duplicate is no failure");
    println!("duplicate: delivered twice, applied and announced once");

    // Sequence 3 before 2: it is held, not applied, until 2 arrives; then
    // both apply, in order.
    bed.deliver(&[paid("ada", 3, 1_000)?]).await?;
    assert_eq!(bed.held().await?, 1);
    assert_eq!(points(&bed, "ada").await?, 25);
    bed.deliver(&[paid("ada", 2, 500)?]).await?;
    assert_eq!(bed.held().await?, 0);
    assert_eq!(announced(&bed).await?, [ada(25), ada(30), ada(40)]);
    println!("gap: ada's payment 3 waited for 2, then both applied in order");

    // A refused payment is parked as a dead letter at once (the error is
    // permanent). Bob's next payment is parked behind it as `blocked`,
    // never applied out of order; ada's goes on.
    let events = [
        paid("bob", 1, -300)?,
        paid("bob", 2, 800)?,
        paid("ada", 4, 100)?,
    ];
    bed.deliver(&events).await?;
    let parked = bed.parked().await?;
    let letters: Vec<_> = parked
        .iter()
        .map(|l| (l.sequence, l.reason.as_str()))
        .collect();
    assert_eq!(letters, [(Some(1), "handler"), (Some(2), "blocked")]);
    assert!(parked.iter().all(|l| l.subject.as_deref() == Some("bob")));
    assert_eq!(points(&bed, "bob").await?, 0);
    assert_eq!(points(&bed, "ada").await?, 41);
    let why = &parked[0].error;
    println!("dead letter: bob's payment 1 parked ({why}), his 2 blocked behind it");
    Ok(())
}
