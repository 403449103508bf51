//! `nats://` URLs and the settings they carry.

use std::path::PathBuf;
use std::time::Duration;

use tandem::bus::BusError;
use tandem::engine::{redact, ParsedUrl, UrlSyntaxError};

/// Everything [`crate::NatsBus`] needs to connect and to shape its streams
/// and consumers. [`NatsConfig::from_url`] reads it from a URL; the fields
/// can also be set directly before [`crate::NatsBus::connect_with`].
#[derive(Clone)]
pub struct NatsConfig {
    /// `host:port` of the server (default port 4222).
    pub server: String,
    /// User and password from the URL's user-info part.
    pub user_password: Option<(String, String)>,
    /// A token (`token=` option or `TANDEM_NATS_TOKEN`).
    pub token: Option<String>,
    /// A `.creds` file (`creds=` option or `TANDEM_NATS_CREDS`).
    pub creds: Option<PathBuf>,
    /// Require TLS (`tls=true`, or a `tls://` URL).
    pub tls: bool,
    /// A CA certificate file for TLS (`tls_ca=`).
    pub tls_ca: Option<PathBuf>,
    /// First token of every subject, and prefix of every stream name
    /// (`prefix=`, default `tandem`).
    pub prefix: String,
    /// Stream replicas (`replicas=`, default 1).
    pub replicas: usize,
    /// The window in which the server drops a publish whose `Nats-Msg-Id`
    /// it has seen (`duplicate_window_ms=`, default 2 minutes).
    pub duplicate_window: Duration,
    /// How long a delivered, unacknowledged message waits before its first
    /// redelivery (`ack_wait_ms=`, default 2 s). See the crate docs for why
    /// this is short, and how it relates to the consumer's `gap_timeout`.
    pub ack_wait: Duration,
    /// Waits before the later redeliveries (`backoff_ms=5000,30000`,
    /// default 5 s then 30 s). The consumer's NATS `BackOff` is
    /// `[ack_wait, backoff...]`.
    pub backoff: Vec<Duration>,
    /// Most messages a durable consumer hands out unacknowledged, over all
    /// members of a group (`max_ack_pending=`, default 20 000).
    pub max_ack_pending: i64,
    /// Messages a subscription asks the server for at a time
    /// (`fetch_batch=`, default 500).
    pub fetch_batch: usize,
    /// How many relay batches may await their acknowledgements at once
    /// (`publish_depth=`, 1 to 64, default 1: each batch's before the next
    /// is sent). One connection's messages reach the server in the order
    /// they were sent. On two shared cores, 4 measured worse than 1 (p99
    /// 38–57 ms against 27–36 ms at half the saturation rate).
    pub publish_depth: usize,
    /// Give up connecting after this long (`connect_timeout_ms=`, default 5 s).
    pub connect_timeout: Duration,
    /// `max_age` of the streams this bus creates (`retain_log=`, an age
    /// such as `7d` or `keep`; default 7 days, as the embedded log and
    /// Kafka). `None`: no age limit.
    pub retain_log: Option<Duration>,
    /// `max_bytes` of the streams this bus creates (`retain_log_bytes=`;
    /// default none).
    pub retain_log_bytes: Option<u64>,
    /// `max_msgs` of the streams this bus creates (`retain_log_records=`;
    /// default none).
    pub retain_log_records: Option<u64>,
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets stay out of logs.
        formatter
            .debug_struct("NatsConfig")
            .field("server", &self.server)
            .field("user", &self.user_password.as_ref().map(|(user, _)| user))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("creds", &self.creds)
            .field("tls", &self.tls)
            .field("tls_ca", &self.tls_ca)
            .field("prefix", &self.prefix)
            .field("replicas", &self.replicas)
            .field("duplicate_window", &self.duplicate_window)
            .field("ack_wait", &self.ack_wait)
            .field("backoff", &self.backoff)
            .field("max_ack_pending", &self.max_ack_pending)
            .field("fetch_batch", &self.fetch_batch)
            .field("publish_depth", &self.publish_depth)
            .field("connect_timeout", &self.connect_timeout)
            .field("retain_log", &self.retain_log)
            .field("retain_log_bytes", &self.retain_log_bytes)
            .field("retain_log_records", &self.retain_log_records)
            .finish()
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            server: "127.0.0.1:4222".into(),
            user_password: None,
            token: None,
            creds: None,
            tls: false,
            tls_ca: None,
            prefix: "tandem".into(),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            ack_wait: Duration::from_secs(2),
            backoff: vec![Duration::from_secs(5), Duration::from_secs(30)],
            max_ack_pending: 20_000,
            fetch_batch: 500,
            publish_depth: 1,
            connect_timeout: Duration::from_secs(5),
            retain_log: Some(Duration::from_secs(7 * 24 * 60 * 60)),
            retain_log_bytes: None,
            retain_log_records: None,
        }
    }
}

fn invalid(message: String) -> BusError {
    BusError::Invalid(message.into())
}

fn millis(name: &str, value: &str) -> Result<Duration, BusError> {
    value
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| {
            invalid(format!(
                "NATS URL option {name}={value}: milliseconds expected"
            ))
        })
}

