//! The event contracts of the commerce system: the only thing the Customer,
//! Inventory and Order services share.
//!
//! One module per publishing service, which is also the topic its events
//! travel on: [`customer`], [`inventory`], [`order`]. Every payload is a
//! versioned contract: its `dataschema` names it and its version, and its
//! JSON Schema is kept in `schemas/` (a test checks the files against these
//! types). Field names are camelCase on the wire; ids are strings; money is
//! integer minor units (cents), with an ISO 4217 currency from `OrderPlaced` v2
//! on. Readers ignore fields they do not know.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tandem::contract::Contract;
use tandem::EventPayload;

/// Topics, one per publishing service.
pub mod topics {
    pub const CUSTOMER: &str = "customer";
    pub const INVENTORY: &str = "inventory";
    pub const ORDER: &str = "order";
}

/// The commerce system's one currency. Payloads of `OrderPlaced` v1 carry
/// bare cents without a currency, and are read as amounts in it.
pub const CURRENCY: &str = "USD";

macro_rules! contract {
    ($type:ident, $topic:literal) => {
        contract!($type, $topic, "1");
    };
    ($type:ident, $topic:literal, $version:literal) => {
        impl EventPayload for $type {
            const TYPE: &'static str = stringify!($type);
            const SCHEMA: &'static str =
                concat!("tandem:", $topic, "/", stringify!($type), "/v", $version);
        }
    };
}

/// Events of the Customer Service (topic `customer`; subject: customer id).
pub mod customer {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct CustomerCreated {
        pub customer_id: String,
        pub name: String,
        pub email: String,
        pub address: String,
        pub credit_limit_cents: i64,
    }
    contract!(CustomerCreated, "customer");

    /// The customer id plus the fields that changed.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct CustomerUpdated {
        pub customer_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub email: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub address: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub credit_limit_cents: Option<i64>,
    }
    contract!(CustomerUpdated, "customer");

    /// A customer's whole state, sent as a snapshot event (`snapshot: true`)
    /// by a re-publication: it replaces a copy older than its sequence.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct CustomerSnapshot {
        pub customer_id: String,
        pub name: String,
        pub email: String,
        pub address: String,
        pub credit_limit_cents: i64,
    }
    contract!(CustomerSnapshot, "customer");
}

/// One product and quantity of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderLine {
    pub product_id: String,
    pub quantity: i64,
}

/// Events of the Inventory Service (topic `inventory`; subject: the product
/// id for product events, the order id for reservation events).
pub mod inventory {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct ProductCreated {
        pub product_id: String,
        pub sku: String,
        pub name: String,
        pub price_cents: i64,
        pub stock: i64,
    }
    contract!(ProductCreated, "inventory");

    /// The product's stock after a change, and why it changed.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct ProductStockChanged {
        pub product_id: String,
        pub available: i64,
        pub reserved: i64,
        pub delta: i64,
        pub reason: String,
    }
    contract!(ProductStockChanged, "inventory");

    /// A product's whole state, sent as a snapshot event (`snapshot: true`)
    /// by a re-publication: it replaces a copy older than its sequence.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct ProductSnapshot {
        pub product_id: String,
        pub sku: String,
        pub name: String,
        pub price_cents: i64,
        pub available: i64,
        pub reserved: i64,
    }
    contract!(ProductSnapshot, "inventory");

    /// Every line of the order is reserved.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct StockReserved {
        pub order_id: String,
        pub lines: Vec<OrderLine>,
    }
    contract!(StockReserved, "inventory");

    /// No line of the order is reserved, and why.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct StockReservationFailed {
        pub order_id: String,
        pub reason: String,
    }
    contract!(StockReservationFailed, "inventory");

    /// The order's reservation went back to available stock.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct StockReleased {
        pub order_id: String,
        pub lines: Vec<OrderLine>,
    }
    contract!(StockReleased, "inventory");
}

/// Events of the Order Service (topic `order`; subject: order id).
pub mod order {
    use super::*;

    /// A line with the unit price in cents the order was placed at (the
    /// lines of `OrderPlaced` v1 and of `OrderSnapshot`).
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct PricedLine {
        pub product_id: String,
        pub quantity: i64,
        pub unit_price_cents: i64,
    }

