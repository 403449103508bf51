//! The batch: a consumer's work inside one transaction.

use std::cell::{Cell, RefCell};

use std::collections::HashMap;

use std::sync::Arc;

use super::handler::{apply_handler, Handler, HandlerError};

use super::positions::{generation_and_pause, save_positions};

use super::states::AggregateState;

use super::{is_store_outage, CommittedBatch, Consumer};

use crate::bus::Record;

use crate::metrics::Outcome;

use crate::dead_letter::{self, Reason};

use crate::envelope::Envelope;

use crate::params;

use crate::schema::now_micros;

use crate::store::{Store, StoreError, Tx};

/// What became of one record.
pub(super) enum Step {
    /// Applied to the read model; carries the event's `time` (µs).
    Applied(i64),
    /// Dropped as a duplicate, held ahead of a gap, or parked (which of
    /// them: the outcome counted in the metrics).
    Consumed(Outcome),
    Failed(HandlerError),
}

/// How a [`BatchContext`] runs the handler and writes aggregate states.
pub(super) enum Mode {
    /// One record at a time (a retry's park, a request, an expired gap):
    /// each handler call runs under a savepoint, so that a failure can be
    /// undone alone, and aggregate states are written through.
    Isolated,
    /// A batch, one [`Handler::handle`] call per event. Batches do without
    /// savepoints: on a failure the whole transaction rolls back and the
    /// records before it are applied again.
    Batch,
    /// A batch whose events that pass the checks are collected here for
    /// one [`Handler::handle_batch`] call instead of handled one by one.
    Collecting(RefCell<Vec<Envelope>>),
}

impl Mode {
    /// A batch that collects its events for [`Handler::handle_batch`].
    pub(super) fn collecting() -> Self {
        Mode::Collecting(RefCell::new(Vec::new()))
    }
}

/// The consumer's work inside one transaction.
pub(super) struct BatchContext {
    pub(super) consumer: String,
    pub(super) handler: Arc<dyn Handler>,
    /// Whether `tandem_pending` may hold events of this consumer; when it
    /// cannot, applying an event skips the look for held successors.
    pub(super) pending_possible: Cell<bool>,
    /// Whether this consumer has discarded dead letters: sequences that an
    /// aggregate skips when it reaches them (after a discard of a gap
    /// letter, or when a replay meets a discarded event again).
    pub(super) discarded_possible: Cell<bool>,
    /// Whether handler calls run under savepoints, and whether events are
    /// collected for one [`Handler::handle_batch`] call (see [`Mode`]).
    pub(super) mode: Mode,
    /// Aggregate states read or written in this transaction, by source
    /// and then subject (looked up by `&str`, without allocating): loaded
    /// for a whole batch with a few queries instead of one per event. In a
    /// batch (not isolated) a save only marks the state dirty and
    /// [`BatchContext::flush_states`] writes them all before the batch
    /// commits; isolated contexts write through.
    pub(super) states: RefCell<HashMap<String, HashMap<String, AggregateState>>>,
}

impl BatchContext {
    /// A context for `consumer`'s work in one transaction; handles one
    /// record at a time in [`Mode::Isolated`].
    pub(super) fn new(consumer: String, handler: Arc<dyn Handler>, mode: Mode) -> Self {
        Self {
            consumer,
            handler,
            pending_possible: Cell::new(true),
            discarded_possible: Cell::new(true),
            mode,
            states: RefCell::new(HashMap::new()),
        }
    }

    /// Runs the handler on `envelope`, or collects it (in
    /// [`Mode::Collecting`]). Run here, it runs under a savepoint, as in an
    /// isolated context, whatever the mode: a held event that fails is
    /// parked alone.
    pub(super) fn run_handler(
        &self,
        tx: &mut dyn Tx,
        envelope: &Envelope,
    ) -> Result<Result<(), HandlerError>, StoreError> {
        match &self.mode {
            Mode::Collecting(collected) => {
                collected.borrow_mut().push(envelope.clone());
                Ok(Ok(()))
            }
            Mode::Isolated | Mode::Batch => {
                crate::trace::processing(&self.consumer, envelope, || {
                    apply_handler(tx, &*self.handler, envelope)
                })
            }
        }
    }

