//! The backup manifest (format "walvault-backup-manifest" v1, see `docs/FORMAT.md`): everything
//! needed to rebuild the data directory of one base backup, independently of any other backup.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::wal::Lsn;

pub const FORMAT_NAME: &str = "walvault-backup-manifest";
pub const FORMAT_VERSION: u32 = 1;
/// Upper bounds a restore checks before writing anything (a hostile manifest cannot make it
/// allocate or write without limit).
pub const MAX_FILES: usize = 10_000_000;
pub const MAX_FILE_SIZE: u64 = 1 << 40;

/// A backup id: the UTC time the backup started, `YYYYMMDDTHHMMSSZ`, sortable.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BackupId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid backup id {0:?}: expected YYYYMMDDTHHMMSSZ, like 20261121T143200Z")]
pub struct BackupIdError(pub String);

impl BackupId {
    /// The id for a backup started at `unix_secs`.
    pub fn from_unix(unix_secs: i64) -> BackupId {
        BackupId(crate::time::format_compact(unix_secs))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for BackupId {
    type Err = BackupIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let ok = b.len() == 16
            && b[8] == b'T'
            && b[15] == b'Z'
            && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit);
        if ok {
            Ok(BackupId(s.to_string()))
        } else {
            Err(BackupIdError(s.chars().take(40).collect()))
        }
    }
}

impl TryFrom<String> for BackupId {
    type Error = BackupIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<BackupId> for String {
    fn from(id: BackupId) -> String {
        id.0
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What kind of entry a manifest path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Dir,
    File,
}

/// One directory or file of the backup. Paths are relative to the data directory, `/`-separated;
/// tablespace contents live under `pg_tblspc/<oid>/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub kind: EntryKind,
    /// Unix permission bits.
    pub mode: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    /// blake3 ids of the chunks, in order; their sizes are `chunk_size` except the last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A tablespace: its oid (the name of its link in `pg_tblspc`) and where it lived on the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tablespace {
    pub oid: u32,
    pub location: String,
}

/// Byte counts of a backup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupStats {
    /// Bytes of the files backed up.
    pub logical_bytes: u64,
    pub files: u64,
    pub chunks: u64,
    /// Chunks this backup uploaded (the rest were already in the repository).
    pub new_chunks: u64,
    /// Compressed bytes this backup uploaded.
    pub new_bytes: u64,
    /// Compressed bytes of all chunks the backup references.
    pub stored_bytes: u64,
}

/// `backups/<id>/manifest.wvo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub id: BackupId,
    #[serde(with = "crate::repo::descriptor::u64_string")]
    pub system_identifier: u64,
    pub pg_version: u32,
    pub timeline: u32,
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    /// When the backup started and when it became consistent (`pg_backup_stop` returned), by
    /// the server's clock, which also stamps the commits a target time is compared with: Unix
    /// microseconds, UTC.
    pub start_time_us: i64,
    pub stop_time_us: i64,
    pub start_wal: String,
    pub stop_wal: String,
    pub chunk_size: u64,
    pub backup_label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tablespace_map: Option<String>,
    #[serde(default)]
    pub tablespaces: Vec<Tablespace>,
    pub entries: Vec<Entry>,
    pub stats: BackupStats,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON for format v1: {0}")]
    Invalid(String),
    #[error("manifest has format {0:?}")]
    WrongFormat(String),
    #[error("manifest format version {0} is newer than this walvault understands (1); upgrade walvault")]
    UnsupportedVersion(u32),
    #[error("manifest entry {path:?} is unsafe: {why}")]
    UnsafePath { path: String, why: &'static str },
    #[error("manifest is implausible: {0}")]
    Implausible(String),
}

