//! HTTP and process plumbing shared by services built on Tandem. Knows no
//! domain.
//!
//! - [`Problem`]: RFC 9457 `application/problem+json` errors, with the
//!   field at fault.
//! - [`StrictJson`]: a JSON body extractor whose every rejection is a
//!   problem naming the field (400 malformed, 408 stalled, 413 too large,
//!   415 not JSON, 422 wrong shape).
//! - [`probes`]: `/health` and `/ready`.
//! - [`openapi`] and [`asyncapi`]: what every service's `/openapi.json`
//!   says of the shared plumbing, and its `/asyncapi.json` document.
//! - [`serve`]: runs a router until a shutdown token fires, with timeouts
//!   on every phase of a connection, a cap on connections, and a deadline
//!   for draining in-flight requests ([`ServeConfig`]).
//! - [`Service`]: a service's parts (its tables, the relay of its outbox,
//!   its consumers, its HTTP API) put together and run until shutdown;
//!   [`ServiceError`] says which part failed and keeps the cause.

#![warn(missing_docs)]

use std::net::SocketAddr;

use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub mod admin;
pub mod asyncapi;
mod builder;
pub mod metrics;
pub mod openapi;
mod serve;
pub use builder::{Service, ServiceError};
pub use serve::{serve, serve_with, ServeConfig};

/// Largest request body a Tandem service accepts.
pub const BODY_LIMIT_BYTES: usize = 64 * 1024;

/// An RFC 9457 problem document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem, `https://tandem.dev/problems/`
    /// and a stable word such as `invalid-field` or `not-found`: what a
    /// client branches on.
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub problem_type: String,
    /// The reason phrase of the HTTP status, such as `Not Found`.
    pub title: String,
    /// The HTTP status code, the same as the response's.
    pub status: u16,
    /// What went wrong with this request, for a person to read.
    pub detail: String,
    /// The request field at fault (a JSON path such as `lines[0].quantity`,
    /// or a parameter or header name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl Problem {
    /// A problem answered with `status`, of type
    /// `https://tandem.dev/problems/{kind}`, titled with the status's
    /// reason phrase and naming no field.
    pub fn new(status: StatusCode, kind: &str, detail: impl Into<String>) -> Self {
        Self {
            problem_type: format!("https://tandem.dev/problems/{kind}"),
            title: status.canonical_reason().unwrap_or("error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            field: None,
        }
    }

    /// The same problem, naming `field` as the part of the request at
    /// fault (see [`Problem::field`]).
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// 422: the request is well-formed but `field` breaks a rule.
    pub fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-field", detail).with_field(field)
    }

    /// 404: no such resource.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }

    /// 409: the request conflicts with the resource's state.
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }

    /// 503: a dependency of this service is unavailable; retry later.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
    }

    /// The problem for a failure of the service's own database, logged:
    /// 503 while it is unavailable (retry later), 500 otherwise.
    pub fn from_store(error: tandem::StoreError, database: &str) -> Self {
        match error {
            tandem::StoreError::Unavailable(detail) => {
                tracing::warn!(%detail, database, "store unavailable");
                Problem::unavailable(format!("the {database} is unavailable"))
            }
            error => {
                tracing::error!(%error, database, "store error");
                Problem::internal()
            }
        }
    }

    /// 500, for errors whose detail must not leak; log the cause.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the service failed to handle the request; it has been logged",
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}

/// A JSON request body, parsed strictly: every failure is a [`Problem`]
/// that names the field at fault.
#[derive(Debug, Clone, Copy, Default)]
pub struct StrictJson<T>(pub T);

impl<T, S> FromRequest<S> for StrictJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split(';').next())
            .map(|media| {
                let media = media.trim();
                media.eq_ignore_ascii_case("application/json") || media.ends_with("+json")
            })
            .unwrap_or(false);
        if !is_json {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "send the body as application/json",
            )
            .with_field("content-type"));
        }
        let bytes = axum::body::Bytes::from_request(request, state)
            .await
            .map_err(body_problem)?;
        parse_json(&bytes).map(StrictJson)
    }
}

fn body_problem(rejection: BytesRejection) -> Problem {
    if body_timed_out(&rejection) {
        Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            "body-timeout",
            "the body stopped arriving before it was complete",
        )
        .with_field("body")
    } else if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            format!("the body exceeds {BODY_LIMIT_BYTES} bytes"),
        )
        .with_field("body")
    } else {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "unreadable-body",
            rejection.body_text(),
        )
        .with_field("body")
    }
}

