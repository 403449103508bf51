//! The synchronous baseline of the order flow, for `bench compare` only:
//! what a competent team builds without events. It lives here, never in
//! the product's services, which make no HTTP calls to each other.
//!
//! An order placement (`POST /orders` on the Order Service) calls the
//! Customer Service for the customer (`GET /customers/{id}`), then the
//! Inventory Service to reserve the stock and price the lines
//! (`POST /reservations`), then checks the credit and commits the order,
//! CONFIRMED, and answers `201`. A refusal after the stock was reserved
//! gives it back (`DELETE /reservations/{orderId}`); a reservation whose
//! answer was lost is given back the same way, best effort.
//!
//! Each service is its own process (`tandem-lab baseline SERVICE`, hidden)
//! with its own SQLite file, opened exactly as the product's services open
//! theirs (the toolkit's store: WAL, the same synchronous setting and
//! writer), and the domain rules are the product's own functions: the
//! request checks, pricing and credit rule of `order-service`, the demand
//! and reservation rules of `inventory-service`, the customer table of
//! `customer-service`. Calls go over one pooled keep-alive client with
//! timeouts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tandem::store::{Store, StoreError, Tx};
use tandem_service::Problem;

use inventory_service::domain::{Reservation, ReservationStatus};
use order_service::domain::{KnownProduct, Status};

/// The customer and product every benchmark order names, seeded in both
/// systems with room for every order of a run.
pub const CUSTOMER: &str = "1234";
pub const PRODUCT: &str = "widget";
const PRICE_CENTS: i64 = 1_250;
pub const CREDIT_LIMIT_CENTS: i64 = 1_000_000_000_000;
pub const STOCK: i64 = 1_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
pub enum Part {
    Customer,
    Inventory,
    Order,
}

impl Part {
    pub const ALL: [Part; 3] = [Part::Customer, Part::Inventory, Part::Order];

    fn name(self) -> &'static str {
        match self {
            Part::Customer => "customer",
            Part::Inventory => "inventory",
            Part::Order => "order",
        }
    }
}

/// `tandem-lab baseline SERVICE`: one service of the synchronous baseline.
#[derive(Debug, Args)]
pub struct ServeArgs {
    part: Part,
    #[arg(long)]
    listen: SocketAddr,
    /// The service's database, as a `sqlite://` URL.
    #[arg(long)]
    db: String,
    /// The Customer Service (for the Order Service).
    #[arg(long, default_value = "")]
    customer: String,
    /// The Inventory Service (for the Order Service).
    #[arg(long, default_value = "")]
    inventory: String,
}

fn now() -> String {
    tandem::envelope::format_time(time::OffsetDateTime::now_utc())
}

fn store_problem(error: StoreError) -> Problem {
    Problem::from_store(error, "the baseline's database")
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let store = tandem::engine::open_sqlite_store(&args.db).await?;
    let router = match args.part {
        Part::Customer => {
            store
                .write(|tx| {
                    customer_service::storage::install(tx)?;
                    seed_customer(tx)
                })
                .await?;
            Router::new()
                .route("/customers/{id}", get(customer))
                .with_state(store.clone())
        }
        Part::Inventory => {
            store
                .write(|tx| {
                    inventory_service::storage::install(tx)?;
                    seed_product(tx)
                })
                .await?;
            Router::new()
                .route("/reservations", post(reserve))
                .route("/reservations/{order_id}", delete(release))
                .with_state(store.clone())
        }
        Part::Order => {
            store.write(order_service::storage::install).await?;
            let http = reqwest::Client::builder()
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_millis(500))
                .timeout(Duration::from_secs(2))
                .pool_max_idle_per_host(usize::MAX)
                .build()?;
            Router::new()
                .route("/orders", post(place))
                .with_state(Orders {
                    store: store.clone(),
                    http,
                    customer: args.customer.trim_end_matches('/').to_owned(),
                    inventory: args.inventory.trim_end_matches('/').to_owned(),
                })
        }
    }
    .route("/health", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await?;
    store.close().await?;
    Ok(())
}

