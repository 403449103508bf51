//! Retention: what Tandem writes is pruned by rule, so that storage stops
//! growing: the outbox rows the bus has acknowledged, the records of the
//! embedded log, and the dead letters an operator has dealt with.
//!
//! What is never pruned:
//! - an outbox row the relay has not had acknowledged (it is above the
//!   relay's cursor), nor any row of a service that keeps its outbox as its
//!   event history ([`Retention::outbox_age`] `None`);
//! - a parked dead letter, and by default a discarded one (a replay meets
//!   the discarded event again and must skip it again);
//! - the bookkeeping a service's promises rest on: sequences live in
//!   `tandem_aggregates`, log offsets in `log_heads`, consumer positions
//!   and aggregate states in their own tables, none of which is pruned.
//!
//! Pruning runs off the hot path, in a task of its own
//! ([`run`]), a small batch per transaction, so a writer never waits long
//! behind it. On SQLite a busy outbox and the embedded log are pruned a
//! table at a time (a table set aside whole, a log segment), dropped once
//! everything in it may go: far cheaper than deleting rows one by one. The
//! space freed in a SQLite file is reused by what is written next, so the
//! files level off (the WAL is kept small by the store's checkpointer).

use std::time::Duration;

use crate::bus::Bus;
use crate::params;
use crate::schema::now_micros;
use crate::store::{Store, StoreError, Tx};

/// The rules. `None` keeps everything of that kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// Published (acknowledged) outbox rows older than this are pruned.
    /// `None`: the outbox is the service's event history, kept whole.
    pub outbox_age: Option<Duration>,
    /// Resolved dead letters whose last failure is older than this.
    pub resolved_age: Option<Duration>,
    /// Discarded dead letters likewise; `None` by default, because a
    /// replay from a log that still holds the event must skip it again.
    pub discarded_age: Option<Duration>,
    /// Embedded-log records appended longer ago than this.
    pub log_age: Option<Duration>,
    /// At most this many records kept per embedded-log partition.
    pub log_records: Option<u64>,
    /// Rows deleted per transaction.
    pub batch: u64,
    /// How often the pruner runs.
    pub every: Duration,
}

/// A day.
const DAY: Duration = Duration::from_secs(24 * 60 * 60);

impl Default for Retention {
    /// Published outbox rows: 1 day (the log holds them once acknowledged;
    /// a day is enough to look into what was just published). Embedded-log
    /// records: 7 days, as Kafka's default `retention.ms`: a consumer down
    /// longer than that must be caught up by re-publication. Resolved dead
    /// letters: 14 days, two weeks of an operator's history. Discarded
    /// dead letters: kept.
    fn default() -> Self {
        Self {
            outbox_age: Some(DAY),
            resolved_age: Some(14 * DAY),
            discarded_age: None,
            log_age: Some(7 * DAY),
            log_records: None,
            batch: 1000,
            every: Duration::from_secs(30),
        }
    }
}

/// How much one round pruned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Outbox rows deleted (a table set aside and dropped whole counts
    /// all its rows).
    pub outbox: u64,
    /// Resolved and discarded dead letters deleted.
    pub dead_letters: u64,
    /// Embedded-log records deleted (a segment dropped whole counts all
    /// its records).
    pub log: u64,
}

fn cutoff(age: Duration) -> i64 {
    now_micros().saturating_sub(i64::try_from(age.as_micros()).unwrap_or(i64::MAX))
}

/// Deletes, in `tx`, at most `batch` outbox rows that relay `relay` has
/// published and that committed more than `age` ago; returns how many.
pub fn prune_outbox_in(
    tx: &mut dyn Tx,
    relay: &str,
    age: Duration,
    batch: u64,
) -> Result<u64, StoreError> {
    tx.engine().prune_published(tx, relay, cutoff(age), batch)
}

/// Deletes, in `tx`, at most `batch` dead letters of `status` (`resolved`
/// or `discarded`; never `parked`) whose last failure is older than `age`.
pub fn prune_dead_letters_in(
    tx: &mut dyn Tx,
    status: &str,
    age: Duration,
    batch: u64,
) -> Result<u64, StoreError> {
    if status == "parked" {
        return Err(StoreError::Decode(
            "parked dead letters are never pruned".into(),
        ));
    }
    tx.execute(
        "DELETE FROM tandem_dead_letters WHERE id IN (
           SELECT id FROM tandem_dead_letters
           WHERE status = $1 AND last_failed_at < $2
           ORDER BY id LIMIT $3)",
        params![status, cutoff(age), batch as i64],
    )
}

/// One round: batches until each kind has nothing left to prune.
pub async fn prune_once<S: Store>(
    store: &S,
    bus: &dyn Bus,
    relay: Option<&str>,
    rules: &Retention,
) -> Result<Pruned, StoreError> {
    let mut pruned = Pruned::default();
    let batch = rules.batch.max(1);
    if let (Some(relay), Some(age)) = (relay, rules.outbox_age) {
        loop {
            let relay = relay.to_owned();
            let deleted = store
                .write(move |tx| prune_outbox_in(tx, &relay, age, batch))
                .await?;
            pruned.outbox += deleted;
            if deleted < batch {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    for (status, age) in [
        ("resolved", rules.resolved_age),
        ("discarded", rules.discarded_age),
    ] {
        let Some(age) = age else { continue };
        loop {
            let deleted = store
                .write(move |tx| prune_dead_letters_in(tx, status, age, batch))
                .await?;
            pruned.dead_letters += deleted;
            if deleted < batch {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    if rules.log_age.is_some() || rules.log_records.is_some() {
        match bus.prune(rules.log_age, rules.log_records, batch).await {
            Ok(deleted) => pruned.log += deleted,
            Err(error) => tracing::warn!(%error, "pruning the log failed; tried again next round"),
        }
    }
    Ok(pruned)
}

/// Prunes by `rules` every [`Retention::every`] until `stop`; an error is
/// logged and tried again next round.
pub async fn run<S: Store>(
    store: S,
    bus: std::sync::Arc<dyn Bus>,
    relay: Option<String>,
    rules: Retention,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(rules.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match prune_once(&store, bus.as_ref(), relay.as_deref(), &rules).await {
            Ok(pruned) if pruned != Pruned::default() => {
                tracing::debug!(?pruned, "pruned by the retention rules");
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "pruning failed; tried again next round"),
        }
    }
}

/// Parses a duration such as `30s`, `15m`, `24h`, `7d` or `500ms`; `keep`
/// (or `forever`) is `None`, kept for good.
pub fn parse_age(text: &str) -> Result<Option<Duration>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("keep") || text.eq_ignore_ascii_case("forever") {
        return Ok(None);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?}: give a unit (ms, s, m, h, d), or keep"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: not a number followed by a unit"))?;
    let seconds = match unit {
        "ms" => return Ok(Some(Duration::from_millis(number))),
        "s" => number,
        "m" => number * 60,
        "h" => number * 3600,
        "d" => number * 86_400,
        _ => return Err(format!("{text:?}: the unit is ms, s, m, h or d")),
    };
    Ok(Some(Duration::from_secs(seconds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_operators_write_them() {
        assert_eq!(parse_age("24h"), Ok(Some(Duration::from_secs(86_400))));
        assert_eq!(parse_age("7d"), Ok(Some(Duration::from_secs(604_800))));
        assert_eq!(parse_age("500ms"), Ok(Some(Duration::from_millis(500))));
        assert_eq!(parse_age("keep"), Ok(None));
        assert!(parse_age("12").unwrap_err().contains("unit"));
        assert!(parse_age("3w").unwrap_err().contains("unit"));
    }
}
