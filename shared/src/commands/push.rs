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
use crate::repo::object::{
    MAX_ORIGINAL_LEN, ObjectError, ObjectKind, SealedBody, Sealer, StreamSealed, StreamSink,
};
use crate::repo::store::{CreateSemantics, PutNew};
use crate::repo::{ClusterIdentity, Damage, RepoError, StoreError, WritableStore, Writer};
use crate::timeindex::{self, SummaryWrite};
use crate::wal::decode::DecodeError;
use crate::wal::summary::{Carry, Summarizer};
use crate::wal::{Lsn, NameError, PageError, SegmentInfo, WalFileName};

/// How long push trusts the daemon's last reading of `walvault.json` (it reads it every
/// [`crate::commands::daemon::REPOSITORY_CHECK_EVERY`]) to say which repository its store holds.
/// A repository replaced at the same URL within this time can be told a segment the old one
/// holds: harmless, as the new one has no base backup yet that would need a segment completed
/// before its own start.
pub const TRUST_DAEMON_CHECK: std::time::Duration = std::time::Duration::from_secs(30);

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
    /// The plain blake3 of the file, when it was read.
    pub hash: Option<blake3::Hash>,
}

impl PushOutcome {
    /// An identical copy was already durable; nothing was written.
    fn already_archived(name: WalFileName, size: u64) -> PushOutcome {
        PushOutcome {
            name,
            size,
            stored_size: 0,
            newly_stored: false,
            hash: None,
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

/// A file PostgreSQL asked to archive, opened and checked (its name, its size, and for segments
/// the first page header against the name), not read yet: push reads it once, in pieces,
/// hashing, summarizing and compressing as it goes.
#[derive(Debug)]
pub struct WalSource {
    pub name: WalFileName,
    pub path: std::path::PathBuf,
    pub len: u64,
    /// What the first page says, for segments and partial segments.
    pub info: Option<SegmentInfo>,
    /// The file's metadata when opened (before any byte is read).
    pub meta: std::fs::Metadata,
    file: std::fs::File,
    /// The first page header (segments).
    head: Vec<u8>,
}

/// Bytes read at a time.
const READ_PIECE: usize = 256 << 10;

/// Open the file at `wal_path` and check it: its name, its size, and for segments the page
/// header against the name.
pub fn open_wal_file(wal_path: &Path) -> Result<WalSource, PushError> {
    use std::io::Read;
    let name = name_of(wal_path)?;
    let read_err = |source| PushError::Read {
        path: wal_path.display().to_string(),
        source,
    };
    let mut file = std::fs::File::open(wal_path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    let len = meta.len();
    let limit = if name.wal_segment().is_some() {
        MAX_ORIGINAL_LEN
    } else {
        MAX_TEXT_FILE_LEN
    };
    if len > limit {
        return Err(PushError::TooLarge {
            path: wal_path.display().to_string(),
            len,
            kind: name.kind(),
        });
    }
    let mut head = Vec::with_capacity(crate::wal::page::LONG_HEADER_LEN);
    let info = match name.wal_segment() {
        Some(seg) => {
            (&mut file)
                .take(crate::wal::page::LONG_HEADER_LEN as u64)
                .read_to_end(&mut head)
                .map_err(read_err)?;
            Some(
                crate::wal::page::validate_segment_head(&head, len, &seg).map_err(|source| {
                    PushError::InvalidWal {
                        name: name.to_string(),
                        source,
                    }
                })?,
            )
        }
        None => None,
    };
    Ok(WalSource {
        name,
        path: wal_path.to_path_buf(),
        len,
        info,
        meta,
        file,
        head,
    })
}

impl WalSource {
    fn read_err(&self, source: std::io::Error) -> PushError {
        PushError::Read {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Read the whole file once, in pieces, handing each to `each`; fails if the file is not
    /// `len` bytes any more.
    fn read_all(&mut self, mut each: impl FnMut(&[u8]) -> Result<(), PushError>) -> Result<(), PushError> {
        use std::io::{Read, Seek};
        self.file
            .seek(std::io::SeekFrom::Start(0))
            .map_err(|e| self.read_err(e))?;
        let mut buf = vec![0u8; READ_PIECE];
        let mut total = 0u64;
        loop {
            let n = match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_err(e)),
            };
            total += n as u64;
            if total > self.len {
                break;
            }
            each(&buf[..n])?;
        }
        if total != self.len {
            return Err(self.read_err(std::io::Error::other(format!(
                "the file changed size while it was read ({} bytes when opened, {total} read)",
                self.len
            ))));
        }
        Ok(())
    }

    /// The content's hashes: as the repository names content, and plain blake3.
    fn hashes(&mut self, sealer: &Sealer) -> Result<([u8; 32], blake3::Hash), PushError> {
        let mut plain = blake3::Hasher::new();
        let mut keyed = sealer.content_hasher();
        self.read_all(|b| {
            plain.update(b);
            if let Some(k) = &mut keyed {
                k.update(b);
            }
            Ok(())
        })?;
        let plain = plain.finalize();
        Ok((
            keyed.map_or(*plain.as_bytes(), |k| *k.finalize().as_bytes()),
            plain,
        ))
    }

    /// Seal the file into `sink`, summarizing it on the way when `summarizer` is given. Errors
    /// of the sink (a local repository's staging file) are the repository's: `write_err`.
    fn seal(
        &mut self,
        sealer: &Sealer,
        level: i32,
        sink: StreamSink,
        mut summarizer: Option<Summarizer>,
        write_err: impl Fn(std::io::Error) -> PushError,
    ) -> Result<(StreamSealed, Option<SummaryResult>), PushError> {
        let name = self.name.to_string();
        let mut stream = sealer
            .stream(ObjectKind::WalFile, &name, self.len, level, sink)
            .map_err(&write_err)?;
        let mut decode_failed = None;
        self.read_all(|b| {
            if let Some(s) = &mut summarizer
                && let Err(e) = s.feed(b)
            {
                decode_failed = Some(e);
                summarizer = None;
            }
            stream.write(b).map_err(&write_err)
        })?;
        let sealed = stream.finish().map_err(&write_err)?;
        let summary = match (summarizer, decode_failed) {
            (_, Some(e)) => Some(Err(e)),
            (Some(s), None) => Some(s.finish()),
            (None, None) => None,
        };
        Ok((sealed, summary))
    }

    /// A summarizer for this segment, continuing `carry`.
    fn summarizer(&self, start: Lsn, carry: Option<Carry>) -> Result<Summarizer, DecodeError> {
        Summarizer::new(&self.head, start, carry)
    }

    /// Summarize the file alone, without a carry (decoding with the previous segment's carry
    /// failed in the sealing pass).
    fn summarize(&mut self, start: Lsn, carry: Option<Carry>) -> Result<SummaryResult, PushError> {
        let mut s = match self.summarizer(start, carry) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        let mut failed = None;
        self.read_all(|b| {
            if failed.is_none()
                && let Err(e) = s.feed(b)
            {
                failed = Some(e);
            }
            Ok(())
        })?;
        Ok(match failed {
            Some(e) => Err(e),
            None => s.finish(),
        })
    }
}

type SummaryResult = Result<(crate::wal::summary::SegmentSummary, Option<Carry>), DecodeError>;

/// How [`archive_source`] archives, beyond the file and the repository.
#[derive(Debug, Clone, Copy)]
pub struct Archiving<'a> {
    /// The data directory's spool (the time index's carry is kept there).
    pub spool: Option<&'a crate::local::handoff::Spool>,
    pub indexing: Indexing,
    /// A listing of the repository taken moments ago had no object under the file's name (the
    /// daemon's, shared by its uploads): on a store that ignores create-only writes this is the
    /// check before the write, instead of a read of its own.
    pub listed_absent: bool,
}

impl Archiving<'_> {
    /// `archive-agent push`: everything in one pass, a check of its own before writing.
    pub fn push(spool: Option<&crate::local::handoff::Spool>) -> Archiving<'_> {
        Archiving {
            spool,
            indexing: Indexing::Inline,
            listed_absent: false,
        }
    }
}

/// Who records an archived segment's entry in the time index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Indexing {
    /// The push, decoding the segment in the same pass that hashes and seals it.
    Inline,
    /// The caller, after the upload ([`summarize_archived`]): the daemon's indexer decodes the
    /// segments in order, off the upload's critical path, each continuing its predecessor.
    Deferred,
}

