//! Relations and schemas created while the archiver watched, read from the catalog rows the WAL
//! carries, so that `restore-agent find` can name a relation created after the backup whose
//! relation map names the others.
//!
//! Creating a relation inserts a `pg_class` row (`heap_insert`: an `XLOG_HEAP_INSERT` record;
//! `XLOG_HEAP2_MULTI_INSERT` is read the same way), an index also a `pg_index` row, a schema a
//! `pg_namespace` row. The new row is in the record's first block data (`xl_heap_header` and the
//! tuple after its fixed header) unless that block carries a full-page image, in which case the
//! row is in the image, at the line pointer the record's main data names. Only the leading
//! columns are read: every column up to `relkind` is fixed-width and `NOT NULL`, so each is at a
//! fixed offset from the tuple's `t_hoff` whatever the nullable columns after it hold.
//!
//! The catalogs are recognised by file: `pg_class` is file 1259, `pg_namespace` 2615 and
//! `pg_index` 2610 in every database as initdb made them. After a `VACUUM FULL` of one of them
//! its file has another number and its inserts are not read: `find` then shows such relations by
//! file, as before. Images of pages larger than 8 KiB are not read either; compressed ones
//! (`wal_compression`) are ([`super::page_image`]).

use serde::{Deserialize, Serialize};

use super::lsn::Lsn;
use super::page_image;
use super::record::{RM_HEAP_ID, RM_HEAP2_ID, WalRecord, XLOG_HEAP_INPLACE};

/// `pg_class`'s file as initdb makes it (a mapped catalog: its `relfilenode` column is 0).
pub const PG_CLASS: u32 = 1259;
/// `pg_namespace`'s file as initdb makes it.
pub const PG_NAMESPACE: u32 = 2615;
/// `pg_index`'s file as initdb makes it.
pub const PG_INDEX: u32 = 2610;

/// `SizeofHeapTupleHeader`: the tuple header before its null bitmap.
const TUPLE_HEADER_LEN: usize = 23;
/// `offsetof(HeapTupleHeaderData, t_hoff)`.
const T_HOFF_AT: usize = 22;
/// `SizeOfHeapHeader`: `xl_heap_header { t_infomask2; t_infomask; t_hoff }`.
const XL_HEAP_HEADER_LEN: usize = 5;
/// `SizeOfMultiInsertTuple`: `xl_multi_insert_tuple { datalen; t_infomask2; t_infomask; t_hoff }`.
const XL_MULTI_INSERT_TUPLE_LEN: usize = 7;
/// `XLOG_HEAP_INIT_PAGE`: the page was initialised; a multi-insert then lists no offsets.
const XLOG_HEAP_INIT_PAGE: u8 = 0x80;
/// `SizeOfPageHeaderData`, and where `pd_lower` and `pd_pagesize_version` are in it.
const PAGE_HEADER_LEN: usize = 24;
const PD_LOWER_AT: usize = 12;
/// `LP_NORMAL`: a line pointer to a tuple.
const LP_NORMAL: u32 = 1;
/// `NAMEDATALEN`.
const NAME_LEN: usize = 64;
/// Relations a row is kept for: tables, partitioned tables, indexes, TOAST tables, sequences and
/// materialized views (not views, composite types or foreign tables, which have no files).
const KINDS_KEPT: &[u8] = b"rpiItSm";

/// `pg_database`'s file as initdb makes it (a shared, mapped catalog).
pub const PG_DATABASE: u32 = 1262;

/// Whether a heap insert into file `filenode` may carry a row this module reads.
pub fn reads_file(filenode: u32) -> bool {
    matches!(filenode, PG_CLASS | PG_NAMESPACE | PG_INDEX)
}

/// Whether the decoder keeps the first block of a record of resource manager `rmid` with
/// `info` on file `filenode`: the inserts this module reads, and the in-place updates of
/// `pg_database` ([`invalidated_database`]).
pub fn keeps(rmid: u8, info: u8, filenode: u32) -> bool {
    match (rmid, info & 0x70) {
        (RM_HEAP_ID, XLOG_HEAP_INPLACE) => filenode == PG_DATABASE,
        _ => reads_file(filenode),
    }
}

