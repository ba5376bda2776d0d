//! Dead bytes in packs, and the plan that reclaims them.
//!
//! A pack is kept while any kept manifest lists it ([`super::pack`]), so the chunks in it that
//! only expired backups used stay stored: after an update of 1% of a table, every pack of the
//! first backup still holds the old version of each changed chunk once that backup expires. A
//! chunk of a pack is *live* when a kept manifest references it (a file's chunk, or a chunk of
//! the server's `backup_manifest`); the rest of the pack is *dead*.
//!
//! `expire` reclaims dead bytes as restic's `prune` does (`--max-unused`): it rewrites the packs
//! with the most dead bytes for their size until what stays dead is at most a share of every
//! pack's bytes (`--max-dead`, 10% by default). The live chunks of those packs are copied, as
//! sealed bytes, into new packs; every kept manifest that listed one of the old packs is written
//! again, listing the new packs in its place, with its `generation` one higher; the old packs,
//! then listed by no manifest, are deleted by the next expire (a restore that read a manifest
//! before the rewrite still finds its packs until then). See `commands/expire/repack.rs`.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::chunk_id::ChunkId;
use super::manifest::Manifest;
use super::pack::{PackBuilder, PackId, PackRecord};

/// Every chunk the manifests reference, packed or not.
pub fn live_chunks<'a>(manifests: impl IntoIterator<Item = &'a Manifest>) -> HashSet<ChunkId> {
    manifests.into_iter().flat_map(Manifest::chunk_refs).collect()
}

/// One pack some kept manifest lists: how much of it is live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackUse {
    pub record: PackRecord,
    /// Bytes of the live chunks (each chunk counted once, even if listed twice).
    pub live_bytes: u64,
}

impl PackUse {
    pub fn bytes(&self) -> u64 {
        self.record.len()
    }

    pub fn dead_bytes(&self) -> u64 {
        self.bytes().saturating_sub(self.live_bytes)
    }
}

/// The packs the manifests list, each once, with what is live in them.
pub fn usage<'a>(manifests: impl IntoIterator<Item = &'a Manifest> + Clone) -> BTreeMap<PackId, PackUse> {
    let live = live_chunks(manifests.clone());
    let mut out = BTreeMap::new();
    for m in manifests {
        for p in &m.packs {
            out.entry(p.id).or_insert_with(|| {
                let mut seen = HashSet::new();
                let live_bytes = p
                    .chunks
                    .iter()
                    .zip(&p.lengths)
                    .filter(|(c, _)| live.contains(c) && seen.insert(**c))
                    .map(|(_, len)| len)
                    .sum();
                PackUse {
                    record: p.clone(),
                    live_bytes,
                }
            });
        }
    }
    out
}

/// What the packs of a repository hold, in sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Space {
    pub packs: u64,
    pub bytes: u64,
    /// Bytes of chunks no manifest considered references.
    pub dead_bytes: u64,
}

impl Space {
    pub fn of(usage: &BTreeMap<PackId, PackUse>) -> Space {
        usage.values().fold(Space::default(), |s, u| Space {
            packs: s.packs + 1,
            bytes: s.bytes + u.bytes(),
            dead_bytes: s.dead_bytes + u.dead_bytes(),
        })
    }

    /// Dead bytes as a percentage of every pack's bytes.
    pub fn dead_percent(&self) -> f64 {
        match self.bytes {
            0 => 0.0,
            n => self.dead_bytes as f64 * 100.0 / n as f64,
        }
    }
}

/// The packs to rewrite so that at most `max_dead_percent` of all pack bytes stays dead: those
/// with the largest dead share first (they free the most for the bytes copied), as few as that
/// takes. Packs with no dead byte are never chosen.
pub fn choose(usage: &BTreeMap<PackId, PackUse>, max_dead_percent: u8) -> Vec<PackId> {
    let space = Space::of(usage);
    let allowed = space.bytes as u128 * u128::from(max_dead_percent.min(100)) / 100;
    let mut dead = space.dead_bytes as u128;
    let mut candidates: Vec<&PackUse> = usage.values().filter(|u| u.dead_bytes() > 0).collect();
    // Largest dead share first (compared without division), then the most dead bytes.
    candidates.sort_by(|a, b| {
        let share_a = a.dead_bytes() as u128 * b.bytes().max(1) as u128;
        let share_b = b.dead_bytes() as u128 * a.bytes().max(1) as u128;
        share_b
            .cmp(&share_a)
            .then(b.dead_bytes().cmp(&a.dead_bytes()))
            .then(a.record.id.cmp(&b.record.id))
    });
    let mut out = Vec::new();
    for u in candidates {
        if dead <= allowed {
            break;
        }
        dead -= u.dead_bytes() as u128;
        out.push(u.record.id);
    }
    out
}

