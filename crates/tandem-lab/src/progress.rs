//! Progress on stderr for long commands. indicatif draws the live line only
//! when stderr is a terminal (and `TERM` is not `dumb`); redirected to a
//! file or a pipe, only the finished lines are written, with no escape codes.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    pub fn new() -> Self {
        let bar = ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(120));
        let progress = Self { bar };
        progress.spin("");
        progress
    }

    /// A phase of unknown length: a spinner and `message`.
    pub fn spin(&self, message: impl Into<String>) {
        self.bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                .expect("a valid progress template"),
        );
        self.bar.set_message(message.into());
    }

    /// A phase of `total` steps: a bar, its count and its rate so far.
    pub fn count(&self, message: impl Into<String>, total: u64) {
        self.bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {pos}/{len}, {per_sec} [{elapsed}]",
            )
            .expect("a valid progress template")
            .progress_chars("=> "),
        );
        self.bar.reset();
        self.bar.set_length(total);
        self.bar.set_message(message.into());
    }

    /// Moves the bar of [`Progress::count`] to `done`.
    pub fn set(&self, done: u64) {
        self.bar.set_position(done);
    }

    /// A finished step: a line that stays, on a terminal and in a log alike.
    pub fn done(&self, line: impl AsRef<str>) {
        self.bar.suspend(|| eprintln!("{}", line.as_ref()));
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
