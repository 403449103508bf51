//! Conformance suites for the two ports, `Bus` and `Store`.
//!
//! Each check is a generic async function that relies only on the traits
//! (`Bus`/`Subscription`, `Store`/`Tx`) and the toolkit's own functions
//! (`tandem::outbox`, `tandem::consumer`, `tandem::dead_letter`), with
//! portable SQL (`$1` placeholders, types both SQLite and PostgreSQL read).
//! The macros `bus_conformance!` and `store_conformance!` expand every check
//! into one `#[tokio::test]` inside a module named after the engine, so an
//! engine joins the suite with one line:
//!
//! ```ignore
//! tandem_testkit::bus_conformance!(embedded, embedded_log(), BusFeatures { .. });
//! tandem_testkit::store_conformance!(sqlite, sqlite_store(), StoreFeatures { .. });
//! ```
//!
//! The third argument declares what the engine guarantees where engines
//! differ (how a group divides the work, how a lease is released), one flag
//! per guarantee; the checks of leadership and consumer groups at the end
//! of this file assert what each flag promises.
//!
//! Every engine crate runs the very same checks from its own
//! `tests/conformance.rs`; the test binary needs `tokio` with the
//! `macros` and `rt-multi-thread` features.
//!
//! The factory expression is evaluated once per test and must yield a
//! future of a [`Fresh`] engine: empty, owned by that test alone.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use tandem::bus::{Bus, BusError, Delivery, OutgoingRecord, Record, Subscription, TopicPartition};
use tandem::store::{Store, StoreError, Tx};

/// How long a check waits for records that were published before it gives up.
const DEADLINE: Duration = Duration::from_secs(20);

/// A fresh engine, and whatever keeps its storage alive (a temporary
/// directory, a scratch database, a namespace on a broker).
pub struct Fresh<E> {
    pub engine: E,
    _keep_alive: Box<dyn Any + Send + Sync>,
    peer: Option<OpenPeer<E>>,
}

/// Opens another handle on a fresh engine's storage, as another process
/// would (see [`Fresh::with_peer`]).
type OpenPeer<E> = Box<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = E> + Send>> + Send + Sync>;

impl<E> Fresh<E> {
    pub fn new(engine: E, keep_alive: impl Any + Send + Sync) -> Self {
        Self {
            engine,
            _keep_alive: Box::new(keep_alive),
            peer: None,
        }
    }

    /// How to open the same storage again, with connections (and locks) of
    /// its own, as a second process of the same service would: the lease
    /// and standby checks need it.
    pub fn with_peer<F, Fut>(mut self, open: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = E> + Send + 'static,
    {
        self.peer = Some(Box::new(move || Box::pin(open())));
        self
    }

    /// A second handle on this engine's storage; panics when the engine
    /// crate gave no way to open one ([`Fresh::with_peer`]).
    pub async fn open_peer(&self) -> E {
        let open = self
            .peer
            .as_ref()
            .expect("this check opens the storage twice: give the factory's Fresh a with_peer");
        open().await
    }
}

/// A name no other test uses, for topics and groups on shared brokers.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

#[doc(hidden)]
#[macro_export]
macro_rules! conformance_tests {
    (
        $engine:ident, $factory:expr, $suite:ident, [$($check:ident),+ $(,)?]
        // Checks that also take what the engine declares it guarantees.
        $(, featured: $featured_suite:ident, $features_ty:ty = $features:expr,
            [$($featured:ident),+ $(,)?])?
    ) => {
        mod $engine {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    $crate::conformance::$suite::$check(|| $factory).await;
                }
            )+
            $(
                use $crate::conformance::$featured_suite as featured_checks;
                fn features() -> $features_ty {
                    $features
                }
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $featured() {
                        featured_checks::$featured(|| $factory, features()).await;
                    }
                )+
            )?
        }
    };
}

/// One `#[tokio::test]` per bus check, in `mod $engine`; `$factory` is an
/// expression yielding a future of `Fresh<impl Bus>`, `$features` the
/// [`BusFeatures`] the engine declares.
#[macro_export]
macro_rules! bus_conformance {
    ($engine:ident, $factory:expr, $features:expr) => {
        $crate::conformance_tests!(
            $engine,
            $factory,
            bus_checks,
            [
                records_of_one_key_come_back_in_publish_order_with_dense_offsets,
                first_delivery_assigns_every_partition_of_the_subscribed_topics,
                seek_redelivers_from_the_given_offset,
                end_offsets_count_the_records_of_each_partition,
                payload_at_reads_the_record_at_an_offset_and_nothing_beyond_the_end,
                one_publish_to_several_topics_lands_each_record_in_its_topic,
                a_waiting_subscriber_is_woken_by_a_publish,
                publishing_to_an_empty_topic_name_is_an_error,
                an_empty_publish_changes_nothing,
                the_same_key_always_maps_to_the_same_partition,
            ],
            featured: bus_group_checks,
            $crate::conformance::BusFeatures = $features,
            [
                a_bus_declares_one_way_of_sharing_a_group_and_its_trait_agrees,
                two_members_of_a_group_divide_the_records_as_declared,
                records_a_member_left_unacked_go_to_another_member,
            ]
        );
    };
}

/// One `#[tokio::test]` per store check, in `mod $engine`; `$factory` is an
/// expression yielding a future of `Fresh<impl Store>` whose toolkit tables
/// are installed (and that can open its storage again,
/// [`Fresh::with_peer`]), `$features` the [`StoreFeatures`] the engine
/// declares.
#[macro_export]
macro_rules! store_conformance {
    ($engine:ident, $factory:expr, $features:expr) => {
        $crate::conformance_tests!(
            $engine,
            $factory,
            store_checks,
            [
                a_write_whose_closure_fails_leaves_no_trace,
                committed_writes_are_visible_to_read,
                a_unique_violation_is_a_conflict,
                a_unique_index_violation_is_a_conflict,
                a_not_null_or_check_violation_is_an_engine_error_not_a_conflict,
                a_failed_group_commit_fails_every_job_of_the_group_as_an_engine_error,
                rolling_back_to_a_savepoint_undoes_only_the_inner_part,
                a_failed_statement_undone_by_a_savepoint_leaves_the_transaction_usable,
                concurrent_writes_are_serialised,
                outbox_sequences_are_gap_free_per_aggregate_from_one,
                a_batch_append_numbers_each_aggregate_on_from_where_it_stood,
                a_stale_expected_sequence_is_a_conflict_and_writes_nothing,
                outbox_read_after_returns_events_in_position_order,
                an_outbox_commit_bumps_the_outbox_signal,
                toolkit_tables_exist_after_open,
                a_renamed_tables_index_takes_its_new_name,
                a_consumer_applies_duplicated_and_reordered_deliveries_once_in_order,
                failure_groups_and_pages_by_group_agree_with_each_letters_group,
            ],
            featured: store_lease_checks,
            $crate::conformance::StoreFeatures = $features,
            [
                a_lease_has_one_holder_per_name_and_is_released_on_drop,
                one_relay_leads_and_a_standby_takes_over,
            ]
        );
    };
}

// ---------------------------------------------------------------------------
// Bus checks.

pub mod bus_checks {
    use super::*;

    fn record(topic: &str, key: &str, payload: impl Into<Vec<u8>>) -> OutgoingRecord {
        OutgoingRecord {
            topic: topic.to_owned(),
            key: key.to_owned(),
            payload: payload.into(),
        }
    }

    /// Subscribes and takes the first delivery, which must be the assignment;
    /// seeks every assigned partition to 0. Returns the assigned partitions.
    async fn subscribe_from_start(
        bus: &dyn Bus,
        group: &str,
        topics: &[String],
    ) -> (Box<dyn Subscription>, Vec<TopicPartition>) {
        let mut subscription = bus.subscribe(group, topics).await.expect("subscribe");
        let first = subscription
            .next(100, DEADLINE)
            .await
            .expect("first delivery");
        let Some(Delivery::Assigned(assigned)) = first else {
            panic!("the first delivery must be the assignment, got {first:?}");
        };
        for partition in &assigned {
            subscription
                .seek(partition, 0)
                .await
                .expect("seek assigned partition");
        }
        (subscription, assigned)
    }

    /// Reads until `count` records arrived (failing past the deadline, or if
    /// more than `count` arrive), checking that every delivery keeps offset
    /// order within each partition.
    async fn read_records(subscription: &mut dyn Subscription, count: usize) -> Vec<Record> {
        let give_up = tokio::time::Instant::now() + DEADLINE;
        let mut records: Vec<Record> = Vec::new();
        while records.len() < count {
            let now = tokio::time::Instant::now();
            assert!(
                now < give_up,
                "timed out with {} of {count} records read",
                records.len()
            );
            let wait = (give_up - now).min(Duration::from_secs(1));
            match subscription.next(64, wait).await.expect("next") {
                None => {}
                Some(Delivery::Records(batch)) => {
                    let mut last: BTreeMap<(String, u32), u64> = BTreeMap::new();
                    for record in &batch {
                        let place = (record.topic.clone(), record.partition);
                        if let Some(previous) = last.insert(place, record.offset) {
                            assert!(
                                record.offset > previous,
                                "a delivery must keep offset order within a partition: {batch:?}"
                            );
                        }
                    }
                    records.extend(batch);
                }
                Some(other) => panic!("unexpected delivery while reading: {other:?}"),
            }
        }
        assert_eq!(records.len(), count, "more records than were published");
        records
    }

    fn partition_count(ends: &[(u32, u64)]) -> usize {
        let partitions: BTreeSet<u32> = ends.iter().map(|(partition, _)| *partition).collect();
        assert_eq!(
            partitions.len(),
            ends.len(),
            "end_offsets lists a partition twice: {ends:?}"
        );
        partitions.len()
    }

    pub async fn records_of_one_key_come_back_in_publish_order_with_dense_offsets<B, F, Fut>(
        make: F,
    ) where
        B: Bus,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<B>>,
    {
        let fresh = make().await;
        let bus = &fresh.engine;
        let topic = unique("order");
        let keys: Vec<String> = (0..12).map(|index| format!("key-{index}")).collect();
        let mut published: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        let mut total = 0;
        // Several publishes, each interleaving the keys.
        for round in 0..5 {
            let batch: Vec<OutgoingRecord> = (0..keys.len() * 3)
                .map(|index| {
                    let key = &keys[(index * 7 + round) % keys.len()];
                    let payload = format!("{key}/{round}/{index}").into_bytes();
                    published
                        .entry(key.clone())
                        .or_default()
                        .push(payload.clone());
                    record(&topic, key, payload)
                })
                .collect();
            total += batch.len();
            bus.publish(&batch).await.expect("publish");
        }
        let (mut subscription, _) =
            subscribe_from_start(bus, &unique("group"), std::slice::from_ref(&topic)).await;
        let records = read_records(&mut *subscription, total).await;

        let mut offsets: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        let mut received: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        for record in &records {
            assert_eq!(record.topic, topic);
            offsets
                .entry(record.partition)
                .or_default()
                .push(record.offset);
            received
                .entry(record.key.clone())
                .or_default()
                .push(record.payload.clone());
        }
        for (partition, offsets) in &offsets {
            let dense: Vec<u64> = (0..offsets.len() as u64).collect();
            assert_eq!(
                offsets, &dense,
                "partition {partition}: offsets must be dense from 0, in order"
            );
        }
        assert_eq!(
            received, published,
            "each key's records must come back in publish order"
        );
    }

