//! The page check of a backup read from disk: every page of every relation file read is
//! verified as PostgreSQL verifies it (`crate::basebackup::page_checksum`), where the copy
//! already holds its bytes. The backup completes whatever it finds (the data is what it is);
//! damaged pages are named with the relation map, logged, recorded in the manifest, and make
//! `archive-agent backup` exit with [`crate::exit::BACKUP_DAMAGED_PAGES`].

use std::collections::HashSet;

use crate::basebackup::manifest::Manifest;
use crate::basebackup::page_checksum::{
    self, BLCKSZ, BadPage, Checked, Fault, MAX_LISTED, PageChecks, RELSEG_SIZE, RelationFile,
};
use crate::basebackup::relmap::RelationMap;
use crate::wal::Lsn;

use super::session::PageLayout;

/// The bytes of a page.
pub(super) const PAGE: usize = BLCKSZ;

/// What the copy checks pages against: the backup's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PageCheck {
    pub start: Lsn,
}

/// The check a backup makes: `None`, with a line saying why, when pages are not checked.
pub(super) fn plan(
    wanted: bool,
    layout: Option<PageLayout>,
    chunk_size: u64,
    start: Lsn,
) -> Option<PageCheck> {
    let why_not = match layout {
        _ if !wanted => "--no-page-checksums",
        None => "data_checksums is off in this cluster",
        Some(l) if l.blcksz as usize != BLCKSZ || l.relseg_size != RELSEG_SIZE => {
            "the cluster was built with a block or segment size other than 8 KiB and 1 GiB"
        }
        Some(_) if !chunk_size.is_multiple_of(BLCKSZ as u64) => "the chunk size is not a multiple of 8 KiB",
        Some(_) => {
            tracing::info!("page checksums are verified as the files are read");
            return Some(PageCheck { start });
        }
    };
    tracing::info!("page checksums are not verified: {why_not}");
    None
}

/// The pages found by the copy, before they are named.
#[derive(Debug, Default)]
pub(super) struct Tally {
    checked: u64,
    recent: u64,
    /// (path, its relation file, block in the fork, what is wrong).
    bad: Vec<(String, RelationFile, u32, Fault)>,
    /// Bad pages of files taken over unread, as the previous backup recorded them.
    carried: Vec<BadPage>,
}

impl Tally {
    /// The pages `checked` of file `path`.
    pub fn add(&mut self, path: &str, file: &RelationFile, checked: Checked) {
        self.checked += checked.pages;
        self.recent += checked.recent;
        for (block, fault) in checked.bad {
            self.bad.push((path.to_string(), *file, block, fault));
        }
    }

    /// The damaged pages `previous` recorded in the files `taken` over from it unread: they are
    /// still there, unchanged.
    pub fn carry(&mut self, previous: &Manifest, taken: &HashSet<&str>) {
        let Some(checks) = &previous.page_checks else {
            if !taken.is_empty() {
                tracing::info!(
                    backup = %previous.id,
                    files = taken.len(),
                    "files taken over unread from a backup that did not check pages are not checked (--read-all reads them)"
                );
            }
            return;
        };
        self.carried.extend(
            checks
                .bad
                .iter()
                .filter(|b| taken.contains(b.path.as_str()))
                .cloned(),
        );
    }

    /// Whether it found a damaged page (its relation's name is then looked for).
    pub fn has_damage(&self) -> bool {
        !self.bad.is_empty()
    }

    /// Every damaged page named (with `map` when there is one, else by its file) and logged,
    /// as the manifest records them.
    pub fn into_checks(self, map: Option<&RelationMap>) -> PageChecks {
        let mut bad: Vec<BadPage> = self
            .bad
            .into_iter()
            .map(|(path, file, block, fault)| named(path, &file, block, fault, map))
            .chain(self.carried)
            .collect();
        bad.sort_by(|a, b| (&a.path, a.block).cmp(&(&b.path, b.block)));
        bad.dedup_by(|a, b| a.path == b.path && a.block == b.block);
        for page in &bad {
            tracing::error!("damaged page: {page}");
        }
        let bad_total = bad.len() as u64;
        bad.truncate(MAX_LISTED);
        PageChecks {
            checked: self.checked,
            recent: self.recent,
            bad_total,
            bad,
        }
    }
}

