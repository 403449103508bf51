//! `tandem events tail`: prints events from the bus as they arrive.

use std::io::Write;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::value::RawValue;
use tandem::bus::Delivery;
use tandem::Envelope;

use crate::printable;

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Print events as they arrive (from now on, or from the start).
    Tail(TailArgs),
}

#[derive(Debug, Args)]
pub struct TailArgs {
    /// The event bus: sqlite:///data/bus.db, kafka://host:9092 or
    /// nats://host:4222 (see README, Running at scale)
    #[arg(long, env = "TANDEM_BUS", hide_env_values = true)]
    bus: String,
    /// Only this topic (repeatable); default: customer, inventory, order.
    #[arg(long = "topic")]
    topics: Vec<String>,
    /// Start at the beginning of each topic instead of its end.
    #[arg(long)]
    from_start: bool,
    /// One CloudEvents JSON envelope per line.
    #[arg(long)]
    json: bool,
    /// Stop after this many events (default: run until interrupted).
    #[arg(long)]
    limit: Option<u64>,
}

pub async fn run(command: EventsCommand) -> anyhow::Result<()> {
    let EventsCommand::Tail(args) = command;
    let bus = tandem_engines::open_bus(&args.bus).await?;
    let topics = if args.topics.is_empty() {
        vec![
            "customer".to_owned(),
            "inventory".to_owned(),
            "order".to_owned(),
        ]
    } else {
        args.topics.clone()
    };
    let group = format!("tandem-events-tail-{}", std::process::id());
    let mut subscription = bus.subscribe(&group, &topics).await?;
    let stop = tokio::spawn(crate::shutdown_signal());
    let mut printed = 0u64;
    let mut stdout = std::io::stdout().lock();
    while !stop.is_finished() {
        if args.limit.is_some_and(|limit| printed >= limit) {
            break;
        }
        let Some(delivery) = subscription.next(500, Duration::from_millis(200)).await? else {
            continue;
        };
        match delivery {
            Delivery::Assigned(partitions) => {
                for partition in partitions {
                    let start = if args.from_start {
                        0
                    } else {
                        bus.end_offsets(&partition.topic)
                            .await?
                            .into_iter()
                            .find(|(number, _)| *number == partition.partition)
                            .map_or(0, |(_, end)| end)
                    };
                    subscription.seek(&partition, start).await?;
                }
            }
            Delivery::Revoked(_) => {}
            Delivery::Records(records) => {
                for record in records {
                    if args.limit.is_some_and(|limit| printed >= limit) {
                        break;
                    }
                    printed += 1;
                    // What an event carries is printed with its control
                    // characters escaped: it must not drive the terminal.
                    if args.json {
                        let line = match serde_json::from_slice::<&RawValue>(&record.payload) {
                            Ok(json) => printable::json_line(json.get()).into_owned(),
                            // Not JSON: a JSON line that says where it sits.
                            Err(_) => printable::json_line(
                                &serde_json::json!({
                                    "topic": record.topic,
                                    "partition": record.partition,
                                    "offset": record.offset,
                                    "undecodable": String::from_utf8_lossy(&record.payload),
                                })
                                .to_string(),
                            )
                            .into_owned(),
                        };
                        writeln!(stdout, "{line}")?;
                        continue;
                    }
                    let line = match Envelope::decode(&record.payload) {
                        Ok(event) => format!(
                            "{}/{}@{}  {}  {:<24} {} #{}  {}",
                            record.topic,
                            record.partition,
                            record.offset,
                            tandem::envelope::format_time(event.time),
                            event.event_type,
                            event.subject,
                            event.sequence,
                            event.data
                        ),
                        Err(error) => format!(
                            "{}/{}@{}  undecodable: {error}",
                            record.topic, record.partition, record.offset
                        ),
                    };
                    writeln!(stdout, "{}", printable::text(&line))?;
                }
                stdout.flush()?;
            }
        }
    }
    Ok(())
}
