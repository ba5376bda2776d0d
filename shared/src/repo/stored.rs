//! Typed reads: the one way to read a stored object of a kind. A [`StoredKind`] says where an
//! object of its kind lives, how it is wrapped and how its content parses; [`Objects::read`]
//! does the rest (the request, the envelope opened and, in an encrypted repository,
//! authenticated, the content parsed) and tells a missing object from a damaged one.

use bytes::Bytes;

use super::layout;
use super::object::{ObjectError, ObjectHeader, ObjectKind, Sealer};
use super::store::{Store, StoreError};
use crate::wal::WalFileName;

/// How objects of a kind are wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    /// Always sealed as this kind, under the name [`StoredKind::name`] gives.
    Sealed(ObjectKind),
    /// A small JSON record: bare in a plain repository, sealed as an [`ObjectKind::Record`]
    /// named by its key in an encrypted one ([`Sealer::seal_record`]).
    Record,
}

/// An object out of its envelope.
#[derive(Debug)]
pub struct Opened {
    /// The verified header; `None` for a record.
    pub header: Option<ObjectHeader>,
    pub content: Vec<u8>,
    /// Bytes the object takes in the repository.
    pub stored_len: u64,
}

/// A kind of object the repository stores, and how it is read back.
pub trait StoredKind: Sized {
    /// What names one object of this kind.
    type Id: ?Sized;
    /// Why content that opened is still unusable.
    type Error: std::error::Error;
    const ENVELOPE: Envelope;
    /// The object's key, from [`layout`].
    fn key(id: &Self::Id) -> String;
    /// The name a sealed object's header carries (checked when opening: a misplaced object is
    /// refused). The key unless the kind says otherwise.
    fn name(id: &Self::Id) -> String {
        Self::key(id)
    }
    /// The value, from the content of object `id` (untrusted: it comes from the repository).
    fn parse(opened: Opened, id: &Self::Id) -> Result<Self, Self::Error>;

    /// The value of a sealed object of this kind, as read (`bytes`): by default the content is
    /// opened whole (into `out`) and [`StoredKind::parse`]d. A kind whose documents are large
    /// parses them from the content as it is decompressed ([`Sealer::open_reader`]), so that it
    /// is never held whole.
    fn open_sealed(
        sealer: &Sealer,
        kind: ObjectKind,
        bytes: &[u8],
        id: &Self::Id,
        out: Vec<u8>,
    ) -> Opening<Self> {
        let (header, content) = sealer
            .open_into(bytes, kind, &Self::name(id), out)
            .map_err(Damage::Envelope)?;
        let opened = Opened {
            header: Some(header),
            content,
            stored_len: bytes.len() as u64,
        };
        Self::parse(opened, id).map_err(Damage::Content)
    }

    /// [`StoredKind::open_sealed`] of the bytes a read returned, for a kind that keeps them
    /// (shared, never copied): by default, as any bytes.
    fn open_sealed_read(sealer: &Sealer, kind: ObjectKind, bytes: &Bytes, id: &Self::Id) -> Opening<Self> {
        Self::open_sealed(sealer, kind, bytes, id, Vec::new())
    }
}

/// A value of kind `K` opened, or why the object is unusable.
pub type Opening<K> = Result<K, Damage<<K as StoredKind>::Error>>;

/// Why an object that was read is unusable.
#[derive(Debug, thiserror::Error)]
pub enum Damage<E> {
    /// The envelope: truncated, tampered with, misplaced, not of this repository.
    #[error(transparent)]
    Envelope(ObjectError),
    /// The content.
    #[error(transparent)]
    Content(E),
}

/// Why an object could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError<E> {
    #[error("{key} is missing")]
    Missing { key: String },
    #[error("{key} is damaged: {reason}")]
    Damaged { key: String, reason: Damage<E> },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A repository's objects, for reading: its store and the sealer that opens what it holds.
#[derive(Debug, Clone, Copy)]
pub struct Objects<'a> {
    store: &'a Store,
    sealer: &'a Sealer,
}

impl<'a> Objects<'a> {
    pub fn new(store: &'a Store, sealer: &'a Sealer) -> Objects<'a> {
        Objects { store, sealer }
    }

    /// Object `id` of kind `K`; [`ReadError::Missing`] when it does not exist.
    pub async fn read<K: StoredKind>(&self, id: &K::Id) -> Result<K, ReadError<K::Error>> {
        self.read_if_present(id)
            .await?
            .ok_or_else(|| ReadError::Missing { key: K::key(id) })
    }

    /// Object `id` of kind `K`; `None` when it does not exist. A copy that does not open is read
    /// again from the store's fallback repository, when it has one.
    pub async fn read_if_present<K: StoredKind>(&self, id: &K::Id) -> Result<Option<K>, ReadError<K::Error>> {
        let key = K::key(id);
        let Some(bytes) = self.store.get(&key).await? else {
            return Ok(None);
        };
        let opened = match K::ENVELOPE {
            Envelope::Sealed(kind) => K::open_sealed_read(self.sealer, kind, &bytes, id),
            Envelope::Record => open::<K>(self.sealer, id, &bytes),
        };
        let reason = match opened {
            Ok(value) => return Ok(Some(value)),
            Err(reason) => reason,
        };
        let reopen = |b: &[u8]| open::<K>(self.sealer, id, b);
        match self
            .store
            .reread_from_fallback(&key, None, reason.to_string(), reopen)
            .await
        {
            Some(value) => Ok(Some(value)),
            None => Err(ReadError::Damaged { key, reason }),
        }
    }
}

/// Open object `id` of kind `K`, already read as `bytes` (by a caller that fetched it beside
/// other work, or opens it off the async threads).
pub fn open<K: StoredKind>(sealer: &Sealer, id: &K::Id, bytes: &[u8]) -> Result<K, Damage<K::Error>> {
    open_into(sealer, id, bytes, Vec::new())
}

/// [`open`], a sealed object's content written into `out` (emptied first, its allocation
/// reused: a restore opens thousands of chunks into a few buffers).
pub fn open_into<K: StoredKind>(
    sealer: &Sealer,
    id: &K::Id,
    bytes: &[u8],
    out: Vec<u8>,
) -> Result<K, Damage<K::Error>> {
    let stored_len = bytes.len() as u64;
    let opened = match K::ENVELOPE {
        Envelope::Sealed(kind) => return K::open_sealed(sealer, kind, bytes, id, out),
        Envelope::Record => Opened {
            header: None,
            content: sealer.open_record(&K::key(id), bytes).map_err(Damage::Envelope)?,
            stored_len,
        },
    };
    K::parse(opened, id).map_err(Damage::Content)
}

/// A file PostgreSQL archived (segment, partial segment, `.history`, `.backup`): its content,
/// verified against the header's length and hash. Whether a segment belongs to the repository's
/// cluster is [`super::Repository::check_wal`]'s question.
#[derive(Debug)]
pub struct WalObject {
    pub content: Vec<u8>,
    /// Bytes the object takes in the repository.
    pub stored_len: u64,
}

impl StoredKind for WalObject {
    type Id = WalFileName;
    type Error = std::convert::Infallible;
    const ENVELOPE: Envelope = Envelope::Sealed(ObjectKind::WalFile);

    fn key(id: &WalFileName) -> String {
        layout::wal_key(id)
    }

    fn name(id: &WalFileName) -> String {
        id.to_string()
    }

    fn parse(opened: Opened, _: &WalFileName) -> Result<WalObject, std::convert::Infallible> {
        Ok(WalObject {
            content: opened.content,
            stored_len: opened.stored_len,
        })
    }
}
