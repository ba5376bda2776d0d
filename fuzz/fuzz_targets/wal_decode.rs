//! The sans-IO WAL record decoder (`wal/decode.rs`), the first-page check (`wal/page.rs`) and
//! segment summaries (`wal/summary.rs`) on arbitrary bytes.
//!
//! Input: `[geometry][chunk seed][stream...]`. The geometry byte's low 7 bits pick the block
//! size (1 to 64 KiB) and segment size (1 MiB to 1 GiB) the decoder is told; the stream's own
//! first page address (bytes 8..16, rounded down to a page) is where decoding starts, so a
//! mutated real segment keeps passing the first page check. With bit 7 set, the stream is
//! instead a list of records that the harness lays out as PostgreSQL does (see `synthetic`):
//! decoding must give back exactly those records, whose kinds an independent oracle predicts.
//!
//! Properties, beyond "no panic, no hang, no huge allocation":
//! * feeding the stream whole, in pseudo-random chunks, or in chunks with the decoder state
//!   snapshotted, sent through JSON and resumed at every chunk boundary gives the same records,
//!   the same error and the same end of WAL;
//! * a snapshot's JSON is at most `MAX_STATE_JSON_LEN` bytes whatever the records claim (the
//!   library's own bound, derived from its caps), and so is a carry's decoder state;
//! * records are 8-aligned, in order, chained by `xl_prev`, no longer than their LSN range, and
//!   their kind matches their resource manager;
//! * a segment summary's counts and bounds are consistent, its carry is small and continues at
//!   the next segment, and that carry can be resumed on a next segment without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walvault::wal::decode::{
    DecodeError, DecoderState, MAX_RECORD_LEN, MAX_STATE_JSON_LEN, PgTime, RecordKind, WalDecoder, WalRecord,
};
use walvault::wal::page::{XLP_LONG_HEADER, validate_segment};
use walvault::wal::summary::{Carry, summarize_segment};
use walvault::wal::{Lsn, SegmentName, TimelineId};

#[derive(Debug, PartialEq)]
struct Outcome {
    records: Vec<WalRecord>,
    error: Option<DecodeError>,
    ended: Option<Lsn>,
}

/// Poll until the decoder needs more input; `false` once it failed.
fn drain(d: &mut WalDecoder, out: &mut Outcome) -> bool {
    loop {
        match d.poll() {
            Ok(Some(r)) => out.records.push(r),
            Ok(None) => return true,
            Err(e) => {
                assert_eq!(d.poll(), Err(e.clone()), "a failed decoder stays failed");
                assert!(d.snapshot().is_none(), "no snapshot after an error");
                out.error = Some(e);
                return false;
            }
        }
    }
}

/// Chunk sizes: a small xorshift, so a given input always splits the same way.
struct Chunks(u64);

impl Chunks {
    fn next(&mut self) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        match self.0 % 4 {
            0 => 1 + (self.0 >> 8) as usize % 8,
            1 => 1 + (self.0 >> 8) as usize % 100,
            _ => 1 + (self.0 >> 8) as usize % 10_000,
        }
    }
}

fn decode(stream: &[u8], start: Lsn, seg: u32, blk: u32, seed: Option<u8>, resume: bool) -> Outcome {
    let mut d = WalDecoder::new(start, seg, blk);
    let mut out = Outcome {
        records: Vec::new(),
        error: None,
        ended: None,
    };
    let mut chunks = Chunks(0x9E37_79B9_7F4A_7C15 ^ u64::from(seed.unwrap_or(0)));
    let mut rest = stream;
    while !rest.is_empty() {
        let n = match seed {
            Some(_) => chunks.next().min(rest.len()),
            None => rest.len(),
        };
        if d.ended().is_none() {
            let fed = (stream.len() - rest.len()) as u64;
            assert_eq!(d.next_feed_lsn(), Lsn(start.0.saturating_add(fed)));
        }
        d.feed(&rest[..n]);
        rest = &rest[n..];
        if !drain(&mut d, &mut out) {
            break;
        }
        if resume && let Some(state) = d.snapshot() {
            let json = serde_json::to_vec(&state).expect("state serializes");
            assert!(
                json.len() <= MAX_STATE_JSON_LEN,
                "decoder state of {} bytes",
                json.len()
            );
            let back: DecoderState = serde_json::from_slice(&json).expect("state deserializes");
            assert_eq!(back, state);
            d = WalDecoder::resume(back).expect("a genuine snapshot resumes");
        }
    }
    if out.error.is_none() {
        drain(&mut d, &mut out);
    }
    out.ended = d.ended();
    out
}

