//! `tandem-lab bench orders`: the Order Service under load from a separate
//! load-generator process (`oha`, installed with `cargo install oha`).
//!
//! 1. starts the system on the embedded engines in a temporary directory,
//!    seeds it, raises customer 1234's credit and the widget stock so that
//!    every order can be confirmed;
//! 2. saturation: oha with `connections` connections for `seconds`; the
//!    accepted rate is the number of 202 answers per second;
//! 3. fixed rate at 70 % of that: p50 and p99 latency of POST /orders;
//! 4. POST /orders to CONFIRMED, one order at a time: p50 and p99.
//!
//! With `--console`, the operator console runs beside the system as an
//! open page would use it, for the whole run: it reads every service's
//! `/status` each second, `--console-pages` clients follow its live stream,
//! and each of them reads the failure groups of every service through it
//! every two seconds (the dead-letter page's poll), with the admin token.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Args;
use serde::Serialize;
use serde_json::{json, Value};

use tandem_cli::serve::Service;
use tandem_cli::system::System;

#[derive(Debug, Args)]
pub struct OrdersArgs {
    /// Seconds of each load phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent connections of the load generator.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// Orders timed from POST to CONFIRMED.
    #[arg(long, default_value_t = 200)]
    confirm_samples: usize,
    /// The load generator's executable.
    #[arg(long, default_value = "oha")]
    oha: String,
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
    connections: u32,
    seconds: u64,
    console: bool,
}

/// What one oha run measured.
struct Load {
    accepted_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    other_statuses: Vec<String>,
}

async fn oha(args: &OrdersArgs, url: &str, rate: Option<f64>) -> anyhow::Result<Load> {
    let body = json!({"customerId": "1234", "lines": [{"productId": "widget", "quantity": 1}]})
        .to_string();
    let mut command = tokio::process::Command::new(&args.oha);
    command
        .args([
            "-z",
            &format!("{}s", args.seconds),
            "-c",
            &args.connections.to_string(),
        ])
        .args([
            "--no-tui",
            "--output-format",
            "json",
            "-m",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            &body,
        ])
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(rate) = rate {
        command.args(["-q", &format!("{rate:.0}")]);
    }
    let output = command.output().await.with_context(|| {
        format!("cannot run the load generator {:?}; install it with `cargo install oha --version 1.12.0 --locked`", args.oha)
    })?;
    ensure!(
        output.status.success(),
        "oha failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).context("oha's JSON output")?;
    let statuses = report["statusCodeDistribution"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let accepted = statuses.get("202").and_then(Value::as_f64).unwrap_or(0.0);
    let other_statuses = statuses
        .iter()
        .filter(|(status, _)| *status != "202")
        .map(|(status, count)| format!("{status}: {count}"))
        .collect();
    let seconds = |name: &str| {
        report["latencyPercentiles"][name]
            .as_f64()
            .unwrap_or(f64::NAN)
            * 1000.0
    };
    Ok(Load {
        accepted_per_sec: accepted / args.seconds as f64,
        p50_ms: seconds("p50"),
        p99_ms: seconds("p99"),
        other_statuses,
    })
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() - 1) as f64) * fraction).round() as usize]
}

async fn prepare(system: &System) -> anyhow::Result<()> {
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

async fn time_to_confirmed(system: &System, samples: usize) -> anyhow::Result<Vec<f64>> {
    let http = system.http();
    let order = system.url(Service::Order)?;
    let body = json!({"customerId": "1234", "lines": [{"productId": "widget", "quantity": 1}]});
    let mut durations = Vec::with_capacity(samples);
    for _ in 0..samples {
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
    let url = format!("{}/orders", system.url(Service::Order)?);
    eprintln!(
        "[1/3] saturating POST /orders with {} connections for {} s ...",
        args.connections, args.seconds
    );
    let saturated = oha(args, &url, None).await?;
    eprintln!(
        "[1/3] accepted {:.0} orders/s (p50 {:.2} ms, p99 {:.2} ms){}",
        saturated.accepted_per_sec,
        saturated.p50_ms,
        saturated.p99_ms,
        if saturated.other_statuses.is_empty() {
            String::new()
        } else {
            format!("; other answers {:?}", saturated.other_statuses)
        }
    );
    let rate = (saturated.accepted_per_sec * 0.7).max(1.0);
    eprintln!(
        "[2/3] fixed rate {rate:.0} orders/s for {} s ...",
        args.seconds
    );
    let fixed = oha(args, &url, Some(rate)).await?;
    eprintln!(
        "[2/3] p50 {:.2} ms, p99 {:.2} ms",
        fixed.p50_ms, fixed.p99_ms
    );
    eprintln!(
        "[3/3] {} orders timed from POST to CONFIRMED ...",
        args.confirm_samples
    );
    let confirmed = time_to_confirmed(system, args.confirm_samples).await?;
    let report = Report {
        max_accepted_per_sec: saturated.accepted_per_sec,
        fixed_rate_per_sec: rate,
        fixed_rate_accepted_per_sec: fixed.accepted_per_sec,
        p50_ms: fixed.p50_ms,
        p99_ms: fixed.p99_ms,
        confirm_p50_ms: percentile(&confirmed, 0.5),
        confirm_p99_ms: percentile(&confirmed, 0.99),
        connections: args.connections,
        seconds: args.seconds,
        console: args.console,
    };
    println!();
    println!(
        "POST /orders accepted     {:>8.0} orders/s at saturation ({} connections)",
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
