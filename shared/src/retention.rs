//! Retention maths, pure: which backups a policy keeps and why, and which WAL, history files and
//! time-index summaries the kept backups need. `archive-agent expire` (in [`crate::commands::expire`]) does
//! the I/O around it.
//!
//! The rules (docs/FORMAT.md, "Retention"):
//! - a backup is kept if any rule keeps it: `keep_last` (the newest N), `keep_within` (every
//!   backup that became consistent within the duration, plus the newest one before it, so that
//!   every instant of the duration stays restorable), the calendar rules (the newest backup of
//!   each of the last N days, ISO weeks, months, years that have one, in the policy's time zone),
//!   a pin, and always the newest backup and the newest one the latest timeline descends from;
//! - backups kept by `keep_last`, `keep_within` or as the newest are *window anchors*: all WAL
//!   from their start, on every timeline descending from them, is kept, so every instant from the
//!   oldest of them to now stays restorable;
//! - the other kept backups (calendar rules, pins) keep the WAL from their start to their
//!   consistency point on their own timeline: each stays restorable to that point;
//! - history files are never deleted (PostgreSQL finds the newest timeline by probing them in
//!   order); summaries follow their segments; a timeline whose ancestry is unknown (no history
//!   file) keeps all its WAL, as does the latest timeline when no backup is on its history.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::basebackup::BackupId;
use crate::basebackup::chunk::ChunkId;
use crate::basebackup::manifest::Manifest;
use crate::basebackup::pack::PackId;
use crate::catalog::Catalog;
use crate::config::{ConfigError, RetentionSettings};
use crate::repo::stored::{Envelope, Opened, StoredKind};
use crate::wal::{SegmentName, SegmentNo, TimelineId, WalFileName};

/// A retention policy. Every rule is optional; a backup is kept if any rule keeps it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    pub keep_last: Option<u32>,
    pub keep_within: Option<Duration>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    /// The time zone calendar periods are taken in (UTC when `None`).
    pub timezone: Option<jiff::tz::TimeZone>,
    /// What share of all pack bytes may stay dead after an expire (see
    /// [`crate::basebackup::pack_space`]); [`DEFAULT_MAX_DEAD`] when `None`.
    pub max_dead: Option<u8>,
}

/// The share of pack bytes an expire leaves dead when nothing says otherwise, in percent.
pub const DEFAULT_MAX_DEAD: u8 = 10;

impl Policy {
    /// Whether no rule is set (expire refuses then: it would keep only the newest backup).
    pub fn is_empty(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_within.is_none()
            && self.keep_daily.is_none()
            && self.keep_weekly.is_none()
            && self.keep_monthly.is_none()
            && self.keep_yearly.is_none()
    }

    /// The policy in a line: `keep_last 7, keep_daily 7 (Europe/Paris)`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let mut n = |name: &str, v: Option<u32>| {
            if let Some(v) = v {
                parts.push(format!("{name} {v}"));
            }
        };
        n("keep_last", self.keep_last);
        n("keep_daily", self.keep_daily);
        n("keep_weekly", self.keep_weekly);
        n("keep_monthly", self.keep_monthly);
        n("keep_yearly", self.keep_yearly);
        if let Some(d) = self.keep_within {
            parts.push(format!("keep_within {}", crate::config::format_duration(d)));
        }
        let tz = self.tz_name();
        if tz != "UTC" {
            parts.push(format!("calendar in {tz}"));
        }
        parts.join(", ")
    }

    fn tz(&self) -> jiff::tz::TimeZone {
        self.timezone.clone().unwrap_or(jiff::tz::TimeZone::UTC)
    }

    fn tz_name(&self) -> String {
        self.timezone
            .as_ref()
            .and_then(|t| t.iana_name().map(str::to_string))
            .unwrap_or_else(|| "UTC".into())
    }
}

