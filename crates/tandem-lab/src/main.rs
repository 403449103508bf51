//! `tandem-lab`: development tools, kept out of the shipped `tandem`
//! binary.
//!
//! - `tandem-lab bench pipeline`: events per second through outbox → relay →
//!   bus → consumer → read model, against a raw baseline on the same disk or
//!   broker.
//! - `tandem-lab bench orders`: the Order Service under load.
//! - `tandem-lab bench compare`: the order flow on events against a
//!   synchronous REST baseline of it ([`baseline`]), in one run.
//! - `tandem-lab bench dead-letters`: the admin API's dead-letter listings
//!   and failure groups with many letters parked.
//! - `tandem-lab worker ...` (hidden): small programs the crash-matrix and
//!   multi-process tests run as child processes.
//! - `tandem-lab baseline SERVICE` (hidden): a service of that baseline.
//! - `tandem-lab serve` (hidden): the product's `tandem serve`, so that
//!   `bench orders` can start the services from this executable.

mod baseline;
mod bench;
mod bench_compare;
mod bench_dead_letters;
mod bench_orders;
mod load;
mod progress;
mod raw_latency;
mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The same allocator as the shipped binary, so the benchmarks measure
/// what ships.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "tandem-lab",
    version,
    about = "Tandem's development tools: benchmarks and crash-test workers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure Tandem's speed on this machine.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Child processes for the crash-matrix tests.
    #[command(subcommand, hide = true)]
    Worker(worker::WorkerCommand),
    /// One service of the commerce system, as `tandem serve` runs it (the
    /// services `bench orders` starts).
    #[command(hide = true)]
    Serve(tandem_cli::serve::ServeArgs),
    /// One service of the synchronous REST baseline `bench compare` runs.
    #[command(hide = true)]
    Baseline(baseline::ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tandem_cli::run_main("tandem-lab", async move {
        match cli.command {
            Command::Bench(command) => bench::run(command).await,
            Command::Worker(command) => worker::run(command).await,
            Command::Serve(args) => tandem_cli::serve::run(args).await,
            Command::Baseline(args) => baseline::serve(args).await,
        }
    })
}
