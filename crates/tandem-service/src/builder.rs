//! [`Service`]: a service's parts put together in a few lines, and run
//! until a shutdown token fires.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use tandem::{Bus, Envelope, Handler, HandlerError, Store, Tx};
//! # struct Balances;
//! # impl Handler for Balances {
//! #     fn handle(&self, _: &mut dyn Tx, _: &Envelope) -> Result<(), HandlerError> { Ok(()) }
//! # }
//! # fn install(_: &mut dyn Tx) -> Result<(), tandem::StoreError> { Ok(()) }
//! # fn router<S: Store>(_: S) -> axum::Router { axum::Router::new() }
//! # async fn example<S: Store>(
//! #     listener: tokio::net::TcpListener, store: S, bus: Arc<dyn Bus>,
//! #     shutdown: tokio_util::sync::CancellationToken,
//! # ) -> Result<(), tandem_service::ServiceError> {
//! use tandem::consumer::ConsumerConfig;
//! use tandem_service::Service;
//!
//! let transfers = ConsumerConfig::new("ledger-balances", &["transfer"]);
//! Service::new("ledger", store, bus)
//!     .install(install)
//!     .relay("ledger")
//!     .consumer("balances", transfers, Balances)
//!     .http(router)
//!     .run(listener, shutdown)
//!     .await
//! # }
//! ```

use std::sync::Arc;

use axum::Router;
use tandem::consumer::{Consumer, ConsumerConfig};
use tandem::relay::{Relay, RelayConfig};
use tandem::{Bus, Handler, Store, StoreError, Tx};
use tokio_util::sync::CancellationToken;

use crate::admin::AdminTokens;
use crate::{run_parts, task, BoxedTask};