/// `DATCONNLIMIT_INVALID_DB`: the `datconnlimit` of a database being dropped.
const DATCONNLIMIT_INVALID_DB: i32 = -2;

/// Offset of `datconnlimit` in a `pg_database` row: after `oid`, `datname`, `datdba`, `encoding`,
/// then up to 14 the `name` columns `datcollate` and `datctype` and two bools (208), from 15
/// `datlocprovider` and two or (17) three one-byte columns (80); checked against each
/// version's `postgres.bki`.
fn datconnlimit_at(pg_version: u32) -> usize {
    if pg_version >= 15 { 80 } else { 208 }
}

/// The database whose `pg_database` row `rec` overwrites in place with `datconnlimit` = -2, as
/// `DROP DATABASE` does to mark it invalid before it removes its files, outside the
/// transaction: a recovery that is to keep the database must stop before this record. The row
/// is the block data of `XLOG_HEAP_INPLACE` (from `t_hoff`) or, when the block carries a
/// full-page image instead, in the image at the line pointer the main data names
/// (`xl_heap_inplace` starts with `offnum` in every version).
pub fn invalidated_database(rec: &WalRecord, pg_version: u32) -> Option<u32> {
    let block = rec.block.as_ref()?;
    let is_inplace = rec.rmid == RM_HEAP_ID && rec.info & 0x70 == XLOG_HEAP_INPLACE;
    if !is_inplace || rec.block_rel?.rel != PG_DATABASE {
        return None;
    }
    let invalid = |row: &[u8]| {
        let limit = u32_at(row, datconnlimit_at(pg_version))? as i32;
        u32_at(row, 0).filter(|&o| o != 0 && limit == DATCONNLIMIT_INVALID_DB)
    };
    match (block.data(), block.image()) {
        (data, _) if !data.is_empty() => invalid(data),
        (_, Some(image)) => {
            let h = &block.header;
            let page = page_image::restore(image, h.image_info, h.hole_offset, h.hole_length, pg_version)?;
            let offnum = u16_at(&rec.main, 0)?;
            page_tuples(&page, &[offnum]).first().and_then(|t| invalid(t))
        }
        _ => None,
    }
}

/// A `pg_class` row: a relation created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassRow {
    pub oid: u32,
    /// `relname`.
    pub name: String,
    /// `relnamespace`: the schema's OID.
    pub namespace: u32,
    /// `relfilenode`: the file number the WAL names it by (0 for a mapped catalog).
    pub filenode: u32,
    /// `reltablespace` (0: the database's default).
    pub tablespace: u32,
    /// `relkind`, as the relation map writes it.
    pub kind: String,
}

/// A `pg_namespace` row: a schema created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceRow {
    pub oid: u32,
    pub name: String,
}

/// A `pg_index` row: which table an index belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRow {
    /// `indexrelid`.
    pub index: u32,
    /// `indrelid`.
    pub table: u32,
}

/// One catalog row a committed or running transaction inserted, where and in which database.
/// Stored in segment summaries (`summary.catalog_rows`, docs/FORMAT.md); exactly one of
/// `class`, `namespace` and `index` is present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogRow {
    /// The insert record.
    pub lsn: Lsn,
    pub xid: u32,
    pub db: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<ClassRow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<NamespaceRow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<IndexRow>,
}

/// The little-endian `u16`/`u32` at `at`, if `b` holds it.
fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// A `NameData` at `at`: the bytes before the first NUL, as text.
fn name_at(b: &[u8], at: usize) -> Option<String> {
    let raw = b.get(at..at + NAME_LEN)?;
    let name = raw.split(|&c| c == 0).next().unwrap_or_default();
    (!name.is_empty()).then(|| String::from_utf8_lossy(name).into_owned())
}

