//! What a restore is asked to do ([`RestoreOptions`]): the options `restore-agent restore`'s
//! flags give, and the defaults behind them.

use std::path::PathBuf;

use super::{RecoveryTarget, TargetAction, TimelineTarget};
use crate::basebackup::BackupId;

/// How a restore makes the files it wrote durable before it writes `global/pg_control`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SyncMethod {
    /// `fsync` each file written (what pgBackRest does, and PostgreSQL's default): flushes only
    /// what the restore wrote, at the cost of one call, and often one journal commit, per file.
    #[default]
    Fsync,
    /// `syncfs` once per file system written to, as PostgreSQL's `recovery_init_sync_method =
    /// syncfs` and `initdb --sync-method=syncfs` do: one call however many files (measured in
    /// README, "Restore"), but it also flushes whatever else is dirty on those file systems, and
    /// Linux reports write-back errors through it only since 5.8 (and some FUSE file systems
    /// flush nothing on it): opt in where the destination is a file system of its own.
    Syncfs,
}

impl SyncMethod {
    /// As `--sync-method` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMethod::Fsync => "fsync",
            SyncMethod::Syncfs => "syncfs",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub pgdata: PathBuf,
    pub backup: Option<BackupId>,
    pub target: RecoveryTarget,
    pub timeline: TimelineTarget,
    pub action: TargetAction,
    pub exclusive: bool,
    pub force: bool,
    /// Restore over the existing directory, rewriting only what differs ([`delta`]).
    pub delta: bool,
    pub parallel: usize,
    /// How what was written is made durable.
    pub sync: SyncMethod,
    /// The `restore_command` line to write (restore-agent fetch with the same repository settings).
    pub restore_command: String,
    /// Where each tablespace goes; see [`TablespacePlacement`].
    pub tablespaces: TablespacePlacement,
    /// `--database`: restore only these databases (names or oids) besides the system ones; the
    /// others are left zeroed ([`super::partial`]). Empty: every database.
    pub databases: Vec<String>,
}

impl RestoreOptions {
    /// A restore of the newest backup into `pgdata`, replaying the whole archive on the latest
    /// timeline with `restore_command`, then promoting: the defaults `restore-agent restore`
    /// uses without flags, one chunk at a time. Set the fields that differ:
    /// `RestoreOptions { target, ..RestoreOptions::new(dir, cmd) }`.
    pub fn new(pgdata: impl Into<PathBuf>, restore_command: impl Into<String>) -> RestoreOptions {
        RestoreOptions {
            pgdata: pgdata.into(),
            backup: None,
            target: RecoveryTarget::End,
            timeline: TimelineTarget::Latest,
            action: TargetAction::Promote,
            exclusive: false,
            force: false,
            delta: false,
            parallel: 1,
            sync: SyncMethod::default(),
            restore_command: restore_command.into(),
            tablespaces: TablespacePlacement::default(),
            databases: vec![],
        }
    }
}

/// Where tablespaces are restored. Their locations come from the manifest, which a restore must
/// not trust to write outside the new data directory: the DBA chooses, explicitly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TablespacePlacement {
    /// `--tablespace-map OID=DIR`.
    pub map: std::collections::BTreeMap<u32, PathBuf>,
    /// `--tablespace-map-all DIR`: every other tablespace to `DIR/<oid>`.
    pub all_under: Option<PathBuf>,
    /// `--tablespace-original`: every other tablespace to its location on the source.
    pub original: bool,
}

/// The `--parallel` a restore uses when none is given, by kind of store: chunks fetched and
/// written at once (each up to a chunk in memory, twice: sealed and opened).
///
/// Measured with `walvault-restore-parallel --scale 20 --repeat 3` (tests/src/bin; a pgbench
/// scale-20 backup: 976 files, 321 MiB, 642 distinct chunks) on a 2-core machine, stores on
/// loopback; median seconds by `--parallel` 1/2/4/8/16/32/64:
/// - file://: 2.39 / 1.93 / 1.51 / 1.42 / 0.94 / 1.00 / 0.98: flat from 16;
/// - S3 (Garage): 19.1 / 8.91 / 4.99 / 3.05 / 1.95 / 1.53 / 1.36: latency-bound, 32 gets within
///   12% of 64 with half the memory;
/// - Azure (Azurite): 4.35 / 2.78 / 1.86 / 1.94 / 1.72-2.61 / 1.50 / 1.42: likewise.
///
/// GCS is not measured here; it is an HTTP object store like the other two.
pub fn default_parallel(location: &crate::repo::url::RepoLocation) -> usize {
    use crate::repo::url::RepoLocation;
    match location {
        RepoLocation::Local(_) => 16,
        RepoLocation::S3 { .. } | RepoLocation::Azure { .. } | RepoLocation::Gcs { .. } => 32,
    }
}
