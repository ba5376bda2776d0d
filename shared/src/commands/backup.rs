//! `archive-agent backup`: an online base backup taken the way pgBackRest and WAL-G take it.
//!
//! One held connection runs the non-exclusive `pg_backup_start` / `pg_backup_stop`; in between
//! the data directory and every tablespace are read straight from disk, chunked, and the chunks
//! uploaded in parallel (bounded: at most `parallel` chunks in memory). The backup then waits
//! until the WAL from its start to its stop is in the repository, and only then writes its
//! manifest: a backup exists once its manifest does, so an interrupted backup is never offered
//! for restore.
//!
//! From a streaming standby (`pg_is_in_recovery()`) the same steps read the standby's disk, so
//! the copy's load stays off the primary. PostgreSQL writes no end-of-backup record there: the
//! backup ends at the standby's `minRecoveryPoint`, which `pg_backup_stop` returns and which
//! recovery takes from the copied `pg_control` (`InitWalRecovery` in `xlogrecovery.c` sets
//! `backupEndPoint` from it). That is why `pg_control` is read after every other file, as
//! `basebackup.c` sends it last. The stop segment is complete only once the primary moves past
//! it: with `--primary-url` the backup asks the primary for a WAL switch when it is still
//! writing that segment; without it, the primary's `archive_timeout` or traffic completes it.
//!
//! This module runs the phases in order; each lives in its own module: the PostgreSQL session
//! (`session`), what to copy and what to take over unread (`inventory`), reading and uploading
//! (`copy`), and the wait for WAL and the manifest (`finish`).

mod control;
mod copy;
mod error;
mod finish;
mod inventory;
mod session;

use std::path::PathBuf;
use std::time::Duration;

use crate::basebackup::label;
use crate::basebackup::manifest::Manifest;
use crate::config::Settings;
use crate::repo::locks::{Lock, LockKind};
use copy::CopyOptions;
use finish::Outcome;
use inventory::Inventory;
use session::{Primary, Server, Session};

pub use crate::repo::layout::manifest_key;
pub use copy::PACKS_IN_FLIGHT;
pub use error::BackupError;
pub use inventory::FileReading;

/// Default chunk size: see README, "Chunking", for the measurement behind it.
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;

/// How to take a backup.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub pgdata: PathBuf,
    /// libpq-style connection string or URL of the server whose data directory is `pgdata`.
    pub pg_conn: String,
    pub chunk_size: u64,
    /// Chunks compressed and uploaded at once.
    pub parallel: usize,
    /// How long to wait for the backup's WAL to reach the repository.
    pub wal_timeout: Duration,
    /// For a backup from a standby: a connection to its primary, used only to switch WAL when
    /// the primary is still writing the backup's stop segment.
    pub primary_conn: Option<String>,
}

/// Take a base backup into the repository, reading only the files that changed since the
/// previous backup; returns its manifest once it is recorded.
pub async fn take_backup(settings: &Settings, opts: &BackupOptions) -> Result<Manifest, BackupError> {
    take_backup_reading(settings, opts, FileReading::Changed).await
}

/// [`take_backup`], reading the files `reading` says.
pub async fn take_backup_reading(
    settings: &Settings,
    opts: &BackupOptions,
    reading: FileReading,
) -> Result<Manifest, BackupError> {
    let repo = crate::repo::Writer::open_writable(&settings.repo, &settings.store_options()).await?;
    // Held from before the first chunk is looked up until the manifest is written: an expire
    // running meanwhile then leaves every chunk in place (repo/locks.rs).
    let lock = Lock::take_yielding(
        repo.writable(),
        repo.sealer(),
        LockKind::Backup,
        &format!("backup of {}", opts.pgdata.display()),
        LockKind::Expire,
        LOCK_WAIT,
    )
    .await?;
    let taken = take_locked(settings, opts, &repo, &lock, reading).await;
    lock.release().await;
    taken
}

/// The longest a backup waits for an expire to finish before it starts.
const LOCK_WAIT: Duration = Duration::from_secs(30 * 60);

/// The backup, phase by phase, under `lock`.
async fn take_locked(
    settings: &Settings,
    opts: &BackupOptions,
    repo: &crate::repo::Writer,
    lock: &Lock,
    reading: FileReading,
) -> Result<Manifest, BackupError> {
    let store = repo.writable().clone();
    let session = Session::connect(&opts.pg_conn).await?;
    let server = session.server;
    check_cluster(&server, opts, repo).await?;
    let primary = Primary::of(opts.primary_conn.as_deref(), &server).await?;

    let started = session.start().await?;
    let id = &started.id;
    session
        .store_relation_map(&opts.pg_conn, id, &store, repo.sealer())
        .await;
    let previous = inventory::base_of(
        &store,
        repo.sealer(),
        reading,
        server.sysid,
        server.pg_version,
        opts.chunk_size,
    )
    .await?;
    let copy_started = std::time::Instant::now();
    let copy_opts = CopyOptions {
        chunk_size: opts.chunk_size,
        parallel: opts.parallel,
        level: settings.compress_level,
        pg_version: server.pg_version,
    };
    // The clock read before any stat: the bound the next backup's reuse rule compares with.
    let copied = match Inventory::take(&opts.pgdata, inventory::wall_clock_ns()) {
        Ok(files) => copy::copy_files(&store, repo.sealer(), files, copy_opts, previous.as_ref()).await,
        Err(e) => Err(e),
    };
    if let Ok(c) = &copied {
        tracing::info!(
            backup = %id,
            files = c.stats.files,
            reused_files = c.stats.reused_files,
            read_bytes = c.stats.logical_bytes - c.stats.reused_bytes,
            base = previous.as_ref().map(|p| p.manifest.id.to_string()),
            "files copied in {:.2}s",
            copy_started.elapsed().as_secs_f64()
        );
    }
    // Stop the backup even when copying failed, so the server is not left in backup mode.
    let stopped = session.stop().await;
    let copied = copied?;
    let stopped = stopped?;
    let label = label::parse(&stopped.backup_label)?;
    let stop_seg = finish::stop_segment(&label, &stopped, server.seg_size)?;
    if server.from_standby {
        Primary::complete_stop_segment(primary, &stop_seg, server.seg_size).await;
    }
    finish::wait_for_wal(
        &store,
        &label.start_wal,
        &stop_seg,
        server.seg_size,
        opts.wal_timeout,
    )
    .await?;
    let manifest = finish::manifest(Outcome {
        server,
        started,
        label,
        stopped,
        stop_seg,
        chunk_size: opts.chunk_size,
        copied,
    });
    finish::record(&store, repo.sealer(), lock, manifest).await
}

/// Check that `opts.pgdata` is the data directory of `server`, and that the repository, when
/// it is bound to a cluster, is bound to this one.
async fn check_cluster(
    server: &Server,
    opts: &BackupOptions,
    repo: &crate::repo::Writer,
) -> Result<(), BackupError> {
    let dir_sysid = control::read_control_sysid(&opts.pgdata, server.pg_version).await?;
    if dir_sysid != server.sysid {
        return Err(BackupError::WrongDataDir {
            pgdata: opts.pgdata.display().to_string(),
            dir: dir_sysid,
            server: server.sysid,
        });
    }
    if let Some(c) = repo.cluster()
        && c.system_identifier != server.sysid
    {
        return Err(BackupError::ForeignCluster {
            repo: repo.writable().url().to_string(),
            repo_id: c.system_identifier,
            server: server.sysid,
        });
    }
    Ok(())
}
