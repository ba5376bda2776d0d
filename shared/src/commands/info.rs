//! `restore-agent info` and `list`: what the repository holds (backups, timelines and their WAL,
//! restorable windows, restore points, damaged objects, recent drills) as one report.

use std::collections::HashMap;
use std::fmt::Write;

use serde::Serialize;

use crate::catalog::{BackupInfo, Catalog, CatalogError, Damaged, SegmentRange};
use crate::commands::drill::{Evidence, Objective};
use crate::config::Settings;
use crate::repo::keys::{EncryptionRecord, Kdf};
use crate::repo::{ClusterIdentity, RepoError, RepoId, StoreError};
use crate::report::{Report, human_bytes};
use crate::time::format_micros;
use crate::wal::TimelineId;

/// Drills shown: the most recent ones.
const RECENT_DRILLS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// The repository as `info` shows it; `info --json` prints it as is.
#[derive(Debug, Clone, Serialize)]
pub struct InfoReport {
    /// The repository URL, as walvault prints it (credentials redacted).
    pub repository: String,
    pub repository_id: RepoId,
    /// `None` until the first segment binds a repository created without `--pgdata`.
    pub cluster: Option<ClusterIdentity>,
    pub encryption: Option<EncryptionInfo>,
    /// Oldest first.
    pub backups: Vec<BackupInfo>,
    pub timelines: Vec<TimelineInfo>,
    pub damaged: Vec<Damaged>,
    /// The packs the backups list, and the bytes in them no backup references (what
    /// `archive-agent expire` reclaims by repacking).
    pub packs: crate::basebackup::pack_space::Space,
    /// The most recent drills, newest first.
    pub drills: Vec<Evidence>,
    /// With a second copy of the repository: each one's window, the first then the second.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub side_by_side: Vec<WindowRow>,
}

/// One repository's reach, as the side-by-side table shows it: what a restore from it alone
/// can reach on the newest timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WindowRow {
    pub repository: String,
    /// `None` when it could not be read.
    pub repository_id: Option<RepoId>,
    pub backups: usize,
    pub newest_backup: Option<String>,
    pub timeline: Option<TimelineId>,
    /// The newest segment of that timeline's last run of WAL.
    pub wal_to: Option<String>,
    pub restorable_from: Option<String>,
    pub restorable_to: Option<String>,
    pub damaged: usize,
    /// Why the repository could not be read alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl WindowRow {
    /// The row of a repository that could not be read.
    pub fn unreadable(repository: String, e: &InfoError) -> WindowRow {
        WindowRow {
            repository,
            repository_id: None,
            backups: 0,
            newest_backup: None,
            timeline: None,
            wal_to: None,
            restorable_from: None,
            restorable_to: None,
            damaged: 0,
            error: Some(e.to_string()),
        }
    }

    pub fn of(report: &InfoReport) -> WindowRow {
        let newest = report.timelines.iter().max_by_key(|t| t.timeline);
        WindowRow {
            repository: report.repository.clone(),
            repository_id: Some(report.repository_id.clone()),
            backups: report.backups.len(),
            newest_backup: report.backups.last().map(|b| b.id.to_string()),
            timeline: newest.map(|t| t.timeline),
            wal_to: newest.and_then(|t| t.wal.last()).map(|r| r.last.clone()),
            restorable_from: newest
                .and_then(|t| t.restorable.as_ref())
                .map(|r| r.earliest.clone()),
            restorable_to: newest
                .and_then(|t| t.restorable.as_ref())
                .and_then(|r| r.latest_before.clone()),
            damaged: report.damaged.len(),
            error: None,
        }
    }
}

/// How an encrypted repository is keyed (never the key).
#[derive(Debug, Clone, Serialize)]
pub struct EncryptionInfo {
    pub cipher: String,
    pub chunk_ids: String,
    /// How the key wrapping the master key is derived.
    pub key: Kdf,
    pub wrapped_at: Option<String>,
}

