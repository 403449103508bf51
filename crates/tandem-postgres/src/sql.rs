//! The toolkit's SQL in PostgreSQL's words: the schema and its migrations,
//! sequences, the outbox in commit order, consumer states.
//!
//! Writers of a database are serialised by the store (an advisory lock
//! taken by every write transaction), but sequence numbers and positions
//! are still taken the way concurrent writers would need: an aggregate's
//! row lock is held to the end of the transaction, and `position` (a
//! sequence taken at insert) is not commit order, which is why each row
//! records its transaction id.

use std::collections::HashMap;

use crate::WRITER_LOCK_KEY;
use tandem::outbox::{in_sequence_per_aggregate, Cursor, OutboxBatch};
use tandem::params;
use tandem::sql::{
    backlog_of, json_param, stored_event, AggregateStateRow, EngineSql, Migration, OutboxRow,
    StoredAggregateState,
};
use tandem::store::{Dialect, StoreError, Tx};

/// PostgreSQL's [`EngineSql`].
#[derive(Debug, Clone, Copy, Default)]
pub struct PostgresSql;

/// The one instance every PostgreSQL transaction hands out.
pub static POSTGRES: PostgresSql = PostgresSql;

static MIGRATIONS: [Migration; 4] = [
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
];

/// Migration 4: the rebuilds of read models (`tandem::rebuild`).
fn install_rebuilds(tx: &mut dyn Tx) -> Result<(), StoreError> {
    tx.execute_batch(tandem::rebuild::TABLE)
}

/// Migration 3: each dead letter's failure group
/// (`tandem::dead_letter::failure_group`) in a column of its own, so that
/// listings filter by it and count by it in SQL. The letters already
/// there are filled first, in Rust (the group is a SHA-256 fingerprint:
/// see `tandem::dead_letter::fill_failure_groups`), then indexed.
fn install_failure_groups(tx: &mut dyn Tx) -> Result<(), StoreError> {
    tx.execute_batch(
        "ALTER TABLE tandem_dead_letters ADD COLUMN IF NOT EXISTS failure_group TEXT",
    )?;
    tandem::dead_letter::fill_failure_groups(tx)?;
    tx.execute_batch(FAILURE_GROUPS)
}

// - `tandem_dead_letters_group` `(failure_group, status, id)`: a group's
//   letters of a status in id order, so a page of a group after a cursor
//   is one seek; and the letters without a group (none, but during a
//   rolling upgrade) are found at once when a store connects.
// - `tandem_dead_letters_parked_groups` `(consumer, failure_group,
//   first_failed_at, last_failed_at, id)` of the parked letters only:
//   their failure groups are counted from it by an index-only scan, in
//   group order (for one consumer, from a range of it). The letters
//   resolved and discarded, which stay on record, never make it longer.
//   Used by the queries that name `status = 'parked'` as it is (see
//   `tandem::dead_letter::Filter`).
// No index starts with `status`, which nearly every letter shares: a
// listing of the parked letters reads the table in id order even before
// the table's statistics say so.
// - `tandem_dead_letters_record` `(consumer, topic, partition,
//   record_offset)`: whether a record that cannot be decoded is on record
//   already (a replay meets it again), one seek.
const FAILURE_GROUPS: &str = "
CREATE INDEX IF NOT EXISTS tandem_dead_letters_group
    ON tandem_dead_letters (failure_group, status, id);
CREATE INDEX IF NOT EXISTS tandem_dead_letters_parked_groups
    ON tandem_dead_letters (consumer, failure_group, first_failed_at, last_failed_at, id)
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
    id     BIGSERIAL PRIMARY KEY,
    at     BIGINT NOT NULL,
    actor  TEXT   NOT NULL,
    action TEXT   NOT NULL,
    target TEXT   NOT NULL,
    result TEXT   NOT NULL
);
CREATE TABLE IF NOT EXISTS tandem_consumer_paused (
    consumer  TEXT   PRIMARY KEY,
    paused_at BIGINT NOT NULL,
    paused_by TEXT   NOT NULL
);
";

