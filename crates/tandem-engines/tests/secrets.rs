//! Secrets in engine URLs never reach an error message or a redacted URL:
//! one case per way a secret can sit in a URL (issue 18, point 7). Opening
//! goes to real engines: PostgreSQL and NATS where they run, closed ports
//! where the open must fail.

use tandem_engines::{open_bus, open_store, redact};

/// Fails naming the secret if `text` shows it.
fn assert_hidden(text: &str, secret: &str) {
    assert!(
        !text.contains(secret),
        "the secret {secret:?} is shown in: {text}"
    );
}

async fn store_error(url: &str) -> String {
    match open_store(url).await {
        Ok(_) => panic!("opening the store must fail"),
        Err(error) => error.to_string(),
    }
}

async fn bus_error(url: &str) -> String {
    match open_bus(url).await {
        Ok(_) => panic!("opening the bus must fail"),
        Err(error) => error.to_string(),
    }
}

#[tokio::test]
async fn a_slash_in_the_password_is_not_shown() {
    let url = "postgres://app:pa/ss-s3cret@127.0.0.1:1/orders";
    assert_hidden(&redact(url), "s3cret");
    assert_hidden(&store_error(url).await, "s3cret");
    let url = "nats://app:pa/ss-s3cret@127.0.0.1:1";
    assert_hidden(&redact(url), "s3cret");
    assert_hidden(&bus_error(url).await, "s3cret");
}

#[tokio::test]
async fn secret_query_options_are_masked() {
    for (url, secret) in [
        (
            "postgres://app@127.0.0.1:1/orders?password=pw-s3cret&sslmode=disable",
            "pw-s3cret",
        ),
        (
            "kafka://127.0.0.1:1?sasl.password=sasl-s3cret&security.protocol=SASL_PLAINTEXT",
            "sasl-s3cret",
        ),
        (
            "nats://127.0.0.1:1?token=tok-s3cret&connect_timeout_ms=200",
            "tok-s3cret",
        ),
    ] {
        let shown = redact(url);
        assert_hidden(&shown, secret);
        assert!(shown.contains("=***"), "{shown} masks nothing");
    }
    // The option names stay, so a message still says what was set.
    assert_eq!(
        redact("kafka://127.0.0.1:1?sasl.password=x&partitions=2"),
        "kafka://127.0.0.1:1?sasl.password=***&partitions=2"
    );
    assert_hidden(
        &store_error("postgres://app@127.0.0.1:1/orders?password=pw-s3cret&sslmode=disable").await,
        "pw-s3cret",
    );
    assert_hidden(
        &bus_error("nats://127.0.0.1:1?token=tok-s3cret&connect_timeout_ms=200").await,
        "tok-s3cret",
    );
    // A bad option beside a secret one: the message names the option, not
    // the secret.
    assert_hidden(
        &bus_error("kafka://127.0.0.1:1?sasl.password=%zz-s3cret&partitions=0").await,
        "s3cret",
    );
    assert_hidden(
        &bus_error("kafka://user:kafka-s3cret@127.0.0.1:1").await,
        "kafka-s3cret",
    );
}

#[tokio::test]
async fn a_nats_token_in_the_user_info_is_not_shown() {
    let url = "nats://tok-s3cret@127.0.0.1:1?connect_timeout_ms=200";
    assert_hidden(&redact(url), "tok-s3cret");
    assert_hidden(&bus_error(url).await, "tok-s3cret");
    // User and password alike: the whole user-info goes.
    assert_eq!(
        redact("postgres://app:s3cret@db:5432/orders?sslmode=require"),
        "postgres://db:5432/orders?sslmode=require"
    );
}

#[tokio::test]
async fn unparsable_urls_are_never_echoed() {
    for url in [
        "app:pw-s3cret@db:5432/orders",
        "nats://app:pw-s3cret@host:notaport",
        "postgres://app:pw-s3cret@[::1/orders",
    ] {
        assert_hidden(&redact(url), "s3cret");
        assert_hidden(&store_error(url).await, "s3cret");
        assert_hidden(&bus_error(url).await, "s3cret");
    }
    // A sqlite URL with an unknown option that holds a secret.
    assert_hidden(
        &bus_error("sqlite:///tmp/x.db?password=pw-s3cret").await,
        "s3cret",
    );
}

