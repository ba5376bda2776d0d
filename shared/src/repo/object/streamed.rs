//! An object's content read as it is decompressed ([`ContentReader`]), for a parser that reads
//! its document from a stream: the content is never held whole. A manifest of 300,000 files is
//! some 80 MB of JSON, which a restore held beside everything it parsed from it.
//!
//! The header, the name and (encrypted) the payload's authenticity are checked before the first
//! byte is given, as [`super::Sealer::open`] checks them. The content's length and hash can only
//! be checked at its end: the reader checks them when it reaches it, and a reader whose content
//! did not verify fails its reads from there on and keeps the reason ([`ContentReader::failure`]),
//! so that a parser that stopped on that failure is reported as a damaged object, not as a bad
//! document. Whatever was parsed from a reader is used only once it reported its end.

use std::borrow::Cow;
use std::io::{Cursor, Read};

use super::{Codec, MAX_ZSTD_RATIO, ObjectError, ObjectHeader};
use crate::repo::keys::RepoKeys;

/// An object's content, decompressed as it is read, its length and hash checked at its end.
pub struct ContentReader<'b> {
    source: Source<'b>,
    header: ObjectHeader,
    hasher: blake3::Hasher,
    read: u64,
    /// The content's end was reached and verified.
    verified: bool,
    failure: Option<ObjectError>,
}

enum Source<'b> {
    Stored(Cursor<Cow<'b, [u8]>>),
    Zstd(Box<Decompressing<'b>>),
}

/// A zstd payload, decompressed as it is read.
type Decompressing<'b> = zstd::stream::read::Decoder<'static, std::io::BufReader<Cursor<Cow<'b, [u8]>>>>;

impl std::fmt::Debug for ContentReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentReader")
            .field("name", &self.header.name)
            .field("read", &self.read)
            .finish_non_exhaustive()
    }
}

impl<'b> ContentReader<'b> {
    /// The content of the object `header` describes, from its `payload` (authenticated and
    /// decrypted), hashed as the repository's `keys` (if any) hash content.
    pub(super) fn new(
        header: ObjectHeader,
        payload: Cow<'b, [u8]>,
        keys: Option<&RepoKeys>,
    ) -> Result<ContentReader<'b>, ObjectError> {
        let source = match header.codec {
            Codec::None => Source::Stored(Cursor::new(payload)),
            // As when opened whole: a payload too short to expand to the header's length is
            // refused before anything is read.
            Codec::Zstd if header.original_len > (payload.len() as u64).saturating_mul(MAX_ZSTD_RATIO) => {
                return Err(ObjectError::Decompress(format!(
                    "{} payload bytes cannot expand to {} bytes",
                    payload.len(),
                    header.original_len
                )));
            }
            Codec::Zstd => Source::Zstd(Box::new(
                zstd::stream::read::Decoder::new(Cursor::new(payload))
                    .map_err(|e| ObjectError::Decompress(e.to_string()))?,
            )),
        };
        Ok(ContentReader {
            source,
            hasher: keys.map_or_else(blake3::Hasher::new, RepoKeys::content_hasher),
            header,
            read: 0,
            verified: false,
            failure: None,
        })
    }

    /// The verified header.
    pub fn header(&self) -> &ObjectHeader {
        &self.header
    }

    /// Why the content did not verify (it was cut short, ran long, or its hash differs), once a
    /// read found it.
    pub fn failure(&self) -> Option<&ObjectError> {
        self.failure.as_ref()
    }

    /// Whether the whole content was read and verified.
    pub fn verified(&self) -> bool {
        self.verified
    }

    fn fail(&mut self, e: ObjectError) -> std::io::Error {
        let err = std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
        self.failure.get_or_insert(e);
        err
    }

    /// At the content's end: its length and hash against the header's.
    fn check_end(&mut self) -> Result<(), std::io::Error> {
        if self.read != self.header.original_len {
            let e = ObjectError::ContentLength {
                expected: self.header.original_len,
                found: self.read,
            };
            return Err(self.fail(e));
        }
        let found = *self.hasher.finalize().as_bytes();
        if found != self.header.blake3 {
            let e = ObjectError::ContentHash {
                expected: self.header.blake3_hex(),
                found: hex::encode(found),
            };
            return Err(self.fail(e));
        }
        self.verified = true;
        Ok(())
    }
}

