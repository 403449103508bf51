//! `/ready` of a service whose database is gone answers 503 with a generic
//! reason: the store's own error (which names the host, port and
//! database) stays in the server's log. A real PostgreSQL database is
//! dropped under a real store.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

async fn ready(router: &axum::Router) -> (StatusCode, String) {
    let response = router
        .clone()
        .oneshot(Request::get("/ready").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn ready_names_no_host_nor_database_when_the_store_fails() {
    let scratch = tandem_postgres::testing::ScratchDatabase::create(
        &tandem_postgres::testing::base_url(),
        "ready",
    )
    .await
    .unwrap();
    let name = scratch.name().to_owned();
    let store = scratch.store().await.unwrap();
    let router = tandem_service::probes::for_store(store, "order database");
    assert_eq!(ready(&router).await.0, StatusCode::OK);

    // The database goes away under the store (its connections are closed
    // by the server); the store then fails to connect again.
    drop(scratch);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut failures = 0;
    while failures < 3 {
        assert!(
            Instant::now() < deadline,
            "/ready did not fail 3 times within 20 s after the database was dropped"
        );
        let (status, body) = ready(&router).await;
        if status == StatusCode::OK {
            tokio::task::yield_now().await;
            continue;
        }
        failures += 1;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        for detail in [name.as_str(), "127.0.0.1", "5432", "PostgreSQL"] {
            assert!(!body.contains(detail), "/ready shows {detail:?}: {body}");
        }
        let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(problem["detail"], "the order database is unavailable");
    }
}
