//! Where each file of a backup goes and whether it may go there: the tablespaces' locations,
//! each entry's destination, and the checks of the manifest against them. Reads only: all of it
//! runs before the first byte is written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{RestoreError, RestoreOptions, write_err};
use crate::basebackup::manifest::paged::{EntryCounts, PagedManifest};
use crate::basebackup::manifest::{self, Manifest, ManifestError};
use crate::catalog::Catalog;

/// Decide and check each tablespace's location before anything is written: absolute, no `..`,
/// neither inside the new data directory nor containing it, and empty or absent (even with
/// `--force`: a tablespace location is never wiped; with `--delta` it is rewritten, once
/// [`super::delta`] has checked it holds a tablespace).
pub(crate) fn place_tablespaces(
    m: &Manifest,
    opts: &RestoreOptions,
) -> Result<BTreeMap<u32, PathBuf>, RestoreError> {
    let plan = &opts.tablespaces;
    // Compared as absolute, lexically normalized paths: `--pgdata data` and `..` must not hide
    // an overlap.
    let pgdata = normalize(&std::path::absolute(&opts.pgdata).map_err(write_err(&opts.pgdata))?);
    let mut out = BTreeMap::new();
    let unplaced: Vec<String> = m
        .tablespaces
        .iter()
        .filter(|t| !plan.map.contains_key(&t.oid) && plan.all_under.is_none() && !plan.original)
        .map(|t| format!("{} at {}", t.oid, t.location))
        .collect();
    if !unplaced.is_empty() {
        let mut list = unplaced.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
        if unplaced.len() > 10 {
            list.push_str(&format!(" and {} more", unplaced.len() - 10));
        }
        return Err(RestoreError::TablespacesUnplaced {
            backup: m.id.clone(),
            list,
        });
    }
    for t in &m.tablespaces {
        let path = match (plan.map.get(&t.oid), &plan.all_under) {
            (Some(p), _) => p.clone(),
            (None, Some(dir)) => dir.join(t.oid.to_string()),
            (None, None) => PathBuf::from(&t.location),
        };
        let bad = |why| RestoreError::TablespaceLocation {
            oid: t.oid,
            path: path.display().to_string(),
            why,
        };
        if !path.is_absolute()
            || path
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(bad("not an absolute path without '..'"));
        }
        if path.as_os_str().len() > manifest::MAX_PATH_LEN {
            return Err(bad("it is longer than PATH_MAX"));
        }
        let path = normalize(&path);
        if path.starts_with(&pgdata) || pgdata.starts_with(&path) {
            return Err(bad("it overlaps the new data directory"));
        }
        if !opts.delta && !is_empty_dir(&path)? {
            return Err(bad(
                "it is not empty (tablespace locations are never overwritten, even with --force)",
            ));
        }
        if out.values().any(|p: &PathBuf| p == &path) {
            return Err(bad("two tablespaces cannot share a location"));
        }
        if out
            .values()
            .any(|p: &PathBuf| p.starts_with(&path) || path.starts_with(p))
        {
            return Err(bad("it overlaps another tablespace's location"));
        }
        out.insert(t.oid, path);
    }
    Ok(out)
}

/// `p` without `.` and `..` components, resolved lexically (`p` is absolute).
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// Where entry `rel` goes: tablespace contents to their chosen location (`pg_tblspc/<oid>`
/// itself is recreated by PostgreSQL from `tablespace_map`), everything else under `pgdata`.
pub(crate) fn destination(pgdata: &Path, spaces: &BTreeMap<u32, PathBuf>, rel: &str) -> PathBuf {
    if let Some((oid, rest)) = manifest::tablespace_part(rel)
        && let Some(location) = spaces.get(&oid)
    {
        return match rest {
            Some(rest) => location.join(rest),
            None => location.clone(),
        };
    }
    pgdata.join(rel)
}