/// The policy [`RetentionSettings`] (a `[retention]` table, `expire`'s flags, a stored record)
/// describe.
impl RetentionSettings {
    /// The policy: `flags`' rules when it has any (what is typed is what runs), else this
    /// table's; the time zone from the flags, else from this table.
    pub fn policy(&self, flags: &RetentionSettings) -> Result<Policy, ConfigError> {
        let rules = if flags.has_rules() { flags } else { self };
        let timezone = match flags.timezone.as_ref().or(self.timezone.as_ref()) {
            None => None,
            // The name may come from the repository (retention.json): only an IANA-shaped name
            // is looked up, so no path reaches the system's zoneinfo lookup.
            Some(name) if crate::config::is_zone_name(name) => {
                Some(jiff::tz::TimeZone::get(name).map_err(|_| ConfigError::TimeZone(name.clone()))?)
            }
            Some(name) => return Err(ConfigError::TimeZone(name.clone())),
        };
        let keep_within = rules
            .keep_within
            .as_deref()
            .map(crate::config::parse_duration)
            .transpose()?;
        for n in [
            rules.keep_last,
            rules.keep_daily,
            rules.keep_weekly,
            rules.keep_monthly,
            rules.keep_yearly,
        ]
        .into_iter()
        .flatten()
        {
            if n == 0 {
                return Err(ConfigError::ZeroRule);
            }
        }
        Ok(Policy {
            keep_last: rules.keep_last,
            keep_within,
            keep_daily: rules.keep_daily,
            keep_weekly: rules.keep_weekly,
            keep_monthly: rules.keep_monthly,
            keep_yearly: rules.keep_yearly,
            timezone,
            max_dead: flags.max_dead.or(self.max_dead).map(|p| p.min(100)),
        })
    }
}

/// `retention.json`, version 1: what the last expire applied, so that `verify` knows which
/// backups keep their WAL only to their consistency point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RetentionRecord {
    pub format: String,
    pub version: u32,
    /// When the expire ran (Unix microseconds).
    pub applied_at_us: i64,
    pub policy: RetentionSettings,
    /// The backups that expire kept to their consistency point only (calendar rules, pins):
    /// the WAL after that point was deleted on purpose. Every other backup, and any taken
    /// since, is held to WAL running on to the end of its timelines.
    #[serde(default)]
    pub consistency_only: Vec<BackupId>,
}

pub const RECORD_FORMAT: &str = "walvault-retention";

impl RetentionRecord {
    /// The record of an expire that applied `policy` and decided `decisions`.
    pub fn new(policy: &Policy, decisions: &[Decision], applied_at_us: i64) -> RetentionRecord {
        RetentionRecord {
            format: RECORD_FORMAT.into(),
            version: 1,
            applied_at_us,
            policy: RetentionSettings {
                keep_last: policy.keep_last,
                keep_within: policy.keep_within.map(crate::config::format_duration),
                keep_daily: policy.keep_daily,
                keep_weekly: policy.keep_weekly,
                keep_monthly: policy.keep_monthly,
                keep_yearly: policy.keep_yearly,
                timezone: policy
                    .timezone
                    .as_ref()
                    .and_then(|t| t.iana_name().map(str::to_string)),
                max_dead: policy.max_dead,
            },
            consistency_only: decisions
                .iter()
                .filter(|d| d.kept() && !d.reasons.iter().any(|r| r.anchors_window()))
                .map(|d| d.id.clone())
                .collect(),
        }
    }

    /// Parse a stored record (untrusted: anyone who can write the bucket can change it). Its
    /// policy must have at least one rule and be valid.
    pub fn parse(json: &[u8]) -> Result<RetentionRecord, RecordError> {
        let r: RetentionRecord = serde_json::from_slice(json)?;
        if r.format != RECORD_FORMAT || r.version != 1 {
            return Err(RecordError::Unknown {
                format: r.format,
                version: r.version,
            });
        }
        if r.policy()?.is_empty() {
            return Err(RecordError::NoRule);
        }
        Ok(r)
    }

    /// The policy the record names.
    pub fn policy(&self) -> Result<Policy, ConfigError> {
        self.policy.policy(&RetentionSettings::default())
    }
}

