//! The names of the files PostgreSQL archives (`%f`), parsed strictly.
//!
//! Names come from PostgreSQL's command line and from the repository; both are untrusted input.
//! Only the four shapes PostgreSQL produces are accepted (see `xlog_internal.h`: `IsXLogFileName`,
//! `IsPartialXLogFileName`, `IsBackupHistoryFileName`, `IsTLHistoryFileName`), with upper-case hex
//! digits exactly as PostgreSQL prints them, so a name can never carry a path separator, `..`, or a
//! control character into a path.

use std::fmt;
use std::str::FromStr;

use super::lsn::{Lsn, TimelineId};

/// Longest name accepted before any further parsing (`<24 hex>.<8 hex>.backup` is 40 bytes).
const MAX_NAME_LEN: usize = 64;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty WAL file name")]
    Empty,
    #[error(
        "invalid WAL file name {0:?}: expected a segment (24 upper-case hex digits), \
         NNNNNNNN.history, <segment>.<8 hex digits>.backup or <segment>.partial"
    )]
    Invalid(String),
    #[error("invalid WAL file name {0:?}: timeline 0 does not exist")]
    TimelineZero(String),
}

/// A segment's place in the WAL stream (PostgreSQL's `XLogSegNo`): the LSN of its first byte
/// divided by the segment size. The same number names a segment on every timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentNo(pub u64);

impl SegmentNo {
    /// The segment that holds `lsn`, in segments of `segment_size` bytes.
    pub fn containing(lsn: Lsn, segment_size: u32) -> SegmentNo {
        SegmentNo(lsn.0 / u64::from(segment_size.max(1)))
    }

    /// The segment `n` after this one.
    pub fn plus(self, n: u64) -> SegmentNo {
        SegmentNo(self.0.saturating_add(n))
    }

    /// Segments from `earlier` to this one; `None` when `earlier` comes after it.
    pub fn checked_since(self, earlier: SegmentNo) -> Option<u64> {
        self.0.checked_sub(earlier.0)
    }

    /// Segments from `earlier` to this one (0 when `earlier` is not earlier).
    pub fn since(self, earlier: SegmentNo) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// The segments from this one to `last`, both included.
    pub fn through(self, last: SegmentNo) -> impl DoubleEndedIterator<Item = SegmentNo> {
        (self.0..=last.0).map(SegmentNo)
    }
}

impl fmt::Display for SegmentNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// A WAL segment name: timeline, high and low halves of the segment number (`TTTTTTTTXXXXXXXXYYYYYYYY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentName {
    pub timeline: TimelineId,
    pub log: u32,
    pub seg: u32,
}

impl SegmentName {
    /// How many segments of `segment_size` bytes make one 4 GiB "log id" (PostgreSQL's
    /// `XLogSegmentsPerXLogId`).
    pub fn segments_per_log(segment_size: u32) -> u64 {
        0x1_0000_0000u64 / u64::from(segment_size.max(1))
    }

    /// The segment number, or `None` when the low half is out of range for this segment size
    /// (a name PostgreSQL cannot produce).
    pub fn segment_no(&self, segment_size: u32) -> Option<SegmentNo> {
        let per_log = Self::segments_per_log(segment_size);
        (u64::from(self.seg) < per_log)
            .then(|| SegmentNo(u64::from(self.log) * per_log + u64::from(self.seg)))
    }

    /// LSN of the first byte of this segment.
    pub fn start_lsn(&self, segment_size: u32) -> Option<Lsn> {
        self.segment_no(segment_size)
            .and_then(|no| no.0.checked_mul(u64::from(segment_size)))
            .map(Lsn)
    }

    /// The name of segment `no` on `timeline` (PostgreSQL's `XLogFileName`).
    pub fn from_no(timeline: TimelineId, no: SegmentNo, segment_size: u32) -> SegmentName {
        let per_log = Self::segments_per_log(segment_size);
        SegmentName {
            timeline,
            log: (no.0 / per_log) as u32,
            seg: (no.0 % per_log) as u32,
        }
    }

