//! The limits of `tandem_service::serve_with`, driven over raw TCP sockets:
//! a client that stalls in any phase of a request loses its connection
//! once that phase's timeout is up (and not before), connections beyond
//! the cap wait, and shutdown returns by its deadline even while a request
//! is held.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;
use tandem_service::{serve_with, ServeConfig, StrictJson};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest wait for anything that must happen; every timeout under test
/// is a small fraction of it.
const DEADLINE: Duration = Duration::from_secs(5);
/// A timeout under test.
const SHORT: Duration = Duration::from_millis(300);
/// A timeout that must not be what ends a test.
const LONG: Duration = Duration::from_secs(60);

/// Limits where nothing fires within a test unless the test sets it.
fn patient() -> ServeConfig {
    ServeConfig {
        header_read_timeout: LONG,
        body_read_timeout: LONG,
        request_timeout: LONG,
        idle_timeout: LONG,
        max_connections: 1024,
        shutdown_deadline: LONG,
    }
}

/// What the test routes tell the test.
struct Probes {
    /// A `/held` handler started.
    held: mpsc::UnboundedReceiver<()>,
    /// Releases the `/held` handlers.
    release: Arc<Notify>,
    /// An endless `/endless` response body was dropped by the server.
    dropped: mpsc::UnboundedReceiver<()>,
}

struct Server {
    address: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
    probes: Probes,
}

/// Serves the test routes with `config` on a free port.
async fn start(config: ServeConfig) -> Server {
    let (held_tx, held) = mpsc::unbounded_channel();
    let (dropped_tx, dropped) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let released = Arc::clone(&release);
    let router = Router::new()
        .route("/fast", get(|| async { "ok" }))
        .route(
            "/held",
            get(move || {
                let held_tx = held_tx.clone();
                let released = Arc::clone(&released);
                async move {
                    let notified = released.notified();
                    let _ = held_tx.send(());
                    notified.await;
                    "released"
                }
            }),
        )
        .route(
            "/echo",
            post(|StrictJson(body): StrictJson<Value>| async move { axum::Json(body) }),
        )
        .route(
            "/endless",
            get(move || {
                let guard = DropSignal(dropped_tx.clone());
                async move { axum::body::Body::from_stream(endless(guard)) }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve_with(listener, router, config, shutdown.clone()));
    Server {
        address,
        shutdown,
        task,
        probes: Probes {
            held,
            release,
            dropped,
        },
    }
}

/// Sends on its channel when dropped.
struct DropSignal(mpsc::UnboundedSender<()>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// A body that never ends, holding `guard` while it lives.
fn endless(
    guard: DropSignal,
) -> impl futures_util::Stream<Item = Result<axum::body::Bytes, std::io::Error>> {
    let chunk = axum::body::Bytes::from(vec![b'x'; 64 * 1024]);
    futures_util::stream::repeat_with(move || {
        let _ = &guard;
        Ok(chunk.clone())
    })
}

/// How a connection ended while the test watched it.
#[derive(Debug)]
enum Ending {
    /// The server closed it (EOF or reset) at this instant, after sending
    /// these bytes.
    Closed(Instant, Vec<u8>),
    /// Still open at the deadline, after sending these bytes.
    Open(Vec<u8>),
}

/// Reads from `stream` until the server closes it or `deadline` passes.
async fn watch_until_closed(stream: &mut TcpStream, deadline: Instant) -> Ending {
    let mut received = Vec::new();
    let mut buffer = [0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => return Ending::Open(received),
            Ok(Ok(0)) | Ok(Err(_)) => return Ending::Closed(Instant::now(), received),
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
        }
    }
}

/// One HTTP/1.1 response read off a raw socket.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl RawResponse {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// Reads one response (with a `content-length`) from `stream`, or `None`
/// if none is complete by `deadline` or the connection closed first.
async fn read_response(stream: &mut TcpStream, deadline: Instant) -> Option<RawResponse> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        if let Some(end) = received.windows(4).position(|window| window == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).into_owned();
            let status = head.split(' ').nth(1)?.parse().ok()?;
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            if received.len() >= end + 4 + length {
                let body = received[end + 4..end + 4 + length].to_vec();
                return Some(RawResponse { status, head, body });
            }
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => received.extend_from_slice(&buffer[..n]),
            _ => return None,
        }
    }
}

async fn connect(server: &Server) -> TcpStream {
    TcpStream::connect(server.address).await.unwrap()
}