/// Offsets of `relkind` and `relpersistence` in a `pg_class` row of major version `pg_version`.
/// From 12 (when `oid` became an ordinary column) every column before them is 4 bytes but
/// `relname` (64, char-aligned after the 4-byte `oid`): `oid` 0, `relname` 4, `relnamespace` 68,
/// `reltype` 72, `reloftype` 76, `relowner` 80, `relam` 84, `relfilenode` 88, `reltablespace`
/// 92, `relpages` 96, `reltuples` 100, `relallvisible` 104, then 18 added `relallfrozen`,
/// moving `reltoastrelid` and the one-byte `relhasindex`, `relisshared`, `relpersistence` and
/// `relkind` by 4 (checked against each version's `postgres.bki`).
fn class_tail(pg_version: u32) -> (usize, usize) {
    if pg_version >= 18 { (119, 118) } else { (115, 114) }
}

/// The leading columns of a `pg_class` row (`d` starts at `t_hoff`); `None` for a row that does
/// not look like one, or a temporary relation's.
pub fn class_row(d: &[u8], pg_version: u32) -> Option<ClassRow> {
    let (kind_at, persistence_at) = class_tail(pg_version);
    let kind = *d.get(kind_at)?;
    let persistence = *d.get(persistence_at)?;
    if !KINDS_KEPT.contains(&kind) || !b"pu".contains(&persistence) {
        return None;
    }
    Some(ClassRow {
        oid: u32_at(d, 0).filter(|&o| o != 0)?,
        name: name_at(d, 4)?,
        namespace: u32_at(d, 68)?,
        filenode: u32_at(d, 88)?,
        tablespace: u32_at(d, 92)?,
        kind: char::from(kind).to_string(),
    })
}

/// `pg_namespace { oid; nspname; ... }`.
pub fn namespace_row(d: &[u8]) -> Option<NamespaceRow> {
    Some(NamespaceRow {
        oid: u32_at(d, 0).filter(|&o| o != 0)?,
        name: name_at(d, 4)?,
    })
}

/// `pg_index { indexrelid; indrelid; ... }`.
pub fn index_row(d: &[u8]) -> Option<IndexRow> {
    Some(IndexRow {
        index: u32_at(d, 0).filter(|&o| o != 0)?,
        table: u32_at(d, 4).filter(|&o| o != 0)?,
    })
}

/// The catalog rows `rec` inserts, if it is a heap insert into a catalog this module reads
/// whose first block the decoder kept. Rows that do not decode are left out.
pub fn rows_of(rec: &WalRecord, pg_version: u32) -> Vec<CatalogRow> {
    let (Some(block), Some(rel)) = (&rec.block, rec.block_rel) else {
        return Vec::new();
    };
    if !reads_file(rel.rel) || rec.rmid == RM_HEAP_ID && rec.info & 0x70 == XLOG_HEAP_INPLACE {
        return Vec::new();
    }
    let data = block.data();
    let tuples: Vec<&[u8]> = match (rec.rmid, data.is_empty(), block.image()) {
        (RM_HEAP_ID, false, _) => inserted_tuple(data).into_iter().collect(),
        (RM_HEAP2_ID, false, _) => multi_inserted_tuples(data),
        (_, true, Some(image)) => {
            let h = &block.header;
            let page = page_image::restore(image, h.image_info, h.hole_offset, h.hole_length, pg_version);
            let offsets = inserted_offsets(rec);
            let tuples = page
                .as_deref()
                .map(|p| page_tuples(p, &offsets))
                .unwrap_or_default();
            return rows_from(rec, rel.db, rel.rel, pg_version, tuples.into_iter());
        }
        _ => Vec::new(),
    };
    rows_from(rec, rel.db, rel.rel, pg_version, tuples.into_iter())
}

/// Rows of catalog `catalog` from tuple data starting at `t_hoff`.
fn rows_from<'a>(
    rec: &WalRecord,
    db: u32,
    catalog: u32,
    pg_version: u32,
    tuples: impl Iterator<Item = &'a [u8]>,
) -> Vec<CatalogRow> {
    tuples
        .filter_map(|d| {
            let mut row = CatalogRow {
                lsn: rec.lsn,
                xid: rec.xid,
                db,
                class: None,
                namespace: None,
                index: None,
            };
            match catalog {
                PG_CLASS => row.class = Some(class_row(d, pg_version)?),
                PG_NAMESPACE => row.namespace = Some(namespace_row(d)?),
                PG_INDEX => row.index = Some(index_row(d)?),
                _ => return None,
            }
            Some(row)
        })
        .collect()
}

