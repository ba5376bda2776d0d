//! `restore-agent restore`: rebuild a data directory from a base backup and configure PostgreSQL
//! to replay the archive up to a recovery target. Starting PostgreSQL on the directory completes
//! the point-in-time recovery.
//!
//! Everything that can be refused is refused before the first byte is written: an unknown
//! timeline, a target no backup can reach, a non-empty directory, an unsafe manifest. The
//! manifest is treated as hostile (anyone who can write to the repository writes it): it is
//! validated in full ([`Manifest::validate`], [`check_before_writing`]) before anything is created.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backup::BackupId;
use crate::backup::chunk::ChunkError;
use crate::backup::manifest::{self, EntryKind, Manifest, ManifestError};
use crate::catalog::{Catalog, CatalogError};
use crate::config::Settings;
use crate::progress::RecoveryPlan;
use crate::recovery_conf::{self, RecoverySettings};
use crate::repo::object::{ObjectError, ObjectKind, Sealer};
use crate::repo::{Store, StoreError};
use crate::time;
use crate::wal::{Lsn, SegmentName, TimelineId};

mod delta;
mod scatter;

pub use delta::DeltaReport;

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// Replay everything archived (the default).
    End,
    /// Stop as soon as the backup is consistent.
    Immediate,
    /// Unix microseconds.
    Time(i64),
    Lsn(Lsn),
    Xid(u64),
    Name(String),
}

/// `recovery_target_timeline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimelineTarget {
    Latest,
    Current,
    Id(u32),
}

/// `recovery_target_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetAction {
    Promote,
    Pause,
    Shutdown,
}

impl TargetAction {
    fn as_str(self) -> &'static str {
        match self {
            TargetAction::Promote => "promote",
            TargetAction::Pause => "pause",
            TargetAction::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub pgdata: PathBuf,
    pub backup: Option<BackupId>,
    pub target: RecoveryTarget,
    pub timeline: TimelineTarget,
    pub action: TargetAction,
    pub exclusive: bool,
    pub force: bool,
    /// Restore over the existing directory, rewriting only what differs ([`delta`]).
    pub delta: bool,
    pub parallel: usize,
    /// The `restore_command` line to write (restore-agent fetch with the same repository settings).
    pub restore_command: String,
    /// Where each tablespace goes; see [`TablespacePlan`].
    pub tablespaces: TablespacePlan,
}

/// Where tablespaces are restored. Their locations come from the manifest, which a restore must
/// not trust to write outside the new data directory: the DBA chooses, explicitly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TablespacePlan {
    /// `--tablespace-map OID=DIR`.
    pub map: std::collections::BTreeMap<u32, PathBuf>,
    /// `--tablespace-map-all DIR`: every other tablespace to `DIR/<oid>`.
    pub all_under: Option<PathBuf>,
    /// `--tablespace-original`: every other tablespace to its location on the source.
    pub original: bool,
}

/// The `restore_command` a restored server runs: `restore_agent fetch` with the settings this
/// process uses: the repository, and the configuration file (absolute, so it holds from the data
/// directory) that may carry the store's credentials, which therefore never appear in
/// `postgresql.auto.conf`.
pub fn restore_command_line(
    restore_agent: &Path,
    settings: &Settings,
    config: Option<&Path>,
    retry_timeout: Option<&str>,
) -> std::io::Result<String> {
    use crate::cli::sh_quote;
    let mut line = String::new();
    // A key file named by the environment is named the same way on the line (a path, never the
    // key). A key command from the environment is not copied: it may hold a token, and
    // PostgreSQL logs restore_command.
    if let (Some(path), Some(crate::repo::keys::KeySource::File(_))) = (
        std::env::var_os("WALVAULT_ENCRYPTION_KEY_FILE").filter(|v| !v.is_empty()),
        &settings.key,
    ) {
        let path = std::path::absolute(PathBuf::from(path))?;
        line.push_str(&format!(
            "WALVAULT_ENCRYPTION_KEY_FILE={} ",
            sh_quote(&path.display().to_string())
        ));
    } else if std::env::var_os("WALVAULT_ENCRYPTION_KEY_COMMAND").is_some_and(|v| !v.is_empty()) {
        eprintln!(
            "note: the key command comes from WALVAULT_ENCRYPTION_KEY_COMMAND, which restore_command does not copy: give the restored server the same variable, or put key_command in the [encryption] table of --config"
        );
    }
    line.push_str(&format!(
        "{} fetch --repo {}",
        sh_quote(&restore_agent.display().to_string()),
        sh_quote(settings.repo.as_str())
    ));
    if let Some(config) = config {
        let config = std::path::absolute(config)?;
        line.push_str(&format!(" --config {}", sh_quote(&config.display().to_string())));
    }
    if let Some(t) = retry_timeout {
        line.push_str(&format!(" --retry-timeout {}", sh_quote(t)));
    }
    line.push_str(" %f %p");
    Ok(line)
}

