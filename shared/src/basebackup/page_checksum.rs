//! Page checksums as PostgreSQL computes and checks them, for a backup to verify every relation
//! page it reads (`archive-agent backup`, when the cluster has `data_checksums` on).
//!
//! Pure: bytes in, verdicts out. The algorithm is PostgreSQL's `pg_checksum_page`
//! (`src/include/storage/checksum_impl.h`): the 8 KiB page seen as rows of 32 little-endian
//! 32-bit words, each of the 32 columns folded into its own FNV-1a-like sum (a different
//! starting value per column, `hash = (hash ^ v) * FNV_PRIME ^ ((hash ^ v) >> 17)`), two more
//! rounds of zeros, the sums XORed together, the block number XORed in, and the result reduced
//! to 16 bits as `(sum % 65535) + 1`, with the page's own `pd_checksum` counted as zero. The
//! verdict follows `PageIsVerifiedExtended` (`src/backend/storage/page/bufpage.c`): a page whose
//! `pd_upper` is 0 is new and valid only when every byte is zero; any other page needs its
//! checksum and a sane header. What to make of a page written while it was read follows
//! PostgreSQL's own base backup (`verify_page_checksum` in `basebackup.c`) and pgBackRest
//! (`src/command/backup/pageChecksum.c`): see [`Verdict::Recent`].

use serde::{Deserialize, Serialize};

use crate::wal::Lsn;

/// The page size checked (`BLCKSZ`); clusters built with another are not checked.
pub const BLCKSZ: usize = 8192;
/// Blocks in one segment file of a relation fork (`RELSEG_SIZE`: 1 GiB of 8 KiB blocks).
pub const RELSEG_SIZE: u32 = 131072;
/// Bad pages a manifest lists at most; the count goes on beyond it.
pub const MAX_LISTED: usize = 10_000;

const N_SUMS: usize = 32;
const FNV_PRIME: u32 = 16_777_619;
/// The 32 columns' starting values, PostgreSQL's `checksumBaseOffsets`.
const BASE_OFFSETS: [u32; N_SUMS] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];
/// Where `pd_checksum` sits in the page header (after the 8-byte `pd_lsn`).
const CHECKSUM_AT: usize = 8;
/// `PD_VALID_FLAG_BITS`: the flags a sane header may carry.
const VALID_FLAGS: u16 = 0x0007;

#[inline(always)]
fn mix(sum: u32, value: u32) -> u32 {
    let t = sum ^ value;
    t.wrapping_mul(FNV_PRIME) ^ (t >> 17)
}

/// `pg_checksum_page`: the checksum `page` should carry as block `blkno` of its fork.
pub fn pg_checksum_page(page: &[u8; BLCKSZ], blkno: u32) -> u16 {
    let mut sums = BASE_OFFSETS;
    for (r, row) in page.chunks_exact(4 * N_SUMS).enumerate() {
        for (j, sum) in sums.iter_mut().enumerate() {
            let at = 4 * j;
            let mut word = u32::from_le_bytes([row[at], row[at + 1], row[at + 2], row[at + 3]]);
            // pd_checksum (bytes 8..10, the low half of word 2 of row 0) counts as zero.
            if r == 0 && j == CHECKSUM_AT / 4 {
                word &= 0xFFFF_0000;
            }
            *sum = mix(*sum, word);
        }
    }
    let mut folded = 0u32;
    for sum in sums {
        folded ^= mix(mix(sum, 0), 0);
    }
    ((folded ^ blkno) % 65535 + 1) as u16
}

fn u16_at(page: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([page[at], page[at + 1]])
}

/// The page's `pd_lsn` (two 32-bit halves, high first, each in the machine's order).
pub fn page_lsn(page: &[u8; BLCKSZ]) -> Lsn {
    let hi = u32::from_le_bytes([page[0], page[1], page[2], page[3]]);
    let lo = u32::from_le_bytes([page[4], page[5], page[6], page[7]]);
    Lsn((u64::from(hi) << 32) | u64::from(lo))
}

