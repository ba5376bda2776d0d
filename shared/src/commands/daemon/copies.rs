//! `--copy-to`: keep a second repository (made by `init --copy-of`) within a stated lag of the
//! first. Every `--copy-every` one copy pass runs ([`crate::commands::copy`]: incremental, so a
//! pass copies what arrived since the last), and the metrics say how far behind the copy is:
//! - `copy_lag_seconds`: since the start of the last complete pass; everything the first
//!   repository held then is in the second;
//! - `copy_lag_bytes`: what the last pass found missing from the second repository.
//!
//! The passes run beside the daemon's other services, on their own task: a slow or unreachable
//! second store never holds up archiving into the first.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::clock::Clock;
use super::metrics::Metrics;
use crate::commands::copy::{CopyError, CopyOptions, CopyReport, copy_repository};
use crate::config::Settings;

/// How often the lag gauge is brought up to date between passes.
const LAG_TICK: Duration = Duration::from_secs(1);

/// The second repository and how to keep it.
#[derive(Debug, Clone)]
pub struct CopyJob {
    /// The second repository's settings (its URL, its store's credentials, the daemon's cap).
    pub target: Settings,
    /// A pass at least this often: the lag the copy is kept within, plus a pass's time.
    pub every: Duration,
    pub opts: CopyOptions,
}

/// What the passes have shown so far.
#[derive(Debug, Default)]
struct Lag {
    /// When (Unix µs) the last complete pass started.
    complete_from: Option<i64>,
}

impl Lag {
    /// Record a pass that started at `started` (Unix µs).
    fn passed(&mut self, started: i64, result: &Result<CopyReport, CopyError>, metrics: &Metrics) {
        match result {
            Ok(report) => {
                let behind = report.copied.bytes
                    + report.repaired.bytes
                    + report.damaged.len() as u64
                    + report.waiting.len() as u64;
                metrics.copy_lag_bytes.store(behind, Ordering::Relaxed);
                metrics
                    .copy_bytes
                    .fetch_add(report.copied.bytes, Ordering::Relaxed);
                metrics
                    .copy_last_ok
                    .store(u64::from(report.complete()), Ordering::Relaxed);
                if report.complete() {
                    self.complete_from = Some(started);
                    metrics
                        .copy_complete_unix
                        .store(started / 1_000_000, Ordering::Relaxed);
                }
            }
            Err(_) => {
                metrics.copy_failed.fetch_add(1, Ordering::Relaxed);
                metrics.copy_last_ok.store(0, Ordering::Relaxed);
            }
        }
    }

    /// The lag gauge at `now` (Unix µs): -1 until a pass completed.
    fn seconds(&self, now: i64) -> i64 {
        self.complete_from
            .map_or(-1, |from| (now - from).max(0) / 1_000_000)
    }
}

/// Copy every `job.every` until the task is aborted (at the daemon's shutdown).
pub(crate) async fn keep_copying(
    source: Arc<Settings>,
    job: CopyJob,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
) {
    metrics.copying.store(1, Ordering::Relaxed);
    metrics.copy_lag_seconds.store(-1, Ordering::Relaxed);
    let mut lag = Lag::default();
    let mut next = clock.now();
    loop {
        if clock.now() >= next {
            let started = clock.now_micros();
            let result = copy_repository(&source, &job.target, &job.opts).await;
            match &result {
                Ok(r) if r.complete() => tracing::info!(
                    to = %job.target.repo,
                    objects = r.copied.objects,
                    bytes = r.copied.bytes,
                    pruned = r.pruned.objects,
                    "copy pass done"
                ),
                Ok(r) => tracing::warn!(
                    to = %job.target.repo,
                    damaged = r.damaged.len(),
                    conflicts = r.conflicts.len(),
                    waiting = r.waiting.len(),
                    "copy pass incomplete: {}",
                    crate::report::Report::render(r).lines().last().unwrap_or_default()
                ),
                Err(e) => tracing::error!(to = %job.target.repo, "copy pass failed: {e}"),
            }
            lag.passed(started, &result, &metrics);
            next = clock.now() + job.every;
        }
        metrics
            .copy_lag_seconds
            .store(lag.seconds(clock.now_micros()), Ordering::Relaxed);
        tokio::time::sleep(LAG_TICK).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::copy::{Skipped, Tally};

    #[test]
    fn the_lag_runs_from_the_start_of_the_last_complete_pass() {
        let metrics = Metrics::default();
        let mut lag = Lag::default();
        assert_eq!(lag.seconds(5_000_000), -1, "no pass yet: unknown");
        let done = CopyReport {
            copied: Tally {
                objects: 3,
                bytes: 3000,
            },
            ..CopyReport::default()
        };
        lag.passed(10_000_000, &Ok(done), &metrics);
        assert_eq!(lag.seconds(70_000_000), 60);
        assert_eq!(metrics.copy_complete_unix.load(Ordering::Relaxed), 10);
        assert_eq!(metrics.copy_lag_bytes.load(Ordering::Relaxed), 3000);
        assert_eq!(metrics.copy_last_ok.load(Ordering::Relaxed), 1);
        // An incomplete pass or a failed one moves nothing: the lag keeps growing.
        let incomplete = CopyReport {
            damaged: vec![Skipped {
                key: "wal/x".into(),
                why: "corrupt".into(),
            }],
            ..CopyReport::default()
        };
        lag.passed(80_000_000, &Ok(incomplete), &metrics);
        lag.passed(90_000_000, &Err(CopyError::Task("unreachable".into())), &metrics);
        assert_eq!(lag.seconds(100_000_000), 90);
        assert_eq!(metrics.copy_last_ok.load(Ordering::Relaxed), 0);
        assert_eq!(metrics.copy_failed.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.copy_bytes.load(Ordering::Relaxed), 3000);
    }
}
