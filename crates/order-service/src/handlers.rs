//! What the Order Service does with other services' events.
//!
//! - [`LocalCopies`] (consumer `order-local-copies`, topics `customer` and
//!   `inventory`): keeps the local copies of customers and products that
//!   orders are checked against. Resettable: a replay rebuilds them.
//! - [`Settlement`] (consumer `order-settlement`, topic `inventory`): moves
//!   pending orders to CONFIRMED or REJECTED when the Inventory Service
//!   answers, publishing `OrderConfirmed` or `OrderRejected`.

use std::sync::Arc;

use tandem::outbox::{self, NewEvent};
use tandem::rebuild::{ModelTable, ReadModel, TableNames};
use tandem::store::Tx;
use tandem::EventPayload;
use tandem::{Envelope, Handler, HandlerError};
use tandem_contracts::customer::{CustomerCreated, CustomerSnapshot, CustomerUpdated};
use tandem_contracts::inventory::{
    ProductCreated, ProductSnapshot, ProductStockChanged, StockReservationFailed, StockReserved,
};
use tandem_contracts::order::{OrderConfirmed, OrderRejected};
use tandem_contracts::topics;

use crate::domain::Status;
use crate::storage::{self, LocalCustomer, LocalProduct};

pub const LOCAL_COPIES: &str = "order-local-copies";
pub const SETTLEMENT: &str = "order-settlement";

fn changed_at(event: &Envelope) -> String {
    tandem::envelope::format_time(event.time)
}

/// The local copies, kept in one version of their tables: the live ones
/// ([`LocalCopies::live`]) or a rebuild's ([`Copies`]).
#[derive(Debug, Clone)]
pub struct LocalCopies {
    customers: String,
    products: String,
}

impl LocalCopies {
    /// The copies readers see.
    pub fn live() -> Self {
        Self::in_tables(&TableNames::default())
    }

    fn in_tables(names: &TableNames) -> Self {
        Self {
            customers: names.get(storage::LOCAL_CUSTOMERS).to_owned(),
            products: names.get(storage::LOCAL_PRODUCTS).to_owned(),
        }
    }
}

/// The local copies as a read model: consumer `order-local-copies` can be
/// rebuilt side by side (`tandem rebuild`). Its handler never publishes.
pub struct Copies;

impl ReadModel for Copies {
    fn tables(&self) -> &'static [ModelTable] {
        &storage::COPY_TABLES
    }

    fn handler(&self, names: &TableNames) -> Arc<dyn Handler> {
        Arc::new(LocalCopies::in_tables(names))
    }
}

