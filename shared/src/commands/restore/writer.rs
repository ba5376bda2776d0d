//! Write a restore's files: each file from one descriptor, fed by a pipeline of fetched and
//! verified chunks.
//!
//! The chunks of all files are read in the packs' order, or the files' ([`super::order`]), with
//! one ranged read per run of neighbours in a pack, at most [`held`] reads and [`SEALED_AHEAD`]
//! sealed bytes at once: what waits on the network is compressed bytes, so a few megabytes keep
//! it busy. They are decompressed and verified in that order, at most one per CPU at once, at
//! most [`plain_ahead`] ahead of the files (see [`Pipeline::run`]; each stage's waits are
//! reported: [`Waits`]). Each file is created (or, for `--delta`, opened without following a
//! link), each chunk written at its offset, its
//! mode set and made durable by a thread of its own, up to [`OPEN_FILES`] files at once: one
//! file's `fsync` overlaps the next files' fetches and writes, and no two threads ever write
//! into the same file (they would queue on its inode lock). A file is opened once, not once to
//! create, once to write and once to sync. A large file is written past the page cache
//! (`O_DIRECT`, [`super::direct`]), pieces already waiting that follow each other with one call
//! of up to [`WRITE_RUN`] bytes; where the file system refuses that, every [`FLUSH_AFTER`] bytes
//! a large file asks the kernel to start writing back what it holds, as PostgreSQL's
//! `pg_flush_data` does, so that the disk works while the restore decompresses and the final
//! `fsync` finds little left to write.
//!
//! A chunk referenced more than once (zeroed pages, the catalogs `template0`, `template1` and
//! `postgres` share, a file copied twice) is fetched once and kept in memory for its later
//! references while they fit in [`REPEAT_BUDGET`]; one that does not fit is fetched again at
//! each reference. Which reference fetches and which reuses is decided before the first fetch
//! ([`sources`]), so the pipeline never waits on a decision.
//!
//! Packed chunks that follow each other in a pack are read together, with one ranged read per
//! run ([`run_end`]), a whole pack at low parallelism ([`run_bytes`]): a cluster of many small
//! files restores with a read per few hundred of them, not one each.
//!
//! Also here: a file and its chunk references added to the fill ([`add_file`]), and chunks read
//! and verified ([`Fetcher`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::task::JoinSet;

use super::direct::{Sink, create_new};
pub(crate) use super::direct::{open_for_write, open_nofollow};
pub(crate) use super::order::ChunkRef;
use super::order::in_pack_order;
use super::waits::{WaitClock, Waits};
use super::{Progress, RestoreError, SyncMethod, write_err};
use crate::basebackup::chunk::{Chunk, ChunkError, ChunkId, MisnamedChunk};
use crate::basebackup::manifest::Entry;
use crate::basebackup::pack::{Place, Places};
use crate::repo::Store;
use crate::repo::layout::pack_key;
use crate::repo::object::{ObjectError, Sealer};
use crate::repo::stored::{self, Damage, StoredKind};

/// Reads in flight at least: reads waiting on the store take no CPU, so they overlap the
/// decompressions. Measured on this 2-core machine with `--parallel 2`
/// (bench/rivals.py, pgbench scale 50): with only 2 in flight a restore took 2.9 s from file://
/// and 17 s from Garage through TLS, latency-bound.
pub const WAITING_IN_FLIGHT: usize = 16;

/// Files being written, set and synced at once, each by a blocking thread. Most of a small
/// file's time is its `fsync` (a journal commit), which several files share when they wait
/// together. With 16, a restore of pgbench scale 50 (1,020 files) from Garage took 1.76 s and
/// its files waited for a writer most of that time; with 64, 0.70 to 0.94 s (128: no faster,
/// more memory).
pub const OPEN_FILES: usize = 64;

/// Bytes of a large file after which its writeback is started (`posix_fadvise(DONTNEED)` over
/// what was written: the kernel begins writing those pages out and keeps none it need not).
pub const FLUSH_AFTER: u64 = 8 << 20;

/// Bytes a file's writer writes with one call at most, of pieces already waiting that follow
/// each other: the disk of this machine takes 4 MiB direct writes at 1.7–1.8 GB/s and 1 MiB ones
/// at 1.4–1.5 (`dd oflag=direct`, 4 GiB).
pub const WRITE_RUN: u64 = 4 << 20;

/// Bytes of chunks kept in memory for a later reference to the same chunk.
pub const REPEAT_BUDGET: u64 = 8 << 20;

/// One file a restore writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub path: PathBuf,
    /// The mode the file ends with (set before it is synced).
    pub mode: u32,
    /// Its size once written.
    pub size: u64,
    /// Create it (it must not exist: never follows or replaces anything); otherwise it exists
    /// at its size and is opened without following a link (`--delta`).
    pub create: bool,
}

/// The files a restore writes and the chunk references to write into them.
#[derive(Debug, Default)]
pub(crate) struct Fill {
    pub files: Vec<Target>,
    /// In file order, and within a file in chunk order (as [`add_file`] adds them).
    pub refs: Vec<ChunkRef>,
    /// The file written after every other one is durable: `global/pg_control`. Until it lands
    /// the directory cannot be started, so a restore that fails half-way never looks like a
    /// cluster.
    pub last: Option<usize>,
    /// The data directory and every tablespace directory: with `--sync-method syncfs`, their
    /// file systems are synced even when no file is written (a `--delta` that only removed).
    pub roots: Vec<PathBuf>,
}

/// What writing did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Scattered {
    /// Chunks fetched from the store (each distinct chunk once, unless it did not fit in
    /// [`REPEAT_BUDGET`] between two of its references).
    pub chunks_fetched: u64,
    /// Their bytes, decompressed.
    pub bytes_fetched: u64,
    /// Bytes written into files.
    pub bytes_written: u64,
    /// Where the pipeline waited.
    pub waits: Waits,
}

