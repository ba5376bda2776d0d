//! The drill's plan: which recovery target it restores, chosen from the catalog and an injected
//! random number (pure: no I/O, no clock).

use crate::catalog::Catalog;
use crate::commands::restore::RecoveryTarget;

use super::DrillTarget;

/// What [`plan`] decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub target: RecoveryTarget,
    /// The instant chosen for a random drill (unix micros).
    pub random_time: Option<i64>,
    /// Newest restorable commit of the latest timeline (unix micros).
    pub newest_commit: Option<i64>,
}

/// Why no target could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("no backup to drill: the repository has no restorable window")]
    NoWindow,
    /// The window holds no commit after its earliest backup: nothing to pick at random.
    #[error("--target random needs a commit archived after the earliest backup ({window})")]
    NoCommitAfterBackup { window: String },
}

/// Choose the target: `random` is a number in [0, 1) (injected, for tests). A random drill
/// needs a window with a commit after its earliest backup.
pub fn plan(cat: &Catalog, target: &DrillTarget, random: f64) -> Result<Plan, PlanError> {
    let latest = cat.latest_timeline();
    let window = cat.window(latest);
    let newest_commit = window.as_ref().and_then(|w| w.latest);
    let (target, random_time) = match target {
        DrillTarget::Latest => (RecoveryTarget::End, None),
        DrillTarget::Target(t) => (t.clone(), None),
        DrillTarget::Random => {
            let w = window.ok_or(PlanError::NoWindow)?;
            let latest = w
                .latest
                .filter(|l| *l > w.earliest)
                .ok_or_else(|| PlanError::NoCommitAfterBackup { window: w.describe() })?;
            let t = random_instant(w.earliest, latest, random);
            (RecoveryTarget::Time(t), Some(t))
        }
    };
    Ok(Plan {
        target,
        random_time,
        newest_commit,
    })
}

/// An instant in `(earliest, latest]` (unix micros, `earliest < latest`) for `random` in [0, 1):
/// after the backup's consistency point, up to the newest restorable commit.
fn random_instant(earliest: i64, latest: i64, random: f64) -> i64 {
    let span = (latest - earliest - 1) as f64;
    (earliest + 1 + (span * random.clamp(0.0, 1.0)) as i64).min(latest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::testing::{at, empty_catalog, manifest, runs, summary};

    /// One backup, consistent at 900 s, and WAL after it whose newest commit is at `commit_secs`.
    fn one_backup(commit_secs: i64) -> Catalog {
        empty_catalog(1)
            .with_backups([manifest("20261121T100000Z", 1, 2, 900_000_000)])
            .with_segments(runs([(1, 2..=4)]))
            .with_summaries((2..=4).map(|no| (at(1, no), summary(no, commit_secs))))
    }

    #[test]
    fn latest_and_given_targets_pass_through() {
        let cat = one_backup(1_000);
        let p = plan(&cat, &DrillTarget::Latest, 0.3).unwrap();
        assert_eq!(p.target, RecoveryTarget::End);
        assert_eq!((p.random_time, p.newest_commit), (None, Some(1_000_000_000)));
        let p = plan(&cat, &DrillTarget::Target(RecoveryTarget::Immediate), 0.3).unwrap();
        assert_eq!((p.target, p.random_time), (RecoveryTarget::Immediate, None));
        let p = plan(&empty_catalog(1), &DrillTarget::Latest, 0.3).unwrap();
        assert_eq!((p.target, p.newest_commit), (RecoveryTarget::End, None));
    }

    #[test]
    fn a_random_target_falls_inside_the_window() {
        let p = plan(&one_backup(1_000), &DrillTarget::Random, 0.5).unwrap();
        let t = p.random_time.unwrap();
        assert!((900_000_001..=1_000_000_000).contains(&t), "{t}");
        assert_eq!(p.target, RecoveryTarget::Time(t));
        assert!(matches!(
            plan(&empty_catalog(1), &DrillTarget::Random, 0.5),
            Err(PlanError::NoWindow)
        ));
        assert!(matches!(
            plan(&one_backup(800), &DrillTarget::Random, 0.5),
            Err(PlanError::NoCommitAfterBackup { .. })
        ));
    }

    #[test]
    fn random_instants_stay_inside_the_window() {
        for r in [0.0, 0.5, 0.999_999, 1.0] {
            let t = random_instant(1_000, 2_000, r);
            assert!((1_001..=2_000).contains(&t), "{r}: {t}");
        }
        assert_eq!(random_instant(1_000, 1_001, 0.7), 1_001);
    }

    #[test]
    fn plan_errors_read_as_before() {
        assert_eq!(
            PlanError::NoWindow.to_string(),
            "no backup to drill: the repository has no restorable window"
        );
        assert_eq!(
            PlanError::NoCommitAfterBackup { window: "w".into() }.to_string(),
            "--target random needs a commit archived after the earliest backup (w)"
        );
    }
}
