//! Dead letters: events a consumer could not apply, parked with the reason,
//! the error, the attempt count and timestamps, so the rest keeps flowing.
//!
//! Parking an event blocks its aggregate: later events of the same
//! aggregate are parked behind it (reason `blocked`) rather than applied out
//! of order. Operators list and inspect parked events here, and ask the
//! running consumer to redrive or discard them ([`request_redrive`],
//! [`request_discard`]); the consumer carries the request out with its
//! handler, exactly once, from whichever process asked.

use crate::bus::Record;
use crate::envelope::Envelope;
use crate::params;
use crate::schema::now_micros;
use crate::store::{Param, Row, Store, StoreError, Tx};

/// Why an event was parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The bytes are not a valid envelope.
    Decode,
    /// The handler failed on every attempt, or said the failure is permanent.
    Handler,
    /// An earlier sequence of the aggregate never arrived in time.
    Gap,
    /// An earlier event of the same aggregate is parked.
    Blocked,
    /// The store refused what applying the event asked of it (a value
    /// the engine cannot hold): retrying cannot help.
    Store,
}

impl Reason {
    /// Every reason, for bounded metric labels.
    pub const ALL: [Reason; 5] = [
        Reason::Decode,
        Reason::Handler,
        Reason::Gap,
        Reason::Blocked,
        Reason::Store,
    ];

    /// The reason's name, as stored with a letter and used as a metric
    /// label: `decode`, `handler`, `gap`, `blocked`, `store`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Decode => "decode",
            Reason::Handler => "handler",
            Reason::Gap => "gap",
            Reason::Blocked => "blocked",
            Reason::Store => "store",
        }
    }
}

/// A parked (or formerly parked) event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    /// The letter's id in `tandem_dead_letters`, which requests and
    /// operators name it by.
    pub id: i64,
    /// The consumer that could not apply the event.
    pub consumer: String,
    /// The topic the record was read from.
    pub topic: String,
    /// Its partition.
    pub partition: i64,
    /// Its offset in the partition.
    pub offset: i64,
    /// The envelope's id; `None` when the record did not decode (and so
    /// for `source` to `event_type`).
    pub event_id: Option<String>,
    /// The publishing service.
    pub source: Option<String>,
    /// The aggregate id.
    pub subject: Option<String>,
    /// The event's sequence in its aggregate.
    pub sequence: Option<i64>,
    /// The event's type.
    pub event_type: Option<String>,
    /// Why it was parked, as [`Reason::as_str`] names it.
    pub reason: String,
    /// The latest failure's message.
    pub error: String,
    /// How many times applying it was tried and failed.
    pub attempts: i64,
    /// When it first failed, in microseconds since the Unix epoch.
    pub first_failed_at_micros: i64,
    /// When it last failed (it may fail again on a redrive), in
    /// microseconds since the Unix epoch.
    pub last_failed_at_micros: i64,
    /// `parked`, `resolved` (applied or found to be a duplicate) or `discarded`.
    pub status: String,
    /// The raw bytes as they came off the bus.
    #[serde(skip)]
    pub payload: Vec<u8>,
}

const COLUMNS: &str = "id, consumer, topic, partition, record_offset, event_id, source, subject,
    sequence, event_type, reason, error, attempts, first_failed_at, last_failed_at, status, payload";

fn from_row(row: &Row) -> Result<DeadLetter, StoreError> {
    Ok(DeadLetter {
        id: row.i64(0)?,
        consumer: row.text(1)?.to_owned(),
        topic: row.text(2)?.to_owned(),
        partition: row.i64(3)?,
        offset: row.i64(4)?,
        event_id: row.opt_text(5)?.map(str::to_owned),
        source: row.opt_text(6)?.map(str::to_owned),
        subject: row.opt_text(7)?.map(str::to_owned),
        sequence: row.opt_i64(8)?,
        event_type: row.opt_text(9)?.map(str::to_owned),
        reason: row.text(10)?.to_owned(),
        error: row.text(11)?.to_owned(),
        attempts: row.i64(12)?,
        first_failed_at_micros: row.i64(13)?,
        last_failed_at_micros: row.i64(14)?,
        status: row.text(15)?.to_owned(),
        payload: row.bytes(16)?.to_vec(),
    })
}