/// The `--parallel` a restore uses when none is given, by kind of store: chunks fetched and
/// written at once (each up to a chunk in memory, twice: sealed and opened).
///
/// Measured with `walvault-restore-parallel --scale 20 --repeat 3` (tests/src/bin; a pgbench
/// scale-20 backup: 976 files, 321 MiB, 642 distinct chunks) on a 2-core machine, stores on
/// loopback; median seconds by `--parallel` 1/2/4/8/16/32/64:
/// - file://: 2.39 / 1.93 / 1.51 / 1.42 / 0.94 / 1.00 / 0.98: flat from 16;
/// - S3 (Garage): 19.1 / 8.91 / 4.99 / 3.05 / 1.95 / 1.53 / 1.36: latency-bound, 32 gets within
///   12% of 64 with half the memory;
/// - Azure (Azurite): 4.35 / 2.78 / 1.86 / 1.94 / 1.72-2.61 / 1.50 / 1.42: likewise.
///
/// GCS is not measured here; it is an HTTP object store like the other two.
pub fn default_parallel(location: &crate::repo::url::RepoLocation) -> usize {
    use crate::repo::url::RepoLocation;
    match location {
        RepoLocation::Local(_) => 16,
        RepoLocation::S3 { .. } | RepoLocation::Azure { .. } | RepoLocation::Gcs { .. } => 32,
    }
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    pub backup: BackupId,
    /// PostgreSQL major version of the backup: the server that must recover it.
    pub pg_version: u32,
    pub files: u64,
    /// Bytes written into files.
    pub bytes: u64,
    /// Distinct chunks fetched from the repository: each once, however many positions share it.
    pub chunks_fetched: u64,
    /// Their bytes, decompressed.
    pub bytes_fetched: u64,
    pub timeline: String,
    pub target: String,
    /// With `--delta`: what was compared, rewritten and removed.
    pub delta: Option<DeltaReport>,
    /// The segments replay goes through, as far as the repository tells.
    pub replay: Option<ReplaySpan>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Repository(#[from] crate::repo::RepoError),
    #[error("restoring chunk data: {0}")]
    Chunk(#[from] ChunkError),
    #[error(
        "{dir} belongs to a running PostgreSQL (postmaster.pid names live process {pid}); stop it before restoring over it"
    )]
    ServerRunning { dir: String, pid: u32 },
    #[error("{0} is not empty; restore into an empty directory, or pass --force to replace its contents")]
    NotEmpty(String),
    #[error(
        "{dir} does not look like {what}: --delta only rewrites one; restore into an empty directory instead"
    )]
    NotRestorable { dir: String, what: &'static str },
    #[error(
        "{source}\n{dir} is left incomplete (its global/pg_control was removed, so no server starts on it): run the same restore --delta again"
    )]
    Incomplete { dir: String, source: Box<RestoreError> },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("timeline {0} is unknown to the repository (known: {1})")]
    UnknownTimeline(u32, String),
    #[error("backup {0} is not in the repository")]
    UnknownBackup(BackupId),
    #[error("backup {backup} is damaged and cannot be restored ({reason}); choose another backup")]
    Damaged { backup: BackupId, reason: String },
    #[error("backup {backup} is not on the history of timeline {timeline}")]
    BackupNotOnTimeline { backup: BackupId, timeline: u32 },
    #[error("no backup can reach {target}: {window}")]
    OutsideWindow { target: String, window: String },
    #[error("the repository holds no backup yet; take one with archive-agent backup")]
    NoBackups,
    #[error("the repository holds no usable backup: {0}")]
    OnlyDamaged(String),
    #[error("corrupt repository: {0}")]
    Corrupt(String),
    #[error(
        "backup {backup} has tablespaces ({list}); choose where they go: --tablespace-map OID=DIR, --tablespace-map-all DIR, or --tablespace-original"
    )]
    TablespacesUnplaced { backup: BackupId, list: String },
    #[error("tablespace {oid} cannot go to {path}: {why}")]
    TablespaceLocation {
        oid: u32,
        path: String,
        why: &'static str,
    },
    #[error("backup {backup}: {source}")]
    Manifest {
        backup: BackupId,
        source: Box<ManifestError>,
    },
    #[error("backup {backup}: entry {entry:?} is refused: {why}")]
    Refused {
        backup: BackupId,
        entry: String,
        why: String,
    },
}

/// The text of a target, as PostgreSQL's recovery settings spell it.
fn target_settings(t: &RecoveryTarget) -> Option<(&'static str, String)> {
    match t {
        RecoveryTarget::End => None,
        RecoveryTarget::Immediate => Some(("recovery_target", "immediate".into())),
        RecoveryTarget::Time(us) => Some(("recovery_target_time", time::format_micros(*us))),
        RecoveryTarget::Lsn(l) => Some(("recovery_target_lsn", l.to_string())),
        RecoveryTarget::Xid(x) => Some(("recovery_target_xid", x.to_string())),
        RecoveryTarget::Name(n) => Some(("recovery_target_name", n.clone())),
    }
}

fn describe(t: &RecoveryTarget) -> String {
    match target_settings(t) {
        None => "the end of the archive".into(),
        Some((k, v)) => format!("{k} = '{v}'"),
    }
}

