//! The embedded engines chosen by URL: `sqlite:///path/bus.db` for the
//! embedded bus, `sqlite:///path/service.db` for a service's store. This
//! crate knows only its own engines; `tandem-engines` opens every engine
//! (Kafka, NATS JetStream, PostgreSQL too) by URL and delegates `sqlite`
//! URLs here. Any other scheme is refused here by name.

use std::path::PathBuf;
use std::sync::Arc;

use crate::bus::{Bus, BusError};
use crate::embedded::{EmbeddedLog, EmbeddedOptions};
use crate::schema::ExistingError;
use crate::sqlite::{SqliteOptions, SqliteStore, Synchronous};
use crate::store::StoreError;

/// A parsed engine URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineUrl {
    Sqlite {
        path: PathBuf,
        synchronous: Option<Synchronous>,
        partitions: Option<u32>,
    },
    Other {
        scheme: String,
    },
}

/// Why a URL names no usable engine.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("{url}: expected scheme://..., e.g. sqlite:///var/lib/tandem/bus.db")]
    Malformed { url: String },
    #[error("{url}: a sqlite URL needs a file path, e.g. sqlite:///var/lib/tandem/bus.db or sqlite://./data/bus.db")]
    MissingPath { url: String },
    #[error("{url}: unknown option {option} (known: synchronous=full|normal|off, partitions=N)")]
    UnknownOption { url: String, option: String },
    #[error("{url}: the {scheme} engine is not known to the tandem crate (it opens sqlite; tandem-engines opens kafka, nats and postgres)")]
    Unsupported { url: String, scheme: String },
}

/// Parses `scheme://rest?options`. For sqlite, `sqlite:///abs/path` and
/// `sqlite://relative/path` are both accepted.
pub fn parse(url: &str) -> Result<EngineUrl, UrlError> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(UrlError::Malformed { url: url.into() });
    };
    if scheme != "sqlite" {
        return Ok(EngineUrl::Other {
            scheme: scheme.into(),
        });
    }
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() {
        return Err(UrlError::MissingPath { url: url.into() });
    }
    let mut synchronous = None;
    let mut partitions = None;
    for option in query.split('&').filter(|option| !option.is_empty()) {
        let (name, value) = option.split_once('=').unwrap_or((option, ""));
        match name {
            "synchronous" => {
                synchronous =
                    Some(
                        Synchronous::parse(value).ok_or_else(|| UrlError::UnknownOption {
                            url: url.into(),
                            option: option.into(),
                        })?,
                    )
            }
            "partitions" => {
                partitions = Some(value.parse().ok().filter(|count| *count >= 1).ok_or_else(
                    || UrlError::UnknownOption {
                        url: url.into(),
                        option: option.into(),
                    },
                )?)
            }
            _ => {
                return Err(UrlError::UnknownOption {
                    url: url.into(),
                    option: option.into(),
                })
            }
        }
    }
    Ok(EngineUrl::Sqlite {
        path: PathBuf::from(path),
        synchronous,
        partitions,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("cannot open store {url}: {source}")]
    Store {
        url: String,
        #[source]
        source: StoreError,
    },
    #[error("cannot open store {url}: {source}")]
    Existing {
        url: String,
        #[source]
        source: ExistingError,
    },
    #[error("cannot open bus {url}: {source}")]
    Bus {
        url: String,
        #[source]
        source: BusError,
    },
}

/// Opens the bus a URL names.
pub async fn open_bus(url: &str) -> Result<Arc<dyn Bus>, OpenError> {
    match parse(url)? {
        EngineUrl::Sqlite {
            path,
            synchronous,
            partitions,
        } => {
            let options = EmbeddedOptions {
                synchronous: synchronous.unwrap_or_default(),
                partitions: partitions.unwrap_or(1),
            };
            let log = EmbeddedLog::open(&path, options)
                .await
                .map_err(|source| OpenError::Bus {
                    url: url.into(),
                    source,
                })?;
            Ok(Arc::new(log))
        }
        EngineUrl::Other { scheme } => Err(UrlError::Unsupported {
            url: url.into(),
            scheme,
        }
        .into()),
    }
}

/// Opens the store a URL names.
pub async fn open_sqlite_store(url: &str) -> Result<SqliteStore, OpenError> {
    match parse(url)? {
        EngineUrl::Sqlite {
            path, synchronous, ..
        } => {
            let options = SqliteOptions {
                synchronous: synchronous.unwrap_or_default(),
                ..SqliteOptions::default()
            };
            SqliteStore::open(&path, options)
                .await
                .map_err(|source| OpenError::Store {
                    url: url.into(),
                    source,
                })
        }
        EngineUrl::Other { scheme } => Err(UrlError::Unsupported {
            url: url.into(),
            scheme,
        }
        .into()),
    }
}

/// Opens the existing service database a URL names, creating, installing
/// and changing nothing: a missing file or one without the toolkit's
/// tables (the bus file, say) is refused (see
/// [`SqliteStore::open_existing`]).
pub async fn open_existing_sqlite_store(url: &str) -> Result<SqliteStore, OpenError> {
    match parse(url)? {
        EngineUrl::Sqlite {
            path, synchronous, ..
        } => {
            let options = SqliteOptions {
                synchronous: synchronous.unwrap_or_default(),
                ..SqliteOptions::default()
            };
            SqliteStore::open_existing(&path, options)
                .await
                .map_err(|source| OpenError::Existing {
                    url: url.into(),
                    source,
                })
        }
        EngineUrl::Other { scheme } => Err(UrlError::Unsupported {
            url: url.into(),
            scheme,
        }
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sqlite_urls() {
        assert_eq!(
            parse("sqlite:///tmp/bus.db?synchronous=normal&partitions=4").unwrap(),
            EngineUrl::Sqlite {
                path: "/tmp/bus.db".into(),
                synchronous: Some(Synchronous::Normal),
                partitions: Some(4)
            }
        );
        assert!(matches!(parse("bus.db"), Err(UrlError::Malformed { .. })));
        assert!(matches!(
            parse("sqlite://"),
            Err(UrlError::MissingPath { .. })
        ));
        assert!(matches!(
            parse("sqlite:///x.db?fast=yes"),
            Err(UrlError::UnknownOption { .. })
        ));
    }
}
