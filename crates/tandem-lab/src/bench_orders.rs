//! `tandem-lab bench orders`: the Order Service under load from the
//! benchmarks' own load generator ([`crate::load`]: nothing to install).
//!
//! 1. starts the system on the embedded engines in a temporary directory,
//!    seeds it, raises customer 1234's credit and the widget stock so that
//!    every order can be confirmed;
//! 2. saturation: `connections` clients, each waiting for its answer, for
//!    `seconds`; the accepted rate is the number of 202 answers per second;
//! 3. fixed rate at 70 % of that (open loop, latency counted from when a
//!    request was due): p50 and p99 latency of POST /orders;
//! 4. POST /orders to CONFIRMED, one order at a time: p50 and p99.
//!
//! With `--console`, the operator console runs beside the system as an
//! open page would use it, for the whole run: it reads every service's
//! `/status` each second, `--console-pages` clients follow its live stream,
//! and each of them reads the failure groups of every service through it
//! every two seconds (the dead-letter page's poll), with the admin token.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Args;
use serde::Serialize;
use serde_json::{json, Value};

use tandem_cli::serve::Service;
use tandem_cli::system::System;

use crate::load::{percentile, Load};

#[derive(Debug, Args)]
pub struct OrdersArgs {
    /// Seconds of each load phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent clients in the saturation phase.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Orders timed from POST to CONFIRMED.
    #[arg(long, default_value_t = 200)]
    confirm_samples: usize,
    /// Print exactly one JSON object as the last line.
    #[arg(long)]
    json: bool,
    /// Run the operator console, watched by open pages, during the run.
    #[arg(long)]
    console: bool,
    /// Open console pages (with --console).
    #[arg(long, default_value_t = 2)]
    console_pages: usize,
}

/// The admin token the services get under --console.
const BENCH_TOKEN: &str = "bench-orders-console-token";

/// The console and its open pages, stopped on drop.
struct OpenConsole {
    stop: tokio_util::sync::CancellationToken,
    snapshots: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for OpenConsole {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn open_console(system: &System, pages: usize) -> anyhow::Result<OpenConsole> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let stop = tokio_util::sync::CancellationToken::new();
    let services = Service::ALL
        .iter()
        .map(|&service| tandem_cli::console::watched(&system.url(service)?))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(tandem_cli::console::serve(
        listener,
        services,
        None,
        stop.clone(),
    ));
    let snapshots = Arc::new(AtomicU64::new(0));
    for _ in 0..pages {
        let (stop, snapshots, base) = (stop.clone(), Arc::clone(&snapshots), base.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let stream = async {
                let mut response = http.get(format!("{base}/api/stream")).send().await?;
                while let Some(chunk) = response.chunk().await? {
                    // A snapshot of the services (the stream opens with
                    // an empty one).
                    let marker = b"\"services\":";
                    let events = chunk.windows(marker.len()).filter(|w| w == marker).count();
                    snapshots.fetch_add(events as u64, Ordering::Relaxed);
                }
                anyhow::Ok(())
            };
            let poll = async {
                let mut tick = tokio::time::interval(Duration::from_secs(2));
                loop {
                    tick.tick().await;
                    // The console knows the services by name once it has
                    // read them: from the first snapshot on.
                    if snapshots.load(Ordering::Relaxed) == 0 {
                        continue;
                    }
                    for service in Service::ALL {
                        let _ = http
                            .get(format!(
                                "{base}/api/admin/{}/failure-groups",
                                service.name()
                            ))
                            .bearer_auth(BENCH_TOKEN)
                            .send()
                            .await
                            .and_then(reqwest::Response::error_for_status)?
                            .bytes()
                            .await;
                    }
                }
                #[allow(unreachable_code)]
                anyhow::Ok(())
            };
            tokio::select! {
                _ = stop.cancelled() => {}
                outcome = stream => if let Err(error) = outcome { eprintln!("console page: {error:#}") },
                outcome = poll => if let Err(error) = outcome { eprintln!("console page: {error:#}") },
            }
        });
    }
    Ok(OpenConsole { stop, snapshots })
}

#[derive(Debug, Serialize)]
struct Report {
    max_accepted_per_sec: f64,
    fixed_rate_per_sec: f64,
    fixed_rate_accepted_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    confirm_p50_ms: f64,
    confirm_p99_ms: f64,
    connections: usize,
    seconds: u64,
    console: bool,
}

/// The order every bench places: one widget for customer 1234, seeded in
/// both the product and the REST baseline with room for every order.
pub(crate) fn order_request() -> Value {
    json!({
        "customerId": crate::baseline::CUSTOMER,
        "lines": [{"productId": crate::baseline::PRODUCT, "quantity": 1}],
    })
}