impl Scattered {
    fn add(&mut self, o: Scattered) {
        self.chunks_fetched += o.chunks_fetched;
        self.bytes_fetched += o.bytes_fetched;
        self.bytes_written += o.bytes_written;
        self.waits.add(o.waits);
    }
}

/// References in write order, each with where its bytes come from.
type Planned = Vec<(ChunkRef, Source)>;

/// Where a reference's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Fetched from the store; `keep`: kept for a later reference.
    Fetch { keep: bool },
    /// The bytes an earlier reference fetched and kept; `last`: no later reference needs them.
    Kept { last: bool },
}

/// The same id with two lengths is a contradiction no honest manifest holds (the id names the
/// content, so its length): refused before anything is fetched or written.
fn lengths_agree(refs: &[ChunkRef], files: &[Target]) -> Result<(), RestoreError> {
    let mut len_of: HashMap<&ChunkId, u64> = HashMap::new();
    for r in refs {
        let len = *len_of.entry(&r.id).or_insert(r.len);
        if len != r.len {
            let at = files
                .get(r.file)
                .map(|f| f.path.display().to_string())
                .unwrap_or_default();
            return Err(RestoreError::Corrupt(format!(
                "chunk {} is referenced as {len} bytes and as {} bytes (at chunk {} of {at})",
                r.id, r.len, r.index
            )));
        }
    }
    Ok(())
}

/// Decide, for each reference in order, whether it fetches or reuses what an earlier one kept,
/// keeping at most `budget` bytes at any time.
pub(crate) fn sources(refs: &[ChunkRef], budget: u64) -> Vec<Source> {
    let mut left: HashMap<&ChunkId, usize> = HashMap::new();
    for r in refs {
        *left.entry(&r.id).or_default() += 1;
    }
    let mut kept: HashMap<&ChunkId, u64> = HashMap::new();
    let mut kept_bytes = 0u64;
    let mut out = Vec::with_capacity(refs.len());
    for r in refs {
        let later = left.get_mut(&r.id).expect("counted above");
        *later -= 1;
        let later = *later;
        if kept.contains_key(&r.id) {
            if later == 0 {
                kept_bytes -= kept.remove(&r.id).expect("present");
            }
            out.push(Source::Kept { last: later == 0 });
        } else {
            let keep = later > 0 && kept_bytes + r.len <= budget;
            if keep {
                kept.insert(&r.id, r.len);
                kept_bytes += r.len;
            }
            out.push(Source::Fetch { keep });
        }
    }
    out
}

/// Write every reference of `fill` into its files (see the module's description), set each
/// file's mode and make it durable (`sync`); then run `before_last`; then the `last` file, synced.
pub(crate) async fn fill(
    (store, sealer, places): (&Store, &Sealer, Arc<Places>),
    fill: Fill,
    chunk_size: u64,
    (parallel, sync): (usize, SyncMethod),
    before_last: impl FnOnce() -> Result<(), RestoreError>,
    progress: Arc<dyn Progress>,
) -> Result<Scattered, RestoreError> {
    let Fill {
        files,
        refs,
        last,
        roots,
    } = fill;
    let (early, late) = split_last(refs, &files, last, &places)?;
    // syncfs reports the write-back errors of its file system since the descriptor it is given
    // was opened: open the roots before the first write.
    let roots = match sync {
        SyncMethod::Syncfs => Some(open_roots(&roots, &files, last)?),
        SyncMethod::Fsync => None,
    };
    let files = Arc::new(files);
    let skip_last = |i: usize| Some(i) != last;
    let pipeline = Pipeline {
        store,
        sealer,
        places,
        files: Arc::clone(&files),
        chunk_size,
        parallel: parallel.max(1),
        fsync: sync == SyncMethod::Fsync,
        progress: Arc::clone(&progress),
    };
    let mut done = pipeline
        .run((0..files.len()).filter(|&i| skip_last(i)).collect(), early)
        .await?;
    if let Some(roots) = roots {
        tokio::task::spawn_blocking(move || syncfs_each(&roots))
            .await
            .expect("sync task panicked")?;
    }
    before_last()?;
    if let Some(last) = last {
        // Kept bytes are not carried over: the last file fetches what it needs.
        let late = late
            .into_iter()
            .map(|r| (r, Source::Fetch { keep: false }))
            .collect();
        let pipeline = Pipeline {
            parallel: 1,
            fsync: true,
            ..pipeline
        };
        done.add(pipeline.run(vec![last], late).await?);
    }
    Ok(done)
}

/// Sort `refs` into file and chunk order and split off those of the `last` file; plan the
/// others' sources. The plan covers only what is written before the last file: a chunk the last
/// file shares with a later one must not count as fetched (and kept) by the last file, which is
/// written after them. A contradiction anywhere, the last file's references included, is refused
/// up front.
fn split_last(
    mut refs: Vec<ChunkRef>,
    files: &[Target],
    last: Option<usize>,
    places: &Places,
) -> Result<(Planned, Vec<ChunkRef>), RestoreError> {
    refs.sort_by_key(|r| (r.file, r.index));
    lengths_agree(&refs, files)?;
    let (late, early): (Vec<ChunkRef>, Vec<ChunkRef>) = refs.into_iter().partition(|r| Some(r.file) == last);
    let early = in_pack_order(early, places, OPEN_FILES / 2);
    let plan = sources(&early, REPEAT_BUDGET);
    Ok((early.into_iter().zip(plan).collect(), late))
}

