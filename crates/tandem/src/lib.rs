//! Tandem: a toolkit for Rust services that talk through events.
//!
//! A service commits its state change and the events it publishes in one
//! local transaction ([`outbox`]); a [`relay`] moves committed events onto an
//! event [`bus`]; other services [`consumer`]s apply them to their own read
//! models with an exactly-once effect, parking what they cannot apply as
//! [`dead_letter`]s.
//!
//! Parts:
//! - [`guide`]: how to build a service on the toolkit, from the outbox to
//!   monitoring (documentation only).
//! - [`envelope`]: the wire format (CloudEvents 1.0 JSON) and typed payloads.
//! - [`compat`]: which changes to a payload's JSON Schema break its readers.
//! - [`store`]: the `Store`/`Tx` port; [`sqlite`] its embedded engine.
//! - [`bus`]: the `Bus`/`Subscription` port; [`embedded`] its embedded
//!   engine, a durable log in one file shared by processes.
//! - [`outbox`], [`relay`], [`consumer`], [`dead_letter`]: the pipeline.
//! - [`schema`]: the toolkit's own tables and their migrations; [`sql`]: the
//!   trait behind which each engine implements the toolkit's SQL that
//!   differs between engines; [`fault`]: crash points for tests.
//! - [`contract`]: published contracts and their check against a released
//!   baseline.
//! - [`engine`]: picks engines from URLs; [`metrics`]: the process's
//!   metrics (Prometheus and OpenMetrics).
//!
//! The toolkit knows nothing of any domain.

#![warn(missing_docs)]

pub mod audit;
pub mod backoff;
pub mod bus;
pub mod compat;
pub mod consumer;
pub mod contract;
pub mod dead_letter;
pub mod embedded;
pub mod engine;
pub mod envelope;
pub mod executor;
pub mod fault;
#[doc = include_str!("guide.md")]
pub mod guide {}
pub mod metrics;
pub mod outbox;
pub mod rebuild;
pub mod relay;
pub mod republish;
pub mod retention;
pub mod schema;
pub mod sql;
pub mod sqlite;
pub mod status;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod trace;
pub mod wait;

pub use bus::{Bus, BusError, Delivery, OutgoingRecord, Record, Subscription, TopicPartition};
pub use consumer::{
    CommittedBatch, Consumer, ConsumerConfig, ConsumerObserver, Handler, HandlerError,
};
pub use envelope::{DecodeError, Envelope, EventPayload};
pub use outbox::{EventContext, NewEvent};
pub use relay::{Relay, RelayConfig};
pub use store::{Cause, Param, Row, Store, StoreError, Tx};
