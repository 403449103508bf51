//! Side-by-side rebuilds of read models: a new version of a consumer's
//! read model fills into tables of its own while the live version keeps
//! answering reads and applying new events; once the new version has
//! applied everything the live one has, one transaction swaps the tables
//! and hands the new version's positions to the consumer. Readers never
//! see a partly built model, nor an aggregate older than they saw before.
//!
//! A consumer can be rebuilt this way when its handler comes from a
//! [`ReadModel`]: the model names its tables and makes a handler for any
//! names it is given. A rebuild ([`request`]) is a row of
//! `tandem_rebuilds`, carried out by the running service ([`run`]):
//!
//! 1. **Build beside.** The model's tables are created under new names
//!    (`{table}__r{number}`) and a second consumer, named
//!    `{consumer}-rebuild-{number}` (its own group on the bus, its own
//!    positions, aggregate states and dead letters), applies the log from
//!    its start into them. The live consumer's discarded dead letters are
//!    copied to it first, so it skips what an operator discarded.
//! 2. **No side effects.** The rebuilding handler runs with a transaction
//!    that refuses the outbox: an event it appends fails the event
//!    (parked, never published). A read model reproduces state; a handler
//!    that publishes (the Inventory Service's reservations) is not a read
//!    model and is refused a side-by-side rebuild.
//! 3. **Switch.** Every `check` the runner looks, in a write transaction,
//!    whether the new version is level with the live one: at or past its
//!    position on every partition, and every aggregate the live version
//!    applied at least as new. The builder's own writes wait meanwhile, so
//!    its last batch committed before that transaction began, and on
//!    PostgreSQL the switch waits for readers whose snapshot is older than
//!    its transaction (a reader held up by the rename would otherwise read
//!    the renamed table as that snapshot saw it: older than the live copy
//!    it read before). The runner waits for such readers first without
//!    the writer lock, so a session that holds a snapshot for long defers
//!    the switch instead of holding the service's writes back. Then, in
//!    that same transaction: the live
//!    tables are dropped and the new ones renamed to the live names; the
//!    live consumer's positions, aggregate states and held events are
//!    replaced by the new version's; its dead letters too (parked and
//!    discarded ones come with the new version; resolved ones stay on
//!    record); the rebuilding consumer is paused so that no batch of it
//!    commits again; and the live consumer's replay generation is bumped,
//!    so every member drops what it buffered and seeks to the new
//!    positions.
//! 4. **Crashes and cancellation.** Everything above is in the database:
//!    a process killed mid-rebuild resumes where its positions are when
//!    it starts again. [`cancel`] marks the rebuild; the runner stops the
//!    rebuilding consumer and drops its tables and bookkeeping, leaving
//!    the live version untouched.
//!
//! With `from_log_start` the new version starts at the first record the
//! log still holds instead of offset 0: for a log pruned by retention,
//! together with a re-publication of snapshots from the source
//! ([`crate::republish`]). Events of aggregates whose beginning was pruned
//! wait for their snapshot, and the switch waits until every aggregate is
//! as new as the live copy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::consumer::{Consumer, ConsumerConfig, Handler, HandlerError};
use crate::envelope::Envelope;
use crate::params;
use crate::schema::now_micros;
use crate::store::{Param, Row, Store, StoreError, Tx};

/// One table of a read model.
#[derive(Debug, Clone, Copy)]
pub struct ModelTable {
    /// The live name, which readers use.
    pub name: &'static str,
    /// The statements that create it, with `{table}` for its name (index
    /// names should contain `{table}` too, so each version's are its own,
    /// and a rebuilt version's take their live names at the switch);
    /// `IF NOT EXISTS` throughout, so they can run again.
    pub create: &'static str,
}

impl ModelTable {
    /// The statements that create the table under `name`.
    pub fn create_as(&self, name: &str) -> String {
        self.create.replace("{table}", name)
    }

    /// The names of the indexes `create` makes that contain `{table}`,
    /// as written there.
    fn index_templates(&self) -> Vec<&'static str> {
        let create: &'static str = self.create;
        create
            .split(';')
            .filter_map(|statement| {
                let words: Vec<&str> = statement.split_whitespace().collect();
                let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
                let at = upper.iter().position(|word| word == "INDEX")?;
                if upper.first().map(String::as_str) != Some("CREATE") {
                    return None;
                }
                let mut name = at + 1;
                if upper.get(name..name + 3)
                    == Some(&["IF".to_owned(), "NOT".to_owned(), "EXISTS".to_owned()])
                {
                    name += 3;
                }
                let word = *words.get(name)?;
                word.contains("{table}").then_some(word)
            })
            .collect()
    }
}

/// A read model whose consumer can be rebuilt side by side.
pub trait ReadModel: Send + Sync + 'static {
    /// The tables the model's handler writes, by their live names.
    fn tables(&self) -> &'static [ModelTable];

    /// The handler that keeps the model in the tables `names` gives for
    /// each live name. It must not publish events: a rebuild reproduces
    /// state, not side effects.
    fn handler(&self, names: &TableNames) -> Arc<dyn Handler>;
}

/// Which name each of a model's tables has in one version of the model.
#[derive(Debug, Clone, Default)]
pub struct TableNames {
    names: HashMap<String, String>,
}

impl TableNames {
    /// The live names.
    pub fn live(model: &dyn ReadModel) -> Self {
        Self::with_suffix(model, "")
    }

