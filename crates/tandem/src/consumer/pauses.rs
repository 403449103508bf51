//! Pausing a consumer: a row in `tandem_consumer_paused` of its database,
//! written by an operator and read by every member of the consumer. A
//! paused member leaves its group and applies nothing until the row is
//! gone; its events wait on the bus, and its lag grows as it would while
//! the service is down. Because the row lives with the consumer's
//! positions, a pause holds across restarts and for every instance.

use crate::params;
use crate::schema::now_micros;
use crate::store::{StoreError, Tx};

/// Pauses `consumer` on behalf of `by`; `false` if it was paused already.
pub fn pause_in(tx: &mut dyn Tx, consumer: &str, by: &str) -> Result<bool, StoreError> {
    if paused_in(tx, consumer)? {
        return Ok(false);
    }
    tx.execute(
        "INSERT INTO tandem_consumer_paused (consumer, paused_at, paused_by) VALUES ($1, $2, $3)",
        params![consumer, now_micros(), by],
    )?;
    Ok(true)
}

/// Resumes `consumer`; `false` if it was not paused.
pub fn resume_in(tx: &mut dyn Tx, consumer: &str) -> Result<bool, StoreError> {
    let removed = tx.execute(
        "DELETE FROM tandem_consumer_paused WHERE consumer = $1",
        params![consumer],
    )?;
    Ok(removed > 0)
}

/// Whether `consumer` is paused.
pub fn paused_in(tx: &mut dyn Tx, consumer: &str) -> Result<bool, StoreError> {
    Ok(tx
        .query_opt(
            "SELECT 1 FROM tandem_consumer_paused WHERE consumer = $1",
            params![consumer],
        )?
        .is_some())
}
