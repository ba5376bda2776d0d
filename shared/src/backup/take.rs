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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;

use bytes::Bytes;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::chunk::{self, ChunkError};
use super::exclude::{self, Decision};
use super::label;
use super::manifest::{self, BackupId, BackupStats, Entry, EntryKind, FileRecord, Manifest, Tablespace};
use crate::config::Settings;
use crate::repo::layout::wal_key;
use crate::repo::locks::{Lock, LockKind};
use crate::repo::object::{ObjectKind, Sealer};
use crate::repo::store::PutNew;
use crate::repo::{Store, StoreError, WritableStore};
use crate::wal::{Lsn, SegmentName, TimelineId, WalFileName};

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

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cannot connect to PostgreSQL ({0}); check --pg-url")]
    Connect(String),
    #[error("PostgreSQL: {0}")]
    Sql(String),
    #[error("PostgreSQL {0} is not supported (walvault supports {range})", range = crate::wal::version::supported_range())]
    Version(u32),
    #[error("--primary-url: {0}")]
    Primary(String),
    #[error(
        "the standby moved from timeline {start} to {stop} during the backup (a promotion upstream?); take the backup again"
    )]
    TimelineChanged { start: u32, stop: i32 },
    #[error(
        "{path} never read with a valid CRC in {attempts} attempts: not a PostgreSQL {pg_version} control file?"
    )]
    ControlFile {
        path: String,
        attempts: u32,
        pg_version: u32,
    },
    #[error(
        "--pgdata {pgdata} does not belong to the server at --pg-url (system identifier {dir} vs {server})"
    )]
    WrongDataDir { pgdata: String, dir: u64, server: u64 },
    #[error(
        "repository {repo} belongs to system {repo_id}, this server is {server}; use a separate repository"
    )]
    ForeignCluster { repo: String, repo_id: u64, server: u64 },
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Repository(#[from] crate::repo::RepoError),
    #[error("{0}")]
    Lock(#[from] crate::repo::locks::LockError),
    #[error(
        "the backup's repository lock went stale (the backup was paused or cut off from the repository for over {minutes} minutes) and an expire may have collected chunks it relies on; the backup was not recorded: take it again"
    )]
    LockLost { minutes: u64 },
    #[error("{0}")]
    Label(#[from] label::LabelError),
    #[error(
        "WAL {missing} needed by the backup did not reach the repository within {waited:?}; is archive_command = 'archive-agent push %p' set and working? (the backup was not recorded)"
    )]
    WalMissing { missing: String, waited: Duration },
    #[error("a backup with id {0} already exists; wait a second and retry")]
    Exists(BackupId),
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