fn check_records(records: &[WalRecord], seg: u32) {
    let mut prev: Option<&WalRecord> = None;
    for r in records {
        assert_eq!(r.lsn.0 % 8, 0, "{r:?}");
        assert!((24..=MAX_RECORD_LEN).contains(&r.total_len), "{r:?}");
        assert!(r.end.0 >= r.lsn.0.saturating_add(u64::from(r.total_len)), "{r:?}");
        if r.kind == RecordKind::Switch && r.end.0 != u64::MAX {
            assert_eq!(r.end.0 % u64::from(seg), 0, "a switch ends its segment: {r:?}");
        }
        match &r.kind {
            RecordKind::Commit { .. }
            | RecordKind::Abort { .. }
            | RecordKind::CommitPrepared { .. }
            | RecordKind::AbortPrepared { .. } => assert_eq!(r.rmid, 1, "{r:?}"),
            RecordKind::RestorePoint { name, .. } => {
                assert_eq!(r.rmid, 0, "{r:?}");
                assert!(name.len() <= 64 * 3 && !name.contains('\0'), "{r:?}");
            }
            RecordKind::Switch => assert_eq!(r.rmid, 0, "{r:?}"),
            RecordKind::Other => {}
        }
        if let Some(p) = prev {
            assert!(r.lsn >= p.end, "{p:?} then {r:?}");
            assert_eq!(r.prev, p.lsn, "prev-link");
        } else {
            assert!(r.prev < r.lsn, "{r:?}");
        }
        prev = Some(r);
    }
}

/// Summarize the stream as the start of a whole segment (the rest zeros, as unwritten WAL), then
/// resume its carry on a next segment.
fn check_summary(stream: &[u8], start: Lsn, seg: u32) {
    let mut bytes = vec![0u8; seg as usize];
    let n = stream.len().min(bytes.len());
    bytes[..n].copy_from_slice(&stream[..n]);
    bytes[32..36].copy_from_slice(&seg.to_le_bytes());
    let tli = u32::from_le_bytes(stream[4..8].try_into().unwrap());
    let tli = TimelineId::new(tli).unwrap_or(TimelineId::new(1).unwrap());
    let name = SegmentName::containing(tli, start, seg);
    if let Ok(info) = validate_segment(&bytes, &name) {
        assert_eq!(Some(info.start_lsn), name.start_lsn(seg));
        assert_eq!(info.segment_size, seg);
        assert!(info.page_timeline >= 1 && info.page_timeline <= tli.get());
        assert!((13..=19).contains(&info.pg_version));
    }
    let Ok((s, carry)) = summarize_segment(&bytes, start, None) else {
        return;
    };
    assert_eq!(s.start, start);
    assert!(s.end_of_records >= s.start);
    assert!(s.commits + s.aborts <= s.records);
    assert_eq!(s.first_record.is_some(), s.records > 0);
    assert!(s.first_record <= s.last_record);
    assert_eq!(s.first_commit.is_some(), s.commits + s.aborts > 0);
    assert!(s.min_commit <= s.max_commit);
    assert!(s.min_commit <= s.first_commit && s.first_commit <= s.max_commit);
    assert!(s.min_commit <= s.last_commit && s.last_commit <= s.max_commit);
    assert!(s.restore_points.len() as u64 <= s.records);
    let json = serde_json::to_string(&s).expect("summary serializes");
    assert_eq!(
        serde_json::from_str::<walvault::wal::summary::SegmentSummary>(&json).ok(),
        Some(s.clone())
    );
    let Some(carry) = carry else {
        assert!(s.end_of_wal.is_some(), "no carry, yet WAL did not end");
        return;
    };
    assert!(s.end_of_wal.is_none());
    let Some(next) = start.0.checked_add(u64::from(seg)) else {
        return;
    };
    assert_eq!(carry.next_segment_start(), Lsn(next));
    let json = serde_json::to_vec(&carry).expect("carry serializes");
    // The carry's decoder state has the decoder's bound; its `changes` are bounded by their own
    // caps (wal/changes.rs: transactions, relations), not by this one.
    let value: serde_json::Value = serde_json::from_slice(&json).expect("carry is JSON");
    let state = serde_json::to_vec(&value["state"]).expect("state serializes");
    assert!(
        state.len() <= MAX_STATE_JSON_LEN,
        "carried decoder state of {} bytes",
        state.len()
    );
    let carry: Carry = serde_json::from_slice(&json).expect("carry deserializes");
    // The next segment: the same long page header moved to the next address, continuing
    // whatever record is pending, then the rest of the stream's first page, then zeros.
    let mut next_seg = bytes;
    let info = XLP_LONG_HEADER | u16::from(carry.pending_record().is_some());
    next_seg[2..4].copy_from_slice(&info.to_le_bytes());
    next_seg[8..16].copy_from_slice(&next.to_le_bytes());
    let _ = summarize_segment(&next_seg, Lsn(next), Some(carry));
}