/// Migration 1: every table, and the upgrades of schemas made before
/// migrations were numbered (the outbox's and the relay cursors' `xid`,
/// the fillfactor of tables updated in place).
fn install_tables(tx: &mut dyn Tx) -> Result<(), StoreError> {
    tx.execute_batch(TABLES)
}

const TABLES: &str = "
CREATE TABLE IF NOT EXISTS tandem_outbox (
    position     BIGSERIAL PRIMARY KEY,
    topic        TEXT    NOT NULL,
    subject      TEXT    NOT NULL,
    sequence     BIGINT  NOT NULL,
    event_id     TEXT    NOT NULL,
    event_type   TEXT    NOT NULL,
    envelope     BYTEA   NOT NULL,
    committed_at BIGINT  NOT NULL,
    xid          BIGINT  NOT NULL DEFAULT (pg_current_xact_id()::text::bigint)
);
ALTER TABLE tandem_outbox
    ADD COLUMN IF NOT EXISTS xid BIGINT NOT NULL DEFAULT (pg_current_xact_id()::text::bigint);
CREATE INDEX IF NOT EXISTS tandem_outbox_commit_order ON tandem_outbox (xid, position);
CREATE TABLE IF NOT EXISTS tandem_aggregates (
    topic    TEXT   NOT NULL,
    subject  TEXT   NOT NULL,
    sequence BIGINT NOT NULL,
    PRIMARY KEY (topic, subject)
);
CREATE TABLE IF NOT EXISTS tandem_relay_positions (
    relay      TEXT   PRIMARY KEY,
    position   BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    xid        BIGINT NOT NULL DEFAULT 0
);
ALTER TABLE tandem_relay_positions ADD COLUMN IF NOT EXISTS xid BIGINT NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS tandem_consumer_positions (
    consumer    TEXT   NOT NULL,
    topic       TEXT   NOT NULL,
    partition   BIGINT NOT NULL,
    next_offset BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (consumer, topic, partition)
);
CREATE TABLE IF NOT EXISTS tandem_consumer_aggregates (
    consumer TEXT   NOT NULL,
    source   TEXT   NOT NULL,
    subject  TEXT   NOT NULL,
    sequence BIGINT NOT NULL,
    blocked_by BIGINT,
    PRIMARY KEY (consumer, source, subject)
);
-- Rows updated in place all the time: room on each page lets an update
-- stay on its page (a HOT update), which skips the index insert a moved
-- row needs, more than halving the cost of a batch's upsert. Set once:
-- the ALTER waits for any vacuum of the table, so a schema that has the
-- setting already skips it.
DO $tandem$
DECLARE
    relation text;
BEGIN
    FOREACH relation IN ARRAY ARRAY['tandem_aggregates', 'tandem_relay_positions',
                                'tandem_consumer_positions', 'tandem_consumer_aggregates']
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_class
                       WHERE oid = to_regclass(relation)
                         AND reloptions @> ARRAY['fillfactor=70']) THEN
            EXECUTE format('ALTER TABLE %I SET (fillfactor = 70)', relation);
        END IF;
    END LOOP;