/// Parks a record inside the consumer's transaction; returns its id.
#[allow(clippy::too_many_arguments)]
pub(crate) fn park(
    tx: &mut dyn Tx,
    consumer: &str,
    record: &Record,
    envelope: Option<&Envelope>,
    reason: Reason,
    error: &str,
    attempts: u32,
    first_failed_at_micros: i64,
) -> Result<i64, StoreError> {
    let event_id = envelope.map(|envelope| envelope.id.to_string());
    let event_type = envelope.map(|envelope| envelope.event_type.as_str());
    let group = fingerprint(consumer, event_type, reason.as_str(), error);
    let row = tx
        .query_opt(
            "INSERT INTO tandem_dead_letters (consumer, topic, partition, record_offset, event_id,
               source, subject, sequence, event_type, payload, reason, error, attempts,
               first_failed_at, last_failed_at, status, failure_group)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, 'parked',
                     $16)
             RETURNING id",
            &[
                Param::Text(consumer),
                Param::Text(&record.topic),
                Param::from(record.partition),
                Param::from(record.offset),
                Param::from(event_id.as_ref()),
                Param::from(envelope.map(|envelope| envelope.source.as_str())),
                Param::from(envelope.map(|envelope| envelope.subject.as_str())),
                Param::from(envelope.map(|envelope| envelope.sequence)),
                Param::from(event_type),
                Param::Blob(&record.payload),
                Param::Text(reason.as_str()),
                Param::Text(error),
                Param::from(attempts),
                Param::Int(first_failed_at_micros),
                Param::Int(now_micros()),
                Param::Text(&group),
            ],
        )?
        .ok_or_else(|| StoreError::Decode("dead letter insert returned nothing".into()))?;
    let id = row.i64(0)?;
    tracing::warn!(
        consumer,
        dead_letter = id,
        reason = reason.as_str(),
        topic = %record.topic,
        partition = record.partition,
        offset = record.offset,
        %error,
        "event parked"
    );
    Ok(id)
}

/// Parked rows of one aggregate, lowest sequence first.
pub(crate) fn parked_of_aggregate(
    tx: &mut dyn Tx,
    consumer: &str,
    source: &str,
    subject: &str,
) -> Result<Vec<DeadLetter>, StoreError> {
    let rows = tx.query(
        &format!(
            "SELECT {COLUMNS} FROM tandem_dead_letters
             WHERE consumer = $1 AND source = $2 AND subject = $3 AND status = 'parked'
             ORDER BY sequence, id"
        ),
        params![consumer, source, subject],
    )?;
    rows.iter().map(from_row).collect()
}

pub(crate) fn get_in(tx: &mut dyn Tx, id: i64) -> Result<Option<DeadLetter>, StoreError> {
    tx.query_opt(
        &format!("SELECT {COLUMNS} FROM tandem_dead_letters WHERE id = $1"),
        params![id],
    )?
    .as_ref()
    .map(from_row)
    .transpose()
}

pub(crate) fn set_status(tx: &mut dyn Tx, id: i64, status: &str) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE tandem_dead_letters SET status = $2 WHERE id = $1",
        params![id, status],
    )?;
    Ok(())
}

/// Records that `letter` failed again with `error` (its failure group
/// follows the new error).
pub(crate) fn record_failure(
    tx: &mut dyn Tx,
    letter: &DeadLetter,
    error: &str,
    tried: bool,
) -> Result<(), StoreError> {
    let group = fingerprint(
        &letter.consumer,
        letter.event_type.as_deref(),
        &letter.reason,
        error,
    );
    tx.execute(
        "UPDATE tandem_dead_letters
         SET error = $2, attempts = attempts + $3, last_failed_at = $4, failure_group = $5
         WHERE id = $1",
        params![letter.id, error, i64::from(tried), now_micros(), &group],
    )?;
    Ok(())
}