/// Pick the timeline recovery will follow.
pub fn resolve_timeline(cat: &Catalog, wanted: TimelineTarget, backup_tli: u32) -> Result<u32, RestoreError> {
    let known = cat.timeline_ids();
    match wanted {
        TimelineTarget::Latest => Ok(cat.timelines.latest().max(known.last().copied().unwrap_or(1))),
        TimelineTarget::Current => Ok(backup_tli),
        TimelineTarget::Id(n) if known.contains(&n) || n == 1 => Ok(n),
        TimelineTarget::Id(n) => Err(RestoreError::UnknownTimeline(
            n,
            known.iter().map(u32::to_string).collect::<Vec<_>>().join(", "),
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
) -> Result<(&'a Manifest, u32), RestoreError> {
    if let Some(id) = wanted
        && let Some(d) = cat.damaged.iter().find(|d| d.backup.as_ref() == Some(id))
    {
        return Err(RestoreError::Damaged {
            backup: id.clone(),
            reason: d.reason.clone(),
        });
    }
    if cat.backups.is_empty() {
        let damaged: Vec<String> = cat
            .damaged
            .iter()
            .filter(|d| d.backup.is_some())
            .map(|d| format!("{} is damaged: {}", d.what, d.reason))
            .collect();
        return Err(match damaged.is_empty() {
            true => RestoreError::NoBackups,
            false => RestoreError::OnlyDamaged(damaged.join("; ")),
        });
    }
    // An explicitly unknown timeline is reported as such, before anything else.
    if let TimelineTarget::Id(_) = timeline {
        resolve_timeline(cat, timeline, 1)?;
    }
    let candidates: Vec<(&Manifest, u32)> = cat
        .backups
        .iter()
        .rev()
        .filter(|m| wanted.is_none_or(|id| &m.id == id))
        .filter_map(|m| {
            let tli = resolve_timeline(cat, timeline, m.timeline).ok()?;
            cat.on_history(m, tli).then_some((m, tli))
        })
        .collect();
    if let Some(id) = wanted {
        if !cat.backups.iter().any(|m| &m.id == id) {
            return Err(RestoreError::UnknownBackup(id.clone()));
        }
        if candidates.is_empty() {
            let tli = resolve_timeline(cat, timeline, 0)?;
            return Err(RestoreError::BackupNotOnTimeline {
                backup: id.clone(),
                timeline: tli,
            });
        }
    }
    let outside = |tli: u32, why: &str| RestoreError::OutsideWindow {
        target: format!("{} on timeline {tli}", describe(target)),
        window: format!("{why}; {}", window_text(cat, tli)),
    };
    let have_index = !cat.summaries.is_empty();
    let mut refusal = None;
    for (m, tli) in candidates {
        let chain = cat.chain(m, tli);
        let stop_no = m.stop_lsn.0.saturating_sub(1) / u64::from(cat.wal_segment_size());
        if !chain.iter().any(|&(_, no)| no >= stop_no) {
            refusal.get_or_insert_with(|| {
                outside(
                    tli,
                    &format!("WAL up to {} is missing from the archive", m.stop_wal),
                )
            });
            continue;
        }
        let fits = match target {
            RecoveryTarget::Time(us) => {
                if m.stop_time_us > *us {
                    refusal.get_or_insert_with(|| {
                        outside(tli, "the target is before every backup's consistency point")
                    });
                    continue;
                }
                match cat.latest_commit(&chain) {
                    // PostgreSQL stops at the first transaction end past the target: one must exist.
                    Some(latest) if *us >= latest && cat.index_complete(&chain) => {
                        return Err(outside(tli, "the target is after the last archived transaction"));
                    }
                    // No transaction end at all in the WAL from this backup: nothing PostgreSQL
                    // could stop at (it would fail with "recovery ended before the target").
                    None if cat.index_complete(&chain) => {
                        refusal.get_or_insert_with(|| {
                            outside(tli, "no transaction was archived after this backup")
                        });
                        continue;
                    }
                    _ => true,
                }
            }
            RecoveryTarget::Lsn(l) => {
                if m.stop_lsn > *l {
                    refusal.get_or_insert_with(|| {
                        outside(tli, "the target is before every backup's consistency point")
                    });
                    continue;
                }
                if *l > cat.chain_end(&chain) {
                    return Err(outside(tli, "the target is past the end of the archived WAL"));
                }
                true
            }
            RecoveryTarget::Name(n) if have_index => {
                let found = cat
                    .restore_points(&chain)
                    .iter()
                    .any(|(name, lsn, _)| name == n && *lsn >= m.stop_lsn);
                if !found {
                    refusal.get_or_insert_with(|| {
                        let known: Vec<String> = cat
                            .restore_points(&chain)
                            .into_iter()
                            .map(|(n, _, _)| n)
                            .collect();
                        outside(
                            tli,
                            &format!(
                                "no restore point {n:?} after a backup (known: {})",
                                known.join(", ")
                            ),
                        )
                    });
                }
                found
            }
            _ => true,
        };
        if fits {
            return Ok((m, tli));
        }
    }
    Err(refusal.unwrap_or_else(|| {
        outside(
            resolve_timeline(cat, timeline, 1).unwrap_or(1),
            "no backup is on this timeline's history",
        )
    }))
}

/// The WAL segments a recovery replays, as far as the repository can tell before PostgreSQL
/// starts: from the backup's start to the segment where the target is reached, or to the newest
/// segment archived on the timeline's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplaySpan {
    pub first: SegmentName,
    pub last: SegmentName,
    /// `last` is the end of the archive at restore time, not the target's segment: the target is
    /// the end of the archive or a transaction id, or the time index cannot place it.
    pub last_is_upper_bound: bool,
    /// Segments from `first` to `last`, both included, counted by LSN.
    pub segments: u64,
}

/// Where replay from backup `m`, following `timeline`, reaches `target`, by the catalog
/// [`choose_backup`] chose the backup with: a time in the first segment whose summary records a
/// transaction end past it (PostgreSQL stops at the first one, in WAL order); an LSN in its
/// segment; a restore point in the segment of its record; `immediate` in the segment where the
/// backup became consistent. Otherwise, the last segment of the backup's chain.
pub fn replay_span(
    cat: &Catalog,
    m: &Manifest,
    timeline: u32,
    target: &RecoveryTarget,
    exclusive: bool,
) -> Option<ReplaySpan> {
    let size = cat.wal_segment_size();
    let seg_bytes = u64::from(size);
    let name = |no: u64| {
        let tli = TimelineId::new(cat.timeline_of_segment(timeline, no))?;
        Some(SegmentName::containing(
            tli,
            Lsn(no.checked_mul(seg_bytes)?),
            size,
        ))
    };
    let first_no = m.start_lsn.0 / seg_bytes;
    let first = SegmentName::containing(TimelineId::new(m.timeline)?, m.start_lsn, size);
    let chain = cat.chain(m, timeline);
    let end_no = chain.last().map(|&(_, no)| no)?;
    let passes = |t: i64, target: i64| if exclusive { t >= target } else { t > target };
    let exact = match target {
        RecoveryTarget::Time(us) => chain
            .iter()
            .find(|k| {
                cat.summaries
                    .get(k)
                    .and_then(|s| s.max_commit?.to_unix_micros())
                    .is_some_and(|t| passes(t, *us))
            })
            .map(|&(_, no)| no),
        RecoveryTarget::Lsn(l) => Some(l.0 / seg_bytes),
        RecoveryTarget::Name(n) => cat
            .restore_points(&chain)
            .into_iter()
            .find(|(name, lsn, _)| name == n && *lsn >= m.stop_lsn)
            .map(|(_, lsn, _)| lsn.0 / seg_bytes),
        RecoveryTarget::Immediate => Some(m.stop_lsn.0.saturating_sub(1) / seg_bytes),
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
        segments: last_no - first_no + 1,
    })
}

/// The restorable window of a timeline, for error messages.
fn window_text(cat: &Catalog, tli: u32) -> String {
    match cat.window(tli) {
        Some(w) => format!("timeline {tli} is {}", w.describe()),
        None => format!("timeline {tli} has no restorable window (no backup with its WAL archived)"),
    }
}

/// Decide and check each tablespace's location before anything is written: absolute, no `..`,
/// neither inside the new data directory nor containing it, and empty or absent (even with
/// `--force`: a tablespace location is never wiped; with `--delta` it is rewritten, once
/// [`delta`] has checked it holds a tablespace).
fn place_tablespaces(
    m: &Manifest,
    opts: &RestoreOptions,
) -> Result<std::collections::BTreeMap<u32, PathBuf>, RestoreError> {
    let plan = &opts.tablespaces;
    // Compared as absolute, lexically normalized paths: `--pgdata data` and `..` must not hide
    // an overlap.
    let pgdata = normalize(&std::path::absolute(&opts.pgdata).map_err(write_err(&opts.pgdata))?);
    let mut out = std::collections::BTreeMap::new();
    let unplaced: Vec<String> = m
        .tablespaces
        .iter()
        .filter(|t| !plan.map.contains_key(&t.oid) && plan.all_under.is_none() && !plan.original)
        .map(|t| format!("{} at {}", t.oid, t.location))
        .collect();
    if !unplaced.is_empty() {
        let mut list = unplaced.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
        if unplaced.len() > 10 {
            list.push_str(&format!(" and {} more", unplaced.len() - 10));
        }
        return Err(RestoreError::TablespacesUnplaced {
            backup: m.id.clone(),
            list,
        });
    }
    for t in &m.tablespaces {
        let path = match (plan.map.get(&t.oid), &plan.all_under) {
            (Some(p), _) => p.clone(),
            (None, Some(dir)) => dir.join(t.oid.to_string()),
            (None, None) => PathBuf::from(&t.location),
        };
        let bad = |why| RestoreError::TablespaceLocation {
            oid: t.oid,
            path: path.display().to_string(),
            why,
        };
        if !path.is_absolute()
            || path
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(bad("not an absolute path without '..'"));
        }
        if path.as_os_str().len() > manifest::MAX_PATH_LEN {
            return Err(bad("it is longer than PATH_MAX"));
        }
        let path = normalize(&path);
        if path.starts_with(&pgdata) || pgdata.starts_with(&path) {
            return Err(bad("it overlaps the new data directory"));
        }
        if !opts.delta && !is_empty_dir(&path)? {
            return Err(bad(
                "it is not empty (tablespace locations are never overwritten, even with --force)",
            ));
        }
        if out.values().any(|p: &PathBuf| p == &path) {
            return Err(bad("two tablespaces cannot share a location"));
        }
        if out
            .values()
            .any(|p: &PathBuf| p.starts_with(&path) || path.starts_with(p))
        {
            return Err(bad("it overlaps another tablespace's location"));
        }
        out.insert(t.oid, path);
    }
    Ok(out)
}

