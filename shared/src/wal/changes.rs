//! Destructive transactions, found while the archiver decodes each segment: what
//! `restore-agent find` lists so a DBA can name the moment before an accident without reading
//! `pg_waldump` output.
//!
//! Per open transaction, a [`ChangeTracker`] counts the rows each relation lost to `DELETE` and
//! `UPDATE` (one heap record per row), notes `TRUNCATE` records (written only at
//! `wal_level = logical`) and `DROP DATABASE`. At the transaction's commit it adds its
//! subtransactions' counts and reads the relation files the commit unlinks: those of dropped
//! relations, and the old files of truncated or rewritten ones (`TRUNCATE`, `VACUUM FULL`,
//! `CLUSTER`, a rewriting `ALTER TABLE`, `REFRESH MATERIALIZED VIEW`). A commit that unlinks
//! files, truncates, drops a database or changed at least [`ROW_FLOOR`] rows of one relation
//! becomes a [`ChangeEvent`] in the segment's summary. Aborted transactions are forgotten.
//!
//! The WAL names relations by file (`RelFileLocator`), never by name: `find` names them from the
//! relation map each backup records. The WAL does not say whether an unlinked file belonged to a
//! dropped relation or to one given a new file; the rows of `pg_class` the transaction deleted
//! or updated tell, and are kept with the event for that.
//!
//! The tracker is carried from segment to segment with the decoder's state, so a transaction
//! spanning segments is counted whole. It is bounded: [`MAX_OPEN`] transactions with changes at
//! once and [`MAX_RELS`] relations per transaction; past those, the smallest counts are dropped
//! first (an event is then undercounted, never invented).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::catalog_rows;
use super::decode::{RM_XACT_ID, RelFileLocator, WalRecord};
use super::lsn::Lsn;
use super::pgtime::PgTime;

/// Rows one relation must lose (deleted or updated) in one transaction for a change event.
pub const ROW_FLOOR: u64 = 100;
/// Open transactions tracked at once.
pub const MAX_OPEN: usize = 20_000;
/// Relations tracked per transaction (a `DROP TABLE` touches a dozen catalogs).
pub const MAX_RELS: usize = 64;
/// Relation files, truncated relations and subtransactions kept per event.
pub const MAX_LISTED: usize = 1024;

const RM_DBASE_ID: u8 = 4;
const RM_HEAP_ID: u8 = 10;

const XLOG_HEAP_OPMASK: u8 = 0x70;
const XLOG_HEAP_DELETE: u8 = 0x10;
const XLOG_HEAP_UPDATE: u8 = 0x20;
const XLOG_HEAP_TRUNCATE: u8 = 0x30;
const XLOG_HEAP_HOT_UPDATE: u8 = 0x40;
const XLOG_HEAP_INPLACE: u8 = 0x70;

const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_COMMIT: u8 = 0x00;
const XLOG_XACT_PREPARE: u8 = 0x10;
const XLOG_XACT_ABORT: u8 = 0x20;
const XLOG_XACT_HAS_INFO: u8 = 0x80;
const XACT_XINFO_HAS_DBINFO: u32 = 1 << 0;
const XACT_XINFO_HAS_SUBXACTS: u32 = 1 << 1;
const XACT_XINFO_HAS_RELFILELOCATORS: u32 = 1 << 2;

/// The little-endian `u32` at `at`, if `b` holds it (main data may be cut short).
fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    let word = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(word.try_into().expect("4 bytes")))
}

/// `XLOG_DBASE_DROP`: renumbered in PostgreSQL 15, when `CREATE DATABASE` got two strategies.
fn dbase_drop_info(pg_version: u32) -> u8 {
    if pg_version >= 15 { 0x20 } else { 0x10 }
}

/// Rows of one relation a transaction deleted or updated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelRows {
    pub rel: RelFileLocator,
    pub deleted: u64,
    pub updated: u64,
}

impl RelRows {
    fn total(&self) -> u64 {
        self.deleted.saturating_add(self.updated)
    }
}