/// Parked events of `consumer` (all consumers if `None`), oldest first;
/// resolved and discarded ones too when `include_settled`.
pub async fn list<S: Store>(
    store: &S,
    consumer: Option<&str>,
    include_settled: bool,
) -> Result<Vec<DeadLetter>, StoreError> {
    let consumer = consumer.map(str::to_owned);
    store
        .read(move |tx| {
            let rows = tx.query(
                &format!(
                    "SELECT {COLUMNS} FROM tandem_dead_letters
                     WHERE ($1 IS NULL OR consumer = $1) AND ($2 = 1 OR status = 'parked')
                     ORDER BY id"
                ),
                params![consumer.as_ref(), include_settled],
            )?;
            rows.iter().map(from_row).collect()
        })
        .await
}

/// One dead letter by id.
pub async fn get<S: Store>(store: &S, id: i64) -> Result<Option<DeadLetter>, StoreError> {
    store.read(move |tx| get_in(tx, id)).await
}

/// Parked events per consumer: the dead-letter depth.
pub async fn depth<S: Store>(store: &S, consumer: &str) -> Result<u64, StoreError> {
    let consumer = consumer.to_owned();
    store
        .read(move |tx| {
            let row = tx
                .query_opt(
                    "SELECT COUNT(*) FROM tandem_dead_letters WHERE consumer = $1 AND status = 'parked'",
                    params![&consumer],
                )?
                .ok_or_else(|| StoreError::Decode("count returned nothing".into()))?;
            Ok(u64::try_from(row.i64(0)?).unwrap_or(0))
        })
        .await
}

/// An order for a running consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Handle the parked event again (`None`: every parked event).
    Redrive(Option<i64>),
    /// Give up on the parked event (`None`: every parked event); later
    /// events of its aggregate then flow.
    Discard(Option<i64>),
    /// Clear the read model and rebuild it from the start of the log.
    Replay,
}

/// Why a request was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The database has no trace of this consumer: a request for it would
    /// wait forever, since no consumer of that name runs here.
    #[error("unknown consumer {consumer} ({})", known_here(.known))]
    UnknownConsumer {
        /// The name asked for.
        consumer: String,
        /// The consumers the database knows, by name.
        known: Vec<String>,
    },
    /// The database failed; nothing was recorded.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn known_here(known: &[String]) -> String {
    if known.is_empty() {
        "no consumer has applied an event in this database yet".to_owned()
    } else {
        format!("known here: {}", known.join(", "))
    }
}

/// Whether a replay of `consumer` was carried out (it records a
/// generation, and leaves no position until the consumer applies again).
/// A database last opened by a version without that table says no.
fn replayed_before(tx: &mut dyn Tx, consumer: &str) -> Result<bool, StoreError> {
    tx.savepoint("tandem_known")?;
    match tx.query_opt(
        "SELECT 1 FROM tandem_consumer_generations WHERE consumer = $1",
        params![consumer],
    ) {
        Ok(row) => {
            tx.release_savepoint("tandem_known")?;
            Ok(row.is_some())
        }
        Err(_) => {
            tx.rollback_to_savepoint("tandem_known")?;
            Ok(false)
        }
    }
}

/// Refuses a consumer the database has no trace of. A consumer leaves one
/// when it first commits an event (its positions), and keeps one while it
/// has dead letters; no table records a consumer before that, and a
/// request would do nothing for one that has applied nothing yet.
fn require_known(tx: &mut dyn Tx, consumer: &str) -> Result<(), RequestError> {
    let known = tx
        .query_opt(
            "SELECT 1 FROM tandem_consumer_positions WHERE consumer = $1
             UNION ALL SELECT 1 FROM tandem_consumer_aggregates WHERE consumer = $1
             UNION ALL SELECT 1 FROM tandem_dead_letters WHERE consumer = $1
             LIMIT 1",
            params![consumer],
        )?
        .is_some();
    if known || replayed_before(tx, consumer)? {
        return Ok(());
    }
    let known = tx
        .query(
            "SELECT consumer FROM tandem_consumer_positions
             UNION SELECT consumer FROM tandem_consumer_aggregates
             UNION SELECT consumer FROM tandem_dead_letters
             ORDER BY 1",
            &[],
        )?
        .iter()
        .map(|row| row.text(0).map(str::to_owned))
        .collect::<Result<_, _>>()?;
    Err(RequestError::UnknownConsumer {
        consumer: consumer.to_owned(),
        known,
    })
}

