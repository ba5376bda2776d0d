//! The segment being streamed, in the repository: pieces of it, each a sealed object of kind
//! [`ObjectKind::StreamPiece`] holding a byte range (`layout::stream_piece_key`).
//!
//! A flush stores only the bytes received since the previous one, so a quiet database with a
//! nearly full segment does not upload the whole segment every second. Every
//! [`CONSOLIDATE_AFTER`] pieces the next flush stores the segment's bytes from its start in
//! one piece and deletes the older ones, so a reader never chains more than that many. Once
//! the whole segment is stored as a segment, its pieces are deleted.
//!
//! Pieces of one segment of one timeline never disagree where they overlap: the server streams
//! only WAL it has flushed, and flushed WAL on a timeline never changes.

use crate::repo::layout::{self, OBJECT_SUFFIX};
use crate::repo::object::{ObjectError, ObjectKind, Sealer};
use crate::repo::{Store, StoreError, WritableStore};
use crate::wal::SegmentName;

/// Pieces of one segment after which the next flush consolidates.
pub const CONSOLIDATE_AFTER: usize = 32;

/// Why the streamed end of a segment cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PieceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stream piece {key} is damaged: {source}")]
    Damaged { key: String, source: ObjectError },
    #[error("stream piece {key} holds {got} bytes, its name says {expected}")]
    WrongLength {
        key: String,
        got: usize,
        expected: usize,
    },
    #[error("cannot seal stream piece {key}: {source}")]
    Seal { key: String, source: std::io::Error },
    #[error("the stream pieces of {0} kept changing while they were read")]
    Unstable(SegmentName),
}

/// A listed piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub from: u32,
    pub to: u32,
    pub key: String,
}

/// Store `bytes`, the segment's bytes from offset `from`.
pub async fn store(
    store: &WritableStore,
    sealer: &Sealer,
    seg: &SegmentName,
    from: u32,
    bytes: &[u8],
) -> Result<Piece, PieceError> {
    let to = from + bytes.len() as u32;
    let key = layout::stream_piece_key(seg, from, to);
    let sealed = sealer
        .seal(
            ObjectKind::StreamPiece,
            &layout::stream_piece_name(seg, from, to),
            bytes,
            1,
        )
        .map_err(|source| PieceError::Seal {
            key: key.clone(),
            source,
        })?;
    store.put(&key, sealed.bytes).await?;
    Ok(Piece { from, to, key })
}

/// The pieces of `seg` in the repository, by start.
pub async fn list(store: &Store, seg: &SegmentName) -> Result<Vec<Piece>, StoreError> {
    let mut out: Vec<Piece> = store
        .list(&layout::stream_segment_prefix(seg))
        .await?
        .into_iter()
        .filter_map(|(key, _)| {
            let (s, from, to) = layout::parse_stream_piece_key(&key)?;
            (s == *seg).then_some(Piece { from, to, key })
        })
        .collect();
    out.sort_by_key(|p| (p.from, p.to));
    Ok(out)
}

/// The pieces that cover the segment from its start as far as they reach without a hole, each
/// reaching furthest from where the previous one ends.
pub fn chain(pieces: &[Piece]) -> Vec<&Piece> {
    let mut out = Vec::new();
    let mut at = 0u32;
    while let Some(next) = pieces
        .iter()
        .filter(|p| p.from <= at && p.to > at)
        .max_by_key(|p| p.to)
    {
        at = next.to;
        out.push(next);
    }
    out
}

/// The segment's bytes from its start as the stream stored them, or `None` when no piece starts
/// it. A piece deleted between the listing and its read (a consolidation, or the segment
/// completed) makes the read start over.
pub async fn read(store: &Store, sealer: &Sealer, seg: &SegmentName) -> Result<Option<Vec<u8>>, PieceError> {
    'again: for _ in 0..4 {
        let pieces = list(store, seg).await?;
        let chain = chain(&pieces);
        if chain.is_empty() {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(chain.last().map_or(0, |p| p.to as usize));
        for p in chain {
            let Some(bytes) = store.get(&p.key).await? else {
                continue 'again;
            };
            let name = layout::stream_piece_name(seg, p.from, p.to);
            let open = |b: &[u8]| sealer.open(b, ObjectKind::StreamPiece, &name);
            let content = match open(&bytes) {
                Ok((_, content)) => content,
                Err(source) => match store
                    .reread_from_fallback(&p.key, None, source.to_string(), open)
                    .await
                {
                    Some((_, content)) => content,
                    None => {
                        return Err(PieceError::Damaged {
                            key: p.key.clone(),
                            source,
                        });
                    }
                },
            };
            let expected = (p.to - p.from) as usize;
            if content.len() != expected {
                return Err(PieceError::WrongLength {
                    key: p.key.clone(),
                    got: content.len(),
                    expected,
                });
            }
            let skip = out.len() - p.from as usize;
            out.extend_from_slice(&content[skip..]);
        }
        return Ok(Some(out));
    }
    Err(PieceError::Unstable(*seg))
}

/// Delete `pieces`; a failure is logged, never fatal (a leftover piece is garbage, not wrong).
pub async fn remove(store: &WritableStore, pieces: &[Piece]) {
    let keys: Vec<String> = pieces.iter().map(|p| p.key.clone()).collect();
    if keys.is_empty() {
        return;
    }
    if let Err(e) = store.delete_many(&keys).await {
        tracing::warn!("stream pieces not deleted (they are garbage now): {e}");
    }
}

/// The pieces of every segment before `seg` on its timeline and log (left by a stream that
/// stopped before completing them, whose segments have been stored since).
pub async fn list_before(store: &Store, seg: &SegmentName) -> Result<Vec<(SegmentName, Piece)>, StoreError> {
    let prefix = format!("stream/{:08X}{:08X}/", seg.timeline.get(), seg.log);
    Ok(store
        .list(&prefix)
        .await?
        .into_iter()
        .filter(|(k, _)| k.ends_with(OBJECT_SUFFIX))
        .filter_map(|(key, _)| {
            let (s, from, to) = layout::parse_stream_piece_key(&key)?;
            (s < *seg).then_some((s, Piece { from, to, key }))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(from: u32, to: u32) -> Piece {
        Piece {
            from,
            to,
            key: format!("{from}-{to}"),
        }
    }

    #[test]
    fn the_chain_follows_the_furthest_reach_and_stops_at_a_hole() {
        let pieces = vec![p(0, 10), p(0, 40), p(10, 20), p(40, 50), p(45, 60), p(70, 80)];
        let got: Vec<(u32, u32)> = chain(&pieces).iter().map(|p| (p.from, p.to)).collect();
        assert_eq!(got, [(0, 40), (40, 50), (45, 60)]);
        assert!(chain(&[p(5, 10)]).is_empty(), "nothing starts the segment");
    }
}
