//! When the daemon's background jobs are due: a pure schedule over the clock's monotonic time
//! (repository checks, restorable-window refreshes, backups, verifies, drills, forced WAL
//! switches), and the rule deciding whether a forced WAL switch is called for.

use std::time::{Duration, Instant};

/// A job the daemon runs in the background, at most one of each kind at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Job {
    /// Read `walvault.json` again: is the repository still there, still the same one?
    RepoCheck,
    /// Refresh the restorable-window gauges from the catalog.
    Window,
    /// A scheduled backup (and the expire after it, when a retention policy is set).
    Backup,
    Verify,
    Drill,
    /// Ask PostgreSQL whether WAL has waited too long, and switch if so.
    WalSwitch,
}

/// How often the daemon reads `walvault.json` again to make sure its repository is still there.
pub const REPOSITORY_CHECK_EVERY: Duration = Duration::from_secs(10);

/// How often the restorable-window gauges are refreshed (the first time at start).
pub(crate) const WINDOW_EVERY: Duration = Duration::from_secs(60);

/// What the daemon was asked to schedule; a job without an interval never runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Intervals {
    pub backup: Option<Duration>,
    pub verify: Option<Duration>,
    pub drill: Option<Duration>,
    /// Whether forced WAL switches are checked (at every look at the schedule).
    pub wal_switch: bool,
}

/// One periodic job's next due time.
#[derive(Debug, Clone, Copy)]
struct Timer {
    job: Job,
    every: Duration,
    next: Instant,
}

/// The daemon's schedule: asked at every housekeeping tick which jobs to start.
#[derive(Debug, Clone)]
pub(crate) struct Schedule {
    /// In the order the jobs start when several are due at once.
    timers: Vec<Timer>,
    wal_switch: bool,
}

impl Schedule {
    /// The schedule of a daemon started at `start`: the window is due at once, the repository
    /// check one interval later, each scheduled job one of its intervals later.
    pub(crate) fn new(intervals: &Intervals, start: Instant) -> Schedule {
        let timer = |job, every: Duration, first: Duration| Timer {
            job,
            every,
            next: start + first,
        };
        let mut timers = vec![
            timer(Job::RepoCheck, REPOSITORY_CHECK_EVERY, REPOSITORY_CHECK_EVERY),
            timer(Job::Window, WINDOW_EVERY, Duration::ZERO),
        ];
        for (job, every) in [
            (Job::Backup, intervals.backup),
            (Job::Verify, intervals.verify),
            (Job::Drill, intervals.drill),
        ] {
            timers.extend(every.map(|every| timer(job, every, every)));
        }
        Schedule {
            timers,
            wal_switch: intervals.wal_switch,
        }
    }

    /// The jobs to start at `now`: those due and not `running`. Each one returned is next due one
    /// interval after `now`, not after when it was due: a job that ran late (or long) does not
    /// run again at once to catch up. A job due while the previous one still runs waits for it.
    pub(crate) fn due(&mut self, now: Instant, running: impl Fn(Job) -> bool) -> Vec<Job> {
        let mut due = Vec::new();
        for t in &mut self.timers {
            if now >= t.next && !running(t.job) {
                t.next = now + t.every;
                due.push(t.job);
            }
        }
        if self.wal_switch && !running(Job::WalSwitch) {
            due.push(Job::WalSwitch);
        }
        due
    }
}

/// What a forced-switch check decides from PostgreSQL's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SwitchDue {
    /// PostgreSQL archived something less than `max_wal_age` ago.
    NotYet,
    /// Nothing archived for `max_wal_age`, and WAL was written since the last forced switch.
    Switch,
    /// Nothing archived for `max_wal_age`, but nothing written either since the last forced
    /// switch: switching again would only archive an empty segment (like archive_timeout, which
    /// does not switch an idle server either).
    NothingWritten,
}