/// Raises customer 1234's credit and the widget stock so that every
/// order of a run can be confirmed, and waits for the Order Service's
/// copies to have both.
pub(crate) async fn prepare(system: &System) -> anyhow::Result<()> {
    let http = system.http();
    let customer = system.url(Service::Customer)?;
    let inventory = system.url(Service::Inventory)?;
    let order = system.url(Service::Order)?;
    let patched = http
        .patch(format!("{customer}/customers/1234"))
        .json(&json!({"creditLimitCents": 1_000_000_000_000_i64}))
        .send()
        .await?;
    ensure!(
        patched.status().is_success(),
        "raising the credit limit: {}",
        patched.status()
    );
    let adjusted = http
        .post(format!("{inventory}/products/widget/stock-adjustments"))
        .json(&json!({"delta": 1_000_000_000, "reason": "benchmark stock"}))
        .send()
        .await?;
    ensure!(
        adjusted.status().is_success(),
        "adding stock: {}",
        adjusted.status()
    );
    // Wait until the Order Service's copies have both changes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let customer: Value = http
            .get(format!("{order}/customers/1234"))
            .send()
            .await?
            .json()
            .await?;
        let product: Value = http
            .get(format!("{order}/products/widget"))
            .send()
            .await?
            .json()
            .await?;
        if customer["creditLimitCents"] == 1_000_000_000_000_i64
            && product["available"].as_i64() > Some(1_000_000)
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the Order Service's copies did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Orders placed one at a time and timed from POST to CONFIRMED (read
/// every half millisecond): `samples` of them, or as many as fit before
/// `until`, with a 20 ms pause between two when timed against a deadline
/// (so that, under load, the timing adds little of its own).
pub(crate) async fn time_to_confirmed(
    system: &System,
    samples: Option<usize>,
    until: Option<Instant>,
) -> anyhow::Result<Vec<f64>> {
    let http = system.http();
    let order = system.url(Service::Order)?;
    let body = order_request();
    let mut durations = Vec::new();
    while samples.is_none_or(|samples| durations.len() < samples)
        && until.is_none_or(|until| Instant::now() < until)
    {
        let started = Instant::now();
        let placed: Value = http
            .post(format!("{order}/orders"))
            .json(&body)
            .send()
            .await?
            .json()
            .await?;
        let id = placed["orderId"].as_str().context("no orderId")?.to_owned();
        loop {
            let current: Value = http
                .get(format!("{order}/orders/{id}"))
                .send()
                .await?
                .json()
                .await?;
            match current["status"].as_str() {
                Some("CONFIRMED") => break,
                Some("PENDING") => {}
                other => bail!("order {id} became {other:?}"),
            }
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "order {id} stayed PENDING"
            );
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        durations.push(started.elapsed().as_secs_f64() * 1000.0);
        if until.is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    durations.sort_by(f64::total_cmp);
    Ok(durations)
}

pub async fn run(args: OrdersArgs) -> anyhow::Result<()> {
    let temporary = tempfile::tempdir().context("cannot create a temporary directory")?;
    let mut system = System::new(temporary.path(), 0)?;
    if args.console {
        for service in Service::ALL {
            system.set_env(service, "TANDEM_ADMIN_TOKEN", Some(BENCH_TOKEN));
        }
    }
    let outcome = async {
        system.start_all().await?;
        tandem_cli::up::seed(&system).await?;
        prepare(&system).await?;
        let console = if args.console {
            Some(open_console(&system, args.console_pages).await?)
        } else {
            None
        };
        let measured = measure(&system, &args).await;
        if let Some(console) = console {
            let seen = console.snapshots.load(std::sync::atomic::Ordering::Relaxed);
            eprintln!(
                "console: {} pages received {seen} live snapshots",
                args.console_pages
            );
            ensure!(seen > 0, "the console's pages received no snapshot");
        }
        measured
    }
    .await;
    system.stop_all().await;
    outcome
}

async fn measure(system: &System, args: &OrdersArgs) -> anyhow::Result<()> {
    let load = Load::new(
        &format!("{}/orders", system.url(Service::Order)?),
        &order_request(),
    )?;
    let seconds = Duration::from_secs(args.seconds);
    eprintln!(
        "[1/3] saturating POST /orders with {} clients for {} s ...",
        args.connections, args.seconds
    );
    let saturated = load.closed(args.connections, seconds).await;
    let refused = saturated.refused();
    eprintln!(
        "[1/3] accepted {:.0} orders/s (p50 {:.2} ms, p99 {:.2} ms){}",
        saturated.accepted_per_sec(),
        saturated.latency_ms(0.5),
        saturated.latency_ms(0.99),
        if refused.is_empty() {
            String::new()
        } else {
            format!("; other answers (status: count) {refused:?}")
        }
    );
    let rate = (saturated.accepted_per_sec() * 0.7).max(1.0);
    eprintln!(
        "[2/3] fixed rate {rate:.0} orders/s for {} s ...",
        args.seconds
    );
    let fixed = load.open(rate, seconds).await;
    eprintln!(
        "[2/3] p50 {:.2} ms, p99 {:.2} ms",
        fixed.latency_ms(0.5),
        fixed.latency_ms(0.99)
    );
    eprintln!(
        "[3/3] {} orders timed from POST to CONFIRMED ...",
        args.confirm_samples
    );
    let confirmed = time_to_confirmed(system, Some(args.confirm_samples), None).await?;
    let report = Report {
        max_accepted_per_sec: saturated.accepted_per_sec(),
        fixed_rate_per_sec: rate,
        fixed_rate_accepted_per_sec: fixed.accepted_per_sec(),
        p50_ms: fixed.latency_ms(0.5),
        p99_ms: fixed.latency_ms(0.99),
        confirm_p50_ms: percentile(&confirmed, 0.5),
        confirm_p99_ms: percentile(&confirmed, 0.99),
        connections: args.connections,
        seconds: args.seconds,
        console: args.console,
    };
    println!();
    println!(
        "POST /orders accepted     {:>8.0} orders/s at saturation ({} clients)",
        report.max_accepted_per_sec, report.connections
    );
    println!(
        "at 70% ({:.0}/s)           p50 {:.2} ms, p99 {:.2} ms",
        report.fixed_rate_per_sec, report.p50_ms, report.p99_ms
    );
    println!(
        "POST to CONFIRMED         p50 {:.2} ms, p99 {:.2} ms (one at a time)",
        report.confirm_p50_ms, report.confirm_p99_ms
    );
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}
