//! `restore-agent restore`: rebuild a data directory from a base backup and configure PostgreSQL
//! to replay the archive up to a recovery target. Starting PostgreSQL on the directory completes
//! the point-in-time recovery.
//!
//! Everything that can be refused is refused before the first byte is written: an unknown
//! timeline, a target no backup can reach, a non-empty directory, an unsafe manifest.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::backup::BackupId;
use crate::backup::chunk::{self, ChunkError};
use crate::backup::manifest::{EntryKind, Manifest};
use crate::catalog::{Catalog, CatalogError};
use crate::config::Settings;
use crate::repo::store::Access;
use crate::repo::{Store, StoreError};
use crate::time;
use crate::wal::Lsn;

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

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    pub backup: BackupId,
    pub files: u64,
    pub bytes: u64,
    pub timeline: String,
    pub target: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("restoring chunk data: {0}")]
    Chunk(#[from] ChunkError),
    #[error("{0} is not empty; restore into an empty directory, or pass --force to replace its contents")]
    NotEmpty(String),
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("timeline {0} is unknown to the repository (known: {1})")]
    UnknownTimeline(u32, String),
    #[error("backup {0} is not in the repository")]
    UnknownBackup(BackupId),
    #[error("backup {backup} is not on the history of timeline {timeline}")]
    BackupNotOnTimeline { backup: BackupId, timeline: u32 },
    #[error("no backup can reach {target}: {window}")]
    OutsideWindow { target: String, window: String },
    #[error("the repository holds no backup yet; take one with archive-agent backup")]
    NoBackups,
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

