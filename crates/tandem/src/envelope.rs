//! The wire format: CloudEvents 1.0 in JSON structured mode, with Tandem's
//! extensions (`partitionkey`, `sequence`, `traceparent`, `correlationid`,
//! `causationid`, and `snapshot` on a snapshot event).
//!
//! Encoding goes through [`Envelope::to_json`]; decoding through
//! [`Envelope::decode`], which is strict (every required attribute present and
//! well-formed) and total (any byte string either decodes or yields a
//! [`DecodeError`] naming the attribute at fault; it never panics).
//! Unknown extension attributes are ignored, as CloudEvents requires.

use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

/// The only CloudEvents version Tandem speaks.
pub const SPEC_VERSION: &str = "1.0";
/// The only content type Tandem writes and accepts.
pub const CONTENT_TYPE: &str = "application/json";

/// A typed event payload: a versioned contract between services.
///
/// `TYPE` is the CloudEvents `type` (plain names such as `CustomerUpdated`),
/// `SCHEMA` the `dataschema` naming the payload's schema and its version:
/// a stem and `/v{N}`, as in `tandem:order/OrderPlaced/v2`. A type is the
/// current version of its contract; events are published in it.
///
/// A reader of an older version still on the log goes through
/// [`EventPayload::upcast`], which a contract with more than one version
/// implements in one place (its contracts crate), so that handlers only
/// ever see the current type. [`Envelope::payload`] refuses a version the
/// type neither is nor upcasts from, naming it: such an event is parked,
/// never read as something it is not.
pub trait EventPayload: Serialize + DeserializeOwned {
    /// The CloudEvents `type` events of this payload carry.
    const TYPE: &'static str;
    /// The `dataschema` of the current version: a stem and `/v{N}`.
    const SCHEMA: &'static str;
    /// The older versions (the `N` of `/vN`) that [`EventPayload::upcast`]
    /// reads; none by default.
    const UPCASTS_FROM: &'static [u32] = &[];

    /// Reads `data`, written under version `version` of this contract (one
    /// of [`EventPayload::UPCASTS_FROM`]), as the current type.
    fn upcast(version: u32, data: &Value) -> Result<Self, serde_json::Error> {
        let _ = data;
        Err(serde::de::Error::custom(format!(
            "{} has no upcast from v{version}",
            Self::TYPE
        )))
    }
}

/// Splits a `dataschema` into its stem and version: `tandem:order/OrderPlaced/v2`
/// is (`tandem:order/OrderPlaced`, 2). `None` when it does not end in `/v{N}`.
pub fn schema_version(dataschema: &str) -> Option<(&str, u32)> {
    let (stem, version) = dataschema.rsplit_once("/v")?;
    if version.is_empty() || !version.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    Some((stem, version.parse().ok()?))
}

/// One event as it travels on the bus.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The event's own id, unique to it: a time-ordered UUID (v7) when
    /// Tandem appends it.
    pub id: Uuid,
    /// The publishing service (also the topic it is published on).
    pub source: String,
    /// The CloudEvents `type`, such as `OrderPlaced`: which contract the
    /// payload follows.
    pub event_type: String,
    /// The aggregate id; also the partition key.
    pub subject: String,
    /// When the event was appended (a snapshot event: when it was made),
    /// written in RFC 3339, UTC.
    pub time: OffsetDateTime,
    /// The payload's schema and version, such as
    /// `tandem:order/OrderPlaced/v2` (see [`EventPayload`]).
    pub dataschema: String,
    /// The payload, a JSON object ([`Envelope::decode`] refuses anything
    /// else). Read it typed with [`Envelope::payload`].
    pub data: Value,
    /// Per-aggregate, gap-free, from 1.
    pub sequence: u64,
    /// The W3C trace context of the span that appended it, if that was
    /// traced.
    pub traceparent: Option<String>,
    /// An id shared by the events of one piece of business (see
    /// [`crate::EventContext`]).
    pub correlationid: Option<String>,
    /// The id of the event that caused this one.
    pub causationid: Option<String>,
    /// A snapshot event (extension attribute `snapshot: true`, written
    /// only when set): the aggregate's whole state at `sequence`, which
    /// replaces what a consumer holds when it is newer, even across a gap
    /// (see [`crate::republish`]).
    pub snapshot: bool,
}

