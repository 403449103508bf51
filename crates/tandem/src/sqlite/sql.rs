//! The toolkit's SQL in SQLite's words: the schema and its migrations,
//! sequences, the outbox in commit order, consumer states.
//!
//! One writer at a time holds the database, so what is read inside a write
//! transaction cannot move before the same transaction writes it: sequences
//! are a read and a plain write, and `position` order is commit order.

use std::collections::BTreeMap;

use crate::outbox::{Cursor, OutboxBatch};
use crate::params;
use crate::sql::{
    backlog_of, json_param, save_aggregate_state, stored_event, AggregateStateRow, EngineSql,
    Migration, OutboxRow, StoredAggregateState,
};
use crate::store::{Dialect, Param, StoreError, Tx};

/// SQLite's [`EngineSql`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SqliteSql;

/// The one instance every SQLite transaction hands out.
pub static SQLITE: SqliteSql = SqliteSql;

static MIGRATIONS: [Migration; 5] = [
    Migration {
        version: 1,
        description: "the toolkit's tables",
        apply: install_tables,
    },
    Migration {
        version: 2,
        description: "the audit trail of operator actions, and consumer pauses",
        apply: install_audit,
    },
    Migration {
        version: 3,
        description: "dead letters' failure groups, stored and indexed",
        apply: install_failure_groups,
    },
    Migration {
        version: 4,
        description: "side-by-side rebuilds of read models",
        apply: install_rebuilds,
    },
    Migration {
        version: 5,
        description: "outbox tables set aside whole by retention",
        apply: install_outbox_segments,
    },
];

/// Migration 5: the outbox's older tables, set aside by retention
/// ([`SqliteSql::prune_published`]) until all of each is published and old
/// enough to drop whole.
fn install_outbox_segments(tx: &mut dyn Tx) -> Result<(), StoreError> {
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS tandem_outbox_segments (
            last_position    INTEGER PRIMARY KEY,
            first_position   INTEGER NOT NULL,
            rows             INTEGER NOT NULL,
            last_committed_at INTEGER NOT NULL
        )",
    )
}

/// The table the outbox's rows up to `last_position` were set aside in.
fn outbox_segment(last_position: i64) -> String {
    format!("tandem_outbox_upto_{last_position}")
}

/// The outbox's older tables holding rows after `position`, oldest first.
fn outbox_segments_after(tx: &mut dyn Tx, position: i64) -> Result<Vec<i64>, StoreError> {
    tx.query(
        "SELECT last_position FROM tandem_outbox_segments WHERE last_position > $1
         ORDER BY last_position",
        params![position],
    )?
    .iter()
    .map(|row| row.i64(0))
    .collect()
}

/// The relay's position (0 before its first batch).
fn relay_position(tx: &mut dyn Tx, relay: &str) -> Result<i64, StoreError> {
    tx.query_opt(
        "SELECT position FROM tandem_relay_positions WHERE relay = $1",
        params![relay],
    )?
    .map_or(Ok(0), |row| row.i64(0))
}

/// Drops every older table of the outbox that is all published (up to
/// `cursor`) and whose newest row committed before `before_micros`;
/// returns the rows they held.
fn drop_published_segments(
    tx: &mut dyn Tx,
    cursor: i64,
    before_micros: i64,
) -> Result<u64, StoreError> {
    let done: Vec<(i64, i64)> = tx
        .query(
            "SELECT last_position, rows FROM tandem_outbox_segments
             WHERE last_position <= $1 AND last_committed_at < $2 ORDER BY last_position",
            params![cursor, before_micros],
        )?
        .iter()
        .map(|row| Ok((row.i64(0)?, row.i64(1)?)))
        .collect::<Result<_, StoreError>>()?;
    let mut dropped = 0;
    for (last, rows) in done {
        tx.execute_batch(&format!("DROP TABLE IF EXISTS {}", outbox_segment(last)))?;
        tx.execute(
            "DELETE FROM tandem_outbox_segments WHERE last_position = $1",
            params![last],
        )?;
        dropped += u64::try_from(rows).unwrap_or(0);
    }
    Ok(dropped)
}

