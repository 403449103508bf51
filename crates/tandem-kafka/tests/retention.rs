//! Retention on Kafka: the topics Tandem creates carry the retention rule,
//! and a consumer whose next records the broker deleted stops and says so
//! instead of jumping over them. Runs its own broker (the tansu that
//! `scripts/engines up` builds) with a one-second maintenance cycle, so
//! that retention actually runs during the test.

mod common;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tandem::bus::{Bus, OutgoingRecord};
use tandem_kafka::KafkaBus;
use tandem_testkit::{deposit_bytes, eventually, TOPIC};

const WAIT: Duration = Duration::from_secs(60);

fn client(address: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", address);
    config
}

/// Topics that Tandem creates carry `cleanup.policy=delete` and the
/// `retention.ms` (and `retention.bytes`) of the bus URL, 7 days by default.
#[tokio::test(flavor = "multi_thread")]
async fn created_topics_carry_the_retention_rule() {
    let bus = common::connect().await;
    let _scratch = common::Scratch::new(&bus);
    let url = format!(
        "{}{}retain_log=36h&retain_log_bytes=5000000",
        common::test_url(),
        if common::test_url().contains('?') {
            '&'
        } else {
            '?'
        }
    );
    let configured = KafkaBus::connect(&url).await.expect("connect");
    let _scratch_too = common::Scratch::new(&configured);
    let default_topic = format!("kept-{}", uuid::Uuid::now_v7().simple());
    let configured_topic = format!("short-{}", uuid::Uuid::now_v7().simple());
    bus.ensure_topics(&[&default_topic]).await.unwrap();
    configured
        .ensure_topics(&[&configured_topic])
        .await
        .unwrap();

    let address = common::test_url()
        .trim_start_matches("kafka://")
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let admin: AdminClient<DefaultClientContext> = client(&address).create().expect("admin");
    let described = admin
        .describe_configs(
            &[
                ResourceSpecifier::Topic(&default_topic),
                ResourceSpecifier::Topic(&configured_topic),
            ],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("describe configs");
    let value = |index: usize, name: &str| -> Option<String> {
        let resource = described[index].as_ref().expect("a described topic");
        resource.get(name).and_then(|entry| entry.value.clone())
    };
    assert_eq!(value(0, "cleanup.policy").as_deref(), Some("delete"));
    assert_eq!(value(0, "retention.ms").as_deref(), Some("604800000"));
    assert_eq!(value(1, "retention.ms").as_deref(), Some("129600000"));
    assert_eq!(value(1, "retention.bytes").as_deref(), Some("5000000"));
}

/// A topic of one partition on `broker` with `old` records an hour old
/// (older than its ten-minute rule), and the bus on it.
async fn topic_with_old_records(
    broker: &tandem_testkit::tansu::PrivateTansu,
    old: u64,
) -> Arc<KafkaBus> {
    let url = format!("kafka://{}?partitions=1&retain_log=10m", broker.address);
    let bus = Arc::new(KafkaBus::connect(&url).await.expect("connect"));
    // One partition, record timestamps as the producer writes them, so
    // that the first records can be made an hour old.
    let admin: AdminClient<DefaultClientContext> = client(&broker.address).create().expect("admin");
    let created = admin
        .create_topics(
            &[NewTopic::new(TOPIC, 1, TopicReplication::Fixed(1))
                .set("cleanup.policy", "delete")
                .set("retention.ms", "600000")
                .set("message.timestamp.type", "CreateTime")],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic");
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    let producer: FutureProducer = client(&broker.address).create().expect("producer");
    let hour_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 3_600_000;
    for sequence in 1..=old {
        let payload = deposit_bytes("late", sequence, 1);
        producer
            .send(
                FutureRecord::to(TOPIC)
                    .key("late")
                    .payload(&payload)
                    .partition(0)
                    .timestamp(hour_ago),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(error, _)| error)
            .expect("an old record");
    }
    bus
}

/// Once retention has deleted every record of a partition, its start and
/// end are both where the next record goes (the broker's high watermark),
/// not 0: a consumer that had read none of them is behind, and one that
/// had read them all is not.
#[tokio::test(flavor = "multi_thread")]
async fn a_partition_retention_emptied_starts_and_ends_at_its_high_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let broker = tandem_testkit::tansu::start(dir.path()).await;
    let bus = topic_with_old_records(&broker, 3).await;
    assert_eq!(bus.end_offsets(TOPIC).await.unwrap(), vec![(0, 3)]);
    eventually("the broker's retention deletes every record", WAIT, || {
        let bus = Arc::clone(&bus);
        async move { bus.start_offsets(TOPIC).await.ok() == Some(vec![(0, 3)]) }
    })
    .await;
    assert_eq!(bus.end_offsets(TOPIC).await.unwrap(), vec![(0, 3)]);
    assert_eq!(bus.payload_at(TOPIC, 0, 2).await.unwrap(), None);
}

/// Three records older than the topic's retention are deleted by the
/// broker; a consumer that starts from offset 0 is told that records 0..3
/// are gone, and applies neither them nor the two that follow.
#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_behind_the_retention_stops_and_skips_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = tandem_testkit::tansu::start(dir.path()).await;
    let bus = topic_with_old_records(&broker, 3).await;
    bus.publish(
        &(4..=5)
            .map(|sequence| OutgoingRecord {
                topic: TOPIC.into(),
                key: "late".into(),
                payload: deposit_bytes("late", sequence, 1),
            })
            .collect::<Vec<_>>(),
    )
    .await
    .expect("two recent records");
    eventually(
        "the broker's retention deletes the old records",
        WAIT,
        || {
            let bus = Arc::clone(&bus);
            async move { bus.start_offsets(TOPIC).await.ok() == Some(vec![(0, 3)]) }
        },
    )
    .await;
    assert_eq!(bus.end_offsets(TOPIC).await.unwrap(), vec![(0, 5)]);

    tandem_testkit::behind::a_consumer_behind_the_log_start_stops_and_says_why(
        bus,
        &format!("records 0..3 of {TOPIC}/0"),
        WAIT,
    )
    .await;
}