/// Why a byte string is not a valid envelope. `field` names the attribute at
/// fault (`"$"` for the document as a whole).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid event envelope: {field}: {reason}")]
pub struct DecodeError {
    /// The attribute at fault, as named on the wire (`type`, `sequence`,
    /// ...), or `"$"`.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl DecodeError {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// Why a payload could not be read as the expected type.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// The event is of another type than the one asked for.
    #[error("event type is {actual}, expected {expected}")]
    WrongType {
        /// The type asked for ([`EventPayload::TYPE`]).
        expected: &'static str,
        /// The event's type.
        actual: String,
    },
    /// The payload is of the right type and a version this reader reads,
    /// but does not deserialise as it (or its upcast failed).
    #[error("payload of {event_type} does not match its contract: {source}")]
    Invalid {
        /// The event's type.
        event_type: String,
        /// What serde found wrong.
        #[source]
        source: serde_json::Error,
    },
    /// A version of the contract this reader does not know (a newer one,
    /// or an old one it no longer upcasts), or another contract's schema.
    #[error("payload of {event_type} is in schema {dataschema}, which this reader does not read (it reads {reads})")]
    UnknownVersion {
        /// The event's type.
        event_type: String,
        /// The `dataschema` the event names.
        dataschema: String,
        /// The versions it reads, such as `tandem:order/OrderPlaced/v2, v1`.
        reads: String,
    },
}

impl Envelope {
    /// Serialises the envelope as one CloudEvents JSON object.
    pub fn to_json(&self) -> Vec<u8> {
        let mut id_buffer = Uuid::encode_buffer();
        let id = self.id.hyphenated().encode_lower(&mut id_buffer);
        let time = format_time(self.time);
        let wire = WireOut {
            specversion: SPEC_VERSION,
            id,
            source: &self.source,
            event_type: &self.event_type,
            subject: &self.subject,
            time: &time,
            datacontenttype: CONTENT_TYPE,
            dataschema: &self.dataschema,
            partitionkey: &self.subject,
            sequence: self.sequence,
            traceparent: self.traceparent.as_deref(),
            correlationid: self.correlationid.as_deref(),
            causationid: self.causationid.as_deref(),
            snapshot: self.snapshot,
            data: &self.data,
        };
        serde_json::to_vec(&wire).expect("an envelope always serialises")
    }

