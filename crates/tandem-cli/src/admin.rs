//! Operating a consumer from the command line: its dead letters and replay.
//! Requests are written to the consumer's database; the running consumer
//! carries them out with its handler.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use tandem::dead_letter::{self, DeadLetter};

use crate::printable;

#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The consumer's database, e.g. sqlite:///data/order.db
    #[arg(long, env = "TANDEM_DB", hide_env_values = true)]
    db: String,
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// Parked events, oldest first.
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// Only this consumer's.
        #[arg(long)]
        consumer: Option<String>,
        /// Also show resolved and discarded ones.
        #[arg(long)]
        all: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter with its event.
    Show {
        #[command(flatten)]
        store: StoreArgs,
        id: i64,
    },
    /// Ask the consumer to handle a parked event (or all) again.
    Redrive(TargetArgs),
    /// Ask the consumer to give up on a parked event (or all).
    Discard(TargetArgs),
}

#[derive(Debug, Args)]
pub struct TargetArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[arg(long)]
    consumer: String,
    /// The dead letter's id.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    id: Option<i64>,
    /// Every parked event of the consumer.
    #[arg(long)]
    all: bool,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[arg(long)]
    consumer: String,
}

/// One dead letter on one line, with what the event carries escaped.
fn print_line(letter: &DeadLetter) {
    let line = format!(
        "{:>6}  {:<10} {:<9} {}/{}@{}  {}  seq {}  attempts {}  {}",
        letter.id,
        letter.status,
        letter.reason,
        letter.topic,
        letter.partition,
        letter.offset,
        letter.subject.as_deref().unwrap_or("-"),
        letter
            .sequence
            .map_or("-".to_owned(), |sequence| sequence.to_string()),
        letter.attempts,
        letter.error
    );
    println!("{}", printable::text(&line));
}

pub async fn dead_letters(command: DeadLetterCommand) -> anyhow::Result<()> {
    match command {
        DeadLetterCommand::List {
            store,
            consumer,
            all,
            json,
        } => {
            let store = tandem_engines::open_existing_store(&store.db).await?;
            let letters = dead_letter::list(&store, consumer.as_deref(), all).await?;
            for letter in &letters {
                if json {
                    println!("{}", printable::json(&serde_json::to_string(letter)?));
                } else {
                    print_line(letter);
                }
            }
            if !json {
                eprintln!("{} dead letter(s)", letters.len());
            }
        }
        DeadLetterCommand::Show { store, id } => {
            let store = tandem_engines::open_existing_store(&store.db).await?;
            let Some(letter) = dead_letter::get(&store, id).await? else {
                bail!("no dead letter {id}");
            };
            let mut shown = serde_json::to_value(&letter)?;
            shown["event"] = match serde_json::from_slice::<serde_json::Value>(&letter.payload) {
                Ok(value) => value,
                Err(_) => String::from_utf8_lossy(&letter.payload).into_owned().into(),
            };
            println!(
                "{}",
                printable::json(&serde_json::to_string_pretty(&shown)?)
            );
        }
        DeadLetterCommand::Redrive(target) | DeadLetterCommand::Discard(target)
            if target.id.is_none() && !target.all =>
        {
            bail!("name a dead letter id or --all");
        }
        DeadLetterCommand::Redrive(target) => {
            let store = tandem_engines::open_existing_store(&target.store.db).await?;
            check_parked(&store, &target).await?;
            dead_letter::request_redrive(&store, &target.consumer, target.id).await?;
            eprintln!(
                "redrive requested; consumer {} carries it out",
                target.consumer
            );
        }
        DeadLetterCommand::Discard(target) => {
            let store = tandem_engines::open_existing_store(&target.store.db).await?;
            check_parked(&store, &target).await?;
            dead_letter::request_discard(&store, &target.consumer, target.id).await?;
            eprintln!(
                "discard requested; consumer {} carries it out",
                target.consumer
            );
        }
    }
    Ok(())
}

async fn check_parked(store: &tandem_engines::AnyStore, target: &TargetArgs) -> anyhow::Result<()> {
    let Some(id) = target.id else { return Ok(()) };
    let letter = dead_letter::get(store, id)
        .await?
        .with_context(|| format!("no dead letter {id}"))?;
    if letter.consumer != target.consumer {
        bail!(
            "dead letter {id} belongs to consumer {}, not {}",
            printable::text(&letter.consumer),
            target.consumer
        );
    }
    if letter.status != "parked" {
        bail!(
            "dead letter {id} is {}, not parked",
            printable::text(&letter.status)
        );
    }
    Ok(())
}

pub async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let store = tandem_engines::open_existing_store(&args.store.db).await?;
    dead_letter::request_replay(&store, &args.consumer).await?;
    eprintln!(
        "replay requested; consumer {} rebuilds its read model",
        args.consumer
    );
    Ok(())
}
