//! Copying a backup's files into the repository: the files are read one after the other, each
//! in `chunk_size` pieces, up to `parallel` of a file's pieces at once and handed on in order
//! ([`Reads`]); hashing and compressing run in parallel tasks, at most `parallel` at once
//! and at most `2 * parallel` chunks read and not yet sealed. A sealed chunk gives its read
//! buffer back and is appended to the pack being filled ([`crate::basebackup::pack`]); a full
//! pack is written by the task that filled it, at most [`PACKS_IN_FLIGHT`] at once on object
//! stores, whose writes wait on the network rather than the CPU. Files the previous backup read
//! and that did not change since are taken over unread, with their chunks and packs.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::BackupError;
use super::control::{self, CONTROL_FILE};
use super::differences::{BaseRef, DeltaBases, Sealed, deltas_named, seal_delta};
use super::file_reads::{Body, Buffers, Reads};
use super::inventory::{Base, Inventory, Previous, Roots, TakenOver};
use super::listing::{ItemNo, Listing, Place};
use super::open_ahead::{Ahead, OpenAhead};
use super::pages::{self, PageCheck, Tally};
use super::walk::At;
use crate::basebackup::chunk::{self, ChunkError, ChunkId};
use crate::basebackup::manifest::{BackupStats, Delta, Entry, Tablespace, Within};
use crate::basebackup::pack::{PACK_TARGET, PackBuilder, PackRecord};
use crate::basebackup::page_checksum::RelationFile;
use crate::repo::WritableStore;
use crate::repo::layout::pack_key;
use crate::repo::object::Sealer;

/// Packs being written at once on object stores, each [`PACK_TARGET`] bytes in memory: a PUT is
/// a round trip that waits, and several overlap it with the next packs' compression. On a local
/// repository two: one written and synced while the next fills.
pub const PACKS_IN_FLIGHT: usize = 4;

/// Files of at most this many bytes (and a quarter of the chunk size) are stored together, in
/// chunks shared with their neighbours in the walk, rather than each in a chunk of its own
/// ([`Within`]): a cluster of many small relations compressed each file alone stored three times
/// what one stream does (28.6 MB against 9.2 for 61,000 files, 10.5 in chunks of 1 MiB), and
/// paid a chunk's envelope per file.
pub const SMALL_FILE: u64 = 128 << 10;

/// A shared chunk is closed once it holds this many bytes (or the chunk size, if smaller)...
pub const SHARED_TARGET: usize = 1 << 20;

/// ...or once it holds a quarter of that and the file just added is one whose name ends a
/// shared chunk ([`ends_shared`]).
const SHARED_MIN_DIVISOR: usize = 4;

/// Whether a shared chunk that holds enough ends after the file at `path`: about one name in
/// eight, chosen by the hash of the file's name, so that where chunks end depends on the names
/// around a change and not on every size before it (and the same catalogs in two databases are
/// cut alike). A backup that reads every file again
/// (`--read-all`) then stores again only the shared chunks around the files that changed: cut
/// by size alone, one file grown by a page would shift every chunk after it.
fn ends_shared(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    blake3::hash(name.as_bytes()).as_bytes()[0].is_multiple_of(8)
}

/// The directory of `path`.
fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// The shared chunk being filled: its bytes, its place, and each file in it with its offset.
#[derive(Default)]
struct SharedChunk {
    buf: Vec<u8>,
    place: Option<Place>,
    members: Vec<(ItemNo, u64)>,
}

/// How to copy.
#[derive(Debug, Clone, Copy)]
pub(super) struct CopyOptions {
    pub chunk_size: u64,
    /// Chunks hashed or compressed at once.
    pub parallel: usize,
    /// zstd level.
    pub level: i32,
    pub pg_version: u32,
    /// Verify the pages of relation files as they are read ([`super::pages`]).
    pub pages: Option<PageCheck>,
}

/// What `copy_files` produced.
pub(super) struct Copied {
    /// The manifest's entries and file records, in path order.
    pub listing: Listing,
    pub tablespaces: Vec<Tablespace>,
    pub stats: BackupStats,
    pub examined_after_us: i64,
    /// The packs the entries' chunks are in: those this backup wrote, and those of the previous
    /// backup that hold a chunk it references.
    pub packs: Vec<PackRecord>,
    /// What the page check found, when pages were checked.
    pub pages: Option<Tally>,
    /// The chunks the entries reference that are stored as differences, sorted by chunk: those
    /// this backup stored, and those of the previous backup it references again.
    pub deltas: Vec<Delta>,
}

