//! `archive-agent daemon`: the sidecar that archives WAL ahead of PostgreSQL's archiver.
//!
//! PostgreSQL runs `archive_command` once per segment, one at a time; a busy primary can write
//! WAL faster than serial uploads drain it. The daemon watches `pg_wal/archive_status` (inotify
//! through `notify`, plus a rescan at start, on every event-queue overflow or error, and on a
//! timer), uploads `.ready` files with bounded parallelism, and records each durable upload in
//! the spool ([`crate::local::handoff`]), so that `archive-agent push %p` answers at once. It never
//! touches PostgreSQL's status files: PostgreSQL's archiver still calls push for every file and
//! renames `.ready` to `.done` itself, so WAL is never dropped and push stays correct whatever
//! the daemon does.

mod backups;
mod clock;
mod copies;
mod drills;
mod indexer;
mod jobs;
mod listing;
mod metrics;
mod repo_watch;
mod scheduler;
pub mod stream;
mod uploader;
mod verifies;
mod wal_switch;
mod window;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

pub use self::clock::{Clock, ManualClock, SystemClock};
pub use self::copies::CopyJob;
use self::jobs::Jobs;
pub use self::metrics::Metrics;
use self::repo_watch::RepoWatch;
pub use self::scheduler::REPOSITORY_CHECK_EVERY;
use self::uploader::Uploader;
use crate::commands::push::{self, PushError};
use crate::config::Settings;
use crate::local::handoff::Spool;

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// The data directory whose archive_status is watched; `None` with `stream`.
    pub pgdata: Option<PathBuf>,
    /// Stream WAL over the replication protocol instead of watching archive_status.
    pub stream: Option<stream::StreamOptions>,
    /// Uploads at once.
    pub parallel: usize,
    /// Full rescan of archive_status at least this often, whatever the watcher says.
    pub rescan_every: Duration,
    /// Connection for scheduled backups and forced WAL switches.
    pub pg_conn: Option<String>,
    pub backup_every: Option<Duration>,
    /// Scheduled backups from disk verify page checksums.
    pub page_checksums: bool,
    /// Force a WAL switch when WAL written this long ago is not archived yet.
    pub max_wal_age: Option<Duration>,
    pub metrics_addr: Option<SocketAddr>,
    /// Expire with this policy after each scheduled backup.
    pub retention: Option<crate::retention::Policy>,
    /// Run `verify` (listing-based) this often.
    pub verify_every: Option<Duration>,
    /// Run a restore drill this often, storing its evidence in the repository.
    pub drill_every: Option<Duration>,
    pub drill: Option<crate::commands::drill::DrillOptions>,
    /// Keep a second repository within a stated lag (`--copy-to`).
    pub copy: Option<CopyJob>,
}

/// Why the daemon could not start.
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
    #[error("{0}")]
    Stream(stream::StreamError),
}

/// How often the housekeeping tick looks at the schedule and the repository check.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(5);

/// Run the daemon until SIGTERM or SIGINT.
pub async fn serve(settings: Settings, opts: DaemonOptions) -> Result<(), DaemonError> {
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    let metrics = std::sync::Arc::new(Metrics::default());
    run(settings, opts, metrics, shutdown).await
}

/// Run until `shutdown` resolves, then finish the uploads in flight and return.
pub async fn run(
    settings: Settings,
    opts: DaemonOptions,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    run_with_clock(settings, opts, metrics, shutdown, Arc::new(SystemClock)).await
}