/// The temporary names restore writes its own files under ([`crate::local::crashsafe::write_durably`]).
/// (Entries named like the files themselves are refused by [`Manifest::validate`].)
fn temp_names() -> Vec<String> {
    let pid = std::process::id();
    [
        "backup_label",
        "tablespace_map",
        "postgresql.auto.conf",
        "recovery.signal",
        crate::replay::PLAN_FILE,
    ]
    .iter()
    .map(|n| format!(".{n}.walvault-{pid}.tmp"))
    .collect()
}

/// The checks of a backup's manifest that depend on the restore: run after the tablespaces are
/// placed and before anything is written. The manifest's frame is validated again and every
/// entry read and checked ([`PagedManifest::check`], as [`Manifest::validate`] checks them),
/// then: it belongs to the repository's cluster, every destination fits in PATH_MAX, and no
/// entry collides with a temporary file restore writes. Returns what the entries count.
pub fn check_before_writing(
    cat: &Catalog,
    paged: &mut PagedManifest,
    opts: &RestoreOptions,
    spaces: &BTreeMap<u32, PathBuf>,
) -> Result<EntryCounts, RestoreError> {
    let m = paged.frame();
    m.validate().map_err(|source| RestoreError::Manifest {
        backup: m.id.clone(),
        source: Box::new(source),
    })?;
    // A backup's WAL binds the repository before its manifest is written: no cluster, no backup.
    let sysid = cat.cluster().map_or(0, |c| c.system_identifier);
    if m.system_identifier != sysid {
        return Err(RestoreError::Manifest {
            backup: m.id.clone(),
            source: Box::new(ManifestError::Implausible(format!(
                "it is a backup of system {}, the repository holds system {sysid}",
                m.system_identifier
            ))),
        });
    }
    let backup = m.id.clone();
    let refuse = |entry: &str, why: String| RestoreError::Refused {
        backup: backup.clone(),
        entry: entry.chars().take(200).collect(),
        why,
    };
    let temp = temp_names();
    let counted = paged.check(|e| {
        let first = e.path.split('/').next().unwrap_or_default();
        if temp.iter().any(|t| t == first) {
            return Err(refuse(
                &e.path,
                format!("restore writes its own files through {first}"),
            ));
        }
        let dest = destination(&opts.pgdata, spaces, &e.path);
        if dest.as_os_str().len() > manifest::MAX_PATH_LEN {
            return Err(refuse(
                &e.path,
                format!(
                    "its destination would be {} bytes long, more than PATH_MAX",
                    dest.as_os_str().len()
                ),
            ));
        }
        Ok(())
    });
    counted.map_err(|e| super::error::entries_error(paged, e))
}