/// Read, chunk and upload every file of `inventory` that changed since `previous` (every file
/// without one); returns the manifest's entries and file records ([`Listing`]).
pub(super) async fn copy_files(
    store: &WritableStore,
    sealer: &Sealer,
    inventory: Inventory,
    opts: CopyOptions,
    previous: Option<&Previous>,
) -> Result<Copied, BackupError> {
    let Inventory {
        sources,
        tablespaces,
        roots,
        examined_after_ns,
    } = inventory;
    let base = previous.filter(|p| p.take_over).map(Previous::base);
    // The walk's sources are the list's first entries, named by the walk.
    let prior = previous
        .filter(|p| p.take_over)
        .map(|p| (Arc::clone(&p.files), p.frame.id.clone()));
    let listing = Listing::of_walk(Arc::clone(&sources), prior);
    let mut copier = Copier::new(store, sealer, opts, previous, listing);
    let unchanged = previous.and_then(|p| p.unchanged(examined_after_ns));
    let mut opened = OpenAhead::start(Arc::clone(&sources), &roots, unchanged);
    for (at, src) in sources.iter().enumerate() {
        copier
            .copy((at, src), &roots, &mut opened, base.as_ref(), examined_after_ns)
            .await?;
    }
    drop(opened);
    drop(sources);
    copier.into_copied(tablespaces, previous, examined_after_ns).await
}

/// The packs a manifest whose entries name `named` and that lists `deltas` lists: every pack
/// this backup wrote, then each of the previous backup's packs that holds a chunk the entries
/// reference (or a delta is read from) and no new pack holds.
fn packs_named<'a>(
    written: Vec<PackRecord>,
    previous: &[PackRecord],
    named: impl Iterator<Item = &'a ChunkId>,
    deltas: &[Delta],
) -> Vec<PackRecord> {
    let in_new: HashSet<ChunkId> = written.iter().flat_map(|p| p.chunks.iter().copied()).collect();
    let referenced: HashSet<ChunkId> = named
        .copied()
        .chain(deltas.iter().flat_map(|d| [d.base, d.xor]))
        .filter(|c| !in_new.contains(c))
        .collect();
    let mut packs = written;
    packs.extend(
        previous
            .iter()
            .filter(|p| p.chunks.iter().any(|c| referenced.contains(c)))
            .cloned(),
    );
    packs
}

/// A file being streamed into the pipeline ([`Copier::begin_streamed`]).
#[derive(Default)]
pub(super) struct Streamed {
    entry: ItemNo,
    next_idx: usize,
    /// The chunk being filled.
    buf: Vec<u8>,
    /// Bytes handed to the pipeline.
    size: u64,
}

impl Streamed {
    /// This file, leaving an empty one in its place (for an owner that implements `Drop`).
    pub(super) fn take(&mut self) -> Streamed {
        std::mem::take(self)
    }
}

/// What the chunk pipeline did with one chunk.
struct ChunkDone {
    place: Place,
    hash: [u8; 32],
    /// `None`: the same bytes were already met in this backup (counted there).
    stored: Option<(u64, bool)>,
    /// Stored as a difference: from this base, in this chunk.
    delta: Option<(ChunkId, ChunkId)>,
}

/// The reader's state: the manifest being assembled and the chunk tasks in flight.
pub(super) struct Copier {
    chunks: Arc<Chunks>,
    /// Bounds memory: at most 2 * `parallel` chunks (plus the uploads in flight on an object
    /// store) read and not yet stored.
    in_memory: Arc<Semaphore>,
    /// Chunks of a file read at once.
    parallel: usize,
    chunk_size: usize,
    pg_version: u32,
    page_check: Option<PageCheck>,
    pages: Tally,
    tasks: JoinSet<Result<ChunkDone, BackupError>>,
    listing: Listing,
    stats: BackupStats,
    /// Small files being gathered into one chunk.
    shared: SharedChunk,
    /// Shared chunks in the pipeline, by their place: their files with their offsets, and
    /// their length.
    sharing: HashMap<Place, (Vec<(ItemNo, u64)>, u64)>,
    /// The chunks this backup stored as differences: content hash -> (base, difference).
    deltas: HashMap<[u8; 32], (ChunkId, ChunkId)>,
}

impl Copier {
    /// A copier filling `listing`, which stores no chunk `previous` holds.
    pub(super) fn new(
        store: &WritableStore,
        sealer: &Sealer,
        opts: CopyOptions,
        previous: Option<&Previous>,
        listing: Listing,
    ) -> Copier {
        let known = previous.map(Previous::chunk_lengths).unwrap_or_default();
        let bases = previous.map(|p| DeltaBases::of(store, p));
        let parallel = opts.parallel.max(1);
        let packs_in_flight = if store.is_local() { 2 } else { PACKS_IN_FLIGHT };
        Copier {
            chunks: Arc::new(Chunks {
                store: store.clone(),
                sealer: sealer.clone(),
                cpu: Semaphore::new(parallel),
                seen: Mutex::default(),
                known,
                bases,
                xors: Mutex::default(),
                buffers: Arc::new(Buffers::default()),
                level: opts.level,
                packs: Packs {
                    store: store.clone(),
                    building: Mutex::default(),
                    slots: Semaphore::new(packs_in_flight),
                    written: Mutex::default(),
                },
            }),
            in_memory: Arc::new(Semaphore::new(2 * parallel)),
            parallel,
            chunk_size: opts.chunk_size as usize,
            pg_version: opts.pg_version,
            page_check: opts.pages,
            pages: Tally::default(),
            tasks: JoinSet::new(),
            listing,
            stats: BackupStats::default(),
            shared: SharedChunk::default(),
            sharing: HashMap::new(),
            deltas: HashMap::new(),
        }
    }

