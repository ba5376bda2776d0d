//! The uploader: scans `pg_wal/archive_status` for `.ready` files, uploads them with bounded
//! parallelism (failed files waiting before their next attempt), and marks each durable upload
//! in the spool so that `archive-agent push` answers at once.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, UNIX_EPOCH};

use tokio::task::JoinSet;

use super::clock::Clock;
use super::indexer::IndexJob;
use super::listing::Listings;
use super::metrics::Metrics;
use crate::commands::push::{self, PushError, PushOutcome};
use crate::config::Settings;
use crate::local::handoff::Spool;
use crate::repo::Writer;
use crate::retry::KeyedBackoff;
use crate::wal::WalFileName;

/// What one upload did: the push outcome and the bytes read.
type UploadResult = Result<(PushOutcome, u64), UploadError>;

/// An upload that ended: the file and what became of it.
pub(crate) type Uploaded = (WalFileName, UploadResult);

/// Why an upload did not end with a marker in the spool.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UploadError {
    #[error("{0}")]
    Push(#[from] PushError),
    /// The file is durable in the repository, but the spool cannot say so (a full disk): push
    /// then checks the repository itself, so nothing is lost, but a human should look.
    #[error(
        "stored in the repository, but cannot write its marker in the spool {path}: {source} (push checks the repository itself meanwhile)"
    )]
    Marker { path: String, source: std::io::Error },
}

/// The uploads in flight and the files waiting after a failure.
#[derive(Debug)]
pub(crate) struct Uploader {
    settings: Arc<Settings>,
    spool: Spool,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    status_dir: PathBuf,
    wal_dir: PathBuf,
    /// Uploads at once (at least one).
    parallel: usize,
    tasks: JoinSet<Uploaded>,
    in_flight: HashSet<WalFileName>,
    /// Failed files wait before their next attempt: 1 s, doubling to 60 s.
    backoff: KeyedBackoff<WalFileName>,
    /// Where uploaded segments go to be summarized for the time index.
    index: tokio::sync::mpsc::UnboundedSender<IndexJob>,
    /// The check before writing, on a store that ignores create-only writes.
    listings: Listings,
}

impl Uploader {
    pub(crate) fn new(
        settings: Arc<Settings>,
        spool: Spool,
        pgdata: &Path,
        parallel: usize,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        index: tokio::sync::mpsc::UnboundedSender<IndexJob>,
    ) -> Uploader {
        Uploader {
            settings,
            spool,
            metrics,
            status_dir: pgdata.join("pg_wal/archive_status"),
            wal_dir: pgdata.join("pg_wal"),
            parallel: parallel.max(1),
            tasks: JoinSet::new(),
            in_flight: HashSet::new(),
            backoff: KeyedBackoff::default(),
            index,
            listings: Listings::new(Arc::clone(&clock)),
            clock,
        }
    }

    /// Uploads in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether uploads are running.
    pub(crate) fn has_tasks(&self) -> bool {
        !self.tasks.is_empty()
    }

    /// The next upload to end (`None` at once when none runs: guard with `has_tasks`).
    pub(crate) async fn next_done(&mut self) -> Option<Uploaded> {
        let done = self.tasks.join_next().await?;
        Some(done.expect("upload task panicked"))
    }

    /// Record an upload that ended, in the log, the metrics and the backoff.
    pub(crate) fn finished(&mut self, (name, result): Uploaded) {
        self.in_flight.remove(&name);
        record(
            &self.metrics,
            &mut self.backoff,
            self.clock.as_ref(),
            name,
            result,
        );
    }

    /// Scan archive_status, update the gauges, and start uploads of the ready files up to the
    /// parallelism, oldest first; `repo` is `None` while uploads are paused.
    pub(crate) fn start_ready(&mut self, repo: Option<&Writer>) {
        let (ready, oldest) = scan_ready(&self.status_dir, self.clock.now_micros());
        self.metrics
            .ready_files
            .store(ready.len() as u64, Ordering::Relaxed);
        self.metrics
            .oldest_ready_age_secs
            .store(oldest.as_secs(), Ordering::Relaxed);
        // One listing of the markers per scan, not one per ready file.
        let archived: HashSet<WalFileName> = self.spool.archived_names().into_iter().collect();
        let now = self.clock.now();
        for name in ready {
            let Some(repo) = repo.filter(|_| self.in_flight.len() < self.parallel) else {
                break;
            };
            if self.in_flight.contains(&name) || self.backoff.waiting(&name, now) {
                continue;
            }
            if archived.contains(&name) || self.spool.upload_in_progress(&name) {
                continue; // stored, or push is storing it right now
            }
            self.in_flight.insert(name);
            let path = self.wal_dir.join(name.to_string());
            let (settings, repo, spool) = (Arc::clone(&self.settings), repo.clone(), self.spool.clone());
            let (index, listings) = (self.index.clone(), self.listings.clone());
            let span = tracing::info_span!("upload", file = %name);
            self.tasks.spawn(tracing::Instrument::instrument(
                async move {
                    spool.begin_upload(&name);
                    let result = upload(settings, repo, spool.clone(), path, index, listings).await;
                    spool.end_upload(&name);
                    (name, result)
                },
                span,
            ));
        }
    }

