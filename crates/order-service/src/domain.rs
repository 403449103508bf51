//! Orders: pure rules, no I/O.

use thiserror::Error;

/// A rule a request broke, with the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
    /// A short kind for the problem type (`invalid-field`, `unknown-customer`, ...).
    pub kind: &'static str,
}

pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
        kind: "invalid-field",
    }
}

/// Ids are 1 to 64 letters, digits, `-` or `_`.
pub fn parse_id(field: &str, text: &str) -> Result<String, Invalid> {
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

pub const MAX_LINES: usize = 100;
pub const MAX_QUANTITY: i64 = 1_000_000;

/// A requested line, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedLine {
    pub product_id: String,
    pub quantity: i64,
}

/// Checks the shape of an order request (not the local copies: see
/// [`price`]).
pub fn check_request(
    customer_id: &str,
    lines: &[(String, i64)],
) -> Result<(String, Vec<RequestedLine>), Invalid> {
    let customer_id = parse_id("customerId", customer_id)?;
    if lines.is_empty() {
        return Err(invalid("lines", "an order needs at least one line"));
    }
    if lines.len() > MAX_LINES {
        return Err(invalid("lines", format!("at most {MAX_LINES} lines")));
    }
    let mut checked = Vec::with_capacity(lines.len());
    for (index, (product_id, quantity)) in lines.iter().enumerate() {
        let product_id = parse_id(&format!("lines[{index}].productId"), product_id)?;
        if !(1..=MAX_QUANTITY).contains(quantity) {
            return Err(invalid(
                format!("lines[{index}].quantity"),
                format!("must be between 1 and {MAX_QUANTITY}"),
            ));
        }
        checked.push(RequestedLine {
            product_id,
            quantity: *quantity,
        });
    }
    Ok((customer_id, checked))
}

/// What the Order Service knows of a product, for pricing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownProduct {
    pub product_id: String,
    pub price_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricedLine {
    pub product_id: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

/// Prices the lines from the local product copies; a product the service
/// has not heard of is refused with kind `unknown-product`.
pub fn price(
    lines: &[RequestedLine],
    known: impl Fn(&str) -> Option<KnownProduct>,
) -> Result<(Vec<PricedLine>, i64), Invalid> {
    let mut priced = Vec::with_capacity(lines.len());
    let mut total: i64 = 0;
    for (index, line) in lines.iter().enumerate() {
        let Some(product) = known(&line.product_id) else {
            return Err(Invalid {
                field: format!("lines[{index}].productId"),
                message: format!(
                    "the Order Service has not heard of product {} (yet): if it was just created, retry shortly",
                    line.product_id
                ),
                kind: "unknown-product",
            });
        };
        let line_total = product
            .price_cents
            .checked_mul(line.quantity)
            .ok_or_else(|| invalid(format!("lines[{index}].quantity"), "order total too large"))?;
        total = total
            .checked_add(line_total)
            .ok_or_else(|| invalid("lines", "order total too large"))?;
        priced.push(PricedLine {
            product_id: line.product_id.clone(),
            quantity: line.quantity,
            unit_price_cents: product.price_cents,
        });
    }
    Ok((priced, total))
}

/// The credit rule: what the customer has open (pending or confirmed) plus
/// this order must fit in the credit limit.
pub fn check_credit(
    credit_limit_cents: i64,
    open_cents: i64,
    total_cents: i64,
) -> Result<(), Invalid> {
    if open_cents.saturating_add(total_cents) > credit_limit_cents {
        return Err(Invalid {
            field: "lines".into(),
            message: format!(
                "order total {total_cents} plus open orders {open_cents} exceeds the credit limit {credit_limit_cents} (cents)"
            ),
            kind: "credit-limit-exceeded",
        });
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pending,
    Confirmed,
    Rejected,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "PENDING",
            Status::Confirmed => "CONFIRMED",
            Status::Rejected => "REJECTED",
            Status::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "PENDING" => Some(Status::Pending),
            "CONFIRMED" => Some(Status::Confirmed),
            "REJECTED" => Some(Status::Rejected),
            "CANCELLED" => Some(Status::Cancelled),
            _ => None,
        }
    }

    /// Inventory reserved the stock: a pending order is confirmed.
    pub fn on_reserved(self) -> Option<Status> {
        (self == Status::Pending).then_some(Status::Confirmed)
    }

    /// Inventory could not reserve: a pending order is rejected.
    pub fn on_reservation_failed(self) -> Option<Status> {
        (self == Status::Pending).then_some(Status::Rejected)
    }

    /// A customer cancels: only open orders can be.
    pub fn cancel(self) -> Result<Status, Invalid> {
        match self {
            Status::Pending | Status::Confirmed => Ok(Status::Cancelled),
            Status::Rejected | Status::Cancelled => Err(Invalid {
                field: "status".into(),
                message: format!("a {} order cannot be cancelled", self.as_str()),
                kind: "not-cancellable",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_field_by_field() {
        let lines = vec![("p1".to_owned(), 2), ("p 2".to_owned(), 1)];
        assert_eq!(
            check_request("c1", &lines).unwrap_err().field,
            "lines[1].productId"
        );
        let lines = vec![("p1".to_owned(), 0)];
        assert_eq!(
            check_request("c1", &lines).unwrap_err().field,
            "lines[0].quantity"
        );
        assert_eq!(check_request("c1", &[]).unwrap_err().field, "lines");
        assert_eq!(
            check_request("", &[("p".into(), 1)]).unwrap_err().field,
            "customerId"
        );
    }

    #[test]
    fn pricing_and_credit() {
        let lines = vec![RequestedLine {
            product_id: "p".into(),
            quantity: 3,
        }];
        let (priced, total) = price(&lines, |_| {
            Some(KnownProduct {
                product_id: "p".into(),
                price_cents: 250,
            })
        })
        .unwrap();
        assert_eq!((priced[0].unit_price_cents, total), (250, 750));
        assert_eq!(price(&lines, |_| None).unwrap_err().kind, "unknown-product");
        assert!(check_credit(1000, 200, 800).is_ok());
        assert_eq!(
            check_credit(1000, 201, 800).unwrap_err().kind,
            "credit-limit-exceeded"
        );
    }

    #[test]
    fn status_transitions() {
        assert_eq!(Status::Pending.on_reserved(), Some(Status::Confirmed));
        assert_eq!(Status::Cancelled.on_reserved(), None);
        assert_eq!(
            Status::Pending.on_reservation_failed(),
            Some(Status::Rejected)
        );
        assert!(Status::Confirmed.cancel().is_ok());
        assert!(Status::Rejected.cancel().is_err());
    }
}
