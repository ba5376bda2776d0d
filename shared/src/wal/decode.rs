//! A sans-IO decoder of PostgreSQL WAL records (PostgreSQL 13 to 19; what differs between
//! versions is in [`super::version`]).
//!
//! Feed it the bytes of the WAL stream in order, from a segment or page boundary, in chunks of
//! any size ([`WalDecoder::feed`]), and take out complete records ([`WalDecoder::poll`]). It does
//! what PostgreSQL's `xlogreader.c` does to find, check and split records: it validates every
//! page header (`XLogReaderValidatePageHeader`), reassembles records across pages and segments,
//! checks each record's header and CRC-32C (`ValidXLogRecordHeader`, `ValidXLogRecord`) and walks
//! the block headers to find the main data (`DecodeXLogRecord`). From the main data it reads what
//! a time index needs: commit and abort timestamps, restore points and WAL switches; and it hands
//! on the first block's relation and the start of the main data, from which
//! [`super::changes`] finds destructive transactions.
//!
//! Memory does not grow with record size: a record is checked as it streams past, keeping only
//! its 24-byte header, the first [`HEAD_CAP`] bytes (block headers) and the first
//! [`MAIN_CAP`] bytes of its main data ([`XACT_MAIN_CAP`] for a commit record, whose list of
//! dropped relations follows its subtransactions). So a decoder's whole state between two
//! segments is at most [`MAX_STATE_JSON_LEN`] bytes of JSON ([`DecoderState`]), which can be
//! stored and resumed in another process. What a record is, and the parsing of its block
//! headers and main data, is in [`super::record`].
//!
//! Byte order is little-endian, as everywhere in walvault (x86_64 and aarch64 clusters).

use serde::{Deserialize, Serialize};

use super::crc32c;
use super::lsn::Lsn;
use super::page::{LONG_HEADER_LEN, XLP_LONG_HEADER};
pub use super::pgtime::PgTime;
use super::record::{
    BlockPayload, Layout, XLOG_XACT_COMMIT, XLOG_XACT_COMMIT_PREPARED, XLOG_XACT_OPMASK, block_cap, classify,
    keeps_first_block, parse_layout, u16_at, u32_at, u64_at,
};
pub use super::record::{RM_XACT_ID, RM_XLOG_ID, RecordKind, RelFileLocator, WalRecord};
use super::version::{self, WalFormat};

/// `SizeOfXLogShortPHD`.
const SHORT_HEADER_LEN: usize = 24;
/// `XLP_FIRST_IS_CONTRECORD`: the page starts with the rest of a record.
const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;

/// `SizeOfXLogRecord`.
const RECORD_HEADER_LEN: u32 = 24;
/// `offsetof(XLogRecord, xl_crc)`: the header bytes the CRC covers.
const CRC_OFFSET: usize = 20;
/// `MAXALIGN`: records start on 8-byte boundaries.
const ALIGN: u64 = 8;
/// Largest `xl_tot_len` accepted. PostgreSQL's reader cannot allocate more than `MaxAllocSize`
/// (1 GiB - 1) and 16+ writers stop at 1020 MiB; anything above is garbage, not a record.
pub const MAX_RECORD_LEN: u32 = (1 << 30) + (1 << 16);

/// Bytes of a record body kept for the block headers. The largest header section PostgreSQL
/// writes is 33 block references of 27 bytes plus origin, top-level xid and main data headers
/// (about 900 bytes); a longer one is refused as malformed.
pub const HEAD_CAP: usize = 2048;
/// Bytes of main data kept: `sizeof(xl_restore_point)`, the largest prefix read.
pub const MAIN_CAP: usize = 72;
/// Main data kept of a commit record: its timestamp, `xinfo`, database, subtransactions and the
/// relation files it drops, for up to thousands of each (`xl_xact_parsed_commit`).
pub const XACT_MAIN_CAP: usize = 32 * 1024;

/// Largest JSON a [`DecoderState`] serializes to (47,017 bytes), for any state
/// [`WalDecoder::resume`] accepts: the widest phase (a record in progress) with every number at
/// its widest (`u64::MAX` has 20 digits, `u32::MAX` 10, an LSN `FFFFFFFF/FFFFFFFF`), plus its
/// three byte fields as base64 (4 characters per 3 bytes, padded), each at its cap: the 24-byte
/// record header, [`HEAD_CAP`] bytes of block headers and [`XACT_MAIN_CAP`] bytes of main data.
/// The decoder never holds a full head and main data at once (the head is let go when the main
/// data is found), so the states it writes stay 2,732 bytes below; a state written before the byte
/// fields were base64 (JSON arrays of numbers, up to 4 characters a byte) can be three times
/// larger, and still reads. The unit test `the_worst_case_state_is_exactly_the_bound` builds
/// that state.
pub const MAX_STATE_JSON_LEN: usize = STATE_JSON_SKELETON.len()
    + base64_len(RECORD_HEADER_LEN as usize)
    + base64_len(HEAD_CAP)
    + base64_len(XACT_MAIN_CAP);

/// The worst-case state's JSON with its byte fields empty: what [`MAX_STATE_JSON_LEN`] adds them to.
const STATE_JSON_SKELETON: &str = concat!(
    r#"{"segment_size":4294967295,"block_size":4294967295,"pos":"FFFFFFFF/FFFFFFFF","#,
    r#""phase":{"Record":{"lsn":18446744073709551615,"tot_len":4294967295,"got":4294967295,"#,
    r#""header":"","crc":4294967295,"head":"","#,
    r#""layout":{"main_off":4294967295,"main_len":4294967295,"rel":[4294967295,4294967295,4294967295],"#,
    r#""first":{"off":4294967295,"fork":255,"data_len":65535,"image_len":65535,"hole_offset":65535,"#,
    r#""hole_length":65535,"#,
    r#""image_info":255,"compressed":false}},"#,
    r#""main":""}},"magic":65535,"system_identifier":18446744073709551615,"timeline":4294967295,"#,
    r#""prev":"FFFFFFFF/FFFFFFFF"}"#,
);

/// Length of `n` bytes in padded base64.
const fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// `RM_MIN_CUSTOM_ID`: custom resource managers exist from PostgreSQL 15.
const RM_MIN_CUSTOM_ID: u8 = 128;

/// Why the WAL cannot be decoded further. Every variant says where (`lsn`): the page for page
/// problems, the record for record problems.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("at {lsn}: implausible geometry, {segment_size}-byte segments of {block_size}-byte pages")]
    InvalidGeometry {
        lsn: Lsn,
        segment_size: u32,
        block_size: u32,
    },
    #[error("at {lsn}: decoding must start at a page boundary")]
    UnalignedStart { lsn: Lsn },
    #[error("at {lsn}: {len} bytes is not a whole segment of {segment_size} bytes")]
    WrongSegmentLength { lsn: Lsn, len: usize, segment_size: u32 },
    #[error("at {lsn}: the carried decoder state does not continue here: {reason}")]
    BadCarry { lsn: Lsn, reason: String },
    #[error("at {lsn}: unknown WAL page magic {magic:#06X} (not {range})", range = version::supported_range())]
    BadMagic { lsn: Lsn, magic: u16 },
    #[error("at {lsn}: page magic changed from {expected:#06X} to {found:#06X}")]
    MagicChanged { lsn: Lsn, expected: u16, found: u16 },
    #[error("at {lsn}: invalid page info bits {info:#06X}")]
    BadPageInfo { lsn: Lsn, info: u16 },
    #[error("at {lsn}: unexpected page address {found} (recycled or misplaced page)")]
    BadPageAddress { lsn: Lsn, found: Lsn },
    #[error(
        "at {lsn}: page header says {segment_size}-byte segments of {block_size}-byte pages, \
         not what the stream started with"
    )]
    GeometryMismatch {
        lsn: Lsn,
        segment_size: u32,
        block_size: u32,
    },
    #[error("at {lsn}: system identifier changed from {expected} to {found}")]
    SystemIdChanged { lsn: Lsn, expected: u64, found: u64 },
    #[error("at {lsn}: timeline {found} on a page after timeline {previous}")]
    TimelineBackwards { lsn: Lsn, previous: u32, found: u32 },
    #[error("at {lsn}: a record continues onto this page, but the page has no contrecord flag")]
    MissingContrecord { lsn: Lsn },
    #[error("at {lsn}: page starts with a continuation, but no record is in progress")]
    UnexpectedContrecord { lsn: Lsn },
    #[error("at {lsn}: continuation length {found}, expected {expected}")]
    BadContrecordLength { lsn: Lsn, expected: u32, found: u32 },
    #[error("at {lsn}: invalid record length {len}")]
    BadRecordLength { lsn: Lsn, len: u32 },
    #[error("at {lsn}: record with incorrect prev-link {found} (expected {expected})")]
    BadPrevLink { lsn: Lsn, expected: String, found: Lsn },
    #[error("at {lsn}: invalid resource manager id {rmid}")]
    BadRmgr { lsn: Lsn, rmid: u8 },
    #[error("at {lsn}: record CRC {stored:#010X} does not match its contents ({computed:#010X})")]
    CrcMismatch { lsn: Lsn, stored: u32, computed: u32 },
    #[error("at {lsn}: malformed record: {reason}")]
    Malformed { lsn: Lsn, reason: &'static str },
}

