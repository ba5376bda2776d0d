//! What a base backup leaves out, following PostgreSQL's own base backup
//! (`src/backend/backup/basebackup.c`: `excludeDirContents`, `excludeFiles`, temp files and
//! relations, unlogged relations but their init forks). Pure: decisions over names.

use std::collections::HashSet;

/// Directories kept (empty) but whose contents are never backed up.
const EXCLUDE_DIR_CONTENTS: [&str; 8] = [
    "pg_stat_tmp",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
    // WAL comes from the archive; pg_wal/archive_status is recreated empty.
    "pg_wal",
];

/// Files never backed up, wherever they are. `backup_label` and `tablespace_map` come from
/// `pg_backup_stop` instead.
const EXCLUDE_FILES: [&str; 7] = [
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    "pg_internal.init",
    "backup_label",
    "tablespace_map",
    "postmaster.pid",
    "postmaster.opts",
];

/// Prefix of temporary files and directories (`PG_TEMP_FILE_PREFIX`).
const TEMP_PREFIX: &str = "pgsql_tmp";

/// What to do with a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Include,
    /// Directory kept, contents skipped.
    EmptyDir,
    Skip,
}

/// Decide for `rel_path` (relative to the data directory, `/`-separated) of a file or directory.
pub fn decide(rel_path: &str, is_dir: bool) -> Decision {
    let name = rel_path.rsplit('/').next().unwrap_or(rel_path);
    if name.starts_with(TEMP_PREFIX) || rel_path == crate::local::handoff::SPOOL_DIR {
        return Decision::Skip;
    }
    // Local state of the recovery this directory came from: a restore writes its own.
    if rel_path == crate::replay::PLAN_FILE || rel_path == crate::replay::PROGRESS_FILE {
        return Decision::Skip;
    }
    if is_dir {
        if EXCLUDE_DIR_CONTENTS.contains(&rel_path) {
            return Decision::EmptyDir;
        }
        return Decision::Include;
    }
    if EXCLUDE_FILES.contains(&name) || rel_path.starts_with("pg_wal/") {
        return Decision::Skip;
    }
    if in_database_dir(rel_path) && is_temp_relation(name) {
        return Decision::Skip;
    }
    Decision::Include
}

/// Files of a database directory: `base/<oid>/...` or `pg_tblspc/<oid>/<version dir>/<oid>/...`.
fn in_database_dir(rel_path: &str) -> bool {
    let parts: Vec<&str> = rel_path.split('/').collect();
    (parts.len() == 3 && parts[0] == "base") || (parts.len() == 5 && parts[0] == "pg_tblspc")
}

/// `t<backend>_<relfilenode>[_<fork>][.<segment>]`: a temporary relation, dropped at restart.
fn is_temp_relation(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('t') else {
        return false;
    };
    let Some((backend, rel)) = rest.split_once('_') else {
        return false;
    };
    !backend.is_empty() && backend.bytes().all(|b| b.is_ascii_digit()) && rel_file_oid(rel).is_some()
}

/// The relfilenode of a relation file name (`16384`, `16384_fsm`, `16384.2`, `16384_init`).
fn rel_file_oid(name: &str) -> Option<&str> {
    let base = name.split('.').next()?;
    let oid = base.split('_').next()?;
    let fork = base.get(oid.len()..).unwrap_or("");
    let fork_ok = matches!(fork, "" | "_fsm" | "_vm" | "_init");
    (!oid.is_empty() && oid.bytes().all(|b| b.is_ascii_digit()) && fork_ok).then_some(oid)
}

/// Given the file names of one database directory, the names to leave out because they belong to
/// unlogged relations (every fork but `_init`, which restore needs to reset the relation).
/// `names` is walked twice (a directory of 300,000 files is not listed again as a `&str` each).
pub fn unlogged_files<'a>(names: impl Iterator<Item = &'a str> + Clone) -> HashSet<&'a str> {
    let unlogged: HashSet<&str> = names
        .clone()
        .filter_map(|n| n.strip_suffix("_init"))
        .filter(|oid| oid.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    if unlogged.is_empty() {
        return HashSet::new();
    }
    names
        .filter(|n| !n.contains("_init"))
        .filter(|n| rel_file_oid(n).is_some_and(|oid| unlogged.contains(oid)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_basebackup_lists() {
        assert_eq!(decide("pg_wal", true), Decision::EmptyDir);
        assert_eq!(decide("pg_wal/000000010000000000000001", false), Decision::Skip);
        assert_eq!(decide("pg_replslot", true), Decision::EmptyDir);
        assert_eq!(decide("postmaster.pid", false), Decision::Skip);
        assert_eq!(decide("backup_label", false), Decision::Skip);
        assert_eq!(decide("global/pg_internal.init", false), Decision::Skip);
        assert_eq!(decide("base/pgsql_tmp", true), Decision::Skip);
        assert_eq!(decide("walvault.spool", true), Decision::Skip);
        assert_eq!(decide("walvault-recovery.json", false), Decision::Skip);
        assert_eq!(decide("walvault-progress.json", false), Decision::Skip);
        assert_eq!(decide("base/1/walvault-progress.json", false), Decision::Include);
        assert_eq!(decide("base/5/pgsql_tmp1234.0", false), Decision::Skip);
        assert_eq!(decide("base/5/t3_16384", false), Decision::Skip);
        assert_eq!(decide("base/5/t3_16384_fsm", false), Decision::Skip);
        assert_eq!(
            decide("pg_tblspc/16400/PG_15_202209061/5/t3_16401.1", false),
            Decision::Skip
        );
        assert_eq!(decide("base/5/16384", false), Decision::Include);
        assert_eq!(decide("global/pg_control", false), Decision::Include);
        assert_eq!(decide("postgresql.conf", false), Decision::Include);
        assert_eq!(decide("pg_xact/0000", false), Decision::Include);
        assert_eq!(decide("base/5/t3_notarel", false), Decision::Include);
    }

    #[test]
    fn unlogged_relations_keep_only_their_init_fork() {
        let names = [
            "16384",
            "16384_fsm",
            "16384_init",
            "16384.1",
            "16390",
            "16390_vm",
            "PG_VERSION",
        ];
        let skip = unlogged_files(names.iter().copied());
        let mut skip: Vec<_> = skip.into_iter().collect();
        skip.sort();
        assert_eq!(skip, vec!["16384", "16384.1", "16384_fsm"]);
    }
}