    /// The name of the segment that holds `lsn` on `timeline`.
    pub fn containing(timeline: TimelineId, lsn: Lsn, segment_size: u32) -> SegmentName {
        Self::from_no(timeline, SegmentNo::containing(lsn, segment_size), segment_size)
    }

    fn parse(s: &str) -> Option<SegmentName> {
        if s.len() != 24 || !s.bytes().all(is_upper_hex) {
            return None;
        }
        let part = |r: std::ops::Range<usize>| u32::from_str_radix(&s[r], 16).ok();
        Some(SegmentName {
            timeline: TimelineId::new(part(0..8)?)?,
            log: part(8..16)?,
            seg: part(16..24)?,
        })
    }
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}{:08X}{:08X}", self.timeline.get(), self.log, self.seg)
    }
}

/// Any file name PostgreSQL hands to `archive_command` or asks of `restore_command`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WalFileName {
    /// A complete WAL segment.
    Segment(SegmentName),
    /// The last, incomplete segment of a timeline, archived at promotion (`<segment>.partial`).
    Partial(SegmentName),
    /// A backup history file (`<segment>.<offset>.backup`), written by `pg_backup_stop`.
    Backup { segment: SegmentName, offset: u32 },
    /// A timeline history file (`NNNNNNNN.history`).
    History(TimelineId),
}

impl WalFileName {
    pub fn timeline(&self) -> TimelineId {
        match self {
            WalFileName::Segment(s) | WalFileName::Partial(s) => s.timeline,
            WalFileName::Backup { segment, .. } => segment.timeline,
            WalFileName::History(t) => *t,
        }
    }

    /// Segment-shaped files carry WAL pages whose headers can be checked.
    pub fn wal_segment(&self) -> Option<SegmentName> {
        match self {
            WalFileName::Segment(s) | WalFileName::Partial(s) => Some(*s),
            _ => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            WalFileName::Segment(_) => "segment",
            WalFileName::Partial(_) => "partial segment",
            WalFileName::Backup { .. } => "backup history file",
            WalFileName::History(_) => "timeline history file",
        }
    }
}

fn is_upper_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'A'..=b'F').contains(&b)
}

