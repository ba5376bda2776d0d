//! When a backup may take a file over from the previous backup without reading it.
//!
//! PostgreSQL replays WAL only from the *new* backup's start (redo) point, so a file taken over
//! must hold every write made before that point. The previous backup read the file's content
//! after it took the file's [`FileStat`] (`fstat` on the open file, then `read`), so that content
//! holds every write made before the stat. The file may therefore be taken over when no write
//! happened between the previous backup's stat and the new backup's, which is taken after
//! `pg_backup_start` returned (its checkpoint has written and synced every earlier change):
//!
//! * Every `write`, `pwrite`, truncation or extension sets the file's mtime and ctime to the
//!   kernel's current (coarse, tick-granular) time, and changes nothing else a write could leave
//!   equal. ctime cannot be set by any user (`utimensat` sets mtime and then ctime to *now*),
//!   so a file replaced with a back-dated mtime (`rsync -t`, `cp -p`, `tar -x`) still differs.
//! * A write in the *same tick* as the recorded times would leave them unchanged. So the
//!   recorded mtime and ctime must be older, by [`SETTLE`], than the moment the previous backup
//!   started examining files (`files_examined_after_us`, taken before any stat): a write after
//!   the stat then falls in a later tick and shows. The margin is far above any file system's
//!   timestamp granularity (ext4, XFS: a kernel tick; 1 s at worst on ext3 and NFSv3) and above
//!   the time a single write can spend between setting the times (done first,
//!   `file_modified()`) and copying its data (dirty-page throttling pauses at most 200 ms a
//!   time).
//! * inode and device: a file deleted and recreated under the same name (`DROP`, `VACUUM FULL`,
//!   a restore into the same place) is a new inode with a new ctime.
//! * Size: a last check, and what a truncate-then-extend within a tick would change.
//!
//! What the rule assumes, and how a backup checks it: the wall clock does not go backwards
//! between the two backups (a backup whose clock reads earlier than the previous backup's
//! reuses nothing, and a recorded time in the future makes a file be read); file times come
//! from the clock of the host the backup runs on (a local file system; over NFS, the server's
//! clock must agree with this host's within [`SETTLE`]); the previous backup is of the same
//! cluster (system identifier) with the same chunk size, and its chunks are in the repository
//! (the backup lock keeps an expire from collecting any chunk while the backup runs, see
//! `docs/FORMAT.md`, "Retention, garbage collection and locks"). `archive-agent backup --full`
//! reads every file and checks every chunk is stored, uploading any that is missing.

use std::time::Duration;

use super::manifest::FileStat;

/// How much older than the previous backup's start of examination a file's recorded times must
/// be for it to be taken over (see the module documentation).
pub const SETTLE: Duration = Duration::from_secs(5);

/// Why a file is read rather than taken over from the previous backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadBecause {
    /// The previous backup did not record how the file looked (new file, older manifest).
    NotRecorded,
    /// The file changed since: which of its attributes shows it.
    Changed(&'static str),
    /// It was written less than [`SETTLE`] before the previous backup examined it: a later write
    /// in the same timestamp tick would not show.
    TooRecent,
    /// This host's clock reads earlier than the previous backup's: timestamps cannot be compared.
    ClockWentBack,
}

/// Whether a file whose `fstat` is `now`, taken after this backup's `pg_backup_start`, may be
/// taken over from the previous backup, which recorded `prev` and started examining files at
/// `prev_examined_after_ns` (this host's wall clock, ns); `clock_ns` is this backup's.
pub fn may_reuse(
    prev: Option<&FileStat>,
    prev_examined_after_ns: i64,
    now: &FileStat,
    clock_ns: i64,
) -> Result<(), ReadBecause> {
    let Some(prev) = prev else {
        return Err(ReadBecause::NotRecorded);
    };
    if clock_ns < prev_examined_after_ns {
        return Err(ReadBecause::ClockWentBack);
    }
    let changed = [
        (prev.dev != now.dev, "device"),
        (prev.ino != now.ino, "inode"),
        (prev.size != now.size, "size"),
        (prev.mtime_ns != now.mtime_ns, "mtime"),
        (prev.ctime_ns != now.ctime_ns, "ctime"),
    ];
    if let Some((_, what)) = changed.iter().find(|(differs, _)| *differs) {
        return Err(ReadBecause::Changed(what));
    }
    let settle = SETTLE.as_nanos() as i64;
    let newest = prev.mtime_ns.max(prev.ctime_ns);
    if newest.saturating_add(settle) > prev_examined_after_ns {
        return Err(ReadBecause::TooRecent);
    }
    Ok(())
}

