//! `TANDEM_LOG_FORMAT=json` makes a service's log lines JSON objects a log
//! collector reads as they are; without it they are text.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// The first stderr line of `tandem serve customer` that logs the service
/// stopping, with `format` (or none).
fn stopping_line(format: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_tandem"));
    command
        .args(["serve", "customer", "--listen", "127.0.0.1:0", "--db"])
        .arg(format!(
            "sqlite://{}",
            dir.path().join("customer.db").display()
        ))
        .arg("--bus")
        .arg(format!("sqlite://{}", dir.path().join("bus.db").display()))
        .env("TANDEM_LOG", "info")
        .env_remove("TANDEM_LOG_FORMAT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(format) = format {
        command.env("TANDEM_LOG_FORMAT", format);
    }
    let mut child = command.spawn().expect("start tandem serve");
    // Wait until it listens (it prints its address), then stop it.
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).expect("the listening line");
    assert!(line.contains("listening on"), "{line}");
    // Ready (so its signal handler is in place) before it is told to stop.
    let address = line.trim().rsplit("http://").next().unwrap().to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !ready(&address) {
        assert!(
            std::time::Instant::now() < deadline,
            "{address} never ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let stopping = stderr
        .lines()
        .map(|line| line.expect("a log line"))
        .find(|line| line.contains("signal received"))
        .expect("a log line about the signal");
    child.wait().expect("the service exits");
    stopping
}

/// Whether `GET /ready` at `address` answers 200.
fn ready(address: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(address) else {
        return false;
    };
    let request = format!("GET /ready HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    let mut answer = String::new();
    stream.write_all(request.as_bytes()).is_ok()
        && stream.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.1 200")
}

#[test]
fn json_log_lines_are_json_objects_with_level_and_message() {
    let line = stopping_line(Some("json"));
    let object: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
    assert_eq!(object["level"], "INFO", "{object}");
    assert_eq!(
        object["fields"]["message"], "signal received; stopping",
        "{object}"
    );
    assert!(object["timestamp"].is_string(), "{object}");
}

#[test]
fn text_log_lines_are_text() {
    let line = stopping_line(None);
    assert!(
        serde_json::from_str::<serde_json::Value>(&line).is_err(),
        "{line}"
    );
    assert!(line.contains("INFO"), "{line}");
}
