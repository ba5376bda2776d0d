//! An incremental backup's relation files put back together as they stream (rules in
//! [`crate::basebackup::incremental`]): the blocks the server sent over the previous backup's
//! copy of the file, chunk by chunk. A chunk no sent block touches and that the previous backup
//! holds whole is named again without being read; a chunk a block touches is read from the
//! repository (only when some of its blocks come from the previous backup), patched and stored.
//! At most one chunk is being put together at a time.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::task::JoinHandle;

use super::BackupError;
use super::upload::{Copier, Streamed};
use crate::basebackup::chunk::{ChunkError, ChunkId, read_chunk};
use crate::basebackup::incremental::{self, Header, IncrementalError};
use crate::basebackup::manifest::{Entry, EntryKind};
use crate::basebackup::pack::Places;
use crate::repo::Store;
use crate::repo::object::Sealer;

/// Chunks of the previous backup read ahead of need, per file being put back together.
const FETCH_AHEAD: usize = 8;

/// A chunk of the previous backup being read.
type Fetch = JoinHandle<Result<Vec<u8>, ChunkError>>;

/// The previous backup, as an incremental backup reads it.
pub(super) struct Prior {
    pub store: Store,
    pub sealer: Sealer,
    pub places: Arc<Places>,
    /// Its files by path.
    pub files: HashMap<String, Entry>,
    pub chunk_size: u64,
    pub block_size: usize,
}

impl Prior {
    /// Start reading chunk `id` of the previous backup.
    fn fetch(&self, id: ChunkId) -> Fetch {
        let (store, sealer, places) = (self.store.clone(), self.sealer.clone(), Arc::clone(&self.places));
        tokio::spawn(async move { read_chunk(&store, &sealer, &places, &id).await })
    }
}

/// One relation file being put back together from its incremental member.
pub(super) struct Rebuild {
    /// The incremental member's path (for messages).
    member: String,
    /// The previous backup's copy (empty when it had none).
    prior: Entry,
    /// Whether the previous backup had a copy at all.
    prior_known: bool,
    head: Vec<u8>,
    header: Option<Header>,
    /// Blocks of the member received whole.
    received: usize,
    block: Vec<u8>,
    /// The chunk being put together: its index and bytes.
    building: Option<(u64, Vec<u8>)>,
    /// The next chunk to hand to the pipeline.
    next_chunk: u64,
    /// The chunks of the previous backup still to read, in the order they are needed.
    to_fetch: VecDeque<u64>,
    /// Those being read.
    fetching: VecDeque<(u64, Fetch)>,
    file: Streamed,
}

impl Drop for Rebuild {
    fn drop(&mut self) {
        for (_, f) in &self.fetching {
            f.abort();
        }
    }
}

impl Rebuild {
    /// Start putting `path` back together from member `member`.
    pub fn new(prior: &Prior, member: String, path: &str, file: Streamed) -> Rebuild {
        let prior_known = prior.files.contains_key(path);
        let previous = prior.files.get(path).cloned().unwrap_or(Entry {
            within: None,
            path: path.to_string(),
            kind: EntryKind::File,
            mode: 0o600,
            size: 0,
            chunks: vec![],
        });
        Rebuild {
            member,
            prior: previous,
            prior_known,
            head: Vec::new(),
            header: None,
            received: 0,
            block: Vec::with_capacity(prior.block_size),
            building: None,
            next_chunk: 0,
            to_fetch: VecDeque::new(),
            fetching: VecDeque::new(),
            file,
        }
    }

    fn invalid(&self, what: &str) -> BackupError {
        BackupError::Incremental(IncrementalError::Invalid {
            path: self.member.clone(),
            what: what.to_string(),
        })
    }