    /// Copy source `at` (a file opened ahead by `opened`), or take it over from `base`; a file
    /// gone since the walk is left out (WAL replay recreates the truth).
    async fn copy(
        &mut self,
        (at, src): (usize, At<'_>),
        roots: &Roots,
        opened: &mut OpenAhead,
        base: Option<&Base<'_>>,
        clock_ns: i64,
    ) -> Result<(), BackupError> {
        if src.is_dir {
            self.listing.found(at)?;
            return Ok(());
        }
        let (file, stat) = if src.rel == CONTROL_FILE {
            // Whole, and only once its CRC checks (see `read_control_file`).
            let bytes = control::read_control_file(&roots.path(src.rel), self.pg_version).await?;
            (Body::Bytes(bytes), None)
        } else {
            let (f, meta) = match opened.next(at, src).await? {
                None => return Ok(()),
                Some(Ahead::Open(f, meta)) => (f, meta),
                Some(Ahead::Unchanged(stat)) => {
                    match base.and_then(|b| b.take_over(src, stat, clock_ns)) {
                        Some(taken) => return self.take_over(at, taken),
                        // Held by the same rule on the same files: never.
                        None => {
                            return Err(BackupError::Unsound(format!(
                                "{} was found unchanged, then not",
                                src.rel
                            )));
                        }
                    }
                }
            };
            // fstat before the first read: the content read holds every write before it.
            let stat = crate::basebackup::reuse::file_stat(&meta);
            if let Some(taken) = base.and_then(|b| b.take_over(src, stat, clock_ns)) {
                return self.take_over(at, taken);
            }
            (Body::File(f, meta.len()), Some(stat))
        };
        self.listing.file_at(at, stat)?;
        let entry = at;
        let check = self
            .page_check
            .and_then(|c| Some((RelationFile::parse(src.rel)?, c)));
        let small = SMALL_FILE.min(self.chunk_size as u64 / 4);
        let size = match file {
            Body::File(f, len) if (1..=small).contains(&len) => {
                self.read_small(f, len, entry, roots, check).await?
            }
            file => self.read_chunks(file, entry, roots, check).await?,
        };
        self.listing.set_size(entry, size)?;
        self.stats.files += 1;
        self.stats.logical_bytes += size;
        Ok(())
    }

    /// Count a file taken over unread, its chunks stored once whichever file names them.
    fn take_over(&mut self, at: ItemNo, taken: TakenOver) -> Result<(), BackupError> {
        self.listing.taken_at(at, taken.at)?;
        let files = Arc::clone(self.listing.prior_files().expect("taken_at checked it"));
        let (size, lens) = (files.size(taken.at), files.stored_of(taken.at).unwrap_or(&[]));
        let mut seen = self.chunks.seen.lock().expect("never poisoned");
        for (id, &len) in files.chunks(taken.at).zip(lens) {
            if seen.insert(*id.hash()) {
                self.stats.stored_bytes += u64::from(len);
                self.listing.note_len(id, u64::from(len));
            }
        }
        drop(seen);
        self.stats.files += 1;
        self.stats.chunks += lens.len() as u64;
        self.stats.logical_bytes += size;
        self.stats.reused_files += 1;
        self.stats.reused_bytes += size;
        Ok(())
    }

    /// Read `body` (entry `entry`'s file, under `roots`) chunk by chunk, each chunk handed to a task
    /// that stores it, in order; returns the bytes read. Up to `parallel` chunks of a file are
    /// read at once ([`Reads`]). With `check`, the pages of the relation file are verified.
    async fn read_chunks(
        &mut self,
        body: Body,
        entry: usize,
        roots: &Roots,
        check: Option<(RelationFile, PageCheck)>,
    ) -> Result<u64, BackupError> {
        let chunk_size = self.chunk_size;
        let mut reads = Reads::new(body, chunk_size, self.parallel, check);
        let mut size = 0u64;
        let path: Arc<str> = Arc::from(self.listing.path(entry));
        for idx in 0.. {
            let next = reads.next(&self.in_memory, &self.chunks.buffers).await;
            let (buf, permit, checked) = next.map_err(|source| BackupError::Read {
                path: roots.path(&path).display().to_string(),
                source,
            })?;
            if let (Some(checked), Some((file, _))) = (checked, &check) {
                self.pages.add(&path, file, checked);
            }
            let read = buf.len();
            if read == 0 {
                break;
            }
            size += read as u64;
            self.stats.chunks += 1;
            let base = self.chunks.base_of(&path, idx);
            let place = self.listing.next_place(entry, idx)?;
            self.spawn_chunk(place, buf, permit, base)?;
            if read < chunk_size {
                break;
            }
        }
        reads.finish().await;
        Ok(size)
    }

    /// Read small file `f` (`len` bytes when opened, and no more: as `pg_basebackup` sends a
    /// file that grows while it is read) into the shared chunk being filled, which is closed
    /// first when the file would not fit in it; returns the bytes read. With `check`, the pages
    /// of the relation file are verified.
    async fn read_small(
        &mut self,
        f: std::fs::File,
        len: u64,
        entry: usize,
        roots: &Roots,
        check: Option<(RelationFile, PageCheck)>,
    ) -> Result<u64, BackupError> {
        let target = SHARED_TARGET.min(self.chunk_size);
        // A shared chunk holds the files of one directory: the same catalogs in two databases
        // then make the same chunks, stored once.
        let other_dir =
            self.shared.members.first().is_some_and(|&(first, _)| {
                parent(self.listing.path(first)) != parent(self.listing.path(entry))
            });
        if other_dir || self.shared.buf.len() + len as usize > target {
            self.close_shared().await?;
        }
        let (read, checked) = tokio::task::spawn_blocking(move || {
            let body = Body::File(f, len);
            let mut buf = Vec::new();
            let read = body.read_at(&mut buf, 0, len as usize);
            let checked = match (&read, check) {
                (Ok(()), Some((file, check))) => {
                    Some(pages::check_read(&buf, 0, &file, check, |at, page| {
                        body.read_at(page, at, pages::PAGE)
                    }))
                }
                _ => None,
            };
            (read.map(|()| buf), checked)
        })
        .await
        .expect("read task panicked");
        let bytes = read.map_err(|source| BackupError::Read {
            path: roots.path(self.listing.path(entry)).display().to_string(),
            source,
        })?;
        if let (Some(checked), Some((file, _))) = (checked, &check) {
            self.pages.add(self.listing.path(entry), file, checked);
        }
        if bytes.is_empty() {
            return Ok(0);
        }
        if self.shared.buf.capacity() == 0 {
            self.shared.buf = self.chunks.buffers.take(target);
        }
        let place = match self.shared.place {
            Some(place) => place,
            None => *self.shared.place.insert(self.listing.shared_place()?),
        };
        self.listing.share(entry, place)?;
        let at = self.shared.buf.len() as u64;
        self.shared.buf.extend_from_slice(&bytes);
        self.shared.members.push((entry, at));
        self.stats.chunks += 1;
        let fill = self.shared.buf.len();
        if fill >= target || (fill >= target / SHARED_MIN_DIVISOR && ends_shared(self.listing.path(entry))) {
            self.close_shared().await?;
        }
        Ok(bytes.len() as u64)
    }

    /// Hand the shared chunk being filled, if any, to the pipeline.
    async fn close_shared(&mut self) -> Result<(), BackupError> {
        let SharedChunk { buf, place, members } = std::mem::take(&mut self.shared);
        let Some(place) = place.filter(|_| !members.is_empty()) else {
            return Ok(());
        };
        let permit = Arc::clone(&self.in_memory)
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        self.sharing.insert(place, (members, buf.len() as u64));
        self.spawn_chunk(place, buf, permit, None)
    }

    /// Hand the chunk at `place` to a task that stores it (as a difference from `base` when
    /// that pays), and count the chunks finished meanwhile.
    fn spawn_chunk(
        &mut self,
        place: Place,
        buf: Vec<u8>,
        permit: OwnedSemaphorePermit,
        base: Option<BaseRef>,
    ) -> Result<(), BackupError> {
        let chunks = Arc::clone(&self.chunks);
        self.tasks.spawn(async move {
            let (hash, stored, delta) = chunks.store(buf, permit, base).await?;
            Ok(ChunkDone {
                place,
                hash,
                stored,
                delta,
            })
        });
        while let Some(done) = self.tasks.try_join_next() {
            self.absorb(done.expect("chunk task panicked")?)?;
        }
        Ok(())
    }

    /// Start a file whose bytes arrive from a stream (a `BASE_BACKUP` tar member) rather than
    /// from disk: it is chunked as they come ([`Copier::stream`]). A file streamed has no
    /// `stat`: the next backup from disk reads it.
    pub(super) fn begin_streamed(&mut self, entry: Entry) -> Result<Streamed, BackupError> {
        Ok(Streamed {
            entry: self.listing.push_entry(&entry)?,
            next_idx: 0,
            buf: self.chunks.buffers.take(self.chunk_size),
            size: 0,
        })
    }

    /// A directory of a streamed backup.
    pub(super) fn add_dir(&mut self, entry: Entry) -> Result<(), BackupError> {
        self.listing.push_entry(&entry).map(drop)
    }

    /// More bytes of `file`: each full chunk goes to the pipeline, waiting for room in memory.
    pub(super) async fn stream(&mut self, file: &mut Streamed, mut data: &[u8]) -> Result<(), BackupError> {
        while !data.is_empty() {
            let n = (self.chunk_size - file.buf.len()).min(data.len());
            file.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if file.buf.len() == self.chunk_size {
                let next = self.chunks.buffers.take(self.chunk_size);
                let full = std::mem::replace(&mut file.buf, next);
                self.hand_off(file, full).await?;
            }
        }
        Ok(())
    }

    /// The end of `file`: its last, short chunk to the pipeline.
    pub(super) async fn end_streamed(&mut self, mut file: Streamed) -> Result<(), BackupError> {
        let last = std::mem::take(&mut file.buf);
        if last.is_empty() {
            self.chunks.buffers.give(last);
        } else {
            self.hand_off(&mut file, last).await?;
        }
        self.listing.set_size(file.entry, file.size)?;
        self.stats.files += 1;
        self.stats.logical_bytes += file.size;
        Ok(())
    }

    /// The stored length of chunk `id` when the previous backup holds it and says how long it
    /// is: such a chunk can be named again without its bytes ([`Copier::reuse_chunk`]).
    pub(super) fn known_len(&self, id: &ChunkId) -> Option<u64> {
        self.chunks.known.get(id.hash()).copied().flatten()
    }

    /// The next chunk of `file` is `id` (`len` bytes, stored as `stored_len`), which the
    /// previous backup holds: named, never read nor stored again. Only at a chunk boundary.
    pub(super) fn reuse_chunk(
        &mut self,
        file: &mut Streamed,
        id: ChunkId,
        len: u64,
        stored_len: u64,
    ) -> Result<(), BackupError> {
        debug_assert!(file.buf.is_empty(), "a chunk is reused only at a chunk boundary");
        if self
            .chunks
            .seen
            .lock()
            .expect("never poisoned")
            .insert(*id.hash())
        {
            self.stats.stored_bytes += stored_len;
            self.listing.note_len(&id, stored_len);
        }
        let place = self.listing.next_place(file.entry, file.next_idx)?;
        self.listing.fill(place, id, None);
        file.next_idx += 1;
        file.size += len;
        self.stats.chunks += 1;
        Ok(())
    }

    /// `bytes` of a file came from the previous backup rather than the server (an increment).
    pub(super) fn count_reused(&mut self, bytes: u64) {
        self.stats.reused_bytes += bytes;
    }

    async fn hand_off(&mut self, file: &mut Streamed, buf: Vec<u8>) -> Result<(), BackupError> {
        let permit = Arc::clone(&self.in_memory)
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        file.size += buf.len() as u64;
        let place = self.listing.next_place(file.entry, file.next_idx)?;
        file.next_idx += 1;
        self.stats.chunks += 1;
        self.spawn_chunk(place, buf, permit, None)
    }

    /// Count a chunk the pipeline finished, and put its id in its place.
    fn absorb(&mut self, done: ChunkDone) -> Result<(), BackupError> {
        let id = ChunkId::from_hash(done.hash);
        let mut stored = None;
        if let Some((stored_len, uploaded)) = done.stored {
            // Each distinct chunk reaches here once (see `seen`).
            self.stats.stored_bytes += stored_len;
            if uploaded {
                self.stats.new_chunks += 1;
                self.stats.new_bytes += stored_len;
            }
            stored = Some(stored_len);
        }
        self.listing.fill(done.place, id, stored);
        if let Some(d) = done.delta {
            self.deltas.insert(done.hash, d);
        }
        if let Some((members, of)) = self.sharing.remove(&done.place)
            && members.len() > 1
        {
            // A shared chunk: the only chunk of each of its files. One file alone in it is
            // simply that file's chunk.
            for &(entry, at) in &members {
                self.listing.set_within(entry, Within { at, of })?;
            }
        }
        Ok(())
    }

    /// Wait for the last chunks and write the last pack: what was copied, with `tablespaces`,
    /// on top of `previous`, every file examined after `examined_after_ns`.
    pub(super) async fn into_copied(
        mut self,
        tablespaces: Vec<Tablespace>,
        previous: Option<&Previous>,
        examined_after_ns: i64,
    ) -> Result<Copied, BackupError> {
        self.close_shared().await?;
        let checking = self.page_check.is_some();
        while let Some(done) = self.tasks.join_next().await {
            self.absorb(done.expect("chunk task panicked")?)?;
        }
        let written = self.chunks.packs.finish().await?;
        let Copier {
            mut listing,
            stats,
            pages: mut tally,
            deltas: new_deltas,
            ..
        } = self;
        listing.seal()?;
        if let (true, Some(p)) = (checking, previous) {
            let taken: HashSet<&str> = listing.taken_paths().collect();
            tally.carry(&p.frame, &taken);
        }
        let deltas = deltas_named(listing.chunk_ids(), &written, new_deltas, previous);
        let packs = packs_named(
            written,
            previous.map_or(&[][..], |p| &p.frame.packs),
            listing.chunk_ids(),
            &deltas,
        );
        Ok(Copied {
            listing,
            tablespaces,
            stats,
            examined_after_us: examined_after_ns / 1000,
            packs,
            pages: checking.then_some(tally),
            deltas,
        })
    }
}

/// What the chunk tasks share: where chunks go and what is known of them.
struct Chunks {
    store: WritableStore,
    sealer: Sealer,
    /// Hashing and compressing at once: `parallel` permits.
    cpu: Semaphore,
    /// Every chunk met in this backup so far, stored or taken over.
    seen: Mutex<HashSet<[u8; 32]>>,
    /// The chunks the previous backup names, with their stored lengths when recorded.
    known: HashMap<[u8; 32], Option<u64>>,
    /// The previous backup's chunks a new chunk may be stored as a difference from.
    bases: Option<DeltaBases>,
    /// The differences this backup stored.
    xors: Mutex<HashSet<[u8; 32]>>,
    buffers: Arc<Buffers>,
    level: i32,
    packs: Packs,
}

/// What the blocking half of [`Chunks::store`] found.
enum Step {
    Met,
    Known(u64),
    /// New, not sealed: it may be stored as a difference (`ask`: as for [`Step::Sealed`]).
    Fresh {
        ask: bool,
    },
    /// Sealed; `ask`: look it up before packing it (the previous backup names it without its
    /// stored length, so it may be a chunk stored on its own).
    Sealed {
        sealed: Result<Bytes, ChunkError>,
        ask: bool,
    },
}

/// What a backup keeps of a chunk it stores: its hash, and for the first time its bytes are
/// met, its stored length and whether this backup stored it; and when it is stored as a
/// difference, its base and difference.
type Kept = ([u8; 32], Option<(u64, bool)>, Option<(ChunkId, ChunkId)>);

impl Chunks {
    /// The chunk piece `idx` of the file at `path` may be stored as a difference from.
    fn base_of(&self, path: &Arc<str>, idx: usize) -> Option<BaseRef> {
        self.bases.as_ref()?.base_of(path, idx)
    }

