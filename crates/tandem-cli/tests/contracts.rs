//! The event contracts as outside tools read them:
//! - each service's `/asyncapi.json`, as the running process serves it, is
//!   what `tandem contracts asyncapi` writes, and the official AsyncAPI
//!   parser (`tools/asyncapi`, installed by `scripts/engines up`) accepts
//!   it with no error or warning;
//! - `tandem contracts check` passes against the repository's baseline and
//!   fails, naming the event, the field and the rule, against baselines
//!   that the current contracts break.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{start, url};
use serde_json::{json, Value};
use tandem_cli::serve::Service;

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tandem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .current_dir(repository())
        .output()
        .expect("run tandem")
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs the AsyncAPI parser on `files`.
fn asyncapi_parser(files: &[PathBuf]) -> Output {
    let tool = repository().join("tools/asyncapi");
    assert!(
        tool.join("node_modules/@asyncapi/parser").is_dir(),
        "the AsyncAPI parser is not installed in {}: run scripts/engines up",
        tool.display()
    );
    Command::new("node")
        .arg(tool.join("validate.mjs"))
        .args(files)
        .output()
        .expect("run node (scripts/engines up installs it)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_serves_an_asyncapi_document_the_official_parser_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let system = start(dir.path()).await;
    let http = system.http().clone();
    let mut files = Vec::new();
    for service in Service::ALL {
        let served: Value = http
            .get(format!("{}/asyncapi.json", url(&system, service)))
            .send()
            .await
            .expect("GET /asyncapi.json")
            .json()
            .await
            .expect("a JSON body");
        let written = tandem(&["contracts", "asyncapi", service.name()]);
        assert!(written.status.success(), "{}", text(&written));
        let written: Value = serde_json::from_slice(&written.stdout).unwrap();
        assert_eq!(served, written, "{service:?}: served and written differ");
        let path = dir.path().join(format!("{}.asyncapi.json", service.name()));
        std::fs::write(&path, serde_json::to_vec_pretty(&served).unwrap()).unwrap();
        files.push(path);
    }
    let judged = asyncapi_parser(&files);
    assert!(judged.status.success(), "{}", text(&judged));
    assert_eq!(
        String::from_utf8_lossy(&judged.stdout)
            .matches("valid AsyncAPI 3.0.0")
            .count(),
        3,
        "{}",
        text(&judged)
    );

    // What the documents say, checked against the contracts.
    let inventory: Value = serde_json::from_slice(&std::fs::read(&files[1]).unwrap()).unwrap();
    assert_eq!(inventory["asyncapi"], "3.0.0");
    let received: Vec<&str> = inventory["operations"]["receiveOrder"]["messages"]
        .as_array()
        .expect("the inventory receives from topic order")
        .iter()
        .map(|message| message["$ref"].as_str().unwrap())
        .collect();
    for name in ["OrderPlaced.v1", "OrderPlaced.v2", "OrderCancelled.v1"] {
        assert!(
            received.contains(&format!("#/channels/order/messages/{name}").as_str()),
            "{name} not among {received:?}"
        );
    }
    assert_eq!(inventory["operations"]["sendInventory"]["action"], "send");
    assert_eq!(inventory["channels"]["order"]["address"], "order");
    let order: Value = serde_json::from_slice(&std::fs::read(&files[2]).unwrap()).unwrap();
    let sent: Vec<&str> = order["operations"]["sendOrder"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|message| message["$ref"].as_str().unwrap())
        .collect();
    assert!(sent.contains(&"#/channels/order/messages/OrderPlaced.v2"));
    assert!(
        !sent.contains(&"#/channels/order/messages/OrderPlaced.v1"),
        "the Order Service publishes v2 only: {sent:?}"
    );
    // Each payload's data schema is the contract's JSON Schema.
    for contract in tandem_contracts::contracts() {
        let name = format!("{}.v{}", contract.event_type, contract.version);
        for document in [&inventory, &order] {
            let Some(message) = document["components"]["messages"].get(&name) else {
                continue;
            };
            assert_eq!(message["contentType"], "application/cloudevents+json");
            let data = &document["components"]["schemas"][format!("{name}.data")];
            assert_eq!(
                data["properties"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .collect::<Vec<_>>(),
                contract.schema["properties"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .collect::<Vec<_>>(),
                "{name}"
            );
            assert_eq!(data["required"], contract.schema["required"], "{name}");
        }
    }

    // The judge judges: a document whose operation names a channel that
    // does not exist is refused.
    let mut broken = order.clone();
    broken["operations"]["sendOrder"]["channel"] = json!({"$ref": "#/channels/nowhere"});
    let path = dir.path().join("broken.asyncapi.json");
    std::fs::write(&path, serde_json::to_vec(&broken).unwrap()).unwrap();
    let judged = asyncapi_parser(&[path]);
    assert!(!judged.status.success(), "{}", text(&judged));
}

/// `tandem contracts check` against `baseline`, expected to fail: its
/// standard error.
fn check_fails(baseline: &Path) -> String {
    let failed = tandem(&[
        "contracts",
        "check",
        "--baseline",
        baseline.to_str().unwrap(),
    ]);
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed));
    String::from_utf8_lossy(&failed.stderr).into_owned()
}

fn schema_file(name: &str) -> Value {
    let path = repository()
        .join("crates/tandem-contracts/baseline")
        .join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// A copy of the repository's baseline with each `(file, schema)` of
/// `changes` written over it (or added).
fn baseline_with(dir: &Path, changes: &[(&str, Value)]) -> PathBuf {
    let baseline = tempfile::tempdir_in(dir).unwrap().keep();
    for entry in std::fs::read_dir(repository().join("crates/tandem-contracts/baseline")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, baseline.join(path.file_name().unwrap())).unwrap();
    }
    for (file, schema) in changes {
        std::fs::write(baseline.join(file), serde_json::to_vec(schema).unwrap()).unwrap();
    }
    baseline
}

#[test]
fn the_contracts_check_passes_on_the_baseline_and_names_every_break() {
    let passed = tandem(&["contracts", "check"]);
    assert!(passed.status.success(), "{}", text(&passed));
    let out = String::from_utf8_lossy(&passed.stdout);
    assert!(out.contains("new: OrderPlaced v2"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    // Baselines that today's contracts break, as if the change had been
    // made in place: each the released schema with what the change undid.
    let mut placed = schema_file("OrderPlaced.v1.json");
    placed["properties"]["currency"] = json!({"type": "string"});
    placed["required"]
        .as_array_mut()
        .unwrap()
        .push(json!("currency"));
    let mut updated = schema_file("CustomerUpdated.v1.json");
    updated["properties"]["address"] = json!({"type": "integer"});
    let mut reserved = schema_file("StockReserved.v1.json");
    reserved["required"] = json!(["orderId"]);
    // (Every rule, enums included, is held to its cases by the unit tests
    // of tandem::compat; this is the command end to end.)
    let cases: [(&str, Value, &str); 3] = [
        (
            "OrderPlaced.v1.json",
            placed,
            "OrderPlaced v1: currency: field removed",
        ),
        (
            "CustomerUpdated.v1.json",
            updated,
            "CustomerUpdated v1: address: type changed",
        ),
        (
            "StockReserved.v1.json",
            reserved,
            "StockReserved v1: lines: field made required",
        ),
    ];
    for (file, schema, expected) in cases {
        let err = check_fails(&baseline_with(dir.path(), &[(file, schema)]));
        assert!(
            err.contains(expected),
            "{file}: expected {expected:?} in {err}"
        );
        assert!(err.contains("1 incompatible change"), "{file}: {err}");
    }
    // A released version that is gone.
    let err = check_fails(&baseline_with(
        dir.path(),
        &[("OrderPlaced.v0.json", schema_file("OrderPlaced.v1.json"))],
    ));
    assert!(err.contains("OrderPlaced v0: version removed"), "{err}");
    // No baseline: a message, not a pass.
    let err = check_fails(Path::new("/nonexistent/baseline"));
    assert!(err.contains("no contract baseline"), "{err}");
}
