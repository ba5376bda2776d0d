//! One restored file's writes, past the page cache where the file system allows it.
//!
//! A buffered write copies every byte into the page cache, and the kernel does that copy in the
//! writing thread under the file's inode lock: restoring pgbench scale 300 from Garage, that copy
//! (`copy_folio_from_iter_atomic`) was half of the restore's CPU time (3.3 s of 6.4 s, `perf
//! record`), at about 1.4 GB/s per file on this machine, and the files' writers were what the
//! whole pipeline waited on. With `O_DIRECT` the device reads the chunk from the restore's own
//! buffer: a large file's writer waits on the disk but takes almost no CPU, which is left to
//! decompressing and verifying (PostgreSQL's own `io_direct`, since 16, does the same for its
//! data files).
//!
//! So a file of at least [`DIRECT_MIN`] bytes is written with `O_DIRECT` where the file system
//! supports it (`fcntl(F_SETFL)` refuses it otherwise: tmpfs, some FUSE file systems): each
//! piece whose offset and length are multiples of [`DIRECT_ALIGN`] goes to the disk from memory
//! aligned to it (from the piece itself when it is aligned, else through a staging buffer of the
//! writer's own). Any other piece (a file's short tail) is written through the page cache, the
//! flag cleared for that write. A direct write the kernel refuses (`EINVAL`: an alignment this
//! device does not take) turns direct writing off for the rest of the file, and the piece is
//! written again through the page cache: direct writing is an optimisation, never a failure.
//! Durability is unchanged: the file is still synced (`fsync` writes its metadata and flushes the
//! device's cache) or its file system is (`syncfs`).
//!
//! Also here: how a restored file is opened (created new, or an existing one never through a
//! symbolic link).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rustix::fs::OFlags;

use super::{RestoreError, write_err};

/// Offset, length and memory alignment of a direct write: the largest logical block size of
/// common devices (512 on most, 4096 on some).
pub const DIRECT_ALIGN: usize = 4096;

/// Files at least this large are written with `O_DIRECT`: below it, a file's writes are few and
/// its sync is what costs.
pub const DIRECT_MIN: u64 = 8 << 20;

/// How a file's pieces reached it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ways {
    /// Bytes written with `O_DIRECT`, straight from the piece.
    pub direct: u64,
    /// Bytes written with `O_DIRECT` through the staging buffer (the piece was not aligned in
    /// memory).
    pub staged: u64,
    /// Bytes written through the page cache.
    pub buffered: u64,
}

/// Writes into one file: direct where it can, through the page cache otherwise.
pub(crate) struct Sink<'a> {
    file: &'a File,
    /// Direct writing is available for this file (may be turned off by a refusal).
    direct: bool,
    /// Whether `O_DIRECT` is set on the descriptor now.
    flag_on: bool,
    /// Aligned staging memory, made at the first misaligned piece: `stage_at` is where the
    /// aligned part of `stage` begins.
    stage: Vec<u8>,
    stage_at: usize,
    pub ways: Ways,
}

impl<'a> Sink<'a> {
    /// A sink for `file`, which will hold `size` bytes: direct when it is large enough and the
    /// file system takes `O_DIRECT`.
    pub fn new(file: &'a File, size: u64) -> Sink<'a> {
        let mut sink = Sink {
            file,
            direct: false,
            flag_on: false,
            stage: Vec::new(),
            stage_at: 0,
            ways: Ways::default(),
        };
        if size >= DIRECT_MIN {
            sink.direct = sink.set_flag(true).is_ok();
        }
        sink
    }

    /// Whether the bytes written so far went past the page cache: nothing to start writing back.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Write all of `data` at `offset`.
    pub fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        let len = data.len() as u64;
        if self.direct && !data.is_empty() && aligned(offset) && aligned(len) {
            match self.write_direct(data, offset) {
                Ok(()) => return Ok(()),
                // Refused: not an alignment this device takes. Written the other way, and never
                // tried again for this file.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct = false;
                    self.stage = Vec::new();
                }
                Err(e) => return Err(e),
            }
        }
        if self.flag_on {
            self.set_flag(false)?;
        }
        self.file.write_all_at(data, offset)?;
        self.ways.buffered += len;
        Ok(())
    }

    /// Write `run`, pieces that follow each other, at `offset`: with one `pwritev` when every
    /// piece can go direct from where it is, else piece by piece ([`Sink::write_at`]).
    pub fn write_run(&mut self, run: &[&[u8]], offset: u64) -> io::Result<()> {
        let whole = run
            .iter()
            .all(|p| !p.is_empty() && aligned(p.as_ptr() as u64) && aligned(p.len() as u64));
        if run.len() > 1 && self.direct && aligned(offset) && whole {
            if !self.flag_on {
                self.set_flag(true)?;
            }
            let slices: Vec<io::IoSlice<'_>> = run.iter().map(|p| io::IoSlice::new(p)).collect();
            let total: usize = run.iter().map(|p| p.len()).sum();
            match rustix::io::pwritev(self.file, &slices, offset) {
                Ok(n) if n == total => {
                    self.ways.direct += total as u64;
                    return Ok(());
                }
                // Short: what was written counts, the rest goes piece by piece below.
                Ok(n) => return self.write_rest(run, offset, n),
                Err(e) if e == rustix::io::Errno::INVAL => {
                    self.direct = false;
                    self.stage = Vec::new();
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.write_rest(run, offset, 0)
    }

    /// Write what of `run` (at `offset`) lies past its first `done` bytes, piece by piece.
    fn write_rest(&mut self, run: &[&[u8]], mut offset: u64, mut done: usize) -> io::Result<()> {
        self.ways.direct += done as u64;
        for piece in run {
            let skip = done.min(piece.len());
            done -= skip;
            if skip < piece.len() {
                self.write_at(&piece[skip..], offset + skip as u64)?;
            }
            offset += piece.len() as u64;
        }
        Ok(())
    }

    fn write_direct(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        if !self.flag_on {
            self.set_flag(true)?;
        }
        if aligned(data.as_ptr() as u64) {
            self.file.write_all_at(data, offset)?;
            self.ways.direct += data.len() as u64;
            return Ok(());
        }
        if self.stage.len() < data.len() + DIRECT_ALIGN {
            self.stage = vec![0; data.len() + DIRECT_ALIGN];
            let misalign = self.stage.as_ptr() as usize % DIRECT_ALIGN;
            self.stage_at = (DIRECT_ALIGN - misalign) % DIRECT_ALIGN;
        }
        let stage = &mut self.stage[self.stage_at..self.stage_at + data.len()];
        stage.copy_from_slice(data);
        self.file.write_all_at(stage, offset)?;
        self.ways.staged += data.len() as u64;
        Ok(())
    }

    /// Set or clear `O_DIRECT` on the descriptor.
    fn set_flag(&mut self, on: bool) -> io::Result<()> {
        let flags = rustix::fs::fcntl_getfl(self.file)?;
        let flags = if on {
            flags | OFlags::DIRECT
        } else {
            flags - OFlags::DIRECT
        };
        rustix::fs::fcntl_setfl(self.file, flags)?;
        self.flag_on = on;
        Ok(())
    }
}

/// Create `path`, which must not exist (never following or replacing anything), owner-only
/// until its mode is set.
pub(crate) fn create_new(path: &Path) -> Result<std::fs::File, RestoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(write_err(path))
}

/// Open an existing regular file for writing, never through a symbolic link (`O_NOFOLLOW`): the
/// plan checked each file's type before writing, and a link planted since must fail, not be
/// written through.
pub(crate) fn open_for_write(path: &Path) -> Result<std::fs::File, RestoreError> {
    open_nofollow(path, true)
}

/// Open an existing regular file for reading and writing, never through a symbolic link (see
/// [`open_for_write`]).
pub(crate) fn open_to_compare(path: &Path) -> Result<std::fs::File, RestoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(write_err(path))
}