    /// Hash one chunk and store it unless this backup met the same bytes already (`seen`) or
    /// the previous backup holds them (`known`); a new chunk with a `base` (the previous
    /// backup's at the same place) is stored as its difference from it when few of its bytes
    /// differ. Hashing and compressing run on blocking threads, at most `cpu`'s permits at
    /// once. `held`, the chunk's share of the read-ahead, is given back once the chunk is in a
    /// pack, or its full pack is written: what waits on the store is packs, not read buffers.
    async fn store(
        self: Arc<Self>,
        data: Vec<u8>,
        held: tokio::sync::OwnedSemaphorePermit,
        base: Option<BaseRef>,
    ) -> Result<Kept, BackupError> {
        let permit = self.cpu.acquire().await.expect("semaphore is never closed");
        // Hash, and seal in the same blocking call (one hop per chunk).
        let (hash, step, data) = tokio::task::spawn_blocking({
            let this = Arc::clone(&self);
            let from = base.as_ref().map(|b| b.id);
            move || this.hash_and_seal(data, from)
        })
        .await
        .map_err(blocking_err)?;
        drop(permit);
        if let (Step::Met | Step::Known(_), Some(b), Some(bases)) = (&step, &base, &self.bases) {
            bases.forget(b);
        }
        let (sealed, ask) = match step {
            Step::Met => {
                self.buffers.give(data);
                return Ok((hash, None, None));
            }
            Step::Known(len) => {
                self.buffers.give(data);
                return Ok((hash, Some((len, false)), None));
            }
            Step::Sealed { sealed, ask } => {
                self.buffers.give(data);
                (Sealed::Whole(sealed), ask)
            }
            Step::Fresh { ask } => {
                if ask && let Some(len) = chunk::stored_len(&self.store, &ChunkId::from_hash(hash)).await? {
                    self.buffers.give(data);
                    return Ok((hash, Some((len, false)), None));
                }
                let base = base.as_ref().expect("a fresh chunk has a base");
                (self.seal_against(hash, data, base).await?, false)
            }
        };
        let id = ChunkId::from_hash(hash);
        if ask && let Some(len) = chunk::stored_len(&self.store, &id).await? {
            return Ok((hash, Some((len, false)), None));
        }
        match sealed {
            Sealed::Whole(sealed) => {
                let sealed = sealed?;
                let len = sealed.len() as u64;
                self.packs.add(id, sealed).await?;
                drop(held);
                Ok((hash, Some((len, true)), None))
            }
            Sealed::Delta { xor, sealed } => {
                let (len, uploaded) = match sealed {
                    Some(sealed) => {
                        let sealed = sealed?;
                        let len = sealed.len() as u64;
                        self.packs.add(xor, sealed).await?;
                        (len, true)
                    }
                    // Counted where it was stored.
                    None => (0, false),
                };
                drop(held);
                Ok((
                    hash,
                    Some((len, uploaded)),
                    Some((base.expect("a delta has a base").id, xor)),
                ))
            }
        }
    }

