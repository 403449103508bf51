//! A service's AsyncAPI 3.0 document: the topics it sends events on and
//! receives them from, and every message as it travels there (a
//! CloudEvents 1.0 envelope in JSON structured mode, whose `data` is the
//! contract's payload). Served at `/asyncapi.json` and written by
//! `tandem contracts asyncapi`.
//!
//! - **Channels** are topics. A record's key is the aggregate id (the
//!   envelope's `subject` and `partitionkey`), so the events of one
//!   aggregate keep their order.
//! - **Operations**: one `send` per topic the service publishes on, listing
//!   the current version of each event; one `receive` per topic it
//!   consumes, listing every version it reads (older ones are upcast).
//! - **Messages** are named `<type>.v<N>`. The payload schema is the
//!   envelope with `type` and `dataschema` fixed and `data` the contract's
//!   JSON Schema (the same one as in the contracts crate's `schemas/`),
//!   its definitions moved to `components.schemas`.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};
use tandem::contract::Contract;

/// The content type of every message: a whole CloudEvents JSON envelope.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

#[derive(Debug, Clone)]
struct Channel {
    /// What the key (and subject) of its records is, for a person.
    key: String,
    sends: Vec<Contract>,
    receives: Vec<Contract>,
}

/// Builds a service's document; see the module documentation.
#[derive(Debug, Clone)]
pub struct AsyncApi {
    title: String,
    version: String,
    description: String,
    channels: BTreeMap<String, Channel>,
}

impl AsyncApi {
    /// A document for the service `title` at `version` (its API's version,
    /// such as the crate's).
    pub fn new(title: &str, version: &str, description: &str) -> Self {
        Self {
            title: title.to_owned(),
            version: version.to_owned(),
            description: description.to_owned(),
            channels: BTreeMap::new(),
        }
    }

    fn channel(&mut self, topic: &str, key: &str) -> &mut Channel {
        self.channels
            .entry(topic.to_owned())
            .or_insert_with(|| Channel {
                key: key.to_owned(),
                sends: Vec::new(),
                receives: Vec::new(),
            })
    }

    /// The service publishes `contracts` on `topic`, keyed by `key` (such
    /// as "the customer id").
    pub fn sends(mut self, topic: &str, key: &str, contracts: Vec<Contract>) -> Self {
        self.channel(topic, key).sends.extend(contracts);
        self
    }

    /// The service consumes `contracts` from `topic`, keyed by `key`.
    pub fn receives(mut self, topic: &str, key: &str, contracts: Vec<Contract>) -> Self {
        self.channel(topic, key).receives.extend(contracts);
        self
    }

    /// The document as JSON.
    pub fn to_json(&self) -> Value {
        let mut schemas = Map::new();
        schemas.insert("CloudEvent".to_owned(), envelope_schema());
        let mut messages = Map::new();
        let mut channels = Map::new();
        let mut operations = Map::new();
        for (topic, channel) in &self.channels {
            let mut channel_messages = Map::new();
            for contract in channel.sends.iter().chain(&channel.receives) {
                let name = message_name(contract);
                if !messages.contains_key(&name) {
                    let payload = payload_schema(contract, &mut schemas);
                    messages.insert(name.clone(), message(contract, payload));
                }
                channel_messages.insert(
                    name.clone(),
                    json!({ "$ref": format!("#/components/messages/{name}") }),
                );
            }
            channels.insert(
                topic.clone(),
                json!({
                    "address": topic,
                    "title": format!("Topic {topic}"),
                    "description": format!(
                        "Records are keyed by {}, the envelope's subject and partitionkey: \
                         the events of one aggregate keep their order, with a gap-free \
                         per-aggregate sequence from 1.",
                        channel.key
                    ),
                    "messages": channel_messages,
                }),
            );
            for (action, contracts) in [("send", &channel.sends), ("receive", &channel.receives)] {
                if contracts.is_empty() {
                    continue;
                }
                let refs: Vec<Value> = contracts
                    .iter()
                    .map(|contract| {
                        json!({
                            "$ref": format!("#/channels/{topic}/messages/{}", message_name(contract))
                        })
                    })
                    .collect();
                let summary = if action == "send" {
                    format!("Publishes on topic {topic} (through the transactional outbox).")
                } else {
                    format!(
                        "Consumes topic {topic} with an exactly-once effect; \
                         older versions are upcast, unknown ones parked as dead letters."
                    )
                };
                operations.insert(
                    format!("{action}{}", capitalised(topic)),
                    json!({
                        "action": action,
                        "channel": { "$ref": format!("#/channels/{topic}") },
                        "summary": summary,
                        "messages": refs,
                    }),
                );
            }
        }
        json!({
            "asyncapi": "3.0.0",
            "info": {
                "title": self.title,
                "version": self.version,
                "description": self.description,
            },
            "defaultContentType": CONTENT_TYPE,
            "channels": channels,
            "operations": operations,
            "components": {
                "messages": messages,
                "schemas": schemas,
            },
        })
    }
}

