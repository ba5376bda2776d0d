//! `archive-agent daemon`: the sidecar that archives WAL ahead of PostgreSQL's archiver.
//!
//! PostgreSQL runs `archive_command` once per segment, one at a time; a busy primary can write
//! WAL faster than serial uploads drain it. The daemon watches `pg_wal/archive_status` (inotify
//! through `notify`, plus a rescan at start, on every event-queue overflow or error, and on a
//! timer), uploads `.ready` files with bounded parallelism, and records each durable upload in
//! the spool ([`crate::spool`]), so that `archive-agent push %p` answers at once. It never
//! touches PostgreSQL's status files: PostgreSQL's archiver still calls push for every file and
//! renames `.ready` to `.done` itself, so WAL is never dropped and push stays correct whatever
//! the daemon does.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::archive::{self, PushError, PushOutcome};
use crate::backup::take::{BackupOptions, DEFAULT_CHUNK_SIZE, take_backup};
use crate::config::Settings;
use crate::repo::{Reader, RepoError, Writer};
use crate::retry::KeyedBackoff;
use crate::spool::Spool;
use crate::wal::WalFileName;

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub pgdata: PathBuf,
    /// Uploads at once.
    pub parallel: usize,
    /// Full rescan of archive_status at least this often, whatever the watcher says.
    pub rescan_every: Duration,
    /// Connection for scheduled backups and forced WAL switches.
    pub pg_conn: Option<String>,
    pub backup_every: Option<Duration>,
    /// Force a WAL switch when WAL written this long ago is not archived yet.
    pub max_wal_age: Option<Duration>,
    pub metrics_addr: Option<SocketAddr>,
    /// Expire with this policy after each scheduled backup.
    pub retention: Option<crate::retention::Policy>,
    /// Run `verify` (listing-based) this often.
    pub verify_every: Option<Duration>,
    /// Run a restore drill this often, storing its evidence in the repository.
    pub drill_every: Option<Duration>,
    pub drill: Option<crate::drill::DrillOptions>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Push(#[from] PushError),
    #[error("cannot watch {path}: {message}")]
    Watch { path: String, message: String },
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot create the spool {path}: {source}")]
    Spool { path: String, source: std::io::Error },
}

/// Counters and gauges exported on `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub archived: AtomicU64,
    pub failed: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_stored: AtomicU64,
    pub ready_files: AtomicU64,
    pub oldest_ready_age_secs: AtomicU64,
    pub last_archived_unix: AtomicI64,
    pub last_archived_name: Mutex<String>,
    pub last_backup_unix: AtomicI64,
    pub last_backup_duration_ms: AtomicU64,
    pub last_backup_bytes: AtomicU64,
    pub backups_failed: AtomicU64,
    /// Restorable window of the newest timeline (Unix seconds; 0 when unknown).
    pub window_earliest_unix: AtomicI64,
    pub window_latest_unix: AtomicI64,
    /// Backups in the repository (from the last catalog read).
    pub backups: AtomicU64,
    pub last_expire_unix: AtomicI64,
    /// 1 when the last expire succeeded, 0 when it failed.
    pub last_expire_ok: AtomicU64,
    pub last_expire_deleted_bytes: AtomicU64,
    pub last_expire_deleted_backups: AtomicU64,
    pub last_verify_unix: AtomicI64,
    /// 1 when the last verify found nothing at risk, 0 otherwise (or when it could not run).
    pub last_verify_ok: AtomicU64,
    pub last_verify_problems: AtomicU64,
    /// Bytes and objects in the repository, as the last verify listed them.
    pub repository_bytes: AtomicU64,
    pub repository_objects: AtomicU64,
    pub last_drill_unix: AtomicI64,
    /// 1 when the last drill passed, 0 when it failed (or none ran).
    pub last_drill_ok: AtomicU64,
    /// Milliseconds measured by the last drill (0 when not measured).
    pub last_drill_rto_ms: AtomicU64,
    pub last_drill_rpo_ms: AtomicU64,
}

