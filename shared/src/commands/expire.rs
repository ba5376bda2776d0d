//! `archive-agent expire`, `pin` and `unpin`: the I/O around [`crate::retention`].
//!
//! Order of deletion, so that an expire cut off at any point leaves every kept backup restorable
//! and the next expire finishes the job: the plan only ever deletes what no kept backup needs;
//! manifests of expired backups go first (what they alone referenced is then garbage the next
//! plan finds again), then WAL and summaries, then chunks, and chunks only after
//! the lock protocol of [`crate::repo::locks`] has shown that no backup is relying on any.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::basebackup::BackupId;
use crate::catalog::{Catalog, CatalogError};
use crate::config::{ConfigError, RetentionSettings, Settings};
use crate::repo::layout::{self, Kind};
use crate::repo::locks::{self, Lock, LockError, LockKind};
use crate::repo::{RepoError, StoreError, Writer};
use crate::report::Report;
use crate::retention::{self, Policy, Reason};
use crate::wal::{SegmentName, TimelineId, WalFileName};

mod repack;
pub use repack::RepackReport;

#[derive(Debug, thiserror::Error)]
pub enum ExpireError {
    #[error(
        "no retention policy: set keep_last, keep_within or keep_daily/weekly/monthly/yearly in the [retention] table or pass --keep-last N, --keep-within 14d, ... (expire never guesses)"
    )]
    NoPolicy,
    #[error(
        "{key} ({what}) cannot be read: {reason}; expire cannot tell what it needs, so it deletes nothing (restore-agent verify lists every problem; remove the object by hand once you know the backup is lost)"
    )]
    Damaged {
        key: String,
        what: String,
        reason: String,
    },
    #[error("another expire is running ({0}); try again when it is done")]
    Busy(String),
    #[error("no backup {0} in the repository")]
    NoSuchBackup(BackupId),
    #[error(
        "this expire's lock went stale while it repacked: it stopped before writing the next manifest (every manifest names packs that are stored; the next expire goes on)"
    )]
    LockLost,
    #[error("cannot write backup {id}'s manifest again after a repack: {why}")]
    Rewrite { id: BackupId, why: String },
    #[error("a repack task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// A kept backup and why.
#[derive(Debug, Clone, Serialize)]
pub struct Kept {
    pub id: String,
    pub timeline: TimelineId,
    pub stop_time: String,
    pub reasons: Vec<Reason>,
}

/// What one kind of object lost.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Deleted {
    pub objects: u64,
    pub bytes: u64,
}

/// What an expire did (or, with `--dry-run`, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExpireReport {
    pub dry_run: bool,
    pub policy: String,
    pub kept: Vec<Kept>,
    pub expired: Vec<String>,
    /// The oldest backup of the point-in-time window: every instant from its consistency point to
    /// now stays restorable on the timelines descending from it.
    pub window_from: Option<String>,
    pub window_from_time: Option<String>,
    pub backups: Deleted,
    pub wal: Deleted,
    pub summaries: Deleted,
    pub chunks: Deleted,
    /// Packs no kept manifest lists (see [`crate::basebackup::pack`]).
    #[serde(default)]
    pub packs: Deleted,
    pub locks: Deleted,
    /// Why chunks were left for the next expire, when they were.
    pub deferred: Option<String>,
    /// The packs rewritten to reclaim their dead bytes; `None` when the expire deferred it.
    pub repack: Option<RepackReport>,
    /// Timelines kept whole because no history file says where they came from.
    pub unknown_timelines: Vec<TimelineId>,
}

impl ExpireReport {
    /// Bytes deleted (or to be deleted), all kinds.
    pub fn bytes(&self) -> u64 {
        [
            &self.backups,
            &self.wal,
            &self.summaries,
            &self.chunks,
            &self.packs,
        ]
        .iter()
        .map(|d| d.bytes)
        .sum()
    }
}

