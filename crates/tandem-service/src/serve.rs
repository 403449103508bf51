//! Serving a router over HTTP/1.1 with a bound on every phase of a
//! connection, so that no client can hold a connection (a file
//! descriptor, a slot, the shutdown) for longer than a configured time.
//!
//! | phase | bounded by |
//! |---|---|
//! | waiting for a request head: a new connection, a half-sent head, a kept-alive connection between requests | `header_read_timeout` (hyper's timer starts whenever it waits for a head) |
//! | the request body, between two chunks | `body_read_timeout` (the handler gets a 408 problem naming `body`) |
//! | the handler, body included | `request_timeout` (503 problem `timeout`) |
//! | a connection on which no request is running and no byte moves either way, e.g. a client that stopped reading its response | `idle_timeout` (the connection is dropped) |
//! | open connections | `max_connections`: beyond it the server stops accepting, and new connections wait in the kernel's queue until one closes |
//! | draining at shutdown | connections that never started a request are closed at once, idle ones too; requests running get until `shutdown_deadline`, then what is still open is closed |

use std::convert::Infallible;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tower_http::timeout::TimeoutBody;

use crate::{with_defaults, Problem};

/// The limits [`serve_with`] holds every connection to. The defaults suit
/// a service behind a load balancer; tests shorten them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// Longest wait for a complete request head, from when the server
    /// starts waiting for it: on a new connection, and on a kept-alive one
    /// after its previous response (so it also closes idle keep-alives).
    pub header_read_timeout: Duration,
    /// Longest wait for the next chunk of a request body; a body that
    /// stalls gets a 408 problem naming `body`.
    pub body_read_timeout: Duration,
    /// Longest a handler may take, reading the body included; then the
    /// client gets a 503 problem `timeout` (the request may still take
    /// effect: a store write already queued is not undone).
    pub request_timeout: Duration,
    /// A connection with no request running on which no byte has moved in
    /// either direction for this long is dropped (a client that stopped
    /// reading its response).
    pub idle_timeout: Duration,
    /// Most connections served at once; beyond it new connections wait in
    /// the listen queue until one closes.
    pub max_connections: usize,
    /// Longest wait, after shutdown fires, for in-flight requests to
    /// finish; connections still open then are closed.
    pub shutdown_deadline: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            shutdown_deadline: Duration::from_secs(10),
        }
    }
}

/// Serves `router` on `listener` with the default [`ServeConfig`] until
/// `shutdown` fires; see [`serve_with`].
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with(listener, router, ServeConfig::default(), shutdown).await
}

/// Serves `router` (with [`with_defaults`]) on `listener` over HTTP/1.1
/// until `shutdown` fires, holding every connection to `config`. Then it
/// stops accepting, closes idle connections and those that never started
/// a request, lets in-flight requests finish for at most
/// `config.shutdown_deadline`, closes what is left and returns.
pub async fn serve_with(
    listener: TcpListener,
    router: Router,
    config: ServeConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = with_defaults(router);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(_) = connections.join_next() => {}
            (stream, slot) = accept(&listener, &slots) => {
                let activity = Arc::new(Activity::new());
                let service = Handler {
                    app: app.clone(),
                    body_read_timeout: config.body_read_timeout,
                    request_timeout: config.request_timeout,
                    activity: Arc::clone(&activity),
                };
                let io = TokioIo::new(Watched {
                    stream,
                    activity: Arc::clone(&activity),
                });
                let connection = http.serve_connection(io, service);
                connections.spawn(drive(
                    connection,
                    activity,
                    config.idle_timeout,
                    shutdown.clone(),
                    slot,
                ));
            }
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(config.shutdown_deadline, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            deadline = ?config.shutdown_deadline,
            "connections still open at the shutdown deadline; closing them"
        );
        connections.shutdown().await;
    }
    Ok(())
}

