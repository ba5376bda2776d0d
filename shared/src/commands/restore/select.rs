//! Which backup a restore starts from and which WAL it replays: the backup newest before the
//! target on the followed timeline's history, the timeline itself, and the span of segments
//! replay goes through. Pure functions of the catalog.

use serde::Serialize;

use super::{RecoveryTarget, RestoreError, TimelineTarget};
use crate::basebackup::BackupId;
use crate::basebackup::manifest::Manifest;
use crate::catalog::Catalog;
use crate::wal::{Lsn, SegmentName, SegmentNo, TimelineId};

/// Pick the timeline recovery will follow.
pub fn resolve_timeline(
    cat: &Catalog,
    wanted: TimelineTarget,
    backup_tli: TimelineId,
) -> Result<TimelineId, RestoreError> {
    let known = cat.timeline_ids();
    match wanted {
        TimelineTarget::Latest => Ok(cat
            .latest_timeline()
            .max(known.last().copied().unwrap_or(TimelineId::FIRST))),
        TimelineTarget::Current => Ok(backup_tli),
        TimelineTarget::Id(n) if known.contains(&n) || n == TimelineId::FIRST => Ok(n),
        TimelineTarget::Id(n) => Err(RestoreError::UnknownTimeline(
            n,
            known
                .iter()
                .map(TimelineId::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

/// Choose the newest backup that became consistent before the target, on the target timeline's
/// history, and check with the time index that the archive reaches the target from it. Returns
/// the backup and the timeline to follow.
pub fn choose_backup<'a>(
    cat: &'a Catalog,
    wanted: Option<&BackupId>,
    target: &RecoveryTarget,
    timeline: TimelineTarget,
) -> Result<(&'a Manifest, TimelineId), RestoreError> {
    refuse_damaged(cat, wanted)?;
    // An explicitly unknown timeline is reported as such, before anything else.
    if let TimelineTarget::Id(_) = timeline {
        resolve_timeline(cat, timeline, TimelineId::FIRST)?;
    }
    let candidates = candidates(cat, wanted, timeline);
    if let Some(id) = wanted {
        refuse_named(cat, id, timeline, candidates.is_empty())?;
    }
    // Newest first: the first that reaches the target is chosen; if none does, the first
    // refusal says why (unless a refusal ends the search).
    let mut first_refusal = None;
    for (m, tli) in candidates {
        match judge(cat, m, tli, target) {
            Ok(()) => return Ok((m, tli)),
            Err(r) if r.why.ends_search() => return Err(r.into_error(cat, target)),
            Err(r) => {
                first_refusal.get_or_insert(r);
            }
        }
    }
    let refusal = first_refusal.unwrap_or_else(|| Refusal {
        timeline: resolve_timeline(cat, timeline, TimelineId::FIRST).unwrap_or(TimelineId::FIRST),
        why: Why::NotOnHistory,
    });
    Err(refusal.into_error(cat, target))
}

/// Refuse a damaged backup asked for by name, and a repository without a usable backup.
fn refuse_damaged(cat: &Catalog, wanted: Option<&BackupId>) -> Result<(), RestoreError> {
    if let Some(id) = wanted
        && let Some(d) = cat.damage_of(id)
    {
        return Err(RestoreError::Damaged {
            backup: id.clone(),
            reason: d.reason.clone(),
        });
    }
    if !cat.backups().is_empty() {
        return Ok(());
    }
    let damaged: Vec<String> = cat
        .damaged()
        .iter()
        .filter(|d| d.backup.is_some())
        .map(|d| format!("{} is damaged: {}", d.what, d.reason))
        .collect();
    Err(match damaged.is_empty() {
        true => RestoreError::NoBackups,
        false => RestoreError::OnlyDamaged(damaged.join("; ")),
    })
}

/// The backups a restore may start from (only `wanted`, if given), newest first, each with the
/// timeline recovery from it follows, if the backup is on that timeline's history.
fn candidates<'a>(
    cat: &'a Catalog,
    wanted: Option<&BackupId>,
    timeline: TimelineTarget,
) -> Vec<(&'a Manifest, TimelineId)> {
    cat.backups()
        .iter()
        .rev()
        .filter(|m| wanted.is_none_or(|id| &m.id == id))
        .filter_map(|m| {
            let tli = resolve_timeline(cat, timeline, m.timeline).ok()?;
            cat.on_history(m, tli).then_some((m, tli))
        })
        .collect()
}

/// Refuse backup `id`, asked for by name, if the catalog does not have it or (`off_timeline`)
/// the timeline to follow does not descend from it.
fn refuse_named(
    cat: &Catalog,
    id: &BackupId,
    timeline: TimelineTarget,
    off_timeline: bool,
) -> Result<(), RestoreError> {
    let Some(named) = cat.backup(id) else {
        return Err(RestoreError::UnknownBackup(id.clone()));
    };
    if off_timeline {
        let tli = resolve_timeline(cat, timeline, named.timeline)?;
        return Err(RestoreError::BackupNotOnTimeline {
            backup: id.clone(),
            timeline: tli,
        });
    }
    Ok(())
}

/// Why recovery from a backup, following a timeline, cannot reach the target.
struct Refusal {
    timeline: TimelineId,
    why: Why,
}

enum Why {
    /// The WAL to the backup's consistency point (`stop_wal`) is not all archived.
    WalMissing { stop_wal: String },
    /// The target (a time or an LSN) comes before the backup is consistent.
    BeforeConsistency,
    /// The time index, complete, has no transaction end past the target time.
    AfterLastTransaction,
    /// The time index, complete, has no transaction end at all after the backup.
    NoTransactionAfter,
    /// The target LSN is past the WAL archived.
    PastEndOfWal,
    /// No restore point `name` after the backup; those the time index knows.
    NoRestorePoint { name: String, known: Vec<String> },
    /// No backup is on the followed timeline's history: there was nothing to judge.
    NotOnHistory,
}

impl Why {
    /// Whether no older backup can do better: the target is past the end of the archive.
    fn ends_search(&self) -> bool {
        matches!(self, Why::AfterLastTransaction | Why::PastEndOfWal)
    }

    fn describe(&self) -> String {
        match self {
            Why::WalMissing { stop_wal } => format!("WAL up to {stop_wal} is missing from the archive"),
            Why::BeforeConsistency => "the target is before every backup's consistency point".into(),
            Why::AfterLastTransaction => "the target is after the last archived transaction".into(),
            Why::NoTransactionAfter => "no transaction was archived after this backup".into(),
            Why::PastEndOfWal => "the target is past the end of the archived WAL".into(),
            Why::NoRestorePoint { name, known } => {
                format!(
                    "no restore point {name:?} after a backup (known: {})",
                    known.join(", ")
                )
            }
            Why::NotOnHistory => "no backup is on this timeline's history".into(),
        }
    }
}

impl Refusal {
    /// The error a restore reports: the target, why, and the timeline's restorable window.
    fn into_error(self, cat: &Catalog, target: &RecoveryTarget) -> RestoreError {
        let tli = self.timeline;
        RestoreError::OutsideWindow {
            target: format!("{} on timeline {tli}", target.describe()),
            window: format!("{}; {}", self.why.describe(), window_text(cat, tli)),
        }
    }
}

/// Whether recovery from backup `m`, following `tli`, reaches `target` in the archived WAL.
fn judge(cat: &Catalog, m: &Manifest, tli: TimelineId, target: &RecoveryTarget) -> Result<(), Refusal> {
    let chain = cat.chain(m, tli);
    let reaches = if !cat.reaches_consistency(m, &chain) {
        Err(Why::WalMissing {
            stop_wal: m.stop_wal.clone(),
        })
    } else {
        match target {
            RecoveryTarget::Time(us) => reaches_time(cat, m, &chain, *us),
            RecoveryTarget::Lsn(l) => reaches_lsn(cat, m, &chain, *l),
            RecoveryTarget::Name(n) if cat.has_time_index() => reaches_restore_point(cat, m, &chain, n),
            _ => Ok(()),
        }
    };
    reaches.map_err(|why| Refusal { timeline: tli, why })
}

fn reaches_time(cat: &Catalog, m: &Manifest, chain: &[(TimelineId, SegmentNo)], us: i64) -> Result<(), Why> {
    if m.stop_time_us > us {
        return Err(Why::BeforeConsistency);
    }
    match cat.latest_commit(chain) {
        // PostgreSQL stops at the first transaction end past the target: one must exist.
        Some(latest) if us >= latest && cat.index_complete(chain) => Err(Why::AfterLastTransaction),
        // No transaction end at all in the WAL from this backup: nothing PostgreSQL could stop
        // at (it would fail with "recovery ended before the target").
        None if cat.index_complete(chain) => Err(Why::NoTransactionAfter),
        _ => Ok(()),
    }
}

fn reaches_lsn(cat: &Catalog, m: &Manifest, chain: &[(TimelineId, SegmentNo)], lsn: Lsn) -> Result<(), Why> {
    if m.stop_lsn > lsn {
        return Err(Why::BeforeConsistency);
    }
    if lsn > cat.chain_end(chain) {
        return Err(Why::PastEndOfWal);
    }
    Ok(())
}

fn reaches_restore_point(
    cat: &Catalog,
    m: &Manifest,
    chain: &[(TimelineId, SegmentNo)],
    name: &str,
) -> Result<(), Why> {
    let points = cat.restore_points(chain);
    if points.iter().any(|(n, lsn, _)| n == name && *lsn >= m.stop_lsn) {
        return Ok(());
    }
    Err(Why::NoRestorePoint {
        name: name.to_string(),
        known: points.into_iter().map(|(n, _, _)| n).collect(),
    })
}

/// The WAL segments a recovery replays, as far as the repository can tell before PostgreSQL
/// starts: from the backup's start to the segment where the target is reached, or to the newest
/// segment archived on the timeline's path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplaySpan {
    #[serde(serialize_with = "as_text")]
    pub first: SegmentName,
    #[serde(serialize_with = "as_text")]
    pub last: SegmentName,
    /// `last` is the end of the archive at restore time, not the target's segment: the target is
    /// the end of the archive or a transaction id, or the time index cannot place it.
    pub last_is_upper_bound: bool,
    /// Segments from `first` to `last`, both included, counted by LSN.
    pub segments: u64,
}

/// A segment name in JSON as in a file name.
fn as_text<S: serde::Serializer>(name: &SegmentName, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(name)
}

/// Where replay from backup `m`, following `timeline`, reaches `target`, by the catalog
/// [`choose_backup`] chose the backup with: a time in the first segment whose summary records a
/// transaction end past it (PostgreSQL stops at the first one, in WAL order); an LSN in its
/// segment; a restore point in the segment of its record; `immediate` in the segment where the
/// backup became consistent. Otherwise, the last segment of the backup's chain.
pub fn replay_span(
    cat: &Catalog,
    m: &Manifest,
    timeline: TimelineId,
    target: &RecoveryTarget,
    exclusive: bool,
) -> Option<ReplaySpan> {
    let size = cat.wal_segment_size();
    let seg_bytes = u64::from(size);
    let name = |no: SegmentNo| {
        // A number past the last LSN names no segment.
        no.0.checked_mul(seg_bytes)?;
        Some(SegmentName::from_no(
            cat.timeline_of_segment(timeline, no),
            no,
            size,
        ))
    };
    let no_of = |lsn: Lsn| SegmentNo::containing(lsn, size);
    let first_no = no_of(m.start_lsn);
    let first = SegmentName::containing(m.timeline, m.start_lsn, size);
    let chain = cat.chain(m, timeline);
    let end_no = chain.last().map(|&(_, no)| no)?;
    let passes = |t: i64, target: i64| if exclusive { t >= target } else { t > target };
    let exact = match target {
        RecoveryTarget::Time(us) => chain
            .iter()
            .find(|k| {
                cat.summary(**k)
                    .and_then(|s| s.max_commit?.to_unix_micros())
                    .is_some_and(|t| passes(t, *us))
            })
            .map(|&(_, no)| no),
        RecoveryTarget::Lsn(l) => Some(no_of(*l)),
        RecoveryTarget::Name(n) => cat
            .restore_points(&chain)
            .into_iter()
            .find(|(name, lsn, _)| name == n && *lsn >= m.stop_lsn)
            .map(|(_, lsn, _)| no_of(lsn)),
        RecoveryTarget::Immediate => Some(no_of(Lsn(m.stop_lsn.0.saturating_sub(1)))),
        RecoveryTarget::End | RecoveryTarget::Xid(_) => None,
    };
    let (last_no, last_is_upper_bound) = match exact {
        Some(no) => (no.max(first_no), false),
        None => (end_no.max(first_no), true),
    };
    Some(ReplaySpan {
        first,
        last: name(last_no)?,
        last_is_upper_bound,
        segments: last_no.since(first_no) + 1,
    })
}

/// The restorable window of a timeline, for error messages.
fn window_text(cat: &Catalog, tli: TimelineId) -> String {
    match cat.window(tli) {
        Some(w) => format!("timeline {tli} is {}", w.describe()),
        None => format!("timeline {tli} has no restorable window (no backup with its WAL archived)"),
    }
}

#[cfg(test)]
mod tests {

    use super::super::testing::catalog;
    use super::*;

    #[test]
    fn the_newest_backup_that_reaches_the_target_is_chosen_else_the_first_refusal_says_why() {
        use crate::catalog::testing::{at, manifest, runs, summary};
        // Backups consistent at 900 s (segment 2) and 950 s (segment 4); segments 2..=7, each
        // with one transaction end, at 1000 + n seconds.
        let cat = catalog(1)
            .with_backups([
                manifest("20261121T100000Z", 1, 2, 900_000_000),
                manifest("20261121T110000Z", 1, 4, 950_000_000),
            ])
            .with_segments(runs([(1, 2..=7)]))
            .with_summaries((2..=7).map(|no| (at(1, no), summary(no, 1000 + no as i64))));
        let choose = |target: RecoveryTarget| {
            choose_backup(&cat, None, &target, TimelineTarget::Latest)
                .map(|(m, tli)| (m.id.to_string(), tli.get()))
                .map_err(|e| e.to_string())
        };
        // The newer backup is consistent after the target: the older one is chosen.
        assert_eq!(
            choose(RecoveryTarget::Time(920_000_000)),
            Ok(("20261121T100000Z".to_string(), 1))
        );
        let refused = |target| choose(target).unwrap_err();
        let before = refused(RecoveryTarget::Time(800_000_000));
        assert!(
            before.contains("the target is before every backup's consistency point"),
            "{before}"
        );
        // Every refusal names the target's timeline and its window.
        assert!(
            before.contains("on timeline 1") && before.contains("timeline 1 is earliest restorable point"),
            "{before}"
        );
        let after = refused(RecoveryTarget::Time(2_000_000_000));
        assert!(
            after.contains("the target is after the last archived transaction"),
            "{after}"
        );
        let unknown = refused(RecoveryTarget::Name("nope".into()));
        assert!(
            unknown.contains("no restore point \"nope\" after a backup (known: )"),
            "{unknown}"
        );
    }

    #[test]
    fn the_replay_span_ends_where_the_target_is_reached() {
        use crate::catalog::testing::{SEG, at, manifest, runs, summary};
        use crate::wal::lsn::tl;
        // Timeline 2 branched from 1 in segment 5; segments 2..=7 on 1, 5..=9 on 2; one
        // transaction end per segment, at 1000 + n seconds on 1 and 2000 + n on 2.
        let cat = catalog(1)
            .with_history(2, b"1\t0/5000100\tx\n")
            .with_summaries((2..=7).map(|no| (at(1, no), summary(no, 1000 + no as i64))))
            .with_summaries((5..=9).map(|no| (at(2, no), summary(no, 2000 + no as i64))))
            .with_segments(runs([(1, 2..=7), (2, 5..=9)]));
        let m = manifest("20261121T100000Z", 1, 2, 900_000_000);
        let span = |cat: &Catalog, tli, target: RecoveryTarget, exclusive| {
            let s = replay_span(cat, &m, tl(tli), &target, exclusive).unwrap();
            (
                s.first.to_string(),
                s.last.to_string(),
                s.last_is_upper_bound,
                s.segments,
            )
        };
        let first = "000000010000000000000002".to_string();
        // The first segment with a transaction end past the time, on the timeline's path.
        assert_eq!(
            span(&cat, 2, RecoveryTarget::Time(2_006_000_000), false),
            (first.clone(), "000000020000000000000007".into(), false, 6)
        );
        assert_eq!(
            span(&cat, 2, RecoveryTarget::Time(2_006_000_000), true),
            (first.clone(), "000000020000000000000006".into(), false, 5)
        );
        // Past every summarized transaction end: up to the newest archived segment.
        assert_eq!(
            span(&cat, 1, RecoveryTarget::Time(5_000_000_000), false),
            (first.clone(), "000000010000000000000007".into(), true, 6)
        );
        assert_eq!(
            span(&cat, 2, RecoveryTarget::Lsn(Lsn(8 * SEG + 0x60)), false).1,
            "000000020000000000000008"
        );
        assert_eq!(span(&cat, 2, RecoveryTarget::Immediate, false).1, first);
        assert_eq!(
            span(&cat, 2, RecoveryTarget::End, false),
            (first.clone(), "000000020000000000000009".into(), true, 8)
        );
        assert!(span(&cat, 2, RecoveryTarget::Xid(1234), false).2);
        // A restore point: in its record's segment; one the index does not know: the end.
        let mut with_point = summary(6, 2006);
        with_point.restore_points = serde_json::from_value(serde_json::json!([
            {"lsn": Lsn(6 * SEG + 0x100), "time": with_point.max_commit, "name": "rp1"}
        ]))
        .unwrap();
        let cat = cat.with_summaries([(at(2, 6), with_point)]);
        assert_eq!(
            span(&cat, 2, RecoveryTarget::Name("rp1".into()), false).1,
            "000000020000000000000006"
        );
        assert!(span(&cat, 2, RecoveryTarget::Name("nope".into()), false).2);
    }
}