impl Report for ExpireReport {
    /// The human report: kept backups with their reasons, expired ones, and counts.
    fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let verb = if self.dry_run { "would delete" } else { "deleted" };
        let _ = writeln!(out, "policy: {}", self.policy);
        for k in &self.kept {
            let why: Vec<String> = k.reasons.iter().map(|r| r.to_string()).collect();
            let _ = writeln!(
                out,
                "keep    {}  timeline {:<3} consistent at {}  ({})",
                k.id,
                k.timeline,
                k.stop_time,
                why.join(", ")
            );
        }
        for id in &self.expired {
            let _ = writeln!(out, "expire  {id}");
        }
        if let (Some(id), Some(t)) = (&self.window_from, &self.window_from_time) {
            let _ = writeln!(
                out,
                "point-in-time window: every instant from {t} (backup {id}) to now stays restorable"
            );
        }
        if !self.unknown_timelines.is_empty() {
            let _ = writeln!(
                out,
                "kept whole (no history file tells their ancestry): timelines {:?}",
                self.unknown_timelines
            );
        }
        for (what, d) in [
            ("backups", &self.backups),
            ("WAL files", &self.wal),
            ("time index summaries", &self.summaries),
            ("chunks", &self.chunks),
            ("packs", &self.packs),
            ("stale locks", &self.locks),
        ] {
            let _ = writeln!(out, "{verb} {:>7} {what} ({} bytes)", d.objects, d.bytes);
        }
        if let Some(r) = &self.repack {
            r.render(&mut out, self.dry_run);
        }
        if let Some(why) = &self.deferred {
            let _ = writeln!(
                out,
                "WAL, summaries, chunks and packs left for the next expire: {why}"
            );
        }
        let _ = write!(out, "{verb} {} bytes in all", self.bytes());
        out
    }
}

/// `archive-agent expire`: the rules of `flags` (or, when it has none, of the `[retention]`
/// table) applied to the repository, with `now_us` as the clock.
pub async fn expire_repository(
    settings: &Settings,
    flags: &RetentionSettings,
    dry_run: bool,
    now_us: i64,
) -> Result<ExpireReport, ExpireError> {
    let policy = settings.retention.policy(flags)?;
    let writer = Writer::open_writable(&settings.repo, &settings.store_options()).await?;
    expire(&writer, &policy, dry_run, now_us).await
}

/// How long an expire waits for a pin being written.
const PIN_WAIT: Duration = Duration::from_secs(60);

/// Expire what `policy` does not keep. `now_us` is the clock the `keep_within` and calendar rules
/// are read against.
pub async fn expire(
    repo: &Writer,
    policy: &Policy,
    dry_run: bool,
    now_us: i64,
) -> Result<ExpireReport, ExpireError> {
    if policy.is_empty() {
        return Err(ExpireError::NoPolicy);
    }
    let lock = match dry_run {
        true => None,
        false => Some(
            Lock::take_yielding(
                repo.writable(),
                repo.sealer(),
                LockKind::Expire,
                "expire",
                LockKind::Pin,
                PIN_WAIT,
            )
            .await?,
        ),
    };
    // Two expires at once would delete the union of two plans: one steps aside.
    if let Some(held) = lock.as_ref() {
        let refusal = match held.live_other(LockKind::Expire).await {
            Ok(None) => None,
            Ok(Some((_, other))) => Some(ExpireError::Busy(other.describe())),
            Err(e) => Some(e.into()),
        };
        if let Some(refusal) = refusal {
            if let Some(held) = lock {
                held.release().await;
            }
            return Err(refusal);
        }
    }
    let result = run(repo, policy, lock.as_ref(), now_us).await;
    if let Some(lock) = lock {
        lock.release().await;
    }
    result
}