impl DecodeError {
    /// Where it happened.
    pub fn lsn(&self) -> Lsn {
        match self {
            DecodeError::InvalidGeometry { lsn, .. }
            | DecodeError::UnalignedStart { lsn }
            | DecodeError::WrongSegmentLength { lsn, .. }
            | DecodeError::BadCarry { lsn, .. }
            | DecodeError::BadMagic { lsn, .. }
            | DecodeError::MagicChanged { lsn, .. }
            | DecodeError::BadPageInfo { lsn, .. }
            | DecodeError::BadPageAddress { lsn, .. }
            | DecodeError::GeometryMismatch { lsn, .. }
            | DecodeError::SystemIdChanged { lsn, .. }
            | DecodeError::TimelineBackwards { lsn, .. }
            | DecodeError::MissingContrecord { lsn }
            | DecodeError::UnexpectedContrecord { lsn }
            | DecodeError::BadContrecordLength { lsn, .. }
            | DecodeError::BadRecordLength { lsn, .. }
            | DecodeError::BadPrevLink { lsn, .. }
            | DecodeError::BadRmgr { lsn, .. }
            | DecodeError::CrcMismatch { lsn, .. }
            | DecodeError::Malformed { lsn, .. } => *lsn,
        }
    }
}

/// A record being read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Partial {
    lsn: u64,
    tot_len: u32,
    /// Bytes of the record read so far, header included.
    got: u32,
    #[serde(with = "byte_field::fixed")]
    header: [u8; RECORD_HEADER_LEN as usize],
    /// CRC register over the body so far.
    crc: u32,
    /// The first body bytes, until the block headers have been parsed.
    #[serde(with = "byte_field")]
    head: Vec<u8>,
    layout: Option<Layout>,
    /// The first [`main_cap`] bytes of the main data.
    #[serde(with = "byte_field")]
    main: Vec<u8>,
    /// The first block's image and data, for the catalog inserts [`super::catalog_rows`] reads
    /// (at most [`super::record::BLOCK_CAP`] bytes, and never with a commit's main data).
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "byte_field")]
    block: Vec<u8>,
}

/// The stored form of a [`Partial`]'s bytes: written as base64 text (standard alphabet, padded),
/// read as that or as a JSON array of numbers, which is how states were written before
/// (docs/FORMAT.md, the summary's `carry`).
mod byte_field {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_any(Bytes)
    }

    struct Bytes;

    impl<'de> Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("base64 text or an array of byte values")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
            STANDARD.decode(v).map_err(E::custom)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // The hint comes from untrusted input: the caps bound what a valid state holds.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(super::XACT_MAIN_CAP));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }

    /// The same for a fixed-size array (the record header).
    pub mod fixed {
        use serde::de::Error;
        use serde::{Deserializer, Serializer};

        pub fn serialize<S: Serializer, const N: usize>(bytes: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
            super::serialize(bytes, s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u8; N], D::Error> {
            let v = super::deserialize(d)?;
            let len = v.len();
            v.try_into()
                .map_err(|_| D::Error::invalid_length(len, &format!("{N} bytes").as_str()))
        }
    }
}

/// How much of a record's main data is kept: see [`XACT_MAIN_CAP`].
fn main_cap(header: &[u8; RECORD_HEADER_LEN as usize]) -> usize {
    let (info, rmid) = (header[16], header[17]);
    let commit = matches!(
        info & XLOG_XACT_OPMASK,
        XLOG_XACT_COMMIT | XLOG_XACT_COMMIT_PREPARED
    );
    if rmid == RM_XACT_ID && commit {
        XACT_MAIN_CAP
    } else {
        MAIN_CAP
    }
}

impl Partial {
    fn body_len(&self) -> u32 {
        self.tot_len - RECORD_HEADER_LEN
    }
    fn body_got(&self) -> u32 {
        self.got.saturating_sub(RECORD_HEADER_LEN)
    }
}

/// Where the decoder is in the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Phase {
    /// At the first page, not synchronised yet: a continuation there is skipped.
    Unsynced,
    /// Skipping the rest of a record that began before decoding did.
    SkipContinuation { remaining: u32 },
    /// Skipping unused bytes up to `until`: alignment, or the segment's rest after a switch.
    Padding { until: u64 },
    /// Where a record may start.
    Boundary,
    /// Inside a record.
    Record(Box<Partial>),
    /// A zero record length at `at`: valid WAL ends there.
    Ended { at: u64 },
}

/// Everything a [`WalDecoder`] knows between two bytes of the stream, without unconsumed input:
/// enough to resume decoding elsewhere (in another process, from the next segment file).
/// Its JSON is at most [`MAX_STATE_JSON_LEN`] bytes (46 KB), whatever the records: mostly the
/// main data kept of a commit record in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecoderState {
    segment_size: u32,
    block_size: u32,
    /// LSN of the next byte the decoder expects.
    pos: Lsn,
    phase: Phase,
    magic: Option<u16>,
    system_identifier: Option<u64>,
    timeline: u32,
    /// Start of the last record decoded (`xl_prev` of the next one).
    prev: Option<Lsn>,
}

impl DecoderState {
    /// LSN of the next byte this state expects.
    pub fn next_lsn(&self) -> Lsn {
        self.pos
    }

    /// Start of a record in progress, if one is.
    pub fn pending_record(&self) -> Option<Lsn> {
        match &self.phase {
            Phase::Record(p) => Some(Lsn(p.lsn)),
            _ => None,
        }
    }

    /// Whether valid WAL has ended (a zero record length was met).
    pub fn ended(&self) -> Option<Lsn> {
        match self.phase {
            Phase::Ended { at } => Some(Lsn(at)),
            _ => None,
        }
    }

    pub fn segment_size(&self) -> u32 {
        self.segment_size
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// PostgreSQL major version of the pages seen so far, if any.
    pub fn pg_version(&self) -> Option<u32> {
        self.format().map(|f| f.major)
    }

    /// The WAL format of the pages seen so far, if any.
    fn format(&self) -> Option<&'static WalFormat> {
        self.magic.and_then(version::for_magic)
    }

    /// Check the invariants the decoder relies on (a state read back from disk is untrusted).
    fn check(&self) -> Result<(), DecodeError> {
        let bad = |reason: &str| DecodeError::BadCarry {
            lsn: self.pos,
            reason: reason.to_string(),
        };
        geometry_error(self.pos, self.segment_size, self.block_size).map_or(Ok(()), Err)?;
        if let Some(m) = self.magic
            && version::for_magic(m).is_none()
        {
            return Err(bad("unknown page magic"));
        }
        let pos = self.pos.0;
        let at_page = pos.is_multiple_of(u64::from(self.block_size));
        match &self.phase {
            Phase::Unsynced if !at_page => Err(bad("not at a page boundary")),
            Phase::SkipContinuation { remaining: 0 } => Err(bad("empty continuation")),
            Phase::Padding { until } if *until < pos => Err(bad("padding ends before position")),
            Phase::Boundary if !pos.is_multiple_of(ALIGN) => Err(bad("record boundary not aligned")),
            Phase::Record(p) => {
                let ok = p.tot_len >= RECORD_HEADER_LEN
                    && p.tot_len <= MAX_RECORD_LEN
                    && p.got < p.tot_len
                    && p.lsn.checked_add(u64::from(p.got)).is_some_and(|e| e <= pos)
                    && p.head.len() <= HEAD_CAP
                    && p.main.len() <= main_cap(&p.header)
                    && p.block.len() <= block_cap(p.header[17], p.header[16])
                    && (p.block.is_empty() || p.layout.is_some())
                    && p.layout.is_none_or(|l| {
                        p.head.is_empty()
                            && u64::from(l.main_off) + u64::from(l.main_len) == u64::from(p.body_len())
                    })
                    && (p.layout.is_some() || p.head.len() == p.body_got() as usize);
                if ok {
                    Ok(())
                } else {
                    Err(bad("inconsistent record in progress"))
                }
            }
            _ => Ok(()),
        }
    }
}