    fn with_suffix(model: &dyn ReadModel, suffix: &str) -> Self {
        Self {
            names: model
                .tables()
                .iter()
                .map(|table| (table.name.to_owned(), format!("{}{suffix}", table.name)))
                .collect(),
        }
    }

    /// The name of the table whose live name is `live` (itself when the
    /// model has no such table).
    pub fn get<'a>(&'a self, live: &'a str) -> &'a str {
        self.names.get(live).map_or(live, String::as_str)
    }
}

/// Creates a model's live tables (in a service's install).
pub fn install(tx: &mut dyn Tx, model: &dyn ReadModel) -> Result<(), StoreError> {
    for table in model.tables() {
        tx.execute_batch(&table.create_as(table.name))?;
    }
    Ok(())
}

/// Where a rebuild stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RebuildState {
    /// The new version is filling; the live one answers.
    Building,
    /// Cancelled by an operator; the runner has yet to drop the new version.
    Cancelling,
    /// Cancelled: the new version is gone, the live one untouched.
    Cancelled,
    /// The new version stopped with an error (see `error`) and was dropped.
    Failed,
    /// The new version is live.
    Switched,
}

impl RebuildState {
    fn parse(text: &str) -> Result<Self, StoreError> {
        Ok(match text {
            "building" => Self::Building,
            "cancelling" => Self::Cancelling,
            "cancelled" => Self::Cancelled,
            "failed" => Self::Failed,
            "switched" => Self::Switched,
            other => {
                return Err(StoreError::Decode(
                    format!("unknown rebuild state {other:?}").into(),
                ))
            }
        })
    }

    /// The state's name, as `tandem_rebuilds` and the reports show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Building => "building",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
            Self::Switched => "switched",
        }
    }

    /// Still under way (building, or cancelling).
    pub fn active(self) -> bool {
        matches!(self, Self::Building | Self::Cancelling)
    }
}

/// One rebuild of a consumer, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuild {
    /// The live consumer whose read model is rebuilt.
    pub consumer: String,
    /// Tells the rebuild's tables and consumer apart (µs since the epoch
    /// when it was asked for).
    pub number: i64,
    /// Where it stands.
    pub state: RebuildState,
    /// Whether the new version starts at the first record the log still
    /// holds rather than at offset 0 (see the module documentation).
    pub from_log_start: bool,
    /// Who asked for it, as the caller of [`request`] named them (the
    /// admin API: the name of the token used).
    pub requested_by: String,
    /// When it was asked for (µs since the Unix epoch).
    pub started_at_micros: i64,
    /// When it ended: switched, cancelled or failed (µs since the Unix
    /// epoch); `None` while it is under way.
    pub finished_at_micros: Option<i64>,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

impl Rebuild {
    /// The consumer that fills the new version (its group on the bus).
    pub fn builder_name(&self) -> String {
        builder_name(&self.consumer, self.number)
    }

    fn suffix(&self) -> String {
        format!("__r{}", self.number)
    }

    fn from_row(row: &Row) -> Result<Self, StoreError> {
        Ok(Self {
            consumer: row.text(0)?.to_owned(),
            number: row.i64(1)?,
            state: RebuildState::parse(row.text(2)?)?,
            from_log_start: row.i64(3)? != 0,
            requested_by: row.text(4)?.to_owned(),
            started_at_micros: row.i64(5)?,
            finished_at_micros: row.opt_i64(6)?,
            error: row.opt_text(7)?.map(str::to_owned),
        })
    }
}

fn builder_name(consumer: &str, number: i64) -> String {
    format!("{consumer}-rebuild-{number}")
}

const COLUMNS: &str = "consumer, number, state, from_log_start, requested_by, started_at, \
                       finished_at, error";

/// The table of rebuilds (a migration of each engine).
pub const TABLE: &str = "
CREATE TABLE IF NOT EXISTS tandem_rebuilds (
    consumer       TEXT   NOT NULL,
    number         BIGINT NOT NULL,
    state          TEXT   NOT NULL,
    from_log_start BIGINT NOT NULL,
    requested_by   TEXT   NOT NULL,
    started_at     BIGINT NOT NULL,
    finished_at    BIGINT,
    error          TEXT,
    PRIMARY KEY (consumer, number)
);
";

/// Why a rebuild could not be asked for or cancelled.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// A rebuild of the consumer is under way already: one at a time.
    #[error("consumer {consumer} is already rebuilding (rebuild {number}, {state})")]
    Running {
        /// The consumer.
        consumer: String,
        /// The number of the rebuild under way.
        number: i64,
        /// Its state: `building` or `cancelling`.
        state: &'static str,
    },
    /// There is no rebuild of this consumer (named here) to cancel.
    #[error("consumer {0} has no rebuild under way")]
    NoneRunning(String),
    /// The database failed; nothing was recorded.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The newest rebuild of `consumer`, if it ever had one.
pub fn latest(tx: &mut dyn Tx, consumer: &str) -> Result<Option<Rebuild>, StoreError> {
    tx.query_opt(
        &format!(
            "SELECT {COLUMNS} FROM tandem_rebuilds WHERE consumer = $1
             ORDER BY number DESC LIMIT 1"
        ),
        params![consumer],
    )?
    .map(|row| Rebuild::from_row(&row))
    .transpose()
}