/// Why a service could not start or stopped with an error. The cause is
/// kept as the error's source.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Installing the service's tables in its database failed; nothing ran.
    #[error("cannot set up the {service} database: {source}")]
    Setup {
        /// The service's name, as given to [`Service::new`].
        service: &'static str,
        /// What the database answered.
        #[source]
        source: StoreError,
    },
    /// A background part (the relay or a consumer) failed.
    #[error("{part}: {source}")]
    Part {
        /// Which part: `relay`, or the name a consumer was given in
        /// [`Service::consumer`] or [`Service::read_model`] (with
        /// [`run_parts`](crate::run_parts), the name it was handed).
        part: &'static str,
        /// The error the part stopped with.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The HTTP server failed.
    #[error("http server: {0}")]
    Http(#[source] std::io::Error),
    /// A part panicked.
    #[error("task panicked: {0}")]
    Panicked(#[source] tokio::task::JoinError),
}

/// Installs a service's tables (in one write transaction, before any part
/// runs).
type Install = Box<dyn FnOnce(&mut dyn Tx) -> Result<(), StoreError> + Send>;

/// A service: its database, the bus, and the parts that run together until
/// shutdown — the HTTP API, the relay of its outbox (when it publishes) and
/// its consumers. The first part to fail stops the others.
#[must_use = "a service does nothing until `run` is awaited"]
pub struct Service<S: Store> {
    name: &'static str,
    store: S,
    bus: Arc<dyn Bus>,
    install: Option<Install>,
    relay: Option<RelayConfig>,
    consumers: Vec<(&'static str, ConsumerConfig, Arc<dyn Handler>)>,
    read_models: Vec<tandem::rebuild::Rebuildable>,
    router: Router,
    admin: AdminTokens,
    retention: tandem::retention::Retention,
    keeps_history: bool,
    snapshots: Option<Arc<dyn tandem::republish::Snapshots>>,
}

impl<S: Store> Service<S> {
    /// A service named `name` (as in "the `name` database") with no parts
    /// but an HTTP server that answers 404.
    pub fn new(name: &'static str, store: S, bus: Arc<dyn Bus>) -> Self {
        Self {
            name,
            store,
            bus,
            install: None,
            relay: None,
            consumers: Vec::new(),
            read_models: Vec::new(),
            router: Router::new(),
            admin: AdminTokens::none(),
            retention: tandem::retention::Retention::default(),
            keeps_history: false,
            snapshots: None,
        }
    }

    /// Sets up the service's own tables before anything runs; a failure
    /// stops the start with [`ServiceError::Setup`].
    pub fn install<F>(mut self, install: F) -> Self
    where
        F: FnOnce(&mut dyn Tx) -> Result<(), StoreError> + Send + 'static,
    {
        self.install = Some(Box::new(install));
        self
    }

    /// Relays the service's outbox onto `topic` (the relay, its cursor and
    /// its lease are named after the topic), with the default settings.
    pub fn relay(self, topic: &str) -> Self {
        self.relay_with(RelayConfig {
            name: topic.to_owned(),
            ..RelayConfig::default()
        })
    }

    /// Relays the service's outbox with `config`.
    pub fn relay_with(mut self, config: RelayConfig) -> Self {
        self.relay = Some(config);
        self
    }

    /// Runs a consumer of `config.topics` that applies events with
    /// `handler`; `part` names it in the log and in a [`ServiceError`].
    pub fn consumer<H: Handler + 'static>(
        mut self,
        part: &'static str,
        config: ConsumerConfig,
        handler: H,
    ) -> Self {
        self.consumers.push((part, config, Arc::new(handler)));
        self
    }

    /// Runs a consumer of `config.topics` that keeps the read model
    /// `model` in its live tables (created before anything runs), and can
    /// rebuild it side by side (`POST /admin/consumers/{name}/rebuild`,
    /// `tandem rebuild`; see [`tandem::rebuild`]).
    pub fn read_model<M: tandem::rebuild::ReadModel>(
        mut self,
        part: &'static str,
        config: ConsumerConfig,
        model: M,
    ) -> Self {
        let model: Arc<dyn tandem::rebuild::ReadModel> = Arc::new(model);
        let handler = model.handler(&tandem::rebuild::TableNames::live(&*model));
        self.read_models.push(tandem::rebuild::Rebuildable {
            config: config.clone(),
            model,
        });
        self.consumers.push((part, config, handler));
        self
    }

    /// Serves the router that `api` makes from the service's store (probes
    /// included: the service's router brings them).
    pub fn http(mut self, api: impl FnOnce(S) -> Router) -> Self {
        self.router = api(self.store.clone());
        self
    }

    /// Accepts `tokens` on the admin routes (`/admin/...`, see
    /// [`crate::admin`]); without any, they answer 401.
    pub fn admin(mut self, tokens: AdminTokens) -> Self {
        self.admin = tokens;
        self
    }

    /// Prunes by `rules` (see [`tandem::retention`]); without this call, by
    /// [`tandem::retention::Retention::default`].
    pub fn retention(mut self, rules: tandem::retention::Retention) -> Self {
        self.retention = rules;
        self
    }

    /// Keeps the service's outbox whole, as its event history, whatever
    /// the retention rules say of published rows: the service's own
    /// choice, for a service whose history is worth re-publishing.
    pub fn keep_event_history(mut self) -> Self {
        self.keeps_history = true;
        self
    }

    /// Describes the service's aggregates for a re-publication by
    /// snapshot (`POST /admin/republish`, `tandem republish`; see
    /// [`tandem::republish`]): what a service whose history is pruned
    /// re-publishes.
    pub fn snapshots(mut self, provider: impl tandem::republish::Snapshots) -> Self {
        self.snapshots = Some(Arc::new(provider));
        self
    }

    /// Installs the tables, then runs every part on `listener` until
    /// `shutdown` fires or a part fails.
    pub async fn run(
        self,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServiceError> {
        let Self {
            name,
            store,
            bus,
            install,
            relay,
            consumers,
            read_models,
            router,
            admin,
            mut retention,
            keeps_history,
            snapshots,
        } = self;
        if keeps_history {
            retention.outbox_age = None;
        }
        {
            let models: Vec<_> = read_models.iter().map(|m| Arc::clone(&m.model)).collect();
            store
                .write(move |tx| {
                    for model in &models {
                        tandem::rebuild::install(tx, &**model)?;
                    }
                    Ok(())
                })
                .await
                .map_err(|source| ServiceError::Setup {
                    service: name,
                    source,
                })?;
        }
        if let Some(install) = install {
            store
                .write(install)
                .await
                .map_err(|source| ServiceError::Setup {
                    service: name,
                    source,
                })?;
        }
        let reporter = Reporter {
            service: name,
            store: store.clone(),
            bus: Arc::clone(&bus),
            relay: relay.as_ref().map(|config| config.name.clone()),
            consumers: Arc::new(
                consumers
                    .iter()
                    .map(|(_, config, _)| (config.name.clone(), config.topics.clone()))
                    .collect(),
            ),
            cache: Arc::default(),
        };
        let republisher = crate::admin::Republisher {
            topics: relay.iter().map(|config| config.name.clone()).collect(),
            keeps_history,
            snapshots,
        };
        let rebuildable = read_models
            .iter()
            .map(|model| model.config.name.clone())
            .collect();
        let router = crate::admin::with_admin(
            router,
            store.clone(),
            reporter.clone(),
            republisher,
            rebuildable,
            admin,
        );
        let router = crate::metrics::with_metrics(router, reporter);
        let mut parts: Vec<(&'static str, BoxedTask)> = Vec::new();
        {
            let (store, bus, stop) = (store.clone(), Arc::clone(&bus), shutdown.clone());
            let relay = relay.as_ref().map(|config| config.name.clone());
            parts.push((
                "pruner",
                task(async move {
                    tandem::retention::run(store, bus, relay, retention, stop).await;
                    Ok::<(), std::convert::Infallible>(())
                }),
            ));
        }
        if !read_models.is_empty() {
            let (store, bus, stop) = (store.clone(), Arc::clone(&bus), shutdown.clone());
            parts.push((
                "rebuilder",
                task(async move {
                    tandem::rebuild::run(store, bus, read_models, stop).await;
                    Ok::<(), std::convert::Infallible>(())
                }),
            ));
        }
        if let Some(config) = relay {
            let relay = Relay::new(store.clone(), Arc::clone(&bus), config);
            let stop = shutdown.clone();
            parts.push(("relay", task(async move { relay.run(stop).await })));
        }
        for (part, config, handler) in consumers {
            let consumer = Consumer::new(store.clone(), Arc::clone(&bus), handler, config);
            let stop = shutdown.clone();
            parts.push((part, task(async move { consumer.run(stop).await })));
        }
        let outcome = run_parts(listener, router, parts, shutdown).await;
        // A clean stop leaves whole files: the store and the bus finish
        // what was queued and close (SQLite: the WAL is checkpointed into
        // the database file).
        if let Err(error) = bus.close().await {
            tracing::warn!(service = name, %error, "the bus did not close cleanly");
        }
        if let Err(error) = store.close().await {
            tracing::warn!(service = name, %error, "the store did not close cleanly");
        }
        outcome
    }
}

/// Reads the service's report (outbox backlog, each consumer's lag, gaps,
/// dead letters and health) and sets the process's gauges from it: run
/// when `/metrics` is scraped and when `/status` is asked for.
#[derive(Clone)]
pub(crate) struct Reporter<S: Store> {
    service: &'static str,
    store: S,
    bus: Arc<dyn Bus>,
    relay: Option<String>,
    consumers: Arc<Vec<(String, Vec<String>)>>,
    cache: Arc<tandem::status::LagCache>,
}

impl<S: Store> Reporter<S> {
    /// The names of the service's consumers.
    pub(crate) fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }

    /// The topics `consumer` reads; `None` when the service has no such
    /// consumer.
    pub(crate) fn topics_of(&self, consumer: &str) -> Option<Vec<String>> {
        self.consumers
            .iter()
            .find(|(name, _)| name == consumer)
            .map(|(_, topics)| topics.clone())
    }

    pub(crate) fn consumers(&self) -> Vec<String> {
        self.consumers
            .iter()
            .map(|(name, _)| name.clone())
            .collect()
    }

    pub(crate) async fn report(
        &self,
    ) -> Result<tandem::status::ServiceReport, tandem::status::StatusError> {
        let (report, outbox, consumers) = tandem::status::service_report(
            self.service,
            &self.store,
            self.bus.as_ref(),
            &self.cache,
            self.relay.as_deref(),
            &self.consumers,
            true,
        )
        .await?;
        let mut report = report;
        for consumer in &mut report.consumers {
            consumer.end_to_end = Some(tandem::metrics::propagation(&consumer.consumer));
            consumer.stopped_by = tandem::metrics::fell_behind(&consumer.consumer);
            if consumer.stopped_by.is_some() {
                consumer.health = tandem::status::Health::Error;
            }
        }
        let metrics = tandem::metrics::metrics();
        if let Some(outbox) = &outbox {
            metrics.record_outbox(outbox);
        }
        for consumer in &consumers {
            metrics.record_consumer(consumer);
        }
        for consumer in &report.consumers {
            metrics.record_rebuild(&consumer.consumer, consumer.rebuild.as_ref());
        }
        Ok(report)
    }
}
