//! The `tandem` command; its subcommands live in the `tandem_cli` library.
//!
//! - `tandem up`, `tandem serve`, `tandem demo`: run the commerce system.
//! - `tandem events tail`: watch the event bus; `tandem status`: health,
//!   lag and dead letters of every service.
//! - `tandem console`: the operator console for services anywhere.
//! - `tandem dead-letters ...` and `tandem replay`: operate a consumer's
//!   dead letters and rebuild its read model, from any process.
//! - `tandem rebuild`: a read model rebuilt beside the live one, switched
//!   at once when level.
//! - `tandem republish`: a service sends its history (or snapshots) again
//!   for consumers that fell behind the log's retention.
//! - `tandem contracts asyncapi|check`: the events' AsyncAPI document, and
//!   their compatibility with the released baseline.
//!
//! The benchmarks and the crash-test workers are in `tandem-lab`.

use tandem_cli::{admin, console, contracts, demo, events, rebuild, serve, status, up};

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator: buffers made on a store
/// thread and freed on a runtime thread made glibc's arenas contend.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "tandem",
    version,
    about = "Event-driven Rust services: toolkit and tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List, inspect, redrive or discard a consumer's parked events.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(admin::DeadLetterCommand),
    /// The whole commerce system on this machine (embedded engines), until Ctrl-C.
    Up(up::UpArgs),
    /// The motivating story, run for real and narrated with measured numbers.
    Demo(demo::DemoArgs),
    /// Watch the event bus.
    #[command(subcommand)]
    Events(events::EventsCommand),
    /// Run one service of the commerce system, as deployed.
    Serve(serve::ServeArgs),
    /// Rebuild a consumer's read model from the start of the log (the
    /// running consumer carries it out while its service keeps serving).
    Replay(admin::ReplayArgs),
    /// Rebuild a consumer's read model side by side: the new version fills
    /// beside the live one, which keeps answering, and replaces it at once
    /// when level; progress, ETA, cancel, or --in-place.
    Rebuild(rebuild::RebuildArgs),
    /// Make a service send its event history again, or a snapshot of every
    /// aggregate, and move the consumers that fell behind the log's
    /// retention past what it lost, so they catch up from it.
    Republish(admin::RepublishArgs),
    /// Every service's health, each consumer's lag and dead letters, each
    /// outbox's backlog; exit 1 when anything is not ok.
    Status(status::StatusArgs),
    /// The operator console (as `tandem up` serves it) for services
    /// deployed anywhere: their map, lag, dead letters, rebuilds and audit.
    Console(console::ConsoleArgs),
    /// The event contracts: a service's AsyncAPI document, and the check
    /// of compatibility with the released baseline.
    #[command(subcommand)]
    Contracts(contracts::ContractsCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A service's traces name the service.
    let service = match &cli.command {
        Command::Serve(args) => args.service_name(),
        _ => "tandem",
    };
    tandem_cli::run_main_as("tandem", service, async move {
        match cli.command {
            Command::DeadLetters(command) => admin::dead_letters(command).await,
            Command::Replay(args) => admin::replay(args).await,
            Command::Rebuild(args) => rebuild::run(args).await,
            Command::Republish(args) => admin::republish(args).await,
            Command::Serve(args) => serve::run(args).await,
            Command::Events(command) => events::run(command).await,
            Command::Up(args) => up::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Console(args) => console::run(args).await,
            Command::Contracts(command) => contracts::run(command),
            Command::Status(args) => match status::run(args).await? {
                0 => Ok(()),
                code => std::process::exit(code.into()),
            },
        }
    })
}