/// `XLP_FIRST_IS_CONTRECORD`.
const CONTRECORD: u16 = 0x0001;
/// Per version, from its headers (written out here, not taken from the library under test):
/// page magic, `XLP_FIRST_IS_OVERWRITE_CONTRECORD` (renumbered in 19), the highest builtin
/// resource manager id (19 added `RM_XLOG2_ID`), and whether custom ones (128+) exist.
const VERSIONS: [(u16, u16, u8, bool); 7] = [
    (0xD106, 0x0008, 21, false),
    (0xD10D, 0x0008, 21, false),
    (0xD110, 0x0008, 21, true),
    (0xD113, 0x0008, 21, true),
    (0xD116, 0x0008, 21, true),
    (0xD118, 0x0008, 21, true),
    (0xD121, 0x0004, 22, true),
];

/// A record the writer laid out, and what decoding it must give.
#[derive(Debug)]
struct Written {
    lsn: u64,
    rmid: u8,
    info: u8,
    total_len: u32,
    /// `Ok(Some(kind))`: decodes to that kind; `Ok(None)`: the body is raw bytes, anything
    /// the block header parser says goes; `Err(())`: must be refused as malformed.
    expect: Result<Option<RecordKind>, ()>,
}

/// Lays out records with page headers, continuation flags, alignment and CRC-32C the way
/// PostgreSQL's `CopyXLogRecordToWAL` does, starting at the first segment boundary.
struct Writer {
    seg: u64,
    blk: u64,
    magic: u16,
    start: u64,
    bytes: Vec<u8>,
    prev: u64,
    next_flags: u16,
    overwrite_flag: u16,
}

impl Writer {
    fn pos(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }

    fn page_header(&mut self, flags: u16, rem_len: u32) {
        let pos = self.pos();
        let long = pos.is_multiple_of(self.seg);
        let info = flags | std::mem::take(&mut self.next_flags) | if long { XLP_LONG_HEADER } else { 0 };
        self.bytes.extend_from_slice(&self.magic.to_le_bytes());
        self.bytes.extend_from_slice(&info.to_le_bytes());
        self.bytes.extend_from_slice(&1u32.to_le_bytes());
        self.bytes.extend_from_slice(&pos.to_le_bytes());
        self.bytes.extend_from_slice(&rem_len.to_le_bytes());
        self.bytes.extend_from_slice(&[0; 4]);
        if long {
            self.bytes
                .extend_from_slice(&7_350_000_000_000_000_001u64.to_le_bytes());
            self.bytes.extend_from_slice(&(self.seg as u32).to_le_bytes());
            self.bytes.extend_from_slice(&(self.blk as u32).to_le_bytes());
        }
    }

