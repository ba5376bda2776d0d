//! WAL page headers (`XLogPageHeaderData` / `XLogLongPageHeaderData` in `xlog_internal.h`).
//!
//! Every segment starts with a long page header that names the cluster (system identifier), the
//! segment and block sizes and the address of the page. Checking it on push and on fetch catches
//! a recycled or foreign file, a file under the wrong name, and a repository mixed up with
//! another cluster's before PostgreSQL ever reads it.

use super::lsn::{Lsn, TimelineId};
use super::name::SegmentName;

/// `XLP_LONG_HEADER`: set on the first page of every segment.
pub const XLP_LONG_HEADER: u16 = 0x0002;
/// `SizeOfXLogLongPHD`.
pub const LONG_HEADER_LEN: usize = 40;

/// PostgreSQL major version that writes pages with this magic, if supported
/// ([`super::version::FORMATS`]).
pub fn pg_version_for_magic(magic: u16) -> Option<u32> {
    super::version::for_magic(magic).map(|f| f.major)
}

/// What a segment's first page says about the cluster that wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    pub pg_version: u32,
    pub system_identifier: u64,
    pub segment_size: u32,
    pub block_size: u32,
    /// Timeline recorded in the first page; at a timeline switch it can be older than the name's.
    pub page_timeline: u32,
    pub start_lsn: Lsn,
}

/// Why a segment's content does not match what its name promises.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    #[error("{len} bytes is too short for a WAL segment")]
    TooShort { len: usize },
    #[error(
        "unknown WAL page magic {0:#06X}: not a WAL segment of {range} (a newer release walvault does not know yet, or a recycled, zeroed or foreign file)",
        range = super::version::supported_range()
    )]
    UnknownMagic(u16),
    #[error("the first page lacks the long page header flag (info {0:#06X})")]
    NotLongHeader(u16),
    #[error("implausible WAL segment size {0} in the page header")]
    BadSegmentSize(u32),
    #[error("implausible WAL block size {0} in the page header")]
    BadBlockSize(u32),
    #[error("file is {len} bytes but its page header says segments are {segment_size} bytes")]
    WrongLength { len: usize, segment_size: u32 },
    #[error("the name's segment number is out of range for {segment_size}-byte segments")]
    NameOutOfRange { segment_size: u32 },
    #[error("page address {found} does not match the name, which starts at {expected}")]
    WrongAddress { expected: Lsn, found: Lsn },
    #[error("page timeline {page} is invalid for a file on timeline {name}")]
    WrongTimeline { page: u32, name: TimelineId },
    #[error("system identifier 0 in the page header")]
    NoSystemIdentifier,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Check the first page of a (complete or `.partial`) segment against its name and return what it
/// says. Byte order is little-endian: walvault supports the platforms PostgreSQL ships on x86_64
/// and aarch64, whose WAL is little-endian.
pub fn validate_segment(bytes: &[u8], name: &SegmentName) -> Result<SegmentInfo, PageError> {
    validate_segment_head(bytes, bytes.len() as u64, name)
}

/// [`validate_segment`] for a segment read in pieces: `bytes` is its beginning (at least the
/// long page header), `len` the length of the whole file.
pub fn validate_segment_head(bytes: &[u8], len: u64, name: &SegmentName) -> Result<SegmentInfo, PageError> {
    if bytes.len() < LONG_HEADER_LEN {
        return Err(PageError::TooShort { len: bytes.len() });
    }
    let magic = u16_at(bytes, 0);
    let pg_version = pg_version_for_magic(magic).ok_or(PageError::UnknownMagic(magic))?;
    let info = u16_at(bytes, 2);
    if info & XLP_LONG_HEADER == 0 {
        return Err(PageError::NotLongHeader(info));
    }
    let page_timeline = u32_at(bytes, 4);
    let page_addr = Lsn(u64_at(bytes, 8));
    let system_identifier = u64_at(bytes, 24);
    let segment_size = u32_at(bytes, 32);
    let block_size = u32_at(bytes, 36);
    // initdb accepts 1 MiB to 1 GiB segments and 1 to 32 KiB blocks, powers of two.
    if !segment_size.is_power_of_two() || !(1 << 20..=1 << 30).contains(&segment_size) {
        return Err(PageError::BadSegmentSize(segment_size));
    }
    if !block_size.is_power_of_two() || !(1 << 10..=1 << 15).contains(&block_size) {
        return Err(PageError::BadBlockSize(block_size));
    }
    if len != u64::from(segment_size) {
        return Err(PageError::WrongLength {
            len: usize::try_from(len).unwrap_or(usize::MAX),
            segment_size,
        });
    }
    let expected = name
        .start_lsn(segment_size)
        .ok_or(PageError::NameOutOfRange { segment_size })?;
    if page_addr != expected {
        return Err(PageError::WrongAddress {
            expected,
            found: page_addr,
        });
    }
    if page_timeline == 0 || page_timeline > name.timeline.get() {
        return Err(PageError::WrongTimeline {
            page: page_timeline,
            name: name.timeline,
        });
    }
    if system_identifier == 0 {
        return Err(PageError::NoSystemIdentifier);
    }
    Ok(SegmentInfo {
        pg_version,
        system_identifier,
        segment_size,
        block_size,
        page_timeline,
        start_lsn: expected,
    })
}