    /// Drop markers of files PostgreSQL has removed or recycled: a recycled segment's name comes
    /// back later with other bytes, which the marker's hash would refuse anyway.
    pub(crate) fn forget_recycled(&self) {
        for name in self.spool.archived_names() {
            if !self.wal_dir.join(name.to_string()).exists() {
                self.spool.forget(&name);
            }
        }
    }

    /// Wait for the uploads in flight, recording each.
    pub(crate) async fn finish(mut self) {
        while let Some(done) = self.next_done().await {
            self.finished(done);
        }
    }
}

/// `.ready` files in archive_status, oldest first (timeline history files first: PostgreSQL's
/// archiver prefers them too), with the age of the oldest at `now_micros` (wall clock).
fn scan_ready(status_dir: &Path, now_micros: i64) -> (Vec<WalFileName>, Duration) {
    let mut names = Vec::new();
    let mut oldest = Duration::ZERO;
    let Ok(entries) = std::fs::read_dir(status_dir) else {
        return (names, oldest);
    };
    for e in entries.flatten() {
        let file_name = e.file_name();
        let Some(stem) = file_name.to_str().and_then(|n| n.strip_suffix(".ready")) else {
            continue;
        };
        let Ok(name) = stem.parse::<WalFileName>() else {
            continue;
        };
        if let Ok(modified) = e.metadata().and_then(|m| m.modified()) {
            let modified_micros = match modified.duration_since(UNIX_EPOCH) {
                Ok(d) => d.as_micros() as i64,
                Err(before) => -(before.duration().as_micros() as i64),
            };
            // A file from the future (a clock set back) is no age at all.
            let age = u64::try_from(now_micros.saturating_sub(modified_micros)).unwrap_or(0);
            oldest = oldest.max(Duration::from_micros(age));
        }
        names.push(name);
    }
    names.sort_by_key(|n| (!matches!(n, WalFileName::History(_)), *n));
    (names, oldest)
}

/// Upload one file, record it in the spool, and hand a segment to the indexer (before the
/// upload's entry in the spool ends: the indexer waits for a segment's predecessor while that is
/// being uploaded, so it never misses one that is on its way).
async fn upload(
    settings: Arc<Settings>,
    mut repo: Writer,
    spool: Spool,
    path: PathBuf,
    index: tokio::sync::mpsc::UnboundedSender<IndexJob>,
    listings: Listings,
) -> UploadResult {
    // Opened twice: for the upload, and for the indexer (see IndexJob::source), before either
    // reads it.
    let read_path = path.clone();
    let (src, for_index) = tokio::task::spawn_blocking(move || {
        push::open_wal_file(&read_path).map(|src| (src, push::open_wal_file(&read_path).ok()))
    })
    .await
    .map_err(|e| PushError::Read {
        path: path.display().to_string(),
        source: std::io::Error::other(e),
    })??;
    // Metadata when opened, before the read: if the file changed meanwhile, the marker will
    // not match it.
    let (name, size, meta, info) = (src.name, src.len, src.meta.clone(), src.info);
    let store = repo.writable();
    let check_first = store.create_semantics_for(usize::try_from(size).unwrap_or(usize::MAX))
        != crate::repo::store::CreateSemantics::Atomic;
    let listed_absent = check_first && listings.absent(store, &crate::repo::layout::wal_key(&name)).await;
    let how = push::Archiving {
        spool: Some(&spool),
        indexing: push::Indexing::Deferred,
        listed_absent,
    };
    let outcome = push::archive_source(&settings, &mut repo, src, how).await?;
    let hash = outcome.hash.expect("an archived file was read");
    let marked = spool
        .mark_archived(repo.id(), &name, &hash, size, Some(&meta))
        .map_err(|source| UploadError::Marker {
            path: spool.dir().display().to_string(),
            source,
        });
    if let (WalFileName::Segment(seg), Some(info), Some(source)) = (name, info, for_index) {
        // A closed channel (the daemon is stopping) costs only this summary.
        let _ = index.send(IndexJob {
            seg,
            segment_size: info.segment_size,
            source,
            meta,
            newly_stored: outcome.newly_stored,
            repo,
        });
    }
    marked?;
    Ok((outcome, size))
}

