//! The backup manifest (format "walvault-backup-manifest" v2, or v1 without packs, see
//! `docs/FORMAT.md`): everything needed to rebuild the data directory of one base backup,
//! independently of any other backup.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

mod entry_checks;
pub mod outline;
pub mod paged;
pub mod written;

use entry_checks::EntryChecks;

use super::chunk::ChunkId;
pub use super::pack::Delta;
use super::pack::{PackRecord, Places};
use super::page_checksum::{MAX_LISTED, PageChecks};
use crate::wal::{Lsn, SegmentNo, TimelineId, WalFileName};

pub const FORMAT_NAME: &str = "walvault-backup-manifest";
/// The version written: 2, which may list packs, or 3 when a file is a slice of a chunk it
/// shares with other small files ([`Within`]). Version 1 (no packs) is still read.
pub const FORMAT_VERSION: u32 = 2;
/// The version of a manifest some of whose files are slices of a shared chunk: a reader that
/// knows only version 2 would write the whole chunk into each of them, so it must refuse.
pub const FORMAT_VERSION_WITHIN: u32 = 3;
/// The version of a manifest some of whose chunks are stored as differences from an earlier
/// chunk ([`Delta`]): a reader that knows only version 3 would find no object for them.
pub const FORMAT_VERSION_DELTA: u32 = 4;
/// The versions read.
pub const FORMAT_VERSIONS: std::ops::RangeInclusive<u32> = 1..=4;
/// Chunks stored as differences, at most (as many as packs may list).
pub const MAX_DELTAS: usize = MAX_PACKED_CHUNKS;
/// The chunks all packs list together.
pub const MAX_PACKED_CHUNKS: usize = 100_000_000;
/// One pack.
pub const MAX_PACK_LEN: u64 = 1 << 32;
// Upper bounds checked before a restore writes anything, so a hostile manifest cannot make it
// allocate or write without limit. Each is far above any real cluster (see `docs/FORMAT.md`).
/// The manifest's JSON: the most a sealed object may hold.
pub const MAX_MANIFEST_BYTES: u64 = crate::repo::object::MAX_ORIGINAL_LEN;
/// Entries (files and directories).
pub const MAX_ENTRIES: usize = 10_000_000;
pub const MAX_TABLESPACES: usize = 10_000;
/// One file.
pub const MAX_FILE_SIZE: u64 = 1 << 40;
/// All files together (1 PiB).
pub const MAX_TOTAL_SIZE: u64 = 1 << 50;
/// A chunk is one sealed object.
pub const MAX_CHUNK_SIZE: u64 = crate::repo::object::MAX_ORIGINAL_LEN;
/// A path, relative or a tablespace location: PATH_MAX (4096) less the terminating NUL.
pub const MAX_PATH_LEN: usize = 4095;
/// One path component: NAME_MAX.
pub const MAX_NAME_LEN: usize = 255;
/// `backup_label`, `tablespace_map` and `postgresql.auto.conf` (a few hundred bytes in practice).
pub const MAX_TEXT_LEN: usize = 1 << 20;

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
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "exact_vec"
    )]
    pub chunks: Vec<ChunkId>,
    /// A small file stored with others in one chunk (version 3): its bytes are `size` bytes at
    /// [`Within::at`] of its only chunk, which is [`Within::of`] bytes long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within: Option<Within>,
}

/// Where a small file's bytes lie in the chunk it shares with its neighbours: small files are
/// compressed together, as one stream compresses them, rather than each alone (see
/// `docs/FORMAT.md`, "Small files").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Within {
    /// Offset of the file's first byte in the chunk's content.
    pub at: u64,
    /// Length of the chunk's content (at most `chunk_size`).
    pub of: u64,
}

impl Entry {
    /// The content length of chunk `idx` of this file in chunks of `chunk_size` (the whole
    /// shared chunk for a file [`Entry::within`] one).
    pub fn chunk_len(&self, idx: usize, chunk_size: u64) -> u64 {
        match self.within {
            Some(w) => w.of,
            None => chunk_size.min(self.size - idx as u64 * chunk_size),
        }
    }
}

/// A list at its length: read from JSON it grows as read, and a one-chunk file held room for four
/// (4.8 MB of a restore's heap at 61,000 files, `heaptrack`).
fn exact_vec<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    let mut v = Vec::<T>::deserialize(d)?;
    v.shrink_to_fit();
    Ok(v)
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
    /// Files taken over from the previous backup without being read, because their `stat` shows
    /// no write since that backup read them (see [`crate::basebackup::reuse`]), and their bytes.
    #[serde(default)]
    pub reused_files: u64,
    #[serde(default)]
    pub reused_bytes: u64,
}

/// What `fstat` said of a file just before a backup read it: what the next backup compares to
/// decide whether the file may be reused without reading it (see [`crate::basebackup::reuse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub size: u64,
    /// Modification and status change times, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
}

/// What a backup knows of one of its files beyond what a restore needs: how much each chunk
/// takes in the repository, and how the file looked when it was read. Optional and ignored by
/// restore; the next backup uses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub path: String,
    /// Stored (sealed, compressed) length of each of the entry's chunks, in order.
    #[serde(deserialize_with = "exact_vec")]
    pub stored: Vec<u64>,
    /// Absent when the file was not read by this backup's process in a way that can vouch for it
    /// (`global/pg_control`, which is reread until its CRC checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stat: Option<FileStat>,
    /// The backup that read the file's bytes, when this one took the file over unread because
    /// it had not changed since (absent: this backup read it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_by: Option<BackupId>,
}

/// `backups/<id>/manifest.wvo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub id: BackupId,
    #[serde(with = "crate::repo::identity::u64_string")]
    pub system_identifier: u64,
    pub pg_version: u32,
    pub timeline: TimelineId,
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
    /// The backup host's wall clock (Unix microseconds) just before the first file was
    /// examined: every [`FileStat`] of `files` was taken after it. Absent in manifests written
    /// before files were reused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_examined_after_us: Option<i64>,
    /// One record per file entry with chunks, sorted by path. Absent in older manifests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileRecord>,
    /// The packs holding the chunks that are not stored on their own (version 2; see
    /// [`crate::basebackup::pack`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packs: Vec<PackRecord>,
    /// A backup over the replication protocol: the `backup_manifest` PostgreSQL sent, stored as
    /// chunks (in `packs`), which the next incremental backup uploads (`UPLOAD_MANIFEST`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_manifest: Option<StoredBlob>,
    /// An incremental backup over the protocol (PostgreSQL 17+): the backup whose files the
    /// unchanged blocks came from. Informational: every backup is complete on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incremental_from: Option<BackupId>,
    /// What the check of every relation page read found (see
    /// [`crate::basebackup::page_checksum`]); absent when pages were not checked. Informational:
    /// restore copies damaged pages as they were read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_checks: Option<PageChecks>,
    /// How many times `expire` has written this manifest again, each time listing new packs
    /// for packs it rewrote ([`crate::basebackup::pack_space`]); 0, and absent, as the backup
    /// wrote it. A copy replaces its manifest with one of a higher generation.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub generation: u32,
    /// The chunks stored as differences from earlier ones (version 4), sorted by
    /// [`Delta::chunk`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deltas: Vec<Delta>,
    /// Whether this value holds the whole manifest or only its outline (never stored).
    #[serde(skip)]
    pub held: outline::Held,
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