    /// Hands the collected events to [`Handler::handle_batch`].
    pub(super) fn handle_collected(&self, tx: &mut dyn Tx) -> Result<(), HandlerError> {
        let Mode::Collecting(collected) = &self.mode else {
            return Ok(());
        };
        let events = std::mem::take(&mut *collected.borrow_mut());
        if events.is_empty() {
            return Ok(());
        }
        if !crate::trace::enabled() {
            return self.handler.handle_batch(tx, &events);
        }
        // Events of sampled traces are handled one `handle` call each,
        // inside their `process` span, so that what the handler publishes
        // carries the event's trace (the default `handle_batch` does the
        // same calls); the runs of unsampled events between them keep
        // their `handle_batch` call, in order. Under ratio sampling a
        // batch thus costs what it costs untraced, plus its few sampled
        // events.
        let is_sampled = |event: &Envelope| {
            event
                .traceparent
                .as_deref()
                .is_some_and(crate::trace::sampled)
        };
        let mut rest: &[Envelope] = &events;
        while !rest.is_empty() {
            let unsampled = rest.iter().position(is_sampled).unwrap_or(rest.len());
            if unsampled > 0 {
                self.handler.handle_batch(tx, &rest[..unsampled])?;
                rest = &rest[unsampled..];
                continue;
            }
            let event = &rest[0];
            crate::trace::processing(&self.consumer, event, || self.handler.handle(tx, event))?;
            rest = &rest[1..];
        }
        Ok(())
    }

    /// Learns whether any event of this consumer is held ahead of a gap,
    /// and whether it has discarded any dead letter.
    pub(super) fn look_for_pending(&self, tx: &mut dyn Tx) -> Result<(), StoreError> {
        let row = tx.query_opt(
            "SELECT
               (SELECT 1 FROM tandem_pending WHERE consumer = $1 LIMIT 1),
               (SELECT 1 FROM tandem_dead_letters
                WHERE consumer = $1 AND status = 'discarded' LIMIT 1)",
            params![&self.consumer],
        )?;
        let (pending, discarded) = match row {
            Some(row) => (row.opt_i64(0)?.is_some(), row.opt_i64(1)?.is_some()),
            None => (false, false),
        };
        self.pending_possible.set(pending);
        self.discarded_possible.set(discarded);
        Ok(())
    }