/// Every rebuild under way.
pub fn active(tx: &mut dyn Tx) -> Result<Vec<Rebuild>, StoreError> {
    tx.query(
        &format!(
            "SELECT {COLUMNS} FROM tandem_rebuilds
             WHERE state IN ('building', 'cancelling') ORDER BY consumer"
        ),
        &[],
    )?
    .iter()
    .map(Rebuild::from_row)
    .collect()
}

/// Asks for a rebuild of `consumer` (carried out by the running service);
/// refused while one is under way. The caller checks that the consumer
/// is a read model.
pub fn request(
    tx: &mut dyn Tx,
    consumer: &str,
    from_log_start: bool,
    actor: &str,
) -> Result<Rebuild, RebuildError> {
    if let Some(rebuild) = latest(tx, consumer)? {
        if rebuild.state.active() {
            return Err(RebuildError::Running {
                consumer: consumer.to_owned(),
                number: rebuild.number,
                state: rebuild.state.as_str(),
            });
        }
    }
    let now = now_micros();
    // Distinct from every earlier rebuild's number, even within one µs.
    let number = match latest(tx, consumer)? {
        Some(previous) if previous.number >= now => previous.number + 1,
        _ => now,
    };
    tx.execute(
        "INSERT INTO tandem_rebuilds (consumer, number, state, from_log_start, requested_by,
           started_at)
         VALUES ($1, $2, 'building', $3, $4, $5)",
        params![consumer, number, i64::from(from_log_start), actor, now],
    )?;
    Ok(Rebuild {
        consumer: consumer.to_owned(),
        number,
        state: RebuildState::Building,
        from_log_start,
        requested_by: actor.to_owned(),
        started_at_micros: now,
        finished_at_micros: None,
        error: None,
    })
}

/// Cancels the rebuild of `consumer` under way: the running service drops
/// the new version; the live one is untouched.
pub fn cancel(tx: &mut dyn Tx, consumer: &str) -> Result<Rebuild, RebuildError> {
    let Some(mut rebuild) = latest(tx, consumer)?.filter(|rebuild| rebuild.state.active()) else {
        return Err(RebuildError::NoneRunning(consumer.to_owned()));
    };
    tx.execute(
        "UPDATE tandem_rebuilds SET state = 'cancelling'
         WHERE consumer = $1 AND number = $2 AND state = 'building'",
        params![consumer, rebuild.number],
    )?;
    rebuild.state = RebuildState::Cancelling;
    Ok(rebuild)
}

/// Carries an operator's redrive or discard of the live consumer's letter
/// `letter` over to the new version being built beside it, in the
/// transaction that settles it: otherwise an aggregate the operator
/// unblocked in the live model would stay blocked in the new one, which
/// could then never be level with the live one nor switch.
///
/// The builder's letter for the same event (by event id, or by record
/// for one that never decoded) is queued for the same request when it is
/// parked. A discard of an event the builder has not reached yet leaves
/// it a discarded copy, so that it skips the event when it gets there, as
/// it skips what was discarded before the rebuild began. A redrive the
/// builder has nothing parked for needs nothing: it will apply the event
/// with the handler as it is now.
pub(crate) fn follow_settlement(
    tx: &mut dyn Tx,
    live: &str,
    letter: &crate::dead_letter::DeadLetter,
    discard: bool,
) -> Result<(), StoreError> {
    let Some(rebuild) = latest(tx, live)?.filter(|r| r.state == RebuildState::Building) else {
        return Ok(());
    };
    let builder = rebuild.builder_name();
    let theirs = match &letter.event_id {
        Some(event_id) => tx.query_opt(
            "SELECT id, status FROM tandem_dead_letters
             WHERE consumer = $1 AND event_id = $2 ORDER BY id DESC LIMIT 1",
            params![&builder, event_id],
        )?,
        None => tx.query_opt(
            "SELECT id, status FROM tandem_dead_letters
             WHERE consumer = $1 AND topic = $2 AND partition = $3 AND record_offset = $4
               AND event_id IS NULL
             ORDER BY id DESC LIMIT 1",
            params![&builder, &letter.topic, letter.partition, letter.offset],
        )?,
    };
    match theirs {
        Some(row) if row.text(1)? == "parked" => {
            tx.execute(
                "INSERT INTO tandem_consumer_requests (consumer, command, dead_letter_id,
                   requested_at)
                 VALUES ($1, $2, $3, $4)",
                params![
                    &builder,
                    if discard { "discard" } else { "redrive" },
                    row.i64(0)?,
                    now_micros()
                ],
            )?;
        }
        Some(_) => {}
        None if discard => {
            tx.execute(
                "INSERT INTO tandem_dead_letters (consumer, topic, partition, record_offset,
                   event_id, source, subject, sequence, event_type, payload, reason, error,
                   attempts, first_failed_at, last_failed_at, status, failure_group)
                 SELECT $1, topic, partition, record_offset, event_id, source, subject, sequence,
                   event_type, payload, reason, error, attempts, first_failed_at,
                   last_failed_at, 'discarded', failure_group
                 FROM tandem_dead_letters WHERE id = $2",
                params![&builder, letter.id],
            )?;
        }
        None => {}
    }
    Ok(())
}

/// A read model's handler running in a rebuild: the outbox is refused.
struct WithoutSideEffects(Arc<dyn Handler>);

/// Passes everything to the consumer's transaction but notes an append to
/// the outbox.
struct NoOutbox<'a> {
    tx: &'a mut dyn Tx,
    appended: bool,
}

