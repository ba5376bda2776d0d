//! The envelope every object walvault stores is sealed in (format "WALVAULT" object, see
//! `docs/FORMAT.md`): a fixed header with the original length and a hash of the content, the
//! object's name, a CRC over the header, then the zstd-compressed payload. Version 1 is plain;
//! version 2, in encrypted repositories, adds a cipher and a nonce, and its payload is sealed with
//! XChaCha20-Poly1305 with the header and the repository id as associated data. Decoding verifies
//! all of it, so a truncated, corrupted, misplaced, swapped or foreign object is reported as such
//! and never handed to PostgreSQL. A [`Sealer`] (one per opened repository) seals and opens.

use std::sync::Arc;

use bytes::Bytes;
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Tag, XNonce};

use super::keys::RepoKeys;

mod contexts;
mod streamed;

use contexts::{compress_after, decompress_into};
pub use streamed::ContentReader;

pub const MAGIC: &[u8; 8] = b"WALVAULT";
/// The plain format.
pub const VERSION: u16 = 1;
/// The encrypted format.
pub const VERSION_ENCRYPTED: u16 = 2;
/// Bytes before the name: magic, version, kind, codec, name length, original length, hash, payload length.
const FIXED_LEN: usize = 64;
/// Version 2 adds, before the name: cipher, 7 reserved zero bytes, a 24-byte nonce.
const FIXED_LEN_V2: usize = 96;
/// The one cipher of version 2: XChaCha20-Poly1305.
const CIPHER_XCHACHA20POLY1305: u8 = 1;
const TAG_LEN: usize = 16;
/// Associated data prefix of a sealed object's AEAD (followed by the repository id and the header).
const OBJECT_AAD: &[u8] = b"walvault object v2\0";
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
    /// A small JSON record (cluster.json, retention.json, a pin, a lock) in an encrypted
    /// repository; the name is its key. Plain repositories store these as bare JSON.
    Record = 5,
    /// A piece of a WAL segment the streaming daemon is still receiving (`layout::stream_piece_key`);
    /// the name is `<segment>/<from>-<to>`, the piece's byte range in the segment, in hex. Never
    /// opened as a WAL file: a stream is never mistaken for a complete segment.
    StreamPiece = 6,
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
    #[error("object format version {0} is newer than this walvault understands (1 and 2); upgrade walvault")]
    UnsupportedVersion(u16),
    #[error(
        "an encrypted object in a repository that is not encrypted (the repository descriptor was replaced, or the object comes from another repository)"
    )]
    UnexpectedlyEncrypted,
    #[error("a plain object in an encrypted repository: refused (it may have been planted)")]
    NotEncrypted,
    #[error("unknown cipher {0}")]
    UnknownCipher(u8),
    #[error(
        "does not authenticate: tampered with, truncated, moved from another name or repository, or sealed with another key"
    )]
    Authentication,
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
    /// The blake3 of the content; in an encrypted object its keyed blake3 ([`Sealer::content_hash`]).
    pub blake3: [u8; 32],
    /// Payload bytes (in version 2, the ciphertext and its 16-byte tag).
    pub payload_len: u64,
    /// Version 2 only: the nonce the payload is sealed with.
    pub nonce: Option<[u8; 24]>,
}

impl ObjectHeader {
    pub fn blake3_hex(&self) -> String {
        hex::encode(self.blake3)
    }
    fn fixed_len(&self) -> usize {
        if self.nonce.is_some() {
            FIXED_LEN_V2
        } else {
            FIXED_LEN
        }
    }
    fn encoded_len(&self) -> usize {
        self.fixed_len() + self.name.len() + CRC_LEN
    }
}

/// An object ready to be stored: the encoded bytes and their header.
#[derive(Debug, Clone)]
pub struct SealedObject {
    pub header: ObjectHeader,
    pub bytes: Bytes,
}

impl SealedObject {
    /// Compress `content` with zstd at `level` and wrap it in a plain (version 1) object. `name`
    /// must be a validated name.
    pub fn seal(kind: ObjectKind, name: &str, content: &[u8], level: i32) -> std::io::Result<SealedObject> {
        seal_with(
            None,
            kind,
            name,
            content,
            *blake3::hash(content).as_bytes(),
            level,
        )
    }
}

/// Seal `content`, whose hash (as [`Sealer::content_hash`] computes it for `keys`) is `hash`.
fn seal_with(
    keys: Option<&RepoKeys>,
    kind: ObjectKind,
    name: &str,
    content: &[u8],
    hash: [u8; 32],
    level: i32,
) -> std::io::Result<SealedObject> {
    assert!(
        !name.is_empty() && name.len() <= MAX_NAME_LEN,
        "names are validated before sealing"
    );
    let fixed = if keys.is_some() { FIXED_LEN_V2 } else { FIXED_LEN };
    let tag_len = if keys.is_some() { TAG_LEN } else { 0 };
    // Compress into the object after room for the header, and encrypt in place there (a large
    // object straight there: no second copy of 16 MiB segments in flight).
    let header_len = fixed + name.len() + CRC_LEN;
    let (mut out, compressed_len) = compress_after(content, level, header_len, tag_len)?;
    debug_assert_eq!(out.len(), header_len + compressed_len + tag_len);
    let header = ObjectHeader {
        kind,
        codec: Codec::Zstd,
        name: name.to_string(),
        original_len: content.len() as u64,
        blake3: hash,
        payload_len: (compressed_len + tag_len) as u64,
        nonce: keys.map(|_| rand::random()),
    };
    let head = encode_header(&header);
    debug_assert_eq!(head.len(), header_len);
    if let Some(k) = keys {
        let aad = aad(k, &head);
        let nonce = header.nonce.expect("set for sealed objects");
        let tag = k
            .cipher
            .encrypt_in_place_detached(
                XNonce::from_slice(&nonce),
                &aad,
                &mut out[header_len..header_len + compressed_len],
            )
            .map_err(|_| std::io::Error::other("payload too large to seal"))?;
        out[header_len + compressed_len..header_len + compressed_len + TAG_LEN].copy_from_slice(&tag);
    }
    out.truncate(header_len + compressed_len + tag_len);
    out[..header_len].copy_from_slice(&head);
    Ok(SealedObject {
        header,
        bytes: Bytes::from(out),
    })
}

