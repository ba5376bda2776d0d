//! The envelope every archived WAL file is stored in (format "WALVAULT" object v1, see
//! `docs/FORMAT.md`): a fixed header with the original length and blake3 hash, the file name, a
//! CRC over the header, then the (zstd-compressed) payload. Decoding verifies all of it, so a
//! truncated, corrupted or misplaced object is reported as such and never handed to PostgreSQL.

use bytes::Bytes;

pub const MAGIC: &[u8; 8] = b"WALVAULT";
pub const VERSION: u16 = 1;
/// Bytes before the name: magic, version, kind, codec, name length, original length, hash, payload length.
const FIXED_LEN: usize = 64;
const CRC_LEN: usize = 4;
const MAX_NAME_LEN: usize = 64;
/// Largest original we will ever allocate for: a 1 GiB segment (the largest PostgreSQL allows).
pub const MAX_ORIGINAL_LEN: u64 = 1 << 30;
/// The most one zstd payload byte can expand to: every block takes at least 4 bytes (an RLE
/// block: 3-byte header, 1 byte) and yields at most 128 KiB.
const MAX_ZSTD_RATIO: u64 = 32 * 1024;

/// What the object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A file PostgreSQL archived: segment, partial segment, `.history` or `.backup`.
    WalFile = 1,
    /// A chunk of a base backup file; the name is the blake3 of the content, in hex.
    Chunk = 2,
    /// A base backup manifest (JSON); the name is the backup id.
    Manifest = 3,
    /// A WAL segment summary for the time index (JSON); the name is the segment name.
    Summary = 4,
}

/// How the payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    None = 0,
    Zstd = 1,
}

/// Why stored bytes are not a valid object. Every variant means "corrupt or foreign", never "missing".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    #[error("truncated: {len} bytes is shorter than an object header")]
    TooShort { len: usize },
    #[error("not a walvault object (bad magic)")]
    BadMagic,
    #[error("object format version {0} is newer than this walvault understands (1); upgrade walvault")]
    UnsupportedVersion(u16),
    #[error("unknown object kind {0}")]
    UnknownKind(u8),
    #[error("holds a {found:?} object where a {expected:?} object belongs")]
    WrongKind { expected: ObjectKind, found: ObjectKind },
    #[error("unknown codec {0}")]
    UnknownCodec(u8),
    #[error("header checksum mismatch (corrupt header)")]
    HeaderChecksum,
    #[error("invalid name length {0} in header")]
    BadNameLength(u32),
    #[error("the name in the header is not ASCII")]
    BadName,
    #[error("original length {0} exceeds the 1 GiB limit")]
    TooLarge(u64),
    #[error("truncated or padded: header promises {expected} payload bytes, object has {found}")]
    PayloadLength { expected: u64, found: u64 },
    #[error("holds {found:?}, not {expected:?} (misplaced object)")]
    WrongName { expected: String, found: String },
    #[error("payload does not decompress: {0}")]
    Decompress(String),
    #[error("content is {found} bytes, header says {expected}")]
    ContentLength { expected: u64, found: u64 },
    #[error("content hash mismatch: header blake3 {expected}, content blake3 {found}")]
    ContentHash { expected: String, found: String },
}

/// The header of an object, readable without decompressing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectHeader {
    pub kind: ObjectKind,
    pub codec: Codec,
    pub name: String,
    pub original_len: u64,
    pub blake3: [u8; 32],
    pub payload_len: u64,
}

impl ObjectHeader {
    pub fn blake3_hex(&self) -> String {
        hex::encode(self.blake3)
    }
    fn encoded_len(&self) -> usize {
        FIXED_LEN + self.name.len() + CRC_LEN
    }
}

/// An object ready to be stored: the encoded bytes and their header.
#[derive(Debug, Clone)]
pub struct SealedObject {
    pub header: ObjectHeader,
    pub bytes: Bytes,
}

impl SealedObject {
    /// Compress `content` with zstd at `level` and wrap it. `name` must be a validated name.
    pub fn seal(kind: ObjectKind, name: &str, content: &[u8], level: i32) -> std::io::Result<SealedObject> {
        assert!(
            !name.is_empty() && name.len() <= MAX_NAME_LEN,
            "names are validated before sealing"
        );
        // Compress straight into the object after room for the header: no second copy of the
        // payload, which matters with several 16 MiB segments in flight.
        let header_len = FIXED_LEN + name.len() + CRC_LEN;
        let bound = zstd::zstd_safe::compress_bound(content.len());
        let mut out = vec![0u8; header_len + bound];
        let payload_len = zstd::bulk::compress_to_buffer(content, &mut out[header_len..], level)?;
        out.truncate(header_len + payload_len);
        let header = ObjectHeader {
            kind,
            codec: Codec::Zstd,
            name: name.to_string(),
            original_len: content.len() as u64,
            blake3: *blake3::hash(content).as_bytes(),
            payload_len: payload_len as u64,
        };
        let mut head = Vec::with_capacity(header_len);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.push(header.kind as u8);
        head.push(header.codec as u8);
        head.extend_from_slice(&(name.len() as u32).to_le_bytes());
        head.extend_from_slice(&header.original_len.to_le_bytes());
        head.extend_from_slice(&header.blake3);
        head.extend_from_slice(&header.payload_len.to_le_bytes());
        head.extend_from_slice(name.as_bytes());
        let crc = crc32fast::hash(&head);
        head.extend_from_slice(&crc.to_le_bytes());
        out[..header_len].copy_from_slice(&head);
        Ok(SealedObject {
            header,
            bytes: Bytes::from(out),
        })
    }
}

