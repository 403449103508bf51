//! The relay: moves committed events from a service's outbox to the bus, in
//! commit order, in batches.
//!
//! Its cursor (`tandem_relay_positions`) is written only after the bus has
//! acknowledged a batch, so a crash at any point republishes at most the
//! last batch; consumers drop the duplicates by sequence. A bus that is
//! down stalls only the relay: the service's writes keep committing.
//!
//! The cursor is a [`Cursor`] `(xid, position)`: on SQLite, whose writers
//! are serialised, `position` order is commit order; on PostgreSQL the relay
//! reads only rows whose order is final (see
//! [`outbox::read_committed_after`]).
//!
//! On a bus that keeps overlapping publishes in order
//! ([`Bus::publish_depth`]), [`Relay::run`] keeps up to that many batches in
//! flight: a broker that serves several requests at once and takes tens of
//! milliseconds to acknowledge a batch then delays each event by one
//! acknowledgement, not by the queue of batches ahead of it (a broker that
//! serves them one at a time gains nothing: Kafka and NATS default to 1).
//!
//! [`Relay::run`] publishes only while it holds the store's lease named
//! after the relay ([`Store::try_lead`]): of several instances of a service
//! sharing one database, one publishes and the others stand by, trying
//! again every [`RelayConfig::lead_retry`]; a leader that loses its lease
//! stops before its next batch.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::bus::{Bus, BusError, OutgoingRecord};
use crate::fault;
use crate::outbox::{self, Cursor, OutboxBatch, StoredEvent};
use crate::params;
use crate::schema::now_micros;
use crate::store::{Lease, Store, StoreError, StoreFuture};

/// How a relay runs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Names the cursor; one per outbox.
    pub name: String,
    /// Most events read from the outbox and published in one batch.
    pub batch_size: usize,
    /// Longest wait between two looks at the outbox when nothing signals.
    pub idle_wait: Duration,
    /// The first pause after a failed batch; each pause after it doubles,
    /// jittered.
    pub retry_initial: Duration,
    /// Longest pause between two attempts at a failed batch (never longer
    /// than `lead_check`).
    pub retry_max: Duration,
    /// How often a relay that is not the leader tries to take the lease.
    pub lead_retry: Duration,
    /// Longest time a leader goes without checking that it still holds
    /// the lease (it also checks before every batch).
    pub lead_check: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            name: "relay".into(),
            batch_size: 1000,
            idle_wait: Duration::from_millis(500),
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
            lead_retry: Duration::from_secs(1),
            lead_check: Duration::from_millis(500),
        }
    }
}

/// Why a relay call failed. [`Relay::publish_once`] and [`Relay::drain`]
/// return the first error they meet; [`Relay::run`] retries a failed batch
/// by itself, and ends with an error only when it cannot watch its store
/// for commits or write its cursor at shutdown.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The service's database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The bus failed, or refused a batch.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Moves events from one store's outbox to one bus.
///
/// Delivery is at least once: every committed event is published, in
/// commit order and each aggregate's in sequence order, and a crash or a
/// failed batch may publish some again (consumers drop them by sequence).
/// An event whose transaction rolled back is never published.
pub struct Relay<S: Store> {
    store: S,
    bus: Arc<dyn Bus>,
    config: RelayConfig,
}

/// Why a leader stopped leading.
enum Stopped {
    Shutdown,
    LeaseLost,
}

impl<S: Store> Relay<S> {
    /// A relay of `store`'s outbox onto `bus`; nothing runs until
    /// [`Relay::run`] (or one of the one-shot calls) is awaited.
    pub fn new(store: S, bus: Arc<dyn Bus>, config: RelayConfig) -> Self {
        Self { store, bus, config }
    }

    /// Publishes the next batch, if any; returns how many events it moved.
    /// Reads the cursor first and records it before returning. Takes no
    /// lease: the caller makes sure no other relay of this name runs.
    pub async fn publish_once(&self) -> Result<usize, RelayError> {
        let cursor = self.load_cursor().await?;
        let (moved, end, _) = self.publish_after(cursor).await?;
        if moved > 0 {
            self.save_cursor(end).await?;
        }
        Ok(moved)
    }

