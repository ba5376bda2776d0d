//! The order a restore reads and writes its chunks in: the packs' order when that interleaves
//! few enough files (each file's writer waits for its next chunk holding a writer slot), else
//! the files'.

use std::collections::{HashMap, HashSet};

use crate::basebackup::chunk::ChunkId;
use crate::basebackup::pack::Places;

/// One reference to a chunk: chunk `index` of file `file` (offset `index` × chunk size), with
/// the id and length the manifest gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkRef {
    pub file: usize,
    pub index: u64,
    pub id: ChunkId,
    pub len: u64,
    /// A small file's only chunk, shared with its neighbours: the file is the chunk's bytes
    /// from this offset, as long as the file ([`crate::basebackup::manifest::Within`]).
    pub within: Option<u64>,
}

/// Where a reference goes in the restore's order: its chunk's place in the order the backup
/// wrote it, chunks stored on their own after every packed one.
type PackKey = (bool, u32, u64);

/// `refs` (in file and chunk order) in the order their chunks lie in the packs, when that keeps
/// at most `most` files open at once (each holds a writer slot while it waits for its next
/// chunk: the restore gives half of [`super::budget::OPEN_FILES`], so that the feeder never
/// waits for a slot only a later chunk would free); else unchanged. A file's chunks may then
/// come out of their order (a backup's tasks seal a file's chunks in parallel): each is written
/// at its offset. A backup packs together the chunks of the files its tasks read at once, so
/// reading in file order cut each pack into a stretch per file (43 reads for the 9 packs of
/// pgbench scale 50, 18 in pack order), while reading in pack order takes each pack whole and
/// keeps that many writers busy: one thread's writes into one large file (about 0.9 GB/s here)
/// were what the restore waited on. A chunk met again (a zeroed
/// page, a copy) goes with its neighbours in its own file, so that it does not hold that file
/// open from the first time it was met.
pub(crate) fn in_pack_order(refs: Vec<ChunkRef>, places: &Places, most: usize) -> Vec<ChunkRef> {
    let mut seen = HashSet::new();
    let mut keys: Vec<PackKey> = Vec::with_capacity(refs.len());
    for group in refs.chunk_by(|a, b| a.file == b.file) {
        // The first time a chunk is met, its own place; after that, its neighbour's in this file.
        let own: Vec<Option<PackKey>> = group
            .iter()
            .map(|r| {
                let key = match places.position(&r.id) {
                    Some((seq, offset)) => (false, seq, offset),
                    None => (true, 0, 0),
                };
                // A shared chunk's files are restored side by side, whichever met it first.
                (seen.insert(r.id) || r.within.is_some()).then_some(key)
            })
            .collect();
        let fallback = own.iter().flatten().next().copied().unwrap_or((true, 0, 0));
        let mut last = fallback;
        keys.extend(own.into_iter().map(|k| {
            last = k.unwrap_or(last);
            last
        }));
    }
    let mut order: Vec<usize> = (0..refs.len()).collect();
    // Stable: a file's chunks with one key keep their order.
    order.sort_by_key(|&i| keys[i]);
    let sorted: Vec<ChunkRef> = order.into_iter().map(|i| refs[i]).collect();
    let open = most_open(&sorted);
    let packed = open <= most;
    tracing::debug!(
        "restore order: {} (in pack order, at most {open} files would be open at once)",
        if packed { "the packs'" } else { "the files'" }
    );
    if packed { sorted } else { refs }
}

