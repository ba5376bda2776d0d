//! Chunks stored as their difference from the previous backup's chunk at the same place of the
//! same file ([`Delta`], manifest version 4; `docs/FORMAT.md`, "Chunks stored as
//! differences"). A random 1% of a table's rows updated touches about half its pages, and so
//! every 1 MiB chunk of it; yet each page changes by a tuple or two. The new chunk, exclusive-or'ed
//! with the old one, is zeroes but for those bytes, and compresses to little more than them: the
//! page-level increment of pgBackRest's block incremental or PostgreSQL 17's incremental
//! backups, with each backup still restorable on its own (its manifest names the base, which
//! `expire` keeps while any kept manifest does).
//!
//! The base is always a chunk stored whole (a chunk that is a difference already gives its own
//! base), so a restore reads two chunks for one and never a chain. Unlike a page LSN test, the
//! bytes are compared, not assumed: a restore checks the result against the chunk's id.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use super::inventory::Previous;
use super::prior_files::PriorFiles;
use crate::basebackup::chunk::{self, ChunkError, ChunkId};
use crate::basebackup::manifest::Delta;
use crate::basebackup::pack::{PackRecord, Places};
use crate::repo::object::Sealer;
use crate::repo::{Store, WritableStore};

/// A chunk is stored as its difference from the previous backup's chunk at the same place
/// ([`Delta`]) when at most this share of its bytes differ (one in this many): past it the
/// difference would compress little better than the chunk, and a restore reads two chunks.
const DELTA_MAX_CHANGED_DIVISOR: usize = 2;

/// Bases read at once, ahead of need, when a file's pieces change one after the other (a table
/// updated throughout): each a ranged read of neighbours in a pack, so that an object store
/// answers a request per run rather than per chunk.
const READ_AHEAD: usize = 16;

/// Bases read ahead and not yet asked for, at most: the oldest are forgotten (and read again if
/// asked for).
const AHEAD_MAX: usize = 48;

/// The sealed bytes of a base, being read ([`Shared`]: every chunk task asking for it awaits
/// the same read); `None` when the read failed (the base is then read on its own).
type SealedRead = Shared<BoxFuture<'static, Option<Bytes>>>;

/// Where a piece of a file being backed up was in the previous backup: the chunk it may be
/// stored as a difference from, and the file and index (for reading ahead).
#[derive(Debug, Clone)]
pub(super) struct BaseRef {
    pub id: ChunkId,
    pub path: Arc<str>,
    pub idx: usize,
}

/// The previous backup's chunks, as a backup reads them to store a chunk as a difference.
pub(super) struct DeltaBases {
    store: Store,
    places: Arc<Places>,
    /// The previous backup's files: their chunks, found by a binary search over its sorted
    /// paths ([`DeltaBases::whole_file`]), not through a map of every file read whole that
    /// copies each path and its chunk ids.
    files: Arc<PriorFiles>,
    /// [`Previous::absent`]: no base.
    absent: HashSet<ChunkId>,
    ahead: Mutex<Ahead>,
    /// The previous backup's chunk size: no base is longer.
    chunk_size: u64,
}

/// The bases being read or read ahead.
#[derive(Default)]
struct Ahead {
    /// By id, with the order they were started in; `None` once asked for (its bytes are let
    /// go, and it is not read ahead again).
    reads: HashMap<ChunkId, (u64, Option<SealedRead>)>,
    started: u64,
    /// The last piece asked for: a piece near it in the same file means its pieces change one
    /// after the other, and the bases after it are read ahead.
    last: Option<(Arc<str>, usize)>,
}

impl DeltaBases {
    pub(super) fn of(store: &WritableStore, previous: &Previous) -> DeltaBases {
        let places = previous.frame.places();
        DeltaBases {
            store: store.reader(),
            files: Arc::clone(&previous.files),
            absent: previous.absent.clone(),
            places: Arc::new(places),
            ahead: Mutex::default(),
            chunk_size: previous.frame.chunk_size,
        }
    }