/// A committed transaction that may have destroyed data. Stored in segment summaries (part of
/// the time index format, see docs/FORMAT.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeEvent {
    /// The commit record: `--target-lsn` of the moment after, `--target-xid` + exclusive stops
    /// just before it.
    pub lsn: Lsn,
    pub xid: u32,
    /// Commit time.
    pub time: PgTime,
    /// The database the transaction ran in, from the commit record, when it says.
    #[serde(default)]
    pub db: Option<u32>,
    /// Relation files the commit unlinks.
    #[serde(default)]
    pub unlinked: Vec<RelFileLocator>,
    /// The commit record was longer than the decoder keeps: `unlinked` may miss some.
    #[serde(default)]
    pub unlinked_cut: bool,
    /// Relation OIDs a `TRUNCATE` record named (database, OIDs); only at `wal_level = logical`.
    #[serde(default)]
    pub truncated: Vec<(u32, u32)>,
    /// The database OID a `DROP DATABASE` removed.
    #[serde(default)]
    pub dropped_database: Option<u32>,
    /// For a `DROP DATABASE`: the first record that destroys the database whether the
    /// transaction commits or not: the in-place update of its `pg_database` row marking it
    /// invalid (PostgreSQL 13.12, 14.9, 15.4, 16 and later), else the `XLOG_DBASE_DROP` record
    /// that removes its files. Recovery that is to keep the database stops before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_from: Option<Lsn>,
    /// Rows deleted or updated per relation: every relation the transaction changed when it
    /// unlinked files (catalogs included, which tells a drop from a rewrite), else those that
    /// lost at least [`ROW_FLOOR`] rows.
    #[serde(default)]
    pub rows: Vec<RelRows>,
}

/// What one open transaction did so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct OpenXact {
    xid: u32,
    rows: Vec<RelRows>,
    #[serde(default)]
    truncated: Vec<(u32, u32)>,
    #[serde(default)]
    dropped_database: Option<u32>,
    /// See [`ChangeEvent::drop_from`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    drop_from: Option<Lsn>,
    /// Only in the entry of transaction id 0 (never a transaction's): the latest in-place updates
    /// of `pg_database` rows, (database, record), which carry no transaction id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    invalidated: Vec<(u32, Lsn)>,
}

/// In-place updates of `pg_database` remembered (see [`OpenXact::invalidated`]).
const MAX_INVALIDATED: usize = 16;

impl OpenXact {
    fn weight(&self) -> u64 {
        self.rows.iter().map(RelRows::total).max().unwrap_or(0)
            + if self.truncated.is_empty() && self.dropped_database.is_none() {
                0
            } else {
                u64::MAX / 2
            }
    }

    fn count(&mut self, rel: RelFileLocator, deleted: u64, updated: u64) {
        if let Some(r) = self.rows.iter_mut().find(|r| r.rel == rel) {
            r.deleted = r.deleted.saturating_add(deleted);
            r.updated = r.updated.saturating_add(updated);
            return;
        }
        if self.rows.len() >= MAX_RELS {
            // Make room by forgetting the relation with the fewest rows, when that is fewer
            // than what arrives.
            let (i, min) = self
                .rows
                .iter()
                .enumerate()
                .min_by_key(|(_, r)| r.total())
                .map(|(i, r)| (i, r.total()))
                .expect("MAX_RELS > 0");
            if min > deleted + updated {
                return;
            }
            self.rows.swap_remove(i);
        }
        self.rows.push(RelRows {
            rel,
            deleted,
            updated,
        });
    }

    /// Note relation `oid` of database `db` as truncated (once, up to [`MAX_LISTED`]).
    fn note_truncated(&mut self, t: (u32, u32)) {
        if self.truncated.len() < MAX_LISTED && !self.truncated.contains(&t) {
            self.truncated.push(t);
        }
    }

    fn absorb(&mut self, other: OpenXact) {
        for r in other.rows {
            self.count(r.rel, r.deleted, r.updated);
        }
        for t in other.truncated {
            self.note_truncated(t);
        }
        self.dropped_database = self.dropped_database.or(other.dropped_database);
        self.drop_from = self.drop_from.or(other.drop_from);
    }
}

