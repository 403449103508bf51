//! `tandem up`: the whole commerce system on one machine, on the embedded
//! engines, until Ctrl-C. Services that exit, or fail to start again, are
//! restarted after a backoff; Ctrl-C stops them all under one deadline.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::serve::Service;
use crate::system::System;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the databases and the event log live; running again on the
    /// same directory resumes with all data.
    #[arg(long, env = "TANDEM_DATA_DIR", default_value = "tandem-data")]
    data_dir: PathBuf,
    /// Load demo customers and products (skipped where they exist).
    #[arg(long)]
    seed: bool,
    /// Port of the customer service; inventory and order take the next two.
    /// 0 picks free ports.
    #[arg(long, default_value_t = 8081)]
    base_port: u16,
    /// How long a service must run before its restart backoff starts again
    /// from the first step (the tests shorten it).
    #[arg(long, default_value_t = 30_000, hide = true)]
    healthy_after_ms: u64,
    /// Port of the operator console (on 127.0.0.1); 0 for none.
    #[arg(long, default_value_t = 8080)]
    console_port: u16,
    /// How long the services get to stop on Ctrl-C before they are killed
    /// (the tests shorten it).
    #[arg(long, default_value_t = 15_000, hide = true)]
    stop_deadline_ms: u64,
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let mut system = System::new(&args.data_dir, args.base_port)?
        .with_stop_deadline(Duration::from_millis(args.stop_deadline_ms));
    let (token, made_now) = crate::data_dir::admin_token(system.data_dir())?;
    for service in Service::ALL {
        system.set_env(service, "TANDEM_ADMIN_TOKEN", Some(&token));
    }
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        on_signal.cancel();
    });
    let started = tokio::select! {
        _ = stop.cancelled() => Ok(()),
        started = system.start_all() => started,
    };
    if let Err(error) = started {
        system.stop_all().await;
        return Err(error);
    }
    if args.seed && !stop.is_cancelled() {
        if let Err(error) = seed(&system).await {
            system.stop_all().await;
            return Err(error);
        }
    }
    let (controls, requests, held) = if args.console_port == 0 || stop.is_cancelled() {
        (None, None, None)
    } else {
        let tokens = tandem_service::admin::AdminTokens::parse(&token)
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        let (sender, requests) = tokio::sync::mpsc::channel(16);
        let (held, held_receiver) = tokio::sync::watch::channel(Vec::new());
        let controls = crate::console::Controls {
            sender,
            tokens,
            held: held_receiver,
        };
        (Some(controls), Some(requests), Some(held))
    };
    let mut console_url = None;
    if let Some(controls) = controls {
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], args.console_port));
        // The services matter more than their console: a port already
        // taken costs the console, not the system.
        match tokio::net::TcpListener::bind(address).await {
            Ok(listener) => {
                console_url = Some(format!("http://{}", listener.local_addr()?));
                let services = Service::ALL
                    .iter()
                    .map(|service| crate::console::watched(&system.url(*service)?))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let stop = stop.clone();
                tokio::spawn(async move {
                    if let Err(error) =
                        crate::console::serve(listener, services, Some(controls), stop).await
                    {
                        eprintln!("the console stopped: {error:#}");
                    }
                });
            }
            Err(error) => eprintln!(
                "no console: cannot listen on {address} ({error}); choose another port with \
                 --console-port, or 0 for none"
            ),
        }
    }
    if !stop.is_cancelled() {
        println!("Tandem is up; data in {}", system.data_dir().display());
        for service in Service::ALL {
            println!("  {:<10} {}", service.name(), system.url(service)?);
        }
        println!("  events     tandem events tail --bus {}", system.bus_url());
        if let Some(url) = &console_url {
            println!("  console    {url}");
        }
        let kept = system.data_dir().join(crate::data_dir::ADMIN_TOKEN_FILE);
        if made_now {
            println!(
                "  admin      token {token} (shown once; kept in {})",
                kept.display()
            );
        } else {
            println!("  admin      token in {}", kept.display());
        }
        println!("Ctrl-C stops everything.");
        supervise(
            &mut system,
            &stop,
            Duration::from_millis(args.healthy_after_ms),
            requests,
            held,
        )
        .await;
    }
    println!("stopping ...");
    system.stop_all().await;
    println!("stopped");
    Ok(())
}