    /// The previous backup's file at `path` when it read it whole (not as a slice of a shared
    /// chunk) and it has chunks.
    fn whole_file(&self, path: &str) -> Option<usize> {
        let at = self.files.find(path)?;
        (self.files.is_file(at) && !self.files.is_within(at) && self.files.chunk_count(at) > 0).then_some(at)
    }

    /// The chunk piece `idx` of file `at` may be stored as a difference from: its own chunk, or
    /// the base of its own chunk when that is a difference already (so that a difference is
    /// always from a chunk stored whole). None past its end, or for a chunk [`Previous::absent`].
    fn base_in(&self, at: usize, idx: usize) -> Option<ChunkId> {
        let c = self.files.chunk(at, idx)?;
        (!self.absent.contains(c)).then(|| self.places.delta(c).map_or(*c, |d| d.base))
    }

    /// The chunk piece `idx` of the file at `path` may be stored as a difference from.
    pub(super) fn base_of(&self, path: &Arc<str>, idx: usize) -> Option<BaseRef> {
        let id = self.base_in(self.whole_file(path)?, idx)?;
        Some(BaseRef {
            id,
            path: Arc::clone(path),
            idx,
        })
    }

    /// Base `b`'s bytes; `None`, with a warning, when they cannot be read (gone, damaged): that
    /// only costs the difference, the new chunk is stored whole.
    pub(super) async fn read(&self, sealer: &Sealer, b: &BaseRef) -> Option<Vec<u8>> {
        let sealed = self.read_of(b).await;
        self.forget(b);
        let opened = match sealed {
            Some(bytes) => {
                chunk::open_sealed(
                    &self.store,
                    sealer,
                    &self.places,
                    (&b.id, self.chunk_size),
                    &bytes,
                )
                .await
            }
            None => chunk::read_chunk(&self.store, sealer, &self.places, &b.id).await,
        };
        match opened {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                let base = b.id;
                tracing::warn!(
                    "chunk {base} of the previous backup cannot be read ({e}); storing the new one whole"
                );
                None
            }
        }
    }

    /// Base `b` is not needed (any more: its piece is unchanged, or its bytes were taken): its
    /// bytes, if read ahead, are let go, and it is not read ahead again.
    pub(super) fn forget(&self, b: &BaseRef) {
        if let Some((_, r)) = self.ahead.lock().expect("never poisoned").reads.get_mut(&b.id) {
            *r = None;
        }
    }

    /// The read of base `b`: under way already (read ahead), or started now; and when the
    /// file's pieces change one after the other, the reads of the bases after it.
    fn read_of(&self, b: &BaseRef) -> SealedRead {
        let mut a = self.ahead.lock().expect("never poisoned");
        let dense = a
            .last
            .as_ref()
            .is_some_and(|(path, idx)| *path == b.path && idx.abs_diff(b.idx) <= 4);
        a.last = Some((Arc::clone(&b.path), b.idx));
        let read = match a.reads.get(&b.id) {
            Some((_, Some(r))) => r.clone(),
            // Never read, or asked for before (the same base twice): read now.
            _ => {
                self.start(&mut a, vec![b.id]);
                a.reads[&b.id].1.clone().expect("just started")
            }
        };
        let Some(file) = self.whole_file(&b.path) else {
            return read;
        };
        let after = || (b.idx + 1..self.files.chunk_count(file)).map_while(|i| self.base_in(file, i));
        // Once less than half a run is read ahead, the next run: the following bases not yet
        // being read.
        if dense
            && after()
                .take(READ_AHEAD)
                .filter(|c| a.reads.contains_key(c))
                .count()
                < READ_AHEAD / 2
        {
            let next: Vec<ChunkId> = after()
                .skip_while(|c| a.reads.contains_key(c))
                .take(READ_AHEAD)
                .take_while(|c| !a.reads.contains_key(c))
                .collect();
            if !next.is_empty() {
                self.start(&mut a, next);
            }
        }
        read
    }

    /// Start reading the first run of `ids` ([`chunk::sealed_runs`]) with one ranged read, in a
    /// task of its own, and note each of its bases' reads; forget the oldest beyond
    /// [`AHEAD_MAX`].
    fn start(&self, a: &mut Ahead, ids: Vec<ChunkId>) {
        let run = chunk::sealed_runs(&self.places, &ids, READ_AHEAD)
            .into_iter()
            .next()
            .unwrap_or(0..0);
        let ids: Vec<ChunkId> = ids[run].to_vec();
        let (store, places, wanted) = (self.store.clone(), Arc::clone(&self.places), ids.clone());
        let task = tokio::spawn(async move { chunk::read_sealed_run(&store, &places, &wanted).await.ok() });
        let whole = async move { task.await.ok().flatten().map(Arc::new) }
            .boxed()
            .shared();
        for (i, id) in ids.into_iter().enumerate() {
            let one = whole
                .clone()
                .map(move |run| run.and_then(|r| r.get(i).cloned()))
                .boxed()
                .shared();
            a.started += 1;
            let n = a.started;
            a.reads.insert(id, (n, Some(one)));
        }
        while a.reads.len() > AHEAD_MAX {
            let oldest = a.reads.iter().min_by_key(|(_, (n, _))| *n).map(|(id, _)| *id);
            a.reads.remove(&oldest.expect("not empty"));
        }
    }
}