    pub async fn first_delivery_assigns_every_partition_of_the_subscribed_topics<B, F, Fut>(make: F)
    where
        B: Bus,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<B>>,
    {
        let fresh = make().await;
        let bus = &fresh.engine;
        let topics = vec![unique("first"), unique("second")];
        let other = unique("not-subscribed");
        for topic in topics.iter().chain([&other]) {
            let batch: Vec<OutgoingRecord> = (0..8)
                .map(|index| record(topic, &format!("k{index}"), b"x".to_vec()))
                .collect();
            bus.publish(&batch).await.expect("publish");
        }
        let mut expected = BTreeSet::new();
        for topic in &topics {
            let ends = bus.end_offsets(topic).await.expect("end offsets");
            assert!(!ends.is_empty(), "topic {topic} has no partitions");
            for (partition, _) in ends {
                expected.insert(TopicPartition::new(topic.clone(), partition));
            }
        }
        let mut subscription = bus
            .subscribe(&unique("group"), &topics)
            .await
            .expect("subscribe");
        let first = subscription
            .next(100, DEADLINE)
            .await
            .expect("first delivery");
        let Some(Delivery::Assigned(assigned)) = first else {
            panic!("the first delivery must be the assignment, got {first:?}");
        };
        let assigned_set: BTreeSet<TopicPartition> = assigned.iter().cloned().collect();
        assert_eq!(
            assigned_set.len(),
            assigned.len(),
            "a partition was assigned twice: {assigned:?}"
        );
        assert_eq!(
            assigned_set, expected,
            "every partition of the subscribed topics, and only those"
        );
    }

    pub async fn seek_redelivers_from_the_given_offset<B, F, Fut>(make: F)
    where
        B: Bus,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<B>>,
    {
        let fresh = make().await;
        let bus = &fresh.engine;
        let topic = unique("seek");
        let batch: Vec<OutgoingRecord> = (0..10)
            .map(|index| record(&topic, "one-key", format!("payload-{index}")))
            .collect();
        bus.publish(&batch).await.expect("publish");
        let (mut subscription, _) =
            subscribe_from_start(bus, &unique("group"), std::slice::from_ref(&topic)).await;
        let first_pass = read_records(&mut *subscription, 10).await;
        let partition = TopicPartition::new(topic.clone(), first_pass[0].partition);

        subscription.seek(&partition, 4).await.expect("seek to 4");
        let second_pass = read_records(&mut *subscription, 6).await;
        assert_eq!(
            second_pass,
            first_pass[4..].to_vec(),
            "after a seek to 4, records 4.. come again, unchanged"
        );

        subscription.seek(&partition, 0).await.expect("seek to 0");
        let third_pass = read_records(&mut *subscription, 10).await;
        assert_eq!(
            third_pass, first_pass,
            "a seek back to 0 replays everything"
        );
    }

    pub async fn end_offsets_count_the_records_of_each_partition<B, F, Fut>(make: F)
    where
        B: Bus,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<B>>,
    {
        let fresh = make().await;
        let bus = &fresh.engine;
        let topic = unique("ends");
        let before = bus.end_offsets(&topic).await.expect("end offsets");
        assert!(
            before.iter().all(|(_, end)| *end == 0),
            "a topic nobody wrote to is empty: {before:?}"
        );
        let mut total = 0;
        for round in 1..=3 {
            let batch: Vec<OutgoingRecord> = (0..round * 9)
                .map(|index| record(&topic, &format!("k{}", index % 11), b"x".to_vec()))
                .collect();
            total += batch.len();
            bus.publish(&batch).await.expect("publish");
        }
        let ends = bus.end_offsets(&topic).await.expect("end offsets");
        let partitions = partition_count(&ends);
        let (mut subscription, assigned) =
            subscribe_from_start(bus, &unique("group"), std::slice::from_ref(&topic)).await;
        assert_eq!(assigned.len(), partitions);
        let records = read_records(&mut *subscription, total).await;
        let mut counted: BTreeMap<u32, u64> =
            ends.iter().map(|(partition, _)| (*partition, 0)).collect();
        for record in &records {
            *counted
                .get_mut(&record.partition)
                .unwrap_or_else(|| panic!("record in unlisted partition {}", record.partition)) +=
                1;
        }
        let ends: BTreeMap<u32, u64> = ends.into_iter().collect();
        assert_eq!(ends, counted, "end offset = records in the partition");
        assert_eq!(ends.values().sum::<u64>(), total as u64);
    }

    pub async fn payload_at_reads_the_record_at_an_offset_and_nothing_beyond_the_end<B, F, Fut>(
        make: F,
    ) where
        B: Bus,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<B>>,
    {
        let fresh = make().await;
        let bus = &fresh.engine;
        let topic = unique("payload");
        let batch: Vec<OutgoingRecord> = (0..12)
            .map(|index| {
                record(
                    &topic,
                    &format!("k{}", index % 5),
                    format!("payload {index}").into_bytes(),
                )
            })
            .collect();
        bus.publish(&batch).await.expect("publish");
        let ends = bus.end_offsets(&topic).await.expect("end offsets");
        let (mut subscription, _) =
            subscribe_from_start(bus, &unique("group"), std::slice::from_ref(&topic)).await;
        let records = read_records(&mut *subscription, batch.len()).await;
        for record in &records {
            let found = bus
                .payload_at(&topic, record.partition, record.offset)
                .await
                .expect("payload at an offset");
            assert_eq!(
                found.as_deref(),
                Some(record.payload.as_slice()),
                "the payload at {}/{}",
                record.partition,
                record.offset
            );
        }
        for (partition, end) in ends {
            assert_eq!(
                bus.payload_at(&topic, partition, end)
                    .await
                    .expect("payload at the end"),
                None,
                "nothing at the end offset of partition {partition}"
            );
        }
    }

    pub async fn one_publish_to_several_topics_lands_each_record_in_its_topic<B, F, Fut>(make: F)
    where
        B: Bus,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<B>>,
    {
        let fresh = make().await;
        let bus = &fresh.engine;
        let topics = [unique("alpha"), unique("beta"), unique("gamma")];
        let batch: Vec<OutgoingRecord> = (0..30)
            .map(|index| {
                let topic = &topics[index % topics.len()];
                record(
                    topic,
                    &format!("k{}", index % 4),
                    format!("{topic}/{index}").into_bytes(),
                )
            })
            .collect();
        bus.publish(&batch).await.expect("publish");
        for topic in &topics {
            let expected: Vec<&OutgoingRecord> = batch
                .iter()
                .filter(|record| &record.topic == topic)
                .collect();
            let ends = bus.end_offsets(topic).await.expect("end offsets");
            assert_eq!(
                ends.iter().map(|(_, end)| *end).sum::<u64>(),
                expected.len() as u64,
                "records of {topic}"
            );
            let (mut subscription, _) =
                subscribe_from_start(bus, &unique("group"), std::slice::from_ref(topic)).await;
            let records = read_records(&mut *subscription, expected.len()).await;
            let mut received: Vec<(String, String, Vec<u8>)> = records
                .into_iter()
                .map(|record| (record.topic, record.key, record.payload))
                .collect();
            let mut wanted: Vec<(String, String, Vec<u8>)> = expected
                .into_iter()
                .map(|record| {
                    (
                        record.topic.clone(),
                        record.key.clone(),
                        record.payload.clone(),
                    )
                })
                .collect();
            received.sort();
            wanted.sort();
            assert_eq!(received, wanted, "topic {topic} holds exactly its records");
        }
    }

