//! The progress bar a restore draws on a terminal (stderr): bytes written of the total, rate and
//! ETA. Only on a TTY; logs and pipes get the log lines alone.

use std::io::IsTerminal;
use std::sync::Arc;

use crate::commands::restore::{NoProgress, Progress};

/// A progress bar on stderr, cleared when dropped.
#[derive(Debug)]
pub struct Bar(pub indicatif::ProgressBar);

impl Bar {
    /// A bar when stderr is a terminal, else nothing drawn.
    pub fn on_stderr() -> Arc<dyn Progress> {
        if std::io::stderr().is_terminal() {
            Arc::new(Bar(indicatif::ProgressBar::new(0)))
        } else {
            Arc::new(NoProgress)
        }
    }
}

impl Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
        self.0.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}