/// The most files open at once in `order`: a file is open from its first chunk to its last.
fn most_open(order: &[ChunkRef]) -> usize {
    let mut last: HashMap<usize, usize> = HashMap::new();
    for (i, r) in order.iter().enumerate() {
        last.insert(r.file, i);
    }
    let (mut open, mut most) = (HashSet::new(), 0);
    for (i, r) in order.iter().enumerate() {
        open.insert(r.file);
        most = most.max(open.len());
        if last[&r.file] == i {
            open.remove(&r.file);
        }
    }
    most
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::testing::r;

    /// Two files packed together (as a backup's two tasks pack them) are restored in pack
    /// order; a chunk met again goes with its own file's neighbours; chunks stored on their own
    /// come last.
    #[test]
    fn chunks_go_in_pack_order() {
        use crate::basebackup::pack::{PackId, PackRecord};
        let c = |b: u8| ChunkId::from_hash([b; 32]);
        // One pack: a0 b0 a1 b1 a2; file 0 is a0 a1 a2 (then a0 again), file 1 is b0 b1.
        let pack = PackRecord {
            id: PackId::from_hash([9; 32]),
            chunks: vec![c(0xa0), c(0xb0), c(0xa1), c(0xb1), c(0xa2)],
            lengths: vec![100; 5],
        };
        let places = Places::of([&pack]);
        let refs = vec![
            r(c(0xa0), 8, 0, 0),
            r(c(0xa1), 8, 0, 1),
            r(c(0xa2), 8, 0, 2),
            r(c(0xa0), 8, 0, 3),
            r(c(0xb0), 8, 1, 0),
            r(c(0xb1), 8, 1, 1),
        ];
        let order = |v: Vec<ChunkRef>| v.iter().map(|r| (r.file, r.index)).collect::<Vec<_>>();
        assert_eq!(
            order(in_pack_order(refs.clone(), &places, 32)),
            vec![(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (0, 3)]
        );
        // File 1's chunks lie in the pack against their order: pack order still, each chunk
        // written at its offset.
        let mut swapped = refs.clone();
        swapped[4].id = c(0xb1);
        swapped[5].id = c(0xb0);
        assert_eq!(
            order(in_pack_order(swapped, &places, 32)),
            vec![(0, 0), (1, 1), (0, 1), (1, 0), (0, 2), (0, 3)]
        );
        // Chunks stored on their own keep file order, after the packed ones.
        let alone = vec![r(c(1), 8, 0, 0), r(c(0xb0), 8, 1, 0)];
        assert_eq!(order(in_pack_order(alone, &places, 32)), vec![(1, 0), (0, 0)]);
        assert_eq!(most_open(&in_pack_order(refs.clone(), &places, 32)), 2);
        // Two files open at once is more than one: file order.
        assert_eq!(order(in_pack_order(refs.clone(), &places, 1)), order(refs));
    }

    /// The small files sharing a chunk go together, at the chunk's place, wherever they are in
    /// file order: the chunk is fetched once and kept only while they are written.
    #[test]
    fn the_files_of_a_shared_chunk_go_together_at_its_place() {
        use crate::basebackup::pack::{PackId, PackRecord};
        let c = |b: u8| ChunkId::from_hash([b; 32]);
        let pack = PackRecord {
            id: PackId::from_hash([9; 32]),
            chunks: vec![c(0x5a), c(0xb0)],
            lengths: vec![100; 2],
        };
        let places = Places::of([&pack]);
        let shared = |file: usize, at: u64| ChunkRef {
            within: Some(at),
            ..r(c(0x5a), 12288, file, 0)
        };
        // Files 0 and 2 share chunk 5a; file 1, between them, is b0, after 5a in the pack.
        let refs = vec![shared(0, 0), r(c(0xb0), 8, 1, 0), shared(2, 8192)];
        let ordered = in_pack_order(refs, &places, 32);
        let files: Vec<usize> = ordered.iter().map(|r| r.file).collect();
        assert_eq!(files, [0, 2, 1]);
        let plan = super::super::work::sources(&ordered, 1 << 20);
        assert_eq!(
            plan,
            [
                super::super::work::Source::Fetch { keep: true },
                super::super::work::Source::Kept { last: true },
                super::super::work::Source::Fetch { keep: false },
            ]
        );
    }
}