#[tokio::test]
async fn the_key_value_postgres_form_opens_and_hides_its_password() {
    // Refused (nothing listens on port 1), without the password.
    let url =
        "host=127.0.0.1 port=1 user=postgres dbname=orders password='kv s3cret' connect_timeout=2";
    let shown = redact(url);
    assert_hidden(&shown, "s3cret");
    assert!(shown.contains("password=***"), "{shown}");
    assert!(shown.contains("host=127.0.0.1"), "{shown}");
    let error = store_error(url).await;
    assert_hidden(&error, "s3cret");
    assert!(error.contains("127.0.0.1:1"), "{error}");

    // Accepted: the documented form opens a store (trust auth ignores the
    // password).
    let scratch = tandem_postgres::testing::ScratchDatabase::create(
        &tandem_postgres::testing::base_url(),
        "kv_form",
    )
    .await
    .unwrap();
    let store = open_store(&format!(
        "host=127.0.0.1 port=5432 user=postgres dbname={} password=kv-s3cret sslmode=disable",
        scratch.name()
    ))
    .await
    .unwrap_or_else(|error| panic!("the key=value form must open: {error}"));
    use tandem::store::Store;
    let answer = store
        .read(|tx| tx.query("SELECT 41 + 1", &[]))
        .await
        .unwrap();
    assert_eq!(answer.len(), 1);
}

/// A bad escape (`%FF`, not UTF-8 once decoded) in a secret option, on
/// every engine: the error names the option and shows nothing of it.
#[tokio::test]
async fn a_bad_escape_in_a_secret_is_named_never_shown() {
    for (url, option) in [
        ("sqlite:///tmp/x.db?password=%FF-s3cret", "password"),
        (
            "kafka://127.0.0.1:1,127.0.0.1:2?sasl.password=%FF-s3cret",
            "sasl.password",
        ),
        ("nats://127.0.0.1:1?token=%FF-s3cret", "token"),
        ("nats://app:%FF-s3cret@127.0.0.1:1", "user-info"),
    ] {
        let error = bus_error(url).await;
        assert_hidden(&error, "s3cret");
        assert!(error.contains(&format!("{option} is not UTF-8")), "{error}");
    }
    let error = store_error("postgres://app@127.0.0.1:1/orders?password=%FF-s3cret").await;
    assert_hidden(&error, "s3cret");
    assert!(error.contains("password is not UTF-8"), "{error}");
    // The engines' own readers, called directly, say the same.
    let error = tandem_kafka::KafkaConfig::from_url_and_env(
        "kafka://h:1?sasl.password=%FF-s3cret",
        std::iter::empty(),
    )
    .unwrap_err()
    .to_string();
    assert_hidden(&error, "s3cret");
    assert!(error.contains("sasl.password"), "{error}");
    let error = tandem_nats::NatsConfig::from_url("nats://h:1?token=%FF-s3cret")
        .unwrap_err()
        .to_string();
    assert_hidden(&error, "s3cret");
    assert!(error.contains("token"), "{error}");
}

/// One rule for `+` on every engine: a plus stays a plus (secrets such as
/// base64 tokens hold one), `%2B` is a plus too, and a space is `%20`.
#[tokio::test]
async fn a_plus_in_an_option_is_a_plus_on_every_engine() {
    let kafka = tandem_kafka::KafkaConfig::from_url_and_env(
        "kafka://h1:9092,h2:9092?sasl.password=a+b%2Bc%20d",
        std::iter::empty(),
    )
    .unwrap();
    assert_eq!(kafka.brokers, "h1:9092,h2:9092");
    assert_eq!(kafka.properties["sasl.password"], "a+b+c d");
    let nats = tandem_nats::NatsConfig::from_url("nats://h:1?token=a+b%2Bc%20d").unwrap();
    assert_eq!(nats.token.as_deref(), Some("a+b+c d"));
    // PostgreSQL: the options the store does not read itself reach the
    // server by the same rule.
    let scratch = tandem_postgres::testing::ScratchDatabase::create(
        &tandem_postgres::testing::base_url(),
        "plus_rule",
    )
    .await
    .unwrap();
    let separator = if scratch.url().contains('?') {
        '&'
    } else {
        '?'
    };
    let url = format!("{}{separator}application_name=a+b%2Bc%20d", scratch.url());
    let store = open_store(&url)
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    use tandem::store::Store;
    let rows = store
        .read(|tx| tx.query("SELECT current_setting('application_name')", &[]))
        .await
        .unwrap();
    assert_eq!(rows[0].text(0).unwrap(), "a+b+c d");
}
