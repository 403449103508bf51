//! The inventory's tables, through the toolkit's portable `Tx`.
//!
//! - `products`: one row per product, with its stock split into `available`
//!   and `reserved`, and the stock it started with.
//! - `stock_adjustments`: every adjustment made through the API, keyed by
//!   the product version it produced.
//! - `reservations` and `reservation_lines`: what became of each order's
//!   `OrderPlaced`, keyed by order id, and what it holds per product.
//!
//! Together they make stock auditable: see [`stock_violations`].

use tandem::params;
use tandem::store::{Row, StoreError, Tx};

use crate::domain::{Demand, Name, Price, Product, ProductId, Reservation, ReservationStatus, Sku};

pub fn install(tx: &mut dyn Tx) -> Result<(), StoreError> {
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS products (
            product_id    TEXT    PRIMARY KEY,
            sku           TEXT    NOT NULL UNIQUE,
            name          TEXT    NOT NULL,
            price_cents   BIGINT  NOT NULL,
            initial_stock BIGINT  NOT NULL CHECK (initial_stock >= 0),
            available     BIGINT  NOT NULL CHECK (available >= 0),
            reserved      BIGINT  NOT NULL CHECK (reserved >= 0),
            version       BIGINT  NOT NULL,
            created_at    TEXT    NOT NULL,
            updated_at    TEXT    NOT NULL
        );
        CREATE TABLE IF NOT EXISTS stock_adjustments (
            product_id  TEXT    NOT NULL REFERENCES products (product_id),
            version     BIGINT  NOT NULL,
            delta       BIGINT  NOT NULL,
            reason      TEXT    NOT NULL,
            adjusted_at TEXT    NOT NULL,
            PRIMARY KEY (product_id, version)
        );
        CREATE TABLE IF NOT EXISTS reservations (
            order_id   TEXT PRIMARY KEY,
            status     TEXT NOT NULL CHECK (status IN ('reserved', 'failed', 'released')),
            reason     TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE TABLE IF NOT EXISTS reservation_lines (
            order_id   TEXT   NOT NULL REFERENCES reservations (order_id),
            position   BIGINT NOT NULL,
            product_id TEXT   NOT NULL REFERENCES products (product_id),
            quantity   BIGINT NOT NULL CHECK (quantity > 0),
            PRIMARY KEY (order_id, product_id)
        );
        CREATE INDEX IF NOT EXISTS reservation_lines_by_product
            ON reservation_lines (product_id);",
    )
}

const COLUMNS: &str = "product_id, sku, name, price_cents, available, reserved, version";

fn from_row(row: &Row) -> Result<Product, StoreError> {
    let corrupt = |error: crate::domain::Invalid| StoreError::Decode(error.to_string().into());
    Ok(Product {
        id: ProductId::parse(row.text(0)?).map_err(corrupt)?,
        sku: Sku::parse(row.text(1)?).map_err(corrupt)?,
        name: Name::parse(row.text(2)?).map_err(corrupt)?,
        price: Price::parse(row.i64(3)?).map_err(corrupt)?,
        available: row.i64(4)?,
        reserved: row.i64(5)?,
        version: u64::try_from(row.i64(6)?).unwrap_or(0),
    })
}

/// The product `id`, if any. Takes any text, so that ids named by other
/// services' events need no parsing first.
pub fn find(tx: &mut dyn Tx, id: &str) -> Result<Option<Product>, StoreError> {
    tx.query_opt(
        &format!("SELECT {COLUMNS} FROM products WHERE product_id = $1"),
        params![id],
    )?
    .as_ref()
    .map(from_row)
    .transpose()
}

pub fn sku_taken(tx: &mut dyn Tx, sku: &Sku) -> Result<bool, StoreError> {
    Ok(tx
        .query_opt(
            "SELECT 1 FROM products WHERE sku = $1",
            params![sku.as_str()],
        )?
        .is_some())
}

/// Products after `after` (by id), at most `limit`.
pub fn page(tx: &mut dyn Tx, after: Option<&str>, limit: u32) -> Result<Vec<Product>, StoreError> {
    tx.query(
        &format!(
            "SELECT {COLUMNS} FROM products WHERE product_id > $1 ORDER BY product_id LIMIT $2"
        ),
        params![after.unwrap_or(""), limit],
    )?
    .iter()
    .map(from_row)
    .collect()
}

/// Inserts a new product; its `available` is its initial stock.
pub fn insert(tx: &mut dyn Tx, product: &Product, now: &str) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO products (product_id, sku, name, price_cents, initial_stock, available,
           reserved, version, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8, $8)",
        params![
            product.id.as_str(),
            product.sku.as_str(),
            product.name.as_str(),
            product.price.cents(),
            product.available,
            product.reserved,
            product.version,
            now
        ],
    )?;
    Ok(())
}

/// Saves `product`'s stock and version if its stored version is still
/// `previous_version`.
pub fn save_stock(
    tx: &mut dyn Tx,
    product: &Product,
    previous_version: u64,
    now: &str,
) -> Result<bool, StoreError> {
    let changed = tx.execute(
        "UPDATE products SET available = $2, reserved = $3, version = $4, updated_at = $5
         WHERE product_id = $1 AND version = $6",
        params![
            product.id.as_str(),
            product.available,
            product.reserved,
            product.version,
            now,
            previous_version
        ],
    )?;
    Ok(changed == 1)
}