/// A new chunk sealed: whole, or as its difference from a base.
pub(super) enum Sealed {
    Whole(Result<Bytes, ChunkError>),
    /// The difference's id, and its sealed bytes unless this backup stored the same
    /// difference already (counted there).
    Delta {
        xor: ChunkId,
        sealed: Option<Result<Bytes, ChunkError>>,
    },
}

/// How many of `bytes` are not zero. Counted a block of 64 at a time into a byte, which the
/// compiler turns into vector compares: byte by byte into a `usize` it widened every byte, and
/// that count was a fifth of a second backup's CPU time after a random 1% update.
fn nonzero_bytes(bytes: &[u8]) -> usize {
    let blocks = bytes.chunks_exact(64);
    let rest = blocks.remainder().iter().filter(|b| **b != 0).count();
    blocks
        .map(|b| b.iter().map(|x| u8::from(*x != 0)).sum::<u8>() as usize)
        .sum::<usize>()
        + rest
}

/// New chunk `data` (hash `hash`) sealed as its difference from `base` (its bytes, `None` when
/// they could not be read) when at most one byte in [`DELTA_MAX_CHANGED_DIVISOR`] differs, else
/// whole. `xors`: the differences this backup stored, each stored once.
pub(super) fn seal_delta(
    sealer: &Sealer,
    level: i32,
    xors: &Mutex<HashSet<[u8; 32]>>,
    hash: [u8; 32],
    data: &[u8],
    base: Option<Vec<u8>>,
) -> Sealed {
    let whole = || Sealed::Whole(chunk::seal_chunk(sealer, hash, data, level));
    let Some(mut diff) = base else {
        return whole();
    };
    diff.resize(data.len(), 0);
    chunk::xor_into(&mut diff, data);
    let changed = nonzero_bytes(&diff);
    if changed * DELTA_MAX_CHANGED_DIVISOR > data.len() {
        return whole();
    }
    let xor_hash = sealer.content_hash(&diff);
    if xor_hash == hash {
        // A base of zeroes: the difference is the chunk.
        return whole();
    }
    let xor = ChunkId::from_hash(xor_hash);
    // Differences are deduplicated among themselves only: a chunk met as content may be
    // stored as a difference itself, and a difference must be a chunk stored whole.
    if !xors.lock().expect("never poisoned").insert(xor_hash) {
        return Sealed::Delta { xor, sealed: None };
    }
    Sealed::Delta {
        xor,
        sealed: Some(chunk::seal_chunk(sealer, xor_hash, &diff, level)),
    }
}