    /// More bytes of the member.
    pub async fn feed(
        &mut self,
        copier: &mut Copier,
        prior: &Prior,
        mut data: &[u8],
    ) -> Result<(), BackupError> {
        let bs = prior.block_size;
        if self.header.is_none() {
            // Never more than the longest header there is: bounded.
            let want = incremental::max_header_len(bs).min(self.head.len() + data.len());
            let n = want - self.head.len();
            self.head.extend_from_slice(&data[..n]);
            data = &data[n..];
            match Header::parse(&self.member, &self.head, bs)? {
                None => return Ok(()),
                Some(h) if h.truncation_block_length > 0 && !self.prior_known => {
                    return Err(self.invalid(
                        "the server builds on blocks of it that the previous backup does not have",
                    ));
                }
                Some(h) => {
                    // What followed the header in `head` is block data.
                    let rest = self.head.split_off(h.len);
                    self.header = Some(h);
                    self.plan_fetches(copier, prior);
                    self.blocks(copier, prior, &rest).await?;
                }
            }
        }
        self.blocks(copier, prior, data).await
    }

    async fn blocks(
        &mut self,
        copier: &mut Copier,
        prior: &Prior,
        mut data: &[u8],
    ) -> Result<(), BackupError> {
        let bs = prior.block_size;
        while !data.is_empty() {
            let n = (bs - self.block.len()).min(data.len());
            self.block.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.block.len() < bs {
                continue;
            }
            let header = self.header.as_ref().expect("blocks follow the header");
            let Some(&b) = header.blocks.get(self.received) else {
                return Err(self.invalid("more block data than its header lists"));
            };
            self.received += 1;
            let block = std::mem::replace(&mut self.block, Vec::with_capacity(bs));
            self.place(copier, prior, u64::from(b), &block).await?;
        }
        Ok(())
    }

    /// Put block `b` in its chunk, handing every chunk before it to the pipeline first.
    async fn place(
        &mut self,
        copier: &mut Copier,
        prior: &Prior,
        b: u64,
        block: &[u8],
    ) -> Result<(), BackupError> {
        let per_chunk = prior.chunk_size / prior.block_size as u64;
        let c = b / per_chunk;
        self.emit_until(copier, prior, c).await?;
        if self.building.as_ref().is_none_or(|(i, _)| *i != c) {
            let base = self.base(prior, c).await?;
            self.building = Some((c, base));
        }
        let (_, buf) = self.building.as_mut().expect("just set");
        let at = ((b % per_chunk) * prior.block_size as u64) as usize;
        buf[at..at + block.len()].copy_from_slice(block);
        Ok(())
    }

    /// The file's length in bytes once put back together.
    fn file_len(&self, prior: &Prior) -> u64 {
        let blocks = self.header.as_ref().map_or(0, Header::file_blocks);
        u64::from(blocks) * prior.block_size as u64
    }

    /// Bytes the previous backup contributes: those before the truncation length that its
    /// copy has.
    fn prior_len(&self, prior: &Prior) -> u64 {
        let truncation = self.header.as_ref().map_or(0, |h| h.truncation_block_length);
        (u64::from(truncation) * prior.block_size as u64).min(self.prior.size)
    }

    /// Chunk `c`'s length in the file put back together.
    fn chunk_len(&self, prior: &Prior, c: u64) -> u64 {
        (self.file_len(prior) - c * prior.chunk_size).min(prior.chunk_size)
    }

    /// The bytes of chunk `c` the previous backup contributes.
    fn prior_share(&self, prior: &Prior, c: u64) -> u64 {
        let start = c * prior.chunk_size;
        self.prior_len(prior)
            .saturating_sub(start)
            .min(self.chunk_len(prior, c))
    }

    /// The previous backup's chunk `c`, when it is chunk `c` of this file whole and can be named
    /// again unread: its id and stored length.
    fn reusable(&self, copier: &Copier, prior: &Prior, c: u64) -> Option<(ChunkId, u64)> {
        let start = c * prior.chunk_size;
        let len = self.chunk_len(prior, c);
        let whole = self.prior_len(prior) >= start + len
            && self.prior.size.saturating_sub(start).min(prior.chunk_size) == len;
        let id = *self.prior.chunks.get(c as usize).filter(|_| whole)?;
        copier.known_len(&id).map(|stored| (id, stored))
    }