/// `p` without `.` and `..` components, resolved lexically (`p` is absolute).
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// Where entry `rel` goes: tablespace contents to their chosen location (`pg_tblspc/<oid>`
/// itself is recreated by PostgreSQL from `tablespace_map`), everything else under `pgdata`.
fn destination(pgdata: &Path, spaces: &std::collections::BTreeMap<u32, PathBuf>, rel: &str) -> PathBuf {
    if let Some((oid, rest)) = manifest::tablespace_part(rel)
        && let Some(location) = spaces.get(&oid)
    {
        return match rest {
            Some(rest) => location.join(rest),
            None => location.clone(),
        };
    }
    pgdata.join(rel)
}

/// The temporary names restore writes its own files under ([`crate::fsutil::write_durably`]).
/// (Entries named like the files themselves are refused by [`Manifest::validate`].)
fn temp_names() -> Vec<String> {
    let pid = std::process::id();
    [
        "backup_label",
        "tablespace_map",
        "postgresql.auto.conf",
        "recovery.signal",
        crate::progress::PLAN_FILE,
    ]
    .iter()
    .map(|n| format!(".{n}.walvault-{pid}.tmp"))
    .collect()
}

/// The checks of a backup's manifest that depend on the restore: run after the tablespaces are
/// placed and before anything is written. The manifest is validated again in full (it normally
/// was when the catalog loaded it), then: it belongs to the repository's cluster, every
/// destination fits in PATH_MAX, and no entry collides with a temporary file restore writes.
/// Returns the bytes the files add up to.
pub fn check_before_writing(
    cat: &Catalog,
    m: &Manifest,
    opts: &RestoreOptions,
    spaces: &std::collections::BTreeMap<u32, PathBuf>,
) -> Result<u64, RestoreError> {
    m.validate().map_err(|source| RestoreError::Manifest {
        backup: m.id.clone(),
        source: Box::new(source),
    })?;
    let refuse = |entry: &str, why: String| RestoreError::Refused {
        backup: m.id.clone(),
        entry: entry.chars().take(200).collect(),
        why,
    };
    // A backup's WAL binds the repository before its manifest is written: no cluster, no backup.
    let sysid = cat.cluster.map_or(0, |c| c.system_identifier);
    if m.system_identifier != sysid {
        return Err(RestoreError::Manifest {
            backup: m.id.clone(),
            source: Box::new(ManifestError::Implausible(format!(
                "it is a backup of system {}, the repository holds system {sysid}",
                m.system_identifier
            ))),
        });
    }
    let temp = temp_names();
    let mut total = 0u64;
    for e in &m.entries {
        let first = e.path.split('/').next().unwrap_or_default();
        if temp.iter().any(|t| t == first) {
            return Err(refuse(
                &e.path,
                format!("restore writes its own files through {first}"),
            ));
        }
        let dest = destination(&opts.pgdata, spaces, &e.path);
        if dest.as_os_str().len() > manifest::MAX_PATH_LEN {
            return Err(refuse(
                &e.path,
                format!(
                    "its destination would be {} bytes long, more than PATH_MAX",
                    dest.as_os_str().len()
                ),
            ));
        }
        // validate() bounded the sum.
        total += e.size;
    }
    Ok(total)
}

fn is_empty_dir(p: &Path) -> Result<bool, RestoreError> {
    match std::fs::read_dir(p) {
        Ok(mut it) => Ok(it.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(RestoreError::Write {
            path: p.display().to_string(),
            source: e,
        }),
    }
}

fn write_err(p: &Path) -> impl Fn(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Write {
        path: p.display().to_string(),
        source,
    }
}

/// Told how a restore advances (a progress bar on a terminal).
pub trait Progress: Send + Sync {
    fn start(&self, total_bytes: u64);
    fn advance(&self, bytes: u64);
}

/// No progress reporting.
#[derive(Debug)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: u64) {}
    fn advance(&self, _: u64) {}
}

/// Restore a backup into `opts.pgdata` and write the recovery settings.
pub async fn restore(
    settings: &Settings,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreReport, RestoreError> {
    let repo = crate::repo::Reader::open(&settings.repo, &settings.store_options()).await?;
    let cat = Catalog::load(&repo).await?;
    restore_from(settings, &repo, &cat, opts, progress).await
}

/// [`restore`] from a repository already open and its catalog already read (a drill has read
/// both to plan its target).
pub async fn restore_from(
    settings: &Settings,
    repo: &crate::repo::Reader,
    cat: &Catalog,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreReport, RestoreError> {
    let store = repo.store().clone();
    let (manifest, timeline) = choose_backup(cat, opts.backup.as_ref(), &opts.target, opts.timeline)?;
    if let Some(pid) = running_postmaster(&opts.pgdata) {
        return Err(RestoreError::ServerRunning {
            dir: opts.pgdata.display().to_string(),
            pid,
        });
    }
    if !opts.force && !opts.delta && !is_empty_dir(&opts.pgdata)? {
        return Err(RestoreError::NotEmpty(opts.pgdata.display().to_string()));
    }
    let spaces = place_tablespaces(manifest, opts)?;
    let total_bytes = check_before_writing(cat, manifest, opts, &spaces)?;
    // Delta: every comparison before the first write.
    let delta = match opts.delta {
        true => Some(delta::plan(repo.sealer(), manifest, &opts.pgdata, &spaces).await?),
        false => None,
    };
    let replay = replay_span(cat, manifest, timeline, &opts.target, opts.exclusive);
    let plan = replay.as_ref().map(|span| RecoveryPlan {
        format: crate::progress::PLAN_FORMAT.into(),
        version: crate::progress::FORMAT_VERSION,
        repository: settings.repo.to_string(),
        backup: manifest.id.to_string(),
        wal_segment_size: cat.wal_segment_size(),
        first_segment: span.first.to_string(),
        last_segment: span.last.to_string(),
        last_is_upper_bound: span.last_is_upper_bound,
        target: describe(&opts.target),
        timeline,
        created_at_us: time::now_micros(),
        data_directory_id: None,
    });

    // Checks passed: write. On failure, remove what was written: a half-restored directory
    // must never be mistaken for a restore.
    let created = !opts.pgdata.exists();
    let targets: Vec<PathBuf> = std::iter::once(opts.pgdata.clone())
        .chain(spaces.values().cloned())
        .collect();
    if opts.force && !opts.delta {
        clear_dir(&opts.pgdata)?;
    }
    progress.start(delta.as_ref().map_or(total_bytes, |d| d.bytes_to_write(manifest)));
    let is_delta = delta.is_some();
    let written = match write_backup(
        &store,
        repo.sealer(),
        opts,
        manifest,
        &spaces,
        timeline,
        delta,
        progress,
    )
    .await
    {
        Ok(done) => write_plan(opts, plan).map(|()| done),
        Err(e) => Err(e),
    };
    // A failed delta restore changed a directory the DBA kept: it is left (and cannot start);
    // a failed full restore removes what it wrote.
    let written = match written {
        Err(e) if is_delta && !matches!(e, RestoreError::NotRestorable { .. }) => {
            return Err(RestoreError::Incomplete {
                dir: opts.pgdata.display().to_string(),
                source: Box::new(e),
            });
        }
        w => w,
    };
    if written.is_err() {
        for t in &targets {
            if let Err(e) = clear_dir(t) {
                tracing::warn!("cleaning up after the failed restore: {e}");
            }
        }
        if created {
            let _ = std::fs::remove_dir(&opts.pgdata);
        }
    }
    let Written {
        files,
        bytes,
        scattered,
        delta,
    } = written?;
    Ok(RestoreReport {
        backup: manifest.id.clone(),
        pg_version: manifest.pg_version,
        files,
        bytes,
        chunks_fetched: scattered.chunks_fetched,
        bytes_fetched: scattered.bytes_fetched,
        timeline: match opts.timeline {
            TimelineTarget::Latest => format!("latest (currently {timeline})"),
            TimelineTarget::Current => format!("current ({timeline})"),
            TimelineTarget::Id(n) => n.to_string(),
        },
        target: describe(&opts.target),
        delta,
        replay,
    })
}

/// Write the replay plan (`walvault-recovery.json`) into the restored directory, which
/// `restore-agent fetch` counts its progress against.
fn write_plan(opts: &RestoreOptions, plan: Option<RecoveryPlan>) -> Result<(), RestoreError> {
    let Some(mut plan) = plan else { return Ok(()) };
    // The directory exists for good now: the plan names it by device and inode, so that a copy
    // of it (pg_basebackup of the restored server) does not count against this plan.
    plan.data_directory_id = crate::progress::files::data_directory_id(&opts.pgdata);
    crate::progress::files::write_plan(&opts.pgdata, &plan)
        .map_err(write_err(&crate::progress::files::plan_path(&opts.pgdata)))
}

/// Remove everything inside `dir` (which may not exist).
fn clear_dir(dir: &Path) -> Result<(), RestoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(write_err(dir)(e)),
    };
    for e in entries {
        let p = e.map_err(write_err(dir))?.path();
        let r = if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(write_err(&p))?;
    }
    Ok(())
}