/// [`run`] with the clock its services read (schedules, backoffs, the metrics' timestamps).
pub async fn run_with_clock(
    settings: Settings,
    opts: DaemonOptions,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
    clock: Arc<dyn Clock>,
) -> Result<(), DaemonError> {
    let settings = Arc::new(settings);
    if let Some(addr) = opts.metrics_addr {
        metrics::serve(addr, Arc::clone(&metrics)).await?;
    }
    // Aborted when dropped, at the end of the run, whichever way it ends.
    let _copies = opts.copy.clone().map(|job| {
        tracing::info!(to = %job.target.repo, every = ?job.every, "keeping a second copy of the repository");
        AbortOnDrop(tokio::spawn(copies::keep_copying(
            Arc::clone(&settings),
            job,
            Arc::clone(&metrics),
            Arc::clone(&clock),
        )))
    });
    if let Some(stream) = opts.stream.clone() {
        tracing::info!(repo = %settings.repo, "daemon started (streaming)");
        // Backups over the protocol from the same connection string, while the stream stores
        // the WAL they wait for.
        let backups = opts.backup_every.zip(opts.pg_conn.clone()).map(|(every, conn)| {
            let job = backups::BackupJob {
                pgdata: None,
                conn,
                retention: opts.retention.clone(),
                page_checksums: opts.page_checksums,
            };
            tracing::info!(every = ?every, "backups over the replication protocol scheduled");
            tokio::spawn(backups::over_the_stream(
                Arc::clone(&settings),
                job,
                every,
                Arc::clone(&metrics),
                clock,
            ))
        });
        let served = stream::serve(settings, stream, metrics, shutdown).await;
        if let Some(b) = backups {
            b.abort();
        }
        return served;
    }
    let Some(pgdata) = opts.pgdata.clone() else {
        return Err(DaemonError::Watch {
            path: String::new(),
            message: "no data directory to serve (give --pgdata, or --stream)".into(),
        });
    };
    let repo = push::open_repository(&settings).await?;
    let spool = open_spool(&pgdata)?;
    let status_dir = pgdata.join("pg_wal/archive_status");
    // Dropped at the end of the run, which stops the watching.
    let (_watcher, mut wake_rx) = watch_status(&status_dir)?;

    tokio::pin!(shutdown);
    let mut repo_watch = RepoWatch::new(Arc::clone(&settings), repo, spool.clone(), Arc::clone(&clock));
    let indexer = indexer::Indexer::start(spool.clone(), Arc::clone(&clock));
    let mut uploader = Uploader::new(
        Arc::clone(&settings),
        spool,
        &pgdata,
        opts.parallel,
        Arc::clone(&metrics),
        Arc::clone(&clock),
        indexer.sender(),
    );
    let mut jobs = Jobs::new(Arc::clone(&settings), &opts, Arc::clone(&metrics), clock);
    let mut rescan = tokio::time::interval(opts.rescan_every);
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING_EVERY);
    tracing::info!(pgdata = %pgdata.display(), repo = %settings.repo, parallel = opts.parallel, "daemon started");

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = wake_rx.recv() => {}
            _ = rescan.tick() => {}
            _ = housekeeping.tick() => {
                uploader.forget_recycled();
                jobs.tick(&mut repo_watch).await;
            }
            Some(done) = uploader.next_done(), if uploader.has_tasks() => uploader.finished(done),
        }
        uploader.start_ready(repo_watch.uploads_into());
    }
    tracing::info!(
        in_flight = uploader.in_flight(),
        "shutting down: finishing uploads in flight"
    );
    uploader.finish().await;
    indexer.finish().await;
    repo_watch.stop();
    jobs.abort();
    Ok(())
}

/// A task stopped when its handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The spool shared with push, its markers' directory created.
fn open_spool(pgdata: &Path) -> Result<Spool, DaemonError> {
    let spool = Spool::new(pgdata);
    let archived_dir = spool.dir().join("archived");
    std::fs::create_dir_all(&archived_dir).map_err(|source| DaemonError::Spool {
        path: archived_dir.display().to_string(),
        source,
    })?;
    Ok(spool)
}

/// Watch archive_status: any event (or watcher error, or overflow) just wakes the loop for a
/// full rescan: the directory listing, not the event stream, is the source of truth.
fn watch_status(status_dir: &Path) -> Result<(notify::RecommendedWatcher, mpsc::Receiver<()>), DaemonError> {
    let (wake_tx, wake_rx) = mpsc::channel::<()>(1);
    let watch_error = |e: notify::Error| DaemonError::Watch {
        path: status_dir.display().to_string(),
        message: e.to_string(),
    };
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Our own listing of the directory is reported as an access: waking on it would loop.
        if !matches!(&res, Ok(ev) if matches!(ev.kind, notify::EventKind::Access(_))) {
            let _ = wake_tx.try_send(());
        }
    })
    .map_err(watch_error)?;
    notify::Watcher::watch(&mut watcher, status_dir, notify::RecursiveMode::NonRecursive)
        .map_err(watch_error)?;
    Ok((watcher, wake_rx))
}
