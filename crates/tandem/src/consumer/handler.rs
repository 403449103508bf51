//! The handler trait: what a consumer applies events with.

use crate::envelope::{Envelope, PayloadError};

use crate::store::{StoreError, Tx};

/// Why a handler could not apply an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    /// What went wrong; it becomes the dead letter's error if the event
    /// is parked.
    pub message: String,
    /// Retrying cannot help (a payload the handler cannot read): park now.
    pub permanent: bool,
}

impl HandlerError {
    /// A failure that may pass (a lock, a timeout, a row another event
    /// will write): the event is tried again, after a pause, up to the
    /// consumer's `max_attempts`, then parked.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
        }
    }

    /// A failure that trying again cannot cure: the event is parked at
    /// once.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: true,
        }
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.message)
    }
}

impl From<StoreError> for HandlerError {
    fn from(error: StoreError) -> Self {
        HandlerError::transient(error.to_string())
    }
}

impl From<PayloadError> for HandlerError {
    fn from(error: PayloadError) -> Self {
        HandlerError::permanent(error.to_string())
    }
}

/// Applies events to a read model: the part of a consumer that knows the
/// domain.
///
/// A handler writes only through the `tx` it is given, which is the
/// consumer's transaction: its effects commit together with the consumer's
/// position and the aggregate's last applied sequence, and that is what
/// makes the effect exactly once. It runs on the store's thread, so it
/// must not block on anything else, and it must not act outside the
/// database (send mail, call services): an event may be handled more than
/// once before a transaction commits. An `Err` is never half-applied: the
/// transaction it failed in is rolled back, the events before it are
/// applied again without it, and the event at fault is retried (under a
/// savepoint of its own) or parked alone (see [`HandlerError`]). A
/// [`crate::StoreError`] converts to a transient error, a payload that
/// does not read ([`crate::envelope::PayloadError`]) to a permanent one.
pub trait Handler: Send + Sync + 'static {
    /// Applies one event inside the consumer's transaction. Events of other
    /// types than the handler cares about should simply return `Ok`.
    fn handle(&self, tx: &mut dyn Tx, event: &Envelope) -> Result<(), HandlerError>;

    /// Applies the events of one batch, in the order given, inside the
    /// consumer's transaction: the events that passed the consumer's checks
    /// (no duplicates, each aggregate's in sequence order). The default
    /// calls [`Handler::handle`] for each. Override it to apply a batch in
    /// fewer statements (on PostgreSQL each statement is a round trip); the
    /// effect must be that of handling each event in turn. When it fails,
    /// the consumer rolls the batch back and applies its events one at a
    /// time with `handle`, so the event at fault is retried and parked
    /// alone.
    fn handle_batch(&self, tx: &mut dyn Tx, events: &[Envelope]) -> Result<(), HandlerError> {
        for event in events {
            self.handle(tx, event)?;
        }
        Ok(())
    }

    /// Empties the read model before a replay rebuilds it.
    fn reset(&self, tx: &mut dyn Tx) -> Result<(), HandlerError> {
        let _ = tx;
        Ok(())
    }
}

/// Runs the handler under a savepoint, so a failure leaves no trace.
pub(super) fn apply_handler(
    tx: &mut dyn Tx,
    handler: &dyn Handler,
    envelope: &Envelope,
) -> Result<Result<(), HandlerError>, StoreError> {
    tx.savepoint("tandem_event")?;
    match handler.handle(tx, envelope) {
        Ok(()) => {
            tx.release_savepoint("tandem_event")?;
            Ok(Ok(()))
        }
        Err(error) => {
            tx.rollback_to_savepoint("tandem_event")?;
            Ok(Err(error))
        }
    }
}
