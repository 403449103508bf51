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
    /// A `sqlite://` URL: a file of this crate's engines, the embedded log
    /// or a SQLite store.
    Sqlite {
        /// The file, as written in the URL.
        path: PathBuf,
        /// The `synchronous` option, if given.
        synchronous: Option<Synchronous>,
        /// The `partitions` option (at least 1), if given; only the
        /// embedded log reads it.
        partitions: Option<u32>,
    },
    /// Any other scheme, which this crate does not open.
    Other {
        /// The scheme, lower-cased.
        scheme: String,
    },
}

/// Why a URL names no usable engine. The URLs and options it holds are
/// already [`redact`]ed, so it can be shown as it is.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    /// The text has no `scheme://`.
    #[error("{url}: expected scheme://..., e.g. sqlite:///var/lib/tandem/bus.db")]
    Malformed {
        /// The URL, redacted.
        url: String,
    },
    /// A `sqlite://` URL with no file path.
    #[error("{url}: a sqlite URL needs a file path, e.g. sqlite:///var/lib/tandem/bus.db or sqlite://./data/bus.db")]
    MissingPath {
        /// The URL, redacted.
        url: String,
    },
    /// A `sqlite://` URL with an option that is not known, or a value
    /// that is not valid for it.
    #[error("{url}: unknown option {option} (known: synchronous=full|normal|off, partitions=N)")]
    UnknownOption {
        /// The URL, redacted.
        url: String,
        /// The option as given (its value hidden if it may be a secret).
        option: String,
    },
    /// The URL does not parse (see [`UrlSyntaxError`]).
    #[error("{url}: {source}")]
    Syntax {
        /// The URL, redacted.
        url: String,
        /// What is wrong with it.
        #[source]
        source: UrlSyntaxError,
    },
    /// A scheme this crate does not open (`tandem-engines` opens the
    /// others).
    #[error("{url}: the {scheme} engine is not known to the tandem crate (it opens sqlite; tandem-engines opens kafka, nats and postgres)")]
    Unsupported {
        /// The URL, redacted.
        url: String,
        /// The scheme, lower-cased.
        scheme: String,
    },
}

impl UrlError {
    /// `error` of `url`, which is shown [`redact`]ed; a URL with no scheme
    /// is [`UrlError::Malformed`].
    pub fn syntax(url: &str, error: UrlSyntaxError) -> UrlError {
        match error {
            UrlSyntaxError::NoScheme => UrlError::Malformed { url: redact(url) },
            source => UrlError::Syntax {
                url: redact(url),
                source,
            },
        }
    }
}

/// Parses `scheme://rest?options` with [`ParsedUrl`]. For sqlite,
/// `sqlite:///abs/path` and `sqlite://relative/path` are both accepted.
pub fn parse(url: &str) -> Result<EngineUrl, UrlError> {
    let parsed = ParsedUrl::parse(url).map_err(|error| UrlError::syntax(url, error))?;
    if parsed.scheme() != "sqlite" {
        return Ok(EngineUrl::Other {
            scheme: parsed.scheme().to_owned(),
        });
    }
    if parsed.path().is_empty() {
        return Err(UrlError::MissingPath { url: redact(url) });
    }
    let mut synchronous = None;
    let mut partitions = None;
    for option in parsed.options() {
        let (name, value) = (option.name.as_str(), option.value.as_str());
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
        path: PathBuf::from(parsed.path()),
        synchronous,
        partitions,
    })
}

// ---------------------------------------------------------------------------
// The one URL parser.

/// Why a URL does not parse. It holds nothing of the URL (a secret may be
/// anywhere in it): a caller puts the [`redact`]ed URL in front.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum UrlSyntaxError {
    /// The text does not start with `scheme://`.
    #[error("expected scheme://...")]
    NoScheme,
    /// The part after the scheme is not a URL; holds the parser's reason,
    /// never the text.
    #[error("not a URL ({0})")]
    Unparsable(String),
    /// A part or an option (named here, not shown) is not UTF-8 once
    /// percent-decoded.
    #[error("{0} is not UTF-8 once percent-decoded")]
    NotUtf8(String),
}

/// One host of a URL: a name or address (IPv6 in brackets), and the port
/// when the URL gives one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlHost {
    /// A name or an address; an IPv6 address keeps its brackets.
    pub host: String,
    /// The port, when the URL gives one.
    pub port: Option<u16>,
}

impl std::fmt::Display for UrlHost {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(port) => write!(formatter, "{}:{port}", self.host),
            None => formatter.write_str(&self.host),
        }
    }
}

/// One `name=value` option of a URL's query, decoded.
#[derive(Clone, PartialEq, Eq)]
pub struct UrlOption {
    /// The option's name, decoded.
    pub name: String,
    /// Its value, decoded (a `+` stays a plus); empty when it has none.
    pub value: String,
    /// Whether the option was written with a `=` (`tls` has none).
    pub has_value: bool,
    /// The pair as the URL writes it.
    raw: String,
}