/// Counts per open transaction, carried from one segment to the next (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<OpenXact>", into = "Vec<OpenXact>")]
pub struct ChangeTracker {
    open: HashMap<u32, OpenXact>,
}

impl From<Vec<OpenXact>> for ChangeTracker {
    fn from(v: Vec<OpenXact>) -> Self {
        // Untrusted (read back from the repository): keep the bounds.
        let open = v
            .into_iter()
            .take(MAX_OPEN)
            .map(|mut x| {
                x.rows.truncate(MAX_RELS);
                x.truncated.truncate(MAX_LISTED);
                x.invalidated.truncate(MAX_INVALIDATED);
                (x.xid, x)
            })
            .collect();
        ChangeTracker { open }
    }
}

impl From<ChangeTracker> for Vec<OpenXact> {
    fn from(t: ChangeTracker) -> Self {
        let mut v: Vec<OpenXact> = t.open.into_values().collect();
        v.sort_by_key(|x| x.xid);
        v
    }
}

/// The parts of a commit record's main data `find` needs (`ParseCommitRecord` in `xactdesc.c`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitDetail {
    pub db: Option<u32>,
    pub subxacts: Vec<u32>,
    pub unlinked: Vec<RelFileLocator>,
    /// The main data ended (was cut) before the lists did.
    pub cut: bool,
}

/// Read `xl_xact_commit`'s optional parts in the order PostgreSQL 13 to 19 write them:
/// `xinfo`, database, subtransactions, relation files. `main` may be a prefix of the main data.
pub fn parse_commit(info: u8, main: &[u8]) -> CommitDetail {
    let mut d = CommitDetail::default();
    if info & XLOG_XACT_HAS_INFO == 0 {
        return d;
    }
    let u32_at = |at: usize| le_u32(main, at);
    let Some(xinfo) = u32_at(8) else {
        d.cut = true;
        return d;
    };
    let mut at = 12;
    if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
        // xl_xact_dbinfo { Oid dbId; Oid tsId; }
        d.db = u32_at(at);
        at += 8;
    }
    if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
        let Some(n) = u32_at(at) else {
            d.cut = true;
            return d;
        };
        at += 4;
        for i in 0..n as usize {
            match u32_at(at + 4 * i) {
                Some(x) if d.subxacts.len() < MAX_LISTED * 64 => d.subxacts.push(x),
                Some(_) => {}
                None => {
                    d.cut = true;
                    return d;
                }
            }
        }
        at += 4 * n as usize;
    }
    if xinfo & XACT_XINFO_HAS_RELFILELOCATORS != 0 {
        let Some(n) = u32_at(at) else {
            d.cut = true;
            return d;
        };
        at += 4;
        for i in 0..n as usize {
            match main.get(at + 12 * i..).and_then(RelFileLocator::from_bytes) {
                Some(r) if d.unlinked.len() < MAX_LISTED => d.unlinked.push(r),
                Some(_) => {}
                None => {
                    d.cut = true;
                    return d;
                }
            }
        }
    }
    d
}

impl ChangeTracker {
    /// Transactions with changes being counted.
    pub fn open_transactions(&self) -> usize {
        self.open.len()
    }

    fn entry(&mut self, xid: u32) -> Option<&mut OpenXact> {
        if !self.open.contains_key(&xid) && self.open.len() >= MAX_OPEN {
            // Forget the half of the transactions with the fewest changes: they are the least
            // likely to become events.
            let mut weights: Vec<u64> = self.open.values().map(OpenXact::weight).collect();
            weights.sort_unstable();
            let cut = weights[weights.len() / 2];
            self.open.retain(|_, x| x.weight() > cut);
            if self.open.len() >= MAX_OPEN {
                return None;
            }
        }
        Some(self.open.entry(xid).or_insert_with(|| OpenXact {
            xid,
            ..Default::default()
        }))
    }

