//! NATS JetStream as Tandem's [`Bus`]: [`NatsBus`].
//!
//! # Mapping
//!
//! - **Topic → stream.** Each topic is one stream named
//!   `<prefix>_<topic>` (sanitised: characters other than ASCII letters,
//!   digits, `-` and `_` become `_`, and a short hash is appended when
//!   anything was replaced), holding the one subject `<prefix>.<topic>`.
//!   The prefix (default `tandem`) is in the stream name too, so that two
//!   prefixes on one account never fight over a stream. Streams are created
//!   on first publish or subscribe, with file storage, the configured
//!   replicas and duplicate window.
//! - **One partition.** A topic has partition 0 only, and a record's offset
//!   is its stream sequence − 1, so offsets are dense from 0.
//!   [`Bus::end_offsets`] is `[(0, last_sequence)]`, `[(0, 0)]` for a topic
//!   with no stream yet.
//! - **Headers.** The key travels in `Tandem-Key` (percent-encoded where it
//!   is not plain printable ASCII); when the payload is a Tandem envelope its
//!   CloudEvents attributes travel as `ce-id`, `ce-type`, `ce-source`,
//!   `ce-subject`, `ce-specversion` too, so NATS tooling can filter and show
//!   them without parsing the body.
//! - **Publish.** A message whose payload is an envelope carries
//!   `Nats-Msg-Id` = the envelope's `id`. A relay that retries a batch
//!   inside the stream's duplicate window (2 minutes by default) therefore
//!   appends nothing twice; a retry after the window appends duplicates,
//!   which the consumer drops by per-aggregate sequence. A payload that is
//!   not an envelope has no identity and gets no `Nats-Msg-Id`: two equal
//!   records published are two records, as on every engine (a hash of
//!   topic, key and payload would silently merge them, which the bus
//!   contract and its conformance suite forbid). All messages of a batch are
//!   sent first, then every PubAck is awaited in order; `Ok` means each one
//!   is stored. One failed ack fails the batch and the relay retries it all.
//!
//! # Groups: one shared durable pull consumer
//!
//! `subscribe(group, topics)` binds, per topic, the durable pull consumer
//! named after the group (sanitised) on that topic's stream, creating it
//! (delivering everything) if no member has: explicit acks, NATS `BackOff`
//! `[ack_wait, backoff...]`, filter subject = the topic's subject (NATS 2.9
//! allows one), `max_deliver` a billion (2.9 refuses -1, unlimited, beside a
//! `BackOff` list), a large `max_ack_pending`. An existing durable is bound
//! as it is (its settings are not updated). Every instance of a service
//! binds the same durable, so they share the work: each message goes to
//! one of them. The first delivery of a subscription assigns `(topic, 0)`
//! for every topic; nothing is ever revoked.
//!
//! Per topic a pump task pulls (requests of up to `fetch_batch` messages,
//! each living 5 s on the server) into one channel that
//! [`Subscription::next`] reads; it pulls again only while fewer than
//! `fetch_batch` records wait there, so a member takes little more than it
//! handles. Pulling starts with the first `next` after the assignment, so
//! the consumer's seeks come before any message. Every message a member
//! received and has not acked, handed out or still buffered, is kept
//! alive: a background task tells the server every `ack_wait / 3` that work
//! is in progress (`+WPI`), so a long batch or a handler's retries never
//! cause a spurious redelivery. Dropping a subscription NAKs what it held,
//! so other members get it at once. Only a member that dies (or loses its
//! connection) leaves messages to the timer: they are redelivered after
//! `ack_wait` (2 s by default), then after each `backoff` step.
//!
//! # Seek: positions live in the consumer's database
//!
//! The consumer seeks every assigned partition to the position in its own
//! database. With members sharing a durable that position may be a little
//! ahead of or behind what NATS has seen acknowledged. [`Subscription::seek`]
//! to offset `o` (stream sequence `o + 1`) asks for the durable's state and
//! decides:
//!
//! - If some message at or after `o + 1` was already acknowledged (this
//!   member acked it on the current durable, or the ack floor is at or past
//!   `o + 1`, or messages above the floor were acked out of order), NATS
//!   would never deliver it again: the database is behind
//!   NATS (restored from a backup, or a replay to 0). The durable is
//!   deleted and created again delivering from sequence `o + 1`
//!   (`DeliverPolicy::All` for 0). This is stricter than "offset ≤ ack
//!   floor": it also catches acks above the floor, which members sharing a
//!   durable produce, and it does not recreate when `o + 1` is exactly the
//!   first unacknowledged message (two members starting on an empty
//!   database would otherwise delete each other's durable). The member's
//!   own acks are counted from its memory because the server applies acks
//!   after the flush that sent them: its info may not show them yet.
//! - Otherwise nothing from `o + 1` on is lost, so the durable stays. The
//!   messages this member handed out from `o` on, and all it still had
//!   buffered, are NAKed in offset order and come again at once (what was
//!   buffered is dropped from the channel); everything else arrives as
//!   usual. Messages already in flight to this member when it NAKs can
//!   arrive before the NAKed ones: each delivery is in offset order, but
//!   a seek in the middle of reading may reorder across deliveries, which
//!   the consumer's sequence check absorbs. A seek right after the
//!   assignment, the consumer's case, has nothing buffered.
//!
//! Other members bound to a deleted durable recover by themselves: their
//! pull requests and acks address the durable by name, so they reach the
//! recreated one; a member whose pull stream fails (the server announces
//! "consumer deleted", or heartbeats stop) binds again by name, waiting up
//! to 2 s for the recreated durable before creating it itself. Messages it
//! held from the old durable are redelivered by the new one (they are past
//! its start); nothing is lost, some come twice.
//!
//! # Order and exactly-once effect
//!
//! One member reads a stream in sequence order, and each delivery
//! ([`tandem::bus::Delivery::Records`]) is sorted by offset. But with several members on
//! one durable, or after a redelivery, the server does not keep order
//! across messages (see the design's NATS pitfalls): member A may hold
//! sequence 5 of an aggregate while member B applies 6. The toolkit's
//! consumer restores the order: an event ahead of a gap is held in
//! `tandem_pending` and applied when the missing one arrives; duplicates
//! are dropped by per-aggregate sequence. The one rule to keep: the
//! consumer's `gap_timeout` must exceed the time a message of a member that
//! died takes to come back, or the held successors are parked as `gap`
//! dead letters. The bus reports that time
//! ([`tandem::bus::Bus::redelivery_delay_max`]: the largest of `ack_wait`
//! and the backoff, 30 s by default), and `tandem::consumer::Consumer::new`
//! raises a shorter `gap_timeout` above it.
//!
//! Members share the stream's one partition
//! ([`tandem::bus::Bus::shares_partitions`]), so a member's highest applied
//! offset is no safe position: the consumer keeps the first offset no
//! member has applied as the position, and what was applied beyond it
//! aside, so that a member that rejoins never seeks past another member's
//! unapplied records.
//!
//! Acks are plain `+ACK`s, flushed to the socket, not double acks: the
//! database is the record of what was applied, so an ack the server never
//! got costs one redelivery that the sequence check drops, while a double
//! ack costs a round trip (and in async-nats a new inbox subscription) per
//! message. A failed ack is logged, not returned, for the same reason.
//!
//! Known limit: while a durable is being recreated, an ack sent by another
//! member for a message of the old durable reaches the new one by name and
//! may acknowledge the new delivery of that message. The ack follows a
//! commit, so the event was applied, except across a replay that reset the
//! read model just before; a replay is best run with one member.
//!
//! # Connecting
//!
//! [`NatsBus::connect`] takes `nats://[user:pass@]host:port[?options]`;
//! see [`NatsConfig::from_url`] for the options. An unreachable server at
//! start-up is an error naming the URL (without secrets) after the connect
//! timeout (5 s); later outages are ridden out by async-nats, which
//! reconnects with backoff, while publishes fail (the relay retries) and
//! subscriptions report [`BusError::Unavailable`].

