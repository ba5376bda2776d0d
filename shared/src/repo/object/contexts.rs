//! The zstd contexts sealing and opening objects use, kept in pools between objects.

/// Objects at most this large are compressed into a kept buffer ([`Compressing`]) and copied
/// out at their compressed size; larger ones (16 MiB WAL segments) straight into the object.
pub(super) const SCRATCH_MAX: usize = 4 << 20;

/// A zstd compression context at `level` and a buffer to compress into, kept for the next
/// object: a context made per object (`zstd::bulk::compress_to_buffer`) spent 2% of a backup's
/// CPU clearing itself, and a zeroed buffer of the compression bound per object 5% in page
/// faults and memset (most of a megabyte each, for some 50 KiB of pgbench data).
struct Compressing {
    level: i32,
    context: zstd::bulk::Compressor<'static>,
    out: Vec<u8>,
}

/// The kept [`Compressing`]s: as many as have been in use at once, up to [`KEPT_COMPRESSORS`]
/// (each some 2 MiB). Kept in a pool rather than per thread: a backup's blocking threads come and
/// go, and each would have kept its own.
static COMPRESSORS: std::sync::Mutex<Vec<Compressing>> = std::sync::Mutex::new(Vec::new());
const KEPT_COMPRESSORS: usize = 4;

/// Run `with` on a kept context set to `level` and its kept buffer (a new pair when none is
/// free), then keep them for the next object.
fn compressing<T>(
    level: i32,
    with: impl FnOnce(&mut zstd::bulk::Compressor<'static>, &mut Vec<u8>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    let kept = COMPRESSORS.lock().unwrap_or_else(|e| e.into_inner()).pop();
    let mut c = match kept {
        Some(mut c) => {
            if c.level != level {
                c.context.set_compression_level(level)?;
                c.level = level;
            }
            c
        }
        None => Compressing {
            level,
            context: zstd::bulk::Compressor::new(level)?,
            out: Vec::new(),
        },
    };
    let result = with(&mut c.context, &mut c.out);
    if c.out.capacity() > 2 * SCRATCH_MAX {
        c.out = Vec::new();
    }
    let mut pool = COMPRESSORS.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < KEPT_COMPRESSORS {
        pool.push(c);
    }
    result
}

/// `content` compressed at `level`, after `header_len` bytes of room and with `tag_len` bytes
/// of room after it: the object's buffer, sized to what it holds, and the compressed length.
pub(super) fn compress_after(
    content: &[u8],
    level: i32,
    header_len: usize,
    tag_len: usize,
) -> std::io::Result<(Vec<u8>, usize)> {
    let bound = zstd::zstd_safe::compress_bound(content.len());
    compressing(level, |context, scratch| {
        if content.len() > SCRATCH_MAX {
            let mut out = Vec::with_capacity(header_len + bound + tag_len);
            out.resize(header_len, 0);
            // After the header's room: a cursor's position is where the frame starts.
            let mut after = std::io::Cursor::new(&mut out);
            after.set_position(header_len as u64);
            let n = context.compress_to_buffer(content, &mut after)?;
            out.resize(header_len + n + tag_len, 0);
            // The room was the compression bound, about the content's size: given back when
            // most of it is unused (a manifest of 61,000 files kept 18 MiB for its compressed
            // few), at the cost of copying the compressed bytes once.
            if out.capacity() > 2 * out.len() {
                out.shrink_to_fit();
            }
            return Ok((out, n));
        }
        scratch.clear();
        scratch.reserve(bound);
        let n = context.compress_to_buffer(content, scratch)?;
        let mut out = Vec::with_capacity(header_len + n + tag_len);
        out.resize(header_len, 0);
        out.extend_from_slice(&scratch[..n]);
        out.resize(header_len + n + tag_len, 0);
        Ok((out, n))
    })
}

/// The kept decompression contexts (some 100 KiB each to allocate): as many as have been in use
/// at once, up to [`KEPT_DECOMPRESSORS`]. Kept in a pool rather than one per thread, as the
/// compression contexts are: a restore's blocking threads come and go (its writers use them too),
/// and with one context per thread a restore of 61,000 small files had made 324 and held 31 MiB
/// of them at its peak (heaptrack).
static DECOMPRESSORS: std::sync::Mutex<Vec<zstd::bulk::Decompressor<'static>>> =
    std::sync::Mutex::new(Vec::new());
const KEPT_DECOMPRESSORS: usize = 4;

/// Decompress the zstd frame `payload` into `out`'s spare capacity (at most that much).
pub(super) fn decompress_into(payload: &[u8], out: &mut Vec<u8>) -> std::io::Result<usize> {
    let kept = DECOMPRESSORS.lock().unwrap_or_else(|e| e.into_inner()).pop();
    let mut d = match kept {
        Some(d) => d,
        None => zstd::bulk::Decompressor::new()?,
    };
    let result = d.decompress_to_buffer(payload, out);
    let mut pool = DECOMPRESSORS.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < KEPT_DECOMPRESSORS {
        pool.push(d);
    }
    result
}