    /// Take in one record (of a cluster of major version `pg_version`); a commit that destroyed
    /// data comes back as an event.
    pub fn record(&mut self, rec: &WalRecord, pg_version: u32) -> Option<ChangeEvent> {
        match rec.rmid {
            RM_HEAP_ID if rec.info & XLOG_HEAP_OPMASK == XLOG_HEAP_INPLACE => {
                let db = catalog_rows::invalidated_database(rec, pg_version)?;
                let list = &mut self.entry(0)?.invalidated;
                list.retain(|(d, _)| *d != db);
                if list.len() >= MAX_INVALIDATED {
                    list.remove(0);
                }
                list.push((db, rec.lsn));
                None
            }
            RM_HEAP_ID if rec.xid != 0 => {
                let op = rec.info & XLOG_HEAP_OPMASK;
                let (deleted, updated) = match op {
                    XLOG_HEAP_DELETE => (1, 0),
                    XLOG_HEAP_UPDATE | XLOG_HEAP_HOT_UPDATE => (0, 1),
                    XLOG_HEAP_TRUNCATE => {
                        // xl_heap_truncate { Oid dbId; uint32 nrelids; uint8 flags; Oid relids[]; }
                        let m = &rec.main;
                        let (Some(db), Some(n)) = (le_u32(m, 0), le_u32(m, 4)) else {
                            return None;
                        };
                        let x = self.entry(rec.xid)?;
                        for i in 0..n as usize {
                            let Some(oid) = le_u32(m, 12 + 4 * i) else { break };
                            x.note_truncated((db, oid));
                        }
                        return None;
                    }
                    _ => return None,
                };
                let rel = rec.block_rel?;
                self.entry(rec.xid)?.count(rel, deleted, updated);
                None
            }
            RM_DBASE_ID if rec.xid != 0 && rec.info & 0xF0 == dbase_drop_info(pg_version) => {
                // xl_dbase_drop_rec { Oid db_id; ... }
                let db = le_u32(&rec.main, 0)?;
                let invalidated = self
                    .open
                    .get(&0)
                    .and_then(|z| z.invalidated.iter().find(|(d, _)| *d == db))
                    .map(|&(_, lsn)| lsn);
                let x = self.entry(rec.xid)?;
                x.dropped_database = Some(db);
                x.drop_from = x.drop_from.or(invalidated).or(Some(rec.lsn));
                None
            }
            RM_XACT_ID => self.xact(rec),
            // smgr records (file creation) carry no transaction to attribute them to reliably:
            // the commit's list of unlinked files says what matters.
            _ => None,
        }
    }