/// The tuple of an `XLOG_HEAP_INSERT`'s block data (`xl_heap_header`, then the tuple from its
/// null bitmap on), from `t_hoff`.
fn inserted_tuple(data: &[u8]) -> Option<&[u8]> {
    let t_hoff = usize::from(*data.get(XL_HEAP_HEADER_LEN - 1)?);
    data.get(XL_HEAP_HEADER_LEN + t_hoff.checked_sub(TUPLE_HEADER_LEN)?..)
}

/// The tuples of an `XLOG_HEAP2_MULTI_INSERT`'s block data, from their `t_hoff`: each an
/// `xl_multi_insert_tuple` at a 2-byte boundary, then `datalen` bytes of tuple from the null
/// bitmap on (`heap_xlog_multi_insert`).
fn multi_inserted_tuples(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        at = at.next_multiple_of(2);
        let (Some(len), Some(&t_hoff)) = (u16_at(data, at), data.get(at + XL_MULTI_INSERT_TUPLE_LEN - 1))
        else {
            break;
        };
        let start = at + XL_MULTI_INSERT_TUPLE_LEN;
        let Some(tuple) = data.get(start..start + usize::from(len)) else {
            break;
        };
        if let Some(d) = usize::from(t_hoff)
            .checked_sub(TUPLE_HEADER_LEN)
            .and_then(|skip| tuple.get(skip..))
        {
            out.push(d);
        }
        at = start + usize::from(len);
    }
    out
}

/// The line pointers an insert filled: `xl_heap_insert.offnum`, or a multi-insert's offsets
/// (`xl_heap_multi_insert { flags; ntuples; offsets[] }`, 1 to `ntuples` on an initialised
/// page). As far as the kept main data holds them.
fn inserted_offsets(rec: &WalRecord) -> Vec<u16> {
    let m = &rec.main;
    if rec.rmid == RM_HEAP_ID {
        return u16_at(m, 0).into_iter().collect();
    }
    let n = u16_at(m, 2).unwrap_or(0);
    if rec.info & XLOG_HEAP_INIT_PAGE != 0 {
        return (1..=n).collect();
    }
    (0..usize::from(n)).map_while(|i| u16_at(m, 4 + 2 * i)).collect()
}