    pub async fn a_waiting_subscriber_is_woken_by_a_publish<B, F, Fut>(make: F)
    where
        B: Bus,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<B>>,
    {
        let fresh = make().await;
        let bus = &fresh.engine;
        let topic = unique("wake");
        let (mut subscription, _) =
            subscribe_from_start(bus, &unique("group"), std::slice::from_ref(&topic)).await;
        let max_wait = Duration::from_secs(10);
        let mut waiting = subscription.next(100, max_wait);
        // Nothing was published: the subscriber is still waiting a moment later.
        let early = tokio::time::timeout(Duration::from_millis(200), &mut waiting).await;
        assert!(
            early.is_err(),
            "next returned before anything was published: {early:?}"
        );
        let wake = [record(&topic, "k", b"wake up".to_vec())];
        let started = tokio::time::Instant::now();
        let (delivery, published) = tokio::join!(&mut waiting, bus.publish(&wake));
        let elapsed = started.elapsed();
        published.expect("publish");
        let delivery = delivery.expect("next");
        let Some(Delivery::Records(records)) = delivery else {
            panic!("the waiting subscriber must get the record, got {delivery:?}");
        };
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].payload, b"wake up");
        assert!(
            elapsed < Duration::from_secs(5),
            "woken after {elapsed:?}, not by the publish (max_wait {max_wait:?})"
        );
    }

    pub async fn publishing_to_an_empty_topic_name_is_an_error<B, F, Fut>(make: F)
    where
        B: Bus,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<B>>,
    {
        let fresh = make().await;
        let bus = &fresh.engine;
        let result = bus.publish(&[record("", "k", b"x".to_vec())]).await;
        assert!(
            matches!(result, Err(BusError::Invalid(_))),
            "an empty topic name must be refused as invalid: {result:?}"
        );
    }

    pub async fn an_empty_publish_changes_nothing<B, F, Fut>(make: F)
    where
        B: Bus,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<B>>,
    {
        let fresh = make().await;
        let bus = &fresh.engine;
        let topic = unique("empty");
        bus.publish(&[record(&topic, "k", b"x".to_vec())])
            .await
            .expect("publish");
        let before = bus.end_offsets(&topic).await.expect("end offsets");
        bus.publish(&[]).await.expect("an empty publish succeeds");
        let after = bus.end_offsets(&topic).await.expect("end offsets");
        assert_eq!(before, after);
        assert_eq!(after.iter().map(|(_, end)| *end).sum::<u64>(), 1);
    }

    pub async fn the_same_key_always_maps_to_the_same_partition<B, F, Fut>(make: F)
    where
        B: Bus,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<B>>,
    {
        let fresh = make().await;
        let bus = &fresh.engine;
        let topic = unique("keys");
        let keys: Vec<String> = (0..40).map(|index| format!("aggregate-{index}")).collect();
        let mut total = 0;
        // The same keys in several publishes, in a different order each time.
        for round in 0..4 {
            let batch: Vec<OutgoingRecord> = (0..keys.len())
                .map(|index| {
                    let key = &keys[(index * (2 * round + 1) + round) % keys.len()];
                    record(&topic, key, format!("{round}").into_bytes())
                })
                .collect();
            total += batch.len();
            bus.publish(&batch).await.expect("publish");
        }
        let (mut subscription, assigned) =
            subscribe_from_start(bus, &unique("group"), std::slice::from_ref(&topic)).await;
        let records = read_records(&mut *subscription, total).await;
        let mut partitions_of: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
        for record in &records {
            partitions_of
                .entry(record.key.clone())
                .or_default()
                .insert(record.partition);
        }
        assert_eq!(partitions_of.len(), keys.len());
        for (key, partitions) in &partitions_of {
            assert_eq!(
                partitions.len(),
                1,
                "key {key} landed in partitions {partitions:?}"
            );
        }
        // With more than one partition, forty keys do not all share one.
        if assigned.len() > 1 {
            let used: BTreeSet<u32> = partitions_of.values().flatten().copied().collect();
            assert!(
                used.len() > 1,
                "forty keys all landed in partition {used:?} of {}",
                assigned.len()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Failure groups, as stored and counted by the store.

/// The failure groups as [`tandem::dead_letter::failure_group`] makes them
/// from each letter (the way they were counted before the store kept
/// them): by group, with the first letter's consumer, event type, reason
/// and masked error, largest first, then by group.
pub fn failure_groups_of(
    letters: &[&tandem::dead_letter::DeadLetter],
) -> Vec<tandem::dead_letter::FailureGroup> {
    use tandem::dead_letter::{failure_group, masked, FailureGroup};
    let mut groups: BTreeMap<String, FailureGroup> = BTreeMap::new();
    for letter in letters {
        let key = failure_group(letter);
        let entry = groups.entry(key.clone()).or_insert_with(|| FailureGroup {
            group: key,
            consumer: letter.consumer.clone(),
            event_type: letter.event_type.clone(),
            reason: letter.reason.clone(),
            error: masked(&letter.error),
            count: 0,
            first_seen_micros: letter.first_failed_at_micros,
            last_seen_micros: letter.last_failed_at_micros,
        });
        entry.count += 1;
        entry.first_seen_micros = entry.first_seen_micros.min(letter.first_failed_at_micros);
        entry.last_seen_micros = entry.last_seen_micros.max(letter.last_failed_at_micros);
    }
    let mut groups: Vec<_> = groups.into_values().collect();
    groups.sort_by(|a, b| b.count.cmp(&a.count).then(a.group.cmp(&b.group)));
    groups
}

/// Applies the engine's schema migrations up to `version`, recording
/// each, as a build whose last migration was `version` did: for tests
/// that make a database of that build and upgrade it.
pub fn migrate_to(tx: &mut dyn Tx, version: i64) -> Result<(), StoreError> {
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS tandem_schema_version (
             version     BIGINT PRIMARY KEY,
             description TEXT   NOT NULL,
             applied_at  BIGINT NOT NULL
         )",
    )?;
    let from = tandem::schema::schema_version(tx)?;
    for step in tx.engine().migrations() {
        if step.version <= from || step.version > version {
            continue;
        }
        (step.apply)(tx)?;
        tx.execute(
            "INSERT INTO tandem_schema_version (version, description, applied_at)
             VALUES ($1, $2, 0)",
            tandem::params![step.version, step.description],
        )?;
    }
    Ok(())
}

/// Writes `count` dead letters as a build before schema migration 3 did,
/// with no `failure_group`: three consumers, a dozen causes whose errors
/// name ids and numbers (masked alike), events that did not decode (no
/// event type), and every tenth letter resolved, every seventeenth
/// discarded. For the schema tests of that migration.
pub fn insert_letters_without_groups(tx: &mut dyn Tx, count: usize) -> Result<(), StoreError> {
    const CONSUMERS: [&str; 3] = [
        "inventory-reservations",
        "order-local-copies",
        "order-settlement",
    ];
    for index in 0..count {
        let n = i64::try_from(index).unwrap_or(i64::MAX);
        let consumer = CONSUMERS[index % 3];
        let (event_type, reason, error) = match index % 4 {
            0 => (
                Some("OrderPlaced"),
                "handler",
                format!(
                    "unknown product \"0192f3a4-5b6c-7d8e-9f00-{:012x}\"",
                    n * 7919
                ),
            ),
            1 => (
                Some("OrderCancelled"),
                "blocked",
                format!("blocked behind dead letter {}", n / 2 + 1),
            ),
            2 => (
                None,
                "decode",
                format!(
                    "invalid envelope: expected value at line 1 column {}",
                    n % 97
                ),
            ),
            _ => (
                Some("OrderPlaced"),
                if index % 8 == 3 { "handler" } else { "store" },
                format!(
                    "customer cus-{n} has {} open orders, order ord-{n}x is one too many",
                    n % 13
                ),
            ),
        };
        let status = if index % 17 == 0 {
            "discarded"
        } else if index % 10 == 0 {
            "resolved"
        } else {
            "parked"
        };
        let subject = format!("agg-{}", index % 50);
        tx.execute(
            "INSERT INTO tandem_dead_letters (consumer, topic, partition, record_offset, event_id,
               source, subject, sequence, event_type, payload, reason, error, attempts,
               first_failed_at, last_failed_at, status)
             VALUES ($1, 'order', 0, $2, NULL, $3, $4, $5, $6, $7, $8, $9, 1, $10, $11, $12)",
            &[
                tandem::Param::Text(consumer),
                tandem::Param::Int(n),
                tandem::Param::from(event_type.map(|_| "order")),
                tandem::Param::from(event_type.map(|_| subject.as_str())),
                tandem::Param::from(event_type.map(|_| n / 50 + 1)),
                tandem::Param::from(event_type),
                tandem::Param::Blob(format!("payload {index}").as_bytes()),
                tandem::Param::Text(reason),
                tandem::Param::Text(&error),
                tandem::Param::Int(1_700_000_000_000_000 + n * 1_000_003 % 5_000_000_000),
                tandem::Param::Int(1_700_000_000_000_000 + 5_000_000_000 + n),
                tandem::Param::Text(status),
            ],
        )?;
    }
    Ok(())
}

/// Checks the store's dead letters: every letter's stored group is its
/// [`tandem::dead_letter::failure_group`]; for each filter (each status,
/// each consumer, a consumer with no letter, none), the failure groups the
/// store counts are [`failure_groups_of`] the letters it admits, and each
/// group's letters, paged by cursor (`page`, a few at a time) and taken by
/// `ids_in`, are exactly the admitted letters of that group, in id order.
pub async fn assert_failure_groups_agree<S: Store>(store: &S, page: usize) {
    use tandem::dead_letter::{self, failure_group, DeadLetter, Filter};
    let letters = dead_letter::list(store, None, true)
        .await
        .expect("list dead letters");
    let stored: BTreeMap<i64, Option<String>> = store
        .read(|tx| -> Result<_, StoreError> {
            tx.query("SELECT id, failure_group FROM tandem_dead_letters", &[])?
                .iter()
                .map(|row| Ok((row.i64(0)?, row.opt_text(1)?.map(str::to_owned))))
                .collect()
        })
        .await
        .expect("read the stored groups");
    for letter in &letters {
        assert_eq!(
            stored[&letter.id].as_deref(),
            Some(failure_group(letter).as_str()),
            "the stored group of {letter:?}"
        );
    }
    let consumers: BTreeSet<&str> = letters
        .iter()
        .map(|letter| letter.consumer.as_str())
        .chain(["someone-else"])
        .collect();
    let mut filters = vec![Filter::default()];
    for status in ["parked", "resolved", "discarded"] {
        filters.push(Filter {
            status: Some(status.into()),
            ..Filter::default()
        });
    }
    for consumer in consumers {
        filters.push(Filter {
            consumer: Some(consumer.into()),
            status: Some("parked".into()),
            group: None,
        });
        filters.push(Filter {
            consumer: Some(consumer.into()),
            ..Filter::default()
        });
    }
    for filter in filters {
        let admitted: Vec<&DeadLetter> = letters
            .iter()
            .filter(|letter| {
                filter
                    .status
                    .as_ref()
                    .is_none_or(|status| *status == letter.status)
                    && filter
                        .consumer
                        .as_ref()
                        .is_none_or(|consumer| *consumer == letter.consumer)
            })
            .collect();
        let expected = failure_groups_of(&admitted);
        let groups = dead_letter::groups(store, filter.clone())
            .await
            .expect("failure groups");
        assert_eq!(groups, expected, "the failure groups of {filter:?}");
        for group in &expected {
            let by_group = Filter {
                group: Some(group.group.clone()),
                ..filter.clone()
            };
            let mut paged = Vec::new();
            let mut after = None;
            loop {
                let letters = dead_letter::page(store, by_group.clone(), after, page)
                    .await
                    .expect("a page of a group");
                assert!(letters.len() <= page, "a page of at most {page}");
                let Some(last) = letters.last() else { break };
                after = Some(last.id);
                paged.extend(letters.iter().map(|letter| letter.id));
            }
            let expected_ids: Vec<i64> = admitted
                .iter()
                .filter(|letter| failure_group(letter) == group.group)
                .map(|letter| letter.id)
                .collect();
            assert_eq!(paged, expected_ids, "the letters of {by_group:?}");
            let ids = store
                .read({
                    let by_group = by_group.clone();
                    move |tx| dead_letter::ids_in(tx, &by_group, 100_000)
                })
                .await
                .expect("the ids of a group");
            assert_eq!(ids, expected_ids, "the ids of {by_group:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// Store checks.

pub mod store_checks {
    use super::*;
    use tandem::{consumer, dead_letter, outbox, params, NewEvent};

    const TABLE: &str = "CREATE TABLE conformance_items (
        id     TEXT   PRIMARY KEY,
        amount BIGINT NOT NULL,
        note   TEXT,
        ratio  DOUBLE PRECISION
    )";

    async fn with_table<S: Store>(store: &S) {
        store
            .write(|tx| tx.execute_batch(TABLE))
            .await
            .expect("create conformance_items");
    }

    fn insert(tx: &mut dyn Tx, id: &str, amount: i64) -> Result<u64, StoreError> {
        tx.execute(
            "INSERT INTO conformance_items (id, amount) VALUES ($1, $2)",
            params![id, amount],
        )
    }

    async fn items<S: Store>(store: &S) -> Vec<(String, i64)> {
        store
            .read(|tx| -> Result<Vec<(String, i64)>, StoreError> {
                tx.query("SELECT id, amount FROM conformance_items ORDER BY id", &[])?
                    .iter()
                    .map(|row| Ok((row.text(0)?.to_owned(), row.i64(1)?)))
                    .collect()
            })
            .await
            .expect("read items")
    }

    fn deposit(subject: &str, amount: i64) -> NewEvent {
        NewEvent::new(
            subject,
            &crate::Deposited {
                account_id: subject.to_owned(),
                amount_cents: amount,
            },
        )
        .expect("event")
    }

    async fn all_events<S: Store>(store: &S) -> Vec<outbox::StoredEvent> {
        store
            .read(|tx| outbox::read_after(tx, 0, 10_000))
            .await
            .expect("read outbox")
    }

    pub async fn a_write_whose_closure_fails_leaves_no_trace<S, F, Fut>(make: F)
    where
        S: Store,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<S>>,
    {
        let fresh = make().await;
        let store = &fresh.engine;
        with_table(store).await;
        let result: Result<(), StoreError> = store
            .write(|tx| {
                insert(tx, "ghost", 1)?;
                outbox::append(tx, "conformance", deposit("ghost", 1))?;
                Err(StoreError::Engine("the business rule said no".into()))
            })
            .await;
        match result {
            Err(StoreError::Engine(message)) => assert_eq!(message, "the business rule said no"),
            other => panic!("the closure's own error must come back: {other:?}"),
        }
        assert!(items(store).await.is_empty(), "the row was rolled back");
        assert!(
            all_events(store).await.is_empty(),
            "the event was rolled back"
        );
        // The aggregate's sequence was not taken either.
        let envelope = store
            .write(|tx| outbox::append(tx, "conformance", deposit("ghost", 2)))
            .await
            .expect("append");
        assert_eq!(envelope.sequence, 1);
    }

    pub async fn committed_writes_are_visible_to_read<S, F, Fut>(make: F)
    where
        S: Store,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<S>>,
    {
        let fresh = make().await;
        let store = &fresh.engine;
        with_table(store).await;
        let changed = store
            .write(|tx| -> Result<u64, StoreError> {
                let mut changed = insert(tx, "a", 1)?;
                changed += tx.execute(
                    "INSERT INTO conformance_items (id, amount, note, ratio) VALUES ($1, $2, $3, $4)",
                    params!["b", -7_i64, "héllo 'quoted' $1", 0.5_f64],
                )?;
                changed += tx.execute(
                    "INSERT INTO conformance_items (id, amount, note, ratio) VALUES ($1, $2, $3, $4)",
                    params!["c", i64::MAX, None::<&str>, None::<f64>],
                )?;
                Ok(changed)
            })
            .await
            .expect("write");
        assert_eq!(changed, 3, "execute reports the rows it changed");
        let updated = store
            .write(|tx| {
                tx.execute(
                    "UPDATE conformance_items SET amount = amount + $1 WHERE id <> $2",
                    params![10_i64, "c"],
                )
            })
            .await
            .expect("update");
        assert_eq!(updated, 2);
        let rows = store
            .read(|tx| {
                tx.query(
                    "SELECT id, amount, note, ratio FROM conformance_items ORDER BY id",
                    &[],
                )
            })
            .await
            .expect("read");
        use tandem::store::Value;
        let values: Vec<Vec<Value>> = rows.into_iter().map(|row| row.values).collect();
        assert_eq!(
            values,
            vec![
                vec![
                    Value::Text("a".into()),
                    Value::Int(11),
                    Value::Null,
                    Value::Null
                ],
                vec![
                    Value::Text("b".into()),
                    Value::Int(3),
                    Value::Text("héllo 'quoted' $1".into()),
                    Value::Real(0.5)
                ],
                vec![
                    Value::Text("c".into()),
                    Value::Int(i64::MAX),
                    Value::Null,
                    Value::Null
                ],
            ]
        );
        let missing = store
            .read(|tx| {
                tx.query_opt(
                    "SELECT id FROM conformance_items WHERE id = $1",
                    params!["zzz"],
                )
            })
            .await
            .expect("read");
        assert_eq!(missing, None);
    }

    pub async fn a_unique_violation_is_a_conflict<S, F, Fut>(make: F)
    where
        S: Store,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<S>>,
    {
        let fresh = make().await;
        let store = &fresh.engine;
        with_table(store).await;
        store
            .write(|tx| insert(tx, "dup", 1))
            .await
            .expect("first insert");
        let error = store
            .write(|tx| {
                insert(tx, "other", 2)?;
                insert(tx, "dup", 3)
            })
            .await
            .expect_err("a second row with the same key");
        assert!(
            matches!(error, StoreError::Conflict(_)),
            "a unique violation must be a Conflict: {error:?}"
        );
        assert_eq!(items(store).await, vec![("dup".to_owned(), 1)]);
    }

    /// A table with a unique column besides its key, a NOT NULL column and a
    /// CHECK, for the error-mapping checks.
    const RULES_TABLE: &str = "CREATE TABLE conformance_rules (
        id     BIGINT PRIMARY KEY,
        email  TEXT   NOT NULL UNIQUE,
        amount BIGINT NOT NULL CHECK (amount >= 0)
    )";

    fn insert_rule(
        tx: &mut dyn Tx,
        id: i64,
        email: Option<&str>,
        amount: i64,
    ) -> Result<u64, StoreError> {
        tx.execute(
            "INSERT INTO conformance_rules (id, email, amount) VALUES ($1, $2, $3)",
            params![id, email, amount],
        )
    }

    async fn rule_ids<S: Store>(store: &S) -> Vec<i64> {
        store
            .read(|tx| -> Result<Vec<i64>, StoreError> {
                tx.query("SELECT id FROM conformance_rules ORDER BY id", &[])?
                    .iter()
                    .map(|row| row.i64(0))
                    .collect()
            })
            .await
            .expect("read rules")
    }

    /// The driver's own error stays reachable under a store error, so a
    /// log line that follows the chain says what failed underneath.
    fn assert_engine_error_is_the_source(error: &StoreError) {
        let source = std::error::Error::source(error)
            .unwrap_or_else(|| panic!("the engine's error is kept as the source: {error:?}"));
        assert!(
            !source.to_string().is_empty(),
            "the source says something: {error:?}"
        );
    }

    pub async fn a_unique_index_violation_is_a_conflict<S, F, Fut>(make: F)
    where
        S: Store,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<S>>,
    {
        let fresh = make().await;
        let store = &fresh.engine;
        store
            .write(|tx| tx.execute_batch(RULES_TABLE))
            .await
            .expect("create conformance_rules");
        store
            .write(|tx| insert_rule(tx, 1, Some("a@example.com"), 1))
            .await
            .expect("first insert");
        let error = store
            .write(|tx| insert_rule(tx, 2, Some("a@example.com"), 1))
            .await
            .expect_err("a second row with the same unique column");
        assert!(
            matches!(error, StoreError::Conflict(_)),
            "a unique-column violation must be a Conflict: {error:?}"
        );
        assert_engine_error_is_the_source(&error);
        let error = store
            .write(|tx| insert_rule(tx, 1, Some("b@example.com"), 1))
            .await
            .expect_err("a second row with the same primary key");
        assert!(
            matches!(error, StoreError::Conflict(_)),
            "a primary-key violation must be a Conflict: {error:?}"
        );
        assert_eq!(rule_ids(store).await, vec![1]);
    }

    pub async fn a_not_null_or_check_violation_is_an_engine_error_not_a_conflict<S, F, Fut>(make: F)
    where
        S: Store,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<S>>,
    {
        // Only a uniqueness rule means "someone else got there first"; a
        // broken NOT NULL or CHECK is a bug in the writer, never retried as
        // a conflict.
        let fresh = make().await;
        let store = &fresh.engine;
        store
            .write(|tx| tx.execute_batch(RULES_TABLE))
            .await
            .expect("create conformance_rules");
        let error = store
            .write(|tx| insert_rule(tx, 1, None, 1))
            .await
            .expect_err("a NULL in a NOT NULL column");
        assert!(
            matches!(error, StoreError::Engine(_)),
            "a NOT NULL violation must be an Engine error, not a Conflict: {error:?}"
        );
        assert_engine_error_is_the_source(&error);
        let error = store
            .write(|tx| insert_rule(tx, 2, Some("a@example.com"), -1))
            .await
            .expect_err("a row the CHECK refuses");
        assert!(
            matches!(error, StoreError::Engine(_)),
            "a CHECK violation must be an Engine error, not a Conflict: {error:?}"
        );
        assert!(rule_ids(store).await.is_empty(), "nothing was written");
    }

    pub async fn a_failed_group_commit_fails_every_job_of_the_group_as_an_engine_error<S, F, Fut>(
        make: F,
    ) where
        S: Store,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<S>>,
    {
        // A foreign key checked at commit (DEFERRABLE INITIALLY DEFERRED)
        // makes a commit fail on demand, with the engine up: the group's
        // commit fails for every job in it, and since retrying the same
        // work fails again, that is an Engine error (an engine that went
        // away would make it Unavailable).
        let fresh = make().await;
        let store = &fresh.engine;
        store
            .write(|tx| {
                tx.execute_batch(
                    "CREATE TABLE conformance_parents (id BIGINT PRIMARY KEY);
                     CREATE TABLE conformance_children (
                         id     BIGINT PRIMARY KEY,
                         parent BIGINT NOT NULL REFERENCES conformance_parents (id)
                                DEFERRABLE INITIALLY DEFERRED
                     )",
                )
            })
            .await
            .expect("create the tables");
        fn insert_child(tx: &mut dyn Tx, id: i64, parent: i64) -> Result<u64, StoreError> {
            tx.execute(
                "INSERT INTO conformance_children (id, parent) VALUES ($1, $2)",
                params![id, parent],
            )
        }
        async fn children<S: Store>(store: &S) -> i64 {
            store
                .read(|tx| -> Result<i64, StoreError> {
                    tx.query_opt("SELECT COUNT(*) FROM conformance_children", &[])?
                        .ok_or_else(|| StoreError::Decode("no count".into()))?
                        .i64(0)
                })
                .await
                .expect("count children")
        }

        // Alone, the orphan fails at its own commit.
        let error = store
            .write(|tx| insert_child(tx, 1, 99))
            .await
            .expect_err("an orphan fails at commit");
        assert!(
            matches!(error, StoreError::Engine(_)),
            "a commit refused by a deferred constraint must be an Engine error: {error:?}"
        );

        // Hold the writer with one job, queue two more behind it (a store
        // queues a write when it is called), then let go: the two run as
        // one group, and the orphan fails the group's commit for both.
        let (started, started_here) = tokio::sync::oneshot::channel::<()>();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let holder = store.write(move |tx| {
            let _ = started.send(());
            let _ = released.recv_timeout(DEADLINE);
            tx.execute(
                "INSERT INTO conformance_parents (id) VALUES ($1)",
                params![1_i64],
            )
        });
        tokio::time::timeout(DEADLINE, started_here)
            .await
            .expect("the holding job starts")
            .expect("the holding job runs");
        let orphan = store.write(|tx| insert_child(tx, 2, 99));
        let child = store.write(|tx| insert_child(tx, 3, 1));
        release.send(()).expect("release the writer");
        holder.await.expect("the holding job commits alone");
        let orphan = orphan.await.expect_err("the group's commit fails");
        let child = child.await.expect_err("the group's commit fails for all");
        for error in [&orphan, &child] {
            match error {
                StoreError::Engine(message) => assert!(
                    message.message().contains("group commit failed"),
                    "the error says the group's commit failed: {message}"
                ),
                other => panic!("a failed group commit must be an Engine error: {other:?}"),
            }
        }
        assert_eq!(children(store).await, 0, "nothing of the group committed");

        // The store goes on.
        store
            .write(|tx| insert_child(tx, 4, 1))
            .await
            .expect("a write after the failed group");
        assert_eq!(children(store).await, 1);
    }

    pub async fn rolling_back_to_a_savepoint_undoes_only_the_inner_part<S, F, Fut>(make: F)
    where
        S: Store,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<S>>,
    {
        let fresh = make().await;
        let store = &fresh.engine;
        with_table(store).await;
        store
            .write(|tx| -> Result<(), StoreError> {
                insert(tx, "outer-before", 1)?;
                tx.savepoint("inner")?;
                insert(tx, "inner", 2)?;
                tx.execute(
                    "UPDATE conformance_items SET amount = 100 WHERE id = $1",
                    params!["outer-before"],
                )?;
                tx.rollback_to_savepoint("inner")?;
                insert(tx, "outer-after", 3)?;
                // A released savepoint keeps its work.
                tx.savepoint("kept")?;
                insert(tx, "kept", 4)?;
                tx.release_savepoint("kept")?;
                // The same name can be used again after a rollback.
                tx.savepoint("inner")?;
                insert(tx, "inner-again", 5)?;
                tx.rollback_to_savepoint("inner")?;
                Ok(())
            })
            .await
            .expect("write");
        assert_eq!(
            items(store).await,
            vec![
                ("kept".to_owned(), 4),
                ("outer-after".to_owned(), 3),
                ("outer-before".to_owned(), 1),
            ]
        );
    }

    pub async fn a_failed_statement_undone_by_a_savepoint_leaves_the_transaction_usable<S, F, Fut>(
        make: F,
    ) where
        S: Store,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<S>>,
    {
        // The consumer's pattern: a handler fails inside a savepoint, the
        // savepoint is rolled back, the transaction goes on and commits.
        let fresh = make().await;
        let store = &fresh.engine;
        with_table(store).await;
        store
            .write(|tx| insert(tx, "taken", 1))
            .await
            .expect("seed");
        store
            .write(|tx| -> Result<(), StoreError> {
                insert(tx, "before", 2)?;
                tx.savepoint("handler")?;
                insert(tx, "inside", 3)?;
                let error = insert(tx, "taken", 4).expect_err("duplicate key");
                assert!(matches!(error, StoreError::Conflict(_)), "{error:?}");
                tx.rollback_to_savepoint("handler")?;
                insert(tx, "after", 5)?;
                Ok(())
            })
            .await
            .expect("the transaction commits after the savepoint rollback");
        assert_eq!(
            items(store).await,
            vec![
                ("after".to_owned(), 5),
                ("before".to_owned(), 2),
                ("taken".to_owned(), 1),
            ]
        );
    }

    pub async fn concurrent_writes_are_serialised<S, F, Fut>(make: F)
    where
        S: Store,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<S>>,
    {
        let fresh = make().await;
        let store = &fresh.engine;
        with_table(store).await;
        store
            .write(|tx| insert(tx, "counter", 0))
            .await
            .expect("seed");
        // Read-modify-write from many tasks at once: lost updates would show.
        let writers: Vec<_> = (0..32)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .write(|tx| -> Result<(), StoreError> {
                            let row = tx
                                .query_opt(
                                    "SELECT amount FROM conformance_items WHERE id = $1",
                                    params!["counter"],
                                )?
                                .ok_or_else(|| StoreError::Decode("no counter row".into()))?;
                            let value = row.i64(0)?;
                            tx.execute(
                                "UPDATE conformance_items SET amount = $1 WHERE id = $2",
                                params![value + 1, "counter"],
                            )?;
                            Ok(())
                        })
                        .await
                })
            })
            .collect();
        for writer in writers {
            writer.await.expect("writer task").expect("write");
        }
        assert_eq!(items(store).await, vec![("counter".to_owned(), 32)]);
    }

    pub async fn outbox_sequences_are_gap_free_per_aggregate_from_one<S, F, Fut>(make: F)
    where
        S: Store,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<S>>,
    {
        let fresh = make().await;
        let store = &fresh.engine;
        let mut returned: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
        // Three aggregates in two topics, over several transactions.
        for round in 0..4 {
            let envelopes = store
                .write(move |tx| -> Result<Vec<tandem::Envelope>, StoreError> {
                    let mut envelopes = Vec::new();
                    for index in 0..(round + 2) {
                        let subject = ["a", "b", "c"][(index + round) % 3];
                        envelopes.push(outbox::append(tx, "orders", deposit(subject, 1))?);
                    }
                    envelopes.push(outbox::append(tx, "payments", deposit("a", 1))?);
                    Ok(envelopes)
                })
                .await
                .expect("append");
            for envelope in envelopes {
                returned
                    .entry((envelope.source.clone(), envelope.subject.clone()))
                    .or_default()
                    .push(envelope.sequence);
            }
        }
        assert_eq!(returned.len(), 4, "{returned:?}");
        for (aggregate, sequences) in &returned {
            let expected: Vec<u64> = (1..=sequences.len() as u64).collect();
            assert_eq!(
                sequences, &expected,
                "aggregate {aggregate:?}: sequences 1..=n in append order"
            );
        }
        // The stored envelopes say the same.
        let mut stored: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
        for event in all_events(store).await {
            let envelope = tandem::Envelope::decode(&event.envelope).expect("stored envelope");
            assert_eq!(envelope.source, event.topic);
            assert_eq!(envelope.subject, event.subject);
            stored
                .entry((event.topic, event.subject))
                .or_default()
                .push(envelope.sequence);
        }
        assert_eq!(stored, returned);
    }

    pub async fn a_batch_append_numbers_each_aggregate_on_from_where_it_stood<S, F, Fut>(make: F)
    where
        S: Store,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<S>>,
    {
        let fresh = make().await;
        let store = &fresh.engine;
        with_table(store).await;
        store
            .write(|tx| outbox::append(tx, "orders", deposit("a", 1)))
            .await
            .expect("a single append");
        let subjects = ["a", "b", "a", "c", "b", "a"];
        let appended = store
            .write(move |tx| {
                let events = subjects
                    .iter()
                    .zip(10..)
                    .map(|(subject, amount)| deposit(subject, amount))
                    .collect();
                outbox::append_all(tx, "orders", events)
            })
            .await
            .expect("a batch append");
        let numbered: Vec<(&str, u64)> = appended
            .iter()
            .map(|envelope| (envelope.subject.as_str(), envelope.sequence))
            .collect();
        assert_eq!(
            numbered,
            vec![("a", 2), ("b", 1), ("a", 3), ("c", 1), ("b", 2), ("a", 4)]
        );
        // Stored in the order given, each row the envelope returned.
        let stored: Vec<Vec<u8>> = all_events(store)
            .await
            .into_iter()
            .skip(1)
            .map(|event| event.envelope)
            .collect();
        let returned: Vec<Vec<u8>> = appended.iter().map(tandem::Envelope::to_json).collect();
        assert_eq!(stored, returned);

        // A batch rolled back takes no sequence.
        let refused: Result<Vec<tandem::Envelope>, StoreError> = store
            .write(|tx| {
                outbox::append_all(tx, "orders", vec![deposit("c", 1), deposit("d", 1)])?;
                Err(StoreError::Engine("changed my mind".into()))
            })
            .await;
        assert!(refused.is_err());
        let next = store
            .write(|tx| outbox::append_all(tx, "orders", vec![deposit("d", 1), deposit("c", 1)]))
            .await
            .expect("a batch append");
        let numbered: Vec<(&str, u64)> = next
            .iter()
            .map(|envelope| (envelope.subject.as_str(), envelope.sequence))
            .collect();
        assert_eq!(numbered, vec![("d", 1), ("c", 2)]);
        let error = store
            .write(|tx| outbox::append_all(tx, "orders", vec![deposit("e", 1), deposit("", 1)]))
            .await
            .expect_err("an empty subject");
        assert!(matches!(error, StoreError::Engine(_)), "{error:?}");
        assert_eq!(
            all_events(store).await.len(),
            9,
            "nothing of the failed batches"
        );
    }

    pub async fn a_stale_expected_sequence_is_a_conflict_and_writes_nothing<S, F, Fut>(make: F)
    where
        S: Store,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<S>>,
    {
        let fresh = make().await;
        let store = &fresh.engine;
        with_table(store).await;
        let first = store
            .write(|tx| outbox::append(tx, "orders", deposit("a", 1).expect_sequence(0)))
            .await
            .expect("a new aggregate expects 0");
        assert_eq!(first.sequence, 1);

        for (subject, expected) in [("a", 0_u64), ("a", 5), ("new", 3)] {
            let error = store
                .write(move |tx| -> Result<(), StoreError> {
                    insert(tx, &format!("side-effect-{subject}-{expected}"), 1)?;
                    outbox::append(tx, "orders", deposit(subject, 2).expect_sequence(expected))?;
                    Ok(())
                })
                .await
                .expect_err("a wrong expected sequence");
            assert!(
                matches!(error, StoreError::Conflict(_)),
                "{subject} expecting {expected}: {error:?}"
            );
        }
        assert!(items(store).await.is_empty(), "the failed writes left rows");
        let events = all_events(store).await;
        assert_eq!(events.len(), 1, "only the first event is stored");

        let second = store
            .write(|tx| outbox::append(tx, "orders", deposit("a", 3).expect_sequence(1)))
            .await
            .expect("the right expected sequence");
        assert_eq!(second.sequence, 2);
        let fresh_aggregate = store
            .write(|tx| outbox::append(tx, "orders", deposit("new", 1).expect_sequence(0)))
            .await
            .expect("the failed write did not create the aggregate");
        assert_eq!(fresh_aggregate.sequence, 1);
    }

    pub async fn outbox_read_after_returns_events_in_position_order<S, F, Fut>(make: F)
    where
        S: Store,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<S>>,
    {
        let fresh = make().await;
        let store = &fresh.engine;
        let mut appended = Vec::new();
        for round in 0..3_i64 {
            let envelopes = store
                .write(move |tx| -> Result<Vec<tandem::Envelope>, StoreError> {
                    (0..4_i64)
                        .map(|index| {
                            let subject = format!("s{}", (index + round) % 3);
                            outbox::append(tx, "orders", deposit(&subject, round * 10 + index))
                        })
                        .collect()
                })
                .await
                .expect("append");
            appended.extend(envelopes);
        }
        let events = all_events(store).await;
        assert_eq!(events.len(), appended.len());
        for pair in events.windows(2) {
            assert!(
                pair[0].position < pair[1].position,
                "positions must increase: {} then {}",
                pair[0].position,
                pair[1].position
            );
        }
        for (event, envelope) in events.iter().zip(&appended) {
            let decoded = tandem::Envelope::decode(&event.envelope).expect("stored envelope");
            assert_eq!(&decoded, envelope, "events come back in append order");
            assert_eq!(event.topic, "orders");
            assert_eq!(event.subject, envelope.subject);
        }
        let cut = events[4].position;
        let rest = store
            .read(move |tx| outbox::read_after(tx, cut, 10_000))
            .await
            .expect("read after");
        assert_eq!(rest, events[5..].to_vec(), "strictly after the position");
        let first_three = store
            .read(|tx| outbox::read_after(tx, 0, 3))
            .await
            .expect("read with a limit");
        assert_eq!(first_three, events[..3].to_vec(), "the limit is respected");
        let last = events.last().expect("events").position;
        let none = store
            .read(move |tx| outbox::read_after(tx, last, 10))
            .await
            .expect("read past the end");
        assert!(none.is_empty());
    }

    pub async fn an_outbox_commit_bumps_the_outbox_signal<S, F, Fut>(make: F)
    where
        S: Store,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<S>>,
    {
        let fresh = make().await;
        let store = &fresh.engine;
        with_table(store).await;
        let mut signal = store.outbox_signal();
        signal.borrow_and_update();
        store
            .write(|tx| insert(tx, "no-events", 1))
            .await
            .expect("write");
        let _ = store
            .write(|tx| -> Result<(), StoreError> {
                outbox::append(tx, "orders", deposit("a", 1))?;
                Err(StoreError::Engine("rolled back".into()))
            })
            .await;
        assert!(
            !signal.has_changed().expect("signal open"),
            "no outbox append committed yet"
        );
        store
            .write(|tx| outbox::append(tx, "orders", deposit("a", 1)))
            .await
            .expect("append");
        tokio::time::timeout(DEADLINE, signal.changed())
            .await
            .expect("signal bumped after an outbox commit")
            .expect("signal open");
    }

    /// What a rebuild's switch does to a read model's table and index:
    /// the index found under its built name, renamed once, and a statement
    /// that makes it under the live name (`IF NOT EXISTS`) then finds it.
    pub async fn a_renamed_tables_index_takes_its_new_name<S, F, Fut>(make: F)
    where
        S: Store,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<S>>,
    {
        let fresh = make().await;
        fresh
            .engine
            .write(|tx| -> Result<(), StoreError> {
                tx.execute_batch(
                    "CREATE TABLE IF NOT EXISTS shelf__r1 (id BIGINT PRIMARY KEY,
                       colour TEXT NOT NULL);
                     CREATE INDEX IF NOT EXISTS shelf__r1_by_colour ON shelf__r1 (colour);
                     ALTER TABLE shelf__r1 RENAME TO shelf",
                )?;
                let engine = tx.engine();
                assert!(engine.rename_index(tx, "shelf__r1_by_colour", "shelf_by_colour")?);
                assert!(
                    !engine.rename_index(tx, "shelf__r1_by_colour", "shelf_by_colour")?,
                    "the built name is gone"
                );
                tx.execute("INSERT INTO shelf (id, colour) VALUES (1, 'red')", &[])?;
                tx.execute_batch("CREATE INDEX IF NOT EXISTS shelf_by_colour ON shelf (colour)")?;
                assert!(engine.rename_index(tx, "shelf_by_colour", "shelf_by_colour_2")?);
                assert!(
                    !engine.rename_index(tx, "shelf_by_colour", "shelf_by_colour_3")?,
                    "one index under the live name, not two"
                );
                Ok(())
            })
            .await
            .expect("renaming an index");
    }

    pub async fn toolkit_tables_exist_after_open<S, F, Fut>(make: F)
    where
        S: Store,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<S>>,
    {
        let fresh = make().await;
        let store = &fresh.engine;
        let letters = dead_letter::list(store, None, true)
            .await
            .expect("dead letters table");
        assert!(letters.is_empty(), "{letters:?}");
        assert_eq!(
            dead_letter::depth(store, "anyone")
                .await
                .expect("dead letter depth"),
            0
        );
        assert!(dead_letter::get(store, 1).await.expect("get").is_none());
        let positions = consumer::positions(store, "anyone")
            .await
            .expect("consumer positions table");
        assert!(positions.is_empty(), "{positions:?}");
        assert!(all_events(store).await.is_empty(), "outbox starts empty");
        // A request for a consumer the database does not know is refused
        // (it would wait forever), and leaves no row behind.
        let refused = dead_letter::request_replay(store, "anyone").await;
        assert!(
            matches!(
                refused,
                Err(dead_letter::RequestError::UnknownConsumer { .. })
            ),
            "{refused:?}"
        );
        let requests = store
            .read(|tx| -> Result<i64, StoreError> {
                tx.query_opt("SELECT COUNT(*) FROM tandem_consumer_requests", &[])?
                    .ok_or_else(|| StoreError::Decode("no count".into()))?
                    .i64(0)
            })
            .await
            .expect("consumer requests table");
        assert_eq!(requests, 0, "a refused request stayed");
    }

    /// A consumer on this store, fed by the embedded log, applies a delivery
    /// of many aggregates with duplicates and swapped neighbours exactly
    /// once and in sequence order, in batches that each hold many
    /// aggregates: the aggregate states the consumer keeps per batch must
    /// reach the table intact, including those of aggregates first seen,
    /// updated several times and held ahead of a gap within one batch.
    pub async fn a_consumer_applies_duplicated_and_reordered_deliveries_once_in_order<S, F, Fut>(
        make: F,
    ) where
        S: Store,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<S>>,
    {
        use std::sync::Arc;
        use tandem::bus::OutgoingRecord;
        use tandem::consumer::{Consumer, ConsumerConfig};

        const ACCOUNTS: usize = 300;
        const DEPOSITS: u64 = 4;
        let fresh = make().await;
        let store = fresh.engine.clone();
        store
            .write(crate::install_ledger)
            .await
            .expect("install ledger");
        let dir = tempfile::tempdir().expect("temp dir");
        let bus: Arc<dyn Bus> = Arc::new(crate::open_log(&dir.path().join("bus.db")).await);
        let topic = crate::TOPIC;
        let record = |account: usize, sequence: u64| {
            let account_id = format!("acct-{account:03}");
            let amount = i64::try_from(sequence * 10 + account as u64).unwrap_or(0);
            OutgoingRecord {
                topic: topic.into(),
                payload: crate::deposit_bytes(&account_id, sequence, amount),
                key: account_id,
            }
        };
        // Round by round, every account's next deposit; every third account
        // gets its two middle deposits swapped and every fifth its deposits
        // duplicated.
        let mut records = Vec::new();
        for sequence in 1..=DEPOSITS {
            for account in 0..ACCOUNTS {
                let sent = if account % 3 == 0 && (sequence == 2 || sequence == 3) {
                    5 - sequence
                } else {
                    sequence
                };
                records.push(record(account, sent));
                if account % 5 == 0 {
                    records.push(record(account, sent));
                }
            }
        }
        bus.publish(&records).await.expect("publish");

        let mut config = ConsumerConfig::new(unique("conformance-ledger"), &[topic]);
        config.batch_size = 500;
        config.gap_timeout = Duration::from_secs(60);
        config.housekeeping_interval = Duration::from_millis(20);
        let consumer = Consumer::new(
            store.clone(),
            Arc::clone(&bus),
            Arc::new(crate::Ledger::new()) as Arc<dyn tandem::Handler>,
            config.clone(),
        );
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { consumer.run(shutdown).await }
        });
        let last = i64::try_from(DEPOSITS).unwrap_or(0);
        crate::eventually(
            "every account at its last deposit, or something parked",
            Duration::from_secs(60),
            || {
                let store = store.clone();
                let name = config.name.clone();
                async move {
                    let rows = crate::ledger_rows(&store).await;
                    let parked = dead_letter::depth(&store, &name).await.expect("depth");
                    parked > 0 || (rows.len() == ACCOUNTS && rows.iter().all(|row| row.3 == last))
                }
            },
        )
        .await;
        shutdown.cancel();
        task.await.expect("consumer task").expect("consumer run");

        let parked = dead_letter::list(&store, Some(&config.name), true)
            .await
            .expect("list dead letters");
        assert!(parked.is_empty(), "nothing may be parked: {parked:#?}");
        let expected: crate::LedgerRows = (0..ACCOUNTS)
            .map(|account| {
                let balance: u64 = (1..=DEPOSITS)
                    .map(|sequence| sequence * 10 + account as u64)
                    .sum();
                (
                    format!("acct-{account:03}"),
                    i64::try_from(balance).unwrap_or(0),
                    last,
                    last,
                )
            })
            .collect();
        assert_eq!(crate::ledger_rows(&store).await, expected);
        // The states written for the batch say the same.
        let states = store
            .read({
                let name = config.name.clone();
                move |tx| -> Result<Vec<(i64, Option<i64>)>, StoreError> {
                    tx.query(
                        "SELECT sequence, blocked_by FROM tandem_consumer_aggregates
                         WHERE consumer = $1",
                        params![&name],
                    )?
                    .iter()
                    .map(|row| Ok((row.i64(0)?, row.opt_i64(1)?)))
                    .collect()
                }
            })
            .await
            .expect("read aggregate states");
        assert_eq!(states.len(), ACCOUNTS, "one state per aggregate");
        assert!(
            states.iter().all(|state| *state == (last, None)),
            "every state at the last sequence, unblocked"
        );
    }

    /// Fails some deposits for good, with errors that name the account
    /// and the amount; after `again` is set, the frozen accounts fail with
    /// another error.
    struct Picky {
        again: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl tandem::Handler for Picky {
        fn handle(
            &self,
            _tx: &mut dyn Tx,
            event: &tandem::Envelope,
        ) -> Result<(), tandem::HandlerError> {
            let account: u64 = event
                .subject
                .trim_start_matches("acct-")
                .parse()
                .unwrap_or(1);
            let amount = event.data["amount_cents"].as_i64().unwrap_or(0);
            if account % 5 == 0 && event.sequence == 1 {
                if self.again.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(tandem::HandlerError::permanent(format!(
                        "account {} is still frozen after {amount} checks",
                        event.subject
                    )));
                }
                return Err(tandem::HandlerError::permanent(format!(
                    "account {} is frozen until {amount}",
                    event.subject
                )));
            }
            if account % 7 == 3 && event.sequence == 2 {
                return Err(tandem::HandlerError::permanent(format!(
                    "a deposit of {amount} cents to {} is over the limit of 1000",
                    event.subject
                )));
            }
            Ok(())
        }
    }

    /// Letters parked by a consumer for several causes (handler errors
    /// naming ids and amounts, the letters blocked behind them, payloads
    /// that do not decode) are counted by failure group and paged by group
    /// in the store, and agree with each letter's own
    /// [`dead_letter::failure_group`]: for a status, a consumer, none;
    /// after a redrive that fails with another error (the letter's group
    /// follows its error) and after a discard.
    pub async fn failure_groups_and_pages_by_group_agree_with_each_letters_group<S, F, Fut>(make: F)
    where
        S: Store,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<S>>,
    {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        use tandem::consumer::{Consumer, ConsumerConfig};

        const ACCOUNTS: u64 = 30;
        let fresh = make().await;
        let store = fresh.engine.clone();
        let dir = tempfile::tempdir().expect("temp dir");
        let bus: Arc<dyn Bus> = Arc::new(crate::open_log(&dir.path().join("bus.db")).await);
        let topic = crate::TOPIC;
        let mut records = Vec::new();
        for sequence in 1..=3_u64 {
            for account in 0..ACCOUNTS {
                let account_id = format!("acct-{account:03}");
                records.push(OutgoingRecord {
                    topic: topic.into(),
                    payload: crate::deposit_bytes(
                        &account_id,
                        sequence,
                        i64::try_from(sequence * 1000 + account).unwrap_or(0),
                    ),
                    key: account_id,
                });
            }
        }
        for n in 0..4 {
            records.push(OutgoingRecord {
                topic: topic.into(),
                key: format!("poison-{n}"),
                payload: format!("not an event {n}").into_bytes(),
            });
        }
        records.push(OutgoingRecord {
            topic: topic.into(),
            key: "odd".into(),
            payload: b"{\"json\": \"but no envelope\"}".to_vec(),
        });
        bus.publish(&records).await.expect("publish");
        // A frozen account parks its first deposit and the two behind it;
        // an account over the limit its second and the one behind it.
        let expected: u64 = (0..ACCOUNTS)
            .map(|account| match (account % 5, account % 7) {
                (0, _) => 3,
                (_, 3) => 2,
                _ => 0,
            })
            .sum::<u64>()
            + 5;

        let mut config = ConsumerConfig::new(unique("conformance-groups"), &[topic]);
        config.batch_size = 64;
        config.housekeeping_interval = Duration::from_millis(20);
        let again = Arc::new(AtomicBool::new(false));
        let consumer = Consumer::new(
            store.clone(),
            Arc::clone(&bus),
            Arc::new(Picky {
                again: Arc::clone(&again),
            }) as Arc<dyn tandem::Handler>,
            config.clone(),
        );
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { consumer.run(shutdown).await }
        });
        let name = config.name.clone();
        crate::eventually(
            "every failing deposit and poison record parked",
            Duration::from_secs(60),
            || {
                let store = store.clone();
                let name = name.clone();
                async move { dead_letter::depth(&store, &name).await.expect("depth") == expected }
            },
        )
        .await;
        crate::conformance::assert_failure_groups_agree(&store, 2).await;
        let groups = dead_letter::groups(
            &store,
            dead_letter::Filter {
                status: Some("parked".into()),
                ..Default::default()
            },
        )
        .await
        .expect("failure groups");
        assert!(
            groups.len() >= 5,
            "frozen, over the limit, blocked, two kinds of poison: {groups:#?}"
        );
        assert_eq!(
            groups.iter().map(|group| group.count).sum::<u64>(),
            expected
        );

        // A redrive that fails with another error moves the letter to the
        // group of that error; a discarded letter leaves the parked groups.
        again.store(true, Ordering::SeqCst);
        let letters = dead_letter::list(&store, Some(&name), false)
            .await
            .expect("list");
        let frozen = letters
            .iter()
            .find(|letter| {
                letter.subject.as_deref() == Some("acct-000") && letter.reason == "handler"
            })
            .expect("acct-000's first deposit parked")
            .id;
        let poison = letters
            .iter()
            .find(|letter| letter.reason == "decode")
            .expect("a poison letter parked")
            .id;
        dead_letter::request_redrive(&store, &name, Some(frozen))
            .await
            .expect("redrive");
        dead_letter::request_discard(&store, &name, Some(poison))
            .await
            .expect("discard");
        crate::eventually(
            "the redrive failed again and the discard is done",
            Duration::from_secs(60),
            || {
                let store = store.clone();
                async move {
                    let frozen = dead_letter::get(&store, frozen).await.expect("get");
                    let poison = dead_letter::get(&store, poison).await.expect("get");
                    frozen.is_some_and(|letter| letter.error.contains("still frozen"))
                        && poison.is_some_and(|letter| letter.status == "discarded")
                }
            },
        )
        .await;
        shutdown.cancel();
        task.await.expect("consumer task").expect("consumer run");
        crate::conformance::assert_failure_groups_agree(&store, 2).await;
        let refrozen = dead_letter::get(&store, frozen)
            .await
            .expect("get")
            .expect("the redriven letter");
        let alone = dead_letter::page(
            &store,
            dead_letter::Filter {
                status: Some("parked".into()),
                group: Some(dead_letter::failure_group(&refrozen)),
                ..Default::default()
            },
            None,
            10,
        )
        .await
        .expect("the redriven letter's group");
        assert_eq!(
            alone.iter().map(|letter| letter.id).collect::<Vec<_>>(),
            vec![frozen],
            "alone in its new group"
        );
    }
}

