//! Reading a restore's chunks from the store: runs of neighbours in a pack read with one ranged
//! read each ([`run_end`]), a whole pack at low parallelism ([`run_bytes`]), so that a cluster
//! of many small files restores with a read per few hundred of them, not one each; the reads
//! started in order within the bound of [`SEALED_AHEAD`] ([`read_in_order`]); and each chunk
//! decompressed and verified in order within [`plain_ahead`], at most one per CPU at once
//! ([`decode_in_order`]).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::task::JoinSet;

use super::RestoreError;
use super::budget::{Bounds, Buffers, RUN_MAX_BYTES, units};
#[cfg(doc)]
use super::budget::{SEALED_AHEAD, held, plain_ahead, run_bytes};
use super::order::ChunkRef;
use super::waits::WaitClock;
use super::work::{BasesHere, FileToWrite};
use crate::basebackup::chunk::{
    Chunk, ChunkError, ChunkId, MisnamedChunk, neighbours_end, open_difference, open_sealed, read_chunk,
    read_sealed_run, sealed_runs, span_of,
};
use crate::basebackup::pack::Places;
use crate::repo::Store;
use crate::repo::layout::pack_key;
use crate::repo::object::{ObjectError, Sealer};
use crate::repo::stored::{self, Damage, StoredKind};

/// Bytes of a run's span no chunk of the run needs, at most: neighbours a backup's parallel
/// tasks packed out of file order are read with their run, a `--delta`'s scattered chunks are
/// not.
pub const RUN_SLACK: u64 = 256 << 10;

/// The end of the run of `refs` that starts at `at`: the references after it whose chunks lie in
/// the same pack, read together with one ranged read whose span stays within [`RUN_MAX_BYTES`],
/// wastes at most [`RUN_SLACK`] plus what the run needs, and whose sealed share (see
/// [`sealed_charge`]) is at most `max_units`. A chunk stored on its own is a run of one.
pub(crate) fn run_end(refs: &[ChunkRef], at: usize, places: &Places, max_units: usize) -> usize {
    let fits = |span: u64, chunks: usize| {
        span <= RUN_MAX_BYTES && span.div_ceil(1024) as usize + chunks <= max_units
    };
    neighbours_end(places, (at, refs.len()), |i| refs[i].id, RUN_SLACK, fits)
}