impl Manifest {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifest serializes")
    }

    /// Parse and validate: every path must stay inside the data directory and every size and
    /// count within limits, so a crafted repository cannot make a restore write elsewhere.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        #[derive(Deserialize)]
        struct Probe {
            format: String,
            version: u32,
        }
        let probe: Probe =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Invalid(e.to_string()))?;
        if probe.format != FORMAT_NAME {
            return Err(ManifestError::WrongFormat(probe.format));
        }
        if probe.version != FORMAT_VERSION {
            return Err(ManifestError::UnsupportedVersion(probe.version));
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| ManifestError::Invalid(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), ManifestError> {
        if self.entries.len() > MAX_FILES {
            return Err(ManifestError::Implausible(format!(
                "{} entries",
                self.entries.len()
            )));
        }
        if self.chunk_size == 0 || self.chunk_size > 1 << 30 {
            return Err(ManifestError::Implausible(format!(
                "chunk size {}",
                self.chunk_size
            )));
        }
        for e in &self.entries {
            check_relative_path(&e.path)?;
            if e.size > MAX_FILE_SIZE {
                return Err(ManifestError::Implausible(format!(
                    "{} is {} bytes",
                    e.path, e.size
                )));
            }
            let expected = e.size.div_ceil(self.chunk_size);
            if e.kind == EntryKind::File && e.chunks.len() as u64 != expected {
                return Err(ManifestError::Implausible(format!(
                    "{} has {} chunks for {} bytes",
                    e.path,
                    e.chunks.len(),
                    e.size
                )));
            }
            if let Some(bad) = e.chunks.iter().find(|c| !is_chunk_id(c)) {
                return Err(ManifestError::Implausible(format!(
                    "chunk id {bad:?} in {}",
                    e.path
                )));
            }
        }
        for t in &self.tablespaces {
            if !t.location.starts_with('/') {
                return Err(ManifestError::UnsafePath {
                    path: t.location.clone(),
                    why: "tablespace location is not absolute",
                });
            }
        }
        Ok(())
    }
}

/// A chunk id is 64 lower-case hex digits (a blake3 hash).
pub fn is_chunk_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A manifest path must be relative, `/`-separated, free of `.`/`..`/empty components and
/// control characters, so joining it to the target directory can never leave it.
pub fn check_relative_path(path: &str) -> Result<(), ManifestError> {
    let bad = |why| {
        Err(ManifestError::UnsafePath {
            path: path.chars().take(200).collect(),
            why,
        })
    };
    if path.is_empty() || path.len() > 4096 {
        return bad("empty or too long");
    }
    if path.starts_with('/') {
        return bad("absolute path");
    }
    if path.chars().any(|c| c.is_control() || c == '\\') {
        return bad("control character or backslash");
    }
    if path.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return bad("empty, '.' or '..' component");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            id: "20261121T143200Z".parse().unwrap(),
            system_identifier: 7_441_234_567_890_123_456,
            pg_version: 15,
            timeline: 1,
            start_lsn: Lsn(0x2000028),
            stop_lsn: Lsn(0x2000100),
            start_time_us: 1_795_271_520_000_000,
            stop_time_us: 1_795_271_530_123_456,
            start_wal: "000000010000000000000002".into(),
            stop_wal: "000000010000000000000002".into(),
            chunk_size: 1 << 20,
            backup_label: "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n".into(),
            tablespace_map: None,
            tablespaces: vec![],
            entries: vec![
                Entry {
                    path: "base".into(),
                    kind: EntryKind::Dir,
                    mode: 0o700,
                    size: 0,
                    chunks: vec![],
                },
                Entry {
                    path: "base/1/1259".into(),
                    kind: EntryKind::File,
                    mode: 0o600,
                    size: 8192,
                    chunks: vec!["ab".repeat(32)],
                },
            ],
            stats: BackupStats::default(),
        }
    }

    #[test]
    fn frozen_v1_fixture_parses() {
        let m = Manifest::parse(include_bytes!("../../tests/fixtures/manifest-v1.json")).unwrap();
        assert_eq!(m, sample());
    }

    #[test]
    fn round_trips() {
        let m = sample();
        assert_eq!(Manifest::parse(&m.to_json()).unwrap(), m);
    }

    #[test]
    fn traversal_and_absurd_sizes_are_refused() {
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "base/../../x",
            "base//x",
            "./x",
            "a\u{0}b",
            "",
        ] {
            let mut m = sample();
            m.entries[1].path = bad.into();
            assert!(
                matches!(
                    Manifest::parse(&m.to_json()),
                    Err(ManifestError::UnsafePath { .. })
                ),
                "{bad:?} accepted"
            );
        }
        let mut m = sample();
        m.entries[1].size = 1 << 50;
        assert!(Manifest::parse(&m.to_json()).is_err());
        let mut m = sample();
        m.entries[1].chunks.push("cd".repeat(32));
        assert!(Manifest::parse(&m.to_json()).is_err());
        let mut m = sample();
        m.entries[1].chunks[0] = "../../x".into();
        assert!(Manifest::parse(&m.to_json()).is_err());
    }

    #[test]
    fn backup_ids_are_strict() {
        assert!("20261121T143200Z".parse::<BackupId>().is_ok());
        for bad in [
            "",
            "2026-11-21",
            "20261121T143200",
            "../20261121T1432Z",
            "20261121X143200Z",
        ] {
            assert!(bad.parse::<BackupId>().is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_json_never_panics(s in "\\PC{0,300}") {
            let _ = Manifest::parse(s.as_bytes());
        }
    }
}