impl Handler for LocalCopies {
    fn handle(&self, tx: &mut dyn Tx, event: &Envelope) -> Result<(), HandlerError> {
        match event.event_type.as_str() {
            CustomerCreated::TYPE => {
                let created: CustomerCreated = event.payload()?;
                storage::save_customer_in(
                    tx,
                    &self.customers,
                    &LocalCustomer {
                        customer_id: created.customer_id,
                        name: created.name,
                        email: created.email,
                        address: created.address,
                        credit_limit_cents: created.credit_limit_cents,
                        sequence: event.sequence as i64,
                        changed_at: changed_at(event),
                    },
                )?;
            }
            CustomerUpdated::TYPE => {
                let updated: CustomerUpdated = event.payload()?;
                let Some(mut customer) =
                    storage::find_customer_in(tx, &self.customers, &updated.customer_id)?
                else {
                    return Err(HandlerError::permanent(format!(
                        "CustomerUpdated for unknown customer {}",
                        updated.customer_id
                    )));
                };
                if let Some(name) = updated.name {
                    customer.name = name;
                }
                if let Some(email) = updated.email {
                    customer.email = email;
                }
                if let Some(address) = updated.address {
                    customer.address = address;
                }
                if let Some(limit) = updated.credit_limit_cents {
                    customer.credit_limit_cents = limit;
                }
                customer.sequence = event.sequence as i64;
                customer.changed_at = changed_at(event);
                storage::save_customer_in(tx, &self.customers, &customer)?;
            }
            // A re-published snapshot: the toolkit applies it only when it
            // is newer than the copy (its sequence above the last applied),
            // so it replaces the copy whole.
            CustomerSnapshot::TYPE => {
                let snapshot: CustomerSnapshot = event.payload()?;
                storage::save_customer_in(
                    tx,
                    &self.customers,
                    &LocalCustomer {
                        customer_id: snapshot.customer_id,
                        name: snapshot.name,
                        email: snapshot.email,
                        address: snapshot.address,
                        credit_limit_cents: snapshot.credit_limit_cents,
                        sequence: event.sequence as i64,
                        changed_at: changed_at(event),
                    },
                )?;
            }
            ProductSnapshot::TYPE => {
                let snapshot: ProductSnapshot = event.payload()?;
                storage::save_product_in(
                    tx,
                    &self.products,
                    &LocalProduct {
                        product_id: snapshot.product_id,
                        sku: snapshot.sku,
                        name: snapshot.name,
                        price_cents: snapshot.price_cents,
                        available: snapshot.available,
                        reserved: snapshot.reserved,
                        sequence: event.sequence as i64,
                        changed_at: changed_at(event),
                    },
                )?;
            }
            ProductCreated::TYPE => {
                let created: ProductCreated = event.payload()?;
                storage::save_product_in(
                    tx,
                    &self.products,
                    &LocalProduct {
                        product_id: created.product_id,
                        sku: created.sku,
                        name: created.name,
                        price_cents: created.price_cents,
                        available: created.stock,
                        reserved: 0,
                        sequence: event.sequence as i64,
                        changed_at: changed_at(event),
                    },
                )?;
            }
            ProductStockChanged::TYPE => {
                let changed: ProductStockChanged = event.payload()?;
                let Some(mut product) =
                    storage::find_product_in(tx, &self.products, &changed.product_id)?
                else {
                    return Err(HandlerError::permanent(format!(
                        "ProductStockChanged for unknown product {}",
                        changed.product_id
                    )));
                };
                product.available = changed.available;
                product.reserved = changed.reserved;
                product.sequence = event.sequence as i64;
                product.changed_at = changed_at(event);
                storage::save_product_in(tx, &self.products, &product)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn reset(&self, tx: &mut dyn Tx) -> Result<(), HandlerError> {
        tx.execute_batch(&format!(
            "DELETE FROM {}; DELETE FROM {};",
            self.customers, self.products
        ))?;
        Ok(())
    }
}

pub struct Settlement;

impl Settlement {
    fn settle(
        tx: &mut dyn Tx,
        order_id: &str,
        next: fn(Status) -> Option<Status>,
        reason: Option<String>,
        event: &Envelope,
    ) -> Result<(), HandlerError> {
        let Some(mut order) = storage::find_order(tx, order_id)? else {
            tracing::warn!(order_id, event_type = %event.event_type, "settlement for an unknown order ignored");
            return Ok(());
        };
        let Some(status) = next(order.status) else {
            // Cancelled before the answer came, or already settled.
            return Ok(());
        };
        let from_version = order.version;
        let from_status = order.status;
        let new_event = match status {
            Status::Confirmed => NewEvent::new(
                order_id,
                &OrderConfirmed {
                    order_id: order_id.to_owned(),
                },
            )?,
            _ => NewEvent::new(
                order_id,
                &OrderRejected {
                    order_id: order_id.to_owned(),
                    reason: reason.clone().unwrap_or_default(),
                },
            )?,
        };
        let envelope = outbox::append(
            tx,
            topics::ORDER,
            new_event.expect_sequence(from_version as u64).with_context(
                tandem::outbox::EventContext {
                    causationid: Some(event.id.to_string()),
                    correlationid: event.correlationid.clone(),
                    traceparent: event.traceparent.clone(),
                },
            ),
        )?;
        order.status = status;
        order.reason = reason;
        order.version = envelope.sequence as i64;
        order.updated_at = changed_at(event);
        if !storage::update_status(tx, &order, from_status, from_version)? {
            return Err(HandlerError::transient(format!(
                "order {order_id} changed concurrently"
            )));
        }
        Ok(())
    }
}

impl Handler for Settlement {
    fn handle(&self, tx: &mut dyn Tx, event: &Envelope) -> Result<(), HandlerError> {
        match event.event_type.as_str() {
            StockReserved::TYPE => {
                let reserved: StockReserved = event.payload()?;
                Self::settle(tx, &reserved.order_id, Status::on_reserved, None, event)
            }
            StockReservationFailed::TYPE => {
                let failed: StockReservationFailed = event.payload()?;
                Self::settle(
                    tx,
                    &failed.order_id,
                    Status::on_reservation_failed,
                    Some(failed.reason),
                    event,
                )
            }
            _ => Ok(()),
        }
    }
}