impl Tx for NoOutbox<'_> {
    fn engine(&self) -> &'static dyn crate::sql::EngineSql {
        self.tx.engine()
    }
    fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, StoreError> {
        self.tx.execute(sql, params)
    }
    fn query(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, StoreError> {
        self.tx.query(sql, params)
    }
    fn execute_batch(&mut self, sql: &str) -> Result<(), StoreError> {
        self.tx.execute_batch(sql)
    }
    fn savepoint(&mut self, name: &str) -> Result<(), StoreError> {
        self.tx.savepoint(name)
    }
    fn release_savepoint(&mut self, name: &str) -> Result<(), StoreError> {
        self.tx.release_savepoint(name)
    }
    fn rollback_to_savepoint(&mut self, name: &str) -> Result<(), StoreError> {
        self.tx.rollback_to_savepoint(name)
    }
    fn outbox_appended(&mut self) {
        self.appended = true;
    }
}

const PUBLISHED_IN_REBUILD: &str =
    "the handler published an event while rebuilding a read model; a rebuild reproduces \
     state, not side effects (the event is not published)";

impl Handler for WithoutSideEffects {
    fn handle(&self, tx: &mut dyn Tx, event: &Envelope) -> Result<(), HandlerError> {
        let mut guarded = NoOutbox {
            tx,
            appended: false,
        };
        self.0.handle(&mut guarded, event)?;
        if guarded.appended {
            return Err(HandlerError::permanent(PUBLISHED_IN_REBUILD));
        }
        Ok(())
    }

    fn handle_batch(&self, tx: &mut dyn Tx, events: &[Envelope]) -> Result<(), HandlerError> {
        let mut guarded = NoOutbox {
            tx,
            appended: false,
        };
        self.0.handle_batch(&mut guarded, events)?;
        if guarded.appended {
            return Err(HandlerError::permanent(PUBLISHED_IN_REBUILD));
        }
        Ok(())
    }
}

/// Creates the new version's tables and the builder's starting point.
fn prepare(
    tx: &mut dyn Tx,
    rebuild: &Rebuild,
    model: &dyn ReadModel,
    starts: &[(String, u32, u64)],
) -> Result<(), StoreError> {
    let suffix = rebuild.suffix();
    for table in model.tables() {
        tx.execute_batch(&table.create_as(&format!("{}{suffix}", table.name)))?;
    }
    let builder = rebuild.builder_name();
    let started = tx
        .query_opt(
            "SELECT 1 FROM tandem_consumer_generations WHERE consumer = $1",
            params![&builder],
        )?
        .is_some();
    if started {
        return Ok(());
    }
    // First start: what an operator discarded stays skipped, and (from
    // the log's start) the positions begin at the first record held.
    tx.execute(
        "INSERT INTO tandem_dead_letters (consumer, topic, partition, record_offset, event_id,
           source, subject, sequence, event_type, payload, reason, error, attempts,
           first_failed_at, last_failed_at, status, failure_group)
         SELECT $1, topic, partition, record_offset, event_id, source, subject, sequence,
           event_type, payload, reason, error, attempts, first_failed_at, last_failed_at,
           status, failure_group
         FROM tandem_dead_letters WHERE consumer = $2 AND status = 'discarded'",
        params![&builder, &rebuild.consumer],
    )?;
    for (topic, partition, offset) in starts {
        tx.execute(
            "INSERT INTO tandem_consumer_positions (consumer, topic, partition, next_offset,
               updated_at)
             VALUES ($1, $2, $3, $4, $5)",
            params![
                &builder,
                topic,
                i64::from(*partition),
                i64::try_from(*offset).unwrap_or(i64::MAX),
                now_micros()
            ],
        )?;
    }
    tx.execute(
        "INSERT INTO tandem_consumer_generations (consumer, generation) VALUES ($1, 0)",
        params![&builder],
    )?;
    Ok(())
}

/// What a look at a building rebuild found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// Still behind the live version.
    Behind,
    /// Level with the live version: it can switch.
    Level,
    /// Level: the new version is live now.
    Switched,
    /// No longer building (cancelled meanwhile).
    Gone,
}

/// Whether the new version is level with the live one (at or past its
/// position on every partition, every aggregate at least as new), read
/// in `tx`.
pub fn look(tx: &mut dyn Tx, rebuild: &Rebuild) -> Result<Look, StoreError> {
    let building = tx
        .query_opt(
            "SELECT 1 FROM tandem_rebuilds
             WHERE consumer = $1 AND number = $2 AND state = 'building'",
            params![&rebuild.consumer, rebuild.number],
        )?
        .is_some();
    if !building {
        return Ok(Look::Gone);
    }
    let (live, builder) = (rebuild.consumer.as_str(), rebuild.builder_name());
    let positions_behind = tx
        .query_opt(
            "SELECT COUNT(*) FROM tandem_consumer_positions l
             WHERE l.consumer = $1
               AND l.next_offset > COALESCE(
                 (SELECT b.next_offset FROM tandem_consumer_positions b
                  WHERE b.consumer = $2 AND b.topic = l.topic AND b.partition = l.partition),
                 -1)",
            params![live, &builder],
        )?
        .map_or(Ok(0), |row| row.i64(0))?;
    if positions_behind > 0 {
        return Ok(Look::Behind);
    }
    let aggregates_behind = tx
        .query_opt(
            "SELECT COUNT(*) FROM tandem_consumer_aggregates l
             WHERE l.consumer = $1
               AND l.sequence > COALESCE(
                 (SELECT b.sequence FROM tandem_consumer_aggregates b
                  WHERE b.subject = l.subject AND b.source = l.source AND b.consumer = $2),
                 0)",
            params![live, &builder],
        )?
        .map_or(Ok(0), |row| row.i64(0))?;
    if aggregates_behind > 0 {
        return Ok(Look::Behind);
    }
    Ok(Look::Level)
}