impl Metrics {
    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        let gi = |a: &AtomicI64| a.load(Ordering::Relaxed).to_string();
        let name = self
            .last_archived_name
            .lock()
            .map(|n| n.clone())
            .unwrap_or_default();
        let backup_secs = format!(
            "{:.3}",
            self.last_backup_duration_ms.load(Ordering::Relaxed) as f64 / 1000.0
        );
        // (name with labels, type, help, value)
        let ms = |a: &AtomicU64| format!("{:.3}", a.load(Ordering::Relaxed) as f64 / 1000.0);
        let metrics: [(String, &str, &str, String); 29] = [
            (
                "segments_archived_total".into(),
                "counter",
                "WAL files uploaded by the daemon",
                g(&self.archived),
            ),
            (
                "segments_failed_total".into(),
                "counter",
                "WAL file uploads that failed (retried later)",
                g(&self.failed),
            ),
            (
                "bytes_read_total".into(),
                "counter",
                "Bytes of WAL read",
                g(&self.bytes_read),
            ),
            (
                "bytes_stored_total".into(),
                "counter",
                "Bytes written to the repository for WAL",
                g(&self.bytes_stored),
            ),
            (
                "ready_files".into(),
                "gauge",
                "WAL files PostgreSQL has marked .ready",
                g(&self.ready_files),
            ),
            (
                "oldest_ready_age_seconds".into(),
                "gauge",
                "Age of the oldest .ready file",
                g(&self.oldest_ready_age_secs),
            ),
            (
                "last_archived_timestamp_seconds".into(),
                "gauge",
                "When the last WAL file was archived",
                gi(&self.last_archived_unix),
            ),
            (
                format!("last_archived_info{{file=\"{name}\"}}"),
                "gauge",
                "The last WAL file archived",
                "1".into(),
            ),
            (
                "last_backup_timestamp_seconds".into(),
                "gauge",
                "When the last scheduled backup finished",
                gi(&self.last_backup_unix),
            ),
            (
                "last_backup_duration_seconds".into(),
                "gauge",
                "How long the last scheduled backup took",
                backup_secs,
            ),
            (
                "last_backup_bytes".into(),
                "gauge",
                "Bytes the last scheduled backup covered",
                g(&self.last_backup_bytes),
            ),
            (
                "backups_failed_total".into(),
                "counter",
                "Scheduled backups that failed",
                g(&self.backups_failed),
            ),
            (
                "restorable_earliest_timestamp_seconds".into(),
                "gauge",
                "Earliest restorable time on the newest timeline",
                gi(&self.window_earliest_unix),
            ),
            (
                "restorable_latest_timestamp_seconds".into(),
                "gauge",
                "Latest restorable time on the newest timeline (just before the last archived transaction)",
                gi(&self.window_latest_unix),
            ),
            (
                "backups".into(),
                "gauge",
                "Backups in the repository",
                g(&self.backups),
            ),
            (
                "last_expire_timestamp_seconds".into(),
                "gauge",
                "When the last expire ran (0: never)",
                gi(&self.last_expire_unix),
            ),
            (
                "last_expire_success".into(),
                "gauge",
                "1 if the last expire succeeded",
                g(&self.last_expire_ok),
            ),
            (
                "last_expire_deleted_bytes".into(),
                "gauge",
                "Bytes the last expire deleted",
                g(&self.last_expire_deleted_bytes),
            ),
            (
                "last_expire_deleted_backups".into(),
                "gauge",
                "Backups the last expire deleted",
                g(&self.last_expire_deleted_backups),
            ),
            (
                "last_verify_timestamp_seconds".into(),
                "gauge",
                "When the last verify ran (0: never)",
                gi(&self.last_verify_unix),
            ),
            (
                "last_verify_success".into(),
                "gauge",
                "1 if the last verify found every backup restorable",
                g(&self.last_verify_ok),
            ),
            (
                "last_verify_problems".into(),
                "gauge",
                "Problems the last verify reported",
                g(&self.last_verify_problems),
            ),
            (
                "repository_bytes".into(),
                "gauge",
                "Bytes stored in the repository (as the last verify listed them)",
                g(&self.repository_bytes),
            ),
            (
                "repository_objects".into(),
                "gauge",
                "Objects in the repository (as the last verify listed them)",
                g(&self.repository_objects),
            ),
            (
                "last_drill_timestamp_seconds".into(),
                "gauge",
                "When the last scheduled restore drill finished (Unix time; 0: none yet)",
                gi(&self.last_drill_unix),
            ),
            (
                "last_drill_success".into(),
                "gauge",
                "1 if the last restore drill passed every check and target",
                g(&self.last_drill_ok),
            ),
            (
                "last_drill_rto_seconds".into(),
                "gauge",
                "Recovery time the last drill measured (0: not measured)",
                ms(&self.last_drill_rto_ms),
            ),
            (
                "last_drill_rpo_seconds".into(),
                "gauge",
                "Recovery point the last drill measured: its start minus the newest restorable commit",
                ms(&self.last_drill_rpo_ms),
            ),
            ("up".into(), "gauge", "The daemon is running", "1".into()),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in metrics {
            let family = name.split('{').next().unwrap_or(&name);
            out.push_str(&format!(
                "# HELP walvault_{family} {help}\n# TYPE walvault_{family} {kind}\nwalvault_{name} {value}\n"
            ));
        }
        out
    }
}