// ---------------------------------------------------------------------------
// Leadership and consumer groups: the checks that depend on what an engine
// declares it guarantees, one flag per guarantee. The engine crate passes
// its flags to the macro; a flag that a port method also reports is checked
// against that method.

/// What a store engine guarantees about leases, beyond the port's contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreFeatures {
    /// A dropped lease can be taken by another holder as soon as `drop`
    /// returns (SQLite: closing the lock file releases the `flock`). When
    /// false, it is free again within the check's deadline (PostgreSQL: the
    /// lease's own thread unlocks on its connection).
    pub lease_free_as_soon_as_dropped: bool,
}

/// How a bus divides a group's work among its members. Exactly one of the
/// first three holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusFeatures {
    /// Every member is assigned every partition and reads every record (the
    /// embedded log: one member per group is its deployment).
    pub every_member_reads_every_partition: bool,
    /// The members split the partitions: each partition is held by one
    /// member at a time (Kafka).
    pub members_split_partitions: bool,
    /// The members are all assigned the same partitions and each record
    /// goes to one of them (NATS); must agree with [`Bus::shares_partitions`].
    pub shares_partitions: bool,
    /// Records a member received and did not acknowledge go to another
    /// member when it leaves; while it lives, no other member gets them
    /// (NATS). A bus that does this says how long a redelivery may take
    /// ([`Bus::redelivery_delay_max`] above zero); one that does not says zero.
    pub redelivers_unacked_to_other_members: bool,
}