fn geometry_error(lsn: Lsn, segment_size: u32, block_size: u32) -> Option<DecodeError> {
    // initdb allows 1 MiB to 1 GiB segments and 1 to 64 KiB WAL blocks, powers of two.
    let ok = segment_size.is_power_of_two()
        && block_size.is_power_of_two()
        && (1 << 10..=1 << 16).contains(&block_size)
        && (1 << 20..=1 << 30).contains(&segment_size);
    (!ok).then_some(DecodeError::InvalidGeometry {
        lsn,
        segment_size,
        block_size,
    })
}

/// What one step of the state machine did.
enum Step {
    /// Consumed this many bytes (possibly 0 after a change of phase).
    Consumed(usize),
    /// Consumed this many bytes and completed a record.
    Record(usize, WalRecord),
    /// Cannot go on without more input (or valid WAL has ended).
    NeedMore,
}

/// The decoder. See the module documentation.
#[derive(Debug, Clone)]
pub struct WalDecoder {
    state: DecoderState,
    /// Fed, not yet consumed bytes: `input[consumed..]` starts at `state.pos`.
    input: Vec<u8>,
    consumed: usize,
    failed: Option<DecodeError>,
}

fn align_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to).saturating_mul(to)
}

impl WalDecoder {
    /// A decoder for the stream starting at `start`, which must be a page boundary (normally a
    /// segment boundary). A record continuing from before `start` is skipped, like
    /// `pg_waldump` does. Invalid arguments surface as an error from the first [`poll`](Self::poll).
    pub fn new(start: Lsn, segment_size: u32, block_size: u32) -> Self {
        let failed = geometry_error(start, segment_size, block_size).or_else(|| {
            (!start.0.is_multiple_of(u64::from(block_size)))
                .then_some(DecodeError::UnalignedStart { lsn: start })
        });
        WalDecoder {
            state: DecoderState {
                segment_size,
                block_size,
                pos: start,
                phase: Phase::Unsynced,
                magic: None,
                system_identifier: None,
                timeline: 0,
                prev: None,
            },
            input: Vec::new(),
            consumed: 0,
            failed,
        }
    }

    /// Resume from a state taken with [`snapshot`](Self::snapshot), expecting bytes from
    /// [`DecoderState::next_lsn`] on.
    pub fn resume(state: DecoderState) -> Result<Self, DecodeError> {
        state.check()?;
        Ok(WalDecoder {
            state,
            input: Vec::new(),
            consumed: 0,
            failed: None,
        })
    }

    /// The state to resume from, once every fed byte has been consumed (poll until `None`
    /// first). `None` while input is pending or after an error.
    pub fn snapshot(&self) -> Option<DecoderState> {
        (self.failed.is_none() && self.consumed == self.input.len()).then(|| self.state.clone())
    }

