//! The WAL time index: one summary per archived segment (its LSN range, first/last/min/max
//! transaction end times and restore points), stored beside the WAL as
//! `index/<timeline><log>/<segment>.wvo`, so the tool knows which timestamps are restorable
//! before PostgreSQL starts. Summaries are derived data: a missing one only makes restore's
//! checks less precise, never a restore impossible.

use serde::{Deserialize, Serialize};

use crate::repo::object::{ObjectKind, Sealer};
use crate::repo::store::CreateSemantics;
use crate::repo::stored::{Envelope, Objects, Opened, ReadError, StoredKind};
use crate::repo::{Store, StoreError, WritableStore};
use crate::wal::summary::{Carry, SegmentSummary};
use crate::wal::{Lsn, SegmentName};

pub const FORMAT_NAME: &str = "walvault-segment-summary";
pub const FORMAT_VERSION: u32 = 1;

/// `index/<TTTTTTTTXXXXXXXX>/<segment>.wvo`: a sealed object (kind 4) holding this as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSummary {
    pub format: String,
    pub version: u32,
    pub segment: String,
    pub summary: SegmentSummary,
    /// Decoder state at the end of the segment, so the next segment's summary can complete a
    /// record that crosses the boundary.
    #[serde(default)]
    pub carry: Option<Carry>,
}

pub use crate::repo::layout::summary_key;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("summary {key} is unreadable: {message}")]
    Corrupt { key: String, message: String },
    #[error("cannot summarize {segment}: {message}")]
    Decode { segment: String, message: String },
}

/// Why the JSON of a stored summary is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SummaryError {
    #[error("{0}")]
    Json(String),
    #[error("format {format:?} version {version} for {segment}")]
    Foreign {
        format: String,
        version: u32,
        segment: String,
    },
}

impl StoredKind for StoredSummary {
    type Id = SegmentName;
    type Error = SummaryError;
    const ENVELOPE: Envelope = Envelope::Sealed(ObjectKind::Summary);

    fn key(seg: &SegmentName) -> String {
        summary_key(seg)
    }

    fn name(seg: &SegmentName) -> String {
        seg.to_string()
    }

    fn parse(opened: Opened, seg: &SegmentName) -> Result<StoredSummary, SummaryError> {
        StoredSummary::parse(&opened.content, seg)
    }
}

/// Read one stored summary, verified.
pub async fn load(
    store: &Store,
    sealer: &Sealer,
    seg: &SegmentName,
) -> Result<Option<StoredSummary>, IndexError> {
    Objects::new(store, sealer)
        .read_if_present::<StoredSummary>(seg)
        .await
        .map_err(|e| match e {
            ReadError::Store(e) => IndexError::Store(e),
            ReadError::Missing { key } => IndexError::Corrupt {
                key,
                message: "missing".into(),
            },
            ReadError::Damaged { key, reason } => IndexError::Corrupt {
                key,
                message: reason.to_string(),
            },
        })
}

impl StoredSummary {
    /// The newest transaction end in the segment, Unix microseconds.
    pub fn latest_commit_us(&self) -> Option<i64> {
        self.summary.max_commit?.to_unix_micros()
    }

    /// Parse the JSON of the summary stored for `seg` (untrusted: it comes from the repository).
    pub fn parse(json: &[u8], seg: &SegmentName) -> Result<StoredSummary, SummaryError> {
        let s: StoredSummary = serde_json::from_slice(json).map_err(|e| SummaryError::Json(e.to_string()))?;
        if s.format != FORMAT_NAME || s.version != FORMAT_VERSION || s.segment != seg.to_string() {
            return Err(SummaryError::Foreign {
                format: s.format,
                version: s.version,
                segment: s.segment,
            });
        }
        Ok(s)
    }
}

fn decode_err(seg: &SegmentName, e: impl std::fmt::Display) -> IndexError {
    IndexError::Decode {
        segment: seg.to_string(),
        message: e.to_string(),
    }
}

/// The LSN segment `seg` starts at.
pub fn segment_start(seg: &SegmentName, segment_size: u32) -> Result<Lsn, IndexError> {
    seg.start_lsn(segment_size)
        .ok_or_else(|| decode_err(seg, "segment number out of range"))
}