/// Open the repository for writing (never creating one).
pub async fn open_repository(settings: &Settings) -> Result<Writer, PushError> {
    Ok(Writer::open_writable(&settings.repo, &settings.store_options()).await?)
}

/// Whether the daemon serving this data directory has stored this very file (same device,
/// inode, size and mtime: no need to read it), waiting for it when it is uploading it right now
/// rather than uploading the same bytes twice.
async fn stored_by_daemon(
    spool: &crate::local::handoff::Spool,
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
    let spool = crate::local::handoff::Spool::for_wal_path(wal_path);
    if let Some(pgdata) = spool.as_ref().and_then(|s| s.dir().parent()) {
        crate::commands::prefetch::Prefetch::new(pgdata).clean_if_done();
    }
    let name = name_of(wal_path)?;
    // A marker vouches only for the repository it names: which repository the store holds is
    // known from the daemon's reading of walvault.json, if recent and of this very store, else
    // from our own.
    if let Some(spool) = &spool
        && let Some(id) = spool.repository_checked(
            &crate::repo::store::store_identity(&settings.repo, &settings.store_options()),
            crate::time::now_micros(),
            TRUST_DAEMON_CHECK,
        )
        && stored_by_daemon(spool, settings, &id, &name, wal_path).await
    {
        let size = std::fs::metadata(wal_path).map(|m| m.len()).unwrap_or(0);
        return Ok(PushOutcome::already_archived(name, size));
    }
    let mut repo = open_repository(settings).await?;
    if let Some(spool) = &spool
        && stored_by_daemon(spool, settings, repo.id(), &name, wal_path).await
    {
        let size = std::fs::metadata(wal_path).map(|m| m.len()).unwrap_or(0);
        return Ok(PushOutcome::already_archived(name, size));
    }
    let mut src = open_wal_file(wal_path)?;
    // A marker whose file identity differs (the file was copied or touched): compare contents.
    if let Some(spool) = &spool
        && spool.has_marker(&name)
    {
        let sealer = repo.sealer().clone();
        let (back, hashes) = blocking(src, move |s| s.hashes(&sealer)).await?;
        src = back;
        if spool.is_archived(repo.id(), &name, &hashes?.1, src.len) {
            return Ok(PushOutcome::already_archived(name, src.len));
        }
    }
    // Tell a running daemon this file is being stored, so it does not upload it too.
    if let Some(spool) = &spool {
        spool.begin_upload(&name);
    }
    let result = archive_source(settings, &mut repo, src, Archiving::push(spool.as_ref())).await;
    if let Some(spool) = &spool {
        spool.end_upload(&name);
    }
    result
}