/// How long the group and leadership checks wait for a group to settle or
/// a standby to take over (broker rebalances take seconds).
const GROUP_DEADLINE: Duration = Duration::from_secs(60);

pub mod store_lease_checks {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tandem::outbox;
    use tandem::relay::{Relay, RelayConfig};
    use tokio_util::sync::CancellationToken;

    /// One holder per lease name among every handle on the storage (as
    /// every process), not re-entrant, names independent of each other
    /// (a `/` included), released when dropped.
    pub async fn a_lease_has_one_holder_per_name_and_is_released_on_drop<S, F, Fut>(
        make: F,
        features: StoreFeatures,
    ) where
        S: Store,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<S>>,
    {
        let fresh = make().await;
        let first = &fresh.engine;
        let second = fresh.open_peer().await;
        let mut lease = first
            .try_lead("relay")
            .await
            .expect("try lead")
            .expect("a free lease is taken");
        assert!(lease.held());
        assert!(
            second.try_lead("relay").await.expect("try lead").is_none(),
            "another handle on the storage took a held lease"
        );
        assert!(
            first.try_lead("relay").await.expect("try lead").is_none(),
            "not re-entrant"
        );
        assert!(lease.held(), "a refused try leaves the holder's lease held");
        let other = second.try_lead("other/name").await.expect("try lead");
        assert!(other.is_some(), "names are independent");
        drop(lease);
        if features.lease_free_as_soon_as_dropped {
            assert!(
                second.try_lead("relay").await.expect("try lead").is_some(),
                "free as soon as dropped"
            );
        } else {
            crate::eventually("the lease is free again", DEADLINE, || {
                let second = second.clone();
                async move { second.try_lead("relay").await.expect("try lead").is_some() }
            })
            .await;
        }
    }

