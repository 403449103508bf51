//! `tandem status`: one table of every service's health, each consumer's
//! lag in events and seconds and its dead letters, each outbox's backlog.
//!
//! With `--data-dir` it reads the files `tandem up` keeps (every
//! `<service>.db` beside `bus.db`) directly, so it answers for a service
//! that is down: that service's consumers are `stopped`, with the lag they
//! had and have. With `--url` it asks each running service's `/status`.
//! Exit status: 0 when everything is ok, 1 when anything is lagging,
//! stalled, stopped or has parked events, 2 when the status cannot be read.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tandem::status::{Health, LagCache, ServiceReport};
use tandem::Store;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The data directory of `tandem up` (read directly, services up or down).
    #[arg(long, env = "TANDEM_DATA_DIR", conflicts_with = "url")]
    data_dir: Option<PathBuf>,
    /// A running service's base URL (repeatable), e.g. http://127.0.0.1:8083.
    #[arg(long)]
    url: Vec<String>,
    /// Redraw every second until Ctrl-C (plain lines when not a terminal).
    #[arg(long)]
    watch: bool,
    /// The reports as JSON (one array) instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `tandem status`; returns the exit code (0 all ok, 1 not, 2 the
/// status could not be read).
pub async fn run(args: StatusArgs) -> anyhow::Result<u8> {
    let source = match (&args.data_dir, args.url.is_empty()) {
        (Some(dir), _) => Source::Files(dir.clone()),
        (None, false) => Source::Urls(args.url.clone()),
        (None, true) => Source::Files(PathBuf::from("tandem-data")),
    };
    let cache = LagCache::default();
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut drawn = 0;
    loop {
        let reports = match source.read(&cache).await {
            Ok(reports) => reports,
            Err(error) => {
                eprintln!("tandem status: {error:#}");
                return Ok(2);
            }
        };
        let text = if args.json {
            serde_json::to_string_pretty(&reports)? + "\n"
        } else {
            render(&reports)
        };
        if args.watch && terminal && drawn > 0 {
            // Back to the top of the table drawn before, then clear below.
            print!("\x1b[{drawn}A\x1b[J");
        }
        print!("{text}");
        drawn = text.lines().count();
        let all_ok = reports.iter().all(|report| report.health == Health::Ok);
        std::io::Write::flush(&mut std::io::stdout())?;
        let code = if all_ok { 0 } else { 1 };
        if !args.watch {
            return Ok(code);
        }
        tokio::select! {
            _ = crate::shutdown_signal() => return Ok(code),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

enum Source {
    Files(PathBuf),
    Urls(Vec<String>),
}

impl Source {
    async fn read(&self, cache: &LagCache) -> anyhow::Result<Vec<ServiceReport>> {
        match self {
            Source::Files(dir) => read_files(dir, cache).await,
            Source::Urls(urls) => read_urls(urls).await,
        }
    }
}

/// Every service database in `dir` (a `.db` file other than `bus.db`),
/// read with the bus file beside it.
async fn read_files(dir: &Path, cache: &LagCache) -> anyhow::Result<Vec<ServiceReport>> {
    let bus_path = dir.join("bus.db");
    anyhow::ensure!(
        bus_path.is_file(),
        "{} has no bus.db: not a data directory of `tandem up`",
        dir.display()
    );
    let mut services: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.extension().is_some_and(|extension| extension == "db") && *path != bus_path
        })
        .filter_map(|path| {
            let stem = path.file_stem()?.to_string_lossy().into_owned();
            Some((stem, path))
        })
        .collect();
    services.sort();
    let bus = tandem_engines::open_bus(&format!("sqlite://{}", absolute(&bus_path)?))
        .await
        .context("cannot open the bus")?;
    let mut reports = Vec::with_capacity(services.len());
    for (service, path) in services {
        let url = format!("sqlite://{}", absolute(&path)?);
        let store = tandem_engines::open_existing_store(&url)
            .await
            .with_context(|| format!("cannot open the {service} database"))?;
        let relays = store
            .read(|tx| {
                tx.query(
                    "SELECT relay FROM tandem_relay_positions ORDER BY relay",
                    &[],
                )?
                .iter()
                .map(|row| row.text(0).map(str::to_owned))
                .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        // A running service's relay holds its lease: one that is free
        // means the service is down.
        let mut running = false;
        for relay in &relays {
            if store.try_lead(relay).await?.is_none() {
                running = true;
            }
        }
        let consumers = tandem::status::known_consumers(&store).await?;
        let (report, _, _) = tandem::status::service_report(
            &service,
            &store,
            bus.as_ref(),
            cache,
            relays.first().map(String::as_str),
            &consumers,
            running,
        )
        .await
        .with_context(|| format!("cannot read the status of {service}"))?;
        reports.push(report);
    }
    Ok(reports)
}

fn absolute(path: &Path) -> anyhow::Result<String> {
    Ok(std::path::absolute(path)
        .with_context(|| format!("cannot resolve {}", path.display()))?
        .display()
        .to_string())
}

/// Each service's `/status`; one that does not answer is reported stopped.
async fn read_urls(urls: &[String]) -> anyhow::Result<Vec<ServiceReport>> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let mut reports = Vec::with_capacity(urls.len());
    for url in urls {
        let status_url = format!("{}/status", url.trim_end_matches('/'));
        let answer = match client.get(&status_url).send().await {
            Ok(response) if response.status().is_success() => Some(
                response
                    .json::<ServiceReport>()
                    .await
                    .with_context(|| format!("{status_url} did not answer a service status"))?,
            ),
            Ok(_) | Err(_) => None,
        };
        reports.push(answer.unwrap_or_else(|| ServiceReport {
            service: url.clone(),
            health: Health::Stopped,
            outbox: None,
            consumers: Vec::new(),
        }));
    }
    Ok(reports)
}

/// The table: services, then consumers.
fn render(reports: &[ServiceReport]) -> String {
    let mut services = vec![[
        "SERVICE".to_owned(),
        "HEALTH".to_owned(),
        "OUTBOX PENDING".to_owned(),
        "OLDEST PENDING".to_owned(),
    ]];
    let mut consumers = vec![[
        "CONSUMER".to_owned(),
        "SERVICE".to_owned(),
        "TOPICS".to_owned(),
        "HEALTH".to_owned(),
        "LAG EVENTS".to_owned(),
        "LAG SECONDS".to_owned(),
        "DEAD LETTERS".to_owned(),
    ]];
    for report in reports {
        let (pending, oldest) = match &report.outbox {
            Some(outbox) => (
                outbox.pending_events.to_string(),
                format!("{:.1}s", outbox.oldest_pending_age_seconds),
            ),
            None => ("-".to_owned(), "-".to_owned()),
        };
        services.push([
            report.service.clone(),
            report.health.to_string(),
            pending,
            oldest,
        ]);
        for consumer in &report.consumers {
            consumers.push([
                consumer.consumer.clone(),
                report.service.clone(),
                consumer.topics.join(","),
                consumer.health.to_string(),
                consumer.lag_events.to_string(),
                format!("{:.1}", consumer.lag_seconds),
                consumer.dead_letters.to_string(),
            ]);
        }
    }
    let mut text = table(&services);
    text.push('\n');
    text.push_str(&table(&consumers));
    // Rebuilds under way, with their progress.
    let mut rebuilds = vec![[
        "REBUILDING".to_owned(),
        "SERVICE".to_owned(),
        "STATE".to_owned(),
        "EVENTS APPLIED".to_owned(),
        "TO GO".to_owned(),
        "ETA".to_owned(),
    ]];
    for report in reports {
        for consumer in &report.consumers {
            let Some(rebuild) = consumer.rebuild.as_ref().filter(|r| r.state.active()) else {
                continue;
            };
            rebuilds.push([
                consumer.consumer.clone(),
                report.service.clone(),
                rebuild.state.as_str().to_owned(),
                rebuild.events_applied.to_string(),
                rebuild.events_to_go.to_string(),
                rebuild
                    .eta_seconds
                    .map_or_else(|| "-".to_owned(), |eta| format!("{eta:.0}s")),
            ]);
        }
    }
    if rebuilds.len() > 1 {
        text.push('\n');
        text.push_str(&table(&rebuilds));
    }
    text
}

/// Columns padded to their widest cell; names come from files and
/// databases, so control characters are printed escaped.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let rows: Vec<[String; N]> = rows
        .iter()
        .map(|row| {
            row.clone()
                .map(|cell| crate::printable::text(&cell).into_owned())
        })
        .collect();
    let mut widths = [0; N];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        text.push_str(line.join("  ").trim_end());
        text.push('\n');
    }
    text
}
