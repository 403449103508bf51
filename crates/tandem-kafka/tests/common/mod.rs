//! Helpers for the tests against a real Kafka-compatible broker.
#![allow(dead_code)]

use tandem_kafka::{CreatedTopics, KafkaBus};

/// The broker under test: `TANDEM_TEST_KAFKA`, default the local tansu.
pub fn test_url() -> String {
    std::env::var("TANDEM_TEST_KAFKA").unwrap_or_else(|_| "kafka://127.0.0.1:19092".to_owned())
}

/// Connects to the test broker; a broker that does not answer fails the
/// test (never skips it).
pub async fn connect() -> KafkaBus {
    let url = test_url();
    match KafkaBus::connect(&url).await {
        Ok(bus) => bus,
        Err(error) => {
            let address = url
                .trim_start_matches("kafka://")
                .split('?')
                .next()
                .unwrap_or_default()
                .to_owned();
            panic!(
                "Kafka-compatible broker not reachable at {address}: start it with scripts/engines up ({error})"
            )
        }
    }
}

/// Deletes the topics a test's bus created when dropped, only if
/// `TANDEM_TEST_KAFKA_DELETE_TOPICS=1`: tansu 0.6's SQL storage engines
/// delete every topic of the cluster on one DeleteTopics request, so on a
/// shared tansu the scratch topics stay (they are uniquely named).
pub struct Scratch {
    topics: CreatedTopics,
}

impl Scratch {
    pub fn new(bus: &KafkaBus) -> Self {
        Self {
            topics: bus.created_topics(),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var("TANDEM_TEST_KAFKA_DELETE_TOPICS").as_deref() != Ok("1") {
            return;
        }
        let names = self.topics.names();
        if names.is_empty() {
            return;
        }
        // Dropped inside the test's runtime: clean up on a thread of its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let Ok(bus) = KafkaBus::connect(&test_url()).await else {
                    return;
                };
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                if let Err(error) = bus.delete_topics(&names).await {
                    eprintln!("could not delete scratch topics {names:?}: {error}");
                }
            });
        });
        let _ = cleanup.join();
    }
}
