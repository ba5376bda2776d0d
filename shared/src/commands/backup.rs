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
mod differences;
mod error;
mod file_reads;
mod finish;
mod inventory;
mod listing;
mod names;
mod open_ahead;
mod pages;
mod prior_files;
mod protocol;
mod rebuild;
mod session;
mod upload;
mod walk;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::basebackup::label;
use crate::basebackup::manifest::{BackupId, Manifest};
use crate::config::Settings;
use crate::repo::locks::{Lock, LockKind};
use finish::Outcome;
use inventory::Inventory;
use session::{Primary, Server, Session, Started, Stopped};
use upload::CopyOptions;

pub use crate::repo::layout::manifest_key;
pub use error::BackupError;
pub use inventory::FileReading;
pub use upload::PACKS_IN_FLIGHT;

/// Default chunk size: see README, "Chunking", for the measurement behind it.
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;

/// How to take a backup.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// The data directory, read from disk; `None`: the backup is taken over the replication
    /// protocol (`BASE_BACKUP`, see [`protocol`]).
    pub pgdata: Option<PathBuf>,
    /// libpq-style connection string or URL of the server whose data directory is `pgdata`
    /// (without it: a replication connection, several hosts and `target_session_attrs` allowed).
    pub pg_conn: String,
    pub chunk_size: u64,
    /// Chunks compressed and uploaded at once.
    pub parallel: usize,
    /// How long to wait for the backup's WAL to reach the repository.
    pub wal_timeout: Duration,
    /// For a backup from a standby: a connection to its primary, used only to switch WAL when
    /// the primary is still writing the backup's stop segment.
    pub primary_conn: Option<String>,
    /// Over the protocol: an incremental backup (PostgreSQL 17+) on top of the newest backup
    /// when it was taken over the protocol too; else a full one, with a warning saying why.
    pub incremental: bool,
    /// From disk, in a cluster with data checksums: verify every page of every relation file
    /// read (`--no-page-checksums` turns it off).
    pub page_checksums: bool,
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
        &match &opts.pgdata {
            Some(dir) => format!("backup of {}", dir.display()),
            None => "backup over the replication protocol".to_string(),
        },
        LockKind::Expire,
        LOCK_WAIT,
    )
    .await?;
    let taken = match &opts.pgdata {
        Some(pgdata) => take_locked(settings, opts, pgdata, &repo, &lock, reading).await,
        None => take_over_protocol(settings, opts, &repo, &lock, reading).await,
    };
    lock.release().await;
    taken
}

/// The longest a backup waits for an expire to finish before it starts.
const LOCK_WAIT: Duration = Duration::from_secs(30 * 60);