/// `.ready` files in archive_status, oldest first (timeline history files first: PostgreSQL's
/// archiver prefers them too), with the age of the oldest.
fn scan_ready(status_dir: &Path) -> (Vec<WalFileName>, Duration) {
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
        if let Ok(age) = e
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| t.elapsed().unwrap_or_default())
        {
            oldest = oldest.max(age);
        }
        names.push(name);
    }
    names.sort_by_key(|n| (!matches!(n, WalFileName::History(_)), *n));
    (names, oldest)
}

/// What one upload did: the push outcome and the bytes read.
type UploadResult = Result<(PushOutcome, u64), UploadError>;

/// Why an upload did not end with a marker in the spool.
#[derive(Debug, thiserror::Error)]
enum UploadError {
    #[error("{0}")]
    Push(#[from] PushError),
    /// The file is durable in the repository, but the spool cannot say so (a full disk): push
    /// then checks the repository itself, so nothing is lost, but a human should look.
    #[error(
        "stored in the repository, but cannot write its marker in the spool {path}: {source} (push checks the repository itself meanwhile)"
    )]
    Marker { path: String, source: std::io::Error },
}

/// Upload one file and record it in the spool.
async fn upload(settings: Arc<Settings>, mut repo: Writer, spool: Spool, path: PathBuf) -> UploadResult {
    let read_path = path.clone();
    let src = tokio::task::spawn_blocking(move || archive::open_wal_file(&read_path))
        .await
        .map_err(|e| PushError::Read {
            path: path.display().to_string(),
            source: std::io::Error::other(e),
        })??;
    // Metadata when opened, before the read: if the file changed meanwhile, the marker will
    // not match it.
    let (name, size, meta) = (src.name, src.len, src.meta.clone());
    let outcome = archive::archive_source(&settings, &mut repo, src, Some(&spool)).await?;
    let hash = outcome.hash.expect("an archived file was read");
    spool
        .mark_archived(repo.id(), &name, &hash, size, Some(&meta))
        .map_err(|source| UploadError::Marker {
            path: spool.dir().display().to_string(),
            source,
        })?;
    Ok((outcome, size))
}

