//! The Inventory Service's HTTP API: JSON in and out, errors as
//! `application/problem+json`, the OpenAPI document at `/openapi.json`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tandem::store::Store;
use tandem_service::openapi::{schema, SharedResponses};
use tandem_service::{Problem, StrictJson, StrictQuery};
use utoipa::openapi::schema::{Object, OneOfBuilder, Schema};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::app::{AppError, NewProduct, Products};
use crate::domain::{
    Delta, InitialStock, Name, Price, Product, ProductId, Reason, Sku, MAX_QUANTITY,
};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateProduct {
    /// Optional; a UUID is generated when absent. 1 to 64 letters, digits,
    /// '-' or '_'.
    #[schema(schema_with = optional_id_schema)]
    product_id: Option<String>,
    /// Unique; 1 to 64 letters, digits, '-' or '_'.
    #[schema(schema_with = sku_schema)]
    sku: String,
    /// 1 to 200 characters.
    #[schema(schema_with = name_schema)]
    name: String,
    /// 0 to 10^12.
    #[schema(minimum = 0, maximum = 1_000_000_000_000_i64)]
    #[serde(deserialize_with = "tandem_service::json_integer::deserialize")]
    price_cents: i64,
    /// The units in stock to start with, 0 to 10^9; all available.
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    #[serde(deserialize_with = "tandem_service::json_integer::deserialize")]
    stock: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StockAdjustment {
    /// Units to add to (positive) or take from (negative) the available
    /// stock: non-zero, at most 10^9 either way. Available stock may not go
    /// below 0.
    #[schema(schema_with = delta_schema)]
    #[serde(deserialize_with = "tandem_service::json_integer::deserialize")]
    delta: i64,
    /// Why, 1 to 200 characters.
    #[schema(schema_with = reason_schema)]
    reason: String,
}

// What the domain's parsers accept (crate::domain), as schemas.

fn optional_id_schema() -> Object {
    schema::described(
        schema::nullable(schema::id()),
        "Optional; a UUID is generated when absent. 1 to 64 letters, digits, '-' or '_'.",
    )
}
fn sku_schema() -> Object {
    schema::described(schema::id(), "Unique; 1 to 64 letters, digits, '-' or '_'.")
}
fn name_schema() -> Object {
    schema::described(
        schema::text(200),
        "1 to 200 characters, trimmed; no control characters.",
    )
}
fn reason_schema() -> Object {
    schema::described(
        schema::text(200),
        "Why, 1 to 200 characters, trimmed; no control characters.",
    )
}
/// Non-zero, at most [`MAX_QUANTITY`] either way.
fn delta_schema() -> Schema {
    OneOfBuilder::new()
        .item(schema::integer(-MAX_QUANTITY, -1))
        .item(schema::integer(1, MAX_QUANTITY))
        .description(Some(
            "Units to add to (positive) or take from (negative) the available stock: \
             non-zero, at most 10^9 either way. Available stock may not go below 0.",
        ))
        .build()
        .into()
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProductView {
    product_id: String,
    sku: String,
    name: String,
    price_cents: i64,
    /// Units that can be reserved.
    available: i64,
    /// Units held for orders.
    reserved: i64,
    /// The sequence of the product's last event.
    version: u64,
}

impl From<Product> for ProductView {
    fn from(product: Product) -> Self {
        Self {
            product_id: product.id.as_str().to_owned(),
            sku: product.sku.as_str().to_owned(),
            name: product.name.as_str().to_owned(),
            price_cents: product.price.cents(),
            available: product.available,
            reserved: product.reserved,
            version: product.version,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProductPage {
    items: Vec<ProductView>,
    /// Pass as `after` to get the next page; absent on the last page.
    next_after: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Product id to start after.
    after: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
}

impl From<AppError> for Problem {
    fn from(error: AppError) -> Self {
        match error {
            AppError::Invalid(invalid) => Problem::invalid(invalid.field, invalid.message),
            AppError::NotFound(_) => Problem::not_found(error.to_string()),
            AppError::Stock(refused) => Problem::new(
                axum::http::StatusCode::CONFLICT,
                "insufficient-stock",
                refused.message,
            )
            .with_field(refused.field),
            AppError::AlreadyExists { field, .. } => {
                Problem::conflict(error.to_string()).with_field(field)
            }
            AppError::Concurrent(_) => Problem::conflict(error.to_string()),
            AppError::Store(error) => Problem::from_store(error, "inventory database"),
        }
    }
}

fn known_id(id: &str) -> Result<ProductId, Problem> {
    ProductId::parse(id).map_err(|_| Problem::not_found(format!("product {id} not found")))
}

/// Create a product.
#[utoipa::path(post, path = "/products", request_body = CreateProduct,
    responses((status = 201, body = ProductView), (status = 409, body = Problem), (status = 422, body = Problem)))]
async fn create_product<S: Store>(
    State(products): State<Products<S>>,
    StrictJson(request): StrictJson<CreateProduct>,
) -> Result<(StatusCode, Json<ProductView>), Problem> {
    let new = NewProduct {
        id: request
            .product_id
            .as_deref()
            .map(ProductId::parse)
            .transpose()
            .map_err(AppError::from)?,
        sku: Sku::parse(&request.sku).map_err(AppError::from)?,
        name: Name::parse(&request.name).map_err(AppError::from)?,
        price: Price::parse(request.price_cents).map_err(AppError::from)?,
        stock: InitialStock::parse(request.stock).map_err(AppError::from)?,
    };
    let product = products.create(new).await?;
    Ok((StatusCode::CREATED, Json(product.into())))
}

/// One product, with its available and reserved stock.
#[utoipa::path(get, path = "/products/{id}",
    params(("id" = String, Path, description = "The product id (1 to 64 letters, digits, - or _); any other is not found")),
    responses((status = 200, body = ProductView), (status = 404, body = Problem)))]
async fn get_product<S: Store>(
    State(products): State<Products<S>>,
    Path(id): Path<String>,
) -> Result<Json<ProductView>, Problem> {
    Ok(Json(products.get(known_id(&id)?).await?.into()))
}

/// Products by id, a page at a time.
#[utoipa::path(get, path = "/products", params(PageQuery),
    responses((status = 200, body = ProductPage), (status = 400, body = Problem), (status = 422, body = Problem)))]
