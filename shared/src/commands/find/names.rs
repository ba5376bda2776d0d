//! Names for what a backup's relation map does not know: the relations and schemas created
//! after it, from the catalog rows the time index records as the archiver reads the WAL
//! ([`crate::wal::catalog_rows`]). [`WalCatalog`] holds every row of every summary;
//! [`WalCatalog::before`] gives what was created before one event, on its timeline's history
//! ([`WalNames`]), which `describe` asks after the relation map.

use std::collections::HashMap;

use crate::basebackup::relmap::Relation;
use crate::catalog::Catalog;
use crate::timeline::TimelineHistory;
use crate::wal::catalog_rows::{CatalogRow, ClassRow};
use crate::wal::{Lsn, TimelineId};

/// Schemas every database has from initdb, by OID.
const INITDB_SCHEMAS: [(u32, &str); 3] = [(11, "pg_catalog"), (99, "pg_toast"), (2200, "public")];

/// Every catalog row the time index recorded, with the timeline of the summary that holds it,
/// in LSN order.
#[derive(Debug, Default)]
pub struct WalCatalog {
    rows: Vec<(TimelineId, CatalogRow)>,
}

impl WalCatalog {
    /// The rows of every summary `cat` read.
    pub fn from_catalog(cat: &Catalog) -> WalCatalog {
        let mut rows: Vec<(TimelineId, CatalogRow)> = cat
            .summaries()
            .flat_map(|((tli, _), s)| s.catalog_rows.iter().map(move |r| (tli, r.clone())))
            .collect();
        rows.sort_by_key(|(_, r)| r.lsn);
        WalCatalog { rows }
    }

    #[cfg(test)]
    pub fn of(rows: Vec<(TimelineId, CatalogRow)>) -> WalCatalog {
        WalCatalog { rows }
    }

    /// What was created before `lsn` on `history` (a row counts when the summary holding it is
    /// of the timeline `history` follows at its LSN); the newest row wins for a file or OID.
    pub fn before(&self, history: &TimelineHistory, lsn: Lsn) -> WalNames {
        let mut names = WalNames::default();
        let end = self.rows.partition_point(|(_, r)| r.lsn < lsn);
        for (tli, row) in &self.rows[..end] {
            if history.timeline_at(row.lsn) != *tli {
                continue;
            }
            if let Some(c) = &row.class {
                if c.filenode != 0 {
                    names.by_file.insert((row.db, c.filenode), (row.lsn, c.oid));
                }
                names.by_oid.insert((row.db, c.oid), (row.lsn, c.clone()));
            }
            if let Some(n) = &row.namespace {
                names.schemas.insert((row.db, n.oid), n.name.clone());
            }
            if let Some(i) = row.index {
                names.index_tables.insert((row.db, i.index), i.table);
            }
        }
        names
    }
}

/// What the WAL says was created before one event (see [`WalCatalog::before`]).
#[derive(Debug, Default)]
pub struct WalNames {
    /// (database, file) to the relation's OID, and where its row was inserted.
    by_file: HashMap<(u32, u32), (Lsn, u32)>,
    by_oid: HashMap<(u32, u32), (Lsn, ClassRow)>,
    schemas: HashMap<(u32, u32), String>,
    /// (database, index OID) to its table's OID.
    index_tables: HashMap<(u32, u32), u32>,
}

/// A relation named from the WAL: as a relation map would list it, and where its row is.
#[derive(Debug, Clone)]
pub struct WalRelation {
    pub relation: Relation,
    /// The `pg_class` insert that named it.
    pub lsn: Lsn,
    /// Its schema's OID (`relnamespace`).
    pub namespace: u32,
    /// Whether its schema's name is known (else `relation.schema` is a placeholder).
    pub schema_known: bool,
}

impl WalNames {
    /// Whether the WAL named anything in database `db` (so its `pg_class` was read).
    pub fn knows_database(&self, db: u32) -> bool {
        self.by_oid.keys().any(|&(d, _)| d == db)
    }

    /// The relation created with file `filenode` in database `db`.
    pub fn relation(&self, db: u32, filenode: u32) -> Option<WalRelation> {
        let &(_, oid) = self.by_file.get(&(db, filenode))?;
        self.relation_by_oid(db, oid)
    }