    /// Once the header is known: which of the previous backup's chunks will be read (those a
    /// sent block touches, and those that cannot be named again), and start reading them.
    fn plan_fetches(&mut self, copier: &Copier, prior: &Prior) {
        let header = self.header.as_ref().expect("called once the header is read");
        let per_chunk = prior.chunk_size / prior.block_size as u64;
        let touched: std::collections::HashSet<u64> =
            header.blocks.iter().map(|&b| u64::from(b) / per_chunk).collect();
        let chunks = self.file_len(prior).div_ceil(prior.chunk_size);
        self.to_fetch = (0..chunks)
            .filter(|&c| self.prior_share(prior, c) > 0)
            .filter(|c| touched.contains(c) || self.reusable(copier, prior, *c).is_none())
            .collect();
        self.pump(prior);
    }

    fn pump(&mut self, prior: &Prior) {
        while self.fetching.len() < FETCH_AHEAD
            && let Some(c) = self.to_fetch.pop_front()
        {
            match self.prior.chunks.get(c as usize) {
                Some(id) => self.fetching.push_back((c, prior.fetch(*id))),
                // Not in the previous backup's copy: `base` says so.
                None => break,
            }
        }
    }

    /// Chunk `c` before any sent block: the previous backup's bytes where it contributes, zeroes
    /// elsewhere.
    async fn base(&mut self, prior: &Prior, c: u64) -> Result<Vec<u8>, BackupError> {
        let len = self.chunk_len(prior, c) as usize;
        let mut buf = vec![0u8; len];
        let from_prior = self.prior_share(prior, c) as usize;
        if from_prior > 0 {
            let fetched = match self.fetching.front() {
                Some((f, _)) if *f == c => {
                    let (_, task) = self.fetching.pop_front().expect("just looked");
                    Some(
                        task.await
                            .map_err(|e| ChunkError::Compress(std::io::Error::other(e)))??,
                    )
                }
                _ => None,
            };
            self.pump(prior);
            let bytes = fetched.filter(|b| b.len() >= from_prior).ok_or_else(|| {
                self.invalid("the previous backup's copy is shorter than its own manifest says")
            })?;
            buf[..from_prior].copy_from_slice(&bytes[..from_prior]);
        }
        Ok(buf)
    }

    /// Hand chunks up to (not including) `c` to the pipeline.
    async fn emit_until(&mut self, copier: &mut Copier, prior: &Prior, c: u64) -> Result<(), BackupError> {
        while self.next_chunk < c {
            let i = self.next_chunk;
            let len = self.chunk_len(prior, i);
            match self.building.take() {
                Some((j, buf)) if j == i => copier.stream(&mut self.file, &buf).await?,
                other => {
                    self.building = other;
                    // Untouched: the previous backup's chunk when it is this one whole.
                    match self.reusable(copier, prior, i) {
                        Some((id, stored)) => copier.reuse_chunk(&mut self.file, id, len, stored)?,
                        None => {
                            let buf = self.base(prior, i).await?;
                            copier.stream(&mut self.file, &buf).await?;
                        }
                    }
                }
            }
            self.next_chunk += 1;
        }
        Ok(())
    }