/// The first of `chosen` whose bytes add up to at most `budget` (always the first one).
pub fn within(usage: &BTreeMap<PackId, PackUse>, chosen: Vec<PackId>, budget: u64) -> Vec<PackId> {
    let mut total = 0u64;
    chosen
        .into_iter()
        .enumerate()
        .take_while(|(i, id)| {
            total += usage.get(id).map_or(0, PackUse::bytes);
            *i == 0 || total <= budget
        })
        .map(|(_, id)| id)
        .collect()
}

/// Builds the new packs of a repack: the live chunks of the old packs, as sealed bytes, each
/// chunk once.
#[derive(Debug, Default)]
pub struct Repacker {
    building: PackBuilder,
    done: HashSet<ChunkId>,
    /// Each old pack's live chunks and the new pack that now holds each.
    moved: HashMap<ChunkId, PackId>,
    /// The new packs' records, in the order they were sealed.
    records: Vec<PackRecord>,
}

impl Repacker {
    /// Add the live chunks of old pack `record`, whose bytes `bytes` were checked. Returns the
    /// new packs filled meanwhile, to be written before any manifest names them.
    pub fn add_pack(
        &mut self,
        record: &PackRecord,
        bytes: &[u8],
        live: &HashSet<ChunkId>,
    ) -> Vec<(bytes::Bytes, PackRecord)> {
        let mut full = Vec::new();
        for (chunk, place) in record.places() {
            if !live.contains(&chunk) || !self.done.insert(chunk) {
                continue;
            }
            let range = place.offset as usize..(place.offset + place.len) as usize;
            if self.building.add(chunk, &bytes[range]) {
                full.push(self.seal());
            }
        }
        full
    }

    /// The pack being filled, if it holds anything.
    pub fn finish(&mut self) -> Option<(bytes::Bytes, PackRecord)> {
        (!self.building.is_empty()).then(|| self.seal())
    }

    fn seal(&mut self) -> (bytes::Bytes, PackRecord) {
        let (bytes, record) = std::mem::take(&mut self.building).seal();
        for c in &record.chunks {
            self.moved.insert(*c, record.id);
        }
        self.records.push(record.clone());
        (bytes, record)
    }

    /// The new packs' records.
    pub fn records(&self) -> &[PackRecord] {
        &self.records
    }