/// Write the backup's directories and files (over the existing ones with a `delta` plan), then
/// the recovery files.
#[allow(clippy::too_many_arguments)]
async fn write_backup(
    store: &Store,
    sealer: &Sealer,
    opts: &RestoreOptions,
    manifest: &Manifest,
    spaces: &std::collections::BTreeMap<u32, PathBuf>,
    timeline: u32,
    delta: Option<delta::DeltaPlan>,
    progress: Arc<dyn Progress>,
) -> Result<Written, RestoreError> {
    let dest_of = |rel: &str| destination(&opts.pgdata, spaces, rel);
    let (fill, delta) = match delta {
        Some(plan) => {
            let (fill, report) = delta::apply(plan, manifest, &opts.pgdata, spaces)?;
            (fill, Some(report))
        }
        None => {
            create_dir(&opts.pgdata, 0o700)?;
            // Entries are sorted, so a directory comes before what it holds. A parent the
            // manifest does not list is created 0700 (validation made sure no entry goes through
            // a file).
            for e in manifest.entries.iter().filter(|e| e.kind == EntryKind::Dir) {
                let dest = dest_of(&e.path);
                create_parent(&dest)?;
                create_dir(&dest, e.mode)?;
            }
            (lay_out(manifest, &dest_of)?, None)
        }
    };
    let files = manifest
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .count() as u64;
    let scattered = scatter::fill(store, sealer, fill, manifest.chunk_size, opts.parallel, progress).await?;

    write_recovery_files(opts, manifest, spaces, timeline)?;
    // Files were fsynced as they completed; their names live in the directories. Without
    // syncing those, a crash right after "restored" could leave files missing.
    let mut dirs: Vec<PathBuf> = manifest
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::Dir)
        .map(|e| dest_of(&e.path))
        .collect();
    dirs.push(opts.pgdata.clone());
    dirs.extend(spaces.values().cloned());
    dirs.extend(opts.pgdata.parent().map(Path::to_path_buf));
    for d in dirs {
        crate::fsutil::sync_dir(&d).map_err(write_err(&d))?;
    }
    Ok(Written {
        files,
        bytes: scattered.bytes_written,
        scattered,
        delta,
    })
}

/// What writing a backup's files did.
#[derive(Debug, Clone)]
struct Written {
    files: u64,
    bytes: u64,
    scattered: scatter::Scattered,
    delta: Option<DeltaReport>,
}

/// Create every file of the backup at its final size (sparse until its chunks land), and list
/// the chunk references to write into them.
fn lay_out(manifest: &Manifest, dest_of: &dyn Fn(&str) -> PathBuf) -> Result<scatter::Fill, RestoreError> {
    let mut fill = scatter::Fill::default();
    for e in manifest.entries.iter().filter(|e| e.kind == EntryKind::File) {
        let dest = dest_of(&e.path);
        create_parent(&dest)?;
        create_sized(&dest, e.size)?;
        add_refs(&mut fill, e, 0..e.chunks.len(), manifest.chunk_size);
        if e.path == PG_CONTROL {
            fill.last = Some(fill.files.len());
        }
        fill.files.push((dest, e.mode));
    }
    Ok(fill)
}

/// The file a server cannot start without, written last (see [`scatter::Fill::last`]).
const PG_CONTROL: &str = "global/pg_control";

/// Add chunks `which` of file entry `e` (the next file of `fill`) to `fill`'s references.
fn add_refs(
    fill: &mut scatter::Fill,
    e: &manifest::Entry,
    which: impl Iterator<Item = usize>,
    chunk_size: u64,
) {
    let file = fill.files.len();
    for idx in which {
        let offset = idx as u64 * chunk_size;
        // validate() checked the chunk count against the size: offset < size.
        let len = chunk_size.min(e.size - offset);
        fill.refs.push((file, idx as u64, e.chunks[idx].clone(), len));
    }
}

/// Create `path` (never following or replacing something already there) at `size` bytes.
fn create_sized(path: &Path, size: u64) -> Result<(), RestoreError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(write_err(path))?;
    file.set_len(size).map_err(write_err(path))
}

/// The pid in `pgdata/postmaster.pid` when that process is alive: a running server owns the
/// directory, and restoring over it would corrupt both.
pub(crate) fn running_postmaster(pgdata: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    // A single-user backend writes its pid negated.
    let pid: i64 = text.lines().next()?.trim().parse().ok()?;
    let pid = u32::try_from(pid.unsigned_abs()).ok()?;
    (pid > 0 && Path::new("/proc").join(pid.to_string()).exists()).then_some(pid)
}

