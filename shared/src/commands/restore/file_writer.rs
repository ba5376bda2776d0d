//! Writing one file of a restore, and making what was written durable.
//!
//! Each file is created (or, for `--delta`, opened without following a link) and written from
//! one descriptor by a thread of its own: one file's `fsync` overlaps the next files' fetches and
//! writes, and no two threads ever write into the same file (they would queue on its inode
//! lock). A large file is written past the page cache (`O_DIRECT`, [`super::direct`]), pieces
//! already waiting that follow each other with one call of up to [`WRITE_RUN`] bytes; where the
//! file system refuses that, every [`FLUSH_AFTER`] bytes a large file asks the kernel to start
//! writing back what it holds, as PostgreSQL's `pg_flush_data` does, so that the disk works while
//! the restore decompresses and the final `fsync` finds little left to write. With
//! `--sync-method syncfs` the files are not synced one by one: each file system is, once
//! ([`syncfs_each`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;

use super::budget::Buffers;
use super::direct::{Sink, create_new, open_for_write, open_to_compare};
use super::work::FileToWrite;
use super::{Progress, RestoreError, write_err};

/// Bytes of a large file after which its writeback is started (`posix_fadvise(DONTNEED)` over
/// what was written: the kernel begins writing those pages out and keeps none it need not).
pub const FLUSH_AFTER: u64 = 8 << 20;

/// Bytes a file's writer writes with one call at most, of pieces already waiting that follow
/// each other: the disk of this machine takes 4 MiB direct writes at 1.7–1.8 GB/s and 1 MiB ones
/// at 1.4–1.5 (`dd oflag=direct`, 4 GiB).
pub const WRITE_RUN: u64 = 4 << 20;

/// One chunk's bytes on their way to a file, holding their share of the memory bound.
pub(crate) struct Piece {
    pub offset: u64,
    /// The part of `data` written (a small file's slice of a shared chunk), else all of it.
    pub range: Option<std::ops::Range<usize>>,
    pub data: Arc<Vec<u8>>,
    pub _held: Option<OwnedSemaphorePermit>,
}

impl Piece {
    /// The bytes written. The manifest's validation and the chunk's length check bound the
    /// range (a shared chunk's file lies within it).
    pub(crate) fn bytes(&self) -> &[u8] {
        match &self.range {
            Some(r) => &self.data[r.clone()],
            None => &self.data,
        }
    }
}

/// What writing one file did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileWritten {
    pub bytes: u64,
    /// A file compared as its bytes arrived ([`FileToWrite::compare`]) held them all already.
    pub found_equal: bool,
}

/// Write one file from the pieces `rx` delivers until its sender is dropped, set its mode, and
/// (`fsync`) make it durable.
pub(crate) fn write_file(
    target: &FileToWrite,
    rx: std::sync::mpsc::Receiver<Piece>,
    fsync: bool,
    progress: &dyn Progress,
    buffers: &Buffers,
) -> Result<FileWritten, RestoreError> {
    use std::os::unix::fs::PermissionsExt;
    let path = &target.path;
    let file = if target.create {
        create_new(path)?
    } else if target.compare {
        open_to_compare(path)?
    } else {
        open_for_write(path)?
    };
    let (mut written, mut end, mut flushed) = (0u64, 0u64, 0u64);
    let mut sink = Sink::new(&file, target.size);
    let mut next = None;
    while let Some(run) = next_run(&rx, &mut next) {
        let offset = run[0].offset;
        let slices: Vec<&[u8]> = run.iter().map(Piece::bytes).collect();
        let len: u64 = slices.iter().map(|s| s.len() as u64).sum();
        if target.compare && on_disk(&file, &slices, offset).map_err(write_err(path))? {
            progress.advance(len);
            for piece in run {
                buffers.give(piece.data);
            }
            continue;
        }
        sink.write_run(&slices, offset).map_err(write_err(path))?;
        written += len;
        end = end.max(offset + len);
        progress.advance(len);
        for piece in run {
            buffers.give(piece.data);
        }
        if fsync && !sink.is_direct() && end >= flushed + FLUSH_AFTER {
            // Start the write-back of what was written so far (advice: an error is not one).
            let _ = rustix::fs::fadvise(
                &file,
                flushed,
                std::num::NonZeroU64::new(end - flushed),
                rustix::fs::Advice::DontNeed,
            );
            flushed = end;
        }
    }
    if target.create && end != target.size {
        file.set_len(target.size).map_err(write_err(path))?;
    }
    let mode = target.mode & 0o7777;
    let found_equal = target.compare && written == 0;
    // A mode already right is not set again: the change would write the inode for nothing (a
    // created file has the mode it was created with, 0600, unless the umask took some away).
    let mode_right = file
        .metadata()
        .is_ok_and(|m| m.permissions().mode() & 0o7777 == mode);
    if !mode_right {
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(write_err(path))?;
    }
    // A file found as the backup has it is left alone, as a delta restore leaves the files its
    // plan found unchanged: not even its `fsync` (a journal commit per file).
    if fsync && !(found_equal && mode_right) {
        file.sync_all().map_err(write_err(path))?;
    }
    Ok(FileWritten {
        bytes: written,
        found_equal,
    })
}