    /// Publishes until nothing committed is left behind the cursor and
    /// returns how many events moved. Rows held back behind a transaction
    /// still running (PostgreSQL) are waited for, so while one stays open
    /// this does not return: bound it with a timeout. Takes no lease, like
    /// [`Relay::publish_once`].
    pub async fn drain(&self) -> Result<usize, RelayError> {
        let mut cursor = self.load_cursor().await?;
        let mut moved_in_all = 0;
        let mut pause = HELD_BACK_PAUSE;
        loop {
            let (moved, end, held_back) = self.publish_after(cursor).await?;
            if moved > 0 {
                self.save_cursor(end).await?;
                cursor = end;
                moved_in_all += moved;
                pause = HELD_BACK_PAUSE;
            } else if held_back {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LONGEST_HELD_BACK_PAUSE);
            } else {
                return Ok(moved_in_all);
            }
        }
    }

    /// The stored cursor. One that transaction ids restarted below (a
    /// PostgreSQL restore) is recovered first, or the relay would pass over
    /// every new event, reporting no backlog.
    async fn load_cursor(&self) -> Result<Cursor, StoreError> {
        let name = self.config.name.clone();
        let read = move |tx: &mut dyn crate::store::Tx| -> Result<(Cursor, bool), StoreError> {
            let cursor = tx
                .query_opt(
                    "SELECT xid, position FROM tandem_relay_positions WHERE relay = $1",
                    params![&name],
                )?
                .map(|row| {
                    Ok::<_, StoreError>(Cursor {
                        xid: row.i64(0)?,
                        position: row.i64(1)?,
                    })
                })
                .transpose()?
                .unwrap_or(Cursor::START);
            Ok((cursor, outbox::xids_restarted(tx, cursor)?))
        };
        let (cursor, restarted) = self.store.read(read.clone()).await?;
        if !restarted {
            return Ok(cursor);
        }
        self.store
            .write(move |tx| -> Result<Cursor, StoreError> {
                outbox::recover_restarted_xids(tx)?;
                Ok(read(tx)?.0)
            })
            .await
    }

    fn start_read(&self, after: Cursor) -> StoreFuture<OutboxBatch, StoreError> {
        let batch_size = self.config.batch_size;
        self.store
            .read(move |tx| outbox::read_committed_after(tx, after, batch_size))
    }

    /// Publishes the batch after `cursor`; returns how many events moved,
    /// the new cursor, and whether rows beyond it are not final yet.
    async fn publish_after(&self, cursor: Cursor) -> Result<(usize, Cursor, bool), RelayError> {
        let batch = self.next_batch(cursor, None).await?;
        if batch.events.is_empty() {
            return Ok((0, cursor, batch.held_back));
        }
        let (end, held_back) = (batch.end, batch.held_back);
        let moved = dispatch(self.bus.as_ref(), batch.events).await?.await?;
        Ok((moved, end, held_back))
    }

    /// Reads the batch after `cursor`.
    ///
    /// With `ahead`, uses the read it holds if that read starts at `cursor`
    /// and found events (an empty answer may predate a commit whose signal
    /// was consumed since, so it is read again), and once it has events
    /// starts reading the batch after them into it, so that reading the
    /// outbox overlaps publishing to the bus.
    async fn next_batch(
        &self,
        cursor: Cursor,
        mut ahead: Option<&mut Option<ReadAhead>>,
    ) -> Result<OutboxBatch, RelayError> {
        let read_ahead = match ahead.as_mut().and_then(|ahead| ahead.take()) {
            Some(ReadAhead { after, read }) if after == cursor => Some(read.await?),
            _ => None,
        };
        let batch = match read_ahead {
            Some(batch) if !batch.events.is_empty() => batch,
            _ => self.start_read(cursor).await?,
        };
        if let (false, Some(ahead)) = (batch.events.is_empty(), ahead) {
            *ahead = Some(ReadAhead {
                after: batch.end,
                read: self.start_read(batch.end),
            });
        }
        Ok(batch)
    }

    fn save_cursor(&self, cursor: Cursor) -> StoreFuture<(), StoreError> {
        let name = self.config.name.clone();
        self.store.write(move |tx| -> Result<_, StoreError> {
            tx.execute(
                "INSERT INTO tandem_relay_positions (relay, xid, position, updated_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (relay) DO UPDATE SET
                   xid = CASE WHEN (excluded.xid, excluded.position)
                                   > (tandem_relay_positions.xid, tandem_relay_positions.position)
                              THEN excluded.xid ELSE tandem_relay_positions.xid END,
                   position = CASE WHEN (excluded.xid, excluded.position)
                                   > (tandem_relay_positions.xid, tandem_relay_positions.position)
                                   THEN excluded.position ELSE tandem_relay_positions.position END,
                   updated_at = excluded.updated_at",
                params![&name, cursor.xid, cursor.position, now_micros()],
            )?;
            Ok(())
        })
    }

    /// Relays until `shutdown` fires; retries failures with backoff.
    ///
    /// Publishes only while holding the lease named after the relay
    /// ([`RelayConfig::name`]); without it, tries to take it every
    /// [`RelayConfig::lead_retry`]. A leader checks its lease before every
    /// batch and at least every [`RelayConfig::lead_check`]; when the lease
    /// is lost it stops publishing, and stands by again.
    ///
    /// The cursor is kept in memory and written behind the publishes: at
    /// most every [`CURSOR_SAVE_INTERVAL`], busy or not (a relay that caught
    /// up writes it when the interval is up), and on shutdown, one write in
    /// flight at most. Its commit
    /// (an fsync) is thus off the critical path; a crash republishes what the
    /// last written cursor does not cover, and consumers drop the duplicates.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), RelayError> {
        loop {
            let Some(mut lease) = self.wait_for_lease(&shutdown).await else {
                return Ok(());
            };
            tracing::debug!(relay = %self.config.name, "leading");
            match self.lead(&shutdown, lease.as_mut()).await? {
                Stopped::Shutdown => return Ok(()),
                Stopped::LeaseLost => {
                    tracing::warn!(relay = %self.config.name, "lease lost; standing by");
                }
            }
        }
    }

    /// Takes the lease, trying again every `lead_retry`; `None` on shutdown.
    async fn wait_for_lease(&self, shutdown: &CancellationToken) -> Option<Box<dyn Lease>> {
        let mut logged = false;
        while !shutdown.is_cancelled() {
            match self.store.try_lead(&self.config.name).await {
                Ok(Some(lease)) => return Some(lease),
                Ok(None) => {
                    if !logged {
                        tracing::info!(relay = %self.config.name, "another instance leads; standing by");
                        logged = true;
                    }
                }
                Err(error) => {
                    tracing::warn!(relay = %self.config.name, %error, "cannot take the relay lease");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(self.config.lead_retry) => {}
            }
        }
        None
    }

    /// Publishes while `lease` holds.
    ///
    /// Up to [`Bus::publish_depth`] batches are in flight at once: the
    /// next batch is read and handed to the bus while the ones before it
    /// await their acknowledgements, which are taken in order, so the
    /// cursor only ever covers acknowledged batches. A failure drops every
    /// batch in flight and starts again from the stored cursor.
    async fn lead(
        &self,
        shutdown: &CancellationToken,
        lease: &mut dyn Lease,
    ) -> Result<Stopped, RelayError> {
        let mut signal = self.store.outbox_signal();
        let mut external = self.store.external_changes()?;
        let mut retry = Backoff::new(self.config.retry_initial, self.config.retry_max);
        let depth = self.bus.publish_depth().max(1);
        // The cursor after the last acknowledged batch, and after the
        // last batch handed to the bus.
        let mut cursor: Option<Cursor> = None;
        let mut dispatched: Option<Cursor> = None;
        let mut flights: std::collections::VecDeque<InFlight> = std::collections::VecDeque::new();
        let mut saved_cursor: Option<Cursor> = None;
        let mut last_save = tokio::time::Instant::now();
        let mut saving: Option<StoreFuture<(), StoreError>> = None;
        let mut ahead: Option<ReadAhead> = None;
        let idle_wait = self.config.idle_wait.min(self.config.lead_check);
        let mut held_back_pause = HELD_BACK_PAUSE;
        let stopped = loop {
            if shutdown.is_cancelled() {
                break Stopped::Shutdown;
            }
            if !lease.held() {
                break Stopped::LeaseLost;
            }
            signal.borrow_and_update();
            external.changed()?;
            let attempt = async {
                let after = match dispatched {
                    Some(after) => after,
                    None => {
                        let stored = self.load_cursor().await?;
                        saved_cursor = Some(stored);
                        cursor = Some(stored);
                        stored
                    }
                };
                dispatched = Some(after);
                let mut held_back = false;
                if flights.len() < depth {
                    let batch = self.next_batch(after, Some(&mut ahead)).await?;
                    held_back = batch.held_back;
                    if !batch.events.is_empty() {
                        dispatched = Some(batch.end);
                        let acked = dispatch(self.bus.as_ref(), batch.events).await?;
                        flights.push_back(InFlight {
                            end: batch.end,
                            ack: tokio::spawn(tracing::Instrument::in_current_span(acked)),
                        });
                        if flights.len() < depth {
                            return Ok(Turn::Sent);
                        }
                    }
                }
                let room = flights.len() < depth;
                let turn = match flights.front_mut() {
                    None => Turn::Idle { held_back },
                    Some(oldest) => {
                        // With room for another batch, a commit (or rows
                        // no longer held back) ends the wait early.
                        let acked = if room {
                            let pause = if held_back {
                                held_back_pause
                            } else {
                                idle_wait
                            };
                            tokio::select! {
                                acked = &mut oldest.ack => Some(acked),
                                waited = crate::wait::wait_for_change(&mut signal, Some(&mut external), pause, crate::wait::LONGEST_RELAY_POLL) => {
                                    waited?;
                                    None
                                }
                            }
                        } else {
                            Some((&mut oldest.ack).await)
                        };
                        match acked {
                            None => {
                                if held_back {
                                    held_back_pause =
                                        (held_back_pause * 2).min(LONGEST_HELD_BACK_PAUSE);
                                }
                                Turn::Sent
                            }
                            Some(acked) => {
                                let flight = flights.pop_front().expect("the oldest batch");
                                acked.map_err(|error| {
                                    RelayError::Bus(BusError::Unavailable(
                                        format!("the publish task ended: {error}").into(),
                                    ))
                                })??;
                                cursor = Some(flight.end);
                                Turn::Acked
                            }
                        }
                    }
                };
                let due = last_save.elapsed() >= CURSOR_SAVE_INTERVAL;
                if due && cursor != saved_cursor {
                    if let Some(previous) = saving.take() {
                        previous.await?;
                    }
                    if let Some(end) = cursor {
                        saving = Some(self.save_cursor(end));
                    }
                    saved_cursor = cursor;
                    last_save = tokio::time::Instant::now();
                }
                Ok::<Turn, RelayError>(turn)
            };
            match attempt.await {
                Ok(Turn::Sent) => retry.reset(),
                Ok(Turn::Acked) => {
                    retry.reset();
                    held_back_pause = HELD_BACK_PAUSE;
                }
                Ok(Turn::Idle { held_back: true }) => {
                    // Committed rows wait behind a transaction still
                    // running: look again shortly.
                    retry.reset();
                    tokio::select! {
                        _ = shutdown.cancelled() => break Stopped::Shutdown,
                        _ = tokio::time::sleep(held_back_pause) => {}
                    }
                    held_back_pause = (held_back_pause * 2).min(LONGEST_HELD_BACK_PAUSE);
                }
                Ok(Turn::Idle { held_back: false }) => {
                    retry.reset();
                    held_back_pause = HELD_BACK_PAUSE;
                    // Caught up. A cursor not written yet is written when
                    // its interval is up, not at once: a producer
                    // committing every few milliseconds would otherwise pay
                    // a cursor commit (an fsync on its file) for each.
                    let wait = if cursor != saved_cursor {
                        CURSOR_SAVE_INTERVAL.saturating_sub(last_save.elapsed())
                    } else {
                        idle_wait
                    };
                    tokio::select! {
                        _ = shutdown.cancelled() => break Stopped::Shutdown,
                        waited = crate::wait::wait_for_change(&mut signal, Some(&mut external), wait, crate::wait::LONGEST_RELAY_POLL) => { waited?; }
                    }
                }
                Err(error) => {
                    // Start again from the stored cursor: what was in
                    // flight is published again.
                    for flight in flights.drain(..) {
                        flight.ack.abort();
                    }
                    cursor = None;
                    dispatched = None;
                    saving = None;
                    ahead = None;
                    tracing::warn!(relay = %self.config.name, %error, retry_in_ms = retry.current().as_millis() as u64, "relay batch failed");
                    let pause = retry.next_delay().min(self.config.lead_check);
                    tokio::select! {
                        _ = shutdown.cancelled() => break Stopped::Shutdown,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        };
        // Batches still in flight are not waited for: the cursor covers
        // only acknowledged ones, and the next leader publishes the rest
        // again.
        for flight in flights.drain(..) {
            flight.ack.abort();
        }
        if let Some(previous) = saving.take() {
            previous.await?;
        }
        // The cursor only moves forward in the table, so writing it after
        // the lease was lost never undoes a newer leader's progress.
        if let Some(cursor) = cursor {
            if Some(cursor) != saved_cursor {
                self.save_cursor(cursor).await?;
            }
        }
        Ok(stopped)
    }
}

/// The read of the batch after the one being published.
struct ReadAhead {
    after: Cursor,
    read: StoreFuture<OutboxBatch, StoreError>,
}

/// Hands `events` to `bus`, queued behind the batches handed to it before
/// ([`Bus::enqueue`]), and returns what awaits their acknowledgement and
/// counts them (resolving to how many there were).
async fn dispatch(
    bus: &dyn Bus,
    events: Vec<StoredEvent>,
) -> Result<impl std::future::Future<Output = Result<usize, RelayError>> + Send + 'static, RelayError>
{
    use tracing::Instrument;
    let records: Vec<OutgoingRecord> = events
        .into_iter()
        .map(|event| OutgoingRecord {
            topic: event.topic,
            key: event.subject,
            payload: event.envelope,
        })
        .collect();
    let count = records.len();
    // One topic per relay as a rule; count each record's own anyway.
    let topics: Vec<(String, u64)> = records
        .chunk_by(|a, b| a.topic == b.topic)
        .map(|run| (run[0].topic.clone(), run.len() as u64))
        .collect();
    fault::point("relay.before_publish");
    let started = std::time::Instant::now();
    let span = crate::trace::enabled()
        .then(|| crate::trace::send(&records[0].topic, records.len(), || traceparents(&records)));
    let queued = match &span {
        Some(span) => bus.enqueue(records).instrument(span.clone()).await,
        None => bus.enqueue(records).await,
    };
    let acks = match queued {
        Ok(acks) => acks,
        Err(error) => {
            crate::metrics::metrics()
                .bus_operation(crate::metrics::Operation::send, started.elapsed());
            count_failure(&topics[0].0, &error);
            return Err(error.into());
        }
    };
    Ok(async move {
        let acked = match span {
            Some(span) => acks.instrument(span).await,
            None => acks.await,
        };
        let metrics = crate::metrics::metrics();
        metrics.bus_operation(crate::metrics::Operation::send, started.elapsed());
        if let Err(error) = acked {
            count_failure(&topics[0].0, &error);
            return Err(error.into());
        }
        fault::point("relay.after_publish");
        if crate::metrics::enabled() {
            for (topic, sent) in topics {
                metrics
                    .sent_messages
                    .get_or_create(&crate::metrics::DestinationLabels {
                        messaging_destination_name: topic,
                    })
                    .inc_by(sent);
            }
        }
        Ok(count)
    })
}

/// Counts a failed publish to `topic` by the error's kind.
fn count_failure(topic: &str, error: &BusError) {
    if !crate::metrics::enabled() {
        return;
    }
    crate::metrics::metrics()
        .publish_failures
        .get_or_create(&crate::metrics::TopicErrorLabels {
            topic: topic.to_owned(),
            error_type: error.kind().to_owned(),
        })
        .inc();
}

/// A batch handed to the bus whose acknowledgement the relay awaits.
struct InFlight {
    /// The cursor after the batch.
    end: Cursor,
    /// Its acknowledgement, awaited on a task of its own while the relay
    /// reads and hands on the batches after it.
    ack: tokio::task::JoinHandle<Result<usize, RelayError>>,
}

/// What one turn of a leading relay did.
enum Turn {
    /// Handed a batch to the bus, with room for another: look again now.
    Sent,
    /// The oldest batch in flight was acknowledged.
    Acked,
    /// Nothing to send and nothing in flight; `held_back`: committed rows
    /// wait behind a transaction still running.
    Idle { held_back: bool },
}

/// The `traceparent` of each record's envelope that has one (read without
/// decoding the rest of the envelope).
fn traceparents(records: &[OutgoingRecord]) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Traced {
        traceparent: Option<String>,
    }
    records
        .iter()
        .filter_map(|record| {
            serde_json::from_slice::<Traced>(&record.payload)
                .ok()?
                .traceparent
        })
        .collect()
}

/// Longest time a busy relay goes without writing its cursor.
pub const CURSOR_SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// The pause before looking again at rows held back behind a transaction
/// still running (PostgreSQL), doubling up to the longest while they stay
/// held back (a long transaction elsewhere in the cluster).
const HELD_BACK_PAUSE: Duration = Duration::from_millis(2);
const LONGEST_HELD_BACK_PAUSE: Duration = Duration::from_millis(100);

/// Events committed but not yet relayed, and the age of the oldest, in
/// microseconds.
pub async fn backlog<S: Store>(store: &S, relay: &str) -> Result<(u64, i64), StoreError> {
    let relay = relay.to_owned();
    store
        .read(move |tx| -> Result<_, StoreError> {
            let (count, oldest) = tx.engine().relay_backlog(tx, &relay)?;
            let age = oldest.map_or(0, |oldest| (now_micros() - oldest).max(0));
            Ok((count, age))
        })
        .await
}