impl FromStr for WalFileName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        let invalid = || NameError::Invalid(s.chars().take(MAX_NAME_LEN).collect());
        if s.len() > MAX_NAME_LEN || !s.is_ascii() {
            return Err(invalid());
        }
        let zero_tli = || NameError::TimelineZero(s.to_string());
        if s.len() == 24 {
            if s.starts_with("00000000") && s.bytes().all(is_upper_hex) {
                return Err(zero_tli());
            }
            return SegmentName::parse(s)
                .map(WalFileName::Segment)
                .ok_or_else(invalid);
        }
        if let Some(seg) = s.strip_suffix(".partial") {
            return SegmentName::parse(seg)
                .map(WalFileName::Partial)
                .ok_or_else(invalid);
        }
        if let Some(rest) = s.strip_suffix(".backup") {
            let (seg, offset) = rest.split_once('.').ok_or_else(invalid)?;
            if offset.len() != 8 || !offset.bytes().all(is_upper_hex) {
                return Err(invalid());
            }
            let segment = SegmentName::parse(seg).ok_or_else(invalid)?;
            let offset = u32::from_str_radix(offset, 16).map_err(|_| invalid())?;
            return Ok(WalFileName::Backup { segment, offset });
        }
        if let Some(tli) = s.strip_suffix(".history") {
            if tli.len() != 8 || !tli.bytes().all(is_upper_hex) {
                return Err(invalid());
            }
            let id = u32::from_str_radix(tli, 16).map_err(|_| invalid())?;
            return TimelineId::new(id).map(WalFileName::History).ok_or_else(zero_tli);
        }
        Err(invalid())
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalFileName::Segment(s) => write!(f, "{s}"),
            WalFileName::Partial(s) => write!(f, "{s}.partial"),
            WalFileName::Backup { segment, offset } => write!(f, "{segment}.{offset:08X}.backup"),
            WalFileName::History(t) => write!(f, "{:08X}.history", t.get()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &str) -> Result<WalFileName, NameError> {
        s.parse()
    }

    #[test]
    fn accepts_the_four_shapes_postgres_produces() {
        let seg = parse("000000010000000A000000FF").unwrap();
        assert_eq!(
            seg,
            WalFileName::Segment(SegmentName {
                timeline: TimelineId::new(1).unwrap(),
                log: 0xA,
                seg: 0xFF
            })
        );
        assert!(matches!(
            parse("00000002000000000000000C.partial"),
            Ok(WalFileName::Partial(_))
        ));
        assert!(matches!(
            parse("000000010000000000000002.00000028.backup"),
            Ok(WalFileName::Backup { offset: 0x28, .. })
        ));
        assert_eq!(
            parse("0000000A.history"),
            Ok(WalFileName::History(TimelineId::new(10).unwrap()))
        );
    }

    #[test]
    fn refuses_anything_that_could_escape_or_is_not_postgres_shaped() {
        for bad in [
            "",
            "../x",
            "/etc/passwd",
            "00000001000000000000000",   // 23 hex
            "0000000100000000000000001", // 25 hex
            "00000001000000000000000a",  // lower case: a different file
            "000000010000000000000001\n",
            "00000001000000000000\u{0}001",
            "000000000000000000000001", // timeline 0
            "00000000.history",
            "0000001.history",
            "00000001.HISTORY",
            "000000010000000000000001.backup",
            "000000010000000000000001.0028.backup",
            "000000010000000000000001.partial.partial",
            "./000000010000000000000001",
            "RECOVERYXLOG",
            "000000010000000000000001.zst",
            "ÿÿÿÿÿÿÿÿÿÿÿÿÿÿÿÿÿÿÿÿÿÿÿÿ",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn segment_numbers_follow_the_segment_size() {
        let s = SegmentName::parse("000000010000000200000003").unwrap();
        assert_eq!(s.segment_no(16 << 20), Some(SegmentNo(2 * 256 + 3)));
        assert_eq!(s.start_lsn(16 << 20), Some(Lsn(0x2_0300_0000)));
        // With 1 GiB segments only 4 segments make a log id: 3 is the last valid one.
        assert_eq!(s.segment_no(1 << 30), Some(SegmentNo(2 * 4 + 3)));
        let too_far = SegmentName::parse("000000010000000200000100").unwrap();
        assert_eq!(too_far.segment_no(16 << 20), None);
        let back = SegmentName::containing(s.timeline, Lsn(0x2_0312_3456), 16 << 20);
        assert_eq!(back, s);
    }

    proptest! {
        #[test]
        fn never_panics_and_only_accepts_round_trippable_names(s in "\\PC{0,70}") {
            if let Ok(name) = parse(&s) {
                prop_assert_eq!(name.to_string(), s);
            }
        }

        #[test]
        fn generated_names_round_trip(tli in 1u32.., log: u32, seg: u32, off: u32, kind in 0u8..4) {
            let segment = SegmentName { timeline: TimelineId::new(tli).unwrap(), log, seg };
            let name = match kind {
                0 => WalFileName::Segment(segment),
                1 => WalFileName::Partial(segment),
                2 => WalFileName::Backup { segment, offset: off },
                _ => WalFileName::History(segment.timeline),
            };
            let text = name.to_string();
            prop_assert!(!text.contains('/') && !text.contains(".."));
            prop_assert_eq!(parse(&text), Ok(name));
        }

        #[test]
        fn hexish_noise_never_panics(s in "[0-9A-Fa-f./]{0,48}(\\.history|\\.backup|\\.partial)?") {
            let _ = parse(&s);
        }
    }
}