/// The backup, phase by phase, under `lock`.
async fn take_locked(
    settings: &Settings,
    opts: &BackupOptions,
    pgdata: &Path,
    repo: &crate::repo::Writer,
    lock: &Lock,
    reading: FileReading,
) -> Result<Manifest, BackupError> {
    let store = repo.writable().clone();
    let session = Session::connect(&opts.pg_conn).await?;
    let server = session.server;
    check_data_dir(&server, pgdata).await?;
    check_repo_cluster(server.sysid, repo)?;
    let primary = Primary::of(opts.primary_conn.as_deref(), &server).await?;

    let started = session.start().await?;
    let id = &started.id;
    session
        .store_relation_map(&opts.pg_conn, id, &store, repo.sealer())
        .await;
    let copy_started = std::time::Instant::now();
    // The walk first, then the previous backup read against it: its files name the walk's
    // paths rather than holding them again. The clock is read before any stat: the bound the
    // next backup's reuse rule compares with.
    let files = Inventory::take(pgdata, inventory::wall_clock_ns());
    let walk = files.as_ref().ok().map(|f| &f.sources);
    let (previous, mut copy_opts) = base_and_options(settings, opts, repo, &server, reading, walk).await?;
    let wanted = opts.page_checksums && settings.page_checksums;
    copy_opts.pages = pages::plan(wanted, server.pages, opts.chunk_size, started.start_lsn);
    let copied = match files {
        Ok(files) => upload::copy_files(&store, repo.sealer(), files, copy_opts, previous.as_ref()).await,
        Err(e) => Err(e),
    };
    if let Ok(c) = &copied {
        tracing::info!(
            backup = %id,
            files = c.stats.files,
            reused_files = c.stats.reused_files,
            read_bytes = c.stats.logical_bytes - c.stats.reused_bytes,
            base = previous.as_ref().map(|p| p.frame.id.to_string()),
            "files copied in {:.2}s",
            copy_started.elapsed().as_secs_f64()
        );
    }
    // What this backup's manifest does not name of the previous one (its packs, differences
    // and page checks, the chunks it lacks) is let go of before the manifest is written; its
    // files stay, held by the list, which names the files taken over there.
    drop(previous);
    // Stop the backup even when copying failed, so the server is not left in backup mode.
    let stopped = session.stop().await;
    let mut copied = copied?;
    let stopped = stopped?;
    let page_checks = match copied.pages.take() {
        Some(tally) => {
            // The relation map names the relations of damaged pages: read back from the
            // repository when there are some, never held through the copy (200,000 relations
            // took 21 MB of a backup's memory).
            let names = match tally.has_damage() {
                true => relation_names(&store, repo.sealer(), id).await,
                false => None,
            };
            Some(tally.into_checks(names.as_ref()))
        }
        None => None,
    };
    finish_backup(
        &store,
        repo,
        lock,
        Outcome {
            server,
            started,
            label: label::parse(&stopped.backup_label)?,
            stopped,
            chunk_size: opts.chunk_size,
            copied,
            server_manifest: None,
            incremental_from: None,
            page_checks,
        },
        primary,
        opts.wal_timeout,
    )
    .await
}

/// The backup a backup of `server` builds on (see [`inventory::base_of`]; its files name the
/// paths of `walk`, when the backup walked a data directory), and how to copy.
async fn base_and_options(
    settings: &Settings,
    opts: &BackupOptions,
    repo: &crate::repo::Writer,
    server: &Server,
    reading: FileReading,
    walk: Option<&std::sync::Arc<walk::Walk>>,
) -> Result<(Option<inventory::Previous>, CopyOptions), BackupError> {
    let previous = inventory::base_of(
        repo.writable(),
        repo.sealer(),
        reading,
        server.sysid,
        server.pg_version,
        opts.chunk_size,
        walk,
    )
    .await?;
    let copy_opts = CopyOptions {
        chunk_size: opts.chunk_size,
        parallel: opts.parallel,
        level: settings.compress_level,
        pg_version: server.pg_version,
        pages: None,
    };
    Ok((previous, copy_opts))
}

/// The end of every backup, once its files are stored: where its WAL ends, the wait until that
/// WAL is in the repository (from a standby, after asking `primary` to complete the stop
/// segment), then the manifest, written last.
async fn finish_backup(
    store: &crate::repo::WritableStore,
    repo: &crate::repo::Writer,
    lock: &Lock,
    outcome: Outcome,
    primary: Option<Primary>,
    wal_timeout: Duration,
) -> Result<Manifest, BackupError> {
    let seg_size = outcome.server.seg_size;
    let stop_seg = finish::stop_segment(&outcome.label, &outcome.stopped, seg_size)?;
    if outcome.server.from_standby {
        Primary::complete_stop_segment(primary, &stop_seg, seg_size).await;
    }
    let since = std::time::Instant::now();
    finish::wait_for_wal(store, &outcome.label.start_wal, &stop_seg, seg_size, wal_timeout).await?;
    // Where a backup with little to copy spends its time, and what an archiver that is behind
    // costs it.
    tracing::info!(stop = %stop_seg, "the backup's WAL is in the repository after {:.2?}", since.elapsed());
    let (frame, listing) = finish::manifest(outcome, stop_seg);
    finish::record(store, repo.sealer(), lock, frame, &listing).await
}