    /// An amount of money: whole minor units (cents for USD) of an ISO
    /// 4217 currency.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct Money {
        pub amount_minor: i64,
        /// An ISO 4217 code: three capital letters, such as `USD`.
        #[schemars(regex(pattern = "^[A-Z]{3}$"))]
        pub currency: String,
    }

    impl Money {
        /// `cents` of the system's [`crate::CURRENCY`].
        pub fn cents(cents: i64) -> Self {
            Self {
                amount_minor: cents,
                currency: crate::CURRENCY.to_owned(),
            }
        }
    }

    /// A line of `OrderPlaced` v2: a product, a quantity and the unit price
    /// the order was placed at.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct LineItem {
        pub product_id: String,
        pub quantity: i64,
        pub unit_price: Money,
    }

    /// An order was taken and waits for its stock (version 2: money as an
    /// amount and a currency). Readers get v1 payloads upcast to this type.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct OrderPlaced {
        pub order_id: String,
        pub customer_id: String,
        pub lines: Vec<LineItem>,
        pub total: Money,
    }

    impl EventPayload for OrderPlaced {
        const TYPE: &'static str = "OrderPlaced";
        const SCHEMA: &'static str = "tandem:order/OrderPlaced/v2";
        const UPCASTS_FROM: &'static [u32] = &[1];

        fn upcast(version: u32, data: &serde_json::Value) -> Result<Self, serde_json::Error> {
            match version {
                1 => v1::OrderPlaced::deserialize(data).map(Self::from),
                other => Err(serde::de::Error::custom(format!(
                    "OrderPlaced has no upcast from v{other}"
                ))),
            }
        }
    }

    impl From<v1::OrderPlaced> for OrderPlaced {
        /// v1 priced in cents of the one currency the system had.
        fn from(old: v1::OrderPlaced) -> Self {
            Self {
                order_id: old.order_id,
                customer_id: old.customer_id,
                lines: old
                    .lines
                    .into_iter()
                    .map(|line| LineItem {
                        product_id: line.product_id,
                        quantity: line.quantity,
                        unit_price: Money::cents(line.unit_price_cents),
                    })
                    .collect(),
                total: Money::cents(old.total_cents),
            }
        }
    }

    /// Earlier versions of the order contracts, kept so that their events
    /// still on the log are read (upcast) and their schemas checked.
    pub mod v1 {
        use super::*;

        /// `OrderPlaced` v1: prices as bare cents.
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
        #[serde(rename_all = "camelCase")]
        pub struct OrderPlaced {
            pub order_id: String,
            pub customer_id: String,
            pub lines: Vec<PricedLine>,
            pub total_cents: i64,
        }
        contract!(OrderPlaced, "order");
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct OrderConfirmed {
        pub order_id: String,
    }
    contract!(OrderConfirmed, "order");

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct OrderRejected {
        pub order_id: String,
        pub reason: String,
    }
    contract!(OrderRejected, "order");

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct OrderCancelled {
        pub order_id: String,
    }
    contract!(OrderCancelled, "order");

    /// An order's whole state, sent as a snapshot event (`snapshot: true`)
    /// by a re-publication of the Order Service: what a consumer that
    /// missed the order's events needs to act on it now.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct OrderSnapshot {
        pub order_id: String,
        pub customer_id: String,
        /// `PENDING`, `CONFIRMED`, `REJECTED` or `CANCELLED`.
        pub status: String,
        pub lines: Vec<PricedLine>,
        pub total_cents: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub reason: Option<String>,
    }
    contract!(OrderSnapshot, "order");
}

/// Every version of every contract, the current ones and the older ones
/// still read; `schemas/<type>.v<N>.json` must match.
pub fn contracts() -> Vec<Contract> {
    fn entry<T: EventPayload + JsonSchema>() -> Contract {
        // The `contract!` macro names the topic in the schema.
        let topic = T::SCHEMA
            .strip_prefix("tandem:")
            .and_then(|rest| rest.split('/').next())
            .expect("a contract's schema is tandem:<topic>/<type>/v<N>");
        Contract::new::<T>(
            topic,
            serde_json::to_value(schemars::schema_for!(T)).expect("schemas serialise"),
        )
    }
    vec![
        entry::<customer::CustomerCreated>(),
        entry::<customer::CustomerUpdated>(),
        entry::<customer::CustomerSnapshot>(),
        entry::<inventory::ProductCreated>(),
        entry::<inventory::ProductStockChanged>(),
        entry::<inventory::ProductSnapshot>(),
        entry::<inventory::StockReserved>(),
        entry::<inventory::StockReservationFailed>(),
        entry::<inventory::StockReleased>(),
        entry::<order::v1::OrderPlaced>(),
        entry::<order::OrderPlaced>(),
        entry::<order::OrderConfirmed>(),
        entry::<order::OrderRejected>(),
        entry::<order::OrderCancelled>(),
        entry::<order::OrderSnapshot>(),
    ]
}

/// The current version of every contract: what is published.
pub fn current() -> Vec<Contract> {
    tandem::contract::newest(&contracts())
}

/// The current version of every contract published on `topic`.
pub fn published_on(topic: &str) -> Vec<Contract> {
    current()
        .into_iter()
        .filter(|contract| contract.topic == topic)
        .collect()
}

/// Every version of the contracts named `event_types`: what a consumer of
/// them reads (older versions upcast).
pub fn read(event_types: &[&str]) -> Vec<Contract> {
    contracts()
        .into_iter()
        .filter(|contract| event_types.contains(&contract.event_type))
        .collect()
}
