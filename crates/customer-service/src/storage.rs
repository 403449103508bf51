//! The customers table, through the toolkit's portable `Tx`.

use tandem::params;
use tandem::store::{Row, StoreError, Tx};

use crate::domain::{Address, CreditLimit, Customer, CustomerId, Email, Name};

pub fn install(tx: &mut dyn Tx) -> Result<(), StoreError> {
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS customers (
            customer_id        TEXT    PRIMARY KEY,
            name               TEXT    NOT NULL,
            email              TEXT    NOT NULL,
            address            TEXT    NOT NULL,
            credit_limit_cents BIGINT  NOT NULL,
            version            BIGINT  NOT NULL,
            created_at         TEXT    NOT NULL,
            updated_at         TEXT    NOT NULL
        )",
    )
}

const COLUMNS: &str = "customer_id, name, email, address, credit_limit_cents, version";

fn from_row(row: &Row) -> Result<Customer, StoreError> {
    let corrupt = |error: crate::domain::Invalid| StoreError::Decode(error.to_string().into());
    Ok(Customer {
        id: CustomerId::parse(row.text(0)?).map_err(corrupt)?,
        name: Name::parse(row.text(1)?).map_err(corrupt)?,
        email: Email::parse(row.text(2)?).map_err(corrupt)?,
        address: Address::parse(row.text(3)?).map_err(corrupt)?,
        credit_limit: CreditLimit::parse(row.i64(4)?).map_err(corrupt)?,
        version: u64::try_from(row.i64(5)?).unwrap_or(0),
    })
}

pub fn find(tx: &mut dyn Tx, id: &CustomerId) -> Result<Option<Customer>, StoreError> {
    tx.query_opt(
        &format!("SELECT {COLUMNS} FROM customers WHERE customer_id = $1"),
        params![id.as_str()],
    )?
    .as_ref()
    .map(from_row)
    .transpose()
}

/// Customers after `after` (by id), at most `limit`.
pub fn page(tx: &mut dyn Tx, after: Option<&str>, limit: u32) -> Result<Vec<Customer>, StoreError> {
    tx.query(
        &format!(
            "SELECT {COLUMNS} FROM customers WHERE customer_id > $1 ORDER BY customer_id LIMIT $2"
        ),
        params![after.unwrap_or(""), limit],
    )?
    .iter()
    .map(from_row)
    .collect()
}

pub fn insert(tx: &mut dyn Tx, customer: &Customer, now: &str) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO customers (customer_id, name, email, address, credit_limit_cents, version,
           created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
        params![
            customer.id.as_str(),
            customer.name.as_str(),
            customer.email.as_str(),
            customer.address.as_str(),
            customer.credit_limit.cents(),
            customer.version,
            now
        ],
    )?;
    Ok(())
}

/// Saves `customer` if its stored version is still `previous_version`.
pub fn update(
    tx: &mut dyn Tx,
    customer: &Customer,
    previous_version: u64,
    now: &str,
) -> Result<bool, StoreError> {
    let changed = tx.execute(
        "UPDATE customers SET name = $2, email = $3, address = $4, credit_limit_cents = $5,
           version = $6, updated_at = $7
         WHERE customer_id = $1 AND version = $8",
        params![
            customer.id.as_str(),
            customer.name.as_str(),
            customer.email.as_str(),
            customer.address.as_str(),
            customer.credit_limit.cents(),
            customer.version,
            now,
            previous_version
        ],
    )?;
    Ok(changed == 1)
}

/// The snapshot of every customer, for a re-publication
/// ([`tandem::republish`]): its whole state as a `CustomerSnapshot`.
pub fn snapshots() -> impl tandem::republish::Snapshots {
    tandem::republish::Pages::new(
        tandem_contracts::topics::CUSTOMER,
        |tx: &mut dyn Tx, after: Option<&str>, limit: u32| {
            page(tx, after, limit)?
                .into_iter()
                .map(|customer| {
                    tandem::outbox::NewEvent::new(
                        customer.id.as_str(),
                        &tandem_contracts::customer::CustomerSnapshot {
                            customer_id: customer.id.as_str().to_owned(),
                            name: customer.name.as_str().to_owned(),
                            email: customer.email.as_str().to_owned(),
                            address: customer.address.as_str().to_owned(),
                            credit_limit_cents: customer.credit_limit.cents(),
                        },
                    )
                })
                .collect()
        },
    )
}