    /// Counts the records a relay handed to the bus.
    struct Counting {
        inner: Arc<dyn Bus>,
        published: AtomicUsize,
    }

    impl Counting {
        fn new(inner: &Arc<dyn Bus>) -> Arc<Self> {
            Arc::new(Self {
                inner: Arc::clone(inner),
                published: AtomicUsize::new(0),
            })
        }

        fn count(&self) -> usize {
            self.published.load(Ordering::SeqCst)
        }
    }

    #[async_trait::async_trait]
    impl Bus for Counting {
        async fn publish(&self, records: &[OutgoingRecord]) -> Result<(), BusError> {
            self.inner.publish(records).await?;
            self.published.fetch_add(records.len(), Ordering::SeqCst);
            Ok(())
        }

        async fn subscribe(
            &self,
            group: &str,
            topics: &[String],
        ) -> Result<Box<dyn Subscription>, BusError> {
            self.inner.subscribe(group, topics).await
        }

        async fn end_offsets(&self, topic: &str) -> Result<Vec<(u32, u64)>, BusError> {
            self.inner.end_offsets(topic).await
        }

        async fn payload_at(
            &self,
            topic: &str,
            partition: u32,
            offset: u64,
        ) -> Result<Option<Vec<u8>>, BusError> {
            self.inner.payload_at(topic, partition, offset).await
        }
    }

