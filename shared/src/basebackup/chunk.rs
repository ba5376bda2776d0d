//! Content-addressed chunks: each a sealed, zstd compressed object whose name is its own hash (in
//! an encrypted repository, its keyed hash: see [`Sealer::content_hash`]), stored in a pack
//! ([`super::pack`]) or, by backups before packs, on its own as
//! `chunks/<first 2 hex>/<blake3 hex>.wvo`. A chunk is stored once, whatever number of files and
//! backups reference it.

use bytes::Bytes;

pub use super::chunk_id::{BadChunkId, ChunkId};
use super::pack::Places;
use crate::repo::layout::{chunk_key, pack_key};
use crate::repo::object::{ObjectError, ObjectKind, Sealer};
use crate::repo::stored::{self, Damage, Envelope, Opened, StoredKind};
use crate::repo::{Store, StoreError, WritableStore};

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("chunk {id} is missing from the repository")]
    Missing { id: String },
    #[error("pack {pack}, which holds chunk {id}, is missing from the repository")]
    MissingPack { pack: String, id: String },
    #[error("chunk {id} is corrupt: {source}")]
    Corrupt { id: String, source: Box<ObjectError> },
    #[error("cannot compress a chunk: {0}")]
    Compress(std::io::Error),
}

/// The id of a chunk: the blake3 of its bytes (keyed in an encrypted repository).
pub fn chunk_id(sealer: &Sealer, data: &[u8]) -> ChunkId {
    ChunkId::from_hash(sealer.content_hash(data))
}

/// The stored length of the chunk whose content hash is `hash`, if the repository has it.
pub async fn stored_len(store: &WritableStore, id: &ChunkId) -> Result<Option<u64>, ChunkError> {
    Ok(store.size(&chunk_key(id)).await?)
}

/// `data`, whose content hash is `hash` ([`Sealer::content_hash`]), sealed as a chunk: compressed
/// (and in an encrypted repository encrypted). CPU-bound: call it from a blocking task.
pub fn seal_chunk(sealer: &Sealer, hash: [u8; 32], data: &[u8], level: i32) -> Result<Bytes, ChunkError> {
    debug_assert_eq!(hash, sealer.content_hash(data));
    let id = hex::encode(hash);
    // The chunk is not hashed a second time.
    let sealed = sealer
        .seal_hashed(ObjectKind::Chunk, &id, data, hash, level)
        .map_err(ChunkError::Compress)?;
    Ok(sealed.bytes)
}

/// Chunk `id`'s content, read from its pack (`places`) or its own object, and verified; a chunk
/// stored as a difference ([`Places::delta`]) is read with its base and put back together.
pub async fn read_chunk(
    store: &Store,
    sealer: &Sealer,
    places: &Places,
    id: &ChunkId,
) -> Result<Vec<u8>, ChunkError> {
    let Some(d) = places.delta(id).copied() else {
        return read_whole(store, sealer, places, id).await;
    };
    let (diff, base) = tokio::join!(
        read_whole(store, sealer, places, &d.xor),
        read_whole(store, sealer, places, &d.base)
    );
    let mut content = diff?;
    undo_delta(sealer, id, &mut content, &base?)?;
    Ok(content)
}

/// `a` exclusive-or'ed with `b`, byte by byte, in place (`b` read as zeroes past its end; its
/// bytes past `a`'s end ignored): a chunk's difference from its base, and back.
pub fn xor_into(a: &mut [u8], b: &[u8]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x ^= *y;
    }
}

/// Put chunk `id` back together from its difference `diff` (replaced by the content) and its
/// `base`, and check that the result is what `id` names: a wrong base is an error, never
/// other bytes restored.
pub fn undo_delta(sealer: &Sealer, id: &ChunkId, diff: &mut [u8], base: &[u8]) -> Result<(), ChunkError> {
    xor_into(diff, base);
    let found = sealer.content_hash(diff);
    if found == *id.hash() {
        return Ok(());
    }
    Err(ChunkError::Corrupt {
        id: id.to_string(),
        source: Box::new(ObjectError::ContentHash {
            expected: id.to_string(),
            found: hex::encode(found),
        }),
    })
}