    /// The member ended: every chunk to the pipeline, once the member held what its header
    /// promised.
    pub async fn finish(
        mut self,
        copier: &mut Copier,
        prior: &Prior,
        member_size: u64,
    ) -> Result<(), BackupError> {
        let Some(header) = &self.header else {
            return Err(self.invalid("it ended inside its header"));
        };
        if self.received != header.blocks.len()
            || !self.block.is_empty()
            || header.member_size(prior.block_size) != member_size
        {
            return Err(self.invalid("its size is not what its header says"));
        }
        // The previous backup's blocks in the file: all it contributes but those sent again.
        let contributed = self.prior_len(prior) / prior.block_size as u64;
        let resent = header
            .blocks
            .iter()
            .filter(|&&b| u64::from(b) < contributed)
            .count() as u64;
        let reused = (contributed - resent) * prior.block_size as u64;
        let chunks = self.file_len(prior).div_ceil(prior.chunk_size);
        self.emit_until(copier, prior, chunks).await?;
        copier.count_reused(reused);
        let file = self.file.take();
        copier.end_streamed(file).await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::basebackup::incremental::MAGIC;
    use crate::basebackup::manifest::Manifest;
    use crate::commands::backup::inventory::Previous;
    use crate::commands::backup::listing::Listing;
    use crate::commands::backup::upload::CopyOptions;
    use crate::repo::WritableStore;
    use crate::repo::fault::{Fault, FaultStore};
    use crate::repo::store::CreateSemantics;

    const BS: usize = 16;
    const CS: u64 = 64;

    fn store() -> WritableStore {
        WritableStore::with_backend(
            Arc::new(FaultStore::new(Fault::None)) as Arc<dyn object_store::ObjectStore>,
            "s3://bucket/repo".parse().unwrap(),
            CreateSemantics::CheckThenWrite,
            crate::retry::RetryPolicy::with_total(std::time::Duration::from_secs(5)),
        )
    }

    fn copier(store: &WritableStore, previous: Option<&Previous>) -> Copier {
        let opts = CopyOptions {
            chunk_size: CS,
            parallel: 2,
            level: 1,
            pg_version: 17,
            pages: None,
        };
        Copier::new(store, &Sealer::plain(), opts, previous, Listing::with_capacity(4))
    }

    fn file_entry(path: &str) -> Entry {
        Entry {
            within: None,
            path: path.into(),
            kind: EntryKind::File,
            mode: 0o600,
            size: 0,
            chunks: vec![],
        }
    }

    /// The previous backup: `content` stored as `base/1/f` through the pipeline.
    async fn previous_backup(store: &WritableStore, content: &[u8]) -> Previous {
        let mut c = copier(store, None);
        let mut f = c.begin_streamed(file_entry("base/1/f")).unwrap();
        c.stream(&mut f, content).await.unwrap();
        c.end_streamed(f).await.unwrap();
        let copied = c.into_copied(vec![], None, 0).await.unwrap();
        let mut manifest =
            Manifest::parse(include_bytes!("../../../tests/fixtures/manifest-v1.json")).unwrap();
        manifest.chunk_size = CS;
        manifest.version = crate::basebackup::manifest::FORMAT_VERSION;
        (manifest.entries, manifest.files) = copied.listing.lists();
        manifest.packs = copied.packs;
        let mut previous = Previous::of(&manifest);
        previous.take_over = false;
        previous
    }

    /// The incremental member carrying `blocks` of `new`, truncated at `truncation`.
    fn member(new: &[u8], blocks: &[u32], truncation: u32) -> Vec<u8> {
        let mut m = Vec::new();
        for w in [MAGIC, blocks.len() as u32, truncation].iter().chain(blocks) {
            m.extend_from_slice(&w.to_le_bytes());
        }
        if !blocks.is_empty() {
            m.resize(m.len().div_ceil(BS) * BS, 0);
        }
        for &b in blocks {
            m.extend_from_slice(&new[b as usize * BS..(b as usize + 1) * BS]);
        }
        m
    }

    /// Put `member` back together over `prior_content` (fed in pieces of `piece` bytes) and
    /// read the file stored: its bytes and the bytes taken over unread.
    async fn rebuilt(prior_content: &[u8], member: &[u8], piece: usize) -> (Vec<u8>, u64) {
        let store = store();
        let previous = previous_backup(&store, prior_content).await;
        let files = &previous.files;
        let prior = Prior {
            store: store.reader(),
            sealer: Sealer::plain(),
            places: Arc::new(previous.frame.places()),
            files: (0..files.len())
                .map(|at| (files.path(at).to_string(), files.entry(at)))
                .collect(),
            chunk_size: CS,
            block_size: BS,
        };
        let mut c = copier(&store, Some(&previous));
        let file = c.begin_streamed(file_entry("base/1/f")).unwrap();
        let mut r = Rebuild::new(&prior, "base/1/INCREMENTAL.f".into(), "base/1/f", file);
        for p in member.chunks(piece) {
            r.feed(&mut c, &prior, p).await.unwrap();
        }
        r.finish(&mut c, &prior, member.len() as u64).await.unwrap();
        let copied = c.into_copied(vec![], Some(&previous), 0).await.unwrap();
        let places = crate::basebackup::pack::Places::of(&copied.packs);
        let e = &copied.listing.lists().0[0];
        let mut out = Vec::new();
        for id in &e.chunks {
            out.extend(
                read_chunk(&prior.store, &prior.sealer, &places, id)
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(out.len() as u64, e.size);
        (out, copied.stats.reused_bytes)
    }

    fn blocks_of(n: usize, seed: u8) -> Vec<u8> {
        (0..n * BS)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test]
    async fn files_are_put_back_together_as_pg_combinebackup_would() {
        let prior = blocks_of(10, 1);
        let changed = blocks_of(14, 99);
        // Each case: blocks sent, truncation length, and the expected file.
        let mut cases: BTreeMap<&str, (Vec<u32>, u32, Vec<u8>)> = BTreeMap::new();
        // Two blocks of the same length changed: the other chunk named again unread.
        let mut same = prior.clone();
        for b in [1usize, 2] {
            same[b * BS..(b + 1) * BS].copy_from_slice(&changed[b * BS..(b + 1) * BS]);
        }
        cases.insert("same length", (vec![1, 2], 10, same));
        // Truncated to 6 blocks, block 5 changed.
        let mut shrunk = prior[..6 * BS].to_vec();
        shrunk[5 * BS..].copy_from_slice(&changed[5 * BS..6 * BS]);
        cases.insert("shrunk", (vec![5], 6, shrunk));
        // Grown to 14 blocks: 12 and 13 sent, 10 and 11 never written (zeroes).
        let mut grown = prior.clone();
        grown.extend(vec![0u8; 2 * BS]);
        grown.extend_from_slice(&changed[12 * BS..14 * BS]);
        cases.insert("grown", (vec![12, 13], 10, grown));
        // Nothing sent, nothing truncated: every chunk named again.
        cases.insert("unchanged", (vec![], 10, prior.clone()));
        // Truncated to nothing, then two blocks written again.
        let mut rewritten = vec![0u8; BS];
        rewritten.extend_from_slice(&changed[BS..2 * BS]);
        cases.insert("rewritten", (vec![1], 0, rewritten));
        for (name, (blocks, truncation, expected)) in cases {
            // Fed whole, and a few bytes at a time (pieces that cross header and blocks).
            let new = if name == "same length" || name == "shrunk" || name == "grown" || name == "rewritten" {
                changed.clone()
            } else {
                prior.clone()
            };
            let m = member(&new, &blocks, truncation);
            for piece in [m.len().max(1), 7] {
                let (got, reused) = rebuilt(&prior, &m, piece).await;
                assert_eq!(got, expected, "{name}, pieces of {piece}");
                // The previous backup's blocks that were not sent again.
                let expect_reused = match name {
                    "same length" => 8 * BS as u64,
                    "shrunk" => 5 * BS as u64,
                    "grown" | "unchanged" => 10 * BS as u64,
                    _ => 0,
                };
                assert_eq!(
                    reused, expect_reused,
                    "{name}: bytes taken from the previous backup"
                );
            }
        }
    }
}