fn seed_customer(tx: &mut dyn Tx) -> Result<(), StoreError> {
    use customer_service::domain::{Address, CreditLimit, Customer, CustomerId, Email, Name};
    let id = CustomerId::parse(CUSTOMER).expect("a valid id");
    if customer_service::storage::find(tx, &id)?.is_some() {
        return Ok(());
    }
    let customer = Customer {
        id,
        name: Name::parse("Ada Lovelace").expect("a valid name"),
        email: Email::parse("ada@example.com").expect("a valid e-mail"),
        address: Address::parse("12 St James's Square, London").expect("a valid address"),
        credit_limit: CreditLimit::parse(CREDIT_LIMIT_CENTS).expect("a valid limit"),
        version: 1,
    };
    customer_service::storage::insert(tx, &customer, &now())
}

fn seed_product(tx: &mut dyn Tx) -> Result<(), StoreError> {
    use inventory_service::domain::{Name, Price, Product, ProductId, Sku};
    if inventory_service::storage::find(tx, PRODUCT)?.is_some() {
        return Ok(());
    }
    let product = Product {
        id: ProductId::parse(PRODUCT).expect("a valid id"),
        sku: Sku::parse("SKU-WIDGET").expect("a valid sku"),
        name: Name::parse("Widget").expect("a valid name"),
        price: Price::parse(PRICE_CENTS).expect("a valid price"),
        available: STOCK,
        reserved: 0,
        version: 1,
    };
    inventory_service::storage::insert(tx, &product, &now())
}

// The Customer Service.

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CustomerView {
    customer_id: String,
    credit_limit_cents: i64,
}