fn take<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut v = [0u8; N];
    v.copy_from_slice(&b[at..at + N]);
    v
}

/// Parse and check the header (magic, version, CRC, lengths) of an encoded object.
pub fn read_header(bytes: &[u8]) -> Result<ObjectHeader, ObjectError> {
    if bytes.len() < FIXED_LEN + CRC_LEN {
        return Err(ObjectError::TooShort { len: bytes.len() });
    }
    if &bytes[0..8] != MAGIC {
        return Err(ObjectError::BadMagic);
    }
    let version = u16::from_le_bytes(take(bytes, 8));
    if version != VERSION {
        return Err(ObjectError::UnsupportedVersion(version));
    }
    let name_len = u32::from_le_bytes(take(bytes, 12));
    if name_len == 0 || name_len as usize > MAX_NAME_LEN {
        return Err(ObjectError::BadNameLength(name_len));
    }
    let header_end = FIXED_LEN + name_len as usize;
    if bytes.len() < header_end + CRC_LEN {
        return Err(ObjectError::TooShort { len: bytes.len() });
    }
    let stored_crc = u32::from_le_bytes(take(bytes, header_end));
    if crc32fast::hash(&bytes[..header_end]) != stored_crc {
        return Err(ObjectError::HeaderChecksum);
    }
    // The CRC matched, so the remaining fields are as written; still check them against our limits.
    let kind = match bytes[10] {
        1 => ObjectKind::WalFile,
        2 => ObjectKind::Chunk,
        3 => ObjectKind::Manifest,
        4 => ObjectKind::Summary,
        k => return Err(ObjectError::UnknownKind(k)),
    };
    let codec = match bytes[11] {
        0 => Codec::None,
        1 => Codec::Zstd,
        c => return Err(ObjectError::UnknownCodec(c)),
    };
    let original_len = u64::from_le_bytes(take(bytes, 16));
    if original_len > MAX_ORIGINAL_LEN {
        return Err(ObjectError::TooLarge(original_len));
    }
    // ASCII, as written: a lossy conversion would make the name longer than its bytes, and
    // the payload would be looked for at the wrong offset.
    let name = std::str::from_utf8(&bytes[FIXED_LEN..header_end])
        .ok()
        .filter(|n| n.is_ascii())
        .ok_or(ObjectError::BadName)?
        .to_string();
    Ok(ObjectHeader {
        kind,
        codec,
        name,
        original_len,
        blake3: take(bytes, 24),
        payload_len: u64::from_le_bytes(take(bytes, 56)),
    })
}

