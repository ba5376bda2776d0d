//! Packs: many sealed chunks in one object, `packs/<first 2 hex>/<blake3 hex>.wvp`.
//!
//! A chunk stored on its own costs one object: a PUT, and on `file://` a file, an `fsync` and a
//! directory `fsync`, whatever its size; a cluster of 20,000 small relations made as many objects
//! and spent most of its backup on them. A pack holds the sealed chunks a backup uploads, exactly
//! the bytes each would have under `chunks/`, one after the other up to [`PACK_TARGET`] bytes.
//! The manifest (format v2) lists each pack with its chunks and their stored lengths in order, so
//! a chunk's place is its pack and the sum of the lengths before it; a restore reads one chunk,
//! or a run of neighbours, with a ranged read and opens it as it would a chunk object. A pack is
//! named by the blake3 hash of its bytes, so writing one again is harmless and `verify` can
//! check it whole. Chunks stay content-addressed: the next backup finds the chunks of the
//! previous one in its manifest, and names their packs in its own.
//!
//! A pack is deleted by `expire` once no manifest lists it (the whole pack: a pack some of whose
//! chunks are no longer referenced keeps their bytes until all are, as pgBackRest's bundles
//! do).

use std::collections::HashMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::chunk_id::ChunkId;
pub use super::chunk_id::PackId;

/// Bytes a backup gathers in a pack before writing it: large enough that the per-object cost
/// (a PUT's round trip, a file's `fsync`) is small beside the transfer, small enough that the
/// packs in flight stay within the backup's memory bound.
pub const PACK_TARGET: usize = 4 << 20;

/// One pack as a manifest lists it: its chunks in the order they are stored, with their stored
/// (sealed) lengths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackRecord {
    pub id: PackId,
    pub chunks: Vec<ChunkId>,
    pub lengths: Vec<u64>,
}

impl PackRecord {
    /// The pack's length: the sum of its chunks' (validated manifests cannot overflow it).
    pub fn len(&self) -> u64 {
        self.lengths.iter().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Each chunk with its place in the pack.
    pub fn places(&self) -> impl Iterator<Item = (ChunkId, Place)> + '_ {
        self.chunks
            .iter()
            .zip(&self.lengths)
            .scan(0u64, move |offset, (id, len)| {
                let place = Place {
                    pack: self.id,
                    offset: *offset,
                    len: *len,
                };
                *offset += len;
                Some((*id, place))
            })
    }
}

/// A chunk stored as its difference from a chunk an earlier backup stored whole, at the same
/// place of the same file (manifest version 4; see `docs/FORMAT.md`, "Chunks stored as differences"):
/// its content is `xor`'s content, byte by byte exclusive-or'ed with `base`'s (read as zeroes
/// past `base`'s end). A changed page or a tuple changed in place leaves the rest of a 1 MiB
/// chunk equal, and the difference compresses to the bytes that changed. `base` is always a
/// chunk stored whole, so a restore reads two chunks for one, never a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Delta {
    /// The content's id, as entries reference it.
    pub chunk: ChunkId,
    /// The chunk stored whole the difference is from.
    pub base: ChunkId,
    /// The chunk holding the difference: as long as the content, and packed.
    pub xor: ChunkId,
}

/// Where a packed chunk's sealed bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub pack: PackId,
    pub offset: u64,
    pub len: u64,
}

impl Place {
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.len
    }
}

/// Where every packed chunk of a manifest is; a chunk not here is stored on its own (manifest
/// v1, or a chunk an older backup stored so). The first place listed wins when a chunk is in
/// two packs (both hold the same bytes).
///
/// A chunk stored as a difference ([`Delta`], manifest v4) is placed where its difference is:
/// what reads its place reads the difference, and opens it with [`Places::delta`]'s base.
#[derive(Debug, Default, Clone)]
pub struct Places {
    places: HashMap<ChunkId, Place>,
    /// Each pack's position in the manifest's list (the order the backup wrote them).
    seq: HashMap<PackId, u32>,
    /// The chunks stored as differences, by content id (none placed whole).
    deltas: HashMap<ChunkId, Delta>,
}

