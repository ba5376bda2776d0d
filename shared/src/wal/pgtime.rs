//! PostgreSQL timestamps as WAL records carry them (`TimestampTz`).

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds between the Unix epoch and PostgreSQL's epoch, 2000-01-01 00:00:00 UTC.
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;
/// Days from 1970-01-01 to 2000-01-01.
const PG_EPOCH_UNIX_DAYS: i64 = 10_957;
const MICROS_PER_SEC: i64 = 1_000_000;
const SECS_PER_DAY: i64 = 86_400;

/// A PostgreSQL `TimestampTz`: microseconds since 2000-01-01 00:00:00 UTC, as in commit, abort
/// and restore point records. Displays as ISO 8601 in UTC (`2024-03-01T12:34:56.123456Z`);
/// stored (serde) as the plain integer, which is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct PgTime(pub i64);

impl PgTime {
    /// PostgreSQL's `-infinity` (`DT_NOBEGIN`).
    pub const NEG_INFINITY: PgTime = PgTime(i64::MIN);
    /// PostgreSQL's `infinity` (`DT_NOEND`).
    pub const INFINITY: PgTime = PgTime(i64::MAX);

    /// From microseconds since 1970-01-01 UTC; `None` when out of PostgreSQL's range.
    pub fn from_unix_micros(micros: i64) -> Option<PgTime> {
        micros.checked_sub(PG_EPOCH_UNIX_MICROS).map(PgTime)
    }

    /// Microseconds since 1970-01-01 UTC; `None` when that does not fit an `i64`.
    pub fn to_unix_micros(self) -> Option<i64> {
        self.0.checked_add(PG_EPOCH_UNIX_MICROS)
    }

    /// From a wall-clock reading (truncated to microseconds).
    pub fn from_system_time(t: SystemTime) -> Option<PgTime> {
        let micros = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_micros()).ok()?,
            Err(e) => i64::try_from(e.duration().as_micros()).ok()?.checked_neg()?,
        };
        PgTime::from_unix_micros(micros)
    }
}

use crate::time::{civil_from_days, days_from_civil, days_in_month};

impl fmt::Display for PgTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PgTime::INFINITY => return f.write_str("infinity"),
            PgTime::NEG_INFINITY => return f.write_str("-infinity"),
            _ => {}
        }
        // Relative to 2000 so that no value overflows.
        let secs = self.0.div_euclid(MICROS_PER_SEC);
        let micros = self.0.rem_euclid(MICROS_PER_SEC);
        let days = secs.div_euclid(SECS_PER_DAY) + PG_EPOCH_UNIX_DAYS;
        let sod = secs.rem_euclid(SECS_PER_DAY);
        let (y, m, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
            sod / 3600,
            sod / 60 % 60,
            sod % 60
        )
    }
}

/// Error for a timestamp that is not ISO 8601 with an explicit UTC offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid timestamp {0:?}: expected YYYY-MM-DD HH:MM:SS[.ffffff] with a zone \
     (Z, UTC or +HH[:MM]), e.g. 2024-03-01T12:34:56Z"
)]
pub struct PgTimeParseError(pub String);

impl FromStr for PgTime {
    type Err = PgTimeParseError;

    /// Accepts what [`Display`](fmt::Display) prints and what PostgreSQL prints:
    /// `2024-03-01T12:34:56.123456Z`, `2024-03-01 12:34:56 UTC`, `2024-03-01 12:34:56.5+02:00`,
    /// plus `infinity` and `-infinity`. A zone is required: a bare local time is ambiguous.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "infinity" => return Ok(PgTime::INFINITY),
            "-infinity" => return Ok(PgTime::NEG_INFINITY),
            _ => {}
        }
        parse_iso(s.as_bytes()).ok_or_else(|| PgTimeParseError(s.to_string()))
    }
}

fn digits(b: &[u8], at: usize, n: usize) -> Option<i64> {
    let part = b.get(at..at.checked_add(n)?)?;
    part.iter().try_fold(0i64, |acc, &c| {
        c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
    })
}