/// Run until `shutdown` resolves, then finish the uploads in flight and return.
pub async fn run(
    settings: Settings,
    opts: DaemonOptions,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    let settings = Arc::new(settings);
    let mut repo = archive::open_repository(&settings).await?;
    // Whether the repository at the URL is (still) there: re-read every REPOSITORY_CHECK_EVERY,
    // so a repository removed (a volume unmounted) pauses uploads instead of writing into a
    // location that is no repository, and one recreated gets markers under its own id.
    let mut repo_gone = false;
    let mut repo_task: Option<tokio::task::JoinHandle<Result<Writer, RepoError>>> = None;
    let mut next_repo_check = Instant::now() + REPOSITORY_CHECK_EVERY;
    let spool = Spool::new(&opts.pgdata);
    let archived_dir = spool.dir().join("archived");
    std::fs::create_dir_all(&archived_dir).map_err(|source| DaemonError::Spool {
        path: archived_dir.display().to_string(),
        source,
    })?;
    let status_dir = opts.pgdata.join("pg_wal/archive_status");
    let wal_dir = opts.pgdata.join("pg_wal");

    // Any event (or watcher error, or overflow) just wakes the loop for a full rescan: the
    // directory listing, not the event stream, is the source of truth.
    let (wake_tx, mut wake_rx) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Our own listing of the directory is reported as an access: waking on it would loop.
        if !matches!(&res, Ok(ev) if matches!(ev.kind, notify::EventKind::Access(_))) {
            let _ = wake_tx.try_send(());
        }
    })
    .map_err(|e| DaemonError::Watch {
        path: status_dir.display().to_string(),
        message: e.to_string(),
    })?;
    notify::Watcher::watch(&mut watcher, &status_dir, notify::RecursiveMode::NonRecursive).map_err(|e| {
        DaemonError::Watch {
            path: status_dir.display().to_string(),
            message: e.to_string(),
        }
    })?;

    if let Some(addr) = opts.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Metrics { addr, source })?;
        tokio::spawn(serve_metrics(listener, Arc::clone(&metrics)));
        tracing::info!(%addr, "serving /metrics and /health");
    }

    tokio::pin!(shutdown);
    let mut tasks: JoinSet<(WalFileName, UploadResult)> = JoinSet::new();
    let mut in_flight: HashSet<WalFileName> = HashSet::new();
    // Failed files wait before their next attempt: 1 s, doubling to 60 s.
    let mut backoff: KeyedBackoff<WalFileName> = KeyedBackoff::default();
    let mut rescan = tokio::time::interval(opts.rescan_every);
    let mut housekeeping = tokio::time::interval(Duration::from_secs(5));
    let mut backup_task: Option<tokio::task::JoinHandle<()>> = None;
    let mut next_backup = opts.backup_every.map(|every| Instant::now() + every);
    let mut last_switch_lsn: Option<String> = None;
    let mut switch_task: Option<tokio::task::JoinHandle<Option<String>>> = None;
    let mut window_task: Option<tokio::task::JoinHandle<()>> = None;
    // The last catalog read, so each refresh downloads only new manifests and summaries.
    let catalog: Arc<tokio::sync::Mutex<Option<crate::catalog::Catalog>>> = Arc::default();
    let mut next_window = Instant::now();
    let mut verify_task: Option<tokio::task::JoinHandle<()>> = None;
    let mut drill_task: Option<tokio::task::JoinHandle<()>> = None;
    let mut next_drill = Instant::now() + opts.drill_every.unwrap_or_default();
    let mut next_verify = Instant::now() + opts.verify_every.unwrap_or_default();
    tracing::info!(pgdata = %opts.pgdata.display(), repo = %settings.repo, parallel = opts.parallel, "daemon started");

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = wake_rx.recv() => {}
            _ = rescan.tick() => {}
            _ = housekeeping.tick() => {
                forget_recycled(&spool, &wal_dir);
                if let Some(t) = repo_task.take_if(|t| t.is_finished()) {
                    match t.await {
                        Ok(Ok(now)) => {
                            if now.id() != repo.id() {
                                tracing::warn!(old = %repo.id(), new = %now.id(), "the repository at {} was replaced; archiving into the new one", settings.repo);
                            } else if repo_gone {
                                tracing::info!("repository {} is back; uploads resume", settings.repo);
                            }
                            repo = now;
                            repo_gone = false;
                        }
                        Ok(Err(e)) if !e.is_transient() => {
                            if !repo_gone {
                                tracing::error!("{e}; uploads paused (push will keep failing too, and PostgreSQL keeps the WAL)");
                            }
                            repo_gone = true;
                        }
                        Ok(Err(e)) => tracing::warn!("repository check: {e}"),
                        Err(_) => {}
                    }
                }
                if Instant::now() >= next_repo_check && repo_task.is_none() {
                    next_repo_check = Instant::now() + REPOSITORY_CHECK_EVERY;
                    let settings = Arc::clone(&settings);
                    repo_task = Some(tokio::spawn(async move { Writer::open_writable(&settings.repo, &settings.store_options()).await }));
                }
                if Instant::now() >= next_window && window_task.as_ref().is_none_or(|t| t.is_finished()) {
                    next_window = Instant::now() + Duration::from_secs(60);
                    window_task = Some(tokio::spawn(update_window(repo.reader(), Arc::clone(&metrics), Arc::clone(&catalog))));
                }
                if let (Some(every), Some(conn)) = (opts.backup_every, &opts.pg_conn)
                    && next_backup.is_some_and(|t| Instant::now() >= t)
                    && backup_task.as_ref().is_none_or(|t| t.is_finished())
                {
                    next_backup = Some(Instant::now() + every);
                    backup_task = Some(tokio::spawn(scheduled_backup(Arc::clone(&settings), opts.pgdata.clone(), conn.clone(), opts.retention.clone(), Arc::clone(&metrics))));
                }
                // verify itself waits for a running expire and looks again after one (verify.rs).
                if let Some(every) = opts.verify_every
                    && Instant::now() >= next_verify
                    && verify_task.as_ref().is_none_or(|t| t.is_finished())
                {
                    next_verify = Instant::now() + every;
                    verify_task = Some(tokio::spawn(scheduled_verify(repo.reader(), Arc::clone(&metrics))));
                }
                if let (Some(every), Some(drill)) = (opts.drill_every, &opts.drill)
                    && Instant::now() >= next_drill
                    && drill_task.as_ref().is_none_or(|t| t.is_finished())
                {
                    next_drill = Instant::now() + every;
                    drill_task = Some(tokio::spawn(scheduled_drill(Arc::clone(&settings), drill.clone(), repo.clone(), Arc::clone(&metrics))));
                }
                // Off the upload path: a task of its own, one at a time, each call bounded.
                if let Some(t) = switch_task.take_if(|t| t.is_finished()) {
                    last_switch_lsn = t.await.unwrap_or(None);
                }
                if let (Some(max_age), Some(conn), None) = (opts.max_wal_age, &opts.pg_conn, &switch_task) {
                    let (conn, last) = (conn.clone(), last_switch_lsn.clone());
                    switch_task = Some(tokio::spawn(async move {
                        match tokio::time::timeout(SWITCH_CALL_BOUND, force_switch(&conn, last.clone(), max_age)).await {
                            Ok(lsn) => lsn,
                            Err(_) => {
                                tracing::warn!("forced WAL switch: no answer from PostgreSQL within {SWITCH_CALL_BOUND:?}");
                                last
                            }
                        }
                    }));
                }
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                let (name, result) = done.expect("upload task panicked");
                in_flight.remove(&name);
                record(&metrics, &mut backoff, name, result);
            }
        }
        let (ready, oldest) = scan_ready(&status_dir);
        metrics.ready_files.store(ready.len() as u64, Ordering::Relaxed);
        metrics
            .oldest_ready_age_secs
            .store(oldest.as_secs(), Ordering::Relaxed);
        // One listing of the markers per scan, not one per ready file.
        let archived: HashSet<WalFileName> = spool.archived_names().into_iter().collect();
        for name in ready {
            if repo_gone || in_flight.len() >= opts.parallel.max(1) {
                break;
            }
            if in_flight.contains(&name) || backoff.waiting(&name, Instant::now()) {
                continue;
            }
            if archived.contains(&name) || spool.upload_in_progress(&name) {
                continue; // stored, or push is storing it right now
            }
            in_flight.insert(name);
            let path = wal_dir.join(name.to_string());
            let (settings, repo, spool) = (Arc::clone(&settings), repo.clone(), spool.clone());
            let span = tracing::info_span!("upload", file = %name);
            tasks.spawn(tracing::Instrument::instrument(
                async move {
                    spool.begin_upload(&name);
                    let result = upload(settings, repo, spool.clone(), path).await;
                    spool.end_upload(&name);
                    (name, result)
                },
                span,
            ));
        }
    }
    tracing::info!(
        in_flight = in_flight.len(),
        "shutting down: finishing uploads in flight"
    );
    while let Some(done) = tasks.join_next().await {
        let (name, result) = done.expect("upload task panicked");
        record(&metrics, &mut backoff, name, result);
    }
    if let Some(t) = backup_task {
        t.abort();
    }
    if let Some(t) = verify_task {
        t.abort();
    }
    // A drill cut short stops its server and removes its directory as it is dropped (drill.rs).
    if let Some(t) = drill_task {
        t.abort();
    }
    Ok(())
}

