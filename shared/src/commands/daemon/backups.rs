//! Scheduled backups (`--backup-every`), each followed by an expire when a retention policy is
//! set; their outcome goes to the log and the metrics.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::clock::Clock;
use super::metrics::Metrics;
use crate::commands::backup::{BackupOptions, DEFAULT_CHUNK_SIZE, take_backup};
use crate::commands::expire::ExpireError;
use crate::config::Settings;
use crate::repo::{RepoError, Writer};
use crate::retention::Policy;

/// What a scheduled backup takes, and what it expires after.
#[derive(Debug, Clone)]
pub(crate) struct BackupJob {
    /// `None`: over the replication protocol, from `conn` (`--stream`).
    pub pgdata: Option<PathBuf>,
    pub conn: String,
    pub retention: Option<Policy>,
    /// Verify page checksums (`--no-page-checksums` / `page_checksums = false` turn it off).
    pub page_checksums: bool,
}

/// Take a backup, then expire with the retention policy if there is one (not after a failed
/// backup).
pub(crate) async fn scheduled_backup(
    settings: Arc<Settings>,
    job: BackupJob,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
) {
    let opts = BackupOptions {
        pgdata: job.pgdata,
        pg_conn: job.conn,
        chunk_size: DEFAULT_CHUNK_SIZE,
        parallel: 4,
        wal_timeout: Duration::from_secs(600),
        primary_conn: None,
        incremental: false,
        page_checksums: job.page_checksums,
    };
    let started = clock.now();
    match take_backup(&settings, &opts).await {
        Ok(m) => {
            metrics
                .last_backup_unix
                .store(m.stop_time_us / 1_000_000, Ordering::Relaxed);
            metrics.last_backup_duration_ms.store(
                clock.now().saturating_duration_since(started).as_millis() as u64,
                Ordering::Relaxed,
            );
            metrics
                .last_backup_bytes
                .store(m.stats.logical_bytes, Ordering::Relaxed);
            let bad_pages = m.page_checks.as_ref().map_or(0, |c| c.bad_total);
            metrics.last_backup_bad_pages.store(bad_pages, Ordering::Relaxed);
            if bad_pages > 0 {
                tracing::error!(
                    "scheduled backup {}: {bad_pages} damaged pages in the cluster (listed in its manifest and by restore-agent verify)",
                    m.id
                );
            }
            tracing::info!(
                "scheduled backup {} done: {} bytes, {} uploaded",
                m.id,
                m.stats.logical_bytes,
                m.stats.new_bytes
            );
        }
        Err(e) => {
            metrics.backups_failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!("scheduled backup failed: {e}");
            return;
        }
    }
    if let Some(policy) = job.retention {
        scheduled_expire(&settings, &policy, &metrics, clock.now_micros()).await;
    }
}

/// Beside the stream (`--stream --backup-every`): a backup over the replication protocol every
/// `every`, the first one interval after the start (as the scheduler does for `--pgdata`), each
/// followed by an expire when a retention policy is set. A backup that runs long delays the
/// next; none is started to catch up. Runs until aborted.
pub(crate) async fn over_the_stream(
    settings: Arc<Settings>,
    job: BackupJob,
    every: Duration,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
) {
    loop {
        tokio::time::sleep(every).await;
        scheduled_backup(
            Arc::clone(&settings),
            job.clone(),
            Arc::clone(&metrics),
            Arc::clone(&clock),
        )
        .await;
    }
}

/// Why the expire after a scheduled backup did not run through.
#[derive(Debug, thiserror::Error)]
enum ScheduledExpireError {
    #[error(transparent)]
    Open(#[from] RepoError),
    #[error(transparent)]
    Expire(#[from] ExpireError),
}

/// Expire after a scheduled backup, as of `now` (Unix micros); the outcome goes to the log and
/// the metrics.
async fn scheduled_expire(settings: &Settings, policy: &Policy, metrics: &Metrics, now: i64) {
    let result = async {
        let repo = Writer::open_writable(&settings.repo, &settings.store_options()).await?;
        Ok::<_, ScheduledExpireError>(crate::commands::expire::expire(&repo, policy, false, now).await?)
    }
    .await;
    metrics.last_expire_unix.store(now / 1_000_000, Ordering::Relaxed);
    match result {
        Ok(report) => {
            metrics.last_expire_ok.store(1, Ordering::Relaxed);
            metrics
                .last_expire_deleted_bytes
                .store(report.bytes(), Ordering::Relaxed);
            metrics
                .last_expire_deleted_backups
                .store(report.expired.len() as u64, Ordering::Relaxed);
            metrics.backups.store(report.kept.len() as u64, Ordering::Relaxed);
            tracing::info!(
                kept = report.kept.len(),
                expired = report.expired.len(),
                deleted_bytes = report.bytes(),
                deferred = report.deferred.is_some(),
                "expire after the scheduled backup ({})",
                report.policy
            );
        }
        Err(e) => {
            metrics.last_expire_ok.store(0, Ordering::Relaxed);
            tracing::error!("expire after the scheduled backup failed: {e}");
        }
    }
}
