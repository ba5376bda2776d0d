//! The restorable window the metrics show: refreshed from the repository catalog every minute,
//! incrementally (each refresh downloads only new manifests and summaries).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::metrics::Metrics;
use crate::catalog::Catalog;
use crate::repo::Reader;
use crate::wal::TimelineId;

/// The last catalog read, shared by the refreshes (one at a time).
pub(crate) type LastCatalog = Arc<tokio::sync::Mutex<Option<Catalog>>>;

/// Refresh the restorable-window gauges from the repository catalog (incrementally: see
/// [`Catalog::refresh_outlines`]).
pub(crate) async fn update_window(repo: Reader, metrics: Arc<Metrics>, last: LastCatalog) {
    let mut last = last.lock().await;
    match Catalog::refresh_outlines(&repo, last.as_ref()).await {
        Ok(cat) => {
            metrics
                .backups
                .store(cat.backups().len() as u64, Ordering::Relaxed);
            // The newest backup in the repository, whoever took it (cron, another host, this
            // daemon before a restart): the backup-age alert holds from the first refresh.
            if let Some(newest) = cat.backups().iter().map(|m| m.stop_time_us).max() {
                metrics
                    .last_backup_unix
                    .fetch_max(newest / 1_000_000, Ordering::Relaxed);
            }
            let tli = cat.timeline_ids().last().copied().unwrap_or(TimelineId::FIRST);
            if let Some(w) = cat.window(tli) {
                metrics
                    .window_earliest_unix
                    .store(w.earliest / 1_000_000, Ordering::Relaxed);
                metrics
                    .window_latest_unix
                    .store(w.latest.map_or(0, |l| l / 1_000_000), Ordering::Relaxed);
            }
            *last = Some(cat);
        }
        Err(e) => tracing::warn!("restorable window not updated: {e}"),
    }
}
