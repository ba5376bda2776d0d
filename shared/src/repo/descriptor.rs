//! The repository descriptor, `walvault.json`: the format version of the repository, its id, and
//! the identity of the one cluster whose WAL it holds.
//!
//! Version 2 (written by `archive-agent init`) has a random repository id and, when init was
//! given the data directory, the cluster identity; otherwise the first archived segment binds the
//! cluster in `cluster.json` ([`super::layout::CLUSTER_KEY`]). Version 1 (created implicitly by
//! the first push of walvault before init existed) always has the cluster and no id: it is read
//! and written as before, its id derived from its bytes ([`RepoId::of_v1`]). Version 3 (written
//! by `archive-agent init --encrypt`) is version 2 with an `encryption` record: the wrapped
//! master key ([`super::keys`]). An encrypted repository is version 3 so that a walvault that
//! predates encryption refuses it instead of writing plain objects into it.

use serde::{Deserialize, Serialize};

use crate::wal::SegmentInfo;

pub const FORMAT_NAME: &str = "walvault-repository";
/// The version `archive-agent init` writes.
pub const FORMAT_VERSION: u32 = 2;
/// The version `archive-agent init --encrypt` writes: an encrypted repository.
pub const ENCRYPTED_FORMAT_VERSION: u32 = 3;
/// The oldest version still read.
pub const OLDEST_FORMAT_VERSION: u32 = 1;

/// A repository's id: 32 lower-case hex digits chosen at random by `archive-agent init`. Local
/// state that vouches for the repository's content (the spool's "archived" markers, prefetched
/// copies) names it, so a repository recreated at the same URL is never taken for the old one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RepoId(String);

impl RepoId {
    /// A new random id.
    pub fn random() -> RepoId {
        RepoId(hex::encode(rand::random::<[u8; 16]>()))
    }

    /// The id of a version 1 repository, which has none stored: a hash of its cluster identity
    /// (with a `v1-` prefix, so it can never equal a random one). Stable however the file is
    /// formatted; two v1 repositories of one cluster share it, which is harmless because only
    /// `init` creates repositories now, and it writes version 2 with a random id.
    pub fn of_v1(cluster: &ClusterIdentity) -> RepoId {
        let canonical = serde_json::to_vec(cluster).expect("cluster identity serializes");
        RepoId(format!("v1-{}", &blake3::hash(&canonical).to_hex()[..32]))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RepoId {
    type Error = String;
    fn try_from(s: String) -> Result<RepoId, String> {
        let digits = s.strip_prefix("v1-").unwrap_or(&s);
        if digits.len() == 32 && digits.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(RepoId(s))
        } else {
            Err("a repository id is 32 lower-case hex digits".into())
        }
    }
}

impl From<RepoId> for String {
    fn from(id: RepoId) -> String {
        id.0
    }
}

impl std::fmt::Display for RepoId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which cluster a repository belongs to, as its WAL page headers state it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterIdentity {
    /// `xlp_sysid`, chosen by initdb; kept as a decimal string in JSON (it exceeds 2^53).
    #[serde(with = "u64_string")]
    pub system_identifier: u64,
    pub wal_segment_size: u32,
    pub wal_block_size: u32,
    pub pg_version: u32,
}

impl From<&SegmentInfo> for ClusterIdentity {
    fn from(i: &SegmentInfo) -> Self {
        ClusterIdentity {
            system_identifier: i.system_identifier,
            wal_segment_size: i.segment_size,
            wal_block_size: i.block_size,
            pg_version: i.pg_version,
        }
    }
}

impl ClusterIdentity {
    /// Refuse values no PostgreSQL produces (from a damaged or hand-edited file): a segment size
    /// that is not a power of two from 1 MiB to 1 GiB, a WAL block size that is not a power of two
    /// from 1 to 32 KiB, or a version walvault does not know.
    pub fn validate(&self) -> Result<(), String> {
        let seg = self.wal_segment_size;
        if !seg.is_power_of_two() || !(1 << 20..=1 << 30).contains(&seg) {
            return Err(format!(
                "WAL segment size {seg} is not a power of two from 1 MiB to 1 GiB"
            ));
        }
        let blk = self.wal_block_size;
        if !blk.is_power_of_two() || !(1 << 10..=1 << 15).contains(&blk) {
            return Err(format!(
                "WAL block size {blk} is not a power of two from 1 to 32 KiB"
            ));
        }
        if crate::wal::version::for_major(self.pg_version).is_none() {
            return Err(format!(
                "PostgreSQL {} is not a version walvault supports ({})",
                self.pg_version,
                crate::wal::version::supported_range()
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for ClusterIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PostgreSQL {} system {} ({} MiB segments)",
            self.pg_version,
            self.system_identifier,
            self.wal_segment_size >> 20
        )
    }
}

/// `walvault.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoDescriptor {
    pub format: String,
    pub version: u32,
    /// Absent in version 1 only (see [`RepoDescriptor::id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<RepoId>,
    /// When `archive-agent init` ran (`YYYY-MM-DD HH:MM:SS+00`), for people; never interpreted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// Always present in version 1; in version 2 only when init was given the data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterIdentity>,
    /// The walvault that created the repository, for support; never interpreted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// Version 3 only: how objects are encrypted, and the wrapped master key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<super::keys::EncryptionRecord>,
    /// Whether `archive-agent init` found that the store refuses a second create-only write
    /// of a name (`If-None-Match: *` honoured: AWS S3, MinIO, Azure; not Garage). When true,
    /// writers rely on that refusal instead of checking before and reading back after each
    /// WAL write (docs/STORES.md). Absent: not probed (repositories made before walvault
    /// probed, and local ones, whose writes are exclusive anyway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_only_honoured: Option<bool>,
    /// A version 1 repository's derived id ([`RepoId::of_v1`]); never written.
    #[serde(skip)]
    v1_id: Option<RepoId>,
}

/// Why `walvault.json` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DescriptorError {
    #[error("walvault.json is not valid: {0}")]
    Invalid(String),
    #[error("walvault.json has format {0:?}: this is not a walvault repository")]
    WrongFormat(String),
    #[error(
        "repository format version {0} is not one this walvault understands ({OLDEST_FORMAT_VERSION} to {ENCRYPTED_FORMAT_VERSION}); upgrade walvault"
    )]
    UnsupportedVersion(u32),
}