/// A scheduled restore drill: its evidence goes into the repository and the metrics.
async fn scheduled_drill(
    settings: Arc<Settings>,
    opts: crate::drill::DrillOptions,
    repo: Writer,
    metrics: Arc<Metrics>,
) {
    tracing::info!("scheduled restore drill starting");
    let ev = crate::drill::run(&settings, &opts).await;
    for line in ev.summary().lines() {
        match ev.passed() {
            true => tracing::info!("{line}"),
            false => tracing::warn!("{line}"),
        }
    }
    // The evidence first, the metrics after: a drill the metrics show is one the repository
    // records (a daemon stopped right after the metrics changed lost the evidence on a slow store).
    if let Err(e) = crate::drill::store(&repo, &ev).await {
        tracing::error!("the drill's evidence could not be stored in the repository: {e}");
    }
    metrics
        .last_drill_unix
        .store(crate::time::now_micros() / 1_000_000, Ordering::Relaxed);
    metrics
        .last_drill_ok
        .store(u64::from(ev.passed()), Ordering::Relaxed);
    let ms = |o: &crate::drill::Objective| o.measured_seconds.map_or(0, |s| (s * 1000.0) as u64);
    metrics.last_drill_rto_ms.store(ms(&ev.rto), Ordering::Relaxed);
    metrics.last_drill_rpo_ms.store(ms(&ev.rpo), Ordering::Relaxed);
}

