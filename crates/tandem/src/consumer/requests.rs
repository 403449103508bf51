//! Requests: redrive, discard and replay, queued by operators in

//! `tandem_consumer_requests` and carried out by the running consumer.

use std::sync::Arc;

use super::batch::{BatchContext, Mode, Step};

use super::handler::{apply_handler, Handler};

use super::positions::generation;

use super::{is_store_outage, Consumer, ConsumerError};

use crate::bus::{Record, Subscription, TopicPartition};

use crate::dead_letter::{self, Command, DeadLetter};

use crate::envelope::Envelope;

use crate::params;

use crate::schema::now_micros;

use crate::store::{Store, StoreError, Tx};

impl BatchContext {
    /// Tries the parked events of one aggregate in sequence order, applying
    /// all it can; the first that still fails blocks the aggregate again.
    pub(super) fn advance_aggregate(
        &self,
        tx: &mut dyn Tx,
        source: &str,
        subject: &str,
    ) -> Result<(), StoreError> {
        let mut state = self.state(tx, source, subject)?;
        state.blocked_by = None;
        for parked in dead_letter::parked_of_aggregate(tx, &self.consumer, source, subject)? {
            let envelope = Envelope::decode(&parked.payload)
                .map_err(|error| StoreError::Decode(format!("parked event: {error}").into()))?;
            if envelope.sequence > state.applied.saturating_add(1) {
                self.skip_discarded(tx, source, subject, &mut state)?;
            }
            if envelope.sequence <= state.applied {
                dead_letter::set_status(tx, parked.id, "resolved")?;
                continue;
            }
            if envelope.sequence > state.applied.saturating_add(1) {
                dead_letter::record_failure(
                    tx,
                    &parked,
                    &format!(
                        "gap: sequence {} has not been applied yet",
                        state.applied.saturating_add(1)
                    ),
                    false,
                )?;
                state.blocked_by = Some(parked.id);
                break;
            }
            match apply_handler(tx, &*self.handler, &envelope)? {
                Ok(()) => {
                    state.applied = envelope.sequence;
                    dead_letter::set_status(tx, parked.id, "resolved")?;
                }
                Err(error) => {
                    dead_letter::record_failure(tx, &parked, &error.message, true)?;
                    state.blocked_by = Some(parked.id);
                    break;
                }
            }
        }
        if state.blocked_by.is_none() {
            self.drain_held(tx, source, subject, &mut state)?;
        }
        self.save_state(tx, source, subject, state)
    }

    pub(super) fn redrive(
        &self,
        tx: &mut dyn Tx,
        dead_letter: &DeadLetter,
    ) -> Result<(), StoreError> {
        match (&dead_letter.source, &dead_letter.subject) {
            (Some(source), Some(subject)) => self.advance_aggregate(tx, source, subject),
            _ => {
                // Never decoded: try decoding again (a newer version may).
                match Envelope::decode(&dead_letter.payload) {
                    Err(error) => {
                        dead_letter::record_failure(tx, dead_letter, &error.to_string(), true)
                    }
                    Ok(envelope) => {
                        dead_letter::set_status(tx, dead_letter.id, "resolved")?;
                        let record = Record {
                            topic: dead_letter.topic.clone(),
                            partition: u32::try_from(dead_letter.partition).unwrap_or(0),
                            offset: u64::try_from(dead_letter.offset).unwrap_or(0),
                            key: envelope.subject.clone(),
                            payload: dead_letter.payload.clone(),
                            appended_at_micros: 0,
                        };
                        match self.apply_record(tx, &record)? {
                            Step::Consumed(_) | Step::Applied(_) => Ok(()),
                            Step::Failed(error) => {
                                self.park_failed(tx, &record, &error, 1, now_micros())
                            }
                        }
                    }
                }
            }
        }
    }

