//! How a backup fails, whichever phase it is in: one error for the whole command, as
//! `take_backup` returns it.

use std::time::Duration;

use crate::basebackup::manifest::BackupId;
use crate::repo::StoreError;
use crate::wal::TimelineId;

/// Why a backup failed, whichever phase it was in.
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
    TimelineChanged { start: TimelineId, stop: i32 },
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
    Chunk(#[from] crate::basebackup::chunk::ChunkError),
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
    Label(#[from] crate::basebackup::label::LabelError),
    #[error(
        "WAL {missing} needed by the backup did not reach the repository within {waited:?}; is archive_command = 'archive-agent push %p' set and working? (the backup was not recorded)"
    )]
    WalMissing { missing: String, waited: Duration },
    #[error(transparent)]
    Incremental(#[from] crate::basebackup::incremental::IncrementalError),
    #[error(transparent)]
    ServerManifest(#[from] crate::basebackup::server_manifest::ServerManifestError),
    #[error("a backup with id {0} already exists; wait a second and retry")]
    Exists(BackupId),
    /// What a restore would refuse is never recorded: a bug, not a backup.
    #[error(
        "the backup's manifest fails its own checks ({0}); the backup was not recorded (a bug in walvault: please report it)"
    )]
    Unsound(String),
}
