//! Log sequence numbers and timeline ids.

use std::fmt;
use std::str::FromStr;

/// A position in the WAL stream, printed the way PostgreSQL prints it (`16/B374D848`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Error for an LSN that is not `HEX/HEX` with each half at most 8 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hex numbers like 0/16B3748")]
pub struct LsnParseError(pub String);

impl FromStr for Lsn {
    type Err = LsnParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let half = |h: &str| -> Result<u64, LsnParseError> {
            if h.is_empty() || h.len() > 8 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u64::from_str_radix(h, 16).map_err(|_| err())
        };
        Ok(Lsn((half(hi)? << 32) | half(lo)?))
    }
}

/// Stored formats write LSNs the way PostgreSQL prints them: `"16/B374D848"`.
impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A PostgreSQL timeline id. Timeline 0 does not exist; the first timeline is 1. Stored and shown
/// as the number (`"timeline": 2`); a stored 0 is refused where it is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct TimelineId(u32);

/// Timeline 0, offered as a timeline id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("timeline 0 does not exist (the first timeline is 1)")]
pub struct TimelineZero;

/// Timeline `n` in a test.
#[cfg(test)]
pub(crate) fn tl(n: u32) -> TimelineId {
    TimelineId::new(n).expect("a test timeline is not 0")
}

impl TryFrom<u32> for TimelineId {
    type Error = TimelineZero;

    fn try_from(id: u32) -> Result<TimelineId, TimelineZero> {
        TimelineId::new(id).ok_or(TimelineZero)
    }
}

/// Compare with a plain number, as tests and history lines state timelines.
impl PartialEq<u32> for TimelineId {
    fn eq(&self, other: &u32) -> bool {
        self.0 == *other
    }
}

impl From<TimelineId> for u32 {
    fn from(id: TimelineId) -> u32 {
        id.0
    }
}

impl TimelineId {
    /// Returns `None` for 0, which PostgreSQL never uses.
    pub fn new(id: u32) -> Option<Self> {
        (id != 0).then_some(TimelineId(id))
    }
    pub fn get(self) -> u32 {
        self.0
    }

    /// The first timeline, which `initdb` starts.
    pub const FIRST: TimelineId = TimelineId(1);
}

impl fmt::Display for TimelineId {
    /// The number, honouring width and alignment (`{:>4}`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_in_postgres_notation() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!(Lsn(0).to_string(), "0/0");
    }

    #[test]
    fn lsn_rejects_garbage() {
        for bad in [
            "",
            "/",
            "1/",
            "/1",
            "123456789/0",
            "0/123456789",
            "g/0",
            "0x1/0",
            "1/2/3",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn timeline_zero_is_not_a_timeline() {
        assert!(TimelineId::new(0).is_none());
        assert_eq!(TimelineId::new(7).map(TimelineId::get), Some(7));
    }
}