    pub(super) fn discard(
        &self,
        tx: &mut dyn Tx,
        dead_letter: &DeadLetter,
    ) -> Result<(), StoreError> {
        dead_letter::set_status(tx, dead_letter.id, "discarded")?;
        let (Some(source), Some(subject), Some(sequence)) = (
            &dead_letter.source,
            &dead_letter.subject,
            dead_letter.sequence,
        ) else {
            return Ok(());
        };
        let _ = sequence;
        let state = self.state(tx, source, subject)?;
        if state.blocked_by != Some(dead_letter.id) {
            // Not the head: its sequence is skipped when the aggregate
            // reaches it.
            return Ok(());
        }
        // The discarded sequence is recorded (status `discarded`) and
        // skipped once everything before it has applied: a head parked for
        // a gap may have a late predecessor parked behind it, which still
        // applies first. What queued behind it flows.
        self.advance_aggregate(tx, source, subject)
    }
}

impl<S: Store> Consumer<S> {
    /// Carries out pending requests; returns true if a replay reset the
    /// positions (the caller drops what it had buffered).
    pub(super) async fn run_requests(
        &self,
        subscription: &mut Box<dyn Subscription>,
        assigned: &[TopicPartition],
    ) -> Result<bool, ConsumerError> {
        let mut replayed = false;
        // A cheap read first: most of the time there is nothing to do, and
        // a write transaction would take the database's write lock for it.
        let consumer = self.config.name.clone();
        let pending = self
            .store
            .read(move |tx: &mut dyn Tx| -> Result<bool, StoreError> {
                Ok(tx
                    .query_opt(
                        "SELECT 1 FROM tandem_consumer_requests WHERE consumer = $1 LIMIT 1",
                        params![&consumer],
                    )?
                    .is_some())
            })
            .await?;
        if !pending {
            return Ok(false);
        }
        loop {
            let consumer = self.config.name.clone();
            let handler = Arc::clone(&self.handler);
            let taken = self
                .gated_write(move |tx: &mut dyn Tx| carry_out_next_request(tx, &consumer, &handler))
                .await?;
            match taken {
                Taken::NoneLeft => return Ok(replayed),
                Taken::Done => {}
                Taken::Replayed { generation } => {
                    tracing::info!(consumer = %self.config.name, "replaying from the start of the log");
                    for partition in assigned {
                        subscription.seek(partition, 0).await?;
                    }
                    self.generation
                        .store(generation, std::sync::atomic::Ordering::SeqCst);
                    replayed = true;
                }
            }
        }
    }
}

/// What came of taking the next request from the queue.
enum Taken {
    /// The queue is empty.
    NoneLeft,
    /// A request was carried out (or, unknown, dropped).
    Done,
    /// A replay reset the consumer: its positions now belong to
    /// `generation`, and the member seeks to the start of the log.
    Replayed { generation: i64 },
}

/// Takes the oldest request of `consumer` and carries it out, in the
/// caller's transaction.
fn carry_out_next_request(
    tx: &mut dyn Tx,
    consumer: &str,
    handler: &Arc<dyn Handler>,
) -> Result<Taken, StoreError> {
    let Some(command) = dead_letter::take_request(tx, consumer)? else {
        return Ok(Taken::NoneLeft);
    };
    let context = BatchContext::new(consumer.to_owned(), Arc::clone(handler), Mode::Isolated);
    match command {
        None => {}
        Some(Command::Replay) => {
            reset_for_replay(tx, consumer, &**handler)?;
            return Ok(Taken::Replayed {
                generation: generation(tx, consumer)?,
            });
        }
        Some(Command::Discard(None)) => {
            // Every parked row goes: each aggregate's head
            // is discarded, what was only blocked behind it
            // applies (or, failing, is parked and then
            // discarded in the next round).
            loop {
                let heads = parked_heads(tx, consumer)?;
                if heads.is_empty() {
                    break;
                }
                for head in heads {
                    let Some(current) = dead_letter::get_in(tx, head.id)? else {
                        continue;
                    };
                    if current.status == "parked" {
                        context.discard(tx, &current)?;
                        crate::rebuild::follow_settlement(tx, consumer, &current, true)?;
                    }
                }
            }
        }
        Some(Command::Redrive(id)) => settle_parked(tx, &context, id, Settle::Redrive)?,
        Some(Command::Discard(id)) => settle_parked(tx, &context, id, Settle::Discard)?,
    }
    Ok(Taken::Done)
}

