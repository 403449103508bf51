//! The Customer Service's HTTP API: JSON in and out, errors as
//! `application/problem+json`, the OpenAPI document at `/openapi.json`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tandem::store::Store;
use tandem_service::openapi::{schema, SharedResponses};
use tandem_service::{Problem, StrictJson, StrictQuery};
use utoipa::openapi::schema::Object;
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::app::{AppError, Customers, NewCustomer};
use crate::domain::{Address, Changes, CreditLimit, Customer, CustomerId, Email, Name};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateCustomer {
    /// Optional; a UUID is generated when absent. 1 to 64 letters, digits,
    /// '-' or '_'.
    #[schema(schema_with = optional_id_schema)]
    customer_id: Option<String>,
    #[schema(schema_with = name_schema)]
    name: String,
    #[schema(schema_with = email_schema)]
    email: String,
    #[schema(schema_with = address_schema)]
    address: String,
    /// 0 to 10^12.
    #[schema(minimum = 0, maximum = 1_000_000_000_000_i64)]
    #[serde(deserialize_with = "tandem_service::json_integer::deserialize")]
    credit_limit_cents: i64,
}

/// Any of the fields; those present (and not null) are changed.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateCustomer {
    #[schema(schema_with = optional_name_schema)]
    name: Option<String>,
    #[schema(schema_with = optional_email_schema)]
    email: Option<String>,
    #[schema(schema_with = optional_address_schema)]
    address: Option<String>,
    /// 0 to 10^12.
    #[schema(minimum = 0, maximum = 1_000_000_000_000_i64)]
    #[serde(default, deserialize_with = "tandem_service::json_integer::option")]
    credit_limit_cents: Option<i64>,
}

// What the domain's parsers accept (crate::domain), as schemas.

const NAME_MAX: usize = 200;
const EMAIL_MAX: usize = 254;
const ADDRESS_MAX: usize = 500;
const NAME_DOC: &str = "1 to 200 characters, trimmed; no control characters.";
const EMAIL_DOC: &str =
    "An address like name@example.com, at most 254 characters, trimmed; no whitespace inside.";
const ADDRESS_DOC: &str = "1 to 500 characters, trimmed; no control characters.";

fn optional_id_schema() -> Object {
    schema::described(
        schema::nullable(schema::id()),
        "Optional; a UUID is generated when absent. 1 to 64 letters, digits, '-' or '_'.",
    )
}
fn name_schema() -> Object {
    schema::described(schema::text(NAME_MAX), NAME_DOC)
}
fn optional_name_schema() -> Object {
    schema::nullable(name_schema())
}
fn email_schema() -> Object {
    schema::described(schema::email(EMAIL_MAX), EMAIL_DOC)
}
fn optional_email_schema() -> Object {
    schema::nullable(email_schema())
}
fn address_schema() -> Object {
    schema::described(schema::text(ADDRESS_MAX), ADDRESS_DOC)
}
fn optional_address_schema() -> Object {
    schema::nullable(address_schema())
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CustomerView {
    customer_id: String,
    name: String,
    email: String,
    address: String,
    credit_limit_cents: i64,
    /// The sequence of the customer's last event.
    version: u64,
}

impl From<Customer> for CustomerView {
    fn from(customer: Customer) -> Self {
        Self {
            customer_id: customer.id.as_str().to_owned(),
            name: customer.name.as_str().to_owned(),
            email: customer.email.as_str().to_owned(),
            address: customer.address.as_str().to_owned(),
            credit_limit_cents: customer.credit_limit.cents(),
            version: customer.version,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CustomerPage {
    items: Vec<CustomerView>,
    /// Pass as `after` to get the next page; absent on the last page.
    next_after: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Customer id to start after.
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
            AppError::AlreadyExists(_) | AppError::Concurrent(_) => {
                Problem::conflict(error.to_string())
            }
            AppError::Store(error) => Problem::from_store(error, "customer database"),
        }
    }
}

fn known_id(id: &str) -> Result<CustomerId, Problem> {
    CustomerId::parse(id).map_err(|_| Problem::not_found(format!("customer {id} not found")))
}

/// Create a customer.
#[utoipa::path(post, path = "/customers", request_body = CreateCustomer,
    responses((status = 201, body = CustomerView), (status = 409, body = Problem), (status = 422, body = Problem)))]
async fn create_customer<S: Store>(
    State(customers): State<Customers<S>>,
    StrictJson(request): StrictJson<CreateCustomer>,
) -> Result<(StatusCode, Json<CustomerView>), Problem> {
    let new = NewCustomer {
        id: request
            .customer_id
            .as_deref()
            .map(CustomerId::parse)
            .transpose()
            .map_err(AppError::from)?,
        name: Name::parse(&request.name).map_err(AppError::from)?,
        email: Email::parse(&request.email).map_err(AppError::from)?,
        address: Address::parse(&request.address).map_err(AppError::from)?,
        credit_limit: CreditLimit::parse(request.credit_limit_cents).map_err(AppError::from)?,
    };
    let customer = customers.create(new).await?;
    Ok((StatusCode::CREATED, Json(customer.into())))
}