/// Quote a value for postgresql.conf.
fn conf_quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
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
    if cat.backups.is_empty() {
        return Err(RestoreError::NoBackups);
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
        let stop_no = m.stop_lsn.0.saturating_sub(1) / u64::from(cat.descriptor.cluster.wal_segment_size);
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

/// The restorable window of a timeline, for error messages.
fn window_text(cat: &Catalog, tli: u32) -> String {
    match cat.window(tli) {
        Some(w) => format!("timeline {tli} is {}", w.describe()),
        None => format!("timeline {tli} has no restorable window (no backup with its WAL archived)"),
    }
}

/// Decide and check each tablespace's location before anything is written: absolute, no `..`,
/// neither inside the new data directory nor containing it, and empty or absent (even with
/// `--force`: a tablespace location is never wiped).
fn place_tablespaces(
    m: &Manifest,
    opts: &RestoreOptions,
) -> Result<std::collections::BTreeMap<u32, PathBuf>, RestoreError> {
    let plan = &opts.tablespaces;
    let mut out = std::collections::BTreeMap::new();
    let unplaced: Vec<String> = m
        .tablespaces
        .iter()
        .filter(|t| !plan.map.contains_key(&t.oid) && plan.all_under.is_none() && !plan.original)
        .map(|t| format!("{} at {}", t.oid, t.location))
        .collect();
    if !unplaced.is_empty() {
        return Err(RestoreError::TablespacesUnplaced {
            backup: m.id.clone(),
            list: unplaced.join(", "),
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
        if path.starts_with(&opts.pgdata) || opts.pgdata.starts_with(&path) {
            return Err(bad("it overlaps the new data directory"));
        }
        if !is_empty_dir(&path)? {
            return Err(bad(
                "it is not empty (tablespace locations are never overwritten, even with --force)",
            ));
        }
        if out.values().any(|p: &PathBuf| p == &path) {
            return Err(bad("two tablespaces cannot share a location"));
        }
        out.insert(t.oid, path);
    }
    Ok(out)
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
    let store = settings.open_store(Access::ReadOnly)?;
    let cat = Catalog::load(&store).await?;
    let (manifest, timeline) = choose_backup(&cat, opts.backup.as_ref(), &opts.target, opts.timeline)?;
    if !opts.force && !is_empty_dir(&opts.pgdata)? {
        return Err(RestoreError::NotEmpty(opts.pgdata.display().to_string()));
    }
    let spaces = place_tablespaces(manifest, opts)?;

    // Checks passed: write. On failure, remove what was written: a half-restored directory
    // must never be mistaken for a restore.
    let created = !opts.pgdata.exists();
    let targets: Vec<PathBuf> = std::iter::once(opts.pgdata.clone())
        .chain(spaces.values().cloned())
        .collect();
    if opts.force {
        clear_dir(&opts.pgdata)?;
    }
    progress.start(manifest.stats.logical_bytes);
    let written = write_backup(&store, opts, manifest, &spaces, timeline, progress).await;
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
    let (files, bytes) = written?;
    Ok(RestoreReport {
        backup: manifest.id.clone(),
        files,
        bytes,
        timeline: match opts.timeline {
            TimelineTarget::Latest => format!("latest (currently {timeline})"),
            TimelineTarget::Current => format!("current ({timeline})"),
            TimelineTarget::Id(n) => n.to_string(),
        },
        target: describe(&opts.target),
    })
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

/// Write the backup's directories and files, then the recovery files. Returns (files, bytes).
async fn write_backup(
    store: &Store,
    opts: &RestoreOptions,
    manifest: &Manifest,
    spaces: &std::collections::BTreeMap<u32, PathBuf>,
    timeline: u32,
    progress: Arc<dyn Progress>,
) -> Result<(u64, u64), RestoreError> {
    create_dir(&opts.pgdata, 0o700)?;
    let dest_of = |rel: &str| -> PathBuf {
        // Tablespace contents go back to their location; pg_tblspc/<oid> itself is recreated
        // by PostgreSQL from tablespace_map.
        let mut parts = rel.splitn(3, '/');
        if let (Some("pg_tblspc"), Some(oid), rest) = (parts.next(), parts.next(), parts.next())
            && let Some(location) = oid.parse::<u32>().ok().and_then(|oid| spaces.get(&oid))
        {
            return match rest {
                Some(rest) => location.join(rest),
                None => location.clone(),
            };
        }
        opts.pgdata.join(rel)
    };
    for e in manifest.entries.iter().filter(|e| e.kind == EntryKind::Dir) {
        create_dir(&dest_of(&e.path), e.mode)?;
    }
    // Chunks, not files, are the unit of parallelism, so one large relation file restores as
    // fast as many small ones; `parallel` bounds the chunks in memory.
    let permits = Arc::new(Semaphore::new(opts.parallel.max(1)));
    let mut tasks: JoinSet<Result<u64, RestoreError>> = JoinSet::new();
    let (mut files, mut bytes) = (0u64, 0u64);
    for e in manifest.entries.iter().filter(|e| e.kind == EntryKind::File) {
        files += 1;
        let file = Arc::new(OutFile::create(dest_of(&e.path), e.mode, e.chunks.len())?);
        if e.chunks.is_empty() {
            file.finish()?;
        }
        for (idx, id) in e.chunks.iter().enumerate() {
            let permit = Arc::clone(&permits)
                .acquire_owned()
                .await
                .expect("semaphore is never closed");
            let offset = idx as u64 * manifest.chunk_size;
            let expected = manifest.chunk_size.min(e.size - offset);
            let (store, id, file, progress) = (
                store.clone(),
                id.clone(),
                Arc::clone(&file),
                Arc::clone(&progress),
            );
            tasks.spawn(async move {
                let data = chunk::get_chunk(&store, &id).await?;
                if data.len() as u64 != expected {
                    return Err(RestoreError::Corrupt(format!(
                        "chunk {id} of {} holds {} bytes, the manifest says {expected}",
                        file.path.display(),
                        data.len()
                    )));
                }
                let len = data.len() as u64;
                progress.advance(len);
                tokio::task::spawn_blocking(move || {
                    file.write_at(&data, offset)?;
                    drop(permit);
                    file.chunk_done()
                })
                .await
                .expect("write task panicked")?;
                Ok(len)
            });
            while let Some(done) = tasks.try_join_next() {
                bytes += done.expect("restore task panicked")?;
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        bytes += done.expect("restore task panicked")?;
    }

    write_recovery_files(opts, manifest, spaces, timeline)?;
    Ok((files, bytes))
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

/// A file being restored: chunks are written at their offsets in any order; the last one to
/// land fsyncs the file and sets its mode.
struct OutFile {
    path: PathBuf,
    file: std::fs::File,
    mode: u32,
    remaining: std::sync::atomic::AtomicUsize,
}

impl OutFile {
    fn create(path: PathBuf, mode: u32, chunks: usize) -> Result<OutFile, RestoreError> {
        // create_new: never follow or replace something already there.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(write_err(&path))?;
        Ok(OutFile {
            path,
            file,
            mode,
            remaining: chunks.into(),
        })
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), RestoreError> {
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(data, offset)
            .map_err(write_err(&self.path))
    }

    fn chunk_done(&self) -> Result<(), RestoreError> {
        if self.remaining.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            self.finish()?;
        }
        Ok(())
    }

    fn finish(&self) -> Result<(), RestoreError> {
        use std::os::unix::fs::PermissionsExt;
        self.file.sync_all().map_err(write_err(&self.path))?;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(self.mode & 0o7777))
            .map_err(write_err(&self.path))
    }
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
    // tablespace_map as pg_backup_stop returned it, but pointing at the chosen locations:
    // PostgreSQL recreates pg_tblspc/<oid> from it.
    if !spaces.is_empty() {
        let map: String = spaces
            .iter()
            .map(|(oid, p)| format!("{oid} {}\n", p.display()))
            .collect();
        write("tablespace_map", map.as_bytes())?;
    } else if let Some(map) = &m.tablespace_map {
        write("tablespace_map", map.as_bytes())?;
    }
    let mut conf = String::new();
    let auto = opts.pgdata.join("postgresql.auto.conf");
    if let Ok(existing) = std::fs::read_to_string(&auto) {
        conf.push_str(&existing);
        if !conf.ends_with('\n') {
            conf.push('\n');
        }
    }
    conf.push_str(&format!("# Added by walvault: restore of backup {}\n", m.id));
    conf.push_str(&format!(
        "restore_command = {}\n",
        conf_quote(&opts.restore_command)
    ));
    if let Some((key, value)) = target_settings(&opts.target) {
        conf.push_str(&format!("{key} = {}\n", conf_quote(&value)));
        conf.push_str(&format!("recovery_target_action = '{}'\n", opts.action.as_str()));
        if opts.exclusive {
            conf.push_str("recovery_target_inclusive = off\n");
        }
    }
    let tl = match opts.timeline {
        TimelineTarget::Latest => "latest".to_string(),
        TimelineTarget::Current => "current".to_string(),
        TimelineTarget::Id(_) => timeline.to_string(),
    };
    conf.push_str(&format!("recovery_target_timeline = '{tl}'\n"));
    write("postgresql.auto.conf", conf.as_bytes())?;
    let _ = std::fs::remove_file(opts.pgdata.join("standby.signal"));
    write("recovery.signal", b"")?;
    crate::fsutil::sync_parent(&opts.pgdata.join("recovery.signal")).map_err(write_err(&opts.pgdata))
}
