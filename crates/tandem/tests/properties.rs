//! Property: whatever order the bus delivers an aggregate's events in, with
//! duplicates, the consumer's read model ends up exactly as with in-order,
//! exactly-once delivery, and nothing is parked.
//!
//! A history of deposits over a few accounts (each account's events carry
//! sequences 1..=n) is delivered straight onto the embedded log as a
//! permutation with duplicates (each event 1..=3 times, moved a bounded
//! distance, so later sequences often arrive first and the consumer must
//! hold them until the gap fills), in publishes of random sizes. A
//! `Consumer` with the testkit's `Ledger` handler applies them; the ledger
//! refuses an out-of-order event permanently, so an ordering bug shows up as
//! a dead letter.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tandem::bus::{Bus, OutgoingRecord, TopicPartition};
use tandem::consumer::{self, Consumer, ConsumerConfig};
use tandem::dead_letter;
use tandem::store::{Store, StoreError};
use tandem_testkit::{eventually, ledger_rows, open_log, open_store, Ledger, LedgerRows, TOPIC};
use tokio_util::sync::CancellationToken;

const CONSUMER: &str = "ledger-view";
const WAIT: Duration = Duration::from_secs(30);

/// One generated case.
#[derive(Debug, Clone)]
struct Case {
    /// Amounts of each account's deposits, in sequence order.
    history: Vec<Vec<i64>>,
    /// (account index, sequence) in delivery order, duplicates included.
    delivery: Vec<(usize, u64)>,
    /// Sizes of the publishes the delivery is split into.
    chunks: Vec<usize>,
    /// The consumer's batch size: small ones make held events wait across
    /// transactions.
    batch_size: usize,
}

fn account(index: usize) -> String {
    format!("acct-{index}")
}

/// Largest distance (in delivered copies) a copy may move ahead of its
/// place in the in-order, duplicated stream.
const MAX_SHIFT: usize = 10;

fn case() -> impl Strategy<Value = Case> {
    prop::collection::vec(prop::collection::vec(1..=1_000i64, 1..=6), 1..=4).prop_flat_map(
        |history| {
            let events: usize = history.iter().map(Vec::len).sum();
            (
                Just(history),
                prop::collection::vec(any::<prop::sample::Index>(), events),
                prop::collection::vec(1..=3usize, events),
                prop::collection::vec(0..=MAX_SHIFT, events * 3),
                prop::collection::vec(1..=7usize, events * 3),
                1..=8usize,
            )
                .prop_map(
                    |(history, picks, copies, shifts, chunk_sizes, batch_size)| {
                        let in_order = interleave(&history, &picks);
                        let delivery = shuffle(&in_order, &copies, &shifts);
                        let chunks = split(delivery.len(), &chunk_sizes);
                        Case {
                            history,
                            delivery,
                            chunks,
                            batch_size,
                        }
                    },
                )
        },
    )
}

/// An in-order stream: the accounts' sequences merged in a random order,
/// each account's own events in sequence order.
fn interleave(history: &[Vec<i64>], picks: &[prop::sample::Index]) -> Vec<(usize, u64)> {
    let mut next: Vec<u64> = vec![1; history.len()];
    let mut stream = Vec::new();
    for pick in picks {
        let open: Vec<usize> = (0..history.len())
            .filter(|index| next[*index] as usize <= history[*index].len())
            .collect();
        let index = open[pick.index(open.len())];
        stream.push((index, next[index]));
        next[index] += 1;
    }
    stream
}

/// Each event `copies` times (copies adjacent), then each copy moved back
/// by up to `MAX_SHIFT` places: the copy at place p sorts as if at
/// p - shift, so later sequences often overtake earlier ones.
fn shuffle(in_order: &[(usize, u64)], copies: &[usize], shifts: &[usize]) -> Vec<(usize, u64)> {
    let duplicated: Vec<(usize, u64)> = in_order
        .iter()
        .zip(copies)
        .flat_map(|(event, count)| std::iter::repeat_n(*event, *count))
        .collect();
    let mut keyed: Vec<(usize, usize, (usize, u64))> = duplicated
        .iter()
        .enumerate()
        .map(|(place, event)| (place.saturating_sub(shifts[place]), place, *event))
        .collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, _, event)| event).collect()
}