/// Why a page is damaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The stored checksum is not the one computed.
    Checksum { stored: u16, computed: u16 },
    /// `pd_upper` is 0 (a new page) but the page is not all zeros.
    NewNotZero,
    /// The checksum matches but the header's bounds or flags are impossible.
    Header,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Checksum { stored, computed } => {
                write!(f, "checksum {stored:#06x}, expected {computed:#06x}")
            }
            Fault::NewNotZero => f.write_str("uninitialized page header, but data is not zero"),
            Fault::Header => f.write_str("invalid page header"),
        }
    }
}

/// `PageIsVerifiedExtended` with checksums on: `Ok` for a valid page (a new, all-zero one
/// included), or what is wrong with it as block `blkno`.
pub fn verify_page(page: &[u8; BLCKSZ], blkno: u32) -> Result<(), Fault> {
    let (flags, lower, upper, special) = (
        u16_at(page, 10),
        u16_at(page, 12),
        u16_at(page, 14),
        u16_at(page, 16),
    );
    if upper == 0 {
        return match page.iter().all(|b| *b == 0) {
            true => Ok(()),
            false => Err(Fault::NewNotZero),
        };
    }
    let stored = u16_at(page, CHECKSUM_AT);
    let computed = pg_checksum_page(page, blkno);
    if stored != computed {
        return Err(Fault::Checksum { stored, computed });
    }
    let sane = flags & !VALID_FLAGS == 0
        && lower <= upper
        && upper <= special
        && usize::from(special) <= BLCKSZ
        && special % 8 == 0;
    if !sane {
        return Err(Fault::Header);
    }
    Ok(())
}

/// What a backup makes of one page it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Good,
    /// It failed, but was being written: the page read (or read again) carries an LSN at or
    /// past the backup's start, so WAL replay from the start rewrites it whole (a full-page
    /// image follows every checkpoint). Not damage; PostgreSQL's base backup and pgBackRest
    /// skip such pages too.
    Recent,
    Bad(Fault),
}

/// The verdict on `page`, block `blkno` of its fork, read during a backup that started at
/// `start`. A page that fails is read again once (`reread`; `None` when it is gone: the file
/// shrank): a read racing an 8 KiB write can see half of each, the old half with the old LSN
/// (PostgreSQL's `basebackup.c` retries once for the same reason).
pub fn verdict(
    page: &[u8; BLCKSZ],
    blkno: u32,
    start: Lsn,
    reread: impl FnOnce() -> Option<Box<[u8; BLCKSZ]>>,
) -> Verdict {
    if verify_page(page, blkno).is_ok() {
        return Verdict::Good;
    }
    let Some(again) = reread() else {
        return Verdict::Recent;
    };
    match verify_page(&again, blkno) {
        Ok(()) => Verdict::Good,
        Err(_) if page_lsn(&again) >= start => Verdict::Recent,
        // Still failing with an old LSN (the second read is the one that counts).
        Err(fault) => Verdict::Bad(fault),
    }
}

/// A relation fork.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fork {
    Main,
    Fsm,
    Vm,
    Init,
}

impl Fork {
    pub fn name(self) -> &'static str {
        match self {
            Fork::Main => "main",
            Fork::Fsm => "fsm",
            Fork::Vm => "vm",
            Fork::Init => "init",
        }
    }
}

/// A relation segment file, from its path in the data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelationFile {
    /// The database's oid; 0 for the shared catalogs in `global/`.
    pub db: u32,
    /// The tablespace's oid, for a file under `pg_tblspc/`.
    pub tablespace: Option<u32>,
    pub filenode: u32,
    pub fork: Fork,
    /// The segment number (`.N`), 0 for the first.
    pub segment: u32,
}

