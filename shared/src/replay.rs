//! Replay you can watch: how far a recovery set up by `restore-agent restore` has got.
//!
//! restore writes a plan into the data directory ([`RecoveryPlan`], `walvault-recovery.json`):
//! the first segment recovery replays and the last one it needs to reach the target. Each fetch
//! of a segment then records where replay is ([`ReplayProgress`], `walvault-progress.json`) and
//! logs one line in PostgreSQL's log; `restore-agent status` reads both files. This module is
//! the pure part: the formats, the arithmetic (segment n of N, the commit time reached, an ETA
//! from the rate so far) and the text. The clock is passed in. Reading and writing the files is
//! in [`files`].

pub mod files;

use serde::{Deserialize, Serialize};

use crate::time::format_micros;
use crate::wal::{SegmentName, SegmentNo, TimelineId, WalFileName};

/// The plan file, in the restored data directory.
pub const PLAN_FILE: &str = "walvault-recovery.json";
/// The progress file, beside it.
pub const PROGRESS_FILE: &str = "walvault-progress.json";
pub const PLAN_FORMAT: &str = "walvault-recovery-plan";
pub const PROGRESS_FORMAT: &str = "walvault-replay-progress";
pub const FORMAT_VERSION: u32 = 1;

/// What `restore-agent restore` knew about the replay ahead: `walvault-recovery.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPlan {
    pub format: String,
    pub version: u32,
    /// The repository URL, as walvault prints it (credentials redacted).
    pub repository: String,
    pub backup: String,
    /// The cluster's WAL segment size, bytes: segment numbers are counted by LSN, so a timeline
    /// switch does not break the count.
    pub wal_segment_size: u32,
    /// The segment holding the backup's start (its checkpoint's redo point): replay's first.
    pub first_segment: String,
    /// The last segment replay needs to reach the target, or with `last_is_upper_bound` the
    /// newest segment archived on the timeline's path when restore ran.
    pub last_segment: String,
    /// `last_segment` is the end of the archive at restore time, not the target's segment
    /// (targets the time index cannot place: the end of the archive, a transaction id).
    pub last_is_upper_bound: bool,
    /// The target, as written into the recovery settings.
    pub target: String,
    /// The timeline recovery follows (as resolved at restore time).
    pub timeline: TimelineId,
    /// Unix microseconds. A progress file records the plan it belongs to by this.
    pub created_at_us: i64,
    /// `[device, inode]` of the data directory the plan was written into: a copy of the
    /// directory (`pg_basebackup` of the restored server) is another directory, whose
    /// recovery this plan does not describe. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_directory_id: Option<[u64; 2]>,
}

/// Where replay was at the last fetch: `walvault-progress.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayProgress {
    pub format: String,
    pub version: u32,
    /// [`RecoveryPlan::created_at_us`] of the plan this progress is counted against.
    pub plan_created_at_us: i64,
    /// The segment handed to PostgreSQL last.
    pub segment: String,
    /// Its place from the plan's first segment, 1-based.
    pub n: u64,
    /// Segments from the plan's first to its last.
    pub total: u64,
    /// `total` is the archive's end at restore time, not the target's segment.
    pub total_is_upper_bound: bool,
    /// Unix microseconds: the newest transaction end time known to be replayed (the time index
    /// of the segments handed over before this one).
    #[serde(default)]
    pub reached_commit_us: Option<i64>,
    /// Unix microseconds: the newest transaction end in the segment just handed over; it counts
    /// as replayed from the next fetch on.
    #[serde(default)]
    pub fetched_commit_us: Option<i64>,
    /// Unix microseconds: the first fetch this recovery (the rate is counted from there).
    pub started_at_us: i64,
    /// `n` at that first fetch.
    pub started_n: u64,
    /// Unix microseconds: this fetch.
    pub updated_at_us: i64,
    /// Estimated seconds to the last segment, from the rate so far; absent until a rate is known.
    #[serde(default)]
    pub eta_seconds: Option<u64>,
}

/// Why a plan file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("format {format:?} version {version} is not known")]
    Unknown { format: String, version: u32 },
    #[error("WAL segment size {0} is implausible")]
    SegmentSize(u32),
    #[error("segments {first:?}..{last:?} are not a range of WAL segment names")]
    Range { first: String, last: String },
}