/// Switches to the new version if it is level with the live one, in the
/// caller's write transaction.
pub fn try_switch(
    tx: &mut dyn Tx,
    rebuild: &Rebuild,
    model: &dyn ReadModel,
) -> Result<Look, StoreError> {
    let level = look(tx, rebuild)?;
    if level != Look::Level {
        return Ok(level);
    }
    if !tx
        .engine()
        .wait_for_older_snapshots(tx, OLDER_SNAPSHOTS_WAIT_LOCKED)?
    {
        tracing::debug!(consumer = %rebuild.consumer, "a reader's older snapshot is still open; switching at a later check");
        return Ok(Look::Behind);
    }
    let live = rebuild.consumer.as_str();
    let builder = rebuild.builder_name();
    let suffix = rebuild.suffix();
    for table in model.tables() {
        tx.execute_batch(&format!(
            "DROP TABLE IF EXISTS {live_table};
             ALTER TABLE {live_table}{suffix} RENAME TO {live_table}",
            live_table = table.name
        ))?;
        // Its indexes take their live names too, so that the model's
        // statements, run again at the next start, find them.
        let built = format!("{}{suffix}", table.name);
        for index in table.index_templates() {
            let (from, to) = (
                index.replace("{table}", &built),
                index.replace("{table}", table.name),
            );
            tx.engine().rename_index(tx, &from, &to)?;
        }
    }
    for table in crate::consumer::STATE_TABLES {
        tx.execute(
            &format!("DELETE FROM {table} WHERE consumer = $1"),
            params![live],
        )?;
        tx.execute(
            &format!("UPDATE {table} SET consumer = $1 WHERE consumer = $2"),
            params![live, &builder],
        )?;
    }
    tx.execute(
        "DELETE FROM tandem_dead_letters
         WHERE consumer = $1 AND status IN ('parked', 'discarded')",
        params![live],
    )?;
    tx.execute(
        "UPDATE tandem_dead_letters SET consumer = $1 WHERE consumer = $2",
        params![live, &builder],
    )?;
    tx.execute(
        "DELETE FROM tandem_consumer_requests WHERE consumer = $1",
        params![&builder],
    )?;
    // No batch of the builder commits after this one (each checks the
    // pause in its transaction), wherever it runs.
    tx.execute(
        "INSERT INTO tandem_consumer_paused (consumer, paused_at, paused_by)
         VALUES ($1, $2, 'rebuild') ON CONFLICT (consumer) DO NOTHING",
        params![&builder, now_micros()],
    )?;
    crate::consumer::bump_generation(tx, live)?;
    finish(tx, rebuild, RebuildState::Switched, None)?;
    crate::audit::record(
        tx,
        &rebuild.requested_by,
        "consumer.rebuild.switched",
        live,
        &format!("rebuild {} is live", rebuild.number),
    )?;
    Ok(Look::Switched)
}

fn finish(
    tx: &mut dyn Tx,
    rebuild: &Rebuild,
    state: RebuildState,
    error: Option<&str>,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE tandem_rebuilds SET state = $3, finished_at = $4, error = $5
         WHERE consumer = $1 AND number = $2",
        params![
            &rebuild.consumer,
            rebuild.number,
            state.as_str(),
            now_micros(),
            error
        ],
    )?;
    Ok(())
}

/// Drops the new version: its tables and the builder's bookkeeping (the
/// builder must have stopped).
fn drop_new_version(
    tx: &mut dyn Tx,
    rebuild: &Rebuild,
    model: &dyn ReadModel,
    state: RebuildState,
    error: Option<&str>,
) -> Result<(), StoreError> {
    let suffix = rebuild.suffix();
    for table in model.tables() {
        tx.execute_batch(&format!("DROP TABLE IF EXISTS {}{suffix}", table.name))?;
    }
    forget_builder(tx, &rebuild.builder_name())?;
    finish(tx, rebuild, state, error)?;
    let (action, note) = match state {
        RebuildState::Failed => ("consumer.rebuild.failed", error.unwrap_or("failed")),
        _ => ("consumer.rebuild.cancelled", "the new version was dropped"),
    };
    crate::audit::record(tx, &rebuild.requested_by, action, &rebuild.consumer, note)?;
    Ok(())
}

/// Deletes whatever the database holds under the builder's name: its
/// positions, aggregate states, held events, dead letters, requests,
/// replay generation and pause.
fn forget_builder(tx: &mut dyn Tx, builder: &str) -> Result<(), StoreError> {
    for table in crate::consumer::STATE_TABLES.into_iter().chain([
        "tandem_dead_letters",
        "tandem_consumer_requests",
        "tandem_consumer_generations",
        "tandem_consumer_paused",
    ]) {
        tx.execute(
            &format!("DELETE FROM {table} WHERE consumer = $1"),
            params![builder],
        )?;
    }
    Ok(())
}

/// Longest wait of the runner, before a switch, for readers with
/// snapshots older than that moment (see
/// [`crate::sql::EngineSql::wait_for_older_snapshots`]); past it, the
/// switch is tried again at a later check.
pub const OLDER_SNAPSHOTS_WAIT: Duration = Duration::from_secs(2);

