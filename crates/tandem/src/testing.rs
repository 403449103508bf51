//! Testing your own handlers and services on the real parts: a handler
//! runs in the real consumer, against a real SQLite file in a temporary
//! directory, fed from a real embedded log; nothing is faked. Enable the
//! crate's `testing` feature in your `[dev-dependencies]`:
//!
//! ```toml
//! [dev-dependencies]
//! tandem = { path = "…/crates/tandem", features = ["testing"] }
//! ```
//!
//! - [`event`] builds an envelope of a contract type with sensible
//!   defaults (a fresh id, now, the payload's type and schema).
//! - [`HandlerBed`] runs one handler: [`HandlerBed::deliver`] puts events
//!   on its log in exactly the order given (duplicates, reorderings and
//!   gaps included) and returns once the consumer has consumed them all
//!   (applied, dropped as duplicates, held behind a gap, or parked); then
//!   look at the handler's tables ([`HandlerBed::store`]), the events it
//!   published ([`HandlerBed::published`]), what it parked
//!   ([`HandlerBed::parked`]) and what waits behind a gap
//!   ([`HandlerBed::held`]).
//! - [`Quiescence`] waits, with a deadline, until a whole in-process
//!   system has consumed everything it published: every relay's outbox
//!   published, every consumer at the head of its topics.
//!
//! Waiting is done by looking again every few milliseconds until the
//! condition holds or the deadline passes: never a fixed sleep.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, OutgoingRecord};
use crate::consumer::{Consumer, ConsumerConfig, Handler};
use crate::dead_letter::DeadLetter;
use crate::embedded::{EmbeddedLog, EmbeddedOptions};
use crate::envelope::{Envelope, EventPayload};
use crate::outbox::NewEvent;
use crate::sqlite::{SqliteOptions, SqliteStore, Synchronous};
use crate::store::{Store, StoreError, Tx};

/// How long [`HandlerBed::deliver`] waits for the consumer by default.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// How often a wait looks again.
const LOOK_EVERY: Duration = Duration::from_millis(2);

/// What went wrong in a test bed.
#[derive(Debug, thiserror::Error)]
pub enum TestingError {
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The log refused or failed.
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
    /// A payload did not serialise.
    #[error("the payload does not serialise: {0}")]
    Payload(String),
    /// The temporary directory could not be made.
    #[error("temporary directory: {0}")]
    Io(#[from] std::io::Error),
    /// The condition did not hold within the deadline.
    #[error("{what} did not happen within {deadline:?}; last seen: {last}")]
    Deadline {
        /// What was waited for.
        what: String,
        /// How long it was waited for.
        deadline: Duration,
        /// What the last look found.
        last: String,
    },
    /// The consumer stopped with an error while events were delivered.
    #[error("the consumer stopped: {0}")]
    Consumer(String),
}

/// An envelope of `payload` for aggregate `subject` at `sequence`, as
/// service `topic` would publish it: a fresh id, the time now, the
/// payload's type and schema, no trace or correlation.
pub fn event<T: EventPayload>(
    topic: &str,
    subject: &str,
    sequence: u64,
    payload: &T,
) -> Result<Envelope, TestingError> {
    let new = NewEvent::new(subject, payload)
        .map_err(|error| TestingError::Payload(error.to_string()))?;
    Ok(Envelope {
        id: crate::envelope::new_event_id(),
        source: topic.to_owned(),
        event_type: new.event_type,
        subject: new.subject,
        time: time::OffsetDateTime::now_utc(),
        dataschema: new.dataschema,
        data: new.data,
        sequence,
        traceparent: None,
        correlationid: None,
        causationid: None,
        snapshot: false,
    })
}

/// One handler in the real consumer, on a SQLite file and an embedded log
/// in a temporary directory of its own (removed when the bed is dropped).
pub struct HandlerBed {
    store: SqliteStore,
    bus: Arc<EmbeddedLog>,
    handler: Arc<dyn Handler>,
    config: ConsumerConfig,
    deadline: Duration,
    _dir: tempfile::TempDir,
}

impl HandlerBed {
    /// A bed for `handler`, consuming as `config` says (its name and
    /// topics; its `gap_timeout` decides how long a gap is waited for
    /// before it is parked). `install` creates the handler's tables.
    pub async fn new<F>(
        handler: Arc<dyn Handler>,
        config: ConsumerConfig,
        install: F,
    ) -> Result<Self, TestingError>
    where
        F: FnOnce(&mut dyn Tx) -> Result<(), StoreError> + Send + 'static,
    {
        let dir = tempfile::tempdir()?;
        let options = SqliteOptions {
            synchronous: Synchronous::Normal,
            ..SqliteOptions::default()
        };
        let store = SqliteStore::open(dir.path().join("handler.db"), options).await?;
        store.write(install).await?;
        let bus = EmbeddedLog::open(
            dir.path().join("bus.db"),
            EmbeddedOptions {
                synchronous: Synchronous::Normal,
                ..EmbeddedOptions::default()
            },
        )
        .await?;
        Ok(Self {
            store,
            bus: Arc::new(bus),
            handler,
            config,
            deadline: DEFAULT_DEADLINE,
            _dir: dir,
        })
    }

    /// Waits up to `deadline` (instead of [`DEFAULT_DEADLINE`]) in
    /// [`HandlerBed::deliver`].
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The handler's database: read its tables to assert on its effect.
    pub fn store(&self) -> &SqliteStore {
        &self.store
    }

