//! Ordering and gaps: events ahead of a gap are held until it fills,

//! discarded sequences are skipped, and a gap watched for `gap_timeout`

//! parks what waits behind it.

use std::sync::Arc;

use std::time::Duration;

use tokio::time::Instant;

use super::batch::{BatchContext, Mode};

use super::states::AggregateState;

use super::Consumer;

use crate::bus::Record;

use crate::dead_letter::{self, Reason};

use crate::envelope::Envelope;

use crate::params;

use crate::schema::now_micros;

use crate::store::{Store, StoreError, Tx};

impl BatchContext {
    /// Moves `state.applied` over the discarded sequences that follow it
    /// without a gap: an aggregate skips an event an operator discarded
    /// when it reaches it. Returns whether it moved.
    pub(super) fn skip_discarded(
        &self,
        tx: &mut dyn Tx,
        source: &str,
        subject: &str,
        state: &mut AggregateState,
    ) -> Result<bool, StoreError> {
        if !self.discarded_possible.get() {
            return Ok(false);
        }
        let rows = tx.query(
            "SELECT DISTINCT sequence FROM tandem_dead_letters
             WHERE consumer = $1 AND subject = $2 AND source = $3 AND sequence > $4
               AND status = 'discarded'
             ORDER BY sequence",
            params![&self.consumer, subject, source, state.applied],
        )?;
        let before = state.applied;
        for row in rows {
            let sequence = u64::try_from(row.i64(0)?).unwrap_or(0);
            if Some(sequence) != state.applied.checked_add(1) {
                break;
            }
            state.applied = sequence;
        }
        Ok(state.applied != before)
    }

    pub(super) fn hold(
        &self,
        tx: &mut dyn Tx,
        record: &Record,
        envelope: &Envelope,
    ) -> Result<(), StoreError> {
        self.pending_possible.set(true);
        tx.execute(
            "INSERT INTO tandem_pending (consumer, source, subject, sequence, topic, partition,
               record_offset, payload, received_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (consumer, source, subject, sequence) DO NOTHING",
            &[
                self.consumer.as_str().into(),
                envelope.source.as_str().into(),
                envelope.subject.as_str().into(),
                envelope.sequence.into(),
                record.topic.as_str().into(),
                record.partition.into(),
                record.offset.into(),
                record.payload.as_slice().into(),
                now_micros().into(),
            ],
        )?;
        Ok(())
    }

    /// Applies held events that follow `state.applied` without a gap. A held
    /// event whose handler fails is parked at once (it already waited).
    pub(super) fn drain_held(
        &self,
        tx: &mut dyn Tx,
        source: &str,
        subject: &str,
        state: &mut AggregateState,
    ) -> Result<(), StoreError> {
        if !self.pending_possible.get() {
            return Ok(());
        }
        loop {
            if self.skip_discarded(tx, source, subject, state)? {
                // A discarded event may be held too (a replay met it ahead
                // of its predecessor): it is skipped, not applied.
                tx.execute(
                    "DELETE FROM tandem_pending
                     WHERE consumer = $1 AND source = $2 AND subject = $3 AND sequence <= $4",
                    params![&self.consumer, source, subject, state.applied],
                )?;
            }
            let Some(next) = state.applied.checked_add(1) else {
                return Ok(());
            };
            let Some(row) = tx.query_opt(
                "SELECT topic, partition, record_offset, payload FROM tandem_pending
                 WHERE consumer = $1 AND source = $2 AND subject = $3 AND sequence = $4",
                params![&self.consumer, source, subject, next],
            )?
            else {
                return Ok(());
            };
            let record = Record {
                topic: row.text(0)?.to_owned(),
                partition: u32::try_from(row.i64(1)?).unwrap_or(0),
                offset: u64::try_from(row.i64(2)?).unwrap_or(0),
                key: subject.to_owned(),
                payload: row.bytes(3)?.to_vec(),
                appended_at_micros: 0,
            };
            tx.execute(
                "DELETE FROM tandem_pending
                 WHERE consumer = $1 AND source = $2 AND subject = $3 AND sequence = $4",
                params![&self.consumer, source, subject, next],
            )?;
            let envelope = Envelope::decode(&record.payload)
                .map_err(|error| StoreError::Decode(format!("held event: {error}").into()))?;
            match self.run_handler(tx, &envelope)? {
                Ok(()) => state.applied = envelope.sequence,
                Err(error) => {
                    let id = dead_letter::park(
                        tx,
                        &self.consumer,
                        &record,
                        Some(&envelope),
                        Reason::Handler,
                        &error.message,
                        1,
                        now_micros(),
                    )?;
                    state.blocked_by = Some(id);
                    return Ok(());
                }
            }
        }
    }

