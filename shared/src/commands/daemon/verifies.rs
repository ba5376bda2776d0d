//! Scheduled verifies (`--verify-every`): listing-based, like `restore-agent verify` without
//! `--deep`; the outcome goes to the log and the metrics.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::clock::Clock;
use super::metrics::Metrics;
use crate::repo::Reader;

/// Run one verify and record what it found. verify itself waits for a running expire and looks
/// again after one (verify.rs).
pub(crate) async fn scheduled_verify(repo: Reader, metrics: Arc<Metrics>, clock: Arc<dyn Clock>) {
    let now = clock.now_micros();
    let result = crate::commands::verify::verify(&repo, false, 4).await;
    metrics.last_verify_unix.store(now / 1_000_000, Ordering::Relaxed);
    match result {
        Ok(report) => {
            metrics
                .last_verify_ok
                .store(u64::from(!report.at_risk()), Ordering::Relaxed);
            metrics
                .last_verify_problems
                .store(report.problems.len() as u64, Ordering::Relaxed);
            metrics
                .repository_bytes
                .store(report.repository_bytes, Ordering::Relaxed);
            metrics
                .repository_objects
                .store(report.repository_objects, Ordering::Relaxed);
            metrics.backups.store(report.backups, Ordering::Relaxed);
            for p in &report.problems {
                tracing::warn!("verify: {p}");
            }
            tracing::info!(
                problems = report.problems.len(),
                at_risk = report.at_risk(),
                "scheduled verify done"
            );
        }
        Err(e) => {
            metrics.last_verify_ok.store(0, Ordering::Relaxed);
            tracing::error!("scheduled verify failed: {e}");
        }
    }
}