/// The next connection, once there is a slot for it.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> (TcpStream, OwnedSemaphorePermit) {
    let slot = Arc::clone(slots)
        .acquire_owned()
        .await
        .expect("the connection semaphore is never closed");
    loop {
        match listener.accept().await {
            Ok((stream, _)) => return (stream, slot),
            // The peer gave up while queued: nothing to serve.
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionRefused
                ) => {}
            // Out of file descriptors, say: the connections being served
            // go on; try again in a moment rather than spin.
            Err(error) => {
                tracing::error!(%error, "cannot accept a connection; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The service of one connection: the app with the body-read and request
/// timeouts, counting the requests running in `activity`.
struct Handler {
    app: Router,
    body_read_timeout: Duration,
    request_timeout: Duration,
    activity: Arc<Activity>,
}

type Connection = hyper::server::conn::http1::Connection<TokioIo<Watched>, Handler>;

impl hyper::service::Service<hyper::Request<Incoming>> for Handler {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        let running = RequestRunning::new(Arc::clone(&self.activity));
        let app = self.app.clone();
        let body_read_timeout = self.body_read_timeout;
        let request_timeout = self.request_timeout;
        Box::pin(async move {
            let request = request
                .map(|body| axum::body::Body::new(TimeoutBody::new(body_read_timeout, body)));
            let response = match tokio::time::timeout(request_timeout, app.oneshot(request)).await {
                Ok(Ok(response)) => response,
                Ok(Err(never)) => match never {},
                Err(_) => {
                    tracing::warn!(timeout = ?request_timeout, "request timed out");
                    Problem::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "timeout",
                        format!(
                            "the service did not answer within {request_timeout:?}; \
                             the request may still take effect"
                        ),
                    )
                    .into_response()
                }
            };
            drop(running);
            Ok(response)
        })
    }
}

/// Runs one connection until it ends, shutdown closes it, or it has been
/// idle for `idle_timeout`; holds its slot until then.
async fn drive(
    connection: Connection,
    activity: Arc<Activity>,
    idle_timeout: Duration,
    shutdown: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let mut connection = pin!(connection);
    let mut closing = false;
    loop {
        let wake = tokio::time::Instant::from_std(activity.idle_deadline(idle_timeout));
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(error) = ended {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            _ = shutdown.cancelled(), if !closing => {
                // A connection that never started a request has no answer
                // to finish (hyper would wait for its first head).
                if !activity.served.load(Ordering::Relaxed) {
                    return;
                }
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(wake) => {
                if activity.idle_for(idle_timeout) {
                    tracing::debug!(timeout = ?idle_timeout, "dropping an idle connection");
                    return;
                }
            }
        }
    }
}

/// What happens on a connection: requests running, and when a request or
/// a byte last moved.
struct Activity {
    origin: Instant,
    /// Nanoseconds from `origin` to the last movement.
    last: AtomicU64,
    running: AtomicUsize,
    /// Whether a request has started on it.
    served: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            last: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            served: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.origin + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }

    /// When the connection will have been idle for `timeout`, if nothing
    /// moves before (a moment `timeout` away while a request runs).
    fn idle_deadline(&self, timeout: Duration) -> Instant {
        if self.running.load(Ordering::Relaxed) > 0 {
            Instant::now() + timeout
        } else {
            self.last() + timeout
        }
    }

    fn idle_for(&self, timeout: Duration) -> bool {
        self.running.load(Ordering::Relaxed) == 0 && self.last().elapsed() >= timeout
    }
}

/// A request in flight on a connection, from its head to its response.
struct RequestRunning(Arc<Activity>);

impl RequestRunning {
    fn new(activity: Arc<Activity>) -> Self {
        activity.running.fetch_add(1, Ordering::Relaxed);
        activity.served.store(true, Ordering::Relaxed);
        activity.touch();
        Self(activity)
    }
}

impl Drop for RequestRunning {
    fn drop(&mut self) {
        self.0.touch();
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A socket that notes in its [`Activity`] each time bytes move.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