fn number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, BusError> {
    value
        .parse::<T>()
        .map_err(|_| invalid(format!("NATS URL option {name}={value}: a number expected")))
}

fn positive(name: &str, value: &str) -> Result<u64, BusError> {
    Some(number::<u64>(name, value)?)
        .filter(|number| *number >= 1)
        .ok_or_else(|| {
            invalid(format!(
                "NATS URL option {name}={value}: 1 or more expected"
            ))
        })
}

/// Whether `text` is usable as one or more subject tokens.
pub(crate) fn valid_subject_part(text: &str) -> bool {
    !text.is_empty()
        && text.split('.').all(|token| {
            !token.is_empty()
                && !token
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>')
        })
}

impl NatsConfig {
    /// Reads `nats://[user:pass@]host[:port][?options]` (or `tls://…`,
    /// which implies `tls=true`). Options: `creds`, `token`, `tls`,
    /// `tls_ca`, `prefix`, `replicas`, `duplicate_window_ms`, `ack_wait_ms`,
    /// `backoff_ms` (comma-separated), `max_ack_pending`, `fetch_batch`,
    /// `publish_depth`, `connect_timeout_ms`. Without `creds`/`token` in the URL, the
    /// environment variables `TANDEM_NATS_CREDS` and `TANDEM_NATS_TOKEN`
    /// are used when set.
    pub fn from_url(url: &str) -> Result<NatsConfig, BusError> {
        let mut config = NatsConfig::default();
        let parsed = ParsedUrl::parse(url).map_err(|error| match error {
            UrlSyntaxError::NotUtf8(part) => {
                invalid(format!("NATS URL {part} is not UTF-8 once decoded"))
            }
            error => invalid(format!(
                "not a NATS URL ({error}; nats://host:port expected): {}",
                redact(url)
            )),
        })?;
        match parsed.scheme() {
            "nats" => {}
            "tls" => config.tls = true,
            _ => {
                return Err(invalid(format!(
                    "not a NATS URL (nats://host:port expected): {}",
                    redact(url)
                )))
            }
        }
        let user = parsed.user().to_owned();
        match parsed.password() {
            // `nats://token@host` is NATS's own spelling of a token.
            None if !user.is_empty() => config.token = Some(user),
            None => {}
            Some(pass) => config.user_password = Some((user, pass.to_owned())),
        }
        let host = match parsed.hosts() {
            [host] => host,
            [] => return Err(invalid("NATS URL names no host".into())),
            _ => {
                return Err(invalid(format!(
                    "NATS URL names more than one host: {}",
                    redact(url)
                )))
            }
        };
        if !matches!(parsed.path(), "" | "/") {
            return Err(invalid(format!(
                "NATS URL has a path, which means nothing to NATS: {}",
                redact(url)
            )));
        }
        config.server = format!("{}:{}", host.host, host.port.unwrap_or(4222));
        // Options decoded by the shared rule: `%XX` escapes, a `+` left as
        // it is (tokens may hold one).
        for option in parsed.options() {
            let (name, value) = (option.name.as_str(), option.value.clone());
            match name {
                "creds" => config.creds = Some(PathBuf::from(value)),
                "token" => config.token = Some(value),
                "tls" => {
                    config.tls = match value.as_str() {
                        "true" | "1" | "" => true,
                        "false" | "0" => false,
                        other => {
                            return Err(invalid(format!(
                                "NATS URL option tls={other}: true or false expected"
                            )))
                        }
                    }
                }
                "tls_ca" => {
                    config.tls_ca = Some(PathBuf::from(value));
                    config.tls = true;
                }
                "prefix" => {
                    if !valid_subject_part(&value) {
                        return Err(invalid(format!(
                            "NATS URL option prefix={value}: subject tokens expected"
                        )));
                    }
                    config.prefix = value;
                }
                "replicas" => config.replicas = number(name, &value)?,
                "duplicate_window_ms" => config.duplicate_window = millis(name, &value)?,
                "ack_wait_ms" => config.ack_wait = millis(name, &value)?,
                "backoff_ms" => {
                    config.backoff = value
                        .split(',')
                        .filter(|part| !part.is_empty())
                        .map(|part| millis(name, part))
                        .collect::<Result<_, _>>()?
                }
                "max_ack_pending" => config.max_ack_pending = number(name, &value)?,
                "fetch_batch" => config.fetch_batch = number::<usize>(name, &value)?.max(1),
                "publish_depth" => {
                    config.publish_depth = number::<usize>(name, &value)
                        .ok()
                        .filter(|depth| (1..=64).contains(depth))
                        .ok_or_else(|| {
                            invalid(format!(
                            "NATS URL option publish_depth={value}: need an integer from 1 to 64"
                        ))
                        })?
                }
                "connect_timeout_ms" => config.connect_timeout = millis(name, &value)?,
                "retain_log" => {
                    config.retain_log = tandem::retention::parse_age(&value).map_err(|why| {
                        invalid(format!("NATS URL option retain_log={value}: {why}"))
                    })?
                }
                "retain_log_bytes" => config.retain_log_bytes = Some(positive(name, &value)?),
                "retain_log_records" => config.retain_log_records = Some(positive(name, &value)?),
                other => {
                    return Err(invalid(format!("unknown NATS URL option {other:?}")));
                }
            }
        }
        if config.ack_wait.is_zero() {
            return Err(invalid(
                "NATS URL option ack_wait_ms must be above 0".into(),
            ));
        }
        if config.creds.is_none() {
            if let Some(path) = std::env::var_os("TANDEM_NATS_CREDS").filter(|v| !v.is_empty()) {
                config.creds = Some(PathBuf::from(path));
            }
        }
        if config.token.is_none() && config.user_password.is_none() {
            if let Ok(token) = std::env::var("TANDEM_NATS_TOKEN") {
                if !token.is_empty() {
                    config.token = Some(token);
                }
            }
        }
        Ok(config)
    }