/// Bytes stored as chunks of the manifest's `chunk_size`, outside the data directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBlob {
    pub size: u64,
    pub chunks: Vec<ChunkId>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON for format v1: {0}")]
    Invalid(String),
    #[error("manifest has format {0:?}")]
    WrongFormat(String),
    #[error("manifest format version {0} is newer than this walvault understands (1 to 4); upgrade walvault")]
    UnsupportedVersion(u32),
    /// A path that could leave the directory it is restored into.
    #[error("entry {path:?} is unsafe: {why}")]
    UnsafePath { path: String, why: &'static str },
    /// An entry restore must not write as described (kind, mode, size, chunks, place).
    #[error("entry {path:?} is refused: {why}")]
    Entry { path: String, why: String },
    #[error("tablespace {oid} is refused: {why}")]
    Tablespace { oid: u32, why: String },
    #[error("manifest is implausible: {0}")]
    Implausible(String),
}

/// A path as error messages show it: at most 200 characters (a hostile path can be 4 KiB).
fn shown(path: &str) -> String {
    const MAX: usize = 200;
    match path.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}...", &path[..at]),
        None => path.to_string(),
    }
}

/// A document no larger than a manifest may be.
pub(super) fn check_size(bytes: &[u8]) -> Result<(), ManifestError> {
    match bytes.len() as u64 > MAX_MANIFEST_BYTES {
        true => Err(ManifestError::Implausible(format!(
            "{} bytes of JSON, more than the limit of {MAX_MANIFEST_BYTES}",
            bytes.len()
        ))),
        false => Ok(()),
    }
}

/// A manifest of this format at a version this build reads.
pub(super) fn check_format(format: &str, version: u32) -> Result<(), ManifestError> {
    if format != FORMAT_NAME {
        return Err(ManifestError::WrongFormat(shown(format)));
    }
    match FORMAT_VERSIONS.contains(&version) {
        true => Ok(()),
        false => Err(ManifestError::UnsupportedVersion(version)),
    }
}

fn entry_err(path: &str, why: impl Into<String>) -> ManifestError {
    ManifestError::Entry {
        path: shown(path),
        why: why.into(),
    }
}

/// What is read of a manifest before any entry is allocated: its format, version and counts.
#[derive(Deserialize)]
struct Probe {
    format: String,
    version: u32,
    #[serde(default)]
    entries: Count,
    #[serde(default)]
    tablespaces: Count,
    #[serde(default)]
    files: Count,
}

impl Probe {
    fn check(&self) -> Result<(), ManifestError> {
        check_format(&self.format, self.version)?;
        check_counts(self.entries.0.max(self.files.0), self.tablespaces.0)
    }
}

/// Counts the elements of a JSON array without keeping them (anything else counts 0), so the
/// number of entries is known before a single one is allocated.
#[derive(Default)]
struct Count(u64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Count, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
                let mut n = 0u64;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Count(n))
            }
            // Not an array: the full parse reports it.
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Count(0))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Count, E> {
                Ok(Count(0))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Count, E> {
                Ok(Count(0))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Count, E> {
                Ok(Count(0))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Count, E> {
                Ok(Count(0))
            }
            fn visit_str<E>(self, _: &str) -> Result<Count, E> {
                Ok(Count(0))
            }
            fn visit_unit<E>(self) -> Result<Count, E> {
                Ok(Count(0))
            }
        }
        d.deserialize_any(V)
    }
}

impl Manifest {
    /// The WAL this backup needs to become consistent: from the segment holding its start LSN to
    /// the one holding the last byte before its stop LSN, both included.
    pub fn wal_needed(&self, segment_size: u32) -> (SegmentNo, SegmentNo) {
        (
            SegmentNo::containing(self.start_lsn, segment_size),
            SegmentNo::containing(Lsn(self.stop_lsn.0.saturating_sub(1)), segment_size),
        )
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifest serializes")
    }

