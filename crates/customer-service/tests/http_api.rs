//! The Customer Service's HTTP API on a real SQLite file, through the
//! router: create, read, page, change, and bad input that changes nothing.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use customer_service::app::Customers;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tandem::sqlite::{SqliteOptions, SqliteStore};
use tandem::store::{Store, StoreError};
use tower::ServiceExt;

async fn service() -> (tempfile::TempDir, SqliteStore, axum::Router) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("customer.db"), SqliteOptions::default())
        .await
        .unwrap();
    store
        .write(customer_service::storage::install)
        .await
        .unwrap();
    let router = customer_service::http::router(Customers::new(store.clone()));
    (dir, store, router)
}

async fn call(
    router: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<&str>,
) -> (StatusCode, String, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(Body::from(body.unwrap_or("").to_owned()))
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|value| value.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        content_type,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Every customer row and every outbox row, to prove a refusal changed nothing.
async fn snapshot(store: &SqliteStore) -> (Vec<String>, i64) {
    store
        .read(|tx| -> Result<_, StoreError> {
            let customers = tx
                .query("SELECT customer_id || name || email || address || credit_limit_cents || version FROM customers ORDER BY 1", &[])?
                .iter()
                .map(|row| row.text(0).map(str::to_owned))
                .collect::<Result<Vec<_>, _>>()?;
            let events = tx.query_opt("SELECT COUNT(*) FROM tandem_outbox", &[])?.unwrap().i64(0)?;
            Ok((customers, events))
        })
        .await
        .unwrap()
}

/// method, path, body, expected status, field named by the problem.
type Case<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    StatusCode,
    Option<&'a str>,
);

const ADA: &str = r#"{"customerId":"1234","name":"Ada","email":"ada@example.com","address":"1 Old Road","creditLimitCents":1000}"#;

#[tokio::test]
async fn create_change_read_and_page() {
    let (_dir, store, router) = service().await;
    let (status, _, created) = call(&router, "POST", "/customers", Some(ADA)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        (created["customerId"].as_str(), created["version"].as_i64()),
        (Some("1234"), Some(1))
    );
    let (status, _, changed) = call(
        &router,
        "PATCH",
        "/customers/1234",
        Some(r#"{"address":"123 New Road"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (changed["address"].as_str(), changed["version"].as_i64()),
        (Some("123 New Road"), Some(2))
    );
    // A change to the same value publishes nothing and keeps the version.
    let (_, _, same) = call(
        &router,
        "PATCH",
        "/customers/1234",
        Some(r#"{"address":"123 New Road"}"#),
    )
    .await;
    assert_eq!(same["version"].as_i64(), Some(2));
    assert_eq!(
        snapshot(&store).await.1,
        2,
        "CustomerCreated and one CustomerUpdated"
    );
    let (status, _, generated) = call(
        &router,
        "POST",
        "/customers",
        Some(r#"{"name":"Grace","email":"grace@example.com","address":"2 Road","creditLimitCents":0}"#),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        generated["customerId"].as_str().unwrap().len(),
        36,
        "a UUID is generated"
    );
    let (_, _, page) = call(&router, "GET", "/customers?limit=1", None).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let after = page["nextAfter"].as_str().unwrap().to_owned();
    let (_, _, rest) = call(
        &router,
        "GET",
        &format!("/customers?limit=1&after={after}"),
        None,
    )
    .await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);
    assert_ne!(
        rest["items"][0]["customerId"],
        page["items"][0]["customerId"]
    );
}

#[tokio::test]
async fn bad_input_gets_a_problem_naming_the_field_and_changes_nothing() {
    let (_dir, store, router) = service().await;
    call(&router, "POST", "/customers", Some(ADA)).await;
    let before = snapshot(&store).await;
    let huge = json!({"name": "x".repeat(70_000)}).to_string();
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/customers",
            Some("{not json"),
            StatusCode::BAD_REQUEST,
            Some("body"),
        ),
        (
            "POST",
            "/customers",
            Some(r#"{"name":"A","email":"a@b.co","address":"x","creditLimitCents":"ten"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("creditLimitCents"),
        ),
        (
            "POST",
            "/customers",
            Some(r#"{"name":"A","email":"nope","address":"x","creditLimitCents":1}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("email"),
        ),
        (
            "POST",
            "/customers",
            Some(r#"{"name":" ","email":"a@b.co","address":"x","creditLimitCents":1}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("name"),
        ),
        (
            "POST",
            "/customers",
            Some(r#"{"name":"A","email":"a@b.co","address":"x","creditLimitCents":-1}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("creditLimitCents"),
        ),
        (
            "POST",
            "/customers",
            Some(r#"{"name":"A","email":"a@b.co","address":"x"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("creditLimitCents"),
        ),
        (
            "POST",
            "/customers",
            Some(r#"{"name":"A","email":"a@b.co","address":"x","creditLimitCents":1,"vip":true}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("vip"),
        ),
        ("POST", "/customers", Some(ADA), StatusCode::CONFLICT, None),
        (
            "PATCH",
            "/customers/1234",
            Some(r#"{"address":7}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("address"),
        ),
        (
            "PATCH",
            "/customers/1234",
            Some(&huge),
            StatusCode::PAYLOAD_TOO_LARGE,
            Some("body"),
        ),
        (
            "PATCH",
            "/customers/nobody",
            Some(r#"{"address":"x"}"#),
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            "GET",
            "/customers/nobody",
            None,
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            "GET",
            "/customers?limit=0",
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("limit"),
        ),
        (
            "GET",
            "/customers?limit=many",
            None,
            StatusCode::BAD_REQUEST,
            Some("query"),
        ),
    ];
    for (method, uri, body, expected, field) in cases {
        let (status, content_type, problem) = call(&router, method, uri, body).await;
        let case = format!(
            "{method} {uri} {}",
            body.map(|body| &body[..body.len().min(60)]).unwrap_or("")
        );
        assert_eq!(status, expected, "{case}: {problem}");
        assert_eq!(content_type, "application/problem+json", "{case}");
        assert_eq!(
            problem["status"].as_u64(),
            Some(u64::from(expected.as_u16())),
            "{case}"
        );
        if let Some(field) = field {
            assert_eq!(problem["field"].as_str(), Some(field), "{case}: {problem}");
        }
        assert_eq!(snapshot(&store).await, before, "{case} changed something");
    }
    // Without a JSON content type the body is refused before it is read.
    let request = Request::builder()
        .method("POST")
        .uri("/customers")
        .body(Body::from(ADA))
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test]
async fn openapi_and_probes() {
    let (_dir, _store, router) = service().await;
    let (status, _, document) = call(&router, "GET", "/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    for path in ["/customers", "/customers/{id}"] {
        assert!(
            document["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert_eq!(
        call(&router, "GET", "/health", None).await.0,
        StatusCode::OK
    );
    assert_eq!(call(&router, "GET", "/ready", None).await.0, StatusCode::OK);
}
