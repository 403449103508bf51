//! The broker's own propagation delay, measured beside the pipeline's in
//! `bench pipeline --bus ...`: records produced at the latency phase's
//! rate and tick with the broker's plain client (rdkafka for Kafka,
//! async-nats for NATS JetStream), read back by a plain consumer of the
//! same client. Each record carries the µs at which its send began; the
//! delay is from then to when the consumer holds it. No outbox, relay or
//! database: what is left is the broker and its client.
//!
//! The clients are set up for the same durability as Tandem's adapters
//! (Kafka: `acks=all`, idempotence, librdkafka's own `linger.ms`; NATS: a
//! file-backed stream, published with acknowledgement), and otherwise left
//! at their defaults.

use std::time::Duration;

use anyhow::{ensure, Context};
use futures_util::StreamExt;

/// Where the probe publishes: `per_tick` records every `tick` for
/// `seconds`, each `payload_bytes` long.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub per_tick: u64,
    pub tick: Duration,
    pub seconds: u64,
    pub payload_bytes: usize,
}

impl Schedule {
    fn payload(&self) -> Vec<u8> {
        let mut payload = tandem::schema::now_micros().to_le_bytes().to_vec();
        payload.resize(self.payload_bytes.max(8), b'x');
        payload
    }
}

fn sent_micros(payload: &[u8]) -> anyhow::Result<i64> {
    let stamp: [u8; 8] = payload
        .get(..8)
        .and_then(|bytes| bytes.try_into().ok())
        .context("a probe record without its time")?;
    Ok(i64::from_le_bytes(stamp))
}

/// Publishes on `schedule` with `publish`, which must not wait for the
/// broker's answer beyond handing the record over.
async fn publish_on_schedule<F, Fut>(schedule: Schedule, mut publish: F) -> anyhow::Result<u64>
where
    F: FnMut(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut interval = tokio::time::interval(schedule.tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = std::time::Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(schedule.seconds) {
        interval.tick().await;
        for _ in 0..schedule.per_tick {
            publish(schedule.payload()).await?;
            sent += 1;
        }
    }
    Ok(sent)
}

/// Kafka: a fresh one-partition topic, an rdkafka `FutureProducer` and a
/// `StreamConsumer` assigned to the topic from its start. The delays in
/// µs, sorted.
pub async fn kafka(url: &str, schedule: Schedule) -> anyhow::Result<Vec<i64>> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Message;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};

    let brokers = tandem_kafka::KafkaConfig::from_url(url)?.brokers;
    let topic = format!("bench-raw-latency-{}", uuid::Uuid::now_v7().simple());
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &brokers);
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for outcome in created {
        outcome.map_err(|(topic, code)| anyhow::anyhow!("creating {topic}: {code}"))?;
    }
    let producer: FutureProducer = config
        .clone()
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .create()?;
    let consumer: StreamConsumer = config
        .clone()
        .set("group.id", format!("{topic}-reader"))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(&topic, 0, Offset::Beginning)?;
    consumer.assign(&assignment)?;

    // One record read back before the clock starts: both clients have
    // their connections and metadata.
    let ready = |producer: &FutureProducer, payload: Vec<u8>| {
        producer
            .send_result(FutureRecord::<(), _>::to(&topic).payload(&payload))
            .map_err(|(error, _)| anyhow::anyhow!("producing: {error}"))
    };
    ready(&producer, vec![0; 8])?
        .await
        .context("producer dropped")?
        .map_err(|(error, _)| anyhow::anyhow!("producing: {error}"))?;
    tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .context("the first probe record did not come back within 30 s")??;

    let deliveries = std::sync::Mutex::new(Vec::new());
    let (sent, delays) = round_trip(
        schedule,
        |payload| {
            let delivery = ready(&producer, payload);
            let deliveries = &deliveries;
            async move {
                deliveries.lock().expect("deliveries").push(delivery?);
                Ok(())
            }
        },
        consumer
            .stream()
            .map(|message| sent_micros(message?.payload().unwrap_or_default())),
    )
    .await?;
    for delivery in deliveries.into_inner().expect("deliveries") {
        delivery
            .await
            .context("producer dropped")?
            .map_err(|(error, _)| anyhow::anyhow!("producing: {error}"))?;
    }
    // The topic stays: tansu 0.6 panics when a topic is deleted while a
    // fetch of it is in flight (the raw throughput loop's topics stay too).
    finish(sent, delays)
}

