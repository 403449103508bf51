//! Customers: pure rules, no I/O. Every value type has a fallible `parse`;
//! once a value exists it is valid.

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

/// Letters, digits, `-` and `_`, 1 to 64 of them: safe in a URL path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CustomerId(String);

impl CustomerId {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        let valid = !text.is_empty()
            && text.len() <= 64
            && text
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_');
        if !valid {
            return Err(invalid(
                "customerId",
                "must be 1 to 64 letters, digits, '-' or '_'",
            ));
        }
        Ok(Self(text.to_owned()))
    }

    /// A fresh id (a UUIDv7, so ids sort by creation time).
    pub fn generate() -> Self {
        Self(tandem::envelope::new_event_id().to_string())
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        let text = bounded_text("email", text, 254)?;
        let mut parts = text.split('@');
        let (local, domain) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let valid = parts.next().is_none()
            && !local.is_empty()
            && domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !text.contains(char::is_whitespace);
        if !valid {
            return Err(invalid("email", "must be an address like name@example.com"));
        }
        Ok(Self(text))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address(String);

impl Address {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        bounded_text("address", text, 500).map(Self)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A credit limit in cents, from 0 to 10^12 (ten billion in major units).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditLimit(i64);

impl CreditLimit {
    pub const MAX_CENTS: i64 = 1_000_000_000_000;

    pub fn parse(cents: i64) -> Result<Self, Invalid> {
        if !(0..=Self::MAX_CENTS).contains(&cents) {
            return Err(invalid(
                "creditLimitCents",
                format!("must be between 0 and {}", Self::MAX_CENTS),
            ));
        }
        Ok(Self(cents))
    }
    pub fn cents(self) -> i64 {
        self.0
    }
}

/// A customer as the Customer Service owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customer {
    pub id: CustomerId,
    pub name: Name,
    pub email: Email,
    pub address: Address,
    pub credit_limit: CreditLimit,
    /// The sequence of the customer's last event.
    pub version: u64,
}

/// Fields to change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub name: Option<Name>,
    pub email: Option<Email>,
    pub address: Option<Address>,
    pub credit_limit: Option<CreditLimit>,
}

impl Customer {
    /// Applies `changes`, returning only those that differ from the current
    /// values (what a `CustomerUpdated` event carries).
    pub fn apply(&mut self, changes: Changes) -> Changes {
        let mut applied = Changes::default();
        if let Some(name) = changes.name.filter(|name| *name != self.name) {
            self.name = name.clone();
            applied.name = Some(name);
        }
        if let Some(email) = changes.email.filter(|email| *email != self.email) {
            self.email = email.clone();
            applied.email = Some(email);
        }
        if let Some(address) = changes.address.filter(|address| *address != self.address) {
            self.address = address.clone();
            applied.address = Some(address);
        }
        if let Some(limit) = changes
            .credit_limit
            .filter(|limit| *limit != self.credit_limit)
        {
            self.credit_limit = limit;
            applied.credit_limit = Some(limit);
        }
        applied
    }
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.email.is_none()
            && self.address.is_none()
            && self.credit_limit.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked_on_parse() {
        assert!(CustomerId::parse("1234").is_ok());
        assert_eq!(CustomerId::parse("a/b").unwrap_err().field, "customerId");
        assert_eq!(Name::parse("  ").unwrap_err().field, "name");
        assert_eq!(Name::parse(" Ada ").unwrap().as_str(), "Ada");
        assert!(Email::parse("ada@example.com").is_ok());
        for bad in [
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a b@example.com",
            "a@b@c.d",
        ] {
            assert_eq!(Email::parse(bad).unwrap_err().field, "email", "{bad}");
        }
        assert_eq!(
            CreditLimit::parse(-1).unwrap_err().field,
            "creditLimitCents"
        );
        assert!(CreditLimit::parse(0).is_ok());
    }

    #[test]
    fn apply_reports_only_real_changes() {
        let mut customer = Customer {
            id: CustomerId::parse("1").unwrap(),
            name: Name::parse("Ada").unwrap(),
            email: Email::parse("ada@example.com").unwrap(),
            address: Address::parse("1 Old Road").unwrap(),
            credit_limit: CreditLimit::parse(100).unwrap(),
            version: 1,
        };
        let applied = customer.apply(Changes {
            name: Some(Name::parse("Ada").unwrap()),
            address: Some(Address::parse("123 New Road").unwrap()),
            ..Changes::default()
        });
        assert_eq!(applied.name, None);
        assert_eq!(applied.address.unwrap().as_str(), "123 New Road");
        assert_eq!(customer.address.as_str(), "123 New Road");
    }
}
