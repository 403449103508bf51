//! The Order Service's tables, through the toolkit's portable `Tx`:
//! local copies of customers and products, orders, idempotency keys.

use tandem::params;
use tandem::rebuild::ModelTable;
use tandem::store::{Row, StoreError, Tx};

use crate::domain::{PricedLine, Status};

/// The local copies' tables (the read model of consumer
/// `order-local-copies`), by their live names; a side-by-side rebuild
/// fills a copy of each under another name (see [`tandem::rebuild`]).
pub const LOCAL_CUSTOMERS: &str = "local_customers";
pub const LOCAL_PRODUCTS: &str = "local_products";

pub static COPY_TABLES: [ModelTable; 2] = [
    ModelTable {
        name: LOCAL_CUSTOMERS,
        create: "CREATE TABLE IF NOT EXISTS {table} (
            customer_id        TEXT   PRIMARY KEY,
            name               TEXT   NOT NULL,
            email              TEXT   NOT NULL,
            address            TEXT   NOT NULL,
            credit_limit_cents BIGINT NOT NULL,
            sequence           BIGINT NOT NULL,
            changed_at         TEXT   NOT NULL
        )",
    },
    ModelTable {
        name: LOCAL_PRODUCTS,
        create: "CREATE TABLE IF NOT EXISTS {table} (
            product_id  TEXT   PRIMARY KEY,
            sku         TEXT   NOT NULL,
            name        TEXT   NOT NULL,
            price_cents BIGINT NOT NULL,
            available   BIGINT NOT NULL,
            reserved    BIGINT NOT NULL,
            sequence    BIGINT NOT NULL,
            changed_at  TEXT   NOT NULL
        )",
    },
];

pub fn install(tx: &mut dyn Tx) -> Result<(), StoreError> {
    for table in &COPY_TABLES {
        tx.execute_batch(&table.create_as(table.name))?;
    }
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS orders (
            order_id    TEXT   PRIMARY KEY,
            customer_id TEXT   NOT NULL,
            status      TEXT   NOT NULL,
            lines       TEXT   NOT NULL,
            total_cents BIGINT NOT NULL,
            reason      TEXT,
            version     BIGINT NOT NULL,
            created_at  TEXT   NOT NULL,
            updated_at  TEXT   NOT NULL
        );
        CREATE INDEX IF NOT EXISTS orders_by_customer ON orders (customer_id, created_at);
        CREATE TABLE IF NOT EXISTS customer_exposure (
            customer_id TEXT   PRIMARY KEY,
            open_cents  BIGINT NOT NULL
        );
        CREATE TABLE IF NOT EXISTS idempotency_keys (
            idempotency_key TEXT PRIMARY KEY,
            request         TEXT NOT NULL,
            order_id        TEXT NOT NULL
        );",
    )
}

/// The Order Service's copy of a customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalCustomer {
    pub customer_id: String,
    pub name: String,
    pub email: String,
    pub address: String,
    pub credit_limit_cents: i64,
    pub sequence: i64,
    pub changed_at: String,
}

/// The Order Service's copy of a product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalProduct {
    pub product_id: String,
    pub sku: String,
    pub name: String,
    pub price_cents: i64,
    pub available: i64,
    pub reserved: i64,
    pub sequence: i64,
    pub changed_at: String,
}

pub fn find_customer(tx: &mut dyn Tx, id: &str) -> Result<Option<LocalCustomer>, StoreError> {
    find_customer_in(tx, LOCAL_CUSTOMERS, id)
}

/// The copy of customer `id` in `table` (one version of the local copies).
pub fn find_customer_in(
    tx: &mut dyn Tx,
    table: &str,
    id: &str,
) -> Result<Option<LocalCustomer>, StoreError> {
    tx.query_opt(
        &format!(
            "SELECT customer_id, name, email, address, credit_limit_cents, sequence, changed_at
             FROM {table} WHERE customer_id = $1"
        ),
        params![id],
    )?
    .map(|row| {
        Ok(LocalCustomer {
            customer_id: row.text(0)?.to_owned(),
            name: row.text(1)?.to_owned(),
            email: row.text(2)?.to_owned(),
            address: row.text(3)?.to_owned(),
            credit_limit_cents: row.i64(4)?,
            sequence: row.i64(5)?,
            changed_at: row.text(6)?.to_owned(),
        })
    })
    .transpose()
}

pub fn save_customer_in(
    tx: &mut dyn Tx,
    table: &str,
    customer: &LocalCustomer,
) -> Result<(), StoreError> {
    tx.execute(
        &format!(
            "INSERT INTO {table} (customer_id, name, email, address, credit_limit_cents,
               sequence, changed_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (customer_id) DO UPDATE SET name = excluded.name,
               email = excluded.email, address = excluded.address,
               credit_limit_cents = excluded.credit_limit_cents,
               sequence = excluded.sequence, changed_at = excluded.changed_at"
        ),
        params![
            &customer.customer_id,
            &customer.name,
            &customer.email,
            &customer.address,
            customer.credit_limit_cents,
            customer.sequence,
            &customer.changed_at
        ],
    )?;
    Ok(())
}

