//! The page a full-page image stores (`RestoreBlockImage` in `xlogreader.c`): the image without
//! the page's unused middle (the "hole"), compressed or not (`wal_compression`: pglz, and from
//! PostgreSQL 15 lz4 and zstd too). Pure and bounded: a page is at most 32 KiB, and bytes that do
//! not decompress to one give no page, never a panic.

/// Largest page PostgreSQL builds with (`BLCKSZ` up to 32 KiB).
const MAX_PAGE: usize = 32 * 1024;
/// `offsetof(PageHeaderData, pd_pagesize_version)`.
const PD_PAGESIZE_AT: usize = 18;
/// `SizeOfPageHeaderData`.
const PAGE_HEADER_LEN: usize = 24;

/// `bimg_info` bits.
const BKPIMAGE_HAS_HOLE: u8 = 0x01;
/// Up to PostgreSQL 14: compressed, with pglz (the only method).
const BKPIMAGE_IS_COMPRESSED: u8 = 0x02;
/// From PostgreSQL 15, one bit per method.
const BKPIMAGE_COMPRESS_PGLZ: u8 = 0x04;
const BKPIMAGE_COMPRESS_LZ4: u8 = 0x08;
const BKPIMAGE_COMPRESS_ZSTD: u8 = 0x10;

/// How an image is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    None,
    Pglz,
    Lz4,
    Zstd,
}

fn method(info: u8, pg_version: u32) -> Method {
    if pg_version < 15 {
        return match info & BKPIMAGE_IS_COMPRESSED {
            0 => Method::None,
            _ => Method::Pglz,
        };
    }
    match info {
        i if i & BKPIMAGE_COMPRESS_PGLZ != 0 => Method::Pglz,
        i if i & BKPIMAGE_COMPRESS_LZ4 != 0 => Method::Lz4,
        i if i & BKPIMAGE_COMPRESS_ZSTD != 0 => Method::Zstd,
        _ => Method::None,
    }
}

/// The page `image` stores: decompressed per `info` (`bimg_info`) as PostgreSQL `pg_version`
/// writes it, with its hole put back (zeros, at `hole_offset`, `hole_length` long when the image
/// is compressed; for a plain image the page size, from the page's own header, less the image's
/// length). `None` when the bytes do not make a page.
pub fn restore(
    image: &[u8],
    info: u8,
    hole_offset: u16,
    hole_length: u16,
    pg_version: u32,
) -> Option<Vec<u8>> {
    let method = method(info, pg_version);
    let bytes = match method {
        Method::None => image.to_vec(),
        Method::Pglz => pglz_decompress(image, MAX_PAGE)?,
        Method::Lz4 => lz4_decompress(image, MAX_PAGE)?,
        Method::Zstd => zstd::bulk::decompress(image, MAX_PAGE).ok()?,
    };
    let size = usize::from(
        u16::from_le_bytes(bytes.get(PD_PAGESIZE_AT..PD_PAGESIZE_AT + 2)?.try_into().ok()?) & 0xFF00,
    );
    if info & BKPIMAGE_HAS_HOLE == 0 {
        return (bytes.len() == size).then_some(bytes);
    }
    let hole = usize::from(hole_offset);
    let hole_len = match method {
        Method::None => size.checked_sub(bytes.len())?,
        _ => usize::from(hole_length),
    };
    if hole < PAGE_HEADER_LEN || hole > bytes.len() || bytes.len() + hole_len != size {
        return None;
    }
    let mut page = Vec::with_capacity(size);
    page.extend_from_slice(&bytes[..hole]);
    page.resize(hole + hole_len, 0);
    page.extend_from_slice(&bytes[hole..]);
    Some(page)
}

/// Copy `len` bytes from `dist` bytes back in `out` (the regions may overlap: a run), within
/// `max` bytes of output; `None` when `dist` points before the start.
fn copy_back(out: &mut Vec<u8>, dist: usize, len: usize, max: usize) -> Option<()> {
    if dist == 0 || dist > out.len() || out.len() + len > max {
        return None;
    }
    let from = out.len() - dist;
    for i in 0..len {
        out.push(out[from + i]);
    }
    Some(())
}