    async fn wait_for(what: &str, condition: impl Fn() -> bool) {
        crate::eventually(what, GROUP_DEADLINE, || {
            let holds = condition();
            async move { holds }
        })
        .await;
    }

    async fn append<S: Store>(store: &S, topic: &'static str, subject: &str) -> tandem::Envelope {
        let event = crate::deposit_event(subject, 1).expect("event");
        store
            .write(move |tx| outbox::append(tx, topic, event))
            .await
            .expect("append")
    }

    /// The ids of the envelopes on `topic`, read from the start by a group
    /// of its own.
    async fn ids_on_bus(bus: &dyn Bus, topic: &str) -> Vec<String> {
        let total: u64 = bus
            .end_offsets(topic)
            .await
            .expect("end offsets")
            .iter()
            .map(|(_, end)| end)
            .sum();
        let total = usize::try_from(total).expect("a count");
        let records = crate::read_topic(bus, &unique("check"), topic, total, DEADLINE).await;
        records
            .iter()
            .map(|record| {
                tandem::Envelope::decode(&record.payload)
                    .expect("envelope")
                    .id
                    .to_string()
            })
            .collect()
    }

    /// Two relays of one name, on two handles on the storage (as two
    /// processes of a service would have): one publishes while the other
    /// stands by; when the leader goes away, task and store, the standby
    /// takes over and publishes the rest. Nothing is lost, and the
    /// standby's cursor ends past every event.
    pub async fn one_relay_leads_and_a_standby_takes_over<S, F, Fut>(
        make: F,
        _features: StoreFeatures,
    ) where
        S: Store,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<S>>,
    {
        const TOPIC: &str = "orders";
        let fresh = make().await;
        let store_a = fresh.open_peer().await;
        let store_b = fresh.open_peer().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let log: Arc<dyn Bus> = Arc::new(crate::open_log(&dir.path().join("bus.db")).await);
        let bus_a = Counting::new(&log);
        let bus_b = Counting::new(&log);
        let config = RelayConfig {
            name: "conformance-relay".into(),
            lead_retry: Duration::from_millis(50),
            lead_check: Duration::from_millis(200),
            ..RelayConfig::default()
        };
        let shutdown = CancellationToken::new();

        let relay_a = Relay::new(
            store_a.clone(),
            Arc::clone(&bus_a) as Arc<dyn Bus>,
            config.clone(),
        );
        let token = shutdown.clone();
        let leader = tokio::spawn(async move { relay_a.run(token).await });
        let mut appended = vec![append(&store_a, TOPIC, "first").await];
        wait_for("the first relay publishes", || bus_a.count() == 1).await;

        let relay_b = Relay::new(
            store_b.clone(),
            Arc::clone(&bus_b) as Arc<dyn Bus>,
            config.clone(),
        );
        let token = shutdown.clone();
        let standby = tokio::spawn(async move { relay_b.run(token).await });
        for index in 0..10 {
            let store = if index % 2 == 0 { &store_a } else { &store_b };
            appended.push(append(store, TOPIC, &format!("s{index}")).await);
        }
        let total = appended.len();
        wait_for("the leader publishes everything", || bus_a.count() == total).await;
        assert_eq!(bus_b.count(), 0, "the standby published");
        assert!(
            store_b
                .try_lead(&config.name)
                .await
                .expect("try lead")
                .is_none(),
            "the lease is held by the leader"
        );

        // The leader's process goes away: its task and its store with it.
        leader.abort();
        let _ = leader.await;
        drop(store_a);
        appended.push(append(&store_b, TOPIC, "after").await);
        wait_for("the standby takes over", || bus_b.count() >= 1).await;
        let last = appended.last().expect("appended").id.to_string();
        crate::eventually("the standby publishes the rest", GROUP_DEADLINE, || {
            let log = Arc::clone(&log);
            let last = last.clone();
            async move { ids_on_bus(log.as_ref(), TOPIC).await.contains(&last) }
        })
        .await;

        // Every event is on the bus; the only duplicates a takeover may
        // cause are a batch whose cursor the old leader had not written yet.
        let on_bus: BTreeSet<String> = ids_on_bus(log.as_ref(), TOPIC).await.into_iter().collect();
        for envelope in &appended {
            assert!(
                on_bus.contains(&envelope.id.to_string()),
                "lost {}",
                envelope.id
            );
        }
        shutdown.cancel();
        standby.await.expect("join").expect("standby relay");
        let (backlog, _) = tandem::relay::backlog(&store_b, &config.name)
            .await
            .expect("backlog");
        assert_eq!(backlog, 0, "the standby's cursor is past every event");
    }
}

pub mod bus_group_checks {
    use super::*;

    /// One member of a group as a check drives it: the partitions it holds
    /// and the records it read of each since it was assigned it.
    struct Member {
        name: &'static str,
        subscription: Box<dyn Subscription>,
        held: BTreeSet<TopicPartition>,
        read: BTreeMap<TopicPartition, Vec<Record>>,
    }

    impl Member {
        async fn join(bus: &dyn Bus, name: &'static str, group: &str, topic: &str) -> Self {
            Self {
                name,
                subscription: bus
                    .subscribe(group, &[topic.to_owned()])
                    .await
                    .expect("subscribe"),
                held: BTreeSet::new(),
                read: BTreeMap::new(),
            }
        }

