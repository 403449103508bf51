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
    /// Published outbox rows older than this are pruned [default: 24h] (a
    /// service that keeps its event history, as the Customer Service does,
    /// keeps them).
    #[arg(long, env = "TANDEM_RETAIN_OUTBOX", value_parser = age)]
    retain_outbox: Option<Age>,
    /// Embedded-log records older than this are pruned [default: 7d]
    /// (Kafka and NATS: the retention of the topics and streams the bus
    /// creates, unless the bus URL's retain_log option says).
    #[arg(long, env = "TANDEM_RETAIN_LOG", value_parser = age)]
    retain_log: Option<Age>,
    /// At most this many records are kept in each embedded-log partition.
    #[arg(long, env = "TANDEM_RETAIN_LOG_RECORDS")]
    retain_log_records: Option<u64>,
    /// Resolved dead letters older than this are pruned [default: 14d].
    #[arg(long, env = "TANDEM_RETAIN_RESOLVED", value_parser = age)]
    retain_resolved: Option<Age>,
    /// Discarded dead letters older than this are pruned [default: keep, as
    /// a replay must skip them again].
    #[arg(long, env = "TANDEM_RETAIN_DISCARDED", value_parser = age)]
    retain_discarded: Option<Age>,
    /// How often the rules are applied [default: 30s].
    #[arg(long, env = "TANDEM_PRUNE_EVERY", value_parser = every)]
    prune_every: Option<Duration>,
}

/// An age, or `keep` (`None`).
#[derive(Debug, Clone, Copy)]
struct Age(Option<Duration>);

fn age(text: &str) -> Result<Age, String> {
    tandem::retention::parse_age(text).map(Age)
}

fn every(text: &str) -> Result<Duration, String> {
    tandem::retention::parse_age(text)?
        .ok_or_else(|| format!("{text:?}: give an interval such as 30s"))
}

impl RetentionArgs {
    /// [`tandem::retention::Retention::default`], with what was given.
    fn rules(&self) -> tandem::retention::Retention {
        let mut rules = tandem::retention::Retention::default();
        let given = [
            (self.retain_outbox, &mut rules.outbox_age),
            (self.retain_log, &mut rules.log_age),
            (self.retain_resolved, &mut rules.resolved_age),
            (self.retain_discarded, &mut rules.discarded_age),
        ];
        for (age, rule) in given {
            if let Some(Age(age)) = age {
                *rule = age;
            }
        }
        rules.log_records = self.retain_log_records.or(rules.log_records);
        rules.every = self.prune_every.unwrap_or(rules.every);
        rules
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
    let mut rules = args.retention.rules();
    let (db, bus) = tandem_engines::retention_from_urls(&args.db, &args.bus, &mut rules)?;
    let store = tandem_engines::open_store(&db).await?;
    let bus = tandem_engines::open_bus(&bus).await?;
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

#[cfg(test)]
mod retention_tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Flags {
        #[command(flatten)]
        retention: RetentionArgs,
    }

    #[test]
    fn no_flag_gives_the_toolkit_defaults_and_a_flag_overrides_its_rule_only() {
        let none = Flags::try_parse_from(["t"]).unwrap();
        assert_eq!(
            none.retention.rules(),
            tandem::retention::Retention::default()
        );
        let some =
            Flags::try_parse_from(["t", "--retain-outbox", "keep", "--retain-discarded", "3d"])
                .unwrap()
                .retention
                .rules();
        assert_eq!(some.outbox_age, None);
        assert_eq!(some.discarded_age, Some(Duration::from_secs(3 * 86_400)));
        assert_eq!(
            some.log_age,
            tandem::retention::Retention::default().log_age
        );
        assert!(Flags::try_parse_from(["t", "--prune-every", "keep"]).is_err());
    }
}
