//! The repository descriptor, `walvault.json`: the format version of the repository and the
//! identity of the one cluster whose WAL it holds.

use serde::{Deserialize, Serialize};

use crate::wal::SegmentInfo;

pub const FORMAT_NAME: &str = "walvault-repository";
pub const FORMAT_VERSION: u32 = 1;

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
    pub cluster: ClusterIdentity,
    /// The walvault that created the repository, for support; never interpreted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
}

/// Why `walvault.json` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DescriptorError {
    #[error("walvault.json is not valid: {0}")]
    Invalid(String),
    #[error("walvault.json has format {0:?}: this is not a walvault repository")]
    WrongFormat(String),
    #[error("repository format version {0} is newer than this walvault understands (1); upgrade walvault")]
    UnsupportedVersion(u32),
}

impl RepoDescriptor {
    pub fn new(cluster: ClusterIdentity) -> Self {
        RepoDescriptor {
            format: FORMAT_NAME.to_string(),
            version: FORMAT_VERSION,
            cluster,
            created_by: Some(format!("walvault {}", env!("CARGO_PKG_VERSION"))),
        }
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
        if probe.version != FORMAT_VERSION {
            return Err(DescriptorError::UnsupportedVersion(probe.version));
        }
        serde_json::from_slice(bytes).map_err(|e| DescriptorError::Invalid(e.to_string()))
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

    /// Frozen fixture: a v1 descriptor must stay readable.
    #[test]
    fn frozen_v1_fixture_parses() {
        let d = RepoDescriptor::parse(include_bytes!("../../tests/fixtures/walvault-v1.json")).unwrap();
        assert_eq!(d.version, 1);
        assert_eq!(d.cluster.system_identifier, 7_441_234_567_890_123_456);
        assert_eq!(d.cluster.wal_segment_size, 16 << 20);
        assert_eq!(d.cluster.pg_version, 15);
    }

    #[test]
    fn round_trips_and_refuses_unknown_versions() {
        let d = RepoDescriptor::new(ClusterIdentity {
            system_identifier: u64::MAX,
            wal_segment_size: 1 << 24,
            wal_block_size: 8192,
            pg_version: 16,
        });
        assert_eq!(RepoDescriptor::parse(&d.to_json()).unwrap(), d);
        let newer = String::from_utf8(d.to_json())
            .unwrap()
            .replace("\"version\": 1", "\"version\": 2");
        assert!(matches!(
            RepoDescriptor::parse(newer.as_bytes()),
            Err(DescriptorError::UnsupportedVersion(2))
        ));
        assert!(RepoDescriptor::parse(b"{}").is_err());
        assert!(RepoDescriptor::parse(b"\xff\x00").is_err());
    }
}
