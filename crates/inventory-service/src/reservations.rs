//! Stock reservations for orders: the consumer of topic `order`.
//!
//! [`Reservations`] runs inside the consumer's transaction on the
//! inventory's own database, so the stock it moves, the reservation it
//! records, the events it publishes and the consumer's position commit
//! together or not at all.
//!
//! - `OrderPlaced`: all lines or none. If every product exists and has
//!   enough available stock (lines naming one product are summed), each
//!   product's quantity moves from available to reserved, the reservation is
//!   recorded as `reserved`, and `StockReserved` (subject: order id) plus one
//!   `ProductStockChanged` per product (subject: product id) are published.
//!   Otherwise nothing moves; the reservation is recorded as `failed` and
//!   `StockReservationFailed` says which product is unknown or short, and by
//!   how much.
//! - `OrderCancelled`: a `reserved` reservation goes back to available
//!   stock, becomes `released`, and `StockReleased` plus one
//!   `ProductStockChanged` per product are published. A failed, released or
//!   unknown one is left alone.
//! - Any other event: ignored.
//!
//! The toolkit drops redelivered events by sequence; on top of that every
//! decision is keyed by order id, so an `OrderPlaced` seen again (a replay,
//! or a copy with a new sequence) changes nothing.

use tandem::envelope::Envelope;
use tandem::outbox;
use tandem::store::Tx;
use tandem::{EventPayload, Handler, HandlerError};
use tandem_contracts::inventory::{StockReleased, StockReservationFailed, StockReserved};
use tandem_contracts::order::{OrderCancelled, OrderPlaced, OrderSnapshot};
use tandem_contracts::{topics, OrderLine};

use crate::app::{now, save_stock_change, AppError};
use crate::domain::{self, Demand, Reservation, ReservationStatus};
use crate::storage;

/// The consumer's name: its group on the bus and its key in the toolkit's
/// tables.
pub const CONSUMER: &str = "inventory-reservations";

/// Applies order events to the inventory.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reservations;

impl Handler for Reservations {
    fn handle(&self, tx: &mut dyn Tx, event: &Envelope) -> Result<(), HandlerError> {
        if tandem::fault::failing("inventory.reserve") {
            // A switchable failure for tests of the operator's redrive.
            return Err(HandlerError::transient(format!(
                "fault point inventory.reserve: cannot apply {} {} now",
                event.event_type, event.subject
            )));
        }
        if event.event_type == OrderPlaced::TYPE {
            // v1 payloads still on the log arrive upcast (tandem_contracts).
            let order = event.payload::<OrderPlaced>()?;
            place(
                tx,
                &order.order_id,
                order
                    .lines
                    .iter()
                    .map(|line| (line.product_id.as_str(), line.quantity)),
            )
        } else if event.event_type == OrderCancelled::TYPE {
            cancel(tx, &event.payload::<OrderCancelled>()?)
        } else if event.event_type == OrderSnapshot::TYPE {
            // A re-published order this service missed events of (the
            // toolkit hands it over only when it is newer than what was
            // applied): a pending order still needs its answer, a
            // cancelled one its stock back; a decided one was answered.
            let snapshot: OrderSnapshot = event.payload()?;
            match snapshot.status.as_str() {
                "PENDING" => place(
                    tx,
                    &snapshot.order_id,
                    snapshot
                        .lines
                        .iter()
                        .map(|line| (line.product_id.as_str(), line.quantity)),
                ),
                "CANCELLED" => cancel(
                    tx,
                    &OrderCancelled {
                        order_id: snapshot.order_id,
                    },
                ),
                "CONFIRMED" | "REJECTED" => Ok(()),
                other => Err(HandlerError::permanent(format!(
                    "OrderSnapshot of {} has an unknown status {other:?}",
                    snapshot.order_id
                ))),
            }
        } else {
            Ok(())
        }
    }
}

fn handler_error(error: AppError) -> HandlerError {
    match error {
        AppError::Store(_) | AppError::Concurrent(_) => HandlerError::transient(error.to_string()),
        AppError::Invalid(_)
        | AppError::Stock(_)
        | AppError::NotFound(_)
        | AppError::AlreadyExists { .. } => HandlerError::permanent(error.to_string()),
    }
}

fn order_lines(demands: &[Demand]) -> Vec<OrderLine> {
    demands
        .iter()
        .map(|demand| OrderLine {
            product_id: demand.product_id.clone(),
            quantity: demand.quantity,
        })
        .collect()
}