        /// One `next` of at most `max_records`: assigned partitions are
        /// sought to 0, revoked ones forgotten; records must belong to a
        /// held partition and are acknowledged when `ack`. Returns how many
        /// records came.
        async fn step(&mut self, max_records: usize, wait: Duration, ack: bool) -> usize {
            match self
                .subscription
                .next(max_records, wait)
                .await
                .expect("next")
            {
                None => 0,
                Some(Delivery::Assigned(partitions)) => {
                    for partition in partitions {
                        self.subscription
                            .seek(&partition, 0)
                            .await
                            .expect("seek assigned partition");
                        assert!(
                            self.held.insert(partition.clone()),
                            "{} assigned {partition:?} twice",
                            self.name
                        );
                        self.read.insert(partition, Vec::new());
                    }
                    0
                }
                Some(Delivery::Revoked(partitions)) => {
                    for partition in partitions {
                        assert!(
                            self.held.remove(&partition),
                            "{} lost {partition:?} it did not hold",
                            self.name
                        );
                        self.read.remove(&partition);
                    }
                    0
                }
                Some(Delivery::Records(records)) => {
                    if ack {
                        self.subscription.ack(&records).await.expect("ack");
                    }
                    let count = records.len();
                    for record in records {
                        let partition = TopicPartition::new(record.topic.clone(), record.partition);
                        assert!(
                            self.held.contains(&partition),
                            "{} got a record of {partition:?} it does not hold",
                            self.name
                        );
                        self.read.entry(partition).or_default().push(record);
                    }
                    count
                }
            }
        }

        fn offsets(&self, partition: &TopicPartition) -> Vec<u64> {
            self.read
                .get(partition)
                .map(|records| records.iter().map(|record| record.offset).collect())
                .unwrap_or_default()
        }

        /// Nothing more arrives within `wait`.
        async fn quiet(&mut self, wait: Duration) {
            let more = self.subscription.next(64, wait).await.expect("next");
            assert_eq!(more, None, "{}: no more deliveries expected", self.name);
        }
    }

    fn raw(topic: &str, key: &str, payload: String) -> OutgoingRecord {
        OutgoingRecord {
            topic: topic.to_owned(),
            key: key.to_owned(),
            payload: payload.into_bytes(),
        }
    }

    async fn partitions_of(bus: &dyn Bus, topic: &str) -> BTreeSet<TopicPartition> {
        bus.end_offsets(topic)
            .await
            .expect("end offsets")
            .into_iter()
            .map(|(partition, _)| TopicPartition::new(topic, partition))
            .collect()
    }

    /// A bus declares exactly one way its groups divide partitions, and
    /// what its `Bus` methods report agrees with what it declares.
    pub async fn a_bus_declares_one_way_of_sharing_a_group_and_its_trait_agrees<B, F, Fut>(
        make: F,
        features: BusFeatures,
    ) where
        B: Bus,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<B>>,
    {
        let fresh = make().await;
        let bus = &fresh.engine;
        let ways = [
            features.every_member_reads_every_partition,
            features.members_split_partitions,
            features.shares_partitions,
        ];
        assert_eq!(
            ways.iter().filter(|way| **way).count(),
            1,
            "exactly one way of dividing a group's partitions: {features:?}"
        );
        assert_eq!(
            bus.shares_partitions(),
            features.shares_partitions,
            "Bus::shares_partitions must say what the bus declares"
        );
        assert_eq!(
            bus.redelivery_delay_max() > Duration::ZERO,
            features.redelivers_unacked_to_other_members,
            "a bus that redelivers to other members says how long it may take \
             (Bus::redelivery_delay_max {:?}); one that does not says zero",
            bus.redelivery_delay_max()
        );
    }

    /// Two members of a group, both joined before the records are
    /// published, get them as the bus declares: every member all of them;
    /// or each partition's records by the one member holding it (both
    /// holding some); or each record once over both members, both getting
    /// some.
    pub async fn two_members_of_a_group_divide_the_records_as_declared<B, F, Fut>(
        make: F,
        features: BusFeatures,
    ) where
        B: Bus,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<B>>,
    {
        let fresh = make().await;
        let bus = &fresh.engine;
        let topic = unique("share");
        let group = unique("members");
        let mut first = Member::join(bus, "first", &group, &topic).await;
        let mut second = Member::join(bus, "second", &group, &topic).await;
        let all = partitions_of(bus, &topic).await;
        assert!(!all.is_empty(), "topic {topic} has no partitions");

        // Until the group settles.
        let give_up = tokio::time::Instant::now() + GROUP_DEADLINE;
        loop {
            assert!(
                tokio::time::Instant::now() < give_up,
                "the group did not settle: first holds {:?}, second {:?}",
                first.held,
                second.held
            );
            first.step(5, Duration::from_millis(100), true).await;
            second.step(5, Duration::from_millis(100), true).await;
            let settled = if features.members_split_partitions {
                let union: BTreeSet<_> = first.held.union(&second.held).cloned().collect();
                union == all
                    && first.held.is_disjoint(&second.held)
                    && !first.held.is_empty()
                    && !second.held.is_empty()
            } else {
                first.held == all && second.held == all
            };
            if settled {
                break;
            }
        }

        let total = 200;
        let batch: Vec<OutgoingRecord> = (0..total)
            .map(|index| raw(&topic, &format!("k{}", index % 40), format!("p{index}")))
            .collect();
        bus.publish(&batch).await.expect("publish");
        let ends: BTreeMap<TopicPartition, u64> = bus
            .end_offsets(&topic)
            .await
            .expect("end offsets")
            .into_iter()
            .map(|(partition, end)| (TopicPartition::new(&topic, partition), end))
            .collect();
        assert_eq!(ends.values().sum::<u64>(), total as u64);
        let everything =
            |partition: &TopicPartition| -> Vec<u64> { (0..ends[partition]).collect() };

        let mut received = 0;
        let give_up = tokio::time::Instant::now() + GROUP_DEADLINE;
        loop {
            let done = if features.every_member_reads_every_partition {
                all.iter().all(|partition| {
                    first.offsets(partition).len() as u64 >= ends[partition]
                        && second.offsets(partition).len() as u64 >= ends[partition]
                })
            } else if features.members_split_partitions {
                all.iter().all(|partition| {
                    let holder = if first.held.contains(partition) {
                        &first
                    } else {
                        &second
                    };
                    holder.offsets(partition).len() as u64 >= ends[partition]
                })
            } else {
                received >= total
            };
            if done {
                break;
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "timed out: first read {:?}, second {:?}",
                first.read,
                second.read
            );
            for member in [&mut first, &mut second] {
                let count = member.step(5, Duration::from_millis(50), true).await;
                if count > 0 {
                    // A slow member: the other one pulls meanwhile.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                received += count;
            }
        }

        if features.every_member_reads_every_partition {
            for member in [&first, &second] {
                for partition in &all {
                    assert_eq!(
                        member.offsets(partition),
                        everything(partition),
                        "{} reads every record of {partition:?}, once, in order",
                        member.name
                    );
                }
            }
        } else if features.members_split_partitions {
            assert_eq!(
                first
                    .held
                    .union(&second.held)
                    .cloned()
                    .collect::<BTreeSet<_>>(),
                all,
                "the group still holds every partition"
            );
            assert!(first.held.is_disjoint(&second.held));
            for member in [&first, &second] {
                for partition in &member.held {
                    assert_eq!(
                        member.offsets(partition),
                        everything(partition),
                        "{} reads every record of its {partition:?}, once, in order",
                        member.name
                    );
                }
            }
        } else {
            let mut got: [Vec<(TopicPartition, u64)>; 2] = [Vec::new(), Vec::new()];
            for (index, member) in [&first, &second].into_iter().enumerate() {
                for (partition, records) in &member.read {
                    got[index].extend(
                        records
                            .iter()
                            .map(|record| (partition.clone(), record.offset)),
                    );
                }
            }
            let each: Vec<&(TopicPartition, u64)> = got.iter().flatten().collect();
            let distinct: BTreeSet<&(TopicPartition, u64)> = each.iter().copied().collect();
            assert_eq!(each.len(), total, "each record delivered once: {got:?}");
            let expected: BTreeSet<(TopicPartition, u64)> = ends
                .iter()
                .flat_map(|(partition, end)| (0..*end).map(|offset| (partition.clone(), offset)))
                .collect();
            assert_eq!(distinct, expected.iter().collect());
            assert!(
                !got[0].is_empty() && !got[1].is_empty(),
                "both members got work: {} and {}",
                got[0].len(),
                got[1].len()
            );
        }
        first.quiet(Duration::from_millis(300)).await;
        second.quiet(Duration::from_millis(300)).await;
    }

    /// On a bus that redelivers: a member takes records and leaves without
    /// acknowledging them. While it lives, another member of the group
    /// gets none of them, even well past the bus's redelivery delay; once
    /// it is gone, the other member gets exactly those records. (A bus that
    /// does not redelivers declares it, as checked above; the consumer
    /// hands work over by its positions.)
    pub async fn records_a_member_left_unacked_go_to_another_member<B, F, Fut>(
        make: F,
        features: BusFeatures,
    ) where
        B: Bus,
        F: Fn() -> Fut,
        Fut: Future<Output = Fresh<B>>,
    {
        let fresh = make().await;
        let bus = &fresh.engine;
        if !features.redelivers_unacked_to_other_members {
            assert_eq!(bus.redelivery_delay_max(), Duration::ZERO);
            eprintln!("this bus declares no redelivery to other members: nothing more to check");
            return;
        }
        let topic = unique("handover");
        let group = unique("members");
        bus.publish(
            &(0..10)
                .map(|index| raw(&topic, "k", format!("p{index}")))
                .collect::<Vec<_>>(),
        )
        .await
        .expect("publish");
        let all = partitions_of(bus, &topic).await;
        let mut leaving = Member::join(bus, "leaving", &group, &topic).await;
        let give_up = tokio::time::Instant::now() + DEADLINE;
        while leaving.read.values().map(Vec::len).sum::<usize>() < 10 {
            assert!(
                tokio::time::Instant::now() < give_up,
                "timed out: {:?}",
                leaving.read
            );
            leaving.step(64, Duration::from_millis(500), false).await;
        }
        let mut taken: Vec<Record> = leaving.read.values().flatten().cloned().collect();
        taken.sort_by_key(|record| (record.partition, record.offset));

        let mut staying = Member::join(bus, "staying", &group, &topic).await;
        let give_up = tokio::time::Instant::now() + DEADLINE;
        while staying.held != all {
            assert!(
                tokio::time::Instant::now() < give_up,
                "staying member not assigned {all:?}: {:?}",
                staying.held
            );
            staying.step(64, Duration::from_millis(500), true).await;
        }
        // While the first member lives (and keeps its records alive), the
        // second gets nothing, even well past the redelivery delay.
        staying
            .quiet(bus.redelivery_delay_max() * 2 + Duration::from_millis(500))
            .await;
        drop(leaving);
        let give_up = tokio::time::Instant::now() + DEADLINE;
        while staying.read.values().map(Vec::len).sum::<usize>() < 10 {
            assert!(
                tokio::time::Instant::now() < give_up,
                "timed out: {:?}",
                staying.read
            );
            staying.step(64, Duration::from_millis(500), true).await;
        }
        let mut again: Vec<Record> = staying.read.values().flatten().cloned().collect();
        again.sort_by_key(|record| (record.partition, record.offset));
        assert_eq!(again, taken);
        staying.quiet(Duration::from_millis(300)).await;
    }
}
