//! The wire format: CloudEvents 1.0 in JSON structured mode, with Tandem's
//! extensions (`partitionkey`, `sequence`, `traceparent`, `correlationid`,
//! `causationid`).
//!
//! Encoding goes through [`Envelope::to_json`]; decoding through
//! [`Envelope::decode`], which is strict (every required attribute present and
//! well-formed) and total (any byte string either decodes or yields a
//! [`DecodeError`] naming the attribute at fault; it never panics).
//! Unknown extension attributes are ignored, as CloudEvents requires.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
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
/// `SCHEMA` the `dataschema` naming the payload's schema and its version.
pub trait EventPayload: Serialize + DeserializeOwned {
    const TYPE: &'static str;
    const SCHEMA: &'static str;
}

/// One event as it travels on the bus.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub id: Uuid,
    /// The publishing service (also the topic it is published on).
    pub source: String,
    pub event_type: String,
    /// The aggregate id; also the partition key.
    pub subject: String,
    pub time: OffsetDateTime,
    pub dataschema: String,
    pub data: Value,
    /// Per-aggregate, gap-free, from 1.
    pub sequence: u64,
    pub traceparent: Option<String>,
    pub correlationid: Option<String>,
    pub causationid: Option<String>,
}

/// Why a byte string is not a valid envelope. `field` names the attribute at
/// fault (`"$"` for the document as a whole).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid event envelope: {field}: {reason}")]
pub struct DecodeError {
    pub field: &'static str,
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
    #[error("event type is {actual}, expected {expected}")]
    WrongType {
        expected: &'static str,
        actual: String,
    },
    #[error("payload of {event_type} does not match its contract: {source}")]
    Invalid {
        event_type: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Envelope {
    /// Serialises the envelope as one CloudEvents JSON object.
    pub fn to_json(&self) -> Vec<u8> {
        let mut object = Map::with_capacity(14);
        object.insert("specversion".into(), SPEC_VERSION.into());
        object.insert("id".into(), self.id.to_string().into());
        object.insert("source".into(), self.source.clone().into());
        object.insert("type".into(), self.event_type.clone().into());
        object.insert("subject".into(), self.subject.clone().into());
        object.insert("time".into(), format_time(self.time).into());
        object.insert("datacontenttype".into(), CONTENT_TYPE.into());
        object.insert("dataschema".into(), self.dataschema.clone().into());
        object.insert("partitionkey".into(), self.subject.clone().into());
        object.insert("sequence".into(), self.sequence.into());
        for (name, value) in [
            ("traceparent", &self.traceparent),
            ("correlationid", &self.correlationid),
            ("causationid", &self.causationid),
        ] {
            if let Some(value) = value {
                object.insert(name.into(), value.clone().into());
            }
        }
        object.insert("data".into(), self.data.clone());
        serde_json::to_vec(&Value::Object(object)).expect("a JSON value always serialises")
    }

    /// Decodes one envelope; strict and total (see the module docs).
    pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|error| DecodeError::new("$", format!("not JSON: {error}")))?;
        let Value::Object(mut object) = value else {
            return Err(DecodeError::new("$", "not a JSON object"));
        };

        let specversion = required_string(&object, "specversion")?;
        if specversion != SPEC_VERSION {
            return Err(DecodeError::new(
                "specversion",
                format!("unsupported version {specversion:?}, expected \"1.0\""),
            ));
        }
        let id = required_string(&object, "id")?;
        let id = Uuid::parse_str(id)
            .map_err(|error| DecodeError::new("id", format!("not a UUID: {error}")))?;
        let source = non_empty(&object, "source")?.to_owned();
        let event_type = non_empty(&object, "type")?.to_owned();
        let subject = non_empty(&object, "subject")?.to_owned();
        let time = required_string(&object, "time")?;
        let time = OffsetDateTime::parse(time, &Rfc3339)
            .map_err(|error| DecodeError::new("time", format!("not RFC 3339: {error}")))?;
        let content_type = required_string(&object, "datacontenttype")?;
        if content_type != CONTENT_TYPE {
            return Err(DecodeError::new(
                "datacontenttype",
                format!("unsupported content type {content_type:?}, expected \"{CONTENT_TYPE}\""),
            ));
        }
        let dataschema = non_empty(&object, "dataschema")?.to_owned();
        let partitionkey = required_string(&object, "partitionkey")?;
        if partitionkey != subject {
            return Err(DecodeError::new(
                "partitionkey",
                "must equal subject (the aggregate id)",
            ));
        }
        let sequence = match object.get("sequence") {
            None => return Err(DecodeError::new("sequence", "missing")),
            Some(value) => match value.as_u64() {
                Some(sequence) if sequence >= 1 => sequence,
                _ => {
                    return Err(DecodeError::new(
                        "sequence",
                        "must be an integer of at least 1",
                    ))
                }
            },
        };
        let traceparent = optional_string(&object, "traceparent")?;
        let correlationid = optional_string(&object, "correlationid")?;
        let causationid = optional_string(&object, "causationid")?;
        let data = object
            .remove("data")
            .ok_or_else(|| DecodeError::new("data", "missing"))?;
        if !data.is_object() {
            return Err(DecodeError::new("data", "must be a JSON object"));
        }
        Ok(Envelope {
            id,
            source,
            event_type,
            subject,
            time,
            dataschema,
            data,
            sequence,
            traceparent,
            correlationid,
            causationid,
        })
    }

    /// Reads the payload as `T`, checking the event type first. Unknown
    /// fields in the payload are ignored (tolerant reader).
    pub fn payload<T: EventPayload>(&self) -> Result<T, PayloadError> {
        if self.event_type != T::TYPE {
            return Err(PayloadError::WrongType {
                expected: T::TYPE,
                actual: self.event_type.clone(),
            });
        }
        T::deserialize(&self.data).map_err(|source| PayloadError::Invalid {
            event_type: self.event_type.clone(),
            source,
        })
    }
}

/// RFC 3339 with UTC offset, as CloudEvents requires.
pub fn format_time(time: OffsetDateTime) -> String {
    time.format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

fn required_string<'a>(
    object: &'a Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, DecodeError> {
    match object.get(field) {
        None => Err(DecodeError::new(field, "missing")),
        Some(Value::String(text)) => Ok(text),
        Some(_) => Err(DecodeError::new(field, "must be a string")),
    }
}

fn non_empty<'a>(
    object: &'a Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, DecodeError> {
    let text = required_string(object, field)?;
    if text.is_empty() {
        return Err(DecodeError::new(field, "must not be empty"));
    }
    Ok(text)
}

fn optional_string(
    object: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, DecodeError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(DecodeError::new(field, "must be a string")),
    }
}

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
}
