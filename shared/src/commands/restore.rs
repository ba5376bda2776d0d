//! `restore-agent restore`: rebuild a data directory from a base backup and configure PostgreSQL
//! to replay the archive up to a recovery target. Starting PostgreSQL on the directory completes
//! the point-in-time recovery.
//!
//! Three phases, each a module:
//! - the plan ([`mod@plan`], [`RestorePlan`]): which backup ([`select`]), where each file and
//!   tablespace goes ([`placement`]), what the directory holds (with `--delta`, [`delta`]'s
//!   comparison), the recovery settings and the replay ahead, decided with reads only;
//!   `restore-agent restore --dry-run` prints it;
//! - the executor ([`execute`]): empties or creates the directory and writes the backup's files,
//!   from the work list ([`work`]), each distinct chunk fetched once ([`chunk_reader`]) and each
//!   file written from one descriptor ([`file_writer`]) by the [`pipeline`] within the memory
//!   bound ([`budget`]), on the tree [`tree`] creates;
//! - the writer of the recovery configuration ([`recovery_files`]).
//!
//! Everything that can be refused is refused before the first byte is written: an unknown
//! timeline, a target no backup can reach, a non-empty directory, an unsafe manifest. The
//! manifest is treated as hostile (anyone who can write to the repository writes it): it is
//! validated in full ([`Manifest::validate`], [`check_before_writing`]) before anything is created.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

pub use self::waits::Waits;
use crate::basebackup::BackupId;
use crate::basebackup::chunk::ChunkError;
#[cfg(doc)]
use crate::basebackup::manifest::Manifest;
use crate::basebackup::manifest::ManifestError;
use crate::catalog::{Catalog, CatalogError};
use crate::config::Settings;
use crate::repo::StoreError;
use crate::repo::reads::ReadReport;
use crate::report::Report;
use crate::wal::TimelineId;

mod budget;
mod chunk_reader;
mod delta;
mod direct;
mod execute;
mod file_writer;
mod order;
mod pipeline;
mod placement;
mod plan;
mod recovery_files;
mod select;
mod tree;
mod waits;
mod work;

pub use delta::DeltaReport;
pub use placement::check_before_writing;
pub use plan::{DirectoryUse, PlannedBackup, PlannedFiles, PlannedRecovery, PlannedTimeline, RestorePlan};
pub use select::{ReplaySpan, choose_backup, replay_span, resolve_timeline};

pub use crate::recovery_conf::{RecoveryTarget, TargetAction, TimelineTarget};

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
    /// Where each tablespace goes; see [`TablespacePlan`].
    pub tablespaces: TablespacePlan,
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
            tablespaces: TablespacePlan::default(),
        }
    }
}

/// Where tablespaces are restored. Their locations come from the manifest, which a restore must
/// not trust to write outside the new data directory: the DBA chooses, explicitly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TablespacePlan {
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

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub backup: BackupId,
    /// PostgreSQL major version of the backup: the server that must recover it.
    pub pg_version: u32,
    pub files: u64,
    /// Bytes written into files.
    pub bytes: u64,
    /// Distinct chunks fetched from the repository: each once, however many positions share it.
    pub chunks_fetched: u64,
    /// Their bytes, decompressed.
    pub bytes_fetched: u64,
    /// The requests that read the files' data: how many, their sizes, how they overlapped.
    pub reads: ReadReport,
    /// Seconds each stage of the restore waited on another: where it is bound.
    pub waits: Waits,
    pub timeline: String,
    pub target: String,
    /// With `--delta`: what was compared, rewritten and removed.
    pub delta: Option<DeltaReport>,
    /// The segments replay goes through, as far as the repository tells.
    pub replay: Option<ReplaySpan>,
    /// The data directory restored.
    pub pgdata: PathBuf,
    /// How long the restore took, from opening the repository (or from planning, for
    /// [`restore_from`]) to the last file synced.
    pub seconds: f64,
    /// The plan the restore carried out: what `--dry-run` prints.
    pub plan: RestorePlan,
}

