//! The Order Service's HTTP API.
//!
//! Orders naming a customer or product this service has not heard of yet
//! (the eventual-consistency window) are refused at once with 409 and a
//! problem of type `unknown-customer` or `unknown-product`, the field at
//! fault, and `Retry-After: 1`: nothing is stored, and retrying shortly
//! succeeds once the creation event has arrived.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tandem::store::Store;
use tandem_service::openapi::SharedResponses;
use tandem_service::{Problem, StrictJson, StrictQuery};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::app::{AppError, Orders, PlaceOrder};
use crate::storage::{LocalCustomer, StoredOrder};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrderLineRequest {
    /// 1 to 64 letters, digits, '-' or '_'.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$")]
    product_id: String,
    /// 1 to 10^6.
    #[schema(minimum = 1, maximum = 1_000_000)]
    #[serde(deserialize_with = "tandem_service::json_integer::deserialize")]
    quantity: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlaceOrderRequest {
    /// 1 to 64 letters, digits, '-' or '_'.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$")]
    customer_id: String,
    /// 1 to 100 lines.
    #[schema(min_items = 1, max_items = 100)]
    lines: Vec<OrderLineRequest>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderLineView {
    product_id: String,
    quantity: i64,
    unit_price_cents: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderView {
    order_id: String,
    customer_id: String,
    /// PENDING, CONFIRMED, REJECTED or CANCELLED.
    status: String,
    lines: Vec<OrderLineView>,
    total_cents: i64,
    /// Why the order was rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// From the local customer copy, as it is now.
    #[serde(skip_serializing_if = "Option::is_none")]
    customer_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    customer_address: Option<String>,
    created_at: String,
    updated_at: String,
}

impl OrderView {
    fn new(order: StoredOrder, customer: Option<LocalCustomer>) -> Self {
        Self {
            order_id: order.order_id,
            customer_id: order.customer_id,
            status: order.status.as_str().to_owned(),
            lines: order
                .lines
                .into_iter()
                .map(|line| OrderLineView {
                    product_id: line.product_id,
                    quantity: line.quantity,
                    unit_price_cents: line.unit_price_cents,
                })
                .collect(),
            total_cents: order.total_cents,
            reason: order.reason,
            customer_name: customer.as_ref().map(|customer| customer.name.clone()),
            customer_address: customer.map(|customer| customer.address),
            created_at: order.created_at,
            updated_at: order.updated_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderList {
    items: Vec<OrderView>,
}

/// What the Order Service knows of a customer.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalCustomerView {
    customer_id: String,
    name: String,
    email: String,
    address: String,
    credit_limit_cents: i64,
    /// Sequence of the last customer event applied.
    sequence: i64,
    /// When that event happened.
    changed_at: String,
}

/// What the Order Service knows of a product.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalProductView {
    product_id: String,
    sku: String,
    name: String,
    price_cents: i64,
    available: i64,
    reserved: i64,
    sequence: i64,
    changed_at: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrdersQuery {
    /// The customer whose orders to list.
    customer_id: String,
    /// At most this many (1 to 500, default 100).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
}

impl From<AppError> for Problem {
    fn from(error: AppError) -> Self {
        match error {
            // A field that breaks a rule of its own is 422; a valid
            // request the service's current state refuses (a customer or
            // product not heard of yet, the credit limit, an order no
            // longer cancellable) is 409.
            AppError::Invalid(invalid) => Problem::new(
                if invalid.kind == "invalid-field" {
                    StatusCode::UNPROCESSABLE_ENTITY
                } else {
                    StatusCode::CONFLICT
                },
                invalid.kind,
                invalid.message,
            )
            .with_field(invalid.field),
            AppError::NotFound(_) => Problem::not_found(error.to_string()),
            AppError::KeyReused(_) => Problem::new(
                StatusCode::CONFLICT,
                "idempotency-key-reused",
                error.to_string(),
            )
            .with_field("Idempotency-Key"),
            AppError::Concurrent(_) => Problem::conflict(error.to_string()),
            AppError::Store(error) => Problem::from_store(error, "order database"),
        }
    }
}

/// Problems about the eventual-consistency window invite a retry.
fn respond(problem: Problem) -> Response {
    let retry = problem.problem_type.ends_with("/unknown-customer")
        || problem.problem_type.ends_with("/unknown-product");
    let mut response = problem.into_response();
    if retry {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
    }
    response
}

/// Place an order: checked against the local copies, accepted as PENDING.
///
/// With an `Idempotency-Key` header, a retry with the same key and body
/// returns the same order (200); the same key with another body is 409.
#[utoipa::path(post, path = "/orders", request_body = PlaceOrderRequest,
    params(("Idempotency-Key" = Option<String>, Header,
        description = "makes retries safe: 1 to 200 visible ASCII characters (spaces and tabs inside)",
        min_length = 1, max_length = 200, pattern = r"^[!-~](?:[\t -~]*[!-~])?$")),
    responses(
        (status = 202, body = OrderView, description = "accepted as PENDING"),
        (status = 200, body = OrderView, description = "the order an earlier request with this Idempotency-Key made"),
        (status = 409, body = Problem, description = "valid, but refused by the current state: unknown-customer or unknown-product (retry shortly), credit-limit-exceeded, idempotency-key-reused (this key was used with another body)"),
        (status = 422, body = Problem, description = "a field breaks a rule of its own (invalid-field)"),
    ))]
async fn place_order<S: Store>(
    State(orders): State<Orders<S>>,
    headers: HeaderMap,
    body: Result<StrictJson<PlaceOrderRequest>, Problem>,
) -> Response {
    let StrictJson(request) = match body {
        Ok(body) => body,
        Err(problem) => return respond(problem),
    };
    let idempotency_key = match headers.get("idempotency-key").map(|value| value.to_str()) {
        None => None,
        Some(Ok(key)) => Some(key.to_owned()),
        Some(Err(_)) => {
            return respond(Problem::invalid("Idempotency-Key", "must be visible ASCII"));
        }
    };
    let placed = orders
        .place(PlaceOrder {
            customer_id: request.customer_id,
            lines: request
                .lines
                .into_iter()
                .map(|line| (line.product_id, line.quantity))
                .collect(),
            idempotency_key,
        })
        .await;
    match placed {
        Ok(placed) => {
            let status = if placed.replayed {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            (status, Json(OrderView::new(placed.order, None))).into_response()
        }
        Err(error) => respond(error.into()),
    }
}

/// One order, with the customer's current name and address from the local copy.
#[utoipa::path(get, path = "/orders/{id}", params(("id" = String, Path, description = "The order id (a UUID); any other is not found")), responses((status = 200, body = OrderView), (status = 404, body = Problem)))]
async fn get_order<S: Store>(
    State(orders): State<Orders<S>>,
    Path(id): Path<String>,
) -> Result<Json<OrderView>, Problem> {
    let (order, customer) = orders.get(id).await?;
    Ok(Json(OrderView::new(order, customer)))
}

/// A customer's orders, oldest first.
#[utoipa::path(get, path = "/orders", params(OrdersQuery), responses((status = 200, body = OrderList), (status = 400, body = Problem), (status = 422, body = Problem)))]
async fn list_orders<S: Store>(
    State(orders): State<Orders<S>>,
    StrictQuery(query): StrictQuery<OrdersQuery>,
) -> Result<Json<OrderList>, Problem> {
    let limit = tandem_service::page_limit(query.limit, 100)?;
    let items = orders
        .of_customer(query.customer_id, limit)
        .await?
        .into_iter()
        .map(|order| OrderView::new(order, None))
        .collect();
    Ok(Json(OrderList { items }))
}

/// Cancel a pending or confirmed order; its reserved stock is released.
#[utoipa::path(post, path = "/orders/{id}/cancel",
    params(("id" = String, Path, description = "The order id (a UUID); any other is not found")), 
    responses((status = 200, body = OrderView), (status = 404, body = Problem), (status = 409, body = Problem, description = "not-cancellable: the order is already decided against, or cancelled")))]
async fn cancel_order<S: Store>(
    State(orders): State<Orders<S>>,
    Path(id): Path<String>,
) -> Result<Json<OrderView>, Problem> {
    Ok(Json(OrderView::new(orders.cancel(id).await?, None)))
}

/// The Order Service's local copy of a customer.
#[utoipa::path(get, path = "/customers/{id}", params(("id" = String, Path, description = "The customer id (1 to 64 letters, digits, - or _); any other is not found")), responses((status = 200, body = LocalCustomerView), (status = 404, body = Problem)))]
async fn get_local_customer<S: Store>(
    State(orders): State<Orders<S>>,
    Path(id): Path<String>,
) -> Result<Json<LocalCustomerView>, Problem> {
    let customer = orders.local_customer(id).await?;
    Ok(Json(LocalCustomerView {
        customer_id: customer.customer_id,
        name: customer.name,
        email: customer.email,
        address: customer.address,
        credit_limit_cents: customer.credit_limit_cents,
        sequence: customer.sequence,
        changed_at: customer.changed_at,
    }))
}

/// The Order Service's local copy of a product.
#[utoipa::path(get, path = "/products/{id}", params(("id" = String, Path, description = "The product id (1 to 64 letters, digits, - or _); any other is not found")), responses((status = 200, body = LocalProductView), (status = 404, body = Problem)))]
async fn get_local_product<S: Store>(
    State(orders): State<Orders<S>>,
    Path(id): Path<String>,
) -> Result<Json<LocalProductView>, Problem> {
    let product = orders.local_product(id).await?;
    Ok(Json(LocalProductView {
        product_id: product.product_id,
        sku: product.sku,
        name: product.name,
        price_cents: product.price_cents,
        available: product.available,
        reserved: product.reserved,
        sequence: product.sequence,
        changed_at: product.changed_at,
    }))
}

#[derive(OpenApi)]
#[openapi(
    modifiers(&SharedResponses),
    info(
        title = "Tandem Order Service",
        description = "Takes orders against local copies of customers and products built from events; publishes OrderPlaced, OrderConfirmed, OrderRejected and OrderCancelled on topic `order`."
    ),
    paths(
        place_order,
        get_order,
        list_orders,
        cancel_order,
        get_local_customer,
        get_local_product
    ),
    components(schemas(
        PlaceOrderRequest,
        OrderLineRequest,
        OrderView,
        OrderLineView,
        OrderList,
        LocalCustomerView,
        LocalProductView,
        Problem
    ))
)]
pub struct ApiDoc;

