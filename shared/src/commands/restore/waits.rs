//! Where a restore's pipeline waited ([`super::pipeline`]): each stage's time waiting on the one
//! before or after it, which tells what bounds the restore (the network, decompression, or the
//! disk).

use std::sync::atomic::{AtomicU64, Ordering};

/// Time each stage of a restore spent waiting on the next or the previous one.
#[derive(Debug, Default)]
pub(crate) struct WaitClock {
    /// The feeder waiting for a decompressed chunk (the files wait on the network or the CPU).
    pub(crate) writing: AtomicU64,
    /// The reader waiting for room in [`super::budget::SEALED_AHEAD`] (the network waits on decompression or
    /// the disk).
    pub(crate) reading: AtomicU64,
    /// The decoder waiting for a chunk's read to answer (the CPU waits on the network).
    pub(crate) decoding: AtomicU64,
    /// The decoder waiting for room in [`super::budget::plain_ahead`] (the CPU waits on the files).
    pub(crate) decoding_room: AtomicU64,
    /// The feeder waiting for a file writer (the files wait on the disk: writes and syncs).
    pub(crate) files: AtomicU64,
}

impl WaitClock {
    pub(crate) fn add(&self, to: &AtomicU64, since: std::time::Instant) {
        let us = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
        to.fetch_add(us, Ordering::Relaxed);
    }

    pub(crate) fn report(&self) -> Waits {
        let s = |a: &AtomicU64| (a.load(Ordering::Relaxed) as f64 / 1e4).round() / 100.0;
        Waits {
            writing_waited_for_data: s(&self.writing),
            reading_waited_for_room: s(&self.reading),
            decoding_waited_for_reads: s(&self.decoding),
            decoding_waited_for_room: s(&self.decoding_room),
            feeding_waited_for_writers: s(&self.files),
        }
    }
}

/// Seconds each stage of a restore waited: where it is bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Waits {
    /// The files waited for decompressed chunks: the restore is bound by reading or decoding.
    pub writing_waited_for_data: f64,
    /// Reads waited for room: the restore is bound by decompression or the disk.
    pub reading_waited_for_room: f64,
    /// Decompression waited for reads to answer: the restore is bound by the network.
    pub decoding_waited_for_reads: f64,
    /// Decompression waited for room ahead of the files: bound by the files' writers.
    pub decoding_waited_for_room: f64,
    /// Files waited for a writer (all busy writing or syncing): bound by the disk.
    pub feeding_waited_for_writers: f64,
}

impl Waits {
    pub(crate) fn add(&mut self, o: Waits) {
        self.writing_waited_for_data += o.writing_waited_for_data;
        self.reading_waited_for_room += o.reading_waited_for_room;
        self.decoding_waited_for_reads += o.decoding_waited_for_reads;
        self.decoding_waited_for_room += o.decoding_waited_for_room;
        self.feeding_waited_for_writers += o.feeding_waited_for_writers;
    }
}
