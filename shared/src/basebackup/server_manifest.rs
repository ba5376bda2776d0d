//! The `backup_manifest` PostgreSQL sends at the end of a `BASE_BACKUP` (format versions 1 and 2,
//! `src/backend/backup/backup_manifest.c`; read as `pg_verifybackup`'s `parse_manifest.c` reads
//! it): every file the server sent with its size and checksum, and the WAL the backup needs.
//!
//! A backup over the protocol checks each file's bytes against it as they stream
//! ([`FileSum`]), and takes its stop position from the `WAL-Ranges` (the end position's own
//! result set comes after the stream's `CopyDone`, which the client cannot read past). The
//! manifest's own `Manifest-Checksum` (SHA-256 of everything up to its last line) proves it
//! arrived whole before anything in it is trusted.

use std::collections::BTreeMap;

use serde::Deserialize;
use sha2::Digest;

use crate::wal::{Lsn, TimelineId};

/// Why a server manifest cannot be trusted, or a file does not match it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerManifestError {
    #[error("the server's backup manifest is not valid: {0}")]
    Invalid(String),
    #[error("the server's backup manifest fails its own checksum: it did not arrive whole")]
    Checksum,
    #[error("{path}: {why} (the server's backup manifest says otherwise); the backup was not recorded")]
    Mismatch { path: String, why: String },
}

/// A checksum algorithm a manifest names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    None,
    Crc32c,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl Algorithm {
    fn parse(name: &str) -> Result<Algorithm, ServerManifestError> {
        Ok(match name {
            "NONE" => Algorithm::None,
            "CRC32C" => Algorithm::Crc32c,
            "SHA224" => Algorithm::Sha224,
            "SHA256" => Algorithm::Sha256,
            "SHA384" => Algorithm::Sha384,
            "SHA512" => Algorithm::Sha512,
            other => {
                return Err(ServerManifestError::Invalid(format!(
                    "unknown checksum algorithm {other:?}"
                )));
            }
        })
    }
}

/// One file as the server listed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedFile {
    pub size: u64,
    pub algorithm: Algorithm,
    /// Lower-case hex, empty with [`Algorithm::None`].
    pub checksum: String,
}

/// One WAL range the backup needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalRange {
    pub timeline: TimelineId,
    pub start: Lsn,
    pub end: Lsn,
}

/// A server manifest whose own checksum held.
#[derive(Debug, Clone)]
pub struct ServerManifest {
    pub version: u32,
    /// From version 2 (PostgreSQL 17).
    pub system_identifier: Option<u64>,
    /// By path as the tar archives name them (tablespaces under `pg_tblspc/<oid>/`).
    pub files: BTreeMap<String, ListedFile>,
    pub wal_ranges: Vec<WalRange>,
}

#[derive(Deserialize)]
struct RawManifest {
    #[serde(rename = "PostgreSQL-Backup-Manifest-Version")]
    version: u32,
    #[serde(rename = "System-Identifier")]
    system_identifier: Option<u64>,
    #[serde(rename = "Files")]
    files: Vec<RawFile>,
    #[serde(rename = "WAL-Ranges")]
    wal_ranges: Vec<RawRange>,
}

#[derive(Deserialize)]
struct RawFile {
    #[serde(rename = "Path")]
    path: Option<String>,
    /// A name that is not valid UTF-8, hex-encoded.
    #[serde(rename = "Encoded-Path")]
    encoded_path: Option<String>,
    #[serde(rename = "Size")]
    size: u64,
    #[serde(rename = "Checksum-Algorithm")]
    algorithm: Option<String>,
    #[serde(rename = "Checksum")]
    checksum: Option<String>,
}

#[derive(Deserialize)]
struct RawRange {
    #[serde(rename = "Timeline")]
    timeline: u32,
    #[serde(rename = "Start-LSN")]
    start: String,
    #[serde(rename = "End-LSN")]
    end: String,
}

/// The largest manifest read: about 200 bytes a file, so room for millions of files.
pub const MAX_MANIFEST_LEN: usize = 1 << 30;

