//! Retention on NATS: the streams Tandem creates carry the retention rule,
//! and a consumer whose next messages the stream no longer holds stops
//! and says so, where a durable would quietly start at the first message
//! left.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{connect, unique_prefix, Namespace};
use tandem::bus::{Bus, OutgoingRecord};
use tandem_testkit::{deposit_bytes, TOPIC};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn created_streams_carry_the_retention_rule() {
    let prefix = unique_prefix();
    let bus = connect(
        &prefix,
        "&retain_log=36h&retain_log_bytes=5000000&retain_log_records=900",
    )
    .await;
    let namespace = Namespace(bus.clone());
    bus.publish(&[OutgoingRecord {
        topic: TOPIC.into(),
        key: "k".into(),
        payload: b"x".to_vec(),
    }])
    .await
    .unwrap();
    let jetstream = async_nats::jetstream::new(bus.client().clone());
    let mut stream = jetstream.get_stream(bus.stream_name(TOPIC)).await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert_eq!(config.max_age, Duration::from_secs(36 * 3600));
    assert_eq!(config.max_bytes, 5_000_000);
    assert_eq!(config.max_messages, 900);

    let default = connect(&unique_prefix(), "").await;
    let _default_namespace = Namespace(default.clone());
    default
        .publish(&[OutgoingRecord {
            topic: TOPIC.into(),
            key: "k".into(),
            payload: b"x".to_vec(),
        }])
        .await
        .unwrap();
    let mut stream = jetstream
        .get_stream(default.stream_name(TOPIC))
        .await
        .unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert_eq!(config.max_age, Duration::from_secs(7 * 24 * 3600));
    drop(namespace);
}

/// The stream drops its three first messages (a purge: what `max_age` or
/// `max_msgs` do on their own schedule); a consumer that starts from
/// offset 0 is told that records 0..3 are gone and applies nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_behind_the_retention_stops_and_skips_nothing() {
    let prefix = unique_prefix();
    let bus = connect(&prefix, "").await;
    let _namespace = Namespace(bus.clone());
    bus.publish(
        &(1..=5)
            .map(|sequence| OutgoingRecord {
                topic: TOPIC.into(),
                key: "late".into(),
                payload: deposit_bytes("late", sequence, 1),
            })
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let jetstream = async_nats::jetstream::new(bus.client().clone());
    let stream = jetstream.get_stream(bus.stream_name(TOPIC)).await.unwrap();
    // Everything below stream sequence 4 (offsets 0, 1, 2).
    let purged = stream.purge().sequence(4).await.unwrap();
    assert_eq!(purged.purged, 3);
    assert_eq!(bus.start_offsets(TOPIC).await.unwrap(), vec![(0, 3)]);

    tandem_testkit::behind::a_consumer_behind_the_log_start_stops_and_says_why(
        Arc::new(bus),
        &format!("records 0..3 of {TOPIC}/0"),
        WAIT,
    )
    .await;
}

/// A changed rule reaches a stream that exists when its publisher starts
/// with it; a subscriber with another rule leaves the stream as it is.
#[tokio::test(flavor = "multi_thread")]
async fn a_publisher_brings_an_existing_stream_to_its_rule() {
    let prefix = unique_prefix();
    let record = || OutgoingRecord {
        topic: TOPIC.into(),
        key: "k".into(),
        payload: b"x".to_vec(),
    };
    let first = connect(&prefix, "&retain_log_records=900").await;
    let namespace = Namespace(first.clone());
    first.publish(&[record()]).await.unwrap();
    let jetstream = async_nats::jetstream::new(first.client().clone());
    let max_messages = || async {
        let mut stream = jetstream
            .get_stream(first.stream_name(TOPIC))
            .await
            .unwrap();
        stream.info().await.unwrap().config.max_messages
    };
    assert_eq!(max_messages().await, 900);

    let subscriber = connect(&prefix, "&retain_log_records=5").await;
    let _subscription = subscriber
        .subscribe("readers", &[TOPIC.to_owned()])
        .await
        .unwrap();
    assert_eq!(max_messages().await, 900, "a subscriber changed the rule");

    let publisher = connect(&prefix, "&retain_log_records=5").await;
    publisher.publish(&[record()]).await.unwrap();
    assert_eq!(max_messages().await, 5, "the publisher's rule");
    drop(namespace);
}
