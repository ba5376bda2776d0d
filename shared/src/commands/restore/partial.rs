//! A partial restore (`restore-agent restore --database NAME`): the cluster-wide files, the
//! system databases and the databases asked for are restored; every other database's files are
//! created at their size but sparse and zeroed, none of their chunks fetched, as pgBackRest's
//! `--db-include` does (`restoreSelectiveExpression` in its `command/restore/restore.c`).
//!
//! Recovery replays cleanly over the zeroed files: an online backup is taken with full-page
//! writes forced, so the first change of every page after the backup's checkpoint carries the
//! whole page, and later changes apply over it. Those databases hold zeroes afterwards: they
//! cannot be used, and are dropped once the server is up (`DROP DATABASE`). A cluster that runs
//! with `full_page_writes = off` after the backup may make recovery stop on a zeroed page.
//!
//! Databases are named by the backup's relation map (`backups/<id>/relations.wvo`); an oid is
//! accepted too, and is the only way for a backup without a map.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::RestoreError;
use crate::basebackup::manifest::{EntryKind, Manifest};
use crate::basebackup::relmap;
use crate::repo::Store;
use crate::repo::object::Sealer;

/// PostgreSQL's first oid for user objects (`FirstNormalObjectId`): databases below it are the
/// ones `initdb` made.
const FIRST_NORMAL_OID: u32 = 16384;

/// The databases every partial restore keeps, whatever their oid (a DBA may recreate them).
const SYSTEM_DATABASES: [&str; 3] = ["template0", "template1", "postgres"];

/// A database, by oid and, when the backup's relation map names it, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamedDatabase {
    pub oid: u32,
    pub name: Option<String>,
}

impl std::fmt::Display for NamedDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(n) => write!(f, "{n} ({})", self.oid),
            None => write!(f, "{}", self.oid),
        }
    }
}

/// Which databases a partial restore restores and which it leaves zeroed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedDatabases {
    /// Restored: the system databases and those asked for.
    pub restored: Vec<NamedDatabase>,
    /// Created as sparse zeroed files, nothing fetched: unusable after recovery, to be dropped.
    pub zeroed: Vec<NamedDatabase>,
}

impl PlannedDatabases {
    /// Whether the file at `path` (as the manifest names it) belongs to a zeroed database:
    /// `base/<oid>/...` or `pg_tblspc/<tablespace>/<version directory>/<oid>/...`.
    pub fn zeroes(&self, path: &str) -> bool {
        database_of(path).is_some_and(|oid| self.zeroed.iter().any(|d| d.oid == oid))
    }

