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