impl RepoDescriptor {
    /// A new repository's descriptor, with a random id.
    pub fn new(cluster: Option<ClusterIdentity>, created_at_micros: i64) -> Self {
        RepoDescriptor {
            format: FORMAT_NAME.to_string(),
            version: FORMAT_VERSION,
            id: Some(RepoId::random()),
            created_at: Some(crate::time::format_micros(
                created_at_micros - created_at_micros % 1_000_000,
            )),
            cluster,
            created_by: Some(format!("walvault {}", env!("CARGO_PKG_VERSION"))),
            encryption: None,
            create_only_honoured: None,
            v1_id: None,
        }
    }

    /// Whether objects in this repository are encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.encryption.is_some()
    }

    /// Make this (new) descriptor an encrypted repository's, with `record` as its wrapped key.
    pub fn set_encryption(&mut self, record: super::keys::EncryptionRecord) {
        self.version = ENCRYPTED_FORMAT_VERSION;
        self.encryption = Some(record);
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("descriptor serializes");
        out.push(b'\n');
        out
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, DescriptorError> {
        // Read the version first so a newer format is reported as such, not as a parse error.
        #[derive(Deserialize)]
        struct Probe {
            format: String,
            version: u32,
        }
        let probe: Probe =
            serde_json::from_slice(bytes).map_err(|e| DescriptorError::Invalid(e.to_string()))?;
        if probe.format != FORMAT_NAME {
            return Err(DescriptorError::WrongFormat(probe.format));
        }
        if !(OLDEST_FORMAT_VERSION..=ENCRYPTED_FORMAT_VERSION).contains(&probe.version) {
            return Err(DescriptorError::UnsupportedVersion(probe.version));
        }
        let mut d: RepoDescriptor =
            serde_json::from_slice(bytes).map_err(|e| DescriptorError::Invalid(e.to_string()))?;
        match (d.version, &d.id, &d.cluster) {
            (1, None, Some(c)) => d.v1_id = Some(RepoId::of_v1(c)),
            (1, ..) => {
                return Err(DescriptorError::Invalid(
                    "a version 1 descriptor has a cluster and no id".into(),
                ));
            }
            (_, None, _) => return Err(DescriptorError::Invalid("no repository id".into())),
            _ => {}
        }
        match (d.version == ENCRYPTED_FORMAT_VERSION, &d.encryption) {
            (true, None) => {
                return Err(DescriptorError::Invalid(
                    "a version 3 (encrypted) descriptor has no encryption record".into(),
                ));
            }
            (false, Some(_)) => {
                return Err(DescriptorError::Invalid(
                    "only a version 3 descriptor has an encryption record".into(),
                ));
            }
            (true, Some(e)) => e
                .validate()
                .map_err(|e| DescriptorError::Invalid(e.to_string()))?,
            (false, None) => {}
        }
        if let Some(c) = &d.cluster {
            c.validate().map_err(DescriptorError::Invalid)?;
        }
        Ok(d)
    }

    /// The repository's id (derived for version 1, see [`RepoId::of_v1`]).
    pub fn id(&self) -> &RepoId {
        self.id
            .as_ref()
            .or(self.v1_id.as_ref())
            .expect("parse and new always set an id")
    }
}