/// An upload's end in the log, the metrics and the backoff.
fn record(
    metrics: &Metrics,
    backoff: &mut KeyedBackoff<WalFileName>,
    clock: &dyn Clock,
    name: WalFileName,
    result: UploadResult,
) {
    match result {
        Ok((outcome, _)) if !outcome.newly_stored => {
            backoff.succeeded(&name);
            tracing::info!("daemon {name}: already archived, identical");
        }
        Ok((outcome, size)) => {
            backoff.succeeded(&name);
            metrics.archived.fetch_add(1, Ordering::Relaxed);
            metrics.bytes_read.fetch_add(size, Ordering::Relaxed);
            metrics
                .bytes_stored
                .fetch_add(outcome.stored_size, Ordering::Relaxed);
            metrics
                .last_archived_unix
                .store(clock.now_micros() / 1_000_000, Ordering::Relaxed);
            if let Ok(mut n) = metrics.last_archived_name.lock() {
                *n = name.to_string();
            }
            tracing::info!(
                "daemon {name}: archived, {size} bytes, stored {} bytes",
                outcome.stored_size
            );
        }
        Err(e) => {
            metrics.failed.fetch_add(1, Ordering::Relaxed);
            let (_, wait) = backoff.failed(name, clock.now());
            match e {
                UploadError::Marker { .. } => tracing::error!("daemon {name}: {e}; retrying in {wait:?}"),
                UploadError::Push(_) => tracing::warn!(
                    "daemon {name}: {e}; retrying in {wait:?} (PostgreSQL's own push also retries)"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::daemon::clock::ManualClock;

    const SEGMENT: &str = "000000010000000000000003";

    fn ready(dir: &Path, name: &str, mtime_unix: u64) {
        let path = dir.join(format!("{name}.ready"));
        let file = std::fs::File::create(&path).unwrap();
        file.set_modified(UNIX_EPOCH + Duration::from_secs(mtime_unix))
            .unwrap();
    }

    #[test]
    fn scan_ready_lists_history_files_first_then_oldest_segments_with_the_oldest_age() {
        let dir = tempfile::tempdir().unwrap();
        ready(dir.path(), "000000010000000000000004", 1_000);
        ready(dir.path(), SEGMENT, 900);
        ready(dir.path(), "00000002.history", 1_100);
        std::fs::write(dir.path().join("000000010000000000000002.done"), b"").unwrap();
        std::fs::write(dir.path().join("notwal.ready"), b"").unwrap();
        let (names, oldest) = scan_ready(dir.path(), 1_200 * 1_000_000);
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        assert_eq!(names, ["00000002.history", SEGMENT, "000000010000000000000004"]);
        assert_eq!(
            oldest,
            Duration::from_secs(300),
            "the oldest .ready file's age on the clock"
        );
        assert_eq!(
            scan_ready(dir.path(), 0).1,
            Duration::ZERO,
            "files from the future"
        );
        assert!(scan_ready(&dir.path().join("gone"), 0).0.is_empty());
    }

    #[test]
    fn a_failed_upload_waits_on_the_clock_before_its_next_attempt() {
        let (metrics, clock) = (Metrics::default(), ManualClock::new(5_000_000));
        let mut backoff = KeyedBackoff::default();
        let name: WalFileName = SEGMENT.parse().unwrap();
        let failure = || {
            Err(UploadError::Push(PushError::Read {
                path: SEGMENT.into(),
                source: std::io::Error::other("disk"),
            }))
        };
        record(&metrics, &mut backoff, &clock, name, failure());
        assert_eq!(metrics.failed.load(Ordering::Relaxed), 1);
        assert!(backoff.waiting(&name, clock.now()));
        clock.advance(Duration::from_millis(999));
        assert!(backoff.waiting(&name, clock.now()));
        clock.advance(Duration::from_millis(1));
        assert!(
            !backoff.waiting(&name, clock.now()),
            "1 s after the first failure"
        );
        record(&metrics, &mut backoff, &clock, name, failure());
        clock.advance(Duration::from_millis(1999));
        assert!(backoff.waiting(&name, clock.now()), "2 s after the second");
        assert_eq!(metrics.last_archived_unix.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn an_upload_that_stored_the_file_counts_it_at_the_clock_s_time() {
        let (metrics, clock) = (Metrics::default(), ManualClock::new(1_700_000_123_456_789));
        let mut backoff = KeyedBackoff::default();
        let name: WalFileName = SEGMENT.parse().unwrap();
        let outcome = |newly_stored| PushOutcome {
            name,
            size: 16 << 20,
            stored_size: 1234,
            newly_stored,
            hash: None,
        };
        record(
            &metrics,
            &mut backoff,
            &clock,
            name,
            Ok((outcome(false), 16 << 20)),
        );
        assert_eq!(
            metrics.archived.load(Ordering::Relaxed),
            0,
            "already archived: not counted"
        );
        record(
            &metrics,
            &mut backoff,
            &clock,
            name,
            Ok((outcome(true), 16 << 20)),
        );
        assert_eq!(metrics.archived.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.bytes_read.load(Ordering::Relaxed), 16 << 20);
        assert_eq!(metrics.bytes_stored.load(Ordering::Relaxed), 1234);
        assert_eq!(metrics.last_archived_unix.load(Ordering::Relaxed), 1_700_000_123);
        assert_eq!(*metrics.last_archived_name.lock().unwrap(), SEGMENT);
    }
}