fn checked_order_id(order_id: &str) -> Result<(), HandlerError> {
    if order_id.is_empty() {
        return Err(HandlerError::permanent("the event's orderId is empty"));
    }
    Ok(())
}

/// Decides an order: `lines` are its products and quantities.
fn place<'a>(
    tx: &mut dyn Tx,
    order_id: &str,
    lines: impl Iterator<Item = (&'a str, i64)>,
) -> Result<(), HandlerError> {
    checked_order_id(order_id)?;
    if storage::find_reservation(tx, order_id)?.is_some() {
        // Decided already; deciding again could only disagree.
        return Ok(());
    }
    let demands = match domain::demand(lines) {
        Ok(demands) => demands,
        Err(reason) => return refuse(tx, order_id, reason),
    };
    let mut products = Vec::with_capacity(demands.len());
    for demand in &demands {
        products.push(storage::find(tx, &demand.product_id)?);
    }
    let problems = domain::shortfalls(&demands, |id| {
        products
            .iter()
            .flatten()
            .find(|product| product.id.as_str() == id)
            .map(|product| product.available)
    });
    if !problems.is_empty() {
        return refuse(tx, order_id, problems.join("; "));
    }
    let reason = format!("reserved for order {order_id}");
    for (demand, product) in demands.iter().zip(products) {
        let mut product = product.ok_or_else(|| {
            HandlerError::transient(format!("product {} vanished", demand.product_id))
        })?;
        let previous_version = product.version;
        product
            .reserve(demand.quantity)
            .map_err(HandlerError::permanent)?;
        save_stock_change(
            tx,
            &mut product,
            previous_version,
            -demand.quantity,
            &reason,
        )
        .map_err(handler_error)?;
    }
    let reservation = Reservation {
        order_id: order_id.to_owned(),
        status: ReservationStatus::Reserved,
        lines: demands,
        reason: None,
    };
    storage::insert_reservation(tx, &reservation, &now())?;
    outbox::publish(
        tx,
        topics::INVENTORY,
        order_id,
        &StockReserved {
            order_id: order_id.to_owned(),
            lines: order_lines(&reservation.lines),
        },
    )?;
    Ok(())
}

/// Records that nothing was reserved for `order_id`, and why.
fn refuse(tx: &mut dyn Tx, order_id: &str, reason: String) -> Result<(), HandlerError> {
    tracing::info!(order_id, %reason, "stock reservation failed");
    let reservation = Reservation {
        order_id: order_id.to_owned(),
        status: ReservationStatus::Failed,
        lines: Vec::new(),
        reason: Some(reason),
    };
    storage::insert_reservation(tx, &reservation, &now())?;
    outbox::publish(
        tx,
        topics::INVENTORY,
        order_id,
        &StockReservationFailed {
            order_id: order_id.to_owned(),
            reason: reservation.reason.unwrap_or_default(),
        },
    )?;
    Ok(())
}

fn cancel(tx: &mut dyn Tx, order: &OrderCancelled) -> Result<(), HandlerError> {
    let order_id = order.order_id.as_str();
    checked_order_id(order_id)?;
    let Some(reservation) = storage::find_reservation(tx, order_id)? else {
        return Ok(());
    };
    if reservation.status != ReservationStatus::Reserved {
        return Ok(());
    }
    let reason = format!("released for order {order_id}");
    for line in &reservation.lines {
        let mut product = storage::find(tx, &line.product_id)?.ok_or_else(|| {
            HandlerError::permanent(format!(
                "reservation {order_id} holds stock of product {}, which does not exist",
                line.product_id
            ))
        })?;
        let previous_version = product.version;
        product
            .release(line.quantity)
            .map_err(HandlerError::permanent)?;
        save_stock_change(tx, &mut product, previous_version, line.quantity, &reason)
            .map_err(handler_error)?;
    }
    if !storage::set_reservation_status(
        tx,
        order_id,
        ReservationStatus::Reserved,
        ReservationStatus::Released,
        &now(),
    )? {
        return Err(HandlerError::transient(format!(
            "reservation {order_id} changed while it was being released"
        )));
    }
    outbox::publish(
        tx,
        topics::INVENTORY,
        order_id,
        &StockReleased {
            order_id: order_id.to_owned(),
            lines: order_lines(&reservation.lines),
        },
    )?;
    Ok(())
}