/// Chunk `id`, stored as the difference `diff` from `base`: the difference opened from its
/// sealed bytes (into `out`) and put back together. The difference is not hashed on its own:
/// what it becomes is checked against `id`, which proves the difference and the base together.
/// Only when that fails is the difference hashed, to name the one that is wrong (a restore reads
/// the repository's base again when the base it had was not this chunk's).
pub fn open_difference(
    sealer: &Sealer,
    (id, diff): (&ChunkId, &ChunkId),
    sealed: &[u8],
    out: Vec<u8>,
    base: &[u8],
) -> Result<Vec<u8>, ChunkError> {
    let damaged = |source| ChunkError::Corrupt {
        id: format!("{id} (its difference {diff})"),
        source: Box::new(source),
    };
    let (header, mut content) = sealer
        .open_into_unhashed(sealed, ObjectKind::Chunk, &diff.to_string(), out)
        .map_err(damaged)?;
    let Err(mismatch) = undo_delta(sealer, id, &mut content, base) else {
        return Ok(content);
    };
    xor_into(&mut content, base);
    sealer.check_hash(&header, &content).map_err(damaged)?;
    if header.blake3 != *diff.hash() {
        return Err(damaged(ObjectError::ContentHash {
            expected: diff.to_string(),
            found: header.blake3_hex(),
        }));
    }
    // The difference is sound: the base was not this chunk's.
    Err(mismatch)
}

/// The longest stretch of a pack [`sealed_runs`] reads at once, and the most bytes in it no
/// chunk of the run needs.
pub const SEALED_RUN_MAX: u64 = 4 << 20;
pub const SEALED_RUN_SLACK: u64 = 256 << 10;

/// The end of the run of neighbours in one pack that starts at `at` among the `n` chunks
/// `id(0..n)` (in the order they are needed): the chunks after it that lie in the same pack,
/// read together with one ranged read whose span wastes at most `slack` beyond what the run
/// needs (a chunk met twice costs nothing more), as long as `fits(span, chunks)` for the run
/// with the next one in it. A chunk stored on its own is a run of one. The restore's runs
/// (`restore::chunk_reader::run_end`) and the runs of bases ([`sealed_runs`]) are cut alike.
pub fn neighbours_end(
    places: &Places,
    (at, n): (usize, usize),
    id: impl Fn(usize) -> ChunkId,
    slack: u64,
    fits: impl Fn(u64, usize) -> bool,
) -> usize {
    let Some(first) = places.get(&id(at)) else {
        return at + 1;
    };
    let (mut lo, mut hi, mut needed) = (first.offset, first.offset + first.len, first.len);
    let mut end = at + 1;
    while end < n {
        let Some(p) = places.get(&id(end)).filter(|p| p.pack == first.pack) else {
            break;
        };
        let (l, h) = (lo.min(p.offset), hi.max(p.offset + p.len));
        let more = if p.offset >= lo && p.offset + p.len <= hi {
            0
        } else {
            p.len
        };
        if h - l > needed + more + slack || !fits(h - l, end + 1 - at) {
            break;
        }
        (lo, hi, needed) = (l, h, needed + more);
        end += 1;
    }
    end
}

/// The bytes of the pack one read of chunks `ids` covers: from the first of the packed ones to
/// the end of the last (`None` when none is packed).
pub fn span_of<'a>(
    places: &Places,
    ids: impl IntoIterator<Item = &'a ChunkId>,
) -> Option<std::ops::Range<u64>> {
    ids.into_iter()
        .filter_map(|id| places.get(id))
        .map(|p| p.range())
        .reduce(|a, b| a.start.min(b.start)..a.end.max(b.end))
}

