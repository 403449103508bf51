//! Waiting for new work without spinning: an in-process signal wakes at
//! once; commits by other processes are noticed by a cheap poll whose
//! interval doubles while nothing happens.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::store::{ExternalChanges, StoreError};

/// Shortest pause between two looks at other processes' commits.
pub const FIRST_POLL: Duration = Duration::from_micros(250);
/// The longest pause for readers of the bus (whose writers are other
/// processes).
pub const LONGEST_POLL: Duration = Duration::from_millis(2);
/// The longest pause for a relay: the writers of its outbox are mostly in
/// its own process and signal it directly; other processes are rare.
pub const LONGEST_RELAY_POLL: Duration = Duration::from_millis(50);

/// Waits until `signal` changes, `external` reports a change, or `max_wait`
/// passes; looks at `external` with pauses doubling up to `longest_poll`.
/// Returns true if something changed.
pub async fn wait_for_change(
    signal: &mut watch::Receiver<u64>,
    mut external: Option<&mut Box<dyn ExternalChanges>>,
    max_wait: Duration,
    longest_poll: Duration,
) -> Result<bool, StoreError> {
    let deadline = Instant::now() + max_wait;
    let mut pause = FIRST_POLL;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        let step = pause.min(deadline - now);
        tokio::select! {
            changed = signal.changed() => {
                if changed.is_err() {
                    // The sender is gone: nothing in-process will signal again.
                    tokio::time::sleep(step).await;
                } else {
                    return Ok(true);
                }
            }
            _ = tokio::time::sleep(step) => {}
        }
        if let Some(external) = external.as_deref_mut() {
            if external.changed()? {
                return Ok(true);
            }
        }
        pause = (pause * 2).min(longest_poll);
    }
}
