//! The restore's pipeline: a batch of files ([`super::work::Batch`]) written from the chunks
//! its references name, each file from one descriptor, fed by fetched and verified chunks.
//!
//! Three stages, each bounded ([`super::budget`]), so that what waits on the network is
//! compressed bytes: the reader starts ranged reads of runs of neighbours in a pack and the
//! decoder decompresses and verifies what they answer, in order ([`super::chunk_reader`]); the
//! feeder (here) hands each file to a writer thread and its chunks to it, in that order
//! ([`super::file_writer`]). Each stage's waits are reported ([`Waits`]).
//!
//! A chunk referenced more than once (zeroed pages, the catalogs `template0`, `template1` and
//! `postgres` share, a file copied twice) is fetched once and kept in memory for its later
//! references; which reference fetches and which reuses was decided with the work list
//! ([`super::work::sources`]), so the pipeline never waits on a decision.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::budget::{Bounds, Buffers, OPEN_FILES};
use super::chunk_reader::{ChunkReader, Read, Started, decode_in_order, never_read, read_in_order};
use super::file_writer::{FileWritten, Piece, open_roots, syncfs_each, write_file};
use super::order::ChunkRef;
use super::waits::{WaitClock, Waits};
use super::work::{BasesHere, Batch, FileToWrite, Source};
use super::{Progress, RestoreError, SyncMethod};
use crate::basebackup::chunk::ChunkId;
use crate::basebackup::pack::Places;
use crate::repo::Store;
use crate::repo::object::Sealer;

/// Where a restore's chunks come from: the store, how its objects are sealed, where packed
/// chunks lie, and the backup's chunk size (a reference's offset in its file is its index times
/// it).
pub(crate) struct ChunkStore<'a> {
    pub store: &'a Store,
    pub sealer: &'a Sealer,
    pub places: Arc<Places>,
    pub chunk_size: u64,
    /// Bases of chunks stored as differences read from disk (`--delta`: [`BasesHere`]).
    pub bases_here: Arc<BasesHere>,
}

/// Write `batch`: every file it names, from its references, with at most `parallel` chunks
/// fetched at once. Each file's mode is set and the file made durable as `sync` says: `fsync`
/// each as it is finished, or `syncfs` once per file system when all are written (the file
/// systems opened before the first write, so that their write-back errors are reported).
pub(crate) async fn write(
    from: &ChunkStore<'_>,
    batch: Batch,
    parallel: usize,
    sync: SyncMethod,
    progress: &Arc<dyn Progress>,
) -> Result<Transfer, RestoreError> {
    let Batch {
        files,
        which,
        refs,
        roots,
    } = batch;
    let file_systems = match sync {
        SyncMethod::Syncfs => Some(open_roots(&roots, which.iter().map(|&i| &files[i]))?),
        SyncMethod::Fsync => None,
    };
    let pipeline = Pipeline {
        from,
        files,
        parallel: parallel.max(1),
        fsync: sync == SyncMethod::Fsync,
        progress: Arc::clone(progress),
    };
    let done = pipeline.run(which, refs).await?;
    if let Some(file_systems) = file_systems {
        tokio::task::spawn_blocking(move || syncfs_each(&file_systems))
            .await
            .expect("sync task panicked")?;
    }
    Ok(done)
}

/// What writing a batch did: the chunks it fetched, the bytes it wrote and where it waited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Transfer {
    /// Chunks fetched from the store (each distinct chunk once, unless it did not fit in
    /// [`REPEAT_BUDGET`] between two of its references).
    pub chunks_fetched: u64,
    /// Their bytes, decompressed.
    pub bytes_fetched: u64,
    /// Bytes written into files.
    pub bytes_written: u64,
    /// Files compared as their bytes arrived ([`super::work::FileToWrite::compare`]) and found
    /// to hold them already: nothing written.
    pub files_found_equal: u64,
    /// Where the pipeline waited.
    pub waits: Waits,
}

impl Transfer {
    /// Count what one file's writer did.
    fn count(&mut self, w: FileWritten) {
        self.bytes_written += w.bytes;
        self.files_found_equal += u64::from(w.found_equal);
    }

    pub(crate) fn add(&mut self, o: Transfer) {
        self.chunks_fetched += o.chunks_fetched;
        self.bytes_fetched += o.bytes_fetched;
        self.bytes_written += o.bytes_written;
        self.files_found_equal += o.files_found_equal;
        self.waits.add(o.waits);
    }
}

