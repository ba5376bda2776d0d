//! What a WAL record is once decoded ([`WalRecord`], [`RecordKind`], [`RelFileLocator`]), and the
//! pure parsing of a record body's parts: the block references that lead to its main data
//! (`DecodeXLogRecord`), and the main data a time index reads (commit and abort times, restore
//! points, switches). The streaming around it (pages, reassembly, CRC) is [`super::decode`].

use serde::{Deserialize, Serialize};

use super::lsn::Lsn;
use super::pgtime::PgTime;

/// `RM_XLOG_ID`.
pub const RM_XLOG_ID: u8 = 0;
/// `RM_XACT_ID`.
pub const RM_XACT_ID: u8 = 1;
/// `RM_HEAP2_ID`.
pub const RM_HEAP2_ID: u8 = 9;
/// `RM_HEAP_ID`.
pub const RM_HEAP_ID: u8 = 10;
/// `XLOG_HEAP_OPMASK` and the heap inserts whose first block [`WalRecord::block`] may keep:
/// `XLOG_HEAP_INSERT` (`RM_HEAP_ID`) and `XLOG_HEAP2_MULTI_INSERT` (`RM_HEAP2_ID`).
const XLOG_HEAP_OPMASK: u8 = 0x70;
pub const XLOG_HEAP_INSERT: u8 = 0x00;
pub const XLOG_HEAP2_MULTI_INSERT: u8 = 0x50;
/// `XLOG_HEAP_INPLACE` (`RM_HEAP_ID`): a row overwritten in place, outside any transaction's
/// control (`DROP DATABASE` marks its database invalid so).
pub const XLOG_HEAP_INPLACE: u8 = 0x70;
/// Bytes of a first block's image and data kept: a whole 8 KiB page image (the default block
/// size; larger pages' images are not kept) and some block data.
pub const BLOCK_CAP: usize = 8192 + 1024;

/// `XLR_RMGR_INFO_MASK`: the `xl_info` bits that belong to the resource manager.
const XLR_RMGR_INFO_MASK: u8 = 0xF0;
/// `XLOG_SWITCH` (`pg_control.h`).
const XLOG_SWITCH: u8 = 0x40;
/// `XLOG_RESTORE_POINT` (`pg_control.h`).
pub(super) const XLOG_RESTORE_POINT: u8 = 0x70;
/// `XLOG_XACT_OPMASK` (`xact.h`).
pub(super) const XLOG_XACT_OPMASK: u8 = 0x70;
pub(super) const XLOG_XACT_COMMIT: u8 = 0x00;
pub(super) const XLOG_XACT_ABORT: u8 = 0x20;
pub(super) const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;
pub(super) const XLOG_XACT_ABORT_PREPARED: u8 = 0x40;
/// `MAXFNAMELEN`: size of `xl_restore_point.rp_name`.
const RESTORE_POINT_NAME_LEN: usize = 64;

/// `XLR_MAX_BLOCK_ID` and the special block ids of `xlogrecord.h`.
const XLR_MAX_BLOCK_ID: u8 = 32;
const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;
/// `fork_flags` bits of a block reference.
const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
const BKPBLOCK_HAS_DATA: u8 = 0x20;
const BKPBLOCK_SAME_REL: u8 = 0x80;
const BKPBLOCK_FORK_MASK: u8 = 0x0F;
/// `BKPIMAGE_HAS_HOLE`, the same in every version (the "compressed" bits are not:
/// [`super::version::WalFormat::image_compressed_bits`]).
const BKPIMAGE_HAS_HOLE: u8 = 0x01;
/// `sizeof(RelFileNode)` / `sizeof(RelFileLocator)`: three OIDs in every version.
const REL_LOCATOR_LEN: usize = 12;

/// What a record is, as far as a time index cares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordKind {
    /// `XLOG_XACT_COMMIT`.
    Commit { time: PgTime },
    /// `XLOG_XACT_ABORT`.
    Abort { time: PgTime },
    /// `XLOG_XACT_COMMIT_PREPARED` (`COMMIT PREPARED`; the record's `xid` is usually 0, the
    /// prepared transaction's id is further into the main data).
    CommitPrepared { time: PgTime },
    /// `XLOG_XACT_ABORT_PREPARED` (`ROLLBACK PREPARED`).
    AbortPrepared { time: PgTime },
    /// `XLOG_RESTORE_POINT` (`pg_create_restore_point`).
    RestorePoint { time: PgTime, name: String },
    /// `XLOG_SWITCH`: the rest of the segment is unused.
    Switch,
    /// Anything else.
    Other,
}

