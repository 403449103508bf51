//! The audit trail of a service's database: one row per operator action
//! (who, by the name of the token they used; what; on which ids; when; and
//! how it ended), appended in the transaction that carries the action out
//! when it changes state, so an action and its record stand or fall
//! together.

use crate::params;
use crate::schema::now_micros;
use crate::store::{Row, Store, StoreError, Tx};

/// One recorded action.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// The entry's id; a later entry has a larger one.
    pub id: i64,
    /// When, in microseconds since the Unix epoch.
    pub at_micros: i64,
    /// The name of the token the action was taken with.
    pub actor: String,
    /// What was done, e.g. `dead-letters.redrive`.
    pub action: String,
    /// What it was done to: a consumer, dead-letter ids, a failure group.
    pub target: String,
    /// How it ended, e.g. `ok: 3 requested` or `refused: unknown consumer`.
    pub result: String,
}

/// Appends an entry in `tx`; returns its id.
pub fn record(
    tx: &mut dyn Tx,
    actor: &str,
    action: &str,
    target: &str,
    result: &str,
) -> Result<i64, StoreError> {
    let row = tx
        .query_opt(
            "INSERT INTO tandem_admin_audit (at, actor, action, target, result)
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
            params![now_micros(), actor, action, target, result],
        )?
        .ok_or_else(|| StoreError::Decode("the audit insert returned no id".into()))?;
    row.i64(0)
}

/// Entries newest first, those with an id below `before` when given; at
/// most `limit`.
pub async fn list<S: Store>(
    store: &S,
    before: Option<i64>,
    limit: u32,
) -> Result<Vec<AuditEntry>, StoreError> {
    store
        .read(move |tx| {
            let rows = tx.query(
                "SELECT id, at, actor, action, target, result FROM tandem_admin_audit
                 WHERE ($1 IS NULL OR id < $1) ORDER BY id DESC LIMIT $2",
                params![before, i64::from(limit)],
            )?;
            rows.iter().map(from_row).collect()
        })
        .await
}

fn from_row(row: &Row) -> Result<AuditEntry, StoreError> {
    Ok(AuditEntry {
        id: row.i64(0)?,
        at_micros: row.i64(1)?,
        actor: row.text(2)?.to_owned(),
        action: row.text(3)?.to_owned(),
        target: row.text(4)?.to_owned(),
        result: row.text(5)?.to_owned(),
    })
}
