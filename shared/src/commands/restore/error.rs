//! Why a restore was refused or failed ([`RestoreError`]): one line each, naming what to do.

use std::path::Path;

use crate::basebackup::BackupId;
use crate::basebackup::chunk::ChunkError;
use crate::basebackup::manifest::ManifestError;
use crate::basebackup::manifest::paged::{EntriesError, PagedManifest};
use crate::catalog::CatalogError;
use crate::repo::StoreError;
use crate::repo::stored::Damage;
use crate::wal::TimelineId;

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
    #[error(
        "corrupt repository: chunk {id} is referenced as {first} bytes and as {second} bytes (at chunk {index} of {path})"
    )]
    ChunkLengths {
        id: String,
        first: u64,
        second: u64,
        index: u64,
        path: String,
    },
    #[error("corrupt repository: chunk {chunk} of {file} holds {holds} bytes, the manifest says {says}")]
    ChunkLength {
        chunk: String,
        file: String,
        holds: u64,
        says: u64,
    },
    #[error(
        "corrupt repository: pack {pack} (holding chunk {id}) is shorter than the manifest says: bytes {from}..{to} gave {got}"
    )]
    ShortPack {
        pack: String,
        id: String,
        from: u64,
        to: u64,
        got: usize,
    },
    /// The error of a read that covered several chunks, for the chunks after the first (which
    /// carries the error itself).
    #[error("{0}")]
    SameRead(String),
    #[error("chunk {0} was never read: a stage of the restore stopped (a bug: see the log above)")]
    NeverRead(String),
    #[error("{}", unknown_database(name, backup, known, *unnamed))]
    UnknownDatabase {
        name: String,
        backup: BackupId,
        /// The backup's databases, as `name (oid)` or `oid`.
        known: String,
        /// The backup has no relation map: its databases have no names here.
        unnamed: bool,
    },
    #[error("--database cannot be combined with --delta: restore the databases into an empty directory")]
    DeltaWithDatabases,
    #[error("reading the backup's relation map (the names of its databases): {0}")]
    RelationMap(String),
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

fn unknown_database(name: &str, backup: &BackupId, known: &str, unnamed: bool) -> String {
    if unnamed {
        format!(
            "--database {name:?}: backup {backup} has no relation map to name its databases; give a database's oid ({known})"
        )
    } else {
        format!("--database {name:?} is not a database of backup {backup} ({known})")
    }
}

pub(super) fn write_err(p: &Path) -> impl Fn(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Write {
        path: p.display().to_string(),
        source,
    }
}

/// The manifest of backup `id`, found damaged as its entries were read again.
pub(crate) fn damaged(id: BackupId, reason: Damage<ManifestError>) -> RestoreError {
    CatalogError::of_damaged_manifest(crate::repo::layout::manifest_key(&id), reason).into()
}

/// What reading `paged`'s entries stopped on, as the restore reports it.
pub(crate) fn entries_error(paged: &PagedManifest, e: EntriesError<RestoreError>) -> RestoreError {
    match e {
        EntriesError::Manifest(reason) => damaged(paged.id().clone(), reason),
        EntriesError::Stopped(e) => e,
        EntriesError::Unchecked => RestoreError::Manifest {
            backup: paged.id().clone(),
            source: Box::new(ManifestError::Invalid(e.to_string())),
        },
    }
}
