//! Scheduled restore drills (`--drill-every`): each one's evidence goes into the repository,
//! then into the metrics.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::clock::Clock;
use super::metrics::Metrics;
use crate::commands::drill::{DrillOptions, Objective};
use crate::config::Settings;
use crate::repo::Writer;

/// Run one drill and record its evidence.
pub(crate) async fn scheduled_drill(
    settings: Arc<Settings>,
    opts: DrillOptions,
    repo: Writer,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
) {
    tracing::info!("scheduled restore drill starting");
    let ev = crate::commands::drill::run(&settings, &opts).await;
    for line in ev.summary().lines() {
        match ev.passed() {
            true => tracing::info!("{line}"),
            false => tracing::warn!("{line}"),
        }
    }
    // The evidence first, the metrics after: a drill the metrics show is one the repository
    // records (a daemon stopped right after the metrics changed lost the evidence on a slow store).
    if let Err(e) = crate::commands::drill::store(&repo, &ev).await {
        tracing::error!("the drill's evidence could not be stored in the repository: {e}");
    }
    metrics
        .last_drill_unix
        .store(clock.now_micros() / 1_000_000, Ordering::Relaxed);
    metrics
        .last_drill_ok
        .store(u64::from(ev.passed()), Ordering::Relaxed);
    let ms = |o: &Objective| o.measured_seconds.map_or(0, |s| (s * 1000.0) as u64);
    metrics.last_drill_rto_ms.store(ms(&ev.rto), Ordering::Relaxed);
    metrics.last_drill_rpo_ms.store(ms(&ev.rpo), Ordering::Relaxed);
}