/// The expire itself, under `lock`; a dry run without one.
async fn run(
    repo: &Writer,
    policy: &Policy,
    lock: Option<&Lock>,
    now_us: i64,
) -> Result<ExpireReport, ExpireError> {
    let dry_run = lock.is_none();
    let reader = repo.reader();
    let store = repo.writable();
    // The time index is listed, not read: expire needs only which summaries exist.
    let cat = Catalog::load_listing(&reader).await?;
    refuse_damaged(&cat)?;
    let plan = retention::plan(policy, &cat, now_us);
    let mut report = ExpireReport::of_decisions(policy, &cat, &plan, dry_run);
    let expired: BTreeSet<&BackupId> = plan.expired().collect();
    let doomed = Doomed::counted(&cat, &plan, &expired, &mut report);
    if !dry_run {
        retire_backups(repo, policy, &plan, &doomed.manifests, &expired, now_us).await?;
    }

    // 3. WAL, summaries, chunks and packs: only when no backup is in progress (repo/locks.rs). A
    // running backup may rely on chunks and packs already stored (its own, and its base's), and waits for WAL from its start that
    // no finished backup needs yet. A backup that starts after this check yields to this
    // expire's lock until it is done.
    if !dry_run {
        let (stale, busy) = sweep_locks(repo).await?;
        report.locks = stale;
        if let Some(why) = busy {
            report.wal = Deleted::default();
            report.summaries = Deleted::default();
            report.deferred = Some(why);
            return Ok(report);
        }
        store.delete_many(&doomed.wal).await?;
        store.delete_many(&doomed.summaries).await?;
    }
    let current = match dry_run {
        true => cat.clone(),
        // Listed again; only manifests that appeared since are downloaded.
        false => Catalog::refresh_listing(&reader, &cat).await?,
    };
    refuse_damaged(&current)?;
    let garbage = unreferenced(repo, &current, &expired, &mut report).await?;
    if !dry_run {
        store.delete_many(&garbage).await?;
    }
    // 4. Packs mostly dead: their live chunks into new packs (repack.rs).
    let kept: Vec<&crate::basebackup::Manifest> = current
        .backups()
        .iter()
        .filter(|m| !expired.contains(&m.id))
        .collect();
    let max_dead = policy.max_dead.unwrap_or(retention::DEFAULT_MAX_DEAD);
    report.repack = Some(repack::repack(repo, &kept, max_dead, lock).await?);
    Ok(report)
}

impl ExpireReport {
    /// What the plan decided for each backup, before anything is deleted.
    fn of_decisions(policy: &Policy, cat: &Catalog, plan: &retention::Plan, dry_run: bool) -> ExpireReport {
        let mut report = ExpireReport {
            dry_run,
            policy: policy.describe(),
            unknown_timelines: plan.unknown_timelines.clone(),
            ..ExpireReport::default()
        };
        for (m, d) in cat.backups().iter().zip(&plan.decisions) {
            if d.kept() {
                report.kept.push(Kept {
                    id: m.id.to_string(),
                    timeline: m.timeline,
                    stop_time: crate::time::format_micros(m.stop_time_us),
                    reasons: d.reasons.iter().copied().collect(),
                });
            } else {
                report.expired.push(m.id.to_string());
            }
        }
        if let Some(w) = &plan.window_from
            && let Some(m) = cat.backup(w)
        {
            report.window_from = Some(w.to_string());
            report.window_from_time = Some(crate::time::format_micros(m.stop_time_us));
        }
        report
    }
}

/// The keys the plan deletes, by kind.
struct Doomed {
    /// Manifests of expired backups, then their relation maps.
    manifests: Vec<String>,
    wal: Vec<String>,
    summaries: Vec<String>,
}