impl RecoveryPlan {
    /// Parse a plan file (local, but checked all the same: a reader refuses what it does not know).
    pub fn parse(json: &[u8]) -> Result<RecoveryPlan, PlanError> {
        let p: RecoveryPlan = serde_json::from_slice(json)?;
        if p.format != PLAN_FORMAT || p.version != FORMAT_VERSION {
            return Err(PlanError::Unknown {
                format: p.format,
                version: p.version,
            });
        }
        if !p.wal_segment_size.is_power_of_two() || !(1 << 20..=1 << 30).contains(&p.wal_segment_size) {
            return Err(PlanError::SegmentSize(p.wal_segment_size));
        }
        match (p.first_no(), p.last_no()) {
            (Some(f), Some(l)) if f <= l => Ok(p),
            _ => Err(PlanError::Range {
                first: p.first_segment,
                last: p.last_segment,
            }),
        }
    }

    fn segment_no(&self, name: &str) -> Option<SegmentNo> {
        match name.parse::<WalFileName>().ok()? {
            WalFileName::Segment(s) => s.segment_no(self.wal_segment_size),
            _ => None,
        }
    }

    pub fn first_no(&self) -> Option<SegmentNo> {
        self.segment_no(&self.first_segment)
    }

    pub fn last_no(&self) -> Option<SegmentNo> {
        self.segment_no(&self.last_segment)
    }

    /// Segments from the first to the last, both included.
    pub fn total(&self) -> Option<u64> {
        Some(self.last_no()?.checked_since(self.first_no()?)? + 1)
    }
}

impl ReplayProgress {
    /// Parse a progress file; `None` for anything unusable (it is only a record of progress).
    pub fn parse(json: &[u8]) -> Option<ReplayProgress> {
        let p: ReplayProgress = serde_json::from_slice(json).ok()?;
        (p.format == PROGRESS_FORMAT && p.version == FORMAT_VERSION).then_some(p)
    }

    /// Whole percent of the planned segments reached (`None` past the last one).
    pub fn percent(&self) -> Option<u64> {
        (self.n <= self.total && self.total > 0).then(|| self.n * 100 / self.total)
    }

    /// What the count means, in words: `12 of 40, 30%`.
    pub fn place(&self) -> String {
        let archived = if self.total_is_upper_bound {
            " archived"
        } else {
            ""
        };
        match self.percent() {
            Some(pct) => format!("{} of {}{archived}, {pct}%", self.n, self.total),
            None if self.total_is_upper_bound => {
                format!("{}, past the {} archived when restore ran", self.n, self.total)
            }
            None => format!("{}, past the {} planned to reach the target", self.n, self.total),
        }
    }

    /// Where the ETA counts to.
    pub fn goal(&self) -> &'static str {
        if self.total_is_upper_bound {
            "the newest archived segment"
        } else {
            "the target"
        }
    }

    /// The line each fetch logs:
    /// `replay progress: segment 000000010000000000000012 (12 of 40, 30%), commits replayed up
    /// to 2026-11-22 14:31:02.123456+00, about 1m20s to the target`.
    pub fn line(&self) -> String {
        let mut s = format!("replay progress: segment {} ({})", self.segment, self.place());
        if let Some(t) = self.reached_commit_us {
            s.push_str(&format!(", commits replayed up to {}", format_micros(t)));
        }
        if let Some(eta) = self.eta_seconds {
            s.push_str(&format!(", {} to {}", eta_text(eta), self.goal()));
        }
        s
    }
}