/// Where a [`StreamSealer`] writes the sealed object.
#[derive(Debug)]
pub enum StreamSink {
    /// In memory, in pieces of [`STREAM_PART`] bytes (never one buffer of the whole object).
    Memory,
    /// A file the caller created (a local repository's staging file): the payload is written
    /// after room for the header, which goes in last.
    File(std::fs::File),
}

/// The sealed object a [`StreamSealer`] produced.
#[derive(Debug)]
pub enum SealedBody {
    /// The object's bytes in order, header first.
    Parts(Vec<Bytes>),
    /// The file given as [`StreamSink::File`], holding the whole object (not synced).
    File(std::fs::File),
}

impl SealedBody {
    /// The object as one buffer (tests and small objects).
    pub fn concat(self) -> std::io::Result<Vec<u8>> {
        match self {
            SealedBody::Parts(parts) => Ok(parts.concat()),
            SealedBody::File(mut f) => {
                use std::io::{Read, Seek};
                let mut v = Vec::new();
                f.seek(std::io::SeekFrom::Start(0))?;
                f.read_to_end(&mut v)?;
                Ok(v)
            }
        }
    }
}

/// What [`StreamSealer::finish`] returns.
#[derive(Debug)]
pub struct StreamSealed {
    pub header: ObjectHeader,
    /// The plain blake3 of the content (the spool's markers name content by it), whatever the
    /// repository; equal to `header.blake3` in a plain one.
    pub plain_hash: blake3::Hash,
    /// Bytes the object takes.
    pub stored_len: u64,
    pub body: SealedBody,
}

/// Size of the in-memory pieces of a streamed object.
pub const STREAM_PART: usize = 256 << 10;

/// Seals content fed in pieces, hashing and compressing as it goes: the content is never held
/// whole (a 16 MiB segment costs the compressor's window, not 16 MiB). The header, which names
/// the hash and the payload length, is written last, in the room left for it. In an encrypted
/// repository the compressed payload is kept in one buffer and encrypted when complete (the
/// AEAD is one-shot), so memory is the compressed size there.
pub struct StreamSealer {
    keys: Option<Arc<RepoKeys>>,
    kind: ObjectKind,
    name: String,
    /// `None` when the length is not known in advance ([`Sealer::seal_writer`]).
    original_len: Option<u64>,
    fed: u64,
    header_len: usize,
    hasher: blake3::Hasher,
    plain: Option<blake3::Hasher>,
    encoder: zstd::stream::write::Encoder<'static, SinkWriter>,
}

impl std::fmt::Debug for StreamSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSealer")
            .field("name", &self.name)
            .field("fed", &self.fed)
            .finish_non_exhaustive()
    }
}

/// The compressor's output: the payload after the header's room.
enum SinkWriter {
    Parts { parts: Vec<Bytes>, current: Vec<u8> },
    Contiguous(Vec<u8>),
    File { file: std::fs::File, written: u64 },
}

