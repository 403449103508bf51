//! Products, their stock and reservations: pure rules, no I/O. Every value
//! type has a fallible `parse`; once a value exists it is valid.

use thiserror::Error;

/// A rule a request broke, with the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        field,
        message: message.into(),
    }
}

/// Letters, digits, `-` and `_`, 1 to 64 of them.
fn url_safe(field: &'static str, text: &str) -> Result<String, Invalid> {
    let valid = !text.is_empty()
        && text.len() <= 64
        && text
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_');
    if !valid {
        return Err(invalid(
            field,
            "must be 1 to 64 letters, digits, '-' or '_'",
        ));
    }
    Ok(text.to_owned())
}

/// Letters, digits, `-` and `_`, 1 to 64 of them: safe in a URL path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProductId(String);

impl ProductId {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        url_safe("productId", text).map(Self)
    }

    /// A fresh id (a UUIDv7, so ids sort by creation time).
    pub fn generate() -> Self {
        Self(tandem::envelope::new_event_id().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A stock keeping unit: the product's code, unique among products.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sku(String);

impl Sku {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        url_safe("sku", text).map(Self)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A text of at most `max_chars` characters as sent (so that a schema's
/// `maxLength` can say it), kept trimmed: not blank, and with no control
/// character but in the whitespace around it.
fn bounded_text(field: &'static str, text: &str, max_chars: usize) -> Result<String, Invalid> {
    if text.chars().count() > max_chars {
        return Err(invalid(
            field,
            format!("must be at most {max_chars} characters"),
        ));
    }
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(trimmed.to_owned())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name(String);

impl Name {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        bounded_text("name", text, 200).map(Self)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why stock was adjusted, as the person adjusting it put it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason(String);

impl Reason {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        bounded_text("reason", text, 200).map(Self)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A unit price in cents, from 0 to 10^12.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price(i64);

impl Price {
    pub const MAX_CENTS: i64 = 1_000_000_000_000;

    pub fn parse(cents: i64) -> Result<Self, Invalid> {
        if !(0..=Self::MAX_CENTS).contains(&cents) {
            return Err(invalid(
                "priceCents",
                format!("must be between 0 and {}", Self::MAX_CENTS),
            ));
        }
        Ok(Self(cents))
    }
    pub fn cents(self) -> i64 {
        self.0
    }
}

/// The largest stock a product starts with, and the largest single
/// adjustment.
pub const MAX_QUANTITY: i64 = 1_000_000_000;

/// The stock a new product starts with: 0 to 10^9 units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitialStock(i64);

impl InitialStock {
    pub fn parse(units: i64) -> Result<Self, Invalid> {
        if !(0..=MAX_QUANTITY).contains(&units) {
            return Err(invalid(
                "stock",
                format!("must be between 0 and {MAX_QUANTITY}"),
            ));
        }
        Ok(Self(units))
    }
    pub fn units(self) -> i64 {
        self.0
    }
}

/// A change of stock: non-zero, at most 10^9 units either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delta(i64);

impl Delta {
    pub fn parse(units: i64) -> Result<Self, Invalid> {
        if units == 0 {
            return Err(invalid("delta", "must not be 0"));
        }
        if units.unsigned_abs() > MAX_QUANTITY.unsigned_abs() {
            return Err(invalid(
                "delta",
                format!("must be between -{MAX_QUANTITY} and {MAX_QUANTITY}"),
            ));
        }
        Ok(Self(units))
    }
    pub fn units(self) -> i64 {
        self.0
    }
}

/// A product as the Inventory Service owns it.
///
/// Its stock is split in two: `available` can be reserved or sold,
/// `reserved` is held for orders. Neither is ever negative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub id: ProductId,
    pub sku: Sku,
    pub name: Name,
    pub price: Price,
    pub available: i64,
    pub reserved: i64,
    /// The sequence of the product's last event.
    pub version: u64,
}

impl Product {
    /// Adds `delta` to the available stock, which may not go below 0.
    pub fn adjust(&mut self, delta: Delta) -> Result<(), Invalid> {
        let after = self.available.checked_add(delta.units()).ok_or_else(|| {
            invalid(
                "delta",
                "would take the available stock past what can be counted",
            )
        })?;
        if after < 0 {
            return Err(invalid(
                "delta",
                format!(
                    "would take the available stock below 0: {} available, delta {}",
                    self.available,
                    delta.units()
                ),
            ));
        }
        self.available = after;
        Ok(())
    }

    /// Moves `quantity` from available to reserved; the caller has checked
    /// (with [`shortfalls`]) that there is enough.
    pub fn reserve(&mut self, quantity: i64) -> Result<(), String> {
        if quantity <= 0 || quantity > self.available {
            return Err(format!(
                "cannot reserve {quantity} of product {}: {} available",
                self.id.as_str(),
                self.available
            ));
        }
        self.available -= quantity;
        self.reserved += quantity;
        Ok(())
    }

    /// Moves `quantity` back from reserved to available.
    pub fn release(&mut self, quantity: i64) -> Result<(), String> {
        if quantity <= 0 || quantity > self.reserved {
            return Err(format!(
                "cannot release {quantity} of product {}: {} reserved",
                self.id.as_str(),
                self.reserved
            ));
        }
        self.reserved -= quantity;
        self.available += quantity;
        Ok(())
    }
}

/// What an order asks of one product: its lines for it, summed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    pub product_id: String,
    pub quantity: i64,
}

/// Sums an order's lines per product (an order may name a product twice),
/// in the order products are first named. Fails, saying why, on an order
/// with no lines or with a line whose quantity is not positive.
pub fn demand<'a>(lines: impl IntoIterator<Item = (&'a str, i64)>) -> Result<Vec<Demand>, String> {
    let mut demands: Vec<Demand> = Vec::new();
    for (index, (product_id, quantity)) in lines.into_iter().enumerate() {
        if quantity <= 0 {
            return Err(format!(
                "line {index} (product {product_id}): quantity must be positive, got {quantity}"
            ));
        }
        match demands
            .iter_mut()
            .find(|demand| demand.product_id == product_id)
        {
            Some(demand) => {
                demand.quantity = demand.quantity.checked_add(quantity).ok_or_else(|| {
                    format!("product {product_id}: the quantities ordered add up past what can be counted")
                })?;
            }
            None => demands.push(Demand {
                product_id: product_id.to_owned(),
                quantity,
            }),
        }
    }
    if demands.is_empty() {
        return Err("the order has no lines".to_owned());
    }
    Ok(demands)
}

/// Why `demands` cannot all be met, given each product's available stock
/// (`None`: no such product). Empty when every demand can be met.
pub fn shortfalls(demands: &[Demand], available: impl Fn(&str) -> Option<i64>) -> Vec<String> {
    demands
        .iter()
        .filter_map(|demand| match available(&demand.product_id) {
            None => Some(format!("product {} does not exist", demand.product_id)),
            Some(units) if units < demand.quantity => Some(format!(
                "product {}: {} requested, {} available (short by {})",
                demand.product_id,
                demand.quantity,
                units,
                demand.quantity - units
            )),
            Some(_) => None,
        })
        .collect()
}

/// Where an order's reservation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationStatus {
    /// Every line's stock is held for the order.
    Reserved,
    /// Nothing was reserved; the reservation records why.
    Failed,
    /// The order was cancelled and its stock went back to available.
    Released,
}

impl ReservationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserved => "reserved",
            Self::Failed => "failed",
            Self::Released => "released",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "reserved" => Some(Self::Reserved),
            "failed" => Some(Self::Failed),
            "released" => Some(Self::Released),
            _ => None,
        }
    }
}

