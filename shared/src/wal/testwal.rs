//! Test support: a writer of synthetic but well-formed WAL (page headers, continuation records,
//! alignment, CRCs), laid out the way PostgreSQL's `CopyXLogRecordToWAL` lays it out.

use super::crc32c;

pub(crate) const RM_HEAP_ID: u8 = 10;
const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const XLP_LONG_HEADER: u16 = 0x0002;

pub(crate) fn align8(v: u64) -> u64 {
    v.div_ceil(8) * 8
}

/// Writes a WAL stream starting at a segment boundary into `bytes`.
#[derive(Debug)]
pub(crate) struct WalWriter {
    pub seg: u32,
    pub blk: u32,
    pub magic: u16,
    pub sysid: u64,
    pub tli: u32,
    pub start: u64,
    pub bytes: Vec<u8>,
    prev: u64,
    next_page_flags: u16,
}

impl WalWriter {
    pub fn new(start: u64, seg: u32, blk: u32) -> Self {
        assert_eq!(start % u64::from(seg), 0);
        WalWriter {
            seg,
            blk,
            magic: 0xD110,
            sysid: 7_350_000_000_000_000_001,
            tli: 1,
            start,
            bytes: Vec::new(),
            prev: start.saturating_sub(0x1000),
            next_page_flags: 0,
        }
    }

    pub fn pos(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }

    fn header_len(&self, page: u64) -> u64 {
        if page.is_multiple_of(u64::from(self.seg)) {
            40
        } else {
            24
        }
    }

    fn page_header(&mut self, flags: u16, rem_len: u32) {
        let pos = self.pos();
        assert_eq!(pos % u64::from(self.blk), 0);
        let long = pos.is_multiple_of(u64::from(self.seg));
        let info = flags | self.next_page_flags | if long { XLP_LONG_HEADER } else { 0 };
        self.next_page_flags = 0;
        let mut h = Vec::with_capacity(40);
        h.extend_from_slice(&self.magic.to_le_bytes());
        h.extend_from_slice(&info.to_le_bytes());
        h.extend_from_slice(&self.tli.to_le_bytes());
        h.extend_from_slice(&pos.to_le_bytes());
        h.extend_from_slice(&rem_len.to_le_bytes());
        h.extend_from_slice(&[0; 4]);
        if long {
            h.extend_from_slice(&self.sysid.to_le_bytes());
            h.extend_from_slice(&self.seg.to_le_bytes());
            h.extend_from_slice(&self.blk.to_le_bytes());
        }
        self.bytes.extend_from_slice(&h);
    }

    /// Write `rec` (a whole record, or its first `stop_after` bytes), inserting page headers.
    fn put_record(&mut self, rec: &[u8], stop_after: usize) {
        let mut i = 0;
        while i < stop_after {
            if self.pos().is_multiple_of(u64::from(self.blk)) {
                if i == 0 {
                    self.page_header(0, 0);
                } else {
                    self.page_header(XLP_FIRST_IS_CONTRECORD, (rec.len() - i) as u32);
                }
            }
            let room = (u64::from(self.blk) - self.pos() % u64::from(self.blk)) as usize;
            let n = room.min(stop_after - i);
            self.bytes.extend_from_slice(&rec[i..i + n]);
            i += n;
        }
    }

    /// Where the next record will start.
    pub fn next_lsn(&self) -> u64 {
        let p = align8(self.pos());
        if p.is_multiple_of(u64::from(self.blk)) {
            p + self.header_len(p)
        } else {
            p
        }
    }