/// The bytes of the pack one read of `run` covers: from the first of its packed chunks to the
/// end of the last (`None` for a chunk stored on its own).
fn span(run: &[ChunkRef], places: &Places) -> Option<std::ops::Range<u64>> {
    span_of(places, run.iter().map(|r| &r.id))
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

/// A chunk whose read was started in order: its sealed bytes will arrive on the receiver. The
/// share of [`SEALED_AHEAD`] is its run's, given back once every chunk of the run is
/// decompressed (they hold slices of one buffer). A chunk stored as a difference comes with
/// the read of its base, started with it.
pub(crate) type Read = (
    ChunkRef,
    oneshot::Receiver<Result<bytes::Bytes, RestoreError>>,
    Arc<OwnedSemaphorePermit>,
    Option<BaseRead>,
);

/// The read of a base ([`crate::basebackup::manifest::Delta::base`]) under way: its sealed
/// bytes (an error: read it on its own), with the share of [`BASES_AHEAD`] of the run's bases.
pub(crate) type BaseRead = (
    oneshot::Receiver<Result<bytes::Bytes, ()>>,
    Arc<OwnedSemaphorePermit>,
);

/// Sealed bytes of bases read ahead of their decompression, at most, in KiB: read in runs of
/// neighbours (a backup packs the differences of a file's chunks side by side, and their bases
/// lie side by side in the packs of the backup before), each run with one ranged read.
pub const BASES_AHEAD: usize = 8 << 10;

/// A chunk decompressed in order, with its share of [`plain_ahead`].
pub(crate) type Started = (
    oneshot::Receiver<Result<Vec<u8>, RestoreError>>,
    OwnedSemaphorePermit,
);

/// The reader: start the reads of `to_fetch`'s runs in order, each once its sealed bytes fit in
/// [`SEALED_AHEAD`], at most [`held`] at once; hand every chunk to the decoder in order.
pub(crate) async fn read_in_order(
    reader: Arc<ChunkReader>,
    to_fetch: Vec<ChunkRef>,
    bounds: Bounds,
    decoder: tokio::sync::mpsc::UnboundedSender<Read>,
    waits: Arc<WaitClock>,
) {
    let budget = bounds.sealed;
    let room = Arc::new(Semaphore::new(budget));
    let run_units = bounds.run;
    let reads = Arc::new(Semaphore::new(bounds.reads));
    let bases = Arc::new(Semaphore::new(BASES_AHEAD));
    // Dropped with the reader when it is aborted: no read outlives the restore.
    let mut runs = JoinSet::new();
    let mut at = 0;
    while at < to_fetch.len() {
        let end = run_end(&to_fetch, at, &reader.places, run_units);
        let run = to_fetch[at..end].to_vec();
        let since = std::time::Instant::now();
        let reading = Arc::clone(&reads).acquire_owned().await.expect("never closed");
        let share = sealed_charge(&run, &reader.places).min(budget) as u32;
        let room = Arc::new(
            Arc::clone(&room)
                .acquire_many_owned(share)
                .await
                .expect("never closed"),
        );
        waits.add(&waits.reading, since);
        let (senders, answers): (Vec<_>, Vec<_>) = run.iter().map(|_| oneshot::channel()).unzip();
        // The run's read first: a base's share may wait for chunks of this run to be decoded.
        let chunks = run.clone();
        runs.spawn(Arc::clone(&reader).fetch_run(run, senders, reading));
        let to = Dispatch {
            reader: &reader,
            decoder: &decoder,
            room: &room,
            bases: &bases,
            waits: &waits,
        };
        if !to.send_run(chunks, answers, &mut runs).await {
            return;
        }
        while runs.try_join_next().is_some() {}
        at = end;
    }
    while runs.join_next().await.is_some() {}
}

/// Where the reader hands a run's chunks: the decoder, with the run's share of
/// [`SEALED_AHEAD`], and the reads of the bases of those stored as differences within
/// [`BASES_AHEAD`].
struct Dispatch<'a> {
    reader: &'a Arc<ChunkReader>,
    decoder: &'a tokio::sync::mpsc::UnboundedSender<Read>,
    room: &'a Arc<OwnedSemaphorePermit>,
    bases: &'a Arc<Semaphore>,
    waits: &'a WaitClock,
}

