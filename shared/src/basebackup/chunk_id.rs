//! The id of a chunk, on its own so that the repository's key layout can name chunks without
//! depending on how they are stored.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The id of a chunk: the blake3 hash of its content (keyed in an encrypted repository), written
/// as 64 lower-case hex digits in manifests and keys. Only a valid id is ever a `ChunkId`: an id
/// from a hostile manifest is refused where the manifest is parsed, so it can never become a key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId([u8; 32]);

/// Text that is not 64 lower-case hex digits, offered as a chunk id.
#[derive(Debug, thiserror::Error)]
#[error("chunk id {0:?} is not 64 lower-case hex digits")]
pub struct BadChunkId(String);

impl ChunkId {
    pub const fn from_hash(hash: [u8; 32]) -> ChunkId {
        ChunkId(hash)
    }

    pub fn hash(&self) -> &[u8; 32] {
        &self.0
    }
}

impl FromStr for ChunkId {
    type Err = BadChunkId;

    fn from_str(s: &str) -> Result<ChunkId, BadChunkId> {
        let lower_hex = s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let mut hash = [0u8; 32];
        match lower_hex && hex::decode_to_slice(s, &mut hash).is_ok() {
            true => Ok(ChunkId(hash)),
            false => Err(BadChunkId(s.chars().take(80).collect())),
        }
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&hex::encode(self.0))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

impl Serialize for ChunkId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 64];
        // 32 bytes always encode to 64 hex digits.
        hex::encode_to_slice(self.0, &mut buf).map_err(serde::ser::Error::custom)?;
        s.serialize_str(std::str::from_utf8(&buf).map_err(serde::ser::Error::custom)?)
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ChunkId, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The id of a pack ([`crate::basebackup::pack`]): the blake3 hash of the pack's stored bytes,
/// 64 lower-case hex digits like a [`ChunkId`], and like it valid by construction.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PackId(ChunkId);

impl PackId {
    pub const fn from_hash(hash: [u8; 32]) -> PackId {
        PackId(ChunkId::from_hash(hash))
    }

    /// The id of a pack holding `bytes`.
    pub fn of(bytes: &[u8]) -> PackId {
        PackId::from_hash(*blake3::hash(bytes).as_bytes())
    }
}

impl FromStr for PackId {
    type Err = BadChunkId;

    fn from_str(s: &str) -> Result<PackId, BadChunkId> {
        s.parse().map(PackId)
    }
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackId({self})")
    }
}

impl Serialize for PackId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for PackId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PackId, D::Error> {
        ChunkId::deserialize(d).map(PackId)
    }
}
