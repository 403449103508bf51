//! `GET /metrics` and `GET /status` on every service, and the HTTP request
//! durations the metrics report.
//!
//! The scrape answers the Prometheus text format (0.0.4), or OpenMetrics
//! when the scraper's `Accept` header asks for it; both are encoded by
//! `prometheus-client` from the process's registry
//! ([`tandem::metrics::metrics`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tandem::metrics::{metrics, wants_openmetrics, HttpLabels};
use tandem::Store;

use crate::builder::Reporter;

/// Longest a scrape waits for [`Refresh`]; past it, the gauges keep the
/// values of the refresh before.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(2);

/// `router` with `/metrics` and `/status`, and every one of its routes
/// timed in `http_server_request_duration_seconds` by route template
/// (never the path itself, which may carry ids), method and status. The
/// gauges read from the database and the bus (backlogs, lag, dead
/// letters) are brought up to date by `reporter` before a scrape is
/// encoded, one refresh at a time.
pub(crate) fn with_metrics<S: Store>(router: Router, reporter: Reporter<S>) -> Router {
    let gate = Arc::new(tokio::sync::Mutex::new(()));
    let for_status = reporter.clone();
    router
        .route(
            "/metrics",
            get(move |headers: HeaderMap| {
                let reporter = reporter.clone();
                let gate = Arc::clone(&gate);
                async move {
                    let _one_at_a_time = gate.lock().await;
                    match tokio::time::timeout(REFRESH_TIMEOUT, reporter.report()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => tracing::warn!(%error, "cannot refresh the gauges"),
                        Err(_) => tracing::warn!(
                            "metrics refresh took longer than {REFRESH_TIMEOUT:?}; serving the values before"
                        ),
                    }
                    scrape(&headers)
                }
            }),
        )
        .route(
            "/status",
            get(move || {
                let reporter = for_status.clone();
                async move {
                    match tokio::time::timeout(REFRESH_TIMEOUT, reporter.report()).await {
                        Ok(Ok(report)) => axum::Json(report).into_response(),
                        Ok(Err(error)) => {
                            tracing::warn!(%error, "cannot read the service's status");
                            crate::Problem::unavailable("the service's status cannot be read now")
                                .into_response()
                        }
                        Err(_) => crate::Problem::unavailable(
                            "the service's status took too long to read",
                        )
                        .into_response(),
                    }
                }
            }),
        )
        .route_layer(axum::middleware::from_fn(time_request))
}

fn scrape(headers: &HeaderMap) -> Response {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(wants_openmetrics);
    let (content_type, body) = if openmetrics {
        (
            tandem::metrics::OPENMETRICS_CONTENT_TYPE,
            metrics().encode_openmetrics(),
        )
    } else {
        (
            tandem::metrics::PROMETHEUS_CONTENT_TYPE,
            metrics().encode_prometheus(),
        )
    };
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

async fn time_request(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let response = if tandem::trace::enabled() {
        use tracing::Instrument;
        let span = tracing::info_span!(
            "request",
            otel.name = format!("{method} {}", route.as_deref().unwrap_or("unmatched")),
            otel.kind = "server",
            http.request.method = method.as_str(),
            http.route = route.as_deref().unwrap_or("unmatched"),
            http.response.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        // A W3C traceparent from the caller continues its trace; without
        // one the request starts a new trace.
        let traceparent = request
            .headers()
            .get("traceparent")
            .and_then(|value| value.to_str().ok());
        tandem::trace::continue_from(&span, traceparent);
        tandem::trace::record_trace_id(&span);
        let response = next.run(request).instrument(span.clone()).await;
        span.record("http.response.status_code", response.status().as_u16());
        response
    } else {
        next.run(request).await
    };
    if let Some(http_route) = route {
        metrics()
            .http_duration
            .get_or_create(&HttpLabels {
                http_route,
                http_request_method: method,
                http_response_status_code: response.status().as_u16(),
            })
            .observe(started.elapsed().as_secs_f64());
    }
    response
}