pub fn find_product(tx: &mut dyn Tx, id: &str) -> Result<Option<LocalProduct>, StoreError> {
    find_product_in(tx, LOCAL_PRODUCTS, id)
}

/// The copy of product `id` in `table` (one version of the local copies).
pub fn find_product_in(
    tx: &mut dyn Tx,
    table: &str,
    id: &str,
) -> Result<Option<LocalProduct>, StoreError> {
    tx.query_opt(
        &format!(
            "SELECT product_id, sku, name, price_cents, available, reserved, sequence, changed_at
             FROM {table} WHERE product_id = $1"
        ),
        params![id],
    )?
    .map(|row| {
        Ok(LocalProduct {
            product_id: row.text(0)?.to_owned(),
            sku: row.text(1)?.to_owned(),
            name: row.text(2)?.to_owned(),
            price_cents: row.i64(3)?,
            available: row.i64(4)?,
            reserved: row.i64(5)?,
            sequence: row.i64(6)?,
            changed_at: row.text(7)?.to_owned(),
        })
    })
    .transpose()
}

pub fn save_product_in(
    tx: &mut dyn Tx,
    table: &str,
    product: &LocalProduct,
) -> Result<(), StoreError> {
    tx.execute(
        &format!(
            "INSERT INTO {table} (product_id, sku, name, price_cents, available, reserved,
               sequence, changed_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (product_id) DO UPDATE SET sku = excluded.sku, name = excluded.name,
               price_cents = excluded.price_cents, available = excluded.available,
               reserved = excluded.reserved, sequence = excluded.sequence,
               changed_at = excluded.changed_at"
        ),
        params![
            &product.product_id,
            &product.sku,
            &product.name,
            product.price_cents,
            product.available,
            product.reserved,
            product.sequence,
            &product.changed_at
        ],
    )?;
    Ok(())
}

/// An order as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOrder {
    pub order_id: String,
    pub customer_id: String,
    pub status: Status,
    pub lines: Vec<PricedLine>,
    pub total_cents: i64,
    pub reason: Option<String>,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
}

const ORDER_COLUMNS: &str =
    "order_id, customer_id, status, lines, total_cents, reason, version, created_at, updated_at";

fn lines_to_json(lines: &[PricedLine]) -> String {
    let values: Vec<serde_json::Value> = lines
        .iter()
        .map(|line| {
            serde_json::json!({
                "productId": line.product_id,
                "quantity": line.quantity,
                "unitPriceCents": line.unit_price_cents,
            })
        })
        .collect();
    serde_json::Value::Array(values).to_string()
}

fn lines_from_json(text: &str) -> Result<Vec<PricedLine>, StoreError> {
    let values: Vec<serde_json::Value> = serde_json::from_str(text)
        .map_err(|error| StoreError::Decode(format!("order lines: {error}").into()))?;
    values
        .iter()
        .map(|value| {
            let text = |name: &str| value[name].as_str().map(str::to_owned);
            let number = |name: &str| value[name].as_i64();
            match (
                text("productId"),
                number("quantity"),
                number("unitPriceCents"),
            ) {
                (Some(product_id), Some(quantity), Some(unit_price_cents)) => Ok(PricedLine {
                    product_id,
                    quantity,
                    unit_price_cents,
                }),
                _ => Err(StoreError::Decode(format!("order line {value}").into())),
            }
        })
        .collect()
}

fn order_from_row(row: &Row) -> Result<StoredOrder, StoreError> {
    Ok(StoredOrder {
        order_id: row.text(0)?.to_owned(),
        customer_id: row.text(1)?.to_owned(),
        status: Status::parse(row.text(2)?)
            .ok_or_else(|| StoreError::Decode(format!("order status {:?}", row.text(2)).into()))?,
        lines: lines_from_json(row.text(3)?)?,
        total_cents: row.i64(4)?,
        reason: row.opt_text(5)?.map(str::to_owned),
        version: row.i64(6)?,
        created_at: row.text(7)?.to_owned(),
        updated_at: row.text(8)?.to_owned(),
    })
}

pub fn find_order(tx: &mut dyn Tx, id: &str) -> Result<Option<StoredOrder>, StoreError> {
    tx.query_opt(
        &format!("SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = $1"),
        params![id],
    )?
    .as_ref()
    .map(order_from_row)
    .transpose()
}

pub fn orders_of_customer(
    tx: &mut dyn Tx,
    customer_id: &str,
    limit: u32,
) -> Result<Vec<StoredOrder>, StoreError> {
    tx.query(
        &format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE customer_id = $1
             ORDER BY created_at, order_id LIMIT $2"
        ),
        params![customer_id, limit],
    )?
    .iter()
    .map(order_from_row)
    .collect()
}

