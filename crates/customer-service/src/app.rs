//! The Customer Service's use cases. Each write commits the customer row
//! and its event in one transaction of the service's own database.

use tandem::outbox::{self, NewEvent};
use tandem::store::{Store, StoreError};
use tandem_contracts::customer::{CustomerCreated, CustomerUpdated};
use tandem_contracts::topics;

use crate::domain::{Address, Changes, CreditLimit, Customer, CustomerId, Email, Invalid, Name};
use crate::storage;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("customer {0} not found")]
    NotFound(String),
    #[error("customer {0} already exists")]
    AlreadyExists(String),
    #[error("customer {0} was changed concurrently; retry")]
    Concurrent(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a new customer needs.
#[derive(Debug, Clone)]
pub struct NewCustomer {
    pub id: Option<CustomerId>,
    pub name: Name,
    pub email: Email,
    pub address: Address,
    pub credit_limit: CreditLimit,
}

fn now() -> String {
    tandem::envelope::format_time(time::OffsetDateTime::now_utc())
}

#[derive(Clone)]
pub struct Customers<S: Store> {
    store: S,
}

impl<S: Store> Customers<S> {
    pub fn new(store: S) -> Self {
        Self { store }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub async fn create(&self, new: NewCustomer) -> Result<Customer, AppError> {
        let customer = Customer {
            id: new.id.unwrap_or_else(CustomerId::generate),
            name: new.name,
            email: new.email,
            address: new.address,
            credit_limit: new.credit_limit,
            version: 1,
        };
        self.store
            .write(move |tx| -> Result<Customer, AppError> {
                if storage::find(tx, &customer.id)?.is_some() {
                    return Err(AppError::AlreadyExists(customer.id.as_str().to_owned()));
                }
                let payload = CustomerCreated {
                    customer_id: customer.id.as_str().to_owned(),
                    name: customer.name.as_str().to_owned(),
                    email: customer.email.as_str().to_owned(),
                    address: customer.address.as_str().to_owned(),
                    credit_limit_cents: customer.credit_limit.cents(),
                };
                let event = NewEvent::new(customer.id.as_str(), &payload)?.expect_sequence(0);
                outbox::append(tx, topics::CUSTOMER, event).map_err(|error| match error {
                    StoreError::Conflict(_) => {
                        AppError::AlreadyExists(customer.id.as_str().to_owned())
                    }
                    other => AppError::Store(other),
                })?;
                storage::insert(tx, &customer, &now())?;
                Ok(customer)
            })
            .await
    }

    pub async fn update(&self, id: CustomerId, changes: Changes) -> Result<Customer, AppError> {
        self.store
            .write(move |tx| -> Result<Customer, AppError> {
                let Some(mut customer) = storage::find(tx, &id)? else {
                    return Err(AppError::NotFound(id.as_str().to_owned()));
                };
                let previous_version = customer.version;
                let applied = customer.apply(changes);
                if applied.is_empty() {
                    return Ok(customer);
                }
                let payload = CustomerUpdated {
                    customer_id: id.as_str().to_owned(),
                    name: applied.name.map(|name| name.as_str().to_owned()),
                    email: applied.email.map(|email| email.as_str().to_owned()),
                    address: applied.address.map(|address| address.as_str().to_owned()),
                    credit_limit_cents: applied.credit_limit.map(CreditLimit::cents),
                };
                let event = NewEvent::new(id.as_str(), &payload)?.expect_sequence(previous_version);
                let envelope =
                    outbox::append(tx, topics::CUSTOMER, event).map_err(|error| match error {
                        StoreError::Conflict(_) => AppError::Concurrent(id.as_str().to_owned()),
                        other => AppError::Store(other),
                    })?;
                customer.version = envelope.sequence;
                if !storage::update(tx, &customer, previous_version, &now())? {
                    return Err(AppError::Concurrent(id.as_str().to_owned()));
                }
                Ok(customer)
            })
            .await
    }

    pub async fn get(&self, id: CustomerId) -> Result<Customer, AppError> {
        self.store
            .read(move |tx| -> Result<Customer, AppError> {
                storage::find(tx, &id)?.ok_or_else(|| AppError::NotFound(id.as_str().to_owned()))
            })
            .await
    }

    pub async fn list(&self, after: Option<String>, limit: u32) -> Result<Vec<Customer>, AppError> {
        self.store
            .read(move |tx| -> Result<Vec<Customer>, AppError> {
                Ok(storage::page(tx, after.as_deref(), limit)?)
            })
            .await
    }
}