/// How many records were sent, once the writer is done (`u64::MAX`
/// until then): the reader reads that many, or stops when nothing more
/// comes for 30 s.
struct Sent(std::sync::atomic::AtomicU64);

impl Sent {
    fn new() -> Self {
        Sent(std::sync::atomic::AtomicU64::new(u64::MAX))
    }

    fn set(&self, sent: u64) {
        self.0.store(sent, std::sync::atomic::Ordering::SeqCst);
    }

    fn reached(&self, read: usize) -> bool {
        read as u64 >= self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Reads until `sent` is reached, waiting up to 30 s for each record.
async fn read_back(
    sent: &Sent,
    mut records: impl futures_util::Stream<Item = anyhow::Result<i64>> + Unpin,
) -> anyhow::Result<Vec<i64>> {
    let mut delays = Vec::new();
    let mut quiet = Duration::ZERO;
    while !sent.reached(delays.len()) && quiet < Duration::from_secs(30) {
        let step = Duration::from_millis(100);
        match tokio::time::timeout(step, records.next()).await {
            Ok(Some(sent_at)) => {
                delays.push(tandem::schema::now_micros() - sent_at?);
                quiet = Duration::ZERO;
            }
            Ok(None) => return Ok(delays),
            Err(_) => quiet += step,
        }
    }
    Ok(delays)
}

/// Publishes on `schedule` while reading `records` back (each the µs its
/// send began): how many were sent, and the delays read.
async fn round_trip<F, Fut>(
    schedule: Schedule,
    publish: F,
    records: impl futures_util::Stream<Item = anyhow::Result<i64>> + Unpin,
) -> anyhow::Result<(u64, Vec<i64>)>
where
    F: FnMut(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let count = Sent::new();
    let writer = async {
        let sent = publish_on_schedule(schedule, publish).await;
        count.set(*sent.as_ref().unwrap_or(&0));
        sent
    };
    let (sent, delays) = tokio::join!(writer, read_back(&count, records));
    Ok((sent?, delays?))
}

fn finish(sent: u64, mut delays: Vec<i64>) -> anyhow::Result<Vec<i64>> {
    ensure!(
        delays.len() as u64 == sent,
        "the raw loop read back {} of {sent} records",
        delays.len()
    );
    delays.sort_unstable();
    Ok(delays)
}

/// NATS JetStream: a fresh file-backed stream, publishes whose
/// acknowledgements are awaited aside, and an ordered pull consumer's
/// message stream. The delays in µs, sorted.
pub async fn nats(url: &str, schedule: Schedule) -> anyhow::Result<Vec<i64>> {
    use async_nats::jetstream::{self, consumer, stream};

    let config = tandem_nats::NatsConfig::from_url(url)?;
    let client = async_nats::connect(config.server.as_str())
        .await
        .context("connecting to NATS")?;
    let jetstream = jetstream::new(client);
    let name = format!("bench-raw-latency-{}", uuid::Uuid::now_v7().simple());
    let stream = jetstream
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![name.clone()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|error| anyhow::anyhow!("creating stream {name}: {error}"))?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig::default())
        .await
        .map_err(|error| anyhow::anyhow!("creating a consumer of {name}: {error}"))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|error| anyhow::anyhow!("reading {name}: {error}"))?;

    let (acks, mut settle) =
        tokio::sync::mpsc::unbounded_channel::<jetstream::context::PublishAckFuture>();
    let acker = tokio::spawn(async move {
        while let Some(ack) = settle.recv().await {
            ack.await
                .map_err(|error| anyhow::anyhow!("publishing: {error}"))?;
        }
        anyhow::Ok(())
    });
    let (sent, delays) = round_trip(
        schedule,
        |payload| {
            let (jetstream, subject, acks) = (&jetstream, name.clone(), &acks);
            async move {
                let ack = jetstream
                    .publish(subject, payload.into())
                    .await
                    .map_err(|error| anyhow::anyhow!("publishing: {error}"))?;
                acks.send(ack).context("the acknowledging task stopped")?;
                Ok(())
            }
        },
        messages.map(|message| {
            let message = message.map_err(|error| anyhow::anyhow!("reading: {error}"))?;
            sent_micros(&message.payload)
        }),
    )
    .await?;
    drop(acks);
    acker.await.context("the acknowledging task")??;
    let _ = jetstream.delete_stream(&name).await;
    finish(sent, delays)
}