impl Doomed {
    /// The keys of what the plan deletes, counted (objects and bytes) in `report`.
    fn counted(
        cat: &Catalog,
        plan: &retention::Plan,
        expired: &BTreeSet<&BackupId>,
        report: &mut ExpireReport,
    ) -> Doomed {
        // 1. Manifests (with any pin: an expired backup has none) of expired backups.
        let mut manifests: Vec<String> = expired.iter().map(|id| layout::manifest_key(id)).collect();
        // Relation maps go with their manifest (deleted after it: a manifest never lacks its map
        // through an expire cut off halfway).
        manifests.extend(expired.iter().map(|id| layout::relation_map_key(id)));
        report.backups = Deleted {
            objects: expired.len() as u64,
            bytes: expired
                .iter()
                .filter_map(|id| cat.manifest_size(id))
                .chain(expired.iter().filter_map(|id| cat.relation_map_size(id)))
                .sum(),
        };
        // 2. WAL and summaries (history files are never deleted: retention.rs).
        let wal_sizes: HashMap<&WalFileName, u64> =
            cat.wal_files().iter().map(|(n, size)| (n, *size)).collect();
        report.wal = Deleted {
            objects: plan.wal.len() as u64,
            bytes: plan.wal.iter().filter_map(|n| wal_sizes.get(n)).sum(),
        };
        let summary_sizes: HashMap<&SegmentName, u64> =
            cat.summary_files().iter().map(|(s, size)| (s, *size)).collect();
        report.summaries = Deleted {
            objects: plan.summaries.len() as u64,
            bytes: plan.summaries.iter().filter_map(|s| summary_sizes.get(s)).sum(),
        };
        Doomed {
            manifests,
            wal: plan.wal.iter().map(layout::wal_key).collect(),
            summaries: plan.summaries.iter().map(layout::summary_key).collect(),
        }
    }
}

/// Delete the expired backups' manifests and relation maps, after recording the decisions.
async fn retire_backups(
    repo: &Writer,
    policy: &Policy,
    plan: &retention::Plan,
    manifest_keys: &[String],
    expired: &BTreeSet<&BackupId>,
    now_us: i64,
) -> Result<(), ExpireError> {
    let store = repo.writable();
    // Recorded first: verify then knows which kept backups keep WAL to their consistency
    // point only, even if this expire is cut off halfway.
    let record = retention::RetentionRecord::new(policy, &plan.decisions, now_us);
    let json = serde_json::to_vec_pretty(&record).expect("a retention record serializes");
    store
        .put(
            layout::RETENTION_KEY,
            repo.sealer().seal_record(layout::RETENTION_KEY, json),
        )
        .await?;
    store.delete_many(manifest_keys).await?;
    for id in expired {
        tracing::info!(backup = %id, "expired");
    }
    Ok(())
}

/// The packs and chunks no backup kept in `current` refers to, and the relation maps of backups
/// that never wrote their manifest: their keys, counted in `report`.
async fn unreferenced(
    repo: &Writer,
    current: &Catalog,
    expired: &BTreeSet<&BackupId>,
    report: &mut ExpireReport,
) -> Result<Vec<String>, ExpireError> {
    let kept = || current.backups().iter().filter(|m| !expired.contains(&m.id));
    let referenced = retention::referenced_chunks(kept());
    let listed_packs = retention::referenced_packs(kept());
    let mut garbage = Vec::new();
    let packs = repo.store().list(Kind::Pack.dirname()).await?;
    unkept(
        packs,
        layout::parse_pack_key,
        |id| listed_packs.contains(id),
        &mut report.packs,
        &mut garbage,
    );
    let chunks = repo.store().list(Kind::Chunk.dirname()).await?;
    unkept(
        chunks,
        layout::parse_chunk_key,
        |id| referenced.contains(id),
        &mut report.chunks,
        &mut garbage,
    );
    // Relation maps of backups that never wrote their manifest (failed or cut off: none is in
    // progress, or this step would not run), counted with the backups.
    let with_manifest: BTreeSet<&BackupId> = current.backups().iter().map(|m| &m.id).collect();
    for (id, size) in current.relation_maps() {
        if !with_manifest.contains(id) && !expired.contains(id) {
            report.backups.bytes += size;
            garbage.push(layout::relation_map_key(id));
        }
    }
    Ok(garbage)
}

/// Each listed object that `parse` recognises and `keep` does not keep: counted in `deleted` and
/// added to `garbage`. A key `parse` does not recognise (a foreign object) is left alone.
fn unkept<T>(
    listing: Vec<(String, u64)>,
    parse: impl Fn(&str) -> Option<T>,
    keep: impl Fn(&T) -> bool,
    deleted: &mut Deleted,
    garbage: &mut Vec<String>,
) {
    for (key, size) in listing {
        if parse(&key).is_some_and(|id| !keep(&id)) {
            deleted.objects += 1;
            deleted.bytes += size;
            garbage.push(key);
        }
    }
}