impl Report for RestoreReport {
    fn render(&self) -> String {
        let pgdata = self.pgdata.display();
        let mut lines = vec![format!(
            "restored backup {} into {pgdata}: {} files, {} bytes, {:.1}s",
            self.backup, self.files, self.bytes, self.seconds
        )];
        if let Some(d) = &self.delta {
            lines.push(format!(
                "delta: checked {} existing files ({} bytes hashed), {} unchanged; rewrote {} chunks, created {} files, removed {} files and directories",
                d.files_checked, d.bytes_hashed, d.files_unchanged, d.chunks_rewritten, d.files_created, d.removed
            ));
        }
        lines.push(format!(
            "fetched {} distinct chunks ({} bytes), wrote {} bytes",
            self.chunks_fetched, self.bytes_fetched, self.bytes
        ));

        lines.push(format!(
            "recovery target: {}, timeline {}",
            self.target, self.timeline
        ));
        if let Some(span) = &self.replay {
            let to = if span.last_is_upper_bound {
                "the newest archived segment"
            } else {
                "the target's segment"
            };
            lines.push(format!(
                "replay: {} segments, {} to {} ({to}); watch it with:  restore-agent status --pgdata {pgdata}",
                span.segments, span.first, span.last
            ));
        }
        lines.push(format!(
            "start PostgreSQL {} to complete the recovery:  pg_ctl -D {pgdata} start",
            self.pg_version
        ));
        lines.join("\n")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Repository(#[from] crate::repo::RepoError),
    #[error("restoring chunk data: {0}")]
    Chunk(#[from] ChunkError),
    #[error(
        "{dir} belongs to a running PostgreSQL (postmaster.pid names live process {pid}); stop it before restoring over it"
    )]
    ServerRunning { dir: String, pid: u32 },
    #[error("{0} is not empty; restore into an empty directory, or pass --force to replace its contents")]
    NotEmpty(String),
    #[error(
        "{dir} does not look like {what}: --delta only rewrites one; restore into an empty directory instead"
    )]
    NotRestorable { dir: String, what: &'static str },
    #[error(
        "{source}\n{dir} is left incomplete (its global/pg_control was removed, so no server starts on it): run the same restore --delta again"
    )]
    Incomplete { dir: String, source: Box<RestoreError> },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("timeline {0} is unknown to the repository (known: {1})")]
    UnknownTimeline(TimelineId, String),
    #[error("backup {0} is not in the repository")]
    UnknownBackup(BackupId),
    #[error("backup {backup} is damaged and cannot be restored ({reason}); choose another backup")]
    Damaged { backup: BackupId, reason: String },
    #[error("backup {backup} is not on the history of timeline {timeline}")]
    BackupNotOnTimeline { backup: BackupId, timeline: TimelineId },
    #[error("no backup can reach {target}: {window}")]
    OutsideWindow { target: String, window: String },
    #[error("the repository holds no backup yet; take one with archive-agent backup")]
    NoBackups,
    #[error("the repository holds no usable backup: {0}")]
    OnlyDamaged(String),
    #[error("corrupt repository: {0}")]
    Corrupt(String),
    #[error(
        "backup {backup} has tablespaces ({list}); choose where they go: --tablespace-map OID=DIR, --tablespace-map-all DIR, or --tablespace-original"
    )]
    TablespacesUnplaced { backup: BackupId, list: String },
    #[error("tablespace {oid} cannot go to {path}: {why}")]
    TablespaceLocation {
        oid: u32,
        path: String,
        why: &'static str,
    },
    #[error("backup {backup}: {source}")]
    Manifest {
        backup: BackupId,
        source: Box<ManifestError>,
    },
    #[error("backup {backup}: entry {entry:?} is refused: {why}")]
    Refused {
        backup: BackupId,
        entry: String,
        why: String,
    },
}