    /// Decodes one envelope; strict and total (see the module docs).
    pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        // Structured mode is a JSON object; serde's derive would also take
        // an array of the attribute values in field order.
        let first = bytes.iter().find(|byte| !byte.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err(
                match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                    Ok(_) => DecodeError::new("$", "not a JSON object"),
                    Err(error) => DecodeError::new("$", format!("not JSON: {error}")),
                },
            );
        }
        match Self::decode_well_formed(bytes) {
            Some(envelope) => Ok(envelope),
            None => Self::decode_each_attribute(bytes),
        }
    }

    /// Judges a JSON object attribute by attribute, naming the first one
    /// at fault.
    fn decode_each_attribute(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        let wire: WireIn<'_> = match serde_json::from_slice(bytes) {
            Ok(wire) => wire,
            Err(error) => {
                // Tell "not JSON" from "JSON, but not an object".
                return Err(
                    match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                        Ok(_) => {
                            DecodeError::new("$", format!("not a CloudEvents JSON object: {error}"))
                        }
                        Err(_) => DecodeError::new("$", format!("not JSON: {error}")),
                    },
                );
            }
        };
        let specversion = required_string(wire.specversion, "specversion")?;
        if specversion != SPEC_VERSION {
            return Err(DecodeError::new(
                "specversion",
                format!("unsupported version {specversion:?}, expected \"1.0\""),
            ));
        }
        let id = required_string(wire.id, "id")?;
        let id = Uuid::parse_str(&id)
            .map_err(|error| DecodeError::new("id", format!("not a UUID: {error}")))?;
        let source = non_empty(wire.source, "source")?;
        let event_type = non_empty(wire.event_type, "type")?;
        let subject = non_empty(wire.subject, "subject")?;
        let time = required_string(wire.time, "time")?;
        let time = OffsetDateTime::parse(&time, &Rfc3339)
            .map_err(|error| DecodeError::new("time", format!("not RFC 3339: {error}")))?;
        let content_type = required_string(wire.datacontenttype, "datacontenttype")?;
        if content_type != CONTENT_TYPE {
            return Err(DecodeError::new(
                "datacontenttype",
                format!("unsupported content type {content_type:?}, expected \"{CONTENT_TYPE}\""),
            ));
        }
        let dataschema = non_empty(wire.dataschema, "dataschema")?;
        let partitionkey = required_string(wire.partitionkey, "partitionkey")?;
        if partitionkey != subject {
            return Err(DecodeError::new(
                "partitionkey",
                "must equal subject (the aggregate id)",
            ));
        }
        let sequence = match wire.sequence {
            None => return Err(DecodeError::new("sequence", "missing")),
            Some(raw) => match serde_json::from_str::<u64>(raw.get()) {
                Ok(sequence) if (1..=MAX_SEQUENCE).contains(&sequence) => sequence,
                _ => {
                    return Err(DecodeError::new(
                        "sequence",
                        "must be an integer from 1 to 9223372036854775807",
                    ))
                }
            },
        };
        let traceparent = optional_string(wire.traceparent, "traceparent")?;
        let correlationid = optional_string(wire.correlationid, "correlationid")?;
        let causationid = optional_string(wire.causationid, "causationid")?;
        let snapshot = match wire.snapshot.map(RawValue::get) {
            None | Some("null") | Some("false") => false,
            Some("true") => true,
            Some(_) => return Err(DecodeError::new("snapshot", "must be true or false")),
        };
        let data = wire
            .data
            .ok_or_else(|| DecodeError::new("data", "missing"))?;
        if !data.get().starts_with('{') {
            return Err(DecodeError::new("data", "must be a JSON object"));
        }
        let data: Value = serde_json::from_str(data.get())
            .map_err(|error| DecodeError::new("data", format!("not JSON: {error}")))?;
        Ok(Envelope {
            id,
            source: source.into_owned(),
            event_type: event_type.into_owned(),
            subject: subject.into_owned(),
            time,
            dataschema: dataschema.into_owned(),
            data,
            sequence,
            traceparent,
            correlationid,
            causationid,
            snapshot,
        })
    }

    /// The common case in one pass: a JSON object whose attributes are all
    /// present, well-formed and free of escapes. `None` for anything else,
    /// which [`Envelope::decode`] then examines attribute by attribute to
    /// name the one at fault; this never accepts what that would refuse.
    fn decode_well_formed(bytes: &[u8]) -> Option<Envelope> {
        let wire: WireFast<'_> = serde_json::from_slice(bytes).ok()?;
        fn non_empty(text: Option<&str>) -> Option<&str> {
            text.filter(|text| !text.is_empty())
        }
        if wire.specversion? != SPEC_VERSION || wire.datacontenttype? != CONTENT_TYPE {
            return None;
        }
        let subject = non_empty(wire.subject)?;
        if wire.partitionkey? != subject {
            return None;
        }
        let sequence = wire
            .sequence
            .filter(|sequence| (1..=MAX_SEQUENCE).contains(sequence))?;
        let data = wire.data.filter(Value::is_object)?;
        Some(Envelope {
            id: Uuid::parse_str(wire.id?).ok()?,
            source: non_empty(wire.source)?.to_owned(),
            event_type: non_empty(wire.event_type)?.to_owned(),
            subject: subject.to_owned(),
            time: OffsetDateTime::parse(wire.time?, &Rfc3339).ok()?,
            dataschema: non_empty(wire.dataschema)?.to_owned(),
            data,
            sequence,
            traceparent: wire.traceparent.map(str::to_owned),
            correlationid: wire.correlationid.map(str::to_owned),
            causationid: wire.causationid.map(str::to_owned),
            snapshot: wire.snapshot.unwrap_or(false),
        })
    }

    /// Reads the payload as `T`, checking the event type first, then the
    /// version its `dataschema` names: `T`'s own, or one `T` upcasts from
    /// (see [`EventPayload`]); any other is [`PayloadError::UnknownVersion`].
    /// Unknown fields in the payload are ignored (tolerant reader).
    pub fn payload<T: EventPayload>(&self) -> Result<T, PayloadError> {
        if self.event_type != T::TYPE {
            return Err(PayloadError::WrongType {
                expected: T::TYPE,
                actual: self.event_type.clone(),
            });
        }
        let invalid = |source| PayloadError::Invalid {
            event_type: self.event_type.clone(),
            source,
        };
        if self.dataschema == T::SCHEMA {
            return T::deserialize(&self.data).map_err(invalid);
        }
        match (schema_version(&self.dataschema), schema_version(T::SCHEMA)) {
            (Some((stem, version)), Some((current_stem, _)))
                if stem == current_stem && T::UPCASTS_FROM.contains(&version) =>
            {
                T::upcast(version, &self.data).map_err(invalid)
            }
            _ => {
                let mut reads = T::SCHEMA.to_owned();
                for version in T::UPCASTS_FROM {
                    reads.push_str(&format!(", v{version}"));
                }
                Err(PayloadError::UnknownVersion {
                    event_type: self.event_type.clone(),
                    dataschema: self.dataschema.clone(),
                    reads,
                })
            }
        }
    }
}