/// Publish sizes covering `total` copies.
fn split(total: usize, sizes: &[usize]) -> Vec<usize> {
    let mut chunks = Vec::new();
    let mut left = total;
    for size in sizes {
        if left == 0 {
            break;
        }
        let size = (*size).min(left);
        chunks.push(size);
        left -= size;
    }
    chunks
}

/// How many copies a correct consumer must hold ahead of a gap: a measure
/// of how much reordering a delivery asks the consumer to repair.
fn held_copies(delivery: &[(usize, u64)]) -> usize {
    let mut applied: BTreeMap<usize, u64> = BTreeMap::new();
    let mut held: BTreeMap<usize, std::collections::BTreeSet<u64>> = BTreeMap::new();
    let mut count = 0;
    for (index, sequence) in delivery {
        let last = applied.entry(*index).or_default();
        let waiting = held.entry(*index).or_default();
        if *sequence == *last + 1 {
            *last += 1;
            while waiting.remove(&(*last + 1)) {
                *last += 1;
            }
        } else if *sequence > *last + 1 && waiting.insert(*sequence) {
            count += 1;
        }
    }
    count
}

/// The ledger of in-order, exactly-once delivery.
fn expected_rows(history: &[Vec<i64>]) -> LedgerRows {
    let mut rows: LedgerRows = history
        .iter()
        .enumerate()
        .map(|(index, amounts)| {
            (
                account(index),
                amounts.iter().sum(),
                amounts.len() as i64,
                amounts.len() as i64,
            )
        })
        .collect();
    rows.sort();
    rows
}

async fn pending_count<S: Store>(store: &S) -> i64 {
    store
        .read(|tx| -> Result<i64, StoreError> {
            tx.query_opt(
                "SELECT COUNT(*) FROM tandem_pending WHERE consumer = $1",
                tandem::params![CONSUMER],
            )?
            .ok_or_else(|| StoreError::Decode("count returned nothing".into()))?
            .i64(0)
        })
        .await
        .expect("count pending")
}