impl RecordKind {
    /// The transaction end time of a commit or abort, prepared or not.
    pub fn xact_time(&self) -> Option<PgTime> {
        match self {
            RecordKind::Commit { time }
            | RecordKind::Abort { time }
            | RecordKind::CommitPrepared { time }
            | RecordKind::AbortPrepared { time } => Some(*time),
            _ => None,
        }
    }
}

/// One decoded, CRC-checked WAL record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRecord {
    /// Where the record starts (what `pg_waldump` prints as `lsn:`).
    pub lsn: Lsn,
    /// Where the next record may start: the end of this one rounded up to 8 bytes, as
    /// PostgreSQL's `EndRecPtr`; for `XLOG_SWITCH`, the end of the segment.
    pub end: Lsn,
    /// `xl_prev`: the previous record's start.
    pub prev: Lsn,
    /// `xl_xid`.
    pub xid: u32,
    /// `xl_rmid`.
    pub rmid: u8,
    /// `xl_info`.
    pub info: u8,
    /// `xl_tot_len`: header, block headers and data, without page headers or padding.
    pub total_len: u32,
    pub kind: RecordKind,
    /// The relation of the first block reference (the heap page a `DELETE` or `UPDATE` changed).
    pub block_rel: Option<RelFileLocator>,
    /// The first block reference's image and data, kept whole for the heap inserts into the
    /// catalogs [`super::catalog_rows`] reads (see [`keeps_first_block`]); `None` otherwise.
    pub block: Option<BlockPayload>,
    /// The first bytes of the main data: all of it up to [`super::decode::MAIN_CAP`] ([`super::decode::XACT_MAIN_CAP`] for a
    /// commit record).
    pub main: Vec<u8>,
    /// The main data's whole length, to tell when `main` is cut short.
    pub main_len: u32,
}

/// `RelFileLocator` (`RelFileNode` before PostgreSQL 16): which file a relation's data is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RelFileLocator {
    /// Tablespace OID (1663 `pg_default`, 1664 `pg_global`).
    pub spc: u32,
    /// Database OID (0 for shared catalogs).
    pub db: u32,
    /// `relfilenode`: the file's number, what `pg_relation_filenode()` returns.
    pub rel: u32,
}

impl RelFileLocator {
    /// Read the 12 bytes PostgreSQL writes (`spcOid`, `dbOid`, `relNumber`).
    pub fn from_bytes(b: &[u8]) -> Option<RelFileLocator> {
        let b = b.get(..REL_LOCATOR_LEN)?;
        Some(RelFileLocator {
            spc: u32_at(b, 0),
            db: u32_at(b, 4),
            rel: u32_at(b, 8),
        })
    }
}

/// Where the first block reference's image and data are, and what its header says of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirstBlock {
    /// Offset in the record body where its image (if any) begins, its data right after.
    pub off: u32,
    /// `fork_flags & BKPBLOCK_FORK_MASK` (0: the main fork).
    pub fork: u8,
    /// Bytes of block data.
    pub data_len: u16,
    /// `bimg_len`: bytes of the full-page image stored (0: no image).
    pub image_len: u16,
    /// `hole_offset`: where the page's unused middle, left out of the image, began.
    pub hole_offset: u16,
    /// `hole_length`, written only for a compressed image with a hole (0 otherwise: a plain
    /// image's hole is the page size less the image's length).
    #[serde(default)]
    pub hole_length: u16,
    /// `bimg_info`.
    pub image_info: u8,
    /// The image is compressed (this version's compressed bits of `bimg_info`).
    pub compressed: bool,
}

impl FirstBlock {
    fn payload_len(&self) -> usize {
        usize::from(self.image_len) + usize::from(self.data_len)
    }
}

/// The bytes of a first block reference ([`FirstBlock`]): its image, then its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockPayload {
    pub header: FirstBlock,
    pub bytes: Vec<u8>,
}

impl BlockPayload {
    /// The full-page image as stored (hole left out), if the block has one.
    pub fn image(&self) -> Option<&[u8]> {
        (self.header.image_len > 0).then(|| &self.bytes[..usize::from(self.header.image_len)])
    }

    /// The block data.
    pub fn data(&self) -> &[u8] {
        &self.bytes[usize::from(self.header.image_len)..]
    }
}

/// The part of a record body whose first block is kept, when it is: a heap insert or in-place
/// update (see [`block_cap`]) into the main fork of a file `wanted` takes for this record
/// (`wanted(rmid, info, filenode)`), image and data at most [`BLOCK_CAP`] bytes. A range of body
/// offsets.
pub(super) fn keeps_first_block(
    rmid: u8,
    info: u8,
    layout: &Layout,
    wanted: impl Fn(u8, u8, u32) -> bool,
) -> Option<std::ops::Range<u64>> {
    let first = layout
        .first
        .filter(|f| f.fork == 0 && f.payload_len() <= BLOCK_CAP)?;
    let rel = layout.rel?[2];
    (block_cap(rmid, info) > 0 && wanted(rmid, info, rel))
        .then(|| u64::from(first.off)..u64::from(first.off) + first.payload_len() as u64)
}

