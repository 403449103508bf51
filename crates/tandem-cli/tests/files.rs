//! `tandem up` keeps its data directory private: the directory is 0700 and
//! every database, WAL, shared-memory and lease file in it 0600, even under
//! a umask of 000; it refuses a data directory that others may write to or
//! that belongs to someone else, and a link planted in it where a database
//! belongs is not followed. Each test runs the real binary.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

const DEADLINE: Duration = Duration::from_secs(60);

/// A running `tandem up`, in a process group of its own with its services:
/// if a test fails before stopping it, the whole group is killed, so no
/// service outlives the test.
struct Up {
    child: Child,
}

impl Drop for Up {
    fn drop(&mut self) {
        // While the group's leader is not reaped, its id names the group.
        if let (Ok(None), Some(pid)) = (self.child.try_wait(), self.child.id()) {
            // SAFETY: kill(2) on the process group this test started.
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
        }
    }
}

/// `tandem up` on `data_dir` with free ports, under umask 000.
fn up(data_dir: &Path) -> Up {
    let child = Command::new("sh")
        .arg("-c")
        .arg("umask 000 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_tandem"))
        .arg("up")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--base-port", "0", "--console-port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start tandem up");
    Up { child }
}

/// How a `tandem up` run ended: it came up, or it exited with its stderr.
enum Outcome {
    Up(Up),
    Exited(std::process::ExitStatus, String),
}

/// Reads `tandem up`'s output until it says it is up or it exits.
async fn outcome(mut up: Up) -> Outcome {
    let child = &mut up.child;
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .expect("tandem up neither came up nor exited in time")
            .expect("read tandem up's output");
        match line {
            Some(line) if line.starts_with("Tandem is up") => {
                // Keep draining, so the pipe never fills.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                let mut ignored = String::new();
                tokio::spawn(async move {
                    let _ =
                        tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut ignored).await;
                });
                return Outcome::Up(up);
            }
            Some(_) => continue,
            None => {
                let status = tokio::time::timeout_at(deadline, child.wait())
                    .await
                    .expect("tandem up closed its output but did not exit")
                    .expect("wait for tandem up");
                let mut text = String::new();
                tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text)
                    .await
                    .expect("read stderr");
                return Outcome::Exited(status, text);
            }
        }
    }
}

/// Stops a `tandem up` that came up, as Ctrl-C would.
async fn stop(up: &mut Up) {
    let child = &mut up.child;
    let pid = child.id().expect("running") as i32;
    // SAFETY: kill(2) on the pid of a child this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("tandem up did not stop after SIGTERM")
        .expect("wait for tandem up");
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn up_keeps_the_data_directory_and_every_file_in_it_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tandem-data");
    let mut running = match outcome(up(&data)).await {
        Outcome::Up(running) => running,
        Outcome::Exited(status, stderr) => panic!("tandem up exited ({status}): {stderr}"),
    };
    // Every service's relay takes its lease once it runs.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let leases = names(&data)
            .into_iter()
            .filter(|name| name.ends_with(".lease"))
            .count();
        if leases >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the three relays' lease files did not appear: {:?}",
            names(&data)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let present = names(&data);
    assert_eq!(mode(&data), 0o700, "the data directory's mode");
    for name in &present {
        assert_eq!(
            mode(&data.join(name)),
            0o600,
            "{name} is open to others (files present: {present:?})"
        );
    }
    for service in ["bus", "customer", "inventory", "order"] {
        for suffix in [".db", ".db-wal", ".db-shm"] {
            let name = format!("{service}{suffix}");
            assert!(present.contains(&name), "{name} missing in {present:?}");
        }
    }
    stop(&mut running).await;
}

#[tokio::test]
async fn up_makes_a_data_directory_others_may_read_private() {
    // As older versions made it: 0755, with a database others may read.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tandem-data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut running = match outcome(up(&data)).await {
        Outcome::Up(running) => running,
        Outcome::Exited(status, stderr) => panic!("tandem up exited ({status}): {stderr}"),
    };
    assert_eq!(mode(&data), 0o700, "the data directory's mode");
    stop(&mut running).await;
}

/// `tandem up` on `data` must exit at once, non-zero, saying `expected`,
/// without making any database there.
async fn refused(data: &Path, expected: &str, what: &str) {
    match outcome(up(data)).await {
        Outcome::Up(mut running) => {
            stop(&mut running).await;
            panic!("tandem up ran on {what}");
        }
        Outcome::Exited(status, stderr) => {
            assert!(!status.success(), "{what}: tandem up exited with {status}");
            assert!(
                stderr.contains(expected),
                "{what}: the message should say {expected:?}: {stderr}"
            );
        }
    }
}