impl std::fmt::Debug for UrlOption {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&shown_option(&self.name, &self.value))
    }
}

/// An engine URL, split once by the rules every engine shares (the
/// SQLite engines here; Kafka, NATS and PostgreSQL in their crates):
///
/// - `scheme://` is required; the scheme is compared lower-cased.
/// - A `sqlite://` URL holds a file path, not a host: all between
///   `sqlite://` and the first `?` is the path, as written and not
///   percent-decoded (a file name may hold `%`), so `sqlite:///abs/bus.db`,
///   `sqlite://relative.db` and `sqlite://./data/bus.db` all name files.
///   (`url::Url` would read `relative.db` as a host.)
/// - Any other scheme has `[user[:password]@]host[:port][/path]`, read by
///   `url::Url`; user and password are percent-decoded. A comma list of
///   hosts (`kafka://h1:9092,h2:9092`, `postgres://u@h1,h2/db`), which
///   `url` cannot read, is split here and each host read by `url`.
/// - Options follow the first `?` (up to a `#`), `name=value` pairs apart
///   by `&`. Names and values are percent-decoded, and **a `+` is a plus,
///   never a space** (a token or password holding `+` arrives as written;
///   write a space as `%20`). A `%` not followed by two hex digits stays as
///   it is. Text that is not UTF-8 once decoded is refused by naming its
///   part or option, never by showing it.
#[derive(Clone, PartialEq, Eq)]
pub struct ParsedUrl {
    text: String,
    scheme: String,
    authority: String,
    user: String,
    password: Option<String>,
    hosts: Vec<UrlHost>,
    path: String,
    /// Where the query starts in `text` (after the `?`), and ends.
    query: Option<std::ops::Range<usize>>,
    options: Vec<UrlOption>,
}

impl std::fmt::Debug for ParsedUrl {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&redact(&self.text))
    }
}

/// `text` percent-decoded (a `+` stays a plus); the error names `part`.
fn url_decoded(part: &str, text: &str) -> Result<String, UrlSyntaxError> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|text| text.into_owned())
        .map_err(|_| UrlSyntaxError::NotUtf8(part.to_owned()))
}

fn url_host(url: &url::Url) -> Option<UrlHost> {
    let host = match url.host()? {
        url::Host::Domain("") => return None,
        url::Host::Domain(host) => host.to_owned(),
        url::Host::Ipv4(address) => address.to_string(),
        url::Host::Ipv6(address) => format!("[{address}]"),
    };
    Some(UrlHost {
        host,
        port: url.port(),
    })
}

impl ParsedUrl {
    /// Splits `text` by the rules above.
    pub fn parse(text: &str) -> Result<ParsedUrl, UrlSyntaxError> {
        if !has_scheme(text) {
            return Err(UrlSyntaxError::NoScheme);
        }
        let (scheme, rest) = text.split_once("://").ok_or(UrlSyntaxError::NoScheme)?;
        let scheme = scheme.to_ascii_lowercase();
        let rest_start = text.len() - rest.len();
        let mut parsed = ParsedUrl {
            text: text.to_owned(),
            scheme,
            authority: String::new(),
            user: String::new(),
            password: None,
            hosts: Vec::new(),
            path: String::new(),
            query: None,
            options: Vec::new(),
        };
        if parsed.scheme == "sqlite" {
            let end = rest.find('?').unwrap_or(rest.len());
            parsed.path = rest[..end].to_owned();
            if end < rest.len() {
                let start = rest_start + end + 1;
                let end = text[start..].find('#').map_or(text.len(), |at| start + at);
                parsed.query = Some(start..end);
            }
        } else {
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            parsed.authority = rest[..authority_end].to_owned();
            let hosts_start = parsed.authority.rfind('@').map_or(0, |at| at + 1);
            let host_list = &parsed.authority[hosts_start..];
            let unparsable = |error: url::ParseError| UrlSyntaxError::Unparsable(error.to_string());
            let url = if host_list.contains(',') {
                for host in host_list.split(',').map(str::trim) {
                    if host.is_empty() {
                        return Err(UrlSyntaxError::Unparsable("empty host in a list".into()));
                    }
                    let one = url::Url::parse(&format!("{}://{host}", parsed.scheme))
                        .map_err(unparsable)?;
                    match url_host(&one) {
                        Some(host) if matches!(one.path(), "" | "/") => parsed.hosts.push(host),
                        _ => return Err(UrlSyntaxError::Unparsable("bad host in a list".into())),
                    }
                }
                // The rest of the URL around the first host.
                let first = parsed.hosts[0].to_string();
                let start = rest_start + hosts_start;
                let end = rest_start + authority_end;
                url::Url::parse(&format!("{}{first}{}", &text[..start], &text[end..]))
                    .map_err(unparsable)?
            } else {
                let url = url::Url::parse(text).map_err(unparsable)?;
                parsed.hosts.extend(url_host(&url));
                url
            };
            parsed.user = url_decoded("user-info", url.username())?;
            parsed.password = url
                .password()
                .map(|password| url_decoded("user-info", password))
                .transpose()?;
            parsed.path = url.path().to_owned();
            let without_fragment = text.find('#').unwrap_or(text.len());
            if let Some(at) = text[..without_fragment].find('?') {
                parsed.query = Some(at + 1..without_fragment);
            }
        }
        if let Some(range) = parsed.query.clone() {
            for pair in text[range].split('&').filter(|pair| !pair.is_empty()) {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                let name = url_decoded("an option name", name)?;
                let value = url_decoded(&format!("option {name}"), value)?;
                parsed.options.push(UrlOption {
                    name,
                    value,
                    has_value: pair.contains('='),
                    raw: pair.to_owned(),
                });
            }
        }
        Ok(parsed)
    }