/// The tuples of heap page `p` at line pointers `offsets` (1-based), from their `t_hoff`.
fn page_tuples<'a>(p: &'a [u8], offsets: &[u16]) -> Vec<&'a [u8]> {
    let lower = u16_at(p, PD_LOWER_AT).map_or(0, usize::from);
    offsets
        .iter()
        .filter_map(|&off| {
            let at = PAGE_HEADER_LEN + 4 * usize::from(off.checked_sub(1)?);
            if at + 4 > lower {
                return None;
            }
            // ItemIdData { lp_off:15, lp_flags:2, lp_len:15 }, low bits first.
            let lp = u32_at(p, at)?;
            let (lp_off, flags, lp_len) = ((lp & 0x7FFF) as usize, (lp >> 15) & 3, (lp >> 17) as usize);
            if flags != LP_NORMAL {
                return None;
            }
            let tuple = p.get(lp_off..lp_off + lp_len)?;
            let t_hoff = usize::from(*tuple.get(T_HOFF_AT)?);
            (t_hoff >= TUPLE_HEADER_LEN)
                .then(|| tuple.get(t_hoff..))
                .flatten()
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::wal::record::{BlockPayload, FirstBlock, RecordKind, RelFileLocator};

    /// The columns of a `pg_class` row up to `relkind` (and a few after), as PostgreSQL
    /// `pg_version` lays them out after `t_hoff`.
    pub(crate) fn class_data(
        pg_version: u32,
        oid: u32,
        name: &str,
        nsp: u32,
        filenode: u32,
        kind: u8,
    ) -> Vec<u8> {
        let mut d = oid.to_le_bytes().to_vec();
        let mut n = [0u8; NAME_LEN];
        n[..name.len()].copy_from_slice(name.as_bytes());
        d.extend_from_slice(&n);
        // relnamespace, reltype, reloftype, relowner, relam, relfilenode, reltablespace
        for w in [nsp, 16402, 0, 10, 2, filenode, 0] {
            d.extend_from_slice(&w.to_le_bytes());
        }
        d.extend_from_slice(&0i32.to_le_bytes()); // relpages
        d.extend_from_slice(&(-1f32).to_le_bytes()); // reltuples
        d.extend_from_slice(&0i32.to_le_bytes()); // relallvisible
        if pg_version >= 18 {
            d.extend_from_slice(&0i32.to_le_bytes()); // relallfrozen
        }
        d.extend_from_slice(&0u32.to_le_bytes()); // reltoastrelid
        d.extend_from_slice(&[0, 0, b'p', kind]); // relhasindex, relisshared, relpersistence, relkind
        d.extend_from_slice(&3i16.to_le_bytes()); // relnatts
        d
    }

    /// A whole heap tuple: the 23-byte header, a null bitmap, padding to `t_hoff` = 32, `data`.
    pub(crate) fn tuple(data: &[u8]) -> Vec<u8> {
        let mut t = vec![0u8; 32];
        t[T_HOFF_AT] = 32;
        t[20] = 0x01; // t_infomask: HEAP_HASNULL (the null bitmap at 23 says so)
        t[23] = 0xFF;
        t.extend_from_slice(data);
        t
    }

    /// The block data of an `XLOG_HEAP_INSERT`: `xl_heap_header`, then the tuple after its
    /// 23-byte fixed header.
    pub(crate) fn insert_data(data: &[u8]) -> Vec<u8> {
        let t = tuple(data);
        let mut b = vec![0x21, 0x00, 0x01, 0x08, t[T_HOFF_AT]];
        b.extend_from_slice(&t[TUPLE_HEADER_LEN..]);
        b
    }

    /// An 8 KiB heap page holding `tuples` at line pointers 1.., stored as a full-page image
    /// with its hole left out: (image, hole offset).
    pub(crate) fn page_image(tuples: &[Vec<u8>]) -> (Vec<u8>, u16) {
        let mut page = vec![0u8; 8192];
        let mut upper = 8192usize;
        for (i, t) in tuples.iter().enumerate() {
            upper = (upper - t.len()) & !7;
            page[upper..upper + t.len()].copy_from_slice(t);
            let lp = upper as u32 | (LP_NORMAL << 15) | ((t.len() as u32) << 17);
            page[PAGE_HEADER_LEN + 4 * i..][..4].copy_from_slice(&lp.to_le_bytes());
        }
        let lower = PAGE_HEADER_LEN + 4 * tuples.len();
        page[PD_LOWER_AT..][..2].copy_from_slice(&(lower as u16).to_le_bytes());
        page[14..16].copy_from_slice(&(upper as u16).to_le_bytes());
        page[16..18].copy_from_slice(&8192u16.to_le_bytes());
        page[18..20].copy_from_slice(&(8192u16 | 4).to_le_bytes()); // pd_pagesize_version
        let mut image = page[..lower].to_vec();
        image.extend_from_slice(&page[upper..]);
        (image, lower as u16)
    }

    fn record(
        rmid: u8,
        info: u8,
        rel: u32,
        image: Option<(&[u8], u16)>,
        data: &[u8],
        main: Vec<u8>,
    ) -> WalRecord {
        let (image_bytes, hole_offset) = image.unwrap_or((&[], 0));
        let mut bytes = image_bytes.to_vec();
        bytes.extend_from_slice(data);
        WalRecord {
            lsn: Lsn(0x3000100),
            end: Lsn(0),
            prev: Lsn(0),
            xid: 750,
            rmid,
            info,
            total_len: 0,
            kind: RecordKind::Other,
            block_rel: Some(RelFileLocator {
                spc: 1663,
                db: 5,
                rel,
            }),
            block: Some(BlockPayload {
                header: FirstBlock {
                    off: 0,
                    fork: 0,
                    data_len: data.len() as u16,
                    image_len: image_bytes.len() as u16,
                    hole_offset,
                    hole_length: 0,
                    image_info: if image.is_some() { 0x01 } else { 0 },
                    compressed: false,
                },
                bytes,
            }),
            main_len: main.len() as u32,
            main,
        }
    }

    fn class(oid: u32, name: &str, nsp: u32, filenode: u32, kind: &str) -> ClassRow {
        ClassRow {
            oid,
            name: name.into(),
            namespace: nsp,
            filenode,
            tablespace: 0,
            kind: kind.into(),
        }
    }

    #[test]
    fn a_pg_class_row_from_an_insert_records_block_data_in_every_version() {
        for v in [13, 15, 17, 18] {
            let data = insert_data(&class_data(v, 16400, "orders_2026", 2200, 16401, b'r'));
            let rec = record(RM_HEAP_ID, 0x00, PG_CLASS, None, &data, vec![7, 0, 0]);
            let rows = rows_of(&rec, v);
            assert_eq!(rows.len(), 1, "PostgreSQL {v}");
            assert_eq!((rows[0].db, rows[0].xid, rows[0].lsn), (5, 750, Lsn(0x3000100)));
            assert_eq!(rows[0].class, Some(class(16400, "orders_2026", 2200, 16401, "r")));
            // Read with the other layout, relkind falls on another byte: no row, not a wrong one.
            let other = if v >= 18 { 17 } else { 18 };
            assert!(rows_of(&rec, other).is_empty(), "PostgreSQL {v} read as {other}");
        }
    }

    #[test]
    fn a_pg_class_row_inside_a_full_page_image() {
        let other = tuple(&class_data(15, 16390, "older", 2200, 16390, b'r'));
        let new = tuple(&class_data(15, 16400, "orders_2026_pkey", 2200, 16400, b'i'));
        let (image, hole) = page_image(&[other, new]);
        // xl_heap_insert { offnum = 2; flags }
        let rec = record(
            RM_HEAP_ID,
            0x00,
            PG_CLASS,
            Some((&image, hole)),
            &[],
            vec![2, 0, 0],
        );
        let rows = rows_of(&rec, 15);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            rows[0].class,
            Some(class(16400, "orders_2026_pkey", 2200, 16400, "i"))
        );
        // The same image compressed (wal_compression = zstd), its hole's length in the header.
        let mut compressed = rec.clone();
        let b = compressed.block.as_mut().unwrap();
        b.bytes = zstd::bulk::compress(&image, 3).unwrap();
        b.header.image_len = b.bytes.len() as u16;
        b.header.hole_length = 8192 - image.len() as u16;
        b.header.image_info = 0x01 | 0x10; // BKPIMAGE_HAS_HOLE | BKPIMAGE_COMPRESS_ZSTD
        b.header.compressed = true;
        assert_eq!(rows_of(&compressed, 15), rows);
        let b = compressed.block.as_mut().unwrap();
        b.header.image_info = 0x01 | 0x08; // called LZ4, which it is not: no page, no row
        assert!(rows_of(&compressed, 15).is_empty());
        // A line pointer past pd_lower reads nothing.
        let far = record(
            RM_HEAP_ID,
            0x00,
            PG_CLASS,
            Some((&image, hole)),
            &[],
            vec![3, 0, 0],
        );
        assert!(rows_of(&far, 15).is_empty());
    }

    #[test]
    fn multi_inserts_namespaces_and_indexes() {
        // Two pg_class tuples in one XLOG_HEAP2_MULTI_INSERT's block data.
        let mut data = Vec::new();
        for (oid, name) in [(16500u32, "a"), (16501, "b")] {
            let t = tuple(&class_data(16, oid, name, 16499, oid, b'r'));
            let body = &t[TUPLE_HEADER_LEN..];
            data.resize(data.len().next_multiple_of(2), 0);
            data.extend_from_slice(&(body.len() as u16).to_le_bytes());
            data.extend_from_slice(&[0x21, 0, 0x01, 0x08, 32]);
            data.extend_from_slice(body);
        }
        let rec = record(
            RM_HEAP2_ID,
            0x50,
            PG_CLASS,
            None,
            &data,
            vec![0, 0, 2, 0, 1, 0, 2, 0],
        );
        let names: Vec<String> = rows_of(&rec, 16)
            .into_iter()
            .map(|r| r.class.unwrap().name)
            .collect();
        assert_eq!(names, ["a", "b"]);

        let mut nsp = 16499u32.to_le_bytes().to_vec();
        let mut n = [0u8; NAME_LEN];
        n[..5].copy_from_slice(b"sales");
        nsp.extend_from_slice(&n);
        nsp.extend_from_slice(&10u32.to_le_bytes());
        let rec = record(
            RM_HEAP_ID,
            0x00,
            PG_NAMESPACE,
            None,
            &insert_data(&nsp),
            vec![1, 0, 0],
        );
        assert_eq!(
            rows_of(&rec, 16)[0].namespace,
            Some(NamespaceRow {
                oid: 16499,
                name: "sales".into()
            })
        );
        let mut idx = 16502u32.to_le_bytes().to_vec();
        idx.extend_from_slice(&16500u32.to_le_bytes());
        idx.extend_from_slice(&1i16.to_le_bytes());
        let rec = record(
            RM_HEAP_ID,
            0x80,
            PG_INDEX,
            None,
            &insert_data(&idx),
            vec![1, 0, 0],
        );
        assert_eq!(
            rows_of(&rec, 16)[0].index,
            Some(IndexRow {
                index: 16502,
                table: 16500
            })
        );
        // Another relation's inserts, and temporary relations, are not rows.
        let data = insert_data(&class_data(16, 16600, "t", 2200, 16600, b'r'));
        assert!(rows_of(&record(RM_HEAP_ID, 0, 16384, None, &data, vec![1, 0, 0]), 16).is_empty());
        let mut temp = class_data(16, 16600, "t", 2200, 16600, b'r');
        temp[114] = b't';
        assert!(class_row(&temp, 16).is_none());
    }

    #[test]
    fn the_decoder_keeps_catalog_inserts_whole_across_a_segment_boundary() {
        use crate::wal::summary::summarize_segment;
        use crate::wal::testwal::{self, WalWriter};
        const SEG: u32 = 1 << 20;
        let mut w = WalWriter::new(u64::from(SEG), SEG, 8192);
        let data = insert_data(&class_data(15, 16400, "orders_2026", 2200, 16400, b'r'));
        let first = w.record(
            RM_HEAP_ID,
            0x00,
            750,
            &testwal::block_then_main(PG_CLASS, None, &data, &[1, 0, 0]),
        );
        // The same insert into a user table keeps nothing.
        w.record(
            RM_HEAP_ID,
            0x00,
            750,
            &testwal::block_then_main(16384, None, &data, &[2, 0, 0]),
        );
        // A full-page image of pg_class that crosses into the next segment.
        let mut tuples: Vec<Vec<u8>> = (0..40)
            .map(|i| tuple(&class_data(15, 16000 + i, "older", 2200, 16000 + i, b'r')))
            .collect();
        tuples.push(tuple(&class_data(
            15,
            16405,
            "orders_2026_pkey",
            2200,
            16405,
            b'i',
        )));
        let (image, hole) = page_image(&tuples);
        assert!(image.len() > 6000);
        w.fill_until_segment_offset(SEG - 4000);
        let second = w.record(
            RM_HEAP_ID,
            0x00,
            750,
            &testwal::block_then_main(PG_CLASS, Some((&image, hole)), &[], &[41, 0, 0]),
        );
        let end = w.pos().div_ceil(u64::from(SEG)) * u64::from(SEG);
        w.bytes.resize((end - w.start) as usize, 0);
        let seg = |n: u64| &w.bytes[((n * u64::from(SEG)) - w.start) as usize..][..SEG as usize];
        let (s1, carry) = summarize_segment(seg(1), Lsn(u64::from(SEG)), None).unwrap();
        assert_eq!(s1.catalog_rows.len(), 1);
        assert_eq!(s1.catalog_rows[0].lsn, Lsn(first));
        assert_eq!(
            s1.catalog_rows[0].class,
            Some(class(16400, "orders_2026", 2200, 16400, "r"))
        );
        let carry_json = serde_json::to_string(&carry).unwrap();
        assert!(
            carry_json.contains("\"block\""),
            "the image in progress is carried"
        );
        let carry = serde_json::from_str(&carry_json).unwrap();
        let (s2, _) = summarize_segment(seg(2), Lsn(2 * u64::from(SEG)), carry).unwrap();
        assert_eq!(s2.catalog_rows.len(), 1);
        assert_eq!(s2.catalog_rows[0].lsn, Lsn(second));
        assert_eq!(
            s2.catalog_rows[0].class.as_ref().unwrap().name,
            "orders_2026_pkey"
        );
        // Stored and read back as the summary's optional field.
        let back: crate::wal::summary::SegmentSummary =
            serde_json::from_str(&serde_json::to_string(&s2).unwrap()).unwrap();
        assert_eq!(back, s2);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Whatever a heap insert into a catalog carries, rows come out whole or not at all.
        #[test]
        fn arbitrary_inserts_never_panic(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            main in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..72),
            multi: bool,
            image: bool,
            catalog in proptest::sample::select(vec![PG_CLASS, PG_NAMESPACE, PG_INDEX]),
            version in 13u32..20,
        ) {
            let (rmid, info) = if multi { (RM_HEAP2_ID, 0x50) } else { (RM_HEAP_ID, 0x00) };
            let rec = match image {
                true => record(rmid, info, catalog, Some((&data, 24)), &[], main),
                false => record(rmid, info, catalog, None, &data, main),
            };
            for row in rows_of(&rec, version) {
                let kinds = [row.class.is_some(), row.namespace.is_some(), row.index.is_some()];
                proptest::prop_assert_eq!(kinds.iter().filter(|&&k| k).count(), 1);
            }
        }
    }

    #[test]
    fn the_database_an_in_place_update_marks_from_its_data_or_its_page_image() {
        // A pg_database row of 15 to 18 with datconnlimit -2 at 80 (13 and 14: at 208).
        let mut row = 16500u32.to_le_bytes().to_vec();
        row.extend_from_slice(&[7; 250]);
        row[80..84].copy_from_slice(&(-2i32).to_le_bytes());
        let data = record(RM_HEAP_ID, XLOG_HEAP_INPLACE, PG_DATABASE, None, &row, vec![3, 0]);
        assert_eq!(invalidated_database(&data, 15), Some(16500));
        assert_eq!(
            invalidated_database(&data, 13),
            None,
            "VACUUM's datfrozenxid update, to 13"
        );
        let mut old = row.clone();
        old[208..212].copy_from_slice(&(-2i32).to_le_bytes());
        let old = record(RM_HEAP_ID, XLOG_HEAP_INPLACE, PG_DATABASE, None, &old, vec![3, 0]);
        assert_eq!(invalidated_database(&old, 13), Some(16500));
        let (image, hole) = page_image(&[tuple(&[1; 40]), tuple(&[2; 40]), tuple(&row)]);
        let imaged = record(
            RM_HEAP_ID,
            XLOG_HEAP_INPLACE,
            PG_DATABASE,
            Some((&image, hole)),
            &[],
            vec![3, 0],
        );
        assert_eq!(invalidated_database(&imaged, 16), Some(16500));
        // Not pg_database, or not in place: nothing.
        let other = record(RM_HEAP_ID, XLOG_HEAP_INPLACE, PG_CLASS, None, &row, vec![3, 0]);
        assert_eq!(invalidated_database(&other, 15), None);
        let insert = record(RM_HEAP_ID, 0x00, PG_DATABASE, None, &row, vec![3, 0]);
        assert_eq!(invalidated_database(&insert, 15), None);
        assert!(rows_of(&data, 15).is_empty());
    }

    #[test]
    fn garbage_never_panics() {
        for len in 0..200 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            for rmid in [RM_HEAP_ID, RM_HEAP2_ID] {
                let _ = rows_of(&record(rmid, 0x50, PG_CLASS, None, &junk, junk.clone()), 15);
                let _ = rows_of(
                    &record(rmid, 0x00, PG_CLASS, Some((&junk, 30)), &[], junk.clone()),
                    15,
                );
            }
        }
    }
}
