//! `tandem-lab bench pipeline` (and `bench dead-letters`) as a user runs
//! it: a real process on the embedded default, small enough for the test
//! suite. Checks the contract of its output (one JSON object on the last
//! line, with the fields the README quotes), never its speed.

use std::process::Command;

/// Runs `tandem-lab` with `args` and returns the JSON object of its last
/// line; `hint` says what to start when it fails.
fn last_json_of(args: &[&str], hint: &str) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_tandem-lab"))
        .args(args)
        .output()
        .expect("run tandem-lab");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "tandem-lab {args:?} failed{hint}: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().expect("some output");
    serde_json::from_str(last).expect("last line is JSON")
}

fn number(report: &serde_json::Value, field: &str) -> f64 {
    report[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} missing in {report}"))
}

#[test]
fn a_small_pipeline_bench_prints_its_figures_as_one_json_line() {
    let dir = tempfile::tempdir().unwrap();
    let report = last_json_of(
        &[
            "bench",
            "pipeline",
            "--events",
            "3000",
            "--batch",
            "500",
            "--aggregates",
            "100",
            "--latency-seconds",
            "1",
            "--latency-rate",
            "2000",
            "--json",
            "--dir",
            dir.path().to_str().expect("a UTF-8 temporary path"),
        ],
        "",
    );
    let number = |field: &str| number(&report, field);
    assert!(number("events_per_sec") > 0.0, "{report}");
    let raw_runs = report["raw_runs"].as_array().expect("raw_runs");
    assert_eq!(raw_runs.len(), 3, "{report}");
    let mut runs: Vec<f64> = raw_runs.iter().filter_map(|run| run.as_f64()).collect();
    runs.sort_by(f64::total_cmp);
    assert_eq!(number("raw_inserts_per_sec"), runs[1], "the median run");
    let ratio = number("events_per_sec") / number("raw_inserts_per_sec");
    assert!((number("ratio") - ratio).abs() < 1e-9, "{report}");
    // 2000 events/s in commits every 2 ms: 4 events a commit.
    assert_eq!(number("latency_rate_per_sec"), 2000.0, "{report}");
    // Every sample is an event of the latency phase: at least one, and no
    // more than 1 s at the offered rate (plus a tick) committed. How close
    // it comes to the rate depends on the machine's load: not asserted.
    let samples = number("latency_samples");
    assert!((1.0..=2100.0).contains(&samples), "{report}");
    assert!(number("p50_ms") <= number("p99_ms"), "{report}");
    assert!(number("p99_ms") <= number("max_ms"), "{report}");
    assert_eq!(report["synchronous"], "full", "{report}");
}