/// Run `f` on `src` on a blocking thread (file reads, hashing, compression) and hand `src` back.
async fn blocking<R: Send + 'static>(
    mut src: WalSource,
    f: impl FnOnce(&mut WalSource) -> R + Send + 'static,
) -> Result<(WalSource, R), PushError> {
    let path = src.path.display().to_string();
    tokio::task::spawn_blocking(move || {
        let r = f(&mut src);
        (src, r)
    })
    .await
    .map_err(|e| PushError::Read {
        path,
        source: std::io::Error::other(e),
    })
}

/// Archive a checked file into an open repository: refuse another cluster's WAL, store it unless
/// an identical copy is there (refusing a different one), then, [`Indexing::Inline`], record it
/// in the time index. The file is read once for all of it; on a store that refuses to replace
/// objects, an archived segment costs one write for itself and one for its summary.
pub async fn archive_source(
    settings: &Settings,
    repo: &mut Writer,
    src: WalSource,
    how: Archiving<'_>,
) -> Result<PushOutcome, PushError> {
    check_cluster(repo, &src.name.to_string(), src.info.as_ref()).await?;
    let (store, sealer) = (repo.writable().clone(), repo.sealer().clone());
    let to = Destination {
        store: &store,
        sealer: &sealer,
        key: wal_key(&src.name),
    };
    // On a store that may overwrite: look before writing (unless a listing just did), and make
    // sure after it that what is there is ours.
    let check_first =
        store.create_semantics_for(usize::try_from(src.len).unwrap_or(usize::MAX)) != CreateSemantics::Atomic;
    let look_first = check_first && !how.listed_absent;
    let segment = InlineSegment::of(&src, how.indexing);
    // The time index's carry from the previous segment, then one pass: hash, summary, seal.
    let (carried, summarizer) = match segment {
        Some(s) => s.summarizer(&to, &src, repo.id(), how.spool).await,
        None => (false, None),
    };
    let Sealing {
        src,
        sealed,
        summary,
        staged,
        existing,
    } = seal_and_look(settings, &to, src, summarizer, look_first).await?;
    let ours = Content {
        name: src.name,
        len: src.len,
        hash: sealed.header.blake3,
        plain_hash: sealed.plain_hash,
    };
    if let Some(bytes) = existing {
        let outcome = compare_existing(&to, &ours, &bytes)?;
        // Archived already; indexed too, unless an earlier push stopped in between.
        if let Some(s) = segment {
            let write = SummaryWrite::KeepExisting;
            record_summary(&store, &sealer, &s.seg, summary, repo.id(), how.spool, write).await;
        }
        return Ok(outcome);
    }
    let written = write_new(&to, sealed, staged).await?;
    let outcome = confirm_ours(&to, &ours, written, check_first).await?;
    // The segment is durable; now its entry in the time index. Derived data: a failure here is
    // logged and never fails the push (restore only loses precision for this segment). A summary
    // under the name of a segment this push has just stored describes nothing else: replaced.
    if let Some(s) = segment {
        let summary = s.retried_without_carry(src, summary, carried).await;
        let write = SummaryWrite::for_segment(outcome.newly_stored);
        record_summary(&store, &sealer, &s.seg, summary, repo.id(), how.spool, write).await;
    }
    Ok(outcome)
}

