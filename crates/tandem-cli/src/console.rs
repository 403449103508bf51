//! The operator console: one page, served by `tandem up` (port 8080 by
//! default) or by `tandem console --url ...` against services deployed
//! anywhere, updated live over Server-Sent Events.
//!
//! The console server reads each service's `/status` once a second and
//! streams the snapshot to every open page (`GET /api/stream`). What an
//! operator asks of a service goes to its admin API through
//! `/api/admin/{service}/...`, with the operator's own bearer token passed
//! on untouched: the console holds no secret of the services and can do
//! nothing the token does not allow. A browser logs in once with the
//! token and is given a session cookie instead (see [`session`]). Under `tandem up` it also stops,
//! kills and starts the supervised services (`/api/services/...`),
//! behind the same token, and places orders through the Order Service's
//! public API, so a newcomer can watch orders flow with a service down.
//! The page itself (`console/`) is plain HTML, CSS and JavaScript, built
//! into the binary.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use serde::Serialize;
use tandem_service::admin::AdminTokens;
use tandem_service::Problem;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

pub mod session;
use session::Sessions;

const INDEX: &str = include_str!("../console/index.html");
const SCRIPT: &str = include_str!("../console/console.js");
const STYLE: &str = include_str!("../console/console.css");

/// How often the services are read.
const REFRESH: Duration = Duration::from_secs(1);
/// Longest wait for one service's answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// What the console may do to a supervised service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// SIGTERM, and no restart until started.
    Stop,
    /// SIGKILL, as a crash would, and no restart until started.
    Kill,
    /// Start it (again) now.
    Start,
}

/// A request to the supervisor of `tandem up`, answered on `reply`.
#[derive(Debug)]
pub struct Control {
    pub service: String,
    pub action: Action,
    /// The name of the admin token that asked (for the audit trail).
    pub who: String,
    pub reply: oneshot::Sender<Result<(), String>>,
}

/// What the console needs to control the services of `tandem up`.
#[derive(Clone)]
pub struct Controls {
    pub sender: mpsc::Sender<Control>,
    /// The token that guards the controls.
    pub tokens: AdminTokens,
    /// Services the operator stopped or killed, as the supervisor tells.
    pub held: watch::Receiver<Vec<String>>,
}

/// One service the console watches.
#[derive(Debug, Clone)]
pub struct Watched {
    pub base: url::Url,
}

/// A service as the page sees it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceView {
    name: String,
    url: String,
    up: bool,
    /// Stopped or killed from the console (tandem up only).
    held: bool,
    report: Option<serde_json::Value>,
    error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Snapshot {
    at_millis: i64,
    services: Vec<ServiceView>,
    controls: bool,
}

#[derive(Clone)]
struct Console {
    http: reqwest::Client,
    services: Arc<Vec<Watched>>,
    /// Service name → base URL, learned from the services' reports.
    names: Arc<std::sync::RwLock<BTreeMap<String, url::Url>>>,
    snapshots: watch::Receiver<Arc<String>>,
    controls: Option<Controls>,
    sessions: Sessions,
}