/// Empties the read model and everything the consumer has recorded, and
/// bumps its replay generation.
fn reset_for_replay(
    tx: &mut dyn Tx,
    consumer: &str,
    handler: &dyn Handler,
) -> Result<(), StoreError> {
    handler
        .reset(tx)
        .map_err(|error| StoreError::Engine(format!("read model reset failed: {error}").into()))?;
    for table in super::positions::STATE_TABLES {
        tx.execute(
            &format!("DELETE FROM {table} WHERE consumer = $1"),
            params![consumer],
        )?;
    }
    // Parked events come up again from the log;
    // discarded and resolved ones stay on record, so
    // a discarded event is skipped again.
    tx.execute(
        "DELETE FROM tandem_dead_letters
         WHERE consumer = $1 AND status = 'parked'",
        params![consumer],
    )?;
    // Every member sees the new generation in its
    // next batch and seeks again before applying.
    super::positions::bump_generation(tx, consumer)
}

/// What a redrive or discard request does to each parked letter it names.
#[derive(Clone, Copy)]
enum Settle {
    Redrive,
    Discard,
}

/// Redrives or discards the parked letter `id` of the context's consumer,
/// or, with no id, the head of every blocked aggregate.
fn settle_parked(
    tx: &mut dyn Tx,
    context: &BatchContext,
    id: Option<i64>,
    settle: Settle,
) -> Result<(), StoreError> {
    let consumer = context.consumer.as_str();
    let targets = match id {
        Some(id) => dead_letter::get_in(tx, id)?
            .into_iter()
            .filter(|letter| letter.consumer == consumer && letter.status == "parked")
            .collect(),
        None => parked_heads(tx, consumer)?,
    };
    for target in targets {
        // An earlier step may have settled it already.
        let Some(current) = dead_letter::get_in(tx, target.id)? else {
            continue;
        };
        if current.status != "parked" {
            continue;
        }
        // A store error tied to this letter (a value the
        // engine refuses) is recorded on it; it never
        // stops the consumer.
        tx.savepoint("tandem_request")?;
        let outcome = match settle {
            Settle::Discard => context.discard(tx, &current),
            Settle::Redrive => context.redrive(tx, &current),
        };
        let outcome = outcome.and_then(|()| {
            crate::rebuild::follow_settlement(
                tx,
                consumer,
                &current,
                matches!(settle, Settle::Discard),
            )
        });
        match outcome {
            Ok(()) => tx.release_savepoint("tandem_request")?,
            Err(error) if is_store_outage(&error) => return Err(error),
            Err(error) => {
                tx.rollback_to_savepoint("tandem_request")?;
                // The cached states may hold what was undone.
                context.states.borrow_mut().clear();
                dead_letter::record_failure(
                    tx,
                    &current,
                    &format!("the store refused it: {error}"),
                    true,
                )?;
            }
        }
    }
    Ok(())
}

/// One parked row per blocked aggregate (its lowest sequence, whatever
/// order the rows were parked in), plus every
/// parked row that never decoded.
fn parked_heads(tx: &mut dyn Tx, consumer: &str) -> Result<Vec<DeadLetter>, StoreError> {
    let rows = tx.query(
        "SELECT id FROM tandem_dead_letters WHERE consumer = $1 AND status = 'parked'
         ORDER BY source, subject, sequence, id",
        params![consumer],
    )?;
    let mut heads = Vec::new();
    let mut seen: Vec<(String, String)> = Vec::new();
    for row in rows {
        let Some(letter) = dead_letter::get_in(tx, row.i64(0)?)? else {
            continue;
        };
        match (&letter.source, &letter.subject) {
            (Some(source), Some(subject)) => {
                let key = (source.clone(), subject.clone());
                if !seen.contains(&key) {
                    seen.push(key);
                    heads.push(letter);
                }
            }
            _ => heads.push(letter),
        }
    }
    Ok(heads)
}