impl ServerManifest {
    /// Parse `bytes`, once its `Manifest-Checksum` holds.
    pub fn parse(bytes: &[u8]) -> Result<ServerManifest, ServerManifestError> {
        let invalid = |s: String| ServerManifestError::Invalid(s);
        check_own_checksum(bytes)?;
        let raw: RawManifest = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        if !(1..=2).contains(&raw.version) {
            return Err(invalid(format!("version {} is not 1 or 2", raw.version)));
        }
        let mut files = BTreeMap::new();
        for f in raw.files {
            let path = match (f.path, f.encoded_path) {
                (Some(p), None) => p,
                (None, Some(hex)) => {
                    let raw =
                        hex::decode(&hex).map_err(|_| invalid(format!("Encoded-Path {hex:?} is not hex")))?;
                    String::from_utf8_lossy(&raw).into_owned()
                }
                _ => {
                    return Err(invalid(
                        "a file needs exactly one of Path and Encoded-Path".into(),
                    ));
                }
            };
            let algorithm = Algorithm::parse(f.algorithm.as_deref().unwrap_or("NONE"))?;
            let checksum = f.checksum.unwrap_or_default().to_ascii_lowercase();
            if (algorithm == Algorithm::None) != checksum.is_empty() {
                return Err(invalid(format!(
                    "{path}: a checksum without an algorithm, or the reverse"
                )));
            }
            let listed = ListedFile {
                size: f.size,
                algorithm,
                checksum,
            };
            if files.insert(path.clone(), listed).is_some() {
                return Err(invalid(format!("{path} is listed twice")));
            }
        }
        let mut wal_ranges = Vec::with_capacity(raw.wal_ranges.len());
        for r in raw.wal_ranges {
            let lsn = |s: &str| s.parse::<Lsn>().map_err(|_| invalid(format!("bad LSN {s:?}")));
            let range = WalRange {
                timeline: TimelineId::new(r.timeline)
                    .ok_or_else(|| invalid(format!("bad timeline {}", r.timeline)))?,
                start: lsn(&r.start)?,
                end: lsn(&r.end)?,
            };
            if range.start > range.end {
                return Err(invalid(format!(
                    "WAL range {}..{} runs backwards",
                    r.start, r.end
                )));
            }
            wal_ranges.push(range);
        }
        if wal_ranges.is_empty() {
            return Err(invalid("no WAL-Ranges".into()));
        }
        Ok(ServerManifest {
            version: raw.version,
            system_identifier: raw.system_identifier,
            files,
            wal_ranges,
        })
    }

    /// Where the backup's WAL ends: the last range's end and timeline (a backup from a
    /// standby whose upstream changed timelines lists one range per timeline, oldest first).
    pub fn end(&self) -> WalRange {
        *self
            .wal_ranges
            .last()
            .expect("parse refuses a manifest without WAL ranges")
    }

    /// The algorithm a file at `path` is checked with, or `None` when the server did not list it.
    pub fn algorithm_of(&self, path: &str) -> Option<Algorithm> {
        self.files.get(path).map(|f| f.algorithm)
    }

    /// Check what streamed against the listing: every file sent is listed with its size and
    /// checksum, and every listed file was sent. `sent` maps each path to its size and
    /// finished checksum (lower-case hex).
    pub fn check(&self, sent: &BTreeMap<String, (u64, String)>) -> Result<(), ServerManifestError> {
        let mismatch = |path: &str, why: String| ServerManifestError::Mismatch {
            path: path.to_string(),
            why,
        };
        for (path, (size, sum)) in sent {
            let Some(listed) = self.files.get(path) else {
                return Err(mismatch(path, "sent but not listed".into()));
            };
            if listed.size != *size {
                return Err(mismatch(
                    path,
                    format!("{size} bytes streamed, {} listed", listed.size),
                ));
            }
            if listed.algorithm != Algorithm::None && listed.checksum != *sum {
                return Err(mismatch(
                    path,
                    format!("checksum {sum} streamed, {} listed", listed.checksum),
                ));
            }
        }
        if let Some(path) = self.files.keys().find(|p| !sent.contains_key(*p)) {
            return Err(mismatch(path, "listed but never sent".into()));
        }
        Ok(())
    }
}