impl std::io::Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            SinkWriter::Parts { parts, current } => {
                let room = STREAM_PART - current.len();
                let n = buf.len().min(room);
                current.extend_from_slice(&buf[..n]);
                if current.len() == STREAM_PART {
                    let full = std::mem::replace(current, Vec::with_capacity(STREAM_PART));
                    parts.push(Bytes::from(full));
                }
                Ok(n)
            }
            SinkWriter::Contiguous(v) => {
                v.extend_from_slice(buf);
                Ok(buf.len())
            }
            SinkWriter::File { file, written } => {
                let n = file.write(buf)?;
                *written += n as u64;
                Ok(n)
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl StreamSealer {
    /// Feed the next piece of the content.
    pub fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.fed += data.len() as u64;
        if let Some(len) = self.original_len
            && self.fed > len
        {
            return Err(changed_size(len, self.fed));
        }
        self.hasher.update(data);
        if let Some(p) = &mut self.plain {
            p.update(data);
        }
        self.encoder.write_all(data)
    }

    /// Complete the object once all `original_len` bytes (when given) were fed.
    pub fn finish(self) -> std::io::Result<StreamSealed> {
        use std::io::{Seek, Write};
        if let Some(len) = self.original_len
            && self.fed != len
        {
            return Err(changed_size(len, self.fed));
        }
        let hash = *self.hasher.finalize().as_bytes();
        let plain_hash = match &self.plain {
            Some(p) => p.finalize(),
            None => blake3::Hash::from(hash),
        };
        let sink = self.encoder.finish()?;
        let tag_len = if self.keys.is_some() { TAG_LEN } else { 0 };
        let compressed_len = match &sink {
            SinkWriter::Parts { parts, current } => {
                parts.iter().map(|p| p.len() as u64).sum::<u64>() + current.len() as u64
            }
            SinkWriter::Contiguous(v) => (v.len() - self.header_len) as u64,
            SinkWriter::File { written, .. } => *written,
        };
        let header = ObjectHeader {
            kind: self.kind,
            codec: Codec::Zstd,
            name: self.name,
            original_len: self.fed,
            blake3: hash,
            payload_len: compressed_len + tag_len as u64,
            nonce: self.keys.as_ref().map(|_| rand::random()),
        };
        let head = encode_header(&header);
        debug_assert_eq!(head.len(), self.header_len);
        let stored_len = head.len() as u64 + header.payload_len;
        let body = match sink {
            SinkWriter::Parts { mut parts, current } => {
                if !current.is_empty() {
                    parts.push(Bytes::from(current));
                }
                parts.insert(0, Bytes::from(head));
                SealedBody::Parts(parts)
            }
            SinkWriter::Contiguous(mut out) => {
                let k = self.keys.as_ref().expect("contiguous only when encrypting");
                let aad = aad(k, &head);
                let nonce = header.nonce.expect("set for sealed objects");
                let tag = k
                    .cipher
                    .encrypt_in_place_detached(XNonce::from_slice(&nonce), &aad, &mut out[head.len()..])
                    .map_err(|_| std::io::Error::other("payload too large to seal"))?;
                out.extend_from_slice(&tag);
                out[..head.len()].copy_from_slice(&head);
                SealedBody::Parts(vec![Bytes::from(out)])
            }
            SinkWriter::File { mut file, .. } => {
                file.seek(std::io::SeekFrom::Start(0))?;
                file.write_all(&head)?;
                SealedBody::File(file)
            }
        };
        Ok(StreamSealed {
            header,
            plain_hash,
            stored_len,
            body,
        })
    }
}

fn changed_size(expected: u64, fed: u64) -> std::io::Error {
    std::io::Error::other(format!(
        "the file changed size while it was read ({expected} bytes when opened, {fed} read)"
    ))
}

/// The header's bytes, CRC included.
fn encode_header(h: &ObjectHeader) -> Vec<u8> {
    let mut head = Vec::with_capacity(h.encoded_len());
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(
        &(if h.nonce.is_some() {
            VERSION_ENCRYPTED
        } else {
            VERSION
        })
        .to_le_bytes(),
    );
    head.push(h.kind as u8);
    head.push(h.codec as u8);
    head.extend_from_slice(&(h.name.len() as u32).to_le_bytes());
    head.extend_from_slice(&h.original_len.to_le_bytes());
    head.extend_from_slice(&h.blake3);
    head.extend_from_slice(&h.payload_len.to_le_bytes());
    if let Some(nonce) = h.nonce {
        head.push(CIPHER_XCHACHA20POLY1305);
        head.extend_from_slice(&[0; 7]);
        head.extend_from_slice(&nonce);
    }
    head.extend_from_slice(h.name.as_bytes());
    let crc = crc32fast::hash(&head);
    head.extend_from_slice(&crc.to_le_bytes());
    head
}

/// A sealed object's associated data: every header byte but the CRC (kind, name, lengths, hash,
/// nonce), and the repository id, so an object moved to another name, kind or repository, or
/// with any header field changed, fails to authenticate.
fn aad(keys: &RepoKeys, head_with_crc: &[u8]) -> Vec<u8> {
    let head = &head_with_crc[..head_with_crc.len() - CRC_LEN];
    let mut aad = Vec::with_capacity(OBJECT_AAD.len() + 33 + head.len());
    aad.extend_from_slice(OBJECT_AAD);
    aad.extend_from_slice(keys.repo_id.as_str().as_bytes());
    aad.push(0);
    aad.extend_from_slice(head);
    aad
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
    let fixed = match version {
        VERSION => FIXED_LEN,
        VERSION_ENCRYPTED => FIXED_LEN_V2,
        v => return Err(ObjectError::UnsupportedVersion(v)),
    };
    if bytes.len() < fixed + CRC_LEN {
        return Err(ObjectError::TooShort { len: bytes.len() });
    }
    let name_len = u32::from_le_bytes(take(bytes, 12));
    if name_len == 0 || name_len as usize > MAX_NAME_LEN {
        return Err(ObjectError::BadNameLength(name_len));
    }
    let header_end = fixed + name_len as usize;
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
        5 => ObjectKind::Record,
        6 => ObjectKind::StreamPiece,
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
    let nonce = match version {
        VERSION => None,
        _ => match bytes[64] {
            CIPHER_XCHACHA20POLY1305 => Some(take(bytes, 72)),
            c => return Err(ObjectError::UnknownCipher(c)),
        },
    };
    let name = std::str::from_utf8(&bytes[fixed..header_end])
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
        nonce,
    })
}