/// Where a push stores its file: the store, the sealer its objects are made with, and the key.
struct Destination<'a> {
    store: &'a WritableStore,
    sealer: &'a Sealer,
    key: String,
}

/// The file's content as the push sealed it: what a copy already stored must match.
struct Content {
    name: WalFileName,
    len: u64,
    /// The hash the repository names content by.
    hash: [u8; 32],
    plain_hash: blake3::Hash,
}

/// A segment this push records in the time index itself ([`Indexing::Inline`]): its name,
/// size and start.
#[derive(Debug, Clone, Copy)]
struct InlineSegment {
    seg: crate::wal::SegmentName,
    size: u32,
    start: Lsn,
}

impl InlineSegment {
    /// The segment `src` is, when this push indexes it (the first page was checked against the
    /// name, so the start is in range).
    fn of(src: &WalSource, indexing: Indexing) -> Option<InlineSegment> {
        match (src.name, src.info) {
            (WalFileName::Segment(seg), Some(info)) if indexing == Indexing::Inline => {
                timeindex::segment_start(&seg, info.segment_size)
                    .ok()
                    .map(|start| InlineSegment {
                        seg,
                        size: info.segment_size,
                        start,
                    })
            }
            _ => None,
        }
    }

    /// A summarizer continuing the previous segment's carry (`true`) when it is known, else
    /// one starting afresh.
    async fn summarizer(
        &self,
        to: &Destination<'_>,
        src: &WalSource,
        repo: &crate::repo::RepoId,
        spool: Option<&crate::local::handoff::Spool>,
    ) -> (bool, Option<Summarizer>) {
        let carry = carry_for(to.store, to.sealer, &self.seg, self.size, repo, spool).await;
        match carry.map(|c| src.summarizer(self.start, Some(c))) {
            Some(Ok(s)) => (true, Some(s)),
            _ => (false, src.summarizer(self.start, None).ok()),
        }
    }

    /// The sealing pass's summary, or, when decoding with the previous segment's carry failed
    /// there, the segment summarized again alone.
    async fn retried_without_carry(
        &self,
        src: WalSource,
        summary: Option<SummaryResult>,
        carried: bool,
    ) -> Option<SummaryResult> {
        let start = self.start;
        match summary {
            Some(Err(_)) if carried => blocking(src, move |s| s.summarize(start, None))
                .await
                .ok()
                .and_then(|(_, r)| r.ok()),
            other => other,
        }
    }
}

/// What the sealing pass leaves: the file (to summarize again), the sealed object, the summary
/// made on the way, the staged object it was written to (a local repository), and what the
/// store already held under the key, when it was looked at.
struct Sealing {
    src: WalSource,
    sealed: StreamSealed,
    summary: Option<SummaryResult>,
    staged: Option<crate::repo::store::Staged>,
    existing: Option<bytes::Bytes>,
}

