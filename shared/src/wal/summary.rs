//! Per-segment summaries for the time index: what happened in a WAL segment, in LSN and time.
//!
//! The archiver summarizes each segment as it archives it, in order, passing the [`Carry`] of
//! segment N to segment N+1 so that a record crossing the boundary is counted once, in the
//! segment where it ends (the segment recovery must replay to reach it). Without a carry (the
//! first segment archived, or after a gap) the continuation at the start of the segment is
//! skipped, as `pg_waldump` does, and the summary says so.
//!
//! A record is attributed to the segment holding its last byte, so a commit time in segment N's
//! summary means "replaying through the end of segment N reaches this commit".

use serde::{Deserialize, Serialize};

use super::catalog_rows::{self, CatalogRow};
use super::changes::{ChangeEvent, ChangeTracker};
use super::decode::{DecodeError, DecoderState, RecordKind, WalDecoder, WalRecord};
use super::lsn::Lsn;
use super::page::LONG_HEADER_LEN;
use super::pgtime::PgTime;

/// `XLP_FIRST_IS_CONTRECORD`.
const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
/// Bytes fed to the decoder at a time; any size works, a page keeps copies small.
const FEED_CHUNK: usize = 8192;
/// Change events kept per segment; more are counted in `events_dropped`.
pub const MAX_EVENTS: usize = 4096;
/// Catalog rows kept per segment; past them `catalog_rows_cut` is set.
pub const MAX_CATALOG_ROWS: usize = 4096;

/// A named restore point (`pg_create_restore_point`): a `recovery_target_name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePoint {
    pub lsn: Lsn,
    pub time: PgTime,
    pub name: String,
}

/// What one WAL segment holds, for choosing segments by time, name or LSN. Stored in the
/// repository as JSON (every field below is part of the format).
///
/// "Transaction end" below means a commit or an abort record, prepared or not: PostgreSQL's
/// `recovery_target_time` stops at either. Their times are *not* monotonic in LSN order
/// (concurrent backends take the timestamp before inserting the record, and clocks move), hence
/// both first/last (in WAL order) and min/max.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentSummary {
    /// LSN of the segment's first byte.
    pub start: Lsn,
    /// PostgreSQL major version, from the page magic.
    pub pg_version: u32,
    /// Where the last record completed in this segment ends (rounded up to 8 bytes; the segment
    /// end after `XLOG_SWITCH`); `start` when no record completed here.
    pub end_of_records: Lsn,
    /// Records completed in this segment, one carried in from the previous segment included.
    pub records: u64,
    /// Start of the first record completed here (before `start` when carried in).
    pub first_record: Option<Lsn>,
    /// Start of the last record completed here.
    pub last_record: Option<Lsn>,
    /// `COMMIT` and `COMMIT PREPARED` records.
    pub commits: u64,
    /// `ABORT` and `ROLLBACK PREPARED` records.
    pub aborts: u64,
    /// Time of the first transaction end in WAL order.
    pub first_commit: Option<PgTime>,
    /// Time of the last transaction end in WAL order.
    pub last_commit: Option<PgTime>,
    /// Earliest transaction end time.
    pub min_commit: Option<PgTime>,
    /// Latest transaction end time.
    pub max_commit: Option<PgTime>,
    pub restore_points: Vec<RestorePoint>,
    /// The last record is `XLOG_SWITCH` (`pg_switch_wal`, `archive_timeout`): the rest is unused.
    pub ends_with_switch: bool,
    /// No carry was given and the segment began inside a record, which was skipped (and is
    /// counted nowhere).
    pub skipped_continuation: bool,
    /// Valid WAL ends inside this segment (a zero record length here): the end of a timeline
    /// or a `.partial` segment.
    pub end_of_wal: Option<Lsn>,
    /// Destructive transactions that committed in this segment ([`super::changes`]); absent
    /// from summaries written before walvault looked for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<ChangeEvent>>,
    /// Events past [`MAX_EVENTS`], not kept.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub events_dropped: u64,
    /// Rows inserted into `pg_class`, `pg_namespace` and `pg_index` in this segment
    /// ([`super::catalog_rows`]): the relations and schemas created, which `find` names
    /// relations by when the relation map of a backup does not know them. Absent when none, and
    /// in summaries written before walvault recorded them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub catalog_rows: Vec<CatalogRow>,
    /// More than [`MAX_CATALOG_ROWS`] rows: the ones after were not kept.
    #[serde(default, skip_serializing_if = "is_false")]
    pub catalog_rows_cut: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl SegmentSummary {
    fn new(start: Lsn, pg_version: u32) -> Self {
        SegmentSummary {
            start,
            pg_version,
            end_of_records: start,
            records: 0,
            first_record: None,
            last_record: None,
            commits: 0,
            aborts: 0,
            first_commit: None,
            last_commit: None,
            min_commit: None,
            max_commit: None,
            restore_points: Vec::new(),
            ends_with_switch: false,
            skipped_continuation: false,
            end_of_wal: None,
            events: Some(Vec::new()),
            events_dropped: 0,
            catalog_rows: Vec::new(),
            catalog_rows_cut: false,
        }
    }

    fn add_catalog_rows(&mut self, rows: Vec<CatalogRow>) {
        for row in rows {
            if self.catalog_rows.len() < MAX_CATALOG_ROWS {
                self.catalog_rows.push(row);
            } else {
                self.catalog_rows_cut = true;
            }
        }
    }

    fn add_event(&mut self, e: ChangeEvent) {
        let events = self.events.get_or_insert_with(Vec::new);
        if events.len() < MAX_EVENTS {
            events.push(e);
        } else {
            self.events_dropped += 1;
        }
    }

    fn add(&mut self, rec: WalRecord) {
        self.records += 1;
        self.first_record.get_or_insert(rec.lsn);
        self.last_record = Some(rec.lsn);
        self.end_of_records = rec.end;
        self.ends_with_switch = rec.kind == RecordKind::Switch;
        if let Some(t) = rec.kind.xact_time() {
            match rec.kind {
                RecordKind::Commit { .. } | RecordKind::CommitPrepared { .. } => self.commits += 1,
                _ => self.aborts += 1,
            }
            self.first_commit.get_or_insert(t);
            self.last_commit = Some(t);
            self.min_commit = Some(self.min_commit.map_or(t, |m| m.min(t)));
            self.max_commit = Some(self.max_commit.map_or(t, |m| m.max(t)));
        }
        if let RecordKind::RestorePoint { time, name } = rec.kind {
            self.restore_points.push(RestorePoint {
                lsn: rec.lsn,
                time,
                name,
            });
        }
    }
}

