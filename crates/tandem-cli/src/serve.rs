//! `tandem serve SERVICE`: one service process, as it is deployed.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tandem_service::admin::AdminTokens;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Service {
    Customer,
    Inventory,
    Order,
}

impl Service {
    pub const ALL: [Service; 3] = [Service::Customer, Service::Inventory, Service::Order];

    pub fn default_port(self) -> u16 {
        match self {
            Service::Customer => 8081,
            Service::Inventory => 8082,
            Service::Order => 8083,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Service::Customer => "customer",
            Service::Inventory => "inventory",
            Service::Order => "order",
        }
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Which service to run.
    service: Service,
    /// Address to listen on (default 127.0.0.1:8081 customer, 8082
    /// inventory, 8083 order; port 0 picks a free port; the chosen address
    /// is printed).
    #[arg(long, env = "TANDEM_LISTEN")]
    listen: Option<SocketAddr>,
    /// The service's own database: sqlite:///data/customer.db or
    /// postgres://user@host:5432/customer?sslmode=require
    #[arg(long, env = "TANDEM_DB", hide_env_values = true)]
    db: String,
    /// The event bus: sqlite:///data/bus.db, kafka://host:9092 or
    /// nats://host:4222 (see README, Running at scale)
    #[arg(long, env = "TANDEM_BUS", hide_env_values = true)]
    bus: String,
    /// Admin API tokens, NAME:SECRET[,NAME:SECRET...] (a SECRET alone is
    /// named admin; 16 characters at least). Prefer the environment
    /// variable: a flag's value shows in the process list. Without a
    /// token the admin routes answer 401, and the service refuses to
    /// listen on anything but a loopback address.
    #[arg(long, env = "TANDEM_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    #[command(flatten)]
    retention: RetentionArgs,
}

/// The retention rules (README, Retention): an age such as 30s, 15m, 24h
/// or 7d, or `keep`.
#[derive(Debug, Args)]
pub struct RetentionArgs {
    /// Published outbox rows older than this are pruned (a service that
    /// keeps its event history, as the Customer Service does, keeps them).
    #[arg(long, env = "TANDEM_RETAIN_OUTBOX", default_value = "24h", value_parser = age)]
    retain_outbox: Age,
    /// Embedded-log records older than this are pruned (Kafka and NATS:
    /// by their topics' own settings).
    #[arg(long, env = "TANDEM_RETAIN_LOG", default_value = "7d", value_parser = age)]
    retain_log: Age,
    /// At most this many records are kept in each embedded-log partition.
    #[arg(long, env = "TANDEM_RETAIN_LOG_RECORDS")]
    retain_log_records: Option<u64>,
    /// Resolved dead letters older than this are pruned.
    #[arg(long, env = "TANDEM_RETAIN_RESOLVED", default_value = "14d", value_parser = age)]
    retain_resolved: Age,
    /// Discarded dead letters older than this are pruned (by default kept:
    /// a replay must skip them again).
    #[arg(long, env = "TANDEM_RETAIN_DISCARDED", default_value = "keep", value_parser = age)]
    retain_discarded: Age,
    /// How often the rules are applied.
    #[arg(long, env = "TANDEM_PRUNE_EVERY", default_value = "30s", value_parser = age)]
    prune_every: Age,
}

/// An age, or `keep` (`None`).
#[derive(Debug, Clone, Copy)]
struct Age(Option<Duration>);

fn age(text: &str) -> Result<Age, String> {
    tandem::retention::parse_age(text).map(Age)
}

impl RetentionArgs {
    fn rules(&self) -> tandem::retention::Retention {
        tandem::retention::Retention {
            outbox_age: self.retain_outbox.0,
            resolved_age: self.retain_resolved.0,
            discarded_age: self.retain_discarded.0,
            log_age: self.retain_log.0,
            log_records: self.retain_log_records,
            every: self.prune_every.0.unwrap_or(Duration::from_secs(30)),
            ..tandem::retention::Retention::default()
        }
    }
}

impl ServeArgs {
    /// The name of the service these arguments run.
    pub fn service_name(&self) -> &'static str {
        self.service.name()
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let listen = args
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], args.service.default_port())));
    let tokens = admin_tokens(args.admin_token.as_deref(), listen)?;
    let rules = args.retention.rules();
    let store = tandem_engines::open_store(&args.db).await?;
    let bus = tandem_engines::open_bus(&args.bus).await?;
    let listener = tandem_service::bind(listen).await?;
    let address = listener.local_addr().context("listener address")?;
    // Tools (tandem up, the tests) read this line to learn the port.
    println!(
        "{} service listening on http://{address}",
        args.service.name()
    );
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        tracing::info!("signal received; stopping");
        on_signal.cancel();
    });
    let result = match args.service {
        Service::Customer => {
            customer_service::service(store, bus)
                .admin(tokens)
                .retention(rules)
                .run(listener, shutdown)
                .await
        }
        Service::Inventory => {
            inventory_service::service(store, bus)
                .admin(tokens)
                .retention(rules)
                .run(listener, shutdown)
                .await
        }
        Service::Order => {
            order_service::service(store, bus)
                .admin(tokens)
                .retention(rules)
                .run(listener, shutdown)
                .await
        }
    };
    result.map_err(|error| anyhow::anyhow!("{} service stopped: {error}", args.service.name()))
}

/// The admin tokens of `spec`; none is refused on an address other hosts
/// can reach, since the admin routes change state.
fn admin_tokens(spec: Option<&str>, listen: SocketAddr) -> anyhow::Result<AdminTokens> {
    let tokens = match spec.filter(|spec| !spec.trim().is_empty()) {
        Some(spec) => AdminTokens::parse(spec).map_err(|error| anyhow::anyhow!("{error}"))?,
        None => AdminTokens::none(),
    };
    if !tokens.is_configured() && !listen.ip().is_loopback() {
        anyhow::bail!(
            "refusing to listen on {listen} without an admin token: the admin API (dead letters, \
             replay) would be reachable from other hosts with no way to authenticate. Set \
             TANDEM_ADMIN_TOKEN (or --admin-token) to a secret of 16 characters or more, or \
             listen on 127.0.0.1"
        );
    }
    Ok(tokens)
}