impl Dispatch<'_> {
    /// Hand the chunks of a run (whose read is started) to the decoder in order, each with its
    /// answer. The bases of those stored as differences (and not on disk, [`BasesHere`]) are read
    /// in runs of neighbours ([`sealed_runs`]), each once its sealed bytes fit in
    /// [`BASES_AHEAD`], with every chunk before it handed on first: a share is only ever waited
    /// for while the chunks holding the others can be decoded. False when the restore is
    /// stopping.
    async fn send_run(
        &self,
        chunks: Vec<ChunkRef>,
        answers: Vec<oneshot::Receiver<Result<bytes::Bytes, RestoreError>>>,
        runs: &mut JoinSet<()>,
    ) -> bool {
        let reader = self.reader;
        let wanted: Vec<(usize, ChunkId)> = chunks
            .iter()
            .enumerate()
            .filter(|(_, r)| !reader.bases_here.contains_key(&r.id))
            .filter_map(|(i, r)| Some((i, reader.places.delta(&r.id)?.base)))
            .collect();
        let ids: Vec<ChunkId> = wanted.iter().map(|(_, b)| *b).collect();
        let mut pending = chunks.into_iter().zip(answers).enumerate().peekable();
        for range in sealed_runs(&reader.places, &ids, usize::MAX) {
            let (first, last) = (wanted[range.start].0, wanted[range.end - 1].0);
            while let Some((_, (r, rx))) = pending.next_if(|(i, _)| *i < first) {
                if self.decoder.send((r, rx, Arc::clone(self.room), None)).is_err() {
                    return false;
                }
            }
            let Some(mut reads) = self.read_bases(&wanted[range.clone()], &ids[range], runs).await else {
                return false;
            };
            while let Some((i, (r, rx))) = pending.next_if(|(i, _)| *i <= last) {
                if self
                    .decoder
                    .send((r, rx, Arc::clone(self.room), reads.remove(&i)))
                    .is_err()
                {
                    return false;
                }
            }
        }
        for (_, (r, rx)) in pending {
            if self.decoder.send((r, rx, Arc::clone(self.room), None)).is_err() {
                return false;
            }
        }
        true
    }

    /// Start reading bases `ids` (one run of neighbours, for the chunks `wanted` names by index)
    /// with one ranged read, in `runs` (none outlives the restore), once their sealed bytes fit
    /// in [`BASES_AHEAD`]; each chunk's read by its index. `None` when the restore is stopping.
    async fn read_bases(
        &self,
        wanted: &[(usize, ChunkId)],
        ids: &[ChunkId],
        runs: &mut JoinSet<()>,
    ) -> Option<HashMap<usize, BaseRead>> {
        let places = &self.reader.places;
        let kib: usize = ids
            .iter()
            .map(|id| places.get(id).map_or(1024, |p| p.len.div_ceil(1024) as usize + 1))
            .sum();
        let since = std::time::Instant::now();
        let share = Arc::clone(self.bases)
            .acquire_many_owned(kib.min(BASES_AHEAD) as u32)
            .await
            .ok()?;
        self.waits.add(&self.waits.reading, since);
        let share = Arc::new(share);
        let mut out = HashMap::new();
        let mut answers = Vec::with_capacity(ids.len());
        for &(i, _) in wanted {
            let (tx, rx) = oneshot::channel();
            out.insert(i, (rx, Arc::clone(&share)));
            answers.push(tx);
        }
        let (reader, ids) = (Arc::clone(self.reader), ids.to_vec());
        runs.spawn(async move {
            match read_sealed_run(&reader.store, &reader.places, &ids).await {
                Ok(sealed) => answers.into_iter().zip(sealed).for_each(|(tx, b)| {
                    let _ = tx.send(Ok(b));
                }),
                Err(_) => answers.into_iter().for_each(|tx| {
                    let _ = tx.send(Err(()));
                }),
            }
        });
        Some(out)
    }
}

/// A chunk whose answer never came: a stage of the pipeline died (it panicked).
pub(crate) fn never_read(id: &ChunkId) -> RestoreError {
    RestoreError::NeverRead(id.to_string())
}

/// The decoder: take each chunk in order as its read answers, with its decompressed share of
/// [`plain_ahead`], and decompress and verify it on a blocking thread, at most one per CPU (and
/// at most `parallel`) at once; hand the answers to the feeder in order.
pub(crate) async fn decode_in_order(
    reader: Arc<ChunkReader>,
    mut reads: tokio::sync::mpsc::UnboundedReceiver<Read>,
    feeder: tokio::sync::mpsc::UnboundedSender<Started>,
    bounds: Bounds,
    waits: Arc<WaitClock>,
    buffers: Arc<Buffers>,
) {
    let plain = Arc::new(Semaphore::new(bounds.plain));
    let cpu = Arc::new(Semaphore::new(bounds.decoders));
    // Dropped with the decoder when it is aborted.
    let mut decoding = JoinSet::new();
    while let Some((r, sealed, room, base)) = reads.recv().await {
        let since = std::time::Instant::now();
        let held = Arc::clone(&plain)
            .acquire_many_owned(units(buffers.charge(r.len)))
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
        let (reader, out) = (Arc::clone(&reader), buffers.take(r.len));
        let runtime = tokio::runtime::Handle::current();
        decoding.spawn_blocking(move || {
            let opened = sealed.and_then(|bytes| reader.decode(&r, &bytes, out, base, &runtime));
            // The sealed bytes and their share go before the answer: the reader may go on.
            drop(room);
            drop(core);
            let _ = tx.send(opened);
        });
        while decoding.try_join_next().is_some() {}
    }
    while decoding.join_next().await.is_some() {}
}

/// Whether `e` says that bytes read did not open, which the fallback repository's copy may mend
/// (a store error or a missing object is not: the store asked the fallback already).
fn is_damage(e: &RestoreError) -> bool {
    matches!(
        e,
        RestoreError::Chunk(ChunkError::Corrupt { .. }) | RestoreError::ChunkLength { .. }
    )
}