/// Decode a plain object of `kind` stored for `expected_name`, verifying header, length and
/// blake3 of the content. (Repositories open objects with [`Sealer::open`].)
pub fn open(
    bytes: &[u8],
    kind: ObjectKind,
    expected_name: &str,
) -> Result<(ObjectHeader, Vec<u8>), ObjectError> {
    open_with(None, bytes, kind, expected_name, Vec::new())
}

/// `header`, if its version is the one a repository that is (or is not) `encrypted` holds.
fn of_this_repository(header: ObjectHeader, encrypted: bool) -> Result<ObjectHeader, ObjectError> {
    match (encrypted, header.nonce.is_some()) {
        (true, false) => Err(ObjectError::NotEncrypted),
        (false, true) => Err(ObjectError::UnexpectedlyEncrypted),
        _ => Ok(header),
    }
}

/// Open `bytes` (see [`Sealer::open`]), the content written into `out` (emptied first; its
/// allocation is reused when large enough, so a reader of many objects need not fault in fresh
/// pages for each).
fn open_with(
    keys: Option<&RepoKeys>,
    bytes: &[u8],
    kind: ObjectKind,
    expected_name: &str,
    out: Vec<u8>,
) -> Result<(ObjectHeader, Vec<u8>), ObjectError> {
    let (header, content) = open_unhashed(keys, bytes, kind, expected_name, out)?;
    check_hash(keys, &header, &content)?;
    Ok((header, content))
}

/// Whether `content` has the hash `header` records (keyed in an encrypted repository).
fn check_hash(keys: Option<&RepoKeys>, header: &ObjectHeader, content: &[u8]) -> Result<(), ObjectError> {
    let found = match keys {
        Some(k) => k.content_hash(content),
        None => *blake3::hash(content).as_bytes(),
    };
    if found != header.blake3 {
        return Err(ObjectError::ContentHash {
            expected: header.blake3_hex(),
            found: hex::encode(found),
        });
    }
    Ok(())
}

/// [`open_with`] but for the content's hash: header, authenticity (encrypted), name and length.
fn open_unhashed(
    keys: Option<&RepoKeys>,
    bytes: &[u8],
    kind: ObjectKind,
    expected_name: &str,
    out: Vec<u8>,
) -> Result<(ObjectHeader, Vec<u8>), ObjectError> {
    let (header, payload) = open_payload(keys, bytes, kind, expected_name)?;
    expand(header, &payload, out)
}

/// The header, checked (kind, payload length, name), and the payload, authenticated and
/// decrypted in an encrypted repository: what is left to open is the codec's.
fn open_payload<'b>(
    keys: Option<&RepoKeys>,
    bytes: &'b [u8],
    kind: ObjectKind,
    expected_name: &str,
) -> Result<(ObjectHeader, std::borrow::Cow<'b, [u8]>), ObjectError> {
    let header = of_this_repository(read_header(bytes)?, keys.is_some())?;
    if header.kind != kind {
        return Err(ObjectError::WrongKind {
            expected: kind,
            found: header.kind,
        });
    }
    let header_len = header.encoded_len();
    let payload = &bytes[header_len..];
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
    let payload = match (keys, header.nonce) {
        (Some(k), Some(nonce)) => {
            let Some(body_len) = payload.len().checked_sub(TAG_LEN) else {
                return Err(ObjectError::Authentication);
            };
            let mut body = payload[..body_len].to_vec();
            k.cipher
                .decrypt_in_place_detached(
                    XNonce::from_slice(&nonce),
                    &aad(k, &bytes[..header_len]),
                    &mut body,
                    Tag::from_slice(&payload[body_len..]),
                )
                .map_err(|_| ObjectError::Authentication)?;
            std::borrow::Cow::Owned(body)
        }
        _ => std::borrow::Cow::Borrowed(payload),
    };
    Ok((header, payload))
}

/// The codec's part of [`open_unhashed`]: `payload` expanded into `out`, to the header's length.
fn expand(
    header: ObjectHeader,
    payload: &[u8],
    mut out: Vec<u8>,
) -> Result<(ObjectHeader, Vec<u8>), ObjectError> {
    out.clear();
    let content = match header.codec {
        Codec::None => {
            out.extend_from_slice(payload);
            out
        }
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
        Codec::Zstd => {
            // Room for the header's length (or the reused allocation's, if larger): more output
            // is an error, not an allocation.
            out.reserve_exact(usize::try_from(header.original_len).unwrap_or(usize::MAX));
            decompress_into(payload, &mut out).map_err(|e| ObjectError::Decompress(e.to_string()))?;
            out
        }
    };
    if content.len() as u64 != header.original_len {
        return Err(ObjectError::ContentLength {
            expected: header.original_len,
            found: content.len() as u64,
        });
    }
    Ok((header, content))
}

/// How an opened repository seals and opens its objects: plain (version 1) objects, or, with the
/// repository's keys, encrypted (version 2) ones. Each repository accepts only its own kind: a
/// plain object in an encrypted repository is refused like a corrupt one.
#[derive(Debug, Clone, Default)]
pub struct Sealer {
    keys: Option<Arc<RepoKeys>>,
}

impl Sealer {
    /// For a repository that is not encrypted.
    pub fn plain() -> Sealer {
        Sealer { keys: None }
    }

    /// For an encrypted repository, with its unwrapped keys.
    pub fn encrypted(keys: Arc<RepoKeys>) -> Sealer {
        Sealer { keys: Some(keys) }
    }