    /// The blocking half: hash `data`, and seal it when it is new (unless it may be stored as a
    /// difference from `base`: [`Step::Fresh`]). Hands `data` back (for [`Buffers`]).
    fn hash_and_seal(&self, data: Vec<u8>, base: Option<ChunkId>) -> ([u8; 32], Step, Vec<u8>) {
        let hash = self.sealer.content_hash(&data);
        // The same bytes twice in one backup (zeroed pages, identical files): stored once.
        if !self.seen.lock().expect("never poisoned").insert(hash) {
            return (hash, Step::Met, data);
        }
        let ask = match self.known.get(&hash) {
            // The previous backup holds it, and the backup lock keeps it there.
            Some(Some(len)) => return (hash, Step::Known(*len), data),
            Some(None) => true,
            None => false,
        };
        if base.is_some_and(|b| *b.hash() != hash) {
            return (hash, Step::Fresh { ask }, data);
        }
        let sealed = chunk::seal_chunk(&self.sealer, hash, &data, self.level);
        (hash, Step::Sealed { sealed, ask }, data)
    }

    /// New chunk `data` (hash `hash`) sealed as its difference from chunk `base` when at most
    /// one byte in [`DELTA_MAX_CHANGED_DIVISOR`] differs, else whole. A base that cannot be
    /// read (gone, damaged) only costs the difference: the chunk is stored whole.
    async fn seal_against(
        self: &Arc<Self>,
        hash: [u8; 32],
        data: Vec<u8>,
        base: &BaseRef,
    ) -> Result<Sealed, BackupError> {
        let bases = self
            .bases
            .as_ref()
            .expect("a base comes from the previous backup");
        let base_bytes = bases.read(&self.sealer, base).await;
        let _cpu = self.cpu.acquire().await.expect("semaphore is never closed");
        let this = Arc::clone(self);
        let (sealed, data) = tokio::task::spawn_blocking(move || {
            let sealed = seal_delta(&this.sealer, this.level, &this.xors, hash, &data, base_bytes);
            (sealed, data)
        })
        .await
        .map_err(blocking_err)?;
        self.buffers.give(data);
        Ok(sealed)
    }
}

/// The packs of a backup: the one being filled, and those written.
struct Packs {
    store: WritableStore,
    building: Mutex<PackBuilder>,
    /// Packs being written at once.
    slots: Semaphore,
    written: Mutex<Vec<PackRecord>>,
}

impl Packs {
    /// Append sealed chunk `id` to the pack being filled; when that fills it, write the pack
    /// before returning.
    async fn add(&self, id: ChunkId, sealed: Bytes) -> Result<(), BackupError> {
        let full = {
            let mut building = self.building.lock().expect("never poisoned");
            if !building.add(id, &sealed) {
                return Ok(());
            }
            std::mem::take(&mut *building)
        };
        self.write(full).await
    }