/// The directories whose file systems a `syncfs` must cover: `roots` and the directory of each
/// file, opened now, one per device.
fn open_roots(
    roots: &[PathBuf],
    files: &[Target],
    last: Option<usize>,
) -> Result<Vec<(PathBuf, std::fs::File)>, RestoreError> {
    use std::os::unix::fs::MetadataExt;
    let mut dirs: std::collections::BTreeSet<&Path> = roots.iter().map(PathBuf::as_path).collect();
    for (i, f) in files.iter().enumerate() {
        if Some(i) != last {
            dirs.extend(f.path.parent());
        }
    }
    let mut devices = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for dir in dirs {
        let d = std::fs::File::open(dir).map_err(write_err(dir))?;
        if devices.insert(d.metadata().map_err(write_err(dir))?.dev()) {
            out.push((dir.to_path_buf(), d));
        }
    }
    Ok(out)
}

/// `syncfs` each file system once: every byte and name written there since its descriptor was
/// opened is durable when this returns, whatever the number of files.
fn syncfs_each(roots: &[(PathBuf, std::fs::File)]) -> Result<(), RestoreError> {
    for (dir, d) in roots {
        rustix::fs::syncfs(d).map_err(|e| write_err(dir)(e.into()))?;
    }
    Ok(())
}

/// One chunk's bytes on their way to a file, holding their share of the memory bound.
struct Piece {
    offset: u64,
    data: Arc<Vec<u8>>,
    _held: Option<OwnedSemaphorePermit>,
}

/// Buffers of whole chunks, given back by the writers once written and taken again by the
/// decoder: a restore decompresses into a few allocations instead of faulting in fresh pages for
/// every chunk (a fifth of its CPU time before). Only chunks of the full chunk size use them, so
/// a buffer never holds more than the share its chunk was counted; at most as many are kept as
/// fit in [`plain_ahead`], plus two per CPU.
#[derive(Debug)]
struct Buffers {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
    chunk_size: usize,
    keep: usize,
}

impl Buffers {
    fn new(chunk_size: u64) -> Buffers {
        Buffers {
            free: std::sync::Mutex::default(),
            chunk_size: usize::try_from(chunk_size).unwrap_or(usize::MAX),
            keep: (plain_ahead(chunk_size) / chunk_size.max(1)) as usize + 2 * cpus(),
        }
    }

    /// A buffer for a chunk of `len` bytes: a kept one for a whole chunk, else a new one.
    fn take(&self, len: u64) -> Vec<u8> {
        if len as usize != self.chunk_size {
            return Vec::new();
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.pop().unwrap_or_default()
    }

    /// A written piece: its buffer is kept when nothing else holds it and there is room.
    fn give(&self, piece: Piece) {
        let Piece { data, _held, .. } = piece;
        if let Ok(buf) = Arc::try_unwrap(data)
            && buf.capacity() == self.chunk_size
        {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            if free.len() < self.keep {
                free.push(buf);
            }
        }
    }
}

/// A chunk decompressed in order, with its share of [`plain_ahead`].
type Started = (
    oneshot::Receiver<Result<Vec<u8>, RestoreError>>,
    OwnedSemaphorePermit,
);

/// A chunk whose read was started in order: its sealed bytes will arrive on the receiver. The
/// share of [`SEALED_AHEAD`] is its run's, given back once every chunk of the run is
/// decompressed (they hold slices of one buffer).
type Read = (
    ChunkRef,
    oneshot::Receiver<Result<bytes::Bytes, RestoreError>>,
    Arc<OwnedSemaphorePermit>,
);

/// Sealed (compressed) bytes read, or being read, and not yet decompressed, at most: what keeps
/// the network busy. With pgbench's data, compressed about twentyfold, this is some 150 MiB of a
/// restore in flight, enough for 20 ms per request at several GB/s; incompressible data still
/// has 8 MiB in flight (400 MB/s at 20 ms). Counting decompressed bytes instead (18 MiB in all),
/// a restore from Garage had under 1 MiB of the network's bytes in flight and took three times
/// WAL-RUS's time at 4.5 GB, whatever `--parallel`.
pub const SEALED_AHEAD: u64 = 8 << 20;

/// Decompressed bytes between the decoder and the files, at most: enough to keep each CPU
/// decompressing while the writers take what is done.
pub fn plain_ahead(chunk_size: u64) -> u64 {
    (8u64 << 20).max(4 * chunk_size)
}

/// Reads at once, at most: `parallel`, or [`WAITING_IN_FLIGHT`] if more (small scattered runs,
/// as a `--delta` reads, are latency-bound), plus two.
pub fn held(parallel: usize) -> usize {
    parallel.max(WAITING_IN_FLIGHT) + 2
}

/// Sealed bytes one read covers at most with `parallel`: a whole pack at low parallelism (fewer
/// requests, each billed), smaller runs at high parallelism so that `parallel` reads fit in
/// [`SEALED_AHEAD`].
pub fn run_bytes(parallel: usize) -> u64 {
    (SEALED_AHEAD / parallel.max(2) as u64).clamp(1 << 20, RUN_MAX_BYTES)
}

/// The reader: start the reads of `to_fetch`'s runs in order, each once its sealed bytes fit in
/// [`SEALED_AHEAD`], at most [`held`] at once; hand every chunk to the decoder in order.
async fn read_in_order(
    fetcher: Arc<Fetcher>,
    to_fetch: Vec<ChunkRef>,
    (parallel, chunk_size): (usize, u64),
    decoder: tokio::sync::mpsc::UnboundedSender<Read>,
    waits: Arc<WaitClock>,
) {
    let budget = units(SEALED_AHEAD.max(2 * chunk_size)) as usize;
    let room = Arc::new(Semaphore::new(budget));
    let run_units = (run_bytes(parallel) / 1024) as usize;
    let reads = Arc::new(Semaphore::new(held(parallel)));
    // Dropped with the reader when it is aborted: no read outlives the restore.
    let mut runs = JoinSet::new();
    let mut at = 0;
    while at < to_fetch.len() {
        let end = run_end(&to_fetch, at, &fetcher.places, run_units);
        let run = to_fetch[at..end].to_vec();
        let since = std::time::Instant::now();
        let reading = Arc::clone(&reads).acquire_owned().await.expect("never closed");
        let share = sealed_charge(&run, &fetcher.places).min(budget) as u32;
        let room = Arc::new(
            Arc::clone(&room)
                .acquire_many_owned(share)
                .await
                .expect("never closed"),
        );
        waits.add(&waits.reading, since);
        let mut senders = Vec::with_capacity(run.len());
        for r in &run {
            let (s, rx) = oneshot::channel();
            if decoder.send((*r, rx, Arc::clone(&room))).is_err() {
                return;
            }
            senders.push(s);
        }
        runs.spawn(Arc::clone(&fetcher).fetch_run(run, senders, reading));
        while runs.try_join_next().is_some() {}
        at = end;
    }
    while runs.join_next().await.is_some() {}
}

/// A chunk whose answer never came: a stage of the pipeline died (it panicked).
fn never_read(id: &ChunkId) -> RestoreError {
    RestoreError::Corrupt(format!("chunk {id} was never read"))
}

/// The decoder: take each chunk in order as its read answers, with its decompressed share of
/// [`plain_ahead`], and decompress and verify it on a blocking thread, at most one per CPU (and
/// at most `parallel`) at once; hand the answers to the feeder in order.
async fn decode_in_order(
    fetcher: Arc<Fetcher>,
    mut reads: tokio::sync::mpsc::UnboundedReceiver<Read>,
    feeder: tokio::sync::mpsc::UnboundedSender<Started>,
    (parallel, chunk_size): (usize, u64),
    (waits, buffers): (Arc<WaitClock>, Arc<Buffers>),
) {
    let plain = Arc::new(Semaphore::new(units(plain_ahead(chunk_size)) as usize));
    let cpu = Arc::new(Semaphore::new(parallel.clamp(1, cpus())));
    // Dropped with the decoder when it is aborted.
    let mut decoding = JoinSet::new();
    while let Some((r, sealed, room)) = reads.recv().await {
        let since = std::time::Instant::now();
        let held = Arc::clone(&plain)
            .acquire_many_owned(units(r.len))
            .await
            .expect("never closed");
        waits.add(&waits.decoding_room, since);
        let (tx, rx) = oneshot::channel();
        if feeder.send((rx, held)).is_err() {
            return;
        }
        let since = std::time::Instant::now();
        // A run whose task died without answering (it panicked) is an error too.
        let sealed = sealed.await.unwrap_or_else(|_| Err(never_read(&r.id)));
        waits.add(&waits.decoding, since);
        let core = Arc::clone(&cpu).acquire_owned().await.expect("never closed");
        let (fetcher, out) = (Arc::clone(&fetcher), buffers.take(r.len));
        decoding.spawn_blocking(move || {
            let opened = sealed.and_then(|bytes| fetcher.open(&r, &bytes, out));
            // The sealed bytes and their share go before the answer: the reader may go on.
            drop(room);
            drop(core);
            let _ = tx.send(opened);
        });
        while decoding.try_join_next().is_some() {}
    }
    while decoding.join_next().await.is_some() {}
}

struct Pipeline<'a> {
    store: &'a Store,
    sealer: &'a Sealer,
    places: Arc<Places>,
    files: Arc<Vec<Target>>,
    chunk_size: u64,
    parallel: usize,
    /// Sync each file as it is finished (otherwise the caller syncs the file systems).
    fsync: bool,
    progress: Arc<dyn Progress>,
}