    pub fn is_encrypted(&self) -> bool {
        self.keys.is_some()
    }

    pub(crate) fn keys(&self) -> Option<&Arc<RepoKeys>> {
        self.keys.as_ref()
    }

    /// The hash object headers carry and chunks are named by: blake3, or in an encrypted
    /// repository blake3 keyed with the repository's id key, so it reveals nothing of the content.
    pub fn content_hash(&self, content: &[u8]) -> [u8; 32] {
        match &self.keys {
            Some(k) => k.content_hash(content),
            None => *blake3::hash(content).as_bytes(),
        }
    }

    /// The keyed hasher of an encrypted repository's [`Sealer::content_hash`]; `None` in a plain
    /// one, whose content hash is plain blake3.
    pub fn content_hasher(&self) -> Option<blake3::Hasher> {
        self.keys.as_ref().map(|k| k.content_hasher())
    }

    /// Seal what `write` writes as object `name` of `kind`, whose length is not known in
    /// advance: a [`StreamSealer`] in memory, so neither the content nor room for its
    /// compression bound is held whole. A manifest of 61,000 files is some 18 MB of JSON, and a
    /// backup's peak memory was that document and as much again for its compression
    /// (heaptrack). The object is the same format as [`Sealer::seal`]'s: one zstd frame (its
    /// content size is not in the frame header).
    pub fn seal_writer(
        &self,
        kind: ObjectKind,
        name: &str,
        level: i32,
        write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> std::io::Result<SealedObject> {
        let sealed = self.seal_writer_into(kind, name, level, StreamSink::Memory, write)?;
        Ok(SealedObject {
            header: sealed.header,
            bytes: Bytes::from(sealed.body.concat()?),
        })
    }

    /// [`Sealer::seal_writer`] into `sink`, the object left there: in memory, in its pieces of
    /// [`STREAM_PART`] bytes ([`SealedBody::Parts`], header first, to be stored as they are by
    /// [`crate::repo::WritableStore::put_new_parts`]), or in a staging file of a local
    /// repository, which then holds the object instead of memory
    /// ([`crate::repo::WritableStore::stage`]; plain repositories only, as for
    /// [`Sealer::stream`]).
    pub fn seal_writer_into(
        &self,
        kind: ObjectKind,
        name: &str,
        level: i32,
        sink: StreamSink,
        write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> std::io::Result<StreamSealed> {
        use std::io::Write;
        /// Feeds a [`StreamSealer`] what it is written.
        struct Feed<'a>(&'a mut StreamSealer);
        impl Write for Feed<'_> {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.write(buf).map(|()| buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut stream = self.stream_of(kind, name, None, level, sink)?;
        // In pieces of STREAM_PART, whatever sizes `write` writes (a serializer writes tokens).
        let mut buffered = std::io::BufWriter::with_capacity(STREAM_PART, Feed(&mut stream));
        write(&mut buffered)?;
        buffered.flush()?;
        drop(buffered);
        stream.finish()
    }

    /// Compress and seal `content` as object `name` of `kind`.
    pub fn seal(
        &self,
        kind: ObjectKind,
        name: &str,
        content: &[u8],
        level: i32,
    ) -> std::io::Result<SealedObject> {
        self.seal_hashed(kind, name, content, self.content_hash(content), level)
    }

    /// [`Sealer::seal`] for a caller that has already computed `content_hash(content)` (push
    /// compares it with the stored copy's, a backup names the chunk by it): a 16 MiB segment is
    /// not hashed twice.
    pub fn seal_hashed(
        &self,
        kind: ObjectKind,
        name: &str,
        content: &[u8],
        content_hash: [u8; 32],
        level: i32,
    ) -> std::io::Result<SealedObject> {
        debug_assert_eq!(content_hash, self.content_hash(content));
        seal_with(self.keys.as_deref(), kind, name, content, content_hash, level)
    }

    /// A [`StreamSealer`] for object `name` of `kind` whose content is `original_len` bytes, fed
    /// in pieces. In an encrypted repository the sink must be [`StreamSink::Memory`].
    pub fn stream(
        &self,
        kind: ObjectKind,
        name: &str,
        original_len: u64,
        level: i32,
        sink: StreamSink,
    ) -> std::io::Result<StreamSealer> {
        self.stream_of(kind, name, Some(original_len), level, sink)
    }

    /// [`Sealer::stream`], of content whose length may not be known in advance (`None`: any
    /// length is accepted, and the frame does not record it).
    fn stream_of(
        &self,
        kind: ObjectKind,
        name: &str,
        original_len: Option<u64>,
        level: i32,
        sink: StreamSink,
    ) -> std::io::Result<StreamSealer> {
        use std::io::{Seek, Write};
        assert!(
            !name.is_empty() && name.len() <= MAX_NAME_LEN,
            "names are validated before sealing"
        );
        let fixed = if self.keys.is_some() {
            FIXED_LEN_V2
        } else {
            FIXED_LEN
        };
        let header_len = fixed + name.len() + CRC_LEN;
        let writer = match (sink, &self.keys) {
            (StreamSink::Memory, None) => SinkWriter::Parts {
                parts: Vec::new(),
                current: Vec::with_capacity(STREAM_PART),
            },
            (StreamSink::Memory, Some(_)) => SinkWriter::Contiguous(vec![0; header_len]),
            (StreamSink::File(mut file), None) => {
                file.write_all(&vec![0; header_len])?;
                file.seek(std::io::SeekFrom::Start(header_len as u64))?;
                SinkWriter::File { file, written: 0 }
            }
            (StreamSink::File(_), Some(_)) => {
                return Err(std::io::Error::other("encrypted objects are sealed in memory"));
            }
        };
        let mut encoder = zstd::stream::write::Encoder::new(writer, level)?;
        if let Some(len) = original_len {
            encoder.set_pledged_src_size(Some(len))?;
            encoder.include_contentsize(true)?;
        }
        encoder.include_checksum(false)?;
        let (hasher, plain) = match &self.keys {
            Some(k) => (k.content_hasher(), Some(blake3::Hasher::new())),
            None => (blake3::Hasher::new(), None),
        };
        Ok(StreamSealer {
            keys: self.keys.clone(),
            kind,
            name: name.to_string(),
            original_len,
            fed: 0,
            header_len,
            hasher,
            plain,
            encoder,
        })
    }

    /// Open object `expected_name` of `kind`: header, authenticity (encrypted), length and hash.
    pub fn open(
        &self,
        bytes: &[u8],
        kind: ObjectKind,
        expected_name: &str,
    ) -> Result<(ObjectHeader, Vec<u8>), ObjectError> {
        open_with(self.keys.as_deref(), bytes, kind, expected_name, Vec::new())
    }

    /// [`Sealer::open`], the content read as it is decompressed ([`ContentReader`]): header,
    /// name and authenticity are checked here, the content's length and hash at its end.
    pub fn open_reader<'b>(
        &self,
        bytes: &'b [u8],
        kind: ObjectKind,
        expected_name: &str,
    ) -> Result<ContentReader<'b>, ObjectError> {
        let (header, payload) = open_payload(self.keys.as_deref(), bytes, kind, expected_name)?;
        ContentReader::new(header, payload, self.keys.as_deref())
    }

    /// [`Sealer::open`], the content written into `out` (emptied first, its allocation reused).
    pub fn open_into(
        &self,
        bytes: &[u8],
        kind: ObjectKind,
        expected_name: &str,
        out: Vec<u8>,
    ) -> Result<(ObjectHeader, Vec<u8>), ObjectError> {
        open_with(self.keys.as_deref(), bytes, kind, expected_name, out)
    }

    /// [`Sealer::open_into`] without hashing the content: for content that is checked by what
    /// it becomes (a chunk's difference, checked with its base against the chunk's own id: see
    /// [`crate::basebackup::chunk::open_difference`]). Everything else is checked: header, name,
    /// length, and in an encrypted repository authenticity. [`Sealer::check_hash`] does the rest.
    pub fn open_into_unhashed(
        &self,
        bytes: &[u8],
        kind: ObjectKind,
        expected_name: &str,
        out: Vec<u8>,
    ) -> Result<(ObjectHeader, Vec<u8>), ObjectError> {
        open_unhashed(self.keys.as_deref(), bytes, kind, expected_name, out)
    }

    /// Whether `content` has the hash `header` records: the check [`Sealer::open_into_unhashed`]
    /// leaves out.
    pub fn check_hash(&self, header: &ObjectHeader, content: &[u8]) -> Result<(), ObjectError> {
        check_hash(self.keys.as_deref(), header, content)
    }

    /// The header, checked to be of this repository's kind (plain or encrypted). Not authenticated:
    /// only [`Sealer::open`] proves an encrypted header genuine.
    pub fn read_header(&self, bytes: &[u8]) -> Result<ObjectHeader, ObjectError> {
        of_this_repository(read_header(bytes)?, self.is_encrypted())
    }

    /// A small JSON record stored at `key` (cluster.json, retention.json, pins, locks): bare in a
    /// plain repository, sealed as a [`ObjectKind::Record`] in an encrypted one.
    pub fn seal_record(&self, key: &str, json: Vec<u8>) -> Bytes {
        if self.keys.is_none() {
            return Bytes::from(json);
        }
        self.seal(ObjectKind::Record, key, &json, 3)
            .expect("compressing a small record cannot fail")
            .bytes
    }

    /// What [`Sealer::seal_record`] stored at `key`.
    pub fn open_record(&self, key: &str, bytes: &[u8]) -> Result<Vec<u8>, ObjectError> {
        if self.keys.is_none() {
            return Ok(bytes.to_vec());
        }
        Ok(self.open(bytes, ObjectKind::Record, key)?.1)
    }
}