/// A new event id: a UUIDv7 (time-ordered), its 74 random bits from a
/// thread-local generator seeded by the OS, so minting one costs no system
/// call (`Uuid::now_v7` asks the kernel for randomness every time).
pub fn new_event_id() -> Uuid {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64);
    let mut random = [0u8; 10];
    fastrand::fill(&mut random);
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

/// RFC 3339 with UTC offset, as CloudEvents requires.
pub fn format_time(time: OffsetDateTime) -> String {
    time.format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

/// The envelope as [`Envelope::decode_well_formed`] takes it: strings
/// borrowed from the input (one with an escape fails here and goes the
/// attribute-by-attribute way), `null` as absent, as in [`WireIn`].
#[derive(serde::Deserialize)]
struct WireFast<'a> {
    specversion: Option<&'a str>,
    id: Option<&'a str>,
    source: Option<&'a str>,
    #[serde(rename = "type")]
    event_type: Option<&'a str>,
    subject: Option<&'a str>,
    time: Option<&'a str>,
    datacontenttype: Option<&'a str>,
    dataschema: Option<&'a str>,
    partitionkey: Option<&'a str>,
    sequence: Option<u64>,
    traceparent: Option<&'a str>,
    correlationid: Option<&'a str>,
    causationid: Option<&'a str>,
    snapshot: Option<bool>,
    data: Option<Value>,
}

/// The wire shape written by [`Envelope::to_json`].
#[derive(serde::Serialize)]
struct WireOut<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    subject: &'a str,
    time: &'a str,
    datacontenttype: &'static str,
    dataschema: &'a str,
    partitionkey: &'a str,
    sequence: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlationid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    causationid: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    snapshot: bool,
    data: &'a Value,
}

/// The wire shape read by [`Envelope::decode`]: every attribute as its raw
/// JSON text, so any value type is accepted here and judged per attribute
/// below, with an error that names it. Unknown attributes are skipped.
#[derive(serde::Deserialize)]
struct WireIn<'a> {
    #[serde(borrow)]
    specversion: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    source: Option<&'a RawValue>,
    #[serde(borrow, rename = "type")]
    event_type: Option<&'a RawValue>,
    #[serde(borrow)]
    subject: Option<&'a RawValue>,
    #[serde(borrow)]
    time: Option<&'a RawValue>,
    #[serde(borrow)]
    datacontenttype: Option<&'a RawValue>,
    #[serde(borrow)]
    dataschema: Option<&'a RawValue>,
    #[serde(borrow)]
    partitionkey: Option<&'a RawValue>,
    #[serde(borrow)]
    sequence: Option<&'a RawValue>,
    #[serde(borrow)]
    traceparent: Option<&'a RawValue>,
    #[serde(borrow)]
    correlationid: Option<&'a RawValue>,
    #[serde(borrow)]
    causationid: Option<&'a RawValue>,
    #[serde(borrow)]
    snapshot: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// A JSON string attribute; `null` counts as missing.
fn string_of<'a>(
    raw: Option<&'a RawValue>,
    field: &'static str,
) -> Result<Option<Cow<'a, str>>, DecodeError> {
    let Some(raw) = raw else { return Ok(None) };
    if raw.get() == "null" {
        return Ok(None);
    }
    if !raw.get().starts_with('"') {
        return Err(DecodeError::new(field, "must be a string"));
    }
    // Borrow when the string has no escapes, else unescape into a copy.
    match serde_json::from_str::<&'a str>(raw.get()) {
        Ok(text) => Ok(Some(Cow::Borrowed(text))),
        Err(_) => serde_json::from_str::<String>(raw.get())
            .map(|text| Some(Cow::Owned(text)))
            .map_err(|_| DecodeError::new(field, "must be a string")),
    }
}

fn required_string<'a>(
    raw: Option<&'a RawValue>,
    field: &'static str,
) -> Result<Cow<'a, str>, DecodeError> {
    string_of(raw, field)?.ok_or_else(|| DecodeError::new(field, "missing"))
}

