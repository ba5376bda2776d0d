//! The identities a repository carries: its id (what names it whatever its URL, chosen by
//! `archive-agent init` or derived from a version 1 descriptor, and bound into its key records)
//! and the identity of the one cluster whose WAL it holds.

use serde::{Deserialize, Serialize};

use crate::wal::SegmentInfo;

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

/// A string that is not a repository id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a repository id is 32 lower-case hex digits")]
pub struct RepoIdError;

impl TryFrom<String> for RepoId {
    type Error = RepoIdError;
    fn try_from(s: String) -> Result<RepoId, RepoIdError> {
        let digits = s.strip_prefix("v1-").unwrap_or(&s);
        if digits.len() == 32 && digits.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(RepoId(s))
        } else {
            Err(RepoIdError)
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
    pub fn validate(&self) -> Result<(), IdentityError> {
        let seg = self.wal_segment_size;
        if !seg.is_power_of_two() || !(1 << 20..=1 << 30).contains(&seg) {
            return Err(IdentityError::SegmentSize(seg));
        }
        let blk = self.wal_block_size;
        if !blk.is_power_of_two() || !(1 << 10..=1 << 15).contains(&blk) {
            return Err(IdentityError::BlockSize(blk));
        }
        if crate::wal::version::for_major(self.pg_version).is_none() {
            return Err(IdentityError::Version(self.pg_version));
        }
        Ok(())
    }
}

/// A cluster identity no PostgreSQL produces.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("WAL segment size {0} is not a power of two from 1 MiB to 1 GiB")]
    SegmentSize(u32),
    #[error("WAL block size {0} is not a power of two from 1 to 32 KiB")]
    BlockSize(u32),
    #[error(
        "PostgreSQL {0} is not a version walvault supports ({range})",
        range = crate::wal::version::supported_range()
    )]
    Version(u32),
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