/// Progress after PostgreSQL was handed `segment`, the newest transaction end in it being
/// `fetched_commit_us` (from the time index, when known), at `now_us`. `previous` is the
/// progress recorded by the fetch before, if any. `None` when `segment` is before the plan's
/// first segment (not a replay this plan describes).
pub fn advance(
    plan: &RecoveryPlan,
    previous: Option<&ReplayProgress>,
    segment: &SegmentName,
    fetched_commit_us: Option<i64>,
    now_us: i64,
) -> Option<ReplayProgress> {
    let no = segment.segment_no(plan.wal_segment_size)?;
    let n = no.checked_since(plan.first_no()?)? + 1;
    let total = plan.total()?;
    // A progress file of another plan (an earlier restore into this directory) is ignored.
    let previous = previous.filter(|p| p.plan_created_at_us == plan.created_at_us);
    let (started_at_us, started_n) = match previous {
        Some(p) if p.n <= n => (p.started_at_us, p.started_n),
        // Going back: PostgreSQL reads the segment where replay stopped again when it ends
        // recovery, or recovers again from its last restartpoint after a restart. The rate
        // starts over; what was replayed stays replayed.
        _ => (now_us, n),
    };
    let reached_commit_us = previous.and_then(|p| {
        // The segment handed over before is replayed now; but the target's own segment only up
        // to the target (PostgreSQL reads ahead past it), so its newest commit does not count.
        if p.n < n && (plan.last_is_upper_bound || p.n < total) {
            p.reached_commit_us.max(p.fetched_commit_us)
        } else {
            p.reached_commit_us
        }
    });
    Some(ReplayProgress {
        format: PROGRESS_FORMAT.into(),
        version: FORMAT_VERSION,
        plan_created_at_us: plan.created_at_us,
        segment: segment.to_string(),
        n,
        total,
        total_is_upper_bound: plan.last_is_upper_bound,
        reached_commit_us,
        fetched_commit_us,
        started_at_us,
        started_n,
        updated_at_us: now_us,
        eta_seconds: eta_seconds(n, total, started_n, now_us.saturating_sub(started_at_us)),
    })
}

/// Seconds left to replay segments `n..=total`, at the rate segments `started_n..n` took
/// `elapsed_us` (segment `started_n` was handed over when the clock started, so `n - started_n`
/// of them are replayed). `None` until one is, and past the last.
pub fn eta_seconds(n: u64, total: u64, started_n: u64, elapsed_us: i64) -> Option<u64> {
    let done = n.checked_sub(started_n).filter(|&d| d > 0)?;
    let left = total.checked_sub(n)? + 1;
    let elapsed = u128::try_from(elapsed_us).ok().filter(|&e| e > 0)?;
    let eta_us = u128::from(left) * elapsed / u128::from(done);
    u64::try_from(eta_us / 1_000_000).ok()
}

/// `about 1m20s`, or `less than a second`.
pub fn eta_text(secs: u64) -> String {
    match secs {
        0 => "less than a second".into(),
        s => format!("about {}", format_duration(s)),
    }
}

/// `45s`, `1m20s`, `2h05m`.
pub fn format_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// Whether the recovery a plan describes is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryState {
    /// A signal file is there and PostgreSQL runs on the directory.
    InProgress,
    /// A signal file is there, but no PostgreSQL runs: not started yet, or stopped.
    NotRunning,
    /// No signal file: PostgreSQL ended recovery (promoted).
    Finished,
}

/// What `restore-agent status` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoveryStatus {
    pub data_directory: String,
    pub state: RecoveryState,
    /// `recovery.signal` or `standby.signal`, when one is there.
    pub signal_file: Option<String>,
    pub plan: RecoveryPlan,
    /// The last progress recorded, if any fetch recorded one for this plan.
    pub progress: Option<ReplayProgress>,
    /// Unix microseconds, when this status was read.
    pub now_us: i64,
}