/// `ids` (in the order they are needed) cut into runs of neighbours in one pack, each read
/// with one ranged read ([`read_sealed_run`]): at most `max_chunks` chunks, a span of at most
/// [`SEALED_RUN_MAX`] of which at most [`SEALED_RUN_SLACK`] is not theirs. A chunk stored on its
/// own is a run of one. Each run as a range of `ids`.
pub fn sealed_runs(places: &Places, ids: &[ChunkId], max_chunks: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < ids.len() {
        let fits = |span: u64, chunks: usize| span <= SEALED_RUN_MAX && chunks <= max_chunks.max(1);
        let end = neighbours_end(places, (at, ids.len()), |i| ids[i], SEALED_RUN_SLACK, fits);
        out.push(at..end);
        at = end;
    }
    out
}

/// The sealed bytes of each of `ids`, one run of [`sealed_runs`]: neighbours in one pack read
/// with one ranged read (a chunk stored on its own, with one read).
pub async fn read_sealed_run(
    store: &Store,
    places: &Places,
    ids: &[ChunkId],
) -> Result<Vec<Bytes>, ChunkError> {
    let Some(first) = ids.first() else {
        return Ok(vec![]);
    };
    let Some(place) = places.get(first) else {
        let bytes = store
            .get(&chunk_key(first))
            .await?
            .ok_or_else(|| ChunkError::Missing {
                id: first.to_string(),
            })?;
        return Ok(vec![bytes; ids.len()]);
    };
    debug_assert!(
        ids.iter()
            .all(|id| places.get(id).is_some_and(|p| p.pack == place.pack))
    );
    let std::ops::Range { start: lo, end: hi } = span_of(places, ids).unwrap_or_else(|| place.range());
    let missing = || ChunkError::MissingPack {
        pack: place.pack.to_string(),
        id: first.to_string(),
    };
    let bytes = store
        .get_range(&pack_key(&place.pack), lo..hi)
        .await?
        .filter(|b| b.len() as u64 == hi - lo)
        .ok_or_else(missing)?;
    Ok(ids
        .iter()
        .map(|id| {
            let p = places.get(id).expect("placed above");
            bytes.slice((p.offset - lo) as usize..(p.offset - lo + p.len) as usize)
        })
        .collect())
}

/// Chunk `id` (stored whole, of at most `max_len` bytes: its header is checked before anything
/// is decompressed) opened from its sealed bytes and verified; when they do not open (damaged,
/// or a truncated read), read again on its own ([`read_chunk`], which asks a fallback
/// repository).
pub async fn open_sealed(
    store: &Store,
    sealer: &Sealer,
    places: &Places,
    (id, max_len): (&ChunkId, u64),
    sealed: &[u8],
) -> Result<Vec<u8>, ChunkError> {
    if let Ok(h) = sealer.read_header(sealed)
        && h.original_len > max_len
    {
        return Err(ChunkError::Corrupt {
            id: id.to_string(),
            source: Box::new(ObjectError::ContentLength {
                expected: max_len,
                found: h.original_len,
            }),
        });
    }
    match stored::open::<Chunk>(sealer, id, sealed) {
        Ok(Chunk(content)) => Ok(content),
        Err(_) => read_whole(store, sealer, places, id).await,
    }
}

/// Chunk `id`'s own sealed bytes, opened: from its pack or its own object.
async fn read_whole(
    store: &Store,
    sealer: &Sealer,
    places: &Places,
    id: &ChunkId,
) -> Result<Vec<u8>, ChunkError> {
    let (key, range) = match places.get(id) {
        Some(p) => (pack_key(&p.pack), Some(p.range())),
        None => (chunk_key(id), None),
    };
    let sealed = match places.get(id) {
        Some(p) => store
            .get_range(&pack_key(&p.pack), p.range())
            .await?
            .filter(|b| b.len() as u64 == p.len)
            .ok_or_else(|| ChunkError::MissingPack {
                pack: p.pack.to_string(),
                id: id.to_string(),
            })?,
        None => store
            .get(&chunk_key(id))
            .await?
            .ok_or_else(|| ChunkError::Missing { id: id.to_string() })?,
    };
    let corrupt = |source: ObjectError| ChunkError::Corrupt {
        id: id.to_string(),
        source: Box::new(source),
    };
    let damage = match stored::open::<Chunk>(sealer, id, &sealed) {
        Ok(Chunk(content)) => return Ok(content),
        Err(damage) => damage,
    };
    let reopen = |b: &[u8]| stored::open::<Chunk>(sealer, id, b);
    let again = store.reread_from_fallback(&key, range, damage.to_string(), reopen);
    match again.await.ok_or(damage) {
        Ok(Chunk(content)) => Ok(content),
        Err(Damage::Envelope(e)) => Err(corrupt(e)),
        Err(Damage::Content(MisnamedChunk { found })) => Err(corrupt(ObjectError::ContentHash {
            expected: id.to_string(),
            found,
        })),
    }
}

