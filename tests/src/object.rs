//! Sealed objects (`*.wvo`) read and written from the documented layout (`docs/FORMAT.md`,
//! "sealed WAL object, version 1"), independently of the library: so the tests can look inside a
//! stored manifest, and craft hostile ones that pass every envelope check.

use anyhow::{Context, Result, bail, ensure};

const MAGIC: &[u8; 8] = b"WALVAULT";
const VERSION: u16 = 1;
/// Magic, version, kind, codec, name length, original length, blake3, payload length.
const FIXED_LEN: usize = 64;
const CRC_LEN: usize = 4;
const CODEC_ZSTD: u8 = 1;

/// Object kind of a file PostgreSQL archived (a segment, a partial segment, a timeline or backup
/// history file).
pub const KIND_WAL_FILE: u8 = 1;
/// Object kind of a base backup manifest.
pub const KIND_MANIFEST: u8 = 3;
/// Object kind of a WAL segment summary (the time index).
pub const KIND_SUMMARY: u8 = 4;

/// The decoded contents of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub kind: u8,
    pub name: String,
    /// The original bytes (decompressed, length and hash verified).
    pub content: Vec<u8>,
}

impl Sealed {
    /// Decode and verify `bytes` (CRC, lengths, blake3).
    pub fn open(bytes: &[u8]) -> Result<Sealed> {
        ensure!(
            bytes.len() >= FIXED_LEN + CRC_LEN,
            "object too short: {} bytes",
            bytes.len()
        );
        ensure!(&bytes[..8] == MAGIC, "bad magic");
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        ensure!(u16_at(8) == VERSION, "object version {}", u16_at(8));
        let (kind, codec) = (bytes[10], bytes[11]);
        ensure!(
            codec == CODEC_ZSTD,
            "codec {codec}: only zstd objects are handled here"
        );
        let name_len = u32_at(12) as usize;
        let original_len = u64_at(16);
        let hash: [u8; 32] = bytes[24..56].try_into().expect("32 bytes");
        let payload_len = u64_at(56) as usize;
        let header_len = FIXED_LEN + name_len;
        ensure!(
            bytes.len() == header_len + CRC_LEN + payload_len,
            "object is {} bytes, header promises {}",
            bytes.len(),
            header_len + CRC_LEN + payload_len
        );
        ensure!(
            u32_at(header_len) == crc32fast::hash(&bytes[..header_len]),
            "header CRC mismatch"
        );
        let name = String::from_utf8(bytes[FIXED_LEN..header_len].to_vec()).context("object name")?;
        let content = zstd::decode_all(&bytes[header_len + CRC_LEN..]).context("zstd payload")?;
        ensure!(content.len() as u64 == original_len, "content length mismatch");
        if blake3::hash(&content).as_bytes() != &hash {
            bail!("content hash mismatch");
        }
        Ok(Sealed { kind, name, content })
    }

    /// Encode as a valid zstd object: correct lengths, hash and CRC.
    pub fn seal(&self) -> Result<Vec<u8>> {
        let payload = zstd::encode_all(self.content.as_slice(), 3).context("zstd")?;
        let mut out = Vec::with_capacity(FIXED_LEN + self.name.len() + CRC_LEN + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(self.kind);
        out.push(CODEC_ZSTD);
        out.extend_from_slice(&u32::try_from(self.name.len())?.to_le_bytes());
        out.extend_from_slice(&(self.content.len() as u64).to_le_bytes());
        out.extend_from_slice(blake3::hash(&self.content).as_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(self.name.as_bytes());
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_open_round_trips_and_detects_damage() {
        let obj = Sealed {
            kind: KIND_MANIFEST,
            name: "20261121T105847Z".into(),
            content: b"{\"entries\": []}".to_vec(),
        };
        let bytes = obj.seal().unwrap();
        assert_eq!(&bytes[..8], b"WALVAULT");
        assert_eq!(Sealed::open(&bytes).unwrap(), obj);
        let mut header = bytes.clone();
        header[70] ^= 1; // inside the name: the CRC must catch it
        assert!(Sealed::open(&header).is_err());
        assert!(Sealed::open(&bytes[..bytes.len() - 1]).is_err());
    }
}
