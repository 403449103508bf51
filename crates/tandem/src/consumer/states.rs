//! Aggregate states: per aggregate, the last sequence applied and the dead

//! letter that blocks it, read and written in a batch's transaction.

use std::collections::BTreeMap;

use super::batch::{BatchContext, Mode};

use crate::bus::Record;

use crate::params;

use crate::store::{Dialect, StoreError, Tx};

/// The last applied sequence of an aggregate, and the dead letter that
/// blocks it, if any.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct AggregateState {
    pub(super) applied: u64,
    pub(super) blocked_by: Option<i64>,
    /// Whether the row exists yet (an insert or an update saves it).
    pub(super) stored: bool,
    /// Saved in a batch but not written yet (see [`BatchContext::flush_states`]).
    pub(super) dirty: bool,
}

fn aggregate_state(
    tx: &mut dyn Tx,
    consumer: &str,
    source: &str,
    subject: &str,
) -> Result<AggregateState, StoreError> {
    let row = tx.query_opt(
        "SELECT sequence, blocked_by FROM tandem_consumer_aggregates
         WHERE consumer = $1 AND source = $2 AND subject = $3",
        params![consumer, source, subject],
    )?;
    Ok(match row {
        None => AggregateState::default(),
        Some(row) => AggregateState {
            applied: u64::try_from(row.i64(0)?).unwrap_or(0),
            blocked_by: row.opt_i64(1)?,
            stored: true,
            dirty: false,
        },
    })
}

fn save_aggregate_state(
    tx: &mut dyn Tx,
    consumer: &str,
    source: &str,
    subject: &str,
    state: AggregateState,
) -> Result<(), StoreError> {
    // A plain insert or update: an upsert costs SQLite a statement journal.
    let sql = if state.stored {
        "UPDATE tandem_consumer_aggregates SET sequence = $4, blocked_by = $5
         WHERE consumer = $1 AND source = $2 AND subject = $3"
    } else {
        "INSERT INTO tandem_consumer_aggregates (consumer, source, subject, sequence, blocked_by)
         VALUES ($1, $2, $3, $4, $5)"
    };
    tx.execute(
        sql,
        params![consumer, source, subject, state.applied, state.blocked_by],
    )?;
    Ok(())
}

impl BatchContext {
    pub(super) fn state(
        &self,
        tx: &mut dyn Tx,
        source: &str,
        subject: &str,
    ) -> Result<AggregateState, StoreError> {
        if let Some(state) = self
            .states
            .borrow()
            .get(source)
            .and_then(|subjects| subjects.get(subject))
        {
            return Ok(*state);
        }
        let state = aggregate_state(tx, &self.consumer, source, subject)?;
        self.put_state(source, subject, state);
        Ok(state)
    }

    fn put_state(&self, source: &str, subject: &str, state: AggregateState) {
        let mut states = self.states.borrow_mut();
        let subjects = match states.get_mut(source) {
            Some(subjects) => subjects,
            None => states.entry(source.to_owned()).or_default(),
        };
        match subjects.get_mut(subject) {
            Some(slot) => *slot = state,
            None => {
                subjects.insert(subject.to_owned(), state);
            }
        }
    }

    pub(super) fn save_state(
        &self,
        tx: &mut dyn Tx,
        source: &str,
        subject: &str,
        mut state: AggregateState,
    ) -> Result<(), StoreError> {
        if !matches!(self.mode, Mode::Isolated) {
            // `stored` keeps saying whether the row exists in the table.
            state.dirty = true;
        } else {
            save_aggregate_state(tx, &self.consumer, source, subject, state)?;
            state.stored = true;
        }
        self.put_state(source, subject, state);
        Ok(())
    }