async fn take_locked(
    settings: &Settings,
    opts: &BackupOptions,
    repo: &crate::repo::Writer,
    lock: &Lock,
    reading: FileReading,
) -> Result<Manifest, BackupError> {
    let store = repo.writable().clone();
    let (client, connection) = tokio_postgres::connect(&opts.pg_conn, tokio_postgres::NoTls)
        .await
        .map_err(|e| BackupError::Connect(e.to_string()))?;
    let conn_task = tokio::spawn(connection);
    let sql = |e: tokio_postgres::Error| {
        BackupError::Sql(e.as_db_error().map_or(e.to_string(), |d| d.message().to_string()))
    };

    let version_num: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(sql)?
        .get(0);
    let pg_version = crate::wal::version::major_of_version_num(version_num);
    if crate::wal::version::for_major(pg_version).is_none() {
        return Err(BackupError::Version(pg_version));
    }
    let from_standby: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map_err(sql)?
        .get(0);
    let sysid: i64 = client
        .query_one("SELECT system_identifier FROM pg_control_system()", &[])
        .await
        .map_err(sql)?
        .get(0);
    let sysid = sysid as u64;
    let seg_size: i32 = client
        .query_one(
            "SELECT setting::int FROM pg_settings WHERE name = 'wal_segment_size'",
            &[],
        )
        .await
        .map_err(sql)?
        .get(0);
    let dir_sysid = read_control_sysid(&opts.pgdata, pg_version).await?;
    if dir_sysid != sysid {
        return Err(BackupError::WrongDataDir {
            pgdata: opts.pgdata.display().to_string(),
            dir: dir_sysid,
            server: sysid,
        });
    }
    if let Some(c) = repo.cluster()
        && c.system_identifier != sysid
    {
        return Err(BackupError::ForeignCluster {
            repo: store.url().to_string(),
            repo_id: c.system_identifier,
            server: sysid,
        });
    }

    // Checked before anything starts, so a wrong --primary-url never costs a finished copy.
    let primary = match (&opts.primary_conn, from_standby) {
        (Some(conn), true) => Some(Primary::connect(conn, sysid).await?),
        (Some(_), false) => {
            tracing::warn!("--primary-url is ignored: the server at --pg-url is not a standby");
            None
        }
        (None, _) => None,
    };

    let server_clock = "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint";
    let start_time_us: i64 = client.query_one(server_clock, &[]).await.map_err(sql)?.get(0);
    let id = BackupId::from_unix(start_time_us.div_euclid(1_000_000));
    let label_text = format!("walvault {id}");
    let start_sql = if pg_version >= 15 {
        "SELECT pg_backup_start($1, true)::text"
    } else {
        "SELECT pg_start_backup($1, true, false)::text"
    };
    client.query_one(start_sql, &[&label_text]).await.map_err(sql)?;
    tracing::info!(backup = %id, from_standby, "backup started");
    // Names for `restore-agent find`, as of the backup's start. Derived data: a failure costs
    // names, never the backup.
    match crate::relmap::read_from_server(&client, &opts.pg_conn, &id).await {
        Ok(map) => {
            if let Err(e) = crate::relmap::store(&store, repo.sealer(), &map).await {
                tracing::warn!("the relation map was not stored: {e}");
            }
        }
        Err(e) => tracing::warn!("the relation map could not be read: {e}"),
    }

    // Read under the backup lock: the chunks the newest backup names stay until this one's
    // manifest is written.
    let newest = newest_backup(&store).await?;
    // An empty repository cannot hold a chunk this backup does not know of (but for a leftover
    // of an interrupted backup, which an upload overwrites with the same bytes).
    let lookup = if newest.is_none() {
        Lookup::Upload
    } else {
        Lookup::Ask
    };
    let previous = match (&newest, reading) {
        (Some(id), FileReading::Changed) => {
            Previous::load(&store, repo.sealer(), id, sysid, pg_version, opts.chunk_size).await
        }
        _ => None,
    };
    let copy_started = std::time::Instant::now();
    let copied = copy_files(
        &store,
        repo.sealer(),
        opts,
        settings.compress_level,
        pg_version,
        previous.as_ref(),
        lookup,
    )
    .await;
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
    // PostgreSQL is not asked to wait for the archiving of the stop segment (on a primary it
    // still switches WAL, so the segment is complete): its wait polls once a second, and a
    // standby would wait only with archive_mode = always, for a segment that only the primary
    // can complete. walvault waits for the repository itself (below), with a bounded time.
    let stop_sql = if pg_version >= 15 {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)"
    } else {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
    };
    let stopped = client.query_one(stop_sql, &[]).await.map_err(sql);
    // Read after pg_backup_stop returned, on the server's clock: every commit before the
    // consistency point carries an earlier timestamp. On a standby those timestamps come from
    // the primary's clock: take the later of the standby's clock and the last transaction it
    // replayed, so a standby clock running behind cannot open the window too early.
    let stop_clock = match from_standby {
        false => server_clock,
        true => {
            "SELECT (extract(epoch FROM greatest(clock_timestamp(), pg_last_xact_replay_timestamp())) \
             * 1000000)::bigint"
        }
    };
    let stop_time_us: Result<i64, _> = client
        .query_one(stop_clock, &[])
        .await
        .map(|r| r.get(0))
        .map_err(sql);
    // A standby's backup ends on its minRecoveryPoint's timeline (do_pg_backup_stop).
    let stop_tli: Result<Option<i32>, _> = match from_standby {
        false => Ok(None),
        true => client
            .query_one("SELECT min_recovery_end_timeline FROM pg_control_recovery()", &[])
            .await
            .map(|r| Some(r.get(0)))
            .map_err(sql),
    };
    drop(client);
    let _ = conn_task.await;
    let Copied {
        entries,
        files,
        tablespaces,
        stats,
        examined_after_us,
    } = copied?;
    let row = stopped?;
    let stop_time_us = stop_time_us?;
    let stop_tli = stop_tli?;
    let stop_lsn: Lsn = row
        .get::<_, String>(0)
        .parse()
        .map_err(|_| BackupError::Sql("bad stop LSN".into()))?;
    let backup_label: String = row.get(1);
    let spcmap: Option<String> = row.get(2);
    let label = label::parse(&backup_label)?;

    let tli = TimelineId::new(label.timeline).ok_or(label::LabelError("a valid timeline"))?;
    if let Some(stop) = stop_tli
        && i64::from(stop) != i64::from(label.timeline)
    {
        return Err(BackupError::TimelineChanged {
            start: label.timeline,
            stop,
        });
    }
    let seg_size = seg_size as u32;
    let stop_seg = SegmentName::containing(tli, Lsn(stop_lsn.0.saturating_sub(1)), seg_size);
    if from_standby {
        match primary {
            Some(p) => p.complete(&stop_seg, seg_size).await,
            None => tracing::info!(
                segment = %stop_seg,
                "backup from a standby: waiting for the primary to complete and archive its stop segment \
                 (archive_timeout on the primary, or pass --primary-url to switch WAL there)"
            ),
        }
    }
    wait_for_wal(&store, &label.start_wal, &stop_seg, seg_size, opts.wal_timeout).await?;

    let manifest = Manifest {
        format: manifest::FORMAT_NAME.into(),
        version: manifest::FORMAT_VERSION,
        id: id.clone(),
        system_identifier: sysid,
        pg_version,
        timeline: label.timeline,
        start_lsn: label.start_lsn,
        stop_lsn,
        start_time_us,
        stop_time_us,
        start_wal: label.start_wal.clone(),
        stop_wal: stop_seg.to_string(),
        chunk_size: opts.chunk_size,
        backup_label,
        tablespace_map: spcmap.filter(|s| !s.is_empty()),
        tablespaces,
        entries,
        stats,
        files_examined_after_us: Some(examined_after_us),
        files,
    };
    let sealed = repo
        .sealer()
        .seal(ObjectKind::Manifest, id.as_str(), &manifest.to_json(), 3)
        .map_err(|e| BackupError::Read {
            path: "manifest".into(),
            source: e,
        })?;
    if !lock.still_held().await? {
        return Err(BackupError::LockLost {
            minutes: crate::repo::locks::STALE_AFTER.as_secs() / 60,
        });
    }
    if store.put_new(&manifest_key(&id), sealed.bytes).await? == PutNew::AlreadyExists {
        return Err(BackupError::Exists(id));
    }
    Ok(manifest)
}

