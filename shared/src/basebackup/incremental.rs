//! PostgreSQL 17's incremental files (`INCREMENTAL.<relfile>`, written by `sendFile` in
//! `src/backend/backup/basebackup.c`, read back by `pg_combinebackup`'s `reconstruct.c`): a
//! header (magic, block count, truncation length, the relative block numbers, zero padding to a
//! block boundary when any block follows), then the changed blocks in that order.
//!
//! walvault never stores an incremental file: the backup puts each relation file back together
//! as it streams (the changed blocks over the previous backup's chunks), so every backup stays
//! complete on its own and restore is unchanged. The rules are `reconstruct.c`'s: the file is
//! `max(truncation length, last block + 1)` blocks long; a block the increment carries comes
//! from it, a block before the truncation length from the previous backup, any other block is
//! zeroes.

/// `INCREMENTAL_MAGIC` (`basebackup_incremental.h`).
pub const MAGIC: u32 = 0xd3ae_1f0d;

/// The name prefix of an incremental file.
pub const PREFIX: &str = "INCREMENTAL.";

/// More blocks than one segment file of the largest segment size can hold (1 GiB of 8 KiB
/// blocks is 131,072; `--with-segsize` allows more, bounded here generously).
const MAX_BLOCKS: u32 = 1 << 22;

/// Why an incremental file cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IncrementalError {
    #[error("{path}: not an incremental file (magic {magic:#x})")]
    Magic { path: String, magic: u32 },
    #[error("{path}: {what}")]
    Invalid { path: String, what: String },
}

/// The full file an incremental member stands for: `base/5/INCREMENTAL.16384` is
/// `base/5/16384`. `None` for any other name.
pub fn full_path(member: &str) -> Option<String> {
    let (dir, name) = match member.rsplit_once('/') {
        Some((d, n)) => (Some(d), n),
        None => (None, member),
    };
    let rest = name.strip_prefix(PREFIX).filter(|r| !r.is_empty())?;
    Some(match dir {
        Some(d) => format!("{d}/{rest}"),
        None => rest.to_string(),
    })
}

/// An incremental file's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The blocks carried, relative to the segment file, strictly ascending.
    pub blocks: Vec<u32>,
    pub truncation_block_length: u32,
    /// Bytes of header, padding included: where the first block starts.
    pub len: usize,
}

/// The longest header there is with blocks of `block_size`: a block number for as many blocks
/// as are allowed, then padding to a block boundary.
pub fn max_header_len(block_size: usize) -> usize {
    (12 + 4 * MAX_BLOCKS as usize).div_ceil(block_size) * block_size
}

impl Header {
    /// Read a header from the start of `buf`: `Ok(None)` when more bytes are needed.
    pub fn parse(path: &str, buf: &[u8], block_size: usize) -> Result<Option<Header>, IncrementalError> {
        let invalid = |what: String| IncrementalError::Invalid {
            path: path.to_string(),
            what,
        };
        let word = |i: usize| {
            buf.get(i * 4..i * 4 + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let (Some(magic), Some(count), Some(truncation_block_length)) = (word(0), word(1), word(2)) else {
            return Ok(None);
        };
        if magic != MAGIC {
            return Err(IncrementalError::Magic {
                path: path.to_string(),
                magic,
            });
        }
        if count > MAX_BLOCKS || truncation_block_length > MAX_BLOCKS {
            return Err(invalid(format!(
                "{count} blocks, truncated at {truncation_block_length}: more than a segment file holds"
            )));
        }
        let unpadded = 12 + 4 * count as usize;
        let len = if count > 0 {
            unpadded.div_ceil(block_size) * block_size
        } else {
            unpadded
        };
        if buf.len() < len {
            return Ok(None);
        }
        let blocks: Vec<u32> = (0..count as usize).filter_map(|i| word(3 + i)).collect();
        if blocks.windows(2).any(|w| w[0] >= w[1]) || blocks.last().is_some_and(|&b| b >= MAX_BLOCKS) {
            return Err(invalid(
                "block numbers not strictly ascending, or out of range".into(),
            ));
        }
        Ok(Some(Header {
            blocks,
            truncation_block_length,
            len,
        }))
    }

    /// The length of the file put back together, in blocks.
    pub fn file_blocks(&self) -> u32 {
        self.blocks.last().map_or(self.truncation_block_length, |&b| {
            self.truncation_block_length.max(b + 1)
        })
    }

    /// The size the member must have: the header and every block it carries.
    pub fn member_size(&self, block_size: usize) -> u64 {
        self.len as u64 + self.blocks.len() as u64 * block_size as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 8192;

    fn header(blocks: &[u32], truncation: u32) -> Vec<u8> {
        let mut h = Vec::new();
        for w in [MAGIC, blocks.len() as u32, truncation].iter().chain(blocks) {
            h.extend_from_slice(&w.to_le_bytes());
        }
        if !blocks.is_empty() {
            h.resize(h.len().div_ceil(BS) * BS, 0);
        }
        h
    }

    #[test]
    fn names_map_to_their_full_file() {
        assert_eq!(
            full_path("base/5/INCREMENTAL.16384").as_deref(),
            Some("base/5/16384")
        );
        assert_eq!(
            full_path("base/5/INCREMENTAL.16384.1").as_deref(),
            Some("base/5/16384.1")
        );
        assert_eq!(full_path("INCREMENTAL.x").as_deref(), Some("x"));
        assert_eq!(full_path("base/5/16384"), None);
        assert_eq!(full_path("base/5/INCREMENTAL."), None);
    }

    #[test]
    fn headers_parse_once_whole_and_give_the_file_length() {
        let h = header(&[0, 3, 200], 150);
        for cut in [0, 11, 20, BS - 1] {
            assert_eq!(Header::parse("f", &h[..cut], BS).unwrap(), None, "cut at {cut}");
        }
        let parsed = Header::parse("f", &h, BS).unwrap().unwrap();
        assert_eq!(parsed.len, BS);
        assert_eq!(parsed.file_blocks(), 201);
        assert_eq!(parsed.member_size(BS), 4 * BS as u64);
        // No blocks: no padding, and the truncation length alone.
        let empty = Header::parse("f", &header(&[], 7), BS).unwrap().unwrap();
        assert_eq!((empty.len, empty.file_blocks()), (12, 7));
    }

    #[test]
    fn damaged_headers_are_refused() {
        let mut bad = header(&[1], 1);
        bad[0] ^= 1;
        assert!(matches!(
            Header::parse("f", &bad, BS),
            Err(IncrementalError::Magic { .. })
        ));
        assert!(Header::parse("f", &header(&[3, 3], 0), BS).is_err());
        assert!(Header::parse("f", &header(&[4, 2], 0), BS).is_err());
        let mut huge = header(&[], 0);
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Header::parse("f", &huge, BS).is_err());
    }
}
