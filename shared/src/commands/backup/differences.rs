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
use std::sync::Mutex;

use bytes::Bytes;

use super::inventory::Previous;
use crate::basebackup::chunk::{self, ChunkError, ChunkId};
use crate::basebackup::manifest::{Delta, Entry};
use crate::basebackup::pack::{PackRecord, Places};
use crate::repo::object::Sealer;
use crate::repo::{Store, WritableStore};

/// A chunk is stored as its difference from the previous backup's chunk at the same place
/// ([`Delta`]) when at most this share of its bytes differ (one in this many): past it the
/// difference would compress little better than the chunk, and a restore reads two chunks.
pub(super) const DELTA_MAX_CHANGED_DIVISOR: usize = 2;

/// The previous backup's chunks, as a backup reads them to store a chunk as a difference.
pub(super) struct DeltaBases {
    store: Store,
    places: Places,
    /// See [`Previous::delta_bases`].
    by_path: HashMap<String, Vec<Option<ChunkId>>>,
}

impl DeltaBases {
    pub(super) fn of(store: &WritableStore, previous: &Previous) -> DeltaBases {
        DeltaBases {
            store: store.reader(),
            places: previous.manifest.places(),
            by_path: previous.delta_bases(),
        }
    }

    /// The chunk piece `idx` of the file at `path` may be stored as a difference from.
    pub(super) fn base_of(&self, path: &str, idx: usize) -> Option<ChunkId> {
        *self.by_path.get(path)?.get(idx)?
    }

    /// Chunk `base`'s bytes; `None`, with a warning, when they cannot be read (gone, damaged):
    /// that only costs the difference, the new chunk is stored whole.
    pub(super) async fn read(&self, sealer: &Sealer, base: &ChunkId) -> Option<Vec<u8>> {
        match chunk::read_chunk(&self.store, sealer, &self.places, base).await {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!(
                    "chunk {base} of the previous backup cannot be read ({e}); storing the new one whole"
                );
                None
            }
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
    let changed = diff.iter().filter(|b| **b != 0).count();
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

/// The deltas a manifest with `entries` lists, sorted: those this backup stored (`new`), and
/// for each chunk the entries reference that the previous backup stored as a difference (met
/// again, or in a file taken over unread), its delta, unless this backup stored it whole.
pub(super) fn deltas_named(
    entries: &[Entry],
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
    if let Some(p) = previous.filter(|p| !p.manifest.deltas.is_empty()) {
        let whole: HashSet<ChunkId> = written.iter().flat_map(|p| p.chunks.iter().copied()).collect();
        let theirs: HashMap<ChunkId, Delta> = p.manifest.deltas.iter().map(|d| (d.chunk, *d)).collect();
        for c in entries.iter().flat_map(|e| e.chunks.iter()) {
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
    use crate::commands::backup::inventory::{Inventory, Source};
    use crate::commands::backup::upload::{Copied, CopyOptions, copy_files};
    use crate::repo::fault::{Fault, FaultStore};

    const CS: usize = 1 << 20;
    const PATH: &str = "base/5/16384";

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
        let abs = dir.path().join("16384");
        std::fs::write(&abs, content).unwrap();
        let inventory = Inventory {
            sources: vec![Source {
                abs,
                rel: PATH.into(),
                is_dir: false,
                mode: 0o600,
            }],
            tablespaces: vec![],
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
    fn recorded(copied: Copied) -> Previous {
        let mut m = Manifest::parse(include_bytes!("../../../tests/fixtures/manifest-v1.json")).unwrap();
        m.chunk_size = CS as u64;
        m.version = if copied.deltas.is_empty() { 2 } else { 4 };
        m.entries = copied.entries;
        m.files = copied.files;
        m.packs = copied.packs;
        m.deltas = copied.deltas;
        let manifest = Manifest::parse(&m.to_json()).expect("a manifest with deltas validates");
        Previous {
            manifest,
            take_over: false,
            absent: Default::default(),
        }
    }

    /// The file as a restore reads it, from the backup's own manifest only.
    async fn read_back(store: &WritableStore, b: &Previous) -> Vec<u8> {
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
        let copied = back_up(&store, &v2, Some(&b1)).await;
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
        let b3 = recorded(back_up(&store, &v3, Some(&b2)).await);
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