async fn request<S: Store>(
    store: &S,
    consumer: &str,
    command: Command,
) -> Result<(), RequestError> {
    let consumer = consumer.to_owned();
    let (name, id) = match command {
        Command::Redrive(id) => ("redrive", id),
        Command::Discard(id) => ("discard", id),
        Command::Replay => ("replay", None),
    };
    store
        .write(move |tx| {
            require_known(tx, &consumer)?;
            tx.execute(
                "INSERT INTO tandem_consumer_requests (consumer, command, dead_letter_id, requested_at)
                 VALUES ($1, $2, $3, $4)",
                params![&consumer, name, id, now_micros()],
            )?;
            Ok(())
        })
        .await
}

/// Asks `consumer` to handle parked event `id` (or all) again. A consumer
/// the database does not know is refused ([`RequestError::UnknownConsumer`]).
pub async fn request_redrive<S: Store>(
    store: &S,
    consumer: &str,
    id: Option<i64>,
) -> Result<(), RequestError> {
    request(store, consumer, Command::Redrive(id)).await
}

/// Asks `consumer` to give up on parked event `id` (or all); refused for a
/// consumer the database does not know.
pub async fn request_discard<S: Store>(
    store: &S,
    consumer: &str,
    id: Option<i64>,
) -> Result<(), RequestError> {
    request(store, consumer, Command::Discard(id)).await
}

/// Asks `consumer` to rebuild its read model from the start of the log;
/// refused for a consumer the database does not know.
pub async fn request_replay<S: Store>(store: &S, consumer: &str) -> Result<(), RequestError> {
    request(store, consumer, Command::Replay).await
}

/// Takes the oldest pending request for `consumer`, if any (inside the
/// transaction that carries it out, so a crash leaves it pending). The inner
/// `None` is a request this version does not understand (dropped).
pub(crate) fn take_request(
    tx: &mut dyn Tx,
    consumer: &str,
) -> Result<Option<Option<Command>>, StoreError> {
    let Some(row) = tx.query_opt(
        "SELECT id, command, dead_letter_id FROM tandem_consumer_requests
         WHERE consumer = $1 ORDER BY id LIMIT 1",
        params![consumer],
    )?
    else {
        return Ok(None);
    };
    let request_id = row.i64(0)?;
    let dead_letter_id = row.opt_i64(2)?;
    let command = match row.text(1)? {
        "redrive" => Some(Command::Redrive(dead_letter_id)),
        "discard" => Some(Command::Discard(dead_letter_id)),
        "replay" => Some(Command::Replay),
        other => {
            tracing::warn!(
                consumer,
                command = other,
                "unknown consumer request dropped"
            );
            None
        }
    };
    tx.execute(
        "DELETE FROM tandem_consumer_requests WHERE id = $1",
        params![request_id],
    )?;
    Ok(Some(command))
}

// ------------------------------------------------------------ failure groups

