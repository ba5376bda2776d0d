//! `archive-agent push`: store one file PostgreSQL hands to `archive_command`.
//!
//! The rules PostgreSQL depends on (see "Continuous Archiving" in its documentation):
//! success only once the file is durable in the repository; the same name with the same bytes
//! is success (PostgreSQL may retry a push whose acknowledgement it lost); the same name with
//! other bytes is refused and nothing is overwritten.

use std::path::Path;

use crate::config::Settings;
use crate::exit;
use crate::repo::layout::wal_key;
use crate::repo::object::{MAX_ORIGINAL_LEN, ObjectError, ObjectKind, Sealer};
use crate::repo::store::{CreateSemantics, PutNew};
use crate::repo::{ClusterIdentity, RepoError, StoreError, WritableStore, Writer};
use crate::timeindex;
use crate::wal::{NameError, PageError, SegmentInfo, WalFileName};

/// Largest timeline history or backup history file accepted (they are a few hundred bytes).
const MAX_TEXT_FILE_LEN: u64 = 16 << 20;

/// What a successful push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushOutcome {
    pub name: WalFileName,
    pub size: u64,
    /// Bytes the stored object takes in the repository.
    pub stored_size: u64,
    /// `false` when an identical copy was already archived.
    pub newly_stored: bool,
}

impl PushOutcome {
    /// An identical copy was already durable; nothing was written.
    fn already_archived(name: WalFileName, size: u64) -> PushOutcome {
        PushOutcome {
            name,
            size,
            stored_size: 0,
            newly_stored: false,
        }
    }
}

/// Why a push failed. [`PushError::exit_code`] never exceeds 125: a higher status would kill
/// PostgreSQL's archiver.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{0}")]
    Name(#[from] NameError),
    #[error(
        "repository {repo} did not answer within {}s; PostgreSQL will run archive_command again",
        after.as_secs()
    )]
    TimedOut {
        repo: String,
        after: std::time::Duration,
    },
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is {len} bytes, more than a {kind} can be; refusing it")]
    TooLarge {
        path: String,
        len: u64,
        kind: &'static str,
    },
    #[error("{name} is not a valid WAL segment: {source}; refusing to archive it (check the file in pg_wal)")]
    InvalidWal { name: String, source: PageError },
    #[error(
        "{name} comes from {file}, but repository {repo} belongs to {stored}; refusing to mix clusters (use a separate repository for this cluster)"
    )]
    ForeignCluster {
        name: String,
        file: ClusterIdentity,
        stored: ClusterIdentity,
        repo: String,
    },
    #[error("{0}; PostgreSQL will retry the push")]
    Repository(#[from] RepoError),
    #[error(
        "{name} is already archived with different content: stored blake3 {stored_hash} ({stored_len} bytes), new blake3 {new_hash} ({new_len} bytes); refusing to overwrite. Find out why PostgreSQL produced a different file under this name (two clusters sharing one repository?) before removing either copy"
    )]
    Conflict {
        name: String,
        stored_hash: String,
        stored_len: u64,
        new_hash: String,
        new_len: u64,
    },
    #[error(
        "the archived copy of {name} ({key} in {repo}) is corrupt: {source}; refusing to overwrite it automatically. Move the object aside after checking it, and PostgreSQL's next retry will store the file again"
    )]
    StoredCorrupt {
        name: String,
        key: String,
        repo: String,
        source: Box<ObjectError>,
    },
    #[error("{0}; PostgreSQL will retry the push")]
    Store(#[from] StoreError),
}

impl PushError {
    pub fn exit_code(&self) -> u8 {
        match self {
            PushError::Name(_) => exit::USAGE,
            // No repository (yet) at this location is retried like an unreachable one: PostgreSQL
            // keeps the WAL until `archive-agent init` is run or the volume is mounted.
            PushError::Read { .. }
            | PushError::Store(_)
            | PushError::TimedOut { .. }
            | PushError::Repository(RepoError::NotInitialized { .. } | RepoError::Store(_)) => {
                exit::NOT_FOUND_OR_RETRY
            }
            // A key missing, wrong or not available yet: PostgreSQL keeps the WAL and retries
            // until the configuration is put right; the log line says what is wrong.
            PushError::Repository(
                RepoError::KeyMissing { .. } | RepoError::Key { .. } | RepoError::NotEncrypted { .. },
            ) => exit::NOT_FOUND_OR_RETRY,
            PushError::TooLarge { .. }
            | PushError::InvalidWal { .. }
            | PushError::ForeignCluster { .. }
            | PushError::Repository(_)
            | PushError::Conflict { .. }
            | PushError::StoredCorrupt { .. } => exit::REFUSED,
        }
    }
}