/// The primary of a standby being backed up, connected (and checked) before the backup starts.
struct Primary {
    client: tokio_postgres::Client,
    conn_task: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
}

fn primary_err(e: tokio_postgres::Error) -> BackupError {
    BackupError::Primary(e.as_db_error().map_or(e.to_string(), |d| d.message().to_string()))
}

impl Primary {
    /// Connect and check it is a primary of system `sysid`.
    async fn connect(conn: &str, sysid: u64) -> Result<Primary, BackupError> {
        let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
            .await
            .map_err(primary_err)?;
        let conn_task = tokio::spawn(connection);
        let row = client
            .query_one(
                "SELECT system_identifier, pg_is_in_recovery() FROM pg_control_system()",
                &[],
            )
            .await
            .map_err(primary_err)?;
        let (primary_sysid, in_recovery): (i64, bool) = (row.get(0), row.get(1));
        if primary_sysid as u64 != sysid {
            return Err(BackupError::Primary(format!(
                "system identifier {} is not the standby's ({sysid})",
                primary_sysid as u64
            )));
        }
        if in_recovery {
            return Err(BackupError::Primary(
                "that server is in recovery too; name the primary".into(),
            ));
        }
        Ok(Primary { client, conn_task })
    }

    /// Ask for a WAL switch if the primary is still writing `stop`, the last segment the
    /// backup needs, so that it is completed and archived now. Best effort: on failure the
    /// backup still waits for the segment (archive_timeout or traffic completes it).
    async fn complete(self, stop: &SegmentName, seg_size: u32) {
        let switched = async {
            let insert: String = self
                .client
                .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
                .await
                .map_err(primary_err)?
                .get(0);
            let insert: Lsn = insert
                .parse()
                .map_err(|_| BackupError::Primary(format!("bad insert LSN {insert:?}")))?;
            let writing = insert.0 / u64::from(seg_size) <= stop.segment_no(seg_size).unwrap_or(u64::MAX);
            if writing {
                self.client
                    .query_one("SELECT pg_switch_wal()::text", &[])
                    .await
                    .map_err(primary_err)?;
            }
            Ok::<bool, BackupError>(writing)
        }
        .await;
        match switched {
            Ok(true) => tracing::info!(segment = %stop, "asked the primary to switch WAL"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(segment = %stop, "cannot switch WAL on the primary ({e}); waiting for it to archive the segment")
            }
        }
        drop(self.client);
        let _ = self.conn_task.await;
    }
}

/// `XLOG_CONTROL_FILE`, relative to the data directory.
const CONTROL_FILE: &str = "global/pg_control";

pub use crate::repo::layout::manifest_key;

/// Reads of `pg_control` before giving up on a torn one.
const CONTROL_READ_ATTEMPTS: u32 = 20;