fn refuse_damaged(cat: &Catalog) -> Result<(), ExpireError> {
    match cat.damaged().first() {
        Some(d) => Err(ExpireError::Damaged {
            key: d.key.clone(),
            what: d.what.clone(),
            reason: d.reason.clone(),
        }),
        None => Ok(()),
    }
}

/// One listing of the locks, made after this expire's own lock was written and judged by the
/// clock now (not the one the plan was made with): stale locks are removed (a backup that comes
/// back after this sees its lock gone and records nothing), and the reason to leave WAL,
/// summaries and chunks alone is returned: a live backup lock, or a lock that cannot be read.
async fn sweep_locks(repo: &Writer) -> Result<(Deleted, Option<String>), StoreError> {
    let now_us = crate::time::now_micros();
    let found = locks::list(repo.store(), repo.sealer()).await?;
    let stale: Vec<String> = found
        .iter()
        .filter(|f| f.record.as_ref().is_some_and(|r| !r.live(now_us)))
        .map(|f| f.key.clone())
        .collect();
    for key in &stale {
        tracing::warn!("removing the stale lock {key}");
    }
    repo.writable().delete_many(&stale).await?;
    let busy = found.iter().find_map(|f| match &f.record {
        Some(r) if r.kind == LockKind::Backup && r.live(now_us) => {
            Some(format!("{} is in progress", r.describe()))
        }
        Some(_) => None,
        None => Some(format!(
            "lock {} cannot be read (remove it if no walvault process is running)",
            f.key
        )),
    });
    let stale = Deleted {
        objects: stale.len() as u64,
        bytes: 0,
    };
    Ok((stale, busy))
}

/// `backups/<id>/pinned.json`, version 1.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinRecord {
    pub format: String,
    pub version: u32,
    pub pinned_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Pin backup `id`: no expire deletes it until it is unpinned.
pub async fn pin(repo: &Writer, id: &BackupId, note: Option<String>) -> Result<(), ExpireError> {
    set_pin(repo, id, Some(note)).await
}

/// Remove backup `id`'s pin (the next expire applies the policy to it).
pub async fn unpin(repo: &Writer, id: &BackupId) -> Result<(), ExpireError> {
    set_pin(repo, id, None).await
}

async fn set_pin(repo: &Writer, id: &BackupId, pin: Option<Option<String>>) -> Result<(), ExpireError> {
    // Yields to a running expire: it may be deleting this very backup.
    let lock = Lock::take_yielding(
        repo.writable(),
        repo.sealer(),
        LockKind::Pin,
        &format!("pin {id}"),
        LockKind::Expire,
        Duration::from_secs(30 * 60),
    )
    .await?;
    let result = async {
        if repo.store().size(&layout::manifest_key(id)).await?.is_none() {
            return Err(ExpireError::NoSuchBackup(id.clone()));
        }
        let key = layout::pin_key(id);
        match pin {
            Some(note) => {
                let record = PinRecord {
                    format: "walvault-pin".into(),
                    version: 1,
                    pinned_at: crate::time::format_micros(crate::time::now_micros()),
                    note,
                };
                let json = serde_json::to_vec_pretty(&record).expect("a pin serializes");
                repo.writable()
                    .put(&key, repo.sealer().seal_record(&key, json))
                    .await?;
            }
            None => repo.writable().delete(&key).await?,
        }
        Ok(())
    }
    .await;
    lock.release().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_v1_fixture_still_parses() {
        let r: PinRecord =
            serde_json::from_slice(include_bytes!("../../tests/fixtures/pin-v1.json")).unwrap();
        assert_eq!((r.format.as_str(), r.version), ("walvault-pin", 1));
        assert_eq!(r.note.as_deref(), Some("quarter-end"));
    }
}
