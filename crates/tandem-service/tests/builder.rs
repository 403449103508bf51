//! A [`Service`] runs its parts together against real ones: a SQLite store,
//! the embedded log, a relay, a consumer and the HTTP server on a real
//! socket. Its tables are installed first, the parts stop together, and an
//! error names the part at fault and keeps its cause.

use std::error::Error;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem::consumer::{ConsumerConfig, ConsumerError};
use tandem::sqlite::SqliteStore;
use tandem::Store;
use tandem::{Bus, StoreError};
use tandem_service::{probes, Service, ServiceError};
use tandem_testkit::{deposit, eventually, install_ledger, open_log, Ledger, TOPIC};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A store with only the toolkit's tables, the bus, and a listener.
async fn parts() -> (
    tempfile::TempDir,
    SqliteStore,
    Arc<dyn Bus>,
    TcpListener,
    SocketAddr,
) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("ledger.db"), Default::default())
        .await
        .unwrap();
    let bus: Arc<dyn Bus> = Arc::new(open_log(&dir.path().join("bus.db")).await);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    (dir, store, bus, listener, address)
}

/// `GET path` over a fresh connection: the status line and the body.
async fn get(address: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// The ledger's balances by account, or the store's error.
async fn balances(store: &SqliteStore) -> Result<Vec<(String, i64)>, StoreError> {
    store
        .read(|tx| {
            tx.query(
                "SELECT account_id, balance_cents FROM ledger ORDER BY account_id",
                &[],
            )?
            .into_iter()
            .map(|row| Ok((row.text(0)?.to_owned(), row.i64(1)?)))
            .collect()
        })
        .await
}

/// The error a service on `address` stops with by itself, without a
/// shutdown; nothing listens on `address` any more.
async fn failure(
    address: SocketAddr,
    service: impl Future<Output = Result<(), ServiceError>>,
) -> ServiceError {
    let error = tokio::time::timeout(STOP, service)
        .await
        .expect("the service stops by itself")
        .expect_err("the service stops with an error");
    assert_not_listening(address, "the HTTP server outlived the error").await;
    error
}

/// Fails with `why` if something still accepts connections on `address`.
async fn assert_not_listening(address: SocketAddr, why: &str) {
    assert!(TcpStream::connect(address).await.is_err(), "{why}");
}

/// How long a service may take to stop once told (or once a part failed).
const STOP: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_then_relays_consumes_and_serves_until_shutdown() {
    let (_dir, store, bus, listener, address) = parts().await;
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(
        Service::new("ledger", store.clone(), bus)
            .install(install_ledger)
            .relay(TOPIC)
            .consumer(
                "balances",
                ConsumerConfig::new("ledger-balances", &[TOPIC]),
                Ledger::new(),
            )
            .http(|store| probes::for_store(store, "ledger database"))
            .run(listener, shutdown.clone()),
    );

    // The consumer's table exists only if `install` ran; the deposit
    // reaches it only through the relay and the bus.
    deposit(&store, vec![("alice".into(), 5), ("bob".into(), 7)]).await;
    eventually("both deposits applied", Duration::from_secs(20), || {
        let store = store.clone();
        async move {
            // Until the service installed the ledger, the table is missing.
            balances(&store).await.ok() == Some(vec![("alice".into(), 5), ("bob".into(), 7)])
        }
    })
    .await;

    let ready = get(address, "/ready").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(ready.contains(r#""status":"ready""#), "{ready}");
    let unknown = get(address, "/no-such-route").await;
    assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");
    assert!(unknown.contains("application/problem+json"), "{unknown}");

    shutdown.cancel();
    let outcome = tokio::time::timeout(STOP, service)
        .await
        .expect("the service stops once shutdown fires")
        .unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_not_listening(address, "the listener outlived the shutdown").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_install_stops_the_start_and_keeps_its_cause() {
    let (_dir, store, bus, listener, address) = parts().await;
    let error = failure(
        address,
        Service::new("ledger", store, bus)
            .install(|tx| tx.execute_batch("CREATE TABLE broken ("))
            .relay(TOPIC)
            .run(listener, CancellationToken::new()),
    )
    .await;
    assert!(
        matches!(
            error,
            ServiceError::Setup {
                service: "ledger",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .starts_with("cannot set up the ledger database: "),
        "{error}"
    );
    let cause = error.source().expect("the store's error is the source");
    assert!(cause.downcast_ref::<StoreError>().is_some(), "{cause:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_part_stops_the_others_and_is_named() {
    let (_dir, store, bus, listener, address) = parts().await;
    let shutdown = CancellationToken::new();
    // A consumer of no topic is refused by the bus: its run ends in error.
    let error = failure(
        address,
        Service::new("ledger", store, bus)
            .install(install_ledger)
            .relay(TOPIC)
            .consumer("broken", ConsumerConfig::new("broken", &[]), Ledger::new())
            .run(listener, shutdown.clone()),
    )
    .await;
    assert!(
        matches!(error, ServiceError::Part { part: "broken", .. }),
        "{error:?}"
    );
    assert!(error.to_string().starts_with("broken: "), "{error}");
    assert!(error.to_string().contains("names no topic"), "{error}");
    let cause = error.source().expect("the consumer's error is the source");
    assert!(
        matches!(
            cause.downcast_ref::<ConsumerError>(),
            Some(ConsumerError::Bus(_))
        ),
        "{cause:?}"
    );
    assert!(
        shutdown.is_cancelled(),
        "the other parts were not told to stop"
    );
}
