//! Content-addressed chunks: `chunks/<first 2 hex>/<blake3 hex>.wvo`, each a sealed, zstd
//! compressed object whose name is its own hash (in an encrypted repository, its keyed hash: see
//! [`Sealer::content_hash`]). A chunk is stored once, whatever number of files and backups
//! reference it.

use bytes::Bytes;

use crate::repo::object::{ObjectError, ObjectKind, Sealer};
use crate::repo::{Store, StoreError, WritableStore};

/// The key of chunk `id`; an id that is not 64 lower-case hex digits (from a hostile manifest)
/// is reported as a missing chunk, never turned into a key.
pub(crate) fn chunk_key(id: &str) -> Result<String, ChunkError> {
    crate::repo::layout::chunk_key(id).ok_or_else(|| ChunkError::Missing {
        id: id.chars().take(80).collect(),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("chunk {id} is missing from the repository")]
    Missing { id: String },
    #[error("chunk {id} is corrupt: {source}")]
    Corrupt { id: String, source: Box<ObjectError> },
    #[error("cannot compress a chunk: {0}")]
    Compress(std::io::Error),
}

/// What storing one chunk did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredChunk {
    pub id: String,
    /// Bytes the chunk takes in the repository.
    pub stored_len: u64,
    /// Whether this call uploaded it (false: the repository already had it).
    pub uploaded: bool,
}

/// The id of a chunk: the blake3 of its bytes (keyed in an encrypted repository), in hex.
pub fn chunk_id(sealer: &Sealer, data: &[u8]) -> String {
    hex::encode(sealer.content_hash(data))
}

/// Store `data`, whose id is `id` ([`chunk_id`]), unless the repository has it already. A
/// content-addressed key makes an overwrite by a concurrent writer harmless: same bytes.
pub async fn put_chunk(
    store: &WritableStore,
    sealer: &Sealer,
    id: String,
    data: Bytes,
    level: i32,
) -> Result<StoredChunk, ChunkError> {
    debug_assert_eq!(id, chunk_id(sealer, &data));
    let key = chunk_key(&id)?;
    if let Some(stored_len) = store.size(&key).await? {
        return Ok(StoredChunk {
            id,
            stored_len,
            uploaded: false,
        });
    }
    let sealed = tokio::task::spawn_blocking({
        let (id, sealer) = (id.clone(), sealer.clone());
        // The id is the content hash (and `chunk_key` accepted it as 64 hex digits): the chunk
        // is not hashed a second time.
        let mut hash = [0u8; 32];
        hex::decode_to_slice(&id, &mut hash).expect("chunk_key accepts 64 hex digits only");
        move || sealer.seal_hashed(ObjectKind::Chunk, &id, &data, hash, level)
    })
    .await
    .map_err(|e| ChunkError::Compress(std::io::Error::other(e)))?
    .map_err(ChunkError::Compress)?;
    let stored_len = sealed.bytes.len() as u64;
    store.put(&key, sealed.bytes).await?;
    Ok(StoredChunk {
        id,
        stored_len,
        uploaded: true,
    })
}

/// Read chunk `id` and verify it: header, length, and that its content hashes to `id`.
pub async fn get_chunk(store: &Store, sealer: &Sealer, id: &str) -> Result<Vec<u8>, ChunkError> {
    let key = chunk_key(id)?;
    let bytes = store
        .get(&key)
        .await?
        .ok_or_else(|| ChunkError::Missing { id: id.to_string() })?;
    let (id_owned, sealer) = (id.to_string(), sealer.clone());
    let (header, content) =
        tokio::task::spawn_blocking(move || sealer.open(&bytes, ObjectKind::Chunk, &id_owned))
            .await
            .map_err(|e| ChunkError::Compress(std::io::Error::other(e)))?
            .map_err(|source| ChunkError::Corrupt {
                id: id.to_string(),
                source: Box::new(source),
            })?;
    // The header hash matched the content; the content must also be what the id names.
    if header.blake3_hex() != id {
        return Err(ChunkError::Corrupt {
            id: id.to_string(),
            source: Box::new(ObjectError::ContentHash {
                expected: id.to_string(),
                found: header.blake3_hex(),
            }),
        });
    }
    Ok(content)
}