/// Why a stored `retention.json` is unusable.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("unknown format {format} version {version}")]
    Unknown { format: String, version: u32 },
    #[error(transparent)]
    Policy(#[from] ConfigError),
    #[error("the policy has no rule")]
    NoRule,
}

impl StoredKind for RetentionRecord {
    type Id = ();
    type Error = RecordError;
    const ENVELOPE: Envelope = Envelope::Record;

    fn key(_: &()) -> String {
        crate::repo::layout::RETENTION_KEY.to_string()
    }

    fn parse(opened: Opened, _: &()) -> Result<RetentionRecord, RecordError> {
        RetentionRecord::parse(&opened.content)
    }
}

/// Why a backup is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The newest backup: never expired.
    Newest,
    /// The newest backup the latest timeline descends from: never expired, so the timeline the
    /// cluster runs on now always has a backup.
    LatestTimeline,
    Pinned,
    Last,
    Within,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Reason {
    /// Whether the backup anchors the point-in-time window (all WAL after it is kept).
    pub fn anchors_window(self) -> bool {
        matches!(
            self,
            Reason::Newest | Reason::LatestTimeline | Reason::Last | Reason::Within
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::Newest => "newest",
            Reason::LatestTimeline => "latest-timeline",
            Reason::Pinned => "pinned",
            Reason::Last => "last",
            Reason::Within => "within",
            Reason::Daily => "daily",
            Reason::Weekly => "weekly",
            Reason::Monthly => "monthly",
            Reason::Yearly => "yearly",
        })
    }
}

/// What the policy decided for each backup, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub id: BackupId,
    /// Empty: the backup expires.
    pub reasons: BTreeSet<Reason>,
}

impl Decision {
    pub fn kept(&self) -> bool {
        !self.reasons.is_empty()
    }
}

/// Decide which backups `policy` keeps. `backups` oldest first; `now_us` is the clock (Unix
/// microseconds); `latest_timeline_base` the newest backup the latest timeline descends from.
pub fn select(
    policy: &Policy,
    backups: &[&Manifest],
    pinned: &BTreeSet<BackupId>,
    latest_timeline_base: Option<&BackupId>,
    now_us: i64,
) -> Vec<Decision> {
    let mut reasons: Vec<BTreeSet<Reason>> = vec![BTreeSet::new(); backups.len()];
    // Newest first, by the moment each restores to (its consistency point).
    let mut order: Vec<usize> = (0..backups.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse((backups[i].stop_time_us, backups[i].id.clone())));
    if let Some(&newest) = order.first() {
        reasons[newest].insert(Reason::Newest);
    }
    for (i, m) in backups.iter().enumerate() {
        if pinned.contains(&m.id) {
            reasons[i].insert(Reason::Pinned);
        }
        if latest_timeline_base == Some(&m.id) {
            reasons[i].insert(Reason::LatestTimeline);
        }
    }
    if let Some(n) = policy.keep_last {
        for &i in order.iter().take(n as usize) {
            reasons[i].insert(Reason::Last);
        }
    }
    if let Some(d) = policy.keep_within {
        let since = now_us.saturating_sub(i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        let mut before = false;
        for &i in &order {
            if backups[i].stop_time_us >= since {
                reasons[i].insert(Reason::Within);
            } else if !before {
                // The newest backup before the window start: without it, the instants between
                // the start and the first backup inside would not be restorable.
                reasons[i].insert(Reason::Within);
                before = true;
            }
        }
    }
    let tz = policy.tz();
    let rules: [(Option<u32>, Reason); 4] = [
        (policy.keep_daily, Reason::Daily),
        (policy.keep_weekly, Reason::Weekly),
        (policy.keep_monthly, Reason::Monthly),
        (policy.keep_yearly, Reason::Yearly),
    ];
    for (n, reason) in rules {
        let Some(n) = n else { continue };
        let mut seen = BTreeSet::new();
        for &i in &order {
            if seen.len() >= n as usize {
                break;
            }
            let Some(period) = period_of(backups[i].stop_time_us, &tz, reason) else {
                continue;
            };
            // Newest first: the first backup met in a period is its newest.
            if seen.insert(period) {
                reasons[i].insert(reason);
            }
        }
    }
    backups
        .iter()
        .zip(reasons)
        .map(|(m, reasons)| Decision {
            id: m.id.clone(),
            reasons,
        })
        .collect()
}

/// The calendar period (day, ISO week, month, year) holding `unix_us` in `tz`, as a number that
/// orders periods and tells them apart.
fn period_of(unix_us: i64, tz: &jiff::tz::TimeZone, rule: Reason) -> Option<i64> {
    let date = jiff::Timestamp::from_microsecond(unix_us)
        .ok()?
        .to_zoned(tz.clone())
        .date();
    let (y, m, d) = (
        i64::from(date.year()),
        i64::from(date.month()),
        i64::from(date.day()),
    );
    Some(match rule {
        Reason::Daily => y * 10_000 + m * 100 + d,
        Reason::Weekly => {
            let w = date.iso_week_date();
            i64::from(w.year()) * 100 + i64::from(w.week())
        }
        Reason::Monthly => y * 100 + m,
        Reason::Yearly => y,
        _ => return None,
    })
}

/// The segment range a kept backup needs, and on which timelines.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Anchor {
    /// Segment number of the backup's start.
    from: SegmentNo,
    /// Last segment needed; `None` for a window anchor (everything after, on every timeline
    /// descending from the backup).
    to: Option<SegmentNo>,
    timeline: TimelineId,
    /// The backup (for on-history checks).
    stop_lsn: crate::wal::Lsn,
}