    /// Append a record (only up to the end of its first page when `torn`, as if the server
    /// crashed, with the next page marked as overwriting it). Returns its LSN and whether it
    /// was written whole.
    fn record(&mut self, rmid: u8, info: u8, body: &[u8], torn: bool) -> (u64, bool) {
        let aligned = self.pos().div_ceil(8) * 8;
        self.bytes.resize((aligned - self.start) as usize, 0);
        if self.pos().is_multiple_of(self.blk) {
            self.page_header(0, 0);
        }
        let lsn = self.pos();
        let tot = 24 + body.len() as u32;
        let mut rec = Vec::with_capacity(tot as usize);
        rec.extend_from_slice(&tot.to_le_bytes());
        rec.extend_from_slice(&0u32.to_le_bytes());
        rec.extend_from_slice(&self.prev.to_le_bytes());
        rec.extend_from_slice(&[info, rmid, 0, 0]);
        // CRC-32C over the body, then the header up to the CRC field.
        let crc = crc32c::crc32c_append(crc32c::crc32c(body), &rec);
        rec.extend_from_slice(&crc.to_le_bytes());
        rec.extend_from_slice(body);
        let first_page = (self.blk - lsn % self.blk) as usize;
        let torn = torn && first_page < rec.len();
        let stop = if torn { first_page } else { rec.len() };
        let mut i = 0;
        while i < stop {
            if self.pos().is_multiple_of(self.blk) {
                self.page_header(CONTRECORD, (rec.len() - i) as u32);
            }
            let n = ((self.blk - self.pos() % self.blk) as usize).min(stop - i);
            self.bytes.extend_from_slice(&rec[i..i + n]);
            i += n;
        }
        if torn {
            self.next_flags = self.overwrite_flag;
        } else {
            self.prev = lsn;
        }
        (lsn, !torn)
    }
}

fn time_of(data: &[u8]) -> Option<PgTime> {
    Some(PgTime(i64::from_le_bytes(data.get(..8)?.try_into().ok()?)))
}

/// What `classify` must make of main data `data` (the oracle, written from PostgreSQL's
/// `xact.h` and `pg_control.h`, not from walvault's code).
fn expected_kind(rmid: u8, info: u8, data: &[u8]) -> Result<RecordKind, ()> {
    let time = || time_of(data).ok_or(());
    Ok(match (rmid, info) {
        (1, i) if i & 0x70 == 0x00 => RecordKind::Commit { time: time()? },
        (1, i) if i & 0x70 == 0x20 => RecordKind::Abort { time: time()? },
        (1, i) if i & 0x70 == 0x30 => RecordKind::CommitPrepared { time: time()? },
        (1, i) if i & 0x70 == 0x40 => RecordKind::AbortPrepared { time: time()? },
        (0, i) if i & 0xF0 == 0x40 => RecordKind::Switch,
        (0, i) if i & 0xF0 == 0x70 => {
            let raw = data.get(8..72).ok_or(())?;
            let name = raw.split(|&b| b == 0).next().unwrap_or_default();
            RecordKind::RestorePoint {
                time: time()?,
                name: String::from_utf8_lossy(name).into_owned(),
            }
        }
        _ => RecordKind::Other,
    })
}

/// Structure-aware mode: `spec` is `[magic][record...]`, each record `[rmid][info][flags][len]`
/// then its bytes. Flags bits 0-1: the body is raw bytes (0), or only main data in the short (1)
/// or long (2, 3) form; bit 2: torn by a crash; bit 3: `len` counts 64-byte units. The stream is
/// framed correctly (CRCs, page headers, continuations), so decoding must give exactly the
/// records written, up to the first one whose content is malformed.
fn synthetic(spec: &[u8], seg: u32, blk: u32) -> (Vec<u8>, Vec<Written>) {
    let (&magic, mut rest) = spec.split_first().unwrap_or((&0, &[]));
    let (magic, overwrite_flag, max_builtin, custom_ok) = VERSIONS[usize::from(magic) % VERSIONS.len()];
    let mut w = Writer {
        seg: u64::from(seg),
        blk: u64::from(blk),
        magic,
        start: u64::from(seg),
        bytes: Vec::new(),
        prev: u64::from(seg) - 0x1000,
        next_flags: 0,
        overwrite_flag,
    };
    let mut written = Vec::new();
    while let [rmid, info, flags, len, tail @ ..] = rest {
        let len = usize::from(*len) * if flags & 8 != 0 { 64 } else { 1 };
        let (data, tail) = tail.split_at(len.min(tail.len()));
        rest = tail;
        let (body, main) = match flags & 3 {
            0 => (data.to_vec(), None),
            1 => {
                let data = &data[..data.len().min(255)];
                let mut b = vec![255, data.len() as u8];
                b.extend_from_slice(data);
                (b, Some(data))
            }
            _ => {
                let mut b = vec![254];
                b.extend_from_slice(&(data.len() as u32).to_le_bytes());
                b.extend_from_slice(data);
                (b, Some(data))
            }
        };
        let valid_rmgr = *rmid <= max_builtin || (custom_ok && *rmid >= 128);
        // A torn record was written by a server, so its header and block headers are valid
        // (not raw bytes): the reader checks them before it learns the rest was lost.
        let torn = flags & 4 != 0 && valid_rmgr && main.is_some();
        let (lsn, whole) = w.record(*rmid, *info, &body, torn);
        if !whole {
            continue;
        }
        let expect = match main {
            _ if !valid_rmgr => Err(()),
            Some(main) => expected_kind(*rmid, *info, main).map(Some),
            None => Ok(None),
        };
        let switch = expect.as_ref().ok().and_then(Option::as_ref) == Some(&RecordKind::Switch)
            || (*rmid == 0 && info & 0xF0 == 0x40);
        written.push(Written {
            lsn,
            rmid: *rmid,
            info: *info,
            total_len: 24 + body.len() as u32,
            expect,
        });
        // The rest of the segment after a switch is unused: stop here.
        if switch {
            break;
        }
    }
    (w.bytes, written)
}