async fn customer(
    State(store): State<tandem::sqlite::SqliteStore>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<CustomerView>, Problem> {
    let id = customer_service::domain::CustomerId::parse(&id)
        .map_err(|error| Problem::invalid("id", error.to_string()))?;
    let found = store
        .read(move |tx| customer_service::storage::find(tx, &id))
        .await
        .map_err(store_problem)?
        .ok_or_else(|| Problem::not_found("no such customer"))?;
    Ok(Json(CustomerView {
        customer_id: found.id.as_str().to_owned(),
        credit_limit_cents: found.credit_limit.cents(),
    }))
}

// The Inventory Service.

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Line {
    product_id: String,
    quantity: i64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReserveRequest {
    order_id: String,
    lines: Vec<Line>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PricedLine {
    product_id: String,
    unit_price_cents: i64,
}

/// Refusals a reservation can end in, besides the store's own.
enum Refused {
    Store(StoreError),
    Stock(String),
}

impl From<StoreError> for Refused {
    fn from(error: StoreError) -> Self {
        Refused::Store(error)
    }
}

/// Reserves every line or none, once per order (a retried request gets
/// the first answer), and prices the lines.
async fn reserve(
    State(store): State<tandem::sqlite::SqliteStore>,
    Json(request): Json<ReserveRequest>,
) -> Result<(StatusCode, Json<Vec<PricedLine>>), Problem> {
    let outcome = store
        .write(move |tx| -> Result<Vec<PricedLine>, Refused> {
            let lines = request
                .lines
                .iter()
                .map(|line| (line.product_id.as_str(), line.quantity));
            let demands = inventory_service::domain::demand(lines).map_err(Refused::Stock)?;
            let held = inventory_service::storage::find_reservation(tx, &request.order_id)?;
            let mut priced = Vec::with_capacity(demands.len());
            for demand in &demands {
                let mut product = inventory_service::storage::find(tx, &demand.product_id)?
                    .ok_or_else(|| {
                        Refused::Stock(format!("unknown product {}", demand.product_id))
                    })?;
                if held.is_none() {
                    let previous = product.version;
                    product.reserve(demand.quantity).map_err(Refused::Stock)?;
                    product.version += 1;
                    inventory_service::storage::save_stock(tx, &product, previous, &now())?;
                }
                priced.push(PricedLine {
                    product_id: demand.product_id.clone(),
                    unit_price_cents: product.price.cents(),
                });
            }
            if held.is_none() {
                inventory_service::storage::insert_reservation(
                    tx,
                    &Reservation {
                        order_id: request.order_id.clone(),
                        status: ReservationStatus::Reserved,
                        lines: demands,
                        reason: None,
                    },
                    &now(),
                )?;
            }
            Ok(priced)
        })
        .await;
    match outcome {
        Ok(priced) => Ok((StatusCode::CREATED, Json(priced))),
        Err(Refused::Stock(reason)) => Err(Problem::new(
            StatusCode::CONFLICT,
            "insufficient-stock",
            reason,
        )),
        Err(Refused::Store(error)) => Err(store_problem(error)),
    }
}

/// Gives a reservation's stock back (a refused or abandoned order).
async fn release(
    State(store): State<tandem::sqlite::SqliteStore>,
    UrlPath(order_id): UrlPath<String>,
) -> Result<StatusCode, Problem> {
    store
        .write(move |tx| -> Result<(), StoreError> {
            let Some(held) = inventory_service::storage::find_reservation(tx, &order_id)? else {
                return Ok(());
            };
            if held.status != ReservationStatus::Reserved {
                return Ok(());
            }
            for demand in &held.lines {
                if let Some(mut product) = inventory_service::storage::find(tx, &demand.product_id)?
                {
                    let previous = product.version;
                    if product.release(demand.quantity).is_ok() {
                        product.version += 1;
                        inventory_service::storage::save_stock(tx, &product, previous, &now())?;
                    }
                }
            }
            inventory_service::storage::set_reservation_status(
                tx,
                &order_id,
                ReservationStatus::Reserved,
                ReservationStatus::Released,
                &now(),
            )?;
            Ok(())
        })
        .await
        .map_err(store_problem)?;
    Ok(StatusCode::NO_CONTENT)
}

// The Order Service.

#[derive(Clone)]
struct Orders {
    store: tandem::sqlite::SqliteStore,
    http: reqwest::Client,
    customer: String,
    inventory: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PlaceRequest {
    customer_id: String,
    lines: Vec<Line>,
}

fn unavailable(what: &str, error: impl std::fmt::Display) -> Problem {
    Problem::unavailable(format!("the {what} did not answer: {error}"))
}

async fn place(State(orders): State<Orders>, Json(request): Json<PlaceRequest>) -> Response {
    match place_order(&orders, request).await {
        Ok(body) => (StatusCode::CREATED, Json(body)).into_response(),
        Err(problem) => problem.into_response(),
    }
}

async fn place_order(orders: &Orders, request: PlaceRequest) -> Result<serde_json::Value, Problem> {
    let lines: Vec<(String, i64)> = request
        .lines
        .into_iter()
        .map(|line| (line.product_id, line.quantity))
        .collect();
    let (customer_id, lines) =
        order_service::domain::check_request(&request.customer_id, &lines)
            .map_err(|invalid| Problem::invalid(invalid.field, invalid.message))?;

    // 1. The customer and its credit limit, from the Customer Service.
    let answer = orders
        .http
        .get(format!("{}/customers/{customer_id}", orders.customer))
        .send()
        .await
        .map_err(|error| unavailable("Customer Service", error))?;
    let customer: CustomerView = match answer.status() {
        StatusCode::OK => answer
            .json()
            .await
            .map_err(|error| unavailable("Customer Service", error))?,
        StatusCode::NOT_FOUND => {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                "unknown-customer",
                format!("no customer {customer_id}"),
            )
            .with_field("customerId"))
        }
        other => return Err(unavailable("Customer Service", other)),
    };

    // 2. The stock, reserved and priced by the Inventory Service.
    let order_id = tandem::envelope::new_event_id().to_string();
    let reservation = ReserveRequest {
        order_id: order_id.clone(),
        lines: lines
            .iter()
            .map(|line| Line {
                product_id: line.product_id.clone(),
                quantity: line.quantity,
            })
            .collect(),
    };
    let answer = orders
        .http
        .post(format!("{}/reservations", orders.inventory))
        .json(&reservation)
        .send()
        .await;
    let priced: Vec<PricedLine> = match answer {
        Ok(answer) if answer.status() == StatusCode::CREATED => match answer.json().await {
            Ok(priced) => priced,
            Err(error) => {
                orders.give_back(&order_id);
                return Err(unavailable("Inventory Service", error));
            }
        },
        Ok(answer) if answer.status() == StatusCode::CONFLICT => {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                "insufficient-stock",
                answer.text().await.unwrap_or_default(),
            ))
        }
        Ok(answer) => return Err(unavailable("Inventory Service", answer.status())),
        Err(error) => {
            // The reservation may have been made before the answer was lost.
            orders.give_back(&order_id);
            return Err(unavailable("Inventory Service", error));
        }
    };
    let prices: HashMap<String, i64> = priced
        .into_iter()
        .map(|line| (line.product_id, line.unit_price_cents))
        .collect();
    let (priced, total_cents) = order_service::domain::price(&lines, |product_id| {
        prices.get(product_id).map(|&price_cents| KnownProduct {
            product_id: product_id.to_owned(),
            price_cents,
        })
    })
    .map_err(|invalid| Problem::invalid(invalid.field, invalid.message))?;

    // 3. The credit rule and the order, in one transaction.
    let id = order_id.clone();
    let stored = orders
        .store
        .write(move |tx| -> Result<Result<(), Problem>, StoreError> {
            let open = order_service::storage::open_total(tx, &customer_id)?;
            if let Err(refused) =
                order_service::domain::check_credit(customer.credit_limit_cents, open, total_cents)
            {
                return Ok(Err(Problem::new(
                    StatusCode::CONFLICT,
                    refused.kind,
                    refused.message,
                )));
            }
            let at = now();
            order_service::storage::insert_order(
                tx,
                &order_service::storage::StoredOrder {
                    order_id: id,
                    customer_id,
                    status: Status::Confirmed,
                    lines: priced,
                    total_cents,
                    reason: None,
                    version: 1,
                    created_at: at.clone(),
                    updated_at: at,
                },
            )?;
            Ok(Ok(()))
        })
        .await;
    match stored {
        Ok(Ok(())) => Ok(json!({
            "orderId": order_id,
            "status": "CONFIRMED",
            "totalCents": total_cents,
        })),
        Ok(Err(refused)) => {
            orders.give_back(&order_id);
            Err(refused)
        }
        Err(error) => {
            orders.give_back(&order_id);
            Err(store_problem(error))
        }
    }
}