/// `error` with its variable parts masked, so that failures of one cause
/// read alike: a word with a digit in it (an id, a count, an offset, a
/// UUID) becomes `{n}` when it is all digits and `{id}` otherwise, and
/// the text is cut at 200 characters.
pub fn masked(error: &str) -> String {
    let mut out = String::with_capacity(error.len().min(200));
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.chars().any(|c| c.is_ascii_digit()) {
            if word.chars().all(|c| c.is_ascii_digit()) {
                out.push_str("{n}");
            } else {
                out.push_str("{id}");
            }
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in error.chars() {
        if c.is_alphanumeric() || c == '-' || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    if out.chars().count() > 200 {
        out = out.chars().take(200).collect();
    }
    out
}

/// The failure group of a dead letter: a stable fingerprint (16 hex
/// digits of SHA-256) of its consumer, event type, reason (the error
/// kind) and [`masked`] error. Letters of one cause share it across
/// restarts and versions, so an operator can redrive or discard them
/// together. Each letter's is stored with it (`failure_group`, from
/// schema migration 3 on), so listings filter and count by it in SQL.
pub fn failure_group(letter: &DeadLetter) -> String {
    fingerprint(
        &letter.consumer,
        letter.event_type.as_deref(),
        &letter.reason,
        &letter.error,
    )
}

/// The failure group of a letter of `consumer` whose event has
/// `event_type` (`None`: it did not decode), parked for `reason` (as
/// [`Reason::as_str`] names it) with `error`: see [`failure_group`].
pub fn fingerprint(consumer: &str, event_type: Option<&str>, reason: &str, error: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in [consumer, event_type.unwrap_or(""), reason, &masked(error)] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    hasher.finalize()[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// How many letters [`fill_failure_groups`] reads, and writes in one
/// statement, at a time.
const FILL_BATCH: usize = 500;

/// Stores the failure group of every letter that has none, and returns
/// how many it filled: the letters parked before groups were stored
/// (schema migration 3 runs this on each engine), or since then by a build
/// older than that migration (a rolling upgrade; every store runs it again
/// when it opens). The fingerprint is Rust's ([`fingerprint`]), so SQL
/// alone cannot fill the column: each batch of letters (`FILL_BATCH`, 500)
/// is read in id order and written back in one
/// `UPDATE ... FROM (VALUES ...)`.
pub fn fill_failure_groups(tx: &mut dyn Tx) -> Result<u64, StoreError> {
    let mut filled = 0_u64;
    let mut after = 0_i64;
    loop {
        let rows = tx.query(
            "SELECT id, consumer, event_type, reason, error FROM tandem_dead_letters
             WHERE failure_group IS NULL AND id > $1
             ORDER BY id LIMIT $2",
            params![after, FILL_BATCH as i64],
        )?;
        let Some(last) = rows.last() else { break };
        after = last.i64(0)?;
        let groups = rows
            .iter()
            .map(|row| {
                Ok((
                    row.i64(0)?,
                    fingerprint(row.text(1)?, row.opt_text(2)?, row.text(3)?, row.text(4)?),
                ))
            })
            .collect::<Result<Vec<(i64, String)>, StoreError>>()?;
        let values = (0..groups.len())
            .map(|index| format!("(CAST(${} AS BIGINT), ${})", 2 * index + 1, 2 * index + 2))
            .collect::<Vec<_>>()
            .join(", ");
        let params: Vec<Param<'_>> = groups
            .iter()
            .flat_map(|(id, group)| [Param::Int(*id), Param::Text(group)])
            .collect();
        tx.execute(
            &format!(
                "UPDATE tandem_dead_letters SET failure_group = fill.column2
                 FROM (VALUES {values}) AS fill
                 WHERE tandem_dead_letters.id = fill.column1"
            ),
            &params,
        )?;
        filled += groups.len() as u64;
        if rows.len() < FILL_BATCH {
            break;
        }
    }
    if filled > 0 {
        tracing::info!(
            letters = filled,
            "failure groups stored for dead letters that had none"
        );
    }
    Ok(filled)
}

/// One failure group with its size and time span.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureGroup {
    /// The group's fingerprint (see [`failure_group`]).
    pub group: String,
    /// The consumer whose letters these are (a group has one).
    pub consumer: String,
    /// The type of the group's events; `None` when they did not decode.
    pub event_type: Option<String>,
    /// Why they were parked, as [`Reason::as_str`] names it.
    pub reason: String,
    /// The error with its variable parts masked.
    pub error: String,
    /// How many letters of the group the filter admits.
    pub count: u64,
    /// When the earliest of them first failed (µs since the Unix epoch).
    pub first_seen_micros: i64,
    /// When the latest of them last failed (µs since the Unix epoch).
    pub last_seen_micros: i64,
}

/// Which dead letters a listing or a bulk action takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this consumer's.
    pub consumer: Option<String>,
    /// Only those of this status (`parked`, `resolved`, `discarded`); all
    /// when `None`.
    pub status: Option<String>,
    /// Only this failure group's.
    pub group: Option<String>,
}

impl Filter {
    /// The filter's conditions, `AND`ed, each with a placeholder numbered
    /// after those already in `params` (its value pushed there); `1 = 1`
    /// when it takes every letter. Only the conditions given are written
    /// (no `$n IS NULL OR ...`), so each shape of filter is a statement of
    /// its own that the engine plans on its indexes. The status `parked`
    /// is written as it is, not as a parameter: the index that counts the
    /// parked letters' groups holds theirs only, and an engine takes such
    /// an index only for a query that names the value.
    fn conditions<'a>(&'a self, params: &mut Vec<Param<'a>>) -> String {
        let mut conditions = Vec::new();
        for (column, value) in [
            ("status", &self.status),
            ("consumer", &self.consumer),
            ("failure_group", &self.group),
        ] {
            match value.as_deref() {
                None => {}
                Some("parked") if column == "status" => {
                    conditions.push("status = 'parked'".to_owned());
                }
                Some(value) => {
                    params.push(Param::Text(value));
                    conditions.push(format!("{column} = ${}", params.len()));
                }
            }
        }
        if conditions.is_empty() {
            "1 = 1".to_owned()
        } else {
            conditions.join(" AND ")
        }
    }
}

/// Dead letters that `filter` admits with an id above `after`, oldest
/// first, at most `limit`, read in `tx`: one statement, on the index of
/// the filter (the failure group's, a consumer's, or the ids').
pub fn page_in(
    tx: &mut dyn Tx,
    filter: &Filter,
    after: Option<i64>,
    limit: usize,
) -> Result<Vec<DeadLetter>, StoreError> {
    let mut params = vec![
        Param::Int(after.unwrap_or(0)),
        Param::Int(i64::try_from(limit).unwrap_or(i64::MAX)),
    ];
    let conditions = filter.conditions(&mut params);
    let rows = tx.query(
        &format!(
            "SELECT {COLUMNS} FROM tandem_dead_letters
             WHERE id > $1 AND {conditions}
             ORDER BY id LIMIT $2"
        ),
        &params,
    )?;
    rows.iter().map(from_row).collect()
}

/// The ids of the first `limit` dead letters that `filter` admits, oldest
/// first, read in `tx`: what a bulk action over a filter takes.
pub fn ids_in(tx: &mut dyn Tx, filter: &Filter, limit: usize) -> Result<Vec<i64>, StoreError> {
    let mut params = vec![Param::Int(i64::try_from(limit).unwrap_or(i64::MAX))];
    let conditions = filter.conditions(&mut params);
    let rows = tx.query(
        &format!(
            "SELECT id FROM tandem_dead_letters
             WHERE {conditions}
             ORDER BY id LIMIT $1"
        ),
        &params,
    )?;
    rows.iter().map(|row| row.i64(0)).collect()
}

/// [`page_in`] in a read transaction of its own.
pub async fn page<S: Store>(
    store: &S,
    filter: Filter,
    after: Option<i64>,
    limit: usize,
) -> Result<Vec<DeadLetter>, StoreError> {
    store
        .read(move |tx| page_in(tx, &filter, after, limit))
        .await
}

/// The failure groups of the dead letters `filter` admits, largest first
/// (then by group), read in `tx`: one `GROUP BY` over the stored groups
/// for the counts and time spans, joined to the first letter of each group
/// for what the group shows (its event type, reason, masked error). A
/// group belongs to one consumer (the fingerprint covers it), so grouping
/// by consumer and group is grouping by group, in the order of the index
/// the engines count the parked letters' groups from.
pub fn groups_in(tx: &mut dyn Tx, filter: &Filter) -> Result<Vec<FailureGroup>, StoreError> {
    let mut params = Vec::new();
    let conditions = filter.conditions(&mut params);
    let rows = tx.query(
        &format!(
            "SELECT g.failure_group, g.letters, g.first_seen, g.last_seen,
                    g.consumer, d.event_type, d.reason, d.error
             FROM (SELECT consumer, failure_group, COUNT(*) AS letters,
                          MIN(first_failed_at) AS first_seen, MAX(last_failed_at) AS last_seen,
                          MIN(id) AS sample
                   FROM tandem_dead_letters
                   WHERE {conditions}
                   GROUP BY consumer, failure_group) AS g
             JOIN tandem_dead_letters AS d ON d.id = g.sample"
        ),
        &params,
    )?;
    let mut groups = rows
        .into_iter()
        .map(|mut row| {
            Ok(FailureGroup {
                group: row.take_text(0)?,
                count: u64::try_from(row.i64(1)?).unwrap_or(0),
                first_seen_micros: row.i64(2)?,
                last_seen_micros: row.i64(3)?,
                consumer: row.take_text(4)?,
                event_type: row.opt_text(5)?.map(str::to_owned),
                reason: row.take_text(6)?,
                error: masked(row.text(7)?),
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    groups.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.group.cmp(&b.group)));
    Ok(groups)
}

/// [`groups_in`] in a read transaction of its own.
pub async fn groups<S: Store>(store: &S, filter: Filter) -> Result<Vec<FailureGroup>, StoreError> {
    store.read(move |tx| groups_in(tx, &filter)).await
}

/// Records requests for the parked letters `ids` (each to its own
/// consumer) in `tx`: what a bulk redrive or discard of a list or a
/// failure group asks. Letters that are not parked (any more) are skipped;
/// returns the ids asked for. The requests are carried out by the running
/// consumers one transaction each, so a crash part-way applies each event
/// at most once, and the rest are still pending when it is back.
pub fn request_in(tx: &mut dyn Tx, ids: &[i64], command: Command) -> Result<Vec<i64>, StoreError> {
    let name = match command {
        Command::Redrive(_) => "redrive",
        Command::Discard(_) => "discard",
        Command::Replay => {
            return Err(StoreError::Decode(
                "a replay is asked of a consumer, not of dead letters".into(),
            ))
        }
    };
    let mut asked = Vec::new();
    let now = now_micros();
    for &id in ids {
        let Some(letter) = tx.query_opt(
            "SELECT consumer FROM tandem_dead_letters WHERE id = $1 AND status = 'parked'",
            params![id],
        )?
        else {
            continue;
        };
        tx.execute(
            "INSERT INTO tandem_consumer_requests (consumer, command, dead_letter_id, requested_at)
             VALUES ($1, $2, $3, $4)",
            params![letter.text(0)?, name, id, now],
        )?;
        asked.push(id);
    }
    Ok(asked)
}

/// Records a replay request for `consumer` in `tx`; refused for a
/// consumer the database does not know.
pub fn request_replay_in(tx: &mut dyn Tx, consumer: &str) -> Result<(), RequestError> {
    require_known(tx, consumer)?;
    tx.execute(
        "INSERT INTO tandem_consumer_requests (consumer, command, dead_letter_id, requested_at)
         VALUES ($1, 'replay', NULL, $2)",
        params![consumer, now_micros()],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::masked;

    #[test]
    fn masking_keeps_the_words_and_hides_the_ids_and_numbers() {
        assert_eq!(
            masked("customer 1234 has no credit for order ord-01J9Z at offset 77"),
            "customer {n} has no credit for order {id} at offset {n}"
        );
        assert_eq!(
            masked("unknown product \"0192f3a4-5b6c-7d8e-9f00-112233445566\""),
            "unknown product \"{id}\""
        );
        assert_eq!(masked("no such table"), "no such table");
        assert_eq!(masked(&"x".repeat(500)).len(), 200);
    }
}