fn check_synthetic(out: &Outcome, written: &[Written]) {
    for (i, w) in written.iter().enumerate() {
        let Some(r) = out.records.get(i) else {
            // Decoding stopped here: only for a record whose content is malformed.
            let e = out
                .error
                .as_ref()
                .unwrap_or_else(|| panic!("record {w:?} not decoded: {out:?}"));
            assert_eq!(e.lsn().0, w.lsn, "{e}");
            match w.expect {
                Err(()) => assert!(
                    matches!(e, DecodeError::Malformed { .. } | DecodeError::BadRmgr { .. }),
                    "{e}"
                ),
                Ok(None) => assert!(matches!(e, DecodeError::Malformed { .. }), "{e}"),
                Ok(Some(_)) => panic!("valid record {w:?} refused: {e}"),
            }
            return;
        };
        assert_eq!(
            (r.lsn.0, r.rmid, r.info, r.total_len),
            (w.lsn, w.rmid, w.info, w.total_len),
            "record {i}"
        );
        match &w.expect {
            Ok(Some(kind)) => assert_eq!(&r.kind, kind, "{w:?}"),
            Ok(None) => {}
            Err(()) => panic!("malformed record {w:?} accepted as {r:?}"),
        }
    }
    assert_eq!(
        out.records.len(),
        written.len(),
        "records beyond what was written"
    );
    assert_eq!(out.error, None);
}

fuzz_target!(|data: &[u8]| {
    let [geometry, seed, stream @ ..] = data else {
        return;
    };
    // Bit 7: structure-aware mode (see `synthetic`); the rest picks the geometry.
    let blk = 1u32 << (10 + (geometry & 0x7F) % 7);
    let seg = 1u32 << (20 + ((geometry & 0x7F) / 7) % 11);
    if geometry & 0x80 != 0 {
        let (stream, written) = synthetic(stream, seg, blk);
        let start = Lsn(u64::from(seg));
        let whole = decode(&stream, start, seg, blk, None, false);
        check_records(&whole.records, seg);
        check_synthetic(&whole, &written);
        let chunked = decode(&stream, start, seg, blk, Some(*seed), true);
        assert_eq!(
            chunked, whole,
            "chunking, snapshot and resume changed the outcome"
        );
        return;
    }
    let start = match stream.get(8..16) {
        Some(b) => {
            let addr = u64::from_le_bytes(b.try_into().unwrap());
            addr - addr % u64::from(blk)
        }
        None => 0,
    };
    let start = Lsn(start);
    let whole = decode(stream, start, seg, blk, None, false);
    check_records(&whole.records, seg);
    let chunked = decode(stream, start, seg, blk, Some(*seed), false);
    assert_eq!(chunked, whole, "chunking changed the outcome");
    let resumed = decode(stream, start, seg, blk, Some(seed.wrapping_add(1)), true);
    assert_eq!(resumed, whole, "snapshot and resume changed the outcome");

    // Whole segments, summarized as 1 MiB ones (cheap to build; the rest is zeros): the start
    // of a 16 MiB segment, such as the real seeds, is relabelled as one.
    if let Some(h) = stream.get(..40) {
        let header_seg = u32::from_le_bytes(h[32..36].try_into().unwrap());
        if (header_seg == 1 << 20 || header_seg == 16 << 20) && start.0.is_multiple_of(u64::from(header_seg))
        {
            check_summary(stream, start, 1 << 20);
        }
    }
});