/// What an expire deletes, and what it keeps.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Every backup, oldest first, with why it is kept (no reasons: expired).
    pub decisions: Vec<Decision>,
    /// The oldest window anchor: every instant from its consistency point to now stays
    /// restorable on the timelines descending from it.
    pub window_from: Option<BackupId>,
    /// Listed WAL files (segments, partial and backup history files) no kept backup needs.
    pub wal: Vec<WalFileName>,
    /// Time index summaries of segments no kept backup needs.
    pub summaries: Vec<SegmentName>,
    /// Timelines whose WAL is kept whole because their ancestry is unknown (no history file).
    pub unknown_timelines: Vec<TimelineId>,
}

impl Plan {
    pub fn expired(&self) -> impl Iterator<Item = &BackupId> {
        self.decisions.iter().filter(|d| !d.kept()).map(|d| &d.id)
    }

    pub fn kept(&self) -> impl Iterator<Item = &Decision> {
        self.decisions.iter().filter(|d| d.kept())
    }
}

/// Plan an expire: which backups `policy` keeps, and which of the listed WAL files (`wal`) and
/// summaries (`summaries`) nothing kept needs. Timelines and backups come from `cat`.
pub fn plan(policy: &Policy, cat: &Catalog, now_us: i64) -> Plan {
    let seg = u64::from(cat.wal_segment_size());
    let backups: Vec<&Manifest> = cat.backups().iter().collect();
    let latest = cat.timeline_ids().last().copied();
    let latest_base = latest.and_then(|t| {
        backups
            .iter()
            .filter(|m| cat.on_history(m, t))
            .max_by_key(|m| (m.stop_time_us, m.id.clone()))
            .map(|m| m.id.clone())
    });
    let decisions = select(policy, &backups, cat.pinned(), latest_base.as_ref(), now_us);

    let mut anchors = Vec::new();
    let mut window_from: Option<&Manifest> = None;
    for (m, d) in backups.iter().zip(&decisions) {
        if !d.kept() {
            continue;
        }
        let window = d.reasons.iter().any(|r| r.anchors_window());
        if window && window_from.is_none_or(|w| m.stop_time_us < w.stop_time_us) {
            window_from = Some(m);
        }
        let (from, consistent) = m.wal_needed(cat.wal_segment_size());
        anchors.push(Anchor {
            from,
            to: (!window).then_some(consistent),
            timeline: m.timeline,
            stop_lsn: m.stop_lsn,
        });
    }

    // Timelines known only from their segments (no history file) beyond timeline 1: their
    // ancestry is unknown, so nothing on them is judged unneeded.
    let unknown: BTreeSet<TimelineId> = cat.timelines_without_history().collect();
    let all_timelines = cat.timeline_ids();
    // For each anchor, the timelines it reaches: its own only (consistency anchors) or every
    // timeline whose history holds the backup (window anchors).
    let reach = |a: &Anchor| -> Vec<TimelineId> {
        match a.to {
            Some(_) => vec![a.timeline],
            None => all_timelines
                .iter()
                .copied()
                .filter(|&t| cat.history(t).timeline_at(a.stop_lsn) == a.timeline)
                .collect(),
        }
    };
    let reached: Vec<(&Anchor, Vec<TimelineId>)> = anchors.iter().map(|a| (a, reach(a))).collect();
    let latest_unanchored = latest.filter(|_| latest_base.is_none());
    let needed = |tli: TimelineId, no: SegmentNo| -> bool {
        if unknown.contains(&tli) || Some(tli) == latest_unanchored {
            return true;
        }
        reached.iter().any(|(a, timelines)| {
            no >= a.from
                && a.to.is_none_or(|to| no <= to)
                && timelines.iter().any(|&t| cat.timeline_of_segment(t, no) == tli)
        })
    };

    let mut plan = Plan {
        window_from: window_from.map(|m| m.id.clone()),
        unknown_timelines: unknown.iter().copied().collect(),
        ..Plan::default()
    };
    for (name, _) in cat.wal_files() {
        match name {
            // Never deleted: a few bytes each, and PostgreSQL looks for the newest timeline by
            // probing history files 2, 3, ... up to the first one missing (findNewestTimeLine):
            // a hole would hide every timeline after it, and a promotion would reuse its id.
            WalFileName::History(_) => {}
            WalFileName::Segment(s) | WalFileName::Partial(s) | WalFileName::Backup { segment: s, .. } => {
                if let Some(no) = s.segment_no(seg as u32)
                    && !needed(s.timeline, no)
                {
                    plan.wal.push(*name);
                }
            }
        }
    }
    for (s, _) in cat.summary_files() {
        if let Some(no) = s.segment_no(seg as u32)
            && !needed(s.timeline, no)
        {
            plan.summaries.push(*s);
        }
    }
    plan.decisions = decisions;
    plan
}