    /// What the plan's text report says of them.
    pub fn describe(&self) -> String {
        let list = |dbs: &[NamedDatabase]| {
            dbs.iter()
                .map(NamedDatabase::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "restored: {}; zeroed, nothing fetched (unusable after recovery: drop them): {}",
            list(&self.restored),
            if self.zeroed.is_empty() {
                "none".to_string()
            } else {
                list(&self.zeroed)
            }
        )
    }
}

/// The database a manifest path lies in, if it lies in one.
fn database_of(path: &str) -> Option<u32> {
    let parts: Vec<&str> = path.split('/').collect();
    let dir = match parts.as_slice() {
        ["base", db, _, ..] => db,
        ["pg_tblspc", _, _, db, _, ..] => db,
        _ => return None,
    };
    dir.parse().ok()
}

/// The databases of backup `m`: every directory under `base/` and under a tablespace's version
/// directory.
fn databases_in(m: &Manifest) -> BTreeSet<u32> {
    m.entries
        .iter()
        .filter(|e| e.kind == EntryKind::Dir)
        .filter_map(|e| {
            let parts: Vec<&str> = e.path.split('/').collect();
            match parts.as_slice() {
                ["base", db] | ["pg_tblspc", _, _, db] => db.parse().ok(),
                _ => None,
            }
        })
        .collect()
}

/// Decide a partial restore of backup `m` keeping the databases `asked` (names or oids); none
/// when nothing is asked. Reads the backup's relation map to name them. Refuses a database the
/// backup does not hold.
pub(crate) async fn plan(
    store: &Store,
    sealer: &Sealer,
    m: &Manifest,
    asked: &[String],
) -> Result<Option<PlannedDatabases>, RestoreError> {
    if asked.is_empty() {
        return Ok(None);
    }
    let names: BTreeMap<u32, String> = match relmap::load(store, sealer, &m.id).await {
        Ok(Some(map)) => map.databases.into_iter().map(|d| (d.oid, d.name)).collect(),
        Ok(None) => BTreeMap::new(),
        Err(e) => return Err(RestoreError::RelationMap(e.to_string())),
    };
    Ok(Some(choose(m, &names, asked)?))
}

/// [`plan`] once the names are known (`names`: oid to name, from the relation map).
fn choose(
    m: &Manifest,
    names: &BTreeMap<u32, String>,
    asked: &[String],
) -> Result<PlannedDatabases, RestoreError> {
    let present = databases_in(m);
    let named = |oid: u32| NamedDatabase {
        oid,
        name: names.get(&oid).cloned(),
    };
    let mut wanted = BTreeSet::new();
    for a in asked {
        let oid = match a.parse::<u32>() {
            Ok(oid) if present.contains(&oid) => Some(oid),
            _ => names
                .iter()
                .find(|(oid, name)| *name == a && present.contains(oid))
                .map(|(oid, _)| *oid),
        };
        let Some(oid) = oid else {
            return Err(RestoreError::UnknownDatabase {
                name: a.clone(),
                backup: m.id.clone(),
                known: present
                    .iter()
                    .map(|&o| named(o).to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                unnamed: names.is_empty(),
            });
        };
        wanted.insert(oid);
    }
    let system = |oid: u32| {
        oid < FIRST_NORMAL_OID
            || names
                .get(&oid)
                .is_some_and(|n| SYSTEM_DATABASES.contains(&n.as_str()))
    };
    let (restored, zeroed): (Vec<u32>, Vec<u32>) = present
        .iter()
        .partition(|&&oid| system(oid) || wanted.contains(&oid));
    Ok(PlannedDatabases {
        restored: restored.into_iter().map(named).collect(),
        zeroed: zeroed.into_iter().map(named).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(dirs: &[&str]) -> Manifest {
        let mut m = super::super::testing::fixture();
        m.entries = super::super::testing::dirs(dirs);
        m
    }

    #[test]
    fn the_system_databases_and_those_asked_for_are_kept_and_no_other() {
        let m = manifest(&[
            "base",
            "base/1",
            "base/4",
            "base/5",
            "base/16384",
            "base/16390",
            "base/16400",
            "pg_tblspc",
            "pg_tblspc/16500",
            "pg_tblspc/16500/PG_15_202209061",
            "pg_tblspc/16500/PG_15_202209061/16390",
        ]);
        let names = BTreeMap::from([
            (1, "template1".to_string()),
            (4, "template0".to_string()),
            (5, "postgres".to_string()),
            (16384, "shop".to_string()),
            (16390, "analytics".to_string()),
            // A postgres database recreated by the DBA: still a system database.
            (16400, "postgres".to_string()),
        ]);
        let p = choose(&m, &names, &["shop".into()]).unwrap();
        let oids = |d: &[NamedDatabase]| d.iter().map(|d| d.oid).collect::<Vec<_>>();
        assert_eq!(oids(&p.restored), [1, 4, 5, 16384, 16400]);
        assert_eq!(oids(&p.zeroed), [16390]);
        assert!(p.zeroes("base/16390/16391"));
        assert!(p.zeroes("pg_tblspc/16500/PG_15_202209061/16390/16400.1"));
        assert!(!p.zeroes("base/16384/16391") && !p.zeroes("global/pg_control"));
        assert!(!p.zeroes("base/16390"), "the directory itself is no file of it");
        assert!(
            p.describe().contains("zeroed, nothing fetched"),
            "{}",
            p.describe()
        );
        assert!(p.describe().contains("analytics (16390)"), "{}", p.describe());
        // By oid, too.
        assert_eq!(
            choose(&m, &names, &["16390".into()]).unwrap().zeroed[0].oid,
            16384
        );

        let err = choose(&m, &names, &["nosuchdb".into()]).unwrap_err().to_string();
        assert!(err.contains("nosuchdb") && err.contains("shop (16384)"), "{err}");
        let err = choose(&m, &BTreeMap::new(), &["shop".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no relation map"), "{err}");
    }
}
