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

pub use super::identity::{ClusterIdentity, RepoId};

pub const FORMAT_NAME: &str = "walvault-repository";
/// The version `archive-agent init` writes.
pub const FORMAT_VERSION: u32 = 2;
/// The version `archive-agent init --encrypt` writes: an encrypted repository.
pub const ENCRYPTED_FORMAT_VERSION: u32 = 3;
/// The oldest version still read.
pub const OLDEST_FORMAT_VERSION: u32 = 1;

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
    /// A second copy's source, as `archive-agent init --copy-of` was given it (credentials
    /// redacted), for people: `restore-agent info` shows it. The copy has the source's id,
    /// cluster and encryption record, so its objects are the source's, byte for byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_of: Option<String>,
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
            copy_of: None,
            v1_id: None,
        }
    }

    /// The descriptor of a second copy of the repository `self` describes, at `source_url`:
    /// the same id, cluster and encryption record; the store's create-only behaviour is the
    /// copy's own, probed again.
    pub fn for_copy(&self, source_url: &str) -> RepoDescriptor {
        RepoDescriptor {
            create_only_honoured: None,
            copy_of: Some(source_url.to_string()),
            ..self.clone()
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
            c.validate()
                .map_err(|e| DescriptorError::Invalid(e.to_string()))?;
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

    /// A second copy's descriptor: the source's identity, its own store's probe, and the
    /// optional `copy_of`, which round-trips and which a descriptor without it does not need.
    #[test]
    fn a_copy_keeps_its_source_identity_and_names_it() {
        let mut source = RepoDescriptor::new(None, 1_700_000_000_000_000);
        source.create_only_honoured = Some(true);
        let copy = source.for_copy("s3://main/walvault");
        assert_eq!(copy.id(), source.id());
        assert_eq!(
            (copy.version, &copy.cluster, &copy.encryption),
            (source.version, &source.cluster, &source.encryption)
        );
        assert_eq!(
            copy.create_only_honoured, None,
            "probed again on the copy's store"
        );
        let json = String::from_utf8(copy.to_json()).unwrap();
        assert!(json.contains("\"copy_of\": \"s3://main/walvault\""), "{json}");
        assert_eq!(RepoDescriptor::parse(json.as_bytes()).unwrap(), copy);
        assert!(!String::from_utf8(source.to_json()).unwrap().contains("copy_of"));
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