/// The carry at the end of the segment before `seg`: from `kept` (the spool's copy, with the
/// repository it is for) when it has it, else from that segment's stored summary. A missing or
/// unreadable one only costs the record crossing the boundary.
pub async fn carry_before(
    store: &Store,
    sealer: &Sealer,
    seg: &SegmentName,
    segment_size: u32,
    kept: Option<(&crate::local::handoff::Spool, &crate::repo::RepoId)>,
) -> Result<Option<Carry>, IndexError> {
    let start = segment_start(seg, segment_size)?;
    let Some(prev_start) = start.0.checked_sub(u64::from(segment_size)) else {
        return Ok(None);
    };
    let prev = SegmentName::containing(seg.timeline, Lsn(prev_start), segment_size);
    let continues = |c: &Carry| c.next_segment_start() == start;
    if let Some((spool, repo)) = kept
        && let Some(c) = spool.carry(repo, &prev).filter(continues)
    {
        return Ok(Some(c));
    }
    Ok(load(store, sealer, &prev)
        .await
        .ok()
        .flatten()
        .and_then(|p| p.carry)
        .filter(continues))
}

/// How a summary is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SummaryWrite {
    /// Write it whatever is stored: the caller has just stored the segment itself, so a summary
    /// under its name (left by a segment of that name since deleted) describes nothing else. One
    /// request on any store.
    Replace,
    /// Keep a stored one (perhaps more precise, made with a carry): on a store that refuses to
    /// replace an object, one create-only write; elsewhere a check first.
    KeepExisting,
}

impl SummaryWrite {
    /// [`SummaryWrite::Replace`] after a push that stored the segment, else keep what is there.
    pub fn for_segment(newly_stored: bool) -> SummaryWrite {
        if newly_stored {
            SummaryWrite::Replace
        } else {
            SummaryWrite::KeepExisting
        }
    }
}

/// Store the summary of `seg` (see [`SummaryWrite`]). Returns whether this call stored it.
pub async fn store_summary(
    store: &WritableStore,
    sealer: &Sealer,
    seg: &SegmentName,
    summary: SegmentSummary,
    carry: Option<Carry>,
    write: SummaryWrite,
) -> Result<bool, IndexError> {
    let key = summary_key(seg);
    let stored = StoredSummary {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        segment: seg.to_string(),
        summary,
        carry,
    };
    let json = serde_json::to_vec(&stored).expect("summary serializes");
    let sealed = sealer
        .seal(ObjectKind::Summary, &seg.to_string(), &json, 3)
        .map_err(|e| decode_err(seg, e))?;
    if write == SummaryWrite::Replace {
        store.put(&key, sealed.bytes).await?;
        return Ok(true);
    }
    if store.create_semantics_for(sealed.bytes.len()) != CreateSemantics::Atomic
        && store.size(&key).await?.is_some()
    {
        return Ok(false);
    }
    Ok(store.put_new(&key, sealed.bytes).await? == crate::repo::store::PutNew::Created)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frozen fixtures of a stored summary whose carry holds a record in progress (a real
    /// PostgreSQL 15 segment's end): as written before the decoder state's byte fields were
    /// base64 (arrays of numbers), and as written since. Both read to the same carry, and the
    /// old one is written back in the new form, byte for byte.
    #[test]
    fn frozen_summary_fixtures_with_both_forms_of_carry_parse() {
        let tli = crate::wal::TimelineId::new(1).unwrap();
        let seg = SegmentName::containing(tli, Lsn(0x100_0000), 16 << 20);
        let arrays = include_bytes!("../tests/fixtures/summary-v1-carry-arrays.json");
        let base64 = include_bytes!("../tests/fixtures/summary-v1-carry-base64.json");
        let old = StoredSummary::parse(arrays, &seg).unwrap();
        let new = StoredSummary::parse(base64, &seg).unwrap();
        assert_eq!(old, new);
        let carry = new.carry.as_ref().unwrap();
        assert_eq!(carry.next_segment_start(), "0/2000000".parse().unwrap());
        assert_eq!(carry.pending_record(), Some("0/1FFF908".parse().unwrap()));
        assert_eq!(new.summary.records, 28178);
        assert_eq!(serde_json::to_vec(&old).unwrap(), base64.trim_ascii_end());
        assert!(
            base64.len() < arrays.len() * 6 / 10,
            "{} vs {} bytes",
            base64.len(),
            arrays.len()
        );
    }
}
