//! Each service's `/openapi.json`, as a running service serves it, read
//! by an outside OpenAPI 3.1 parser (the `oas3` crate) and held to what
//! the code does: every `{name}` in a path is a declared path parameter,
//! query parameters are in the query, every error answer is a problem
//! document (`application/problem+json`), and an operation with a JSON
//! body documents what the shared plumbing answers for a bad one (400,
//! 408, 413, 415).
//!
//! And held to it by an outside, property-based fuzzer: schemathesis
//! (pinned in `tools/schemathesis`, installed by `scripts/engines up`)
//! drives each running service from its own document, the admin routes
//! with a token, and must find nothing: no server error; no status code,
//! content type, header or body the document does not describe; no valid
//! request refused; no schema-violating request accepted.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{start, url};
use serde_json::Value;
use tandem_cli::serve::Service;
use tandem_cli::system::System;

const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_describes_its_parameters_and_errors_as_the_code_answers() {
    let dir = tempfile::tempdir().unwrap();
    let system = start(dir.path()).await;
    let http = system.http().clone();
    for service in Service::ALL {
        let base = url(&system, service);
        let text = http
            .get(format!("{base}/openapi.json"))
            .send()
            .await
            .expect("GET /openapi.json")
            .text()
            .await
            .expect("a body");
        let parsed = oas3::from_json(&text)
            .unwrap_or_else(|error| panic!("{service:?}: not OpenAPI 3.1 ({error}): {text}"));
        assert!(
            parsed.openapi.starts_with("3.1"),
            "{service:?}: {}",
            parsed.openapi
        );
        let document: Value = serde_json::from_str(&text).unwrap();
        let paths = document["paths"].as_object().expect("paths");
        assert!(!paths.is_empty(), "{service:?} describes no path");
        for (path, item) in paths {
            let templated: Vec<&str> = path
                .split('/')
                .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            for method in METHODS {
                let Some(operation) = item.get(method) else {
                    continue;
                };
                let what = format!("{service:?} {} {path}", method.to_uppercase());
                let parameters = operation["parameters"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                for name in &templated {
                    assert!(
                        parameters.iter().any(|parameter| parameter["name"] == *name
                            && parameter["in"] == "path"
                            && parameter["required"] == true),
                        "{what}: no required path parameter {name}: {parameters:?}"
                    );
                }
                for parameter in &parameters {
                    if parameter["in"] == "path" {
                        assert!(
                            templated.contains(&parameter["name"].as_str().unwrap_or_default()),
                            "{what}: path parameter {} is not in the path",
                            parameter["name"]
                        );
                    }
                }
                let responses = operation["responses"].as_object().expect("responses");
                for (status, response) in responses {
                    if status.starts_with('4') || status.starts_with('5') {
                        let content = response["content"].as_object().expect("content");
                        assert_eq!(
                            content.keys().collect::<Vec<_>>(),
                            vec!["application/problem+json"],
                            "{what} {status}"
                        );
                    }
                }
                assert!(responses.contains_key("503"), "{what}: no 503");
                if operation.get("requestBody").is_some() {
                    for status in ["400", "408", "413", "415"] {
                        assert!(responses.contains_key(status), "{what}: no {status}");
                    }
                }
            }
        }
    }
    // The listing's page size is a query parameter, not a path one.
    let customers = http
        .get(format!("{}/openapi.json", url(&system, Service::Customer)))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let limit = customers["paths"]["/customers"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|parameter| parameter["name"] == "limit")
        .cloned()
        .expect("a limit parameter");
    assert_eq!(limit["in"], "query", "{limit}");
}

/// The schemathesis command: `TANDEM_SCHEMATHESIS`, or where
/// `scripts/engines up` installs it.
fn schemathesis() -> PathBuf {
    if let Some(path) = std::env::var_os("TANDEM_SCHEMATHESIS") {
        return PathBuf::from(path);
    }
    let state = std::env::var_os("TANDEM_ENGINES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/tandem-engines"));
    let st = state.join("schemathesis/bin/st");
    assert!(
        st.is_file(),
        "schemathesis is not installed at {}: run scripts/engines up (or set TANDEM_SCHEMATHESIS)",
        st.display()
    );
    st
}

const FUZZ_TOKEN: &str = "fuzz-operator-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outside_fuzzer_finds_nothing_in_any_service() {
    let st = schemathesis();
    let dir = tempfile::tempdir().unwrap();
    let mut system = System::new(dir.path(), 0)
        .expect("prepare the system")
        .with_executable(env!("CARGO_BIN_EXE_tandem"));
    for service in Service::ALL {
        system.set_env(service, "TANDEM_ADMIN_TOKEN", Some(FUZZ_TOKEN));
    }
    system.start_all().await.expect("start the services");
    common::seed(&system).await;
    // A fixed seed by default, so a finding reproduces; TANDEM_FUZZ_SEED
    // explores others.
    let seed = std::env::var("TANDEM_FUZZ_SEED").unwrap_or_else(|_| "1".to_owned());
    let examples = std::env::var("TANDEM_FUZZ_EXAMPLES").unwrap_or_else(|_| "50".to_owned());
    let mut failures = Vec::new();
    for service in Service::ALL {
        let base = url(&system, service);
        let report = dir.path().join(format!("{}-report", service.name()));
        let output = Command::new(&st)
            .args(["run", &format!("{base}/openapi.json")])
            .args(["--checks", "all", "--mode", "all"])
            .args(["--header", &format!("Authorization: Bearer {FUZZ_TOKEN}")])
            .args(["--max-examples", &examples, "--seed", &seed])
            .args(["--workers", "1", "--no-color", "--request-timeout", "10"])
            .args(["--report", "ndjson", "--report-dir"])
            .arg(&report)
            // Its example database too stays in the test's directory.
            .current_dir(dir.path())
            .output()
            .expect("run schemathesis");
        let stdout = String::from_utf8_lossy(&output.stdout);
        // It really ran: every operation, positive and negative cases.
        let events = std::fs::read_dir(&report)
            .expect("schemathesis wrote its report")
            .map(|entry| std::fs::read_to_string(entry.unwrap().path()).unwrap())
            .collect::<String>();
        let negative = events.matches("\"negative_data_rejection\"").count();
        if !output.status.success() || negative == 0 {
            failures.push(format!(
                "{service:?} (seed {seed}; negative_data_rejection seen {negative} times): exit {:?}\n{stdout}\n{}",
                output.status.code(),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "schemathesis found problems:\n{}",
        failures.join("\n\n")
    );
}