impl RelationFile {
    /// The relation file at `rel` (`global/<filenode>`, `base/<db>/<filenode>`,
    /// `pg_tblspc/<oid>/<version dir>/<db>/<filenode>`, each with an optional `_fsm`, `_vm` or
    /// `_init` and `.N`); `None` for every other file (`pg_internal.init`, `PG_VERSION`,
    /// `pg_filenode.map`, temporary relations...).
    pub fn parse(rel: &str) -> Option<RelationFile> {
        let parts: Vec<&str> = rel.split('/').collect();
        let (db, tablespace, name) = match parts.as_slice() {
            ["global", name] => (0, None, *name),
            ["base", db, name] => (oid(db)?, None, *name),
            ["pg_tblspc", spc, _version, db, name] => (oid(db)?, Some(oid(spc)?), *name),
            _ => return None,
        };
        let (stem, segment) = match name.split_once('.') {
            Some((stem, seg)) => (stem, oid(seg)?),
            None => (name, 0),
        };
        let (node, fork) = match stem.split_once('_') {
            None => (stem, Fork::Main),
            Some((node, "fsm")) => (node, Fork::Fsm),
            Some((node, "vm")) => (node, Fork::Vm),
            Some((node, "init")) => (node, Fork::Init),
            Some(_) => return None,
        };
        Some(RelationFile {
            db,
            tablespace,
            filenode: oid(node)?,
            fork,
            segment,
        })
    }

    /// The block number in the fork of the block at `index` in this segment file.
    pub fn block(&self, index: u32) -> u32 {
        self.segment.saturating_mul(RELSEG_SIZE).saturating_add(index)
    }
}

/// A decimal oid: digits only, no sign, no leading zero (as PostgreSQL names files).
fn oid(s: &str) -> Option<u32> {
    let ok = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    ok.then(|| s.parse().ok()).flatten()
}

/// A damaged page, as a manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadPage {
    /// The file, as the manifest's entries name it.
    pub path: String,
    /// The block number in the relation's fork (segment number * 131072 + block in the file).
    pub block: u32,
    pub fork: Fork,
    /// The database's name, when the relation map names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// `schema.name`, when the relation map names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relation: Option<String>,
    /// What is wrong, in words (`checksum 0x1a2b, expected 0x3c4d`).
    pub reason: String,
}

impl std::fmt::Display for BadPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.database, &self.relation) {
            (Some(db), Some(rel)) => write!(f, "database {db}, relation {rel}")?,
            (Some(db), None) => write!(f, "database {db}, file {}", self.path)?,
            _ => write!(f, "file {}", self.path)?,
        }
        write!(
            f,
            ", fork {}, block {} ({}): {}",
            self.fork.name(),
            self.block,
            self.path,
            self.reason
        )
    }
}

/// What a backup's page check found, as its manifest records it. Absent from a manifest: the
/// pages were not checked (checksums off, `--no-page-checksums`, over the protocol, or a
/// walvault that predates the check).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageChecks {
    /// Pages this backup read and checked.
    pub checked: u64,
    /// Pages that failed but were being written during the backup (see [`Verdict::Recent`]).
    #[serde(default)]
    pub recent: u64,
    /// Damaged pages in all, those taken over from the previous backup's files included.
    pub bad_total: u64,
    /// The first [`MAX_LISTED`] of them, by path and block.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bad: Vec<BadPage>,
}

/// The pages of a buffer read from a relation file: counts and the damaged ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checked {
    pub pages: u64,
    pub recent: u64,
    /// (block number in the fork, what is wrong).
    pub bad: Vec<(u32, Fault)>,
}

