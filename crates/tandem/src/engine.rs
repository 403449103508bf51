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

/// Why a URL names no usable engine. The URLs and options it holds are
/// already [`redact`]ed, so it can be shown as it is.
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
        return Err(UrlError::Malformed { url: redact(url) });
    };
    if scheme != "sqlite" {
        return Ok(EngineUrl::Other {
            scheme: scheme.into(),
        });
    }
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() {
        return Err(UrlError::MissingPath { url: redact(url) });
    }
    let mut synchronous = None;
    let mut partitions = None;
    for option in query.split('&').filter(|option| !option.is_empty()) {
        let (name, value) = option.split_once('=').unwrap_or((option, ""));
        let unknown = || UrlError::UnknownOption {
            url: redact(url),
            option: shown_option(name, value),
        };
        match name {
            "synchronous" => synchronous = Some(Synchronous::parse(value).ok_or_else(unknown)?),
            "partitions" => {
                partitions = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|count| *count >= 1)
                        .ok_or_else(unknown)?,
                )
            }
            _ => return Err(unknown()),
        }
    }
    Ok(EngineUrl::Sqlite {
        path: PathBuf::from(path),
        synchronous,
        partitions,
    })
}

/// Why an engine could not be opened; its URL is [`redact`]ed.
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
                    url: redact(url),
                    source,
                })?;
            Ok(Arc::new(log))
        }
        EngineUrl::Other { scheme } => Err(UrlError::Unsupported {
            url: redact(url),
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
                    url: redact(url),
                    source,
                })
        }
        EngineUrl::Other { scheme } => Err(UrlError::Unsupported {
            url: redact(url),
            scheme,
        }
        .into()),
    }
}

// ---------------------------------------------------------------------------
// Secrets in URLs.

/// Shown instead of a URL that does not parse: a secret may be anywhere in
/// it, so none of it is shown.
const NOT_SHOWN: &str = "(a URL that does not parse, not shown)";

/// Whether an option of this name holds a secret (passwords, tokens, keys,
/// credentials), whose value must never be shown.
pub fn is_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "pass", "pwd", "secret", "token", "key", "cred", "auth", "pem", "jaas",
    ]
    .iter()
    .any(|word| name.contains(word))
}

/// `name=value`, or `name=***` when the option holds a secret.
pub fn shown_option(name: &str, value: &str) -> String {
    if is_secret(name) {
        format!("{name}=***")
    } else {
        format!("{name}={value}")
    }
}

/// An engine URL (`scheme://…`) or a PostgreSQL key=value connection
/// string, fit for messages and logs: a URL's user-info (user and
/// password, or a NATS token) is dropped, the values of secret-like options
/// ([`is_secret`]: `password=`, `sasl.password=`, `token=`, …) become
/// `***`, and text that does not parse is not shown at all.
pub fn redact(url: &str) -> String {
    if has_scheme(url) {
        redact_url(url)
    } else {
        match parse_key_values(url) {
            Some(params) if !params.is_empty() => params
                .iter()
                .map(|param| {
                    if is_secret(&param.key) {
                        format!("{}=***", param.key)
                    } else {
                        format!("{}={}", param.key, quote_value(&param.value))
                    }
                })
                .collect::<Vec<_>>()
                .join(" "),
            _ => NOT_SHOWN.to_owned(),
        }
    }
}

/// Whether `text` starts with `scheme://`.
pub fn has_scheme(text: &str) -> bool {
    text.split_once("://").is_some_and(|(scheme, _)| {
        let mut chars = scheme.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    })
}

fn redact_url(text: &str) -> String {
    let mut url = match url::Url::parse(text) {
        Ok(url) => url,
        Err(_) => return redact_host_list(text).unwrap_or_else(|| NOT_SHOWN.to_owned()),
    };
    // Both fail only for URLs that cannot have user-info.
    let _ = url.set_password(None);
    let _ = url.set_username("");
    url.set_fragment(None);
    if let Some(query) = url.query() {
        let masked: Vec<String> = query
            .split('&')
            .map(|pair| {
                let (name, _) = pair.split_once('=').unwrap_or((pair, ""));
                let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
                if is_secret(&name) {
                    format!("{}=***", pair.split_once('=').map_or(pair, |(raw, _)| raw))
                } else {
                    pair.to_owned()
                }
            })
            .collect();
        url.set_query(Some(&masked.join("&")));
    }
    url.to_string()
}