fn parse_iso(b: &[u8]) -> Option<PgTime> {
    // YYYY-MM-DD?HH:MM:SS
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (digits(b, 0, 4)?, digits(b, 5, 2)?, digits(b, 8, 2)?);
    let (hour, minute, second) = (digits(b, 11, 2)?, digits(b, 14, 2)?, digits(b, 17, 2)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut at = 19;
    let mut micros = 0i64;
    if b.get(at) == Some(&b'.') {
        let start = at + 1;
        let end = start + b[start..].iter().take_while(|c| c.is_ascii_digit()).count();
        if end == start || end - start > 6 {
            return None;
        }
        micros = digits(b, start, end - start)? * 10i64.pow((6 - (end - start)) as u32);
        at = end;
    }
    let offset_secs = match &b[at..] {
        b"Z" | b"z" | b" UTC" | b"UTC" | b" Z" => 0,
        zone => {
            let zone = zone.strip_prefix(b" ").unwrap_or(zone);
            let sign = match zone.first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (h, m) = match zone.len() {
                3 => (digits(zone, 1, 2)?, 0),
                5 => (digits(zone, 1, 2)?, digits(zone, 3, 2)?),
                6 if zone[3] == b':' => (digits(zone, 1, 2)?, digits(zone, 4, 2)?),
                _ => return None,
            };
            if h > 15 || m > 59 {
                return None;
            }
            sign * (h * 3600 + m * 60)
        }
    };
    let days = days_from_civil(year, month, day) - PG_EPOCH_UNIX_DAYS;
    let secs = days * SECS_PER_DAY + hour * 3600 + minute * 60 + second - offset_secs;
    Some(PgTime(secs * MICROS_PER_SEC + micros))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn epoch_and_known_instants() {
        assert_eq!(PgTime(0).to_string(), "2000-01-01T00:00:00.000000Z");
        assert_eq!(PgTime(-1).to_string(), "1999-12-31T23:59:59.999999Z");
        assert_eq!(PgTime(0).to_unix_micros(), Some(946_684_800_000_000));
        // 2024-02-29 12:34:56.789012 UTC is Unix 1709210096.789012.
        let t = PgTime::from_unix_micros(1_709_210_096_789_012).unwrap();
        assert_eq!(t.to_string(), "2024-02-29T12:34:56.789012Z");
        assert_eq!(PgTime::INFINITY.to_string(), "infinity");
        assert_eq!(PgTime::NEG_INFINITY.to_string(), "-infinity");
        assert_eq!(PgTime::from_unix_micros(i64::MIN), None);
        assert_eq!(PgTime::INFINITY.to_unix_micros(), None);
    }

    #[test]
    fn parses_iso_and_postgres_spellings() {
        let want = PgTime::from_unix_micros(1_709_210_096_789_012).unwrap();
        for s in [
            "2024-02-29T12:34:56.789012Z",
            "2024-02-29 12:34:56.789012 UTC",
            "2024-02-29 12:34:56.789012+00",
            "2024-02-29 14:34:56.789012+02:00",
            "2024-02-29 10:04:56.789012-0230",
        ] {
            assert_eq!(s.parse::<PgTime>(), Ok(want), "{s}");
        }
        assert_eq!(
            "2024-02-29 12:34:56.5Z".parse::<PgTime>().unwrap().to_string(),
            "2024-02-29T12:34:56.500000Z"
        );
        assert_eq!("infinity".parse(), Ok(PgTime::INFINITY));
        for bad in [
            "",
            "2024-02-29",
            "2024-02-29 12:34:56",
            "2023-02-29 12:00:00Z",
            "2024-13-01 12:00:00Z",
            "2024-01-01 24:00:00Z",
            "2024-01-01 12:00:00.1234567Z",
            "2024-01-01 12:00:00.Z",
            "2024-01-01 12:00:00+1",
            "2024-01-01 12:00:00 CET",
            "２０２４-01-01 12:00:00Z",
        ] {
            assert!(bad.parse::<PgTime>().is_err(), "{bad:?} parsed");
        }
    }

    proptest! {
        #[test]
        fn display_round_trips_for_four_digit_years(micros in -62_000_000_000_000_000i64..250_000_000_000_000_000i64) {
            let t = PgTime(micros);
            prop_assert_eq!(t.to_string().parse::<PgTime>(), Ok(t));
        }

        #[test]
        fn display_and_parse_never_panic(micros: i64, s in "\\PC{0,40}") {
            let _ = PgTime(micros).to_string();
            let _ = s.parse::<PgTime>();
        }
    }
}
