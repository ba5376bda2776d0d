//! Reading a file's chunks for a backup: up to `ahead` of them at once, each read on a blocking
//! thread into a buffer handed back by the chunks before it ([`Buffers`]), its relation
//! pages checked on the reading thread.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::pages::{self, PageCheck};
use crate::basebackup::page_checksum::{Checked, RelationFile};

/// A file's chunks being read, up to `ahead` at once (each holding its share of the memory
/// bound), and handed out in order. A buffered read is the kernel copying from its page cache,
/// at about 1.4 GB/s per thread on this machine: one read at a time was what a backup of pgbench
/// scale 300 waited on.
pub(super) struct Reads {
    body: Arc<Body>,
    chunk_size: usize,
    /// The chunks the file had when opened: up to `ahead` of them are read at once; past them
    /// (it grew), one at a time.
    expected: u64,
    ahead: usize,
    /// The next chunk to start reading.
    next: u64,
    /// A relation file whose pages are verified as they are read.
    check: Option<(RelationFile, PageCheck)>,
    in_flight: VecDeque<JoinHandle<ReadDone>>,
}

/// A chunk read, its share of the memory bound, and its pages checked.
type ReadDone = (std::io::Result<Vec<u8>>, OwnedSemaphorePermit, Option<Checked>);

impl Reads {
    pub(super) fn new(
        body: Body,
        chunk_size: usize,
        ahead: usize,
        check: Option<(RelationFile, PageCheck)>,
    ) -> Reads {
        let size = match &body {
            Body::Bytes(b) => b.len() as u64,
            Body::File(_, size) => *size,
        };
        Reads {
            body: Arc::new(body),
            chunk_size,
            expected: size.div_ceil(chunk_size.max(1) as u64),
            ahead: ahead.max(1),
            next: 0,
            check,
            in_flight: VecDeque::new(),
        }
    }

    /// The next chunk in order (shorter than a chunk, or empty, at the end of the file: the
    /// caller asks for no more after that), with its share of `in_memory`.
    pub(super) async fn next(
        &mut self,
        in_memory: &Arc<Semaphore>,
        buffers: &Arc<Buffers>,
    ) -> std::io::Result<(Vec<u8>, OwnedSemaphorePermit, Option<Checked>)> {
        loop {
            let limit = if self.next < self.expected { self.ahead } else { 1 };
            if self.in_flight.len() >= limit {
                break;
            }
            let permit = Arc::clone(in_memory)
                .acquire_owned()
                .await
                .expect("semaphore is never closed");
            let (body, buffers, len) = (Arc::clone(&self.body), Arc::clone(buffers), self.chunk_size);
            let offset = self.next * len as u64;
            let check = self.check;
            self.in_flight.push_back(tokio::task::spawn_blocking(move || {
                let mut buf = buffers.take(len);
                let read = body.read_at(&mut buf, offset, len).map(|()| buf);
                // On the bytes just read, on the reading thread: a CPU pass over memory in
                // cache, no second read except of a page that fails.
                let checked = match (&read, check) {
                    (Ok(buf), Some((file, check))) => {
                        Some(pages::check_read(buf, offset, &file, check, |at, page| {
                            body.read_at(page, at, pages::PAGE)
                        }))
                    }
                    _ => None,
                };
                (read, permit, checked)
            }));
            self.next += 1;
        }
        // At least one read is in flight: the limit is never below one.
        let reading = self.in_flight.pop_front().expect("a read was started");
        let (read, permit, checked) = reading.await.expect("read task panicked");
        Ok((read?, permit, checked))
    }

    /// Wait for the reads still in flight (past the end of the file): none outlives its file.
    pub(super) async fn finish(mut self) {
        while let Some(reading) = self.in_flight.pop_front() {
            let _ = reading.await;
        }
    }
}

/// What a file's chunks are read from: `pg_control`'s checked bytes, or the file opened with
/// its size when it was opened.
pub(super) enum Body {
    Bytes(Vec<u8>),
    File(std::fs::File, u64),
}

impl Body {
    /// Read up to `len` bytes at `offset` into `buf` (emptied first), fewer only at the end.
    pub(super) fn read_at(&self, buf: &mut Vec<u8>, offset: u64, len: usize) -> std::io::Result<()> {
        buf.clear();
        match self {
            Body::Bytes(b) => {
                let from = usize::try_from(offset).unwrap_or(usize::MAX).min(b.len());
                buf.extend_from_slice(&b[from..(from + len).min(b.len())]);
            }
            Body::File(f, _) => {
                buf.reserve_exact(len);
                while buf.len() < len {
                    let at = offset + buf.len() as u64;
                    // Into uninitialised capacity (no zeroing), straight from the cache.
                    let n = rustix::io::pread(f, rustix::buffer::spare_capacity(buf), at)?;
                    if n == 0 {
                        break;
                    }
                }
                // A buffer with room for more read past the chunk: the next chunk's bytes.
                buf.truncate(len);
            }
        }
        Ok(())
    }
}

/// Chunk buffers handed back once a chunk is hashed (and sealed), so that the next chunks are
/// read into memory already mapped: a fresh chunk-sized allocation each time costs page faults
/// and the kernel's zeroing of every page. Holds at most as many as are in flight.
#[derive(Default)]
pub(super) struct Buffers(Mutex<Vec<Vec<u8>>>);

impl Buffers {
    pub(super) fn take(&self, capacity: usize) -> Vec<u8> {
        let mut buf = self.0.lock().expect("never poisoned").pop().unwrap_or_default();
        buf.clear();
        buf.reserve_exact(capacity);
        buf
    }

    pub(super) fn give(&self, buf: Vec<u8>) {
        self.0.lock().expect("never poisoned").push(buf);
    }
}
