//! The plan and progress files in a data directory: written crash-safe (temporary file, fsync,
//! rename), read leniently by fetch (progress is best effort: nothing here may change what
//! fetch answers PostgreSQL) and strictly by `restore-agent status`.

use std::path::{Path, PathBuf};

use super::{PLAN_FILE, PROGRESS_FILE, RecoveryPlan, RecoveryState, RecoveryStatus, ReplayProgress, advance};
use crate::wal::SegmentName;

/// Why `restore-agent status` cannot report.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "no walvault recovery here: {0} has no {PLAN_FILE} (restore-agent restore writes it into the data directory it restores)"
    )]
    NoPlan(String),
    #[error("cannot read {path}: {message}")]
    Unreadable { path: String, message: String },
}

/// `[device, inode]` of a directory: which directory a plan was written into.
pub fn data_directory_id(pgdata: &Path) -> Option<[u64; 2]> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(pgdata).ok()?;
    Some([m.dev(), m.ino()])
}

/// Write the plan into `pgdata`, crash-safe, and drop any progress file a previous recovery
/// of the directory left (it counted against another plan).
pub fn write_plan(pgdata: &Path, plan: &RecoveryPlan) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(plan).map_err(std::io::Error::other)?;
    crate::local::crashsafe::write_durably(&pgdata.join(PLAN_FILE), &json)?;
    match std::fs::remove_file(pgdata.join(PROGRESS_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The plan of the recovery running in `pgdata`, or `Ok(None)` when there is none.
pub fn read_plan(pgdata: &Path) -> Result<Option<RecoveryPlan>, StatusError> {
    let path = pgdata.join(PLAN_FILE);
    let unreadable = |message: String| StatusError::Unreadable {
        path: path.display().to_string(),
        message,
    };
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(unreadable(e.to_string())),
    };
    // A plan file is a few hundred bytes: anything large is not one.
    if bytes.len() > 64 << 10 {
        return Err(unreadable("larger than any plan".into()));
    }
    RecoveryPlan::parse(&bytes)
        .map(Some)
        .map_err(|e| unreadable(e.to_string()))
}

/// The plan fetch counts against: `None` when there is none, it cannot be read, or it was
/// written into another directory (this one is a copy of the restored one).
pub fn plan_for_fetch(pgdata: &Path) -> Option<RecoveryPlan> {
    match read_plan(pgdata) {
        Ok(Some(plan)) => match (plan.data_directory_id, data_directory_id(pgdata)) {
            (Some(wrote), Some(here)) if wrote != here => {
                tracing::debug!("{PLAN_FILE} was written for another data directory; no progress recorded");
                None
            }
            _ => Some(plan),
        },
        Ok(None) => None,
        Err(e) => {
            tracing::debug!("replay progress: {e}");
            None
        }
    }
}

/// The last progress recorded in `pgdata` (`None` when absent or unusable).
pub fn read_progress(pgdata: &Path) -> Option<ReplayProgress> {
    let bytes = std::fs::read(pgdata.join(PROGRESS_FILE)).ok()?;
    (bytes.len() <= 64 << 10)
        .then(|| ReplayProgress::parse(&bytes))
        .flatten()
}

/// After PostgreSQL was handed `segment`: count it against `plan`, record the progress
/// (crash-safe) and return it for the log line. Best effort: a progress file that cannot be
/// read starts the count over, one that cannot be written is skipped.
pub fn record_fetch(
    pgdata: &Path,
    plan: &RecoveryPlan,
    segment: &SegmentName,
    fetched_commit_us: Option<i64>,
    now_us: i64,
) -> Option<ReplayProgress> {
    let previous = read_progress(pgdata);
    let progress = advance(plan, previous.as_ref(), segment, fetched_commit_us, now_us)?;
    let written = serde_json::to_vec_pretty(&progress)
        .map_err(std::io::Error::other)
        .and_then(|json| crate::local::crashsafe::write_durably(&pgdata.join(PROGRESS_FILE), &json));
    if let Err(e) = written {
        tracing::debug!("replay progress: cannot write {PROGRESS_FILE}: {e}");
    }
    Some(progress)
}

/// What `restore-agent status --pgdata DIR` reports, read at `now_us`.
pub fn status(pgdata: &Path, now_us: i64) -> Result<RecoveryStatus, StatusError> {
    let shown = std::path::absolute(pgdata).unwrap_or_else(|_| pgdata.to_path_buf());
    let plan = read_plan(pgdata)?.ok_or_else(|| StatusError::NoPlan(shown.display().to_string()))?;
    let signal_file = ["recovery.signal", "standby.signal"]
        .into_iter()
        .find(|f| pgdata.join(f).exists())
        .map(str::to_string);
    let state = match (&signal_file, crate::local::pgdata::running_postmaster(pgdata)) {
        (None, _) => RecoveryState::Finished,
        (Some(_), Some(_)) => RecoveryState::InProgress,
        (Some(_), None) => RecoveryState::NotRunning,
    };
    let progress = read_progress(pgdata).filter(|p| p.plan_created_at_us == plan.created_at_us);
    Ok(RecoveryStatus {
        data_directory: shown.display().to_string(),
        state,
        signal_file,
        plan,
        progress,
        now_us,
    })
}

/// The plan file's path in `pgdata`.
pub fn plan_path(pgdata: &Path) -> PathBuf {
    pgdata.join(PLAN_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::{FORMAT_VERSION, PLAN_FORMAT};
    use crate::wal::WalFileName;

    fn plan(dir: &Path) -> RecoveryPlan {
        RecoveryPlan {
            format: PLAN_FORMAT.into(),
            version: FORMAT_VERSION,
            repository: "file:///r".into(),
            backup: "20261122T120000Z".into(),
            wal_segment_size: 16 << 20,
            first_segment: "000000010000000000000002".into(),
            last_segment: "000000010000000000000005".into(),
            last_is_upper_bound: false,
            target: "recovery_target_lsn = '0/5000060'".into(),
            timeline: crate::wal::lsn::tl(1),
            created_at_us: 1,
            data_directory_id: data_directory_id(dir),
        }
    }

    fn seg(name: &str) -> SegmentName {
        name.parse::<WalFileName>().unwrap().wal_segment().unwrap()
    }

    #[test]
    fn fetches_record_progress_and_status_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = status(dir.path(), 0).unwrap_err();
        assert!(
            err.to_string().starts_with("no walvault recovery here: "),
            "{err}"
        );
        std::fs::write(dir.path().join(PROGRESS_FILE), b"left by an earlier recovery").unwrap();
        write_plan(dir.path(), &plan(dir.path())).unwrap();
        assert!(
            !dir.path().join(PROGRESS_FILE).exists(),
            "a stale progress file is dropped"
        );

        let p = plan_for_fetch(dir.path()).unwrap();
        record_fetch(
            dir.path(),
            &p,
            &seg("000000010000000000000002"),
            Some(7),
            1_000_000,
        )
        .unwrap();
        let second = record_fetch(dir.path(), &p, &seg("000000010000000000000003"), None, 3_000_000).unwrap();
        assert_eq!(
            (second.n, second.reached_commit_us, second.eta_seconds),
            (2, Some(7), Some(6))
        );

        std::fs::write(dir.path().join("recovery.signal"), b"").unwrap();
        let s = status(dir.path(), 4_000_000).unwrap();
        assert_eq!(s.state, RecoveryState::NotRunning, "no postmaster.pid");
        assert_eq!(s.progress, Some(second));
        std::fs::remove_file(dir.path().join("recovery.signal")).unwrap();
        assert_eq!(
            status(dir.path(), 4_000_000).unwrap().state,
            RecoveryState::Finished
        );
    }

    #[test]
    fn a_copy_of_the_directory_is_not_counted_against_the_plan() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = plan(dir.path());
        p.data_directory_id = Some([0, 0]);
        write_plan(dir.path(), &p).unwrap();
        assert!(plan_for_fetch(dir.path()).is_none());
        std::fs::write(plan_path(dir.path()), b"{ not json").unwrap();
        assert!(plan_for_fetch(dir.path()).is_none());
        assert!(status(dir.path(), 0).is_err());
    }
}