impl From<&EncryptionRecord> for EncryptionInfo {
    fn from(e: &EncryptionRecord) -> Self {
        EncryptionInfo {
            cipher: e.cipher.clone(),
            chunk_ids: e.chunk_ids.clone(),
            key: e.key.kdf,
            wrapped_at: e.wrapped_at.clone(),
        }
    }
}

/// One timeline: where it branched off, its archived WAL and what a restore can reach on it.
#[derive(Debug, Clone, Serialize)]
pub struct TimelineInfo {
    pub timeline: TimelineId,
    pub parent: Option<TimelineId>,
    pub switch_lsn: Option<String>,
    pub reason: Option<String>,
    /// Runs of consecutive archived segments; more than one means gaps.
    pub wal: Vec<SegmentRange>,
    pub restorable: Option<RestorableSpan>,
    pub restore_points: Vec<RestorePointInfo>,
}

/// The instants a restore can reach on one timeline.
#[derive(Debug, Clone, Serialize)]
pub struct RestorableSpan {
    pub earliest: String,
    pub latest_before: Option<String>,
    pub end_lsn: String,
}

/// A restore point a restore can reach.
#[derive(Debug, Clone, Serialize)]
pub struct RestorePointInfo {
    /// The name is used more than once: `--target-name` stops at the first one replay meets.
    pub name_reused: bool,
    pub name: String,
    pub lsn: String,
    pub time: Option<String>,
}

/// Open the repository read-only and describe it. With `--fallback-repo`, what both hold
/// together, and each one's own window side by side (each read alone: a repository whose
/// descriptor cannot be read gets a row saying why).
pub async fn info(settings: &Settings) -> Result<InfoReport, InfoError> {
    let mut report = describe_repository(settings).await?;
    if let Some(copy) = &settings.fallback_repo {
        let alone = |repo: &crate::repo::RepoUrl| Settings {
            repo: repo.clone(),
            fallback_repo: None,
            ..settings.clone()
        };
        let mut rows = Vec::new();
        for repo in [&settings.repo, copy] {
            rows.push(match describe_repository(&alone(repo)).await {
                Ok(r) => WindowRow::of(&r),
                Err(e) => WindowRow::unreadable(repo.to_string(), &e),
            });
        }
        report.side_by_side = rows;
    }
    Ok(report)
}

/// One repository (with its fallback, when one is set) described.
async fn describe_repository(settings: &Settings) -> Result<InfoReport, InfoError> {
    let repo = settings.open_reader().await?;
    let encryption = repo.descriptor().encryption.as_ref().map(EncryptionInfo::from);
    let drills = crate::commands::drill::recent(&repo, RECENT_DRILLS).await?;
    let cat = Catalog::load(&repo).await?;
    Ok(describe(settings.repo.to_string(), &cat, encryption, drills))
}

/// The report from a loaded catalog: pure.
pub fn describe(
    repository: String,
    cat: &Catalog,
    encryption: Option<EncryptionInfo>,
    drills: Vec<Evidence>,
) -> InfoReport {
    let backups = cat
        .backups()
        .iter()
        .map(|m| BackupInfo {
            pinned: cat.is_pinned(&m.id),
            ..BackupInfo::from(m)
        })
        .collect();
    let timelines = cat.timeline_ids().into_iter().map(|t| timeline(cat, t)).collect();
    InfoReport {
        repository,
        repository_id: cat.repo_id().clone(),
        cluster: cat.cluster().copied(),
        encryption,
        backups,
        timelines,
        damaged: cat.damaged().to_vec(),
        packs: crate::basebackup::pack_space::Space::of(&crate::basebackup::pack_space::usage(
            cat.backups().iter(),
        )),
        drills,
        side_by_side: Vec::new(),
    }
}

fn timeline(cat: &Catalog, t: TimelineId) -> TimelineInfo {
    let h = cat.history(t);
    TimelineInfo {
        timeline: t,
        parent: h.parent().map(|p| p.timeline),
        switch_lsn: h.parent().map(|p| p.switch_lsn.to_string()),
        reason: h.parent().map(|p| p.reason.clone()),
        wal: cat.ranges(t),
        restorable: cat.window(t).map(|w| RestorableSpan {
            earliest: format_micros(w.earliest),
            latest_before: w.latest.map(format_micros),
            end_lsn: w.end_lsn.to_string(),
        }),
        restore_points: restore_points(cat, t),
    }
}