    /// The scheme, lower-cased.
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// The user-info's user, decoded; empty when there is none.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The user-info's password, decoded.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// The hosts, in order (none for `sqlite://`).
    pub fn hosts(&self) -> &[UrlHost] {
        &self.hosts
    }

    /// For `sqlite://`, the file path as written; otherwise the URL's path
    /// as `url` writes it (`""` or `/…`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The options, decoded, in order.
    pub fn options(&self) -> &[UrlOption] {
        &self.options
    }

    /// The URL as written, up to its options: `scheme://authority/path`.
    fn base(&self) -> &str {
        match &self.query {
            Some(range) => &self.text[..range.start - 1],
            None => &self.text,
        }
    }

    /// `scheme://[user-info@]hosts` as written (user-info not decoded).
    pub fn scheme_and_authority(&self) -> String {
        format!(
            "{}://{}",
            &self.text[..self.text.find("://").unwrap_or(0)],
            self.authority
        )
    }

    /// The raw query's pairs, as written, that `keep` accepts.
    fn raw_query(&self, keep: impl Fn(&UrlOption) -> bool) -> Option<String> {
        let kept: Vec<&str> = self
            .options
            .iter()
            .filter(|option| keep(option))
            .map(|option| option.raw.as_str())
            .collect();
        (!kept.is_empty()).then(|| kept.join("&"))
    }

    /// The query as written, `None` when there is none (or it is empty).
    pub fn query(&self) -> Option<String> {
        self.raw_query(|_| true)
    }

    /// Takes the options named `names` out: the URL as written without
    /// them, and the options taken, in order.
    pub fn without_options(&self, names: &[&str]) -> (String, Vec<UrlOption>) {
        let taken: Vec<UrlOption> = self
            .options
            .iter()
            .filter(|option| names.contains(&option.name.as_str()))
            .cloned()
            .collect();
        if taken.is_empty() {
            return (self.text.clone(), taken);
        }
        let mut rest = self.base().to_owned();
        if let Some(query) = self.raw_query(|option| !names.contains(&option.name.as_str())) {
            rest.push('?');
            rest.push_str(&query);
        }
        (rest, taken)
    }
}

/// Why an engine could not be opened; its URL is [`redact`]ed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URL names no engine this crate opens.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The store's file could not be opened, or its tables installed.
    #[error("cannot open store {url}: {source}")]
    Store {
        /// The URL, redacted.
        url: String,
        /// What the store said.
        #[source]
        source: StoreError,
    },
    /// An existing service database was asked for, and the file is
    /// missing, not a service's, or could not be opened.
    #[error("cannot open store {url}: {source}")]
    Existing {
        /// The URL, redacted.
        url: String,
        /// Why it was refused.
        #[source]
        source: ExistingError,
    },
    /// The embedded log's file could not be opened.
    #[error("cannot open bus {url}: {source}")]
    Bus {
        /// The URL, redacted.
        url: String,
        /// What the log said.
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
                ..Default::default()
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
    let (path, options) = store_path_and_options(url)?;
    SqliteStore::open(&path, options)
        .await
        .map_err(|source| OpenError::Store {
            url: redact(url),
            source,
        })
}

