//! `tandem-lab bench compare`: the commerce system's order flow on events
//! (the product, on the embedded engines) against the same flow over
//! synchronous REST calls ([`crate::baseline`]), on the same machine, with
//! the same load generator ([`crate::load`]) and the same data, in one run.
//!
//! 1. Saturation: orders accepted per second by each, `connections`
//!    clients each waiting for its answer.
//! 2. Latency: POST /orders p50/p99 of each at 70 % of the lower of the
//!    two saturation rates (open loop). Meanwhile, on the event-driven
//!    system, orders are timed one at a time from POST to CONFIRMED; the
//!    baseline's confirmation is its answer.
//! 3. Outages: a steady open-loop run at `outage_load` of the lower
//!    saturation rate; after `outage_seconds` the Customer Service is
//!    killed (SIGKILL) and started again `outage_seconds` later. Of the
//!    orders due while it was away (until it answered again), the share
//!    accepted, and the share confirmed once the system has settled. Then
//!    the same with the Inventory Service.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::Args;
use serde::Serialize;
use serde_json::Value;

use tandem_cli::serve::Service;
use tandem_cli::system::System;

use crate::baseline::{Baseline, Part};
use crate::bench_orders;
use crate::load::{percentile, Load, Run};

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Seconds of the saturation and latency phases.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent clients in the saturation phase.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Seconds a service stays killed in the outage phases (the run lasts
    /// three times as long: before, during, after).
    #[arg(long, default_value_t = 10)]
    outage_seconds: u64,
    /// The outage phases' rate, as a share of the lower saturation rate.
    #[arg(long, default_value_t = 0.5)]
    outage_load: f64,
    /// Print exactly one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

/// The figures of one architecture.
#[derive(Debug, Default, Serialize)]
struct Figures {
    saturation_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    refused_at_70: usize,
    confirm_p50_ms: f64,
    confirm_p99_ms: f64,
    customer_outage: Outage,
    inventory_outage: Outage,
}

/// What happened to the orders due while a service was away.
#[derive(Debug, Default, Clone, Serialize)]
struct Outage {
    /// From the kill until the restarted service answered again.
    away_ms: f64,
    due: usize,
    accepted: usize,
    confirmed: usize,
    accepted_share: f64,
    confirmed_share: f64,
    /// Answers other than 2xx in the window, by status (0: no answer).
    refused: BTreeMap<u16, usize>,
}

#[derive(Debug, Serialize)]
struct Report {
    throughput_ratio: f64,
    p99_ratio: f64,
    p50_ratio: f64,
    confirm_p99_ratio: f64,
    customer_outage_accepted_event_driven: f64,
    customer_outage_accepted_baseline: f64,
    customer_outage_confirmed_event_driven: f64,
    customer_outage_confirmed_baseline: f64,
    inventory_outage_accepted_event_driven: f64,
    inventory_outage_accepted_baseline: f64,
    inventory_outage_confirmed_event_driven: f64,
    inventory_outage_confirmed_baseline: f64,
    rate_at_70_per_sec: f64,
    outage_rate_per_sec: f64,
    event_driven: Figures,
    baseline: Figures,
    seconds: u64,
    connections: usize,
    outage_seconds: u64,
}

/// One of the two systems under test.
enum Architecture {
    EventDriven(System),
    Baseline(Baseline),
}

impl Architecture {
    fn name(&self) -> &'static str {
        match self {
            Architecture::EventDriven(_) => "event-driven",
            Architecture::Baseline(_) => "baseline",
        }
    }

    fn orders_url(&self) -> anyhow::Result<String> {
        Ok(match self {
            Architecture::EventDriven(system) => system.url(Service::Order)?,
            Architecture::Baseline(baseline) => baseline.url(Part::Order),
        })
    }

    fn load(&self) -> anyhow::Result<Load> {
        Load::new(
            &format!("{}/orders", self.orders_url()?),
            &bench_orders::order_request(),
        )
    }

    async fn kill(&mut self, part: Part) -> anyhow::Result<()> {
        match self {
            Architecture::EventDriven(system) => system.kill(service(part)).await,
            Architecture::Baseline(baseline) => baseline.kill(part).await,
        }
    }

    async fn start(&mut self, part: Part) -> anyhow::Result<()> {
        match self {
            Architecture::EventDriven(system) => system.start(service(part)).await,
            Architecture::Baseline(baseline) => baseline.start(part).await,
        }
    }

    async fn stop(&mut self) {
        match self {
            Architecture::EventDriven(system) => system.stop_all().await,
            Architecture::Baseline(baseline) => baseline.stop_all().await,
        }
    }
}