    fn xact(&mut self, rec: &WalRecord) -> Option<ChangeEvent> {
        match rec.info & XLOG_XACT_OPMASK {
            XLOG_XACT_COMMIT => {
                let time = rec.kind.xact_time()?;
                let d = parse_commit(rec.info, &rec.main);
                let mut x = self.open.remove(&rec.xid).unwrap_or_default();
                for sub in &d.subxacts {
                    if let Some(s) = self.open.remove(sub) {
                        x.absorb(s);
                    }
                }
                let big = x.rows.iter().any(|r| r.total() >= ROW_FLOOR);
                let structural =
                    !d.unlinked.is_empty() || !x.truncated.is_empty() || x.dropped_database.is_some();
                if !big && !structural {
                    return None;
                }
                let mut rows = x.rows;
                if !structural {
                    rows.retain(|r| r.total() >= ROW_FLOOR);
                }
                rows.sort_by(|a, b| b.total().cmp(&a.total()).then(a.rel.cmp(&b.rel)));
                Some(ChangeEvent {
                    lsn: rec.lsn,
                    xid: rec.xid,
                    time,
                    db: d.db,
                    unlinked: d.unlinked,
                    unlinked_cut: d.cut,
                    truncated: x.truncated,
                    dropped_database: x.dropped_database,
                    drop_from: x.drop_from,
                    rows,
                })
            }
            XLOG_XACT_ABORT | XLOG_XACT_PREPARE => {
                // Gone with the transaction: its counts, and for an abort those of the
                // subtransactions it lists (as far as its kept main data holds the list; a
                // subtransaction left over is forgotten when the tracker makes room).
                self.open.remove(&rec.xid);
                if rec.info & XLOG_XACT_OPMASK == XLOG_XACT_ABORT {
                    for sub in parse_commit(rec.info, &rec.main).subxacts {
                        self.open.remove(&sub);
                    }
                }
                None
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::decode::RecordKind;

    fn rel(n: u32) -> RelFileLocator {
        RelFileLocator {
            spc: 1663,
            db: 5,
            rel: n,
        }
    }

    fn rec(rmid: u8, info: u8, xid: u32, block_rel: Option<RelFileLocator>, main: Vec<u8>) -> WalRecord {
        let kind = match (rmid, info & 0x70) {
            (RM_XACT_ID, 0x00) => RecordKind::Commit {
                time: PgTime(i64::from_le_bytes(main[..8].try_into().unwrap())),
            },
            (RM_XACT_ID, 0x20) => RecordKind::Abort {
                time: PgTime(i64::from_le_bytes(main[..8].try_into().unwrap())),
            },
            _ => RecordKind::Other,
        };
        WalRecord {
            lsn: Lsn(u64::from(xid) * 100),
            end: Lsn(0),
            prev: Lsn(0),
            xid,
            rmid,
            info,
            total_len: 0,
            kind,
            block_rel,
            block: None,
            main_len: main.len() as u32,
            main,
        }
    }

    /// `xl_xact_commit` with `xinfo`: database 5, then the given subtransactions and files.
    pub(crate) fn commit_main(time: i64, subxacts: &[u32], unlinked: &[RelFileLocator]) -> Vec<u8> {
        let mut m = time.to_le_bytes().to_vec();
        let mut xinfo = XACT_XINFO_HAS_DBINFO;
        if !subxacts.is_empty() {
            xinfo |= XACT_XINFO_HAS_SUBXACTS;
        }
        if !unlinked.is_empty() {
            xinfo |= XACT_XINFO_HAS_RELFILELOCATORS;
        }
        m.extend_from_slice(&xinfo.to_le_bytes());
        m.extend_from_slice(&5u32.to_le_bytes());
        m.extend_from_slice(&1663u32.to_le_bytes());
        if !subxacts.is_empty() {
            m.extend_from_slice(&(subxacts.len() as u32).to_le_bytes());
            for s in subxacts {
                m.extend_from_slice(&s.to_le_bytes());
            }
        }
        if !unlinked.is_empty() {
            m.extend_from_slice(&(unlinked.len() as u32).to_le_bytes());
            for r in unlinked {
                for w in [r.spc, r.db, r.rel] {
                    m.extend_from_slice(&w.to_le_bytes());
                }
            }
        }
        m
    }

    fn deletes(t: &mut ChangeTracker, xid: u32, r: RelFileLocator, n: u32) {
        for _ in 0..n {
            assert_eq!(
                t.record(&rec(RM_HEAP_ID, XLOG_HEAP_DELETE, xid, Some(r), vec![0; 8]), 15),
                None
            );
        }
    }

    #[test]
    fn a_mass_delete_becomes_an_event_at_its_commit_with_subtransactions_counted() {
        let mut t = ChangeTracker::default();
        deletes(&mut t, 10, rel(16384), 60);
        deletes(&mut t, 11, rel(16384), 50); // a subtransaction (SAVEPOINT) of 10
        deletes(&mut t, 12, rel(16400), 500); // another transaction, aborted
        t.record(
            &rec(RM_HEAP_ID, XLOG_HEAP_HOT_UPDATE, 10, Some(rel(16390)), vec![0; 8]),
            15,
        );
        assert_eq!(
            t.record(
                &rec(RM_XACT_ID, 0x20 | 0x80, 12, None, commit_main(7, &[], &[])),
                15
            ),
            None
        );
        let e = t
            .record(&rec(RM_XACT_ID, 0x80, 10, None, commit_main(99, &[11], &[])), 15)
            .expect("110 rows deleted");
        assert_eq!((e.xid, e.time, e.db), (10, PgTime(99), Some(5)));
        assert_eq!(
            e.rows,
            vec![RelRows {
                rel: rel(16384),
                deleted: 110,
                updated: 0
            }]
        );
        assert!(e.unlinked.is_empty());
        assert_eq!(t.open_transactions(), 0);
    }

    #[test]
    fn small_transactions_are_no_events_and_a_drop_is_one_however_small() {
        let mut t = ChangeTracker::default();
        deletes(&mut t, 20, rel(16384), ROW_FLOOR as u32 - 1);
        assert_eq!(
            t.record(&rec(RM_XACT_ID, 0x80, 20, None, commit_main(1, &[], &[])), 15),
            None
        );
        // DROP TABLE: a few catalog rows deleted, the table's files unlinked at commit.
        deletes(&mut t, 21, rel(1259), 3);
        let e = t
            .record(
                &rec(
                    RM_XACT_ID,
                    0x80,
                    21,
                    None,
                    commit_main(2, &[], &[rel(16384), rel(16387)]),
                ),
                15,
            )
            .expect("files unlinked");
        assert_eq!(e.unlinked, vec![rel(16384), rel(16387)]);
        assert_eq!(e.rows.len(), 1, "catalog rows kept to tell a drop from a rewrite");
        assert!(!e.unlinked_cut);
    }

    #[test]
    fn truncate_records_and_dropped_databases_are_events() {
        let mut t = ChangeTracker::default();
        let mut m = Vec::new();
        for w in [5u32, 2, 0, 16384, 16390] {
            m.extend_from_slice(&w.to_le_bytes());
        }
        t.record(&rec(RM_HEAP_ID, XLOG_HEAP_TRUNCATE, 30, None, m), 16);
        let e = t
            .record(&rec(RM_XACT_ID, 0x80, 30, None, commit_main(3, &[], &[])), 16)
            .unwrap();
        assert_eq!(e.truncated, vec![(5, 16384), (5, 16390)]);

        // PostgreSQL 14 and 15 number XLOG_DBASE_DROP differently.
        for (version, info) in [(14, 0x10), (15, 0x20)] {
            t.record(
                &rec(RM_DBASE_ID, info, 31, None, 16500u32.to_le_bytes().to_vec()),
                version,
            );
            let e = t
                .record(
                    &rec(RM_XACT_ID, 0x80, 31, None, commit_main(4, &[], &[])),
                    version,
                )
                .unwrap();
            assert_eq!(e.dropped_database, Some(16500));
        }
        // PostgreSQL 15's 0x10 is CREATE DATABASE (WAL_LOG strategy).
        t.record(
            &rec(RM_DBASE_ID, 0x10, 32, None, 16501u32.to_le_bytes().to_vec()),
            15,
        );
        assert_eq!(
            t.record(&rec(RM_XACT_ID, 0x80, 32, None, commit_main(5, &[], &[])), 15),
            None
        );
    }

    #[test]
    fn a_dropped_database_is_gone_from_its_in_place_invalidation_on() {
        use crate::wal::record::{BlockPayload, FirstBlock};
        // XLOG_HEAP_INPLACE of pg_database's row of database 16500 (no transaction id), then
        // DROP DATABASE's records in transaction 31; its drop record is at 3100.
        let mut inplace = rec(RM_HEAP_ID, XLOG_HEAP_INPLACE, 0, None, vec![1, 0]);
        inplace.lsn = Lsn(0x2000);
        inplace.block_rel = Some(RelFileLocator {
            spc: 1664,
            db: 0,
            rel: catalog_rows::PG_DATABASE,
        });
        let mut row = 16500u32.to_le_bytes().to_vec();
        row.extend_from_slice(&[0; 100]);
        row[80..84].copy_from_slice(&(-2i32).to_le_bytes()); // datconnlimit: invalid
        inplace.block = Some(BlockPayload {
            header: FirstBlock {
                off: 0,
                fork: 0,
                data_len: row.len() as u16,
                image_len: 0,
                hole_offset: 0,
                hole_length: 0,
                image_info: 0,
                compressed: false,
            },
            bytes: row,
        });
        let mut t = ChangeTracker::default();
        assert_eq!(t.record(&inplace, 16), None);
        let back: ChangeTracker = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        let mut t = back; // carried into the next segment
        for (db, xid) in [(16500u32, 31), (16600, 32)] {
            t.record(&rec(RM_DBASE_ID, 0x20, xid, None, db.to_le_bytes().to_vec()), 16);
            let e = t
                .record(&rec(RM_XACT_ID, 0x80, xid, None, commit_main(4, &[], &[])), 16)
                .unwrap();
            assert_eq!(e.dropped_database, Some(db));
            // 16600 was not marked invalid first (an older minor release): its drop record.
            let want = if db == 16500 {
                Lsn(0x2000)
            } else {
                Lsn(u64::from(xid) * 100)
            };
            assert_eq!(e.drop_from, Some(want), "database {db}");
        }
    }

    #[test]
    fn a_cut_commit_record_says_so() {
        let full = commit_main(1, &[], &[rel(1), rel(2), rel(3)]);
        let d = parse_commit(0x80, &full[..full.len() - 6]);
        assert_eq!(d.unlinked, vec![rel(1), rel(2)]);
        assert!(d.cut);
        assert_eq!(parse_commit(0x00, &full[..8]), CommitDetail::default());
    }

    #[test]
    fn the_tracker_stays_bounded_and_survives_storage() {
        let mut t = ChangeTracker::default();
        for xid in 1..=(MAX_OPEN as u32 + 10) {
            deletes(&mut t, xid, rel(16384), 1);
        }
        assert!(t.open_transactions() <= MAX_OPEN);
        let mut x = ChangeTracker::default();
        for r in 0..(MAX_RELS as u32 * 2) {
            deletes(&mut x, 7, rel(20000 + r), 1);
        }
        deletes(&mut x, 7, rel(16384), 300);
        let back: ChangeTracker = serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap();
        assert_eq!(back, x);
        let mut back = back;
        let e = back
            .record(&rec(RM_XACT_ID, 0x80, 7, None, commit_main(9, &[], &[])), 15)
            .unwrap();
        assert_eq!(e.rows[0].rel, rel(16384));
        assert_eq!(e.rows[0].deleted, 300);
    }

    #[test]
    fn the_decoder_hands_over_block_relations_and_whole_commit_records_across_segments() {
        use crate::wal::summary::summarize_segment;
        use crate::wal::testwal::{self, WalWriter};
        const SEG: u32 = 1 << 20;
        let mut w = WalWriter::new(u64::from(SEG), SEG, 8192);
        // 150 deletes of 16384 (testwal's block 0 relation: tablespace 1663, database 5).
        let delete = testwal::blocks_then_main(&[(0, 14)], &[0; 8]);
        for _ in 0..150 {
            w.record(RM_HEAP_ID, XLOG_HEAP_DELETE, 40, &delete);
        }
        // A commit unlinking 2000 files, long enough to cross into the next segment.
        let files: Vec<RelFileLocator> = (0..2000).map(|n| rel(30000 + n)).collect();
        w.fill_until_segment_offset(SEG - 9000);
        let commit = w.record(
            RM_XACT_ID,
            0x80,
            40,
            &testwal::main_data_long(&commit_main(77, &[], &files)),
        );
        let end = w.pos().div_ceil(u64::from(SEG)) * u64::from(SEG);
        w.bytes.resize((end - w.start) as usize, 0);
        let seg = |n: u64| &w.bytes[((n * u64::from(SEG)) - w.start) as usize..][..SEG as usize];
        let (s1, carry) = summarize_segment(seg(1), Lsn(u64::from(SEG)), None).unwrap();
        assert_eq!(s1.events, Some(vec![]));
        let (s2, _) = summarize_segment(seg(2), Lsn(2 * u64::from(SEG)), carry).unwrap();
        let events = s2.events.unwrap();
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!((e.lsn, e.xid, e.time), (Lsn(commit), 40, PgTime(77)));
        assert_eq!(e.unlinked, files[..MAX_LISTED]);
        assert!(!e.unlinked_cut);
        assert_eq!(
            e.rows[0],
            RelRows {
                rel: rel(16384),
                deleted: 150,
                updated: 0
            }
        );
    }
}