    pub(super) fn apply_record(
        &self,
        tx: &mut dyn Tx,
        record: &Record,
    ) -> Result<Step, StoreError> {
        let envelope = match Envelope::decode(&record.payload) {
            Ok(envelope) => envelope,
            Err(error) => {
                // A replay meets the record again: one an operator
                // discarded (or that is still parked) is not parked twice.
                let known = tx.query_opt(
                    "SELECT 1 FROM tandem_dead_letters
                     WHERE consumer = $1 AND topic = $2 AND partition = $3
                       AND record_offset = $4 AND reason = 'decode'
                     LIMIT 1",
                    crate::params![
                        &self.consumer,
                        &record.topic,
                        record.partition,
                        record.offset
                    ],
                )?;
                if known.is_some() {
                    return Ok(Step::Consumed(Outcome::duplicate));
                }
                dead_letter::park(
                    tx,
                    &self.consumer,
                    record,
                    None,
                    Reason::Decode,
                    &error.to_string(),
                    1,
                    now_micros(),
                )?;
                return Ok(Step::Consumed(Outcome::parked));
            }
        };
        let mut state = self.state(tx, &envelope.source, &envelope.subject)?;
        if envelope.sequence <= state.applied {
            return Ok(Step::Consumed(Outcome::duplicate));
        }
        if state.blocked_by.is_none()
            && self.skip_discarded(tx, &envelope.source, &envelope.subject, &mut state)?
        {
            if envelope.sequence <= state.applied {
                // This very event was discarded (a replay meets it again).
                let (source, subject) = (envelope.source.clone(), envelope.subject.clone());
                self.drain_held(tx, &source, &subject, &mut state)?;
                self.save_state(tx, &source, &subject, state)?;
                return Ok(Step::Consumed(Outcome::duplicate));
            }
            self.save_state(tx, &envelope.source, &envelope.subject, state)?;
        }
        if let Some(head) = state.blocked_by {
            let already_parked = dead_letter::parked_of_aggregate(
                tx,
                &self.consumer,
                &envelope.source,
                &envelope.subject,
            )?
            .iter()
            .any(|parked| parked.sequence == Some(envelope.sequence as i64));
            if !already_parked {
                dead_letter::park(
                    tx,
                    &self.consumer,
                    record,
                    Some(&envelope),
                    Reason::Blocked,
                    &format!("aggregate is blocked behind dead letter {head}"),
                    0,
                    now_micros(),
                )?;
                return Ok(Step::Consumed(Outcome::parked));
            }
            return Ok(Step::Consumed(Outcome::duplicate));
        }
        // A snapshot is the aggregate's whole state at its sequence: newer
        // than what was applied, it applies across a gap (the events it
        // sums up need not come); older or equal, it was a duplicate above.
        if !envelope.snapshot && Some(envelope.sequence) != state.applied.checked_add(1) {
            self.hold(tx, record, &envelope)?;
            return Ok(Step::Consumed(Outcome::held));
        }
        let snapshot = envelope.snapshot.then_some(envelope.sequence);
        let created_micros =
            i64::try_from(envelope.time.unix_timestamp_nanos() / 1000).unwrap_or(0);
        let (source, subject) = (envelope.source.clone(), envelope.subject.clone());
        state.applied = envelope.sequence;
        let handled = match &self.mode {
            // Moved, not cloned: the batch's handler call gets it later.
            Mode::Collecting(collected) => {
                collected.borrow_mut().push(envelope);
                Ok(())
            }
            Mode::Isolated => crate::trace::processing(&self.consumer, &envelope, || {
                apply_handler(tx, &*self.handler, &envelope)
            })?,
            Mode::Batch => crate::trace::processing(&self.consumer, &envelope, || {
                self.handler.handle(tx, &envelope)
            }),
        };
        if let Err(error) = handled {
            return Ok(Step::Failed(error));
        }
        if let Some(sequence) = snapshot {
            // What waited for the gap the snapshot closed is part of it.
            tx.execute(
                "DELETE FROM tandem_pending
                 WHERE consumer = $1 AND source = $2 AND subject = $3 AND sequence <= $4",
                crate::params![&self.consumer, &source, &subject, sequence],
            )?;
        }
        self.drain_held(tx, &source, &subject, &mut state)?;
        self.save_state(tx, &source, &subject, state)?;
        Ok(Step::Applied(created_micros))
    }
}

/// Why a batch transaction was rolled back.
pub(super) enum BatchError {
    Store(StoreError),
    /// A replay reset the consumer since this member last sought: its
    /// buffered records and positions belong to the generation before.
    Stale,
    /// An operator paused the consumer: nothing is applied.
    Paused,
    /// The handler failed on the record at `index`.
    Handler {
        index: usize,
        error: HandlerError,
    },
    /// [`Handler::handle_batch`] failed somewhere in the batch.
    Collected,
}

impl From<StoreError> for BatchError {
    fn from(error: StoreError) -> Self {
        BatchError::Store(error)
    }
}

/// Outcome of applying a run of records in one transaction.
pub(super) struct BatchOutcome {
    /// Records consumed (applied, dropped, held or parked) and committed.
    pub(super) consumed: usize,
    /// Creation times (µs) of the events applied.
    pub(super) applied_times: Vec<i64>,
    /// The topic of each event applied (beside `applied_times`).
    pub(super) applied_topics: Vec<String>,
    /// Records dropped as duplicates, held and parked.
    pub(super) skipped: Skipped,
    /// How long the committed transaction took, from its start.
    pub(super) took: std::time::Duration,
    /// The record at index `consumed` failed with this error.
    pub(super) failure: Option<HandlerError>,
    /// A replay reset the consumer: nothing was applied, and the member
    /// must seek to the positions of the new generation.
    pub(super) stale: bool,
    /// An operator paused the consumer: nothing was applied.
    pub(super) paused: bool,
}