/// The decoder's state at the end of a segment, for the next one: the beginning of a record
/// that continues there, plus what the next segment's pages are checked against (system
/// identifier, page magic, timeline, the previous record's LSN). A record in progress is not
/// kept as bytes but as its running CRC and the few bytes still to be interpreted, so a carry is
/// at most a few KiB whatever the record size, and is never dropped. Store it (serde) to resume
/// in another process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carry {
    state: DecoderState,
    /// Row counts of transactions still open at the segment's end.
    #[serde(default)]
    changes: ChangeTracker,
}

impl Carry {
    /// Start of the segment this carry continues into.
    pub fn next_segment_start(&self) -> Lsn {
        self.state.next_lsn()
    }

    /// Start of the record that continues into the next segment, if one does.
    pub fn pending_record(&self) -> Option<Lsn> {
        self.state.pending_record()
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Summarize one whole segment starting at `start`, continuing from the previous segment's
/// `carry` if there is one. Returns the summary and the carry for the next segment (`None` when
/// valid WAL ended in this segment). Errors on anything that is not a whole, valid segment that
/// continues the carry.
pub fn summarize_segment(
    bytes: &[u8],
    start: Lsn,
    carry: Option<Carry>,
) -> Result<(SegmentSummary, Option<Carry>), DecodeError> {
    let mut s = Summarizer::new(bytes, start, carry)?;
    for chunk in bytes.chunks(FEED_CHUNK) {
        s.feed(chunk)?;
    }
    s.finish()
}

/// [`summarize_segment`] fed in pieces, so a segment is summarized while it is read and never
/// held whole (push streams a segment once: hash, summary and compression in one pass).
pub struct Summarizer {
    start: Lsn,
    segment_size: u32,
    fed: u64,
    decoder: WalDecoder,
    changes: ChangeTracker,
    summary: SegmentSummary,
}

impl std::fmt::Debug for Summarizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Summarizer")
            .field("start", &self.start)
            .field("fed", &self.fed)
            .finish_non_exhaustive()
    }
}