struct Pipeline<'a> {
    from: &'a ChunkStore<'a>,
    files: Arc<Vec<FileToWrite>>,
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
    async fn run(&self, which: Vec<usize>, refs: Vec<(ChunkRef, Source)>) -> Result<Transfer, RestoreError> {
        let to_fetch: Vec<ChunkRef> = refs
            .iter()
            .filter(|(_, s)| matches!(s, Source::Fetch { .. }))
            .map(|(r, _)| *r)
            .collect();
        let chunk_reader = Arc::new(ChunkReader {
            store: self.from.store.clone(),
            sealer: self.from.sealer.clone(),
            places: Arc::clone(&self.from.places),
            files: Arc::clone(&self.files),
            bases_here: Arc::clone(&self.from.bases_here),
            chunk_size: self.from.chunk_size,
            disk_bases: std::sync::Mutex::default(),
        });
        let waits = Arc::new(WaitClock::default());
        let bounds = Bounds::of(self.parallel, self.from.chunk_size);
        let (sealed_tx, sealed_rx) = tokio::sync::mpsc::unbounded_channel::<Read>();
        let (plain_tx, mut started) = tokio::sync::mpsc::unbounded_channel::<Started>();
        let reader = tokio::spawn(read_in_order(
            Arc::clone(&chunk_reader),
            to_fetch,
            bounds,
            sealed_tx,
            Arc::clone(&waits),
        ));
        let buffers = Arc::new(Buffers::new(self.from.chunk_size));
        let decoder = tokio::spawn(decode_in_order(
            chunk_reader,
            sealed_rx,
            plain_tx,
            bounds,
            Arc::clone(&waits),
            Arc::clone(&buffers),
        ));
        let mut writers = FileWriters {
            open: Arc::new(Semaphore::new(OPEN_FILES)),
            running: JoinSet::new(),
            waits: Arc::clone(&waits),
            buffers,
        };
        let mut done = Transfer::default();
        let fed = self
            .feed(&which, refs, &mut started, &mut writers, &mut done)
            .await;
        // Whatever happened, nothing is left running: no read, no decompression, and no writer
        // that could create a file after the caller cleaned up.
        reader.abort();
        decoder.abort();
        started.close();
        while started.try_recv().is_ok() {}
        let mut first_err = fed.err();
        while let Some(r) = writers.running.join_next().await {
            match r.expect("file writer panicked") {
                Ok(w) => done.count(w),
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
        to: &mut FileWriters,
        done: &mut Transfer,
    ) -> Result<(), RestoreError> {
        let mut kept: HashMap<ChunkId, Arc<Vec<u8>>> = HashMap::new();
        let mut left: HashMap<usize, usize> = HashMap::new();
        for (r, _) in &refs {
            *left.entry(r.file).or_default() += 1;
        }
        for &file in which.iter().filter(|f| !left.contains_key(f)) {
            drop(self.start(file, to, done).await?);
        }
        let mut senders: HashMap<usize, std::sync::mpsc::Sender<Piece>> = HashMap::new();
        for (r, source) in refs {
            if let std::collections::hash_map::Entry::Vacant(e) = senders.entry(r.file) {
                e.insert(self.start(r.file, to, done).await?);
            }
            let (data, held) = match source {
                Source::Fetch { keep } => {
                    let since = std::time::Instant::now();
                    // The decoder sends every fetch: none means a stage died (it panicked).
                    let (rx, permit) = started.recv().await.ok_or_else(|| never_read(&r.id))?;
                    // A run whose task died without answering (it panicked) is an error too.
                    let answer = rx.await.map_err(|_| never_read(&r.id))?;
                    to.waits.add(&to.waits.writing, since);
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
                offset: r.index * self.from.chunk_size,
                range: r
                    .within
                    .map(|at| at as usize..(at + self.files[r.file].size) as usize),
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
        to: &mut FileWriters,
        done: &mut Transfer,
    ) -> Result<std::sync::mpsc::Sender<Piece>, RestoreError> {
        let since = std::time::Instant::now();
        let slot = Arc::clone(&to.open).acquire_owned().await.expect("never closed");
        to.waits.add(&to.waits.files, since);
        // A writer that failed ends the restore now, not after every fetch.
        while let Some(r) = to.running.try_join_next() {
            done.count(r.expect("file writer panicked")?);
        }
        let (tx, rx) = std::sync::mpsc::channel::<Piece>();
        let (files, progress, fsync) = (Arc::clone(&self.files), Arc::clone(&self.progress), self.fsync);
        let buffers = Arc::clone(&to.buffers);
        to.running.spawn_blocking(move || {
            let r = write_file(&files[file], rx, fsync, &*progress, &buffers);
            drop(slot);
            r
        });
        Ok(tx)
    }
}

/// What starting a file's writer needs: the slots ([`OPEN_FILES`]), where writers run, and
/// what they report to.
struct FileWriters {
    open: Arc<Semaphore>,
    running: JoinSet<Result<FileWritten, RestoreError>>,
    waits: Arc<WaitClock>,
    buffers: Arc<Buffers>,
}