    /// The relation created with OID `oid` in database `db`.
    pub fn relation_by_oid(&self, db: u32, oid: u32) -> Option<WalRelation> {
        let (lsn, c) = self.by_oid.get(&(db, oid))?;
        let schema = self.schema(db, c.namespace);
        Some(WalRelation {
            relation: Relation {
                oid: c.oid,
                filenode: c.filenode,
                kind: c.kind.clone(),
                schema: schema
                    .clone()
                    .unwrap_or_else(|| format!("<schema {}>", c.namespace)),
                name: c.name.clone(),
                owner: self.owner(db, c),
            },
            lsn: *lsn,
            namespace: c.namespace,
            schema_known: schema.is_some(),
        })
    }

    /// A schema's name: initdb's, or one whose `pg_namespace` row the WAL carried.
    fn schema(&self, db: u32, oid: u32) -> Option<String> {
        INITDB_SCHEMAS
            .iter()
            .find(|(o, _)| *o == oid)
            .map(|(_, n)| n.to_string())
            .or_else(|| self.schemas.get(&(db, oid)).cloned())
    }

    /// The table an index (its `pg_index` row) or a TOAST table (named `pg_toast_<table OID>`)
    /// belongs to; 0 when not known.
    fn owner(&self, db: u32, c: &ClassRow) -> u32 {
        match c.kind.as_str() {
            "i" | "I" => self.index_tables.get(&(db, c.oid)).copied().unwrap_or(0),
            "t" => c
                .name
                .strip_prefix("pg_toast_")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::catalog_rows::{IndexRow, NamespaceRow};
    use crate::wal::lsn::tl;

    fn class_row(lsn: u64, oid: u32, name: &str, nsp: u32, filenode: u32, kind: &str) -> CatalogRow {
        CatalogRow {
            lsn: Lsn(lsn),
            xid: 800,
            db: 5,
            class: Some(ClassRow {
                oid,
                name: name.into(),
                namespace: nsp,
                filenode,
                tablespace: 0,
                kind: kind.into(),
            }),
            namespace: None,
            index: None,
        }
    }

    #[test]
    fn names_follow_the_newest_row_before_the_event_on_its_history() {
        let mut nsp = class_row(0x100, 0, "", 0, 0, "r");
        nsp.class = None;
        nsp.namespace = Some(NamespaceRow {
            oid: 16399,
            name: "sales".into(),
        });
        let mut idx = class_row(0x300, 0, "", 0, 0, "r");
        idx.class = None;
        idx.index = Some(IndexRow {
            index: 16405,
            table: 16400,
        });
        let cat = WalCatalog::of(vec![
            (tl(1), nsp),
            (tl(1), class_row(0x200, 16400, "orders", 16399, 16400, "r")),
            (tl(1), idx),
            (tl(1), class_row(0x300, 16405, "orders_pkey", 16399, 16405, "i")),
            (tl(1), class_row(0x400, 16410, "pg_toast_16400", 99, 16410, "t")),
            (tl(1), class_row(0x500, 16420, "later", 77777, 16420, "r")),
        ]);
        let history = TimelineHistory {
            timeline: tl(1),
            ancestors: vec![],
        };
        let names = cat.before(&history, Lsn(0x500));
        let orders = names.relation(5, 16400).unwrap();
        assert_eq!(
            (orders.relation.qualified(), orders.lsn),
            ("sales.orders".into(), Lsn(0x200))
        );
        assert!(orders.schema_known);
        assert_eq!(names.relation(5, 16405).unwrap().relation.owner, 16400);
        let toast = names.relation(5, 16410).unwrap();
        assert_eq!(
            (toast.relation.qualified(), toast.relation.owner),
            ("pg_toast.pg_toast_16400".into(), 16400)
        );
        assert!(
            names.relation(5, 16420).is_none(),
            "created at the event: not before it"
        );
        assert!(names.relation(6, 16400).is_none(), "another database");
        let later = cat.before(&history, Lsn(0x600)).relation(5, 16420).unwrap();
        assert_eq!(later.relation.qualified(), "<schema 77777>.later");
        assert!(!later.schema_known);
    }
}
