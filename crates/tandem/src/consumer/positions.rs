//! Positions: where a consumer resumes, per partition, written in the

//! transaction of the batch that consumed the records (exclusive and

//! shared partitions), and the replay generation they belong to.

use std::collections::BTreeMap;

use crate::bus::{Record, TopicPartition};

use crate::params;

use crate::schema::now_micros;

use crate::store::{Store, StoreError, Tx};

/// Records that `records` are consumed. On a bus whose partitions are
/// exclusive to one member, a batch continues from the position, so the
/// position becomes the highest offset + 1. On a bus whose members share a
/// partition ([`Bus::shares_partitions`](crate::bus::Bus::shares_partitions)),
/// see [`save_shared_positions`].
pub(super) fn save_positions(
    tx: &mut dyn Tx,
    consumer: &str,
    records: &[Record],
    shared: bool,
) -> Result<(), StoreError> {
    if shared {
        return save_shared_positions(tx, consumer, records);
    }
    let mut next: BTreeMap<(&str, u32), u64> = BTreeMap::new();
    for record in records {
        let entry = next.entry((&record.topic, record.partition)).or_insert(0);
        *entry = (*entry).max(record.offset.saturating_add(1));
    }
    let now = now_micros();
    for ((topic, partition), offset) in next {
        tx.execute(
            "INSERT INTO tandem_consumer_positions (consumer, topic, partition, next_offset, updated_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (consumer, topic, partition) DO UPDATE
             SET next_offset = excluded.next_offset, updated_at = excluded.updated_at",
            params![consumer, topic, partition, offset, now],
        )?;
    }
    Ok(())
}

/// Merges half-open offset ranges; adjacent ones become one.
fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (first, end) in ranges {
        match merged.last_mut() {
            Some(last) if first <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((first, end)),
        }
    }
    merged
}

/// Positions on a shared partition: members are handed interleaved
/// records, so one member's highest offset says nothing of the lower
/// offsets another member still holds. The position stays the first offset
/// not consumed by any member (a safe place to seek to after an outage or a
/// crash: nothing before it is lost), and the ranges consumed beyond it
/// wait in `tandem_consumer_offsets_ahead` until the gap before them fills.
fn save_shared_positions(
    tx: &mut dyn Tx,
    consumer: &str,
    records: &[Record],
) -> Result<(), StoreError> {
    let mut offsets: BTreeMap<(&str, u32), Vec<u64>> = BTreeMap::new();
    for record in records {
        offsets
            .entry((&record.topic, record.partition))
            .or_default()
            .push(record.offset);
    }
    let now = now_micros();
    for ((topic, partition), mut batch) in offsets {
        let floor = tx
            .query_opt(
                "SELECT next_offset FROM tandem_consumer_positions
                 WHERE consumer = $1 AND topic = $2 AND partition = $3",
                params![consumer, topic, partition],
            )?
            .map(|row| row.i64(0))
            .transpose()?
            .map_or(0, |offset| u64::try_from(offset).unwrap_or(0));
        let mut ranges: Vec<(u64, u64)> = tx
            .query(
                "SELECT first_offset, end_offset FROM tandem_consumer_offsets_ahead
                 WHERE consumer = $1 AND topic = $2 AND partition = $3",
                params![consumer, topic, partition],
            )?
            .iter()
            .map(|row| {
                Ok((
                    u64::try_from(row.i64(0)?).unwrap_or(0),
                    u64::try_from(row.i64(1)?).unwrap_or(0),
                ))
            })
            .collect::<Result<_, StoreError>>()?;
        let stored = ranges.len();
        batch.sort_unstable();
        batch.dedup();
        ranges.extend(
            batch
                .into_iter()
                .filter(|offset| *offset >= floor)
                .map(|offset| (offset, offset.saturating_add(1))),
        );
        let mut ranges = merge_ranges(ranges);
        let mut next = floor;
        if let Some(&(first, end)) = ranges.first() {
            if first <= next {
                next = next.max(end);
                ranges.remove(0);
            }
        }
        if stored > 0 || !ranges.is_empty() {
            tx.execute(
                "DELETE FROM tandem_consumer_offsets_ahead
                 WHERE consumer = $1 AND topic = $2 AND partition = $3",
                params![consumer, topic, partition],
            )?;
            for (first, end) in &ranges {
                tx.execute(
                    "INSERT INTO tandem_consumer_offsets_ahead
                       (consumer, topic, partition, first_offset, end_offset)
                     VALUES ($1, $2, $3, $4, $5)",
                    params![consumer, topic, partition, *first, *end],
                )?;
            }
        }
        tx.execute(
            "INSERT INTO tandem_consumer_positions (consumer, topic, partition, next_offset, updated_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (consumer, topic, partition) DO UPDATE
             SET next_offset = excluded.next_offset, updated_at = excluded.updated_at",
            params![consumer, topic, partition, next, now],
        )?;
    }
    Ok(())
}