impl Summarizer {
    /// Start a summary of the segment at `start`; `head` is at least the segment's first
    /// (long) page header, whose geometry every later piece is checked against. Nothing is fed
    /// yet: feed the segment from its first byte.
    pub fn new(head: &[u8], start: Lsn, carry: Option<Carry>) -> Result<Summarizer, DecodeError> {
        let head = head
            .get(..LONG_HEADER_LEN)
            .ok_or(DecodeError::WrongSegmentLength {
                lsn: start,
                len: head.len(),
                segment_size: 0,
            })?;
        // The first page header names the geometry; the decoder checks it and the rest of the page.
        let (info, segment_size, block_size) = (u16_at(head, 2), u32_at(head, 32), u32_at(head, 36));
        if segment_size == 0 || !start.0.is_multiple_of(u64::from(segment_size)) {
            return Err(DecodeError::UnalignedStart { lsn: start });
        }
        let carried = carry.is_some();
        let changes = carry.as_ref().map(|c| c.changes.clone()).unwrap_or_default();
        let decoder = match carry {
            Some(Carry { state, .. }) => {
                let bad = |reason: String| DecodeError::BadCarry { lsn: start, reason };
                if state.next_lsn() != start {
                    return Err(bad(format!("it continues at {}", state.next_lsn())));
                }
                if (state.segment_size(), state.block_size()) != (segment_size, block_size) {
                    return Err(bad(format!(
                        "it is for {}-byte segments of {}-byte pages",
                        state.segment_size(),
                        state.block_size()
                    )));
                }
                WalDecoder::resume(state)?
            }
            None => WalDecoder::new(start, segment_size, block_size),
        };
        let mut summary = SegmentSummary::new(start, 0);
        summary.skipped_continuation = !carried && info & XLP_FIRST_IS_CONTRECORD != 0;
        Ok(Summarizer {
            start,
            segment_size,
            fed: 0,
            decoder,
            changes,
            summary,
        })
    }