/// Seal `src` (into a staged file on a local unencrypted repository, else in memory), and, when
/// `look_first`, read what the store holds under the key while it is being sealed.
async fn seal_and_look(
    settings: &Settings,
    to: &Destination<'_>,
    src: WalSource,
    summarizer: Option<Summarizer>,
    look_first: bool,
) -> Result<Sealing, PushError> {
    let mut staged = if to.sealer.is_encrypted() {
        None
    } else {
        to.store.stage(&to.key)?
    };
    let sink = match staged.as_mut().and_then(|s| s.file.take()) {
        Some(f) => StreamSink::File(f),
        None => StreamSink::Memory,
    };
    let (level, s) = (settings.compress_level, to.sealer.clone());
    let write_err = staging_error(to.key.clone(), to.store.url().to_string());
    let seal = blocking(src, move |src| src.seal(&s, level, sink, summarizer, write_err));
    let (sealing, existing) = if look_first {
        let (sealing, existing) = tokio::join!(seal, to.store.get(&to.key));
        (sealing, existing?)
    } else {
        (seal.await, None)
    };
    let (src, sealed) = sealing?;
    let (sealed, summary) = sealed?;
    Ok(Sealing {
        src,
        sealed,
        summary,
        staged,
        existing,
    })
}

/// A create-only write of a sealed object: what the store answered (created or already there),
/// the entity tag of what it created when the store gave one, and the bytes written.
struct Written {
    put: PutNew,
    etag: Option<String>,
    stored_size: u64,
}

/// Write the sealed object under the key, create-only: the staged file published, or the
/// parts put.
async fn write_new(
    to: &Destination<'_>,
    sealed: StreamSealed,
    staged: Option<crate::repo::store::Staged>,
) -> Result<Written, PushError> {
    let stored_size = sealed.stored_len;
    let (put, etag) = match (sealed.body, staged) {
        (SealedBody::File(f), Some(mut staged)) => {
            staged.file = Some(f);
            (to.store.publish_new(staged).await?, None)
        }
        (SealedBody::Parts(parts), _) => to.store.put_new_parts(&to.key, parts).await?,
        (SealedBody::File(_), None) => unreachable!("a file sink comes from a staged object"),
    };
    Ok(Written {
        put,
        etag,
        stored_size,
    })
}

/// The outcome of a create-only write of `ours`, once what the store holds under the key is
/// known to be these bytes.
async fn confirm_ours(
    to: &Destination<'_>,
    ours: &Content,
    written: Written,
    check_first: bool,
) -> Result<PushOutcome, PushError> {
    let outcome = PushOutcome {
        name: ours.name,
        size: ours.len,
        stored_size: written.stored_size,
        newly_stored: true,
        hash: Some(ours.plain_hash),
    };
    match written.put {
        PutNew::Created if !check_first => Ok(outcome),
        // Already there (a retried push, or a racing writer): what is stored must be these bytes.
        PutNew::AlreadyExists => {
            let bytes = read_back(to.store, &to.key).await?;
            compare_existing(to, ours, &bytes)
        }
        // The store may have let a concurrent writer replace either copy: make sure what is
        // there is ours. The entity tag the write returned, seen again, proves it with a HEAD;
        // without one, read it back and compare.
        PutNew::Created => {
            let same_tag = match (&written.etag, to.store.head(&to.key).await?) {
                (Some(tag), Some((_, Some(now)))) => *tag == now,
                _ => false,
            };
            if !same_tag {
                let bytes = read_back(to.store, &to.key).await?;
                compare_existing(to, ours, &bytes)?;
            }
            Ok(outcome)
        }
    }
}

/// A failure to write the staged copy of `key` in repository `repo`: a store error (transient).
fn staging_error(key: String, repo: String) -> impl Fn(std::io::Error) -> PushError + Send + 'static {
    move |e| {
        PushError::Store(StoreError {
            op: "write",
            key: key.clone(),
            repo: repo.clone(),
            message: e.to_string(),
            kind: crate::repo::StoreErrorKind::Failed,
            attempts: 1,
        })
    }
}