/// Pending and confirmed totals of a customer, in cents: kept in
/// `customer_exposure` by [`insert_order`] and [`update_status`], so the
/// credit check costs one lookup however many orders a customer has.
pub fn open_total(tx: &mut dyn Tx, customer_id: &str) -> Result<i64, StoreError> {
    Ok(tx
        .query_opt(
            "SELECT open_cents FROM customer_exposure WHERE customer_id = $1",
            params![customer_id],
        )?
        .map(|row| row.i64(0))
        .transpose()?
        .unwrap_or(0))
}

fn is_open(status: Status) -> bool {
    matches!(status, Status::Pending | Status::Confirmed)
}

fn add_exposure(tx: &mut dyn Tx, customer_id: &str, cents: i64) -> Result<(), StoreError> {
    let changed = tx.execute(
        "UPDATE customer_exposure SET open_cents = open_cents + $2 WHERE customer_id = $1",
        params![customer_id, cents],
    )?;
    if changed == 0 {
        tx.execute(
            "INSERT INTO customer_exposure (customer_id, open_cents) VALUES ($1, $2)",
            params![customer_id, cents],
        )?;
    }
    Ok(())
}

pub fn insert_order(tx: &mut dyn Tx, order: &StoredOrder) -> Result<(), StoreError> {
    if is_open(order.status) {
        add_exposure(tx, &order.customer_id, order.total_cents)?;
    }
    tx.execute(
        &format!(
            "INSERT INTO orders ({ORDER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        ),
        params![
            &order.order_id,
            &order.customer_id,
            order.status.as_str(),
            &lines_to_json(&order.lines),
            order.total_cents,
            order.reason.as_ref(),
            order.version,
            &order.created_at,
            &order.updated_at
        ],
    )?;
    Ok(())
}

/// Moves an order from (`from_status`, `from_version`) to its new status
/// and version, keeping the customer's open total.
pub fn update_status(
    tx: &mut dyn Tx,
    order: &StoredOrder,
    from_status: Status,
    from_version: i64,
) -> Result<bool, StoreError> {
    let changed = tx.execute(
        "UPDATE orders SET status = $2, reason = $3, version = $4, updated_at = $5
         WHERE order_id = $1 AND version = $6",
        params![
            &order.order_id,
            order.status.as_str(),
            order.reason.as_ref(),
            order.version,
            &order.updated_at,
            from_version
        ],
    )?;
    if changed == 1 && is_open(from_status) != is_open(order.status) {
        let sign = if is_open(order.status) { 1 } else { -1 };
        add_exposure(tx, &order.customer_id, sign * order.total_cents)?;
    }
    Ok(changed == 1)
}

/// The request and order an idempotency key was first used with.
pub fn find_idempotency_key(
    tx: &mut dyn Tx,
    key: &str,
) -> Result<Option<(String, String)>, StoreError> {
    tx.query_opt(
        "SELECT request, order_id FROM idempotency_keys WHERE idempotency_key = $1",
        params![key],
    )?
    .map(|row| Ok((row.text(0)?.to_owned(), row.text(1)?.to_owned())))
    .transpose()
}

pub fn save_idempotency_key(
    tx: &mut dyn Tx,
    key: &str,
    request: &str,
    order_id: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO idempotency_keys (idempotency_key, request, order_id) VALUES ($1, $2, $3)",
        params![key, request, order_id],
    )?;
    Ok(())
}

/// Up to `limit` orders whose id sorts after `after`, in id order.
pub fn page_orders(
    tx: &mut dyn Tx,
    after: Option<&str>,
    limit: u32,
) -> Result<Vec<StoredOrder>, StoreError> {
    tx.query(
        &format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE order_id > $1 ORDER BY order_id LIMIT $2"
        ),
        params![after.unwrap_or(""), limit],
    )?
    .iter()
    .map(order_from_row)
    .collect()
}

/// The Order Service's orders as snapshot events (`OrderSnapshot`), for a
/// re-publication when its outbox no longer holds their history.
pub fn snapshots() -> impl tandem::republish::Snapshots {
    tandem::republish::Pages::new(
        tandem_contracts::topics::ORDER,
        |tx: &mut dyn Tx, after: Option<&str>, limit: u32| {
            page_orders(tx, after, limit)?
                .into_iter()
                .map(|order| {
                    tandem::outbox::NewEvent::new(
                        &order.order_id,
                        &tandem_contracts::order::OrderSnapshot {
                            order_id: order.order_id.clone(),
                            customer_id: order.customer_id,
                            status: order.status.as_str().to_owned(),
                            lines: order
                                .lines
                                .into_iter()
                                .map(|line| tandem_contracts::order::PricedLine {
                                    product_id: line.product_id,
                                    quantity: line.quantity,
                                    unit_price_cents: line.unit_price_cents,
                                })
                                .collect(),
                            total_cents: order.total_cents,
                            reason: order.reason,
                        },
                    )
                })
                .collect()
        },
    )
}
