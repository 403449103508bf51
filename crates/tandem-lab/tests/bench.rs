//! `tandem-lab bench pipeline` as a user runs it: a real process on the embedded
//! default, small enough for the test suite. Checks the contract of its
//! output (one JSON object on the last line, with the fields the README
//! quotes), never its speed.

use std::process::Command;

#[test]
fn a_small_pipeline_bench_prints_its_figures_as_one_json_line() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tandem-lab"))
        .args([
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
        ])
        .arg(dir.path())
        .output()
        .expect("run tandem-lab bench pipeline");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "bench failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().expect("some output");
    let report: serde_json::Value = serde_json::from_str(last).expect("last line is JSON");
    let number = |field: &str| {
        report[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field} missing in {report}"))
    };
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
    assert!(number("latency_samples") >= 1000.0, "{report}");
    assert!(number("p50_ms") <= number("p99_ms"), "{report}");
    assert!(number("p99_ms") <= number("max_ms"), "{report}");
    assert_eq!(report["synchronous"], "full", "{report}");
}
