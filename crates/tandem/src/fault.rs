//! Named crash points for the crash-matrix tests.
//!
//! When the environment variable `TANDEM_FAULT` names a point, the process
//! prints `TANDEM_FAULT_REACHED <point>` on stdout when it gets there and
//! then stops making progress, holding whatever it holds (an open
//! transaction, an unrecorded publish), so that the test can kill -9 it at
//! exactly that moment. Unset, a point costs one load of a cached value.
//!
//! A test that needs a failure it can switch off while the process runs
//! (an event that fails, then is redriven once the cause is cleared) uses
//! [`failing`]: armed by `TANDEM_FAULT`, or while the file that
//! `TANDEM_FAULT_FILE` names exists and lists the point on a line.

use std::io::Write;
use std::sync::OnceLock;

fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            std::env::var("TANDEM_FAULT")
                .ok()
                .filter(|name| !name.is_empty())
        })
        .as_deref()
}

/// Stops here, for good, if this point is armed.
pub fn point(name: &str) {
    if armed() != Some(name) {
        return;
    }
    reached(name);
    loop {
        std::thread::park();
    }
}

/// The asynchronous kind of [`point`]: if this point is armed, the calling
/// task never gets past it (the thread and every other task go on), so a
/// test can hold one part of a live process, such as a consumer, while it
/// watches the rest. The caller decides what may still cancel the wait.
pub async fn hold(name: &str) {
    if armed() != Some(name) {
        return;
    }
    reached(name);
    std::future::pending::<()>().await;
}

/// Whether the switchable failure `name` is on now: `TANDEM_FAULT` names
/// it, or the file named by `TANDEM_FAULT_FILE` exists and has `name` on a
/// line of its own (read at each call, so a test turns it off by removing
/// the file). Without `TANDEM_FAULT_FILE` this costs what [`point`] costs.
pub fn failing(name: &str) -> bool {
    static FILE: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    if armed() == Some(name) {
        return true;
    }
    let Some(file) = FILE
        .get_or_init(|| std::env::var_os("TANDEM_FAULT_FILE").map(Into::into))
        .as_deref()
    else {
        return false;
    };
    std::fs::read_to_string(file).is_ok_and(|text| text.lines().any(|line| line.trim() == name))
}

fn reached(name: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "TANDEM_FAULT_REACHED {name}");
    let _ = stdout.flush();
}