#[cfg(test)]
mod tests {
    use super::contexts::SCRATCH_MAX;
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

    /// Content larger than [`SCRATCH_MAX`], compressible: sealed straight into the object.
    fn larger_than_scratch() -> Vec<u8> {
        (0..(SCRATCH_MAX + 123_457) as u32)
            .map(|i| (i % 251) as u8 ^ (i >> 13) as u8)
            .collect()
    }

    /// Small and large objects (through a kept buffer, or straight into the object), at two
    /// levels with the same kept contexts, plain and encrypted: each opens to its content.
    #[test]
    fn objects_of_every_size_and_level_round_trip() {
        let big = larger_than_scratch();
        for sealer in [Sealer::plain(), Sealer::encrypted(keys_for(REPO_A))] {
            for (content, level) in [
                (&sample()[..], 3),
                (&big[..], 1),
                (&sample()[..10], 5),
                (&big[..], 3),
            ] {
                let sealed = sealer.seal(ObjectKind::WalFile, NAME, content, level).unwrap();
                let (header, back) = sealer.open(&sealed.bytes, ObjectKind::WalFile, NAME).unwrap();
                assert_eq!(back, content);
                assert_eq!(header.original_len, content.len() as u64);
            }
        }
    }

    #[test]
    fn an_object_sealed_as_it_is_written_opens_as_one_sealed_whole() {
        let big = larger_than_scratch();
        for sealer in [Sealer::plain(), Sealer::encrypted(keys_for(REPO_A))] {
            for content in [&sample()[..], &big[..], &sample()[..1]] {
                // Written in uneven pieces, as a serializer writes.
                let streamed = sealer
                    .seal_writer(ObjectKind::Manifest, NAME, 3, |w| {
                        content.chunks(7_777).try_for_each(|piece| w.write_all(piece))
                    })
                    .unwrap();
                let whole = sealer.seal(ObjectKind::Manifest, NAME, content, 3).unwrap();
                assert_eq!(streamed.header.blake3, whole.header.blake3);
                assert_eq!(streamed.header.original_len, content.len() as u64);
                let (header, back) = sealer.open(&streamed.bytes, ObjectKind::Manifest, NAME).unwrap();
                assert_eq!(back, content);
                assert_eq!(
                    header.payload_len,
                    streamed.bytes.len() as u64 - header.encoded_len() as u64
                );
                // Damage is found as in any sealed object.
                let mut bad = streamed.bytes.to_vec();
                let last = bad.len() - 1;
                bad[last] ^= 1;
                assert!(sealer.open(&bad, ObjectKind::Manifest, NAME).is_err());
            }
        }
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

    pub(super) fn keys_for(repo: &str) -> Arc<RepoKeys> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "ab".repeat(32)).unwrap();
        let id = super::super::RepoId::try_from(repo.to_string()).unwrap();
        RepoKeys::generate(&super::super::keys::KeySource::File(path), &id, None)
            .unwrap()
            .0
    }

    /// Content streamed in uneven pieces seals to an object that opens to the same content,
    /// with the same header hash as a one-shot seal, into memory parts, a file, and (encrypted)
    /// memory; a wrong length is refused rather than sealed.
    #[test]
    fn streamed_objects_open_like_one_shot_ones() {
        let content: Vec<u8> = (0..3_000_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .take(5 << 20)
            .collect();
        let feed = |mut st: StreamSealer| {
            for piece in content.chunks(77_777) {
                st.write(piece).unwrap();
            }
            st.finish().unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let encrypted = Sealer::encrypted(keys_for(REPO_A));
        for (sealer, sink) in [
            (Sealer::plain(), StreamSink::Memory),
            (
                Sealer::plain(),
                StreamSink::File(
                    std::fs::File::options()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(dir.path().join("o"))
                        .unwrap(),
                ),
            ),
            (encrypted.clone(), StreamSink::Memory),
        ] {
            let st = sealer
                .stream(ObjectKind::WalFile, NAME, content.len() as u64, 3, sink)
                .unwrap();
            let sealed = feed(st);
            assert_eq!(sealed.header.blake3, sealer.content_hash(&content));
            assert_eq!(sealed.plain_hash, blake3::hash(&content));
            if let SealedBody::Parts(parts) = &sealed.body {
                assert!(parts.iter().all(|p| p.len() <= STREAM_PART.max(parts[0].len())));
            }
            let bytes = sealed.body.concat().unwrap();
            assert_eq!(bytes.len() as u64, sealed.stored_len);
            assert!(bytes.len() < content.len() / 4, "compressed: {}", bytes.len());
            let (header, back) = sealer.open(&bytes, ObjectKind::WalFile, NAME).unwrap();
            assert_eq!(back, content);
            assert_eq!(header.original_len, content.len() as u64);
        }
        // Fewer or more bytes than announced: an error, not an object.
        let mut short = Sealer::plain()
            .stream(ObjectKind::WalFile, NAME, 10, 3, StreamSink::Memory)
            .unwrap();
        short.write(b"12345").unwrap();
        assert!(short.finish().is_err());
        let mut long = Sealer::plain()
            .stream(ObjectKind::WalFile, NAME, 4, 3, StreamSink::Memory)
            .unwrap();
        assert!(long.write(b"12345").is_err());
        // Encrypted objects are never streamed to a file (the AEAD is one-shot, in memory).
        let f = std::fs::File::create(dir.path().join("e")).unwrap();
        assert!(
            encrypted
                .stream(ObjectKind::WalFile, NAME, 4, 3, StreamSink::File(f))
                .is_err()
        );
    }

    pub(super) const REPO_A: &str = "0123456789abcdef0123456789abcdef";
    const REPO_B: &str = "fedcba9876543210fedcba9876543210";

    #[test]
    fn encrypted_objects_round_trip_and_hide_their_content() {
        let sealer = Sealer::encrypted(keys_for(REPO_A));
        let marker = b"walvault-marker-4f1c ".repeat(5000);
        let sealed = sealer.seal(ObjectKind::WalFile, NAME, &marker, 3).unwrap();
        assert!(
            sealed.bytes.len() < marker.len() / 4,
            "still compressed before sealing"
        );
        let needle = b"walvault-marker-4f1c";
        assert!(!sealed.bytes.windows(needle.len()).any(|w| w == needle));
        // Nor is the plain blake3 of the content in the header: the hash is keyed.
        assert!(
            !sealed
                .bytes
                .windows(32)
                .any(|w| w == blake3::hash(&marker).as_bytes())
        );
        assert_eq!(
            sealer.open(&sealed.bytes, ObjectKind::WalFile, NAME).unwrap().1,
            marker
        );
        // Two seals of the same content differ (random nonce) but hash the same.
        let again = sealer.seal(ObjectKind::WalFile, NAME, &marker, 3).unwrap();
        assert_ne!(again.bytes, sealed.bytes);
        assert_eq!(again.header.blake3, sealed.header.blake3);
        assert_eq!(sealer.content_hash(&marker), sealed.header.blake3);
    }

    #[test]
    fn tampered_swapped_moved_and_foreign_objects_are_refused() {
        let keys = keys_for(REPO_A);
        let sealer = Sealer::encrypted(Arc::clone(&keys));
        let content = sample();
        let sealed = sealer.seal(ObjectKind::WalFile, NAME, &content, 3).unwrap();
        // Every bit flip, anywhere, and every truncation.
        for at in (0..sealed.bytes.len()).step_by(61) {
            let mut bad = sealed.bytes.to_vec();
            bad[at] ^= 0x01;
            assert!(
                sealer.open(&bad, ObjectKind::WalFile, NAME).is_err(),
                "flip at {at}"
            );
        }
        for cut in [0, 50, 100, sealed.bytes.len() - 17, sealed.bytes.len() - 1] {
            assert!(
                sealer
                    .open(&sealed.bytes[..cut], ObjectKind::WalFile, NAME)
                    .is_err()
            );
        }
        // A header rewritten with a valid CRC (the name of another segment): authentication fails.
        let other = "000000010000000000000002";
        let mut header = sealer.read_header(&sealed.bytes).unwrap();
        let payload = &sealed.bytes[header.encoded_len()..];
        header.name = other.to_string();
        let mut moved = encode_header(&header);
        moved.extend_from_slice(payload);
        assert_eq!(
            sealer.open(&moved, ObjectKind::WalFile, other).unwrap_err(),
            ObjectError::Authentication
        );
        // Stored under another name as it is: the name check refuses it.
        assert!(matches!(
            sealer.open(&sealed.bytes, ObjectKind::WalFile, other),
            Err(ObjectError::WrongName { .. })
        ));
        // Another repository, even with the same key file: its own master key and id.
        let foreign = Sealer::encrypted(keys_for(REPO_B));
        assert_eq!(
            foreign
                .open(&sealed.bytes, ObjectKind::WalFile, NAME)
                .unwrap_err(),
            ObjectError::Authentication
        );
        // A plain object planted in the encrypted repository, and the other way round.
        let plain = SealedObject::seal(ObjectKind::WalFile, NAME, &content, 3).unwrap();
        assert_eq!(
            sealer.open(&plain.bytes, ObjectKind::WalFile, NAME).unwrap_err(),
            ObjectError::NotEncrypted
        );
        assert_eq!(
            Sealer::plain()
                .open(&sealed.bytes, ObjectKind::WalFile, NAME)
                .unwrap_err(),
            ObjectError::UnexpectedlyEncrypted
        );
        // Records: sealed with their key as name.
        let rec = sealer.seal_record("retention.json", b"{}".to_vec());
        assert_eq!(sealer.open_record("retention.json", &rec).unwrap(), b"{}");
        assert!(sealer.open_record("cluster.json", &rec).is_err());
        assert_eq!(&Sealer::plain().seal_record("x", b"{}".to_vec())[..], b"{}");
    }

    /// Frozen fixtures: an encrypted (version 3) descriptor whose key is a raw key, and an object
    /// of format version 2 sealed under it, must stay readable by every later version.
    #[test]
    fn frozen_v2_fixture_opens_with_its_key_only() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let descriptor = super::super::RepoDescriptor::parse(
            &std::fs::read(fixtures.join("walvault-v3-encrypted.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(descriptor.version, 3);
        let record = descriptor.encryption.clone().unwrap();
        let key = super::super::keys::KeySource::File(fixtures.join("encryption-key.hex"));
        let keys = RepoKeys::open(&record, &key, descriptor.id()).unwrap();
        let sealer = Sealer::encrypted(keys);
        let fixture = std::fs::read(fixtures.join("object-v2-history.wvo")).unwrap();
        let (header, content) = sealer
            .open(&fixture, ObjectKind::WalFile, "00000002.history")
            .unwrap();
        assert_eq!(header.nonce.map(|n| n.len()), Some(24));
        assert_eq!(content, b"1\t0/3000060\tno recovery target specified\n");
        assert!(
            Sealer::plain()
                .open(&fixture, ObjectKind::WalFile, "00000002.history")
                .is_err()
        );
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

        #[test]
        fn arbitrary_bytes_never_panic_an_encrypted_open(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let sealer = Sealer::encrypted(keys_for(REPO_A));
            let _ = sealer.open(&bytes, ObjectKind::WalFile, NAME);
            let _ = sealer.open_record("retention.json", &bytes);
        }
    }
}