impl Read for ContentReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(e) = &self.failure {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                e.to_string(),
            ));
        }
        if buf.is_empty() || self.verified {
            return Ok(0);
        }
        let n = match &mut self.source {
            Source::Stored(c) => c.read(buf),
            Source::Zstd(d) => d.read(buf),
        };
        let n = n.map_err(|e| self.fail(ObjectError::Decompress(e.to_string())))?;
        self.read += n as u64;
        if self.read > self.header.original_len {
            let e = ObjectError::ContentLength {
                expected: self.header.original_len,
                found: self.read,
            };
            return Err(self.fail(e));
        }
        self.hasher.update(&buf[..n]);
        if n == 0 {
            self.check_end()?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ObjectKind, Sealer};
    use super::*;

    const NAME: &str = "20261126T120000Z";

    fn sealers() -> [Sealer; 2] {
        [
            Sealer::plain(),
            Sealer::encrypted(super::super::tests::keys_for(super::super::tests::REPO_A)),
        ]
    }

    fn read_all(r: &mut ContentReader<'_>) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        // Small reads, as a parser makes them.
        let mut buf = [0u8; 7];
        loop {
            match r.read(&mut buf)? {
                0 => return Ok(out),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    #[test]
    fn the_content_read_as_it_is_decompressed_is_the_content_opened_whole() {
        let content: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        for sealer in sealers() {
            for level in [1, 3] {
                let sealed = sealer.seal(ObjectKind::Manifest, NAME, &content, level).unwrap();
                let mut r = sealer
                    .open_reader(&sealed.bytes, ObjectKind::Manifest, NAME)
                    .unwrap();
                assert!(!r.verified());
                assert_eq!(read_all(&mut r).unwrap(), content);
                assert!(r.verified() && r.failure().is_none());
                let (_, whole) = sealer.open(&sealed.bytes, ObjectKind::Manifest, NAME).unwrap();
                assert_eq!(whole, content);
            }
        }
    }

    #[test]
    fn a_stream_that_does_not_verify_fails_at_its_end_and_says_why() {
        for sealer in sealers() {
            let content: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 253) as u8).collect();
            let sealed = sealer.seal(ObjectKind::Manifest, NAME, &content, 3).unwrap();
            // Refused before any byte: another name, another kind.
            assert!(matches!(
                sealer.open_reader(&sealed.bytes, ObjectKind::Manifest, "other"),
                Err(ObjectError::WrongName { .. })
            ));
            assert!(
                sealer
                    .open_reader(&sealed.bytes, ObjectKind::WalFile, NAME)
                    .is_err()
            );
            if sealer.is_encrypted() {
                // A flipped byte of the tag fails authentication before anything is read.
                let mut bad = sealed.bytes.to_vec();
                let last = bad.len() - 1;
                bad[last] ^= 1;
                assert!(matches!(
                    sealer.open_reader(&bad, ObjectKind::Manifest, NAME),
                    Err(ObjectError::Authentication)
                ));
                continue;
            }
            // A plain object's flipped payload byte is found as it is read, or at the end.
            let mut bad = sealed.bytes.to_vec();
            let last = bad.len() - 1;
            bad[last - 10] ^= 1;
            let mut r = sealer.open_reader(&bad, ObjectKind::Manifest, NAME).unwrap();
            assert!(read_all(&mut r).is_err());
            assert!(
                matches!(
                    r.failure(),
                    Some(
                        ObjectError::ContentHash { .. }
                            | ObjectError::Decompress(_)
                            | ObjectError::ContentLength { .. }
                    )
                ),
                "{r:?}"
            );
            assert!(!r.verified());
            assert!(r.read(&mut [0u8; 4]).is_err(), "and every read after it fails");
        }
    }
}