END
$tandem$;
CREATE TABLE IF NOT EXISTS tandem_consumer_requests (
    id             BIGSERIAL PRIMARY KEY,
    consumer       TEXT   NOT NULL,
    command        TEXT   NOT NULL,
    dead_letter_id BIGINT,
    requested_at   BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS tandem_pending (
    consumer      TEXT   NOT NULL,
    source        TEXT   NOT NULL,
    subject       TEXT   NOT NULL,
    sequence      BIGINT NOT NULL,
    topic         TEXT   NOT NULL,
    partition     BIGINT NOT NULL,
    record_offset BIGINT NOT NULL,
    payload       BYTEA  NOT NULL,
    received_at   BIGINT NOT NULL,
    PRIMARY KEY (consumer, source, subject, sequence)
);
CREATE TABLE IF NOT EXISTS tandem_dead_letters (
    id              BIGSERIAL PRIMARY KEY,
    consumer        TEXT   NOT NULL,
    topic           TEXT   NOT NULL,
    partition       BIGINT NOT NULL,
    record_offset   BIGINT NOT NULL,
    event_id        TEXT,
    source          TEXT,
    subject         TEXT,
    sequence        BIGINT,
    event_type      TEXT,
    payload         BYTEA  NOT NULL,
    reason          TEXT   NOT NULL,
    error           TEXT   NOT NULL,
    attempts        BIGINT NOT NULL,
    first_failed_at BIGINT NOT NULL,
    last_failed_at  BIGINT NOT NULL,
    status          TEXT   NOT NULL
);
CREATE INDEX IF NOT EXISTS tandem_dead_letters_consumer
    ON tandem_dead_letters (consumer, status);
CREATE INDEX IF NOT EXISTS tandem_dead_letters_aggregate
    ON tandem_dead_letters (consumer, subject, source, sequence);
CREATE TABLE IF NOT EXISTS tandem_consumer_generations (
    consumer   TEXT    PRIMARY KEY,
    generation BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS tandem_consumer_offsets_ahead (
    consumer     TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    partition    BIGINT NOT NULL,
    first_offset BIGINT NOT NULL,
    end_offset   BIGINT NOT NULL,
    PRIMARY KEY (consumer, topic, partition, first_offset)
);
";

impl EngineSql for PostgresSql {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn migrations(&self) -> &'static [Migration] {
        &MIGRATIONS
    }

    fn table_exists(&self, tx: &mut dyn Tx, table: &str) -> Result<bool, StoreError> {
        Ok(tx
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_tables
                 WHERE schemaname = current_schema() AND tablename = $1",
                params![table],
            )?
            .is_some())
    }

    fn rename_index(&self, tx: &mut dyn Tx, from: &str, to: &str) -> Result<bool, StoreError> {
        // Unquoted, as the model's statements name it: folded alike.
        let exists = tx
            .query_opt("SELECT to_regclass($1)::text", params![from])?
            .map(|row| row.opt_text(0).map(|name| name.is_some()))
            .transpose()?
            .unwrap_or(false);
        if exists {
            tx.execute_batch(&format!("ALTER INDEX {from} RENAME TO {to}"))?;
        }
        Ok(exists)
    }

    /// The server's clock: the sessions compared with it report their
    /// transactions' start on the same clock.
    fn database_now_micros(&self, tx: &mut dyn Tx) -> Result<i64, StoreError> {
        tx.query_opt(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint",
            params![],
        )?
        .map_or(Ok(0), |row| row.i64(0))
    }

    /// Counts, in `pg_stat_activity` (its per-transaction cache cleared
    /// first), the client sessions of this database holding a snapshot in
    /// a transaction that began before `since_micros`, as `CREATE INDEX
    /// CONCURRENTLY` waits for older snapshots. A session of another role
    /// whose details this role may not see (no `pg_read_all_stats`) counts
    /// whenever it holds a snapshot. A writer queued on Tandem's writer
    /// lock does not count: it waits for the caller's transaction, and
    /// reads committed rows afresh once it goes on.
    fn snapshots_older_than(&self, tx: &mut dyn Tx, since_micros: i64) -> Result<u64, StoreError> {
        tx.execute("SELECT pg_stat_clear_snapshot()", params![])?;
        let high = WRITER_LOCK_KEY >> 32;
        let low = WRITER_LOCK_KEY & 0xffff_ffff;
        let older = tx
            .query_opt(
                "SELECT COUNT(*) FROM pg_stat_activity a
                 WHERE a.datname = current_database()
                   AND a.pid <> pg_backend_pid()
                   AND (a.backend_type IS NULL OR a.backend_type = 'client backend')
                   AND a.backend_xmin IS NOT NULL
                   AND (a.xact_start IS NULL
                        OR a.xact_start < to_timestamp($1::bigint / 1000000.0))
                   AND NOT EXISTS (
                     SELECT 1 FROM pg_locks l
                     WHERE l.pid = a.pid AND l.locktype = 'advisory' AND NOT l.granted
                       AND l.classid::bigint = $2 AND l.objid::bigint = $3
                       AND l.objsubid = 1)",
                params![since_micros, high, low],
            )?
            .map_or(Ok(0), |row| row.i64(0))?;
        Ok(u64::try_from(older).unwrap_or(0))
    }

    /// One upsert that returns the new sequence. A concurrent writer of the
    /// same aggregate holds the row until it ends, so this writer waits and
    /// then takes the sequence after it.
    fn next_sequence(
        &self,
        tx: &mut dyn Tx,
        topic: &str,
        subject: &str,
    ) -> Result<u64, StoreError> {
        let row = tx.query_opt(
            "INSERT INTO tandem_aggregates AS a (topic, subject, sequence) VALUES ($1, $2, 1)
             ON CONFLICT (topic, subject) DO UPDATE SET sequence = a.sequence + 1
             RETURNING sequence",
            params![topic, subject],
        )?;
        let sequence = row
            .ok_or_else(|| StoreError::Engine("sequence upsert returned no row".into()))?
            .i64(0)?;
        Ok(u64::try_from(sequence).unwrap_or(0))
    }

    /// One upsert takes every aggregate's sequences at once, fed by a JSON
    /// array, each row lock held to the end of the transaction as with
    /// [`EngineSql::next_sequence`].
    fn take_sequences(
        &self,
        tx: &mut dyn Tx,
        topic: &str,
        counts: &[(&str, u64)],
    ) -> Result<Vec<u64>, StoreError> {
        let request = json_param(counts, "sequence request")?;
        let rows = tx.query(
            "INSERT INTO tandem_aggregates AS a (topic, subject, sequence)
             SELECT $1, item->>0, (item->>1)::bigint FROM jsonb_array_elements($2::text::jsonb) AS item
             ON CONFLICT (topic, subject) DO UPDATE SET sequence = a.sequence + EXCLUDED.sequence
             RETURNING subject, sequence",
            params![topic, request.as_str()],
        )?;
        let mut last: HashMap<&str, u64> = HashMap::with_capacity(rows.len());
        for row in &rows {
            last.insert(row.text(0)?, u64::try_from(row.i64(1)?).unwrap_or(0));
        }
        counts
            .iter()
            .map(|(subject, count)| {
                last.get(subject)
                    .map(|last| last + 1 - count)
                    .ok_or_else(|| {
                        StoreError::Engine("sequence upsert skipped an aggregate".into())
                    })
            })
            .collect()
    }

    /// One insert of every row, fed by a JSON array (envelopes as text).
    fn insert_events(
        &self,
        tx: &mut dyn Tx,
        topic: &str,
        rows: &[OutboxRow<'_>],
        committed_at_micros: i64,
    ) -> Result<(), StoreError> {
        let items = rows
            .iter()
            .map(|row| {
                let envelope = std::str::from_utf8(row.envelope).map_err(|error| {
                    StoreError::Engine(format!("envelope is not UTF-8: {error}").into())
                })?;
                Ok((
                    row.subject,
                    row.sequence,
                    row.event_id,
                    row.event_type,
                    envelope,
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let items = json_param(&items, "outbox rows")?;
        tx.execute(
            "INSERT INTO tandem_outbox (topic, subject, sequence, event_id, event_type, envelope, committed_at)
             SELECT $1, item->>0, (item->>1)::bigint, item->>2, item->>3, convert_to(item->>4, 'UTF8'), $3
             FROM jsonb_array_elements($2::text::jsonb) WITH ORDINALITY AS input(item, ord)
             ORDER BY ord",
            params![topic, items.as_str(), committed_at_micros],
        )?;
        Ok(())
    }

    fn outbox_columns(&self) -> &'static str {
        "position, xid, topic, subject, envelope, committed_at, sequence"
    }

    /// `position` (a sequence) is taken at insert, not at commit, so
    /// `position > cursor` could skip a row whose transaction commits later
    /// with a lower position. Only rows of transactions older than the
    /// snapshot's `xmin` (the oldest transaction still running, in the
    /// whole cluster) are read, in `(xid, position)` order: those are
    /// final, and any transaction still running or yet to write has an
    /// `xid` at or above `xmin`. A long-running write transaction anywhere
    /// in the cluster therefore holds the relay back until it ends.
    ///
    /// One statement, so the rows and the horizon come from one snapshot;
    /// the last column tells whether rows wait beyond it. Every row at or
    /// above the horizon is past the cursor (the cursor only ever passed
    /// rows below an older horizon), so the test is `max(xid)`, one step
    /// down the index: an `EXISTS` with the cursor got a generic plan that
    /// scanned the whole table.
    ///
    /// Within the batch, events of one aggregate are put in sequence order
    /// (a transaction with a lower `xid` can take an aggregate's row lock
    /// after one with a higher `xid`).
    fn read_committed_after(
        &self,
        tx: &mut dyn Tx,
        after: Cursor,
        limit: u64,
    ) -> Result<OutboxBatch, StoreError> {
        let rows = tx.query(
            "WITH horizon AS (
               SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin
             ), batch AS (
               SELECT position, xid, topic, subject, envelope, committed_at, sequence
               FROM tandem_outbox
               WHERE (xid, position) > ($1, $2) AND xid < (SELECT xmin FROM horizon)
               ORDER BY xid, position LIMIT $3
             )
             SELECT position, xid, topic, subject, envelope, committed_at, sequence, NULL
             FROM batch
             UNION ALL
             SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL,
               CASE WHEN (SELECT max(xid) FROM tandem_outbox) >= (SELECT xmin FROM horizon)
                    THEN 1 ELSE 0 END
             ORDER BY 2, 1",
            params![after.xid, after.position, limit],
        )?;
        let mut events = Vec::with_capacity(rows.len());
        let mut held_back = false;
        for row in rows {
            match row.opt_i64(7)? {
                Some(flag) => held_back = flag != 0,
                None => events.push(stored_event(row)?),
            }
        }
        let end = events.last().map_or(after, |event| event.cursor());
        Ok(OutboxBatch {
            events: in_sequence_per_aggregate(events),
            end,
            held_back,
        })
    }

    /// The first `limit` rows in commit order `(xid, position)` up to the
    /// relay's cursor (by the commit-order index), and of them those old
    /// enough.
    fn prune_published(
        &self,
        tx: &mut dyn Tx,
        relay: &str,
        before_micros: i64,
        limit: u64,
    ) -> Result<u64, StoreError> {
        tx.execute(
            "DELETE FROM tandem_outbox WHERE position IN (
               SELECT position FROM (
                 SELECT position, committed_at FROM tandem_outbox
                 WHERE (xid, position) <= COALESCE(
                   (SELECT (xid, position) FROM tandem_relay_positions WHERE relay = $1),
                   (0::bigint, 0::bigint))
                 ORDER BY xid, position LIMIT $3) AS oldest
               WHERE committed_at < $2)",
            params![relay, before_micros, limit as i64],
        )
    }

    fn relay_backlog(
        &self,
        tx: &mut dyn Tx,
        relay: &str,
    ) -> Result<(u64, Option<i64>), StoreError> {
        backlog_of(tx.query_opt(
            "SELECT COUNT(*), MIN(committed_at) FROM tandem_outbox
                 WHERE (xid, position) > COALESCE(
                   (SELECT (xid, position) FROM tandem_relay_positions WHERE relay = $1),
                   (0::bigint, 0::bigint))",
            params![relay],
        )?)
    }

    /// The cursor's `xid` is at or beyond the next id the server will hand
    /// out (after a dump and restore, a logical-replication upgrade or a
    /// blue/green switch), so every new row would sort behind it.
    fn xids_restarted(&self, tx: &mut dyn Tx, cursor: Cursor) -> Result<bool, StoreError> {
        if cursor.xid == 0 {
            return Ok(false);
        }
        let next = tx
            .query_opt(
                "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
                &[],
            )?
            .ok_or_else(|| StoreError::Decode("no snapshot".into()))?
            .i64(0)?;
        Ok(cursor.xid >= next)
    }

    /// In the caller's write transaction: rows every relay of the database
    /// has published get `xid` 0, rows whose `xid` lies beyond the server's
    /// next id get 1 (so they sort first and pass the horizon), and every
    /// cursor becomes `(0, position)` of the lowest one. What no relay had
    /// published is relayed; a few published rows may go again, and
    /// consumers drop them as duplicates.
    fn recover_restarted_xids(&self, tx: &mut dyn Tx) -> Result<u64, StoreError> {
        let Some(row) = tx.query_opt(
            "SELECT xid, position, pg_snapshot_xmax(pg_current_snapshot())::text::bigint
             FROM tandem_relay_positions ORDER BY xid, position LIMIT 1 FOR UPDATE",
            &[],
        )?
        else {
            return Ok(0);
        };
        let (xid, position, next) = (row.i64(0)?, row.i64(1)?, row.i64(2)?);
        if xid < next {
            return Ok(0);
        }
        let published = tx.execute(
            "UPDATE tandem_outbox SET xid = 0
             WHERE xid <> 0 AND position <= $2 AND (xid, position) <= ($1, $2)",
            params![xid, position],
        )?;
        let beyond = tx.execute(
            "UPDATE tandem_outbox SET xid = 1 WHERE xid >= $1",
            params![next],
        )?;
        tx.execute(
            "UPDATE tandem_relay_positions SET xid = 0, position = $1",
            params![position],
        )?;
        tracing::warn!(
            cursor_xid = xid,
            next_xid = next,
            renumbered = published + beyond,
            "transaction ids restarted below the relay cursor (a restore or an upgrade?); cursors recovered"
        );
        Ok(published + beyond)
    }

    /// `LATERAL ... LIMIT 1` keeps the planner from a hash join that scans
    /// every state; `= ANY (array)` took three times as long; an `IN` list
    /// of hundreds of parameters got a generic plan that cost tens of
    /// milliseconds.
    fn load_aggregate_states(
        &self,
        tx: &mut dyn Tx,
        consumer: &str,
        source: &str,
        subjects: &[&str],
    ) -> Result<Vec<StoredAggregateState>, StoreError> {
        let list = json_param(subjects, "aggregate states")?;
        let rows = tx.query(
            "SELECT wanted.subject, a.sequence, a.blocked_by
             FROM jsonb_array_elements_text($3::text::jsonb) AS wanted(subject)
             CROSS JOIN LATERAL (
               SELECT sequence, blocked_by FROM tandem_consumer_aggregates
               WHERE consumer = $1 AND source = $2 AND subject = wanted.subject
               LIMIT 1
             ) AS a",
            params![consumer, source, list.as_str()],
        )?;
        rows.into_iter()
            .map(StoredAggregateState::from_row)
            .collect()
    }

    /// One upsert fed by a JSON array (a round trip per aggregate was most
    /// of a batch's time).
    fn save_aggregate_states(
        &self,
        tx: &mut dyn Tx,
        consumer: &str,
        states: &[AggregateStateRow<'_>],
    ) -> Result<(), StoreError> {
        let rows: Vec<(&str, &str, u64, Option<i64>)> = states
            .iter()
            .map(|state| (state.source, state.subject, state.applied, state.blocked_by))
            .collect();
        let rows = json_param(&rows, "aggregate states")?;
        tx.execute(
            "INSERT INTO tandem_consumer_aggregates (consumer, source, subject, sequence, blocked_by)
             SELECT $1, item->>0, item->>1, (item->>2)::bigint, (item->>3)::bigint
             FROM jsonb_array_elements($2::text::jsonb) AS item
             ON CONFLICT (consumer, source, subject)
             DO UPDATE SET sequence = EXCLUDED.sequence, blocked_by = EXCLUDED.blocked_by",
            params![consumer, rows.as_str()],
        )?;
        Ok(())
    }
}