    /// The server's address for messages: `nats://host:port`, no secrets.
    pub fn display_url(&self) -> String {
        let scheme = if self.tls { "tls" } else { "nats" };
        format!("{scheme}://{}", self.server)
    }

    /// NATS `BackOff` of the durable consumers: `[ack_wait, backoff...]`.
    pub(crate) fn backoff_list(&self) -> Vec<Duration> {
        let mut list = vec![self.ack_wait];
        list.extend(self.backoff.iter().copied());
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_user_info_options_and_defaults() {
        let config = NatsConfig::from_url(
            "nats://al%40ice:s3cret@example.org?prefix=acme.prod&replicas=3&duplicate_window_ms=60000&ack_wait_ms=1500&backoff_ms=4000,9000",
        )
        .unwrap();
        assert_eq!(config.server, "example.org:4222");
        assert_eq!(
            config.user_password,
            Some(("al@ice".to_owned(), "s3cret".to_owned()))
        );
        assert_eq!(config.prefix, "acme.prod");
        assert_eq!(config.replicas, 3);
        assert_eq!(config.duplicate_window, Duration::from_secs(60));
        assert_eq!(
            config.backoff_list(),
            vec![
                Duration::from_millis(1500),
                Duration::from_secs(4),
                Duration::from_secs(9)
            ]
        );
        assert_eq!(config.display_url(), "nats://example.org:4222");
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn retention_of_created_streams() {
        let default = NatsConfig::from_url("nats://h").unwrap();
        assert_eq!(default.retain_log, Some(Duration::from_secs(604_800)));
        let config = NatsConfig::from_url(
            "nats://h?retain_log=12h&retain_log_bytes=1000&retain_log_records=50",
        )
        .unwrap();
        assert_eq!(config.retain_log, Some(Duration::from_secs(43_200)));
        assert_eq!(config.retain_log_bytes, Some(1000));
        assert_eq!(config.retain_log_records, Some(50));
        assert_eq!(
            NatsConfig::from_url("nats://h?retain_log=keep")
                .unwrap()
                .retain_log,
            None
        );
        for bad in [
            "retain_log=12",
            "retain_log_bytes=0",
            "retain_log_records=x",
        ] {
            assert!(
                NatsConfig::from_url(&format!("nats://h?{bad}")).is_err(),
                "{bad} must be refused"
            );
        }
    }

    #[test]
    fn tls_token_creds_and_errors() {
        let config =
            NatsConfig::from_url("nats://h:5222?tls=true&tls_ca=/ca.pem&token=abc&creds=/x.creds")
                .unwrap();
        assert!(config.tls);
        assert_eq!(config.token.as_deref(), Some("abc"));
        assert_eq!(config.creds, Some(PathBuf::from("/x.creds")));
        assert_eq!(config.display_url(), "tls://h:5222");
        assert!(NatsConfig::from_url("kafka://h").is_err());
        assert!(NatsConfig::from_url("nats://h?bogus=1").is_err());
        assert!(NatsConfig::from_url("nats://h?prefix=a.*").is_err());
        assert!(NatsConfig::from_url("nats://h?replicas=x").is_err());
        let error = NatsConfig::from_url("redis://u:pw@h?token=t").unwrap_err();
        assert!(!error.to_string().contains("pw"), "{error}");
    }

    #[test]
    fn user_info_is_decoded_and_never_shown() {
        let config = NatsConfig::from_url("nats://s3cret-token@h").unwrap();
        assert_eq!(config.token.as_deref(), Some("s3cret-token"));
        assert_eq!(config.user_password, None);
        let config = NatsConfig::from_url("nats://u:pa%2Fss@[::1]:5000/?token=a+b").unwrap();
        assert_eq!(
            config.user_password,
            Some(("u".to_owned(), "pa/ss".to_owned()))
        );
        assert_eq!(config.server, "[::1]:5000");
        assert_eq!(config.token.as_deref(), Some("a+b"));
        for url in [
            "nats://u:pa/ss-s3cret@h:4222",
            "nats://u:s3cret@h:port",
            "nats://u:s3cret@h/path",
            "nats://h?token=%FF-s3cret",
        ] {
            let error = NatsConfig::from_url(url).unwrap_err().to_string();
            assert!(!error.contains("s3cret"), "{error}");
        }
    }
}