impl RecoveryStatus {
    /// Seconds since the last progress was recorded.
    pub fn progress_age(&self) -> Option<u64> {
        let p = self.progress.as_ref()?;
        u64::try_from(self.now_us.saturating_sub(p.updated_at_us) / 1_000_000).ok()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const SEC: i64 = 1_000_000;
    pub(crate) const T0: i64 = 1_795_359_600 * SEC;

    pub(crate) fn plan(first: &str, last: &str, bound: bool) -> RecoveryPlan {
        RecoveryPlan {
            format: PLAN_FORMAT.into(),
            version: FORMAT_VERSION,
            repository: "file:///var/lib/walvault".into(),
            backup: "20261122T120000Z".into(),
            wal_segment_size: 16 << 20,
            first_segment: first.into(),
            last_segment: last.into(),
            last_is_upper_bound: bound,
            target: "recovery_target_time = '2026-11-22 14:31:59+00'".into(),
            timeline: crate::wal::lsn::tl(2),
            created_at_us: T0 - 60 * SEC,
            data_directory_id: None,
        }
    }

    pub(crate) fn seg(name: &str) -> SegmentName {
        match name.parse::<WalFileName>().unwrap() {
            WalFileName::Segment(s) => s,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn counts_by_lsn_across_a_timeline_switch_and_a_log_boundary() {
        // 0x...FE on timeline 1 to 0x1_00000028 on timeline 2: 0xFE, 0xFF, then 0x100..=0x128.
        let p = plan("0000000100000000000000FE", "000000020000000100000028", false);
        assert_eq!(p.total(), Some(2 + 0x29));
        let first = advance(&p, None, &seg("0000000100000000000000FE"), None, T0).unwrap();
        assert_eq!((first.n, first.total), (1, 43));
        let switched = advance(&p, Some(&first), &seg("000000020000000100000000"), None, T0).unwrap();
        assert_eq!(switched.n, 3);
        assert_eq!(switched.percent(), Some(6));
        // A segment before the plan's first is no replay this plan describes.
        assert!(advance(&p, None, &seg("0000000100000000000000FD"), None, T0).is_none());
    }

    #[test]
    fn the_commit_time_reached_is_the_segment_handed_over_before() {
        let p = plan("000000010000000000000002", "000000010000000000000009", false);
        let a = advance(
            &p,
            None,
            &seg("000000010000000000000002"),
            Some(T0 - 50 * SEC),
            T0,
        )
        .unwrap();
        assert_eq!(
            a.reached_commit_us, None,
            "nothing is replayed at the first fetch"
        );
        let b = advance(&p, Some(&a), &seg("000000010000000000000003"), None, T0 + SEC).unwrap();
        assert_eq!(b.reached_commit_us, Some(T0 - 50 * SEC));
        // A segment without a commit (or without a summary) keeps the time reached.
        let c = advance(
            &p,
            Some(&b),
            &seg("000000010000000000000004"),
            Some(T0 - 70 * SEC),
            T0 + 2 * SEC,
        )
        .unwrap();
        assert_eq!(c.reached_commit_us, Some(T0 - 50 * SEC));
        // Commit times are not monotonic in WAL order: the newest one replayed counts.
        let d = advance(&p, Some(&c), &seg("000000010000000000000005"), None, T0 + 3 * SEC).unwrap();
        assert_eq!(d.reached_commit_us, Some(T0 - 50 * SEC));
        // Past the target's segment (PostgreSQL reads ahead): the target's commits do not count.
        let short = plan("000000010000000000000002", "000000010000000000000003", false);
        let at = advance(&short, Some(&a), &seg("000000010000000000000003"), Some(T0), T0).unwrap();
        let past = advance(&short, Some(&at), &seg("000000010000000000000004"), None, T0).unwrap();
        assert_eq!(past.reached_commit_us, Some(T0 - 50 * SEC));
        let mut bound = short.clone();
        bound.last_is_upper_bound = true;
        let at = advance(&bound, Some(&a), &seg("000000010000000000000003"), Some(T0), T0).unwrap();
        let past = advance(&bound, Some(&at), &seg("000000010000000000000004"), None, T0).unwrap();
        assert_eq!(past.reached_commit_us, Some(T0), "the archive's end is no target");
        // The same segment asked for again: nothing more is replayed.
        let again = advance(&p, Some(&d), &seg("000000010000000000000005"), None, T0 + 4 * SEC).unwrap();
        assert_eq!(again.reached_commit_us, d.reached_commit_us);
    }

    #[test]
    fn the_eta_comes_from_the_rate_since_the_first_fetch() {
        let p = plan("000000010000000000000002", "000000010000000000000029", false);
        let first = advance(&p, None, &seg("000000010000000000000002"), None, T0).unwrap();
        assert_eq!(first.eta_seconds, None, "no rate yet");
        assert!(!first.line().contains("about"), "{}", first.line());
        // 10 segments replayed in 20 s: 2 s each; segments 12..=40 (29) are left.
        let later = advance(
            &p,
            Some(&first),
            &seg("00000001000000000000000C"),
            None,
            T0 + 20 * SEC,
        )
        .unwrap();
        assert_eq!((later.n, later.started_n, later.started_at_us), (11, 1, T0));
        assert_eq!(later.eta_seconds, Some(60));
        assert_eq!(
            eta_seconds(40, 40, 1, 39 * SEC),
            Some(1),
            "the last segment itself"
        );
        assert_eq!(eta_seconds(41, 40, 1, 39 * SEC), None, "past the last");
        assert_eq!(eta_seconds(5, 40, 1, 0), None, "no time elapsed");
    }

    #[test]
    fn another_plan_starts_over_and_going_back_restarts_the_rate() {
        let p = plan("000000010000000000000002", "000000010000000000000029", false);
        let a = advance(&p, None, &seg("000000010000000000000002"), Some(T0), T0).unwrap();
        let b = advance(
            &p,
            Some(&a),
            &seg("000000010000000000000008"),
            None,
            T0 + 10 * SEC,
        )
        .unwrap();
        // PostgreSQL restarted and recovers again from an earlier restartpoint (or reads the
        // last segment again as it ends recovery): the rate starts over, the time reached stays.
        let back = advance(
            &p,
            Some(&b),
            &seg("000000010000000000000006"),
            None,
            T0 + 99 * SEC,
        )
        .unwrap();
        assert_eq!(
            (back.started_at_us, back.started_n, back.eta_seconds),
            (T0 + 99 * SEC, 5, None)
        );
        assert_eq!(back.reached_commit_us, Some(T0));
        let mut other = p.clone();
        other.created_at_us += 1;
        let fresh = advance(
            &other,
            Some(&b),
            &seg("000000010000000000000009"),
            None,
            T0 + 11 * SEC,
        )
        .unwrap();
        assert_eq!((fresh.started_n, fresh.reached_commit_us), (8, None));
    }

    #[test]
    fn the_line_says_what_the_count_means() {
        let p = plan("000000010000000000000001", "000000010000000000000028", false);
        let mut pr = advance(&p, None, &seg("000000010000000000000012"), None, T0).unwrap();
        pr.reached_commit_us = Some(crate::time::parse_time("2026-11-22 14:31:02.123").unwrap());
        pr.eta_seconds = Some(80);
        assert_eq!(
            pr.line(),
            "replay progress: segment 000000010000000000000012 (18 of 40, 45%), commits replayed up to \
             2026-11-22 14:31:02.123000+00, about 1m20s to the target"
        );
        pr.total_is_upper_bound = true;
        assert!(
            pr.line().contains("(18 of 40 archived, 45%)")
                && pr.line().ends_with("about 1m20s to the newest archived segment"),
            "{}",
            pr.line()
        );
        pr.n = 42;
        pr.eta_seconds = None;
        assert!(
            pr.line().contains("(42, past the 40 archived when restore ran)"),
            "{}",
            pr.line()
        );
        pr.total_is_upper_bound = false;
        assert!(
            pr.line()
                .contains("(42, past the 40 planned to reach the target)"),
            "{}",
            pr.line()
        );
        pr.eta_seconds = Some(0);
        pr.n = 40;
        assert!(
            pr.line().ends_with(", less than a second to the target"),
            "{}",
            pr.line()
        );
        assert_eq!(format_duration(45), "45s");
        assert_eq!(format_duration(3600 + 5 * 60 + 9), "1h05m");
    }

    #[test]
    fn plans_and_progress_refuse_what_they_do_not_know() {
        let p = plan("000000010000000000000002", "000000010000000000000009", true);
        let json = serde_json::to_vec(&p).unwrap();
        assert_eq!(RecoveryPlan::parse(&json).unwrap(), p);
        for (field, value) in [
            ("version", serde_json::json!(2)),
            ("format", serde_json::json!("walvault-other")),
            ("wal_segment_size", serde_json::json!(1000)),
            ("last_segment", serde_json::json!("000000010000000000000001")),
            ("first_segment", serde_json::json!("00000001.history")),
        ] {
            let mut v = serde_json::to_value(&p).unwrap();
            v[field] = value;
            assert!(RecoveryPlan::parse(v.to_string().as_bytes()).is_err(), "{field}");
        }
        let pr = advance(&p, None, &seg("000000010000000000000003"), None, T0).unwrap();
        assert_eq!(ReplayProgress::parse(&serde_json::to_vec(&pr).unwrap()), Some(pr));
        assert_eq!(ReplayProgress::parse(b"{\"format\": \"x\"}"), None);
    }

    #[test]
    fn frozen_plan_and_progress_fixtures_still_parse() {
        let plan = RecoveryPlan::parse(include_bytes!("../tests/fixtures/recovery-plan-v1.json")).unwrap();
        assert_eq!(plan.total(), Some(40));
        assert_eq!(plan.data_directory_id, Some([2049, 1_234_567]));
        let pr = ReplayProgress::parse(include_bytes!("../tests/fixtures/replay-progress-v1.json")).unwrap();
        assert_eq!((pr.n, pr.total, pr.eta_seconds), (12, 40, Some(80)));
    }
}
