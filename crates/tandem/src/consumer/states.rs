//! Aggregate states: per aggregate, the last sequence applied and the dead

//! letter that blocks it, read and written in a batch's transaction.

use std::collections::BTreeMap;

use super::batch::{BatchContext, Mode};

use crate::bus::Record;

use crate::params;

use crate::sql::AggregateStateRow;

use crate::store::{StoreError, Tx};

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
            crate::sql::save_aggregate_state(
                tx,
                &self.consumer,
                &AggregateStateRow {
                    source,
                    subject,
                    applied: state.applied,
                    blocked_by: state.blocked_by,
                    stored: state.stored,
                },
            )?;
            state.stored = true;
        }
        self.put_state(source, subject, state);
        Ok(())
    }

    /// Writes the states saved since the last flush, in key order, in the
    /// engine's fewest statements
    /// ([`crate::sql::EngineSql::save_aggregate_states`]: a round trip per
    /// aggregate was most of a batch's time).
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
        let rows: Vec<AggregateStateRow<'_>> = dirty
            .iter()
            .map(|(source, subject, state)| AggregateStateRow {
                source,
                subject,
                applied: state.applied,
                blocked_by: state.blocked_by,
                stored: state.stored,
            })
            .collect();
        tx.engine()
            .save_aggregate_states(tx, &self.consumer, &rows)?;
        drop(rows);
        for (_, _, state) in dirty {
            state.stored = true;
            state.dirty = false;
        }
        Ok(())
    }

    /// Loads the states of the aggregates `records` are about (by topic and
    /// key, which the relay sets to source and subject): one query per
    /// topic, a lookup in the key's index per subject of a list
    /// ([`crate::sql::EngineSql::load_aggregate_states`]).
    pub(super) fn preload_states(
        &self,
        tx: &mut dyn Tx,
        records: &[Record],
    ) -> Result<(), StoreError> {
        let mut wanted: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for record in records {
            wanted.entry(&record.topic).or_default().push(&record.key);
        }
        let engine = tx.engine();
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
            let stored = engine.load_aggregate_states(tx, &self.consumer, source, &subjects)?;
            for row in stored {
                // A state saved earlier in this transaction is newer than
                // the table's.
                if let Some(state) = known.get_mut(row.subject.as_str()) {
                    if !state.dirty {
                        *state = AggregateState {
                            applied: row.applied,
                            blocked_by: row.blocked_by,
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
