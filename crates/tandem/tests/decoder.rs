//! `Envelope::decode` is total and strict: any byte string either decodes or
//! yields a `DecodeError` naming a known attribute (or `"$"` for the
//! document), it never panics, and valid envelopes round-trip through
//! `to_json`.

use proptest::prelude::*;
use serde_json::{Map, Value};
use tandem::{DecodeError, Envelope};
use time::OffsetDateTime;

/// Attributes a valid envelope must carry, in the order `decode` checks them.
const REQUIRED: [&str; 11] = [
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "partitionkey",
    "sequence",
    "data",
];

/// Optional string extensions.
const OPTIONAL: [&str; 3] = ["traceparent", "correlationid", "causationid"];

fn is_known_field(field: &str) -> bool {
    field == "$" || REQUIRED.contains(&field) || OPTIONAL.contains(&field)
}

/// Decodes without letting a panic escape unnoticed, and checks the error.
fn decode_checked(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    let result = std::panic::catch_unwind(|| Envelope::decode(bytes))
        .unwrap_or_else(|_| panic!("decode panicked on {:?}", String::from_utf8_lossy(bytes)));
    if let Err(error) = &result {
        assert!(
            is_known_field(error.field),
            "unknown field {:?} in {error} for {:?}",
            error.field,
            String::from_utf8_lossy(bytes)
        );
        assert!(!error.reason.is_empty(), "an error says why: {error:?}");
    }
    result
}

// ---------------------------------------------------------------------------
// Strategies.

/// Any JSON value, nested a few levels. Numbers are integers or floats that
/// print and parse exactly, so values compare equal after a round trip.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1_000_000i64..1_000_000).prop_map(|quarters| Value::from(quarters as f64 / 4.0)),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// A JSON value that is not a string (for string attributes).
fn non_string() -> impl Strategy<Value = Value> {
    json().prop_filter("not a string", |value| !value.is_string())
}

/// A JSON value that is not a number (for `sequence`).
fn non_number() -> impl Strategy<Value = Value> {
    json().prop_filter("not a number", |value| !value.is_number())
}

/// A JSON value that is not an object (for `data`).
fn non_object() -> impl Strategy<Value = Value> {
    json().prop_filter("not an object", |value| !value.is_object())
}

fn text() -> impl Strategy<Value = String> {
    // Any characters, control characters and quotes included.
    "(?s:.{1,24})"
}

fn time() -> impl Strategy<Value = OffsetDateTime> {
    // 1970 to 9999, RFC 3339's range, to the nanosecond.
    (0i64..253_402_300_799, 0u32..1_000_000_000).prop_map(|(seconds, nanos)| {
        OffsetDateTime::from_unix_timestamp(seconds).expect("in range")
            + time::Duration::nanoseconds(i64::from(nanos))
    })
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (
        any::<u128>(),
        (text(), text(), text(), text()),
        time(),
        prop::collection::btree_map(any::<String>(), json(), 0..5),
        1..=tandem::envelope::MAX_SEQUENCE,
        (
            prop::option::of(text()),
            prop::option::of(text()),
            prop::option::of(text()),
        ),
    )
        .prop_map(
            |(id, (source, event_type, subject, dataschema), time, data, sequence, context)| {
                Envelope {
                    id: uuid::Uuid::from_u128(id),
                    source,
                    event_type,
                    subject,
                    time,
                    dataschema,
                    data: Value::Object(data.into_iter().collect()),
                    sequence,
                    traceparent: context.0,
                    correlationid: context.1,
                    causationid: context.2,
                    snapshot: false,
                }
            },
        )
}

fn object_of(envelope: &Envelope) -> Map<String, Value> {
    match serde_json::from_slice(&envelope.to_json()).expect("to_json writes JSON") {
        Value::Object(map) => map,
        other => panic!("to_json must write an object, wrote {other}"),
    }
}

fn bytes_of(map: Map<String, Value>) -> Vec<u8> {
    serde_json::to_vec(&Value::Object(map)).expect("serialise")
}

/// A mutation of a valid envelope's JSON.
#[derive(Debug, Clone)]
enum Mutation {
    Remove(prop::sample::Index),
    Replace(prop::sample::Index, Value),
    Truncate(prop::sample::Index),
    Flip(prop::sample::Index, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Mutation::Remove),
        (any::<prop::sample::Index>(), json()).prop_map(|(at, value)| Mutation::Replace(at, value)),
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        (any::<prop::sample::Index>(), 1..=u8::MAX).prop_map(|(at, mask)| Mutation::Flip(at, mask)),
    ]
}