/// What the service did with an order's `OrderPlaced`, keyed by order id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub order_id: String,
    pub status: ReservationStatus,
    /// What is (or was) held, per product; empty for a failed reservation.
    pub lines: Vec<Demand>,
    /// Why a reservation failed.
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product(available: i64, reserved: i64) -> Product {
        Product {
            id: ProductId::parse("p1").unwrap(),
            sku: Sku::parse("SKU-1").unwrap(),
            name: Name::parse("Widget").unwrap(),
            price: Price::parse(100).unwrap(),
            available,
            reserved,
            version: 1,
        }
    }

    #[test]
    fn values_are_checked_on_parse() {
        assert!(ProductId::parse("p-1_A").is_ok());
        assert_eq!(ProductId::parse("a/b").unwrap_err().field, "productId");
        assert_eq!(ProductId::parse("").unwrap_err().field, "productId");
        assert_eq!(Sku::parse(&"x".repeat(65)).unwrap_err().field, "sku");
        assert!(Sku::parse(&"x".repeat(64)).is_ok());
        assert_eq!(Name::parse(" ").unwrap_err().field, "name");
        assert_eq!(Name::parse(&"n".repeat(201)).unwrap_err().field, "name");
        assert_eq!(Reason::parse("").unwrap_err().field, "reason");
        assert_eq!(Price::parse(-1).unwrap_err().field, "priceCents");
        assert!(Price::parse(Price::MAX_CENTS).is_ok());
        assert_eq!(
            Price::parse(Price::MAX_CENTS + 1).unwrap_err().field,
            "priceCents"
        );
        assert_eq!(InitialStock::parse(-1).unwrap_err().field, "stock");
        assert!(InitialStock::parse(MAX_QUANTITY).is_ok());
        assert_eq!(Delta::parse(0).unwrap_err().field, "delta");
        assert_eq!(Delta::parse(MAX_QUANTITY + 1).unwrap_err().field, "delta");
        assert_eq!(Delta::parse(-MAX_QUANTITY - 1).unwrap_err().field, "delta");
        assert_eq!(Delta::parse(i64::MIN).unwrap_err().field, "delta");
        assert!(Delta::parse(-MAX_QUANTITY).is_ok());
    }

    #[test]
    fn available_stock_never_goes_below_zero() {
        let mut widget = product(3, 2);
        let error = widget.adjust(Delta::parse(-4).unwrap()).unwrap_err();
        assert_eq!(error.field, "delta");
        assert_eq!((widget.available, widget.reserved), (3, 2));
        widget.adjust(Delta::parse(-3).unwrap()).unwrap();
        assert_eq!((widget.available, widget.reserved), (0, 2));
        assert!(widget.reserve(1).is_err());
        assert!(widget.release(3).is_err());
        widget.release(2).unwrap();
        assert_eq!((widget.available, widget.reserved), (2, 0));
        widget.reserve(2).unwrap();
        assert_eq!((widget.available, widget.reserved), (0, 2));
    }

    #[test]
    fn demand_sums_lines_per_product_in_first_mention_order() {
        let demands = demand([("b", 2), ("a", 1), ("b", 3)]).unwrap();
        assert_eq!(
            demands,
            vec![
                Demand {
                    product_id: "b".into(),
                    quantity: 5
                },
                Demand {
                    product_id: "a".into(),
                    quantity: 1
                },
            ]
        );
        assert!(demand([]).unwrap_err().contains("no lines"));
        assert!(demand([("a", 1), ("b", 0)]).unwrap_err().contains("line 1"));
        assert!(demand([("a", i64::MAX), ("a", 1)]).is_err());
    }

    #[test]
    fn shortfalls_name_the_product_and_what_is_missing() {
        let demands = demand([("a", 2), ("b", 1), ("a", 2), ("c", 1)]).unwrap();
        let stock = |id: &str| match id {
            "a" => Some(3),
            "b" => Some(1),
            _ => None,
        };
        assert_eq!(
            shortfalls(&demands, stock),
            vec![
                "product a: 4 requested, 3 available (short by 1)".to_owned(),
                "product c does not exist".to_owned(),
            ]
        );
        assert!(shortfalls(&demands[1..2], stock).is_empty());
    }
}