/// Whether to force a WAL switch: `since_archived_secs` since PostgreSQL last archived a file
/// (or started, if it archived none), `insert_lsn` its WAL insert position now, `last_forced`
/// the insert position after the last switch the daemon forced.
pub(crate) fn wal_switch_due(
    since_archived_secs: f64,
    insert_lsn: &str,
    last_forced: Option<&str>,
    max_wal_age: Duration,
) -> SwitchDue {
    if since_archived_secs < max_wal_age.as_secs_f64() {
        SwitchDue::NotYet
    } else if Some(insert_lsn) != last_forced {
        SwitchDue::Switch
    } else {
        SwitchDue::NothingWritten
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::daemon::clock::{Clock, ManualClock};

    const HOUR: Duration = Duration::from_secs(3600);
    const TICK: Duration = Duration::from_secs(5);

    fn idle(_: Job) -> bool {
        false
    }

    /// The jobs of `job`'s kind started while the clock advances by `TICK` up to `until`.
    fn started_at(schedule: &mut Schedule, clock: &ManualClock, job: Job, until: Duration) -> Vec<Duration> {
        let start = clock.now();
        let mut at = Vec::new();
        while clock.now() - start <= until {
            if schedule.due(clock.now(), idle).contains(&job) {
                at.push(clock.now() - start);
            }
            clock.advance(TICK);
        }
        at
    }

    #[test]
    fn a_backup_every_24h_is_due_at_24h_and_not_before() {
        let clock = ManualClock::new(0);
        let intervals = Intervals {
            backup: Some(24 * HOUR),
            ..Intervals::default()
        };
        let mut schedule = Schedule::new(&intervals, clock.now());
        assert!(
            !schedule.due(clock.now(), idle).contains(&Job::Backup),
            "not at start"
        );
        clock.advance(24 * HOUR - Duration::from_secs(1));
        assert!(
            !schedule.due(clock.now(), idle).contains(&Job::Backup),
            "not a second early"
        );
        clock.advance(Duration::from_secs(1));
        assert_eq!(schedule.due(clock.now(), idle), vec![Job::Backup]);
        assert!(!schedule.due(clock.now(), idle).contains(&Job::Backup), "once");
        clock.advance(24 * HOUR - Duration::from_secs(1));
        assert!(!schedule.due(clock.now(), idle).contains(&Job::Backup));
        clock.advance(Duration::from_secs(1));
        assert!(
            schedule.due(clock.now(), idle).contains(&Job::Backup),
            "again at 48h"
        );
    }

    #[test]
    fn at_five_second_ticks_each_job_runs_once_per_interval() {
        let intervals = Intervals {
            backup: Some(HOUR),
            verify: Some(Duration::from_secs(600)),
            drill: Some(2 * HOUR),
            wal_switch: false,
        };
        let secs = |s: &[u64]| s.iter().map(|s| Duration::from_secs(*s)).collect::<Vec<_>>();
        let each = |job| {
            let clock = ManualClock::new(0);
            let mut schedule = Schedule::new(&intervals, clock.now());
            started_at(&mut schedule, &clock, job, 2 * HOUR)
        };
        assert_eq!(each(Job::Backup), secs(&[3600, 7200]));
        assert_eq!(
            each(Job::Verify),
            secs(&[
                600, 1200, 1800, 2400, 3000, 3600, 4200, 4800, 5400, 6000, 6600, 7200
            ])
        );
        assert_eq!(each(Job::Drill), secs(&[7200]));
        assert_eq!(each(Job::RepoCheck).len(), 720, "every 10 s from 10 s");
        assert_eq!(each(Job::RepoCheck)[0], Duration::from_secs(10));
        let window = each(Job::Window);
        assert_eq!(window[..3], secs(&[0, 60, 120]), "at start, then every minute");
    }

    #[test]
    fn a_job_due_while_it_runs_starts_when_it_ends_and_counts_from_then() {
        let clock = ManualClock::new(0);
        let intervals = Intervals {
            verify: Some(HOUR),
            ..Intervals::default()
        };
        let mut schedule = Schedule::new(&intervals, clock.now());
        let start = clock.now();
        clock.advance(HOUR);
        let running = |job| job == Job::Verify;
        assert!(!schedule.due(clock.now(), running).contains(&Job::Verify));
        clock.advance(Duration::from_secs(600));
        assert!(
            schedule.due(clock.now(), idle).contains(&Job::Verify),
            "once the last one ended"
        );
        clock.advance(HOUR - Duration::from_secs(1));
        assert!(
            !schedule.due(clock.now(), idle).contains(&Job::Verify),
            "no catching up"
        );
        clock.advance(Duration::from_secs(1));
        assert!(schedule.due(clock.now(), idle).contains(&Job::Verify));
        assert_eq!(clock.now() - start, 2 * HOUR + Duration::from_secs(600));
    }

    #[test]
    fn jobs_not_asked_for_never_run() {
        let clock = ManualClock::new(0);
        let mut schedule = Schedule::new(&Intervals::default(), clock.now());
        for _ in 0..(48 * 3600 / 5) {
            for job in schedule.due(clock.now(), idle) {
                assert!(matches!(job, Job::RepoCheck | Job::Window), "{job:?}");
            }
            clock.advance(TICK);
        }
    }

    #[test]
    fn the_wal_switch_check_runs_at_every_tick_one_at_a_time() {
        let clock = ManualClock::new(0);
        let intervals = Intervals {
            wal_switch: true,
            ..Intervals::default()
        };
        let mut schedule = Schedule::new(&intervals, clock.now());
        assert!(schedule.due(clock.now(), idle).contains(&Job::WalSwitch));
        clock.advance(TICK);
        assert!(schedule.due(clock.now(), idle).contains(&Job::WalSwitch));
        let running = |job| job == Job::WalSwitch;
        assert!(!schedule.due(clock.now(), running).contains(&Job::WalSwitch));
    }

    #[test]
    fn max_wal_age_forces_a_switch_only_when_wal_was_written() {
        let max = Duration::from_secs(60);
        // Archived recently: nothing to do, whatever was written.
        assert_eq!(wal_switch_due(59.9, "0/3000060", None, max), SwitchDue::NotYet);
        assert_eq!(
            wal_switch_due(10.0, "0/3000060", Some("0/2000000"), max),
            SwitchDue::NotYet
        );
        // Nothing archived for max_wal_age and WAL written since the last forced switch.
        assert_eq!(wal_switch_due(60.0, "0/3000060", None, max), SwitchDue::Switch);
        assert_eq!(
            wal_switch_due(600.0, "0/3000060", Some("0/3000000"), max),
            SwitchDue::Switch
        );
        // Still nothing archived, but nothing written since our switch: an idle server.
        assert_eq!(
            wal_switch_due(600.0, "0/3000000", Some("0/3000000"), max),
            SwitchDue::NothingWritten
        );
    }
}