/// `kafka://h1:9092,h2:9092?…` and `postgres://h1,h2/db`: a list of hosts,
/// which `url` does not read, and no user-info. The hosts are shown as they
/// are (nothing but host and port characters), the rest as [`redact`] shows
/// it.
fn redact_host_list(text: &str) -> Option<String> {
    let (scheme, rest) = text.split_once("://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (hosts, tail) = rest.split_at(end);
    let plain =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']');
    if !hosts.contains(',') || !hosts.split(',').all(|host| host.chars().all(plain)) {
        return None;
    }
    let rest = url::Url::parse(&format!("{scheme}://hosts{tail}")).ok()?;
    let shown = redact_url(rest.as_str());
    let tail = shown.strip_prefix(&format!("{scheme}://hosts"))?;
    Some(format!("{scheme}://{hosts}{tail}"))
}

/// A value as the key=value form writes it: quoted when it must be.
fn quote_value(value: &str) -> String {
    if !value.is_empty() && !value.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
        return value.to_owned();
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('\'');
    quoted
}

/// One `key=value` of a PostgreSQL connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    /// Unquoted and unescaped.
    pub value: String,
    /// Where the pair is in the text, quotes included.
    pub span: std::ops::Range<usize>,
}

/// Reads a PostgreSQL key=value connection string (`host=db user=app
/// password='a b'`) as libpq does: pairs apart by whitespace, spaces
/// allowed around `=`, a value either bare (up to whitespace) or in single
/// quotes, `\` escaping the next character in both. `None` when the text
/// is not of that form. (The `postgres` crate reads the same syntax but
/// keeps its reader to itself.)
pub fn parse_key_values(text: &str) -> Option<Vec<KeyValue>> {
    let mut chars = text.char_indices().peekable();
    let mut params = Vec::new();
    let skip_space = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_space(&mut chars);
        let Some(&(start, _)) = chars.peek() else {
            return Some(params);
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        skip_space(&mut chars);
        if key.is_empty() || chars.next().map(|(_, c)| c) != Some('=') {
            return None;
        }
        skip_space(&mut chars);
        let mut value = String::new();
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        loop {
            match chars.peek().copied() {
                None if quoted => return None,
                None => break,
                Some((_, c)) if !quoted && c.is_whitespace() => break,
                Some((_, '\'')) if quoted => {
                    chars.next();
                    break;
                }
                Some((_, '\\')) => {
                    chars.next();
                    value.push(chars.next()?.1);
                }
                Some((_, c)) => {
                    chars.next();
                    value.push(c);
                }
            }
        }
        let end = chars.peek().map_or(text.len(), |(index, _)| *index);
        params.push(KeyValue {
            key,
            value,
            span: start..end,
        });
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
                    url: redact(url),
                    source,
                })
        }
        EngineUrl::Other { scheme } => Err(UrlError::Unsupported {
            url: redact(url),
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

    #[test]
    fn reads_key_value_connection_strings_as_libpq_does() {
        let text = r" host=db  port = 5432 password='it\'s a' x=a\ b empty='' ";
        let params = parse_key_values(text).unwrap();
        let pairs: Vec<(&str, &str)> = params
            .iter()
            .map(|param| (param.key.as_str(), param.value.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("host", "db"),
                ("port", "5432"),
                ("password", "it's a"),
                ("x", "a b"),
                ("empty", "")
            ]
        );
        assert_eq!(&text[params[2].span.clone()], r"password='it\'s a'");
        for bad in ["host", "=db", "host=db password='open", "a=1 b"] {
            assert_eq!(parse_key_values(bad), None, "{bad}");
        }
        assert_eq!(
            redact(text),
            r"host=db port=5432 password=*** x='a b' empty=''"
        );
    }

    #[test]
    fn redacts_user_info_secret_options_and_unparsable_urls() {
        assert_eq!(
            redact("nats://user:pw@h:4222/?token=t&prefix=p#frag"),
            "nats://h:4222/?token=***&prefix=p"
        );
        assert_eq!(
            redact("kafka://h:1?ssl.key.pem=x&sasl%2Epassword=y"),
            "kafka://h:1?ssl.key.pem=***&sasl%2Epassword=***"
        );
        assert_eq!(
            redact("sqlite:///var/lib/bus.db"),
            "sqlite:///var/lib/bus.db"
        );
        assert_eq!(
            redact("kafka://h1:9092,10.0.0.2:9093?sasl.password=x&acks=all"),
            "kafka://h1:9092,10.0.0.2:9093?sasl.password=***&acks=all"
        );
        assert_eq!(redact("postgres://u:p@h1,h2/db"), "postgres://h1,h2/db");
        assert_eq!(redact("postgres://u:p@h1:1,h2:2/db"), NOT_SHOWN);
        assert_eq!(redact("nats://u:p@h:notaport"), NOT_SHOWN);
        assert_eq!(redact("u:p@h"), NOT_SHOWN);
        let error = parse("sqlite:///x.db?password=p").unwrap_err().to_string();
        assert!(error.contains("unknown option password=***"), "{error}");
    }
}