/// Records an adjustment made through the API; `version` is the product
/// version it produced.
pub fn insert_adjustment(
    tx: &mut dyn Tx,
    product_id: &ProductId,
    version: u64,
    delta: i64,
    reason: &str,
    now: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO stock_adjustments (product_id, version, delta, reason, adjusted_at)
         VALUES ($1, $2, $3, $4, $5)",
        params![product_id.as_str(), version, delta, reason, now],
    )?;
    Ok(())
}

pub fn find_reservation(
    tx: &mut dyn Tx,
    order_id: &str,
) -> Result<Option<Reservation>, StoreError> {
    let Some(row) = tx.query_opt(
        "SELECT status, reason FROM reservations WHERE order_id = $1",
        params![order_id],
    )?
    else {
        return Ok(None);
    };
    let status = ReservationStatus::parse(row.text(0)?).ok_or_else(|| {
        StoreError::Decode(format!("reservation {order_id}: unknown status").into())
    })?;
    let reason = row.opt_text(1)?.map(str::to_owned);
    let lines = tx
        .query(
            "SELECT product_id, quantity FROM reservation_lines WHERE order_id = $1
             ORDER BY position",
            params![order_id],
        )?
        .iter()
        .map(|row| {
            Ok(Demand {
                product_id: row.text(0)?.to_owned(),
                quantity: row.i64(1)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Some(Reservation {
        order_id: order_id.to_owned(),
        status,
        lines,
        reason,
    }))
}

pub fn insert_reservation(
    tx: &mut dyn Tx,
    reservation: &Reservation,
    now: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO reservations (order_id, status, reason, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $4)",
        params![
            reservation.order_id.as_str(),
            reservation.status.as_str(),
            reservation.reason.as_deref(),
            now
        ],
    )?;
    for (position, line) in reservation.lines.iter().enumerate() {
        tx.execute(
            "INSERT INTO reservation_lines (order_id, position, product_id, quantity)
             VALUES ($1, $2, $3, $4)",
            params![
                reservation.order_id.as_str(),
                position as u64,
                line.product_id.as_str(),
                line.quantity
            ],
        )?;
    }
    Ok(())
}

/// Moves a reservation from status `from` to `to`; false if it was not in
/// `from`.
pub fn set_reservation_status(
    tx: &mut dyn Tx,
    order_id: &str,
    from: ReservationStatus,
    to: ReservationStatus,
    now: &str,
) -> Result<bool, StoreError> {
    let changed = tx.execute(
        "UPDATE reservations SET status = $3, updated_at = $4 WHERE order_id = $1 AND status = $2",
        params![order_id, from.as_str(), to.as_str(), now],
    )?;
    Ok(changed == 1)
}

/// Checks the stock rules over the whole inventory and returns every
/// breach, one line each (empty when all hold). Per product:
///
/// - conservation: initial stock + the sum of its adjustments
///   == available + reserved;
/// - `reserved` == the sum of the lines of reservations still `reserved`
///   (so no reservation holds stock that did not exist);
/// - neither `available` nor `reserved` is negative.
pub fn stock_violations(tx: &mut dyn Tx) -> Result<Vec<String>, StoreError> {
    let rows = tx.query(
        "SELECT p.product_id, p.initial_stock, p.available, p.reserved,
           COALESCE((SELECT SUM(a.delta) FROM stock_adjustments a
                     WHERE a.product_id = p.product_id), 0),
           COALESCE((SELECT SUM(l.quantity) FROM reservation_lines l
                     JOIN reservations r ON r.order_id = l.order_id
                     WHERE l.product_id = p.product_id AND r.status = 'reserved'), 0)
         FROM products p ORDER BY p.product_id",
        &[],
    )?;
    let mut violations = Vec::new();
    for row in rows {
        let id = row.text(0)?;
        let (initial, available, reserved, adjusted, held) = (
            row.i64(1)?,
            row.i64(2)?,
            row.i64(3)?,
            row.i64(4)?,
            row.i64(5)?,
        );
        if initial + adjusted != available + reserved {
            violations.push(format!(
                "product {id}: initial stock {initial} + adjustments {adjusted} != \
                 available {available} + reserved {reserved}"
            ));
        }
        if reserved != held {
            violations.push(format!(
                "product {id}: reserved {reserved} != {held} held by open reservations"
            ));
        }
        if available < 0 || reserved < 0 {
            violations.push(format!(
                "product {id}: negative stock (available {available}, reserved {reserved})"
            ));
        }
    }
    Ok(violations)
}

/// The snapshot of every product, for a re-publication
/// ([`tandem::republish`]): its whole state as a `ProductSnapshot`.
/// Reservations (subject: an order id) have none: an order's answer is
/// an event the Order Service acts on once, not state to copy.
pub fn snapshots() -> impl tandem::republish::Snapshots {
    tandem::republish::Pages::new(
        tandem_contracts::topics::INVENTORY,
        |tx: &mut dyn Tx, after: Option<&str>, limit: u32| {
            page(tx, after, limit)?
                .into_iter()
                .map(|product| {
                    tandem::outbox::NewEvent::new(
                        product.id.as_str(),
                        &tandem_contracts::inventory::ProductSnapshot {
                            product_id: product.id.as_str().to_owned(),
                            sku: product.sku.as_str().to_owned(),
                            name: product.name.as_str().to_owned(),
                            price_cents: product.price.cents(),
                            available: product.available,
                            reserved: product.reserved,
                        },
                    )
                })
                .collect()
        },
    )
}