impl Places {
    pub fn of<'a>(packs: impl IntoIterator<Item = &'a PackRecord>) -> Places {
        let (mut places, mut seq) = (HashMap::new(), HashMap::new());
        for p in packs {
            let n = u32::try_from(seq.len()).unwrap_or(u32::MAX);
            seq.entry(p.id).or_insert(n);
            for (id, place) in p.places() {
                places.entry(id).or_insert(place);
            }
        }
        Places {
            places,
            seq,
            deltas: HashMap::new(),
        }
    }

    /// These places, and `deltas` read from their differences' places (a chunk placed whole
    /// is read whole, whatever a delta says of it).
    pub fn with_deltas(mut self, deltas: &[Delta]) -> Places {
        self.deltas = deltas
            .iter()
            .filter(|d| !self.places.contains_key(&d.chunk))
            .map(|d| (d.chunk, *d))
            .collect();
        self
    }

    /// Where chunk `id`'s sealed bytes are: its own, or for a chunk stored as a difference, the
    /// difference's.
    pub fn get(&self, id: &ChunkId) -> Option<&Place> {
        match self.places.get(id) {
            Some(p) => Some(p),
            None => self.places.get(&self.deltas.get(id)?.xor),
        }
    }

    /// How chunk `id` is read when it is stored as a difference: the bytes at its place
    /// ([`Places::get`]) are chunk [`Delta::xor`], to combine with [`Delta::base`].
    pub fn delta(&self, id: &ChunkId) -> Option<&Delta> {
        self.deltas.get(id)
    }

    /// Where chunk `id` lies in the order the backup wrote it: its pack's position in the
    /// manifest, and its offset there.
    pub fn position(&self, id: &ChunkId) -> Option<(u32, u64)> {
        let place = self.get(id)?;
        Some((*self.seq.get(&place.pack)?, place.offset))
    }

    pub fn len(&self) -> usize {
        self.places.len()
    }

    pub fn is_empty(&self) -> bool {
        self.places.is_empty()
    }
}

/// A pack being filled by a backup.
#[derive(Debug, Default)]
pub struct PackBuilder {
    bytes: Vec<u8>,
    chunks: Vec<ChunkId>,
    lengths: Vec<u64>,
}

impl PackBuilder {
    /// Append sealed chunk `id`; true when the pack has reached [`PACK_TARGET`].
    pub fn add(&mut self, id: ChunkId, sealed: &[u8]) -> bool {
        if self.bytes.capacity() == 0 {
            // Room for the chunk that crosses the target, whatever its size (up to 1 MiB chunks
            // and then some: a larger one costs one reallocation).
            self.bytes.reserve_exact(PACK_TARGET + (2 << 20));
        }
        self.bytes.extend_from_slice(sealed);
        self.chunks.push(id);
        self.lengths.push(sealed.len() as u64);
        self.bytes.len() >= PACK_TARGET
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// The pack's bytes and its record, named by their hash.
    pub fn seal(self) -> (Bytes, PackRecord) {
        let id = PackId::of(&self.bytes);
        let record = PackRecord {
            id,
            chunks: self.chunks,
            lengths: self.lengths,
        };
        (Bytes::from(self.bytes), record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cid(b: u8) -> ChunkId {
        ChunkId::from_hash([b; 32])
    }

    #[test]
    fn a_packed_chunk_is_found_at_the_sum_of_the_lengths_before_it() {
        let mut b = PackBuilder::default();
        assert!(!b.add(cid(1), b"aaaa"));
        assert!(!b.add(cid(2), b"bb"));
        assert!(!b.add(cid(3), b"cccccc"));
        let (bytes, record) = b.seal();
        assert_eq!(record.id, PackId::of(b"aaaabbcccccc"));
        assert_eq!(record.len(), bytes.len() as u64);
        let places = Places::of([&record]);
        for (id, want) in [(cid(1), &b"aaaa"[..]), (cid(2), b"bb"), (cid(3), b"cccccc")] {
            let p = places.get(&id).unwrap();
            assert_eq!(p.pack, record.id);
            let r = p.range();
            assert_eq!(&bytes[r.start as usize..r.end as usize], want);
        }
        assert!(places.get(&cid(4)).is_none());
    }

    #[test]
    fn a_pack_is_full_once_it_reaches_the_target() {
        let mut b = PackBuilder::default();
        let big = vec![7u8; PACK_TARGET / 2];
        assert!(!b.add(cid(1), &big));
        assert!(b.add(cid(2), &big));
    }

    #[test]
    fn the_first_place_of_a_chunk_in_two_packs_wins() {
        let a = PackRecord {
            id: PackId::from_hash([0xa; 32]),
            chunks: vec![cid(1), cid(2)],
            lengths: vec![3, 5],
        };
        let b = PackRecord {
            id: PackId::from_hash([0xb; 32]),
            chunks: vec![cid(2)],
            lengths: vec![5],
        };
        let places = Places::of([&a, &b]);
        assert_eq!(
            places.get(&cid(2)),
            Some(&Place {
                pack: a.id,
                offset: 3,
                len: 5
            })
        );
        assert_eq!(places.len(), 2);
    }
}