async fn get_fast(stream: &mut TcpStream) -> RawResponse {
    stream
        .write_all(b"GET /fast HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let response = read_response(stream, Instant::now() + DEADLINE)
        .await
        .expect("a response to GET /fast");
    assert_eq!(response.status, 200, "GET /fast: {}", response.head);
    response
}

/// Asserts the connection was closed, not before `timeout` after `start`;
/// whatever the server sent before closing must be a 408.
fn assert_closed_after(ending: Ending, start: Instant, timeout: Duration, what: &str) {
    match ending {
        Ending::Open(received) => panic!(
            "{what}: the connection is still open after {DEADLINE:?} (the server sent {:?})",
            String::from_utf8_lossy(&received)
        ),
        Ending::Closed(at, received) => {
            let elapsed = at - start;
            assert!(
                elapsed >= timeout,
                "{what}: closed after {elapsed:?}, before the {timeout:?} timeout"
            );
            assert!(
                received.is_empty() || received.starts_with(b"HTTP/1.1 408"),
                "{what}: the server sent {:?}",
                String::from_utf8_lossy(&received)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_request_head_is_cut_at_the_header_read_timeout() {
    let server = start(ServeConfig {
        header_read_timeout: SHORT,
        ..patient()
    })
    .await;

    let start = Instant::now();
    let mut partial = connect(&server).await;
    partial
        .write_all(b"GET /fast HTTP/1.1\r\nhost: te")
        .await
        .unwrap();
    let ending = watch_until_closed(&mut partial, start + DEADLINE).await;
    assert_closed_after(ending, start, SHORT, "a half-sent request head");

    // A connection that never sends a byte is cut the same way.
    let start = Instant::now();
    let mut silent = connect(&server).await;
    let ending = watch_until_closed(&mut silent, start + DEADLINE).await;
    assert_closed_after(ending, start, SHORT, "a connection that sends nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed() {
    // On HTTP/1.1 the wait for the next request on a kept-alive connection
    // is a wait for a request head: the header-read timeout bounds it.
    let server = start(ServeConfig {
        header_read_timeout: SHORT,
        ..patient()
    })
    .await;
    let mut stream = connect(&server).await;
    let start = Instant::now();
    let response = get_fast(&mut stream).await;
    assert!(
        !response
            .head
            .to_ascii_lowercase()
            .contains("connection: close"),
        "the first response keeps the connection alive: {}",
        response.head
    );
    let ending = watch_until_closed(&mut stream, start + DEADLINE).await;
    assert_closed_after(ending, start, SHORT, "an idle kept-alive connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_loses_its_connection_at_the_idle_timeout() {
    let mut server = start(ServeConfig {
        idle_timeout: SHORT,
        ..patient()
    })
    .await;
    let mut stream = connect(&server).await;
    let start = Instant::now();
    stream
        .write_all(b"GET /endless HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    // The client never reads: the server's writes stall once the socket
    // buffers are full, and nothing moves on the connection any more.
    let dropped = tokio::time::timeout_at(start + DEADLINE, server.probes.dropped.recv()).await;
    let elapsed = start.elapsed();
    assert!(
        matches!(dropped, Ok(Some(()))),
        "the server still holds the response to a client that stopped reading after {DEADLINE:?}"
    );
    assert!(
        elapsed >= SHORT,
        "the stalled connection was dropped after {elapsed:?}, before the {SHORT:?} idle timeout"
    );
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_is_cut_with_a_408_naming_the_body() {
    let server = start(ServeConfig {
        body_read_timeout: SHORT,
        ..patient()
    })
    .await;
    let mut stream = connect(&server).await;
    let start = Instant::now();
    stream
        .write_all(
            b"POST /echo HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
              content-length: 100\r\n\r\n{\"a\":",
        )
        .await
        .unwrap();
    let response = read_response(&mut stream, start + DEADLINE).await;
    let elapsed = start.elapsed();
    let response = response.unwrap_or_else(|| {
        panic!("no response to a body that stalled, after {DEADLINE:?}");
    });
    assert_eq!(
        response.status,
        408,
        "{} {:?}",
        response.head,
        response.json()
    );
    assert!(
        response
            .head
            .to_ascii_lowercase()
            .contains("content-type: application/problem+json"),
        "{}",
        response.head
    );
    assert_eq!(response.json()["field"], "body", "{}", response.json());
    assert!(
        elapsed >= SHORT,
        "answered after {elapsed:?}, before the {SHORT:?} body-read timeout"
    );
    let ending = watch_until_closed(&mut stream, start + DEADLINE).await;
    assert!(
        matches!(ending, Ending::Closed(..)),
        "the connection of the cut body stays open: {ending:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_takes_too_long_gets_a_503_problem() {
    let mut server = start(ServeConfig {
        request_timeout: SHORT,
        ..patient()
    })
    .await;
    let mut stream = connect(&server).await;
    let start = Instant::now();
    stream
        .write_all(b"GET /held HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let response = read_response(&mut stream, start + DEADLINE).await;
    let elapsed = start.elapsed();
    assert!(
        server.probes.held.try_recv().is_ok(),
        "the handler never started"
    );
    let response = response.unwrap_or_else(|| {
        panic!("no response from a handler held past the request timeout, after {DEADLINE:?}")
    });
    assert_eq!(
        response.status,
        503,
        "{} {:?}",
        response.head,
        response.json()
    );
    assert!(
        response
            .head
            .to_ascii_lowercase()
            .contains("content-type: application/problem+json"),
        "{}",
        response.head
    );
    assert!(
        response.json()["type"]
            .as_str()
            .is_some_and(|kind| kind.ends_with("/timeout")),
        "{}",
        response.json()
    );
    assert!(
        elapsed >= SHORT,
        "answered after {elapsed:?}, before the {SHORT:?} request timeout"
    );
    // The connection stays usable.
    get_fast(&mut stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    let server = start(ServeConfig {
        max_connections: 2,
        ..patient()
    })
    .await;
    let mut first = connect(&server).await;
    get_fast(&mut first).await;
    let mut second = connect(&server).await;
    get_fast(&mut second).await;

    // The third connects (the kernel queues it) but is not served while
    // the two are held.
    let mut third = connect(&server).await;
    third
        .write_all(b"GET /fast HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let early = read_response(&mut third, Instant::now() + Duration::from_millis(500)).await;
    assert!(
        early.is_none(),
        "a third connection was served while the cap of two was held: {early:?}"
    );

    drop(first);
    let response = read_response(&mut third, Instant::now() + DEADLINE)
        .await
        .expect("the waiting connection is served once a held one closes");
    assert_eq!(response.status, 200, "{}", response.head);
    get_fast(&mut second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_returns_by_its_deadline_while_a_request_is_held() {
    let deadline = Duration::from_millis(500);
    let mut server = start(ServeConfig {
        shutdown_deadline: deadline,
        ..patient()
    })
    .await;
    let mut held = connect(&server).await;
    held.write_all(b"GET /held HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(DEADLINE, server.probes.held.recv())
        .await
        .expect("the held handler starts")
        .unwrap();
    // A connection that has not finished its head is held too.
    let mut partial = connect(&server).await;
    partial.write_all(b"GET /fast HTT").await.unwrap();

    let start = Instant::now();
    server.shutdown.cancel();
    let stopped = tokio::time::timeout_at(start + DEADLINE, &mut server.task).await;
    let elapsed = start.elapsed();
    let outcome = stopped.unwrap_or_else(|_| {
        panic!("serve still running {DEADLINE:?} after shutdown, with a request held")
    });
    outcome.unwrap().expect("serve returns Ok");
    assert!(
        elapsed >= deadline,
        "serve returned after {elapsed:?}, before the {deadline:?} deadline, with a request in flight"
    );
    for (stream, what) in [(&mut held, "held request"), (&mut partial, "partial head")] {
        let ending = watch_until_closed(stream, Instant::now() + DEADLINE).await;
        assert!(
            matches!(ending, Ending::Closed(..)),
            "the {what}'s connection is still open after shutdown: {ending:?}"
        );
    }
    // And the listener is gone.
    assert!(
        TcpStream::connect(server.address).await.is_err(),
        "the listener still accepts after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_in_flight_request_finish() {
    let mut server = start(ServeConfig {
        shutdown_deadline: DEADLINE,
        ..patient()
    })
    .await;
    let mut idle = connect(&server).await;
    get_fast(&mut idle).await;
    let mut stream = connect(&server).await;
    stream
        .write_all(b"GET /held HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(DEADLINE, server.probes.held.recv())
        .await
        .expect("the held handler starts")
        .unwrap();

    server.shutdown.cancel();
    // The idle connection is closed at once; the busy one is not.
    let ending = watch_until_closed(&mut idle, Instant::now() + DEADLINE).await;
    assert!(
        matches!(ending, Ending::Closed(..)),
        "an idle connection stays open after shutdown: {ending:?}"
    );
    assert!(
        !server.task.is_finished(),
        "serve returned with a request in flight"
    );
    server.probes.release.notify_waiters();
    let response = read_response(&mut stream, Instant::now() + DEADLINE)
        .await
        .expect("the in-flight request is answered during shutdown");
    assert_eq!(response.status, 200, "{}", response.head);
    assert_eq!(response.body, b"released");
    tokio::time::timeout(DEADLINE, &mut server.task)
        .await
        .expect("serve returns once the in-flight request is done")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_at_once_connections_that_never_started_a_request() {
    let mut server = start(patient()).await;
    let mut silent = connect(&server).await;
    let mut partial = connect(&server).await;
    partial.write_all(b"GET /fast HTT").await.unwrap();
    // Both are being served (not waiting in the listen queue).
    let mut served = connect(&server).await;
    get_fast(&mut served).await;

    let start = Instant::now();
    server.shutdown.cancel();
    let stopped = tokio::time::timeout_at(start + DEADLINE, &mut server.task).await;
    assert!(
        stopped.is_ok(),
        "serve still running {DEADLINE:?} after shutdown, held by connections that never \
         started a request (its deadline is {LONG:?})"
    );
    for (stream, what) in [(&mut silent, "silent"), (&mut partial, "half-sent head")] {
        let ending = watch_until_closed(stream, Instant::now() + DEADLINE).await;
        assert!(
            matches!(ending, Ending::Closed(..)),
            "the {what} connection is still open after shutdown: {ending:?}"
        );
    }
}
