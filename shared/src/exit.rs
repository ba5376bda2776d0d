//! Exit codes, chosen for how PostgreSQL reads them (`src/backend/access/transam/xlogarchive.c`,
//! `src/backend/postmaster/pgarch.c`, `wait_result_is_any_signal` in `src/port/wait_error.c`).

/// Done: the file is durably archived (push) or complete at the destination (fetch).
pub const SUCCESS: u8 = 0;
/// fetch: the file is not in the repository. PostgreSQL then ends archive recovery or, in standby
/// mode, tries again later. push: a failure PostgreSQL should retry (it will, every few seconds).
pub const NOT_FOUND_OR_RETRY: u8 = 1;
/// Bad arguments or an invalid file name; nothing was touched.
pub const USAGE: u8 = 2;
/// push refused for good: same name with different bytes, WAL from another cluster, invalid WAL
/// content. PostgreSQL keeps retrying (and pg_wal grows) until a human acts; the log says what to do.
pub const REFUSED: u8 = 3;
/// backup: the backup completed and is recorded, but pages of the cluster failed their
/// checksum (each named in the log and listed in the manifest). The backup holds the data as it
/// is on disk; a human should look at the damaged relations before relying on them. Not 1, so
/// cron and monitoring can tell "found damage" from "no backup".
pub const BACKUP_DAMAGED_PAGES: u8 = 3;
/// copy: everything that could be copied is on the target, but objects were left behind
/// (damaged in the source, different on the target, or a manifest whose data is not there yet),
/// each named in the log and the report: the copy is not a full copy until a human looks.
pub const COPY_INCOMPLETE: u8 = 3;
/// fetch could not tell whether the file exists, or the stored copy is corrupt. Above 125, so
/// PostgreSQL's startup process stops with FATAL instead of treating it as "end of archive" and
/// promoting early. Not 143 (128 + SIGTERM), which PostgreSQL takes for a shutdown request.
/// push never uses it: an exit above 125 kills PostgreSQL's archiver process.
pub const FATAL: u8 = 200;

/// How fetch reports anything but "restored" and "not in this repository" (a store it cannot
/// read, a corrupt copy, a bad argument or file name, a bug): in standby mode "not available"
/// ([`NOT_FOUND_OR_RETRY`]), since PostgreSQL retries there and never promotes on it; otherwise
/// [`FATAL`], so recovery stops instead of ending early.
pub fn fetch_failure(standby: bool) -> u8 {
    if standby { NOT_FOUND_OR_RETRY } else { FATAL }
}

/// Whether the data directory PostgreSQL runs restore_command in (`pgdata`) is a standby's.
pub fn in_standby_mode(pgdata: &std::path::Path) -> bool {
    pgdata.join("standby.signal").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_failures_never_look_like_a_missing_file_outside_standby() {
        assert!(fetch_failure(false) > 125);
        assert_ne!(fetch_failure(false), 128 + 15, "not SIGTERM's status");
        assert_eq!(fetch_failure(true), NOT_FOUND_OR_RETRY);
        let dir = tempfile::tempdir().unwrap();
        assert!(!in_standby_mode(dir.path()));
        std::fs::write(dir.path().join("standby.signal"), b"").unwrap();
        assert!(in_standby_mode(dir.path()));
    }
}