    fn build(&self, rmid: u8, info: u8, xid: u32, body: &[u8]) -> Vec<u8> {
        let tot = 24 + body.len() as u32;
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&tot.to_le_bytes());
        h.extend_from_slice(&xid.to_le_bytes());
        h.extend_from_slice(&self.prev.to_le_bytes());
        h.extend_from_slice(&[info, rmid, 0, 0]);
        let crc = !crc32c::update(crc32c::update(crc32c::INIT, body), &h);
        h.extend_from_slice(&crc.to_le_bytes());
        h.extend_from_slice(body);
        h
    }

    fn align(&mut self) {
        let p = align8(self.pos());
        self.bytes.resize((p - self.start) as usize, 0);
    }

    /// Append a record; returns its LSN.
    pub fn record(&mut self, rmid: u8, info: u8, xid: u32, body: &[u8]) -> u64 {
        self.align();
        let lsn = self.next_lsn();
        let rec = self.build(rmid, info, xid, body);
        self.put_record(&rec, rec.len());
        self.prev = lsn;
        lsn
    }

    /// Write a record only up to the end of its first page, as if the server crashed before
    /// the rest reached disk, and mark the next page as overwriting it (what recovery does).
    pub fn torn_record(&mut self, rmid: u8, info: u8, xid: u32, body: &[u8]) -> u64 {
        self.align();
        let lsn = self.next_lsn();
        let rec = self.build(rmid, info, xid, body);
        let first_page = (u64::from(self.blk) - lsn % u64::from(self.blk)) as usize;
        assert!(first_page < rec.len(), "the record must span pages");
        self.put_record(&rec, first_page);
        // XLP_FIRST_IS_OVERWRITE_CONTRECORD, whose bit depends on the version.
        self.next_page_flags = super::version::for_magic(self.magic)
            .expect("a supported magic")
            .overwrite_contrecord;
        lsn
    }

    /// `XLOG_SWITCH`, then the rest of the segment as PostgreSQL leaves it: empty pages with
    /// headers. Returns the switch record's LSN.
    pub fn switch(&mut self) -> u64 {
        let lsn = self.record(0, 0x40, 0, &[]);
        let seg_end = self.pos().div_ceil(u64::from(self.seg)) * u64::from(self.seg);
        while self.pos() < seg_end {
            let page_end = (self.pos() / u64::from(self.blk) + 1) * u64::from(self.blk);
            self.bytes.resize((page_end - self.start) as usize, 0);
            if self.pos() < seg_end {
                self.page_header(0, 0);
            }
        }
        lsn
    }

    /// One filler record of exactly `len` bytes (a multiple of 8, at least 32).
    fn filler(&mut self, len: u64) {
        let body_len = len as usize - 24;
        let body = if body_len - 2 < 256 {
            main_data(&vec![0xAB; body_len - 2])
        } else {
            main_data_long(&vec![0xAB; body_len - 5])
        };
        self.record(RM_HEAP_ID, 0, 1, &body);
    }

    /// Write filler records until the next record starts at `target`.
    pub fn fill_until(&mut self, target: u64) {
        for _ in 0..100_000 {
            let cur = self.next_lsn();
            if cur == target {
                return;
            }
            assert!(cur < target, "overshot {target:#X}: at {cur:#X}");
            let page_end = (cur / u64::from(self.blk) + 1) * u64::from(self.blk);
            let goal = target.min(page_end);
            match goal - cur {
                n if n >= 32 => self.filler(n),
                _ => self.filler(32),
            }
        }
        panic!("cannot reach {target:#X}");
    }

    /// Fill until the next record starts at `offset` within the current page.
    pub fn fill_until_page_offset(&mut self, offset: u32) {
        let page = self.next_lsn() / u64::from(self.blk) * u64::from(self.blk);
        self.fill_until(page + u64::from(offset));
    }

    /// Fill until the next record starts at `offset` within the current segment.
    pub fn fill_until_segment_offset(&mut self, offset: u32) {
        let seg = self.next_lsn() / u64::from(self.seg) * u64::from(self.seg);
        self.fill_until(seg + u64::from(offset));
    }
}

/// A record body with only main data, short form (`XLR_BLOCK_ID_DATA_SHORT`).
pub(crate) fn main_data(data: &[u8]) -> Vec<u8> {
    assert!(data.len() < 256);
    let mut b = vec![255, data.len() as u8];
    b.extend_from_slice(data);
    b
}

/// A record body with only main data, long form (`XLR_BLOCK_ID_DATA_LONG`).
pub(crate) fn main_data_long(data: &[u8]) -> Vec<u8> {
    let mut b = vec![254];
    b.extend_from_slice(&(data.len() as u32).to_le_bytes());
    b.extend_from_slice(data);
    b
}

/// Main data of a commit: `xact_time`, then (like a real one) xinfo and dbinfo.
pub(crate) fn commit_main(time: i64) -> Vec<u8> {
    let mut m = time.to_le_bytes().to_vec();
    m.extend_from_slice(&1u32.to_le_bytes()); // xinfo: XACT_XINFO_HAS_DBINFO
    m.extend_from_slice(&[5, 0, 0, 0, 0x7F, 0x06, 0, 0]); // dbId, tsId
    m
}