/// The name PostgreSQL archives is the last component of `%p` (it runs the command in the data
/// directory, with `%p` like `pg_wal/000000010000000000000001`).
pub fn name_of(wal_path: &Path) -> Result<WalFileName, NameError> {
    match wal_path.file_name().and_then(|n| n.to_str()) {
        Some(n) => n.parse(),
        None if wal_path.as_os_str().is_empty() => Err(NameError::Empty),
        None => Err(NameError::Invalid(wal_path.display().to_string())),
    }
}

/// A file PostgreSQL asked to archive, read and checked.
#[derive(Debug)]
pub struct WalFile {
    pub name: WalFileName,
    pub content: Vec<u8>,
    pub hash: blake3::Hash,
    /// What the first page says, for segments and partial segments.
    pub info: Option<SegmentInfo>,
}

/// Read the file at `wal_path` and check it: its name, its size, and for segments the page
/// header against the name.
pub fn read_wal_file(wal_path: &Path) -> Result<WalFile, PushError> {
    let name = name_of(wal_path)?;
    let content = read_bounded(wal_path, &name)?;
    let info = match name.wal_segment() {
        Some(seg) => Some(
            crate::wal::page::validate_segment(&content, &seg).map_err(|source| PushError::InvalidWal {
                name: name.to_string(),
                source,
            })?,
        ),
        None => None,
    };
    let hash = blake3::hash(&content);
    Ok(WalFile {
        name,
        content,
        hash,
        info,
    })
}

/// Open the repository for writing (never creating one).
pub async fn open_repository(settings: &Settings) -> Result<Writer, PushError> {
    Ok(Writer::open_writable(&settings.repo, &settings.store_options()).await?)
}

/// Whether the daemon serving this data directory has stored this very file (same device,
/// inode, size and mtime: no need to read it), waiting for it when it is uploading it right now
/// rather than uploading the same bytes twice.
async fn stored_by_daemon(
    spool: &crate::spool::Spool,
    settings: &Settings,
    repo: &crate::repo::RepoId,
    name: &WalFileName,
    wal_path: &Path,
) -> bool {
    if spool.is_archived_unchanged(repo, name, wal_path) {
        return true;
    }
    if !spool.upload_in_progress(name) {
        return false;
    }
    let deadline = std::time::Instant::now() + settings.retry_timeout;
    while spool.upload_in_progress(name) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    spool.is_archived_unchanged(repo, name, wal_path)
}

/// Archive the file at `wal_path` (PostgreSQL's `archive_command`). When the daemon serving
/// this data directory has already stored these exact bytes, answer at once. Never takes longer
/// than [`Settings::call_bound`]: a hung store must not hang PostgreSQL's archiver.
pub async fn push(settings: &Settings, wal_path: &Path) -> Result<PushOutcome, PushError> {
    let bound = settings.call_bound();
    tokio::time::timeout(bound, push_unbounded(settings, wal_path))
        .await
        .unwrap_or_else(|_| {
            Err(PushError::TimedOut {
                repo: settings.repo.to_string(),
                after: bound,
            })
        })
}

async fn push_unbounded(settings: &Settings, wal_path: &Path) -> Result<PushOutcome, PushError> {
    let spool = crate::spool::Spool::for_wal_path(wal_path);
    if let Some(pgdata) = spool.as_ref().and_then(|s| s.dir().parent()) {
        crate::prefetch::Prefetch::new(pgdata).clean_if_done();
    }
    let name = name_of(wal_path)?;
    // The repository first, even when the daemon has stored the file: a marker vouches only for
    // the repository it names, and this proves that repository is still the one at this URL.
    let mut repo = open_repository(settings).await?;
    if let Some(spool) = &spool
        && stored_by_daemon(spool, settings, repo.id(), &name, wal_path).await
    {
        let size = std::fs::metadata(wal_path).map(|m| m.len()).unwrap_or(0);
        return Ok(PushOutcome::already_archived(name, size));
    }
    let file = read_wal_file(wal_path)?;
    if let Some(spool) = &spool
        && spool.is_archived(repo.id(), &file.name, &file.hash, file.content.len() as u64)
    {
        return Ok(PushOutcome::already_archived(
            file.name,
            file.content.len() as u64,
        ));
    }
    // Tell a running daemon this file is being stored, so it does not upload it too.
    if let Some(spool) = &spool {
        spool.begin_upload(&file.name);
    }
    let result = archive_file(settings, &mut repo, wal_path, &file).await;
    if let Some(spool) = &spool {
        spool.end_upload(&file.name);
    }
    result
}