fn capitalised(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

fn message_name(contract: &Contract) -> String {
    format!("{}.v{}", contract.event_type, contract.version)
}

fn message(contract: &Contract, payload: Value) -> Value {
    json!({
        "name": contract.event_type,
        "title": format!("{} v{}", contract.event_type, contract.version),
        "summary": format!("dataschema {}", contract.dataschema),
        "contentType": CONTENT_TYPE,
        "correlationId": {
            "description": "The request or order the event belongs to, when known.",
            "location": "$message.payload#/correlationid",
        },
        "bindings": {
            "kafka": {
                "key": { "type": "string", "description": "The aggregate id (the envelope's subject)." },
                "bindingVersion": "0.5.0",
            },
        },
        "payload": payload,
    })
}

/// The envelope of `contract`'s events: [`envelope_schema`] with `type`
/// and `dataschema` fixed and `data` its payload schema, registered in
/// `schemas` under the message's name.
///
/// # Panics
/// When two contracts define a schema of the same name differently.
fn payload_schema(contract: &Contract, schemas: &mut Map<String, Value>) -> Value {
    let name = message_name(contract);
    let mut data = contract.schema.clone();
    if let Some(object) = data.as_object_mut() {
        object.remove("$schema");
        if let Some(Value::Object(definitions)) = object.remove("$defs") {
            for (definition, mut schema) in definitions {
                rewrite_refs(&mut schema);
                if let Some(existing) = schemas.get(&definition) {
                    assert!(
                        *existing == schema,
                        "two contracts define {definition} differently ({name} is one): \
                         give one of the Rust types another schema name"
                    );
                }
                schemas.insert(definition, schema);
            }
        }
    }
    rewrite_refs(&mut data);
    schemas.insert(format!("{name}.data"), data);
    json!({
        "allOf": [
            { "$ref": "#/components/schemas/CloudEvent" },
            {
                "type": "object",
                "properties": {
                    "type": { "const": contract.event_type },
                    "dataschema": { "const": contract.dataschema },
                    "data": { "$ref": format!("#/components/schemas/{name}.data") },
                },
            },
        ],
    })
}

/// `#/$defs/X` → `#/components/schemas/X`, everywhere in `schema`.
fn rewrite_refs(schema: &mut Value) {
    match schema {
        Value::Object(object) => {
            if let Some(Value::String(target)) = object.get_mut("$ref") {
                if let Some(definition) = target.strip_prefix("#/$defs/") {
                    *target = format!("#/components/schemas/{definition}");
                }
            }
            object.values_mut().for_each(rewrite_refs);
        }
        Value::Array(items) => items.iter_mut().for_each(rewrite_refs),
        _ => {}
    }
}

/// The CloudEvents 1.0 envelope Tandem writes, with its extensions.
fn envelope_schema() -> Value {
    json!({
        "type": "object",
        "description": "A CloudEvents 1.0 event in JSON structured mode, with Tandem's extensions.",
        "required": [
            "specversion", "id", "source", "type", "subject", "time",
            "datacontenttype", "dataschema", "partitionkey", "sequence", "data"
        ],
        "properties": {
            "specversion": { "const": "1.0" },
            "id": { "type": "string", "format": "uuid", "description": "A UUIDv7, unique per event; consumers drop a redelivery by (subject, sequence)." },
            "source": { "type": "string", "description": "The publishing service, also the topic." },
            "type": { "type": "string", "description": "The event type, such as CustomerUpdated." },
            "subject": { "type": "string", "description": "The aggregate id." },
            "time": { "type": "string", "format": "date-time" },
            "datacontenttype": { "const": "application/json" },
            "dataschema": { "type": "string", "description": "The payload's contract and version: tandem:<topic>/<type>/v<N>." },
            "partitionkey": { "type": "string", "description": "CloudEvents partitioning extension: the aggregate id, the record's key." },
            "sequence": { "type": "integer", "minimum": 1, "description": "The event's place in its aggregate's history: gap-free from 1." },
            "traceparent": { "type": "string", "description": "W3C trace context (CloudEvents distributed tracing extension)." },
            "correlationid": { "type": "string" },
            "causationid": { "type": "string", "description": "The id of the event that caused this one." },
            "snapshot": { "type": "boolean", "description": "Present and true on a snapshot event: the aggregate's whole state at this sequence (a re-publication)." },
            "data": { "type": "object" },
        },
    })
}