/// Sets the outbox's table aside whole under a new name and makes an empty
/// one in its place, positions going on from where they were (the
/// `AUTOINCREMENT` counter moves with the renamed table, so it is carried
/// over). Writers' statements name `tandem_outbox` and find the new table.
fn set_outbox_aside(tx: &mut dyn Tx) -> Result<(), StoreError> {
    let Some(row) = tx.query_opt(
        "SELECT MIN(position), MAX(position), COUNT(*) FROM tandem_outbox",
        &[],
    )?
    else {
        return Ok(());
    };
    let (Some(first), Some(last)) = (row.opt_i64(0)?, row.opt_i64(1)?) else {
        return Ok(());
    };
    let rows = row.i64(2)?;
    let last_committed_at = tx
        .query_opt(
            "SELECT committed_at FROM tandem_outbox WHERE position = $1",
            params![last],
        )?
        .map_or(Ok(0), |row| row.i64(0))?;
    let create = tx
        .query_opt(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'tandem_outbox'",
            &[],
        )?
        .ok_or_else(|| StoreError::Decode("the outbox table is missing".into()))?
        .text(0)?
        .to_owned();
    let aside = outbox_segment(last);
    tx.execute_batch(&format!(
        "ALTER TABLE tandem_outbox RENAME TO {aside};
         {create};
         INSERT INTO sqlite_sequence (name, seq)
           SELECT 'tandem_outbox', seq FROM sqlite_sequence WHERE name = '{aside}';"
    ))?;
    tx.execute(
        "INSERT INTO tandem_outbox_segments (last_position, first_position, rows,
           last_committed_at)
         VALUES ($1, $2, $3, $4)",
        params![last, first, rows, last_committed_at],
    )?;
    Ok(())
}

/// Migration 4: the rebuilds of read models (`crate::rebuild`).
fn install_rebuilds(tx: &mut dyn Tx) -> Result<(), StoreError> {
    tx.execute_batch(crate::rebuild::TABLE)
}

/// Migration 3: each dead letter's failure group
/// (`tandem::dead_letter::failure_group`) in a column of its own, so that
/// listings filter by it and count by it in SQL. The letters already
/// there are filled first, in Rust (the group is a SHA-256 fingerprint:
/// see `tandem::dead_letter::fill_failure_groups`), then indexed. Like
/// step 1, it leaves a table that has the column as it is, so it also runs
/// on a file whose steps were not recorded.
fn install_failure_groups(tx: &mut dyn Tx) -> Result<(), StoreError> {
    let has_group = tx
        .query_opt(
            "SELECT 1 FROM pragma_table_info('tandem_dead_letters') WHERE name = 'failure_group'",
            &[],
        )?
        .is_some();
    if !has_group {
        tx.execute_batch("ALTER TABLE tandem_dead_letters ADD COLUMN failure_group TEXT")?;
    }
    crate::dead_letter::fill_failure_groups(tx)?;
    tx.execute_batch(FAILURE_GROUPS)
}

// Every SQLite index ends with the rowid (the letter's id). With no
// statistics SQLite takes an equality on an index's first column to be
// selective, so no index here starts with `status`, which nearly every
// letter shares: a listing of the parked letters would then sort them all
// instead of reading the table in id order.
// - `tandem_dead_letters_group` `(failure_group, status)`: a group's letters
//   of a status in id order, so a page of a group after a cursor is one
//   seek; and the letters without a group (none, but during a rolling
//   upgrade) are found at once when a store opens.
// - `tandem_dead_letters_parked_groups` `(consumer, failure_group,
//   first_failed_at, last_failed_at)` of the parked letters only: their
//   failure groups are counted from it alone, in group order, without
//   reading a row or sorting (for one consumer, from a range of it). The
//   letters resolved and discarded, which stay on record, never make it
//   longer. Used by the queries that name `status = 'parked'` as it is
//   (see `tandem::dead_letter::Filter`).
// - `tandem_dead_letters_record` `(consumer, topic, partition,
//   record_offset)`: whether a record that cannot be decoded is on record
//   already (a replay meets it again), one seek.
const FAILURE_GROUPS: &str = "
CREATE INDEX IF NOT EXISTS tandem_dead_letters_group
    ON tandem_dead_letters (failure_group, status);