/// Whether reading the body failed because it stalled past the body-read
/// timeout of [`serve_with`].
fn body_timed_out(rejection: &BytesRejection) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(error) = cause {
        if error.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// A query string, parsed strictly: a failure is a 400 problem naming
/// `query`.
#[derive(Debug, Clone, Copy, Default)]
pub struct StrictQuery<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for StrictQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| StrictQuery(value))
            .map_err(|rejection| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid-query",
                    rejection.body_text(),
                )
                .with_field("query")
            })
    }
}

/// Largest page a list endpoint returns.
pub const MAX_PAGE: u32 = 500;

/// A list endpoint's `limit`: `default` when absent, else 1 to [`MAX_PAGE`].
pub fn page_limit(limit: Option<u32>, default: u32) -> Result<u32, Problem> {
    let limit = limit.unwrap_or(default);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(Problem::invalid(
            "limit",
            format!("must be between 1 and {MAX_PAGE}"),
        ));
    }
    Ok(limit)
}

/// Integers in a JSON body, however they are written. JSON, and JSON
/// Schema's `integer`, do not tell `3` from `3.0`, `30e-1` or `0.3e1`;
/// serde's `i64` takes only the first. With
/// `#[serde(deserialize_with = ...)]`, a field takes any of them, read
/// exactly from the number's text (not through a double, which would
/// round): a whole number that fits in an `i64`. Anything else is refused
/// as a wrong type is (422, naming the field).
pub mod json_integer {
    use serde::de::{Deserialize, Deserializer, Error};
    use serde_json::value::RawValue;

    /// 2^53 - 1: the largest integer every JSON reader holds exactly
    /// (those that read numbers as doubles), for ranges that must be
    /// checked the same everywhere.
    pub const MAX_EXACT: i64 = (1 << 53) - 1;

    /// The integer a JSON value's text stands for.
    fn whole(text: &str) -> Result<i64, String> {
        let kind = match text.bytes().next() {
            Some(b'-' | b'0'..=b'9') => None,
            Some(b'"') => Some("a string"),
            Some(b't' | b'f') => Some("a boolean"),
            Some(b'n') => Some("null"),
            Some(b'[') => Some("an array"),
            Some(b'{') => Some("an object"),
            _ => Some("not a number"),
        };
        if let Some(kind) = kind {
            return Err(format!("invalid type: {kind}, expected an integer"));
        }
        // The text is a JSON number (the parser checked it):
        // -?int(.frac)?([eE][+-]?exp)?
        let (negative, unsigned) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
            Some(at) => (&unsigned[..at], &unsigned[at + 1..]),
            None => (unsigned, ""),
        };
        let (integral, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        // Saturated: beyond a million either way, the number is 0, not
        // whole, or too large whatever its digits.
        let (exponent_negative, exponent_digits) = match exponent.as_bytes().first() {
            Some(b'-') => (true, &exponent[1..]),
            Some(b'+') => (false, &exponent[1..]),
            _ => (false, exponent),
        };
        let magnitude = exponent_digits.bytes().fold(0_i64, |acc, digit| {
            (acc * 10 + i64::from(digit - b'0')).min(1_000_000)
        });
        let exponent = if exponent_negative {
            -magnitude
        } else {
            magnitude
        };
        let digits = format!("{integral}{fraction}");
        let mut digits = digits.trim_start_matches('0');
        if digits.is_empty() {
            return Ok(0);
        }
        let mut scale = exponent - fraction.len() as i64;
        while scale < 0 && digits.ends_with('0') {
            digits = &digits[..digits.len() - 1];
            scale += 1;
        }
        if scale < 0 {
            return Err(format!("invalid value: {text}, expected a whole number"));
        }
        let too_large = || format!("invalid value: {text}, expected a 64-bit integer");
        if digits.len() as i64 + scale > 19 {
            return Err(too_large());
        }
        let value: i128 =
            digits.parse::<i128>().map_err(|_| too_large())? * 10_i128.pow(scale as u32);
        i64::try_from(if negative { -value } else { value }).map_err(|_| too_large())
    }

    /// An `i64` field.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        whole(raw.get()).map_err(D::Error::custom)
    }

    /// An `Option<i64>` field (with `#[serde(default)]`): `null` is `None`.
    pub fn option<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
        let raw = Option::<Box<RawValue>>::deserialize(deserializer)?;
        raw.map(|raw| whole(raw.get()).map_err(D::Error::custom))
            .transpose()
    }

    struct Element(i64);

    impl<'de> Deserialize<'de> for Element {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserialize(deserializer).map(Element)
        }
    }

    /// An `Option<Vec<i64>>` field (with `#[serde(default)]`): `null` is
    /// `None`.
    pub fn option_vec<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Vec<i64>>, D::Error> {
        let list = Option::<Vec<Element>>::deserialize(deserializer)?;
        Ok(list.map(|list| list.into_iter().map(|Element(value)| value).collect()))
    }
}