/// Body of an `xl_xact_commit` / `xl_xact_abort` record with nothing but main data.
pub(crate) fn xact_body(time: i64, with_info: bool) -> Vec<u8> {
    if with_info {
        main_data(&commit_main(time))
    } else {
        main_data(&time.to_le_bytes())
    }
}

/// Body of an `XLOG_RESTORE_POINT` record.
pub(crate) fn restore_point_body(time: i64, name: &str) -> Vec<u8> {
    let mut m = time.to_le_bytes().to_vec();
    let mut n = [0u8; 64];
    n[..name.len()].copy_from_slice(name.as_bytes());
    m.extend_from_slice(&n);
    main_data(&m)
}

fn main_header(b: &mut Vec<u8>, main: &[u8]) {
    if main.len() < 256 {
        b.extend_from_slice(&[255, main.len() as u8]);
    } else {
        b.push(254);
        b.extend_from_slice(&(main.len() as u32).to_le_bytes());
    }
}

/// A body with block references `(image bytes, data bytes)` (no hole, not compressed), then
/// `main` as main data.
pub(crate) fn blocks_then_main(blocks: &[(u16, u16)], main: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for (id, &(img, data)) in blocks.iter().enumerate() {
        let mut flags = 0u8;
        if img > 0 {
            flags |= 0x10;
        }
        if data > 0 {
            flags |= 0x20;
        }
        if id > 0 {
            flags |= 0x80; // BKPBLOCK_SAME_REL
        }
        b.extend_from_slice(&[id as u8, flags]);
        b.extend_from_slice(&data.to_le_bytes());
        if img > 0 {
            b.extend_from_slice(&img.to_le_bytes());
            b.extend_from_slice(&0u16.to_le_bytes());
            b.push(0);
        }
        if id == 0 {
            b.extend_from_slice(&[0x7F, 0x06, 0, 0, 5, 0, 0, 0, 0, 0x40, 0, 0]);
        }
        b.extend_from_slice(&(id as u32 * 3).to_le_bytes());
    }
    main_header(&mut b, main);
    for &(img, data) in blocks {
        b.extend(std::iter::repeat_n(0xEE, usize::from(img)));
        b.extend(std::iter::repeat_n(0xDD, usize::from(data)));
    }
    b.extend_from_slice(main);
    b
}

/// A body with one full-page image whose `bimg_info` is given, with a `hole_length` field when
/// `hole_field`, then `main`.
pub(crate) fn image_then_main(bimg_info: u8, hole_field: bool, img: u16, main: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0x10];
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&img.to_le_bytes());
    b.extend_from_slice(&100u16.to_le_bytes()); // hole_offset
    b.push(bimg_info);
    if hole_field {
        b.extend_from_slice(&4000u16.to_le_bytes());
    }
    b.extend_from_slice(&[0x7F, 0x06, 0, 0, 5, 0, 0, 0, 0, 0x40, 0, 0]);
    b.extend_from_slice(&7u32.to_le_bytes());
    main_header(&mut b, main);
    b.extend(std::iter::repeat_n(0xEE, usize::from(img)));
    b.extend_from_slice(main);
    b
}

/// A body with one block reference to file `rel` of database 5, main fork: a full-page image
/// (`image` with its hole at the offset given, not compressed) when given, block `data`, then
/// `main`.
pub(crate) fn block_then_main(rel: u32, image: Option<(&[u8], u16)>, data: &[u8], main: &[u8]) -> Vec<u8> {
    let mut flags = 0u8;
    if image.is_some() {
        flags |= 0x10;
    }
    if !data.is_empty() {
        flags |= 0x20;
    }
    let mut b = vec![0, flags];
    b.extend_from_slice(&(data.len() as u16).to_le_bytes());
    if let Some((img, hole_offset)) = image {
        b.extend_from_slice(&(img.len() as u16).to_le_bytes());
        b.extend_from_slice(&hole_offset.to_le_bytes());
        b.push(0x01); // BKPIMAGE_HAS_HOLE
    }
    for w in [1663u32, 5, rel, 0] {
        b.extend_from_slice(&w.to_le_bytes()); // RelFileLocator, then the block number
    }
    main_header(&mut b, main);
    if let Some((img, _)) = image {
        b.extend_from_slice(img);
    }
    b.extend_from_slice(data);
    b.extend_from_slice(main);
    b
}