fn apply(envelope: &Envelope, mutation: &Mutation) -> Vec<u8> {
    let mut map = object_of(envelope);
    let keys: Vec<String> = map.keys().cloned().collect();
    match mutation {
        Mutation::Remove(at) => {
            map.remove(&keys[at.index(keys.len())]);
            bytes_of(map)
        }
        Mutation::Replace(at, value) => {
            map.insert(keys[at.index(keys.len())].clone(), value.clone());
            bytes_of(map)
        }
        Mutation::Truncate(at) => {
            let mut bytes = bytes_of(map);
            bytes.truncate(at.index(bytes.len()));
            bytes
        }
        Mutation::Flip(at, mask) => {
            let mut bytes = bytes_of(map);
            let place = at.index(bytes.len());
            bytes[place] ^= mask;
            bytes
        }
    }
}

// ---------------------------------------------------------------------------
// Properties.

// Totality: nothing panics, every error names a known attribute.
proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in any::<Vec<u8>>()) {
        let result = decode_checked(&bytes);
        // Random bytes are never a valid envelope.
        prop_assert!(result.is_err());
    }

    #[test]
    fn arbitrary_json_never_panics(value in json()) {
        let bytes = serde_json::to_vec(&value).unwrap();
        let result = decode_checked(&bytes);
        prop_assert!(result.is_err(), "random JSON decoded: {:?}", result);
    }

    /// Objects made of the envelope's own attribute names with random values
    /// reach every attribute's checks.
    #[test]
    fn objects_of_known_attributes_never_panic(
        attributes in prop::collection::btree_map(
            prop::sample::select(
                REQUIRED.iter().chain(OPTIONAL.iter()).copied().collect::<Vec<_>>()
            ),
            json(),
            0..14,
        )
    ) {
        let map: Map<String, Value> = attributes
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect();
        let missing: Vec<&str> = REQUIRED
            .iter()
            .copied()
            .filter(|name| !map.contains_key(*name))
            .collect();
        let result = decode_checked(&bytes_of(map));
        if !missing.is_empty() {
            prop_assert!(result.is_err(), "decoded without {:?}", missing);
        }
    }

    #[test]
    fn mutated_envelopes_never_panic(envelope in envelope(), mutation in mutation()) {
        let bytes = apply(&envelope, &mutation);
        let result = decode_checked(&bytes);
        if let Mutation::Truncate(_) = mutation {
            // A proper prefix of a JSON object is not JSON.
            let error = result.expect_err("a truncated envelope must not decode");
            prop_assert_eq!(error.field, "$");
        }
    }
}