/// Parses `bytes` as `T`, naming the field at fault on failure.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let parsed: Result<T, _> = serde_path_to_error::deserialize(&mut deserializer);
    let value = match parsed {
        Ok(value) => value,
        Err(error) => {
            let path = error.path().to_string();
            let inner = error.into_inner();
            return Err(match inner.classify() {
                serde_json::error::Category::Data => {
                    let message = inner.to_string();
                    // serde names a missing field only in its message (the
                    // path stops at its parent); an unknown one is in the path.
                    let missing = message
                        .strip_prefix("missing field `")
                        .and_then(|rest| rest.split('`').next());
                    let field = match (path.as_str(), missing) {
                        (".", Some(name)) => name.to_owned(),
                        (_, Some(name)) => format!("{path}.{name}"),
                        (".", None) => "body".to_owned(),
                        (_, None) => path,
                    };
                    Problem::invalid(field, message)
                }
                _ => Problem::new(
                    StatusCode::BAD_REQUEST,
                    "malformed-json",
                    format!("the body is not valid JSON: {inner}"),
                )
                .with_field("body"),
            });
        }
    };
    deserializer.end().map_err(|error| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed-json",
            format!("the body is not valid JSON: {error}"),
        )
        .with_field("body")
    })?;
    Ok(value)
}

/// `/health` (the process is up) and `/ready` (it can serve: `ready`
/// resolves to `Ok`).
pub mod probes {
    use std::future::Future;
    use std::sync::Arc;

    use axum::routing::get;
    use axum::{Json, Router};

    use crate::Problem;

    /// Probes of a service that is ready when its own database answers.
    /// When it does not, `/ready` says only that the database is
    /// unavailable; the store's error, which names hosts, paths and
    /// databases, goes to the log.
    pub fn for_store<S: tandem::Store>(store: S, database: &'static str) -> Router {
        router(move || {
            let store = store.clone();
            async move {
                store
                    .read(|tx| tx.query("SELECT 1", &[]).map(|_| ()))
                    .await
                    .map_err(|error: tandem::StoreError| {
                        tracing::warn!(%error, database, "not ready: store check failed");
                        format!("the {database} is unavailable")
                    })
            }
        })
    }

    /// `/health` and `/ready`; `ready`'s error is the reason `/ready`
    /// answers with (503), so it must be fit for any client to read: what
    /// is not ready, never an error's own text.
    pub fn router<F, Fut>(ready: F) -> Router
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let ready = Arc::new(ready);
        Router::new()
            .route(
                "/health",
                get(|| async { Json(serde_json::json!({"status": "ok"})) }),
            )
            .route(
                "/ready",
                get(move || {
                    let ready = Arc::clone(&ready);
                    async move {
                        match ready().await {
                            Ok(()) => Ok(Json(serde_json::json!({"status": "ready"}))),
                            Err(reason) => Err(Problem::unavailable(reason)),
                        }
                    }
                }),
            )
    }
}

/// The limits and answers every Tandem service router has: the body limit
/// (413 as problem+json through [`StrictJson`]) and a problem+json 404 for
/// unknown routes. Services apply it to their router; [`serve`] applies it
/// again, so a router that forgot it is still covered.
pub fn with_defaults(router: Router) -> Router {
    router
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .fallback(|| async { Problem::not_found("no such route") })
}