    /// Append bytes continuing the stream at [`next_feed_lsn`](Self::next_feed_lsn). Bytes fed
    /// after the end of valid WAL or after an error are dropped.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_some() || self.state.ended().is_some() {
            return;
        }
        if self.consumed > 0 {
            self.input.drain(..self.consumed);
            self.consumed = 0;
        }
        self.input.extend_from_slice(bytes);
    }

    /// LSN the next fed byte is taken to have.
    pub fn next_feed_lsn(&self) -> Lsn {
        let pending = (self.input.len() - self.consumed) as u64;
        Lsn(self.state.pos.0.saturating_add(pending))
    }

    /// LSN up to which the fed bytes have been consumed.
    pub fn position(&self) -> Lsn {
        self.state.pos
    }

    /// Where valid WAL ended (a record length of zero), once seen: `poll` returns `None` for
    /// ever after.
    pub fn ended(&self) -> Option<Lsn> {
        self.state.ended()
    }

    /// Start of the record being reassembled, if any.
    pub fn pending_record(&self) -> Option<Lsn> {
        self.state.pending_record()
    }

    /// PostgreSQL major version of the pages seen so far.
    pub fn pg_version(&self) -> Option<u32> {
        self.state.pg_version()
    }

    /// The next complete record; `Ok(None)` when more bytes are needed (or WAL has ended, see
    /// [`ended`](Self::ended)). After an error, returns that error again.
    pub fn poll(&mut self) -> Result<Option<WalRecord>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let input = std::mem::take(&mut self.input);
        let mut used = self.consumed;
        let result = loop {
            match self.step(&input[used..]) {
                Ok(Step::Consumed(n)) => used += n,
                Ok(Step::Record(n, rec)) => {
                    used += n;
                    break Ok(Some(rec));
                }
                Ok(Step::NeedMore) => break Ok(None),
                Err(e) => {
                    self.failed = Some(e.clone());
                    break Err(e);
                }
            }
        };
        self.input = input;
        self.consumed = used;
        result
    }

    fn advance(&mut self, n: usize) {
        // Saturating: a hostile start near u64::MAX stalls on page address checks, no overflow.
        self.state.pos = Lsn(self.state.pos.0.saturating_add(n as u64));
    }

    /// One move of the state machine over `rest`, the unconsumed input starting at `pos`.
    fn step(&mut self, rest: &[u8]) -> Result<Step, DecodeError> {
        let pos = self.state.pos.0;
        let block = u64::from(self.state.block_size);
        let image_bits = self.state.format().map_or(0, |f| f.image_compressed_bits);
        match &mut self.state.phase {
            Phase::Ended { .. } => return Ok(Step::NeedMore),
            Phase::Padding { until } => {
                let until = *until;
                return Ok(self.skip_padding(rest, pos, until));
            }
            _ => {}
        }
        if pos.is_multiple_of(block) {
            return self.read_page_header(rest, pos);
        }
        // Bytes left on this page (never 0 here).
        let room = usize::try_from(block - pos % block).unwrap_or(usize::MAX);
        match &mut self.state.phase {
            Phase::Unsynced => Err(DecodeError::UnalignedStart { lsn: Lsn(pos) }),
            Phase::SkipContinuation { remaining } => {
                let n = rest.len().min(room).min(*remaining as usize);
                if n == 0 {
                    return Ok(Step::NeedMore);
                }
                *remaining -= n as u32;
                if *remaining == 0 {
                    self.state.phase = Phase::Padding {
                        until: align_up(pos.saturating_add(n as u64), ALIGN),
                    };
                }
                self.advance(n);
                Ok(Step::Consumed(n))
            }
            Phase::Boundary => self.start_record(rest, pos),
            Phase::Record(p) => {
                let n;
                if p.got < RECORD_HEADER_LEN {
                    let at = p.got as usize;
                    n = rest.len().min(room).min(RECORD_HEADER_LEN as usize - at);
                    if n == 0 {
                        return Ok(Step::NeedMore);
                    }
                    p.header[at..at + n].copy_from_slice(&rest[..n]);
                    p.got += n as u32;
                    if p.got == RECORD_HEADER_LEN {
                        let (header, lsn) = (p.header, p.lsn);
                        self.check_record_header(&header, lsn)?;
                    }
                } else {
                    n = rest.len().min(room).min((p.tot_len - p.got) as usize);
                    if n == 0 {
                        return Ok(Step::NeedMore);
                    }
                    absorb_body(p, &rest[..n], image_bits)?;
                    p.got += n as u32;
                }
                self.advance(n);
                let complete = matches!(&self.state.phase, Phase::Record(p) if p.got == p.tot_len);
                if !complete {
                    return Ok(Step::Consumed(n));
                }
                match std::mem::replace(&mut self.state.phase, Phase::Boundary) {
                    Phase::Record(p) => Ok(Step::Record(n, self.finish_record(*p)?)),
                    other => {
                        self.state.phase = other;
                        Ok(Step::Consumed(n))
                    }
                }
            }
            Phase::Ended { .. } | Phase::Padding { .. } => Ok(Step::NeedMore),
        }
    }

    /// The alignment padding after a skipped continuation, up to `until`; then a record boundary.
    #[inline]
    fn skip_padding(&mut self, rest: &[u8], pos: u64, until: u64) -> Step {
        if pos >= until {
            self.state.phase = Phase::Boundary;
            return Step::Consumed(0);
        }
        let n = rest.len().min(usize::try_from(until - pos).unwrap_or(usize::MAX));
        if n == 0 {
            return Step::NeedMore;
        }
        self.advance(n);
        Step::Consumed(n)
    }

    /// The header of the page starting at `pos` (long on a segment's first page), checked.
    #[inline]
    fn read_page_header(&mut self, rest: &[u8], pos: u64) -> Result<Step, DecodeError> {
        let long = pos.is_multiple_of(u64::from(self.state.segment_size));
        let len = if long { LONG_HEADER_LEN } else { SHORT_HEADER_LEN };
        let Some(header) = rest.get(..len) else {
            return Ok(Step::NeedMore);
        };
        self.page_header(header, long)?;
        self.advance(len);
        Ok(Step::Consumed(len))
    }

    /// At a record boundary: the record's length, then its reassembly begins; a length of zero
    /// is the end of valid WAL.
    #[inline]
    fn start_record(&mut self, rest: &[u8], pos: u64) -> Result<Step, DecodeError> {
        // Records are 8-aligned and pages end on 8-byte boundaries, so the length
        // field is always on this page.
        let Some(len) = rest.get(..4) else {
            return Ok(Step::NeedMore);
        };
        let tot_len = u32_at(len, 0);
        if tot_len == 0 {
            self.state.phase = Phase::Ended { at: pos };
            return Ok(Step::NeedMore);
        }
        if !(RECORD_HEADER_LEN..=MAX_RECORD_LEN).contains(&tot_len) {
            return Err(DecodeError::BadRecordLength {
                lsn: Lsn(pos),
                len: tot_len,
            });
        }
        self.state.phase = Phase::Record(Box::new(Partial {
            lsn: pos,
            tot_len,
            got: 0,
            header: [0; RECORD_HEADER_LEN as usize],
            crc: crc32c::INIT,
            head: Vec::new(),
            layout: None,
            main: Vec::new(),
            block: Vec::new(),
        }));
        Ok(Step::Consumed(0))
    }

    /// `XLogReaderValidatePageHeader`, plus the contrecord bookkeeping of `XLogDecodeNextRecord`.
    fn page_header(&mut self, h: &[u8], long: bool) -> Result<(), DecodeError> {
        let (info, format) = self.validate_page_header(h, long)?;
        self.follow_contrecord(h, info, format)
    }

    /// `XLogReaderValidatePageHeader`: magic, flags, address, timeline, and on a segment's first
    /// page its geometry and system identifier; the page's magic, timeline and system identifier
    /// are then the stream's. Returns the page's `xlp_info` and format.
    fn validate_page_header(
        &mut self,
        h: &[u8],
        long: bool,
    ) -> Result<(u16, &'static WalFormat), DecodeError> {
        let st = &mut self.state;
        let lsn = st.pos;
        let magic = u16_at(h, 0);
        let Some(format) = version::for_magic(magic) else {
            return Err(DecodeError::BadMagic { lsn, magic });
        };
        if let Some(expected) = st.magic
            && expected != magic
        {
            return Err(DecodeError::MagicChanged {
                lsn,
                expected,
                found: magic,
            });
        }
        let info = u16_at(h, 2);
        // The long header is on, and only on, the first page of each segment.
        if info & !format.all_page_flags != 0 || (info & XLP_LONG_HEADER != 0) != long {
            return Err(DecodeError::BadPageInfo { lsn, info });
        }
        let page_addr = Lsn(u64_at(h, 8));
        if page_addr != lsn {
            return Err(DecodeError::BadPageAddress {
                lsn,
                found: page_addr,
            });
        }
        let tli = u32_at(h, 4);
        if tli < st.timeline || tli == 0 {
            return Err(DecodeError::TimelineBackwards {
                lsn,
                previous: st.timeline,
                found: tli,
            });
        }
        if long {
            let sysid = u64_at(h, 24);
            let (segment_size, block_size) = (u32_at(h, 32), u32_at(h, 36));
            if segment_size != st.segment_size || block_size != st.block_size {
                return Err(DecodeError::GeometryMismatch {
                    lsn,
                    segment_size,
                    block_size,
                });
            }
            if let Some(expected) = st.system_identifier
                && expected != sysid
            {
                return Err(DecodeError::SystemIdChanged {
                    lsn,
                    expected,
                    found: sysid,
                });
            }
            st.system_identifier = Some(sysid);
        }
        st.magic = Some(magic);
        st.timeline = tli;
        Ok((info, format))
    }

    /// The contrecord bookkeeping of `XLogDecodeNextRecord` at a page start: a record continued
    /// from the previous page must be continued here with the bytes it lacks; the first page
    /// read skips the continuation of a record begun before it.
    fn follow_contrecord(&mut self, h: &[u8], info: u16, format: &WalFormat) -> Result<(), DecodeError> {
        let st = &mut self.state;
        let lsn = st.pos;
        let rem_len = u32_at(h, 16);
        let contrecord = info & XLP_FIRST_IS_CONTRECORD != 0;
        // XLP_FIRST_IS_OVERWRITE_CONTRECORD: the continuation the previous page promised was
        // lost in a crash; the record that began before this page is abandoned.
        let overwrite = info & format.overwrite_contrecord != 0;
        match &st.phase {
            Phase::Unsynced => {
                st.phase = match contrecord && rem_len > 0 && !overwrite {
                    true => Phase::SkipContinuation { remaining: rem_len },
                    false => Phase::Boundary,
                };
            }
            // A crash lost the rest of the record; recovery wrote new WAL from this page on.
            Phase::SkipContinuation { .. } | Phase::Record(_) if overwrite => {
                st.phase = Phase::Boundary;
            }
            Phase::SkipContinuation { remaining } => {
                if !contrecord {
                    return Err(DecodeError::MissingContrecord { lsn });
                }
                if rem_len != *remaining {
                    return Err(DecodeError::BadContrecordLength {
                        lsn,
                        expected: *remaining,
                        found: rem_len,
                    });
                }
            }
            Phase::Record(p) => {
                if !contrecord {
                    return Err(DecodeError::MissingContrecord { lsn });
                }
                if rem_len != p.tot_len - p.got {
                    return Err(DecodeError::BadContrecordLength {
                        lsn,
                        expected: p.tot_len - p.got,
                        found: rem_len,
                    });
                }
            }
            Phase::Boundary if contrecord => {
                return Err(DecodeError::UnexpectedContrecord { lsn });
            }
            Phase::Boundary | Phase::Padding { .. } | Phase::Ended { .. } => {}
        }
        Ok(())
    }

    /// `ValidXLogRecordHeader`.
    fn check_record_header(&self, h: &[u8; RECORD_HEADER_LEN as usize], lsn: u64) -> Result<(), DecodeError> {
        let rmid = h[17];
        let format = self.state.format();
        let max_builtin = format.map_or(0, |f| f.max_builtin_rmgr);
        let custom_ok = format.is_some_and(|f| f.custom_rmgrs);
        if rmid > max_builtin && !(custom_ok && rmid >= RM_MIN_CUSTOM_ID) {
            return Err(DecodeError::BadRmgr { lsn: Lsn(lsn), rmid });
        }
        let found = Lsn(u64_at(h, 8));
        // Sequential reading knows the previous record exactly; after a skipped continuation
        // the link can only be checked to point backwards.
        let bad = match self.state.prev {
            Some(prev) => (found != prev).then(|| prev.to_string()),
            None => (found.0 >= lsn).then(|| format!("< {}", Lsn(lsn))),
        };
        match bad {
            Some(expected) => Err(DecodeError::BadPrevLink {
                lsn: Lsn(lsn),
                expected,
                found,
            }),
            None => Ok(()),
        }
    }

    /// CRC check, main data interpretation and the move to the next record position.
    fn finish_record(&mut self, mut p: Partial) -> Result<WalRecord, DecodeError> {
        let lsn = Lsn(p.lsn);
        let image_bits = self.state.format().map_or(0, |f| f.image_compressed_bits);
        if p.layout.is_none() {
            // A body shorter than HEAD_CAP (or empty): parse it whole now.
            let head = std::mem::take(&mut p.head);
            let malformed = |reason| DecodeError::Malformed { lsn, reason };
            p.layout = Some(
                parse_layout(&head, p.body_len(), image_bits)
                    .map_err(malformed)?
                    .ok_or(malformed("record data shorter than its block headers"))?,
            );
            capture(&mut p, &head, 0);
        }
        let computed = !crc32c::update(p.crc, &p.header[..CRC_OFFSET]);
        let stored = u32_at(&p.header, CRC_OFFSET);
        if computed != stored {
            return Err(DecodeError::CrcMismatch {
                lsn,
                stored,
                computed,
            });
        }
        let (xid, prev, info, rmid) = (
            u32_at(&p.header, 4),
            Lsn(u64_at(&p.header, 8)),
            p.header[16],
            p.header[17],
        );
        let kind = classify(rmid, info, &p.main).map_err(|reason| DecodeError::Malformed { lsn, reason })?;
        let layout = p.layout.expect("layout parsed above");
        let block = first_block(&mut p, &layout);
        let aligned = align_up(self.state.pos.0, ALIGN);
        let end = match kind {
            // Like xlogreader: the switch record "extends" to the end of its segment.
            RecordKind::Switch => align_up(aligned, u64::from(self.state.segment_size)),
            _ => aligned,
        };
        self.state.phase = Phase::Padding { until: end };
        self.state.prev = Some(lsn);
        Ok(WalRecord {
            lsn,
            end: Lsn(end),
            prev,
            xid,
            rmid,
            info,
            total_len: p.tot_len,
            kind,
            block_rel: layout.rel.map(|[spc, db, rel]| RelFileLocator { spc, db, rel }),
            block,
            main: p.main,
            main_len: layout.main_len,
        })
    }
}