/// The previous segment's carry (see [`timeindex::carry_before`]); `None` when unknown.
async fn carry_for(
    store: &WritableStore,
    sealer: &Sealer,
    seg: &crate::wal::SegmentName,
    size: u32,
    repo: &crate::repo::RepoId,
    spool: Option<&crate::local::handoff::Spool>,
) -> Option<Carry> {
    timeindex::carry_before(store, sealer, seg, size, spool.map(|s| (s, repo)))
        .await
        .ok()
        .flatten()
}

/// Store a segment's summary and keep its carry for the next segment; failures are logged.
pub(crate) async fn record_summary(
    store: &WritableStore,
    sealer: &Sealer,
    seg: &crate::wal::SegmentName,
    summary: Option<SummaryResult>,
    repo: &crate::repo::RepoId,
    spool: Option<&crate::local::handoff::Spool>,
    write: SummaryWrite,
) {
    match summary {
        Some(Ok((summary, next))) => {
            if let (Some(spool), Some(next)) = (spool, &next) {
                spool.keep_carry(repo, seg, next);
            }
            if let Err(e) = timeindex::store_summary(store, sealer, seg, summary, next, write).await {
                tracing::warn!("time index for {seg} not recorded: {e}");
            }
        }
        Some(Err(e)) => tracing::warn!("time index for {seg} not recorded: {e}"),
        None => tracing::warn!("time index for {seg} not recorded: the segment could not be decoded"),
    }
}

/// Decode an archived segment for its time-index summary after its upload (the daemon's
/// indexer), continuing the previous segment's carry (from the spool, else the repository).
/// `src` is the file opened again when the upload opened it: held open, it reads the same bytes
/// even once PostgreSQL has renamed it for recycling, until it writes over it; so it must still
/// be the very file uploaded, same device, inode, size and modification time as `uploaded`,
/// before the read and after it.
pub async fn summarize_archived(
    store: &WritableStore,
    sealer: &Sealer,
    repo: &crate::repo::RepoId,
    spool: &crate::local::handoff::Spool,
    src: WalSource,
    uploaded: &std::fs::Metadata,
) -> Result<(crate::wal::SegmentName, SummaryResult), PushError> {
    let (WalFileName::Segment(seg), Some(info)) = (src.name, src.info) else {
        return Err(src.read_err(std::io::Error::other("not a WAL segment")));
    };
    let recycled = |src: &WalSource| {
        src.read_err(std::io::Error::other(
            "the file is not the one archived any more (recycled): its summary is left out",
        ))
    };
    if !crate::local::handoff::same_file(&src.meta, uploaded) {
        return Err(recycled(&src));
    }
    let start = timeindex::segment_start(&seg, info.segment_size).map_err(|_| recycled(&src))?;
    let carry = carry_for(store, sealer, &seg, info.segment_size, repo, Some(spool)).await;
    let (src, result) = blocking(src, move |s| {
        let with_carry = s.summarize(start, carry.clone());
        match with_carry {
            Ok(Err(_)) if carry.is_some() => s.summarize(start, None),
            other => other,
        }
    })
    .await?;
    let result = result?;
    match src.file.metadata() {
        Ok(now) if crate::local::handoff::same_file(&now, uploaded) => Ok((seg, result)),
        _ => Err(recycled(&src)),
    }
}

