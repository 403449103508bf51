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
pub mod status;
pub mod system;
pub mod up;

/// A command-line program's `main`: logs to stderr (filter `TANDEM_LOG`,
/// default `warn`; `TANDEM_LOG_FORMAT=json` for one JSON object a line,
/// otherwise text, coloured only on a terminal), runs `command` on a
/// multi-threaded runtime, and turns its error into a message prefixed
/// with `program` and a non-zero exit.
pub fn run_main<F>(program: &str, command: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))
    };
    match std::env::var("TANDEM_LOG_FORMAT").as_deref() {
        // One JSON object a line, for log collectors.
        Ok("json") => tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .init(),
        other => {
            tracing_subscriber::fmt()
                .with_env_filter(filter())
                .with_writer(std::io::stderr)
                // Colours only for a terminal, never into log files.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            if let Ok(format) = other {
                if format != "text" {
                    tracing::warn!(format, "TANDEM_LOG_FORMAT is json or text; logging text");
                }
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{program}: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{program}: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

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