impl BatchOutcome {
    pub(super) fn nothing() -> Self {
        BatchOutcome {
            consumed: 0,
            applied_times: Vec::new(),
            applied_topics: Vec::new(),
            skipped: Skipped::default(),
            took: std::time::Duration::ZERO,
            failure: None,
            stale: false,
            paused: false,
        }
    }
}

/// Records of a batch that were consumed without being applied.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Skipped {
    pub(super) duplicate: u64,
    pub(super) held: u64,
    pub(super) parked: u64,
}

impl Skipped {
    fn count(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::duplicate => self.duplicate += 1,
            Outcome::held => self.held += 1,
            Outcome::parked => self.parked += 1,
            Outcome::applied | Outcome::retried => {}
        }
    }
}

impl<S: Store> Consumer<S> {
    /// Applies `records` in order in one transaction, stopping at the first
    /// handler failure; commits what came before it.
    ///
    /// A store error that is not an outage is taken to be tied to one of
    /// the records (a value the engine refuses): the records are applied
    /// one transaction each, and the one the store refuses is reported as a
    /// permanent failure, to be parked; it never stops the consumer.
    pub(super) async fn apply_batch(
        &self,
        records: Arc<Vec<Record>>,
    ) -> Result<BatchOutcome, StoreError> {
        let outcome = match self.apply_records(Arc::clone(&records), true).await {
            // Find the event at fault: one `handle` call at a time.
            Err(BatchError::Collected) => self.apply_records(Arc::clone(&records), false).await,
            outcome => outcome,
        };
        match outcome {
            Err(BatchError::Store(error)) if !is_store_outage(&error) => {
                if records.len() == 1 {
                    tracing::warn!(consumer = %self.config.name, %error, "the store refused a record");
                    let mut outcome = BatchOutcome::nothing();
                    outcome.failure = Some(HandlerError::permanent(format!(
                        "the store refused the record: {error}"
                    )));
                    return Ok(outcome);
                }
                let mut total = BatchOutcome::nothing();
                for record in records.iter() {
                    let single = Box::pin(self.apply_batch(Arc::new(vec![record.clone()]))).await?;
                    total.consumed += single.consumed;
                    total.applied_times.extend(single.applied_times);
                    total.applied_topics.extend(single.applied_topics);
                    if single.failure.is_some() || single.stale {
                        total.failure = single.failure;
                        total.stale = single.stale;
                        break;
                    }
                }
                Ok(total)
            }
            outcome => self.batch_outcome(&records, outcome).await,
        }
    }

    /// Applies `records` in one transaction; `collect`: with one
    /// [`Handler::handle_batch`] call instead of a `handle` call each.
    async fn apply_records(
        &self,
        records: Arc<Vec<Record>>,
        collect: bool,
    ) -> Result<BatchOutcome, BatchError> {
        let consumer = self.config.name.clone();
        let handler = Arc::clone(&self.handler);
        let batch = Arc::clone(&records);
        let shared = self.shared;
        let known = self.generation.load(std::sync::atomic::Ordering::SeqCst);
        let started = std::time::Instant::now();
        let mut outcome = self
            .gated_write(move |tx: &mut dyn Tx| -> Result<BatchOutcome, BatchError> {
                let (generation, paused) = generation_and_pause(tx, &consumer)?;
                if generation != known {
                    return Err(BatchError::Stale);
                }
                if paused {
                    return Err(BatchError::Paused);
                }
                let mode = if collect {
                    Mode::collecting()
                } else {
                    Mode::Batch
                };
                let context = BatchContext::new(consumer, handler, mode);
                context.look_for_pending(tx)?;
                context.preload_states(tx, &batch)?;
                let mut consumed = 0;
                let mut applied_times = Vec::with_capacity(batch.len());
                let mut applied_topics = Vec::with_capacity(batch.len());
                let mut skipped = Skipped::default();
                for record in batch.iter() {
                    match context.apply_record(tx, record)? {
                        Step::Consumed(outcome) => {
                            consumed += 1;
                            skipped.count(outcome);
                        }
                        Step::Applied(time) => {
                            consumed += 1;
                            applied_times.push(time);
                            applied_topics.push(record.topic.clone());
                        }
                        // Roll the whole batch back; the caller applies the
                        // records before this one again, without it.
                        Step::Failed(error) => {
                            return Err(BatchError::Handler {
                                index: consumed,
                                error,
                            })
                        }
                    }
                }
                if context.handle_collected(tx).is_err() {
                    return Err(BatchError::Collected);
                }
                context.flush_states(tx)?;
                crate::fault::point("consumer.before_commit");
                save_positions(tx, &context.consumer, &batch, shared)?;
                Ok(BatchOutcome {
                    consumed,
                    applied_times,
                    applied_topics,
                    skipped,
                    took: std::time::Duration::ZERO,
                    failure: None,
                    stale: false,
                    paused: false,
                })
            })
            .await;
        if let Ok(outcome) = &mut outcome {
            outcome.took = started.elapsed();
        }
        outcome
    }