impl Pipeline<'_> {
    /// Write `which` files from `refs` (theirs, in the order [`super::order`] chose).
    ///
    /// Three stages, each bounded, so that what waits on the network is compressed bytes:
    /// - the *reader* starts the runs' reads in order, each holding its sealed bytes' share of
    ///   [`SEALED_AHEAD`] until its last chunk is decompressed;
    /// - the *decoder* takes the chunks in order as their reads answer, each holding its
    ///   decompressed share of [`plain_ahead`] until written, and decompresses and verifies them,
    ///   at most one per CPU at once;
    /// - the *feeder* (this task) hands each file to a writer thread and its chunks to it, in
    ///   that order.
    ///
    /// Each stage takes its share in order and releases it only as the next stage moves on, so
    /// none can wait on a share that only a later chunk could give back.
    async fn run(&self, which: Vec<usize>, refs: Vec<(ChunkRef, Source)>) -> Result<Scattered, RestoreError> {
        let to_fetch: Vec<ChunkRef> = refs
            .iter()
            .filter(|(_, s)| matches!(s, Source::Fetch { .. }))
            .map(|(r, _)| *r)
            .collect();
        let fetcher = Arc::new(Fetcher {
            store: self.store.clone(),
            sealer: self.sealer.clone(),
            places: Arc::clone(&self.places),
            files: Arc::clone(&self.files),
        });
        let waits = Arc::new(WaitClock::default());
        let (sealed_tx, sealed_rx) = tokio::sync::mpsc::unbounded_channel::<Read>();
        let (plain_tx, mut started) = tokio::sync::mpsc::unbounded_channel::<Started>();
        let reader = tokio::spawn(read_in_order(
            Arc::clone(&fetcher),
            to_fetch,
            (self.parallel, self.chunk_size),
            sealed_tx,
            Arc::clone(&waits),
        ));
        let buffers = Arc::new(Buffers::new(self.chunk_size));
        let decoder = tokio::spawn(decode_in_order(
            fetcher,
            sealed_rx,
            plain_tx,
            (self.parallel, self.chunk_size),
            (Arc::clone(&waits), Arc::clone(&buffers)),
        ));
        let mut writers: JoinSet<Result<u64, RestoreError>> = JoinSet::new();
        let mut done = Scattered::default();
        let fed = self
            .feed(
                &which,
                refs,
                &mut started,
                &mut writers,
                (&mut done, &waits, &buffers),
            )
            .await;
        // Whatever happened, nothing is left running: no read, no decompression, and no writer
        // that could create a file after the caller cleaned up.
        reader.abort();
        decoder.abort();
        started.close();
        while started.try_recv().is_ok() {}
        let mut first_err = fed.err();
        while let Some(r) = writers.join_next().await {
            match r.expect("file writer panicked") {
                Ok(bytes) => done.bytes_written += bytes,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        done.waits = waits.report();
        match first_err {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    /// Hand each file to a writer and its chunks, in order, to that writer: a file is started
    /// at its first chunk (or, with none to write, first of all), and its writer is let go
    /// with its last, so that files interleaved ([`super::order`]) are written at once.
    async fn feed(
        &self,
        which: &[usize],
        refs: Vec<(ChunkRef, Source)>,
        started: &mut tokio::sync::mpsc::UnboundedReceiver<Started>,
        writers: &mut JoinSet<Result<u64, RestoreError>>,
        (done, waits, buffers): (&mut Scattered, &WaitClock, &Arc<Buffers>),
    ) -> Result<(), RestoreError> {
        let open = Arc::new(Semaphore::new(OPEN_FILES));
        let mut kept: HashMap<ChunkId, Arc<Vec<u8>>> = HashMap::new();
        let mut left: HashMap<usize, usize> = HashMap::new();
        for (r, _) in &refs {
            *left.entry(r.file).or_default() += 1;
        }
        let mut to = FileWriters {
            open: &open,
            writers,
            waits,
            buffers,
        };
        for &file in which.iter().filter(|f| !left.contains_key(f)) {
            drop(self.start(file, &mut to, done).await?);
        }
        let mut senders: HashMap<usize, std::sync::mpsc::Sender<Piece>> = HashMap::new();
        for (r, source) in refs {
            if let std::collections::hash_map::Entry::Vacant(e) = senders.entry(r.file) {
                e.insert(self.start(r.file, &mut to, done).await?);
            }
            let (data, held) = match source {
                Source::Fetch { keep } => {
                    let since = std::time::Instant::now();
                    // The decoder sends every fetch: none means a stage died (it panicked).
                    let (rx, permit) = started.recv().await.ok_or_else(|| never_read(&r.id))?;
                    // A run whose task died without answering (it panicked) is an error too.
                    let answer = rx.await.map_err(|_| never_read(&r.id))?;
                    waits.add(&waits.writing, since);
                    let data = Arc::new(answer?);
                    done.chunks_fetched += 1;
                    done.bytes_fetched += r.len;
                    if keep {
                        kept.insert(r.id, Arc::clone(&data));
                    }
                    (data, Some(permit))
                }
                Source::Kept { last } => {
                    let data = if last {
                        kept.remove(&r.id)
                    } else {
                        kept.get(&r.id).cloned()
                    };
                    (data.expect("sources() kept it"), None)
                }
            };
            let piece = Piece {
                offset: r.index * self.chunk_size,
                data,
                _held: held,
            };
            let tx = senders.get(&r.file).expect("started above");
            if tx.send(piece).is_err() {
                // The writer ended early, with an error that is collected with the others:
                // nothing more is fed, and no later file is started.
                return Ok(());
            }
            let n = left.get_mut(&r.file).expect("counted above");
            *n -= 1;
            if *n == 0 {
                // Its last piece: the writer finishes the file.
                senders.remove(&r.file);
            }
        }
        Ok(())
    }

    /// Start the writer of `file` once a slot is free; its pieces go through the sender.
    async fn start(
        &self,
        file: usize,
        to: &mut FileWriters<'_>,
        done: &mut Scattered,
    ) -> Result<std::sync::mpsc::Sender<Piece>, RestoreError> {
        let since = std::time::Instant::now();
        let slot = Arc::clone(to.open).acquire_owned().await.expect("never closed");
        to.waits.add(&to.waits.files, since);
        // A writer that failed ends the restore now, not after every fetch.
        while let Some(r) = to.writers.try_join_next() {
            done.bytes_written += r.expect("file writer panicked")?;
        }
        let (tx, rx) = std::sync::mpsc::channel::<Piece>();
        let (files, progress, fsync) = (Arc::clone(&self.files), Arc::clone(&self.progress), self.fsync);
        let buffers = Arc::clone(to.buffers);
        to.writers.spawn_blocking(move || {
            let r = write_file(&files[file], rx, fsync, &*progress, &buffers);
            drop(slot);
            r
        });
        Ok(tx)
    }
}

/// What starting a file's writer needs: the slots ([`OPEN_FILES`]), where writers run, and
/// what they report to.
struct FileWriters<'a> {
    open: &'a Arc<Semaphore>,
    writers: &'a mut JoinSet<Result<u64, RestoreError>>,
    waits: &'a WaitClock,
    buffers: &'a Arc<Buffers>,
}

/// Write one file from the pieces `rx` delivers until its sender is dropped, set its mode, and
/// (`fsync`) make it durable. Returns the bytes written.
fn write_file(
    target: &Target,
    rx: std::sync::mpsc::Receiver<Piece>,
    fsync: bool,
    progress: &dyn Progress,
    buffers: &Buffers,
) -> Result<u64, RestoreError> {
    use std::os::unix::fs::PermissionsExt;
    let path = &target.path;
    let file = if target.create {
        create_new(path)?
    } else {
        open_for_write(path)?
    };
    let (mut written, mut end, mut flushed) = (0u64, 0u64, 0u64);
    let mut sink = Sink::new(&file, target.size);
    let mut next = None;
    while let Some(run) = next_run(&rx, &mut next) {
        let offset = run[0].offset;
        let slices: Vec<&[u8]> = run.iter().map(|p| p.data.as_slice()).collect();
        sink.write_run(&slices, offset).map_err(write_err(path))?;
        let len: u64 = slices.iter().map(|s| s.len() as u64).sum();
        written += len;
        end = end.max(offset + len);
        progress.advance(len);
        for piece in run {
            buffers.give(piece);
        }
        if fsync && !sink.is_direct() && end >= flushed + FLUSH_AFTER {
            // Start the write-back of what was written so far (advice: an error is not one).
            let _ = rustix::fs::fadvise(
                &file,
                flushed,
                std::num::NonZeroU64::new(end - flushed),
                rustix::fs::Advice::DontNeed,
            );
            flushed = end;
        }
    }
    if target.create && end != target.size {
        file.set_len(target.size).map_err(write_err(path))?;
    }
    file.set_permissions(std::fs::Permissions::from_mode(target.mode & 0o7777))
        .map_err(write_err(path))?;
    if fsync {
        file.sync_all().map_err(write_err(path))?;
    }
    Ok(written)
}

/// The next pieces to write with one call: the first that arrives (`next`, or from `rx`), and
/// those already waiting that continue it, up to [`WRITE_RUN`] bytes; a waiting piece that does
/// not continue it is left in `next`. None once the sender is gone and nothing is left.
fn next_run(rx: &std::sync::mpsc::Receiver<Piece>, next: &mut Option<Piece>) -> Option<Vec<Piece>> {
    let first = match next.take() {
        Some(p) => p,
        None => rx.recv().ok()?,
    };
    let mut end = first.offset + first.data.len() as u64;
    let mut bytes = first.data.len() as u64;
    let mut run = vec![first];
    while bytes < WRITE_RUN {
        match rx.try_recv() {
            Ok(p) if p.offset == end => {
                end += p.data.len() as u64;
                bytes += p.data.len() as u64;
                run.push(p);
            }
            Ok(p) => {
                *next = Some(p);
                break;
            }
            Err(_) => break,
        }
    }
    Some(run)
}

/// The file a server cannot start without, written last (see [`Fill::last`]).
pub(crate) const PG_CONTROL: &str = "global/pg_control";

/// Add file entry `e` at `dest` to `fill`, with its chunks `which` to write; `create`: see
/// [`Target::create`]. `global/pg_control` becomes the `last` file.
pub(crate) fn add_file(
    fill: &mut Fill,
    e: &Entry,
    dest: PathBuf,
    create: bool,
    which: impl Iterator<Item = usize>,
    chunk_size: u64,
) {
    let file = fill.files.len();
    for idx in which {
        let offset = idx as u64 * chunk_size;
        // validate() checked the chunk count against the size: offset < size.
        fill.refs.push(ChunkRef {
            file,
            index: idx as u64,
            id: e.chunks[idx],
            len: chunk_size.min(e.size - offset),
        });
    }
    if e.path == PG_CONTROL {
        fill.last = Some(file);
    }
    fill.files.push(Target {
        path: dest,
        mode: e.mode,
        size: e.size,
        create,
    });
}

/// The least share of the memory bound a chunk takes, however small: what it costs besides its
/// bytes (its allocation, its answer, its piece on the way to a writer) is not nothing. Counting
/// small chunks by their bytes alone let 2,300 of a many-files restore be in flight at once, and
/// its peak RSS went from 72 to 131 MiB without it going faster (bench/rivals.py --shapes many).
pub const MIN_CHUNK_SHARE: u64 = 32 << 10;

/// KiB units of the memory bound a chunk of `len` bytes takes.
fn units(len: u64) -> u32 {
    u32::try_from(len.max(MIN_CHUNK_SHARE).div_ceil(1024)).unwrap_or(u32::MAX)
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Sealed bytes one ranged read covers at most.
pub const RUN_MAX_BYTES: u64 = 8 << 20;
/// Bytes of a run's span no chunk of the run needs, at most: neighbours a backup's parallel
/// tasks packed out of file order are read with their run, a `--delta`'s scattered chunks are
/// not.
pub const RUN_SLACK: u64 = 256 << 10;

/// The end of the run of `refs` that starts at `at`: the references after it whose chunks lie in
/// the same pack, read together with one ranged read whose span stays within [`RUN_MAX_BYTES`],
/// wastes at most [`RUN_SLACK`] plus what the run needs, and whose sealed share (see
/// [`sealed_charge`]) is at most `max_units`. A chunk stored on its own is a run of one.
pub(crate) fn run_end(refs: &[ChunkRef], at: usize, places: &Places, max_units: usize) -> usize {
    let Some(first) = places.get(&refs[at].id) else {
        return at + 1;
    };
    let (mut lo, mut hi, mut needed) = (first.offset, first.offset + first.len, first.len);
    let mut end = at + 1;
    while let Some(r) = refs.get(end) {
        let Some(p) = places.get(&r.id).filter(|p| p.pack == first.pack) else {
            break;
        };
        let (l, h) = (lo.min(p.offset), hi.max(p.offset + p.len));
        let span = h - l;
        // A chunk already in the span (met twice) costs nothing more to read.
        let more = if p.offset >= lo && p.offset + p.len <= hi {
            0
        } else {
            p.len
        };
        if span > RUN_MAX_BYTES
            || span > needed + more + RUN_SLACK
            || span.div_ceil(1024) as usize + (end + 1 - at) > max_units
        {
            break;
        }
        (lo, hi, needed) = (l, h, needed + more);
        end += 1;
    }
    end
}

/// The bytes of the pack one read of `run` covers: from the first of its packed chunks to the
/// end of the last (`None` for a chunk stored on its own).
fn span(run: &[ChunkRef], places: &Places) -> Option<std::ops::Range<u64>> {
    run.iter()
        .filter_map(|r| places.get(&r.id))
        .map(Place::range)
        .reduce(|a, b| a.start.min(b.start)..a.end.max(b.end))
}

/// The share of [`SEALED_AHEAD`] a run takes, in KiB: the bytes its read brings in (sealed chunks
/// and the gaps between them) and a KiB per chunk for what each costs besides (its slot in the
/// decoder's queue); a chunk stored on its own, its decompressed length or 32 KiB (its sealed
/// length is not known before it is read, and is at most a little more).
fn sealed_charge(run: &[ChunkRef], places: &Places) -> usize {
    match span(run, places) {
        Some(s) => (s.end - s.start).div_ceil(1024) as usize + run.len(),
        None => run.iter().map(|r| units(r.len) as usize + 4).sum(),
    }
}

/// What reads chunks for a restore.
struct Fetcher {
    store: Store,
    sealer: Sealer,
    places: Arc<Places>,
    files: Arc<Vec<Target>>,
}

impl Fetcher {
    /// Read the chunks of `run` (see [`run_end`]) with one read and answer each chunk's sealed
    /// bytes on its sender, in order (slices of one buffer). A failure answers every chunk.
    async fn fetch_run(
        self: Arc<Self>,
        run: Vec<ChunkRef>,
        senders: Vec<oneshot::Sender<Result<bytes::Bytes, RestoreError>>>,
        _reading: OwnedSemaphorePermit,
    ) {
        let (bytes, lo) = match self.read_run(&run).await {
            Ok(r) => r,
            Err(e) => {
                let msg = e.to_string();
                let mut first = Some(e);
                for s in senders {
                    let _ = s.send(Err(first
                        .take()
                        .unwrap_or_else(|| RestoreError::Corrupt(msg.clone()))));
                }
                return;
            }
        };
        for (r, s) in run.iter().zip(senders) {
            let sealed = match self.places.get(&r.id) {
                Some(p) => bytes.slice((p.offset - lo) as usize..(p.offset - lo + p.len) as usize),
                None => bytes.clone(),
            };
            let _ = s.send(Ok(sealed));
        }
    }

    /// The sealed bytes of `run` and the pack offset they start at (0 for a chunk on its own).
    async fn read_run(&self, run: &[ChunkRef]) -> Result<(bytes::Bytes, u64), RestoreError> {
        let first = &run[0];
        let Some(place) = self.places.get(&first.id) else {
            let bytes = self
                .store
                .get(&Chunk::key(&first.id))
                .await?
                .ok_or_else(|| ChunkError::Missing {
                    id: first.id.to_string(),
                })?;
            return Ok((bytes, 0));
        };
        let std::ops::Range { start: lo, end: hi } = span(run, &self.places).unwrap_or_else(|| place.range());
        let key = pack_key(&place.pack);
        let bytes = self
            .store
            .get_range(&key, lo..hi)
            .await?
            .ok_or_else(|| ChunkError::MissingPack {
                pack: place.pack.to_string(),
                id: first.id.to_string(),
            })?;
        if bytes.len() as u64 != hi - lo {
            return Err(RestoreError::Corrupt(format!(
                "pack {} (holding chunk {}) is shorter than the manifest says: bytes {lo}..{hi} gave {}",
                place.pack,
                first.id,
                bytes.len()
            )));
        }
        Ok((bytes, lo))
    }

    /// Open chunk `r` from its sealed bytes and verify it. The header's length is compared with
    /// the manifest's before decompressing, so a hostile chunk cannot make the restore allocate
    /// more than the manifest's chunk size (times the chunks [`held`]); the rest is the typed
    /// read of a [`Chunk`] (envelope, hash, and that the content is what the id names).
    fn open(&self, r: &ChunkRef, sealed: &[u8], out: Vec<u8>) -> Result<Vec<u8>, RestoreError> {
        let id = &r.id;
        // A packed chunk is named with its pack, the object to look at.
        let named = || match self.places.get(id) {
            Some(p) => format!("{id} (in pack {})", p.pack),
            None => id.to_string(),
        };
        let corrupt = |source| ChunkError::Corrupt {
            id: named(),
            source: Box::new(source),
        };
        let header = self.sealer.read_header(sealed).map_err(corrupt)?;
        if header.original_len != r.len {
            return Err(RestoreError::Corrupt(format!(
                "chunk {} of {} holds {} bytes, the manifest says {}",
                named(),
                self.files[r.file].path.display(),
                header.original_len,
                r.len
            )));
        }
        match stored::open_into::<Chunk>(&self.sealer, id, sealed, out) {
            Ok(Chunk(content)) => Ok(content),
            Err(Damage::Envelope(e)) => Err(corrupt(e).into()),
            Err(Damage::Content(MisnamedChunk { found })) => Err(corrupt(ObjectError::ContentHash {
                expected: id.to_string(),
                found,
            })
            .into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunk ids by name, for reading the tests.
    const ZERO: ChunkId = ChunkId::from_hash([0; 32]);
    const ONE: ChunkId = ChunkId::from_hash([1; 32]);
    const TAIL: ChunkId = ChunkId::from_hash([0x7a; 32]);

    fn r(id: ChunkId, len: u64, file: usize, index: u64) -> ChunkRef {
        ChunkRef { file, index, id, len }
    }

    fn targets(n: usize) -> Vec<Target> {
        (0..n)
            .map(|i| Target {
                path: PathBuf::from(format!("/data/base/1/{}", 16384 + i)),
                mode: 0o600,
                size: 0,
                create: true,
            })
            .collect()
    }

    #[test]
    fn neighbours_in_a_pack_are_read_together_and_nothing_else_is() {
        use crate::basebackup::pack::{PackId, PackRecord};
        let c = |b: u8| ChunkId::from_hash([b; 32]);
        let pack = |b: u8, chunks: &[u8], lengths: &[u64]| PackRecord {
            id: PackId::from_hash([b; 32]),
            chunks: chunks.iter().map(|&x| c(x)).collect(),
            lengths: lengths.to_vec(),
        };
        // Pack A: 1, 2, 3 (small), 4 (a big one far away); pack B: 5.
        let a = pack(0xa, &[1, 2, 3, 9, 4], &[100, 100, 100, RUN_SLACK + 1, 100]);
        let b = pack(0xb, &[5], &[100]);
        let places = Places::of([&a, &b]);
        let refs: Vec<ChunkRef> = [2, 1, 3, 4, 5, 6, 1]
            .iter()
            .enumerate()
            .map(|(i, &x)| r(c(x), 8192, i, 0))
            .collect();
        let many = usize::MAX;
        // 2, 1 and 3 are neighbours (in any order); 4 lies past more slack than allowed.
        assert_eq!(run_end(&refs, 0, &places, many), 3);
        // 4 alone, then 5 in another pack, then 6 stored on its own.
        assert_eq!(run_end(&refs, 3, &places, many), 4);
        assert_eq!(run_end(&refs, 4, &places, many), 5);
        assert_eq!(run_end(&refs, 5, &places, many), 6);
        // The sealed share ends a run: a KiB of span and one per chunk, for two chunks only.
        assert_eq!(run_end(&refs, 0, &places, 3), 2);
    }

    /// A whole chunk's buffer comes back once written (nothing else holding it) and is taken
    /// again; a shorter chunk's never is, so a buffer holds no more than its chunk was counted.
    #[test]
    fn whole_chunk_buffers_are_reused_and_no_others() {
        let b = Buffers::new(1024);
        let piece = |data| Piece {
            offset: 0,
            data,
            _held: None,
        };
        let mut v = b.take(1024);
        v.reserve_exact(1024);
        let at = v.as_ptr();
        b.give(piece(Arc::new(v)));
        let again = b.take(1024);
        assert_eq!(again.as_ptr(), at, "the same allocation");
        assert_eq!(b.take(1024).capacity(), 0, "only one was given back");
        let shared = Arc::new(again);
        let kept = Arc::clone(&shared);
        b.give(piece(shared));
        assert_eq!(b.take(1024).capacity(), 0, "still held elsewhere: not kept");
        b.give(piece(kept));
        assert_eq!(
            b.take(100).capacity(),
            0,
            "a short chunk gets a buffer of its own"
        );
        let last = b.take(1024);
        assert_eq!(last.as_ptr(), at);
    }

    #[test]
    fn a_repeated_chunk_is_fetched_once_and_kept_until_its_last_reference() {
        let refs = [
            r(ZERO, 8, 0, 0),
            r(ONE, 8, 0, 1),
            r(ZERO, 8, 0, 2),
            r(ZERO, 8, 1, 0),
            r(TAIL, 3, 1, 1),
        ];
        let s = sources(&refs, 1 << 20);
        use Source::*;
        assert_eq!(
            s,
            vec![
                Fetch { keep: true },
                Fetch { keep: false },
                Kept { last: false },
                Kept { last: true },
                Fetch { keep: false },
            ]
        );
    }

    #[test]
    fn a_repeated_chunk_beyond_the_budget_is_fetched_again() {
        // ZERO is kept (8 of 12 bytes); ONE would exceed the budget, so both its references
        // fetch; once ZERO's last reference passed, TAIL fits.
        let refs = [
            r(ZERO, 8, 0, 0),
            r(ONE, 8, 0, 1),
            r(ZERO, 8, 0, 2),
            r(ONE, 8, 0, 3),
            r(TAIL, 3, 1, 0),
            r(TAIL, 3, 1, 1),
        ];
        let s = sources(&refs, 12);
        use Source::*;
        assert_eq!(
            s,
            vec![
                Fetch { keep: true },
                Fetch { keep: false },
                Kept { last: true },
                Fetch { keep: false },
                Fetch { keep: true },
                Kept { last: true },
            ]
        );
    }

    /// pg_control (the last file) sorts before `global/pg_filenode.map` and `pg_xact/`: a chunk
    /// it shares with one of them must be fetched by that file, not counted as kept by
    /// pg_control, which is written after everything else.
    #[test]
    fn a_chunk_the_last_file_shares_is_fetched_by_the_early_file() {
        let refs = vec![
            r(ZERO, 8, 0, 0),
            r(ONE, 8, 0, 1),
            r(ZERO, 8, 1, 0),
            r(ONE, 8, 2, 0),
        ];
        let (early, late) = split_last(refs, &targets(3), Some(0), &Places::default()).unwrap();
        use Source::*;
        assert_eq!(
            early,
            vec![
                (r(ZERO, 8, 1, 0), Fetch { keep: false }),
                (r(ONE, 8, 2, 0), Fetch { keep: false })
            ]
        );
        assert_eq!(late, vec![r(ZERO, 8, 0, 0), r(ONE, 8, 0, 1)]);
        // A contradiction in the last file's references is refused too.
        let err = split_last(
            vec![r(ONE, 8, 0, 0), r(ONE, 3, 1, 0)],
            &targets(2),
            Some(0),
            &Places::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("referenced as"), "{err}");
    }

    #[test]
    fn one_id_with_two_lengths_is_refused() {
        let err = lengths_agree(&[r(ONE, 8, 0, 0), r(ONE, 3, 0, 1)], &targets(1)).unwrap_err();
        assert!(
            err.to_string().contains("referenced as 8 bytes and as 3 bytes"),
            "{err}"
        );
        assert!(err.to_string().contains("/data/base/1/16384"), "{err}");
    }
}