#[tokio::test]
async fn up_refuses_a_data_directory_others_may_write_to() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("shared");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
    refused(&data, "writable by others", "a data directory of mode 0777").await;
    assert!(names(&data).is_empty(), "files made: {:?}", names(&data));
}

#[tokio::test]
async fn up_refuses_a_data_directory_owned_by_someone_else() {
    // SAFETY: geteuid(2) has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test gives a directory away with chown, which needs root (CI runs as root)"
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("theirs");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&data, Some(65534), Some(65534)).unwrap();
    refused(
        &data,
        "owned by uid 65534",
        "a data directory owned by nobody",
    )
    .await;
    assert!(names(&data).is_empty(), "files made: {:?}", names(&data));
}

#[tokio::test]
async fn up_does_not_follow_a_link_planted_as_a_database() {
    let elsewhere = tempfile::tempdir().unwrap();
    let existing = elsewhere.path().join("precious");
    std::fs::write(&existing, b"not yours\n").unwrap();
    let absent = elsewhere.path().join("absent.db");
    for (name, target) in [("customer.db", &absent), ("bus.db", &existing)] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("tandem-data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        symlink(target, data.join(name)).unwrap();
        refused(
            &data,
            "symbolic link",
            &format!("a data directory whose {name} is a planted link"),
        )
        .await;
        assert!(!absent.exists(), "{name}: the link's target was created");
        assert_eq!(
            std::fs::read(&existing).unwrap(),
            b"not yours\n",
            "{name}: the link's target was written"
        );
    }
}

/// Tried as a new user would: `tandem up`, 30 customers, Ctrl-C. Every
/// store checkpoints and closes on the way out, so no WAL is left holding
/// data, and a copy of the `.db` files alone (the most common backup) has
/// all 30 customers, in the Customer Service, in the Order Service's copy
/// and in the log.
#[tokio::test]
async fn a_clean_stop_leaves_whole_database_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tandem-data");
    let mut running = up(&data);
    let stdout = running.child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut urls = std::collections::HashMap::new();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .expect("tandem up did not come up in time")
            .expect("read tandem up's output")
            .expect("tandem up exited before it was up");
        let mut words = line.split_whitespace();
        if let (Some(name), Some(url)) = (words.next(), words.next()) {
            if url.starts_with("http://") {
                urls.insert(name.to_owned(), url.to_owned());
            }
        }
        if line.starts_with("Ctrl-C stops") {
            break;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let (customer, order) = (&urls["customer"], &urls["order"]);
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for n in 0..30 {
        let created: serde_json::Value = http
            .post(format!("{customer}/customers"))
            .json(&serde_json::json!({
                "name": format!("Customer {n}"),
                "email": format!("c{n}@example.com"),
                "address": format!("{n} Road"),
                "creditLimitCents": 1000,
            }))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(created["customerId"].as_str().unwrap().to_owned());
    }
    // The Order Service has its copy of the last one (and so of all).
    let last = ids.last().unwrap();
    let deadline = Instant::now() + DEADLINE;
    while !http
        .get(format!("{order}/customers/{last}"))
        .send()
        .await
        .unwrap()
        .status()
        .is_success()
    {
        assert!(Instant::now() < deadline, "the Order Service has no copy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop(&mut running).await;

    for name in names(&data) {
        if name.ends_with("-wal") {
            let bytes = std::fs::metadata(data.join(&name)).unwrap().len();
            assert_eq!(
                bytes, 0,
                "{name} still holds {bytes} bytes after a clean stop"
            );
        }
    }
    let backup = dir.path().join("backup");
    std::fs::create_dir(&backup).unwrap();
    for name in ["bus.db", "customer.db", "order.db"] {
        std::fs::copy(data.join(name), backup.join(name)).unwrap();
    }
    let count = |file: &str, sql: &str| -> i64 {
        rusqlite::Connection::open(backup.join(file))
            .unwrap()
            .query_row(sql, [], |row| row.get(0))
            .unwrap_or_else(|error| panic!("{file}: {sql}: {error}"))
    };
    assert_eq!(count("customer.db", "SELECT count(*) FROM customers"), 30);
    assert_eq!(
        count("order.db", "SELECT count(*) FROM local_customers"),
        30,
        "the Order Service's copies"
    );
    // The log's records, in its segments' tables.
    let records: i64 = {
        let log = rusqlite::Connection::open(backup.join("bus.db")).unwrap();
        let segments: Vec<String> = log
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'log_segment_%'",
            )
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        segments
            .iter()
            .map(|table| count("bus.db", &format!("SELECT count(*) FROM {table}")))
            .sum()
    };
    assert!(records >= 30, "the log holds {records} records");
}
