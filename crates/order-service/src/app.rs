//! The Order Service's use cases. An order is checked against the local
//! copies and committed as PENDING with its `OrderPlaced` event in one
//! transaction; nothing here waits on another service.

use tandem::outbox::{self, EventContext, NewEvent};
use tandem::store::{Store, StoreError};
use tandem_contracts::order::{LineItem, Money, OrderCancelled, OrderPlaced};
use tandem_contracts::topics;

use crate::domain::{self, Invalid, KnownProduct, Status};
use crate::storage::{self, LocalCustomer, LocalProduct, StoredOrder};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("{0} not found")]
    NotFound(String),
    #[error("idempotency key {0} was used with a different request")]
    KeyReused(String),
    #[error("order {0} was changed concurrently; retry")]
    Concurrent(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn now() -> String {
    tandem::envelope::format_time(time::OffsetDateTime::now_utc())
}

/// An order request as received, before its checks.
#[derive(Debug, Clone)]
pub struct PlaceOrder {
    pub customer_id: String,
    pub lines: Vec<(String, i64)>,
    pub idempotency_key: Option<String>,
}

/// The outcome of placing: a new order, or the one an earlier request
/// with the same idempotency key made.
#[derive(Debug, Clone)]
pub struct Placed {
    pub order: StoredOrder,
    pub replayed: bool,
}

#[derive(Clone)]
pub struct Orders<S: Store> {
    store: S,
}

impl<S: Store> Orders<S> {
    pub fn new(store: S) -> Self {
        Self { store }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub async fn place(&self, request: PlaceOrder) -> Result<Placed, AppError> {
        let (customer_id, lines) = domain::check_request(&request.customer_id, &request.lines)?;
        if let Some(key) = &request.idempotency_key {
            if key.is_empty() || key.len() > 200 {
                return Err(
                    domain::invalid("Idempotency-Key", "must be 1 to 200 characters").into(),
                );
            }
        }
        // The canonical form of the request, compared on key reuse.
        let canonical = serde_json::json!({
            "customerId": customer_id,
            "lines": lines.iter().map(|line| serde_json::json!({"productId": line.product_id, "quantity": line.quantity})).collect::<Vec<_>>(),
        })
        .to_string();
        let key = request.idempotency_key;
        self.store
            .write(move |tx| -> Result<Placed, AppError> {
                if let Some(key) = &key {
                    if let Some((earlier, order_id)) = storage::find_idempotency_key(tx, key)? {
                        if earlier != canonical {
                            return Err(AppError::KeyReused(key.clone()));
                        }
                        let order = storage::find_order(tx, &order_id)?
                            .ok_or_else(|| AppError::NotFound(format!("order {order_id}")))?;
                        return Ok(Placed { order, replayed: true });
                    }
                }
                let Some(customer) = storage::find_customer(tx, &customer_id)? else {
                    return Err(Invalid {
                        field: "customerId".into(),
                        message: format!(
                            "the Order Service has not heard of customer {customer_id} (yet): if it was just created, retry shortly"
                        ),
                        kind: "unknown-customer",
                    }
                    .into());
                };
                let mut known = std::collections::HashMap::new();
                for line in &lines {
                    if let Some(product) = storage::find_product(tx, &line.product_id)? {
                        known.insert(
                            product.product_id.clone(),
                            KnownProduct {
                                product_id: product.product_id,
                                price_cents: product.price_cents,
                            },
                        );
                    }
                }
                let (priced, total_cents) =
                    domain::price(&lines, |product_id| known.get(product_id).cloned())?;
                let open = storage::open_total(tx, &customer.customer_id)?;
                domain::check_credit(customer.credit_limit_cents, open, total_cents)?;

                let order_id = tandem::envelope::new_event_id().to_string();
                let payload = OrderPlaced {
                    order_id: order_id.clone(),
                    customer_id: customer.customer_id.clone(),
                    lines: priced
                        .iter()
                        .map(|line| LineItem {
                            product_id: line.product_id.clone(),
                            quantity: line.quantity,
                            unit_price: Money::cents(line.unit_price_cents),
                        })
                        .collect(),
                    total: Money::cents(total_cents),
                };
                let event = NewEvent::new(&order_id, &payload)?
                    .expect_sequence(0)
                    .with_context(EventContext {
                        correlationid: Some(order_id.clone()),
                        ..EventContext::default()
                    });
                let envelope = outbox::append(tx, topics::ORDER, event)?;
                let at = now();
                let order = StoredOrder {
                    order_id: order_id.clone(),
                    customer_id: customer.customer_id,
                    status: Status::Pending,
                    lines: priced,
                    total_cents,
                    reason: None,
                    version: envelope.sequence as i64,
                    created_at: at.clone(),
                    updated_at: at,
                };
                storage::insert_order(tx, &order)?;
                if let Some(key) = &key {
                    storage::save_idempotency_key(tx, key, &canonical, &order_id)?;
                }
                Ok(Placed { order, replayed: false })
            })
            .await
    }

    pub async fn cancel(&self, order_id: String) -> Result<StoredOrder, AppError> {
        self.store
            .write(move |tx| -> Result<StoredOrder, AppError> {
                let Some(mut order) = storage::find_order(tx, &order_id)? else {
                    return Err(AppError::NotFound(format!("order {order_id}")));
                };
                let from_version = order.version;
                let from_status = order.status;
                order.status = order.status.cancel()?;
                let event = NewEvent::new(
                    &order_id,
                    &OrderCancelled {
                        order_id: order_id.clone(),
                    },
                )?
                .expect_sequence(from_version as u64)
                .with_context(EventContext {
                    correlationid: Some(order_id.clone()),
                    ..EventContext::default()
                });
                let envelope =
                    outbox::append(tx, topics::ORDER, event).map_err(|error| match error {
                        StoreError::Conflict(_) => AppError::Concurrent(order_id.clone()),
                        other => AppError::Store(other),
                    })?;
                order.version = envelope.sequence as i64;
                order.updated_at = now();
                if !storage::update_status(tx, &order, from_status, from_version)? {
                    return Err(AppError::Concurrent(order_id.clone()));
                }
                Ok(order)
            })
            .await
    }

    /// An order with the customer's name and current address from the
    /// local copy (if the copy exists).
    pub async fn get(
        &self,
        order_id: String,
    ) -> Result<(StoredOrder, Option<LocalCustomer>), AppError> {
        self.store
            .read(move |tx| -> Result<_, AppError> {
                let order = storage::find_order(tx, &order_id)?
                    .ok_or_else(|| AppError::NotFound(format!("order {order_id}")))?;
                let customer = storage::find_customer(tx, &order.customer_id)?;
                Ok((order, customer))
            })
            .await
    }

    pub async fn of_customer(
        &self,
        customer_id: String,
        limit: u32,
    ) -> Result<Vec<StoredOrder>, AppError> {
        self.store
            .read(move |tx| -> Result<_, AppError> {
                Ok(storage::orders_of_customer(tx, &customer_id, limit)?)
            })
            .await
    }

    pub async fn local_customer(&self, customer_id: String) -> Result<LocalCustomer, AppError> {
        self.store
            .read(move |tx| -> Result<_, AppError> {
                storage::find_customer(tx, &customer_id)?
                    .ok_or_else(|| AppError::NotFound(format!("customer {customer_id}")))
            })
            .await
    }

    pub async fn local_product(&self, product_id: String) -> Result<LocalProduct, AppError> {
        self.store
            .read(move |tx| -> Result<_, AppError> {
                storage::find_product(tx, &product_id)?
                    .ok_or_else(|| AppError::NotFound(format!("product {product_id}")))
            })
            .await
    }
}