/// The first wait before restarting a service that exited; it doubles with
/// each exit or failed start in a row, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How often the supervisor looks at its children.
const TICK: Duration = Duration::from_millis(100);

/// One service under supervision.
struct Supervised {
    service: Service,
    /// The wait before its next restart.
    backoff: Duration,
    /// Since when it has run, while it runs.
    running_since: Option<Instant>,
    /// When to start it again, while it is down.
    restart_at: Option<Instant>,
    /// Stopped or killed from the console: down until started from there.
    held: bool,
}

impl Supervised {
    fn restart_later(&mut self) {
        self.running_since = None;
        self.restart_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

/// Restarts services that exit, until `stop` fires: after a backoff that
/// grows with each exit or failed start in a row, and starts over once a
/// service has run for `healthy_after`. Carries out the console's
/// `controls` (a service stopped or killed there stays down until it is
/// started there) and tells the console which services are held down.
async fn supervise(
    system: &mut System,
    stop: &CancellationToken,
    healthy_after: Duration,
    mut controls: Option<tokio::sync::mpsc::Receiver<crate::console::Control>>,
    held: Option<tokio::sync::watch::Sender<Vec<String>>>,
) {
    let mut supervised = Service::ALL.map(|service| Supervised {
        service,
        backoff: FIRST_BACKOFF,
        running_since: Some(Instant::now()),
        restart_at: None,
        held: false,
    });
    loop {
        for (service, status) in system.exited() {
            if let Some(state) = supervised.iter_mut().find(|state| state.service == service) {
                eprintln!(
                    "{} service exited ({status}); restarting in {:?}",
                    service.name(),
                    state.backoff
                );
                state.restart_later();
            }
        }
        for state in &mut supervised {
            let name = state.service.name();
            if let Some(since) = state.running_since {
                if state.backoff > FIRST_BACKOFF && since.elapsed() >= healthy_after {
                    state.backoff = FIRST_BACKOFF;
                    eprintln!(
                        "{name} service has run for {healthy_after:?}; its restart backoff is \
                         back to {FIRST_BACKOFF:?}"
                    );
                }
            }
            if state.restart_at.is_some_and(|at| at <= Instant::now()) {
                let started = tokio::select! {
                    _ = stop.cancelled() => return,
                    started = system.start(state.service) => started,
                };
                match started {
                    Ok(()) => {
                        state.restart_at = None;
                        state.running_since = Some(Instant::now());
                        eprintln!("{name} service restarted");
                    }
                    Err(error) => {
                        eprintln!(
                            "cannot restart the {name} service: {error:#}; trying again in {:?}",
                            state.backoff
                        );
                        state.restart_later();
                    }
                }
            }
        }
        let control = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(TICK) => None,
            Some(control) = async {
                match controls.as_mut() {
                    Some(controls) => controls.recv().await,
                    None => std::future::pending().await,
                }
            } => Some(control),
        };
        if let Some(control) = control {
            let answer = carry_out(system, &mut supervised, &control).await;
            audit_control(system, &control, &answer);
            if let Some(held) = &held {
                held.send_replace(
                    supervised
                        .iter()
                        .filter(|state| state.held)
                        .map(|state| state.service.name().to_owned())
                        .collect(),
                );
            }
            let _ = control.reply.send(answer);
        }
    }
}

/// Appends what the console asked of a service, and how it went, to the
/// audit trail in that service's own database (beside its admin actions),
/// even while the service is down; in a task of its own, so that the
/// supervisor never waits on a database. A failure to record is logged,
/// not fatal: the action has been carried out.
fn audit_control(system: &System, control: &crate::console::Control, answer: &Result<(), String>) {
    use crate::console::Action;
    let Some(service) = Service::ALL
        .into_iter()
        .find(|service| service.name() == control.service)
    else {
        return;
    };
    let action = match control.action {
        Action::Stop => "service.stop",
        Action::Kill => "service.kill",
        Action::Start => "service.start",
    };
    let result = match answer {
        Ok(()) => "ok".to_owned(),
        Err(message) => format!("refused: {message}"),
    };
    let (who, target) = (control.who.clone(), control.service.clone());
    let url = system.db_url(service);
    let recorded = async move {
        use tandem::Store;
        let store = tandem_engines::open_store(&url).await?;
        let written = store
            .write(move |tx| tandem::audit::record(tx, &who, action, &target, &result))
            .await;
        store.close().await?;
        written?;
        anyhow::Ok(())
    };
    tokio::spawn(async move {
        if let Err(error) = recorded.await {
            tracing::warn!(%error, "cannot record a service control in the audit trail");
        }
    });
}

/// Stops, kills or starts a supervised service as the console asked.
async fn carry_out(
    system: &mut System,
    supervised: &mut [Supervised],
    control: &crate::console::Control,
) -> Result<(), String> {
    use crate::console::Action;
    let Some(state) = supervised
        .iter_mut()
        .find(|state| state.service.name() == control.service)
    else {
        return Err(format!("no service {} here", control.service));
    };
    let name = state.service.name();
    match control.action {
        Action::Stop => {
            system.stop(state.service).await;
            eprintln!("{name} service stopped from the console; it stays down until started");
        }
        Action::Kill => {
            system
                .kill(state.service)
                .await
                .map_err(|error| format!("cannot kill the {name} service: {error:#}"))?;
            eprintln!(
                "{name} service killed (SIGKILL) from the console; it stays down until started"
            );
        }
        Action::Start => {
            if system.is_running(state.service) {
                return Err(format!("the {name} service is already running"));
            }
            system
                .start(state.service)
                .await
                .map_err(|error| format!("cannot start the {name} service: {error:#}"))?;
            state.held = false;
            state.restart_at = None;
            state.backoff = FIRST_BACKOFF;
            state.running_since = Some(Instant::now());
            eprintln!("{name} service started from the console");
            return Ok(());
        }
    }
    state.held = true;
    state.restart_at = None;
    state.running_since = None;
    Ok(())
}

/// Demo data: customers and products with fixed ids.
pub async fn seed(system: &System) -> anyhow::Result<()> {
    let customers = [
        (
            "1234",
            "Ada Lovelace",
            "ada@example.com",
            "1 Old Road",
            500_000,
        ),
        (
            "2345",
            "Grace Hopper",
            "grace@example.com",
            "2 Harbour Street",
            300_000,
        ),
        (
            "3456",
            "Alan Turing",
            "alan@example.com",
            "3 Bletchley Lane",
            200_000,
        ),
    ];
    let products = [
        ("widget", "SKU-WIDGET", "Widget", 1_250, 100),
        ("gadget", "SKU-GADGET", "Gadget", 4_990, 25),
        ("gizmo", "SKU-GIZMO", "Gizmo", 19_900, 5),
    ];
    let customer_url = format!("{}/customers", system.url(Service::Customer)?);
    for (id, name, email, address, limit) in customers {
        let body = json!({"customerId": id, "name": name, "email": email, "address": address, "creditLimitCents": limit});
        created_or_exists(
            system.http().post(&customer_url).json(&body).send().await?,
            "customer",
            id,
        )
        .await?;
    }
    let product_url = format!("{}/products", system.url(Service::Inventory)?);
    for (id, sku, name, price, stock) in products {
        let body =
            json!({"productId": id, "sku": sku, "name": name, "priceCents": price, "stock": stock});
        created_or_exists(
            system.http().post(&product_url).json(&body).send().await?,
            "product",
            id,
        )
        .await?;
    }
    println!("seeded customers 1234, 2345, 3456 and products widget, gadget, gizmo");
    Ok(())
}

async fn created_or_exists(
    response: reqwest::Response,
    what: &str,
    id: &str,
) -> anyhow::Result<()> {
    let status = response.status();
    if status.is_success() || status == reqwest::StatusCode::CONFLICT {
        return Ok(());
    }
    let body = response.text().await.unwrap_or_default();
    anyhow::bail!("seeding {what} {id} failed: {status} {body}")
}