/// The deltas a manifest whose entries name `named` lists, sorted: those this backup stored
/// (`new`), and for each chunk named that the previous backup stored as a difference (met
/// again, or in a file taken over unread), its delta, unless this backup stored it whole.
pub(super) fn deltas_named<'a>(
    named: impl Iterator<Item = &'a ChunkId>,
    written: &[PackRecord],
    new: HashMap<[u8; 32], (ChunkId, ChunkId)>,
    previous: Option<&Previous>,
) -> Vec<Delta> {
    let mut out: BTreeMap<ChunkId, Delta> = new
        .into_iter()
        .map(|(hash, (base, xor))| {
            let chunk = ChunkId::from_hash(hash);
            (chunk, Delta { chunk, base, xor })
        })
        .collect();
    if let Some(p) = previous.filter(|p| !p.frame.deltas.is_empty()) {
        let whole: HashSet<ChunkId> = written.iter().flat_map(|p| p.chunks.iter().copied()).collect();
        let theirs: HashMap<ChunkId, Delta> = p.frame.deltas.iter().map(|d| (d.chunk, *d)).collect();
        for c in named {
            if let Some(d) = theirs.get(c).filter(|_| !whole.contains(c)) {
                out.entry(*c).or_insert(*d);
            }
        }
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::basebackup::manifest::Manifest;
    use crate::commands::backup::inventory::{Inventory, Roots};
    use crate::commands::backup::upload::{Copied, CopyOptions, copy_files};
    use crate::commands::backup::walk::{Source, Walk};
    use crate::repo::fault::{Fault, FaultStore};

    const CS: usize = 1 << 20;
    const PATH: &str = "base/5/16384";

    #[test]
    fn nonzero_bytes_are_counted_whatever_the_length() {
        let bytes: Vec<u8> = (0..1000u32)
            .map(|i| if i % 3 == 0 { 0 } else { (i % 256) as u8 })
            .collect();
        for n in [0, 1, 63, 64, 65, 128, 999, 1000] {
            let want = bytes[..n].iter().filter(|b| **b != 0).count();
            assert_eq!(nonzero_bytes(&bytes[..n]), want, "{n} bytes");
        }
        assert_eq!(nonzero_bytes(&[0xff; 64 * 5]), 64 * 5);
    }

    /// Bytes that do not compress: what a chunk stored whole costs in full.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Back up one relation file holding `content`, on top of `previous`.
    async fn back_up(store: &WritableStore, content: &[u8], previous: Option<&Previous>) -> Copied {
        let dir = tempfile::tempdir().unwrap();
        let abs = dir.path().join(PATH);
        std::fs::create_dir_all(abs.parent().unwrap()).unwrap();
        std::fs::write(&abs, content).unwrap();
        let inventory = Inventory {
            sources: Arc::new(
                Walk::of(vec![Source {
                    rel: PATH.into(),
                    is_dir: false,
                    mode: 0o600,
                }])
                .unwrap(),
            ),
            tablespaces: vec![],
            roots: Roots::of(dir.path()),
            examined_after_ns: 0,
        };
        let opts = CopyOptions {
            chunk_size: CS as u64,
            parallel: 2,
            level: 3,
            pg_version: 17,
            pages: None,
        };
        copy_files(store, &Sealer::plain(), inventory, opts, previous)
            .await
            .unwrap()
    }

    /// The manifest a backup that copied `copied` writes (checked as a restore checks it), and
    /// what the next backup builds on.
    fn recorded(copied: Copied) -> Recorded {
        let mut m = Manifest::parse(include_bytes!("../../../tests/fixtures/manifest-v1.json")).unwrap();
        m.chunk_size = CS as u64;
        m.version = if copied.deltas.is_empty() { 2 } else { 4 };
        (m.entries, m.files) = copied.listing.lists();
        m.packs = copied.packs;
        m.deltas = copied.deltas;
        let manifest = Manifest::parse(&m.to_json()).expect("a manifest with deltas validates");
        let mut previous = Previous::of(&manifest);
        previous.take_over = false;
        Recorded { manifest, previous }
    }

    /// A backup's manifest, and the backup as the next one reads it.
    struct Recorded {
        manifest: Manifest,
        previous: Previous,
    }

    /// The file as a restore reads it, from the backup's own manifest only.
    async fn read_back(store: &WritableStore, b: &Recorded) -> Vec<u8> {
        let places = b.manifest.places();
        let mut out = vec![];
        let reader = store.reader();
        for id in &b.manifest.entries[0].chunks {
            out.extend(
                chunk::read_chunk(&reader, &Sealer::plain(), &places, id)
                    .await
                    .unwrap(),
            );
        }
        out
    }

    #[tokio::test]
    async fn changed_bytes_are_stored_as_differences_and_read_back_exactly() {
        let faults = Arc::new(FaultStore::new(Fault::None));
        let store = FaultStore::s3_like(&faults, std::time::Duration::from_secs(5));
        // Four chunks and a half, none of which compresses.
        let v1 = noise(4 * CS + CS / 2, 1);
        let b1 = recorded(back_up(&store, &v1, None).await);
        assert!(b1.manifest.deltas.is_empty(), "nothing to differ from");

        // Chunk 0: 200 bytes changed here and there; chunk 2 rewritten; the last one grown.
        let mut v2 = v1.clone();
        for i in 0..200 {
            v2[i * 4099] ^= 0x5a;
        }
        v2[2 * CS..3 * CS].copy_from_slice(&noise(CS, 2));
        v2.extend(noise(1000, 3));
        let copied = back_up(&store, &v2, Some(&b1.previous)).await;
        let uploaded = copied.stats.new_bytes;
        let b2 = recorded(copied);
        assert_eq!(
            read_back(&store, &b2).await,
            v2,
            "the second backup reads back exactly"
        );
        let chunks = &b2.manifest.entries[0].chunks;
        let firsts = &b1.manifest.entries[0].chunks;
        let want: Vec<Delta> = [0, 4]
            .iter()
            .map(|&i| (chunks[i], firsts[i]))
            .map(|(chunk, base)| {
                let xor = b2.manifest.deltas.iter().find(|d| d.chunk == chunk).unwrap().xor;
                (chunk, Delta { chunk, base, xor })
            })
            .collect::<BTreeMap<_, _>>()
            .into_values()
            .collect();
        assert_eq!(
            b2.manifest.deltas, want,
            "the two chunks a few bytes changed are differences from the first backup's; the \
             rewritten one is whole"
        );
        assert!(
            uploaded < CS as u64 + 64 * 1024,
            "the second backup stores the rewritten chunk and little more: {uploaded} bytes"
        );

        // Chunk 0 changed again: its difference is from the first backup's chunk, which is
        // stored whole, not from the second's difference. The last chunk, unchanged, is still
        // read from the second backup's difference.
        let mut v3 = v2.clone();
        v3[CS / 2] ^= 0xff;
        let b3 = recorded(back_up(&store, &v3, Some(&b2.previous)).await);
        assert_eq!(
            read_back(&store, &b3).await,
            v3,
            "the third backup reads back exactly"
        );
        let third = &b3.manifest.entries[0].chunks;
        let d0 = b3.manifest.deltas.iter().find(|d| d.chunk == third[0]).unwrap();
        assert_eq!(
            d0.base, firsts[0],
            "a difference is always from a chunk stored whole"
        );
        let d4 = b2.manifest.deltas.iter().find(|d| d.chunk == chunks[4]).unwrap();
        assert!(
            b3.manifest.deltas.contains(d4),
            "the unchanged difference is named again"
        );
    }

    #[test]
    fn a_chunk_mostly_rewritten_or_over_zeroes_is_stored_whole() {
        let sealer = Sealer::plain();
        let xors = Mutex::default();
        let data = noise(8192, 9);
        let hash = sealer.content_hash(&data);
        let whole = |s: &Sealed| matches!(s, Sealed::Whole(_));
        assert!(whole(&seal_delta(
            &sealer,
            3,
            &xors,
            hash,
            &data,
            Some(noise(8192, 10))
        )));
        assert!(whole(&seal_delta(
            &sealer,
            3,
            &xors,
            hash,
            &data,
            Some(vec![0; 8192])
        )));
        assert!(whole(&seal_delta(&sealer, 3, &xors, hash, &data, None)));
        let mut base = data.clone();
        base[100] ^= 1;
        let first = seal_delta(&sealer, 3, &xors, hash, &data, Some(base.clone()));
        assert!(matches!(first, Sealed::Delta { sealed: Some(_), .. }));
        // The same difference again is stored once.
        let again = seal_delta(&sealer, 3, &xors, hash, &data, Some(base));
        assert!(matches!(again, Sealed::Delta { sealed: None, .. }));
    }
}