    /// What became of a batch: a handler failure at `index` commits the
    /// records before it (applied again without it) and reports the
    /// failure; a committed batch is told to the observer.
    async fn batch_outcome(
        &self,
        records: &[Record],
        outcome: Result<BatchOutcome, BatchError>,
    ) -> Result<BatchOutcome, StoreError> {
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(BatchError::Store(error)) => return Err(error),
            Err(BatchError::Stale) => {
                let mut outcome = BatchOutcome::nothing();
                outcome.stale = true;
                return Ok(outcome);
            }
            Err(BatchError::Paused) => {
                let mut outcome = BatchOutcome::nothing();
                outcome.paused = true;
                return Ok(outcome);
            }
            Err(BatchError::Collected) => {
                return Err(StoreError::Engine(
                    "a batch handler failure reached the one-by-one path".into(),
                ))
            }
            Err(BatchError::Handler { index, error }) => {
                let mut outcome = if index == 0 {
                    BatchOutcome::nothing()
                } else {
                    Box::pin(self.apply_batch(Arc::new(records[..index].to_vec()))).await?
                };
                if outcome.failure.is_none() && !outcome.stale && outcome.consumed == index {
                    outcome.failure = Some(error);
                }
                return Ok(outcome);
            }
        };
        let committed_at_micros = now_micros();
        self.record_metrics(&outcome, committed_at_micros);
        if let Some(observer) = &self.observer {
            observer.batch_committed(CommittedBatch {
                consumer: &self.config.name,
                consumed: outcome.consumed,
                committed_at_micros,
                applied_created_micros: &outcome.applied_times,
            });
        }
        Ok(outcome)
    }

    /// Counts a committed batch's events by outcome, and observes its
    /// duration and each applied event's end-to-end delay.
    fn record_metrics(&self, outcome: &BatchOutcome, committed_at_micros: i64) {
        if !crate::metrics::enabled() {
            return;
        }
        let metrics = crate::metrics::metrics();
        let consumer = &self.config.name;
        metrics.consumer_events(
            consumer,
            Outcome::applied,
            outcome.applied_times.len() as u64,
        );
        metrics.consumer_events(consumer, Outcome::duplicate, outcome.skipped.duplicate);
        metrics.consumer_events(consumer, Outcome::held, outcome.skipped.held);
        metrics.consumer_events(consumer, Outcome::parked, outcome.skipped.parked);
        if outcome.consumed > 0 {
            metrics
                .process_duration
                .get_or_create(&crate::metrics::ConsumerLabels {
                    consumer: consumer.clone(),
                })
                .observe(outcome.took.as_secs_f64());
        }
        let applied = &outcome.applied_times;
        let sum_micros: i64 = applied
            .iter()
            .map(|created| (committed_at_micros - created).max(0))
            .sum();
        crate::metrics::record_propagation(consumer, applied.len() as u64, sum_micros as u64);
        // One label lookup per run of a topic, not per event.
        let mut index = 0;
        for run in outcome.applied_topics.chunk_by(|a, b| a == b) {
            let histogram =
                metrics
                    .end_to_end
                    .get_or_create_owned(&crate::metrics::ConsumerTopicLabels {
                        consumer: consumer.clone(),
                        topic: run[0].clone(),
                    });
            for created in &applied[index..index + run.len()] {
                let delay = (committed_at_micros - created).max(0);
                histogram.observe(delay as f64 / 1e6);
            }
            index += run.len();
        }
    }
}