/// What reads a restore's chunks from the store and opens them.
pub(crate) struct ChunkReader {
    pub store: Store,
    pub sealer: Sealer,
    pub places: Arc<Places>,
    /// The files the chunks go to, to name them in errors.
    pub files: Arc<Vec<FileToWrite>>,
    /// Bases on disk (`--delta`).
    pub bases_here: Arc<BasesHere>,
    /// The backup's chunk size: no base is longer.
    pub chunk_size: u64,
    /// Buffers bases on disk were read into, kept for the next ones (at most one per core): a
    /// fresh chunk-sized allocation per base, zeroed and faulted in, was a seventh of a delta
    /// restore's CPU time.
    pub disk_bases: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl ChunkReader {
    /// Chunk `r` opened from its sealed bytes and verified, on a decoder's blocking thread (see
    /// [`ChunkReader::open`]); a chunk stored as a difference with its base: the one whose read
    /// the reader started, or the one in the file a delta restore rewrites, or (when that file
    /// does not give it) the repository's. A chunk that does not open is read again from the
    /// fallback repository, if there is one.
    fn decode(
        &self,
        r: &ChunkRef,
        sealed: &[u8],
        out: Vec<u8>,
        base: Option<BaseRead>,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Vec<u8>, RestoreError> {
        let from_repository =
            |id: &ChunkId| runtime.block_on(read_chunk(&self.store, &self.sealer, &self.places, id));
        let delta = self.places.delta(&r.id).copied();
        let (mut base, _share) = match (base, delta) {
            (Some((read, share)), _) => (Some(runtime.block_on(self.base(r, read))?), Some(share)),
            (None, Some(d)) => match self.base_here(r) {
                Some(here) => (Some(here), None),
                None => (Some(from_repository(&d.base)?), None),
            },
            (None, None) => (None, None),
        };
        let mut opened = self.open(r, sealed, out, base.as_deref());
        if let Some(d) = delta.filter(|_| self.bases_here.contains_key(&r.id)) {
            if opened.is_err() {
                // The file did not hold the base after all: the repository's.
                let b = from_repository(&d.base)?;
                opened = self.open(r, sealed, Vec::new(), Some(&b));
                base = Some(b);
            } else if let Some(b) = base.take() {
                self.keep_base_buffer(b);
            }
        }
        match opened {
            // Rare: waited for here, on this blocking thread, rather than in the pipeline.
            Err(damage) if self.store.fallback().is_some() && is_damage(&damage) => runtime
                .block_on(self.reopen_from_fallback(r, &damage, base.as_deref()))
                .ok_or(damage),
            opened => opened,
        }
    }

    /// The base of chunk `r` (stored as a difference): the sealed bytes its run's read brings,
    /// opened; or read on its own when that read failed.
    async fn base(
        &self,
        r: &ChunkRef,
        read: oneshot::Receiver<Result<bytes::Bytes, ()>>,
    ) -> Result<Vec<u8>, ChunkError> {
        let id = self.places.delta(&r.id).expect("a base is read for a delta").base;
        match read.await {
            Ok(Ok(sealed)) => {
                open_sealed(
                    &self.store,
                    &self.sealer,
                    &self.places,
                    (&id, self.chunk_size),
                    &sealed,
                )
                .await
            }
            // Its run's read failed (or its task died): read on its own, from a fallback too.
            _ => read_chunk(&self.store, &self.sealer, &self.places, &id).await,
        }
    }

    /// The base of chunk `r`, stored as a difference, read from the file a delta restore
    /// rewrites ([`BasesHere`]): `r.len` bytes at its place (a base shorter than the chunk is
    /// followed by the zeroes the file was extended with). `None` when it has none there, or it
    /// cannot be read: the repository's is read then.
    fn base_here(&self, r: &ChunkRef) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let (path, offset) = self.bases_here.get(&r.id)?;
        let file = super::direct::open_nofollow(path, false).ok()?;
        let kept = self.disk_bases.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut buf = kept.unwrap_or_default();
        buf.resize(usize::try_from(r.len).ok()?, 0);
        file.read_exact_at(&mut buf, *offset).ok()?;
        Some(buf)
    }

    /// A base read from disk, put back together with its chunk: its buffer is kept for the
    /// next one, if there is room.
    fn keep_base_buffer(&self, buf: Vec<u8>) {
        let mut kept = self.disk_bases.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < super::budget::cpus() {
            kept.push(buf);
        }
    }

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
                        .unwrap_or_else(|| RestoreError::SameRead(msg.clone()))));
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
        let short = |got: usize| RestoreError::ShortPack {
            pack: place.pack.to_string(),
            id: first.id.to_string(),
            from: lo,
            to: hi,
            got,
        };
        if bytes.len() as u64 != hi - lo {
            // A truncated pack: the fallback repository's copy of the span, if it is whole.
            let whole = |b: &[u8]| match b.len() as u64 == hi - lo {
                true => Ok(bytes::Bytes::copy_from_slice(b)),
                false => Err(short(b.len())),
            };
            let damage = short(bytes.len()).to_string();
            let again = self.store.reread_from_fallback(&key, Some(lo..hi), damage, whole);
            return again.await.map(|b| (b, lo)).ok_or_else(|| short(bytes.len()));
        }
        Ok((bytes, lo))
    }

    /// Chunk `r` opened from the fallback repository's copy of its pack (or of itself), for
    /// one whose copy here did not open (`damage`); `None` without a fallback, or when the
    /// fallback's copy does not open either.
    async fn reopen_from_fallback(
        &self,
        r: &ChunkRef,
        damage: &RestoreError,
        base: Option<&[u8]>,
    ) -> Option<Vec<u8>> {
        let (key, range) = match self.places.get(&r.id) {
            Some(p) => (pack_key(&p.pack), Some(p.range())),
            None => (Chunk::key(&r.id), None),
        };
        let open = |b: &[u8]| self.open(r, b, Vec::new(), base);
        self.store
            .reread_from_fallback(&key, range, damage.to_string(), open)
            .await
    }

    /// Open chunk `r` from its sealed bytes and verify it. The header's length is compared with
    /// the manifest's before decompressing, so a hostile chunk cannot make the restore allocate
    /// more than the manifest's chunk size (times the chunks [`held`]); the rest is the typed
    /// read of a [`Chunk`] (envelope, hash, and that the content is what the id names). A chunk
    /// stored as a difference is opened as its difference, then put back together with `base`
    /// and checked against its own id.
    fn open(
        &self,
        r: &ChunkRef,
        sealed: &[u8],
        out: Vec<u8>,
        base: Option<&[u8]>,
    ) -> Result<Vec<u8>, RestoreError> {
        if let (Some(d), Some(base)) = (self.places.delta(&r.id), base) {
            self.check_header(r, &d.xor, sealed)?;
            let opened = open_difference(&self.sealer, (&r.id, &d.xor), sealed, out, base)?;
            return Ok(opened);
        }
        self.check_header(r, &r.id, sealed)?;
        let corrupt = |source| self.corrupt(&r.id, source);
        match stored::open_into::<Chunk>(&self.sealer, &r.id, sealed, out) {
            Ok(Chunk(content)) => Ok(content),
            Err(Damage::Envelope(e)) => Err(corrupt(e).into()),
            Err(Damage::Content(MisnamedChunk { found })) => Err(corrupt(ObjectError::ContentHash {
                expected: r.id.to_string(),
                found,
            })
            .into()),
        }
    }

    /// Chunk `id`, damaged as `source` says, named with its pack (the object to look at).
    fn corrupt(&self, id: &ChunkId, source: ObjectError) -> ChunkError {
        ChunkError::Corrupt {
            id: self.named(id),
            source: Box::new(source),
        }
    }

    /// Chunk `id`, named with its pack when it is packed.
    fn named(&self, id: &ChunkId) -> String {
        match self.places.get(id) {
            Some(p) => format!("{id} (in pack {})", p.pack),
            None => id.to_string(),
        }
    }

    /// The header of the sealed bytes at `r`'s place (those of chunk `id`, or of `r`'s
    /// difference), its length compared with `r`'s before anything is decompressed.
    fn check_header(&self, r: &ChunkRef, id: &ChunkId, sealed: &[u8]) -> Result<(), RestoreError> {
        let header = self.sealer.read_header(sealed).map_err(|e| self.corrupt(id, e))?;
        if header.original_len != r.len {
            return Err(RestoreError::ChunkLength {
                chunk: self.named(id),
                file: self.files[r.file].path.display().to_string(),
                holds: header.original_len,
                says: r.len,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::testing::r;

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
}