/// Longest wait of the runner for the builder's batch under way before
/// a switch; past it (a builder retrying through an outage), the switch
/// is tried again at a later check.
pub const GATE_WAIT: Duration = Duration::from_secs(5);

/// Polls, with a short read each time and no connection held between
/// them, until no session of the database holds a snapshot older than
/// this call; `false` after `timeout`.
async fn older_snapshots_ended<S: Store>(store: &S, timeout: Duration) -> Result<bool, StoreError> {
    // The clock and the first count in one read: on an engine with no
    // older snapshots to count (SQLite), that is all it costs.
    let (since, mut older) = store
        .read(|tx| -> Result<(i64, u64), StoreError> {
            let since = tx.engine().database_now_micros(tx)?;
            Ok((since, tx.engine().snapshots_older_than(tx, since)?))
        })
        .await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if older == 0 {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        older = store
            .read(move |tx| tx.engine().snapshots_older_than(tx, since))
            .await?;
    }
}

/// Longest wait of the switch's own transaction for readers with older
/// snapshots: it holds every writer back meanwhile, and the runner waited
/// for the long ones before it began.
pub const OLDER_SNAPSHOTS_WAIT_LOCKED: Duration = Duration::from_millis(200);

/// How long a switched rebuild's builder keeps its pause and its group on
/// the bus: long enough for the runner of every process sharing the
/// database (each looks every [`CHECK_EVERY`]) to have stopped its
/// builder, whose batches the pause refuses until then.
pub const LEFTOVERS_LINGER: Duration = Duration::from_secs(60);

/// Clears what the builders of `models`' rebuilds leave behind once they
/// are over: for a rebuild switched longer than `linger` ago, the
/// builder's pause and bookkeeping in the database, and, for every
/// finished rebuild whose bookkeeping is cleared here or was dropped with
/// it, its group on the bus (a NATS durable otherwise stays until
/// deleted). Returns the builders cleared. The runner calls it with
/// [`LEFTOVERS_LINGER`].
pub async fn clear_leftovers<S: Store>(
    store: &S,
    bus: &dyn Bus,
    models: &[Rebuildable],
    linger: Duration,
) -> Result<Vec<String>, StoreError> {
    let before = now_micros().saturating_sub(i64::try_from(linger.as_micros()).unwrap_or(0));
    let switched: Vec<Rebuild> = store
        .read(move |tx| -> Result<Vec<Rebuild>, StoreError> {
            let mut left = Vec::new();
            let rows = tx.query(
                &format!(
                    "SELECT {COLUMNS} FROM tandem_rebuilds
                     WHERE state = 'switched' AND finished_at < $1 ORDER BY consumer, number"
                ),
                params![before],
            )?;
            for row in &rows {
                let rebuild = Rebuild::from_row(row)?;
                let paused = tx
                    .query_opt(
                        "SELECT 1 FROM tandem_consumer_paused WHERE consumer = $1",
                        params![&rebuild.builder_name()],
                    )?
                    .is_some();
                if paused {
                    left.push(rebuild);
                }
            }
            Ok(left)
        })
        .await?;
    let mut cleared = Vec::new();
    for rebuild in switched {
        let Some(model) = models
            .iter()
            .find(|model| model.config.name == rebuild.consumer)
        else {
            continue;
        };
        let builder = rebuild.builder_name();
        forget_group(bus, &builder, &model.config.topics).await;
        let name = builder.clone();
        store.write(move |tx| forget_builder(tx, &name)).await?;
        cleared.push(builder);
    }
    Ok(cleared)
}

/// Deletes a finished builder's group on the bus; a failure is logged
/// (the group idles, nothing reads it).
async fn forget_group(bus: &dyn Bus, builder: &str, topics: &[String]) {
    if let Err(error) = bus.forget_group(builder, topics).await {
        tracing::warn!(group = builder, %error, "the finished rebuild's group on the bus stays");
    }
}

/// A consumer whose read model can be rebuilt, as the runner knows it.
#[derive(Clone)]
pub struct Rebuildable {
    /// The live consumer's configuration; the builder runs with the same,
    /// under its own name.
    pub config: ConsumerConfig,
    /// The read model, which names the tables and makes the builder's
    /// handler.
    pub model: Arc<dyn ReadModel>,
}

/// A builder running in this process.
struct Running {
    number: i64,
    /// Whether the runner said the switch waits for an old snapshot.
    deferred_said: bool,
    /// Held by the builder's writes; taken exclusively around the switch.
    gate: Arc<tokio::sync::RwLock<()>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), crate::consumer::ConsumerError>>,
}

/// How often the runner looks for requests and checks whether a new
/// version is level with the live one.
pub const CHECK_EVERY: Duration = Duration::from_millis(200);

/// Carries out the rebuilds of `models` until `stop`: starts (or, after a
/// restart, resumes) each requested rebuild's builder, switches when it is
/// level, and drops a cancelled or failed one. Errors are logged and the
/// work tried again at the next check.
pub async fn run<S: Store>(
    store: S,
    bus: Arc<dyn Bus>,
    models: Vec<Rebuildable>,
    stop: CancellationToken,
) {
    if models.is_empty() {
        return;
    }
    let mut running: HashMap<String, Running> = HashMap::new();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Err(error) = step(&store, &bus, &models, &mut running, &stop).await {
            tracing::warn!(%error, "rebuild check failed; tried again shortly");
        }
    }
    for (_, builder) in running.drain() {
        builder.stop.cancel();
        let _ = builder.task.await;
    }
}