/// Check every whole page of `buf`, whose first page is block `first_index` of segment file
/// `file`, for a backup that started at `start`; `reread(i)` reads the page at index `i` of
/// the file again. A short page at the end (the file growing as it was read) is not checked.
pub fn check_buffer(
    buf: &[u8],
    file: &RelationFile,
    first_index: u32,
    start: Lsn,
    mut reread: impl FnMut(u32) -> Option<Box<[u8; BLCKSZ]>>,
) -> Checked {
    let mut out = Checked::default();
    for (i, page) in buf.chunks_exact(BLCKSZ).enumerate() {
        let page: &[u8; BLCKSZ] = page.try_into().expect("chunks_exact gives whole pages");
        let index = first_index.saturating_add(i as u32);
        let blkno = file.block(index);
        out.pages += 1;
        match verdict(page, blkno, start, || reread(index)) {
            Verdict::Good => {}
            Verdict::Recent => out.recent += 1,
            Verdict::Bad(fault) => out.bad.push((blkno, fault)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A heap page as PostgreSQL lays one out: header, one line pointer, a tuple at the end.
    pub(crate) fn page(lsn: u64, blkno: u32) -> Box<[u8; BLCKSZ]> {
        let mut p = Box::new([0u8; BLCKSZ]);
        p[0..4].copy_from_slice(&((lsn >> 32) as u32).to_le_bytes());
        p[4..8].copy_from_slice(&(lsn as u32).to_le_bytes());
        p[12..14].copy_from_slice(&28u16.to_le_bytes()); // pd_lower
        p[14..16].copy_from_slice(&8160u16.to_le_bytes()); // pd_upper
        p[16..18].copy_from_slice(&8192u16.to_le_bytes()); // pd_special
        p[18..20].copy_from_slice(&(8192u16 | 4).to_le_bytes()); // size and layout version
        for (i, b) in p[8160..].iter_mut().enumerate() {
            *b = i as u8 ^ 0x5a;
        }
        let sum = pg_checksum_page(&p, blkno);
        p[8..10].copy_from_slice(&sum.to_le_bytes());
        p
    }

    /// Block 0 of `global/1262` (`pg_database`) of a PostgreSQL 15 cluster just made by
    /// `initdb --data-checksums`: PostgreSQL computed its checksum.
    const REAL_PAGE: &[u8] = include_bytes!("../../tests/fixtures/pg15-global-1262-block0.page");

    #[test]
    fn checksums_match_postgresql() {
        let page: &[u8; BLCKSZ] = REAL_PAGE.try_into().unwrap();
        assert_eq!(u16_at(page, CHECKSUM_AT), 0xdb50, "the value PostgreSQL stored");
        assert_eq!(pg_checksum_page(page, 0), 0xdb50);
        assert_eq!(verify_page(page, 0), Ok(()));
        // The same bytes as another block, or with one bit flipped, do not verify.
        assert!(verify_page(page, 1).is_err());
        assert!(verify_page(page, RELSEG_SIZE).is_err());
        let mut flipped = Box::new(*page);
        flipped[6000] ^= 4;
        assert!(matches!(
            verify_page(&flipped, 0),
            Err(Fault::Checksum { stored: 0xdb50, .. })
        ));
    }

    #[test]
    fn the_stored_checksum_and_block_number_matter() {
        let p = page(0x1_0000_0028, 7);
        assert_eq!(verify_page(&p, 7), Ok(()));
        // The stored checksum does not count: the same page with another stored value computes
        // the same.
        let mut other = p.clone();
        other[8] ^= 0xff;
        assert_eq!(pg_checksum_page(&other, 7), pg_checksum_page(&p, 7));
        // A page moved to another block fails.
        assert!(matches!(verify_page(&p, 8), Err(Fault::Checksum { .. })));
        // Every result is in 1..=65535.
        assert_ne!(pg_checksum_page(&p, 7), 0);
    }

    #[test]
    fn verdicts() {
        let start = Lsn(0x2_0000_0000);
        let new = Box::new([0u8; BLCKSZ]);
        assert_eq!(verdict(&new, 3, start, || panic!("no re-read")), Verdict::Good);
        let good = page(0x1_0000_0028, 3);
        assert_eq!(verdict(&good, 3, start, || panic!("no re-read")), Verdict::Good);

        // Damaged tuple data, an old LSN: bad, even after reading it again.
        let mut bad = good.clone();
        bad[8170] ^= 0x10;
        let again = bad.clone();
        assert!(matches!(
            verdict(&bad, 3, start, || Some(again)),
            Verdict::Bad(Fault::Checksum { .. })
        ));
        // A torn read whose second read is whole: good.
        assert_eq!(verdict(&bad, 3, start, || Some(good.clone())), Verdict::Good);
        // Failing with an LSN past the start: being written, WAL replay rewrites it.
        let mut recent = page(0x2_0000_1000, 3);
        recent[8170] ^= 0x10;
        let again = recent.clone();
        assert_eq!(verdict(&recent, 3, start, || Some(again)), Verdict::Recent);
        // Gone when read again (truncated): nothing to say.
        assert_eq!(verdict(&bad, 3, start, || None), Verdict::Recent);

        // pd_upper 0 with data: damaged.
        let mut half = Box::new([0u8; BLCKSZ]);
        half[5000] = 1;
        let again = half.clone();
        assert_eq!(
            verdict(&half, 3, start, || Some(again)),
            Verdict::Bad(Fault::NewNotZero)
        );
        // A valid checksum over an impossible header.
        let mut insane = page(0x1_0000_0028, 3);
        insane[12..14].copy_from_slice(&9000u16.to_le_bytes());
        let sum = pg_checksum_page(&insane, 3);
        insane[8..10].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(verify_page(&insane, 3), Err(Fault::Header));
    }

    #[test]
    fn relation_files_are_named_by_their_path() {
        let f = RelationFile::parse("base/16384/16397.2").unwrap();
        assert_eq!(
            (f.db, f.filenode, f.fork, f.segment),
            (16384, 16397, Fork::Main, 2)
        );
        assert_eq!(f.block(5), 2 * 131072 + 5);
        let f = RelationFile::parse("global/1262_fsm").unwrap();
        assert_eq!((f.db, f.filenode, f.fork), (0, 1262, Fork::Fsm));
        let f = RelationFile::parse("pg_tblspc/16500/PG_15_202209061/16384/16501_vm").unwrap();
        assert_eq!((f.db, f.tablespace, f.fork), (16384, Some(16500), Fork::Vm));
        assert_eq!(
            RelationFile::parse("base/5/16384_init.1").unwrap().fork,
            Fork::Init
        );
        for not in [
            "global/pg_control",
            "global/pg_filenode.map",
            "base/5/pg_internal.init",
            "base/5/PG_VERSION",
            "base/5/t3_16384",
            "base/5/16384_xx",
            "base/5/016384",
            "base/x/16384",
            "pg_wal/000000010000000000000001",
            "postgresql.conf",
        ] {
            assert_eq!(RelationFile::parse(not), None, "{not}");
        }
    }

    #[test]
    fn buffers_are_checked_page_by_page_with_block_numbers() {
        let file = RelationFile::parse("base/5/16384.1").unwrap();
        let start = Lsn(0x2_0000_0000);
        let mut buf = Vec::new();
        for i in 10..14u32 {
            buf.extend_from_slice(&*page(0x1_0000_0028, file.block(i)));
        }
        buf[2 * BLCKSZ + 4000] ^= 1;
        buf.extend_from_slice(&[1u8; 100]); // a short page at the end: not checked
        let rereads = std::cell::Cell::new(0);
        let copy = buf.clone();
        let checked = check_buffer(&buf, &file, 10, start, |i| {
            rereads.set(rereads.get() + 1);
            let at = (i - 10) as usize * BLCKSZ;
            Some(Box::new(copy[at..at + BLCKSZ].try_into().unwrap()))
        });
        assert_eq!(checked.pages, 4);
        assert_eq!(rereads.get(), 1);
        assert_eq!(checked.bad.len(), 1);
        assert_eq!(checked.bad[0].0, RELSEG_SIZE + 12);
    }
}