    /// `m` listing the new packs instead of the `repacked` ones, one generation on; `None` when
    /// it lists none of them. Every chunk `m` read from a repacked pack (its first place) is in
    /// a new one (a live chunk), and the new packs are listed first, so that such a chunk is
    /// read from the copy just checked even when `m` lists it in another pack too (one left
    /// out of the repack as damaged, say): the rewritten manifest reads the same bytes.
    pub fn rewrite(&self, m: &Manifest, repacked: &HashSet<PackId>) -> Option<Manifest> {
        if !m.packs.iter().any(|p| repacked.contains(&p.id)) {
            return None;
        }
        let places = m.places();
        let wanted: HashSet<PackId> = live_chunks([m])
            .into_iter()
            .filter(|c| places.get(c).is_some_and(|p| repacked.contains(&p.pack)))
            .filter_map(|c| self.moved.get(&c).copied())
            .collect();
        let mut out = m.clone();
        out.packs = self
            .records
            .iter()
            .filter(|r| wanted.contains(&r.id))
            .cloned()
            .collect();
        out.packs
            .extend(m.packs.iter().filter(|p| !repacked.contains(&p.id)).cloned());
        out.generation += 1;
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::basebackup::pack::PackBuilder;

    fn cid(b: u8) -> ChunkId {
        ChunkId::from_hash([b; 32])
    }

    /// A pack of chunks `ids`, each `len` bytes of its id's byte.
    fn pack(ids: &[u8], len: usize) -> (bytes::Bytes, PackRecord) {
        let mut b = PackBuilder::default();
        for i in ids {
            b.add(cid(*i), &vec![*i; len]);
        }
        b.seal()
    }

    fn manifest(refs: &[u8], packs: &[&PackRecord]) -> Manifest {
        let mut m = crate::catalog::testing::manifest("20260101T000000Z", 1, 0, 0);
        m.entries = vec![crate::basebackup::manifest::Entry {
            within: None,
            path: "base/1/1".into(),
            kind: crate::basebackup::manifest::EntryKind::File,
            mode: 0o600,
            size: 0,
            chunks: refs.iter().map(|i| cid(*i)).collect(),
        }];
        m.packs = packs.iter().map(|p| (*p).clone()).collect();
        m
    }

    #[test]
    fn dead_bytes_are_the_chunks_no_kept_manifest_references() {
        let (_, a) = pack(&[1, 2, 3, 4], 100);
        let (_, b) = pack(&[5, 6], 100);
        let m1 = manifest(&[1, 2, 5, 6], &[&a, &b]);
        let m2 = manifest(&[2, 5], &[&a, &b]);
        let u = usage([&m1, &m2]);
        assert_eq!(u[&a.id].live_bytes, 200);
        assert_eq!(u[&a.id].dead_bytes(), 200);
        assert_eq!(u[&b.id].dead_bytes(), 0);
        assert_eq!(
            Space::of(&u),
            Space {
                packs: 2,
                bytes: 600,
                dead_bytes: 200
            }
        );
        // m1 expired: only m2's chunks are live.
        let u = usage([&m2]);
        assert_eq!(u[&a.id].dead_bytes(), 300);
        assert_eq!(u[&b.id].dead_bytes(), 100);
    }

    #[test]
    fn the_most_dead_packs_go_first_until_the_rest_is_within_the_bound() {
        let (_, a) = pack(&[1, 2, 3, 4], 100); // 3 of 4 dead
        let (_, b) = pack(&[5, 6], 100); // 1 of 2 dead
        let (_, c) = pack(&[7, 8, 9, 10], 100); // all live
        let m = manifest(&[1, 5, 7, 8, 9, 10], &[&a, &b, &c]);
        let u = usage([&m]);
        // 400 dead of 1000.
        assert_eq!(choose(&u, 0), vec![a.id, b.id]);
        // a frees 300: 100 stay dead, 10% of 1000.
        assert_eq!(choose(&u, 9), vec![a.id, b.id]);
        assert_eq!(choose(&u, 10), vec![a.id]);
        assert_eq!(choose(&u, 20), vec![a.id]);
        assert_eq!(choose(&u, 40), Vec::<PackId>::new());
        assert_eq!(choose(&u, 100), Vec::<PackId>::new());
        // A budget of bytes per expire: the first always, then as many as fit.
        assert_eq!(within(&u, vec![a.id, b.id], 0), vec![a.id]);
        assert_eq!(within(&u, vec![a.id, b.id], 599), vec![a.id]);
        assert_eq!(within(&u, vec![a.id, b.id], 600), vec![a.id, b.id]);
    }

    #[test]
    fn a_rewritten_manifest_finds_every_chunk_it_references_with_the_same_bytes() {
        let (a_bytes, a) = pack(&[1, 2, 3, 4], 100);
        let (b_bytes, b) = pack(&[5, 6], 50);
        let (_, c) = pack(&[7], 10);
        let kept1 = manifest(&[1, 5, 7], &[&a, &b, &c]);
        let kept2 = manifest(&[3, 7], &[&a, &c]);
        let untouched = manifest(&[7], &[&c]);
        let live = live_chunks([&kept1, &kept2, &untouched]);
        let mut r = Repacker::default();
        let mut written: HashMap<PackId, bytes::Bytes> = HashMap::new();
        for (record, bytes) in [(&a, &a_bytes), (&b, &b_bytes)] {
            for (bytes, rec) in r.add_pack(record, bytes, &live) {
                written.insert(rec.id, bytes);
            }
        }
        let (bytes, rec) = r.finish().unwrap();
        written.insert(rec.id, bytes);
        assert_eq!(r.records().len(), 1);
        // Live: 1, 3 (100 each) and 5 (50); dead 2, 4 and 6 are gone.
        assert_eq!(r.records()[0].len(), 250);
        let repacked: HashSet<PackId> = [a.id, b.id].into();
        assert!(r.rewrite(&untouched, &repacked).is_none());
        for old in [&kept1, &kept2] {
            let new = r.rewrite(old, &repacked).unwrap();
            assert_eq!(new.generation, old.generation + 1);
            assert!(new.packs.iter().all(|p| !repacked.contains(&p.id)));
            let places = new.places();
            for c in live_chunks([old]) {
                let p = places.get(&c).expect("every referenced chunk has a place");
                let source = match written.get(&p.pack) {
                    Some(b) => b.clone(),
                    None => continue, // in pack c, untouched
                };
                let got = &source[p.offset as usize..(p.offset + p.len) as usize];
                let old_place = old.places().get(&c).copied().unwrap();
                let old_bytes = if old_place.pack == a.id {
                    &a_bytes
                } else {
                    &b_bytes
                };
                assert_eq!(
                    got,
                    &old_bytes[old_place.offset as usize..(old_place.offset + old_place.len) as usize]
                );
            }
        }
        // A chunk also listed in a pack left out of the repack (damaged) is read from the new
        // pack, whose copy was checked.
        let (_, dup) = pack(&[1], 100);
        let both = manifest(&[1], &[&a, &dup]);
        let new = r.rewrite(&both, &repacked).unwrap();
        assert_ne!(new.places().get(&cid(1)).unwrap().pack, dup.id);
        // kept2 references nothing of b: it does not list the new pack for b's sake only, and
        // it lists the new pack (for chunk 3).
        let new2 = r.rewrite(&kept2, &repacked).unwrap();
        assert_eq!(new2.packs.len(), 2);
    }
}
