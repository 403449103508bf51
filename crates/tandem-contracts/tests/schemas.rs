//! The JSON Schema files in `schemas/` are the published contracts; the Rust
//! types must match them. After a deliberate contract change, regenerate
//! with `TANDEM_WRITE_SCHEMAS=1 cargo test -p tandem-contracts` and review
//! the diff (a changed contract needs a new version).

use std::path::PathBuf;

use tandem::Envelope;
use tandem_contracts::customer::CustomerUpdated;

fn schema_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas")
}

#[test]
fn schema_files_match_the_rust_types() {
    let write = std::env::var_os("TANDEM_WRITE_SCHEMAS").is_some();
    let mut mismatched = Vec::new();
    for contract in tandem_contracts::contracts() {
        let path = schema_dir().join(contract.file_name());
        let generated = serde_json::to_string_pretty(&contract.schema).unwrap() + "\n";
        if write {
            std::fs::write(&path, &generated).unwrap();
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(stored) if stored == generated => {}
            Ok(_) => mismatched.push(format!(
                "{} differs from {}",
                path.display(),
                contract.dataschema
            )),
            Err(error) => mismatched.push(format!("{}: {error}", path.display())),
        }
    }
    assert!(
        mismatched.is_empty(),
        "contract schemas out of date (TANDEM_WRITE_SCHEMAS=1 regenerates):\n{}",
        mismatched.join("\n")
    );
}

#[test]
fn every_schema_file_belongs_to_a_contract() {
    let known: Vec<String> = tandem_contracts::contracts()
        .iter()
        .map(|contract| contract.file_name())
        .collect();
    for entry in std::fs::read_dir(schema_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(known.contains(&name), "{name} has no Rust type");
    }
}

/// The design's motivating example is our CustomerUpdated envelope.
#[test]
fn the_address_change_example_reads_as_customer_updated() {
    let bytes = br#"{"specversion":"1.0","id":"0190c7e2-7a51-7cc0-8a52-4b1a0b4cf001",
        "source":"customer","type":"CustomerUpdated","subject":"1234",
        "time":"2025-05-11T12:30:00Z","datacontenttype":"application/json",
        "dataschema":"tandem:customer/CustomerUpdated/v1","partitionkey":"1234","sequence":2,
        "data":{"customerId":"1234","address":"123 New Road","someFutureField":true}}"#;
    let envelope = Envelope::decode(bytes).unwrap();
    assert_eq!(envelope.event_type, "CustomerUpdated");
    assert_eq!(envelope.time.to_string(), "2025-05-11 12:30:00.0 +00:00:00");
    let update: CustomerUpdated = envelope.payload().unwrap();
    assert_eq!(update.customer_id, "1234");
    assert_eq!(update.address.as_deref(), Some("123 New Road"));
    assert_eq!(update.name, None);
}