fn service(part: Part) -> Service {
    match part {
        Part::Customer => Service::Customer,
        Part::Inventory => Service::Inventory,
        Part::Order => Service::Order,
    }
}

pub async fn run(args: CompareArgs) -> anyhow::Result<()> {
    let temporary = tempfile::tempdir().context("cannot create a temporary directory")?;
    let mut event_driven =
        Architecture::EventDriven(System::new(&temporary.path().join("event-driven"), 0)?);
    std::fs::create_dir_all(temporary.path().join("baseline"))?;
    let mut baseline = Architecture::Baseline(Baseline::new(&temporary.path().join("baseline"))?);
    let outcome = compare(&args, &mut event_driven, &mut baseline).await;
    event_driven.stop().await;
    baseline.stop().await;
    outcome
}

async fn compare(
    args: &CompareArgs,
    event_driven: &mut Architecture,
    baseline: &mut Architecture,
) -> anyhow::Result<()> {
    eprintln!("starting both systems ...");
    if let Architecture::EventDriven(system) = event_driven {
        system.start_all().await?;
        tandem_cli::up::seed(system).await?;
        bench_orders::prepare(system).await?;
    }
    if let Architecture::Baseline(processes) = baseline {
        processes.start_all().await?;
    }
    let seconds = Duration::from_secs(args.seconds);
    let mut figures = [Figures::default(), Figures::default()];
    let systems = [&mut *event_driven, &mut *baseline];

    for (system, figures) in systems.iter().zip(figures.iter_mut()) {
        eprintln!(
            "[1/4] {}: saturating POST /orders with {} clients for {} s ...",
            system.name(),
            args.connections,
            args.seconds
        );
        let run = system.load()?.closed(args.connections, seconds).await;
        figures.saturation_per_sec = run.accepted_per_sec();
        eprintln!(
            "[1/4] {}: {:.0} orders/s accepted{}",
            system.name(),
            figures.saturation_per_sec,
            refusals(&run)
        );
    }
    let lower = figures[0]
        .saturation_per_sec
        .min(figures[1].saturation_per_sec);
    ensure!(lower > 1.0, "a system accepted no orders at saturation");
    let rate = lower * 0.7;

    for (index, system) in systems.into_iter().enumerate() {
        eprintln!(
            "[2/4] {}: {rate:.0} orders/s for {} s ...",
            system.name(),
            args.seconds
        );
        let load = system.load()?;
        let figures = &mut figures[index];
        let run = match system {
            Architecture::EventDriven(system) => {
                let until = Instant::now() + seconds;
                let (run, confirmed) = tokio::join!(
                    load.open(rate, seconds),
                    bench_orders::time_to_confirmed(system, None, Some(until))
                );
                let confirmed = confirmed?;
                figures.confirm_p50_ms = percentile(&confirmed, 0.5);
                figures.confirm_p99_ms = percentile(&confirmed, 0.99);
                eprintln!(
                    "[2/4] event-driven: {} orders timed to CONFIRMED",
                    confirmed.len()
                );
                run
            }
            Architecture::Baseline(_) => {
                let run = load.open(rate, seconds).await;
                // Its answer is its confirmation.
                figures.confirm_p50_ms = run.latency_ms(0.5);
                figures.confirm_p99_ms = run.latency_ms(0.99);
                run
            }
        };
        figures.p50_ms = run.latency_ms(0.5);
        figures.p99_ms = run.latency_ms(0.99);
        figures.refused_at_70 = run.samples.len() - run.accepted();
        eprintln!(
            "[2/4] p50 {:.2} ms, p99 {:.2} ms{}",
            figures.p50_ms,
            figures.p99_ms,
            refusals(&run)
        );
    }

    let outage_rate = lower * args.outage_load;
    for (step, part) in [(3, Part::Customer), (4, Part::Inventory)] {
        for (index, system) in [&mut *event_driven, &mut *baseline].into_iter().enumerate() {
            eprintln!(
                "[{step}/4] {}: {outage_rate:.0} orders/s, the {part:?} Service killed for {} s ...",
                system.name(),
                args.outage_seconds
            );
            let outage = outage(args, system, part, outage_rate).await?;
            eprintln!(
                "[{step}/4] {}: {} orders due in {:.1} s away: {:.2} % accepted, {:.2} % confirmed{}",
                system.name(),
                outage.due,
                outage.away_ms / 1000.0,
                outage.accepted_share * 100.0,
                outage.confirmed_share * 100.0,
                if outage.refused.is_empty() {
                    String::new()
                } else {
                    format!("; refused {:?}", outage.refused)
                }
            );
            match part {
                Part::Customer => figures[index].customer_outage = outage,
                _ => figures[index].inventory_outage = outage,
            }
        }
    }

    let [event_driven, baseline] = figures;
    let report = Report {
        throughput_ratio: event_driven.saturation_per_sec / baseline.saturation_per_sec,
        p99_ratio: event_driven.p99_ms / baseline.p99_ms,
        p50_ratio: event_driven.p50_ms / baseline.p50_ms,
        confirm_p99_ratio: event_driven.confirm_p99_ms / baseline.confirm_p99_ms,
        customer_outage_accepted_event_driven: event_driven.customer_outage.accepted_share,
        customer_outage_accepted_baseline: baseline.customer_outage.accepted_share,
        customer_outage_confirmed_event_driven: event_driven.customer_outage.confirmed_share,
        customer_outage_confirmed_baseline: baseline.customer_outage.confirmed_share,
        inventory_outage_accepted_event_driven: event_driven.inventory_outage.accepted_share,
        inventory_outage_accepted_baseline: baseline.inventory_outage.accepted_share,
        inventory_outage_confirmed_event_driven: event_driven.inventory_outage.confirmed_share,
        inventory_outage_confirmed_baseline: baseline.inventory_outage.confirmed_share,
        rate_at_70_per_sec: rate,
        outage_rate_per_sec: outage_rate,
        event_driven,
        baseline,
        seconds: args.seconds,
        connections: args.connections,
        outage_seconds: args.outage_seconds,
    };
    print_table(&report);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

fn refusals(run: &Run) -> String {
    let refused = run.refused();
    if refused.is_empty() {
        String::new()
    } else {
        format!("; refused {refused:?} (status: count, 0 = no answer)")
    }
}

/// A steady run with `part` killed in its middle third.
async fn outage(
    args: &CompareArgs,
    system: &mut Architecture,
    part: Part,
    rate: f64,
) -> anyhow::Result<Outage> {
    let phase = Duration::from_secs(args.outage_seconds);
    let load = system.load()?;
    let started = Instant::now();
    let (run, window) = tokio::join!(load.open(rate, phase * 3), async {
        tokio::time::sleep(phase).await;
        let killed = started.elapsed();
        system.kill(part).await?;
        tokio::time::sleep_until((started + killed + phase).into()).await;
        system.start(part).await?;
        anyhow::Ok((killed, started.elapsed()))
    });
    let (killed, back) = window?;
    let due: Vec<_> = run
        .samples
        .iter()
        .filter(|sample| sample.due >= killed && sample.due < back)
        .collect();
    let accepted: Vec<_> = due.iter().filter(|sample| sample.accepted()).collect();
    let mut refused = BTreeMap::new();
    for sample in due.iter().filter(|sample| !sample.accepted()) {
        *refused.entry(sample.status).or_insert(0) += 1;
    }
    let confirmed = match system {
        // The baseline answers 201 only with the order confirmed.
        Architecture::Baseline(_) => accepted.len(),
        Architecture::EventDriven(system) => {
            let ids: Vec<String> = accepted
                .iter()
                .filter_map(|sample| sample.order_id.clone())
                .collect();
            confirmed(system, &ids, Duration::from_secs(120)).await?
        }
    };
    let share = |count: usize| {
        if due.is_empty() {
            0.0
        } else {
            count as f64 / due.len() as f64
        }
    };
    Ok(Outage {
        away_ms: (back - killed).as_secs_f64() * 1000.0,
        due: due.len(),
        accepted: accepted.len(),
        confirmed,
        accepted_share: share(accepted.len()),
        confirmed_share: share(confirmed),
        refused,
    })
}

/// How many of `ids` are CONFIRMED once the system has settled: waits up
/// to `deadline` while any is still PENDING.
async fn confirmed(system: &System, ids: &[String], deadline: Duration) -> anyhow::Result<usize> {
    let http = system.http();
    let order = system.url(Service::Order)?;
    let order = order.as_str();
    let until = Instant::now() + deadline;
    let mut pending: Vec<&String> = ids.iter().collect();
    let mut confirmed = 0;
    loop {
        let mut still = Vec::new();
        for chunk in pending.chunks(64) {
            let answers = futures_util::future::join_all(chunk.iter().map(|&id| async move {
                let view: Value = http
                    .get(format!("{order}/orders/{id}"))
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                anyhow::Ok((id, view["status"].as_str().unwrap_or("").to_owned()))
            }))
            .await;
            for answer in answers {
                let (id, status) = answer?;
                match status.as_str() {
                    "CONFIRMED" => confirmed += 1,
                    "PENDING" => still.push(id),
                    _ => {}
                }
            }
        }
        pending = still;
        if pending.is_empty() || Instant::now() >= until {
            return Ok(confirmed);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_table(report: &Report) {
    let (e, b) = (&report.event_driven, &report.baseline);
    let percent = |share: f64| format!("{:.2} %", share * 100.0);
    println!();
    println!(
        "{:<44} {:>14} {:>14} {:>8}",
        "", "event-driven", "REST baseline", "ratio"
    );
    println!(
        "{:<44} {:>14.0} {:>14.0} {:>8.2}",
        "orders accepted/s at saturation",
        e.saturation_per_sec,
        b.saturation_per_sec,
        report.throughput_ratio
    );
    println!(
        "{:<44} {:>14.2} {:>14.2} {:>8.2}",
        format!("POST /orders p50 ms at {:.0}/s", report.rate_at_70_per_sec),
        e.p50_ms,
        b.p50_ms,
        report.p50_ratio
    );
    println!(
        "{:<44} {:>14.2} {:>14.2} {:>8.2}",
        format!("POST /orders p99 ms at {:.0}/s", report.rate_at_70_per_sec),
        e.p99_ms,
        b.p99_ms,
        report.p99_ratio
    );
    println!(
        "{:<44} {:>14.2} {:>14.2} {:>8}",
        "until CONFIRMED p50 ms", e.confirm_p50_ms, b.confirm_p50_ms, ""
    );
    println!(
        "{:<44} {:>14.2} {:>14.2} {:>8.2}",
        "until CONFIRMED p99 ms", e.confirm_p99_ms, b.confirm_p99_ms, report.confirm_p99_ratio
    );
    for (name, e, b) in [
        ("Customer", &e.customer_outage, &b.customer_outage),
        ("Inventory", &e.inventory_outage, &b.inventory_outage),
    ] {
        println!(
            "{:<44} {:>14} {:>14}",
            format!("{name} Service down: orders accepted"),
            percent(e.accepted_share),
            percent(b.accepted_share)
        );
        println!(
            "{:<44} {:>14} {:>14}",
            format!("{name} Service down: orders confirmed"),
            percent(e.confirmed_share),
            percent(b.confirmed_share)
        );
    }
}
