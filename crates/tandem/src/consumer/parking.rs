//! Parking: a record whose handler keeps failing is retried with backoff,

//! then parked as a dead letter that blocks its aggregate.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::batch::{BatchContext, Mode};

use super::handler::HandlerError;

use super::positions::{generation, save_positions};

use super::run::Drained;

use super::{is_store_outage, Consumer, ConsumerError};

use crate::backoff::Backoff;

use crate::bus::{Record, Subscription};

use crate::dead_letter::{self, Reason};

use crate::envelope::Envelope;

use crate::schema::now_micros;

use crate::store::{Store, StoreError, Tx};

impl BatchContext {
    /// Parks a record whose handler kept failing and blocks its aggregate.
    pub(super) fn park_failed(
        &self,
        tx: &mut dyn Tx,
        record: &Record,
        error: &HandlerError,
        attempts: u32,
        first_failed_at: i64,
    ) -> Result<(), StoreError> {
        let envelope = Envelope::decode(&record.payload)
            .map_err(|error| StoreError::Decode(format!("failed event: {error}").into()))?;
        let mut state = self.state(tx, &envelope.source, &envelope.subject)?;
        if envelope.sequence <= state.applied {
            return Ok(());
        }
        let id = dead_letter::park(
            tx,
            &self.consumer,
            record,
            Some(&envelope),
            Reason::Handler,
            &error.message,
            attempts,
            first_failed_at,
        )?;
        state.blocked_by = Some(id);
        self.save_state(tx, &envelope.source, &envelope.subject, state)
    }
}

impl<S: Store> Consumer<S> {
    pub(super) async fn retry_then_park(
        &self,
        record: Record,
        first_error: HandlerError,
        subscription: &mut Box<dyn Subscription>,
        shutdown: &CancellationToken,
    ) -> Result<Drained, ConsumerError> {
        let first_failed_at = now_micros();
        let mut attempts: u32 = 1;
        let mut error = first_error;
        let mut backoff = Backoff::new(self.config.retry_initial, self.config.retry_max);
        let record = Arc::new(vec![record]);
        loop {
            tracing::debug!(consumer = %self.config.name, attempts, error = %error, "handler failed");
            if error.permanent || attempts >= self.config.max_attempts {
                let consumer = self.config.name.clone();
                let handler = Arc::clone(&self.handler);
                let parked = Arc::clone(&record);
                let shared = self.shared;
                let known = self.generation.load(std::sync::atomic::Ordering::SeqCst);
                let stale = self
                    .gated_write(move |tx: &mut dyn Tx| -> Result<bool, StoreError> {
                        if generation(tx, &consumer)? != known {
                            return Ok(true);
                        }
                        let context = BatchContext::new(consumer.clone(), handler, Mode::Isolated);
                        tx.savepoint("tandem_park")?;
                        match context.park_failed(tx, &parked[0], &error, attempts, first_failed_at)
                        {
                            Ok(()) => tx.release_savepoint("tandem_park")?,
                            Err(failure) if is_store_outage(&failure) => return Err(failure),
                            // The store refuses what this record asks of it:
                            // park the bytes alone, so it never stops the consumer.
                            Err(failure) => {
                                tx.rollback_to_savepoint("tandem_park")?;
                                dead_letter::park(
                                    tx,
                                    &consumer,
                                    &parked[0],
                                    None,
                                    Reason::Store,
                                    &format!("{}; parking it: {failure}", error.message),
                                    attempts,
                                    first_failed_at,
                                )?;
                            }
                        }
                        save_positions(tx, &consumer, &parked, shared)?;
                        Ok(false)
                    })
                    .await?;
                if stale {
                    return Ok(Drained::Stale);
                }
                crate::metrics::metrics().consumer_events(
                    &self.config.name,
                    crate::metrics::Outcome::parked,
                    1,
                );
                subscription.ack(&record).await?;
                return Ok(Drained::Done);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(Drained::Shutdown),
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
            crate::metrics::metrics().consumer_events(
                &self.config.name,
                crate::metrics::Outcome::retried,
                1,
            );
            let outcome = self.apply_batch(Arc::clone(&record)).await?;
            if outcome.stale {
                return Ok(Drained::Stale);
            }
            if outcome.paused {
                return Ok(Drained::Paused);
            }
            attempts += 1;
            match outcome.failure {
                None => {
                    subscription.ack(&record).await?;
                    return Ok(Drained::Done);
                }
                Some(next_error) => error = next_error,
            }
        }
    }
}