async fn list_products<S: Store>(
    State(products): State<Products<S>>,
    StrictQuery(query): StrictQuery<PageQuery>,
) -> Result<Json<ProductPage>, Problem> {
    let limit = tandem_service::page_limit(query.limit, 50)?;
    let items: Vec<ProductView> = products
        .list(query.after, limit)
        .await?
        .into_iter()
        .map(ProductView::from)
        .collect();
    let next_after = (items.len() == limit as usize)
        .then(|| items.last().map(|last| last.product_id.clone()))
        .flatten();
    Ok(Json(ProductPage { items, next_after }))
}

/// Add stock to or take stock from a product's available units.
#[utoipa::path(post, path = "/products/{id}/stock-adjustments", request_body = StockAdjustment,
    params(("id" = String, Path, description = "The product id (1 to 64 letters, digits, - or _); any other is not found")),
    responses((status = 200, body = ProductView), (status = 404, body = Problem),
        (status = 409, body = Problem, description = "insufficient-stock: the available stock would go below 0; or changed concurrently, retry"),
        (status = 422, body = Problem)))]
async fn adjust_stock<S: Store>(
    State(products): State<Products<S>>,
    Path(id): Path<String>,
    StrictJson(request): StrictJson<StockAdjustment>,
) -> Result<Json<ProductView>, Problem> {
    let id = known_id(&id)?;
    let delta = Delta::parse(request.delta).map_err(AppError::from)?;
    let reason = Reason::parse(&request.reason).map_err(AppError::from)?;
    Ok(Json(products.adjust(id, delta, reason).await?.into()))
}

#[derive(OpenApi)]
#[openapi(
    modifiers(&SharedResponses),
    info(
        title = "Tandem Inventory Service",
        description = "Owns products and their stock; publishes ProductCreated, ProductStockChanged, \
            StockReserved, StockReservationFailed and StockReleased on topic `inventory`; reserves \
            stock for OrderPlaced and releases it for OrderCancelled from topic `order`."
    ),
    paths(create_product, get_product, list_products, adjust_stock),
    components(schemas(CreateProduct, StockAdjustment, ProductView, ProductPage, Problem))
)]
pub struct ApiDoc;

/// The service's AsyncAPI 3.0 document (`/asyncapi.json`): what it
/// publishes and what it consumes.
pub fn asyncapi() -> serde_json::Value {
    use tandem_contracts::{published_on, read, topics};
    tandem_service::asyncapi::AsyncApi::new(
        "Tandem Inventory Service events",
        env!("CARGO_PKG_VERSION"),
        "Product and stock events, and the answers to orders; reads the orders it reserves stock for.",
    )
    .sends(topics::INVENTORY, "the product id for product events, the order id for reservation events", published_on(topics::INVENTORY))
    .receives(
        topics::ORDER,
        "the order id",
        read(&["OrderPlaced", "OrderCancelled", "OrderSnapshot"]),
    )
    .to_json()
}

/// The service's routes (probes and `/openapi.json` included), with the
/// defaults every service has (body limit, problem+json 404).
pub fn router<S: Store>(products: Products<S>) -> Router {
    let ready_store = products.store().clone();
    let routes = Router::new()
        .route(
            "/products",
            get(list_products::<S>).post(create_product::<S>),
        )
        .route("/products/{id}", get(get_product::<S>))
        .route("/products/{id}/stock-adjustments", post(adjust_stock::<S>))
        .route(
            "/openapi.json",
            get(|| async { Json(tandem_service::openapi::document(ApiDoc::openapi())) }),
        )
        .route("/asyncapi.json", get(|| async { Json(asyncapi()) }))
        .with_state(products)
        .merge(tandem_service::probes::for_store(
            ready_store,
            "inventory database",
        ));
    tandem_service::with_defaults(routes)
}