    /// The next bytes of the segment, in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), DecodeError> {
        self.fed += bytes.len() as u64;
        if self.fed > u64::from(self.segment_size) {
            return Err(self.wrong_length());
        }
        for piece in bytes.chunks(FEED_CHUNK) {
            self.decoder.feed(piece);
            while let Some(rec) = self.decoder.poll()? {
                let pg_version = self.decoder.pg_version().unwrap_or(0);
                if rec.block.is_some() {
                    self.summary
                        .add_catalog_rows(catalog_rows::rows_of(&rec, pg_version));
                }
                if let Some(e) = self.changes.record(&rec, pg_version) {
                    self.summary.add_event(e);
                }
                self.summary.add(rec);
            }
        }
        Ok(())
    }

    fn wrong_length(&self) -> DecodeError {
        DecodeError::WrongSegmentLength {
            lsn: self.start,
            len: usize::try_from(self.fed).unwrap_or(usize::MAX),
            segment_size: self.segment_size,
        }
    }

    /// The summary and the carry for the next segment, once the whole segment was fed.
    pub fn finish(mut self) -> Result<(SegmentSummary, Option<Carry>), DecodeError> {
        if self.fed != u64::from(self.segment_size) {
            return Err(self.wrong_length());
        }
        self.summary.pg_version = self.decoder.pg_version().unwrap_or(0);
        self.summary.end_of_wal = self.decoder.ended();
        let carry = match self.summary.end_of_wal {
            Some(_) => None,
            None => self.decoder.snapshot().map(|state| Carry {
                state,
                changes: self.changes,
            }),
        };
        Ok((self.summary, carry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::decode::{RM_XACT_ID, RM_XLOG_ID};
    use crate::wal::testwal::{self, RM_HEAP_ID, WalWriter};
    use proptest::prelude::*;

    const SEG: u32 = 1 << 20;
    const BLK: u32 = 8192;

    fn segment(w: &WalWriter, n: u64) -> &[u8] {
        let from = (n * SEG as u64 - w.start) as usize;
        &w.bytes[from..from + SEG as usize]
    }

    /// Pad the stream with zeros to the end of its current segment (unwritten WAL).
    fn close(w: &mut WalWriter) {
        let end = w.pos().div_ceil(SEG as u64) * SEG as u64;
        w.bytes.resize((end - w.start) as usize, 0);
    }

    #[test]
    fn counts_transaction_ends_without_assuming_order() {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        w.record(RM_HEAP_ID, 0, 1, &testwal::main_data(&[0; 40]));
        w.record(RM_XACT_ID, 0x00, 2, &testwal::xact_body(50, true));
        w.record(RM_XACT_ID, 0x00, 3, &testwal::xact_body(10, true));
        w.record(RM_XACT_ID, 0x20, 4, &testwal::xact_body(5, false));
        let rp = w.record(RM_XLOG_ID, 0x70, 0, &testwal::restore_point_body(40, "rp1"));
        w.record(RM_XACT_ID, 0x30, 0, &testwal::xact_body(60, true));
        w.record(RM_XACT_ID, 0x40, 0, &testwal::xact_body(30, false));
        let sw = w.switch();
        let (s, carry) = summarize_segment(segment(&w, 1), Lsn(SEG as u64), None).unwrap();
        assert_eq!(s.records, 8);
        assert_eq!((s.commits, s.aborts), (3, 2));
        assert_eq!(s.first_commit, Some(PgTime(50)));
        assert_eq!(s.last_commit, Some(PgTime(30)));
        assert_eq!(s.min_commit, Some(PgTime(5)));
        assert_eq!(s.max_commit, Some(PgTime(60)));
        assert_eq!(
            s.restore_points,
            vec![RestorePoint {
                lsn: Lsn(rp),
                time: PgTime(40),
                name: "rp1".into()
            }]
        );
        assert!(s.ends_with_switch);
        assert_eq!(s.last_record, Some(Lsn(sw)));
        assert_eq!(s.end_of_records, Lsn(2 * SEG as u64));
        assert_eq!(s.pg_version, 15);
        assert!(!s.skipped_continuation);
        assert_eq!(s.end_of_wal, None);
        let carry = carry.unwrap();
        assert_eq!(carry.next_segment_start(), Lsn(2 * SEG as u64));
        assert_eq!(carry.pending_record(), None);
    }

    #[test]
    fn a_record_crossing_segments_is_counted_once_with_carry_and_skipped_without() {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        w.record(RM_XACT_ID, 0, 1, &testwal::xact_body(1, true));
        w.fill_until_segment_offset(SEG - 5000);
        // Starts in segment 1 and ends in segment 2, with its timestamp in segment 2.
        let body = testwal::blocks_then_main(&[(8192, 0)], &testwal::commit_main(777));
        let crossing = w.record(RM_XACT_ID, 0, 2, &body);
        let after = w.record(RM_XACT_ID, 0x20, 3, &testwal::xact_body(778, false));
        let end_of_wal = testwal::align8(w.pos());
        close(&mut w);
        assert!(crossing < 2 * SEG as u64 && after > 2 * SEG as u64);

        let (s1, carry) = summarize_segment(segment(&w, 1), Lsn(SEG as u64), None).unwrap();
        let carry = carry.unwrap();
        assert_eq!(carry.pending_record(), Some(Lsn(crossing)));
        assert_eq!(s1.last_commit, Some(PgTime(1)));
        // The carry survives a trip through storage.
        let carry: Carry = serde_json::from_str(&serde_json::to_string(&carry).unwrap()).unwrap();
        let (s2, next) = summarize_segment(segment(&w, 2), Lsn(2 * SEG as u64), Some(carry)).unwrap();
        assert_eq!(s2.records, 2);
        assert_eq!(s2.first_record, Some(Lsn(crossing)));
        assert_eq!((s2.commits, s2.aborts), (1, 1));
        assert_eq!(s2.first_commit, Some(PgTime(777)));
        assert!(!s2.skipped_continuation);
        assert_eq!(s2.end_of_wal, Some(Lsn(end_of_wal)));
        assert!(next.is_none(), "no carry past the end of WAL");

        let (alone, _) = summarize_segment(segment(&w, 2), Lsn(2 * SEG as u64), None).unwrap();
        assert!(alone.skipped_continuation);
        assert_eq!(alone.records, 1);
        assert_eq!(alone.first_record, Some(Lsn(after)));
        assert_eq!(alone.first_commit, Some(PgTime(778)));
    }

    #[test]
    fn a_record_longer_than_a_segment() {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        w.record(RM_XACT_ID, 0, 1, &testwal::xact_body(1, true));
        // A 2.5 MiB logical message: from segment 1, through all of 2, into 3.
        let huge = w.record(21, 0, 0, &testwal::main_data_long(&vec![b'x'; 5 << 19]));
        let last = w.record(RM_XACT_ID, 0, 5, &testwal::xact_body(99, true));
        assert!(huge < 2 * SEG as u64 && last > 3 * SEG as u64 && last < 4 * SEG as u64);
        w.switch();

        let (s1, c1) = summarize_segment(segment(&w, 1), Lsn(SEG as u64), None).unwrap();
        assert_eq!(s1.records, 1);
        let (s2, c2) = summarize_segment(segment(&w, 2), Lsn(2 * SEG as u64), c1).unwrap();
        assert_eq!((s2.records, s2.first_record), (0, None));
        assert_eq!(s2.end_of_records, Lsn(2 * SEG as u64));
        let c2 = c2.unwrap();
        assert_eq!(c2.pending_record(), Some(Lsn(huge)));
        assert!(serde_json::to_string(&c2).unwrap().len() < 8192);
        let (s3, _) = summarize_segment(segment(&w, 3), Lsn(3 * SEG as u64), Some(c2)).unwrap();
        assert_eq!(s3.first_record, Some(Lsn(huge)));
        assert!(s3.ends_with_switch);
        assert_eq!(s3.last_commit, Some(PgTime(99)));

        // Without carries, segment 2 is one long continuation and segment 3 starts inside it.
        let (s2, _) = summarize_segment(segment(&w, 2), Lsn(2 * SEG as u64), None).unwrap();
        assert!(s2.skipped_continuation);
        assert_eq!(s2.records, 0);
        let (s3_alone, _) = summarize_segment(segment(&w, 3), Lsn(3 * SEG as u64), None).unwrap();
        assert_eq!(s3_alone.records, s3.records - 1);
        assert_eq!(s3_alone.last_commit, Some(PgTime(99)));
    }

    #[test]
    fn refuses_what_is_not_a_continuing_whole_segment() {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        w.record(RM_XACT_ID, 0, 1, &testwal::xact_body(1, true));
        w.switch();
        w.record(RM_XACT_ID, 0, 2, &testwal::xact_body(2, true));
        w.switch();
        let (_, carry) = summarize_segment(segment(&w, 1), Lsn(SEG as u64), None).unwrap();
        let err =
            summarize_segment(&segment(&w, 2)[..SEG as usize / 2], Lsn(2 * SEG as u64), None).unwrap_err();
        assert!(matches!(err, DecodeError::WrongSegmentLength { .. }), "{err}");
        // A carry is for the very next segment only.
        let err = summarize_segment(segment(&w, 2), Lsn(3 * SEG as u64), carry.clone()).unwrap_err();
        assert!(matches!(err, DecodeError::BadCarry { .. }), "{err}");
        // A segment under the wrong name: its page address says otherwise.
        let err = summarize_segment(segment(&w, 2), Lsn(3 * SEG as u64), None).unwrap_err();
        assert_eq!(err.lsn(), Lsn(3 * SEG as u64));
        assert!(matches!(err, DecodeError::BadPageAddress { .. }), "{err}");
        let (s2, _) = summarize_segment(segment(&w, 2), Lsn(2 * SEG as u64), carry).unwrap();
        assert_eq!(s2.last_commit, Some(PgTime(2)));
    }

    /// Version 1 of the stored form. Changing it breaks repositories already written.
    #[test]
    fn frozen_fixture_v1() {
        let json = r#"{
            "start": "0/3000000", "pg_version": 15, "end_of_records": "0/3FFFFF8",
            "records": 4, "first_record": "0/2FFFF80", "last_record": "0/3000128",
            "commits": 2, "aborts": 1,
            "first_commit": 774000000000000, "last_commit": 773999999000000,
            "min_commit": 773999999000000, "max_commit": 774000000000001,
            "restore_points": [{"lsn": "0/30000A0", "time": 774000000000000, "name": "before-upgrade"}],
            "ends_with_switch": false, "skipped_continuation": false, "end_of_wal": null
        }"#;
        let s: SegmentSummary = serde_json::from_str(json).unwrap();
        assert_eq!(s.start, Lsn(0x300_0000));
        assert_eq!(s.first_record, Some(Lsn(0x2FF_FF80)));
        assert_eq!(s.min_commit, Some(PgTime(773_999_999_000_000)));
        assert_eq!(s.restore_points[0].name, "before-upgrade");
        assert_eq!(
            s.restore_points[0].time.to_string(),
            "2024-07-11T08:00:00.000000Z"
        );
        let again: SegmentSummary = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(again, s);
        // Written before walvault recorded change events: not searched, which find reports.
        assert_eq!(s.events, None);
    }

    #[test]
    fn frozen_fixture_v1_with_catalog_rows() {
        let json = r#"{
            "start": "0/3000000", "pg_version": 15, "end_of_records": "0/3FFFFF8",
            "records": 4, "first_record": "0/2FFFF80", "last_record": "0/3063000",
            "commits": 1, "aborts": 0,
            "first_commit": 817040001000000, "last_commit": 817040001000000,
            "min_commit": 817040001000000, "max_commit": 817040001000000,
            "restore_points": [], "ends_with_switch": false, "skipped_continuation": false,
            "end_of_wal": null, "events": [],
            "catalog_rows": [
              { "lsn": "0/3062F10", "xid": 731, "db": 5,
                "class": { "oid": 16400, "name": "orders_2026", "namespace": 2200, "filenode": 16400, "tablespace": 0, "kind": "r" } },
              { "lsn": "0/3062E00", "xid": 731, "db": 5, "namespace": { "oid": 16399, "name": "sales" } },
              { "lsn": "0/3063010", "xid": 731, "db": 5, "index": { "index": 16405, "table": 16400 } },
              { "lsn": "0/3063020", "xid": 731, "db": 5, "a_row_kind_of_a_later_walvault": {} }
            ],
            "catalog_rows_cut": true
        }"#;
        let s: SegmentSummary = serde_json::from_str(json).unwrap();
        let rows = &s.catalog_rows;
        assert_eq!(rows.len(), 4);
        let class = rows[0].class.as_ref().unwrap();
        assert_eq!(
            (
                rows[0].lsn,
                rows[0].db,
                class.oid,
                class.name.as_str(),
                class.namespace,
                class.filenode
            ),
            (Lsn(0x306_2F10), 5, 16400, "orders_2026", 2200, 16400)
        );
        assert_eq!(rows[1].namespace.as_ref().unwrap().name, "sales");
        assert_eq!(rows[2].index.unwrap().table, 16400);
        assert!(rows[3].class.is_none() && rows[3].namespace.is_none() && rows[3].index.is_none());
        assert!(s.catalog_rows_cut);
        let again: SegmentSummary = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(again, s);
    }

    #[test]
    fn frozen_fixture_v1_with_change_events() {
        let json = r#"{
            "start": "0/3000000", "pg_version": 15, "end_of_records": "0/3FFFFF8",
            "records": 4, "first_record": "0/2FFFF80", "last_record": "0/3063000",
            "commits": 1, "aborts": 0,
            "first_commit": 817040001000000, "last_commit": 817040001000000,
            "min_commit": 817040001000000, "max_commit": 817040001000000,
            "restore_points": [], "ends_with_switch": false, "skipped_continuation": false,
            "end_of_wal": null,
            "events": [{ "lsn": "0/3063000", "xid": 731, "time": 817040001000000, "db": 5,
              "unlinked": [{ "spc": 1663, "db": 5, "rel": 16390 }], "unlinked_cut": false,
              "truncated": [], "dropped_database": null,
              "rows": [{ "rel": { "spc": 1663, "db": 5, "rel": 1259 }, "deleted": 4, "updated": 0 }] }]
        }"#;
        let s: SegmentSummary = serde_json::from_str(json).unwrap();
        let events = s.events.as_ref().unwrap();
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!(
            (e.lsn, e.xid, e.time, e.db),
            (Lsn(0x306_3000), 731, PgTime(817_040_001_000_000), Some(5))
        );
        assert_eq!(e.unlinked[0].rel, 16390);
        assert_eq!((e.rows[0].rel.rel, e.rows[0].deleted), (1259, 4));
        assert_eq!(s.events_dropped, 0);
        let again: SegmentSummary = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(again, s);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn arbitrary_segments_never_panic(
            head in proptest::collection::vec(any::<u8>(), 0..64),
            fill: u8,
            seg_pow in 0u32..3,
        ) {
            let mut bytes = head;
            if bytes.len() >= 40 {
                bytes[32..36].copy_from_slice(&(SEG << seg_pow).to_le_bytes());
            }
            bytes.resize(SEG as usize, fill);
            let _ = summarize_segment(&bytes, Lsn(SEG as u64), None);
        }
    }
}