#![deny(missing_docs)]

mod config;
mod subscription;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, message::PublishMessage, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use tandem::bus::{Bus, BusError, OutgoingRecord, Subscription};
use tandem::Envelope;

pub use config::NatsConfig;
pub use subscription::NatsSubscription;

/// Header carrying the record's key.
pub const KEY_HEADER: &str = "Tandem-Key";

/// The NATS JetStream bus. Cheap to clone; clones share one connection.
#[derive(Clone)]
pub struct NatsBus {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) client: async_nats::Client,
    pub(crate) jetstream: jetstream::Context,
    pub(crate) config: NatsConfig,
    /// Topics whose stream is known to exist.
    ensured: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("NatsBus")
            .field("config", &self.inner.config)
            .finish()
    }
}

/// FNV-1a, 32 bit.
fn fnv32(text: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in text.as_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// A name NATS accepts for streams and consumers, distinct per input.
pub(crate) fn sanitise(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out != name {
        out.push_str(&format!("_{:08x}", fnv32(name)));
    }
    out
}

/// Percent-encodes what is not printable ASCII (and `%` itself).
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for byte in key.bytes() {
        if (0x21..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

pub(crate) fn decode_key(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            if let Some(byte) = text
                .get(index + 1..index + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            {
                out.push(byte);
                index += 3;
                continue;
            }
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a header value can carry `text` as it is.
fn header_safe(text: &str) -> bool {
    !text.is_empty() && !text.chars().any(|c| c.is_control()) && text.trim() == text
}

impl Inner {
    pub(crate) fn stream_name(&self, topic: &str) -> String {
        sanitise(&format!("{}_{}", self.config.prefix, topic))
    }

    pub(crate) fn subject(&self, topic: &str) -> String {
        format!("{}.{}", self.config.prefix, topic)
    }

    /// Maps an engine error: `Unavailable` while the connection is down.
    /// The NATS error stays the source.
    pub(crate) fn error<E>(&self, what: &str, error: E) -> BusError
    where
        E: Into<Box<dyn std::error::Error + Send + Sync + 'static>> + std::fmt::Display,
    {
        let message = format!("NATS {what} at {}: {error}", self.config.display_url());
        let cause = tandem::Cause::with_boxed_source(message, error.into());
        if self.client.connection_state() == async_nats::connection::State::Connected {
            BusError::Engine(cause)
        } else {
            BusError::Unavailable(cause)
        }
    }

    pub(crate) fn check_topic(topic: &str) -> Result<(), BusError> {
        if topic.is_empty() {
            return Err(BusError::Invalid("topic must not be empty".into()));
        }
        if !config::valid_subject_part(topic) {
            return Err(BusError::Invalid(
                format!(
                "topic {topic:?} cannot be a NATS subject (no whitespace, '*', '>' or empty tokens)"
            )
                .into(),
            ));
        }
        Ok(())
    }

    /// Creates the topic's stream if it does not exist yet. A publisher
    /// (`publisher`) also brings an existing stream's retention (age,
    /// size, count) to this bus's rule, so a changed rule takes effect
    /// when the publishing service restarts; a subscriber leaves it.
    pub(crate) async fn ensure_stream(&self, topic: &str, publisher: bool) -> Result<(), BusError> {
        // A stream a subscriber saw may still need a publisher's rule.
        let published = format!("{topic}\u{0}published");
        let ensured = {
            let ensured = self
                .ensured
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            ensured.contains(&published) || (!publisher && ensured.contains(topic))
        };
        if ensured {
            return Ok(());
        }
        let config = stream::Config {
            name: self.stream_name(topic),
            subjects: vec![self.subject(topic)],
            storage: stream::StorageType::File,
            num_replicas: self.config.replicas.max(1),
            // NATS wants the duplicate window within the age limit.
            duplicate_window: match self.config.retain_log {
                Some(age) => self.config.duplicate_window.min(age),
                None => self.config.duplicate_window,
            },
            // Retention (README, Retention): by age, and by size or count
            // if set; the oldest messages go first.
            max_age: self.config.retain_log.unwrap_or_default(),
            max_bytes: self
                .config
                .retain_log_bytes
                .map_or(-1, |bytes| i64::try_from(bytes).unwrap_or(i64::MAX)),
            max_messages: self
                .config
                .retain_log_records
                .map_or(-1, |records| i64::try_from(records).unwrap_or(i64::MAX)),
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        };
        let stream = self
            .jetstream
            .get_or_create_stream(config.clone())
            .await
            .map_err(|error| self.error(&format!("stream for topic {topic}"), error))?;
        let current = &stream.cached_info().config;
        let differs = current.max_age != config.max_age
            || current.max_bytes != config.max_bytes
            || current.max_messages != config.max_messages;
        if publisher && differs {
            let updated = stream::Config {
                max_age: config.max_age,
                max_bytes: config.max_bytes,
                max_messages: config.max_messages,
                duplicate_window: if config.max_age.is_zero() {
                    current.duplicate_window
                } else {
                    current.duplicate_window.min(config.max_age)
                },
                ..current.clone()
            };
            self.jetstream
                .update_stream(updated)
                .await
                .map_err(|error| self.error(&format!("retention of topic {topic}"), error))?;
            tracing::info!(
                topic,
                max_age_s = config.max_age.as_secs(),
                max_bytes = config.max_bytes,
                max_messages = config.max_messages,
                "the stream's retention changed to this bus's rule"
            );
        }
        let mut ensured = self
            .ensured
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        ensured.insert(topic.to_owned());
        if publisher {
            ensured.insert(published);
        }
        Ok(())
    }

    /// The first offset the topic's stream still holds: `first_sequence −
    /// 1`, or `last_sequence` once retention emptied it (NATS then puts
    /// the first sequence one past the last); 0 with no stream yet.
    pub(crate) async fn start_offset(&self, topic: &str) -> Result<u64, BusError> {
        let name = self.stream_name(topic);
        match self.jetstream.get_stream(&name).await {
            Ok(stream) => {
                let state = &stream.cached_info().state;
                Ok(if state.messages == 0 {
                    state.last_sequence
                } else {
                    state.first_sequence.saturating_sub(1)
                })
            }
            Err(error) => {
                if let jetstream::context::GetStreamErrorKind::JetStream(inner) = error.kind() {
                    if inner.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND {
                        return Ok(0);
                    }
                }
                Err(self.error(&format!("stream info of {topic}"), error))
            }
        }
    }

    pub(crate) fn forget_stream(&self, topic: &str) {
        let mut ensured = self
            .ensured
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        ensured.remove(topic);
        ensured.remove(&format!("{topic}\u{0}published"));
    }

    /// The durable pull consumer's configuration for `group` on `topic`.
    pub(crate) fn consumer_config(
        &self,
        durable: &str,
        topic: &str,
        deliver_policy: consumer::DeliverPolicy,
    ) -> consumer::pull::Config {
        let backoff = self.config.backoff_list();
        consumer::pull::Config {
            durable_name: Some(durable.to_owned()),
            deliver_policy,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: backoff[0],
            // NATS 2.9 refuses "unlimited" (-1) beside a BackOff list (max
            // deliver must exceed its length): a billion is unlimited enough.
            max_deliver: 1_000_000_000,
            backoff,
            filter_subject: self.subject(topic),
            max_ack_pending: self.config.max_ack_pending,
            ..Default::default()
        }
    }
}

impl NatsBus {
    /// Connects to `url` (`nats://[user:pass@]host:port[?options]`, see
    /// [`NatsConfig::from_url`]) and checks that JetStream is enabled.
    pub async fn connect(url: &str) -> Result<NatsBus, BusError> {
        NatsBus::connect_with(NatsConfig::from_url(url)?).await
    }

    /// Connects with a configuration built by hand.
    pub async fn connect_with(config: NatsConfig) -> Result<NatsBus, BusError> {
        let shown = config.display_url();
        if !config::valid_subject_part(&config.prefix) {
            return Err(BusError::Invalid(
                format!("NATS subject prefix {:?} is not a subject", config.prefix).into(),
            ));
        }
        let mut options = async_nats::ConnectOptions::new()
            .name("tandem")
            .connection_timeout(config.connect_timeout)
            .require_tls(config.tls);
        if let Some((user, pass)) = &config.user_password {
            options = options.user_and_password(user.clone(), pass.clone());
        }
        if let Some(token) = &config.token {
            options = options.token(token.clone());
        }
        if let Some(ca) = &config.tls_ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some(creds) = &config.creds {
            options = options.credentials_file(creds).await.map_err(|error| {
                BusError::Invalid(
                    format!("NATS credentials file {}: {error}", creds.display()).into(),
                )
            })?;
        }
        let address = format!(
            "{}://{}",
            if config.tls { "tls" } else { "nats" },
            config.server
        );
        let connect = options.connect(address);
        // The connect timeout covers one attempt; bound the whole call too.
        let client =
            match tokio::time::timeout(config.connect_timeout + Duration::from_secs(1), connect)
                .await
            {
                Ok(Ok(client)) => client,
                Ok(Err(error)) => {
                    return Err(BusError::Unavailable(
                        format!("NATS not reachable at {shown}: {error}").into(),
                    ))
                }
                Err(_) => {
                    return Err(BusError::Unavailable(
                        format!(
                            "NATS not reachable at {shown}: no connection within {:?}",
                            config.connect_timeout
                        )
                        .into(),
                    ))
                }
            };
        let jetstream = jetstream::new(client.clone());
        // A raw account-info request: async-nats's typed one does not parse
        // every server version's answer.
        let answer = tokio::time::timeout(
            config.connect_timeout,
            client.request("$JS.API.INFO", Bytes::new()),
        )
        .await
        .map_err(|_| BusError::Unavailable(format!("JetStream did not answer at {shown}").into()))?
        .map_err(|error| {
            BusError::Unavailable(format!("JetStream not available at {shown}: {error}").into())
        })?;
        let text = String::from_utf8_lossy(&answer.payload);
        if answer
            .status
            .is_some_and(|status| status != async_nats::StatusCode::OK)
            || text.contains("\"error\"")
        {
            return Err(BusError::Unavailable(
                format!("JetStream not available at {shown}: {text}").into(),
            ));
        }
        Ok(NatsBus {
            inner: Arc::new(Inner {
                client,
                jetstream,
                config,
                ensured: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &NatsConfig {
        &self.inner.config
    }

    /// The underlying connection, for tooling.
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// The name of the stream holding `topic`.
    pub fn stream_name(&self, topic: &str) -> String {
        self.inner.stream_name(topic)
    }

    /// The subject `topic`'s records are published on.
    pub fn subject(&self, topic: &str) -> String {
        self.inner.subject(topic)
    }

    /// Deletes every stream whose subjects are under this bus's prefix
    /// (with their consumers). For tests and scratch namespaces; returns how
    /// many were deleted.
    pub async fn delete_streams(&self) -> Result<usize, BusError> {
        use futures_util::TryStreamExt;
        let wanted = format!("{}.", self.inner.config.prefix);
        let names: Vec<String> = self
            .inner
            .jetstream
            .streams()
            .try_filter_map(|info| {
                let ours = info
                    .config
                    .subjects
                    .iter()
                    .any(|subject| subject.starts_with(&wanted));
                std::future::ready(Ok(ours.then(|| info.config.name.clone())))
            })
            .try_collect()
            .await
            .map_err(|error| self.inner.error("stream list", error))?;
        for name in &names {
            self.inner
                .jetstream
                .delete_stream(name)
                .await
                .map_err(|error| self.inner.error(&format!("delete stream {name}"), error))?;
        }
        self.inner
            .ensured
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
        Ok(names.len())
    }

    /// Headers of a record, and its `Nats-Msg-Id` if it has an identity.
    fn message_headers(record: &OutgoingRecord) -> (HeaderMap, Option<String>) {
        let mut headers = HeaderMap::new();
        headers.insert(KEY_HEADER, encode_key(&record.key).as_str());
        let Ok(envelope) = Envelope::decode(&record.payload) else {
            return (headers, None);
        };
        let id = envelope.id.to_string();
        headers.insert("ce-id", id.as_str());
        headers.insert("ce-specversion", "1.0");
        for (name, value) in [
            ("ce-type", &envelope.event_type),
            ("ce-source", &envelope.source),
            ("ce-subject", &envelope.subject),
        ] {
            if header_safe(value) {
                headers.insert(name, value.as_str());
            }
        }
        (headers, Some(id))
    }
}

#[async_trait::async_trait]
impl Bus for NatsBus {
    fn shares_partitions(&self) -> bool {
        true
    }

    fn redelivery_delay_max(&self) -> std::time::Duration {
        let config = &self.inner.config;
        config
            .backoff
            .iter()
            .copied()
            .fold(config.ack_wait, std::cmp::max)
    }

    async fn publish(&self, records: &[OutgoingRecord]) -> Result<(), BusError> {
        self.enqueue(records.to_vec()).await?.await
    }

    /// Sends every record on the bus's one connection (so the server
    /// stores them in the order of the calls) and returns their
    /// acknowledgements to await.
    async fn enqueue(
        &self,
        records: Vec<OutgoingRecord>,
    ) -> Result<tandem::bus::Acknowledgements, BusError> {
        if records.is_empty() {
            return Ok(Box::pin(std::future::ready(Ok(()))));
        }
        let mut topics: Vec<&str> = Vec::new();
        for record in &records {
            Inner::check_topic(&record.topic)?;
            if !topics.contains(&record.topic.as_str()) {
                topics.push(&record.topic);
            }
        }
        for topic in &topics {
            self.inner.ensure_stream(topic, true).await?;
        }
        let mut acks = Vec::with_capacity(records.len());
        for record in &records {
            let (headers, id) = Self::message_headers(record);
            let mut publish = PublishMessage::build()
                .payload(Bytes::from(record.payload.clone()))
                .headers(headers);
            if let Some(id) = id {
                publish = publish.message_id(id);
            }
            let ack = self
                .inner
                .jetstream
                .send_publish(self.inner.subject(&record.topic), publish)
                .await
                .map_err(|error| self.inner.error("publish", error))?;
            acks.push((record.topic.clone(), ack));
        }
        let inner = Arc::clone(&self.inner);
        Ok(Box::pin(async move {
            let mut failure = None;
            for (topic, ack) in acks {
                if let Err(error) = ack.await {
                    if error.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
                        // Deleted behind our back: create it again next time.
                        inner.forget_stream(&topic);
                    }
                    if failure.is_none() {
                        failure = Some(inner.error("publish ack", error));
                    }
                }
            }
            match failure {
                Some(error) => Err(error),
                None => Ok(()),
            }
        }))
    }

    fn publish_depth(&self) -> usize {
        self.inner.config.publish_depth
    }

    async fn subscribe(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<Box<dyn Subscription>, BusError> {
        if topics.is_empty() {
            return Err(BusError::Invalid(
                format!("group {group} names no topic").into(),
            ));
        }
        if group.is_empty() {
            return Err(BusError::Invalid("group must not be empty".into()));
        }
        for topic in topics {
            Inner::check_topic(topic)?;
            self.inner.ensure_stream(topic, false).await?;
        }
        let mut subscription =
            NatsSubscription::new(Arc::clone(&self.inner), group, topics.to_vec());
        subscription.start().await?;
        Ok(Box::new(subscription))
    }

    async fn end_offsets(&self, topic: &str) -> Result<Vec<(u32, u64)>, BusError> {
        Inner::check_topic(topic)?;
        let name = self.inner.stream_name(topic);
        match self.inner.jetstream.get_stream(&name).await {
            Ok(stream) => Ok(vec![(0, stream.cached_info().state.last_sequence)]),
            Err(error) => {
                if let jetstream::context::GetStreamErrorKind::JetStream(inner) = error.kind() {
                    if inner.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND {
                        return Ok(vec![(0, 0)]);
                    }
                }
                Err(self.inner.error(&format!("stream info of {topic}"), error))
            }
        }
    }

    /// `[(0, first_sequence - 1)]`: the first offset the stream still
    /// holds (its last sequence when retention emptied it).
    async fn start_offsets(&self, topic: &str) -> Result<Vec<(u32, u64)>, BusError> {
        Inner::check_topic(topic)?;
        Ok(vec![(0, self.inner.start_offset(topic).await?)])
    }

    /// The stream's message `offset + 1`, by a direct request to the
    /// stream leader.
    async fn payload_at(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<Option<Vec<u8>>, BusError> {
        Inner::check_topic(topic)?;
        if partition != 0 {
            return Ok(None);
        }
        let name = self.inner.stream_name(topic);
        let stream = match self.inner.jetstream.get_stream_no_info(&name).await {
            Ok(stream) => stream,
            Err(error) => return Err(self.inner.error(&format!("stream of {topic}"), error)),
        };
        match stream.get_raw_message(offset + 1).await {
            Ok(message) => Ok(Some(message.payload.to_vec())),
            Err(error)
                if matches!(
                    error.kind(),
                    jetstream::stream::LastRawMessageErrorKind::NoMessageFound
                ) =>
            {
                Ok(None)
            }
            Err(error) => Err(self
                .inner
                .error(&format!("record {offset} of {topic}"), error)),
        }
    }

    /// Deletes the group's durable on each topic's stream; one already
    /// gone (or a stream never made) is fine.
    async fn forget_group(&self, group: &str, topics: &[String]) -> Result<(), BusError> {
        let durable = sanitise(group);
        for topic in topics {
            Inner::check_topic(topic)?;
            let name = self.inner.stream_name(topic);
            let stream = match self.inner.jetstream.get_stream_no_info(&name).await {
                Ok(stream) => stream,
                Err(error) => return Err(self.inner.error(&format!("stream of {topic}"), error)),
            };
            if let Err(error) = stream.delete_consumer(&durable).await {
                if let jetstream::stream::ConsumerErrorKind::JetStream(inner) = error.kind() {
                    if [
                        jetstream::ErrorCode::CONSUMER_NOT_FOUND,
                        jetstream::ErrorCode::STREAM_NOT_FOUND,
                    ]
                    .contains(&inner.error_code())
                    {
                        continue;
                    }
                }
                return Err(self
                    .inner
                    .error(&format!("durable {durable} of {topic}"), error));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitised_and_distinct() {
        assert_eq!(sanitise("tandem_order"), "tandem_order");
        let dotted = sanitise("a.b");
        assert!(dotted.starts_with("a_b_"));
        assert_ne!(dotted, sanitise("a_b"));
        assert_ne!(sanitise("a.b"), sanitise("a*b"));
    }

    #[test]
    fn keys_round_trip() {
        for key in ["plain-key", "with space", "per%cent", "ünï\r\n", ""] {
            let encoded = encode_key(key);
            assert!(encoded.bytes().all(|b| (0x21..=0x7e).contains(&b)));
            assert_eq!(decode_key(&encoded), key);
        }
    }
}