/// A chunk's content, read back and verified: header, length, and that it hashes to its id.
#[derive(Debug)]
pub struct Chunk(pub Vec<u8>);

/// A chunk whose content is intact but hashes to another id (a chunk stored under a wrong name).
#[derive(Debug, thiserror::Error)]
#[error("content hashes to {found}, not to its name")]
pub struct MisnamedChunk {
    pub found: String,
}

impl StoredKind for Chunk {
    type Id = ChunkId;
    type Error = MisnamedChunk;
    const ENVELOPE: Envelope = Envelope::Sealed(ObjectKind::Chunk);

    fn key(id: &ChunkId) -> String {
        chunk_key(id)
    }

    fn name(id: &ChunkId) -> String {
        id.to_string()
    }

    fn parse(opened: Opened, id: &ChunkId) -> Result<Chunk, MisnamedChunk> {
        // The header hash matched the content; the content must also be what the id names.
        match opened.header.map(|h| h.blake3_hex()) {
            Some(found) if found != id.to_string() => Err(MisnamedChunk { found }),
            _ => Ok(Chunk(opened.content)),
        }
    }
}

/// Why a pack read whole is unusable.
#[derive(Debug, thiserror::Error)]
pub enum PackDamage {
    #[error("its bytes hash to {0}, not to its name")]
    Hash(super::pack::PackId),
    #[error("it holds {found} bytes, its manifest lists {listed}")]
    Short { found: u64, listed: u64 },
    #[error("chunk {id} at offset {offset}: {source}")]
    Chunk {
        id: ChunkId,
        offset: u64,
        source: Damage<MisnamedChunk>,
    },
}

