//! Faults the real engines cannot produce on demand, wrapped around the
//! real ones: a store that is unreachable for a while, and a bus member
//! that holds its first batch until the test lets it go.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem::bus::{Bus, BusError, Delivery, OutgoingRecord, Record, Subscription, TopicPartition};
use tandem::store::{ExternalChanges, Lease, Store, StoreError, StoreFuture, Tx};

/// A store that answers `StoreError::Unavailable` to every read and write
/// while its switch is down; leases and signals pass through.
#[derive(Clone)]
pub struct FlakyStore<S> {
    inner: S,
    down: Arc<AtomicBool>,
}

impl<S: Store> FlakyStore<S> {
    /// Wraps `inner`; `down` is the switch, shared with the test.
    pub fn new(inner: S, down: Arc<AtomicBool>) -> Self {
        Self { inner, down }
    }

    fn refused<R, E>() -> StoreFuture<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        Box::pin(async { Err(E::from(StoreError::Unavailable("injected outage".into()))) })
    }
}

impl<S: Store> Store for FlakyStore<S> {
    fn write<R, E, F>(&self, work: F) -> StoreFuture<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&mut dyn Tx) -> Result<R, E> + Send + 'static,
    {
        if self.down.load(Ordering::SeqCst) {
            return Self::refused();
        }
        self.inner.write(work)
    }

    fn read<R, E, F>(&self, work: F) -> StoreFuture<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&mut dyn Tx) -> Result<R, E> + Send + 'static,
    {
        if self.down.load(Ordering::SeqCst) {
            return Self::refused();
        }
        self.inner.read(work)
    }

    fn outbox_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.outbox_signal()
    }

    fn external_changes(&self) -> Result<Box<dyn ExternalChanges>, StoreError> {
        self.inner.external_changes()
    }

    fn try_lead(&self, name: &str) -> StoreFuture<Option<Box<dyn Lease>>, StoreError> {
        self.inner.try_lead(name)
    }

    fn close(&self) -> StoreFuture<(), StoreError> {
        self.inner.close()
    }
}

/// The test's handle on a [`HoldingBus`]: whether the first batch is held,
/// and the switch that lets it go.
pub struct Gate {
    used: AtomicBool,
    holding: AtomicBool,
    open: tokio::sync::watch::Sender<bool>,
}

impl Gate {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            used: AtomicBool::new(false),
            holding: AtomicBool::new(false),
            open: tokio::sync::watch::channel(false).0,
        })
    }

    /// Whether a member is holding its first batch now.
    pub fn is_holding(&self) -> bool {
        self.holding.load(Ordering::SeqCst)
    }

    /// Lets the held batch go.
    pub fn open(&self) {
        self.open.send_replace(true);
    }
}

/// A bus whose subscriptions hand out their first batch of records only
/// once the [`Gate`] opens: a member slow between fetching and applying.
pub struct HoldingBus {
    inner: Arc<dyn Bus>,
    gate: Arc<Gate>,
}

impl HoldingBus {
    pub fn new(inner: Arc<dyn Bus>, gate: Arc<Gate>) -> Self {
        Self { inner, gate }
    }
}

#[async_trait::async_trait]
impl Bus for HoldingBus {
    async fn publish(&self, records: &[OutgoingRecord]) -> Result<(), BusError> {
        self.inner.publish(records).await
    }

    async fn enqueue(
        &self,
        records: Vec<OutgoingRecord>,
    ) -> Result<tandem::bus::Acknowledgements, BusError> {
        self.inner.enqueue(records).await
    }

    async fn subscribe(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<Box<dyn Subscription>, BusError> {
        Ok(Box::new(HoldingSubscription {
            inner: self.inner.subscribe(group, topics).await?,
            gate: Arc::clone(&self.gate),
        }))
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

    fn shares_partitions(&self) -> bool {
        self.inner.shares_partitions()
    }

    fn publish_depth(&self) -> usize {
        self.inner.publish_depth()
    }

    fn redelivery_delay_max(&self) -> Duration {
        self.inner.redelivery_delay_max()
    }
    async fn close(&self) -> Result<(), BusError> {
        self.inner.close().await
    }

    async fn start_offsets(&self, topic: &str) -> Result<Vec<(u32, u64)>, BusError> {
        self.inner.start_offsets(topic).await
    }

    async fn prune(
        &self,
        max_age: Option<std::time::Duration>,
        max_records: Option<u64>,
        batch: u64,
    ) -> Result<u64, BusError> {
        self.inner.prune(max_age, max_records, batch).await
    }
}

struct HoldingSubscription {
    inner: Box<dyn Subscription>,
    gate: Arc<Gate>,
}

#[async_trait::async_trait]
impl Subscription for HoldingSubscription {
    async fn next(
        &mut self,
        max_records: usize,
        max_wait: Duration,
    ) -> Result<Option<Delivery>, BusError> {
        let delivery = self.inner.next(max_records, max_wait).await?;
        if matches!(delivery, Some(Delivery::Records(_)))
            && !self.gate.used.swap(true, Ordering::SeqCst)
        {
            self.gate.holding.store(true, Ordering::SeqCst);
            let mut open = self.gate.open.subscribe();
            let _ = open.wait_for(|open| *open).await;
            self.gate.holding.store(false, Ordering::SeqCst);
        }
        Ok(delivery)
    }

    async fn seek(&mut self, partition: &TopicPartition, offset: u64) -> Result<(), BusError> {
        self.inner.seek(partition, offset).await
    }

    async fn ack(&mut self, records: &[Record]) -> Result<(), BusError> {
        self.inner.ack(records).await
    }
}
