//! Kafka-specific behaviour against a real broker (`TANDEM_TEST_KAFKA`,
//! default `kafka://127.0.0.1:19092`): CloudEvents headers, consumer
//! groups splitting partitions and handing them over, positions applied
//! on every assignment.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tandem::bus::{Bus, Delivery, OutgoingRecord, Record, Subscription, TopicPartition};
use tandem::store::Store;
use tandem_kafka::KafkaBus;
use tandem_testkit::conformance::unique;
use tandem_testkit::Deposited;

const DEADLINE: Duration = Duration::from_secs(60);

fn record(topic: &str, key: &str, payload: impl Into<Vec<u8>>) -> OutgoingRecord {
    OutgoingRecord {
        topic: topic.to_owned(),
        key: key.to_owned(),
        payload: payload.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_carry_cloudevents_headers_in_structured_mode() {
    let bus = common::connect().await;
    let _scratch = common::Scratch::new(&bus);
    let topic = unique("headers");
    let dir = tempfile::tempdir().unwrap();
    let store = tandem_testkit::open_store(&dir.path().join("s.db")).await;
    let source = topic.clone();
    let envelope = store
        .write(move |tx| {
            tandem::outbox::publish(
                tx,
                &source,
                "acct-7",
                &Deposited {
                    account_id: "acct-7".into(),
                    amount_cents: 42,
                },
            )
        })
        .await
        .unwrap();
    let payload = envelope.to_json();
    bus.publish(&[
        record(&topic, "acct-7", payload.clone()),
        record(&topic, "acct-7", b"not an envelope".to_vec()),
    ])
    .await
    .unwrap();

    // Read the records back with a plain consumer, headers included.
    let ends = bus.end_offsets(&topic).await.unwrap();
    let (partition, _) = *ends
        .iter()
        .find(|(_, end)| *end == 2)
        .expect("both in one partition");
    let url = common::test_url();
    let brokers = url
        .trim_start_matches("kafka://")
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let read_topic = topic.clone();
    let messages = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", unique("headers-reader"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&read_topic, partition as i32, Offset::Offset(0))
            .unwrap();
        consumer.assign(&list).unwrap();
        let mut messages = Vec::new();
        let give_up = std::time::Instant::now() + DEADLINE;
        while messages.len() < 2 && std::time::Instant::now() < give_up {
            if let Some(message) = consumer.poll(Duration::from_millis(200)) {
                let message = message.unwrap();
                let headers: BTreeMap<String, String> = message
                    .headers()
                    .map(|headers| {
                        headers
                            .iter()
                            .map(|header| {
                                (
                                    header.key.to_owned(),
                                    String::from_utf8_lossy(header.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                messages.push((
                    message.key().map(<[u8]>::to_vec),
                    message.payload().map(<[u8]>::to_vec),
                    headers,
                ));
            }
        }
        messages
    })
    .await
    .unwrap();
    assert_eq!(messages.len(), 2, "{messages:?}");
    let (key, value, headers) = &messages[0];
    assert_eq!(key.as_deref(), Some(&b"acct-7"[..]));
    assert_eq!(
        value.as_deref(),
        Some(&payload[..]),
        "the value is the whole envelope"
    );
    let expected: BTreeMap<String, String> = [
        ("content-type", "application/cloudevents+json".to_owned()),
        ("ce_specversion", "1.0".to_owned()),
        ("ce_id", envelope.id.to_string()),
        ("ce_source", topic.clone()),
        ("ce_type", "Deposited".to_owned()),
        ("ce_subject", "acct-7".to_owned()),
        ("ce_time", tandem::envelope::format_time(envelope.time)),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value))
    .collect();
    assert_eq!(headers, &expected);
    let (_, value, headers) = &messages[1];
    assert_eq!(value.as_deref(), Some(&b"not an envelope"[..]));
    assert!(
        headers.is_empty(),
        "no CloudEvents headers on a non-envelope: {headers:?}"
    );
}

/// One member of a group as a test drives it: what it holds and what it read.
struct Member {
    name: &'static str,
    subscription: Box<dyn Subscription>,
    held: BTreeSet<TopicPartition>,
    /// Where each held partition was sought, and the records read since.
    sought: BTreeMap<TopicPartition, u64>,
    read: BTreeMap<TopicPartition, Vec<Record>>,
    assignments: Vec<Delivery>,
}

impl Member {
    async fn join(bus: &KafkaBus, name: &'static str, group: &str, topic: &str) -> Self {
        Self {
            name,
            subscription: bus.subscribe(group, &[topic.to_owned()]).await.unwrap(),
            held: BTreeSet::new(),
            sought: BTreeMap::new(),
            read: BTreeMap::new(),
            assignments: Vec::new(),
        }
    }

    /// One `next`; assigned partitions are sought where `position` says,
    /// after `settle` (so a bus that fetched before the seek would show it).
    async fn step(&mut self, position: &dyn Fn(&TopicPartition) -> u64, settle: Duration) {
        let delivery = self
            .subscription
            .next(100, Duration::from_millis(200))
            .await
            .unwrap();
        match delivery {
            None => {}
            Some(Delivery::Assigned(partitions)) => {
                self.assignments
                    .push(Delivery::Assigned(partitions.clone()));
                tokio::time::sleep(settle).await;
                for partition in partitions {
                    let offset = position(&partition);
                    self.subscription.seek(&partition, offset).await.unwrap();
                    self.sought.insert(partition.clone(), offset);
                    self.read.insert(partition.clone(), Vec::new());
                    assert!(
                        self.held.insert(partition.clone()),
                        "{} assigned {partition:?} twice",
                        self.name
                    );
                }
            }
            Some(Delivery::Revoked(partitions)) => {
                self.assignments.push(Delivery::Revoked(partitions.clone()));
                for partition in partitions {
                    assert!(
                        self.held.remove(&partition),
                        "{} lost {partition:?} it did not hold",
                        self.name
                    );
                    self.sought.remove(&partition);
                }
            }
            Some(Delivery::Records(records)) => {
                for record in records {
                    let partition = TopicPartition::new(record.topic.clone(), record.partition);
                    assert!(
                        self.held.contains(&partition),
                        "{} got a record of {partition:?} it does not hold",
                        self.name
                    );
                    let read = self.read.entry(partition.clone()).or_default();
                    let expected = read
                        .last()
                        .map_or(self.sought[&partition], |last| last.offset + 1);
                    assert_eq!(
                        record.offset, expected,
                        "{}: {partition:?} must continue from the offset sought, densely",
                        self.name
                    );
                    read.push(record);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_splits_partitions_and_hands_them_over_from_the_sought_offsets() {
    let bus = common::connect().await;
    let _scratch = common::Scratch::new(&bus);
    let topic = unique("group");
    let group = unique("members");
    // Records in every partition before anyone joins.
    let keys: Vec<String> = (0..32).map(|index| format!("key-{index}")).collect();
    let batch: Vec<OutgoingRecord> = keys
        .iter()
        .map(|key| record(&topic, key, b"1".to_vec()))
        .collect();
    bus.publish(&batch).await.unwrap();
    let ends: BTreeMap<u32, u64> = bus.end_offsets(&topic).await.unwrap().into_iter().collect();
    let all: BTreeSet<TopicPartition> = ends
        .keys()
        .map(|partition| TopicPartition::new(topic.clone(), *partition))
        .collect();
    assert!(all.len() >= 2, "need two partitions: {ends:?}");
    assert!(
        ends.values().all(|end| *end > 0),
        "every partition has records: {ends:?}"
    );

    // Positions as a consumer's database would keep them: 1 everywhere
    // (record 0 counts as handled already).
    let from_one = |_: &TopicPartition| 1;
    let mut first = Member::join(&bus, "first", &group, &topic).await;
    let mut second = Member::join(&bus, "second", &group, &topic).await;
    let give_up = tokio::time::Instant::now() + DEADLINE;
    loop {
        assert!(
            tokio::time::Instant::now() < give_up,
            "the group did not settle: first holds {:?}, second {:?}",
            first.held,
            second.held
        );
        first.step(&from_one, Duration::from_millis(300)).await;
        second.step(&from_one, Duration::from_millis(300)).await;
        let union: BTreeSet<_> = first.held.union(&second.held).cloned().collect();
        let disjoint = first.held.is_disjoint(&second.held);
        let read_all = all.iter().all(|partition| {
            let holder = if first.held.contains(partition) {
                &first
            } else {
                &second
            };
            holder.read.get(partition).is_some_and(|read| {
                read.last().map(|last| last.offset + 1) == Some(ends[&partition.partition])
            })
        });
        if union == all && disjoint && !first.held.is_empty() && !second.held.is_empty() && read_all
        {
            break;
        }
    }
    // Each member read its partitions from the offset sought: 1.. end.
    for member in [&first, &second] {
        for partition in &member.held {
            let offsets: Vec<u64> = member.read[partition]
                .iter()
                .map(|record| record.offset)
                .collect();
            let expected: Vec<u64> = (1..ends[&partition.partition]).collect();
            assert_eq!(offsets, expected, "{} read {partition:?}", member.name);
        }
    }

    // The second member leaves; its partitions move to the first, which
    // seeks them to where the second stopped (its "database").
    let handed: BTreeSet<TopicPartition> = second.held.clone();
    let stopped_at: BTreeMap<TopicPartition, u64> = handed
        .iter()
        .map(|partition| (partition.clone(), ends[&partition.partition]))
        .collect();
    drop(second);
    // New records while the hand-over happens.
    bus.publish(&batch).await.unwrap();
    let ends: BTreeMap<u32, u64> = bus.end_offsets(&topic).await.unwrap().into_iter().collect();
    let assignments_before = first.assignments.len();
    let position = |partition: &TopicPartition| {
        stopped_at
            .get(partition)
            .copied()
            .unwrap_or_else(|| ends[&partition.partition] - 1)
    };
    let give_up = tokio::time::Instant::now() + DEADLINE;
    loop {
        assert!(
            tokio::time::Instant::now() < give_up,
            "the first member did not take over: holds {:?}",
            first.held
        );
        first.step(&position, Duration::from_millis(300)).await;
        if first.held == all
            && all.iter().all(|partition| {
                first.read[partition].last().map(|last| last.offset + 1)
                    == Some(ends[&partition.partition])
            })
        {
            break;
        }
    }
    let changes = &first.assignments[assignments_before..];
    assert!(
        matches!(changes.last(), Some(Delivery::Assigned(_))),
        "the hand-over ends with an assignment: {changes:?}"
    );
    for partition in &handed {
        let offsets: Vec<u64> = first.read[partition]
            .iter()
            .map(|record| record.offset)
            .collect();
        let expected: Vec<u64> = (stopped_at[partition]..ends[&partition.partition]).collect();
        assert_eq!(
            offsets, expected,
            "{partition:?} continues where the second member stopped, nothing before the seek"
        );
    }

    // A seek to 0 replays a partition from its first record.
    let replayed = all.iter().next().unwrap().clone();
    first.subscription.seek(&replayed, 0).await.unwrap();
    first.sought.insert(replayed.clone(), 0);
    first.read.insert(replayed.clone(), Vec::new());
    let give_up = tokio::time::Instant::now() + DEADLINE;
    while first.read[&replayed].len() < ends[&replayed.partition] as usize {
        assert!(tokio::time::Instant::now() < give_up, "replay incomplete");
        first.step(&position, Duration::ZERO).await;
    }
    assert_eq!(
        first.read[&replayed].len() as u64,
        ends[&replayed.partition]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_fails_connect_naming_it() {
    let started = std::time::Instant::now();
    let error = match KafkaBus::connect("kafka://127.0.0.1:1?connect_timeout_ms=3000").await {
        Ok(_) => panic!("nothing listens on port 1"),
        Err(error) => error,
    };
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let message = error.to_string();
    assert!(message.contains("127.0.0.1:1"), "{message}");
    assert!(
        matches!(error, tandem::BusError::Unavailable(_)),
        "{error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_topic_names_and_urls_are_refused() {
    let bus = common::connect().await;
    for topic in ["a b", "a/b"] {
        let result = bus.publish(&[record(topic, "k", b"x".to_vec())]).await;
        assert!(
            matches!(result, Err(tandem::BusError::Invalid(_))),
            "{topic}: {result:?}"
        );
    }
    let result = KafkaBus::connect("kafka://127.0.0.1:1?no.such.property=1").await;
    assert!(
        matches!(result, Err(tandem::BusError::Invalid(_))),
        "{:?}",
        result.err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_not_sought_starts_at_zero_once_the_assignment_was_handed_out() {
    let bus = common::connect().await;
    let _scratch = common::Scratch::new(&bus);
    let topic = unique("unsought");
    let batch: Vec<OutgoingRecord> = (0..5)
        .map(|index| record(&topic, "one-key", format!("{index}")))
        .collect();
    bus.publish(&batch).await.unwrap();
    let mut subscription = bus
        .subscribe(&unique("group"), std::slice::from_ref(&topic))
        .await
        .unwrap();
    let first = subscription.next(100, DEADLINE).await.unwrap();
    assert!(matches!(first, Some(Delivery::Assigned(_))), "{first:?}");
    let mut offsets = Vec::new();
    let give_up = tokio::time::Instant::now() + DEADLINE;
    while offsets.len() < 5 {
        assert!(tokio::time::Instant::now() < give_up, "read {offsets:?}");
        match subscription
            .next(100, Duration::from_millis(500))
            .await
            .unwrap()
        {
            Some(Delivery::Records(records)) => {
                offsets.extend(records.iter().map(|record| record.offset))
            }
            None => {}
            Some(other) => panic!("{other:?}"),
        }
    }
    assert_eq!(offsets, vec![0, 1, 2, 3, 4]);
}
