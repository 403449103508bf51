//! The `tandem` command's subcommands, as a library so that the end-to-end
//! tests drive the same code (`system::System` starts the services as
//! processes).
//!
//! - `serve`, `up`, `system`, `demo`: run the commerce system.
//! - `events`: `tandem events tail`.
//! - `admin`: dead letters and replay.
//! - `data_dir`: the private data directory of `tandem up`.
//! - `printable`: event text made safe for a terminal.
//!
//! The benchmarks and the crash-test workers are development tools: they
//! live in `crates/tandem-lab` (binary `tandem-lab`), not in this one.

pub mod admin;
pub mod data_dir;
pub mod demo;
pub mod events;
pub mod printable;
pub mod serve;
pub mod system;
pub mod up;

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(terminate) => terminate,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