/// Bytes of a first block a record with this header may keep: [`BLOCK_CAP`] for heap inserts
/// and in-place updates.
pub(super) fn block_cap(rmid: u8, info: u8) -> usize {
    match (rmid, info & XLOG_HEAP_OPMASK) {
        (RM_HEAP_ID, XLOG_HEAP_INSERT | XLOG_HEAP_INPLACE) | (RM_HEAP2_ID, XLOG_HEAP2_MULTI_INSERT) => {
            BLOCK_CAP
        }
        _ => 0,
    }
}

/// Where the block headers say the main data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Layout {
    /// Offset of the main data in the record body (after the 24-byte header).
    pub(super) main_off: u32,
    pub(super) main_len: u32,
    /// The first block reference's relation (`RelFileLocator`: tablespace, database, file).
    #[serde(default)]
    pub(super) rel: Option<[u32; 3]>,
    /// The first block reference's image and data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) first: Option<FirstBlock>,
}

/// Little-endian fields at `at` (the caller has checked the length).
pub(super) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

/// Walk the block headers at the start of a record body of `body_len` bytes (`head` holds its
/// first bytes) to find the main data, as `DecodeXLogRecord` does. `Ok(None)`: `head` ends
/// before the headers do; `Err`: why the record is malformed.
pub(super) fn parse_layout(
    head: &[u8],
    body_len: u32,
    image_compressed_bits: u8,
) -> Result<Option<Layout>, &'static str> {
    let mut r = HeaderReader {
        head,
        at: 0,
        remaining: u64::from(body_len),
    };
    let mut headers = BlockHeaders::default();
    match headers.walk(&mut r, image_compressed_bits) {
        Err(Short::Head) => return Ok(None),
        Err(Short::Record) => return Err("record shorter than its block headers"),
        Ok(Err(reason)) => return Err(reason),
        Ok(Ok(())) => {}
    }
    if r.remaining != headers.datatotal {
        return Err("block and main data lengths do not add up to the record length");
    }
    Ok(Some(Layout {
        main_off: body_len - headers.main_len,
        main_len: headers.main_len,
        rel: headers.first_rel,
        // Block images and data follow the headers, the first block's first.
        first: headers.first.map(|f| FirstBlock {
            off: r.at as u32,
            ..f
        }),
    }))
}

/// Reads a record's block headers from `head`, within the `remaining` bytes the record says it
/// has.
struct HeaderReader<'a> {
    head: &'a [u8],
    at: usize,
    remaining: u64,
}

/// Why a header could not be read.
enum Short {
    /// The record says it has fewer bytes than its headers need.
    Record,
    /// `head` does not hold them yet.
    Head,
}

impl HeaderReader<'_> {
    #[inline]
    fn take(&mut self, n: usize) -> Result<&[u8], Short> {
        if self.remaining < n as u64 {
            return Err(Short::Record);
        }
        let bytes = self.head.get(self.at..self.at + n).ok_or(Short::Head)?;
        self.at += n;
        self.remaining -= n as u64;
        Ok(bytes)
    }
    #[inline]
    fn u8(&mut self) -> Result<u8, Short> {
        Ok(self.take(1)?[0])
    }
    #[inline]
    fn u16(&mut self) -> Result<u16, Short> {
        Ok(u16_at(self.take(2)?, 0))
    }
    #[inline]
    fn u32(&mut self) -> Result<u32, Short> {
        Ok(u32_at(self.take(4)?, 0))
    }
}

/// What the block headers read so far say.
#[derive(Default)]
struct BlockHeaders {
    /// Bytes of block data, images and main data they announce.
    datatotal: u64,
    main_len: u32,
    max_block: Option<u8>,
    have_rel: bool,
    first_rel: Option<[u32; 3]>,
    /// The first block's header (its `off` set once every header is read).
    first: Option<FirstBlock>,
}