pub(crate) mod u64_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frozen fixture: a v1 descriptor must stay readable, with a stable derived id.
    #[test]
    fn frozen_v1_fixture_parses() {
        let bytes = include_bytes!("../../tests/fixtures/walvault-v1.json");
        let d = RepoDescriptor::parse(bytes).unwrap();
        assert_eq!(d.version, 1);
        let c = d.cluster.unwrap();
        assert_eq!(c.system_identifier, 7_441_234_567_890_123_456);
        assert_eq!(c.wal_segment_size, 16 << 20);
        assert_eq!(c.pg_version, 15);
        assert_eq!(d.id(), &RepoId::of_v1(&c));
        assert!(d.id().as_str().starts_with("v1-"));
        // Written back, it is still version 1 with no stored id, and reads back the same.
        let again = RepoDescriptor::parse(&d.to_json()).unwrap();
        assert_eq!(again, d);
        assert!(!String::from_utf8(d.to_json()).unwrap().contains("\"id\""));
    }

    /// Frozen fixtures: v2 with and without the cluster (bound later in cluster.json).
    #[test]
    fn frozen_v2_fixtures_parse() {
        let d = RepoDescriptor::parse(include_bytes!("../../tests/fixtures/walvault-v2.json")).unwrap();
        assert_eq!(d.version, 2);
        assert_eq!(d.id().as_str(), "3f2c0a7d9b1e4c5a8d6f0e2b4a6c8e10");
        assert_eq!(d.cluster.unwrap().pg_version, 18);
        let d =
            RepoDescriptor::parse(include_bytes!("../../tests/fixtures/walvault-v2-unbound.json")).unwrap();
        assert_eq!(d.cluster, None);
        // Written before init probed the store: not relied on.
        assert_eq!(d.create_only_honoured, None);
        let d = RepoDescriptor::parse(include_bytes!(
            "../../tests/fixtures/walvault-v2-create-only.json"
        ))
        .unwrap();
        assert_eq!(d.create_only_honoured, Some(true));
        assert!(
            String::from_utf8(d.to_json())
                .unwrap()
                .contains("\"create_only_honoured\": true")
        );
    }

    #[test]
    fn round_trips_and_refuses_unknown_versions() {
        let d = RepoDescriptor::new(
            Some(ClusterIdentity {
                system_identifier: u64::MAX,
                wal_segment_size: 1 << 24,
                wal_block_size: 8192,
                pg_version: 16,
            }),
            1_700_000_000_123_456,
        );
        assert_eq!(RepoDescriptor::parse(&d.to_json()).unwrap(), d);
        assert_ne!(RepoDescriptor::new(None, 0).id(), d.id());
        let newer = String::from_utf8(d.to_json())
            .unwrap()
            .replace("\"version\": 2", "\"version\": 4");
        assert!(matches!(
            RepoDescriptor::parse(newer.as_bytes()),
            Err(DescriptorError::UnsupportedVersion(4))
        ));
        // Version 3 is encrypted: one without its record is refused, not read as plain.
        let unkeyed = String::from_utf8(d.to_json())
            .unwrap()
            .replace("\"version\": 2", "\"version\": 3");
        assert!(RepoDescriptor::parse(unkeyed.as_bytes()).is_err());
        let odd_size = String::from_utf8(d.to_json())
            .unwrap()
            .replace("16777216", "16777215");
        assert!(RepoDescriptor::parse(odd_size.as_bytes()).is_err());
        let bad_id = String::from_utf8(d.to_json())
            .unwrap()
            .replace(d.id().as_str(), "../../etc");
        assert!(RepoDescriptor::parse(bad_id.as_bytes()).is_err());
        assert!(RepoDescriptor::parse(b"{}").is_err());
        assert!(RepoDescriptor::parse(b"\xff\x00").is_err());
    }
}