/// Open `path` for reading, or writing, never through a symbolic link.
pub(crate) fn open_nofollow(path: &Path, write: bool) -> Result<std::fs::File, RestoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(write_err(path))
}

fn aligned(x: u64) -> bool {
    x.is_multiple_of(DIRECT_ALIGN as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Whatever the mix of aligned, misaligned and short pieces, in any order, the file holds
    /// exactly what was written where it was written.
    #[test]
    fn every_piece_lands_at_its_offset_whichever_way_it_went() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let chunk = 1 << 20;
        let size = 9 * chunk as u64 + 12_345;
        let mut sink = Sink::new(&file, size);
        let mut want = vec![0u8; size as usize];
        // The tail first, then chunks out of order; one piece misaligned in memory.
        let tail = pattern(12_345, 7);
        sink.write_at(&tail, 9 * chunk as u64).unwrap();
        want[9 * chunk..].copy_from_slice(&tail);
        for (n, i) in [3usize, 0, 8, 1, 2, 7, 4, 6, 5].into_iter().enumerate() {
            let data = pattern(chunk, i as u8);
            if n == 2 {
                // A slice one byte into a larger buffer: not aligned in memory.
                let mut shifted = vec![0u8; chunk + 1];
                shifted[1..].copy_from_slice(&data);
                sink.write_at(&shifted[1..], (i * chunk) as u64).unwrap();
            } else {
                sink.write_at(&data, (i * chunk) as u64).unwrap();
            }
            want[i * chunk..(i + 1) * chunk].copy_from_slice(&data);
        }
        let ways = sink.ways;
        drop(sink);
        file.sync_all().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), want);
        assert_eq!(ways.direct + ways.staged + ways.buffered, size);
        assert_eq!(
            ways.buffered % chunk as u64,
            12_345,
            "only the tail is not aligned"
        );
        if ways.direct + ways.staged > 0 {
            // This file system takes O_DIRECT: the misaligned piece went through the stage.
            assert!(ways.staged >= chunk as u64, "{ways:?}");
        }
    }

    /// Runs of pieces, aligned or not, land as the pieces would one by one.
    #[test]
    fn runs_land_like_their_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).unwrap();
        let chunk = 1 << 20;
        let mut sink = Sink::new(&file, DIRECT_MIN * 2);
        let pieces: Vec<Vec<u8>> = (0..6).map(|i| pattern(chunk, i)).collect();
        let run: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
        sink.write_run(&run[..4], 0).unwrap();
        // A run whose middle piece is misaligned in memory, and a short one at the end.
        let mut shifted = vec![0u8; chunk + 1];
        shifted[1..].copy_from_slice(&pieces[4]);
        let tail = pattern(100, 9);
        sink.write_run(&[&shifted[1..], &pieces[5], &tail], 4 * chunk as u64)
            .unwrap();
        let ways = sink.ways;
        drop(sink);
        let mut want: Vec<u8> = pieces.concat();
        want.extend_from_slice(&tail);
        assert_eq!(std::fs::read(&path).unwrap(), want);
        assert_eq!(ways.direct + ways.staged + ways.buffered, want.len() as u64);
    }

    /// A small file is never written direct.
    #[test]
    fn small_files_go_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("f")).unwrap();
        let mut sink = Sink::new(&file, DIRECT_MIN - 1);
        assert!(!sink.is_direct());
        sink.write_at(&[1u8; 4096], 0).unwrap();
        assert_eq!(sink.ways.buffered, 4096);
    }
}