/// Take in `chunk`, the next body bytes of `p` (before `p.got` is advanced).
fn absorb_body(p: &mut Partial, chunk: &[u8], image_bits: u8) -> Result<(), DecodeError> {
    p.crc = crc32c::update(p.crc, chunk);
    let off = p.body_got();
    if p.layout.is_some() {
        capture(p, chunk, off);
        return Ok(());
    }
    let take = (HEAD_CAP - p.head.len()).min(chunk.len());
    p.head.extend_from_slice(&chunk[..take]);
    let body_len = p.body_len();
    // Parse once the header section must be complete: when HEAD_CAP bytes are in, or (for a
    // short record) at the end, in finish_record.
    if p.head.len() == HEAD_CAP && (HEAD_CAP as u64) < u64::from(body_len) {
        let lsn = Lsn(p.lsn);
        let head = std::mem::take(&mut p.head);
        let malformed = |reason| DecodeError::Malformed { lsn, reason };
        let layout = parse_layout(&head, body_len, image_bits)
            .map_err(malformed)?
            .ok_or(malformed("block headers longer than any PostgreSQL writes"))?;
        p.layout = Some(layout);
        capture(p, &head, 0);
        capture(p, &chunk[take..], off + take as u32);
    }
    Ok(())
}

/// Keep the parts of `chunk` (body bytes from offset `off`) that fall in the first
/// [`main_cap`] bytes of the main data, or in the first block a catalog insert keeps.
fn capture(p: &mut Partial, chunk: &[u8], off: u32) {
    let Some(layout) = p.layout else { return };
    let start = u64::from(layout.main_off);
    let end = start + u64::from(layout.main_len).min(main_cap(&p.header) as u64);
    keep(&mut p.main, start..end, chunk, off);
    if let Some(range) = keeps_first_block(p.header[17], p.header[16], &layout, super::catalog_rows::keeps) {
        // Never past the range's length, whatever a resumed state held already.
        let len = (range.end - range.start) as usize;
        keep(&mut p.block, range, chunk, off);
        p.block.truncate(len);
    }
}

/// Append to `kept` the bytes of `chunk` (body bytes from offset `off`) within `range`.
fn keep(kept: &mut Vec<u8>, range: std::ops::Range<u64>, chunk: &[u8], off: u32) {
    let (c_start, c_end) = (u64::from(off), u64::from(off) + chunk.len() as u64);
    let (s, e) = (range.start.max(c_start), range.end.min(c_end));
    if s < e {
        kept.extend_from_slice(&chunk[(s - c_start) as usize..(e - c_start) as usize]);
    }
}

