//! `tandem up` as a supervisor, run as the real binary: its children die
//! with it, a restart that fails is tried again, a child that has run
//! for a while restarts without the grown backoff, and Ctrl-C stops the
//! children together under one deadline.
//!
//! Children are found through /proc (their parent is `tandem up`), so
//! these tests run on Linux.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Longest wait for anything promised to happen eventually.
const DEADLINE: Duration = Duration::from_secs(30);
/// Time between two polls.
const STEP: Duration = Duration::from_millis(20);

const SERVICES: [&str; 3] = ["customer", "inventory", "order"];

/// A running `tandem up`, its output lines, and the addresses it printed.
struct Up {
    child: Child,
    pid: i32,
    lines: Arc<Mutex<Vec<String>>>,
    addresses: BTreeMap<&'static str, String>,
    /// Every child pid seen, killed on drop in case a test failed with
    /// them still running.
    seen: Vec<i32>,
}

impl Up {
    async fn start(dir: &Path, extra: &[&str]) -> Up {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args([
                "up",
                "--base-port",
                "0",
                "--console-port",
                "0",
                "--data-dir",
            ])
            .arg(dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start tandem up");
        let pid = child.id().expect("tandem up has a pid") as i32;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for reader in [
            Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
            Box::new(stderr),
        ] {
            let lines = Arc::clone(&lines);
            tokio::spawn(async move {
                let mut reader = BufReader::new(reader).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let mut up = Up {
            child,
            pid,
            lines,
            addresses: BTreeMap::new(),
            seen: Vec::new(),
        };
        up.wait_for_line("tandem up says it is up", |line| {
            line.contains("Ctrl-C stops")
        })
        .await;
        for service in SERVICES {
            let address = up
                .wait_for_line(&format!("the {service} service's address"), |line| {
                    line.trim_start().starts_with(service) && line.contains("http://")
                })
                .await
                .rsplit("http://")
                .next()
                .unwrap()
                .to_owned();
            up.addresses.insert(service, address);
        }
        for service in SERVICES {
            up.child_pid(service);
        }
        up
    }

    /// Waits for an output line matching `matches` and returns it.
    async fn wait_for_line(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        self.wait_for_line_after(0, what, matches).await.1
    }

    /// Waits for an output line, from the `from`-th on, matching
    /// `matches`; returns its index and text.
    async fn wait_for_line_after(
        &self,
        from: usize,
        what: &str,
        matches: impl Fn(&str) -> bool,
    ) -> (usize, String) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            {
                let lines = self.lines.lock().unwrap();
                if let Some((index, line)) = lines
                    .iter()
                    .enumerate()
                    .skip(from)
                    .find(|(_, line)| matches(line))
                {
                    return (index, line.clone());
                }
                if Instant::now() >= deadline {
                    panic!(
                        "{what}: no such line from tandem up within {DEADLINE:?}; it wrote:\n{}",
                        lines.join("\n")
                    );
                }
            }
            tokio::time::sleep(STEP).await;
        }
    }

    fn line_count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// The pid of the running `tandem serve SERVICE` child.
    fn child_pid(&mut self, service: &str) -> i32 {
        let children = children_of(self.pid, service);
        assert_eq!(
            children.len(),
            1,
            "tandem up should have one {service} child, has {children:?}"
        );
        self.seen.push(children[0]);
        children[0]
    }

    /// Waits until tandem up says (from its `from`-th line on) that it
    /// restarted SERVICE, and a `tandem serve SERVICE` child other than
    /// `old` runs and answers on the service's address; returns its pid
    /// and the index of that line.
    async fn wait_restarted(&mut self, service: &str, old: i32, from: usize) -> (i32, usize) {
        let (index, _) = self
            .wait_for_line_after(from, &format!("the {service} service restarted"), |line| {
                line.contains(&format!("{service} service restarted"))
            })
            .await;
        let url = format!("http://{}/health", self.addresses[service]);
        let deadline = Instant::now() + DEADLINE;
        loop {
            let children = children_of(self.pid, service);
            if let [pid] = children[..] {
                if pid != old && healthy(&url).await {
                    self.seen.push(pid);
                    return (pid, index);
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "the {service} service did not come back within {DEADLINE:?}; \
                     children: {children:?}; tandem up wrote:\n{}",
                    self.lines.lock().unwrap().join("\n")
                );
            }
            tokio::time::sleep(STEP).await;
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a valid signal on pids this test started
        // (directly or through tandem up).
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            for pid in &self.seen {
                if alive(*pid) {
                    libc::kill(*pid, libc::SIGCONT);
                    libc::kill(*pid, libc::SIGKILL);
                }
            }
        }
    }
}

fn signal(pid: i32, signal: i32) {
    // SAFETY: kill(2) with a valid signal.
    let sent = unsafe { libc::kill(pid, signal) };
    assert_eq!(sent, 0, "cannot send signal {signal} to {pid}");
}

/// The pids of the `tandem serve SERVICE` processes whose parent is
/// `parent`.
fn children_of(parent: i32, service: &str) -> Vec<i32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after it.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let ppid = fields.next().and_then(|ppid| ppid.parse::<i32>().ok());
        if ppid != Some(parent) || state == Some("Z") {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|byte| *byte == 0).collect();
        if args
            .windows(2)
            .any(|pair| pair[0] == b"serve" && pair[1] == service.as_bytes())
        {
            children.push(pid);
        }
    }
    children
}