/// The object just written or found under `key`; its absence right after is a store fault.
async fn read_back(store: &WritableStore, key: &str) -> Result<bytes::Bytes, PushError> {
    store.get(key).await?.ok_or_else(|| {
        PushError::Store(StoreError {
            op: "read back",
            key: key.to_string(),
            repo: store.url().to_string(),
            message: "object missing right after it was written".into(),
            kind: crate::repo::StoreErrorKind::Failed,
            attempts: 1,
        })
    })
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

/// The stored object `bytes` under the key must be exactly `ours` (hash as the repository names
/// content, and length): then the push is done, nothing written. Another content is a
/// conflict; an object that does not open is corrupt.
fn compare_existing(to: &Destination<'_>, ours: &Content, bytes: &[u8]) -> Result<PushOutcome, PushError> {
    let name_str = ours.name.to_string();
    let corrupt = |source| PushError::StoredCorrupt {
        name: name_str.clone(),
        key: to.key.clone(),
        repo: to.store.url().to_string(),
        source: Box::new(source),
    };
    let header = to.sealer.read_header(bytes).map_err(corrupt)?;
    if header.blake3 != ours.hash || header.original_len != ours.len {
        return Err(PushError::Conflict {
            name: name_str,
            stored_hash: header.blake3_hex(),
            stored_len: header.original_len,
            new_hash: hex::encode(ours.hash),
            new_len: ours.len,
        });
    }
    // Same hash in the header: make sure the stored copy really holds those bytes before telling
    // PostgreSQL it may recycle its own.
    match crate::repo::stored::open::<crate::repo::stored::WalObject>(to.sealer, &ours.name, bytes) {
        Ok(_) => {}
        Err(Damage::Envelope(e)) => return Err(corrupt(e)),
        Err(Damage::Content(never)) => match never {},
    }
    Ok(PushOutcome {
        name: ours.name,
        size: ours.len,
        stored_size: bytes.len() as u64,
        newly_stored: false,
        hash: Some(ours.plain_hash),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::fault::{Fault, FaultStore};
    use crate::repo::{RepoDescriptor, layout::DESCRIPTOR_KEY};
    use std::sync::Arc;
    use std::time::Duration;

    fn settings() -> Settings {
        let o = crate::config::RepoArgs {
            repo: Some("s3://b/r".into()),
            ..Default::default()
        };
        Settings::resolve(&o, Some(3), Default::default(), Path::new("/nonexistent")).unwrap()
    }

    /// A repository on an in-memory "S3" store, with the descriptor `honoured` says; the store
    /// counts requests.
    async fn repository(honoured: Option<bool>, fault: Fault) -> (Arc<FaultStore>, Writer) {
        let faults = Arc::new(FaultStore::new(Fault::None));
        let store = FaultStore::s3_like(&faults, Duration::from_millis(200));
        // Bound to the cluster of `segment` (as `init --pgdata` does): no cluster.json to write.
        let seg = first_segment_name();
        let info =
            crate::wal::page::validate_segment(&crate::wal::page::synthetic_segment(&seg, 42, 1 << 20), &seg)
                .unwrap();
        let mut d = RepoDescriptor::new(Some(ClusterIdentity::from(&info)), 0);
        d.create_only_honoured = honoured;
        store.put(DESCRIPTOR_KEY, d.to_json().into()).await.unwrap();
        let w = Writer::on_writable_store(store, None).await.unwrap();
        faults.set(fault);
        (faults, w)
    }

    /// The first segment of a timeline (no previous segment, so no carry to look for), valid
    /// first page, then zeros (the end of WAL for the summary).
    fn first_segment_name() -> crate::wal::SegmentName {
        match "000000010000000000000000".parse() {
            Ok(WalFileName::Segment(s)) => s,
            _ => unreachable!(),
        }
    }

    fn segment(dir: &Path, fill: u8) -> std::path::PathBuf {
        let name = first_segment_name();
        let mut bytes = crate::wal::page::synthetic_segment(&name, 42, 1 << 20);
        bytes[1 << 19] = fill;
        let path = dir.join(name.to_string());
        std::fs::write(&path, &bytes).unwrap();
        path
    }

    async fn archive(w: &mut Writer, path: &Path) -> Result<PushOutcome, PushError> {
        archive_source(
            &settings(),
            w,
            open_wal_file(path).unwrap(),
            Archiving::push(None),
        )
        .await
    }

    /// On a store that refuses a second create-only write, a segment costs two requests: its
    /// write and its summary's. Elsewhere a check comes first and a read-back after.
    #[tokio::test]
    async fn a_segment_costs_two_writes_where_create_only_is_honoured() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment(dir.path(), 0);
        let (faults, mut w) = repository(Some(true), Fault::None).await;
        let before = faults.requests();
        let out = archive(&mut w, &path).await.unwrap();
        assert!(out.newly_stored);
        assert_eq!(faults.requests() - before, 2, "PUT segment, PUT summary");
        // The same bytes again: refused by the store, then compared: still success.
        let before = faults.requests();
        let again = archive(&mut w, &path).await.unwrap();
        assert!(!again.newly_stored);
        assert_eq!(
            faults.requests() - before,
            3,
            "PUT refused, GET to compare, HEAD summary"
        );

        let (faults, mut w) = repository(None, Fault::None).await;
        let before = faults.requests();
        archive(&mut w, &path).await.unwrap();
        assert_eq!(
            faults.requests() - before,
            4,
            "GET (absent), PUT, HEAD (entity tag), PUT summary"
        );
    }

    /// A segment the daemon marked is answered without a request when the daemon's reading of
    /// walvault.json is fresh and of this very store; a stale reading, or one of another store,
    /// sends push to the repository (here none: the push fails rather than answer).
    #[tokio::test]
    async fn push_trusts_the_daemons_reading_of_the_repository_only_while_fresh_and_for_its_store() {
        let dir = tempfile::tempdir().unwrap();
        let pgdata = dir.path();
        std::fs::create_dir_all(pgdata.join("pg_wal")).unwrap();
        let spool = crate::local::handoff::Spool::new(pgdata);
        std::fs::create_dir_all(spool.dir()).unwrap();
        let path = segment(&pgdata.join("pg_wal"), 0);
        let name = name_of(&path).unwrap();
        let o = crate::config::RepoArgs {
            repo: Some(format!("file://{}", pgdata.join("no-repository").display())),
            ..Default::default()
        };
        let mut settings =
            Settings::resolve(&o, None, Default::default(), Path::new("/nonexistent")).unwrap();
        // The refusals below open the (missing) repository: they fail at once, not after the
        // retries, so that the last reading is still fresh when it is recorded.
        settings.retry_timeout = std::time::Duration::ZERO;
        let id = crate::repo::RepoId::random();
        let bytes = std::fs::read(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        spool
            .mark_archived(&id, &name, &blake3::hash(&bytes), meta.len(), Some(&meta))
            .unwrap();
        let store = crate::repo::store::store_identity(&settings.repo, &settings.store_options());
        let now = crate::time::now_micros();
        let trust = i64::try_from(TRUST_DAEMON_CHECK.as_micros()).unwrap();
        spool
            .record_repository(&store, &id, now - trust - 1_000_000)
            .unwrap();
        assert!(push(&settings, &path).await.is_err(), "a stale reading");
        spool
            .record_repository("file:///elsewhere dir=/elsewhere", &id, now)
            .unwrap();
        assert!(push(&settings, &path).await.is_err(), "another store");
        spool
            .record_repository(&store, &crate::repo::RepoId::random(), now)
            .unwrap();
        assert!(push(&settings, &path).await.is_err(), "another repository");
        spool
            .record_repository(&store, &id, crate::time::now_micros())
            .unwrap();
        let out = push(&settings, &path).await.unwrap();
        assert!(!out.newly_stored);
        assert_eq!(out.size, meta.len());
    }

    /// Different bytes under an archived name are refused and the archived copy kept, whether
    /// the store refuses the second write itself or ignores create-only writes (and walvault
    /// checks first).
    #[tokio::test]
    async fn different_bytes_never_replace_an_archived_segment() {
        let dir = tempfile::tempdir().unwrap();
        for (honoured, fault) in [(Some(true), Fault::None), (Some(false), Fault::IgnoreCreateOnly)] {
            let (_, mut w) = repository(honoured, fault).await;
            let path = segment(dir.path(), 0);
            let first = archive(&mut w, &path).await.unwrap();
            let other = segment(dir.path(), 7);
            let err = archive(&mut w, &other).await.unwrap_err();
            assert!(matches!(err, PushError::Conflict { .. }), "{err}");
            assert_eq!(err.exit_code(), crate::exit::REFUSED);
            let stored = w.writable().get(&wal_key(&first.name)).await.unwrap().unwrap();
            let header = w.sealer().read_header(&stored).unwrap();
            assert_eq!(Some(blake3::Hash::from(header.blake3)), first.hash);
        }
    }

    /// init's probe: an in-memory store refuses the second create-only write, a store that
    /// ignores the condition does not, and the probe object is gone either way.
    #[tokio::test]
    async fn the_create_only_probe_tells_honouring_stores_from_ignoring_ones() {
        for (fault, expected) in [(Fault::None, true), (Fault::IgnoreCreateOnly, false)] {
            let (faults, w) = repository(None, fault).await;
            let store = w.writable();
            assert_eq!(
                store.probe_create_only("probe/create-only-x").await.unwrap(),
                expected
            );
            assert_eq!(store.get("probe/create-only-x").await.unwrap(), None);
            drop(faults);
        }
    }
}
