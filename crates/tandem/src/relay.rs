//! The relay: moves committed events from a service's outbox to the bus, in
//! commit order, in batches.
//!
//! Its cursor (`tandem_relay_positions`) is written only after the bus has
//! acknowledged a batch, so a crash at any point republishes at most the
//! last batch; consumers drop the duplicates by sequence. A bus that is
//! down stalls only the relay: the service's writes keep committing.
//!
//! Commit order equals `position` order on SQLite, whose writers are
//! serialised. Engines where ids can commit out of order (PostgreSQL) need
//! their own cursor rule before they use this relay.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError, OutgoingRecord};
use crate::fault;
use crate::outbox;
use crate::params;
use crate::schema::now_micros;
use crate::store::{Store, StoreError, StoreFuture};

/// How a relay runs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Names the cursor; one per outbox.
    pub name: String,
    pub batch_size: usize,
    /// Longest wait between two looks at the outbox when nothing signals.
    pub idle_wait: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            name: "relay".into(),
            batch_size: 1000,
            idle_wait: Duration::from_millis(500),
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Moves events from one store's outbox to one bus.
pub struct Relay<S: Store> {
    store: S,
    bus: Arc<dyn Bus>,
    config: RelayConfig,
}

impl<S: Store> Relay<S> {
    pub fn new(store: S, bus: Arc<dyn Bus>, config: RelayConfig) -> Self {
        Self { store, bus, config }
    }

    /// Publishes the next batch, if any; returns how many events it moved.
    /// Reads the cursor first and records it before returning.
    pub async fn publish_once(&self) -> Result<usize, RelayError> {
        let cursor = self.load_cursor().await?;
        let (moved, position) = self.publish_after(cursor).await?;
        if moved > 0 {
            self.save_cursor(position).await?;
        }
        Ok(moved)
    }

    async fn load_cursor(&self) -> Result<i64, StoreError> {
        let name = self.config.name.clone();
        self.store
            .read(move |tx| -> Result<i64, StoreError> {
                Ok(tx
                    .query_opt(
                        "SELECT position FROM tandem_relay_positions WHERE relay = $1",
                        params![&name],
                    )?
                    .map(|row| row.i64(0))
                    .transpose()?
                    .unwrap_or(0))
            })
            .await
    }

    /// Publishes the batch after `cursor`; returns how many events moved and
    /// the position of the last one (the new cursor).
    async fn publish_after(&self, cursor: i64) -> Result<(usize, i64), RelayError> {
        let batch_size = self.config.batch_size;
        let events = self
            .store
            .read(move |tx| outbox::read_after(tx, cursor, batch_size))
            .await?;
        let Some(last) = events.last().map(|event| event.position) else {
            return Ok((0, cursor));
        };
        let records: Vec<OutgoingRecord> = events
            .into_iter()
            .map(|event| OutgoingRecord {
                topic: event.topic,
                key: event.subject,
                payload: event.envelope,
            })
            .collect();
        fault::point("relay.before_publish");
        self.bus.publish(&records).await?;
        fault::point("relay.after_publish");
        Ok((records.len(), last))
    }

    fn save_cursor(&self, position: i64) -> StoreFuture<(), StoreError> {
        let name = self.config.name.clone();
        self.store.write(move |tx| -> Result<_, StoreError> {
            tx.execute(
                "INSERT INTO tandem_relay_positions (relay, position, updated_at)
                 VALUES ($1, $2, $3)
                 ON CONFLICT (relay) DO UPDATE SET
                   position = CASE WHEN excluded.position > tandem_relay_positions.position
                                   THEN excluded.position ELSE tandem_relay_positions.position END,
                   updated_at = excluded.updated_at",
                params![&name, position, now_micros()],
            )?;
            Ok(())
        })
    }

    /// Relays until `shutdown` fires; retries failures with backoff.
    ///
    /// The cursor is kept in memory and written behind the publishes: at
    /// most every [`CURSOR_SAVE_INTERVAL`] while busy, at once when the outbox
    /// is drained, and on shutdown, one write in flight at most. Its commit
    /// (an fsync) is thus off the critical path; a crash republishes what the
    /// last written cursor does not cover, and consumers drop the duplicates.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), RelayError> {
        let mut signal = self.store.outbox_signal();
        let mut external = self.store.external_changes()?;
        let mut retry = self.config.retry_initial;
        let mut cursor: Option<i64> = None;
        let mut saved_cursor: i64 = -1;
        let mut last_save = tokio::time::Instant::now();
        let mut saving: Option<StoreFuture<(), StoreError>> = None;
        while !shutdown.is_cancelled() {
            signal.borrow_and_update();
            external.changed()?;
            let attempt = async {
                let after = match cursor {
                    Some(position) => position,
                    None => {
                        let stored = self.load_cursor().await?;
                        saved_cursor = stored;
                        stored
                    }
                };
                cursor = Some(after);
                let (moved, position) = self.publish_after(after).await?;
                cursor = Some(position);
                let due = moved == 0 || last_save.elapsed() >= CURSOR_SAVE_INTERVAL;
                if due && position != saved_cursor {
                    if let Some(previous) = saving.take() {
                        previous.await?;
                    }
                    saving = Some(self.save_cursor(position));
                    saved_cursor = position;
                    last_save = tokio::time::Instant::now();
                }
                Ok::<usize, RelayError>(moved)
            };
            match attempt.await {
                Ok(moved) if moved > 0 => {
                    retry = self.config.retry_initial;
                }
                Ok(_) => {
                    retry = self.config.retry_initial;
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        waited = crate::wait::wait_for_change(&mut signal, Some(&mut external), self.config.idle_wait, crate::wait::LONGEST_RELAY_POLL) => { waited?; }
                    }
                }
                Err(error) => {
                    // Start again from the stored cursor.
                    cursor = None;
                    saving = None;
                    tracing::warn!(relay = %self.config.name, %error, retry_in_ms = retry.as_millis() as u64, "relay batch failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(crate::consumer::jitter(retry)) => {}
                    }
                    retry = (retry * 2).min(self.config.retry_max);
                }
            }
        }
        if let Some(previous) = saving.take() {
            previous.await?;
        }
        if let Some(position) = cursor {
            if position != saved_cursor {
                self.save_cursor(position).await?;
            }
        }
        Ok(())
    }
}

/// Longest time a busy relay goes without writing its cursor.
pub const CURSOR_SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// Events committed but not yet relayed, and the age of the oldest, in
/// microseconds.
pub async fn backlog<S: Store>(store: &S, relay: &str) -> Result<(u64, i64), StoreError> {
    let relay = relay.to_owned();
    store
        .read(move |tx| -> Result<_, StoreError> {
            let row = tx
                .query_opt(
                    "SELECT COUNT(*), MIN(committed_at) FROM tandem_outbox
                     WHERE position > COALESCE(
                       (SELECT position FROM tandem_relay_positions WHERE relay = $1), 0)",
                    params![&relay],
                )?
                .ok_or_else(|| StoreError::Decode("count returned nothing".into()))?;
            let count = u64::try_from(row.i64(0)?).unwrap_or(0);
            let age = row
                .opt_i64(1)?
                .map_or(0, |oldest| (now_micros() - oldest).max(0));
            Ok((count, age))
        })
        .await
}