fn record(
    metrics: &Metrics,
    backoff: &mut KeyedBackoff<WalFileName>,
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
                .store(crate::time::now_micros() / 1_000_000, Ordering::Relaxed);
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
            let (_, wait) = backoff.failed(name, Instant::now());
            match e {
                UploadError::Marker { .. } => tracing::error!("daemon {name}: {e}; retrying in {wait:?}"),
                UploadError::Push(_) => tracing::warn!(
                    "daemon {name}: {e}; retrying in {wait:?} (PostgreSQL's own push also retries)"
                ),
            }
        }
    }
}

/// Drop markers of files PostgreSQL has removed or recycled: a recycled segment's name comes
/// back later with other bytes, which the marker's hash would refuse anyway.
fn forget_recycled(spool: &Spool, wal_dir: &Path) {
    for name in spool.archived_names() {
        if !wal_dir.join(name.to_string()).exists() {
            spool.forget(&name);
        }
    }
}

async fn scheduled_backup(
    settings: Arc<Settings>,
    pgdata: PathBuf,
    conn: String,
    retention: Option<crate::retention::Policy>,
    metrics: Arc<Metrics>,
) {
    let opts = BackupOptions {
        pgdata,
        pg_conn: conn,
        chunk_size: DEFAULT_CHUNK_SIZE,
        parallel: 4,
        wal_timeout: Duration::from_secs(600),
        primary_conn: None,
    };
    let started = Instant::now();
    match take_backup(&settings, &opts).await {
        Ok(m) => {
            metrics
                .last_backup_unix
                .store(m.stop_time_us / 1_000_000, Ordering::Relaxed);
            metrics
                .last_backup_duration_ms
                .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            metrics
                .last_backup_bytes
                .store(m.stats.logical_bytes, Ordering::Relaxed);
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
    if let Some(policy) = retention {
        scheduled_expire(&settings, &policy, &metrics).await;
    }
}

/// Expire after a scheduled backup; the outcome goes to the log and the metrics.
async fn scheduled_expire(settings: &Settings, policy: &crate::retention::Policy, metrics: &Metrics) {
    let now = crate::time::now_micros();
    let result = async {
        let repo = Writer::open_writable(&settings.repo, &settings.store_options())
            .await
            .map_err(|e| e.to_string())?;
        crate::expire::expire(&repo, policy, false, now)
            .await
            .map_err(|e| e.to_string())
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

/// A scheduled verify (listing-based, like `restore-agent verify` without `--deep`).
async fn scheduled_verify(repo: Reader, metrics: Arc<Metrics>) {
    let now = crate::time::now_micros();
    let result = crate::verify::verify(&repo, false, 4).await;
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

/// Refresh the restorable-window gauges from the repository catalog (incrementally: see
/// [`crate::catalog::Catalog::refresh`]).
async fn update_window(
    repo: Reader,
    metrics: Arc<Metrics>,
    last: Arc<tokio::sync::Mutex<Option<crate::catalog::Catalog>>>,
) {
    let mut last = last.lock().await;
    match crate::catalog::Catalog::refresh(&repo, last.as_ref()).await {
        Ok(cat) => {
            metrics.backups.store(cat.backups.len() as u64, Ordering::Relaxed);
            let tli = cat.timeline_ids().last().copied().unwrap_or(1);
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

/// How often the daemon reads `walvault.json` again to make sure its repository is still there.
const REPOSITORY_CHECK_EVERY: Duration = Duration::from_secs(30);

/// How long the forced-switch check may take, connection included.
const SWITCH_CALL_BOUND: Duration = Duration::from_secs(15);

/// Switch WAL when PostgreSQL has archived nothing for `max_age` (`pg_stat_archiver`, which
/// counts every success, whoever uploaded the file) and WAL was written since the last switch we
/// forced (like archive_timeout), so an idle cluster's last transactions reach the archive.
/// Returns the insert position after the last switch.
async fn force_switch(conn: &str, last: Option<String>, max_age: Duration) -> Option<String> {
    let (client, connection) = match tokio_postgres::connect(conn, tokio_postgres::NoTls).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("forced WAL switch: cannot connect: {e}");
            return last;
        }
    };
    let handle = tokio::spawn(connection);
    // Since the last file archived, or since the server started if it archived none yet.
    let state: Option<(f64, String)> = client
        .query_one(
            "SELECT extract(epoch FROM now() - coalesce(last_archived_time, pg_postmaster_start_time()))::float8, \
                    pg_current_wal_insert_lsn()::text \
             FROM pg_stat_archiver",
            &[],
        )
        .await
        .map_err(|e| tracing::warn!("forced WAL switch: {e}"))
        .ok()
        .map(|r| (r.get(0), r.get(1)));
    let result = match state {
        Some((age, _)) if age < max_age.as_secs_f64() => last,
        Some((_, now)) if Some(&now) != last.as_ref() => {
            match client
                .query_one(
                    "SELECT pg_switch_wal()::text, pg_current_wal_insert_lsn()::text",
                    &[],
                )
                .await
            {
                Ok(row) => {
                    tracing::info!(
                        "forced a WAL switch at {} (max WAL age reached)",
                        row.get::<_, String>(0)
                    );
                    Some(row.get(1))
                }
                Err(e) => {
                    tracing::warn!("forced WAL switch failed: {e}");
                    last
                }
            }
        }
        Some((_, now)) => Some(now),
        None => last,
    };
    drop(client);
    let _ = handle.await;
    result
}

/// A minimal HTTP/1.1 responder: `GET /metrics` (Prometheus text) and `GET /health`.
async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            // Read the request head, however it is split across packets (bounded: 8 KiB, 5 s).
            let mut buf = Vec::with_capacity(1024);
            let read_head = async {
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), read_head).await;
            let request = String::from_utf8_lossy(&buf);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match path {
                "/metrics" => ("200 OK", metrics.render()),
                "/health" => ("200 OK", "ok\n".to_string()),
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(response.as_bytes()).await;
        });
    }
}