pub(crate) fn is_empty_dir(p: &Path) -> Result<bool, RestoreError> {
    match std::fs::read_dir(p) {
        Ok(mut it) => Ok(it.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(RestoreError::Write {
            path: p.display().to_string(),
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{SYSID, catalog, fixture, options, with_tablespace};
    use super::*;
    use crate::basebackup::manifest::{Entry, EntryKind, Tablespace};

    #[test]
    fn only_a_declared_tablespace_goes_to_its_location() {
        let spaces = BTreeMap::from([(16400, PathBuf::from("/srv/ts1"))]);
        let pgdata = Path::new("/restore/data");
        let dest = |rel| destination(pgdata, &spaces, rel);
        assert_eq!(dest("pg_tblspc/16400"), PathBuf::from("/srv/ts1"));
        assert_eq!(
            dest("pg_tblspc/16400/PG_15/1/2"),
            PathBuf::from("/srv/ts1/PG_15/1/2")
        );
        // Other spellings of the oid, and undeclared oids, stay in the data directory.
        assert_eq!(dest("pg_tblspc/016400/x"), pgdata.join("pg_tblspc/016400/x"));
        assert_eq!(dest("pg_tblspc/+16400/x"), pgdata.join("pg_tblspc/+16400/x"));
        assert_eq!(dest("pg_tblspc/16500/x"), pgdata.join("pg_tblspc/16500/x"));
    }

    #[test]
    fn tablespace_locations_may_not_overlap_anything() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = std::env::current_dir().unwrap();
        // A relative --pgdata is compared as the absolute path it names.
        let mut opts = options(Path::new("data"));
        opts.tablespaces.original = true;
        let inside = cwd.join("data/ts");
        let err = place_tablespaces(&with_tablespace(inside.to_str().unwrap()), &opts).unwrap_err();
        assert!(
            err.to_string().contains("overlaps the new data directory"),
            "{err}"
        );
        // So is one spelled with `..`.
        opts.pgdata = PathBuf::from("elsewhere/../data");
        let err = place_tablespaces(&with_tablespace(inside.to_str().unwrap()), &opts).unwrap_err();
        assert!(
            err.to_string().contains("overlaps the new data directory"),
            "{err}"
        );
        // A location holding the data directory.
        opts.pgdata = PathBuf::from("data");
        let err = place_tablespaces(&with_tablespace(cwd.to_str().unwrap()), &opts).unwrap_err();
        assert!(
            err.to_string().contains("overlaps the new data directory"),
            "{err}"
        );

        // Two tablespaces, one inside the other.
        let mut m = with_tablespace(dir.path().join("a").to_str().unwrap());
        m.tablespaces.push(Tablespace {
            oid: 16401,
            location: dir.path().join("a/b").display().to_string(),
        });
        let mut opts = options(&dir.path().join("data"));
        opts.tablespaces.original = true;
        let err = place_tablespaces(&m, &opts).unwrap_err();
        assert!(err.to_string().contains("overlaps another tablespace"), "{err}");
    }

    fn held(m: &Manifest) -> PagedManifest {
        PagedManifest::of(m).unwrap()
    }

    #[test]
    fn pre_write_checks_refuse_with_the_backup_and_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(&dir.path().join("data"));
        let none = BTreeMap::new();
        let m = fixture();
        assert_eq!(
            check_before_writing(&catalog(SYSID), &mut held(&m), &opts, &none)
                .unwrap()
                .bytes,
            8192
        );

        let err = check_before_writing(&catalog(SYSID + 1), &mut held(&m), &opts, &none).unwrap_err();
        assert!(err.to_string().starts_with("backup 20261121T143200Z: "), "{err}");
        assert!(err.to_string().contains("the repository holds system"), "{err}");

        // A manifest built in memory (never parsed) is validated all the same.
        let mut bad = fixture();
        bad.entries[1].path = "base/../../etc/passwd".into();
        let err = check_before_writing(&catalog(SYSID), &mut held(&bad), &opts, &none).unwrap_err();
        assert!(err.to_string().contains("'..' component"), "{err}");

        // A destination past PATH_MAX, though the relative path is within it.
        let mut long = fixture();
        long.entries[1].path = format!("base/{}", vec!["d".repeat(200); 20].join("/"));
        let deep = options(&dir.path().join("x".repeat(200)).join("y".repeat(200)));
        let err = check_before_writing(&catalog(SYSID), &mut held(&long), &deep, &none).unwrap_err();
        assert!(err.to_string().contains("more than PATH_MAX"), "{err}");
        assert!(
            err.to_string()
                .starts_with("backup 20261121T143200Z: entry \"base/ddd"),
            "{err}"
        );

        // The temporary name restore writes backup_label under.
        let mut clash = fixture();
        clash.entries.insert(
            0,
            Entry {
                within: None,
                path: format!(".backup_label.walvault-{}.tmp", std::process::id()),
                kind: EntryKind::File,
                mode: 0o600,
                size: 0,
                chunks: vec![],
            },
        );
        let err = check_before_writing(&catalog(SYSID), &mut held(&clash), &opts, &none).unwrap_err();
        assert!(err.to_string().contains("restore writes its own files"), "{err}");
        assert!(!dir.path().join("data").exists(), "nothing was written");
    }
}
