//! `kafka://` URLs and `TANDEM_KAFKA_*` environment variables to settings.

use std::collections::BTreeMap;
use std::time::Duration;

use tandem::bus::BusError;
pub use tandem::engine::{is_secret, redact};
use tandem::engine::{ParsedUrl, UrlSyntaxError};

/// The environment variables' prefix: `TANDEM_KAFKA_SASL_PASSWORD` sets the
/// librdkafka property `sasl.password`.
pub const ENV_PREFIX: &str = "TANDEM_KAFKA_";

/// Settings of a [`KafkaBus`](crate::KafkaBus), read from a URL.
///
/// Everything but the options listed here passes through to librdkafka,
/// for the producer, the consumers and the admin client alike (TLS, SASL,
/// timeouts, compression, ...).
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: the comma-separated `host:port` list of the URL.
    pub brokers: String,
    /// Partitions of the topics this bus creates (option `partitions`,
    /// default 4).
    pub partitions: i32,
    /// Replication factor of the topics this bus creates (option
    /// `replication`, default 1).
    pub replication: i32,
    /// How long [`KafkaBus::connect`](crate::KafkaBus::connect) waits for
    /// the cluster's metadata (option `connect_timeout_ms`, default 8000).
    pub connect_timeout: Duration,
    /// `retention.ms` of the topics this bus creates (option `retain_log`,
    /// an age such as `7d` or `keep`; default 7 days, Kafka's own default,
    /// written out so that it is explicit and documented). `None` keeps
    /// records for good (`retention.ms=-1`).
    pub retain_log: Option<Duration>,
    /// `retention.bytes` of each partition of the topics this bus creates
    /// (option `retain_log_bytes`; default none, no size limit).
    pub retain_log_bytes: Option<u64>,
    /// How many relay batches may be in flight to the brokers at once
    /// (option `publish_depth`, default [`DEFAULT_PUBLISH_DEPTH`]; 1
    /// waits for each batch's acknowledgements before the next is sent).
    /// The idempotent producer keeps them in order per partition.
    pub publish_depth: usize,
    /// librdkafka properties, applied after this crate's defaults.
    pub properties: BTreeMap<String, String>,
}

/// Relay batches unacknowledged at once by default: one. On tansu, which
/// serves produce requests one at a time, 2 and 4 gave smaller, more
/// frequent batches and a worse pipeline (p50 46–73 ms against 36–41 ms
/// at 1,500 events/s, `bench pipeline --bus kafka://…?publish_depth=N`,
/// 2026-12-03); a cluster that takes several requests at once may gain
/// from more.
pub const DEFAULT_PUBLISH_DEPTH: usize = 1;

/// Kafka's own default `retention.ms`, and Tandem's embedded log's.
pub const DEFAULT_RETAIN_LOG: Duration = Duration::from_secs(7 * 24 * 60 * 60);

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secret properties (sasl.password, ...) stay out of logs.
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(name, value)| {
                let shown = if is_secret(name) {
                    "***"
                } else {
                    value.as_str()
                };
                (name.as_str(), shown)
            })
            .collect();
        formatter
            .debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("connect_timeout", &self.connect_timeout)
            .field("retain_log", &self.retain_log)
            .field("retain_log_bytes", &self.retain_log_bytes)
            .field("publish_depth", &self.publish_depth)
            .field("properties", &properties)
            .finish()
    }
}

impl KafkaConfig {
    /// Parses `kafka://host:port[,host:port]?option=value&...`, with
    /// `TANDEM_KAFKA_*` variables from the process environment underneath
    /// (the URL wins over the environment).
    pub fn from_url(url: &str) -> Result<Self, BusError> {
        Self::from_url_and_env(url, std::env::vars())
    }