impl Orders {
    /// Gives a reservation back in the background, best effort.
    fn give_back(&self, order_id: &str) {
        let request = self
            .http
            .delete(format!("{}/reservations/{order_id}", self.inventory));
        tokio::spawn(async move {
            let _ = request.send().await;
        });
    }
}

// The three processes, for the bench.

/// The baseline's three services as child processes of this executable.
pub struct Baseline {
    dir: PathBuf,
    ports: HashMap<Part, u16>,
    children: HashMap<Part, tokio::process::Child>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Baseline {
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        let mut ports = HashMap::new();
        for part in Part::ALL {
            ports.insert(part, free_port()?);
        }
        Ok(Self {
            dir: dir.to_owned(),
            ports,
            children: HashMap::new(),
        })
    }

    pub fn url(&self, part: Part) -> String {
        format!("http://127.0.0.1:{}", self.ports[&part])
    }

    pub async fn start_all(&mut self) -> anyhow::Result<()> {
        for part in Part::ALL {
            self.start(part).await?;
        }
        Ok(())
    }

    /// Starts `part` and waits until it answers.
    pub async fn start(&mut self, part: Part) -> anyhow::Result<()> {
        let db = format!(
            "sqlite://{}",
            self.dir
                .join(format!("baseline-{}.db", part.name()))
                .display()
        );
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("baseline")
            .arg(part.name())
            .args(["--listen", &format!("127.0.0.1:{}", self.ports[&part])])
            .args(["--db", &db])
            .args(["--customer", &self.url(Part::Customer)])
            .args(["--inventory", &self.url(Part::Inventory)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting a baseline service")?;
        self.children.insert(part, child);
        let health = format!("{}/health", self.url(part));
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(answer) = http.get(&health).send().await {
                if answer.status().is_success() {
                    return Ok(());
                }
            }
            if let Some(child) = self.children.get_mut(&part) {
                if let Some(status) = child.try_wait()? {
                    anyhow::bail!("the baseline's {} service exited: {status}", part.name());
                }
            }
            ensure!(
                Instant::now() < deadline,
                "the baseline's {} service did not answer within 30 s",
                part.name()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Kills `part` at once (SIGKILL), as a crash would.
    pub async fn kill(&mut self, part: Part) -> anyhow::Result<()> {
        if let Some(mut child) = self.children.remove(&part) {
            child.kill().await?;
        }
        Ok(())
    }

    pub async fn stop_all(&mut self) {
        for part in Part::ALL {
            let _ = self.kill(part).await;
        }
    }
}