async fn step<S: Store>(
    store: &S,
    bus: &Arc<dyn Bus>,
    models: &[Rebuildable],
    running: &mut HashMap<String, Running>,
    stop: &CancellationToken,
) -> Result<(), StoreError> {
    clear_leftovers(store, bus.as_ref(), models, LEFTOVERS_LINGER).await?;
    let rebuilds = store.read(|tx| active(tx)).await?;
    // Builders whose rebuild is over (switched or dropped elsewhere) stop.
    let under_way: Vec<(String, i64)> = rebuilds
        .iter()
        .map(|rebuild| (rebuild.consumer.clone(), rebuild.number))
        .collect();
    let finished: Vec<String> = running
        .iter()
        .filter(|(consumer, builder)| !under_way.contains(&((*consumer).clone(), builder.number)))
        .map(|(consumer, _)| consumer.clone())
        .collect();
    for consumer in finished {
        if let Some(builder) = running.remove(&consumer) {
            builder.stop.cancel();
            let _ = builder.task.await;
        }
    }
    for rebuild in rebuilds {
        let Some(model) = models
            .iter()
            .find(|model| model.config.name == rebuild.consumer)
        else {
            continue;
        };
        match rebuild.state {
            RebuildState::Cancelling => {
                if let Some(builder) = running.remove(&rebuild.consumer) {
                    builder.stop.cancel();
                    let _ = builder.task.await;
                }
                let (done, model_arc) = (rebuild.clone(), Arc::clone(&model.model));
                store
                    .write(move |tx| {
                        drop_new_version(tx, &done, &*model_arc, RebuildState::Cancelled, None)
                    })
                    .await?;
                forget_group(bus.as_ref(), &rebuild.builder_name(), &model.config.topics).await;
                tracing::info!(consumer = %rebuild.consumer, number = rebuild.number, "rebuild cancelled; the new version is dropped");
            }
            RebuildState::Building => {
                let ended = running
                    .get(&rebuild.consumer)
                    .is_some_and(|builder| builder.task.is_finished());
                // A builder behind the log's start waits for an operator
                // like any consumer; a rebuild fails instead, saying so.
                let behind = running
                    .contains_key(&rebuild.consumer)
                    .then(|| crate::metrics::fell_behind(&rebuild.builder_name()))
                    .flatten();
                if ended || behind.is_some() {
                    let builder = running.remove(&rebuild.consumer).expect("looked up above");
                    builder.stop.cancel();
                    let error = match (behind, builder.task.await) {
                        (Some(cause), _) => {
                            format!("{cause}, then rebuild from the log's start")
                        }
                        (None, Ok(Ok(()))) => "the rebuilding consumer stopped".to_owned(),
                        (None, Ok(Err(error))) => error.to_string(),
                        (None, Err(error)) => format!("the rebuilding consumer panicked: {error}"),
                    };
                    tracing::error!(consumer = %rebuild.consumer, number = rebuild.number, %error, "rebuild failed; the new version is dropped");
                    let (done, model_arc) = (rebuild.clone(), Arc::clone(&model.model));
                    store
                        .write(move |tx| {
                            drop_new_version(
                                tx,
                                &done,
                                &*model_arc,
                                RebuildState::Failed,
                                Some(&error),
                            )
                        })
                        .await?;
                    forget_group(bus.as_ref(), &rebuild.builder_name(), &model.config.topics).await;
                    continue;
                }
                if !running.contains_key(&rebuild.consumer) {
                    let builder = start(store, bus, model, &rebuild, stop).await?;
                    running.insert(rebuild.consumer.clone(), builder);
                    tracing::info!(consumer = %rebuild.consumer, number = rebuild.number, "rebuilding the read model beside the live one");
                }
                if crate::fault::failing("rebuild.switch") {
                    // Tests hold the new version back from the switch, to
                    // kill the process in the middle of a rebuild.
                    continue;
                }
                // A read first: the write lock only once it is level.
                let looked_at = rebuild.clone();
                if store.read(move |tx| look(tx, &looked_at)).await? == Look::Behind {
                    continue;
                }
                // Readers' snapshots older than now end before the writer
                // lock is taken, so that the wait inside the switch's
                // transaction (which holds every writer back) is short;
                // a session that keeps one open defers the switch, never
                // the service's writes.
                if !older_snapshots_ended(store, OLDER_SNAPSHOTS_WAIT).await? {
                    if let Some(builder) = running.get_mut(&rebuild.consumer) {
                        if !builder.deferred_said {
                            builder.deferred_said = true;
                            tracing::warn!(consumer = %rebuild.consumer, number = rebuild.number, "a session of the database has held a snapshot for over {OLDER_SNAPSHOTS_WAIT:?}; the switch waits until it ends");
                        }
                    }
                    continue;
                }
                let (switching, model_arc) = (rebuild.clone(), Arc::clone(&model.model));
                // The builder's last batch commits before the switch's
                // transaction begins, never inside the same commit (see
                // `Consumer::with_gate`): a reader whose snapshot predates
                // that commit would read the renamed table without it.
                let gate = running
                    .get(&rebuild.consumer)
                    .map(|builder| Arc::clone(&builder.gate));
                let quiet = match &gate {
                    Some(gate) => {
                        match tokio::time::timeout(GATE_WAIT, Arc::clone(gate).write_owned()).await
                        {
                            Ok(quiet) => Some(quiet),
                            // The builder is retrying a batch (an outage):
                            // the switch is tried at a later check.
                            Err(_) => continue,
                        }
                    }
                    None => None,
                };
                let outcome = store
                    .write(move |tx| try_switch(tx, &switching, &*model_arc))
                    .await;
                drop(quiet);
                let outcome = outcome?;
                if outcome != Look::Behind {
                    if let Some(builder) = running.remove(&rebuild.consumer) {
                        builder.stop.cancel();
                        let _ = builder.task.await;
                    }
                }
                if outcome == Look::Switched {
                    tracing::info!(consumer = %rebuild.consumer, number = rebuild.number, "rebuild switched: the new version is live");
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Prepares the new version (once) and starts its builder.
async fn start<S: Store>(
    store: &S,
    bus: &Arc<dyn Bus>,
    model: &Rebuildable,
    rebuild: &Rebuild,
    stop: &CancellationToken,
) -> Result<Running, StoreError> {
    let mut starts = Vec::new();
    if rebuild.from_log_start {
        for topic in &model.config.topics {
            let offsets = bus
                .start_offsets(topic)
                .await
                .map_err(|error| StoreError::Engine(format!("{error}").into()))?;
            starts.extend(
                offsets
                    .into_iter()
                    .map(|(partition, offset)| (topic.clone(), partition, offset)),
            );
        }
    }
    let (prepared, model_arc) = (rebuild.clone(), Arc::clone(&model.model));
    store
        .write(move |tx| prepare(tx, &prepared, &*model_arc, &starts))
        .await?;
    let names = TableNames::with_suffix(&*model.model, &rebuild.suffix());
    let handler: Arc<dyn Handler> = Arc::new(WithoutSideEffects(model.model.handler(&names)));
    let mut config = model.config.clone();
    config.name = rebuild.builder_name();
    if rebuild.from_log_start {
        // Events of aggregates whose start was pruned wait for their
        // snapshot from a re-publication rather than being parked.
        config.gap_timeout = config.gap_timeout.max(Duration::from_secs(3600));
    }
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    let consumer =
        Consumer::new(store.clone(), Arc::clone(bus), handler, config).with_gate(Arc::clone(&gate));
    let builder_stop = stop.child_token();
    let token = builder_stop.clone();
    let task = tokio::spawn(async move { consumer.run(token).await });
    Ok(Running {
        number: rebuild.number,
        deferred_said: false,
        gate,
        stop: builder_stop,
        task,
    })
}

/// A consumer's newest rebuild as `tandem status` and `/status` show it:
/// where it stands and, while it builds, its progress.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RebuildReport {
    /// The rebuild's number (see [`Rebuild::number`]).
    pub number: i64,
    /// Where it stands.
    pub state: RebuildState,
    /// When it was asked for (µs since the Unix epoch).
    pub started_at_micros: i64,
    /// When it ended (µs since the Unix epoch); absent while under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_micros: Option<i64>,
    /// Records the new version has consumed so far (while building).
    pub events_applied: u64,
    /// Records on the bus it has yet to consume (while building).
    pub events_to_go: u64,
    /// At the rate so far, seconds until it is level with the head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The newest rebuild of `consumer` (reading `topics`) with its progress;
/// `None` when it never had one.
pub async fn report<S: Store>(
    store: &S,
    bus: &dyn Bus,
    consumer: &str,
    topics: &[String],
) -> Result<Option<RebuildReport>, crate::status::StatusError> {
    let name = consumer.to_owned();
    let Some(rebuild) = store.read(move |tx| latest(tx, &name)).await? else {
        return Ok(None);
    };
    let (mut applied, mut to_go) = (0_u64, 0_u64);
    if rebuild.state.active() {
        let positions = crate::consumer::positions(store, &rebuild.builder_name()).await?;
        for topic in topics {
            for (partition, end) in bus.end_offsets(topic).await? {
                let position = positions
                    .get(&crate::bus::TopicPartition::new(topic.clone(), partition))
                    .copied()
                    .unwrap_or(0);
                applied += position.min(end);
                to_go += end.saturating_sub(position);
            }
        }
    }
    let elapsed = (now_micros() - rebuild.started_at_micros).max(1) as f64 / 1e6;
    let rate = applied as f64 / elapsed;
    let eta_seconds = (rebuild.state.active() && rate > 0.0).then(|| to_go as f64 / rate);
    Ok(Some(RebuildReport {
        number: rebuild.number,
        state: rebuild.state,
        started_at_micros: rebuild.started_at_micros,
        finished_at_micros: rebuild.finished_at_micros,
        events_applied: applied,
        events_to_go: to_go,
        eta_seconds,
        error: rebuild.error,
    }))
}

#[cfg(test)]
mod tests {
    use super::ModelTable;

    #[test]
    fn the_index_names_that_follow_the_table_are_found_in_its_statements() {
        let table = ModelTable {
            name: "orders",
            create: "CREATE TABLE IF NOT EXISTS {table} (id TEXT PRIMARY KEY, owner TEXT);
                     create unique index if not exists {table}_by_owner ON {table} (owner);
                     CREATE INDEX {table}_second ON {table} (id, owner);
                     CREATE INDEX fixed_name ON {table} (owner)",
        };
        assert_eq!(
            table.index_templates(),
            vec!["{table}_by_owner", "{table}_second"]
        );
    }
}
