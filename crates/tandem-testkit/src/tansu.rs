//! A tansu broker of a test's own: the binary `scripts/engines up` builds
//! (with Tandem's patches), on a free port, keeping its log in a directory
//! the test owns, with a one-second maintenance cycle so that retention
//! runs while the test does. Killed when dropped.

use std::net::TcpListener;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// A running private broker.
pub struct PrivateTansu {
    _child: Child,
    /// `127.0.0.1:{port}`, for a `kafka://` URL or a client's
    /// `bootstrap.servers`.
    pub address: String,
}

/// The broker binary `scripts/engines` builds (with Tandem's patches);
/// fails the test, naming what to run, when it is not built.
pub fn binary() -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/engines");
    let output = std::process::Command::new(&script)
        .arg("tansu-path")
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|error| panic!("running {}: {error}", script.display()));
    assert!(
        output.status.success(),
        "the tansu broker is not built: run scripts/engines up"
    );
    String::from_utf8(output.stdout)
        .expect("a path")
        .trim()
        .to_owned()
}

/// Starts a private tansu keeping its log in `dir`; fails the test, naming
/// what to run, when the broker is not built.
pub async fn start(dir: &std::path::Path) -> PrivateTansu {
    let binary = binary();
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let listener = format!("tcp://127.0.0.1:{port}");
    let child = Command::new(binary)
        .args(["broker", "--listener-url", &listener])
        .args(["--advertised-listener-url", &listener])
        .arg("--storage-engine")
        .arg(format!(
            "sqlite:///{}?maintenance_interval=1s",
            dir.join("tansu.db").display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start tansu");
    crate::eventually(
        "the test's own tansu listens",
        Duration::from_secs(60),
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
    )
    .await;
    PrivateTansu {
        _child: child,
        address: format!("127.0.0.1:{port}"),
    }
}