    /// Parks what is held for the aggregates in `expired`, whose gap this
    /// process has watched for `gap_timeout` on its own monotonic clock.
    pub(super) fn expire_gaps(
        &self,
        tx: &mut dyn Tx,
        expired: &[(String, String)],
        gap_timeout: Duration,
    ) -> Result<(), StoreError> {
        for (source, subject) in expired {
            let (source, subject) = (source.clone(), subject.clone());
            let mut state = self.state(tx, &source, &subject)?;
            // The missing sequences may have been discarded meanwhile.
            if state.blocked_by.is_none() {
                self.drain_held(tx, &source, &subject, &mut state)?;
                self.save_state(tx, &source, &subject, state)?;
            }
            let held = tx.query(
                "SELECT sequence, topic, partition, record_offset, payload, received_at
                 FROM tandem_pending WHERE consumer = $1 AND source = $2 AND subject = $3
                 ORDER BY sequence",
                params![&self.consumer, &source, &subject],
            )?;
            for held_row in held {
                let sequence = held_row.i64(0)?;
                let record = Record {
                    topic: held_row.text(1)?.to_owned(),
                    partition: u32::try_from(held_row.i64(2)?).unwrap_or(0),
                    offset: u64::try_from(held_row.i64(3)?).unwrap_or(0),
                    key: subject.clone(),
                    payload: held_row.bytes(4)?.to_vec(),
                    appended_at_micros: 0,
                };
                let envelope = Envelope::decode(&record.payload)
                    .map_err(|error| StoreError::Decode(format!("held event: {error}").into()))?;
                let (reason, error) = match state.blocked_by {
                    None => (
                        Reason::Gap,
                        format!(
                            "sequence {} of {source}/{subject} did not arrive within {} ms; got {sequence}",
                            state.applied.saturating_add(1),
                            gap_timeout.as_millis()
                        ),
                    ),
                    Some(head) => (
                        Reason::Blocked,
                        format!("aggregate is blocked behind dead letter {head}"),
                    ),
                };
                let id = dead_letter::park(
                    tx,
                    &self.consumer,
                    &record,
                    Some(&envelope),
                    reason,
                    &error,
                    0,
                    held_row.i64(5)?,
                )?;
                if state.blocked_by.is_none() {
                    tracing::error!(consumer = &self.consumer, %source, %subject, dead_letter = id, "sequence gap persisted");
                    state.blocked_by = Some(id);
                }
            }
            tx.execute(
                "DELETE FROM tandem_pending WHERE consumer = $1 AND source = $2 AND subject = $3",
                params![&self.consumer, &source, &subject],
            )?;
            self.save_state(tx, &source, &subject, state)?;
        }
        Ok(())
    }
}

impl<S: Store> Consumer<S> {
    /// Parks the events held for an aggregate whose gap this process has
    /// watched for `gap_timeout`. The wait is measured on this process's
    /// monotonic clock from when it first saw the aggregate waiting, not
    /// from `received_at`, which another host's wall clock may have
    /// written: a clock that jumps or runs apart from another host's then
    /// cannot park an event early. (A restart starts the watch again.)
    pub(super) async fn expire_gaps(&self) -> Result<(), StoreError> {
        let consumer = self.config.name.clone();
        let waiting = self
            .store
            .read(
                move |tx: &mut dyn Tx| -> Result<Vec<(String, String)>, StoreError> {
                    tx.query(
                        "SELECT DISTINCT source, subject FROM tandem_pending WHERE consumer = $1",
                        params![&consumer],
                    )?
                    .iter()
                    .map(|row| Ok((row.text(0)?.to_owned(), row.text(1)?.to_owned())))
                    .collect()
                },
            )
            .await?;
        let gap_timeout = self.config.gap_timeout;
        let now = Instant::now();
        let expired: Vec<(String, String)> = {
            let mut watch = self
                .gap_watch
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let waiting: std::collections::HashSet<(String, String)> =
                waiting.into_iter().collect();
            watch.retain(|aggregate, _| waiting.contains(aggregate));
            for aggregate in waiting {
                watch.entry(aggregate).or_insert(now);
            }
            watch
                .iter()
                .filter(|(_, since)| now.duration_since(**since) >= gap_timeout)
                .map(|(aggregate, _)| aggregate.clone())
                .collect()
        };
        if expired.is_empty() {
            return Ok(());
        }
        let consumer = self.config.name.clone();
        let handler = Arc::clone(&self.handler);
        let parked = expired.clone();
        self.gated_write(move |tx: &mut dyn Tx| -> Result<(), StoreError> {
            BatchContext::new(consumer, handler, Mode::Isolated).expire_gaps(
                tx,
                &parked,
                gap_timeout,
            )
        })
        .await?;
        let mut watch = self
            .gap_watch
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for aggregate in &expired {
            watch.remove(aggregate);
        }
        Ok(())
    }
}