    /// Parse and validate ([`Manifest::validate`]). The size of the document and the number of
    /// entries and tablespaces are checked before any entry is allocated.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        Manifest::check_before_parsing(bytes)?;
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| ManifestError::Invalid(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    /// The size of the document, its format and version, and the number of entries and
    /// tablespaces, checked before any entry is allocated.
    fn check_before_parsing(bytes: &[u8]) -> Result<(), ManifestError> {
        check_size(bytes)?;
        serde_json::from_slice::<Probe>(bytes)
            .map_err(|e| ManifestError::Invalid(e.to_string()))?
            .check()
    }

    /// Everything a restore relies on, checked in one pass, before it writes anything (see
    /// `docs/FORMAT.md`, "Validation"): a manifest is attacker-controlled for anyone who can write
    /// to the repository but not to the database host, and it must not be able to make a restore
    /// write outside the directories the DBA chose, create special files or modes, or allocate
    /// or write without bound.
    pub fn validate(&self) -> Result<(), ManifestError> {
        self.validate_lists(&written::Held::of(self))
    }

    /// [`Manifest::validate`] with `lists` as the entries and file records (a manifest whose
    /// lists are given one item at a time as it is written, [`written`]).
    pub fn validate_lists(&self, lists: &dyn written::Lists) -> Result<(), ManifestError> {
        let implausible = |s: String| Err(ManifestError::Implausible(s));
        check_counts(
            lists.entry_count().max(lists.file_count()),
            self.tablespaces.len() as u64,
        )?;
        if !(1..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return implausible(format!(
                "chunk size {} is outside 1..={MAX_CHUNK_SIZE}",
                self.chunk_size
            ));
        }
        if self.start_lsn > self.stop_lsn {
            return implausible(format!(
                "start LSN {} is after stop LSN {}",
                self.start_lsn, self.stop_lsn
            ));
        }
        for (field, name) in [("start_wal", &self.start_wal), ("stop_wal", &self.stop_wal)] {
            if !matches!(name.parse::<WalFileName>(), Ok(WalFileName::Segment(_))) {
                return implausible(format!("{field} {:?} is not a WAL segment name", shown(name)));
            }
        }
        for (field, text) in [
            ("backup_label", Some(&self.backup_label)),
            ("tablespace_map", self.tablespace_map.as_ref()),
        ] {
            match text {
                Some(t) if t.len() > MAX_TEXT_LEN => {
                    return implausible(format!("{field} is {} bytes, more than {MAX_TEXT_LEN}", t.len()));
                }
                Some(t) if t.contains('\0') => return implausible(format!("{field} contains a NUL byte")),
                _ => {}
            }
        }

        if let Some(b) = &self.server_manifest
            && (b.size > crate::basebackup::server_manifest::MAX_MANIFEST_LEN as u64
                || b.chunks.len() as u64 != b.size.div_ceil(self.chunk_size))
        {
            return implausible(format!(
                "the server's manifest is {} bytes in {} chunks of {}",
                b.size,
                b.chunks.len(),
                self.chunk_size
            ));
        }
        let mut checks = EntryChecks::new(self)?;
        lists.each_entry(&mut |e| checks.check(e))?;
        let mut prev: Option<String> = None;
        lists.each_file(&mut |f, e| {
            written::check_file(f, e, prev.as_deref())?;
            prev = Some(f.path.clone());
            Ok(())
        })?;
        self.check_page_checks()?;
        self.check_packs()?;
        self.check_deltas()
    }

    /// `packs`: only in version 2, each named once, each chunk's stored length within what a
    /// sealed chunk of `chunk_size` can take, and each pack within [`MAX_PACK_LEN`], so a restore
    /// never asks for a range it could not hold.
    fn check_packs(&self) -> Result<(), ManifestError> {
        let implausible = |s: String| Err(ManifestError::Implausible(s));
        if self.version < 2 && !self.packs.is_empty() {
            return implausible("a version 1 manifest lists packs".into());
        }
        let max_len = max_sealed_len(self.chunk_size);
        let mut ids = std::collections::HashSet::new();
        let mut listed = 0usize;
        for p in &self.packs {
            if !ids.insert(p.id) {
                return implausible(format!("pack {} is listed twice", p.id));
            }
            if p.chunks.is_empty() || p.chunks.len() != p.lengths.len() {
                return implausible(format!(
                    "pack {} lists {} chunks and {} lengths",
                    p.id,
                    p.chunks.len(),
                    p.lengths.len()
                ));
            }
            listed += p.chunks.len();
            if listed > MAX_PACKED_CHUNKS {
                return implausible(format!("packs list more than {MAX_PACKED_CHUNKS} chunks"));
            }
            let mut total = 0u64;
            for len in &p.lengths {
                if !(1..=max_len).contains(len) {
                    return implausible(format!(
                        "pack {} holds a chunk of {len} bytes, outside 1..={max_len} for chunks of {}",
                        p.id, self.chunk_size
                    ));
                }
                total += len;
            }
            if total > MAX_PACK_LEN {
                return implausible(format!(
                    "pack {} is {total} bytes, more than {MAX_PACK_LEN}",
                    p.id
                ));
            }
        }
        Ok(())
    }

    /// Every chunk the backup references, in file order, then those of the server's
    /// `backup_manifest`, then the chunks each [`Delta`] is read from (its base and its
    /// difference), repeats included: what must stay stored for the backup to restore.
    pub fn chunk_refs(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.entries
            .iter()
            .flat_map(|e| e.chunks.iter().copied())
            .chain(self.server_manifest.iter().flat_map(|b| b.chunks.iter().copied()))
            .chain(self.deltas.iter().flat_map(|d| [d.base, d.xor]))
    }

    /// Where each packed chunk is, and how each chunk stored as a difference is read.
    pub fn places(&self) -> Places {
        Places::of(&self.packs).with_deltas(&self.deltas)
    }

    /// `deltas`: only in version 4, sorted by chunk and each chunk once, each read from a
    /// packed difference and a base that are themselves stored whole, so that a restore reads
    /// two chunks for one and never follows a chain.
    fn check_deltas(&self) -> Result<(), ManifestError> {
        let implausible = |s: String| Err(ManifestError::Implausible(s));
        if self.deltas.is_empty() {
            return Ok(());
        }
        if self.version < FORMAT_VERSION_DELTA {
            return implausible(format!(
                "a manifest of version {} lists chunks stored as differences",
                self.version
            ));
        }
        if self.deltas.len() > MAX_DELTAS {
            return implausible(format!("more than {MAX_DELTAS} chunks stored as differences"));
        }
        if let Some(w) = self.deltas.windows(2).find(|w| w[0].chunk >= w[1].chunk) {
            return implausible(format!(
                "chunks stored as differences are not sorted, or repeat one ({})",
                w[1].chunk
            ));
        }
        let packed = Places::of(&self.packs);
        // Read from a difference only: listed as a delta and placed nowhere whole.
        let derived = |id: &ChunkId| {
            packed.get(id).is_none() && self.deltas.binary_search_by(|d| d.chunk.cmp(id)).is_ok()
        };
        for d in &self.deltas {
            if d.base == d.chunk || d.xor == d.chunk || derived(&d.base) || derived(&d.xor) {
                return implausible(format!(
                    "chunk {} is a difference from a chunk that is not stored whole",
                    d.chunk
                ));
            }
            if packed.get(&d.xor).is_none() {
                return implausible(format!(
                    "the difference {} of chunk {} is in none of the packs listed",
                    d.xor, d.chunk
                ));
            }
        }
        Ok(())
    }

    /// `files`: sorted, each naming a file entry, with one stored length per chunk. Restore
    /// never uses them, but a record that disagrees with its entry means the manifest was not
    /// written by walvault.
    /// The tablespaces: valid oids, each once, with a location that can be created; their oids.
    fn check_tablespaces(&self) -> Result<std::collections::BTreeSet<u32>, ManifestError> {
        let mut oids = std::collections::BTreeSet::new();
        for t in &self.tablespaces {
            let bad = |why: String| Err(ManifestError::Tablespace { oid: t.oid, why });
            if t.oid == 0 {
                return bad("0 is not a valid oid".into());
            }
            if !oids.insert(t.oid) {
                return bad("it is declared twice".into());
            }
            if let Err(why) = check_location(&t.location) {
                return bad(format!("location {:?} {why}", shown(&t.location)));
            }
        }
        Ok(oids)
    }

    /// The damaged pages listed: a bounded list of relative paths.
    fn check_page_checks(&self) -> Result<(), ManifestError> {
        let Some(checks) = &self.page_checks else {
            return Ok(());
        };
        if checks.bad.len() > MAX_LISTED || (checks.bad.len() as u64) > checks.bad_total {
            return Err(ManifestError::Implausible(format!(
                "{} damaged pages listed of {} (at most {MAX_LISTED} are)",
                checks.bad.len(),
                checks.bad_total
            )));
        }
        for page in &checks.bad {
            check_relative_path(&page.path)?;
        }
        Ok(())
    }
}

/// The most a sealed chunk of `chunk_size` bytes may take: its content uncompressed (zstd's
/// worst case adds under 1/128), its header and name, and an encrypted repository's nonce and tag.
pub fn max_sealed_len(chunk_size: u64) -> u64 {
    chunk_size + chunk_size / 64 + 4096
}

fn check_counts(entries: u64, tablespaces: u64) -> Result<(), ManifestError> {
    if entries > MAX_ENTRIES as u64 {
        return Err(ManifestError::Implausible(format!(
            "{entries} entries, more than the limit of {MAX_ENTRIES}"
        )));
    }
    if tablespaces > MAX_TABLESPACES as u64 {
        return Err(ManifestError::Implausible(format!(
            "{tablespaces} tablespaces, more than the limit of {MAX_TABLESPACES}"
        )));
    }
    Ok(())
}

/// For `pg_tblspc/<oid>[/<rest>]`, with `<oid>` spelled as PostgreSQL names the link (decimal,
/// no sign or leading zero): the oid and the rest. Anything else, including `pg_tblspc/016384`,
/// is an ordinary path of the data directory.
pub fn tablespace_part(path: &str) -> Option<(u32, Option<&str>)> {
    let rest = path.strip_prefix("pg_tblspc/")?;
    let (name, rest) = match rest.split_once('/') {
        Some((name, rest)) => (name, Some(rest)),
        None => (rest, None),
    };
    let oid: u32 = name.parse().ok()?;
    (oid.to_string() == name).then_some((oid, rest))
}

/// A tablespace location on the source: absolute, normalized, printable, within PATH_MAX. It is
/// used only with `--tablespace-original`, and written into `tablespace_map`.
fn check_location(loc: &str) -> Result<(), &'static str> {
    if !loc.starts_with('/') {
        return Err("is not absolute");
    }
    if loc.len() > MAX_PATH_LEN {
        return Err("is too long");
    }
    if loc.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    if loc
        .split('/')
        .any(|c| c == "." || c == ".." || c.len() > MAX_NAME_LEN)
    {
        return Err("has a '.', '..' or over-long component");
    }
    if loc.split('/').all(str::is_empty) {
        return Err("is the root directory");
    }
    Ok(())
}

