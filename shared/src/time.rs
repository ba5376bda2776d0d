//! Wall-clock times as walvault stores and shows them: Unix microseconds, UTC, with conversions
//! to and from the text forms DBAs type (`2026-11-21 14:31:59[.ffffff][+02[:00]]`). Pure: the
//! clock itself is read only at the edges.

/// Microseconds between 1970-01-01 and 2000-01-01, PostgreSQL's `TimestampTz` epoch.
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

// Days from civil date and back (proleptic Gregorian), after Howard Hinnant's algorithms.
pub(crate) fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub(crate) fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

fn split(unix_micros: i64) -> (i64, i64, i64, i64, i64, i64, i64) {
    let secs = unix_micros.div_euclid(1_000_000);
    let micros = unix_micros.rem_euclid(1_000_000);
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    (y, mo, d, sod / 3600, sod % 3600 / 60, sod % 60, micros)
}

/// `2026-11-21 14:31:59.123456+00`, the form PostgreSQL accepts in `recovery_target_time`.
pub fn format_micros(unix_micros: i64) -> String {
    let (y, mo, d, h, mi, s, us) = split(unix_micros);
    if us == 0 {
        format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}+00")
    } else {
        format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{us:06}+00")
    }
}

/// `20261121T143159Z`, used for backup ids.
pub fn format_compact(unix_secs: i64) -> String {
    let (y, mo, d, h, mi, s, _) = split(unix_secs.saturating_mul(1_000_000));
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid time {0:?}: expected 'YYYY-MM-DD HH:MM:SS[.ffffff][+TZ]', e.g. '2026-11-21 14:31:59+02' (UTC when no zone is given)"
)]
pub struct TimeParseError(pub String);

/// Parse `YYYY-MM-DD HH:MM:SS[.ffffff][Z|UTC|+HH|+HH:MM|+HHMM]` (a `T` may replace the space);
/// without a zone the time is UTC.
pub fn parse_time(s: &str) -> Result<i64, TimeParseError> {
    let err = || TimeParseError(s.to_string());
    let t = s.trim();
    let num = |r: std::ops::Range<usize>| -> Result<i64, TimeParseError> {
        let part = t.get(r).ok_or_else(err)?;
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        part.parse().map_err(|_| err())
    };
    let b = t.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b' ' || b[10] == b'T')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(err());
    }
    let (y, mo, d, h, mi, sec) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 || sec > 59 {
        return Err(err());
    }
    let mut rest = &t[19..];
    let mut micros = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 6 {
            return Err(err());
        }
        micros = frac[..digits].parse::<i64>().map_err(|_| err())? * 10i64.pow(6 - digits as u32);
        rest = &frac[digits..];
    }
    let rest = rest.trim();
    let offset_secs = match rest {
        "" | "Z" | "UTC" | "+00" | "-00" => 0,
        _ => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return Err(err()),
            };
            let z = rest[1..].replace(':', "");
            if !(z.len() == 2 || z.len() == 4) || !z.bytes().all(|c| c.is_ascii_digit()) {
                return Err(err());
            }
            let hh: i64 = z[..2].parse().map_err(|_| err())?;
            let mm: i64 = if z.len() == 4 {
                z[2..].parse().map_err(|_| err())?
            } else {
                0
            };
            if hh > 15 || mm > 59 {
                return Err(err());
            }
            sign * (hh * 3600 + mm * 60)
        }
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_secs;
    Ok(secs * 1_000_000 + micros)
}

pub(crate) fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// The current time in Unix microseconds (the one place walvault reads the clock for stored times).
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_what_dbas_type() {
        let utc = parse_time("2026-11-21 14:31:59").unwrap();
        assert_eq!(utc, 1_795_271_519 * 1_000_000);
        assert_eq!(parse_time("2026-11-21T14:31:59Z").unwrap(), utc);
        assert_eq!(parse_time("2026-11-21 16:31:59+02").unwrap(), utc);
        assert_eq!(parse_time("2026-11-21 16:31:59+02:00").unwrap(), utc);
        assert_eq!(parse_time("2026-11-21 09:01:59-0530").unwrap(), utc);
        assert_eq!(parse_time("2026-11-21 14:31:59.5").unwrap(), utc + 500_000);
        assert_eq!(parse_time("2026-11-21 14:31:59.000001+00").unwrap(), utc + 1);
        for bad in [
            "",
            "2026-11-21",
            "2026-13-01 00:00:00",
            "2026-02-29 00:00:00",
            "2026-11-21 24:00:00",
            "2026-11-21 14:31:59.1234567",
            "2026-11-21 14:31:59 PST",
            "2026-11-21 14:31:59+2",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
        assert!(parse_time("2024-02-29 00:00:00").is_ok());
    }

    #[test]
    fn formats_round_trip() {
        let t = parse_time("2026-11-21 14:31:59.123456").unwrap();
        assert_eq!(format_micros(t), "2026-11-21 14:31:59.123456+00");
        assert_eq!(format_compact(t / 1_000_000), "20261121T143159Z");
        assert_eq!(format_micros(0), "1970-01-01 00:00:00+00");
    }

    proptest! {
        #[test]
        fn format_then_parse_is_identity(t in -2_000_000_000_000_000i64..4_000_000_000_000_000i64) {
            prop_assert_eq!(parse_time(&format_micros(t)).unwrap(), t);
        }

        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            let _ = parse_time(&s);
        }
    }
}