fn write_err(p: &Path) -> impl Fn(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Write {
        path: p.display().to_string(),
        source,
    }
}

/// Told how a restore advances (a progress bar on a terminal).
pub trait Progress: Send + Sync {
    fn start(&self, total_bytes: u64);
    fn advance(&self, bytes: u64);
}

/// No progress reporting.
#[derive(Debug)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: u64) {}
    fn advance(&self, _: u64) {}
}

/// Restore a backup into `opts.pgdata` and write the recovery settings: [`plan_from`], then the
/// executor.
pub async fn restore(
    settings: &Settings,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let repo = crate::repo::Reader::open(&settings.repo, &settings.store_options()).await?;
    let cat = Catalog::load(&repo).await?;
    let plan = plan_from(settings, &repo, &cat, opts).await?;
    let mut report = execute::execute(&repo, &cat, plan, progress).await?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// [`restore`] from a repository already open and its catalog already read (a drill has read
/// both to plan its target).
pub async fn restore_from(
    settings: &Settings,
    repo: &crate::repo::Reader,
    cat: &Catalog,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let plan = plan_from(settings, repo, cat, opts).await?;
    let mut report = execute::execute(repo, cat, plan, progress).await?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// What [`restore`] would do, decided with reads only: `restore-agent restore --dry-run`.
/// Nothing is created, not even the data directory.
pub async fn plan(settings: &Settings, opts: &RestoreOptions) -> Result<RestorePlan, RestoreError> {
    let repo = crate::repo::Reader::open(&settings.repo, &settings.store_options()).await?;
    let cat = Catalog::load(&repo).await?;
    plan_from(settings, &repo, &cat, opts).await
}

/// [`plan`] from a repository already open and its catalog already read.
pub async fn plan_from(
    settings: &Settings,
    repo: &crate::repo::Reader,
    cat: &Catalog,
    opts: &RestoreOptions,
) -> Result<RestorePlan, RestoreError> {
    plan::build(repo.sealer(), settings.repo.to_string(), cat, opts).await
}

#[cfg(test)]
mod testing {
    //! What the restore's unit tests share: a manifest fixture, catalogs, options, a repository
    //! in memory holding a backup, and a plan made without a catalog.

    use std::path::Path;
    use std::sync::Arc;

    use super::delta::DeltaPlan;
    use super::*;
    use crate::basebackup::manifest::{Entry, EntryKind, Manifest, Tablespace};
    use crate::repo::Store;
    use crate::repo::object::Sealer;

    pub(super) const SYSID: u64 = 7_441_234_567_890_123_456;

    pub(super) fn fixture() -> Manifest {
        Manifest::parse(include_bytes!("../../tests/fixtures/manifest-v1.json")).unwrap()
    }

    pub(super) fn catalog(sysid: u64) -> Catalog {
        crate::catalog::testing::empty_catalog(sysid)
    }

    pub(super) fn options(pgdata: &Path) -> RestoreOptions {
        RestoreOptions::new(pgdata, "true")
    }

    pub(super) fn with_tablespace(location: &str) -> Manifest {
        let mut m = fixture();
        m.tablespaces = vec![Tablespace {
            oid: 16400,
            location: location.into(),
        }];
        m.entries.push(Entry {
            path: "pg_tblspc/16400".into(),
            kind: EntryKind::Dir,
            mode: 0o700,
            size: 0,
            chunks: vec![],
        });
        m
    }

    /// A repository in memory that counts the requests it serves, holding the chunks of `files`
    /// (path, content) cut at `chunk_size`, and a manifest of them (under `base/1`).
    pub(super) async fn stored_backup(
        files: &[(&str, Vec<u8>)],
        chunk_size: u64,
    ) -> (Arc<crate::repo::fault::FaultStore>, Store, Sealer, Manifest) {
        stored_backup_sealed(files, chunk_size, Sealer::plain()).await
    }

    /// [`stored_backup`] sealed by `sealer` (an encrypted repository's names chunks by a keyed
    /// hash). The chunks of the first file and of every other one after it are in one pack, as a
    /// backup stores them; the others' are stored on their own, as older backups stored them.
    pub(super) async fn stored_backup_sealed(
        files: &[(&str, Vec<u8>)],
        chunk_size: u64,
        sealer: Sealer,
    ) -> (Arc<crate::repo::fault::FaultStore>, Store, Sealer, Manifest) {
        use crate::basebackup::chunk::{ChunkId, chunk_id, seal_chunk};
        use crate::basebackup::pack::PackBuilder;
        use crate::repo::fault::{Fault, FaultStore};
        use crate::repo::layout::{chunk_key, pack_key};
        use crate::repo::store::{CreateSemantics, WritableStore};
        let faults = Arc::new(FaultStore::new(Fault::None));
        let writable = WritableStore::with_backend(
            Arc::clone(&faults) as Arc<dyn object_store::ObjectStore>,
            "s3://bucket/repo".parse().unwrap(),
            CreateSemantics::CheckThenWrite,
            crate::retry::RetryPolicy::with_total(std::time::Duration::from_secs(5)),
        );
        let mut m = fixture();
        m.chunk_size = chunk_size;
        m.entries = ["base", "base/1"]
            .iter()
            .map(|d| Entry {
                path: d.to_string(),
                kind: EntryKind::Dir,
                mode: 0o700,
                size: 0,
                chunks: vec![],
            })
            .collect();
        let mut pack = PackBuilder::default();
        let mut packed = std::collections::HashSet::new();
        for (i, (name, content)) in files.iter().enumerate() {
            let mut chunks = vec![];
            for piece in content.chunks(chunk_size as usize) {
                let hash = sealer.content_hash(piece);
                let id = ChunkId::from_hash(hash);
                let sealed = seal_chunk(&sealer, hash, piece, 1).unwrap();
                if i % 2 == 1 {
                    writable.put(&chunk_key(&id), sealed).await.unwrap();
                } else if packed.insert(id) {
                    pack.add(id, &sealed);
                }
                chunks.push(chunk_id(&sealer, piece));
            }
            m.entries.push(Entry {
                path: format!("base/1/{name}"),
                kind: EntryKind::File,
                mode: 0o600,
                size: content.len() as u64,
                chunks,
            });
        }
        if !pack.is_empty() {
            let (bytes, record) = pack.seal();
            writable.put(&pack_key(&record.id), bytes).await.unwrap();
            m.version = 2;
            m.packs = vec![record];
        }
        m.entries.sort_by(|a, b| a.path.cmp(&b.path));
        m.validate().unwrap();
        (faults, writable.reader(), sealer, m)
    }

    /// The plan a restore of `m` with `opts` carries out (the tablespaces as `opts` maps them,
    /// timeline 1), made without choosing the backup from a catalog.
    pub(super) fn plan_of(m: &Manifest, opts: &RestoreOptions, delta_work: Option<DeltaPlan>) -> RestorePlan {
        plan::RestorePlan {
            pgdata: opts.pgdata.clone(),
            repository: "s3://bucket/repo".into(),
            backup: plan::planned_backup(m),
            timeline: plan::planned_timeline(opts.timeline, crate::wal::lsn::tl(1)),
            files: PlannedFiles {
                directory: DirectoryUse::Create,
                files: 0,
                directories: 0,
                bytes: 0,
                bytes_to_write: 0,
                delta: None,
            },
            tablespaces: opts.tablespaces.map.clone(),
            recovery: plan::planned_recovery(
                opts,
                crate::wal::lsn::tl(1),
                !opts.tablespaces.map.is_empty(),
                false,
            ),
            replay: None,
            checks: vec![],
            wal_segment_size: 16 << 20,
            parallel: opts.parallel,
            sync: opts.sync,
            delta_work,
        }
    }
}