CREATE INDEX IF NOT EXISTS tandem_dead_letters_parked_groups
    ON tandem_dead_letters (consumer, failure_group, first_failed_at, last_failed_at)
    WHERE status = 'parked';
CREATE INDEX IF NOT EXISTS tandem_dead_letters_record
    ON tandem_dead_letters (consumer, topic, partition, record_offset);
";

/// Migration 2: the audit trail (`tandem::audit`) and consumer pauses
/// (`tandem::consumer::pauses`).
fn install_audit(tx: &mut dyn Tx) -> Result<(), StoreError> {
    tx.execute_batch(AUDIT)
}

const AUDIT: &str = "
CREATE TABLE IF NOT EXISTS tandem_admin_audit (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at     INTEGER NOT NULL,
    actor  TEXT    NOT NULL,
    action TEXT    NOT NULL,
    target TEXT    NOT NULL,
    result TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS tandem_consumer_paused (
    consumer  TEXT    PRIMARY KEY,
    paused_at INTEGER NOT NULL,
    paused_by TEXT    NOT NULL
);
";

// The tables keyed by text are `WITHOUT ROWID`: a lookup or an update by
// key touches one b-tree instead of an index and a table, which halved the
// cost of the per-event sequence bookkeeping.
const TABLES: &str = "
CREATE TABLE IF NOT EXISTS tandem_outbox (
    position     INTEGER PRIMARY KEY AUTOINCREMENT,
    topic        TEXT    NOT NULL,
    subject      TEXT    NOT NULL,
    sequence     INTEGER NOT NULL,
    event_id     TEXT    NOT NULL,
    event_type   TEXT    NOT NULL,
    envelope     BLOB    NOT NULL,
    committed_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tandem_aggregates (
    topic    TEXT    NOT NULL,
    subject  TEXT    NOT NULL,
    sequence INTEGER NOT NULL,
    PRIMARY KEY (subject, topic)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tandem_relay_positions (
    relay      TEXT    PRIMARY KEY,
    position   INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    xid        INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tandem_consumer_positions (
    consumer    TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (consumer, topic, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tandem_consumer_aggregates (
    consumer TEXT    NOT NULL,
    source   TEXT    NOT NULL,
    subject  TEXT    NOT NULL,
    sequence INTEGER NOT NULL,
    blocked_by INTEGER,
    PRIMARY KEY (subject, source, consumer)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tandem_consumer_requests (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    consumer       TEXT    NOT NULL,
    command        TEXT    NOT NULL,
    dead_letter_id INTEGER,
    requested_at   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tandem_pending (
    consumer    TEXT    NOT NULL,
    source      TEXT    NOT NULL,
    subject     TEXT    NOT NULL,
    sequence    INTEGER NOT NULL,
    topic       TEXT    NOT NULL,
    partition   INTEGER NOT NULL,
    record_offset INTEGER NOT NULL,
    payload     BLOB    NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, source, subject, sequence)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tandem_dead_letters (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    consumer        TEXT    NOT NULL,
    topic           TEXT    NOT NULL,
    partition       INTEGER NOT NULL,
    record_offset   INTEGER NOT NULL,
    event_id        TEXT,
    source          TEXT,
    subject         TEXT,
    sequence        INTEGER,
    event_type      TEXT,
    payload         BLOB    NOT NULL,
    reason          TEXT    NOT NULL,
    error           TEXT    NOT NULL,
    attempts        INTEGER NOT NULL,
    first_failed_at INTEGER NOT NULL,
    last_failed_at  INTEGER NOT NULL,
    status          TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS tandem_dead_letters_consumer
    ON tandem_dead_letters (consumer, status);
CREATE INDEX IF NOT EXISTS tandem_dead_letters_aggregate
    ON tandem_dead_letters (consumer, subject, source, sequence);
CREATE TABLE IF NOT EXISTS tandem_consumer_generations (
    consumer   TEXT    PRIMARY KEY,
    generation INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tandem_consumer_offsets_ahead (
    consumer     TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    partition    INTEGER NOT NULL,
    first_offset INTEGER NOT NULL,
    end_offset   INTEGER NOT NULL,
    PRIMARY KEY (consumer, topic, partition, first_offset)
) WITHOUT ROWID;
";

/// Tables whose key starts with the subject (the column that tells rows
/// apart) rather than with the topic or consumer, which every row of a
/// service shares: a seek then settles most comparisons on the first
/// column. Key comparisons were a fifth of the pipeline's instructions,
/// and this halved them. `(table, columns in table order)`.
const REKEYED: [(&str, &str); 2] = [
    ("tandem_aggregates", "topic, subject, sequence"),
    (
        "tandem_consumer_aggregates",
        "consumer, source, subject, sequence, blocked_by",
    ),
];

/// Migration 1: every table, and the upgrades of files made before
/// migrations were numbered (relay cursors without `xid`, sequence tables
/// keyed topic first).
fn install_tables(tx: &mut dyn Tx) -> Result<(), StoreError> {
    tx.execute_batch(TABLES)?;
    // Files made before relay cursors had an `xid` (always 0 on SQLite,
    // whose writers commit in position order).
    let has_xid = tx
        .query_opt(
            "SELECT 1 FROM pragma_table_info('tandem_relay_positions') WHERE name = 'xid'",
            &[],
        )?
        .is_some();
    if !has_xid {
        tx.execute_batch(
            "ALTER TABLE tandem_relay_positions ADD COLUMN xid INTEGER NOT NULL DEFAULT 0",
        )?;
    }
    for (table, columns) in REKEYED {
        rekey_table(tx, table, columns)?;
    }
    Ok(())
}

/// Rebuilds `table` of a file made before its key started with `subject`.
fn rekey_table(tx: &mut dyn Tx, table: &str, columns: &str) -> Result<(), StoreError> {
    let first = tx.query_opt(
        "SELECT info.name FROM pragma_index_list($1) AS list, pragma_index_info(list.name) AS info
         WHERE list.origin = 'pk' AND info.seqno = 0",
        params![table],
    )?;
    let first = match &first {
        Some(row) => row.text(0)?,
        None => return Ok(()),
    };
    if first == "subject" {
        return Ok(());
    }
    let rekeyed = TABLES
        .split(';')
        .find(|statement| {
            statement
                .trim()
                .starts_with(&format!("CREATE TABLE IF NOT EXISTS {table} ("))
        })
        .ok_or_else(|| StoreError::Engine(format!("no definition of {table}").into()))?
        .replacen(
            &format!("CREATE TABLE IF NOT EXISTS {table} ("),
            &format!("CREATE TABLE {table}_rekeyed ("),
            1,
        );
    tracing::info!(
        table,
        old_key_start = first,
        "rebuilding the table with its key led by subject"
    );
    tx.execute_batch(&format!(
        "{rekeyed};
         INSERT INTO {table}_rekeyed ({columns}) SELECT {columns} FROM {table};
         DROP TABLE {table};
         ALTER TABLE {table}_rekeyed RENAME TO {table};"
    ))
}

/// The outbox's event rows, 64 a statement.
static INSERT_EVENTS: super::MultiRowInsert = super::MultiRowInsert::new(
    "INSERT INTO tandem_outbox (topic, subject, sequence, event_id, event_type, envelope, committed_at) VALUES ",
    7,
    64,
);

impl EngineSql for SqliteSql {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn migrations(&self) -> &'static [Migration] {
        &MIGRATIONS
    }

    fn table_exists(&self, tx: &mut dyn Tx, table: &str) -> Result<bool, StoreError> {
        Ok(tx
            .query_opt(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = $1",
                params![table],
            )?
            .is_some())
    }

    /// SQLite cannot rename an index: it is made again under the new name
    /// from its own statement (which a table rename has already pointed at
    /// the table's new name), and the old one dropped.
    fn rename_index(&self, tx: &mut dyn Tx, from: &str, to: &str) -> Result<bool, StoreError> {
        let Some(row) = tx.query_opt(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = $1",
            params![from],
        )?
        else {
            return Ok(false);
        };
        let create = row.text(0)?.replacen(from, to, 1);
        tx.execute_batch(&format!("DROP INDEX \"{from}\"; {create}"))?;
        Ok(true)
    }

    /// A read and a plain insert or update (an upsert with `RETURNING`
    /// builds a temporary table and a statement journal, which tripled the
    /// outbox's cost).
    fn next_sequence(
        &self,
        tx: &mut dyn Tx,
        topic: &str,
        subject: &str,
    ) -> Result<u64, StoreError> {
        let current = tx
            .query_opt(
                "SELECT sequence FROM tandem_aggregates WHERE topic = $1 AND subject = $2",
                params![topic, subject],
            )?
            .map(|row| row.i64(0))
            .transpose()?;
        match current {
            None => {
                tx.execute(
                    "INSERT INTO tandem_aggregates (topic, subject, sequence) VALUES ($1, $2, 1)",
                    params![topic, subject],
                )?;
                Ok(1)
            }
            Some(current) => {
                let changed = tx.execute(
                    "UPDATE tandem_aggregates SET sequence = $3
                     WHERE topic = $1 AND subject = $2 AND sequence = $4",
                    params![topic, subject, current + 1, current],
                )?;
                if changed != 1 {
                    return Err(StoreError::Conflict(format!(
                        "aggregate {topic}/{subject} moved past sequence {current} during this transaction"
                    ).into()));
                }
                Ok(u64::try_from(current + 1).unwrap_or(0))
            }
        }
    }

    /// One query reads the aggregates' sequences (a join from `json_each`
    /// into the key), one upsert writes them back, fed by a
    /// `{subject: last sequence}` object whose pairs `json_each` gives as
    /// `key` and `value`, which cost no extraction.
    fn take_sequences(
        &self,
        tx: &mut dyn Tx,
        topic: &str,
        counts: &[(&str, u64)],
    ) -> Result<Vec<u64>, StoreError> {
        let mut last: std::collections::HashMap<&str, u64> =
            std::collections::HashMap::with_capacity(counts.len());
        for (subject, _) in counts {
            last.insert(subject, 0);
        }
        let subjects = json_param(&last.keys().collect::<Vec<_>>(), "sequence request")?;
        let rows = tx.query(
            "SELECT a.subject, a.sequence
             FROM json_each($2) AS wanted CROSS JOIN tandem_aggregates AS a
             WHERE a.subject = wanted.value AND a.topic = $1",
            params![topic, subjects.as_str()],
        )?;
        for row in &rows {
            if let Some(sequence) = last.get_mut(row.text(0)?) {
                *sequence = u64::try_from(row.i64(1)?).unwrap_or(0);
            }
        }
        let first = counts
            .iter()
            .map(|(subject, count)| {
                let slot = last.get_mut(subject).expect("every subject has a slot");
                let first = *slot + 1;
                *slot += count;
                first
            })
            .collect();
        let last = json_param(&last, "sequence request")?;
        tx.execute(
            "INSERT INTO tandem_aggregates (topic, subject, sequence)
             SELECT $1, key, value FROM json_each($2) WHERE true
             ON CONFLICT (subject, topic) DO UPDATE SET sequence = excluded.sequence",
            params![topic, last.as_str()],
        )?;
        Ok(first)
    }

    /// Multi-row inserts of 64 rows.
    fn insert_events(
        &self,
        tx: &mut dyn Tx,
        topic: &str,
        rows: &[OutboxRow<'_>],
        committed_at_micros: i64,
    ) -> Result<(), StoreError> {
        let mut params: Vec<Param<'_>> = Vec::new();
        for chunk in rows.chunks(INSERT_EVENTS.rows_per_statement) {
            params.clear();
            for row in chunk {
                params.extend([
                    Param::Text(topic),
                    Param::Text(row.subject),
                    Param::from(row.sequence),
                    Param::Text(row.event_id),
                    Param::Text(row.event_type),
                    Param::Blob(row.envelope),
                    Param::Int(committed_at_micros),
                ]);
            }
            tx.execute(&INSERT_EVENTS.sql(chunk.len()), &params)?;
        }
        Ok(())
    }

    fn outbox_columns(&self) -> &'static str {
        "position, 0, topic, subject, envelope, committed_at, sequence"
    }

    /// Writers commit one at a time, so `position` order is commit order
    /// (and each aggregate's sequence order), and everything visible is
    /// final.
    fn read_committed_after(
        &self,
        tx: &mut dyn Tx,
        after: Cursor,
        limit: u64,
    ) -> Result<OutboxBatch, StoreError> {
        // Rows retention set aside before they were published come first.
        let mut events = Vec::new();
        let tables = outbox_segments_after(tx, after.position)?
            .into_iter()
            .map(outbox_segment)
            .chain(["tandem_outbox".to_owned()]);
        for table in tables {
            let left = limit.saturating_sub(events.len() as u64);
            if left == 0 {
                break;
            }
            let rows = tx.query(
                &format!(
                    "SELECT position, 0, topic, subject, envelope, committed_at, sequence
                     FROM {table} WHERE position > $1 ORDER BY position LIMIT $2"
                ),
                params![after.position, left],
            )?;
            for row in rows {
                events.push(stored_event(row)?);
            }
        }
        Ok(OutboxBatch {
            end: events.last().map_or(after, |event| event.cursor()),
            events,
            held_back: false,
        })
    }

    /// Deleting rows one by one costs about half of what writing them did
    /// (and the writers wait for it: one writer at a time), so a busy
    /// outbox is pruned a table at a time instead, as the embedded log is a
    /// segment at a time: once the outbox's table holds `limit` rows or
    /// more and its oldest row may go, the table is set aside whole under a
    /// name of its own (`tandem_outbox_upto_{last position}`) and a new
    /// one takes the appends; a table set aside is dropped, a `DROP TABLE`
    /// for a fraction of the cost, once the relay has published all of it
    /// and its newest row is old enough. The relay reads the rows set aside
    /// first. A quiet outbox (under `limit` rows) is pruned row by row, the
    /// first `limit` rows in position order up to the relay's cursor and
    /// of them those old enough: positions are handed out in commit order
    /// (one writer), so the oldest rows come first.
    fn prune_published(
        &self,
        tx: &mut dyn Tx,
        relay: &str,
        before_micros: i64,
        limit: u64,
    ) -> Result<u64, StoreError> {
        let cursor = relay_position(tx, relay)?;
        let mut pruned = drop_published_segments(tx, cursor, before_micros)?;
        let Some(oldest) = tx.query_opt(
            "SELECT position, committed_at, (SELECT MAX(position) FROM tandem_outbox)
             FROM tandem_outbox ORDER BY position LIMIT 1",
            &[],
        )?
        else {
            return Ok(pruned);
        };
        let (first, first_committed_at, last) = (oldest.i64(0)?, oldest.i64(1)?, oldest.i64(2)?);
        if first > cursor || first_committed_at >= before_micros {
            return Ok(pruned);
        }
        if last - first + 1 >= i64::try_from(limit).unwrap_or(i64::MAX) {
            set_outbox_aside(tx)?;
            // All of it may be published and old enough already.
            pruned += drop_published_segments(tx, cursor, before_micros)?;
            return Ok(pruned);
        }
        Ok(pruned
            + tx.execute(
                "DELETE FROM tandem_outbox WHERE position IN (
               SELECT position FROM (
                 SELECT position, committed_at FROM tandem_outbox
                 WHERE position <= COALESCE(
                   (SELECT position FROM tandem_relay_positions WHERE relay = $1), 0)
                 ORDER BY position LIMIT $3)
               WHERE committed_at < $2)",
                params![relay, before_micros, limit as i64],
            )?)
    }

    fn relay_backlog(
        &self,
        tx: &mut dyn Tx,
        relay: &str,
    ) -> Result<(u64, Option<i64>), StoreError> {
        let cursor = relay_position(tx, relay)?;
        let mut union = String::from("SELECT committed_at FROM tandem_outbox WHERE position > $1");
        for last in outbox_segments_after(tx, cursor)? {
            union.push_str(&format!(
                " UNION ALL SELECT committed_at FROM {} WHERE position > $1",
                outbox_segment(last)
            ));
        }
        backlog_of(tx.query_opt(
            &format!("SELECT COUNT(*), MIN(committed_at) FROM ({union})"),
            params![cursor],
        )?)
    }

    /// One query per source: a join from `json_each` into the key (a
    /// quarter cheaper than `IN (SELECT ... json_each)`, which builds a
    /// temporary index first; `IN` lists of parameters took a statement
    /// per 200 subjects).
    fn load_aggregate_states(
        &self,
        tx: &mut dyn Tx,
        consumer: &str,
        source: &str,
        subjects: &[&str],
    ) -> Result<Vec<StoredAggregateState>, StoreError> {
        let list = json_param(subjects, "aggregate states")?;
        let rows = tx.query(
            "SELECT a.subject, a.sequence, a.blocked_by
             FROM json_each($3) AS wanted CROSS JOIN tandem_consumer_aggregates AS a
             WHERE a.subject = wanted.value AND a.source = $2 AND a.consumer = $1",
            params![consumer, source, list.as_str()],
        )?;
        rows.into_iter()
            .map(StoredAggregateState::from_row)
            .collect()
    }

    /// Per source, the unblocked states (nearly all) in one upsert fed by a
    /// `{subject: sequence}` object, whose pairs `json_each` gives as `key`
    /// and `value`; blocked ones one by one. (An update of the stored ones
    /// plus an insert of the new ones cost a fifth more: SQLite's
    /// `UPDATE ... FROM` materialises the join first; so did an upsert that
    /// extracted four fields of each JSON array element.)
    fn save_aggregate_states(
        &self,
        tx: &mut dyn Tx,
        consumer: &str,
        states: &[AggregateStateRow<'_>],
    ) -> Result<(), StoreError> {
        let mut unblocked: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
        for state in states {
            if state.blocked_by.is_none() {
                unblocked
                    .entry(state.source)
                    .or_default()
                    .insert(state.subject, state.applied);
            } else {
                save_aggregate_state(tx, consumer, state)?;
            }
        }
        for (source, sequences) in unblocked {
            let sequences = json_param(&sequences, "aggregate states")?;
            tx.execute(
                "INSERT INTO tandem_consumer_aggregates (consumer, source, subject, sequence, blocked_by)
                 SELECT $1, $2, key, value, NULL FROM json_each($3) WHERE true
                 ON CONFLICT (subject, source, consumer)
                 DO UPDATE SET sequence = excluded.sequence, blocked_by = NULL",
                params![consumer, source, sequences.as_str()],
            )?;
        }
        Ok(())
    }
}
