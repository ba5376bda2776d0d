//! The text a user types: recovery target times (`time.rs` `parse_time`, `wal/pgtime.rs`
//! `PgTime`) and repository URLs (`repo/url.rs`).
//!
//! Properties:
//! * an accepted time formats (`format_micros`, `PgTime`'s display) to text that parses back to
//!   the same instant, and any `PgTime` displays without panicking;
//! * an accepted URL is `file://` with an absolute path free of `..` (not the root), `s3://`
//!   with a bucket or `az://` with a valid container name; its text parses again to the same
//!   location; it displays as the same URL with any password replaced.
#![no_main]

use std::path::Component;

use libfuzzer_sys::fuzz_target;
use walvault::repo::RepoUrl;
use walvault::repo::url::RepoLocation;
use walvault::time::{format_micros, parse_time};
use walvault::wal::decode::PgTime;

/// Four-digit years, 0000-01-01 to 9999-12-31 UTC, in Unix microseconds: what the formatters
/// print in the shape the parsers read (a zone offset can move a parsed time just outside).
const FOUR_DIGIT_YEARS: std::ops::Range<i64> = -62_167_219_200_000_000..253_402_300_800_000_000;

fn check_time(s: &str) {
    let Ok(t) = parse_time(s) else {
        return;
    };
    if FOUR_DIGIT_YEARS.contains(&t) {
        let shown = format_micros(t);
        assert_eq!(parse_time(&shown), Ok(t), "{s:?} shown as {shown:?}");
    }
}

fn check_pgtime(s: &str) {
    let Ok(t) = s.parse::<PgTime>() else {
        return;
    };
    if t.to_unix_micros().is_some_and(|u| FOUR_DIGIT_YEARS.contains(&u)) {
        let shown = t.to_string();
        assert_eq!(shown.parse::<PgTime>(), Ok(t), "{s:?} shown as {shown:?}");
    }
}

fn check_url(s: &str) {
    let Ok(url) = s.parse::<RepoUrl>() else {
        return;
    };
    match url.location() {
        RepoLocation::Local(path) => {
            assert!(path.is_absolute() && path.parent().is_some(), "{s:?}: {path:?}");
            assert!(
                path.components().all(|c| c != Component::ParentDir),
                "{s:?}: {path:?}"
            );
        }
        RepoLocation::S3 { bucket, .. } => assert!(!bucket.is_empty(), "{s:?}"),
        RepoLocation::Azure { container, .. } => {
            let ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-';
            assert!(
                (3..=63).contains(&container.len()) && container.bytes().all(ok),
                "{s:?}"
            );
        }
        RepoLocation::Gcs { bucket, .. } => {
            let ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b);
            assert!(
                (3..=63).contains(&bucket.len()) && bucket.bytes().all(ok),
                "{s:?}"
            );
        }
    }
    let again: RepoUrl = url.as_str().parse().expect("a URL's own text parses");
    assert_eq!(again.location(), url.location());
    // What it displays is the same URL with any password replaced.
    let shown = url::Url::parse(&url.to_string()).expect("a displayed URL parses");
    let raw = url::Url::parse(url.as_str()).expect("a URL's own text parses");
    assert!(matches!(shown.password(), None | Some("REDACTED")), "{shown}");
    assert_eq!(shown.password().is_some(), raw.password().is_some(), "{shown}");
    assert_eq!(
        (shown.host_str(), shown.path()),
        (raw.host_str(), raw.path()),
        "{shown}"
    );
}

fuzz_target!(|data: &[u8]| {
    if let Some(micros) = data.first_chunk::<8>() {
        let t = PgTime(i64::from_le_bytes(*micros));
        let shown = t.to_string();
        if t.to_unix_micros().is_some_and(|u| FOUR_DIGIT_YEARS.contains(&u)) {
            assert_eq!(shown.parse::<PgTime>(), Ok(t), "{shown:?}");
        }
    }
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    check_time(s);
    check_pgtime(s);
    check_url(s);
});