/// Restore points a restore can reach on timeline `t`, a name used more than once marked.
fn restore_points(cat: &Catalog, t: TimelineId) -> Vec<RestorePointInfo> {
    let points = cat.reachable_restore_points(t);
    let mut uses = HashMap::new();
    for (name, _, _) in &points {
        *uses.entry(name.clone()).or_insert(0u32) += 1;
    }
    points
        .into_iter()
        .map(|(name, lsn, time)| RestorePointInfo {
            name_reused: uses.get(&name).is_some_and(|&n| n > 1),
            name,
            lsn: lsn.to_string(),
            time: time.map(format_micros),
        })
        .collect()
}

impl Report for InfoReport {
    fn render(&self) -> String {
        let mut out = String::new();
        self.render_header(&mut out);
        self.render_side_by_side(&mut out);
        self.render_backups(&mut out);
        self.render_timelines(&mut out);
        for d in &self.damaged {
            let _ = writeln!(out, "DAMAGED {} ({}), left out: {}", d.what, d.key, d.reason);
        }
        self.render_drills(&mut out);
        for t in &self.timelines {
            for rp in &t.restore_points {
                let _ = writeln!(
                    out,
                    "restore point {:?} on timeline {} at {} ({}){}",
                    rp.name,
                    t.timeline,
                    rp.time.as_deref().unwrap_or("-"),
                    rp.lsn,
                    if rp.name_reused {
                        "  (name used again: --target-name stops at the first)"
                    } else {
                        ""
                    }
                );
            }
        }
        out
    }
}

impl InfoReport {
    fn render_header(&self, out: &mut String) {
        let _ = match &self.cluster {
            Some(c) => writeln!(
                out,
                "repository {} ({c}), id {}",
                self.repository, self.repository_id
            ),
            None => writeln!(
                out,
                "repository {}, id {}: no WAL archived yet",
                self.repository, self.repository_id
            ),
        };
        if let Some(e) = &self.encryption {
            let kdf = match e.key {
                Kdf::Raw => "raw",
                Kdf::Argon2id => "argon2id",
            };
            let _ = writeln!(
                out,
                "encrypted: {}, keyed chunk ids, key {kdf} (wrapped {})",
                e.cipher,
                e.wrapped_at.as_deref().unwrap_or("at init")
            );
        }
        let p = &self.packs;
        if p.packs > 0 {
            let _ = writeln!(
                out,
                "packs: {} holding {}, of which {} ({:.1}%) are chunks no backup references (expire repacks above max_dead, {}% by default)",
                p.packs,
                human_bytes(p.bytes),
                human_bytes(p.dead_bytes),
                p.dead_percent(),
                crate::retention::DEFAULT_MAX_DEAD
            );
        }
        out.push('\n');
    }

    /// Each copy's reach, one line each, the first repository first.
    fn render_side_by_side(&self, out: &mut String) {
        if self.side_by_side.is_empty() {
            return;
        }
        let width = self
            .side_by_side
            .iter()
            .map(|r| r.repository.len())
            .max()
            .unwrap_or(10)
            .max(10);
        let head = format!(
            "{:<width$}  {:>7}  {:<18}  {:<24}  {:<24}  {:<24}",
            "copy", "backups", "newest backup", "wal to", "restorable from", "to just before"
        );
        let _ = writeln!(out, "{}", head.trim_end());
        let first_id = &self.repository_id;
        for r in &self.side_by_side {
            if let Some(e) = &r.error {
                let _ = writeln!(out, "{:<width$}  cannot be read: {e}", r.repository);
                continue;
            }
            let line = format!(
                "{:<width$}  {:>7}  {:<18}  {:<24}  {:<24}  {:<24}{}{}",
                r.repository,
                r.backups,
                r.newest_backup.as_deref().unwrap_or("-"),
                r.wal_to.as_deref().unwrap_or("-"),
                r.restorable_from.as_deref().unwrap_or("-"),
                r.restorable_to.as_deref().unwrap_or("-"),
                if r.damaged > 0 {
                    format!("  {} damaged", r.damaged)
                } else {
                    String::new()
                },
                if r.repository_id.as_ref() != Some(first_id) {
                    format!(
                        "  NOT A COPY (id {})",
                        r.repository_id.as_ref().map_or("?", |i| i.as_str())
                    )
                } else {
                    String::new()
                },
            );
            let _ = writeln!(out, "{}", line.trim_end());
        }
        out.push('\n');
    }