/// A backup over the replication protocol, under `lock`: `BASE_BACKUP` does the start and the
/// stop, its archives stream into the chunk pipeline, and the server's manifest vouches for
/// every file before the backup's own manifest is written.
async fn take_over_protocol(
    settings: &Settings,
    opts: &BackupOptions,
    repo: &crate::repo::Writer,
    lock: &Lock,
    reading: FileReading,
) -> Result<Manifest, BackupError> {
    let store = repo.writable().clone();
    let (mut source, server) = protocol::connect(&opts.pg_conn)?;
    check_repo_cluster(server.sysid, repo)?;
    let primary = Primary::of(opts.primary_conn.as_deref(), &server).await?;
    let start_time_us = tokio::task::block_in_place(|| source.clock_us()).map_err(protocol::protocol_err)?;
    let id = BackupId::from_unix(start_time_us.div_euclid(1_000_000));
    let host = source.target.clone();
    // The server the walsender settled on, as an ordinary session (its dbname defaults to
    // postgres, as the walsender's does).
    relation_map_over_sql(&host.plain_conninfo, &id, &store, repo.sealer()).await;
    let (previous, copy_opts) = base_and_options(settings, opts, repo, &server, reading, None).await?;
    let increment = match opts.incremental {
        true => protocol::increment_of(&mut source, previous.as_ref(), &store, repo.sealer()).await?,
        false => None,
    };
    let copier = upload::Copier::new(
        &store,
        repo.sealer(),
        copy_opts,
        previous.as_ref(),
        listing::Listing::with_capacity(1024),
    );
    let examined_after_ns = inventory::wall_clock_ns();
    let copy_started = std::time::Instant::now();
    let upload = increment.as_ref().map(|i| i.server_manifest.as_slice());
    let (start, stream) =
        tokio::task::block_in_place(|| source.base_backup(&format!("walvault {id}"), true, upload))
            .map_err(protocol::protocol_err)?;
    let incremental_from = increment.as_ref().map(|i| i.of.clone());
    tracing::info!(backup = %id, host = stream.host(), start = %start.lsn, "backup started over the replication protocol");
    let received = protocol::receive(
        stream,
        copier,
        server.pg_version,
        previous.as_ref(),
        increment.map(|i| i.prior),
        examined_after_ns,
    )
    .await?;
    let stats = &received.copied.stats;
    tracing::info!(
        backup = %id,
        files = stats.files,
        bytes = stats.logical_bytes,
        "files received in {:.2}s",
        copy_started.elapsed().as_secs_f64()
    );
    // After the server stopped the backup (its manifest came last): an upper bound for every
    // commit before the consistency point, on the server's clock.
    let stop_time_us = tokio::task::block_in_place(|| protocol::clock_of(&host))?;
    let label = label::parse(&received.backup_label)?;
    if label.start_lsn != start.lsn || label.timeline != start.timeline {
        return Err(BackupError::Sql(format!(
            "the backup_label streamed ({} on timeline {}) is not the start BASE_BACKUP reported ({} on timeline {})",
            label.start_lsn, label.timeline, start.lsn, start.timeline
        )));
    }
    let stopped = Stopped {
        stop_lsn: received.end.end,
        backup_label: received.backup_label,
        spcmap: received.tablespace_map,
        stop_time_us,
        stop_tli: server.from_standby.then(|| received.end.timeline.get() as i32),
    };
    let started = Started {
        id,
        start_time_us,
        start_lsn: start.lsn,
    };
    let outcome = Outcome {
        server,
        started,
        label,
        stopped,
        chunk_size: opts.chunk_size,
        copied: received.copied,
        server_manifest: Some(received.server_manifest),
        incremental_from,
        page_checks: None,
    };
    finish_backup(&store, repo, lock, outcome, primary, opts.wal_timeout).await
}

/// The relation map for `restore-agent find`, over an ordinary SQL session to `pg_conn`.
/// Derived data: a failure costs names, never the backup.
async fn relation_map_over_sql(
    pg_conn: &str,
    id: &BackupId,
    store: &crate::repo::WritableStore,
    sealer: &crate::repo::object::Sealer,
) {
    let connected = tokio_postgres::connect(pg_conn, tokio_postgres::NoTls).await;
    let (client, connection) = match connected {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("the relation map could not be read: {}", session::sql_message(&e));
            return;
        }
    };
    let conn_task = tokio::spawn(connection);
    session::store_relation_map(&client, pg_conn, id, store, sealer).await;
    drop(client);
    let _ = conn_task.await;
}