fn non_empty<'a>(
    raw: Option<&'a RawValue>,
    field: &'static str,
) -> Result<Cow<'a, str>, DecodeError> {
    let text = required_string(raw, field)?;
    if text.is_empty() {
        return Err(DecodeError::new(field, "must not be empty"));
    }
    Ok(text)
}

fn optional_string(
    raw: Option<&RawValue>,
    field: &'static str,
) -> Result<Option<String>, DecodeError> {
    Ok(string_of(raw, field)?.map(Cow::into_owned))
}

/// The largest `sequence` an envelope may carry: every store keeps
/// sequences as signed 64-bit integers, so a larger one could not be
/// recorded (SQLite would store it as a float, and every later read of the
/// aggregate's state would fail).
pub const MAX_SEQUENCE: u64 = i64::MAX as u64;

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Envelope {
        Envelope {
            id: Uuid::now_v7(),
            source: "customer".into(),
            event_type: "CustomerUpdated".into(),
            subject: "1234".into(),
            time: OffsetDateTime::parse("2025-05-11T12:30:00Z", &Rfc3339).unwrap(),
            dataschema: "tandem:customer/CustomerUpdated/v1".into(),
            data: serde_json::json!({"customerId": "1234", "address": "123 New Road"}),
            sequence: 2,
            traceparent: None,
            correlationid: Some("c-1".into()),
            causationid: None,
            snapshot: false,
        }
    }

    /// Version 2 of a contract whose v1 had `address` as one string.
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Moved {
        customer_id: String,
        lines: Vec<String>,
    }

    impl EventPayload for Moved {
        const TYPE: &'static str = "CustomerUpdated";
        const SCHEMA: &'static str = "tandem:customer/CustomerUpdated/v2";
        const UPCASTS_FROM: &'static [u32] = &[1];

        fn upcast(version: u32, data: &Value) -> Result<Self, serde_json::Error> {
            use serde::Deserialize;
            assert_eq!(version, 1);
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct V1 {
                customer_id: String,
                address: String,
            }
            let old = V1::deserialize(data)?;
            Ok(Moved {
                customer_id: old.customer_id,
                lines: vec![old.address],
            })
        }
    }

    #[test]
    fn reads_its_own_version_upcasts_older_ones_and_refuses_the_rest() {
        assert_eq!(
            schema_version("tandem:order/OrderPlaced/v12"),
            Some(("tandem:order/OrderPlaced", 12))
        );
        assert_eq!(schema_version("tandem:order/OrderPlaced/v"), None);
        assert_eq!(schema_version("urn:test:deposited:1"), None);

        let mut envelope = sample();
        let upcast: Moved = envelope.payload().unwrap();
        assert_eq!(upcast.lines, ["123 New Road"]);

        envelope.dataschema = Moved::SCHEMA.into();
        envelope.data = serde_json::json!({"customerId": "1234", "lines": ["a", "b"]});
        assert_eq!(envelope.payload::<Moved>().unwrap().lines, ["a", "b"]);

        for unknown in [
            "tandem:customer/CustomerUpdated/v3",
            "tandem:other/CustomerUpdated/v1",
            "urn:test:customer-updated:1",
        ] {
            envelope.dataschema = unknown.into();
            let error = envelope.payload::<Moved>().unwrap_err();
            assert!(
                matches!(error, PayloadError::UnknownVersion { .. })
                    && error.to_string().contains(unknown)
                    && error
                        .to_string()
                        .contains("it reads tandem:customer/CustomerUpdated/v2, v1"),
                "{unknown}: {error}"
            );
        }
    }

    #[test]
    fn round_trips() {
        let envelope = sample();
        let decoded = Envelope::decode(&envelope.to_json()).unwrap();
        assert_eq!(decoded, envelope);
    }

    #[test]
    fn names_the_field_at_fault() {
        let mut value: Value = serde_json::from_slice(&sample().to_json()).unwrap();
        value["sequence"] = Value::from(0);
        let error = Envelope::decode(&serde_json::to_vec(&value).unwrap()).unwrap_err();
        assert_eq!(error.field, "sequence");

        for too_large in [i64::MAX as u64 + 1, u64::MAX] {
            value["sequence"] = Value::from(too_large);
            let error = Envelope::decode(&serde_json::to_vec(&value).unwrap()).unwrap_err();
            assert_eq!(error.field, "sequence", "sequence {too_large}");
        }
        value["sequence"] = Value::from(i64::MAX as u64);
        assert_eq!(
            Envelope::decode(&serde_json::to_vec(&value).unwrap())
                .unwrap()
                .sequence,
            i64::MAX as u64
        );

        value["sequence"] = Value::from(3);
        value.as_object_mut().unwrap().remove("time");
        let error = Envelope::decode(&serde_json::to_vec(&value).unwrap()).unwrap_err();
        assert_eq!(error.field, "time");

        value["time"] = "yesterday".into();
        let error = Envelope::decode(&serde_json::to_vec(&value).unwrap()).unwrap_err();
        assert_eq!(error.field, "time");

        let error = Envelope::decode(b"[1,2]").unwrap_err();
        assert_eq!(error.field, "$");
    }

    #[test]
    fn ignores_unknown_extensions() {
        let mut value: Value = serde_json::from_slice(&sample().to_json()).unwrap();
        value["someextension"] = "x".into();
        assert_eq!(
            Envelope::decode(&serde_json::to_vec(&value).unwrap()).unwrap(),
            sample_with_id(&value)
        );
    }

    fn sample_with_id(value: &Value) -> Envelope {
        let mut envelope = sample();
        envelope.id = Uuid::parse_str(value["id"].as_str().unwrap()).unwrap();
        envelope
    }

    /// The one-pass decoder agrees with the attribute-by-attribute one on
    /// everything it accepts, over valid envelopes with up to two
    /// attributes absent, null, empty, of the wrong type or escaped.
    mod one_pass {
        use super::super::Envelope;
        use proptest::prelude::*;
        use serde_json::{json, Map, Value};

        /// A replacement for a valid attribute: absent (`None`), null,
        /// empty, a number, an array, or the valid text with an escape.
        fn replacement(valid: &Value, choice: usize) -> Option<Value> {
            match choice {
                0 => None,
                1 => Some(Value::Null),
                2 => Some(json!("")),
                3 => Some(json!(0)),
                4 => Some(json!([1])),
                _ => Some(match valid {
                    Value::String(text) => Value::String(format!("{text}\n")),
                    other => other.clone(),
                }),
            }
        }

        /// A valid envelope with up to two attributes replaced.
        fn envelope() -> impl Strategy<Value = String> {
            let change = (0..16usize, 0..6usize);
            (change.clone(), change).prop_map(|changes| {
                let valid = [
                    ("specversion", json!("1.0")),
                    ("id", json!("0192d3a4-5b6c-7d8e-9f00-112233445566")),
                    ("source", json!("ledger")),
                    ("type", json!("Deposited")),
                    ("subject", json!("acct-1")),
                    ("time", json!("2026-11-29T12:00:00.123456Z")),
                    ("datacontenttype", json!("application/json")),
                    ("dataschema", json!("urn:ledger:deposited:1")),
                    ("partitionkey", json!("acct-1")),
                    ("sequence", json!(3)),
                    (
                        "traceparent",
                        json!("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                    ),
                    ("correlationid", json!("c-1")),
                    ("causationid", json!("e-0")),
                    ("data", json!({"accountId": "acct-1", "amountCents": 5})),
                ];
                let mut object = Map::new();
                for (index, (name, value)) in valid.iter().enumerate() {
                    let value = [changes.0, changes.1]
                        .into_iter()
                        .find(|(field, _)| *field == index)
                        .map_or(Some(value.clone()), |(_, choice)| {
                            replacement(value, choice)
                        });
                    if let Some(value) = value {
                        object.insert((*name).to_owned(), value);
                    }
                }
                Value::Object(object).to_string()
            })
        }

        proptest! {
            #[test]
            fn accepts_only_what_the_attribute_by_attribute_decoder_accepts(text in envelope()) {
                let slow = Envelope::decode_each_attribute(text.as_bytes());
                if let Some(fast) = Envelope::decode_well_formed(text.as_bytes()) {
                    prop_assert_eq!(Some(&fast), slow.as_ref().ok(), "{}", text);
                }
                prop_assert_eq!(
                    Envelope::decode(text.as_bytes()).map_err(|error| error.to_string()),
                    slow.map_err(|error| error.to_string())
                );
            }
        }

        #[test]
        fn takes_the_envelopes_the_toolkit_writes() {
            let bytes = super::sample().to_json();
            assert!(Envelope::decode_well_formed(&bytes).is_some());
        }
    }
}