/// The replay generation of `consumer`: bumped by every replay, checked by
/// every member in each batch.
pub(super) fn generation(tx: &mut dyn Tx, consumer: &str) -> Result<i64, StoreError> {
    tx.query_opt(
        "SELECT generation FROM tandem_consumer_generations WHERE consumer = $1",
        params![consumer],
    )?
    .map_or(Ok(0), |row| row.i64(0))
}

/// The consumer's replay generation, and whether it is paused, in one
/// statement: what each batch checks before it applies anything.
pub(super) fn generation_and_pause(
    tx: &mut dyn Tx,
    consumer: &str,
) -> Result<(i64, bool), StoreError> {
    let row = tx
        .query_opt(
            "SELECT COALESCE((SELECT generation FROM tandem_consumer_generations
                              WHERE consumer = $1), 0),
                    (SELECT COUNT(*) FROM tandem_consumer_paused WHERE consumer = $1)",
            params![consumer],
        )?
        .ok_or_else(|| StoreError::Decode("the generation query returned no row".into()))?;
    Ok((row.i64(0)?, row.i64(1)? > 0))
}

/// Where `consumer` resumes, per partition.
pub async fn positions<S: Store>(
    store: &S,
    consumer: &str,
) -> Result<BTreeMap<TopicPartition, u64>, StoreError> {
    let consumer = consumer.to_owned();
    store.read(move |tx| read_positions(tx, &consumer)).await
}

pub(super) fn read_positions(
    tx: &mut dyn Tx,
    consumer: &str,
) -> Result<BTreeMap<TopicPartition, u64>, StoreError> {
    let rows = tx.query(
        "SELECT topic, partition, next_offset FROM tandem_consumer_positions WHERE consumer = $1",
        params![consumer],
    )?;
    let mut positions = BTreeMap::new();
    for row in rows {
        positions.insert(
            TopicPartition::new(row.text(0)?, u32::try_from(row.i64(1)?).unwrap_or(0)),
            u64::try_from(row.i64(2)?).unwrap_or(0),
        );
    }
    Ok(positions)
}

/// The tables that hold a consumer's own progress, keyed by its name: its
/// positions, the ranges applied ahead of them, its aggregates' sequences
/// and its held events. A replay empties them; a rebuild's switch hands
/// the new version's to the live consumer.
pub(crate) const STATE_TABLES: [&str; 4] = [
    "tandem_consumer_positions",
    "tandem_consumer_offsets_ahead",
    "tandem_consumer_aggregates",
    "tandem_pending",
];

/// Bumps `consumer`'s replay generation: every member sees it in its next
/// batch, drops what it buffered and seeks to the stored positions.
pub(crate) fn bump_generation(tx: &mut dyn Tx, consumer: &str) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO tandem_consumer_generations (consumer, generation)
         VALUES ($1, 1)
         ON CONFLICT (consumer) DO UPDATE
         SET generation = tandem_consumer_generations.generation + 1",
        params![consumer],
    )?;
    Ok(())
}