/// A manifest path must be relative, `/`-separated, free of `.`/`..`/empty components, control
/// characters and backslashes, with components of at most NAME_MAX and a length of at most
/// PATH_MAX bytes, so joining it to the target directory can never leave it.
pub fn check_relative_path(path: &str) -> Result<(), ManifestError> {
    let bad = |why| {
        Err(ManifestError::UnsafePath {
            path: shown(path),
            why,
        })
    };
    if path.is_empty() {
        return bad("empty path");
    }
    if path.len() > MAX_PATH_LEN {
        return bad("longer than PATH_MAX (4095 bytes)");
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
    if path.split('/').any(|c| c.len() > MAX_NAME_LEN) {
        return bad("a component longer than NAME_MAX (255 bytes)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::pack::PackRecord;
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            format: FORMAT_NAME.into(),
            version: 1,
            id: "20261121T143200Z".parse().unwrap(),
            system_identifier: 7_441_234_567_890_123_456,
            pg_version: 15,
            timeline: crate::wal::lsn::tl(1),
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
                    within: None,
                    path: "base".into(),
                    kind: EntryKind::Dir,
                    mode: 0o700,
                    size: 0,
                    chunks: vec![],
                },
                Entry {
                    within: None,
                    path: "base/1/1259".into(),
                    kind: EntryKind::File,
                    mode: 0o600,
                    size: 8192,
                    chunks: vec![cid("ab")],
                },
            ],
            stats: BackupStats::default(),
            files_examined_after_us: None,
            packs: vec![],
            server_manifest: None,
            incremental_from: None,
            generation: 0,
            deltas: vec![],
            held: Default::default(),
            page_checks: None,
            files: vec![],
        }
    }

    #[test]
    fn frozen_v1_fixture_parses() {
        let m = Manifest::parse(include_bytes!("../../tests/fixtures/manifest-v1.json")).unwrap();
        assert_eq!(m, sample());
    }

    /// A restore holds every entry of its manifest: each file's chunk list is read at its length,
    /// not at the room a growing list leaves (four ids for a file of one chunk).
    #[test]
    fn a_parsed_chunk_list_takes_the_room_of_its_chunks() {
        let mut m = sample();
        for (i, e) in m.entries.iter_mut().enumerate() {
            if e.kind == EntryKind::File {
                e.size = m.chunk_size * (i as u64 % 3) + 1;
                e.chunks = (0..=i % 3)
                    .map(|k| ChunkId::from_hash([(i + k) as u8; 32]))
                    .collect();
            }
        }
        let parsed = Manifest::parse(&m.to_json()).unwrap();
        assert_eq!(parsed, m);
        for e in parsed.entries.iter().filter(|e| e.kind == EntryKind::File) {
            assert_eq!(e.chunks.capacity(), e.chunks.len(), "{}", e.path);
        }
    }

    /// What `manifest-v1-files.json` holds: a backup that took `base/1/1259` over unread.
    fn sample_with_files() -> Manifest {
        let file = |path: &str, size: u64, chunks: &[&str]| Entry {
            within: None,
            path: path.into(),
            kind: EntryKind::File,
            mode: 0o600,
            size,
            chunks: chunks.iter().map(|c| cid(c)).collect(),
        };
        let stat = |size, mtime_ns, ctime_ns, ino| FileStat {
            size,
            mtime_ns,
            ctime_ns,
            ino,
            dev: 2049,
        };
        Manifest {
            id: "20261122T143200Z".parse().unwrap(),
            start_lsn: Lsn(0x5000028),
            stop_lsn: Lsn(0x5000100),
            start_time_us: 1_795_357_920_000_000,
            stop_time_us: 1_795_357_930_123_456,
            start_wal: "000000010000000000000005".into(),
            stop_wal: "000000010000000000000005".into(),
            backup_label: "START WAL LOCATION: 0/5000028 (file 000000010000000000000005)\n".into(),
            entries: vec![
                sample().entries[0].clone(),
                file("base/1/1259", 8192, &["ab"]),
                file("base/1/16384", (1 << 20) + 1, &["cd", "ef"]),
                file("global/pg_control", 8192, &["01"]),
            ],
            stats: BackupStats {
                logical_bytes: 1_064_961,
                files: 3,
                chunks: 4,
                new_chunks: 3,
                new_bytes: 21_000,
                stored_bytes: 21_400,
                reused_files: 1,
                reused_bytes: 8192,
            },
            files_examined_after_us: Some(1_795_357_920_250_000),
            files: vec![
                FileRecord {
                    path: "base/1/1259".into(),
                    stored: vec![400],
                    stat: Some(stat(
                        8192,
                        1_795_271_000_000_000_001,
                        1_795_271_000_000_000_002,
                        131_073,
                    )),
                    read_by: Some("20261121T143200Z".parse().unwrap()),
                },
                FileRecord {
                    path: "base/1/16384".into(),
                    stored: vec![20_000, 700],
                    stat: Some(stat(
                        (1 << 20) + 1,
                        1_795_357_910_000_000_000,
                        1_795_357_910_000_000_000,
                        131_074,
                    )),
                    read_by: None,
                },
                FileRecord {
                    path: "global/pg_control".into(),
                    stored: vec![300],
                    stat: None,
                    read_by: None,
                },
            ],
            ..sample()
        }
    }

    #[test]
    fn frozen_v1_fixture_with_file_records_parses() {
        let m = Manifest::parse(include_bytes!("../../tests/fixtures/manifest-v1-files.json")).unwrap();
        assert_eq!(m, sample_with_files());
        assert_eq!(Manifest::parse(&m.to_json()).unwrap(), m);
        // A manifest written before file records has none: its next backup reads every file.
        let old = Manifest::parse(include_bytes!("../../tests/fixtures/manifest-v1.json")).unwrap();
        assert!(old.files.is_empty() && old.files_examined_after_us.is_none());
        assert_eq!((old.stats.reused_files, old.stats.reused_bytes), (0, 0));
    }

    #[test]
    fn file_records_must_agree_with_their_entries() {
        type Change = fn(&mut Manifest);
        let cases: [(Change, &str); 5] = [
            (
                |m| m.files[1].stored.pop().map(drop).unwrap_or(()),
                "1 stored lengths for 2 chunks",
            ),
            (|m| m.files[0].path = "base/1/9999".into(), "names no entry"),
            (|m| m.files.swap(0, 1), "not sorted"),
            (
                |m| m.files[1] = m.files[0].clone(),
                "not sorted by path, or repeat one",
            ),
            (
                |m| m.files[0].stat.as_mut().unwrap().size = 1,
                "stat disagrees with its size",
            ),
        ];
        for (change, why) in cases {
            let mut m = sample_with_files();
            change(&mut m);
            assert_refused(&m, why);
        }
        let mut dir_record = sample_with_files();
        dir_record.files.insert(
            0,
            FileRecord {
                path: "base".into(),
                stored: vec![],
                stat: None,
                read_by: None,
            },
        );
        assert_refused(&dir_record, "names a directory");
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
        m.entries[1].chunks.push(cid("cd"));
        assert!(Manifest::parse(&m.to_json()).is_err());
        let m = sample();
        assert!(Manifest::parse(&with_first_chunk_id(&m, "../../x")).is_err());
    }

    fn file(path: &str, mode: u32, size: u64) -> Entry {
        Entry {
            within: None,
            path: path.into(),
            kind: EntryKind::File,
            mode,
            size,
            chunks: vec![cid("ab"); size.div_ceil(1 << 20) as usize],
        }
    }

    fn dir(path: &str, mode: u32) -> Entry {
        Entry {
            within: None,
            path: path.into(),
            kind: EntryKind::Dir,
            mode,
            size: 0,
            chunks: vec![],
        }
    }

    /// `sample()` with `entries` (sorted here) and `tablespaces`.
    fn with(mut entries: Vec<Entry>, tablespaces: Vec<Tablespace>) -> Manifest {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Manifest {
            entries,
            tablespaces,
            ..sample()
        }
    }

    fn ts(oid: u32, location: &str) -> Tablespace {
        Tablespace {
            oid,
            location: location.into(),
        }
    }

    /// The error `m` is refused with, through the JSON a repository would hold.
    /// The chunk id whose hex is `pair` 32 times.
    fn cid(pair: &str) -> ChunkId {
        pair.repeat(32).parse().unwrap()
    }

    /// `m` as JSON, with its first chunk id replaced by `text` (as a hostile manifest would
    /// hold it: only JSON can carry an id that is no `ChunkId`).
    fn with_first_chunk_id(m: &Manifest, text: &str) -> Vec<u8> {
        let json = String::from_utf8(m.to_json()).unwrap();
        let first = m
            .entries
            .iter()
            .find_map(|e| e.chunks.first())
            .unwrap()
            .to_string();
        let replaced = json.replacen(&first, text.trim_matches('"'), 1);
        assert_ne!(replaced, json);
        replaced.into_bytes()
    }

    fn refusal(m: &Manifest) -> String {
        match Manifest::parse(&m.to_json()) {
            Ok(_) => panic!("accepted: {:?}", m.entries),
            Err(e) => e.to_string(),
        }
    }

    fn assert_refused(m: &Manifest, needle: &str) {
        let msg = refusal(m);
        assert!(msg.contains(needle), "{msg:?} does not say {needle:?}");
        assert!(!msg.contains('\n'), "one line: {msg:?}");
    }

    #[test]
    fn what_backups_hold_is_accepted() {
        // The shapes `archive-agent backup` writes: tablespace roots as 0700 directories, a setgid directory
        // (inherited from a setgid parent on the source), configuration files 0644, signal files.
        let m = with(
            vec![
                dir("base", 0o2700),
                dir("base/1", 0o700),
                file("base/1/1259", 0o600, 8192),
                file("base/1/1259.1", 0o600, (1 << 30) + 5),
                file("postgresql.conf", 0o644, 100),
                file("postgresql.auto.conf", 0o600, 88),
                file("standby.signal", 0o600, 0),
                file("backup_label.old", 0o600, 200),
                dir("pg_tblspc", 0o700),
                dir("pg_tblspc/16400", 0o700),
                dir("pg_tblspc/16400/PG_15_202209061", 0o700),
                file("pg_tblspc/16400/PG_15_202209061/5/16401", 0o600, 0),
                // An in-place tablespace (a directory, no link): restored inside the data directory.
                dir("pg_tblspc/16500", 0o750),
                dir("pg_wal", 0o777),
                dir("pg_wal/archive_status", 0o777),
            ],
            vec![ts(16400, "/srv/ts1")],
        );
        assert_eq!(Manifest::parse(&m.to_json()).unwrap(), m);
    }

    #[test]
    fn paths_are_bounded_by_path_max_and_name_max() {
        let long_name = "x".repeat(256);
        assert_refused(&with(vec![file(&long_name, 0o600, 0)], vec![]), "NAME_MAX");
        let ok_name = "x".repeat(255);
        Manifest::parse(&with(vec![file(&ok_name, 0o600, 0)], vec![]).to_json()).unwrap();
        let deep = vec!["d"; 2100].join("/");
        let msg = refusal(&with(vec![file(&deep, 0o600, 0)], vec![]));
        assert!(msg.contains("PATH_MAX"), "{msg}");
        assert!(msg.len() < 400, "the path is shortened in the message: {msg}");
        assert_refused(&with(vec![file("base\\x", 0o600, 0)], vec![]), "backslash");
    }

    #[test]
    fn duplicates_and_unsorted_entries_are_refused() {
        let mut m = sample();
        m.entries.push(m.entries[1].clone());
        assert_refused(&m, "listed twice");
        let mut m = sample();
        m.entries.swap(0, 1);
        assert_refused(&m, "not sorted");
        // A directory and a file of the same path.
        let mut m = sample();
        m.entries.insert(2, dir("base/1/1259", 0o700));
        assert_refused(&m, "listed twice");
    }

    #[test]
    fn nothing_goes_through_a_file() {
        assert_refused(
            &with(vec![file("base/1", 0o600, 1), file("base/1/x", 0o600, 1)], vec![]),
            "goes through \"base/1\", which is a file",
        );
        // Not adjacent: "base/1-x" and "base/1.x" sort between "base/1" and "base/1/…".
        assert_refused(
            &with(
                vec![
                    file("base/1", 0o600, 1),
                    file("base/1-x", 0o600, 1),
                    file("base/1.x", 0o600, 1),
                    dir("base/1/d", 0o700),
                ],
                vec![],
            ),
            "which is a file",
        );
        // A declared tablespace's root is a directory (it becomes the chosen location).
        assert_refused(
            &with(
                vec![file("pg_tblspc/16400", 0o600, 1)],
                vec![ts(16400, "/srv/ts1")],
            ),
            "tablespace's root is a directory",
        );
        assert_refused(
            &with(
                vec![
                    file("pg_tblspc/16400", 0o600, 1),
                    file("pg_tblspc/16400/x", 0o600, 1),
                ],
                vec![],
            ),
            "which is a file",
        );
    }

    #[test]
    fn the_servers_manifest_round_trips_and_must_fit_its_chunks() {
        let mut m = with(vec![file("base/1/1", 0o600, 1)], vec![]);
        m.server_manifest = Some(StoredBlob {
            size: (1 << 20) + 1,
            chunks: vec![cid("ab"), cid("cd")],
        });
        m.incremental_from = Some(m.id.clone());
        m.validate().unwrap();
        assert_eq!(Manifest::parse(&m.to_json()).unwrap(), m);
        m.server_manifest.as_mut().unwrap().chunks.pop();
        assert_refused(&m, "the server's manifest is 1048577 bytes in 1 chunks");
        // Without them, nothing is written: older readers see the manifest they know.
        let plain = with(vec![file("base/1/1", 0o600, 1)], vec![]);
        let json = String::from_utf8(plain.to_json()).unwrap();
        assert!(!json.contains("server_manifest") && !json.contains("incremental_from"));
    }

    #[test]
    fn what_restore_writes_itself_is_refused() {
        for name in ["backup_label", "tablespace_map", "walvault.spool"] {
            assert_refused(&with(vec![file(name, 0o600, 1)], vec![]), name);
            assert_refused(&with(vec![dir(name, 0o700)], vec![]), name);
            assert_refused(&with(vec![file(&format!("{name}/x"), 0o600, 1)], vec![]), name);
        }
        for name in ["postgresql.auto.conf", "recovery.signal", "standby.signal"] {
            assert_refused(&with(vec![dir(name, 0o700)], vec![]), "can only be a file");
            assert_refused(
                &with(vec![file(&format!("{name}/x"), 0o600, 1)], vec![]),
                "can only be a file",
            );
        }
        assert_refused(
            &with(vec![file("postgresql.auto.conf", 0o600, 2 << 20)], vec![]),
            "reads it into memory",
        );
    }

    #[test]
    fn special_modes_are_refused() {
        for (e, why) in [
            (file("base/x", 0o4755, 1), "setuid"),
            (file("base/x", 0o2755, 1), "setgid"),
            (file("base/x", 0o1644, 1), "sticky"),
            (file("base/x", 0o010_600, 1), "file type"),
            (file("base/x", 0o020_600, 1), "file type"),
            (dir("base/d", 0o040_700), "file type"),
            (dir("base/d", 0o4700), "setuid or sticky"),
            (dir("base/d", 0o1777), "setuid or sticky"),
            (dir("base/d", 0o500), "owner rwx"),
        ] {
            assert_refused(&with(vec![dir("base", 0o700), e], vec![]), why);
        }
        // Outside the data directory, nothing group or world writable.
        assert_refused(
            &with(vec![dir("pg_tblspc/16400", 0o777)], vec![ts(16400, "/srv/ts1")]),
            "group or world writable",
        );
        assert_refused(
            &with(
                vec![dir("pg_tblspc/16400", 0o700), file("pg_tblspc/16400/f", 0o620, 1)],
                vec![ts(16400, "/srv/ts1")],
            ),
            "group or world writable",
        );
    }

    #[test]
    fn absurd_sizes_and_chunk_lists_are_refused() {
        let mut big = file("base/x", 0o600, 0);
        big.size = 1 << 63;
        assert_refused(&with(vec![big], vec![]), "more than the limit");
        let mut short = file("base/x", 0o600, 3 << 20);
        short.chunks.pop();
        assert_refused(&with(vec![short], vec![]), "2 chunks for 3145728 bytes");
        let mut long = file("base/x", 0o600, 10);
        long.chunks.push(cid("cd"));
        assert_refused(&with(vec![long], vec![]), "2 chunks for 10 bytes");
        let mut d = dir("base/d", 0o700);
        d.chunks.push(cid("cd"));
        assert_refused(&with(vec![d], vec![]), "a directory has no size");
        for bad in [
            "AB".repeat(32),
            "ab".repeat(31),
            "../../../etc/passwd".into(),
            "zz".repeat(32),
        ] {
            let f = file("base/x", 0o600, 1);
            let json = with_first_chunk_id(&with(vec![f], vec![]), &bad);
            let msg = Manifest::parse(&json).unwrap_err().to_string();
            assert!(msg.contains("not 64 lower-case hex"), "{msg:?}");
            assert!(!msg.contains('\n'), "one line: {msg:?}");
        }
        // 1025 files of the largest size add up past the total limit (validated directly: the
        // JSON of a million chunk ids is slow to build in a debug test).
        let entries = (0..1025)
            .map(|i| Entry {
                within: None,
                path: format!("f{i:04}"),
                kind: EntryKind::File,
                mode: 0o600,
                size: MAX_FILE_SIZE,
                chunks: vec![cid("ab"); 1024],
            })
            .collect();
        let m = Manifest {
            chunk_size: 1 << 30,
            ..with(entries, vec![])
        };
        let msg = m.validate().unwrap_err().to_string();
        assert!(msg.contains("add up to more than"), "{msg}");
        for cs in [0, MAX_CHUNK_SIZE + 1] {
            let m = Manifest {
                chunk_size: cs,
                ..sample()
            };
            assert_refused(&m, "chunk size");
        }
    }

    /// What `manifest-v2.json` holds: `base/1/1259` in a pack with another chunk, `base/1/1249`
    /// stored on its own by an older backup.
    fn sample_v2() -> Manifest {
        let mut m = sample();
        m.version = 2;
        m.entries.push(Entry {
            within: None,
            path: "base/1/1249".into(),
            kind: EntryKind::File,
            mode: 0o600,
            size: (1 << 20) + 8192,
            chunks: vec![cid("cd"), cid("ef")],
        });
        m.entries.sort_by(|a, b| a.path.cmp(&b.path));
        m.packs = vec![PackRecord {
            id: "5a".repeat(32).parse().unwrap(),
            chunks: vec![cid("ab"), cid("cd")],
            lengths: vec![180, 95],
        }];
        m
    }

    #[test]
    fn frozen_v2_fixture_parses_and_places_its_packed_chunks() {
        let m = Manifest::parse(include_bytes!("../../tests/fixtures/manifest-v2.json")).unwrap();
        assert_eq!(m, sample_v2());
        assert_eq!(Manifest::parse(&m.to_json()).unwrap(), m);
        let places = m.places();
        let pack: super::super::pack::PackId = "5a".repeat(32).parse().unwrap();
        assert_eq!(
            places.get(&cid("ab")).map(|p| (p.pack, p.offset, p.len)),
            Some((pack, 0, 180))
        );
        assert_eq!(
            places.get(&cid("cd")).map(|p| (p.pack, p.offset, p.len)),
            Some((pack, 180, 95))
        );
        // Stored on its own.
        assert!(places.get(&cid("ef")).is_none());
    }

    /// `manifest-v3-within.json`: `manifest-v2.json` with two small files sharing one chunk of
    /// 12,288 bytes, `base/1/112` its first 8,192 and `base/1/113` the 4,096 after them.
    fn sample_v3() -> Manifest {
        let mut m = sample_v2();
        m.version = FORMAT_VERSION_WITHIN;
        let shared = |path: &str, size: u64, at: u64| Entry {
            path: path.into(),
            kind: EntryKind::File,
            mode: 0o600,
            size,
            chunks: vec![cid("12")],
            within: Some(Within { at, of: 12288 }),
        };
        m.entries.push(shared("base/1/112", 8192, 0));
        m.entries.push(shared("base/1/113", 4096, 8192));
        m.entries.sort_by(|a, b| a.path.cmp(&b.path));
        m.packs[0].chunks.push(cid("12"));
        m.packs[0].lengths.push(140);
        m
    }

    #[test]
    fn frozen_v3_fixture_parses_with_files_sharing_a_chunk() {
        let m = Manifest::parse(include_bytes!("../../tests/fixtures/manifest-v3-within.json")).unwrap();
        assert_eq!(m, sample_v3());
        assert_eq!(Manifest::parse(&m.to_json()).unwrap(), m);
        let small = m.entries.iter().find(|e| e.path == "base/1/113").unwrap();
        assert_eq!(small.chunk_len(0, m.chunk_size), 12288);
        let large = m.entries.iter().find(|e| e.path == "base/1/1249").unwrap();
        assert_eq!(large.chunk_len(1, m.chunk_size), 8192);
    }

    /// `manifest-v4-delta.json`: `manifest-v2.json` with `base/1/2619`, whose only chunk is
    /// stored as its difference (chunk `88…`, packed) from `base/1/1259`'s chunk `ab…`.
    fn sample_v4() -> Manifest {
        let mut m = sample_v2();
        m.version = FORMAT_VERSION_DELTA;
        m.entries.push(Entry {
            within: None,
            path: "base/1/2619".into(),
            kind: EntryKind::File,
            mode: 0o600,
            size: 8192,
            chunks: vec![cid("77")],
        });
        m.packs[0].chunks.push(cid("88"));
        m.packs[0].lengths.push(60);
        m.deltas = vec![Delta {
            chunk: cid("77"),
            base: cid("ab"),
            xor: cid("88"),
        }];
        m
    }

    #[test]
    fn frozen_v4_fixture_parses_with_a_chunk_stored_as_a_difference() {
        let m = Manifest::parse(include_bytes!("../../tests/fixtures/manifest-v4-delta.json")).unwrap();
        assert_eq!(m, sample_v4());
        assert_eq!(Manifest::parse(&m.to_json()).unwrap(), m);
        let places = m.places();
        // Read where its difference is, with its base; what must stay stored names both.
        assert_eq!(places.get(&cid("77")), places.get(&cid("88")));
        assert_eq!(places.delta(&cid("77")).map(|d| d.base), Some(cid("ab")));
        assert!(places.delta(&cid("ab")).is_none());
        let refs: Vec<ChunkId> = m.chunk_refs().collect();
        assert!(refs.contains(&cid("88")) && refs.contains(&cid("ab")));
    }

    #[test]
    fn a_difference_is_from_a_chunk_stored_whole_and_is_packed() {
        let refused = |f: &dyn Fn(&mut Manifest), needle: &str| {
            let mut m = sample_v4();
            f(&mut m);
            assert_refused(&m, needle);
        };
        refused(
            &|m| m.version = 3,
            "a manifest of version 3 lists chunks stored as differences",
        );
        // Its difference in no pack listed (stored on its own, or gone).
        refused(&|m| m.deltas[0].xor = cid("ef"), "is in none of the packs listed");
        // A chain: from a chunk that is itself a difference.
        refused(
            &|m| {
                m.deltas.insert(
                    0,
                    Delta {
                        chunk: cid("66"),
                        base: cid("ab"),
                        xor: cid("88"),
                    },
                );
                m.deltas[1].base = cid("66");
            },
            "is a difference from a chunk that is not stored whole",
        );
        refused(&|m| m.deltas[0].base = cid("77"), "not stored whole");
        refused(&|m| m.deltas.push(m.deltas[0]), "not sorted, or repeat one");
    }

    #[test]
    fn a_file_must_lie_within_the_chunk_it_shares() {
        let with = |at: u64, of: u64, size: u64, chunks: usize| {
            let mut m = sample_v3();
            let e = m.entries.iter_mut().find(|e| e.path == "base/1/113").unwrap();
            e.within = Some(Within { at, of });
            e.size = size;
            e.chunks = vec![cid("12"); chunks];
            m
        };
        with(8192, 12288, 4096, 1).validate().unwrap();
        // Past the chunk's end, around the end of u64, a chunk larger than the chunk size, an
        // empty file, and a shared chunk that is not the file's only one.
        assert_refused(
            &with(8193, 12288, 4096, 1),
            "4096 bytes at 8193 of a shared chunk of 12288",
        );
        assert_refused(&with(u64::MAX, 12288, 4096, 1), "of a shared chunk");
        assert_refused(&with(0, (1 << 20) + 1, 4096, 1), "chunks of 1048576");
        assert_refused(&with(0, 12288, 0, 1), "0 bytes at 0");
        assert_refused(&with(0, 12288, 4096, 2), "(2 chunks");
        assert_refused(&with(0, 12288, 4096, 0), "(0 chunks");
        // Two lengths for one shared chunk, a shared chunk before version 3, a directory in one.
        assert_refused(
            &with(0, 8192, 4096, 1),
            "is 8192 bytes long, and 12288 for another file",
        );
        let mut m = sample_v3();
        m.version = 2;
        assert_refused(&m, "a shared chunk in a manifest of version 2");
        let mut m = sample_v3();
        m.entries[0].within = Some(Within { at: 0, of: 1 });
        assert_refused(&m, "a directory has no size and no chunks");
    }

    /// `manifest-v2-repacked.json`: `manifest-v2.json` as an expire writes it again after a
    /// repack, with the optional `generation` (absent, it is 0, and it is not written when 0).
    #[test]
    fn frozen_v2_fixture_with_a_generation_parses() {
        let m = Manifest::parse(include_bytes!("../../tests/fixtures/manifest-v2-repacked.json")).unwrap();
        assert_eq!(m.generation, 1);
        assert_eq!(
            Manifest {
                generation: 0,
                ..m.clone()
            },
            sample_v2()
        );
        assert_eq!(Manifest::parse(&m.to_json()).unwrap(), m);
        assert_eq!(sample_v2().generation, 0);
        assert!(
            !String::from_utf8(sample_v2().to_json())
                .unwrap()
                .contains("generation")
        );
    }

    /// `manifest-v2-page-checks.json`: `manifest-v2.json` with the optional `page_checks`.
    #[test]
    fn frozen_v2_fixture_with_page_checks_parses() {
        use super::super::page_checksum::{BadPage, Fork, PageChecks};
        let json = include_bytes!("../../tests/fixtures/manifest-v2-page-checks.json");
        let m = Manifest::parse(json).unwrap();
        let expected = PageChecks {
            checked: 136,
            recent: 2,
            bad_total: 1,
            bad: vec![BadPage {
                path: "base/1/1259".into(),
                block: 0,
                fork: Fork::Main,
                database: Some("template1".into()),
                relation: Some("pg_catalog.pg_class".into()),
                reason: "checksum 0xde55, expected 0x961f".into(),
            }],
        };
        assert_eq!(m.page_checks.as_ref(), Some(&expected));
        assert_eq!(
            Manifest {
                page_checks: None,
                ..m.clone()
            },
            sample_v2()
        );
        assert_eq!(Manifest::parse(&m.to_json()).unwrap(), m);
        // Bounded, and every path relative.
        let mut bad = m.clone();
        bad.page_checks.as_mut().unwrap().bad[0].path = "../etc/passwd".into();
        assert!(bad.validate().is_err());
        let mut many = m;
        many.page_checks.as_mut().unwrap().bad_total = 0;
        assert_refused(&many, "damaged pages listed");
    }

    #[test]
    fn packs_are_checked() {
        let mut v1 = sample_v2();
        v1.version = 1;
        assert_refused(&v1, "version 1 manifest lists packs");
        let mut m = sample_v2();
        m.packs[0].lengths.pop();
        assert_refused(&m, "lists 2 chunks and 1 lengths");
        let mut m = sample_v2();
        m.packs[0].lengths[1] = 0;
        assert_refused(&m, "a chunk of 0 bytes");
        let mut m = sample_v2();
        m.packs[0].lengths[1] = max_sealed_len(m.chunk_size) + 1;
        assert_refused(&m, "outside 1..=");
        let mut m = sample_v2();
        m.packs.push(m.packs[0].clone());
        assert_refused(&m, "listed twice");
        let mut m = sample_v2();
        m.packs[0].chunks.clear();
        m.packs[0].lengths.clear();
        assert_refused(&m, "lists 0 chunks");
    }

    #[test]
    fn entry_counts_are_checked_before_entries_are_parsed() {
        // Not even entries: the count alone is refused, before any entry is allocated.
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["entries"] = serde_json::Value::Array(vec![serde_json::Value::Null; MAX_ENTRIES + 1]);
        let err = Manifest::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.to_string().contains("10000001 entries"), "{err}");
        v["entries"] = serde_json::json!([]);
        v["tablespaces"] = serde_json::Value::Array(vec![serde_json::Value::Null; MAX_TABLESPACES + 1]);
        let err = Manifest::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.to_string().contains("10001 tablespaces"), "{err}");
        // A newer version is still reported as such whatever its entries look like.
        v["version"] = 5.into();
        v["entries"] = serde_json::json!({"a": 1});
        assert!(matches!(
            Manifest::parse(&serde_json::to_vec(&v).unwrap()),
            Err(ManifestError::UnsupportedVersion(5))
        ));
    }

    #[test]
    fn tablespaces_are_checked() {
        let base = |t: Vec<Tablespace>| {
            let dirs = t
                .iter()
                .map(|t| dir(&format!("pg_tblspc/{}", t.oid), 0o700))
                .collect();
            with(dirs, t)
        };
        assert_refused(&base(vec![ts(0, "/srv/a")]), "not a valid oid");
        assert_refused(&base(vec![ts(7, "/srv/a"), ts(7, "/srv/b")]), "declared twice");
        for (loc, why) in [
            ("srv/a", "not absolute"),
            ("/srv/../etc", "'..'"),
            ("/srv/./a", "'.'"),
            ("/srv/a\n16401 /etc", "control character"),
            ("/", "root directory"),
            ("//", "root directory"),
        ] {
            assert_refused(&base(vec![ts(16400, loc)]), why);
        }
        let long = format!("/{}", "a/".repeat(2048));
        assert_refused(&base(vec![ts(16400, &long)]), "too long");
        // Only the canonical spelling of an oid designates the tablespace.
        assert_eq!(tablespace_part("pg_tblspc/16400/x/y"), Some((16400, Some("x/y"))));
        assert_eq!(tablespace_part("pg_tblspc/16400"), Some((16400, None)));
        for other in [
            "pg_tblspc/016400/x",
            "pg_tblspc/+16400",
            "pg_tblspc/x",
            "pg_tblspc",
            "base/16400",
        ] {
            assert_eq!(tablespace_part(other), None, "{other}");
        }
    }

    #[test]
    fn header_fields_are_checked() {
        type Change = fn(&mut Manifest);
        // Only JSON can carry timeline 0: refused where the manifest is parsed.
        let mut json: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        json["timeline"] = 0.into();
        let msg = Manifest::parse(&serde_json::to_vec(&json).unwrap())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("timeline 0"), "{msg}");
        let cases: [(Change, &str); 5] = [
            (|m| m.start_lsn = Lsn(m.stop_lsn.0 + 1), "after stop LSN"),
            (|m| m.start_wal = "../x".into(), "start_wal"),
            (|m| m.stop_wal = "00000001000000000000000".into(), "stop_wal"),
            (|m| m.backup_label = "x\0y".into(), "NUL"),
            (
                |m| m.tablespace_map = Some("x".repeat(MAX_TEXT_LEN + 1)),
                "tablespace_map is",
            ),
        ];
        for (change, why) in cases {
            let mut m = sample();
            change(&mut m);
            assert_refused(&m, why);
        }
        // Refused on its length, unparsed (zeroed pages: nothing is touched).
        let huge = vec![0u8; MAX_MANIFEST_BYTES as usize + 1];
        assert!(
            Manifest::parse(&huge)
                .unwrap_err()
                .to_string()
                .contains("bytes of JSON")
        );
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