/// `tandem-lab bench dead-letters`, small: the table is filled, every kind
/// of request is answered in full over the socket, and the figures come
/// as one JSON object on the last line. Never its speed.
#[test]
fn a_small_dead_letters_bench_prints_its_figures_as_one_json_line() {
    let report = last_json_of(
        &[
            "bench",
            "dead-letters",
            "--parked",
            "3000",
            "--batch",
            "1000",
            "--requests",
            "3",
            "--json",
        ],
        "",
    );
    assert_eq!(report["parked"], 3000, "{report}");
    assert_eq!(report["consumers"], 3, "{report}");
    assert_eq!(report["groups"], 36, "every cause its own group: {report}");
    let results = report["results"].as_array().expect("results");
    let kinds: Vec<&str> = results
        .iter()
        .map(|result| result["name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        kinds,
        [
            "first page",
            "consumer",
            "group",
            "deep page",
            "failure groups"
        ],
        "{report}"
    );
    for result in results {
        let expected = if result["name"] == "failure groups" {
            36
        } else {
            50
        };
        assert_eq!(result["items"], expected, "{result}");
        let ms = |field: &str| result[field].as_f64().expect("a time");
        assert!(ms("median_ms") > 0.0, "{result}");
        assert!(ms("median_ms") <= ms("p95_ms"), "{result}");
        assert!(ms("p95_ms") <= ms("max_ms"), "{result}");
    }
}

/// Redirected to a file, the bench writes its finished progress lines and
/// no terminal escape codes (the live progress bar is for terminals only).
#[test]
fn redirected_output_has_no_escape_codes() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tandem-lab"))
        .args([
            "bench",
            "pipeline",
            "--events",
            "1000",
            "--batch",
            "250",
            "--aggregates",
            "50",
            "--latency-seconds",
            "1",
            "--latency-rate",
            "1000",
            "--dir",
        ])
        .arg(dir.path().join("files"))
        .stderr(log)
        .output()
        .expect("run tandem-lab bench pipeline");
    let stderr = std::fs::read(&log_path).unwrap();
    let stderr_text = String::from_utf8_lossy(&stderr);
    assert!(
        output.status.success(),
        "bench failed: {stderr_text}\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    for (name, bytes) in [("stdout", &output.stdout), ("stderr", &stderr)] {
        assert!(
            !bytes.contains(&0x1b),
            "escape code in {name}: {:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    for phase in [
        "[1/3] raw batched SQLite inserts: ",
        "[2/3] pipeline: 1000 events in ",
        "[3/3] latency at ",
    ] {
        assert!(
            stderr_text.lines().any(|line| line.starts_with(phase)),
            "no line starting with {phase:?} in {stderr_text:?}"
        );
    }
}

/// `bench pipeline --bus URL`, small: beside the pipeline's delay, the
/// broker's own (its plain client at the same rate) comes out as
/// raw_p50_ms/raw_p99_ms, with their ratio.
fn a_small_pipeline_bench_on(bus: &str) {
    let report = last_json_of(
        &[
            "bench",
            "pipeline",
            "--bus",
            bus,
            "--events",
            "2000",
            "--batch",
            "500",
            "--aggregates",
            "100",
            "--latency-seconds",
            "1",
            "--latency-rate",
            "1000",
            "--json",
        ],
        " (is the broker up? `scripts/engines up` starts it)",
    );
    let number = |field: &str| number(&report, field);
    assert_eq!(report["raw_kind"], "bus-produce-consume", "{report}");
    assert!(number("raw_p50_ms") > 0.0, "{report}");
    assert!(number("raw_p50_ms") <= number("raw_p99_ms"), "{report}");
    let ratio = number("p50_ms") / number("raw_p50_ms");
    assert!((number("latency_ratio") - ratio).abs() < 1e-9, "{report}");
}

#[test]
fn the_pipeline_bench_on_nats_reports_the_brokers_own_delay_beside_its_own() {
    a_small_pipeline_bench_on(
        &std::env::var("TANDEM_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
    );
}

#[test]
fn the_pipeline_bench_on_kafka_reports_the_brokers_own_delay_beside_its_own() {
    a_small_pipeline_bench_on(
        &std::env::var("TANDEM_TEST_KAFKA").unwrap_or_else(|_| "kafka://127.0.0.1:19092".into()),
    );
}

/// `bench compare`, small: both architectures under the same load, and
/// the claim itself, as behaviour rather than speed: with the Customer or
/// the Inventory Service killed, the event-driven system accepts every
/// order and confirms each once the service is back, where the REST
/// baseline refuses (nearly) all of them.
#[test]
fn a_small_compare_bench_shows_the_outages_the_events_ride_out() {
    let report = last_json_of(
        &[
            "bench",
            "compare",
            "--seconds",
            "1",
            "--connections",
            "4",
            "--outage-seconds",
            "2",
            "--outage-load",
            "0.1",
            "--json",
        ],
        "",
    );
    let number = |field: &str| number(&report, field);
    for ratio in ["throughput_ratio", "p99_ratio", "confirm_p99_ratio"] {
        assert!(number(ratio) > 0.0, "{ratio}: {report}");
    }
    for outage in ["customer", "inventory"] {
        let due = report["event_driven"][format!("{outage}_outage")]["due"]
            .as_u64()
            .unwrap_or(0);
        assert!(
            due > 0,
            "no order was due during the {outage} outage: {report}"
        );
        assert_eq!(
            number(&format!("{outage}_outage_accepted_event_driven")),
            1.0,
            "{report}"
        );
        assert_eq!(
            number(&format!("{outage}_outage_confirmed_event_driven")),
            1.0,
            "{report}"
        );
        assert!(
            number(&format!("{outage}_outage_accepted_baseline")) < 0.5,
            "{report}"
        );
    }
}
