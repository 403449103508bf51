//! The engines at scale for the end-to-end tests: a scratch PostgreSQL
//! database per service, a namespaced bus URL, and a system of `tandem
//! serve` processes on them. `scripts/engines up` starts the servers; a
//! test that cannot reach one fails naming it.

use std::path::Path;

use tandem_cli::serve::Service;
use tandem_cli::system::System;

/// A scratch PostgreSQL database per service, dropped with the guards.
pub fn databases() -> (
    Vec<(Service, String)>,
    Vec<tandem_postgres::testing::ScratchDatabase>,
) {
    let base = std::env::var("TANDEM_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut urls = Vec::new();
    let mut guards = Vec::new();
    for service in Service::ALL {
        let database = tandem_postgres::testing::ScratchDatabase::create_blocking(
            &base,
            &format!("e2e_{}", service.name()),
        )
        .unwrap_or_else(|error| {
            panic!("PostgreSQL not reachable at {base}: start it with scripts/engines up ({error})")
        });
        urls.push((service, database.url().to_owned()));
        guards.push(database);
    }
    (urls, guards)
}

/// `base` with a namespace of this test's own, so runs sharing a broker
/// never see each other's topics or groups.
pub fn namespaced(base: &str) -> String {
    let separator = if base.contains('?') { '&' } else { '?' };
    format!(
        "{base}{separator}namespace=t{}",
        uuid::Uuid::now_v7().simple()
    )
}

pub fn kafka() -> String {
    std::env::var("TANDEM_TEST_KAFKA").unwrap_or_else(|_| "kafka://127.0.0.1:19092".into())
}

pub fn nats() -> String {
    std::env::var("TANDEM_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

pub async fn system_on(dir: &Path, bus: String, dbs: &[(Service, String)]) -> System {
    System::new(dir, 0)
        .expect("prepare the system")
        .with_executable(env!("CARGO_BIN_EXE_tandem"))
        .with_engines(bus, dbs)
        .with_log_files("warn,tandem::consumer=info")
}