/// The first block's image and data, when the record kept them whole.
fn first_block(p: &mut Partial, layout: &Layout) -> Option<BlockPayload> {
    let range = keeps_first_block(p.header[17], p.header[16], layout, super::catalog_rows::keeps)?;
    let header = layout.first?;
    (p.block.len() as u64 == range.end - range.start).then(|| BlockPayload {
        header,
        bytes: std::mem::take(&mut p.block),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::record::{XLOG_RESTORE_POINT, XLOG_XACT_ABORT, XLOG_XACT_ABORT_PREPARED};
    use crate::wal::testwal::{self, WalWriter};
    use base64::Engine;
    use proptest::prelude::*;

    const SEG: u32 = 1 << 20;
    const BLK: u32 = 8192;

    /// All records of `bytes` (a stream from `start`), fed in chunks of `chunk` bytes.
    fn decode_chunked(
        start: u64,
        bytes: &[u8],
        chunk: usize,
    ) -> (Vec<WalRecord>, Result<(), DecodeError>, WalDecoder) {
        let mut d = WalDecoder::new(Lsn(start), SEG, BLK);
        let mut out = Vec::new();
        for piece in bytes.chunks(chunk.max(1)) {
            d.feed(piece);
            loop {
                match d.poll() {
                    Ok(Some(r)) => out.push(r),
                    Ok(None) => break,
                    Err(e) => return (out, Err(e), d),
                }
            }
        }
        (out, Ok(()), d)
    }

    fn decode_all(start: u64, bytes: &[u8]) -> (Vec<WalRecord>, Result<(), DecodeError>) {
        let (recs, res, _) = decode_chunked(start, bytes, bytes.len());
        (recs, res)
    }

    #[test]
    fn decodes_commit_abort_prepared_and_restore_point_records() {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        let c = w.record(RM_XACT_ID, 0x00, 700, &testwal::xact_body(1_000, true));
        let a = w.record(RM_XACT_ID, 0x20, 701, &testwal::xact_body(-5, false));
        let cp = w.record(RM_XACT_ID, 0x30, 0, &testwal::xact_body(2_000, true));
        let ap = w.record(RM_XACT_ID, 0x40 | 0x80, 0, &testwal::xact_body(3_000, false));
        let rp = w.record(
            RM_XLOG_ID,
            0x70,
            0,
            &testwal::restore_point_body(4_000, "before upgrade"),
        );
        let other = w.record(10, 0x00, 702, &testwal::main_data(&[1, 2, 3]));
        let (recs, res) = decode_all(SEG as u64, &w.bytes);
        res.unwrap();
        let kinds: Vec<_> = recs.iter().map(|r| (r.lsn.0, r.kind.clone())).collect();
        assert_eq!(
            kinds,
            vec![
                (c, RecordKind::Commit { time: PgTime(1_000) }),
                (a, RecordKind::Abort { time: PgTime(-5) }),
                (cp, RecordKind::CommitPrepared { time: PgTime(2_000) }),
                (ap, RecordKind::AbortPrepared { time: PgTime(3_000) }),
                (
                    rp,
                    RecordKind::RestorePoint {
                        time: PgTime(4_000),
                        name: "before upgrade".into()
                    }
                ),
                (other, RecordKind::Other),
            ]
        );
        assert_eq!(
            recs[0].lsn,
            Lsn(SEG as u64 + 40),
            "first record after the long header"
        );
        assert_eq!(recs[0].xid, 700);
        assert_eq!(recs[1].prev, recs[0].lsn);
        assert_eq!(recs[0].end, recs[1].lsn, "end is where the next record starts");
        assert_eq!(recs[5].rmid, 10);
    }

    #[test]
    fn record_spanning_pages_with_blocks_before_the_main_data() {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        w.record(10, 0, 1, &testwal::main_data(&[0; 100]));
        // Two full-page images and block data push the commit timestamp three pages away.
        let body = testwal::blocks_then_main(&[(8192, 10), (8192, 0)], &testwal::commit_main(77));
        let big = w.record(RM_XACT_ID, 0x00, 2, &body);
        let after = w.record(10, 0, 3, &testwal::main_data(&[9; 10]));
        for chunk in [1, 7, 24, 4096, 8192, 100_000] {
            let (recs, res, _) = decode_chunked(SEG as u64, &w.bytes, chunk);
            res.unwrap();
            assert_eq!(recs.len(), 3, "chunk {chunk}");
            assert_eq!(recs[1].lsn.0, big);
            assert_eq!(recs[1].kind, RecordKind::Commit { time: PgTime(77) });
            assert!(recs[1].end.0 > big + 2 * BLK as u64);
            assert_eq!(recs[2].lsn.0, after);
            assert_eq!(recs[2].prev.0, big);
        }
    }

    #[test]
    fn record_header_split_across_pages() {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        w.record(10, 0, 1, &testwal::main_data(&[0; 10]));
        // The next record starts 8 bytes before the page end: its header is split.
        w.fill_until_page_offset(BLK - 8);
        let split = w.record(RM_XACT_ID, 0, 5, &testwal::xact_body(123, true));
        assert_eq!(split % BLK as u64, (BLK - 8) as u64);
        let (recs, res) = decode_all(SEG as u64, &w.bytes);
        res.unwrap();
        let last = recs.last().unwrap();
        assert_eq!(
            (last.lsn.0, last.kind.clone()),
            (split, RecordKind::Commit { time: PgTime(123) })
        );
    }

    #[test]
    fn starting_at_a_segment_skips_a_continuation_spanning_several_pages() {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        w.fill_until_segment_offset(SEG - 3000);
        // Begins 3000 bytes before the segment end, ends on the third page of the next one.
        let spanning = w.record(10, 0, 9, &testwal::main_data_long(&vec![7; 3 * BLK as usize]));
        let next = w.record(RM_XACT_ID, 0, 10, &testwal::xact_body(555, true));
        let second = 2 * SEG as u64;
        assert!(spanning < second && next > second + 2 * BLK as u64);
        let tail = &w.bytes[(second - SEG as u64) as usize..];
        for chunk in [1, 100, 8192, tail.len()] {
            let (recs, res, _) = decode_chunked(second, tail, chunk);
            res.unwrap();
            assert_eq!(recs[0].lsn.0, next, "chunk {chunk}");
            assert_eq!(recs[0].kind, RecordKind::Commit { time: PgTime(555) });
            assert_eq!(
                recs[0].prev.0, spanning,
                "prev-link checked loosely after the skip"
            );
        }
    }

    #[test]
    fn continuation_ending_exactly_at_a_page_end() {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        w.fill_until_segment_offset(SEG - 8);
        // 8 bytes in the first segment, then exactly one page of continuation data.
        let len = 8 + (BLK - 40) as usize;
        w.record(10, 0, 1, &testwal::main_data_long(&vec![1; len - 24 - 5]));
        assert_eq!(w.pos() % BLK as u64, 0);
        let next = w.record(RM_XACT_ID, 0, 2, &testwal::xact_body(9, true));
        assert_eq!(next, 2 * SEG as u64 + BLK as u64 + 24);
        let (recs, res) = decode_all(2 * SEG as u64, &w.bytes[SEG as usize..]);
        res.unwrap();
        assert_eq!(recs[0].lsn.0, next);
    }

    #[test]
    fn corrupted_crc_is_an_error_at_the_record() {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        w.record(10, 0, 1, &testwal::main_data(&[0; 10]));
        let bad = w.record(RM_XACT_ID, 0, 2, &testwal::xact_body(1, true));
        w.record(10, 0, 3, &testwal::main_data(&[0; 10]));
        let at = (bad - SEG as u64) as usize + 24 + 3;
        w.bytes[at] ^= 0x40;
        let mut d = WalDecoder::new(Lsn(SEG as u64), SEG, BLK);
        d.feed(&w.bytes);
        assert!(d.poll().unwrap().is_some());
        let err = d.poll().unwrap_err();
        assert!(matches!(err, DecodeError::CrcMismatch { .. }), "{err}");
        assert_eq!(err.lsn(), Lsn(bad));
        assert!(err.to_string().contains(&Lsn(bad).to_string()), "{err}");
        assert_eq!(d.poll().unwrap_err(), err, "the decoder stays failed");
        assert!(d.snapshot().is_none());
    }

    #[test]
    fn truncated_input_needs_more_then_completes() {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        let body = testwal::blocks_then_main(&[(8192, 0)], &testwal::commit_main(5));
        let lsn = w.record(RM_XACT_ID, 0, 2, &body);
        let mut d = WalDecoder::new(Lsn(SEG as u64), SEG, BLK);
        let cut = w.bytes.len() - 3;
        d.feed(&w.bytes[..cut]);
        assert_eq!(d.poll(), Ok(None));
        assert_eq!(d.poll(), Ok(None));
        assert_eq!(d.pending_record(), Some(Lsn(lsn)));
        d.feed(&w.bytes[cut..]);
        let rec = d.poll().unwrap().unwrap();
        assert_eq!(rec.kind, RecordKind::Commit { time: PgTime(5) });
        assert_eq!(d.poll(), Ok(None));
    }

    #[test]
    fn zero_length_is_the_end_of_wal() {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        w.record(10, 0, 1, &testwal::main_data(&[0; 10]));
        let end = w.pos();
        w.bytes.resize(w.bytes.len() + 100, 0);
        let mut d = WalDecoder::new(Lsn(SEG as u64), SEG, BLK);
        d.feed(&w.bytes);
        assert!(d.poll().unwrap().is_some());
        assert_eq!(d.poll(), Ok(None));
        assert_eq!(d.ended(), Some(Lsn(testwal::align8(end))));
        d.feed(&[1, 2, 3]);
        assert_eq!(d.poll(), Ok(None));
    }

    #[test]
    fn switch_jumps_to_the_next_segment() {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        w.record(10, 0, 1, &testwal::main_data(&[0; 10]));
        let sw = w.switch();
        let next = w.record(RM_XACT_ID, 0, 2, &testwal::xact_body(42, true));
        assert_eq!(next, 2 * SEG as u64 + 40);
        let (recs, res) = decode_all(SEG as u64, &w.bytes);
        res.unwrap();
        assert_eq!(recs[1].lsn.0, sw);
        assert_eq!(recs[1].kind, RecordKind::Switch);
        assert_eq!(recs[1].end, Lsn(2 * SEG as u64));
        assert_eq!(recs[2].lsn.0, next);
        assert_eq!(recs[2].prev.0, sw);
    }

    #[test]
    fn page_problems_are_errors_at_the_page() {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        w.record(10, 0, 1, &testwal::main_data_long(&vec![0; 3 * BLK as usize]));
        let page2 = SEG as usize + BLK as usize;
        // A recycled page: wrong address.
        let mut bytes = w.bytes.clone();
        bytes[BLK as usize + 8] ^= 1;
        let (_, res) = decode_all(SEG as u64, &bytes);
        assert_eq!(
            res.unwrap_err(),
            DecodeError::BadPageAddress {
                lsn: Lsn(page2 as u64),
                found: Lsn(page2 as u64 ^ 1)
            }
        );
        // The continuation flag is missing.
        let mut bytes = w.bytes.clone();
        bytes[BLK as usize + 2] &= !1;
        let err = decode_all(SEG as u64, &bytes).1.unwrap_err();
        assert_eq!(
            err,
            DecodeError::MissingContrecord {
                lsn: Lsn(page2 as u64)
            }
        );
        // A wrong remaining length.
        let mut bytes = w.bytes.clone();
        bytes[BLK as usize + 16] ^= 8;
        let err = decode_all(SEG as u64, &bytes).1.unwrap_err();
        assert!(matches!(err, DecodeError::BadContrecordLength { .. }), "{err}");
        // A foreign magic.
        let mut bytes = w.bytes.clone();
        bytes[0] = 0x01;
        let err = decode_all(SEG as u64, &bytes).1.unwrap_err();
        assert_eq!(
            err,
            DecodeError::BadMagic {
                lsn: Lsn(SEG as u64),
                magic: 0xD101
            }
        );
        // Starting mid-page, or with a page size PostgreSQL cannot have.
        let mut d = WalDecoder::new(Lsn(SEG as u64 + 8), SEG, BLK);
        assert_eq!(
            d.poll(),
            Err(DecodeError::UnalignedStart {
                lsn: Lsn(SEG as u64 + 8)
            })
        );
        let mut d = WalDecoder::new(Lsn(0), SEG, 1000);
        assert!(matches!(d.poll(), Err(DecodeError::InvalidGeometry { .. })));
    }

    #[test]
    fn prev_link_and_length_checks() {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        w.record(10, 0, 1, &testwal::main_data(&[0; 10]));
        let second = w.record(10, 0, 2, &testwal::main_data(&[0; 10]));
        let off = (second - SEG as u64) as usize;
        let mut bytes = w.bytes.clone();
        bytes[off + 8] ^= 0x10;
        let err = decode_all(SEG as u64, &bytes).1.unwrap_err();
        assert!(
            matches!(err, DecodeError::BadPrevLink { lsn, .. } if lsn.0 == second),
            "{err}"
        );
        let mut bytes = w.bytes.clone();
        bytes[off..off + 4].copy_from_slice(&23u32.to_le_bytes());
        assert_eq!(
            decode_all(SEG as u64, &bytes).1,
            Err(DecodeError::BadRecordLength {
                lsn: Lsn(second),
                len: 23
            })
        );
        let mut bytes = w.bytes.clone();
        bytes[off..off + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_all(SEG as u64, &bytes).1,
            Err(DecodeError::BadRecordLength { .. })
        ));
        let mut bytes = w.bytes.clone();
        bytes[off + 17] = 60;
        assert_eq!(
            decode_all(SEG as u64, &bytes).1,
            Err(DecodeError::BadRmgr {
                lsn: Lsn(second),
                rmid: 60
            })
        );
    }

    #[test]
    fn overwritten_contrecord_abandons_the_torn_record() {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        let first = w.record(10, 0, 1, &testwal::main_data(&[0; 10]));
        let torn = w.torn_record(10, 0, 2, &testwal::main_data_long(&vec![3; 2 * BLK as usize]));
        let after = w.record(RM_XLOG_ID, 0xD0, 0, &testwal::main_data(&[0; 16]));
        let (recs, res) = decode_all(SEG as u64, &w.bytes);
        res.unwrap();
        let lsns: Vec<u64> = recs.iter().map(|r| r.lsn.0).collect();
        assert_eq!(lsns, vec![first, after]);
        assert!(torn < after);
        assert_eq!(recs[1].prev.0, first, "the torn record never happened");
    }

    #[test]
    fn image_header_layout_depends_on_the_version() {
        // bimg_info 0x03 is HAS_HOLE | IS_COMPRESSED on 13/14 (a hole_length field follows) but
        // HAS_HOLE | APPLY on 15+ (none follows); 0x05 is HAS_HOLE | PGLZ on 15+.
        for (magic, bimg_info, hole_field) in [
            (0xD10D, 0x03, true),
            (0xD10D, 0x05, false),
            (0xD110, 0x03, false),
            (0xD110, 0x05, true),
            (0xD116, 0x11, true),
        ] {
            let mut w = WalWriter::new(SEG as u64, SEG, BLK);
            w.magic = magic;
            let body = testwal::image_then_main(bimg_info, hole_field, 300, &testwal::commit_main(31));
            w.record(RM_XACT_ID, 0, 1, &body);
            let (recs, res) = decode_all(SEG as u64, &w.bytes);
            res.unwrap_or_else(|e| panic!("magic {magic:#X} info {bimg_info:#X}: {e}"));
            assert_eq!(recs[0].kind, RecordKind::Commit { time: PgTime(31) });
        }
    }

    /// A stream of every record kind the time index reads, plus a heap record with a
    /// full-page image, written with `format`'s magic.
    fn every_kind(format: &WalFormat) -> (WalWriter, Vec<RecordKind>) {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        w.magic = format.magic;
        // HAS_HOLE and this version's first "compressed" bit: a hole length field follows.
        let compressed = format.image_compressed_bits & format.image_compressed_bits.wrapping_neg();
        let image = testwal::image_then_main(0x01 | compressed, true, 300, &[0; 3]);
        w.record(testwal::RM_HEAP_ID, 0, 5, &image);
        w.record(RM_XACT_ID, XLOG_XACT_COMMIT, 5, &testwal::xact_body(11, true));
        w.record(RM_XACT_ID, XLOG_XACT_ABORT, 6, &testwal::xact_body(12, false));
        w.record(
            RM_XACT_ID,
            XLOG_XACT_COMMIT_PREPARED,
            0,
            &testwal::xact_body(13, true),
        );
        w.record(
            RM_XACT_ID,
            XLOG_XACT_ABORT_PREPARED,
            0,
            &testwal::xact_body(14, true),
        );
        w.record(
            RM_XLOG_ID,
            XLOG_RESTORE_POINT,
            0,
            &testwal::restore_point_body(15, "before-drop"),
        );
        w.switch();
        let kinds = vec![
            RecordKind::Other,
            RecordKind::Commit { time: PgTime(11) },
            RecordKind::Abort { time: PgTime(12) },
            RecordKind::CommitPrepared { time: PgTime(13) },
            RecordKind::AbortPrepared { time: PgTime(14) },
            RecordKind::RestorePoint {
                time: PgTime(15),
                name: "before-drop".into(),
            },
            RecordKind::Switch,
        ];
        (w, kinds)
    }

    #[test]
    fn every_supported_version_decodes_commits_aborts_and_restore_points() {
        for format in &version::FORMATS {
            let (w, kinds) = every_kind(format);
            let mut d = WalDecoder::new(Lsn(SEG as u64), SEG, BLK);
            d.feed(&w.bytes);
            let mut found = Vec::new();
            while let Some(r) = d
                .poll()
                .unwrap_or_else(|e| panic!("PostgreSQL {}: {e}", format.major))
            {
                found.push(r.kind);
            }
            assert_eq!(found, kinds, "PostgreSQL {}", format.major);
            assert_eq!(d.pg_version(), Some(format.major));
        }
    }

    #[test]
    fn pg19_pages_and_resource_managers() {
        let (f18, f19) = (version::for_major(18).unwrap(), version::for_major(19).unwrap());
        // RM_XLOG2_ID (22) is a resource manager from 19 on, garbage before.
        for (format, ok) in [(f18, false), (f19, true)] {
            let mut w = WalWriter::new(SEG as u64, SEG, BLK);
            w.magic = format.magic;
            let lsn = w.record(22, 0, 0, &testwal::main_data(&[0; 4]));
            let (recs, res) = decode_all(SEG as u64, &w.bytes);
            match ok {
                true => assert_eq!((recs.len(), res), (1, Ok(()))),
                false => assert_eq!(
                    res,
                    Err(DecodeError::BadRmgr {
                        lsn: Lsn(lsn),
                        rmid: 22
                    })
                ),
            }
        }
        // 0x0008 was XLP_FIRST_IS_OVERWRITE_CONTRECORD up to 18 and is no flag at all in 19.
        for (format, ok) in [(f18, true), (f19, false)] {
            let mut w = WalWriter::new(SEG as u64, SEG, BLK);
            w.magic = format.magic;
            w.record(10, 0, 1, &testwal::main_data(&[0; 10]));
            w.bytes[2] |= 0x08;
            let res = decode_all(SEG as u64, &w.bytes).1;
            match ok {
                true => assert_eq!(res, Ok(())),
                false => assert!(
                    matches!(res, Err(DecodeError::BadPageInfo { info: 0x000A, .. })),
                    "{res:?}"
                ),
            }
        }
        // A crash-torn record is abandoned with 19's renumbered flag (0x0004), as with 18's.
        for format in [f18, f19] {
            let mut w = WalWriter::new(SEG as u64, SEG, BLK);
            w.magic = format.magic;
            let first = w.record(10, 0, 1, &testwal::main_data(&[0; 10]));
            w.torn_record(10, 0, 2, &testwal::main_data_long(&vec![3; 2 * BLK as usize]));
            let after = w.record(RM_XACT_ID, XLOG_XACT_COMMIT, 3, &testwal::xact_body(7, true));
            let (recs, res) = decode_all(SEG as u64, &w.bytes);
            res.unwrap_or_else(|e| panic!("PostgreSQL {}: {e}", format.major));
            assert_eq!(
                recs.iter().map(|r| r.lsn.0).collect::<Vec<_>>(),
                vec![first, after]
            );
        }
    }

    #[test]
    fn snapshot_and_resume_mid_record() {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        let body = testwal::blocks_then_main(&[(8192, 100), (8000, 0)], &testwal::commit_main(8));
        let lsn = w.record(RM_XACT_ID, 0, 2, &body);
        let mut d = WalDecoder::new(Lsn(SEG as u64), SEG, BLK);
        let cut = 3 * BLK as usize / 2;
        d.feed(&w.bytes[..cut]);
        assert_eq!(d.poll(), Ok(None));
        let state = d.snapshot().unwrap();
        let json = serde_json::to_string(&state).unwrap();
        assert!(json.len() < 8 * 1024, "state is small: {} bytes", json.len());
        let state: DecoderState = serde_json::from_str(&json).unwrap();
        assert_eq!(state.pending_record(), Some(Lsn(lsn)));
        let mut d = WalDecoder::resume(state).unwrap();
        assert_eq!(d.next_feed_lsn(), Lsn(SEG as u64 + cut as u64));
        d.feed(&w.bytes[cut..]);
        assert_eq!(
            d.poll().unwrap().unwrap().kind,
            RecordKind::Commit { time: PgTime(8) }
        );
    }

    /// [`MAX_STATE_JSON_LEN`] is the true bound: a record in progress with every number at its
    /// widest and every byte field at its cap serializes to exactly that many bytes.
    #[test]
    fn the_worst_case_state_is_exactly_the_bound() {
        let state = DecoderState {
            segment_size: u32::MAX,
            block_size: u32::MAX,
            pos: Lsn(u64::MAX),
            phase: Phase::Record(Box::new(Partial {
                lsn: u64::MAX,
                tot_len: u32::MAX,
                got: u32::MAX,
                header: [0xFF; RECORD_HEADER_LEN as usize],
                crc: u32::MAX,
                head: vec![0xFF; HEAD_CAP],
                layout: Some(Layout {
                    main_off: u32::MAX,
                    main_len: u32::MAX,
                    rel: Some([u32::MAX; 3]),
                    first: Some(crate::wal::record::FirstBlock {
                        off: u32::MAX,
                        fork: u8::MAX,
                        data_len: u16::MAX,
                        image_len: u16::MAX,
                        hole_offset: u16::MAX,
                        hole_length: u16::MAX,
                        image_info: u8::MAX,
                        compressed: false,
                    }),
                }),
                main: vec![0xFF; XACT_MAIN_CAP],
                // Never kept with a commit's main data (block_cap is 0 for a commit).
                block: vec![],
            })),
            magic: Some(u16::MAX),
            system_identifier: Some(u64::MAX),
            timeline: u32::MAX,
            prev: Some(Lsn(u64::MAX)),
        };
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(json.len(), MAX_STATE_JSON_LEN);
        assert_eq!(MAX_STATE_JSON_LEN, 47_017);
        assert_eq!(serde_json::from_str::<DecoderState>(&json).unwrap(), state);
        // Every other phase is shorter.
        for phase in [
            Phase::Unsynced,
            Phase::SkipContinuation { remaining: u32::MAX },
            Phase::Padding { until: u64::MAX },
            Phase::Boundary,
            Phase::Ended { at: u64::MAX },
        ] {
            let other = DecoderState {
                phase,
                ..state.clone()
            };
            assert!(serde_json::to_string(&other).unwrap().len() < MAX_STATE_JSON_LEN);
        }
    }

    /// What the decoder itself writes for a commit record whose main data is larger than the
    /// cap: the main data kept in full, the head let go, within the bound.
    #[test]
    fn a_commit_record_in_progress_keeps_its_cap_within_the_bound() {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        let mut main = testwal::commit_main(8);
        main.resize(XACT_MAIN_CAP + 10_000, 0x5A);
        w.record(RM_XACT_ID, XLOG_XACT_COMMIT, 2, &testwal::main_data_long(&main));
        let mut d = WalDecoder::new(Lsn(SEG as u64), SEG, BLK);
        let cut = w.bytes.len() - 100;
        d.feed(&w.bytes[..cut]);
        assert_eq!(d.poll(), Ok(None));
        let state = d.snapshot().unwrap();
        let Phase::Record(p) = &state.phase else {
            panic!("{:?}", state.phase)
        };
        assert_eq!((p.head.len(), p.main.len()), (0, XACT_MAIN_CAP));
        let json = serde_json::to_string(&state).unwrap();
        assert!(
            json.len() > 43_000 && json.len() <= MAX_STATE_JSON_LEN - 2732,
            "{}",
            json.len()
        );
        let mut d = WalDecoder::resume(serde_json::from_str(&json).unwrap()).unwrap();
        d.feed(&w.bytes[cut..]);
        let r = d.poll().unwrap().unwrap();
        assert_eq!(r.kind, RecordKind::Commit { time: PgTime(8) });
        assert_eq!(r.main, main[..XACT_MAIN_CAP]);
    }

    /// The byte fields are written as base64 and read as base64 or as the arrays of numbers
    /// states were written with before (docs/FORMAT.md); a header of the wrong length is refused.
    #[test]
    fn byte_fields_are_base64_and_arrays_of_numbers_still_read() {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        let mut main = testwal::commit_main(8);
        main.resize(20_000, 7);
        w.record(RM_XACT_ID, XLOG_XACT_COMMIT, 2, &testwal::main_data_long(&main));
        let mut d = WalDecoder::new(Lsn(SEG as u64), SEG, BLK);
        d.feed(&w.bytes[..w.bytes.len() - 100]);
        assert_eq!(d.poll(), Ok(None));
        let state = d.snapshot().unwrap();
        let new = serde_json::to_value(&state).unwrap();
        let record = &new["phase"]["Record"];
        let mut old = new.clone();
        for field in ["header", "head", "main"] {
            let text = record[field].as_str().expect("base64 text");
            let bytes = base64::engine::general_purpose::STANDARD.decode(text).unwrap();
            assert_eq!(text.len(), bytes.len().div_ceil(3) * 4);
            old["phase"]["Record"][field] = serde_json::json!(bytes);
        }
        assert!(!old["phase"]["Record"]["main"].as_array().unwrap().is_empty());
        let read: DecoderState = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(read, state);
        assert_eq!(
            serde_json::to_value(&read).unwrap(),
            new,
            "written back as base64"
        );
        let mut short = new;
        short["phase"]["Record"]["header"] = serde_json::json!("AAAA");
        assert!(serde_json::from_value::<DecoderState>(short).is_err());
        old["phase"]["Record"]["main"] = serde_json::json!([1, 256]);
        assert!(serde_json::from_value::<DecoderState>(old).is_err());
    }

    #[test]
    fn resume_refuses_an_inconsistent_state() {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        w.record(10, 0, 2, &testwal::main_data_long(&vec![0; 20_000]));
        let mut d = WalDecoder::new(Lsn(SEG as u64), SEG, BLK);
        d.feed(&w.bytes[..BLK as usize]);
        assert_eq!(d.poll(), Ok(None));
        let good = serde_json::to_value(d.snapshot().unwrap()).unwrap();
        let mut bad = good.clone();
        bad["phase"]["Record"]["got"] = serde_json::json!(u32::MAX);
        let bad: DecoderState = serde_json::from_value(bad).unwrap();
        assert!(matches!(
            WalDecoder::resume(bad),
            Err(DecodeError::BadCarry { .. })
        ));
        let mut bad = good;
        bad["block_size"] = serde_json::json!(3);
        let bad: DecoderState = serde_json::from_value(bad).unwrap();
        assert!(matches!(
            WalDecoder::resume(bad),
            Err(DecodeError::InvalidGeometry { .. })
        ));
    }

    #[test]
    fn the_end_of_the_lsn_space_does_not_overflow() {
        let start = u64::MAX - u64::from(BLK) + 1;
        let mut page = vec![0u8; 24];
        page[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        page[4..8].copy_from_slice(&1u32.to_le_bytes());
        page[8..16].copy_from_slice(&start.to_le_bytes());
        // A record longer than what is left of the LSN space.
        page.extend_from_slice(&100_000u32.to_le_bytes());
        page.extend_from_slice(&[0; 4]);
        page.extend_from_slice(&(start - 8).to_le_bytes());
        page.resize(3 * BLK as usize, 0x55);
        let mut d = WalDecoder::new(Lsn(start), SEG, BLK);
        d.feed(&page);
        let _ = d.poll();
        assert_eq!(d.next_feed_lsn(), Lsn(u64::MAX));
    }

    fn sample_stream() -> Vec<u8> {
        let mut w = WalWriter::new(SEG as u64, SEG, BLK);
        for i in 0..40u32 {
            let body = match i % 4 {
                0 => testwal::xact_body(i64::from(i), true),
                1 => testwal::blocks_then_main(&[(3000, 20)], &testwal::commit_main(1)),
                2 => testwal::restore_point_body(5, "rp"),
                _ => testwal::main_data_long(&vec![1; (i as usize) * 500]),
            };
            let rmid = [RM_XACT_ID, RM_XACT_ID, RM_XLOG_ID, 10][i as usize % 4];
            let info = [0x00, 0x20, 0x70, 0][i as usize % 4];
            w.record(rmid, info, i, &body);
        }
        w.bytes
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn garbage_never_panics(
            header in proptest::collection::vec(any::<u8>(), 40),
            body in proptest::collection::vec(any::<u8>(), 0..20_000),
            chunk in 1usize..5000,
            valid_header: bool,
        ) {
            let mut bytes = header;
            if valid_header {
                bytes[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
                bytes[2..4].copy_from_slice(&2u16.to_le_bytes());
                bytes[8..16].copy_from_slice(&(SEG as u64).to_le_bytes());
                bytes[32..36].copy_from_slice(&SEG.to_le_bytes());
                bytes[36..40].copy_from_slice(&BLK.to_le_bytes());
            }
            bytes.extend(body);
            let _ = decode_chunked(SEG as u64, &bytes, chunk);
        }

        #[test]
        fn mutated_wal_never_panics_and_chunking_does_not_matter(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
            chunk in 1usize..10_000,
        ) {
            let mut bytes = sample_stream();
            for (at, x) in flips {
                let at = at % bytes.len();
                bytes[at] ^= x;
            }
            let whole = decode_all(SEG as u64, &bytes);
            let (recs, res, _) = decode_chunked(SEG as u64, &bytes, chunk);
            prop_assert_eq!(&recs, &whole.0);
            prop_assert_eq!(&res, &whole.1);
            for pair in recs.windows(2) {
                prop_assert!(pair[0].end <= pair[1].lsn);
            }
        }
    }

    #[test]
    fn sample_stream_decodes_whole() {
        let bytes = sample_stream();
        let (recs, res) = decode_all(SEG as u64, &bytes);
        res.unwrap();
        assert_eq!(recs.len(), 40);
    }
}