/// Whether `file` holds `run` at `offset` already.
fn on_disk(file: &std::fs::File, run: &[&[u8]], offset: u64) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let mut at = offset;
    let mut there = Vec::new();
    for piece in run {
        there.resize(piece.len(), 0);
        match file.read_exact_at(&mut there, at) {
            Ok(()) if there == *piece => at += piece.len() as u64,
            Ok(()) => return Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The next pieces to write with one call: the first that arrives (`next`, or from `rx`), and
/// those already waiting that continue it, up to [`WRITE_RUN`] bytes; a waiting piece that does
/// not continue it is left in `next`. None once the sender is gone and nothing is left.
fn next_run(rx: &std::sync::mpsc::Receiver<Piece>, next: &mut Option<Piece>) -> Option<Vec<Piece>> {
    let first = match next.take() {
        Some(p) => p,
        None => rx.recv().ok()?,
    };
    let mut end = first.offset + first.bytes().len() as u64;
    let mut bytes = first.bytes().len() as u64;
    let mut run = vec![first];
    while bytes < WRITE_RUN {
        match rx.try_recv() {
            Ok(p) if p.offset == end => {
                end += p.bytes().len() as u64;
                bytes += p.bytes().len() as u64;
                run.push(p);
            }
            Ok(p) => {
                *next = Some(p);
                break;
            }
            Err(_) => break,
        }
    }
    Some(run)
}

/// The directories whose file systems a `syncfs` must cover: `roots` and the directory of each
/// of `files`, opened now, one per device.
pub(crate) fn open_roots<'a>(
    roots: &[PathBuf],
    files: impl Iterator<Item = &'a FileToWrite>,
) -> Result<Vec<(PathBuf, std::fs::File)>, RestoreError> {
    use std::os::unix::fs::MetadataExt;
    let mut dirs: std::collections::BTreeSet<&Path> = roots.iter().map(PathBuf::as_path).collect();
    dirs.extend(files.filter_map(|f| f.path.parent()));
    let mut devices = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for dir in dirs {
        let d = std::fs::File::open(dir).map_err(write_err(dir))?;
        if devices.insert(d.metadata().map_err(write_err(dir))?.dev()) {
            out.push((dir.to_path_buf(), d));
        }
    }
    Ok(out)
}

/// `syncfs` each file system once: every byte and name written there since its descriptor was
/// opened is durable when this returns, whatever the number of files.
pub(crate) fn syncfs_each(roots: &[(PathBuf, std::fs::File)]) -> Result<(), RestoreError> {
    for (dir, d) in roots {
        rustix::fs::syncfs(d).map_err(|e| write_err(dir)(e.into()))?;
    }
    Ok(())
}