/// Serves the console on `listener` until `stop` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    services: Vec<Watched>,
    controls: Option<Controls>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(CALL_TIMEOUT)
        .build()
        .context("cannot build the HTTP client")?;
    let (publish, snapshots) = watch::channel(Arc::new(String::from("{}")));
    let console = Console {
        http,
        services: Arc::new(services),
        names: Arc::default(),
        snapshots,
        controls,
        sessions: Sessions::default(),
    };
    tokio::spawn(refresh(console.clone(), publish, stop.clone()));
    let router = Router::new()
        .route(
            "/",
            get(|| async { page(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/console.js",
            get(|| async { page(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/console.css",
            get(|| async { page(STYLE, "text/css; charset=utf-8") }),
        )
        .route("/api/stream", get(stream))
        .route(
            "/api/session",
            get(session_view).post(log_in).delete(log_out),
        )
        .route("/api/admin/{service}/{*rest}", any(admin))
        .route("/api/services/{service}/{action}", post(control))
        .route("/api/orders", post(place_order))
        .route("/api/orders/{id}", get(get_order))
        .with_state(console);
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
        .context("console server")
}

fn page(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
            // The page runs only its own script and talks only to its own
            // origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

/// Reads every service once a [`REFRESH`] and publishes the snapshot.
async fn refresh(console: Console, publish: watch::Sender<Arc<String>>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let held = console
            .controls
            .as_ref()
            .map(|controls| controls.held.borrow().clone())
            .unwrap_or_default();
        let reads = console.services.iter().map(|watched| {
            let http = console.http.clone();
            let base = watched.base.clone();
            async move {
                let answer = async {
                    let response = http
                        .get(base.join("status")?)
                        .timeout(Duration::from_secs(2))
                        .send()
                        .await?
                        .error_for_status()?;
                    anyhow::Ok(response.json::<serde_json::Value>().await?)
                }
                .await;
                (base, answer)
            }
        });
        let answers = futures_util::future::join_all(reads).await;
        let mut services = Vec::new();
        for (index, (base, answer)) in answers.into_iter().enumerate() {
            let known = console
                .names
                .read()
                .expect("names lock")
                .iter()
                .find(|(_, url)| **url == base)
                .map(|(name, _)| name.clone());
            let (name, report, error) = match answer {
                Ok(report) => {
                    let name = report["service"]
                        .as_str()
                        .map(str::to_owned)
                        .or(known)
                        .unwrap_or_else(|| format!("service {}", index + 1));
                    console
                        .names
                        .write()
                        .expect("names lock")
                        .insert(name.clone(), base.clone());
                    (name, Some(report), None)
                }
                Err(error) => (
                    known.unwrap_or_else(|| format!("service {}", index + 1)),
                    None,
                    Some(format!("{error:#}")),
                ),
            };
            services.push(ServiceView {
                held: held.contains(&name),
                name,
                url: base.to_string(),
                up: report.is_some(),
                report,
                error,
            });
        }
        let snapshot = Snapshot {
            at_millis: (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64,
            services,
            controls: console.controls.is_some(),
        };
        if let Ok(text) = serde_json::to_string(&snapshot) {
            publish.send_replace(Arc::new(text));
        }
    }
}

/// `GET /api/stream`: the current snapshot, then each new one.
async fn stream(
    State(console): State<Console>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let mut snapshots = console.snapshots.clone();
    snapshots.mark_changed();
    let events = futures_util::stream::unfold(snapshots, |mut snapshots| async move {
        snapshots.changed().await.ok()?;
        let text = snapshots.borrow_and_update().clone();
        Some((
            Ok(Event::default().event("snapshot").data(text.as_str())),
            snapshots,
        ))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

fn base_of(console: &Console, service: &str) -> Result<url::Url, Problem> {
    console
        .names
        .read()
        .expect("names lock")
        .get(service)
        .cloned()
        .ok_or_else(|| Problem::not_found(format!("no service {service} is watched")))
}

/// Relays `response` as it is (status, content type, body).
async fn relay(response: reqwest::Response) -> Response {
    let status = StatusCode::from_u16(response.status().as_u16())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let body = response.bytes().await.unwrap_or_default();
    (status, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn unreachable_service(service: &str, error: &reqwest::Error) -> Response {
    tracing::warn!(service, %error, "console: a service did not answer");
    Problem::new(
        StatusCode::BAD_GATEWAY,
        "service-unreachable",
        format!("the {service} service did not answer"),
    )
    .into_response()
}

/// `/api/admin/{service}/{rest}`: the service's `/admin/{rest}`, with the
/// caller's `Authorization` header and body passed on.
async fn admin(
    State(console): State<Console>,
    Path((service, rest)): Path<(String, String)>,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let credential = match console.sessions.credential(&method, &headers) {
        Ok(credential) => credential,
        Err(refused) => return refused.into_response(),
    };
    let base = match base_of(&console, &service) {
        Ok(base) => base,
        Err(problem) => return problem.into_response(),
    };
    let Ok(mut target) = base.join(&format!("admin/{rest}")) else {
        return Problem::invalid("path", "not an admin path").into_response();
    };
    target.set_query(uri.query());
    let Ok(method) = reqwest::Method::from_bytes(method.as_str().as_bytes()) else {
        return Problem::invalid("method", "not an HTTP method").into_response();
    };
    let mut request = console
        .http
        .request(method, target)
        .header(header::AUTHORIZATION.as_str(), credential.bearer());
    if let Some(value) = headers.get(header::CONTENT_TYPE) {
        request = request.header(header::CONTENT_TYPE.as_str(), value.as_bytes());
    }
    match request.body(body).send().await {
        Ok(response) => relay(response).await,
        Err(error) => unreachable_service(&service, &error),
    }
}

/// `POST /api/services/{service}/{stop|kill|start}` (tandem up only).
async fn control(
    State(console): State<Console>,
    Path((service, action)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let Some(controls) = &console.controls else {
        return Problem::not_found("this console controls no services (it is not tandem up's)")
            .into_response();
    };
    let credential = match console.sessions.credential(&method, &headers) {
        Ok(credential) => credential,
        Err(refused) => return refused.into_response(),
    };
    let Some(who) = controls.tokens.name_of(&credential.secret) else {
        return tandem_service::admin::unauthorized("the admin token is not valid");
    };
    let action = match action.as_str() {
        "stop" => Action::Stop,
        "kill" => Action::Kill,
        "start" => Action::Start,
        _ => {
            return Problem::invalid("action", "must be stop, kill or start")
                .with_field("action")
                .into_response()
        }
    };
    tracing::info!(%who, %service, ?action, "console: service control");
    let (reply, answer) = oneshot::channel();
    let asked = controls
        .sender
        .send(Control {
            service: service.clone(),
            action,
            who: who.clone(),
            reply,
        })
        .await;
    if asked.is_err() {
        return Problem::unavailable("the supervisor is stopping").into_response();
    }
    match answer.await {
        Ok(Ok(())) => StatusCode::ACCEPTED.into_response(),
        Ok(Err(message)) => Problem::conflict(message).into_response(),
        Err(_) => Problem::unavailable("the supervisor is stopping").into_response(),
    }
}

/// `GET /api/session`: whether this browser is logged in, as whom, and
/// its CSRF token.
async fn session_view(State(console): State<Console>, headers: HeaderMap) -> Response {
    axum::Json(console.sessions.view(&headers)).into_response()
}

/// The login form's body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    token: String,
}

/// `POST /api/session` with `{"token": ...}`: checks the admin token
/// (under `tandem up` against its own; otherwise by asking the services
/// which accept it) and opens a session.
async fn log_in(
    State(console): State<Console>,
    headers: HeaderMap,
    tandem_service::StrictJson(login): tandem_service::StrictJson<Login>,
) -> Response {
    if !session::same_origin(&headers) {
        return Problem::new(
            StatusCode::FORBIDDEN,
            "csrf",
            "a login from another site's page is refused",
        )
        .with_field("origin")
        .into_response();
    }
    let secret = login.token.trim().to_owned();
    let who = match &console.controls {
        Some(controls) => controls.tokens.name_of(&secret),
        None => accepted_by_a_service(&console, &secret).await,
    };
    let Some(who) = who else {
        tracing::warn!("console: a login with a wrong admin token was refused");
        return tandem_service::admin::unauthorized("the admin token is not valid").into_response();
    };
    tracing::info!(%who, "console: logged in");
    let (cookie, view) = console.sessions.open(secret, who);
    ([(header::SET_COOKIE, cookie)], axum::Json(view)).into_response()
}

/// The name an operator goes by when a service, not this console, accepted
/// the token: the first service that answers its audit listing with it.
async fn accepted_by_a_service(console: &Console, secret: &str) -> Option<String> {
    for watched in console.services.iter() {
        let Ok(url) = watched.base.join("admin/audit?limit=1") else {
            continue;
        };
        let answer = console
            .http
            .get(url)
            .bearer_auth(secret)
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if answer.is_ok_and(|response| response.status().is_success()) {
            return Some("operator".to_owned());
        }
    }
    None
}

/// `DELETE /api/session`: logs out.
async fn log_out(State(console): State<Console>, method: Method, headers: HeaderMap) -> Response {
    match console.sessions.close(&method, &headers) {
        Ok(cookie) => (StatusCode::NO_CONTENT, [(header::SET_COOKIE, cookie)]).into_response(),
        Err(refused) => refused.into_response(),
    }
}

/// `POST /api/orders`: the Order Service's public `POST /orders`.
async fn place_order(State(console): State<Console>, body: Bytes) -> Response {
    let base = match base_of(&console, "order") {
        Ok(base) => base,
        Err(problem) => return problem.into_response(),
    };
    let request = console
        .http
        .post(base.join("orders").expect("a relative path"))
        .header("content-type", "application/json")
        .body(body);
    match request.send().await {
        Ok(response) => relay(response).await,
        Err(error) => unreachable_service("order", &error),
    }
}

/// `GET /api/orders/{id}`: the Order Service's public `GET /orders/{id}`.
async fn get_order(State(console): State<Console>, Path(id): Path<String>) -> Response {
    let base = match base_of(&console, "order") {
        Ok(base) => base,
        Err(problem) => return problem.into_response(),
    };
    let id: String = url::form_urlencoded::byte_serialize(id.as_bytes()).collect();
    match console
        .http
        .get(base.join(&format!("orders/{id}")).expect("a relative path"))
        .send()
        .await
    {
        Ok(response) => relay(response).await,
        Err(error) => unreachable_service("order", &error),
    }
}

/// `tandem console --url URL ...`: the console against services deployed
/// anywhere.
#[derive(Debug, clap::Args)]
pub struct ConsoleArgs {
    /// A service's base URL (repeat for each), e.g. http://10.0.0.5:8083
    #[arg(long = "url", required = true)]
    urls: Vec<String>,
    /// Where the console listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
}

pub async fn run(args: ConsoleArgs) -> anyhow::Result<()> {
    let services = args
        .urls
        .iter()
        .map(|url| watched(url))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    println!("console on http://{address}");
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        on_signal.cancel();
    });
    serve(listener, services, None, stop).await
}

/// A service to watch at `url` (a trailing slash is added so that paths
/// join below it).
pub fn watched(url: &str) -> anyhow::Result<Watched> {
    let mut base = url::Url::parse(url).with_context(|| format!("{url} is not a URL"))?;
    if !matches!(base.scheme(), "http" | "https") {
        anyhow::bail!("{url}: a service URL is http:// or https://");
    }
    if !base.path().ends_with('/') {
        let path = format!("{}/", base.path());
        base.set_path(&path);
    }
    Ok(Watched { base })
}
