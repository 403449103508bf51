//! `tandem contracts`: the event contracts as outside tools read them.
//!
//! - `asyncapi SERVICE`: the service's AsyncAPI 3.0 document, the same as
//!   its `/asyncapi.json`.
//! - `check`: the contracts compiled into this binary against the released
//!   baseline kept in the repository (`crates/tandem-contracts/baseline`);
//!   an incompatible change within a version fails, naming the event, the
//!   field and the rule (see `tandem::contract`). `--write-baseline`
//!   releases the current set: it adds new events and versions to the
//!   baseline once the check passes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;

use crate::serve::Service;

/// Where the released contracts are kept, from the repository's root.
pub const DEFAULT_BASELINE: &str = "crates/tandem-contracts/baseline";

#[derive(Debug, Subcommand)]
pub enum ContractsCommand {
    /// Write a service's AsyncAPI 3.0 document (what it serves at
    /// /asyncapi.json) to standard output or a file.
    Asyncapi {
        /// Which service.
        service: Service,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Compare the event contracts with the released baseline; exit 1 on
    /// an incompatible change within a version.
    Check {
        /// The baseline directory (`<type>.v<N>.json` files).
        #[arg(long, default_value = DEFAULT_BASELINE)]
        baseline: PathBuf,
        /// Once the check passes, write the current contracts into the
        /// baseline (a release).
        #[arg(long)]
        write_baseline: bool,
    },
}

/// A service's AsyncAPI document.
pub fn asyncapi(service: Service) -> serde_json::Value {
    match service {
        Service::Customer => customer_service::http::asyncapi(),
        Service::Inventory => inventory_service::http::asyncapi(),
        Service::Order => order_service::http::asyncapi(),
    }
}

pub fn run(command: ContractsCommand) -> anyhow::Result<()> {
    match command {
        ContractsCommand::Asyncapi { service, out } => {
            let text = serde_json::to_string_pretty(&asyncapi(service))? + "\n";
            match out {
                Some(path) => std::fs::write(&path, text)
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => print!("{text}"),
            }
            Ok(())
        }
        ContractsCommand::Check {
            baseline,
            write_baseline,
        } => check(&baseline, write_baseline),
    }
}

fn check(dir: &Path, write: bool) -> anyhow::Result<()> {
    if !dir.is_dir() {
        bail!(
            "no contract baseline at {}: run from the repository's root, or pass --baseline DIR",
            dir.display()
        );
    }
    let released = tandem::contract::read_baseline(dir)?;
    let contracts = tandem_contracts::contracts();
    let findings = tandem::contract::check(&released, &contracts);
    if !findings.is_empty() {
        let lines: Vec<String> = findings
            .iter()
            .map(|finding| format!("  {finding}"))
            .collect();
        bail!(
            "{} incompatible change(s) against the baseline {}:\n{}",
            findings.len(),
            dir.display(),
            lines.join("\n")
        );
    }
    let unreleased: Vec<_> = contracts
        .iter()
        .filter(|contract| {
            !released.contains_key(&(contract.event_type.to_owned(), contract.version))
        })
        .collect();
    println!(
        "contracts compatible with {}: {} released, {} new",
        dir.display(),
        released.len(),
        unreleased.len()
    );
    for contract in &unreleased {
        println!("  new: {} v{}", contract.event_type, contract.version);
    }
    if write {
        for contract in &contracts {
            let path = dir.join(contract.file_name());
            let text = serde_json::to_string_pretty(&contract.schema)? + "\n";
            std::fs::write(&path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        println!("baseline written: {} contracts", contracts.len());
    }
    Ok(())
}