/// PostgreSQL's pglz (`pg_lzcompress.c`): a control byte, then eight items, each a literal byte
/// (bit 0) or a back-reference (bit 1): 2 bytes, length 3 to 17 in the low nibble of the first
/// and a 12-bit distance, or a third byte adding to length 18.
fn pglz_decompress(src: &[u8], max: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(max.min(8192));
    let mut sp = 0;
    while sp < src.len() {
        let ctrl = src[sp];
        sp += 1;
        for bit in 0..8 {
            if sp >= src.len() {
                break;
            }
            if ctrl >> bit & 1 == 0 {
                if out.len() >= max {
                    return None;
                }
                out.push(src[sp]);
                sp += 1;
                continue;
            }
            let (b0, b1) = (usize::from(src[sp]), usize::from(*src.get(sp + 1)?));
            sp += 2;
            let mut len = (b0 & 0x0F) + 3;
            let dist = ((b0 & 0xF0) << 4) | b1;
            if len == 18 {
                len += usize::from(*src.get(sp)?);
                sp += 1;
            }
            copy_back(&mut out, dist, len, max)?;
        }
    }
    Some(out)
}

/// An LZ4 block (`LZ4_decompress_safe`): sequences of a token (literal length in its high
/// nibble, match length less 4 in its low one, 15 meaning more bytes follow, each adding until one
/// below 255), the literals, then a 2-byte distance; the last sequence has literals only.
fn lz4_decompress(src: &[u8], max: usize) -> Option<Vec<u8>> {
    fn length(src: &[u8], sp: &mut usize, nibble: u8) -> Option<usize> {
        let mut len = usize::from(nibble);
        if nibble == 15 {
            loop {
                let b = *src.get(*sp)?;
                *sp += 1;
                len = len.checked_add(usize::from(b))?;
                if b != 255 {
                    break;
                }
            }
        }
        Some(len)
    }
    let mut out = Vec::with_capacity(max.min(8192));
    let mut sp = 0;
    loop {
        let token = *src.get(sp)?;
        sp += 1;
        let lit = length(src, &mut sp, token >> 4)?;
        let literals = src.get(sp..sp.checked_add(lit)?)?;
        if out.len() + lit > max {
            return None;
        }
        out.extend_from_slice(literals);
        sp += lit;
        if sp == src.len() {
            return Some(out);
        }
        let dist = usize::from(u16::from_le_bytes(src.get(sp..sp + 2)?.try_into().ok()?));
        sp += 2;
        let len = length(src, &mut sp, token & 0x0F)?.checked_add(4)?;
        copy_back(&mut out, dist, len, max)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An 8 KiB page with a recognisable body and its hole (zeros) from 100 to 8000.
    fn page() -> Vec<u8> {
        let mut p = vec![0u8; 8192];
        p[PD_PAGESIZE_AT..PD_PAGESIZE_AT + 2].copy_from_slice(&(8192u16 | 4).to_le_bytes());
        for (i, b) in p
            .iter_mut()
            .enumerate()
            .skip(PAGE_HEADER_LEN)
            .take(100 - PAGE_HEADER_LEN)
        {
            *b = i as u8;
        }
        for (i, b) in p.iter_mut().enumerate().skip(8000) {
            *b = (i % 7) as u8;
        }
        p
    }

    fn without_hole(p: &[u8]) -> Vec<u8> {
        [&p[..100], &p[8000..]].concat()
    }

    /// pglz of `b` with literals only: a zero control byte before each eight.
    fn pglz_literals(b: &[u8]) -> Vec<u8> {
        b.chunks(8)
            .flat_map(|c| std::iter::once(0).chain(c.iter().copied()))
            .collect()
    }

    /// An LZ4 block of `b` as literals only.
    fn lz4_literals(b: &[u8]) -> Vec<u8> {
        let mut out = vec![0xF0];
        let mut rest = b.len() - 15;
        while rest >= 255 {
            out.push(255);
            rest -= 255;
        }
        out.push(rest as u8);
        out.extend_from_slice(b);
        out
    }

    #[test]
    fn plain_and_compressed_images_give_the_page_back() {
        let p = page();
        let stored = without_hole(&p);
        let hole = (100, 7900);
        assert_eq!(
            restore(&stored, BKPIMAGE_HAS_HOLE, hole.0, 0, 15).as_deref(),
            Some(&p[..])
        );
        assert_eq!(restore(&p, 0, 0, 0, 15).as_deref(), Some(&p[..]));
        let zstd = zstd::bulk::compress(&stored, 3).unwrap();
        let lz4 = lz4_literals(&stored);
        let pglz = pglz_literals(&stored);
        for (bytes, info, version) in [
            (&zstd, BKPIMAGE_HAS_HOLE | BKPIMAGE_COMPRESS_ZSTD, 16),
            (&lz4, BKPIMAGE_HAS_HOLE | BKPIMAGE_COMPRESS_LZ4, 15),
            (&pglz, BKPIMAGE_HAS_HOLE | BKPIMAGE_COMPRESS_PGLZ, 18),
            (&pglz, BKPIMAGE_HAS_HOLE | BKPIMAGE_IS_COMPRESSED, 13),
        ] {
            assert_eq!(
                restore(bytes, info, hole.0, hole.1, version).as_deref(),
                Some(&p[..]),
                "info {info:#x} on {version}"
            );
        }
        // A hole that does not add up to the page size gives no page.
        assert_eq!(
            restore(&zstd, BKPIMAGE_HAS_HOLE | BKPIMAGE_COMPRESS_ZSTD, 100, 7000, 16),
            None
        );
        // 0x02 is BKPIMAGE_APPLY from 15 on, not compression.
        assert_eq!(
            restore(&stored, BKPIMAGE_HAS_HOLE | 0x02, hole.0, 0, 15).as_deref(),
            Some(&p[..])
        );
    }

    #[test]
    fn back_references_run_over_what_they_copy() {
        // pglz: "abc", then 12 bytes from 3 back; then a long one (length 18 + 2) from 1 back.
        let src = [0b0001_1000, b'a', b'b', b'c', 0x09, 0x03, 0x0F, 0x01, 2];
        let want = [b"abcabcabcabcabc".as_slice(), &[b'c'; 20]].concat();
        assert_eq!(pglz_decompress(&src, 100).unwrap(), want);
        // LZ4: "ab", then 6 bytes from 2 back, then the literal "z".
        let src = [0x22, b'a', b'b', 0x02, 0x00, 0x10, b'z'];
        assert_eq!(lz4_decompress(&src, 100).unwrap(), b"ababababz");
        // Distances before the start, and outputs past the limit, are refused.
        assert_eq!(pglz_decompress(&[0x01, 0x00, 0x05], 100), None);
        assert_eq!(lz4_decompress(&[0x10, b'a', 0x02, 0x00], 100), None);
        assert_eq!(lz4_decompress(&lz4_literals(&[7; 300]), 200), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Any bytes, any header: a page of the size its header says, or none; never a panic.
        #[test]
        fn arbitrary_images_give_a_whole_page_or_none(
            image in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            info: u8,
            hole_offset: u16,
            hole_length: u16,
            version in 13u32..20,
        ) {
            if let Some(p) = restore(&image, info, hole_offset, hole_length, version) {
                let size = usize::from(u16::from_le_bytes([p[PD_PAGESIZE_AT], p[PD_PAGESIZE_AT + 1]]) & 0xFF00);
                proptest::prop_assert_eq!(p.len(), size);
            }
        }

        /// pglz and LZ4 streams of literals give their bytes back.
        #[test]
        fn literal_streams_decompress_to_their_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 15..3000)) {
            proptest::prop_assert_eq!(pglz_decompress(&pglz_literals(&bytes), MAX_PAGE), Some(bytes.clone()));
            proptest::prop_assert_eq!(lz4_decompress(&lz4_literals(&bytes), MAX_PAGE), Some(bytes));
        }
    }

    #[test]
    fn garbage_never_panics() {
        for len in 0..300 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 151 % 256) as u8).collect();
            for info in 0..=0x1F {
                for version in [13, 15] {
                    let _ = restore(&junk, info, 30, 8000, version);
                }
            }
            let _ = pglz_decompress(&junk, MAX_PAGE);
            let _ = lz4_decompress(&junk, MAX_PAGE);
        }
    }
}