// The properties of valid envelopes and single-attribute changes.
proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn valid_envelopes_round_trip(envelope in envelope()) {
        let decoded = decode_checked(&envelope.to_json());
        prop_assert_eq!(decoded, Ok(envelope));
    }

    /// Insignificant whitespace (a pretty-printed envelope) changes nothing.
    #[test]
    fn whitespace_between_tokens_is_insignificant(envelope in envelope()) {
        let value = Value::Object(object_of(&envelope));
        let pretty = serde_json::to_vec_pretty(&value).unwrap();
        prop_assert_eq!(decode_checked(&pretty), Ok(envelope));
    }

    /// CloudEvents: unknown extension attributes are ignored.
    #[test]
    fn unknown_extensions_are_ignored(
        envelope in envelope(),
        extensions in prop::collection::btree_map("x[a-z0-9]{0,12}", json(), 1..4),
    ) {
        let mut map = object_of(&envelope);
        for (name, value) in extensions {
            map.insert(name, value);
        }
        prop_assert_eq!(decode_checked(&bytes_of(map)), Ok(envelope));
    }

    #[test]
    fn a_removed_required_attribute_is_named(
        envelope in envelope(),
        attribute in prop::sample::select(REQUIRED.to_vec()),
    ) {
        let mut map = object_of(&envelope);
        prop_assert!(map.remove(attribute).is_some(), "to_json writes {}", attribute);
        let error = decode_checked(&bytes_of(map)).expect_err("decoded without a required attribute");
        prop_assert_eq!(error.field, attribute, "{}", error);
    }

    /// Removing an optional attribute leaves a valid envelope without it.
    #[test]
    fn a_removed_optional_attribute_is_absent(envelope in envelope()) {
        let mut map = object_of(&envelope);
        for name in OPTIONAL {
            map.remove(name);
        }
        let mut expected = envelope;
        expected.traceparent = None;
        expected.correlationid = None;
        expected.causationid = None;
        prop_assert_eq!(decode_checked(&bytes_of(map)), Ok(expected));
    }

    #[test]
    fn a_string_attribute_of_another_type_is_named(
        envelope in envelope(),
        attribute in prop::sample::select(
            REQUIRED
                .iter()
                .chain(OPTIONAL.iter())
                .copied()
                .filter(|name| *name != "sequence" && *name != "data")
                .collect::<Vec<_>>()
        ),
        value in non_string(),
    ) {
        let mut map = object_of(&envelope);
        let optional = OPTIONAL.contains(&attribute);
        map.insert(attribute.to_owned(), value.clone());
        match decode_checked(&bytes_of(map)) {
            // `null` stands for an absent optional attribute.
            Ok(decoded) => prop_assert!(
                optional && value.is_null(),
                "{} = {} decoded as {:?}", attribute, value, decoded
            ),
            Err(error) => prop_assert_eq!(error.field, attribute, "{} = {}: {}", attribute, value, error),
        }
    }

    #[test]
    fn a_sequence_that_is_not_a_number_is_named(envelope in envelope(), value in non_number()) {
        let mut map = object_of(&envelope);
        map.insert("sequence".into(), value);
        let error = decode_checked(&bytes_of(map)).expect_err("sequence must be a number");
        prop_assert_eq!(error.field, "sequence");
    }

    #[test]
    fn a_sequence_out_of_range_is_named(
        envelope in envelope(),
        value in prop_oneof![
            Just(Value::from(0)),
            (i64::MIN..0).prop_map(Value::from),
            (tandem::envelope::MAX_SEQUENCE + 1..=u64::MAX).prop_map(Value::from),
            (1..1_000_000i64).prop_map(|n| Value::from(n as f64 + 0.5)),
        ],
    ) {
        let mut map = object_of(&envelope);
        map.insert("sequence".into(), value);
        let error = decode_checked(&bytes_of(map)).expect_err("sequence must be a positive integer");
        prop_assert_eq!(error.field, "sequence");
    }

    #[test]
    fn data_that_is_not_an_object_is_named(envelope in envelope(), value in non_object()) {
        let mut map = object_of(&envelope);
        map.insert("data".into(), value);
        let error = decode_checked(&bytes_of(map)).expect_err("data must be an object");
        prop_assert_eq!(error.field, "data");
    }

    /// A partition key other than the subject is refused.
    #[test]
    fn a_partitionkey_other_than_the_subject_is_named(envelope in envelope(), other in text()) {
        prop_assume!(other != envelope.subject);
        let mut map = object_of(&envelope);
        map.insert("partitionkey".into(), Value::String(other));
        let error = decode_checked(&bytes_of(map)).expect_err("partitionkey must equal subject");
        prop_assert_eq!(error.field, "partitionkey");
    }
}

/// The wire format is a JSON object ("structured mode"); the same values
/// in a JSON array, in the order of the attributes, are not an envelope.
#[test]
fn an_array_of_the_attribute_values_is_not_an_envelope() {
    let envelope = Envelope {
        id: uuid::Uuid::now_v7(),
        source: "customer".into(),
        event_type: "CustomerUpdated".into(),
        subject: "1234".into(),
        time: OffsetDateTime::UNIX_EPOCH,
        dataschema: "tandem:customer/CustomerUpdated/v1".into(),
        data: serde_json::json!({"customerId": "1234"}),
        sequence: 2,
        traceparent: None,
        correlationid: None,
        causationid: None,
        snapshot: false,
    };
    let map = object_of(&envelope);
    let in_order = [
        "specversion",
        "id",
        "source",
        "type",
        "subject",
        "time",
        "datacontenttype",
        "dataschema",
        "partitionkey",
        "sequence",
        "traceparent",
        "correlationid",
        "causationid",
        "data",
    ];
    let array: Vec<Value> = in_order
        .iter()
        .map(|name| map.get(*name).cloned().unwrap_or(Value::Null))
        .collect();
    let bytes = serde_json::to_vec(&array).unwrap();
    let result = decode_checked(&bytes);
    match result {
        Err(error) => assert_eq!(error.field, "$", "{error}"),
        Ok(decoded) => panic!(
            "a JSON array decoded as an envelope: {} -> {decoded:?}",
            String::from_utf8_lossy(&bytes)
        ),
    }
}