/// Runs a service's parts until `shutdown` fires: the HTTP server, the relay
/// of its outbox (when it publishes) and its consumers. The first part to
/// fail stops the others; the error names it. [`Service`] puts the parts
/// together and calls this.
pub async fn run_parts(
    listener: tokio::net::TcpListener,
    router: Router,
    background: Vec<(&'static str, BoxedTask)>,
    shutdown: CancellationToken,
) -> Result<(), ServiceError> {
    let mut tasks = tokio::task::JoinSet::new();
    for (part, task) in background {
        tasks.spawn(async move {
            task.await
                .map_err(|source| ServiceError::Part { part, source })
        });
    }
    let server_shutdown = shutdown.clone();
    tasks.spawn(async move {
        serve(listener, router, server_shutdown)
            .await
            .map_err(ServiceError::Http)
    });
    let mut first_error = None;
    while let Some(finished) = tasks.join_next().await {
        let outcome = finished.unwrap_or_else(|error| Err(ServiceError::Panicked(error)));
        if let Err(error) = outcome {
            tracing::error!(%error, "service part failed; stopping the service");
            first_error.get_or_insert(error);
        }
        // Whatever ended, the service stops as a whole.
        shutdown.cancel();
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// A background part of a service, e.g. `relay.run(token)` boxed.
pub type BoxedTask = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>
            + Send,
    >,
>;

/// Boxes a part's future for [`run_parts`].
pub fn task<F, E>(future: F) -> BoxedTask
where
    F: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    Box::pin(async move {
        future
            .await
            .map_err(|error| Box::new(error) as Box<dyn std::error::Error + Send + Sync>)
    })
}

/// Binds `address`, with a message that names it when that fails.
pub async fn bind(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|error| {
            std::io::Error::new(error.kind(), format!("cannot listen on {address}: {error}"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Order {
        lines: Vec<Line>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Line {
        quantity: i64,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Amounts {
        #[serde(deserialize_with = "json_integer::deserialize")]
        cents: i64,
        #[serde(default, deserialize_with = "json_integer::option")]
        limit: Option<i64>,
        #[serde(default, deserialize_with = "json_integer::option_vec")]
        ids: Option<Vec<i64>>,
    }

    #[test]
    fn integers_are_taken_however_they_are_written() {
        let amounts = parse_json::<Amounts>(
            br#"{"cents": 1182.0, "limit": 1e3, "ids": [1, -2.0, 30e-1, 0.4e1, 2251799813685247.0]}"#,
        )
        .unwrap();
        assert_eq!(amounts.cents, 1182);
        assert_eq!(amounts.limit, Some(1000));
        assert_eq!(amounts.ids, Some(vec![1, -2, 3, 4, 2251799813685247]));
        let amounts =
            parse_json::<Amounts>(br#"{"cents": -0.0, "limit": null, "ids": null}"#).unwrap();
        assert_eq!((amounts.cents, amounts.limit, amounts.ids), (0, None, None));
        for (text, value) in [
            ("9223372036854775807", i64::MAX),
            ("-9223372036854775808", i64::MIN),
            ("9223372036854775807.000", i64::MAX),
            ("92233720368547758.07e2", i64::MAX),
            ("0e999999999999999999999", 0),
            ("1E+2", 100),
        ] {
            let body = format!(r#"{{"cents": {text}}}"#);
            assert_eq!(
                parse_json::<Amounts>(body.as_bytes()).unwrap().cents,
                value,
                "{text}"
            );
        }
        for (body, field) in [
            (&br#"{"cents": 1.5}"#[..], "cents"),
            (br#"{"cents": 1e-1}"#, "cents"),
            (br#"{"cents": 9223372036854775808}"#, "cents"),
            (br#"{"cents": 1e19}"#, "cents"),
            (br#"{"cents": 1e999999999999999999999}"#, "cents"),
            (br#"{"cents": "1"}"#, "cents"),
            (br#"{"cents": true}"#, "cents"),
            (br#"{"cents": 1, "limit": 0.5}"#, "limit"),
            (br#"{"cents": 1, "ids": [1, 2.5]}"#, "ids[1]"),
        ] {
            let problem = parse_json::<Amounts>(body).unwrap_err();
            assert_eq!(problem.status, 422, "{problem:?}");
            assert_eq!(problem.field.as_deref(), Some(field), "{problem:?}");
        }
    }

    #[test]
    fn names_the_field_at_fault() {
        let problem =
            parse_json::<Order>(br#"{"lines":[{"quantity":1},{"quantity":"two"}]}"#).unwrap_err();
        assert_eq!(problem.status, 422);
        assert_eq!(problem.field.as_deref(), Some("lines[1].quantity"));

        let problem = parse_json::<Order>(br#"{"lines": [}"#).unwrap_err();
        assert_eq!(problem.status, 400);
        assert_eq!(problem.field.as_deref(), Some("body"));

        let problem = parse_json::<Order>(br#"{}"#).unwrap_err();
        assert_eq!(problem.status, 422);
        assert_eq!(problem.field.as_deref(), Some("lines"));

        let problem = parse_json::<Order>(br#"{"lines":[{}]}"#).unwrap_err();
        assert_eq!(problem.field.as_deref(), Some("lines[0].quantity"));

        let problem = parse_json::<Order>(br#"{"lines":[],"colour":"red"}"#).unwrap_err();
        assert_eq!(problem.field.as_deref(), Some("colour"));
    }
}
