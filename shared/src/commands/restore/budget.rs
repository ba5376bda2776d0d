//! The restore's memory bound: how many reads, sealed bytes, decompressed bytes, open files and
//! kept chunks may be in flight at once, and the buffers whole chunks are decompressed into.
//! Every figure is a measurement on this project's bench (named beside it).

use std::sync::Arc;

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

/// Bytes of chunks kept in memory for a later reference to the same chunk.
pub const REPEAT_BUDGET: u64 = 8 << 20;

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

/// Sealed bytes one ranged read covers at most.
pub const RUN_MAX_BYTES: u64 = 8 << 20;

/// Sealed bytes one read covers at most with `parallel`: a whole pack at low parallelism (fewer
/// requests, each billed), smaller runs at high parallelism so that `parallel` reads fit in
/// [`SEALED_AHEAD`].
pub fn run_bytes(parallel: usize) -> u64 {
    (SEALED_AHEAD / parallel.max(2) as u64).clamp(1 << 20, RUN_MAX_BYTES)
}

/// The least share of the memory bound a chunk takes, however small: what it costs besides its
/// bytes (its allocation, its answer, its piece on the way to a writer) is not nothing. Counting
/// small chunks by their bytes alone let 2,300 of a many-files restore be in flight at once, and
/// its peak RSS went from 72 to 131 MiB without it going faster (bench/rivals.py --shapes many).
pub const MIN_CHUNK_SHARE: u64 = 32 << 10;

/// KiB units of the memory bound a chunk of `len` bytes takes.
pub(crate) fn units(len: u64) -> u32 {
    u32::try_from(len.max(MIN_CHUNK_SHARE).div_ceil(1024)).unwrap_or(u32::MAX)
}

pub(crate) fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The bounds of one batch's pipeline, in what its semaphores count, from `--parallel` and the
/// backup's chunk size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounds {
    /// Sealed bytes read and not yet decompressed, in KiB: [`SEALED_AHEAD`], two chunks at least.
    pub sealed: usize,
    /// One run's span at most, in KiB: [`run_bytes`].
    pub run: usize,
    /// Reads at once: [`held`].
    pub reads: usize,
    /// Decompressed bytes ahead of the files, in KiB: [`plain_ahead`].
    pub plain: usize,
    /// Decompressions at once: one per CPU, and at most `parallel`.
    pub decoders: usize,
}

impl Bounds {
    pub fn of(parallel: usize, chunk_size: u64) -> Bounds {
        Bounds {
            sealed: units(SEALED_AHEAD.max(2 * chunk_size)) as usize,
            run: (run_bytes(parallel) / 1024) as usize,
            reads: held(parallel),
            plain: units(plain_ahead(chunk_size)) as usize,
            decoders: parallel.clamp(1, cpus()),
        }
    }
}

/// Whether a chunk of `len` bytes (of a backup in chunks of `chunk_size`) is decompressed into a
/// kept buffer of the chunk size ([`Buffers`]): a whole chunk, or one of at least a quarter of it
/// (small files' shared chunks, of 256 KiB to 1 MiB). A fresh allocation of each of those, made
/// on one thread and freed on another, left a many-files restore at 280 MiB of peak RSS.
fn pooled(len: u64, chunk_size: u64) -> bool {
    len <= chunk_size && len.saturating_mul(4) >= chunk_size
}

/// The bytes a decompressed chunk of `len` bytes holds in memory: the buffer it is decompressed
/// into, the whole chunk size when it is [`pooled`]; what the memory bound counts. (The budget for
/// repeated chunks, [`REPEAT_BUDGET`], counts their lengths: counting a pooled chunk's whole
/// buffer there, the repeated chunks of a backup in small chunks stopped fitting and a PostgreSQL
/// 14 restore fetched its chunks six times over, 461 MB for 71.)
fn held_len(len: u64, chunk_size: u64) -> u64 {
    if pooled(len, chunk_size) { chunk_size } else { len }
}

/// Buffers of the chunk size, given back by the writers once written and taken again by the
/// decoder: a restore decompresses into a few allocations instead of faulting in fresh pages for
/// every chunk (a fifth of its CPU time before). Only [`pooled`] chunks use them, each counted at
/// the whole buffer ([`held_len`]), so a buffer never holds more than the share its chunk was
/// counted; at most as many are kept as fit in [`plain_ahead`], plus two per CPU.
#[derive(Debug)]
pub(crate) struct Buffers {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
    chunk_size: usize,
    keep: usize,
}

impl Buffers {
    pub fn new(chunk_size: u64) -> Buffers {
        Buffers {
            free: std::sync::Mutex::default(),
            chunk_size: usize::try_from(chunk_size).unwrap_or(usize::MAX),
            keep: (plain_ahead(chunk_size) / chunk_size.max(1)) as usize + 2 * cpus(),
        }
    }

    /// What a chunk of `len` bytes counts in the memory bound ([`held_len`]).
    pub fn charge(&self, len: u64) -> u64 {
        held_len(len, self.chunk_size as u64)
    }

    /// A buffer for a chunk of `len` bytes: a kept one (or a new one of the chunk size) when it
    /// is [`pooled`], else an empty one.
    pub fn take(&self, len: u64) -> Vec<u8> {
        if !pooled(len, self.chunk_size as u64) {
            return Vec::new();
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.pop().unwrap_or_else(|| Vec::with_capacity(self.chunk_size))
    }

    /// A written chunk's bytes: their buffer is kept when nothing else holds it and there is
    /// room.
    pub fn give(&self, data: Arc<Vec<u8>>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole chunk's buffer comes back once written (nothing else holding it) and is taken
    /// again, also for a shared chunk of a quarter of the chunk size or more (counted as a whole
    /// one); a shorter chunk's never is, so a buffer holds no more than its chunk was counted.
    #[test]
    fn buffers_are_reused_for_whole_and_shared_chunks_only() {
        let b = Buffers::new(1024);
        let v = b.take(1024);
        assert_eq!(v.capacity(), 1024);
        let at = v.as_ptr();
        b.give(Arc::new(v));
        let again = b.take(1024);
        assert_eq!(again.as_ptr(), at, "the same allocation");
        let fresh = b.take(1024);
        assert_ne!(fresh.as_ptr(), at, "only one was given back");
        let shared = Arc::new(again);
        let kept = Arc::clone(&shared);
        b.give(shared);
        let fresh_again = b.take(1024);
        assert_ne!(fresh_again.as_ptr(), at, "still held elsewhere: not kept");
        b.give(kept);
        assert_eq!(
            (b.take(100).capacity(), b.charge(100)),
            (0, 100),
            "a short chunk gets a buffer of its own, counted at its length"
        );
        // A shared chunk of small files, a quarter of a chunk or more, takes a whole one, and
        // counts it.
        let last = b.take(256);
        assert_eq!((last.as_ptr(), b.charge(256)), (at, 1024));
    }
}
