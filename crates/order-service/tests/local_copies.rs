//! The local copies' handler alone, in `tandem::testing`'s test bed: the
//! real consumer on a temporary SQLite file, fed the Customer Service's
//! events in the order a test chooses. An update that arrives before the
//! customer's creation waits for it; a duplicate changes nothing; a
//! re-published snapshot older than the copy never moves it backwards.

use std::sync::Arc;
use std::time::Duration;

use order_service::handlers::{LocalCopies, LOCAL_COPIES};
use tandem::consumer::ConsumerConfig;
use tandem::store::{Store, StoreError};
use tandem::testing::{event, HandlerBed};
use tandem_contracts::customer::{CustomerCreated, CustomerSnapshot, CustomerUpdated};
use tandem_contracts::topics;

/// The copy of customer `c-1`: (name, credit limit, sequence).
async fn copy(bed: &HandlerBed) -> Option<(String, i64, i64)> {
    bed.store()
        .read(|tx| -> Result<Option<(String, i64, i64)>, StoreError> {
            tx.query_opt(
                "SELECT name, credit_limit_cents, sequence FROM local_customers
                 WHERE customer_id = 'c-1'",
                &[],
            )?
            .map(|row| Ok((row.text(0)?.to_owned(), row.i64(1)?, row.i64(2)?)))
            .transpose()
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn updates_out_of_order_duplicates_and_old_snapshots_never_move_a_copy_back() {
    let mut config = ConsumerConfig::new(LOCAL_COPIES, &[topics::CUSTOMER]);
    config.gap_timeout = Duration::from_secs(3600);
    let bed = HandlerBed::new(
        Arc::new(LocalCopies::live()),
        config,
        order_service::storage::install,
    )
    .await
    .expect("the test bed");
    let created = event(
        topics::CUSTOMER,
        "c-1",
        1,
        &CustomerCreated {
            customer_id: "c-1".into(),
            name: "Ada".into(),
            email: "ada@example.com".into(),
            address: "1 Loop Road".into(),
            credit_limit_cents: 1_000,
        },
    )
    .unwrap();
    let raised = event(
        topics::CUSTOMER,
        "c-1",
        2,
        &CustomerUpdated {
            customer_id: "c-1".into(),
            name: None,
            email: None,
            address: None,
            credit_limit_cents: Some(5_000),
        },
    )
    .unwrap();

    // The update first: it waits for the creation.
    bed.deliver(std::slice::from_ref(&raised)).await.unwrap();
    assert_eq!(copy(&bed).await, None);
    assert_eq!(bed.held().await.unwrap(), 1);
    bed.deliver(&[created, raised.clone()]).await.unwrap();
    assert_eq!(copy(&bed).await, Some(("Ada".into(), 5_000, 2)));
    assert_eq!(bed.held().await.unwrap(), 0);

    // A snapshot at sequence 1 (a re-publication) is older than the copy.
    let mut old = event(
        topics::CUSTOMER,
        "c-1",
        1,
        &CustomerSnapshot {
            customer_id: "c-1".into(),
            name: "Ada".into(),
            email: "ada@example.com".into(),
            address: "1 Loop Road".into(),
            credit_limit_cents: 1_000,
        },
    )
    .unwrap();
    old.snapshot = true;
    bed.deliver(&[old]).await.unwrap();
    assert_eq!(copy(&bed).await, Some(("Ada".into(), 5_000, 2)));
    assert!(bed.parked().await.unwrap().is_empty());
    assert!(
        bed.published().await.unwrap().is_empty(),
        "copies publish nothing"
    );
}