    /// [`from_url`](Self::from_url) with the environment given explicitly.
    pub fn from_url_and_env(
        url: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, BusError> {
        let invalid = |why: String| BusError::Invalid(format!("{}: {why}", redact(url)).into());
        let parsed = ParsedUrl::parse(url).map_err(|error| match error {
            UrlSyntaxError::NoScheme => invalid("not a URL (expected kafka://host:port)".into()),
            error => invalid(error.to_string()),
        })?;
        if parsed.scheme() != "kafka" {
            return Err(invalid(format!("scheme {} is not kafka", parsed.scheme())));
        }
        if !matches!(parsed.path(), "" | "/")
            || !parsed.user().is_empty()
            || parsed.password().is_some()
        {
            return Err(invalid(
                "expected kafka://host:port[,host:port] with no path or user \
                 (credentials go in sasl.username/sasl.password options or TANDEM_KAFKA_* variables)"
                    .into(),
            ));
        }
        if parsed.hosts().is_empty() {
            return Err(invalid("no broker host:port".into()));
        }
        let brokers: Vec<String> = parsed.hosts().iter().map(ToString::to_string).collect();

        let mut options: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in env {
            if let Some(property) = name.strip_prefix(ENV_PREFIX) {
                if property.is_empty() {
                    continue;
                }
                options.insert(property.to_ascii_lowercase().replace('_', "."), value);
            }
        }
        for option in parsed.options() {
            if !option.has_value {
                let shown = if is_secret(&option.name) {
                    "(not shown)"
                } else {
                    &option.name
                };
                return Err(invalid(format!("option {shown} has no value")));
            }
            options.insert(option.name.clone(), option.value.clone());
        }

        let mut config = KafkaConfig {
            brokers: brokers.join(","),
            partitions: 4,
            replication: 1,
            connect_timeout: Duration::from_secs(8),
            retain_log: Some(DEFAULT_RETAIN_LOG),
            retain_log_bytes: None,
            publish_depth: DEFAULT_PUBLISH_DEPTH,
            properties: BTreeMap::new(),
        };
        for (name, value) in options {
            match name.as_str() {
                "partitions" => {
                    config.partitions = value
                        .parse()
                        .ok()
                        .filter(|partitions| *partitions >= 1)
                        .ok_or_else(|| {
                            invalid(format!("partitions={value}: need an integer >= 1"))
                        })?;
                }
                "replication" => {
                    config.replication = value
                        .parse()
                        .ok()
                        .filter(|replication| *replication >= 1)
                        .ok_or_else(|| {
                            invalid(format!("replication={value}: need an integer >= 1"))
                        })?;
                }
                "connect_timeout_ms" => {
                    let millis: u64 = value.parse().map_err(|_| {
                        invalid(format!("connect_timeout_ms={value}: need milliseconds"))
                    })?;
                    config.connect_timeout = Duration::from_millis(millis.max(1));
                }
                // Topic settings, not librdkafka properties (environment
                // variables arrive with dots: TANDEM_KAFKA_RETAIN_LOG).
                "retain_log" | "retain.log" => {
                    config.retain_log = tandem::retention::parse_age(&value)
                        .map_err(|why| invalid(format!("retain_log={value}: {why}")))?;
                }
                "retain_log_bytes" | "retain.log.bytes" => {
                    config.retain_log_bytes = Some(
                        value
                            .parse()
                            .ok()
                            .filter(|bytes| *bytes >= 1)
                            .ok_or_else(|| {
                                invalid(format!("retain_log_bytes={value}: need bytes >= 1"))
                            })?,
                    );
                }
                "publish_depth" | "publish.depth" => {
                    config.publish_depth = value
                        .parse()
                        .ok()
                        .filter(|depth| (1..=64).contains(depth))
                        .ok_or_else(|| {
                            invalid(format!(
                                "publish_depth={value}: need an integer from 1 to 64"
                            ))
                        })?;
                }
                "bootstrap.servers" | "metadata.broker.list" => {
                    return Err(invalid(format!(
                        "{name}: the brokers are the URL's host:port list"
                    )))
                }
                "group.id" => {
                    return Err(invalid(
                        "group.id: consumer groups are named by the subscriber".into(),
                    ))
                }
                _ => {
                    config.properties.insert(name, value);
                }
            }
        }
        if config.publish_depth > 1
            && config
                .properties
                .get("enable.idempotence")
                .is_some_and(|value| value != "true")
        {
            return Err(invalid(format!(
                "publish_depth={} needs enable.idempotence=true: without it a retried batch can land behind the next",
                config.publish_depth
            )));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str, env: &[(&str, &str)]) -> Result<KafkaConfig, BusError> {
        KafkaConfig::from_url_and_env(
            url,
            env.iter()
                .map(|(name, value)| (name.to_string(), value.to_string())),
        )
    }

    #[test]
    fn brokers_options_and_pass_through() {
        let config = parse(
            "kafka://10.0.0.1:9092,10.0.0.2:9093?partitions=8&replication=3&security.protocol=SASL_SSL&sasl.password=p%26ss",
            &[],
        )
        .unwrap();
        assert_eq!(config.brokers, "10.0.0.1:9092,10.0.0.2:9093");
        assert_eq!(config.partitions, 8);
        assert_eq!(config.replication, 3);
        assert_eq!(config.properties["security.protocol"], "SASL_SSL");
        assert_eq!(config.properties["sasl.password"], "p&ss");
    }

    #[test]
    fn defaults() {
        let config = parse("kafka://127.0.0.1:19092", &[]).unwrap();
        assert_eq!(config.partitions, 4);
        assert_eq!(config.replication, 1);
        assert!(config.properties.is_empty());
        assert_eq!(config.connect_timeout, Duration::from_secs(8));
        assert_eq!(config.retain_log, Some(DEFAULT_RETAIN_LOG));
        assert_eq!(config.retain_log_bytes, None);
        assert_eq!(config.publish_depth, DEFAULT_PUBLISH_DEPTH);
    }

    #[test]
    fn publish_depth_is_an_option_not_a_property() {
        let config = parse("kafka://h:1?publish_depth=3", &[]).unwrap();
        assert_eq!(config.publish_depth, 3);
        assert!(config.properties.is_empty(), "not passed to librdkafka");
        for bad in [
            "publish_depth=0",
            "publish_depth=65",
            "publish_depth=many",
            "publish_depth=2&enable.idempotence=false",
        ] {
            let refused = parse(&format!("kafka://h:1?{bad}"), &[]);
            assert!(
                matches!(&refused, Err(BusError::Invalid(why)) if why.to_string().contains("publish_depth")),
                "{bad} must be refused naming the option: {refused:?}"
            );
        }
    }

    #[test]
    fn retention_of_created_topics() {
        let config = parse("kafka://h:1?retain_log=36h&retain_log_bytes=1000000", &[]).unwrap();
        assert_eq!(config.retain_log, Some(Duration::from_secs(36 * 3600)));
        assert_eq!(config.retain_log_bytes, Some(1_000_000));
        assert!(config.properties.is_empty(), "not passed to librdkafka");
        let kept = parse("kafka://h:1", &[("TANDEM_KAFKA_RETAIN_LOG", "keep")]).unwrap();
        assert_eq!(kept.retain_log, None);
        for bad in ["retain_log=7", "retain_log=soon", "retain_log_bytes=0"] {
            assert!(
                matches!(
                    parse(&format!("kafka://h:1?{bad}"), &[]),
                    Err(BusError::Invalid(_))
                ),
                "{bad} must be refused"
            );
        }
    }

    #[test]
    fn environment_underneath_the_url() {
        let config = parse(
            "kafka://h:1?sasl.username=from-url",
            &[
                ("TANDEM_KAFKA_SASL_PASSWORD", "secret"),
                ("TANDEM_KAFKA_SASL_USERNAME", "from-env"),
                ("TANDEM_KAFKA_PARTITIONS", "2"),
                ("TANDEM_TEST_KAFKA", "kafka://elsewhere:1"),
                ("OTHER", "x"),
            ],
        )
        .unwrap();
        assert_eq!(config.properties["sasl.password"], "secret");
        assert_eq!(config.properties["sasl.username"], "from-url");
        assert_eq!(config.partitions, 2);
        assert_eq!(config.properties.len(), 2);
    }

    #[test]
    fn bad_urls_are_invalid() {
        for url in [
            "nats://h:1",
            "kafka://",
            "kafka://h:1,",
            "kafka://user:pw@h:1",
            "kafka://h:1/path",
            "kafka://h:1?partitions=0",
            "kafka://h:1?partitions",
            "kafka://h:1?group.id=x",
            "h:1",
        ] {
            assert!(
                matches!(parse(url, &[]), Err(BusError::Invalid(_))),
                "{url} must be refused"
            );
        }
    }

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(
            redact("kafka://h:1?sasl.password=x&partitions=2"),
            "kafka://h:1?sasl.password=***&partitions=2"
        );
        let config = parse("kafka://h:1?sasl.password=p%26ss-s3cret", &[]).unwrap();
        assert!(!format!("{config:?}").contains("s3cret"), "{config:?}");
        for url in [
            "kafka://u:pw-s3cret@h:1",
            "kafka://h:1?sasl.password=%FF-s3cret",
            "kafka://h:1?sasl.password=s3cret&partitions=0",
        ] {
            let error = parse(url, &[]).unwrap_err().to_string();
            assert!(!error.contains("s3cret"), "{error}");
        }
    }
}
