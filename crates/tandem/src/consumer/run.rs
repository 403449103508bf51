//! The run loop: subscribe, seek to the stored positions, apply what is

//! delivered, keep house (requests, gaps), and wait out outages.

use std::collections::VecDeque;

use std::sync::Arc;

use std::time::Duration;

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use super::positions::{generation, read_positions};

use super::{describe, is_outage, Consumer, ConsumerError};

use crate::backoff::Backoff;

use crate::bus::{BusError, Delivery, Record, Subscription, TopicPartition};

use crate::store::{Store, StoreError, Tx};

/// How [`Consumer::drain_buffer`] ended.
pub(super) enum Drained {
    /// Everything buffered was consumed.
    Done,
    /// Shutdown interrupted a retry.
    Shutdown,
    /// A replay reset the consumer: seek again and drop the buffer.
    Stale,
    /// An operator paused the consumer: leave the group.
    Paused,
}

impl<S: Store> Consumer<S> {
    /// Consumes until `shutdown` fires. The batch in flight then commits or
    /// rolls back as a whole; nothing is half-applied.
    ///
    /// An engine that becomes unreachable (a bus or store error of kind
    /// `Unavailable`) is waited out: the consumer drops its subscription,
    /// backs off exponentially with jitter up to `retry_outage_max`, and
    /// joins its group again, which seeks every assigned partition back to
    /// the position stored with the effects; nothing is lost or applied
    /// twice. Any other error ends `run`.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), ConsumerError> {
        let mut backoff = Backoff::new(self.config.retry_initial, self.config.retry_outage_max);
        let mut announced_pause = false;
        loop {
            if self.paused().await.unwrap_or(false) {
                if !announced_pause {
                    tracing::info!(consumer = %self.config.name, "paused; applying nothing until resumed");
                    announced_pause = true;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(self.config.housekeeping_interval) => {}
                }
                continue;
            }
            if announced_pause {
                tracing::info!(consumer = %self.config.name, "resumed");
                announced_pause = false;
            }
            let started = Instant::now();
            let error = match self.run_subscribed(&shutdown).await {
                Ok(Ended::Shutdown) => return Ok(()),
                Ok(Ended::Paused) => continue,
                Err(error) if is_outage(&error) => error,
                Err(ConsumerError::Bus(BusError::Pruned(cause))) => {
                    // Never skip: stay at the position stored with the
                    // effects, say so, and look again now and then (an
                    // operator may republish the source or replay).
                    tracing::error!(
                        consumer = %self.config.name,
                        %cause,
                        "cannot go on: events this consumer has not applied were pruned from the log"
                    );
                    crate::metrics::record_fell_behind(
                        &self.config.name,
                        &cause.to_string(),
                        self.config.retry_outage_max * 3,
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(self.config.retry_outage_max) => {}
                    }
                    continue;
                }
                Err(error) => return Err(error),
            };
            // A subscription that worked for a while starts the backoff over.
            if started.elapsed() > self.config.retry_outage_max * 2 {
                backoff.reset();
            }
            let pause = backoff.next_delay();
            tracing::warn!(
                consumer = %self.config.name,
                %error,
                retry_in_ms = pause.as_millis() as u64,
                "engine unavailable; joining the group again after a pause"
            );
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Whether an operator has paused this consumer.
    async fn paused(&self) -> Result<bool, StoreError> {
        let consumer = self.config.name.clone();
        self.store
            .read(move |tx: &mut dyn Tx| super::pauses::paused_in(tx, &consumer))
            .await
    }

    async fn run_subscribed(&self, shutdown: &CancellationToken) -> Result<Ended, ConsumerError> {
        let shutdown = shutdown.clone();
        let mut subscription = self
            .bus
            .subscribe(&self.config.name, &self.config.topics)
            .await?;
        let mut assigned: Vec<TopicPartition> = Vec::new();
        let mut buffer: VecDeque<Record> = VecDeque::new();
        let mut last_housekeeping = Instant::now() - self.config.housekeeping_interval;
        let mut last_gap_check = Instant::now();
        let mut behind = BehindCheck::default();
        loop {
            if shutdown.is_cancelled() {
                return Ok(Ended::Shutdown);
            }
            if last_housekeeping.elapsed() >= self.config.housekeeping_interval {
                last_housekeeping = Instant::now();
                // Paused: leave the group (drop the subscription); the
                // records not applied are read again after the resume.
                if self.paused().await? {
                    return Ok(Ended::Paused);
                }
                if self.run_requests(&mut subscription, &assigned).await? {
                    buffer.clear();
                }
                if last_gap_check.elapsed()
                    >= (self.config.gap_timeout / 4).max(Duration::from_millis(10))
                {
                    last_gap_check = Instant::now();
                    self.expire_gaps().await?;
                }
                if behind.due() {
                    self.check_not_behind(&assigned, &mut behind).await?;
                }
            }
            if buffer.is_empty() {
                let wait = self.config.housekeeping_interval;
                let asked = std::time::Instant::now();
                let delivery = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
                    delivery = subscription.next(self.config.batch_size, wait) => delivery?,
                };
                if let Some(Delivery::Records(_)) = &delivery {
                    crate::metrics::metrics()
                        .bus_operation(crate::metrics::Operation::receive, asked.elapsed());
                }
                match delivery {
                    None => continue,
                    Some(Delivery::Assigned(partitions)) => {
                        tracing::info!(
                            consumer = %self.config.name,
                            partitions = %describe(&partitions),
                            "partitions assigned"
                        );
                        self.seek_to_positions(&mut subscription, &partitions)
                            .await?;
                        assigned.extend(partitions);
                        buffer.clear();
                        continue;
                    }
                    Some(Delivery::Revoked(partitions)) => {
                        tracing::info!(
                            consumer = %self.config.name,
                            partitions = %describe(&partitions),
                            "partitions revoked"
                        );
                        assigned.retain(|partition| !partitions.contains(partition));
                        buffer.retain(|record| {
                            !partitions.contains(&TopicPartition::new(
                                record.topic.clone(),
                                record.partition,
                            ))
                        });
                        continue;
                    }
                    Some(Delivery::Records(records)) => buffer.extend(records),
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
                _ = crate::fault::hold("consumer.before_batch") => {}
            }
            match self
                .drain_buffer(&mut buffer, &mut subscription, &shutdown)
                .await?
            {
                Drained::Done => {}
                Drained::Shutdown => return Ok(Ended::Shutdown),
                Drained::Paused => return Ok(Ended::Paused),
                Drained::Stale => {
                    tracing::info!(
                        consumer = %self.config.name,
                        "another member replayed the consumer; seeking to the new positions"
                    );
                    buffer.clear();
                    self.seek_to_positions(&mut subscription, &assigned).await?;
                }
            }
        }
    }

    /// Seeks `partitions` to the stored positions, and takes the replay
    /// generation they belong to (read in one snapshot with them).
    async fn seek_to_positions(
        &self,
        subscription: &mut Box<dyn Subscription>,
        partitions: &[TopicPartition],
    ) -> Result<(), ConsumerError> {
        let consumer = self.config.name.clone();
        let (saved, current) = self
            .store
            .read(move |tx| -> Result<_, StoreError> {
                Ok((read_positions(tx, &consumer)?, generation(tx, &consumer)?))
            })
            .await?;
        for partition in partitions {
            let offset = saved.get(partition).copied().unwrap_or(0);
            subscription.seek(partition, offset).await?;
        }
        self.generation
            .store(current, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Fails with [`BusError::Pruned`] when the log no longer holds the
    /// next record of an assigned partition and the consumer has not moved
    /// from that position since the previous check ([`BEHIND_CHECK_EVERY`]
    /// ago): records it never had were deleted by the log's retention.
    /// Each engine also says so when it is asked for such a record (the
    /// embedded log on reading, Kafka and NATS on a seek or a hole in the
    /// offsets); this check covers a consumer that is already reading
    /// when retention overtakes it, which a NATS durable would otherwise
    /// silently jump over. Waiting for a second sighting leaves room for
    /// a record another member of a shared partition is applying right now.
    async fn check_not_behind(
        &self,
        assigned: &[TopicPartition],
        behind: &mut BehindCheck,
    ) -> Result<(), ConsumerError> {
        behind.last = Some(Instant::now());
        if assigned.is_empty() {
            behind.seen.clear();
            return Ok(());
        }
        let consumer = self.config.name.clone();
        let positions = self
            .store
            .read(move |tx| read_positions(tx, &consumer))
            .await?;
        let mut seen = Vec::new();
        let mut topics: Vec<&str> = assigned.iter().map(|p| p.topic.as_str()).collect();
        topics.sort_unstable();
        topics.dedup();
        for topic in topics {
            for (partition, start) in self.bus.start_offsets(topic).await? {
                let partition = TopicPartition::new(topic.to_owned(), partition);
                if !assigned.contains(&partition) {
                    continue;
                }
                let position = positions.get(&partition).copied().unwrap_or(0);
                if position >= start {
                    continue;
                }
                if behind.seen.contains(&(partition.clone(), position)) {
                    return Err(ConsumerError::Bus(BusError::pruned(
                        &partition.topic,
                        partition.partition,
                        position,
                        start,
                    )));
                }
                seen.push((partition, position));
            }
        }
        behind.seen = seen;
        Ok(())
    }

    /// Applies everything in `buffer`. A shutdown that interrupts a retry
    /// leaves the record unapplied (it is redelivered on restart).
    async fn drain_buffer(
        &self,
        buffer: &mut VecDeque<Record>,
        subscription: &mut Box<dyn Subscription>,
        shutdown: &CancellationToken,
    ) -> Result<Drained, ConsumerError> {
        while !buffer.is_empty() {
            let records: Arc<Vec<Record>> = Arc::new(buffer.iter().cloned().collect());
            let outcome = self.apply_batch(Arc::clone(&records)).await?;
            if outcome.stale {
                return Ok(Drained::Stale);
            }
            if outcome.paused {
                return Ok(Drained::Paused);
            }
            buffer.drain(..outcome.consumed);
            subscription.ack(&records[..outcome.consumed]).await?;
            let Some(error) = outcome.failure else {
                continue;
            };
            let failed = buffer.pop_front().expect("the failed record is buffered");
            match self
                .retry_then_park(failed, error, subscription, shutdown)
                .await?
            {
                Drained::Done => {}
                other => return Ok(other),
            }
        }
        Ok(Drained::Done)
    }
}

/// How often a consumer compares its positions with the log's start.
const BEHIND_CHECK_EVERY: Duration = Duration::from_secs(15);

/// What the previous [`Consumer::check_not_behind`] saw: the partitions
/// whose position was below the log's start, at that position.
#[derive(Default)]
struct BehindCheck {
    last: Option<Instant>,
    seen: Vec<(TopicPartition, u64)>,
}

impl BehindCheck {
    fn due(&self) -> bool {
        self.last
            .is_none_or(|last| last.elapsed() >= BEHIND_CHECK_EVERY)
    }
}

/// Why a subscription ended without an error.
enum Ended {
    Shutdown,
    /// An operator paused the consumer.
    Paused,
}
