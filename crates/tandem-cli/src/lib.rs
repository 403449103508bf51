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

// The argument structs' doc comments are the command's help text, read
// on a terminal: an address there is written plainly, not as a link.
#![allow(rustdoc::bare_urls)]

pub mod admin;
pub mod console;
pub mod contracts;
pub mod data_dir;
pub mod demo;
pub mod events;
pub mod printable;
pub mod rebuild;
pub mod serve;
pub mod status;
pub mod system;
pub mod up;

/// A command-line program's `main`: logs to stderr (filter `TANDEM_LOG`,
/// default `warn`; `TANDEM_LOG_FORMAT=json` for one JSON object a line,
/// otherwise text, coloured only on a terminal), exports traces over OTLP
/// when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (see [`tandem::trace`]),
/// runs `command` on a multi-threaded runtime, and turns its error into a
/// message prefixed with `program` and a non-zero exit.
pub fn run_main<F>(program: &str, command: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    run_main_as(program, program, command)
}

/// [`run_main`] for a process whose traces name `service` (unless
/// `OTEL_SERVICE_NAME` says otherwise).
pub fn run_main_as<F>(program: &str, service: &str, command: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let tracer = telemetry(service);
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
    let outcome = runtime.block_on(command);
    drop(runtime);
    if let Some(tracer) = tracer {
        // Spans still batched go out before the process ends.
        if let Err(error) = tracer.shutdown() {
            eprintln!("{program}: traces not all exported: {error}");
        }
    }
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{program}: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Installs the log output and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set,
/// the OTLP trace exporter (HTTP/protobuf, batched) behind the
/// `tracing-opentelemetry` layer, with the W3C trace-context propagator.
fn telemetry(service: &str) -> Option<opentelemetry_sdk::trace::SdkTracerProvider> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let format = std::env::var("TANDEM_LOG_FORMAT").ok();
    let logs = match format.as_deref() {
        // One JSON object a line, for log collectors.
        Some("json") => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed(),
        _ => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            // Colours only for a terminal, never into log files.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
    };
    let exporting = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").is_ok_and(|url| !url.is_empty());
    let mut failure = None;
    let provider = if exporting {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => {
                let mut resource = opentelemetry_sdk::Resource::builder();
                if std::env::var("OTEL_SERVICE_NAME").is_err() {
                    resource = resource.with_service_name(service.to_owned());
                }
                Some(
                    opentelemetry_sdk::trace::SdkTracerProvider::builder()
                        .with_batch_exporter(exporter)
                        .with_resource(resource.build())
                        .build(),
                )
            }
            Err(error) => {
                failure = Some(error.to_string());
                None
            }
        }
    } else {
        None
    };
    match &provider {
        // The log filter applies to the log lines only; the spans the
        // exporter needs are INFO, whatever the logs keep.
        Some(provider) => {
            use opentelemetry::trace::TracerProvider;
            let traces = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("tandem"))
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
            // With per-layer filters a library's "is debug wanted?" hears
            // yes; librdkafka then logs at debug level, which stalled its
            // group rebalances. It stays at INFO at most here.
            let librdkafka = tracing_subscriber::filter::Targets::new()
                .with_default(tracing_subscriber::filter::LevelFilter::TRACE)
                .with_target("librdkafka", tracing_subscriber::filter::LevelFilter::INFO);
            tracing_subscriber::registry()
                .with(logs.with_filter(filter))
                .with(traces)
                .with(librdkafka)
                .init();
        }
        // No exporter: the filter is the whole subscriber's, so what it
        // leaves out is never even built (and a library asking whether its
        // debug output is wanted, librdkafka, hears no).
        None => tracing_subscriber::registry()
            .with(logs)
            .with(filter)
            .init(),
    }
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        tandem::trace::enable();
    }
    if let Some(error) = failure {
        tracing::warn!(%error, "cannot export traces over OTLP; exporting none");
    }
    if let Some(format) = format {
        if format != "json" && format != "text" {
            tracing::warn!(format, "TANDEM_LOG_FORMAT is json or text; logging text");
        }
    }
    provider
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