/// The relation map this backup stored, to name its damaged pages; `None` (logged) when it
/// stored none or it cannot be read back: the pages are then named by their files.
async fn relation_names(
    store: &crate::repo::WritableStore,
    sealer: &crate::repo::object::Sealer,
    id: &BackupId,
) -> Option<crate::basebackup::relmap::RelationMap> {
    match crate::basebackup::relmap::load(store, sealer, id).await {
        Ok(map) => map,
        Err(e) => {
            tracing::warn!(
                "damaged pages are named by their files: the relation map cannot be read back: {e}"
            );
            None
        }
    }
}

/// Check that `pgdata` is the data directory of `server`.
async fn check_data_dir(server: &Server, pgdata: &Path) -> Result<(), BackupError> {
    let dir_sysid = control::read_control_sysid(pgdata, server.pg_version).await?;
    if dir_sysid != server.sysid {
        return Err(BackupError::WrongDataDir {
            pgdata: pgdata.display().to_string(),
            dir: dir_sysid,
            server: server.sysid,
        });
    }
    Ok(())
}

/// Check that the repository, when it is bound to a cluster, is bound to system `sysid`.
fn check_repo_cluster(sysid: u64, repo: &crate::repo::Writer) -> Result<(), BackupError> {
    if let Some(c) = repo.cluster()
        && c.system_identifier != sysid
    {
        return Err(BackupError::ForeignCluster {
            repo: repo.writable().url().to_string(),
            repo_id: c.system_identifier,
            server: sysid,
        });
    }
    Ok(())
}

/// The backup taken: its id as text, its summary as JSON; with `--max-rate`, also what was
/// sent and at what rate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Taken {
    #[serde(flatten)]
    pub info: crate::catalog::BackupInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent: Option<crate::repo::rate::Sent>,
}

impl Taken {
    /// `archive-agent backup`'s exit status: [`crate::exit::BACKUP_DAMAGED_PAGES`] when the
    /// backup found damaged pages.
    pub fn exit_code(&self) -> u8 {
        match self.info.bad_pages {
            Some(n) if n > 0 => crate::exit::BACKUP_DAMAGED_PAGES,
            _ => crate::exit::SUCCESS,
        }
    }
}

impl crate::report::Report for Taken {
    fn render(&self) -> String {
        self.info.id.clone()
    }
}

/// `archive-agent backup`: take the backup and log what it took; the report shows it.
pub async fn take_and_log(
    settings: &Settings,
    opts: &BackupOptions,
    reading: FileReading,
) -> Result<Taken, BackupError> {
    let started = std::time::Instant::now();
    let m = take_backup_reading(settings, opts, reading).await?;
    let s = &m.stats;
    tracing::info!(
        "backup {} done: {} files ({} unchanged, taken over unread), {} bytes, {} chunks ({} new, {} bytes uploaded), WAL {}..{}, {:.1}s",
        m.id,
        s.files,
        s.reused_files,
        s.logical_bytes,
        s.chunks,
        s.new_chunks,
        s.new_bytes,
        m.start_wal,
        m.stop_wal,
        started.elapsed().as_secs_f64()
    );
    let sent = settings.sent();
    if let Some(s) = &sent {
        tracing::info!(
            "backup {}: {} bytes sent in {:.1}s, {:.0} bytes/s (cap {} bytes/s)",
            m.id,
            s.bytes_sent,
            s.seconds,
            s.effective_rate,
            s.max_rate
        );
    }
    log_page_checks(&m);
    Ok(Taken {
        info: crate::catalog::BackupInfo::from(&m),
        sent,
    })
}

/// What the page check of backup `m` found, in one line.
fn log_page_checks(m: &Manifest) {
    let Some(c) = &m.page_checks else {
        return;
    };
    if c.bad_total == 0 {
        tracing::info!(
            "page checksums: {} pages verified, none damaged ({} being written during the backup, left to WAL replay)",
            c.checked,
            c.recent
        );
        return;
    }
    tracing::error!(
        "backup {} is recorded, but {} damaged pages were found in the cluster (named above, listed in the manifest, and by restore-agent verify); exit status {}",
        m.id,
        c.bad_total,
        crate::exit::BACKUP_DAMAGED_PAGES
    );
}