/// Decode an object of `kind` stored for `expected_name`, verifying header, length and blake3 of
/// the content.
pub fn open(
    bytes: &[u8],
    kind: ObjectKind,
    expected_name: &str,
) -> Result<(ObjectHeader, Vec<u8>), ObjectError> {
    let header = read_header(bytes)?;
    if header.kind != kind {
        return Err(ObjectError::WrongKind {
            expected: kind,
            found: header.kind,
        });
    }
    let payload = &bytes[header.encoded_len()..];
    if payload.len() as u64 != header.payload_len {
        return Err(ObjectError::PayloadLength {
            expected: header.payload_len,
            found: payload.len() as u64,
        });
    }
    if header.name != expected_name {
        return Err(ObjectError::WrongName {
            expected: expected_name.to_string(),
            found: header.name,
        });
    }
    let content = match header.codec {
        Codec::None => payload.to_vec(),
        // The capacity bound makes a decompression bomb fail instead of allocating without limit;
        // a payload too short to expand to the header's length is refused before that capacity
        // is allocated.
        Codec::Zstd if header.original_len > (payload.len() as u64).saturating_mul(MAX_ZSTD_RATIO) => {
            return Err(ObjectError::Decompress(format!(
                "{} payload bytes cannot expand to {} bytes",
                payload.len(),
                header.original_len
            )));
        }
        Codec::Zstd => zstd::bulk::decompress(payload, header.original_len as usize)
            .map_err(|e| ObjectError::Decompress(e.to_string()))?,
    };
    if content.len() as u64 != header.original_len {
        return Err(ObjectError::ContentLength {
            expected: header.original_len,
            found: content.len() as u64,
        });
    }
    let found = blake3::hash(&content);
    if found.as_bytes() != &header.blake3 {
        return Err(ObjectError::ContentHash {
            expected: header.blake3_hex(),
            found: found.to_hex().to_string(),
        });
    }
    Ok((header, content))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NAME: &str = "000000010000000000000001";

    fn sample() -> Vec<u8> {
        (0..100_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect()
    }

    #[test]
    fn round_trips_and_compresses() {
        let content = sample();
        let sealed = SealedObject::seal(ObjectKind::WalFile, NAME, &content, 3).unwrap();
        assert!(sealed.bytes.len() < content.len() / 4);
        let (header, back) = open(&sealed.bytes, ObjectKind::WalFile, NAME).unwrap();
        assert_eq!(back, content);
        assert_eq!(header.blake3_hex(), blake3::hash(&content).to_hex().to_string());
    }

    /// Frozen fixture: format v1 must stay readable by every later version.
    #[test]
    fn frozen_v1_fixture_still_decodes() {
        let fixture = include_bytes!("../../tests/fixtures/object-v1-history.wvo");
        let (header, content) = open(fixture, ObjectKind::WalFile, "00000002.history").unwrap();
        assert_eq!(header.codec, Codec::Zstd);
        assert_eq!(content, b"1\t0/3000060\tno recovery target specified\n");
    }

    #[test]
    fn every_truncation_and_bit_flip_is_detected() {
        let content = sample();
        let sealed = SealedObject::seal(ObjectKind::WalFile, NAME, &content, 3).unwrap();
        for cut in [0, 10, 63, 70, sealed.bytes.len() / 2, sealed.bytes.len() - 1] {
            assert!(
                open(&sealed.bytes[..cut], ObjectKind::WalFile, NAME).is_err(),
                "truncated at {cut}"
            );
        }
        for at in (0..sealed.bytes.len()).step_by(97) {
            let mut bad = sealed.bytes.to_vec();
            bad[at] ^= 0x10;
            assert!(
                open(&bad, ObjectKind::WalFile, NAME).is_err(),
                "flip at {at} not detected"
            );
        }
        let mut longer = sealed.bytes.to_vec();
        longer.push(0);
        assert!(matches!(
            open(&longer, ObjectKind::WalFile, NAME),
            Err(ObjectError::PayloadLength { .. })
        ));
        assert!(matches!(
            open(&sealed.bytes, ObjectKind::WalFile, "000000010000000000000002"),
            Err(ObjectError::WrongName { .. })
        ));
    }

    /// An object with a valid header CRC around whatever name bytes, lengths and payload.
    fn forge(name: &[u8], original_len: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&[ObjectKind::Chunk as u8, Codec::Zstd as u8]);
        b.extend_from_slice(&(name.len() as u32).to_le_bytes());
        b.extend_from_slice(&original_len.to_le_bytes());
        b.extend_from_slice(&[0; 32]);
        b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        b.extend_from_slice(name);
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    /// Found by fuzzing (`sealed_object`): a name of 0xFF bytes under a valid header CRC became
    /// U+FFFD characters, three bytes each, and `open` sliced the payload past the object's end.
    #[test]
    fn a_non_ascii_name_is_refused_not_a_panic() {
        let bad = forge(&[0xFF; 8], 1, b"x");
        assert_eq!(read_header(&bad), Err(ObjectError::BadName));
        assert_eq!(
            open(&bad, ObjectKind::Chunk, "abcdefgh"),
            Err(ObjectError::BadName)
        );
        let bad = forge("abcdeé".as_bytes(), 1, b"x");
        assert_eq!(read_header(&bad), Err(ObjectError::BadName));
    }

    /// Found by fuzzing (`sealed_object`): a 2-byte payload under a header claiming 528 MiB
    /// made `open` allocate 528 MiB before zstd looked at the payload.
    #[test]
    fn a_short_payload_claiming_a_huge_original_is_refused_before_allocating() {
        let bad = forge(b"abcdef", 0x2100_0000, b"QQ");
        match open(&bad, ObjectKind::Chunk, "abcdef") {
            Err(ObjectError::Decompress(m)) => assert!(m.contains("cannot expand"), "{m}"),
            other => panic!("{other:?}"),
        }
        // The bound holds for what compresses best: a zeroed 16 MiB segment, at any level.
        let zeros = vec![0u8; 16 << 20];
        for level in [1, 19] {
            let sealed = SealedObject::seal(ObjectKind::WalFile, NAME, &zeros, level).unwrap();
            assert_eq!(open(&sealed.bytes, ObjectKind::WalFile, NAME).unwrap().1, zeros);
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = open(&bytes, ObjectKind::WalFile, NAME);
        }

        #[test]
        fn arbitrary_payload_behind_a_valid_header_never_panics(
            content in proptest::collection::vec(any::<u8>(), 0..2048),
            noise in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let sealed = SealedObject::seal(ObjectKind::WalFile, NAME, &content, 1).unwrap();
            let header_len = sealed.header.encoded_len();
            let mut forged = sealed.bytes[..header_len].to_vec();
            forged.extend_from_slice(&noise);
            let _ = open(&forged, ObjectKind::WalFile, NAME);
            prop_assert_eq!(open(&sealed.bytes, ObjectKind::WalFile, NAME).unwrap().1, content);
        }
    }
}