async fn check(case: Case) {
    let dir = tempfile::tempdir().expect("temp dir");
    let reader = open_store(&dir.path().join("reader.db")).await;
    let log = open_log(&dir.path().join("bus.db")).await;
    let bus: Arc<dyn Bus> = Arc::new(log);

    let mut config = ConsumerConfig::new(CONSUMER, &[TOPIC]);
    // Reorders are waited for, never reported as gaps.
    config.gap_timeout = Duration::from_secs(30);
    config.housekeeping_interval = Duration::from_millis(20);
    config.batch_size = case.batch_size;
    let consumer = Consumer::new(
        reader.clone(),
        Arc::clone(&bus),
        Arc::new(Ledger::new()) as Arc<dyn tandem::Handler>,
        config,
    );
    let shutdown = CancellationToken::new();
    let consumer_shutdown = shutdown.clone();
    let task =
        tokio::spawn(async move { consumer.run(consumer_shutdown).await.expect("consumer") });

    let records: Vec<OutgoingRecord> = case
        .delivery
        .iter()
        .map(|(index, sequence)| {
            let amount = case.history[*index][*sequence as usize - 1];
            OutgoingRecord {
                topic: TOPIC.into(),
                key: account(*index),
                payload: tandem_testkit::deposit_bytes(&account(*index), *sequence, amount),
            }
        })
        .collect();
    let mut start = 0;
    for size in &case.chunks {
        bus.publish(&records[start..start + size])
            .await
            .expect("publish");
        start += size;
    }
    assert_eq!(start, records.len(), "every copy was published");

    let expected = expected_rows(&case.history);
    let last_sequences: BTreeMap<String, i64> = expected
        .iter()
        .map(|(account, _, _, last)| (account.clone(), *last))
        .collect();
    // Done when every account reached its last sequence, or as soon as
    // anything was parked (which the assertions below then report).
    eventually("every account at its last sequence", WAIT, || {
        let reader = reader.clone();
        let last_sequences = last_sequences.clone();
        async move {
            let parked = dead_letter::depth(&reader, CONSUMER).await.expect("depth");
            let rows = ledger_rows(&reader).await;
            parked > 0
                || last_sequences.iter().all(|(account, last)| {
                    rows.iter().any(|row| &row.0 == account && row.3 >= *last)
                })
        }
    })
    .await;

    let parked = dead_letter::list(&reader, Some(CONSUMER), true)
        .await
        .expect("list dead letters");
    assert!(parked.is_empty(), "nothing may be parked: {parked:#?}");
    assert_eq!(ledger_rows(&reader).await, expected, "the in-order ledger");
    assert_eq!(pending_count(&reader).await, 0, "nothing is left held");

    // The consumer's positions reach the end of every partition written to.
    let ends: BTreeMap<TopicPartition, u64> = bus
        .end_offsets(TOPIC)
        .await
        .expect("end offsets")
        .into_iter()
        .filter(|(_, end)| *end > 0)
        .map(|(partition, end)| (TopicPartition::new(TOPIC, partition), end))
        .collect();
    eventually("positions at the end of the log", WAIT, || {
        let reader = reader.clone();
        let ends = ends.clone();
        async move {
            consumer::positions(&reader, CONSUMER)
                .await
                .expect("positions")
                == ends
        }
    })
    .await;
    // The duplicates and held events were dropped, not applied twice.
    assert_eq!(
        ledger_rows(&reader).await,
        expected,
        "still the in-order ledger"
    );

    shutdown.cancel();
    task.await.expect("consumer task");
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    })]

    #[test]
    fn reordered_duplicated_delivery_gives_the_in_order_ledger(case in case()) {
        let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
        runtime.block_on(check(case));
    }

    /// The generator itself: every event is delivered at least once and at
    /// most three times, and the publishes cover the whole delivery.
    #[test]
    fn deliveries_are_bounded_permutations_with_duplicates(case in case()) {
        let mut counts: BTreeMap<(usize, u64), usize> = BTreeMap::new();
        for event in &case.delivery {
            *counts.entry(*event).or_default() += 1;
        }
        let events: usize = case.history.iter().map(Vec::len).sum();
        prop_assert_eq!(counts.len(), events);
        for (index, amounts) in case.history.iter().enumerate() {
            for sequence in 1..=amounts.len() as u64 {
                let count = counts.get(&(index, sequence)).copied().unwrap_or(0);
                prop_assert!((1..=3).contains(&count), "{:?} delivered {} times", (index, sequence), count);
            }
        }
        prop_assert_eq!(case.chunks.iter().sum::<usize>(), case.delivery.len());
        prop_assert!(case.delivery.len() >= events && case.delivery.len() <= 3 * events);
    }
}

/// The generator asks for real repair work: in a good share of cases some
/// event arrives ahead of a gap, and some cases hold three events or more.
#[test]
fn the_generator_delivers_events_ahead_of_gaps() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let strategy = case();
    let held: Vec<usize> = (0..200)
        .map(|_| {
            let case = strategy.new_tree(&mut runner).expect("case").current();
            held_copies(&case.delivery)
        })
        .collect();
    let with_holds = held.iter().filter(|count| **count > 0).count();
    assert!(
        with_holds >= 60,
        "only {with_holds} of 200 cases hold an event ahead of a gap"
    );
    assert!(
        held.iter().any(|count| *count >= 3),
        "no case holds three events: {held:?}"
    );
}
