//! A namespace changes the names on a bus, never what the bus guarantees:
//! on real NATS, the namespaced bus still says its group members share a
//! partition and how late a record may come again, so consumers keep safe
//! positions and wait long enough for gaps. NATS at 127.0.0.1:4222
//! (`TANDEM_TEST_NATS` to change; `scripts/engines up` starts it).

#[tokio::test]
async fn a_namespaced_bus_declares_what_its_engine_guarantees() {
    let address =
        std::env::var("TANDEM_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let plain = tandem_engines::open_bus(&address)
        .await
        .unwrap_or_else(|error| {
            panic!("NATS not reachable at {address}: start it with scripts/engines up ({error})")
        });
    let separator = if address.contains('?') { '&' } else { '?' };
    let namespaced = tandem_engines::open_bus(&format!("{address}{separator}namespace=guarantees"))
        .await
        .expect("the namespaced bus opens");
    assert!(plain.shares_partitions(), "NATS members share a partition");
    assert_eq!(namespaced.shares_partitions(), plain.shares_partitions());
    assert!(!plain.redelivery_delay_max().is_zero());
    assert_eq!(
        namespaced.redelivery_delay_max(),
        plain.redelivery_delay_max()
    );
}

/// Reads until a record comes or `wait` passes; acks what it read.
async fn first_record(
    subscription: &mut dyn tandem::bus::Subscription,
    wait: std::time::Duration,
) -> Option<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline {
        if let Some(tandem::bus::Delivery::Records(records)) = subscription
            .next(10, std::time::Duration::from_millis(200))
            .await
            .expect("next")
        {
            subscription.ack(&records).await.expect("ack");
            return Some(records[0].payload.clone());
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespaced_bus_forgets_its_own_group() {
    let address =
        std::env::var("TANDEM_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let separator = if address.contains('?') { '&' } else { '?' };
    let namespace = format!(
        "forget{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let bus = tandem_engines::open_bus(&format!("{address}{separator}namespace={namespace}"))
        .await
        .unwrap_or_else(|error| {
            panic!("NATS not reachable at {address}: start it with scripts/engines up ({error})")
        });
    let topics = vec!["shelf".to_owned()];
    bus.publish(&[tandem::bus::OutgoingRecord {
        topic: "shelf".into(),
        key: "k".into(),
        payload: b"once".to_vec(),
    }])
    .await
    .unwrap();
    let wait = std::time::Duration::from_secs(10);
    let mut member = bus.subscribe("reader", &topics).await.unwrap();
    assert_eq!(
        first_record(&mut *member, wait).await.as_deref(),
        Some(&b"once"[..])
    );
    drop(member);
    // The group's durable keeps its acknowledgement: nothing comes again.
    let mut member = bus.subscribe("reader", &topics).await.unwrap();
    assert_eq!(
        first_record(&mut *member, std::time::Duration::from_secs(1)).await,
        None
    );
    drop(member);
    // Forgotten, the group starts afresh: its durable was deleted, under
    // the namespace's own name.
    bus.forget_group("reader", &topics).await.unwrap();
    let mut member = bus.subscribe("reader", &topics).await.unwrap();
    assert_eq!(
        first_record(&mut *member, wait).await.as_deref(),
        Some(&b"once"[..])
    );
}