/// Whether `pid` is a live process (not gone, not a zombie waiting to be
/// reaped).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
    }
}

async fn healthy(url: &str) -> bool {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    matches!(client.get(url).send().await, Ok(response) if response.status().is_success())
}

/// Whether something can listen on `address` now (nothing else holds it).
fn port_free(address: &str) -> bool {
    std::net::TcpListener::bind(address).is_ok()
}

/// The backoff `tandem up` announced for a restart in a line like
/// "customer service exited (...); restarting in 500ms".
fn announced_backoff(line: &str) -> String {
    line.rsplit("restarting in ")
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_die_with_a_killed_supervisor() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Up::start(dir.path(), &[]).await;
    let children: Vec<(i32, String)> = SERVICES
        .iter()
        .map(|service| (up.child_pid(service), up.addresses[service].clone()))
        .collect();

    signal(up.pid, libc::SIGKILL);
    let _ = up.child.wait().await;

    let deadline = Instant::now() + DEADLINE;
    loop {
        let survivors: Vec<&(i32, String)> = children
            .iter()
            .filter(|(pid, address)| alive(*pid) || !port_free(address))
            .collect();
        if survivors.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{DEADLINE:?} after tandem up was killed with SIGKILL, its children still run \
             or hold their ports: {survivors:?}"
        );
        tokio::time::sleep(STEP).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_that_fails_at_start_up_is_tried_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Up::start(dir.path(), &[]).await;
    let address = up.addresses["customer"].clone();

    // Kill the customer service and take its port before the supervisor
    // restarts it; if the restart wins the race, kill that one too.
    let mut pid = up.child_pid("customer");
    let from = up.line_count();
    let squatter = 'taken: {
        for _ in 0..5 {
            signal(pid, libc::SIGKILL);
            let deadline = Instant::now() + DEADLINE;
            while Instant::now() < deadline {
                if let Ok(listener) = std::net::TcpListener::bind(&address) {
                    break 'taken listener;
                }
                if let [restarted] = children_of(up.pid, "customer")[..] {
                    if restarted != pid {
                        pid = restarted;
                        up.seen.push(pid);
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        panic!("could not take the customer service's port {address} while it restarted");
    };

    up.wait_for_line_after(from, "a failed restart of the customer service", |line| {
        line.contains("cannot restart the customer service")
    })
    .await;
    drop(squatter);
    up.wait_restarted("customer", pid, from).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_restart_backoff_starts_over_after_a_healthy_period() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Up::start(dir.path(), &["--healthy-after-ms", "3000"]).await;
    let exited = |line: &str| line.contains("customer service exited");

    // Two crashes in a row: the second waits twice as long.
    let first = up.child_pid("customer");
    let from = up.line_count();
    signal(first, libc::SIGKILL);
    let (index, line) = up
        .wait_for_line_after(from, "the first crash", exited)
        .await;
    assert_eq!(announced_backoff(&line), "500ms", "{line}");
    let (second, index) = up.wait_restarted("customer", first, index + 1).await;
    signal(second, libc::SIGKILL);
    let (index, line) = up
        .wait_for_line_after(index + 1, "the second crash", exited)
        .await;
    assert_eq!(announced_backoff(&line), "1s", "{line}");
    let (third, index) = up.wait_restarted("customer", second, index + 1).await;

    // Once the service has run for the healthy period, the next crash
    // waits the first step again.
    let (index, _) = up
        .wait_for_line_after(
            index + 1,
            "the backoff reset after a healthy period",
            |line| line.contains("customer service has run for"),
        )
        .await;
    signal(third, libc::SIGKILL);
    let (_, line) = up
        .wait_for_line_after(index + 1, "the crash after a healthy period", exited)
        .await;
    assert_eq!(announced_backoff(&line), "500ms", "{line}");
    up.wait_restarted("customer", third, index + 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_waits_for_all_children_under_one_deadline() {
    let stop_deadline = Duration::from_secs(3);
    let dir = tempfile::tempdir().unwrap();
    let mut up = Up::start(
        dir.path(),
        &["--stop-deadline-ms", &stop_deadline.as_millis().to_string()],
    )
    .await;
    // Stopped children cannot act on SIGTERM: each one runs out the
    // deadline and is killed.
    let children: Vec<i32> = SERVICES
        .iter()
        .map(|service| up.child_pid(service))
        .collect();
    for pid in &children {
        signal(*pid, libc::SIGSTOP);
    }

    let start = Instant::now();
    signal(up.pid, libc::SIGTERM);
    let status = tokio::time::timeout(DEADLINE, up.child.wait())
        .await
        .expect("tandem up exits after SIGTERM")
        .unwrap();
    let elapsed = start.elapsed();
    assert!(status.success(), "tandem up exited with {status}");
    assert!(
        elapsed >= stop_deadline,
        "tandem up exited after {elapsed:?}, before the {stop_deadline:?} its stopped children \
         were owed"
    );
    assert!(
        elapsed < stop_deadline * 2,
        "stopping three stuck children took {elapsed:?}: not one {stop_deadline:?} deadline \
         for all of them"
    );
    for pid in children {
        assert!(!alive(pid), "child {pid} still runs after tandem up exited");
    }
}

/// `tandem up` makes an admin token on its first run, keeps it in the data
/// directory (mode 0600), prints it that once, and gives it to every
/// service: the admin API takes it and refuses calls without it. A second
/// run reuses it and does not print it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_is_made_once_kept_private_and_reused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), &[]).await;
    let line = up
        .wait_for_line("the admin token line", |line| {
            line.trim_start().starts_with("admin")
        })
        .await;
    let file = dir.path().join("admin-token");
    let kept = std::fs::read_to_string(&file).expect("the token file");
    let kept = kept.trim();
    assert_eq!(kept.len(), 64, "{kept}");
    assert!(line.contains(kept), "the first run shows the token: {line}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "token file mode {mode:o}");

    let http = reqwest::Client::new();
    for service in SERVICES {
        let url = format!("http://{}/admin/dead-letters", up.addresses[service]);
        let refused = http.get(&url).send().await.unwrap();
        assert_eq!(refused.status(), 401, "{service} without a token");
        let taken = http.get(&url).bearer_auth(kept).send().await.unwrap();
        assert_eq!(taken.status(), 200, "{service} with the token");
    }
    drop(up);

    let again = Up::start(dir.path(), &[]).await;
    let line = again
        .wait_for_line("the admin token line", |line| {
            line.trim_start().starts_with("admin")
        })
        .await;
    assert!(!line.contains(kept), "a later run hides the token: {line}");
    assert!(line.contains("admin-token"), "{line}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap().trim(),
        kept,
        "the token is reused"
    );
    let url = format!("http://{}/admin/audit", again.addresses["order"]);
    let taken = http.get(&url).bearer_auth(kept).send().await.unwrap();
    assert_eq!(taken.status(), 200);
}
