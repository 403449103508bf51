//! The architecture's absences, checked on the dependency graph that cargo
//! resolves: services never depend on each other, domain crates never see
//! an engine crate, the toolkit knows no domain, the shipped binary carries
//! no test or benchmark code.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// `cargo metadata` of the workspace's own packages.
fn metadata() -> serde_json::Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--no-deps",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Direct normal (non-dev) dependencies of each workspace crate.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    metadata()["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|package| {
            let name = package["name"].as_str().unwrap().to_owned();
            let normal = package["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|dependency| dependency["kind"].is_null())
                .map(|dependency| dependency["name"].as_str().unwrap().to_owned())
                .collect();
            (name, normal)
        })
        .collect()
}

const SERVICES: [&str; 3] = ["customer-service", "inventory-service", "order-service"];
const ENGINES: [&str; 5] = ["rusqlite", "sqlx", "postgres", "rdkafka", "async-nats"];

#[test]
fn services_share_only_the_contracts() {
    let graph = dependencies();
    for service in SERVICES {
        let deps = graph
            .get(service)
            .unwrap_or_else(|| panic!("{service} is not in the workspace"));
        for other in SERVICES.iter().filter(|other| **other != service) {
            assert!(!deps.contains(*other), "{service} depends on {other}");
        }
        assert!(
            deps.contains("tandem-contracts"),
            "{service} should speak the shared contracts"
        );
        for engine in ENGINES {
            assert!(
                !deps.contains(engine),
                "{service} names the engine crate {engine}"
            );
        }
        for client in ["reqwest", "hyper-util", "ureq"] {
            assert!(
                !deps.contains(client),
                "{service} has an HTTP client ({client}): services never call each other"
            );
        }
    }
}

#[test]
fn the_toolkit_knows_no_domain() {
    let graph = dependencies();
    for crate_name in ["tandem", "tandem-service"] {
        let deps = &graph[crate_name];
        for domain in SERVICES
            .iter()
            .chain(["tandem-contracts", "tandem-testkit"].iter())
        {
            assert!(!deps.contains(*domain), "{crate_name} depends on {domain}");
        }
    }
    assert!(
        !graph["tandem-contracts"].contains("rusqlite"),
        "contracts name an engine"
    );
}

/// Engine crates Tandem ships, and the drivers they wrap.
const ENGINE_CRATES: [&str; 4] = [
    "tandem-postgres",
    "tandem-kafka",
    "tandem-nats",
    "tandem-engines",
];
/// The packages of the shipped `tandem` binary and of the development
/// tools' `tandem-lab`.
const BINARIES: [&str; 2] = ["tandem-cli", "tandem-lab"];
const DRIVERS: [&str; 4] = ["postgres", "tokio-postgres", "rdkafka", "async-nats"];

#[test]
fn engines_are_chosen_in_one_place() {
    let graph = dependencies();
    for (crate_name, deps) in &graph {
        for engine in ENGINE_CRATES {
            let allowed = match engine {
                // The one crate that opens engines by URL, and the binaries.
                "tandem-engines" => BINARIES.contains(&crate_name.as_str()),
                _ => crate_name == "tandem-engines" || BINARIES.contains(&crate_name.as_str()),
            };
            assert!(
                allowed || !deps.contains(engine),
                "{crate_name} depends on {engine}: only tandem-engines (and the binaries) choose engines"
            );
        }
        for driver in DRIVERS {
            let owner = match driver {
                "postgres" | "tokio-postgres" => "tandem-postgres",
                "rdkafka" => "tandem-kafka",
                _ => "tandem-nats",
            };
            // The one exception: the development tools' raw latency loop
            // (`bench pipeline --bus`) measures the broker through its
            // plain client, which is the point of it: never through the
            // adapter, and never in what ships.
            let raw_loop = crate_name == "tandem-lab" && matches!(driver, "rdkafka" | "async-nats");
            assert!(
                crate_name == owner || raw_loop || !deps.contains(driver),
                "{crate_name} names the driver {driver}, which only {owner} wraps"
            );
        }
    }
}

/// Test and benchmark code stays out of what ships: the package that builds
/// the `tandem` binary links the test kit through no normal dependency (the
/// benchmarks and crash-test workers that need it are in `tandem-lab`).
#[test]
fn the_shipped_binary_carries_no_test_kit() {
    let metadata = metadata();
    let packages = metadata["packages"].as_array().unwrap();
    let shipped: Vec<&str> = packages
        .iter()
        .filter(|package| {
            package["targets"].as_array().unwrap().iter().any(|target| {
                target["name"] == "tandem"
                    && target["kind"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|kind| kind == "bin")
            })
        })
        .map(|package| package["name"].as_str().unwrap())
        .collect();
    assert_eq!(shipped, ["tandem-cli"], "the package of the tandem binary");
    // Everything the binary links from the workspace, through normal
    // dependencies only.
    let graph = dependencies();
    let mut linked = BTreeSet::new();
    let mut next = vec!["tandem-cli".to_owned()];
    while let Some(name) = next.pop() {
        for dependency in graph.get(&name).into_iter().flatten() {
            if graph.contains_key(dependency) && linked.insert(dependency.clone()) {
                next.push(dependency.clone());
            }
        }
    }
    assert!(linked.contains("tandem"), "the walk found {linked:?}");
    for kit in ["tandem-testkit", "tandem-lab"] {
        assert!(
            !linked.contains(kit),
            "the tandem binary links {kit}: {linked:?}"
        );
    }
}