/// `Manifest-Checksum`: SHA-256 over everything up to and including the second-to-last newline
/// (`verify_manifest_checksum` in `parse_manifest.c`), against the hex on the last line.
fn check_own_checksum(bytes: &[u8]) -> Result<(), ServerManifestError> {
    if bytes.len() > MAX_MANIFEST_LEN {
        return Err(ServerManifestError::Invalid(format!(
            "{} bytes is too long",
            bytes.len()
        )));
    }
    let newlines: Vec<usize> = bytes
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i)
        .take(2)
        .collect();
    let [_, penultimate] = newlines[..] else {
        return Err(ServerManifestError::Invalid("fewer than two lines".into()));
    };
    let last = std::str::from_utf8(&bytes[penultimate + 1..])
        .map_err(|_| ServerManifestError::Invalid("its last line is not UTF-8".into()))?;
    let stated = last
        .trim()
        .strip_prefix("\"Manifest-Checksum\": \"")
        .and_then(|s| s.strip_suffix("\"}"))
        .ok_or_else(|| ServerManifestError::Invalid("its last line is not its Manifest-Checksum".into()))?;
    let actual = hex::encode(sha2::Sha256::digest(&bytes[..=penultimate]));
    if !stated.eq_ignore_ascii_case(&actual) {
        return Err(ServerManifestError::Checksum);
    }
    Ok(())
}

/// A file's checksum, computed as its bytes stream, in the algorithm the server uses.
pub enum FileSum {
    None,
    Crc32c(u32),
    Sha224(sha2::Sha224),
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl std::fmt::Debug for FileSum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            FileSum::None => "None",
            FileSum::Crc32c(_) => "Crc32c",
            FileSum::Sha224(_) => "Sha224",
            FileSum::Sha256(_) => "Sha256",
            FileSum::Sha384(_) => "Sha384",
            FileSum::Sha512(_) => "Sha512",
        };
        f.debug_tuple("FileSum").field(&name).finish()
    }
}

impl FileSum {
    pub fn new(algorithm: Algorithm) -> FileSum {
        match algorithm {
            Algorithm::None => FileSum::None,
            Algorithm::Crc32c => FileSum::Crc32c(0),
            Algorithm::Sha224 => FileSum::Sha224(sha2::Sha224::new()),
            Algorithm::Sha256 => FileSum::Sha256(sha2::Sha256::new()),
            Algorithm::Sha384 => FileSum::Sha384(sha2::Sha384::new()),
            Algorithm::Sha512 => FileSum::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            FileSum::None => {}
            FileSum::Crc32c(c) => *c = crc32c::crc32c_append(*c, data),
            FileSum::Sha224(h) => h.update(data),
            FileSum::Sha256(h) => h.update(data),
            FileSum::Sha384(h) => h.update(data),
            FileSum::Sha512(h) => h.update(data),
        }
    }