/// One customer.
#[utoipa::path(get, path = "/customers/{id}",
    params(("id" = String, Path, description = "The customer id (1 to 64 letters, digits, - or _); any other is not found")),
    responses((status = 200, body = CustomerView), (status = 404, body = Problem)))]
async fn get_customer<S: Store>(
    State(customers): State<Customers<S>>,
    Path(id): Path<String>,
) -> Result<Json<CustomerView>, Problem> {
    Ok(Json(customers.get(known_id(&id)?).await?.into()))
}

/// Customers by id, a page at a time.
#[utoipa::path(get, path = "/customers", params(PageQuery),
    responses((status = 200, body = CustomerPage), (status = 400, body = Problem), (status = 422, body = Problem)))]
async fn list_customers<S: Store>(
    State(customers): State<Customers<S>>,
    StrictQuery(query): StrictQuery<PageQuery>,
) -> Result<Json<CustomerPage>, Problem> {
    let limit = tandem_service::page_limit(query.limit, 50)?;
    let items: Vec<CustomerView> = customers
        .list(query.after, limit)
        .await?
        .into_iter()
        .map(CustomerView::from)
        .collect();
    let next_after = (items.len() == limit as usize)
        .then(|| items.last().map(|last| last.customer_id.clone()))
        .flatten();
    Ok(Json(CustomerPage { items, next_after }))
}

/// Change any of a customer's fields.
#[utoipa::path(patch, path = "/customers/{id}", request_body = UpdateCustomer,
    params(("id" = String, Path, description = "The customer id (1 to 64 letters, digits, - or _); any other is not found")),
    responses((status = 200, body = CustomerView), (status = 404, body = Problem), (status = 422, body = Problem)))]
async fn update_customer<S: Store>(
    State(customers): State<Customers<S>>,
    Path(id): Path<String>,
    StrictJson(request): StrictJson<UpdateCustomer>,
) -> Result<Json<CustomerView>, Problem> {
    let id = known_id(&id)?;
    let changes = Changes {
        name: request
            .name
            .as_deref()
            .map(Name::parse)
            .transpose()
            .map_err(AppError::from)?,
        email: request
            .email
            .as_deref()
            .map(Email::parse)
            .transpose()
            .map_err(AppError::from)?,
        address: request
            .address
            .as_deref()
            .map(Address::parse)
            .transpose()
            .map_err(AppError::from)?,
        credit_limit: request
            .credit_limit_cents
            .map(CreditLimit::parse)
            .transpose()
            .map_err(AppError::from)?,
    };
    Ok(Json(customers.update(id, changes).await?.into()))
}

#[derive(OpenApi)]
#[openapi(
    modifiers(&SharedResponses),
    info(
        title = "Tandem Customer Service",
        description = "Owns customers; publishes CustomerCreated and CustomerUpdated on topic `customer`."
    ),
    paths(create_customer, get_customer, list_customers, update_customer),
    components(schemas(CreateCustomer, UpdateCustomer, CustomerView, CustomerPage, Problem))
)]
pub struct ApiDoc;

/// The service's AsyncAPI 3.0 document (`/asyncapi.json`): what it
/// publishes and what it consumes.
pub fn asyncapi() -> serde_json::Value {
    use tandem_contracts::{published_on, topics};
    tandem_service::asyncapi::AsyncApi::new(
        "Tandem Customer Service events",
        env!("CARGO_PKG_VERSION"),
        "Customer events: CustomerCreated, CustomerUpdated, and CustomerSnapshot on a re-publication.",
    )
    .sends(topics::CUSTOMER, "the customer id", published_on(topics::CUSTOMER))
    .to_json()
}

/// The service's routes (probes and `/openapi.json` included).
pub fn router<S: Store>(customers: Customers<S>) -> Router {
    let ready_store = customers.store().clone();
    let routes = Router::new()
        .route(
            "/customers",
            get(list_customers::<S>).post(create_customer::<S>),
        )
        .route(
            "/customers/{id}",
            get(get_customer::<S>).patch(update_customer::<S>),
        )
        .route(
            "/openapi.json",
            get(|| async { Json(tandem_service::openapi::document(ApiDoc::openapi())) }),
        )
        .route("/asyncapi.json", get(|| async { Json(asyncapi()) }))
        .with_state(customers)
        .merge(tandem_service::probes::for_store(
            ready_store,
            "customer database",
        ));
    tandem_service::with_defaults(routes)
}