/// Test support: a minimal, valid first page for `name` (the rest of the segment is zeros).
pub fn synthetic_segment(name: &SegmentName, system_identifier: u64, segment_size: u32) -> Vec<u8> {
    let mut seg = vec![0u8; segment_size as usize];
    seg[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
    seg[2..4].copy_from_slice(&XLP_LONG_HEADER.to_le_bytes());
    seg[4..8].copy_from_slice(&name.timeline.get().to_le_bytes());
    let addr = name.start_lsn(segment_size).map_or(0, |l| l.0);
    seg[8..16].copy_from_slice(&addr.to_le_bytes());
    seg[24..32].copy_from_slice(&system_identifier.to_le_bytes());
    seg[32..36].copy_from_slice(&segment_size.to_le_bytes());
    seg[36..40].copy_from_slice(&8192u32.to_le_bytes());
    seg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::WalFileName;
    use proptest::prelude::*;

    const MB16: u32 = 16 << 20;

    fn seg(name: &str) -> SegmentName {
        match name.parse::<WalFileName>().unwrap() {
            WalFileName::Segment(s) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn accepts_a_well_formed_first_page() {
        let name = seg("000000020000000100000003");
        let bytes = synthetic_segment(&name, 7_300_000_000_000_000_001, MB16);
        let info = validate_segment(&bytes, &name).unwrap();
        assert_eq!(info.pg_version, 15);
        assert_eq!(info.system_identifier, 7_300_000_000_000_000_001);
        assert_eq!(info.segment_size, MB16);
        assert_eq!(info.start_lsn, Lsn(0x1_0300_0000));
    }

    #[test]
    fn refuses_a_segment_under_another_name() {
        let bytes = synthetic_segment(&seg("000000010000000000000005"), 42, MB16);
        let err = validate_segment(&bytes, &seg("000000010000000000000006")).unwrap_err();
        assert!(matches!(err, PageError::WrongAddress { .. }), "{err}");
        // The page may carry an older timeline (segment copied at a switch), never a newer one.
        assert!(validate_segment(&bytes, &seg("000000030000000000000005")).is_ok());
        let newer = synthetic_segment(&seg("000000040000000000000005"), 42, MB16);
        assert!(matches!(
            validate_segment(&newer, &seg("000000030000000000000005")),
            Err(PageError::WrongTimeline { .. })
        ));
    }

    #[test]
    fn refuses_zeroed_truncated_and_foreign_version_files() {
        let name = seg("000000010000000000000001");
        assert!(matches!(
            validate_segment(&vec![0u8; MB16 as usize], &name),
            Err(PageError::UnknownMagic(0))
        ));
        let mut bytes = synthetic_segment(&name, 42, MB16);
        bytes.truncate(1 << 20);
        assert!(matches!(
            validate_segment(&bytes, &name),
            Err(PageError::WrongLength { .. })
        ));
        let mut bytes = synthetic_segment(&name, 42, MB16);
        bytes[0..2].copy_from_slice(&0xD101u16.to_le_bytes()); // PostgreSQL 12
        assert!(matches!(
            validate_segment(&bytes, &name),
            Err(PageError::UnknownMagic(0xD101))
        ));
    }

    #[test]
    fn names_the_version_of_every_supported_magic_and_refuses_newer_ones() {
        let name = seg("000000010000000000000001");
        for f in &crate::wal::version::FORMATS {
            let mut bytes = synthetic_segment(&name, 42, MB16);
            bytes[0..2].copy_from_slice(&f.magic.to_le_bytes());
            assert_eq!(validate_segment(&bytes, &name).unwrap().pg_version, f.major);
        }
        let mut bytes = synthetic_segment(&name, 42, MB16);
        bytes[0..2].copy_from_slice(&0xD122u16.to_le_bytes());
        let err = validate_segment(&bytes, &name).unwrap_err();
        assert_eq!(err, PageError::UnknownMagic(0xD122));
        let text = err.to_string();
        assert!(text.contains("0xD122") && text.contains("13 to 19"), "{text}");
    }

    proptest! {
        #[test]
        fn arbitrary_headers_never_panic(head in proptest::collection::vec(any::<u8>(), 0..64), log: u32, s: u32) {
            let name = SegmentName { timeline: TimelineId::new(1).unwrap(), log, seg: s };
            let _ = validate_segment(&head, &name);
        }
    }
}