/// Archive a checked file into an open repository: refuse another cluster's WAL, store it unless
/// an identical copy is there, then record it in the time index.
pub async fn archive_file(
    settings: &Settings,
    repo: &mut Writer,
    wal_path: &Path,
    file: &WalFile,
) -> Result<PushOutcome, PushError> {
    let name_str = file.name.to_string();
    check_cluster(repo, &name_str, file.info.as_ref()).await?;
    let store = repo.writable();
    let sealer = repo.sealer();
    let outcome = store_file(settings, store, sealer, wal_path, &file.name, &file.content).await?;

    // The segment is durable; now its entry in the time index. Derived data: a failure here is
    // logged and never fails the push (restore only loses precision for this segment).
    if let (WalFileName::Segment(seg), Some(info)) = (file.name, file.info)
        && let Err(e) = timeindex::index_segment(store, sealer, &seg, &file.content, info.segment_size).await
    {
        tracing::warn!("time index for {name_str} not recorded: {e}");
    }
    Ok(outcome)
}

/// Store `content` under `name` unless an identical copy is there; refuse a different one.
async fn store_file(
    settings: &Settings,
    store: &WritableStore,
    sealer: &Sealer,
    wal_path: &Path,
    name: &WalFileName,
    content: &[u8],
) -> Result<PushOutcome, PushError> {
    let name_str = name.to_string();
    let key = wal_key(name);
    let new_hash = sealer.content_hash(content);
    if let Some(outcome) = compare_stored(store, sealer, &key, name, content, &new_hash).await? {
        return Ok(outcome);
    }
    let sealed = sealer
        .seal_hashed(
            ObjectKind::WalFile,
            &name_str,
            content,
            new_hash,
            settings.compress_level,
        )
        .map_err(|e| PushError::Read {
            path: wal_path.display().to_string(),
            source: e,
        })?;
    let stored_size = sealed.bytes.len() as u64;
    let put = store.put_new(&key, sealed.bytes).await?;
    match put {
        PutNew::Created if store.create_semantics() == CreateSemantics::Atomic => {}
        // The store may have let a concurrent writer replace either copy: read back what is there.
        _ => {
            return compare_stored(store, sealer, &key, name, content, &new_hash)
                .await?
                .map(|o| PushOutcome {
                    newly_stored: put == PutNew::Created,
                    ..o
                })
                .ok_or_else(|| {
                    PushError::Store(StoreError {
                        op: "read back",
                        key: key.clone(),
                        repo: store.url().to_string(),
                        message: "object missing right after it was written".into(),
                        transient: true,
                        attempts: 1,
                    })
                });
        }
    }
    Ok(PushOutcome {
        name: *name,
        size: content.len() as u64,
        stored_size,
        newly_stored: true,
    })
}

fn read_bounded(path: &Path, name: &WalFileName) -> Result<Vec<u8>, PushError> {
    let shown = || path.display().to_string();
    let read_err = |source| PushError::Read {
        path: shown(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    let limit = if name.wal_segment().is_some() {
        MAX_ORIGINAL_LEN
    } else {
        MAX_TEXT_FILE_LEN
    };
    if len > limit {
        return Err(PushError::TooLarge {
            path: shown(),
            len,
            kind: name.kind(),
        });
    }
    std::fs::read(path).map_err(read_err)
}

/// Make sure the repository belongs to the cluster that wrote this segment, binding a repository
/// created without `--pgdata` on its first segment. History and backup files carry no identity.
async fn check_cluster(repo: &mut Writer, name: &str, info: Option<&SegmentInfo>) -> Result<(), PushError> {
    let Some(info) = info else { return Ok(()) };
    let file = ClusterIdentity::from(info);
    let stored = repo.bind_cluster(file).await?;
    if stored != file {
        return Err(PushError::ForeignCluster {
            name: name.to_string(),
            file,
            stored,
            repo: repo.url().to_string(),
        });
    }
    Ok(())
}

/// `Some` when an identical copy is already stored, `None` when nothing is stored, an error when
/// something else is.
async fn compare_stored(
    store: &WritableStore,
    sealer: &Sealer,
    key: &str,
    name: &WalFileName,
    content: &[u8],
    new_hash: &[u8; 32],
) -> Result<Option<PushOutcome>, PushError> {
    let name_str = name.to_string();
    let Some(bytes) = store.get(key).await? else {
        return Ok(None);
    };
    let corrupt = |source| PushError::StoredCorrupt {
        name: name_str.clone(),
        key: key.to_string(),
        repo: store.url().to_string(),
        source: Box::new(source),
    };
    let header = sealer.read_header(&bytes).map_err(corrupt)?;
    if header.blake3 != *new_hash || header.original_len != content.len() as u64 {
        return Err(PushError::Conflict {
            name: name_str,
            stored_hash: header.blake3_hex(),
            stored_len: header.original_len,
            new_hash: hex::encode(new_hash),
            new_len: content.len() as u64,
        });
    }
    // Same hash in the header: make sure the stored copy really holds those bytes before telling
    // PostgreSQL it may recycle its own.
    sealer
        .open(&bytes, ObjectKind::WalFile, &name_str)
        .map_err(corrupt)?;
    Ok(Some(PushOutcome {
        name: *name,
        size: content.len() as u64,
        stored_size: bytes.len() as u64,
        newly_stored: false,
    }))
}