/// A damaged page with the names `map` gives its database and relation.
fn named(path: String, file: &RelationFile, block: u32, fault: Fault, map: Option<&RelationMap>) -> BadPage {
    let db = map.and_then(|m| m.database(file.db));
    let loc = crate::wal::decode::RelFileLocator {
        spc: file.tablespace.unwrap_or(0),
        db: file.db,
        rel: file.filenode,
    };
    let relation = map
        .filter(|_| file.db != 0)
        .and_then(|m| m.relation(&loc))
        .map(|r| r.qualified());
    BadPage {
        path,
        block,
        fork: file.fork,
        database: db.map(|d| d.name.clone()),
        relation,
        reason: fault.to_string(),
    }
}

/// Check the pages of `buf`, read from `file` at `offset` (a multiple of 8 KiB), reading a
/// failing page again through `reread(offset, buffer)`.
pub(super) fn check_read(
    buf: &[u8],
    offset: u64,
    file: &RelationFile,
    check: PageCheck,
    reread: impl Fn(u64, &mut Vec<u8>) -> std::io::Result<()>,
) -> Checked {
    let first = u32::try_from(offset / BLCKSZ as u64).unwrap_or(u32::MAX);
    page_checksum::check_buffer(buf, file, first, check.start, |index| {
        let mut page = Vec::with_capacity(BLCKSZ);
        reread(u64::from(index) * BLCKSZ as u64, &mut page).ok()?;
        Box::<[u8; BLCKSZ]>::try_from(page.into_boxed_slice()).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::basebackup::page_checksum::Fork;
    use crate::basebackup::relmap::tests::relation;
    use crate::basebackup::relmap::{Database, RelationMap};

    #[test]
    fn checks_are_planned_only_when_they_can_hold() {
        let on = Some(PageLayout {
            blcksz: 8192,
            relseg_size: 131072,
        });
        let start = Lsn(0x1000);
        assert_eq!(plan(true, on, 1 << 20, start), Some(PageCheck { start }));
        assert_eq!(plan(false, on, 1 << 20, start), None);
        assert_eq!(plan(true, None, 1 << 20, start), None);
        assert_eq!(plan(true, on, 1000, start), None);
        let big = Some(PageLayout {
            blcksz: 32768,
            relseg_size: 32768,
        });
        assert_eq!(plan(true, big, 1 << 20, start), None);
    }

    #[test]
    fn damaged_pages_are_named_by_the_relation_map() {
        let map = RelationMap {
            format: "walvault-relation-map".into(),
            version: 1,
            backup: "20261122T143000Z".parse().unwrap(),
            databases: vec![Database {
                oid: 16384,
                name: "app".into(),
                schemas: vec![],
                relations: vec![relation(16390, 16397, "r", "public", "orders", 0)],
                error: None,
            }],
        };
        let mut tally = Tally::default();
        let fault = Fault::Checksum {
            stored: 1,
            computed: 2,
        };
        for path in ["base/16384/16397.1", "base/16384/99999", "global/1262"] {
            let file = RelationFile::parse(path).unwrap();
            tally.add(
                path,
                &file,
                Checked {
                    pages: 10,
                    recent: 1,
                    bad: vec![(file.block(3), fault)],
                },
            );
        }
        let checks = tally.into_checks(Some(&map));
        assert_eq!((checks.checked, checks.recent, checks.bad_total), (30, 3, 3));
        let first = &checks.bad[0];
        assert_eq!(first.relation.as_deref(), Some("public.orders"));
        assert_eq!(first.database.as_deref(), Some("app"));
        assert_eq!((first.block, first.fork), (131072 + 3, Fork::Main));
        assert_eq!(
            first.to_string(),
            "database app, relation public.orders, fork main, block 131075 (base/16384/16397.1): checksum 0x0001, expected 0x0002"
        );
        assert_eq!(checks.bad[1].relation, None);
        assert_eq!(checks.bad[2].path, "global/1262");
        assert!(
            checks.bad[2]
                .to_string()
                .starts_with("file global/1262, fork main, block 3")
        );
    }
}