/// Read chunk `id`, which the manifest says holds `expected` bytes of `path`, and verify it. The
/// header's length is compared before decompressing, so a hostile chunk object cannot make the
/// restore allocate more than the chunk size (times `--parallel`).
async fn fetch_chunk(
    store: &Store,
    sealer: &Sealer,
    id: &str,
    expected: u64,
    path: &Path,
    cpu: &tokio::sync::Semaphore,
) -> Result<Vec<u8>, RestoreError> {
    let key = crate::backup::chunk::chunk_key(id)?;
    let bytes = store
        .get(&key)
        .await?
        .ok_or_else(|| ChunkError::Missing { id: id.to_string() })?;
    let corrupt = |source| ChunkError::Corrupt {
        id: id.to_string(),
        source: Box::new(source),
    };
    let header = sealer.read_header(&bytes).map_err(corrupt)?;
    if header.original_len != expected {
        return Err(RestoreError::Corrupt(format!(
            "chunk {id} of {} holds {} bytes, the manifest says {expected}",
            path.display(),
            header.original_len
        )));
    }
    let (id_owned, sealer) = (id.to_string(), sealer.clone());
    // Decompressing and hashing is the CPU's share: `--parallel` chunks at once.
    let _cpu = cpu.acquire().await.expect("semaphore is never closed");
    let (header, content) =
        tokio::task::spawn_blocking(move || sealer.open(&bytes, ObjectKind::Chunk, &id_owned))
            .await
            .expect("chunk decoding panicked")
            .map_err(corrupt)?;
    // The header hash matched the content; the content must also be what the id names.
    if header.blake3_hex() != id {
        return Err(corrupt(ObjectError::ContentHash {
            expected: id.to_string(),
            found: header.blake3_hex(),
        })
        .into());
    }
    Ok(content)
}

/// Create the missing parents of `p`, 0700.
fn create_parent(p: &Path) -> Result<(), RestoreError> {
    use std::os::unix::fs::DirBuilderExt;
    match p.parent() {
        Some(parent) if !parent.is_dir() => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(write_err(parent)),
        _ => Ok(()),
    }
}

fn create_dir(p: &Path, mode: u32) -> Result<(), RestoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode & 0o7777)
        .create(p)
    {
        Ok(()) => {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode & 0o7777)).map_err(write_err(p))
        }
        Err(e) => Err(write_err(p)(e)),
    }
}

/// `tablespace_map` as PostgreSQL writes and reads it: `<oid> <path>` lines, with `\\`, `\n` and
/// `\r` in the path escaped by a backslash.
fn tablespace_map(spaces: &std::collections::BTreeMap<u32, PathBuf>) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut map = Vec::new();
    for (oid, p) in spaces {
        map.extend_from_slice(format!("{oid} ").as_bytes());
        for &b in p.as_os_str().as_bytes() {
            if matches!(b, b'\\' | b'\n' | b'\r') {
                map.push(b'\\');
            }
            map.push(b);
        }
        map.push(b'\n');
    }
    map
}

