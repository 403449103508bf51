//! Shared helpers: a NATS bus in a namespace of its own per test.
#![allow(dead_code)]

use tandem_nats::NatsBus;

/// The test server's URL: `TANDEM_TEST_NATS`, default `nats://127.0.0.1:4222`.
pub fn test_url() -> String {
    std::env::var("TANDEM_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A unique subject prefix (and stream name prefix).
pub fn unique_prefix() -> String {
    format!("t{}", uuid::Uuid::now_v7().simple())
}

/// Connects with `prefix` and extra URL options; fails the test when NATS
/// is not there.
pub async fn connect(prefix: &str, extra: &str) -> NatsBus {
    let base = test_url();
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}prefix={prefix}{extra}");
    match NatsBus::connect(&url).await {
        Ok(bus) => bus,
        Err(error) => panic!(
            "NATS not reachable at 127.0.0.1:4222: start it with scripts/engines up ({error})"
        ),
    }
}

/// Deletes the namespace's streams when dropped (best effort).
pub struct Namespace(pub NatsBus);

impl Drop for Namespace {
    fn drop(&mut self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            return;
        }
        let bus = self.0.clone();
        tokio::task::block_in_place(|| {
            handle.block_on(async move {
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(5), bus.delete_streams())
                        .await;
            })
        });
    }
}