    /// Writes the states saved since the last flush, in key order.
    /// PostgreSQL: one upsert fed by a JSON array (a round trip per
    /// aggregate was most of a batch's time). SQLite: an upsert per source
    /// fed by a JSON object (an update per aggregate cost more; so did an
    /// upsert that extracted four fields of each JSON array element).
    pub(super) fn flush_states(&self, tx: &mut dyn Tx) -> Result<(), StoreError> {
        let mut states = self.states.borrow_mut();
        let mut dirty: Vec<(&str, &str, &mut AggregateState)> = states
            .iter_mut()
            .flat_map(|(source, subjects)| {
                subjects
                    .iter_mut()
                    .filter(|(_, state)| state.dirty)
                    .map(move |(subject, state)| (source.as_str(), subject.as_str(), state))
            })
            .collect();
        if dirty.is_empty() {
            return Ok(());
        }
        dirty.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        if tx.dialect() == Dialect::Postgres {
            let rows: Vec<(&str, &str, u64, Option<i64>)> = dirty
                .iter()
                .map(|(source, subject, state)| {
                    (*source, *subject, state.applied, state.blocked_by)
                })
                .collect();
            let rows = serde_json::to_string(&rows)
                .map_err(|error| StoreError::Engine(format!("aggregate states: {error}")))?;
            tx.execute(
                "INSERT INTO tandem_consumer_aggregates (consumer, source, subject, sequence, blocked_by)
                 SELECT $1, item->>0, item->>1, (item->>2)::bigint, (item->>3)::bigint
                 FROM jsonb_array_elements($2::text::jsonb) AS item
                 ON CONFLICT (consumer, source, subject)
                 DO UPDATE SET sequence = EXCLUDED.sequence, blocked_by = EXCLUDED.blocked_by",
                params![&self.consumer, rows.as_str()],
            )?;
        } else {
            // Per source, the unblocked states (nearly all) in one upsert
            // fed by a `{subject: sequence}` object, whose pairs json_each
            // gives as `key` and `value`; blocked ones one by one. (An
            // update of the stored ones plus an insert of the new ones
            // cost a fifth more: SQLite's UPDATE ... FROM materialises the
            // join first.)
            let mut unblocked: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
            for (source, subject, state) in &dirty {
                if state.blocked_by.is_none() {
                    unblocked
                        .entry(source)
                        .or_default()
                        .insert(subject, state.applied);
                } else {
                    save_aggregate_state(tx, &self.consumer, source, subject, **state)?;
                }
            }
            for (source, sequences) in unblocked {
                let sequences = serde_json::to_string(&sequences)
                    .map_err(|error| StoreError::Engine(format!("aggregate states: {error}")))?;
                tx.execute(
                    "INSERT INTO tandem_consumer_aggregates (consumer, source, subject, sequence, blocked_by)
                     SELECT $1, $2, key, value, NULL FROM json_each($3) WHERE true
                     ON CONFLICT (subject, source, consumer)
                     DO UPDATE SET sequence = excluded.sequence, blocked_by = NULL",
                    params![&self.consumer, source, sequences.as_str()],
                )?;
            }
        }
        for (_, _, state) in dirty {
            state.stored = true;
            state.dirty = false;
        }
        Ok(())
    }

    /// Loads the states of the aggregates `records` are about (by topic and
    /// key, which the relay sets to source and subject): one query per
    /// topic, a lookup in the key's index per subject of a JSON list.
    /// PostgreSQL: `LATERAL ... LIMIT 1` keeps the planner from a hash join
    /// that scans every state; `= ANY (array)` took three times as long; an
    /// `IN` list of hundreds of parameters got a generic plan that cost
    /// tens of milliseconds. SQLite: a join from `json_each` into the key
    /// (a quarter cheaper than `IN (SELECT ... json_each)`, which builds a
    /// temporary index first; `IN` lists of parameters took a statement per
    /// 200 subjects).
    pub(super) fn preload_states(
        &self,
        tx: &mut dyn Tx,
        records: &[Record],
    ) -> Result<(), StoreError> {
        let mut wanted: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for record in records {
            wanted.entry(&record.topic).or_default().push(&record.key);
        }
        let postgres = tx.dialect() == Dialect::Postgres;
        let mut states = self.states.borrow_mut();
        for (source, mut subjects) in wanted {
            subjects.sort_unstable();
            subjects.dedup();
            let known = states.entry(source.to_owned()).or_default();
            known.reserve(subjects.len());
            for subject in &subjects {
                if !known.contains_key(*subject) {
                    known.insert((*subject).to_owned(), AggregateState::default());
                }
            }
            let list = serde_json::to_string(&subjects)
                .map_err(|error| StoreError::Engine(error.to_string()))?;
            let rows = tx.query(
                if postgres {
                    "SELECT wanted.subject, a.sequence, a.blocked_by
                     FROM jsonb_array_elements_text($3::text::jsonb) AS wanted(subject)
                     CROSS JOIN LATERAL (
                       SELECT sequence, blocked_by FROM tandem_consumer_aggregates
                       WHERE consumer = $1 AND source = $2 AND subject = wanted.subject
                       LIMIT 1
                     ) AS a"
                } else {
                    "SELECT a.subject, a.sequence, a.blocked_by
                     FROM json_each($3) AS wanted CROSS JOIN tandem_consumer_aggregates AS a
                     WHERE a.subject = wanted.value AND a.source = $2 AND a.consumer = $1"
                },
                params![&self.consumer, source, list.as_str()],
            )?;
            for row in rows {
                // A state saved earlier in this transaction is newer than
                // the table's.
                if let Some(state) = known.get_mut(row.text(0)?) {
                    if !state.dirty {
                        *state = AggregateState {
                            applied: u64::try_from(row.i64(1)?).unwrap_or(0),
                            blocked_by: row.opt_i64(2)?,
                            stored: true,
                            dirty: false,
                        };
                    }
                }
            }
        }
        Ok(())
    }
}