/// backup_label, tablespace_map, recovery settings and recovery.signal.
fn write_recovery_files(
    opts: &RestoreOptions,
    m: &Manifest,
    spaces: &std::collections::BTreeMap<u32, PathBuf>,
    timeline: u32,
) -> Result<(), RestoreError> {
    let write = |name: &str, content: &[u8]| {
        let p = opts.pgdata.join(name);
        crate::fsutil::write_durably(&p, content).map_err(write_err(&p))
    };
    write("backup_label", m.backup_label.as_bytes())?;
    // tablespace_map pointing at the chosen locations: PostgreSQL recreates pg_tblspc/<oid> as a
    // link to each. Never the manifest's own map: its locations are the source's, and links to
    // them would let recovery write wherever a hostile manifest says.
    if !spaces.is_empty() {
        write("tablespace_map", &tablespace_map(spaces))?;
    }
    let auto = opts.pgdata.join("postgresql.auto.conf");
    let existing = std::fs::read_to_string(&auto).ok();
    let settings = RecoverySettings {
        restore_command: opts.restore_command.clone(),
        target: target_settings(&opts.target),
        inclusive: !opts.exclusive,
        action: opts.action.as_str(),
        timeline: match opts.timeline {
            TimelineTarget::Latest => "latest".to_string(),
            TimelineTarget::Current => "current".to_string(),
            TimelineTarget::Id(_) => timeline.to_string(),
        },
    };
    let header = format!("Added by walvault: restore of backup {}", m.id);
    let conf = recovery_conf::render(existing.as_deref(), &header, &settings);
    write("postgresql.auto.conf", conf.as_bytes())?;
    let _ = std::fs::remove_file(opts.pgdata.join("standby.signal"));
    // Durable: write_durably syncs the data directory, and write_backup syncs every directory.
    write("recovery.signal", b"")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::backup::manifest::{Entry, Tablespace};

    const SYSID: u64 = 7_441_234_567_890_123_456;

    fn fixture() -> Manifest {
        Manifest::parse(include_bytes!("../tests/fixtures/manifest-v1.json")).unwrap()
    }

    fn catalog(sysid: u64) -> Catalog {
        crate::catalog::testing::empty_catalog(sysid)
    }

    fn options(pgdata: &Path) -> RestoreOptions {
        RestoreOptions {
            pgdata: pgdata.to_path_buf(),
            backup: None,
            target: RecoveryTarget::End,
            timeline: TimelineTarget::Latest,
            action: TargetAction::Promote,
            exclusive: false,
            force: false,
            delta: false,
            parallel: 1,
            restore_command: "true".into(),
            tablespaces: TablespacePlan::default(),
        }
    }

    fn with_tablespace(location: &str) -> Manifest {
        let mut m = fixture();
        m.tablespaces = vec![Tablespace {
            oid: 16400,
            location: location.into(),
        }];
        m.entries.push(Entry {
            path: "pg_tblspc/16400".into(),
            kind: EntryKind::Dir,
            mode: 0o700,
            size: 0,
            chunks: vec![],
        });
        m
    }

    /// A repository in memory that counts the requests it serves, holding the chunks of `files`
    /// (path, content) cut at `chunk_size`, and a manifest of them (under `base/1`).
    async fn stored_backup(
        files: &[(&str, Vec<u8>)],
        chunk_size: u64,
    ) -> (Arc<crate::repo::fault::FaultStore>, Store, Sealer, Manifest) {
        stored_backup_sealed(files, chunk_size, Sealer::plain()).await
    }

    /// [`stored_backup`] sealed by `sealer` (an encrypted repository's names chunks by a keyed
    /// hash).
    async fn stored_backup_sealed(
        files: &[(&str, Vec<u8>)],
        chunk_size: u64,
        sealer: Sealer,
    ) -> (Arc<crate::repo::fault::FaultStore>, Store, Sealer, Manifest) {
        use crate::backup::chunk::{chunk_id, seal_chunk, upload};
        use crate::repo::fault::{Fault, FaultStore};
        use crate::repo::store::{CreateSemantics, WritableStore};
        let faults = Arc::new(FaultStore::new(Fault::None));
        let writable = WritableStore::with_backend(
            Arc::clone(&faults) as Arc<dyn object_store::ObjectStore>,
            "s3://bucket/repo".parse().unwrap(),
            CreateSemantics::CheckThenWrite,
            crate::retry::RetryPolicy::with_total(std::time::Duration::from_secs(5)),
        );
        let mut m = fixture();
        m.chunk_size = chunk_size;
        m.entries = ["base", "base/1"]
            .iter()
            .map(|d| Entry {
                path: d.to_string(),
                kind: EntryKind::Dir,
                mode: 0o700,
                size: 0,
                chunks: vec![],
            })
            .collect();
        for (name, content) in files {
            let mut chunks = vec![];
            for piece in content.chunks(chunk_size as usize) {
                let hash = sealer.content_hash(piece);
                let sealed = seal_chunk(&sealer, hash, piece, 1).unwrap();
                upload(&writable, &hash, sealed).await.unwrap();
                chunks.push(chunk_id(&sealer, piece));
            }
            m.entries.push(Entry {
                path: format!("base/1/{name}"),
                kind: EntryKind::File,
                mode: 0o600,
                size: content.len() as u64,
                chunks,
            });
        }
        m.entries.sort_by(|a, b| a.path.cmp(&b.path));
        m.validate().unwrap();
        (faults, writable.reader(), sealer, m)
    }

    #[tokio::test]
    async fn each_distinct_chunk_is_fetched_once_however_often_it_is_referenced() {
        const CS: usize = 4096;
        let zero = vec![0u8; CS];
        let other = vec![7u8; CS];
        let page = [zero.clone(), other.clone(), zero.clone()].concat();
        let files = [
            // Zeroed pages, an identical copy, and a short tail.
            ("16384", page.clone()),
            ("16385", page.clone()),
            ("16386", [zero.clone(), vec![9u8; 100]].concat()),
            ("16387", vec![]),
        ];
        let (faults, store, sealer, m) = stored_backup(&files, CS as u64).await;
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(&dir.path().join("data"));
        opts.parallel = 3;
        let before = faults.requests();
        let written = write_backup(
            &store,
            &sealer,
            &opts,
            &m,
            &BTreeMap::new(),
            1,
            None,
            Arc::new(NoProgress),
        )
        .await
        .unwrap();
        assert_eq!(
            faults.requests() - before,
            3,
            "one GET per distinct chunk (zeroes, sevens, the tail), not one per reference (8)"
        );
        assert_eq!(written.scattered.chunks_fetched, 3);
        assert_eq!(written.scattered.bytes_fetched, 2 * CS as u64 + 100);
        assert_eq!(written.files, 4);
        let total: usize = files.iter().map(|(_, c)| c.len()).sum();
        assert_eq!(written.bytes, total as u64);
        for (name, content) in &files {
            let path = opts.pgdata.join("base/1").join(name);
            assert_eq!(&std::fs::read(&path).unwrap(), content, "{name}");
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
                0o600
            );
        }
    }

    #[tokio::test]
    async fn delta_rewrites_only_what_differs_and_never_writes_through_a_link() {
        delta_case(Sealer::plain()).await;
    }

    /// In an encrypted repository chunk ids are keyed hashes: the delta must compare with the
    /// same hash, or it would fetch every chunk.
    #[tokio::test]
    async fn delta_in_an_encrypted_repository_compares_with_the_keyed_hash() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "ab".repeat(32)).unwrap();
        let repo_id = crate::repo::RepoId::try_from("0123456789abcdef0123456789abcdef".to_string()).unwrap();
        let (keys, _) =
            crate::repo::keys::RepoKeys::generate(&crate::repo::keys::KeySource::File(key), &repo_id, None)
                .unwrap();
        delta_case(Sealer::encrypted(keys)).await;
    }

    async fn delta_case(sealer: Sealer) {
        const CS: usize = 4096;
        let a = [vec![1u8; CS], vec![2u8; CS], vec![3u8; 10]].concat();
        let b = vec![4u8; 100];
        let files = [("16384", a.clone()), ("16385", b.clone())];
        let (faults, store, sealer, m) = stored_backup_sealed(&files, CS as u64, sealer).await;
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(&dir.path().join("data"));
        let none = BTreeMap::new();
        write_backup(&store, &sealer, &opts, &m, &none, 1, None, Arc::new(NoProgress))
            .await
            .unwrap();
        let data = opts.pgdata.clone();
        // The old directory diverged: a chunk of 16384 changed and the file grew, 16385 is now
        // a link out of the directory, and files and a directory the backup lacks appeared.
        let mut changed = a.clone();
        changed[CS + 5] = 99;
        changed.extend_from_slice(b"appended");
        std::fs::write(data.join("base/1/16384"), &changed).unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"precious").unwrap();
        std::fs::remove_file(data.join("base/1/16385")).unwrap();
        std::os::unix::fs::symlink(&outside, data.join("base/1/16385")).unwrap();
        std::fs::write(data.join("PG_VERSION"), b"15\n").unwrap();
        std::fs::create_dir_all(data.join("junk/deeper")).unwrap();
        std::fs::write(data.join("junk/deeper/x"), b"x").unwrap();

        opts.delta = true;
        let delta_write = |plan| {
            let (store, sealer, opts, m, none) = (&store, &sealer, &opts, &m, &none);
            async move {
                write_backup(store, sealer, opts, m, none, 1, Some(plan), Arc::new(NoProgress))
                    .await
                    .unwrap()
            }
        };
        let before = faults.requests();
        let plan = delta::plan(&sealer, &m, &data, &none).await.unwrap();
        assert_eq!(
            faults.requests(),
            before,
            "planning reads the directory, not the store"
        );
        let written = delta_write(plan).await;
        assert_eq!(
            faults.requests() - before,
            2,
            "the changed chunk of 16384 and the chunk of 16385, nothing else"
        );
        let report = written.delta.unwrap();
        assert_eq!(report.files_checked, 1);
        assert_eq!(report.files_created, 1);
        assert_eq!(report.chunks_rewritten, 2);
        // 16385's link, PG_VERSION, junk/, and the recovery files of the first restore (written
        // afresh).
        assert_eq!(report.removed, 6, "{report:?}");
        assert_eq!(std::fs::read(data.join("base/1/16384")).unwrap(), a);
        assert!(
            std::fs::symlink_metadata(data.join("base/1/16385"))
                .unwrap()
                .is_file()
        );
        assert_eq!(std::fs::read(data.join("base/1/16385")).unwrap(), b);
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
        assert!(!data.join("junk").exists());
        assert!(data.join("recovery.signal").exists() && data.join("backup_label").exists());

        // Restoring again over the restored directory (the data directory PostgreSQL would
        // have: this backup has no PG_VERSION) fetches nothing.
        std::fs::write(data.join("PG_VERSION"), b"15\n").unwrap();
        let before = faults.requests();
        let plan = delta::plan(&sealer, &m, &data, &none).await.unwrap();
        let written = delta_write(plan).await;
        assert_eq!(faults.requests(), before);
        assert_eq!(written.delta.unwrap().files_unchanged, 2);
    }

    #[tokio::test]
    async fn delta_refuses_a_directory_that_is_not_a_data_directory() {
        let (_, _, sealer, m) = stored_backup(&[("1", vec![1])], 4096).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
        let err = delta::plan(&sealer, &m, dir.path(), &BTreeMap::new())
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("does not look like a PostgreSQL data directory"),
            "{err}"
        );
        assert_eq!(std::fs::read(dir.path().join("notes.txt")).unwrap(), b"mine");
    }

    #[test]
    fn the_replay_span_ends_where_the_target_is_reached() {
        use crate::catalog::testing::{SEG, manifest, summary};
        use crate::timeline::TimelineHistory;
        // Timeline 2 branched from 1 in segment 5; segments 2..=7 on 1, 5..=9 on 2; one
        // transaction end per segment, at 1000 + n seconds on 1 and 2000 + n on 2.
        let mut cat = catalog(1);
        cat.timelines
            .insert(TimelineHistory::parse(TimelineId::new(2).unwrap(), b"1\t0/5000100\tx\n").unwrap());
        for no in 2..=7 {
            cat.summaries.insert((1, no), summary(no, 1000 + no as i64));
        }
        for no in 5..=9 {
            cat.summaries.insert((2, no), summary(no, 2000 + no as i64));
        }
        cat.segments = BTreeMap::from([(1, (2..=7).collect()), (2, (5..=9).collect())]);
        let m = manifest("20261121T100000Z", 1, 2, 900_000_000);
        let span = |cat: &Catalog, tli, target: RecoveryTarget, exclusive| {
            let s = replay_span(cat, &m, tli, &target, exclusive).unwrap();
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
        cat.summaries.insert((2, 6), with_point);
        assert_eq!(
            span(&cat, 2, RecoveryTarget::Name("rp1".into()), false).1,
            "000000020000000000000006"
        );
        assert!(span(&cat, 2, RecoveryTarget::Name("nope".into()), false).2);
    }

    #[test]
    fn tablespace_map_is_escaped_as_postgres_reads_it() {
        let spaces = BTreeMap::from([
            (16400, PathBuf::from("/srv/ts1")),
            (16401, PathBuf::from("/srv/odd\nname\\x")),
        ]);
        assert_eq!(
            tablespace_map(&spaces),
            b"16400 /srv/ts1\n16401 /srv/odd\\\nname\\\\x\n".to_vec()
        );
    }

    #[test]
    fn only_a_declared_tablespace_goes_to_its_location() {
        let spaces = BTreeMap::from([(16400, PathBuf::from("/srv/ts1"))]);
        let pgdata = Path::new("/restore/data");
        let dest = |rel| destination(pgdata, &spaces, rel);
        assert_eq!(dest("pg_tblspc/16400"), PathBuf::from("/srv/ts1"));
        assert_eq!(
            dest("pg_tblspc/16400/PG_15/1/2"),
            PathBuf::from("/srv/ts1/PG_15/1/2")
        );
        // Other spellings of the oid, and undeclared oids, stay in the data directory.
        assert_eq!(dest("pg_tblspc/016400/x"), pgdata.join("pg_tblspc/016400/x"));
        assert_eq!(dest("pg_tblspc/+16400/x"), pgdata.join("pg_tblspc/+16400/x"));
        assert_eq!(dest("pg_tblspc/16500/x"), pgdata.join("pg_tblspc/16500/x"));
    }

    #[test]
    fn tablespace_locations_may_not_overlap_anything() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = std::env::current_dir().unwrap();
        // A relative --pgdata is compared as the absolute path it names.
        let mut opts = options(Path::new("data"));
        opts.tablespaces.original = true;
        let inside = cwd.join("data/ts");
        let err = place_tablespaces(&with_tablespace(inside.to_str().unwrap()), &opts).unwrap_err();
        assert!(
            err.to_string().contains("overlaps the new data directory"),
            "{err}"
        );
        // So is one spelled with `..`.
        opts.pgdata = PathBuf::from("elsewhere/../data");
        let err = place_tablespaces(&with_tablespace(inside.to_str().unwrap()), &opts).unwrap_err();
        assert!(
            err.to_string().contains("overlaps the new data directory"),
            "{err}"
        );
        // A location holding the data directory.
        opts.pgdata = PathBuf::from("data");
        let err = place_tablespaces(&with_tablespace(cwd.to_str().unwrap()), &opts).unwrap_err();
        assert!(
            err.to_string().contains("overlaps the new data directory"),
            "{err}"
        );

        // Two tablespaces, one inside the other.
        let mut m = with_tablespace(dir.path().join("a").to_str().unwrap());
        m.tablespaces.push(Tablespace {
            oid: 16401,
            location: dir.path().join("a/b").display().to_string(),
        });
        let mut opts = options(&dir.path().join("data"));
        opts.tablespaces.original = true;
        let err = place_tablespaces(&m, &opts).unwrap_err();
        assert!(err.to_string().contains("overlaps another tablespace"), "{err}");
    }

    #[test]
    fn pre_write_checks_refuse_with_the_backup_and_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(&dir.path().join("data"));
        let none = BTreeMap::new();
        let m = fixture();
        assert_eq!(
            check_before_writing(&catalog(SYSID), &m, &opts, &none).unwrap(),
            8192
        );

        let err = check_before_writing(&catalog(SYSID + 1), &m, &opts, &none).unwrap_err();
        assert!(err.to_string().starts_with("backup 20261121T143200Z: "), "{err}");
        assert!(err.to_string().contains("the repository holds system"), "{err}");

        // A manifest built in memory (never parsed) is validated all the same.
        let mut bad = fixture();
        bad.entries[1].path = "base/../../etc/passwd".into();
        let err = check_before_writing(&catalog(SYSID), &bad, &opts, &none).unwrap_err();
        assert!(err.to_string().contains("'..' component"), "{err}");

        // A destination past PATH_MAX, though the relative path is within it.
        let mut long = fixture();
        long.entries[1].path = format!("base/{}", vec!["d".repeat(200); 20].join("/"));
        let deep = options(&dir.path().join("x".repeat(200)).join("y".repeat(200)));
        let err = check_before_writing(&catalog(SYSID), &long, &deep, &none).unwrap_err();
        assert!(err.to_string().contains("more than PATH_MAX"), "{err}");
        assert!(
            err.to_string()
                .starts_with("backup 20261121T143200Z: entry \"base/ddd"),
            "{err}"
        );

        // The temporary name restore writes backup_label under.
        let mut clash = fixture();
        clash.entries.insert(
            0,
            Entry {
                path: format!(".backup_label.walvault-{}.tmp", std::process::id()),
                kind: EntryKind::File,
                mode: 0o600,
                size: 0,
                chunks: vec![],
            },
        );
        let err = check_before_writing(&catalog(SYSID), &clash, &opts, &none).unwrap_err();
        assert!(err.to_string().contains("restore writes its own files"), "{err}");
        assert!(!dir.path().join("data").exists(), "nothing was written");
    }
}