/// The service's AsyncAPI 3.0 document (`/asyncapi.json`): what it
/// publishes and what it consumes.
pub fn asyncapi() -> serde_json::Value {
    use tandem_contracts::{published_on, read, topics};
    tandem_service::asyncapi::AsyncApi::new(
        "Tandem Order Service events",
        env!("CARGO_PKG_VERSION"),
        "Order events; reads customers and products into local copies, and the inventory's answers.",
    )
    .sends(topics::ORDER, "the order id", published_on(topics::ORDER))
    .receives(
        topics::CUSTOMER,
        "the customer id",
        read(&["CustomerCreated", "CustomerUpdated", "CustomerSnapshot"]),
    )
    .receives(
        topics::INVENTORY,
        "the product id for product events, the order id for reservation events",
        read(&[
            "ProductCreated",
            "ProductStockChanged",
            "ProductSnapshot",
            "StockReserved",
            "StockReservationFailed",
        ]),
    )
    .to_json()
}

pub fn router<S: Store>(orders: Orders<S>) -> Router {
    let ready_store = orders.store().clone();
    let routes = Router::new()
        .route("/orders", get(list_orders::<S>).post(place_order::<S>))
        .route("/orders/{id}", get(get_order::<S>))
        .route("/orders/{id}/cancel", post(cancel_order::<S>))
        .route("/customers/{id}", get(get_local_customer::<S>))
        .route("/products/{id}", get(get_local_product::<S>))
        .route(
            "/openapi.json",
            get(|| async { Json(tandem_service::openapi::document(ApiDoc::openapi())) }),
        )
        .route("/asyncapi.json", get(|| async { Json(asyncapi()) }))
        .with_state(orders)
        .merge(tandem_service::probes::for_store(
            ready_store,
            "order database",
        ));
    tandem_service::with_defaults(routes)
}