    /// Write the last pack, and hand over the records of all.
    async fn finish(&self) -> Result<Vec<PackRecord>, BackupError> {
        let last = std::mem::take(&mut *self.building.lock().expect("never poisoned"));
        if !last.is_empty() {
            self.write(last).await?;
        }
        Ok(std::mem::take(&mut *self.written.lock().expect("never poisoned")))
    }

    async fn write(&self, pack: PackBuilder) -> Result<(), BackupError> {
        let _slot = self.slots.acquire().await.expect("semaphore is never closed");
        // Hashing a pack's few MiB is CPU work: off the runtime's threads.
        let (bytes, record) = tokio::task::spawn_blocking(move || pack.seal())
            .await
            .map_err(blocking_err)?;
        // Named by its hash: writing the same pack twice stores the same bytes.
        self.store
            .put(&pack_key(&record.id), bytes)
            .await
            .map_err(ChunkError::from)?;
        tracing::debug!(pack = %record.id, chunks = record.chunks.len(), "pack written");
        self.written.lock().expect("never poisoned").push(record);
        Ok(())
    }
}

const _: () = assert!(PACK_TARGET <= 64 << 20, "packs are held in memory");

fn blocking_err(e: tokio::task::JoinError) -> ChunkError {
    ChunkError::Compress(std::io::Error::other(e))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::walk::{Source, Walk};
    use super::*;
    use crate::basebackup::chunk::read_chunk;
    use crate::basebackup::pack::Places;
    use crate::repo::fault::{Fault, FaultStore};

    fn store() -> WritableStore {
        let faults = Arc::new(FaultStore::new(Fault::None));
        FaultStore::s3_like(&faults, std::time::Duration::from_secs(5))
    }

    /// Bytes of a file, distinct per seed.
    fn content(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    /// Back up `files` (path, content) as a data directory would be walked, and read every
    /// file back from the repository as a restore does: from its chunks, or its slice of the
    /// chunk it shares.
    async fn backed_up(files: &[(&str, Vec<u8>)]) -> (Vec<Entry>, Vec<(String, Vec<u8>)>) {
        let dir = tempfile::tempdir().unwrap();
        let mut sources = vec![];
        for (rel, bytes) in files {
            let abs = dir.path().join(rel);
            std::fs::create_dir_all(abs.parent().unwrap()).unwrap();
            std::fs::write(&abs, bytes).unwrap();
            sources.push(Source {
                rel: rel.to_string(),
                is_dir: false,
                mode: 0o600,
            });
        }
        let store = store();
        let opts = CopyOptions {
            chunk_size: 1 << 20,
            parallel: 2,
            level: 3,
            pg_version: 17,
            pages: None,
        };
        let inventory = Inventory {
            sources: Arc::new(Walk::of(sources).unwrap()),
            tablespaces: vec![],
            roots: Roots::of(dir.path()),
            examined_after_ns: 0,
        };
        let copied = copy_files(&store, &Sealer::plain(), inventory, opts, None)
            .await
            .unwrap();
        let places = Places::of(&copied.packs);
        let (entries, _) = copied.listing.lists();
        let mut read = vec![];
        for e in &entries {
            let mut bytes = vec![];
            for (idx, id) in e.chunks.iter().enumerate() {
                let chunk = read_chunk(&store.reader(), &Sealer::plain(), &places, id)
                    .await
                    .unwrap();
                assert_eq!(chunk.len() as u64, e.chunk_len(idx, 1 << 20));
                match e.within {
                    Some(w) => bytes.extend_from_slice(&chunk[w.at as usize..(w.at + e.size) as usize]),
                    None => bytes.extend_from_slice(&chunk),
                }
            }
            read.push((e.path.clone(), bytes));
        }
        (entries, read)
    }

    #[tokio::test]
    async fn small_files_of_a_directory_share_a_chunk_and_each_reads_back_as_it_was() {
        let files = [
            ("base/1/100", content(5000, 1)),
            ("base/1/101", content(3000, 2)),
            ("base/1/102", content(SMALL_FILE as usize + 1, 3)),
            ("base/1/103", vec![]),
            ("base/1/104", content(8192, 4)),
            ("base/2/100", content(5000, 1)),
        ];
        let (entries, read) = backed_up(&files).await;
        for ((path, want), (got_path, got)) in files.iter().zip(&read) {
            assert_eq!(
                (*path, want),
                (got_path.as_str(), got),
                "{path} reads back as it was"
            );
        }
        let by = |p: &str| entries.iter().find(|e| e.path == p).unwrap();
        // The small files of base/1 share one chunk, one after the other; the large file and the
        // empty one are on their own.
        let shared = by("base/1/100").chunks[0];
        assert_eq!(by("base/1/100").within, Some(Within { at: 0, of: 16192 }));
        assert_eq!(by("base/1/101").within, Some(Within { at: 5000, of: 16192 }));
        assert_eq!(by("base/1/104").within, Some(Within { at: 8000, of: 16192 }));
        assert!(
            ["base/1/101", "base/1/104"]
                .iter()
                .all(|p| by(p).chunks == [shared])
        );
        assert_eq!(
            (by("base/1/102").within, by("base/1/102").chunks.len()),
            (None, 1)
        );
        assert!(by("base/1/103").chunks.is_empty());
        // Alone in its directory, a small file is its own chunk: the same bytes as any file
        // with that content.
        assert_eq!(by("base/2/100").within, None);
        assert_eq!(
            by("base/2/100").chunks[0],
            ChunkId::from_hash(*blake3::hash(&files[0].1).as_bytes())
        );
    }

    #[tokio::test]
    async fn a_shared_chunk_ends_at_its_target_and_a_file_never_straddles_two() {
        // 300 files of 5,000 bytes: 1.5 MB, more than one shared chunk holds.
        let names: Vec<String> = (0..300).map(|i| format!("base/5/{}", 20000 + i)).collect();
        let files: Vec<(&str, Vec<u8>)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), content(5000, i as u8)))
            .collect();
        let (entries, read) = backed_up(&files).await;
        for ((path, want), (_, got)) in files.iter().zip(&read) {
            assert_eq!(want, got, "{path} reads back as it was");
        }
        let chunks: std::collections::HashSet<ChunkId> = entries.iter().map(|e| e.chunks[0]).collect();
        assert!(
            chunks.len() >= 2,
            "1.5 MB of small files make more than one shared chunk"
        );
        for e in &entries {
            let w = e.within.expect("every file shares its chunk");
            assert!(w.of as usize <= SHARED_TARGET && w.at + e.size <= w.of, "{e:?}");
        }
    }
}
