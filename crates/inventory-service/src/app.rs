//! The Inventory Service's use cases behind its API. Each write commits the
//! product rows and their events in one transaction of the service's own
//! database. (Reservations, driven by order events, are in
//! [`crate::reservations`].)

use tandem::outbox;
use tandem::store::{Store, StoreError, Tx};
use tandem_contracts::inventory::{ProductCreated, ProductStockChanged};
use tandem_contracts::topics;

use crate::domain::{Delta, InitialStock, Invalid, Name, Price, Product, ProductId, Reason, Sku};
use crate::storage;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("product {0} not found")]
    NotFound(String),
    /// A valid change the product's current stock refuses (it would go
    /// below 0).
    #[error(transparent)]
    Stock(Invalid),
    /// A product with this `field` (`productId` or `sku`) already exists.
    #[error("a product with {field} {value} already exists")]
    AlreadyExists { field: &'static str, value: String },
    #[error("product {0} was changed concurrently; retry")]
    Concurrent(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a new product needs.
#[derive(Debug, Clone)]
pub struct NewProduct {
    pub id: Option<ProductId>,
    pub sku: Sku,
    pub name: Name,
    pub price: Price,
    pub stock: InitialStock,
}

pub(crate) fn now() -> String {
    tandem::envelope::format_time(time::OffsetDateTime::now_utc())
}

/// Saves a change of `product`'s stock (already applied to it; it was at
/// `previous_version` before) and publishes `ProductStockChanged` with
/// `delta` (the change of its available stock) and `reason`, inside `tx`.
/// Sets the product's version to the event's sequence.
///
/// The event is appended after whatever the product's aggregate holds
/// rather than at `previous_version + 1`: product ids and order ids share
/// the `inventory` topic's subjects, so an order with a product's id would
/// otherwise block the product (see the crate docs). The row update is
/// still conditional on `previous_version`.
pub(crate) fn save_stock_change(
    tx: &mut dyn Tx,
    product: &mut Product,
    previous_version: u64,
    delta: i64,
    reason: &str,
) -> Result<(), AppError> {
    let payload = ProductStockChanged {
        product_id: product.id.as_str().to_owned(),
        available: product.available,
        reserved: product.reserved,
        delta,
        reason: reason.to_owned(),
    };
    let envelope = outbox::publish(tx, topics::INVENTORY, product.id.as_str(), &payload)?;
    product.version = envelope.sequence;
    if !storage::save_stock(tx, product, previous_version, &now())? {
        return Err(AppError::Concurrent(product.id.as_str().to_owned()));
    }
    Ok(())
}

#[derive(Clone)]
pub struct Products<S: Store> {
    store: S,
}

impl<S: Store> Products<S> {
    pub fn new(store: S) -> Self {
        Self { store }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub async fn create(&self, new: NewProduct) -> Result<Product, AppError> {
        let mut product = Product {
            id: new.id.unwrap_or_else(ProductId::generate),
            sku: new.sku,
            name: new.name,
            price: new.price,
            available: new.stock.units(),
            reserved: 0,
            version: 0,
        };
        self.store
            .write(move |tx| -> Result<Product, AppError> {
                if storage::find(tx, product.id.as_str())?.is_some() {
                    return Err(AppError::AlreadyExists {
                        field: "productId",
                        value: product.id.as_str().to_owned(),
                    });
                }
                if storage::sku_taken(tx, &product.sku)? {
                    return Err(AppError::AlreadyExists {
                        field: "sku",
                        value: product.sku.as_str().to_owned(),
                    });
                }
                let payload = ProductCreated {
                    product_id: product.id.as_str().to_owned(),
                    sku: product.sku.as_str().to_owned(),
                    name: product.name.as_str().to_owned(),
                    price_cents: product.price.cents(),
                    stock: product.available,
                };
                let envelope =
                    outbox::publish(tx, topics::INVENTORY, product.id.as_str(), &payload)?;
                product.version = envelope.sequence;
                storage::insert(tx, &product, &now())?;
                Ok(product)
            })
            .await
    }

    /// Adds `delta` to the product's available stock (which may not go
    /// below 0) and records the adjustment.
    pub async fn adjust(
        &self,
        id: ProductId,
        delta: Delta,
        reason: Reason,
    ) -> Result<Product, AppError> {
        self.store
            .write(move |tx| -> Result<Product, AppError> {
                let Some(mut product) = storage::find(tx, id.as_str())? else {
                    return Err(AppError::NotFound(id.as_str().to_owned()));
                };
                let previous_version = product.version;
                product.adjust(delta).map_err(AppError::Stock)?;
                save_stock_change(
                    tx,
                    &mut product,
                    previous_version,
                    delta.units(),
                    reason.as_str(),
                )?;
                storage::insert_adjustment(
                    tx,
                    &product.id,
                    product.version,
                    delta.units(),
                    reason.as_str(),
                    &now(),
                )?;
                Ok(product)
            })
            .await
    }

    pub async fn get(&self, id: ProductId) -> Result<Product, AppError> {
        self.store
            .read(move |tx| -> Result<Product, AppError> {
                storage::find(tx, id.as_str())?
                    .ok_or_else(|| AppError::NotFound(id.as_str().to_owned()))
            })
            .await
    }

    pub async fn list(&self, after: Option<String>, limit: u32) -> Result<Vec<Product>, AppError> {
        self.store
            .read(move |tx| -> Result<Vec<Product>, AppError> {
                Ok(storage::page(tx, after.as_deref(), limit)?)
            })
            .await
    }
}

/// Every breach of the stock rules over the whole inventory (see
/// [`storage::stock_violations`]); empty when they all hold.
pub async fn stock_violations<S: Store>(store: &S) -> Result<Vec<String>, StoreError> {
    store.read(storage::stock_violations).await
}
