//! Contracts as published: each version of each event type's payload, the
//! topic it travels on and its JSON Schema; and the check that a set of
//! them is still compatible with a released baseline.
//!
//! A contracts crate lists its [`Contract`]s (the current version of each
//! event and every older version its readers still upcast). The released
//! set is kept as files, `<type>.v<N>.json`, in a baseline directory;
//! [`check`] compares the two and reports, per event and version:
//! - an incompatible change within a version (the rules are in
//!   [`crate::compat`]): old consumers could no longer read new events, or
//!   new consumers old events still on the log. Such a change needs a new
//!   version instead;
//! - a released version that is gone: its events may still be on the log.
//!
//! New events and new versions are compatible; they join the baseline when
//! it is written again at a release.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::compat::{breaking_changes, Break};
use crate::envelope::{schema_version, EventPayload};

/// One version of one event type's payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Contract {
    /// The event type (CloudEvents `type`).
    pub event_type: &'static str,
    /// Its `dataschema`, such as `tandem:order/OrderPlaced/v2`.
    pub dataschema: &'static str,
    /// The `N` of the `/vN` that ends `dataschema`.
    pub version: u32,
    /// The topic it is published on.
    pub topic: &'static str,
    /// Its JSON Schema.
    pub schema: Value,
}

impl Contract {
    /// The contract of payload type `T` on `topic`, with its JSON Schema.
    ///
    /// # Panics
    /// When `T::SCHEMA` does not end in `/v{N}`: every contract is
    /// versioned.
    pub fn new<T: EventPayload>(topic: &'static str, schema: Value) -> Self {
        let (_, version) = schema_version(T::SCHEMA)
            .unwrap_or_else(|| panic!("{}'s schema {} does not end in /vN", T::TYPE, T::SCHEMA));
        Self {
            event_type: T::TYPE,
            dataschema: T::SCHEMA,
            version,
            topic,
            schema,
        }
    }

    /// The name of its schema file: `<type>.v<N>.json`.
    pub fn file_name(&self) -> String {
        format!("{}.v{}.json", self.event_type, self.version)
    }
}

/// The newest version of each event type in `contracts`: what is published.
pub fn newest(contracts: &[Contract]) -> Vec<Contract> {
    let mut newest: BTreeMap<&str, &Contract> = BTreeMap::new();
    for contract in contracts {
        let entry = newest.entry(contract.event_type).or_insert(contract);
        if contract.version > entry.version {
            *entry = contract;
        }
    }
    contracts
        .iter()
        .filter(|contract| newest[contract.event_type].version == contract.version)
        .cloned()
        .collect()
}

/// What [`check`] found wrong with one released contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// An incompatible change within a version.
    Incompatible {
        /// The event type.
        event_type: String,
        /// The version that changed.
        version: u32,
        /// The change, and the rule it breaks.
        change: Break,
    },
    /// A released version is no longer among the contracts.
    VersionRemoved {
        /// The event type.
        event_type: String,
        /// The version that is gone.
        version: u32,
    },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Incompatible {
                event_type,
                version,
                change,
            } => {
                let field = if change.field.is_empty() {
                    "(the payload)"
                } else {
                    change.field.as_str()
                };
                write!(
                    f,
                    "{event_type} v{version}: {field}: {} ({}); an incompatible change needs a new version",
                    change.rule, change.detail
                )
            }
            Finding::VersionRemoved {
                event_type,
                version,
            } => write!(
                f,
                "{event_type} v{version}: version removed; its events may still be on the log, so its readers must stay"
            ),
        }
    }
}

/// Why a baseline could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    /// The directory, or a file in it, could not be read.
    #[error("cannot read the baseline {path}: {source}")]
    Io {
        /// The directory or file.
        path: String,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// A `.json` file of the baseline does not parse.
    #[error("baseline file {path} is not JSON: {source}")]
    Json {
        /// The file.
        path: String,
        /// What the JSON parser said.
        #[source]
        source: serde_json::Error,
    },
    /// A `.json` file whose name is not `<type>.v<N>.json`.
    #[error("baseline file {path} is not named <type>.v<N>.json")]
    Name {
        /// The file.
        path: String,
    },
}

/// Reads a baseline directory: every `<type>.v<N>.json` in it, keyed by
/// (type, N).
pub fn read_baseline(dir: &Path) -> Result<BTreeMap<(String, u32), Value>, BaselineError> {
    let io = |source| BaselineError::Io {
        path: dir.display().to_string(),
        source,
    };
    let mut baseline = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.extension().and_then(|extension| extension.to_str()) != Some("json") {
            continue;
        }
        let shown = path.display().to_string();
        let name = path
            .file_stem()
            .and_then(|stem| stem.to_str())
            .unwrap_or_default();
        let (event_type, version) = name
            .rsplit_once(".v")
            .and_then(|(event_type, version)| Some((event_type, version.parse::<u32>().ok()?)))
            .ok_or_else(|| BaselineError::Name {
                path: shown.clone(),
            })?;
        let text = std::fs::read_to_string(&path).map_err(|source| BaselineError::Io {
            path: shown.clone(),
            source,
        })?;
        let schema = serde_json::from_str(&text).map_err(|source| BaselineError::Json {
            path: shown,
            source,
        })?;
        baseline.insert((event_type.to_owned(), version), schema);
    }
    Ok(baseline)
}

/// Every incompatibility of `contracts` with `baseline` (see the module
/// documentation); empty when they are compatible.
pub fn check(baseline: &BTreeMap<(String, u32), Value>, contracts: &[Contract]) -> Vec<Finding> {
    let mut findings = Vec::new();
    for ((event_type, version), released) in baseline {
        let current = contracts
            .iter()
            .find(|contract| contract.event_type == event_type && contract.version == *version);
        match current {
            None => findings.push(Finding::VersionRemoved {
                event_type: event_type.clone(),
                version: *version,
            }),
            Some(current) => {
                findings.extend(breaking_changes(released, &current.schema).into_iter().map(
                    |change| Finding::Incompatible {
                        event_type: event_type.clone(),
                        version: *version,
                        change,
                    },
                ))
            }
        }
    }
    findings
}