/// The file and options of a `sqlite://` store URL.
fn store_path_and_options(url: &str) -> Result<(PathBuf, SqliteOptions), OpenError> {
    match parse(url)? {
        EngineUrl::Sqlite {
            path, synchronous, ..
        } => Ok((
            path,
            SqliteOptions {
                synchronous: synchronous.unwrap_or_default(),
                ..SqliteOptions::default()
            },
        )),
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
    /// The key, such as `host` or `sslmode`.
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
    let (path, options) = store_path_and_options(url)?;
    SqliteStore::open_existing(&path, options)
        .await
        .map_err(|source| OpenError::Existing {
            url: redact(url),
            source,
        })
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

    fn hosts(parsed: &ParsedUrl) -> Vec<String> {
        parsed.hosts().iter().map(ToString::to_string).collect()
    }

    fn options(parsed: &ParsedUrl) -> Vec<(&str, &str)> {
        parsed
            .options()
            .iter()
            .map(|option| (option.name.as_str(), option.value.as_str()))
            .collect()
    }

    #[test]
    fn one_parser_reads_every_engines_url() {
        // sqlite: the path as written, absolute or relative.
        for (url, path) in [
            ("sqlite:///var/lib/bus.db?partitions=4", "/var/lib/bus.db"),
            ("sqlite://relative.db", "relative.db"),
            ("sqlite://./data/bus.db", "./data/bus.db"),
            ("sqlite://data/bus.db?synchronous=off", "data/bus.db"),
            ("SQLite:///tmp/a%41 b#c.db", "/tmp/a%41 b#c.db"),
        ] {
            let parsed = ParsedUrl::parse(url).unwrap();
            assert_eq!(parsed.scheme(), "sqlite", "{url}");
            assert_eq!(parsed.path(), path, "{url}");
            assert!(parsed.hosts().is_empty(), "{url}");
        }
        // Kafka: a comma list of brokers, IPv6 among them.
        let parsed =
            ParsedUrl::parse("kafka://h1:9092, 10.0.0.2:9093,[::1]:9094/?acks=all&partitions=8")
                .unwrap();
        assert_eq!(hosts(&parsed), ["h1:9092", "10.0.0.2:9093", "[::1]:9094"]);
        assert_eq!(parsed.path(), "/");
        assert_eq!(options(&parsed), [("acks", "all"), ("partitions", "8")]);
        // NATS: user-info decoded, a bare option.
        let parsed = ParsedUrl::parse("nats://al%40ice:pa%2Fss@Example.org:4222?tls").unwrap();
        assert_eq!(
            (parsed.user(), parsed.password()),
            ("al@ice", Some("pa/ss"))
        );
        assert_eq!(hosts(&parsed), ["Example.org:4222"]);
        assert!(!parsed.options()[0].has_value);
        // PostgreSQL: hosts with and without ports, a database, options.
        let parsed =
            ParsedUrl::parse("postgres://app:pw@h1:5432,h2/orders?sslmode=require#x").unwrap();
        assert_eq!(hosts(&parsed), ["h1:5432", "h2"]);
        assert_eq!(parsed.path(), "/orders");
        assert_eq!(
            parsed.scheme_and_authority(),
            "postgres://app:pw@h1:5432,h2"
        );
        assert_eq!(parsed.query().as_deref(), Some("sslmode=require"));
        assert_eq!(
            parsed.without_options(&["sslmode"]).0,
            "postgres://app:pw@h1:5432,h2/orders"
        );
        for bad in [
            "bus.db",
            "kafka://h1:9092,",
            "kafka://h1:9092,h2:port",
            "nats://u:p@h:port",
            "postgres://u:p@[::1/db",
        ] {
            assert!(ParsedUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_plus_is_a_plus_and_escapes_are_decoded_once() {
        for url in [
            "sqlite:///x.db?token=a+b%2B%20c",
            "kafka://h1:1,h2:2?token=a+b%2B%20c",
            "nats://h:1?token=a+b%2B%20c",
            "postgres://u@h/db?token=a+b%2B%20c",
        ] {
            let parsed = ParsedUrl::parse(url).unwrap();
            assert_eq!(options(&parsed), [("token", "a+b+ c")], "{url}");
            // Taken out or kept, the rest of the URL is as written.
            let (rest, _) = parsed.without_options(&["other"]);
            assert_eq!(rest, url);
        }
    }

    #[test]
    fn a_bad_escape_names_the_option_and_never_shows_it() {
        for url in [
            "sqlite:///x.db?password=%FF-s3cret",
            "kafka://h1:1,h2:2?sasl.password=%C3-s3cret",
            "nats://h:1?token=%FF-s3cret",
            "nats://u:%FF-s3cret@h:1",
            "postgres://u@h/db?password=%FF-s3cret",
        ] {
            let error = parse(url).unwrap_err().to_string();
            assert!(!error.contains("s3cret"), "{error}");
            assert!(
                error.contains("password is not UTF-8")
                    || error.contains("token is not UTF-8")
                    || error.contains("user-info is not UTF-8"),
                "{error}"
            );
        }
        let error = format!("{:?}", ParsedUrl::parse("nats://h?token=s3cret").unwrap());
        assert!(!error.contains("s3cret"), "{error}");
    }
}