/// The [`FileStat`] of `meta`.
pub fn file_stat(meta: &std::fs::Metadata) -> FileStat {
    use std::os::unix::fs::MetadataExt;
    let ns = |secs: i64, nsec: i64| secs.saturating_mul(1_000_000_000).saturating_add(nsec);
    FileStat {
        size: meta.size(),
        mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
        ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        ino: meta.ino(),
        dev: meta.dev(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;
    /// The previous backup started examining files at t = 1000 s.
    const PREV_AT: i64 = 1000 * S;
    /// This backup runs a day later.
    const NOW: i64 = PREV_AT + 86_400 * S;

    fn old_file() -> FileStat {
        FileStat {
            size: 8192 * 100,
            mtime_ns: 900 * S + 123,
            ctime_ns: 900 * S + 456,
            ino: 4242,
            dev: 2049,
        }
    }

    #[test]
    fn an_old_file_whose_stat_matches_is_reused() {
        let f = old_file();
        assert_eq!(may_reuse(Some(&f), PREV_AT, &f, NOW), Ok(()));
        // Exactly SETTLE old is enough.
        let settled = FileStat {
            mtime_ns: PREV_AT - SETTLE.as_nanos() as i64,
            ctime_ns: PREV_AT - SETTLE.as_nanos() as i64,
            ..f
        };
        assert_eq!(may_reuse(Some(&settled), PREV_AT, &settled, NOW), Ok(()));
    }

    #[test]
    fn any_changed_attribute_makes_the_file_read() {
        let f = old_file();
        type Change = fn(&mut FileStat);
        let cases: [(Change, &str); 5] = [
            (|s| s.size += 8192, "size"),
            (|s| s.mtime_ns += 1, "mtime"),
            // A back-dated copy (cp -p, rsync -t): same mtime, new ctime.
            (|s| s.ctime_ns = NOW - S, "ctime"),
            // Dropped and recreated: a new inode.
            (|s| s.ino += 1, "inode"),
            (|s| s.dev = 2050, "device"),
        ];
        for (change, what) in cases {
            let mut now = f;
            change(&mut now);
            assert_eq!(
                may_reuse(Some(&f), PREV_AT, &now, NOW),
                Err(ReadBecause::Changed(what))
            );
        }
    }

    #[test]
    fn a_file_written_shortly_before_the_previous_backup_is_read() {
        // Written 1 s before the previous backup looked: a write right after its stat could
        // have landed in the same timestamp tick and left the stat unchanged.
        for recent in [
            FileStat {
                mtime_ns: PREV_AT - S,
                ..old_file()
            },
            FileStat {
                ctime_ns: PREV_AT - S,
                ..old_file()
            },
            // Just under the margin, and stamped after the previous backup started.
            FileStat {
                mtime_ns: PREV_AT - SETTLE.as_nanos() as i64 + 1,
                ..old_file()
            },
            FileStat {
                ctime_ns: PREV_AT + S,
                mtime_ns: PREV_AT + S,
                ..old_file()
            },
        ] {
            assert_eq!(
                may_reuse(Some(&recent), PREV_AT, &recent, NOW),
                Err(ReadBecause::TooRecent)
            );
        }
    }

    #[test]
    fn without_a_record_or_with_a_clock_gone_back_the_file_is_read() {
        let f = old_file();
        assert_eq!(may_reuse(None, PREV_AT, &f, NOW), Err(ReadBecause::NotRecorded));
        assert_eq!(
            may_reuse(Some(&f), PREV_AT, &f, PREV_AT - S),
            Err(ReadBecause::ClockWentBack)
        );
    }

    #[test]
    fn stat_of_a_real_file_changes_with_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("16384");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let before = file_stat(&std::fs::metadata(&path).unwrap());
        assert_eq!(before.size, 8192);
        assert_eq!(before, file_stat(&std::fs::metadata(&path).unwrap()));
        // Back-date the file so only the write itself can tell (as if written long ago).
        let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(old).unwrap();
        let dated = file_stat(&f.metadata().unwrap());
        assert_eq!(dated.mtime_ns, 1_000_000 * S);
        use std::os::unix::fs::FileExt;
        f.write_at(&[2u8; 8192], 0).unwrap();
        let after = file_stat(&f.metadata().unwrap());
        assert_eq!(after.size, dated.size, "an in-place write keeps the size");
        assert_ne!(after.mtime_ns, dated.mtime_ns);
        assert!(after.ctime_ns >= dated.ctime_ns);
        assert!(may_reuse(Some(&dated), i64::MAX / 2, &after, i64::MAX / 2).is_err());
    }
}