/// `global/pg_control` of a PostgreSQL `pg_version` cluster, read until its CRC checks. A
/// running server (a standby above all) rewrites it in place, and a read racing that write can
/// see half of each; a restored cluster would then refuse to start.
async fn read_control_file(path: &Path, pg_version: u32) -> Result<Vec<u8>, BackupError> {
    let offset = crate::wal::version::for_major(pg_version)
        .ok_or(BackupError::Version(pg_version))?
        .control_crc_offset;
    for _ in 0..CONTROL_READ_ATTEMPTS {
        let bytes = tokio::fs::read(path).await.map_err(|source| BackupError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let stored = bytes
            .get(offset..offset + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if stored.is_some_and(|crc| crc == crc32c::crc32c(&bytes[..offset])) {
            return Ok(bytes);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(BackupError::ControlFile {
        path: path.display().to_string(),
        attempts: CONTROL_READ_ATTEMPTS,
        pg_version,
    })
}

/// The system identifier in `global/pg_control` (its first 8 bytes in every version).
async fn read_control_sysid(pgdata: &Path, pg_version: u32) -> Result<u64, BackupError> {
    let bytes = read_control_file(&pgdata.join(CONTROL_FILE), pg_version).await?;
    let first: [u8; 8] = bytes[..8]
        .try_into()
        .expect("a control file is longer than 8 bytes");
    Ok(u64::from_le_bytes(first))
}

/// Wait until every segment from `start` to `stop` (same timeline) is archived.
async fn wait_for_wal(
    store: &Store,
    start: &str,
    stop: &SegmentName,
    seg_size: u32,
    timeout: Duration,
) -> Result<(), BackupError> {
    let Ok(WalFileName::Segment(start)) = start.parse::<WalFileName>() else {
        return Err(BackupError::Label(label::LabelError("a valid start WAL file")));
    };
    let (Some(first), Some(last)) = (start.segment_no(seg_size), stop.segment_no(seg_size)) else {
        return Err(BackupError::Label(label::LabelError("a segment number in range")));
    };
    let deadline = tokio::time::Instant::now() + timeout;
    // The stop segment was just completed: archiving it takes milliseconds when all is well, so
    // look again soon, then less and less often.
    let mut pause = Duration::from_millis(10);
    for no in first..=last {
        let seg = SegmentName::containing(stop.timeline, Lsn(no * u64::from(seg_size)), seg_size);
        let key = wal_key(&WalFileName::Segment(seg));
        while store.size(&key).await?.is_none() {
            if tokio::time::Instant::now() >= deadline {
                return Err(BackupError::WalMissing {
                    missing: seg.to_string(),
                    waited: timeout,
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }
    Ok(())
}

/// A file or directory to back up: where it is on disk and its path in the manifest.
struct Source {
    abs: PathBuf,
    rel: String,
    is_dir: bool,
    mode: u32,
}

/// List the data directory and tablespaces, applying PostgreSQL's exclusions.
fn walk(pgdata: &Path) -> Result<(Vec<Source>, Vec<Tablespace>), BackupError> {
    let read_err = |p: &Path, source| BackupError::Read {
        path: p.display().to_string(),
        source,
    };
    let mut out = Vec::new();
    let mut tablespaces = Vec::new();
    let mut stack = vec![(pgdata.to_path_buf(), String::new())];
    while let Some((dir, rel_dir)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            // A directory dropped while we walk (DROP DATABASE) is not an error; WAL replays it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !rel_dir.is_empty() => continue,
            Err(e) => return Err(read_err(&dir, e)),
        };
        let mut listed = Vec::new();
        for e in entries {
            let e = e.map_err(|err| read_err(&dir, err))?;
            let Ok(name) = e.file_name().into_string() else {
                tracing::warn!(path = %e.path().display(), "skipping a file whose name is not UTF-8");
                continue;
            };
            listed.push((name, e.path()));
        }
        let names: Vec<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
        let unlogged = exclude::unlogged_files(&names);
        let unlogged: Vec<String> = unlogged.into_iter().map(str::to_string).collect();
        for (name, abs) in listed {
            let rel = if rel_dir.is_empty() {
                name.clone()
            } else {
                format!("{rel_dir}/{name}")
            };
            let meta = match std::fs::symlink_metadata(&abs) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(read_err(&abs, e)),
            };
            let ft = meta.file_type();
            // Tablespaces: pg_tblspc/<oid> links to their location; back up its contents there.
            if ft.is_symlink() && rel_dir == "pg_tblspc" {
                let target = std::fs::read_link(&abs).map_err(|err| read_err(&abs, err))?;
                if let Ok(oid) = name.parse::<u32>() {
                    tablespaces.push(Tablespace {
                        oid,
                        location: target.display().to_string(),
                    });
                    out.push(Source {
                        abs: target.clone(),
                        rel: rel.clone(),
                        is_dir: true,
                        mode: 0o700,
                    });
                    stack.push((target, rel));
                }
                continue;
            }
            // pg_wal may be a link to another disk; its contents are skipped anyway.
            let is_dir = ft.is_dir() || (ft.is_symlink() && rel == "pg_wal");
            if !is_dir && !ft.is_file() {
                continue; // sockets, stray symlinks: not part of a cluster
            }
            let mode = meta.permissions().mode() & 0o7777;
            match exclude::decide(&rel, is_dir) {
                Decision::Skip => continue,
                Decision::EmptyDir => {
                    out.push(Source {
                        abs: abs.clone(),
                        rel: rel.clone(),
                        is_dir: true,
                        mode,
                    });
                    if rel == "pg_wal" {
                        // Kept empty, as basebackup.c sends them: archive_status, and from
                        // PostgreSQL 17 the WAL summarizer's summaries.
                        for sub in ["archive_status", "summaries"] {
                            if sub == "archive_status" || abs.join(sub).is_dir() {
                                out.push(Source {
                                    abs: abs.join(sub),
                                    rel: format!("pg_wal/{sub}"),
                                    is_dir: true,
                                    mode,
                                });
                            }
                        }
                    }
                }
                Decision::Include if is_dir => {
                    out.push(Source {
                        abs: abs.clone(),
                        rel: rel.clone(),
                        is_dir: true,
                        mode,
                    });
                    stack.push((abs, rel));
                }
                Decision::Include => {
                    if !unlogged.contains(&name) {
                        out.push(Source {
                            abs,
                            rel,
                            is_dir: false,
                            mode,
                        });
                    }
                }
            }
        }
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok((out, tablespaces))
}

/// Whether a backup may take unchanged files over from the previous backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FileReading {
    /// Read only the files that changed since the previous backup read them (see
    /// [`super::reuse`]); take the others over with their chunks.
    #[default]
    Changed,
    /// Read every file, and ask the repository for every chunk, uploading any it lacks
    /// (`archive-agent backup --read-all`).
    All,
}

/// The backup a new one builds on: the newest of the same cluster, read once the backup holds
/// its lock, so that every chunk it names stays in the repository until the new manifest is
/// written (an expire collects chunks only when no backup lock is live).
struct Previous {
    manifest: Manifest,
}

impl Previous {
    /// Backup `id`, when it can serve as a base for `sysid`'s backup in chunks of `chunk_size`.
    /// `None` when it cannot be read or does not fit: the backup then reads every file, which
    /// is always safe.
    async fn load(
        store: &Store,
        sealer: &Sealer,
        id: &BackupId,
        sysid: u64,
        pg_version: u32,
        chunk_size: u64,
    ) -> Option<Previous> {
        let manifest = match crate::catalog::load_manifest(store, sealer, id).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(backup = %id, "the previous backup cannot be read ({e}); reading every file");
                return None;
            }
        };
        if manifest.system_identifier != sysid
            || manifest.pg_version != pg_version
            || manifest.chunk_size != chunk_size
        {
            tracing::info!(
                backup = %id,
                "the previous backup is of another cluster, version or chunk size; reading every file"
            );
            return None;
        }
        Some(Previous { manifest })
    }

    /// The stored length of every chunk it references, when it recorded them (`None`: ask).
    fn chunk_lengths(&self) -> HashMap<[u8; 32], Option<u64>> {
        let records = self.manifest.file_records();
        let mut lens = HashMap::new();
        for e in &self.manifest.entries {
            let stored = records.get(e.path.as_str()).map(|r| &r.stored);
            for (i, id) in e.chunks.iter().enumerate() {
                let mut hash = [0u8; 32];
                if hex::decode_to_slice(id, &mut hash).is_ok() {
                    lens.insert(hash, stored.and_then(|s| s.get(i).copied()));
                }
            }
        }
        lens
    }
}

/// Whether the repository may already hold a chunk that a backup does not know of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lookup {
    /// Ask the repository first (one HEAD), and upload only when it is missing.
    Ask,
    /// Upload without asking: nothing says the chunk is there (an empty repository), and a
    /// content-addressed key makes overwriting an identical chunk harmless.
    Upload,
}

/// The newest backup in the repository, of any cluster.
async fn newest_backup(store: &Store) -> Result<Option<BackupId>, BackupError> {
    Ok(store
        .list("backups/")
        .await?
        .iter()
        .filter_map(|(key, _)| crate::repo::layout::parse_manifest_key(key))
        .max())
}

/// This host's wall clock, Unix nanoseconds (before 1970: 0, which reuses nothing).
fn wall_clock_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// What the chunk pipeline did with one chunk.
struct ChunkDone {
    entry: usize,
    idx: usize,
    hash: [u8; 32],
    /// `None`: the same bytes were already met in this backup (counted there).
    stored: Option<(u64, bool)>,
}

/// What `copy_files` produced.
struct Copied {
    entries: Vec<Entry>,
    files: Vec<FileRecord>,
    tablespaces: Vec<Tablespace>,
    stats: BackupStats,
    examined_after_us: i64,
}

/// Read, chunk and upload every file that changed since `previous` (every file without one);
/// returns the manifest entries in path order.
///
/// One reader reads each file in `chunk_size` pieces, in order; hashing, compressing and
/// uploading run in parallel tasks, at most `parallel` hashing or compressing at once and at most
/// `2 * parallel` chunks in memory, plus [`UPLOADS_IN_FLIGHT`] more on object stores, whose
/// uploads wait on the network rather than the CPU.
/// Extra chunks in flight on object stores (each at most one chunk, `chunk_size`, in memory):
/// a chunk's PUT is a round trip that waits, and with `--parallel 2` alone a backup to Garage
/// through TLS spent most of its time waiting (2.85 s for pgbench scale 50, against pgBackRest's
/// 2.31 s with its bundles; see bench/rivals.py). Restore keeps 32 in flight on object stores
/// for the same reason (`restore::default_parallel`).
pub const UPLOADS_IN_FLIGHT: usize = 16;

async fn copy_files(
    store: &WritableStore,
    sealer: &Sealer,
    opts: &BackupOptions,
    level: i32,
    pg_version: u32,
    previous: Option<&Previous>,
    lookup: Lookup,
) -> Result<Copied, BackupError> {
    // Before any stat: the bound the next backup's reuse rule compares file times with.
    let examined_after_ns = wall_clock_ns();
    let (sources, tablespaces) = walk(&opts.pgdata)?;
    let parallel = opts.parallel.max(1);
    let uploads = if store.is_local() { 0 } else { UPLOADS_IN_FLIGHT };
    let in_memory = Arc::new(Semaphore::new(2 * parallel + uploads));
    let cpu = Arc::new(Semaphore::new(parallel));
    let known: Arc<HashMap<[u8; 32], Option<u64>>> =
        Arc::new(previous.map(Previous::chunk_lengths).unwrap_or_default());
    let prev_entries: HashMap<&str, &Entry> = previous
        .map(|p| p.manifest.entries.iter().map(|e| (e.path.as_str(), e)).collect())
        .unwrap_or_default();
    let prev_records = previous.map(|p| p.manifest.file_records()).unwrap_or_default();
    let prev_examined_ns = previous
        .and_then(|p| p.manifest.files_examined_after_us)
        .map(|us| us.saturating_mul(1000));
    // An empty repository cannot hold a chunk this backup does not know of (but for a leftover
    // of an interrupted backup, which an upload overwrites with the same bytes).
    let seen: Arc<std::sync::Mutex<HashSet<[u8; 32]>>> = Arc::default();
    let buffers: Arc<Buffers> = Arc::default();
    let mut tasks: JoinSet<Result<ChunkDone, BackupError>> = JoinSet::new();
    let mut entries: Vec<Entry> = Vec::with_capacity(sources.len());
    let mut records: Vec<Option<FileRecord>> = Vec::with_capacity(sources.len());
    // (entry index, chunk index) -> content hash; ordered, so chunks attach in file order.
    let mut chunk_hashes: BTreeMap<(usize, usize), [u8; 32]> = BTreeMap::new();
    let mut lens: HashMap<[u8; 32], u64> = HashMap::new();
    let mut stats = BackupStats::default();
    // pg_control last: a standby backup ends at the minRecoveryPoint recorded in the copy, which
    // must be at least as new as every page copied (basebackup.c sends it last for this reason).
    let control_last = sources
        .iter()
        .filter(|s| s.rel != CONTROL_FILE)
        .chain(sources.iter().filter(|s| s.rel == CONTROL_FILE));
    for src in control_last {
        let kind = if src.is_dir {
            EntryKind::Dir
        } else {
            EntryKind::File
        };
        let new_entry = || Entry {
            path: src.rel.clone(),
            kind,
            mode: src.mode,
            size: 0,
            chunks: vec![],
        };
        if src.is_dir {
            entries.push(new_entry());
            records.push(None);
            continue;
        }
        let read_err = |source| BackupError::Read {
            path: src.abs.display().to_string(),
            source,
        };
        let mut file: Box<dyn std::io::Read + Send> = if src.rel == CONTROL_FILE {
            // Whole, and only once its CRC checks (see `read_control_file`).
            Box::new(std::io::Cursor::new(
                read_control_file(&src.abs, pg_version).await?,
            ))
        } else {
            let opened = tokio::task::spawn_blocking({
                let abs = src.abs.clone();
                move || std::fs::File::open(&abs).and_then(|f| f.metadata().map(|m| (f, m)))
            })
            .await
            .expect("open task panicked");
            let (f, meta) = match opened {
                Ok(f) => f,
                // Dropped since the walk: WAL replay recreates the truth.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(read_err(e)),
            };
            // fstat before the first read: the content read holds every write before it.
            let stat = super::reuse::file_stat(&meta);
            let prev = prev_entries
                .get(src.rel.as_str())
                .zip(prev_records.get(src.rel.as_str()));
            if let (Some((prev_entry, prev_record)), Some(prev_ns)) = (prev, prev_examined_ns) {
                match super::reuse::may_reuse(prev_record.stat.as_ref(), prev_ns, &stat, examined_after_ns) {
                    Ok(()) => {
                        // Unchanged since the previous backup read it: its chunks, unread.
                        let mut entry = new_entry();
                        entry.size = prev_entry.size;
                        entry.chunks = prev_entry.chunks.clone();
                        let mut seen = seen.lock().expect("never poisoned");
                        for (id, len) in prev_entry.chunks.iter().zip(&prev_record.stored) {
                            let mut hash = [0u8; 32];
                            if hex::decode_to_slice(id, &mut hash).is_ok() && seen.insert(hash) {
                                stats.stored_bytes += len;
                                lens.insert(hash, *len);
                            }
                        }
                        stats.files += 1;
                        stats.chunks += entry.chunks.len() as u64;
                        stats.logical_bytes += entry.size;
                        stats.reused_files += 1;
                        stats.reused_bytes += entry.size;
                        records.push(Some(FileRecord {
                            path: src.rel.clone(),
                            stored: prev_record.stored.clone(),
                            stat: Some(stat),
                            read_by: Some(prev_record.read_by.clone().unwrap_or_else(|| {
                                previous
                                    .expect("a record comes from a previous backup")
                                    .manifest
                                    .id
                                    .clone()
                            })),
                        }));
                        entries.push(entry);
                        continue;
                    }
                    Err(why) => tracing::debug!(path = %src.rel, ?why, "reading"),
                }
            }
            records.push(Some(FileRecord {
                path: src.rel.clone(),
                stored: vec![],
                stat: Some(stat),
                read_by: None,
            }));
            Box::new(f)
        };
        if src.rel == CONTROL_FILE {
            records.push(Some(FileRecord {
                path: src.rel.clone(),
                stored: vec![],
                stat: None,
                read_by: None,
            }));
        }
        entries.push(new_entry());
        let entry = entries.len() - 1;
        let mut size = 0u64;
        for idx in 0.. {
            // The permit bounds memory: at most 2 * `parallel` chunks read and not yet stored.
            let permit = Arc::clone(&in_memory)
                .acquire_owned()
                .await
                .expect("semaphore is never closed");
            let chunk_size = opts.chunk_size as usize;
            let pool = Arc::clone(&buffers);
            let (back, buf) = tokio::task::spawn_blocking(move || {
                // Into uninitialised capacity (no zeroing), one read per chunk from the cache.
                let mut buf = pool.take(chunk_size);
                let read = (&mut file).take(chunk_size as u64).read_to_end(&mut buf);
                (file, read.map(|_| buf))
            })
            .await
            .expect("read task panicked");
            file = back;
            let buf = buf.map_err(read_err)?;
            let read = buf.len();
            if read == 0 {
                break;
            }
            size += read as u64;
            stats.chunks += 1;
            let (store, sealer, cpu, seen, known, buffers) = (
                store.clone(),
                sealer.clone(),
                Arc::clone(&cpu),
                Arc::clone(&seen),
                Arc::clone(&known),
                Arc::clone(&buffers),
            );
            tasks.spawn(async move {
                let stored =
                    store_chunk(&store, &sealer, &cpu, &seen, &known, &buffers, buf, level, lookup).await?;
                drop(permit);
                Ok(ChunkDone {
                    entry,
                    idx,
                    hash: stored.0,
                    stored: stored.1,
                })
            });
            while let Some(done) = tasks.try_join_next() {
                absorb(
                    done.expect("chunk task panicked")?,
                    &mut stats,
                    &mut chunk_hashes,
                    &mut lens,
                );
            }
            if read < chunk_size {
                break;
            }
        }
        entries[entry].size = size;
        if let Some(Some(r)) = records.last_mut()
            && r.stat.is_some_and(|st| st.size != size)
        {
            // Written while read: the next backup reads it again anyway.
            r.stat = None;
        }
        stats.files += 1;
        stats.logical_bytes += size;
    }
    while let Some(done) = tasks.join_next().await {
        absorb(
            done.expect("chunk task panicked")?,
            &mut stats,
            &mut chunk_hashes,
            &mut lens,
        );
    }
    for ((entry, _), hash) in chunk_hashes {
        entries[entry].chunks.push(hex::encode(hash));
        if let Some(Some(r)) = records.get_mut(entry) {
            r.stored.push(lens[&hash]);
        }
    }
    let mut files: Vec<FileRecord> = records
        .into_iter()
        .zip(&entries)
        .filter_map(|(r, e)| r.filter(|_| !e.chunks.is_empty()))
        .collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Copied {
        entries,
        files,
        tablespaces,
        stats,
        examined_after_us: examined_after_ns / 1000,
    })
}

/// Chunk buffers handed back once a chunk is hashed (and sealed), so that the next chunks are
/// read into memory already mapped: a fresh chunk-sized allocation each time costs page faults
/// and the kernel's zeroing of every page. Holds at most as many as are in flight.
#[derive(Default)]
struct Buffers(std::sync::Mutex<Vec<Vec<u8>>>);

impl Buffers {
    fn take(&self, capacity: usize) -> Vec<u8> {
        let mut buf = self.0.lock().expect("never poisoned").pop().unwrap_or_default();
        buf.clear();
        buf.reserve_exact(capacity);
        buf
    }

    fn give(&self, buf: Vec<u8>) {
        self.0.lock().expect("never poisoned").push(buf);
    }
}

/// Count a chunk the pipeline finished, and note its hash for its entry.
fn absorb(
    done: ChunkDone,
    stats: &mut BackupStats,
    chunk_hashes: &mut BTreeMap<(usize, usize), [u8; 32]>,
    lens: &mut HashMap<[u8; 32], u64>,
) {
    if let Some((stored_len, uploaded)) = done.stored {
        // Each distinct chunk reaches here once (see `seen`).
        stats.stored_bytes += stored_len;
        if uploaded {
            stats.new_chunks += 1;
            stats.new_bytes += stored_len;
        }
        lens.insert(done.hash, stored_len);
    }
    chunk_hashes.insert((done.entry, done.idx), done.hash);
}

/// Hash one chunk and store it unless this backup met the same bytes already (`seen`) or the
/// previous backup holds them (`known`). Hashing and compressing run on blocking threads, at
/// most `cpu`'s permits at once; the upload does not hold one. Returns the chunk's hash and,
/// for the first time its bytes are met, its stored length and whether it was uploaded.
#[allow(clippy::too_many_arguments)]
async fn store_chunk(
    store: &WritableStore,
    sealer: &Sealer,
    cpu: &Semaphore,
    seen: &Arc<std::sync::Mutex<HashSet<[u8; 32]>>>,
    known: &Arc<HashMap<[u8; 32], Option<u64>>>,
    buffers: &Buffers,
    data: Vec<u8>,
    level: i32,
    lookup: Lookup,
) -> Result<([u8; 32], Option<(u64, bool)>), BackupError> {
    /// What the blocking half found.
    enum Step {
        Met,
        Known(u64),
        Ask(Vec<u8>),
        Sealed(Result<Bytes, ChunkError>),
    }
    let blocking_err = |e: tokio::task::JoinError| ChunkError::Compress(std::io::Error::other(e));
    let permit = cpu.acquire().await.expect("semaphore is never closed");
    // Hash, and seal in the same blocking call when nothing needs asking (one hop per chunk).
    let (hash, step, data) = tokio::task::spawn_blocking({
        let (sealer, seen, known) = (sealer.clone(), Arc::clone(seen), Arc::clone(known));
        move || {
            let hash = sealer.content_hash(&data);
            // The same bytes twice in one backup (zeroed pages, identical files): stored once.
            if !seen.lock().expect("never poisoned").insert(hash) {
                return (hash, Step::Met, Some(data));
            }
            match (known.get(&hash), lookup) {
                // The previous backup holds it, and the backup lock keeps it there.
                (Some(Some(len)), _) => (hash, Step::Known(*len), Some(data)),
                (Some(None), _) | (None, Lookup::Ask) => (hash, Step::Ask(data), None),
                (None, Lookup::Upload) => {
                    let sealed = chunk::seal_chunk(&sealer, hash, &data, level);
                    (hash, Step::Sealed(sealed), Some(data))
                }
            }
        }
    })
    .await
    .map_err(blocking_err)?;
    drop(permit);
    if let Some(data) = data {
        buffers.give(data);
    }
    let sealed = match step {
        Step::Met => return Ok((hash, None)),
        Step::Known(len) => return Ok((hash, Some((len, false)))),
        Step::Sealed(sealed) => sealed?,
        Step::Ask(data) => {
            if let Some(len) = chunk::stored_len(store, &hash).await? {
                buffers.give(data);
                return Ok((hash, Some((len, false))));
            }
            let _permit = cpu.acquire().await.expect("semaphore is never closed");
            let sealer = sealer.clone();
            let (sealed, data) =
                tokio::task::spawn_blocking(move || (chunk::seal_chunk(&sealer, hash, &data, level), data))
                    .await
                    .map_err(blocking_err)?;
            buffers.give(data);
            sealed?
        }
    };
    let len = chunk::upload(store, &hash, sealed).await?;
    Ok((hash, Some((len, true))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A control file of `pg_version`'s layout: system identifier, then the CRC where it sits.
    fn control_file(pg_version: u32, sysid: u64) -> Vec<u8> {
        let offset = crate::wal::version::for_major(pg_version)
            .unwrap()
            .control_crc_offset;
        let mut bytes = vec![0u8; 8192];
        bytes[..8].copy_from_slice(&sysid.to_le_bytes());
        bytes[8..12].copy_from_slice(&1800u32.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[..offset]);
        bytes[offset..offset + 4].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    #[tokio::test]
    async fn control_files_are_read_only_with_a_valid_crc() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("global")).unwrap();
        let path = dir.path().join(CONTROL_FILE);
        for v in [13, 17, 18, 19] {
            std::fs::write(&path, control_file(v, 7_000_000_000_000_000_000 + u64::from(v))).unwrap();
            assert_eq!(
                read_control_sysid(dir.path(), v).await.unwrap(),
                7_000_000_000_000_000_000 + u64::from(v)
            );
        }
        // An 18 file is not a valid 17 one (its CRC sits 4 bytes further), nor is a torn one.
        std::fs::write(&path, control_file(18, 42)).unwrap();
        let err = read_control_sysid(dir.path(), 17).await.unwrap_err();
        assert!(
            matches!(err, BackupError::ControlFile { pg_version: 17, .. }),
            "{err}"
        );
        let mut torn = control_file(15, 42);
        torn[100] ^= 1;
        std::fs::write(&path, torn).unwrap();
        assert!(matches!(
            read_control_sysid(dir.path(), 15).await,
            Err(BackupError::ControlFile { .. })
        ));
    }
}