    fn render_backups(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "{:<18} {:>3}  {:<22}  {:<22}  {:>12}  {:>12}  {:>12}  pin",
            "backup", "tli", "start", "stop (consistent)", "size", "stored", "new"
        );
        for b in &self.backups {
            let _ = writeln!(
                out,
                "{:<18} {:>3}  {:<22}  {:<22}  {:>12}  {:>12}  {:>12}  {}",
                b.id,
                b.timeline,
                b.start_time,
                b.stop_time,
                human_bytes(b.logical_bytes),
                human_bytes(b.stored_bytes),
                human_bytes(b.new_bytes),
                if b.pinned { "pinned" } else { "" }
            );
        }
        out.push('\n');
    }

    fn render_timelines(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "{:<4} {:<7} {:<12}  {:<24}  {:<34}  wal",
            "tli", "parent", "switch lsn", "restorable from", "to just before"
        );
        for t in &self.timelines {
            let ranges: Vec<String> = t.wal.iter().map(|r| format!("{}..{}", r.first, r.last)).collect();
            let gaps = if ranges.len() > 1 {
                format!("  ({} gaps)", ranges.len() - 1)
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "{:<4} {:<7} {:<12}  {:<24}  {:<34}  {}{gaps}",
                t.timeline,
                t.parent.map_or("-".into(), |p| p.to_string()),
                t.switch_lsn.as_deref().unwrap_or("-"),
                t.restorable.as_ref().map_or("-", |r| r.earliest.as_str()),
                t.restorable
                    .as_ref()
                    .and_then(|r| r.latest_before.as_deref())
                    .unwrap_or("-"),
                if ranges.is_empty() {
                    "none".to_string()
                } else {
                    ranges.join(", ")
                }
            );
        }
    }

    fn render_drills(&self, out: &mut String) {
        if self.drills.is_empty() {
            return;
        }
        out.push('\n');
        let _ = writeln!(
            out,
            "{:<18} {:<7} {:>9} {:>9}  {:<18}  target",
            "drill", "outcome", "rto", "rpo", "backup"
        );
        let secs = |o: &Objective| {
            o.measured_seconds.map_or("-".to_string(), |s| {
                format!("{s:.1}s{}", if o.met { "" } else { "!" })
            })
        };
        for d in &self.drills {
            let _ = writeln!(
                out,
                "{:<18} {:<7} {:>9} {:>9}  {:<18}  {}{}",
                d.id,
                d.outcome,
                secs(&d.rto),
                secs(&d.rpo),
                d.backup.as_deref().unwrap_or("-"),
                d.target_time.as_deref().unwrap_or(&d.target),
                d.failure
                    .as_ref()
                    .map_or(String::new(), |f| format!("  FAILED: {f}"))
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::testing::{at, empty_catalog, manifest, nos, summary};
    use crate::report::{Format, to_string};
    use crate::wal::lsn::tl;

    fn catalog() -> Catalog {
        empty_catalog(7)
            .with_backups([manifest("20261123T101010Z", 1, 2, 1_763_892_610_000_000)])
            .with_pin(&"20261123T101010Z".parse().unwrap())
            .with_segments([(tl(1), nos(&[2, 3, 5]))].into())
            .with_summaries([(at(1, 3), summary(3, 1_763_892_700))])
    }

    #[test]
    fn info_text_has_a_line_per_backup_and_timeline() {
        let report = describe("file:///srv/repo".into(), &catalog(), None, vec![]);
        let text = to_string(&report, Format::Text);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("repository file:///srv/repo (PostgreSQL 15"),
            "{text}"
        );
        assert_eq!(lines[1], "");
        assert!(lines[2].starts_with("backup             tli  start"), "{text}");
        assert!(lines[3].starts_with("20261123T101010Z     1  "), "{text}");
        assert!(
            lines[3].ends_with("0 B           0 B           0 B  pinned"),
            "{text}"
        );
        assert_eq!(lines[4], "");
        assert!(lines[5].starts_with("tli  parent"), "{text}");
        assert!(
            lines[6].ends_with("000000010000000000000002..000000010000000000000003, 000000010000000000000005..000000010000000000000005  (1 gaps)"),
            "{text}"
        );
        assert_eq!(lines.len(), 7, "{text}");
    }

    #[test]
    fn two_copies_show_their_windows_side_by_side() {
        let mut report = describe("file:///srv/repo".into(), &catalog(), None, vec![]);
        let behind = describe(
            "s3://second/repo".into(),
            &empty_catalog(7).with_segments([(tl(1), nos(&[2, 3]))].into()),
            None,
            vec![],
        );
        let mut second = WindowRow::of(&behind);
        second.repository_id = Some(report.repository_id.clone());
        report.side_by_side = vec![WindowRow::of(&report), second];
        let text = to_string(&report, Format::Text);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[2].starts_with("copy              backups  newest backup"),
            "{text}"
        );
        assert!(
            lines[3].starts_with("file:///srv/repo        1  20261123T101010Z    000000010000000000000005"),
            "{text}"
        );
        assert!(
            lines[4].starts_with("s3://second/repo        0  -                   000000010000000000000003"),
            "{text}"
        );
        assert!(!text.contains("NOT A COPY"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&to_string(&report, Format::Json)).unwrap();
        assert_eq!(v["side_by_side"][1]["wal_to"], "000000010000000000000003");
        assert_eq!(v["side_by_side"][1]["backups"], 0);
        // A repository that is not a copy says so.
        report.side_by_side[1] = WindowRow::of(&behind);
        assert!(to_string(&report, Format::Text).contains("NOT A COPY"));
        // Alone, the report has no such table or field.
        let alone = describe("file:///srv/repo".into(), &catalog(), None, vec![]);
        assert!(!to_string(&alone, Format::Json).contains("side_by_side"));
    }

    #[test]
    fn info_json_keeps_its_fields() {
        let encryption = EncryptionInfo {
            cipher: "xchacha20poly1305".into(),
            chunk_ids: "keyed-blake3".into(),
            key: Kdf::Argon2id,
            wrapped_at: None,
        };
        let report = describe("file:///srv/repo".into(), &catalog(), Some(encryption), vec![]);
        let v: serde_json::Value = serde_json::from_str(&to_string(&report, Format::Json)).unwrap();
        assert_eq!(v["repository"], "file:///srv/repo");
        assert_eq!(v["encryption"]["key"], "argon2id");
        assert!(v["encryption"]["wrapped_at"].is_null());
        assert_eq!(v["backups"][0]["id"], "20261123T101010Z");
        assert_eq!(v["backups"][0]["pinned"], true);
        let t = &v["timelines"][0];
        assert_eq!(t["timeline"], 1);
        assert!(t["parent"].is_null());
        assert_eq!(t["wal"].as_array().unwrap().len(), 2);
        assert_eq!(t["wal"][0]["segments"], 2);
        assert!(t["restorable"]["earliest"].is_string(), "{t}");
        assert_eq!(t["restore_points"], serde_json::json!([]));
        assert_eq!(v["damaged"], serde_json::json!([]));
        assert_eq!(v["drills"], serde_json::json!([]));
        let text = to_string(&report, Format::Text);
        assert!(
            text.contains("encrypted: xchacha20poly1305, keyed chunk ids, key argon2id (wrapped at init)"),
            "{text}"
        );
    }
}