    /// Lower-case hex as the manifest spells it. PostgreSQL writes a CRC-32C's four bytes in
    /// the machine's order (`pg_checksum_final` copies the `uint32`): little-endian on every
    /// platform walvault runs on.
    pub fn finish(self) -> String {
        match self {
            FileSum::None => String::new(),
            FileSum::Crc32c(c) => hex::encode(c.to_le_bytes()),
            FileSum::Sha224(h) => hex::encode(h.finalize()),
            FileSum::Sha256(h) => hex::encode(h.finalize()),
            FileSum::Sha384(h) => hex::encode(h.finalize()),
            FileSum::Sha512(h) => hex::encode(h.finalize()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest as PostgreSQL writes it, with a true Manifest-Checksum.
    fn manifest(files: &[(&str, u64, &str, &str)], ranges: &str) -> Vec<u8> {
        let mut s = String::from("{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n");
        let listed: Vec<String> = files
            .iter()
            .map(|(p, size, alg, sum)| {
                format!(
                    "{{ \"Path\": \"{p}\", \"Size\": {size}, \"Last-Modified\": \"2026-11-25 13:00:00 GMT\", \"Checksum-Algorithm\": \"{alg}\", \"Checksum\": \"{sum}\" }}"
                )
            })
            .collect();
        s.push_str(&listed.join(",\n"));
        s.push_str("\n],\n\"WAL-Ranges\": [\n");
        s.push_str(ranges);
        s.push_str("\n],\n");
        let sum = hex::encode(sha2::Sha256::digest(s.as_bytes()));
        s.push_str(&format!("\"Manifest-Checksum\": \"{sum}\"}}\n"));
        s.into_bytes()
    }

    fn crc_of(data: &[u8]) -> String {
        let mut s = FileSum::new(Algorithm::Crc32c);
        s.update(data);
        s.finish()
    }

    const RANGE: &str = "{ \"Timeline\": 1, \"Start-LSN\": \"0/6000028\", \"End-LSN\": \"0/6000138\" }";

    #[test]
    fn a_whole_manifest_parses_with_its_files_and_end() {
        let m = manifest(&[("backup_label", 3, "CRC32C", &crc_of(b"abc"))], RANGE);
        let m = ServerManifest::parse(&m).unwrap();
        assert_eq!(m.end().end, Lsn(0x6000138));
        assert_eq!(m.end().timeline.get(), 1);
        assert_eq!(m.algorithm_of("backup_label"), Some(Algorithm::Crc32c));
        let mut sent = BTreeMap::new();
        sent.insert("backup_label".to_string(), (3, crc_of(b"abc")));
        m.check(&sent).unwrap();
    }

    #[test]
    fn the_crc_is_spelled_as_postgresql_spells_it() {
        // crc32c("123456789") = 0xE3069283, written little-endian.
        assert_eq!(crc_of(b"123456789"), "839206e3");
        let mut s = FileSum::new(Algorithm::Crc32c);
        s.update(b"1234");
        s.update(b"56789");
        assert_eq!(s.finish(), "839206e3");
    }

    #[test]
    fn a_truncated_or_altered_manifest_is_refused() {
        let m = manifest(&[("a", 1, "CRC32C", &crc_of(b"x"))], RANGE);
        for cut in [10, m.len() / 2, m.len() - 3] {
            assert!(ServerManifest::parse(&m[..cut]).is_err(), "cut at {cut}");
        }
        let mut altered = m.clone();
        let at = altered.iter().position(|&b| b == b'1').unwrap();
        altered[at] = b'2';
        assert!(matches!(
            ServerManifest::parse(&altered),
            Err(ServerManifestError::Checksum | ServerManifestError::Invalid(_))
        ));
    }

    #[test]
    fn every_difference_between_stream_and_listing_is_named() {
        let m = manifest(
            &[
                ("a", 1, "CRC32C", &crc_of(b"x")),
                ("b", 1, "CRC32C", &crc_of(b"y")),
            ],
            RANGE,
        );
        let m = ServerManifest::parse(&m).unwrap();
        let sent = |list: &[(&str, u64, &[u8])]| {
            list.iter()
                .map(|(p, n, d)| (p.to_string(), (*n, crc_of(d))))
                .collect::<BTreeMap<_, _>>()
        };
        let err = |s| m.check(&s).unwrap_err().to_string();
        assert!(err(sent(&[("a", 1, b"x")])).contains("b: listed but never sent"));
        assert!(err(sent(&[("a", 1, b"x"), ("b", 1, b"z")])).contains("checksum"));
        assert!(err(sent(&[("a", 2, b"x"), ("b", 1, b"y")])).contains("2 bytes streamed"));
        assert!(
            err(sent(&[("a", 1, b"x"), ("b", 1, b"y"), ("c", 0, b"")])).contains("c: sent but not listed")
        );
        m.check(&sent(&[("a", 1, b"x"), ("b", 1, b"y")])).unwrap();
    }

    #[test]
    fn the_last_range_is_the_end() {
        let ranges = "{ \"Timeline\": 1, \"Start-LSN\": \"0/6000028\", \"End-LSN\": \"0/7000000\" },\n{ \"Timeline\": 2, \"Start-LSN\": \"0/7000000\", \"End-LSN\": \"0/7000100\" }";
        let m = ServerManifest::parse(&manifest(&[], ranges)).unwrap();
        assert_eq!(m.end().timeline.get(), 2);
        assert_eq!(m.end().end, Lsn(0x7000100));
    }
}