/// Every chunk the given manifests reference as stored on its own (not in one of their packs).
pub fn referenced_chunks<'a>(manifests: impl IntoIterator<Item = &'a Manifest>) -> BTreeSet<ChunkId> {
    let mut out = BTreeSet::new();
    for m in manifests {
        let places = m.places();
        out.extend(m.chunk_refs().filter(|c| places.get(c).is_none()));
    }
    out
}

/// Every pack the given manifests list.
pub fn referenced_packs<'a>(manifests: impl IntoIterator<Item = &'a Manifest>) -> BTreeSet<PackId> {
    manifests
        .into_iter()
        .flat_map(|m| m.packs.iter().map(|p| p.id))
        .collect()
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::catalog::testing::{SEG, empty_catalog, manifest as backup, nos, runs};
    use crate::wal::lsn::tl;
    use std::collections::BTreeMap;

    const HOUR: i64 = 3_600_000_000;
    const DAY: i64 = 24 * HOUR;

    /// Unix microseconds of a UTC date and time.
    fn at(y: i16, mo: i8, d: i8, h: i8, mi: i8) -> i64 {
        jiff::civil::date(y, mo, d)
            .at(h, mi, 0, 0)
            .to_zoned(jiff::tz::TimeZone::UTC)
            .unwrap()
            .timestamp()
            .as_microsecond()
    }

    fn id_at(us: i64) -> String {
        crate::time::format_compact(us / 1_000_000)
    }

    fn kept_ids(d: &[Decision], reason: Reason) -> Vec<String> {
        d.iter()
            .filter(|d| d.reasons.contains(&reason))
            .map(|d| d.id.to_string())
            .collect()
    }

    fn daily_backups(n: usize, start: i64) -> Vec<Manifest> {
        (0..n)
            .map(|i| {
                let t = start + i as i64 * DAY;
                backup(&id_at(t), 1, 2 + i as u64 * 10, t)
            })
            .collect()
    }

    #[test]
    fn retention_record_v1_fixture_still_parses() {
        // Frozen: a repository written by this version must stay readable.
        let r = RetentionRecord::parse(include_bytes!("../tests/fixtures/retention-v1.json")).unwrap();
        assert_eq!(r.applied_at_us, 1_795_359_600_000_000);
        let p = r.policy().unwrap();
        assert_eq!(p.keep_within, Some(Duration::from_secs(14 * 86_400)));
        assert_eq!(
            (p.keep_daily, p.keep_monthly, p.keep_last),
            (Some(7), Some(12), None)
        );
        assert_eq!(
            p.timezone.as_ref().and_then(|t| t.iana_name()),
            Some("Europe/Paris")
        );
        let ids: Vec<String> = r.consistency_only.iter().map(|b| b.to_string()).collect();
        assert_eq!(ids, ["20261101T020000Z", "20261001T020000Z"]);
        // A record without a rule is refused.
        let empty = br#"{"format":"walvault-retention","version":1,"applied_at_us":0,"policy":{}}"#;
        assert!(RetentionRecord::parse(empty).is_err());
    }

    #[test]
    fn keep_last_keeps_the_newest_and_nothing_is_kept_by_default_but_the_newest() {
        let bs = daily_backups(5, at(2026, 11, 1, 3, 0));
        let refs: Vec<&Manifest> = bs.iter().collect();
        let none = BTreeSet::new();
        let p = Policy {
            keep_last: Some(2),
            ..Policy::default()
        };
        let d = select(&p, &refs, &none, None, at(2026, 11, 10, 0, 0));
        assert_eq!(
            kept_ids(&d, Reason::Last),
            vec![id_at(bs[3].stop_time_us), id_at(bs[4].stop_time_us)]
        );
        assert_eq!(kept_ids(&d, Reason::Newest), vec![id_at(bs[4].stop_time_us)]);
        assert_eq!(d.iter().filter(|d| d.kept()).count(), 2);
        // No rule at all: only the newest survives (expire refuses such a policy anyway).
        assert!(Policy::default().is_empty());
        let d = select(&Policy::default(), &refs, &none, None, 0);
        assert_eq!(d.iter().filter(|d| d.kept()).count(), 1);
    }

    #[test]
    fn keep_within_keeps_the_backup_before_the_window_so_its_start_is_restorable() {
        let bs = daily_backups(6, at(2026, 11, 1, 3, 0));
        let refs: Vec<&Manifest> = bs.iter().collect();
        let p = Policy {
            keep_within: Some(Duration::from_secs(2 * 86_400)),
            ..Policy::default()
        };
        // Now is Nov 6 12:00: the window starts Nov 4 12:00; backups of Nov 5 and 6 are inside,
        // and Nov 4 03:00 is the newest before it.
        let d = select(&p, &refs, &BTreeSet::new(), None, at(2026, 11, 6, 12, 0));
        assert_eq!(
            kept_ids(&d, Reason::Within),
            vec![
                id_at(bs[3].stop_time_us),
                id_at(bs[4].stop_time_us),
                id_at(bs[5].stop_time_us)
            ]
        );
    }

    #[test]
    fn calendar_rules_keep_the_newest_backup_of_each_period_in_the_policy_time_zone() {
        // Four backups a day (every 6 hours from 01:00 UTC) for 70 days from 2026-10-01.
        let mut bs = Vec::new();
        for day in 0..70 {
            for h in [1, 7, 13, 19] {
                let t = at(2026, 10, 1, h, 0) + day * DAY;
                bs.push(backup(&id_at(t), 1, 2 + bs.len() as u64, t));
            }
        }
        let refs: Vec<&Manifest> = bs.iter().collect();
        let p = Policy {
            keep_daily: Some(3),
            keep_weekly: Some(2),
            keep_monthly: Some(3),
            keep_yearly: Some(1),
            ..Policy::default()
        };
        let now = at(2026, 12, 10, 0, 0);
        let d = select(&p, &refs, &BTreeSet::new(), None, now);
        // The last day is 2026-12-09: the 19:00 backup of Dec 9, 8 and 7.
        assert_eq!(
            kept_ids(&d, Reason::Daily),
            vec!["20261207T190000Z", "20261208T190000Z", "20261209T190000Z"]
        );
        // Dec 9 2026 is a Wednesday: its ISO week's newest is Dec 9; the week before ends Sunday
        // Dec 6.
        assert_eq!(
            kept_ids(&d, Reason::Weekly),
            vec!["20261206T190000Z", "20261209T190000Z"]
        );
        assert_eq!(
            kept_ids(&d, Reason::Monthly),
            vec!["20261031T190000Z", "20261130T190000Z", "20261209T190000Z"]
        );
        assert_eq!(kept_ids(&d, Reason::Yearly), vec!["20261209T190000Z"]);
        assert_eq!(d.iter().filter(|d| d.kept()).count(), 6);

        // In Tokyo (UTC+9), 19:00 UTC is already the next day: the newest backup of a Tokyo day
        // is the 13:00 UTC one (22:00 there), and Dec 9 19:00 UTC belongs to Dec 10.
        let tokyo = Policy {
            keep_daily: Some(2),
            timezone: Some(jiff::tz::TimeZone::get("Asia/Tokyo").unwrap()),
            ..Policy::default()
        };
        let d = select(&tokyo, &refs, &BTreeSet::new(), None, now);
        assert_eq!(
            kept_ids(&d, Reason::Daily),
            vec!["20261209T130000Z", "20261209T190000Z"]
        );
        assert!(tokyo.describe().contains("Asia/Tokyo"), "{}", tokyo.describe());
    }

    #[test]
    fn pins_and_the_latest_timeline_base_are_kept_whatever_the_rules() {
        let bs = daily_backups(4, at(2026, 11, 1, 3, 0));
        let refs: Vec<&Manifest> = bs.iter().collect();
        let pinned = BTreeSet::from([bs[0].id.clone()]);
        let p = Policy {
            keep_last: Some(1),
            ..Policy::default()
        };
        let d = select(&p, &refs, &pinned, Some(&bs[1].id), 0);
        assert_eq!(kept_ids(&d, Reason::Pinned), vec![bs[0].id.to_string()]);
        assert_eq!(kept_ids(&d, Reason::LatestTimeline), vec![bs[1].id.to_string()]);
        assert!(!d[2].kept());
        assert!(d[3].kept());
    }

    fn seg_name(tli: u32, no: u64) -> SegmentName {
        SegmentName::from_no(tl(tli), SegmentNo(no), SEG as u32)
    }

    /// Timeline 2 branched from 1 in segment 5; segments 2..=7 on 1, 5..=9 on 2. Backups: A on
    /// timeline 1 at segment 2, B on timeline 1 at segment 4, C on timeline 2 at segment 7.
    fn catalog() -> Catalog {
        let day = at(2026, 11, 1, 3, 0);
        empty_catalog(1)
            .with_backups([
                backup(&id_at(day), 1, 2, day),
                backup(&id_at(day + DAY), 1, 4, day + DAY),
                backup(&id_at(day + 2 * DAY), 2, 7, day + 2 * DAY),
            ])
            .with_history(2, b"1\t0/5000100\tx\n")
            .with_segments(runs([(1, 2..=7), (2, 5..=9)]))
    }

    fn deleted(p: &Plan) -> Vec<String> {
        p.wal.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn the_window_keeps_every_timeline_descending_from_its_oldest_backup() {
        let cat = catalog();
        // keep_last 2: B (timeline 1, segment 4) and C. B's window reaches timelines 1 and 2:
        // nothing from segment 4 on is deleted, on either; segments 2 and 3 go.
        let p = Policy {
            keep_last: Some(2),
            ..Policy::default()
        };
        let plan = plan(&p, &cat.clone().listed(), 0);
        assert_eq!(
            plan.expired().map(|b| b.to_string()).collect::<Vec<_>>(),
            vec![cat.backups()[0].id.to_string()]
        );
        assert_eq!(plan.window_from.as_ref(), Some(&cat.backups()[1].id));
        assert_eq!(
            deleted(&plan),
            vec![seg_name(1, 2).to_string(), seg_name(1, 3).to_string()]
        );
        assert_eq!(plan.summaries, vec![seg_name(1, 2), seg_name(1, 3)]);
    }

    #[test]
    fn a_window_on_the_new_timeline_drops_the_old_timeline_past_the_branch() {
        let cat = catalog();
        // keep_last 1: only C on timeline 2. Timeline 2 reads segments 2..4 from timeline 1,
        // but C starts at 7: all of timeline 1 goes, and timeline 2's 5 and 6.
        let p = Policy {
            keep_last: Some(1),
            ..Policy::default()
        };
        let plan = plan(&p, &cat.clone().listed(), 0);
        let mut want: Vec<String> = (2..=7).map(|no| seg_name(1, no).to_string()).collect();
        want.extend([seg_name(2, 5).to_string(), seg_name(2, 6).to_string()]);
        assert_eq!(deleted(&plan), want);
    }

    #[test]
    fn a_calendar_backup_keeps_only_the_wal_to_its_consistency_point() {
        let cat = catalog();
        // Pin A: it keeps segment 2 (its start to its consistency point), nothing more.
        let a = cat.backups()[0].id.clone();
        let cat = cat.with_pin(&a);
        let p = Policy {
            keep_last: Some(1),
            ..Policy::default()
        };
        let plan = plan(&p, &cat.listed(), 0);
        assert!(!deleted(&plan).contains(&seg_name(1, 2).to_string()));
        assert!(deleted(&plan).contains(&seg_name(1, 3).to_string()));
        assert_eq!(plan.expired().count(), 1, "only B");
    }

    #[test]
    fn unknown_timelines_and_an_unanchored_latest_timeline_keep_all_their_wal() {
        // Timeline 3 has segments but no history file: its ancestry is unknown.
        let cat = catalog().with_segments(BTreeMap::from([(tl(3), nos(&[8, 9]))]));
        let p = Policy {
            keep_last: Some(1),
            ..Policy::default()
        };
        let plan = plan(&p, &cat.clone().listed(), 0);
        assert_eq!(plan.unknown_timelines, vec![3]);
        assert!(!deleted(&plan).iter().any(|w| w.starts_with("00000003")));
        // Timeline 3 is the latest and no backup is on its (unknown) history: no backup is the
        // latest timeline's base, so only the newest (C) anchors a window.
        assert_eq!(plan.kept().count(), 1);
    }

    #[test]
    fn an_abandoned_branch_goes_when_the_latest_timeline_descends_from_elsewhere() {
        // Timeline 3 branched from timeline 1 at segment 6 (after B, before C's timeline 2
        // segments were used): the cluster runs on 3 now; timeline 2 is abandoned.
        let cat = catalog()
            .with_history(3, b"1\t0/6000100\tx\n")
            .with_segments(BTreeMap::from([(tl(3), nos(&[6, 7, 8]))]));
        let p = Policy {
            keep_last: Some(1),
            ..Policy::default()
        };
        let plan = plan(&p, &cat.clone().listed(), 0);
        // C (newest, on 2) and B (the newest backup timeline 3 descends from) are kept.
        let kept: Vec<&Decision> = plan.kept().collect();
        assert_eq!(kept.len(), 2);
        assert!(kept[0].reasons.contains(&Reason::LatestTimeline));
        // Timeline 3 reads 4 and 5 from timeline 1, then its own from 6: all kept.
        let del = deleted(&plan);
        for keep in [seg_name(1, 4), seg_name(1, 5), seg_name(3, 6), seg_name(3, 8)] {
            assert!(!del.contains(&keep.to_string()), "{keep}");
        }
        assert!(del.contains(&seg_name(1, 3).to_string()));
    }
}