/// Check pack `id`, read whole as `bytes`: they hash to its name and, when a manifest lists it
/// (`record`), hold every chunk it places there, each of which opens (`verify --deep`, and
/// `archive-agent copy` before it writes the pack).
pub fn check_pack(
    sealer: &Sealer,
    id: super::pack::PackId,
    bytes: &[u8],
    record: Option<&super::pack::PackRecord>,
) -> Result<(), PackDamage> {
    let found = super::pack::PackId::of(bytes);
    if found != id {
        return Err(PackDamage::Hash(found));
    }
    let Some(record) = record else { return Ok(()) };
    if (bytes.len() as u64) < record.len() {
        return Err(PackDamage::Short {
            found: bytes.len() as u64,
            listed: record.len(),
        });
    }
    for (chunk, place) in record.places() {
        let sealed = &bytes[place.offset as usize..(place.offset + place.len) as usize];
        stored::open::<Chunk>(sealer, &chunk, sealed).map_err(|source| PackDamage::Chunk {
            id: chunk,
            offset: place.offset,
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::basebackup::pack::{PackBuilder, PackRecord};

    fn cid(b: u8) -> ChunkId {
        ChunkId::from_hash([b; 32])
    }

    fn pack(ids: &[u8], len: usize) -> (Bytes, PackRecord) {
        let mut b = PackBuilder::default();
        for i in ids {
            b.add(cid(*i), &vec![*i; len]);
        }
        b.seal()
    }

    #[test]
    fn neighbours_in_a_pack_make_one_run_and_nothing_else_does() {
        let (_, a) = pack(&[1, 2, 3, 4, 5], 100);
        let (_, far) = pack(&[6, 7], SEALED_RUN_SLACK as usize + 1);
        let (_, b) = pack(&[8], 100);
        let places = Places::of([&a, &far, &b]);
        // 1 and 2 side by side (in any order, 1 met twice); 8 in another pack; 9 stored on its
        // own; 3 and 5 with only 4 between them; at most two chunks a run.
        let ids: Vec<ChunkId> = [2, 1, 1, 8, 9, 3, 5].iter().map(|&i| cid(i)).collect();
        assert_eq!(sealed_runs(&places, &ids, 8), vec![0..3, 3..4, 4..5, 5..7]);
        assert_eq!(sealed_runs(&places, &ids, 2), vec![0..2, 2..3, 3..4, 4..5, 5..7]);
        // A gap wider than the slack ends a run.
        let ids: Vec<ChunkId> = [6, 7].iter().map(|&i| cid(i)).collect();
        assert_eq!(sealed_runs(&places, &ids, 8), vec![0..2]);
        let (_, gap) = pack(&[10, 11, 12], SEALED_RUN_SLACK as usize + 1);
        let places = Places::of([&gap]);
        let ids: Vec<ChunkId> = [10, 12].iter().map(|&i| cid(i)).collect();
        assert_eq!(sealed_runs(&places, &ids, 8), vec![0..1, 1..2]);
    }

    #[tokio::test]
    async fn a_run_is_read_with_one_ranged_read_and_each_chunk_opens() {
        use std::sync::Arc;
        let faults = Arc::new(crate::repo::fault::FaultStore::new(
            crate::repo::fault::Fault::None,
        ));
        let store = crate::repo::fault::FaultStore::s3_like(&faults, std::time::Duration::from_secs(5));
        let sealer = Sealer::plain();
        let contents: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 5000 + i as usize]).collect();
        let mut b = PackBuilder::default();
        let mut ids = vec![];
        for c in &contents {
            let id = chunk_id(&sealer, c);
            b.add(id, &seal_chunk(&sealer, *id.hash(), c, 3).unwrap());
            ids.push(id);
        }
        let (bytes, record) = b.seal();
        store.put(&pack_key(&record.id), bytes).await.unwrap();
        let places = Places::of([&record]);
        let wanted = [ids[2], ids[0]];
        let sealed = read_sealed_run(&store.reader(), &places, &wanted).await.unwrap();
        for (id, s) in wanted.iter().zip(&sealed) {
            let opened = open_sealed(&store.reader(), &sealer, &places, (id, 1 << 20), s)
                .await
                .unwrap();
            assert_eq!(chunk_id(&sealer, &opened), *id);
        }
        // Longer than a chunk may be: refused before it is decompressed.
        let err = open_sealed(&store.reader(), &sealer, &places, (&ids[2], 100), &sealed[0]).await;
        assert!(matches!(err, Err(ChunkError::Corrupt { .. })), "{err:?}");
    }

    /// A chunk stored as a difference opens with its base and only with it: a wrong base is
    /// named as the chunk's mismatch (a restore then reads the repository's base), a damaged
    /// difference as the difference's, and neither gives other bytes.
    #[test]
    fn a_difference_opens_with_its_base_and_names_what_is_wrong() {
        let sealer = Sealer::plain();
        let content: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        // Noise either side, so that the stored difference is its own bytes (zstd keeps them
        // raw) and a changed byte changes what it opens to.
        let base: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(40503) >> 7) as u8)
            .collect();
        let mut diff = content.clone();
        xor_into(&mut diff, &base);
        let (id, diff_id) = (chunk_id(&sealer, &content), chunk_id(&sealer, &diff));
        let sealed = seal_chunk(&sealer, *diff_id.hash(), &diff, 3).unwrap();
        let opened = open_difference(&sealer, (&id, &diff_id), &sealed, Vec::new(), &base).unwrap();
        assert_eq!(opened, content);

        let mut wrong = base.clone();
        wrong[20000] ^= 1;
        let err = open_difference(&sealer, (&id, &diff_id), &sealed, Vec::new(), &wrong).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&id.to_string()) && !msg.contains("difference"),
            "{msg}"
        );

        let mut damaged = sealed.to_vec();
        let n = damaged.len();
        damaged[n / 2] ^= 1;
        let err = open_difference(&sealer, (&id, &diff_id), &damaged, Vec::new(), &base).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&format!("its difference {diff_id}")), "{msg}");
    }
}