impl BlockHeaders {
    /// Read headers until the main data's (by convention the last) or the announced data fills
    /// the rest of the record. The inner `Err`: why the record is malformed.
    fn walk(
        &mut self,
        r: &mut HeaderReader,
        image_compressed_bits: u8,
    ) -> Result<Result<(), &'static str>, Short> {
        while r.remaining > self.datatotal {
            match r.u8()? {
                XLR_BLOCK_ID_DATA_SHORT => {
                    self.main_len = u32::from(r.u8()?);
                    self.datatotal += u64::from(self.main_len);
                    // By convention the main data header comes last.
                    break;
                }
                XLR_BLOCK_ID_DATA_LONG => {
                    self.main_len = r.u32()?;
                    self.datatotal += u64::from(self.main_len);
                    break;
                }
                XLR_BLOCK_ID_ORIGIN => {
                    r.take(2)?;
                }
                XLR_BLOCK_ID_TOPLEVEL_XID => {
                    r.take(4)?;
                }
                id @ 0..=XLR_MAX_BLOCK_ID => {
                    if let Err(reason) = self.block(r, id, image_compressed_bits)? {
                        return Ok(Err(reason));
                    }
                }
                _ => return Ok(Err("invalid block id")),
            }
        }
        Ok(Ok(()))
    }

    /// The header of block reference `id` (`XLogRecordBlockHeader`, its image header, its
    /// relation unless the same as the previous block's, its block number).
    #[inline]
    fn block(
        &mut self,
        r: &mut HeaderReader,
        id: u8,
        image_compressed_bits: u8,
    ) -> Result<Result<(), &'static str>, Short> {
        if self.max_block.is_some_and(|m| id <= m) {
            return Ok(Err("out-of-order block id"));
        }
        let is_first = self.max_block.is_none();
        self.max_block = Some(id);
        let fork_flags = r.u8()?;
        let data_len = r.u16()?;
        if (fork_flags & BKPBLOCK_HAS_DATA != 0) != (data_len != 0) {
            return Ok(Err("BKPBLOCK_HAS_DATA does not match the data length"));
        }
        self.datatotal += u64::from(data_len);
        let mut first = FirstBlock {
            off: 0,
            fork: fork_flags & BKPBLOCK_FORK_MASK,
            data_len,
            image_len: 0,
            hole_offset: 0,
            hole_length: 0,
            image_info: 0,
            compressed: false,
        };
        if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
            let bimg_len = r.u16()?;
            let hole_offset = r.u16()?;
            let bimg_info = r.u8()?;
            let compressed = bimg_info & image_compressed_bits != 0;
            if compressed && bimg_info & BKPIMAGE_HAS_HOLE != 0 {
                first.hole_length = r.u16()?;
            }
            self.datatotal += u64::from(bimg_len);
            (
                first.image_len,
                first.hole_offset,
                first.image_info,
                first.compressed,
            ) = (bimg_len, hole_offset, bimg_info, compressed);
        }
        if is_first {
            self.first = Some(first);
        }
        if fork_flags & BKPBLOCK_SAME_REL == 0 {
            let rel = r.take(REL_LOCATOR_LEN)?;
            if !self.have_rel {
                self.first_rel = Some([u32_at(rel, 0), u32_at(rel, 4), u32_at(rel, 8)]);
            }
            self.have_rel = true;
        } else if !self.have_rel {
            return Ok(Err("BKPBLOCK_SAME_REL without a previous relation"));
        }
        let _block_number = r.u32()?;
        Ok(Ok(()))
    }
}

fn time_at(main: &[u8]) -> Result<PgTime, &'static str> {
    let b = main.get(..8).ok_or("main data too short for a timestamp")?;
    Ok(PgTime(i64::from(u32_at(b, 0)) | (i64::from(u32_at(b, 4)) << 32)))
}

/// Read the record kinds a time index needs from the start of the main data.
pub(super) fn classify(rmid: u8, info: u8, main: &[u8]) -> Result<RecordKind, &'static str> {
    Ok(match rmid {
        // xl_xact_commit and xl_xact_abort (also used by the prepared variants) start with
        // `TimestampTz xact_time`.
        RM_XACT_ID => match info & XLOG_XACT_OPMASK {
            XLOG_XACT_COMMIT => RecordKind::Commit { time: time_at(main)? },
            XLOG_XACT_ABORT => RecordKind::Abort { time: time_at(main)? },
            XLOG_XACT_COMMIT_PREPARED => RecordKind::CommitPrepared { time: time_at(main)? },
            XLOG_XACT_ABORT_PREPARED => RecordKind::AbortPrepared { time: time_at(main)? },
            _ => RecordKind::Other,
        },
        RM_XLOG_ID => match info & XLR_RMGR_INFO_MASK {
            XLOG_SWITCH => RecordKind::Switch,
            XLOG_RESTORE_POINT => {
                // xl_restore_point { TimestampTz rp_time; char rp_name[MAXFNAMELEN]; }
                let raw = main
                    .get(8..8 + RESTORE_POINT_NAME_LEN)
                    .ok_or("restore point record too short")?;
                let name = raw.split(|&b| b == 0).next().unwrap_or_default();
                RecordKind::RestorePoint {
                    time: time_at(main)?,
                    name: String::from_utf8_lossy(name).into_owned(),
                }
            }
            _ => RecordKind::Other,
        },
        _ => RecordKind::Other,
    })
}