    /// Puts `events` on the log in exactly this order (each keyed by its
    /// subject, on the topic named by its `source`) and runs the real
    /// consumer until it has consumed every record on the log; then stops
    /// it. Call it again to deliver more: the consumer goes on from where
    /// it was, as after a restart.
    pub async fn deliver(&self, events: &[Envelope]) -> Result<(), TestingError> {
        let records: Vec<OutgoingRecord> = events
            .iter()
            .map(|event| OutgoingRecord {
                topic: event.source.clone(),
                key: event.subject.clone(),
                payload: event.to_json(),
            })
            .collect();
        self.deliver_raw(&records).await
    }

    /// Like [`HandlerBed::deliver`], for records as they would come off a
    /// bus, well formed or not (a malformed record is parked).
    pub async fn deliver_raw(&self, records: &[OutgoingRecord]) -> Result<(), TestingError> {
        self.bus.publish(records).await?;
        let consumer = Consumer::new(
            self.store.clone(),
            Arc::clone(&self.bus) as Arc<dyn Bus>,
            Arc::clone(&self.handler),
            self.config.clone(),
        );
        let stop = CancellationToken::new();
        let run = tokio::spawn({
            let stop = stop.clone();
            async move { consumer.run(stop).await }
        });
        let caught_up = Quiescence::new()
            .consumer(
                self.store.clone(),
                Arc::clone(&self.bus) as Arc<dyn Bus>,
                &self.config.name,
                &self.config.topics,
            )
            .wait(self.deadline)
            .await;
        stop.cancel();
        let stopped = run
            .await
            .map_err(|error| TestingError::Consumer(error.to_string()))?;
        stopped.map_err(|error| TestingError::Consumer(error.to_string()))?;
        caught_up
    }

    /// The events the handler appended to the outbox, in order.
    pub async fn published(&self) -> Result<Vec<Envelope>, TestingError> {
        let stored = self
            .store
            .read(|tx| crate::outbox::read_after(tx, 0, usize::MAX >> 1))
            .await?;
        stored
            .iter()
            .map(|row| {
                Envelope::decode(&row.envelope)
                    .map_err(|error| TestingError::Payload(error.to_string()))
            })
            .collect()
    }

    /// The consumer's parked dead letters, oldest first.
    pub async fn parked(&self) -> Result<Vec<DeadLetter>, TestingError> {
        Ok(crate::dead_letter::list(&self.store, Some(&self.config.name), false).await?)
    }

    /// How many events wait behind a gap (held, not applied yet).
    pub async fn held(&self) -> Result<u64, TestingError> {
        let consumer = self.config.name.clone();
        Ok(self
            .store
            .read(move |tx| -> Result<u64, StoreError> {
                tx.query_opt(
                    "SELECT COUNT(*) FROM tandem_pending WHERE consumer = $1",
                    crate::params![&consumer],
                )?
                .map_or(Ok(0), |row| {
                    row.i64(0).map(|n| u64::try_from(n).unwrap_or(0))
                })
            })
            .await?)
    }
}

type Look = Box<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Option<String>, TestingError>> + Send>>
        + Send
        + Sync,
>;

/// Waits until a system in this process has consumed everything it
/// published: each outbox added with [`Quiescence::outbox`] has nothing
/// left to publish, and each consumer added with [`Quiescence::consumer`]
/// is at the head of every partition of its topics.
#[derive(Default)]
pub struct Quiescence {
    looks: Vec<(String, Look)>,
}

impl Quiescence {
    /// Nothing to wait for yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits for relay `relay`'s outbox in `store` to be all published.
    pub fn outbox<S: Store>(mut self, store: S, relay: &str) -> Self {
        let relay = relay.to_owned();
        let what = format!("relay {relay}'s outbox published");
        self.looks.push((
            what,
            Box::new(move || {
                let (store, relay) = (store.clone(), relay.clone());
                Box::pin(async move {
                    let status = crate::status::outbox_status(&store, &relay).await?;
                    Ok((status.pending_events > 0)
                        .then(|| format!("{} events to publish", status.pending_events)))
                })
            }),
        ));
        self
    }

    /// Waits for `consumer` (its positions in `store`) to be at the head
    /// of every partition of `topics` on `bus`.
    pub fn consumer<S: Store>(
        mut self,
        store: S,
        bus: Arc<dyn Bus>,
        consumer: &str,
        topics: &[String],
    ) -> Self {
        let (consumer, topics) = (consumer.to_owned(), topics.to_vec());
        let what = format!("consumer {consumer} at the head of {topics:?}");
        self.looks.push((
            what,
            Box::new(move || {
                let (store, bus, consumer, topics) = (
                    store.clone(),
                    Arc::clone(&bus),
                    consumer.clone(),
                    topics.clone(),
                );
                Box::pin(async move {
                    let positions = crate::consumer::positions(&store, &consumer).await?;
                    let mut behind = Vec::new();
                    for topic in &topics {
                        for (partition, end) in bus.end_offsets(topic).await? {
                            let at = positions
                                .get(&crate::bus::TopicPartition::new(topic.clone(), partition))
                                .copied()
                                .unwrap_or(0);
                            if at < end {
                                behind.push(format!("{topic}/{partition} at {at} of {end}"));
                            }
                        }
                    }
                    Ok((!behind.is_empty()).then(|| behind.join(", ")))
                })
            }),
        ));
        self
    }

    /// Looks every few milliseconds until every condition holds at once,
    /// or fails after `deadline` naming the first that did not.
    pub async fn wait(&self, deadline: Duration) -> Result<(), TestingError> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let mut unmet = None;
            for (what, look) in &self.looks {
                if let Some(found) = look().await? {
                    unmet = Some((what.clone(), found));
                    break;
                }
            }
            let Some((what, last)) = unmet else {
                return Ok(());
            };
            if tokio::time::Instant::now() >= until {
                return Err(TestingError::Deadline {
                    what,
                    deadline,
                    last,
                });
            }
            tokio::time::sleep(LOOK_EVERY).await;
        }
    }
}
