//! Prefetching restore: while PostgreSQL replays one segment, the next ones are already being
//! downloaded into `<pgdata>/walvault.spool/prefetch/`, so `restore-agent fetch` (the same
//! restore_command line) finds them on local disk and replay does not wait on the network.
//!
//! - fetch records the name PostgreSQL asked for (`wanted`) and makes sure one prefetcher process
//!   runs (`restore-agent prefetch`, started by fetch, holding `lock` with its pid);
//! - the prefetcher keeps the next `depth` segments after `wanted`, on the same timeline, in the
//!   spool, within `max_bytes`: downloaded, verified exactly as fetch verifies a download (object
//!   envelope, blake3, page header, cluster identity), decompressed and fsynced, so that fetch
//!   only has to move the file into place;
//! - fetch takes a spooled file only under its exact name (timeline included, so a file of
//!   another timeline is never handed out) and renames it to PostgreSQL's destination;
//! - the prefetcher drops copies behind or off the wanted timeline, and when recovery ends
//!   (neither recovery.signal nor standby.signal) or nothing is asked for a while, removes the
//!   spool and exits.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::config::Settings;
use crate::local::handoff::SPOOL_DIR;
use crate::local::lease;
use crate::repo::Reader;
use crate::repo::layout::wal_key;
use crate::repo::stored::{self, WalObject};
use crate::retry::KeyedBackoff;
use crate::timeindex::StoredSummary;
use crate::wal::{SegmentName, SegmentNo, WalFileName};

/// How the prefetcher runs.
#[derive(Debug, Clone)]
pub struct PrefetchOptions {
    /// Segments kept ahead of the one PostgreSQL asked for last.
    pub depth: u64,
    /// Downloads at once.
    pub parallel: usize,
    /// Spool size limit.
    pub max_bytes: u64,
    /// Exit when nothing was asked for this long.
    pub idle_exit: Duration,
}

impl Default for PrefetchOptions {
    fn default() -> Self {
        PrefetchOptions {
            depth: 8,
            parallel: 4,
            max_bytes: 512 << 20,
            idle_exit: Duration::from_secs(60),
        }
    }
}

/// The prefetch spool of one data directory.
#[derive(Debug, Clone)]
pub struct Prefetch {
    pgdata: PathBuf,
    dir: PathBuf,
}

impl Prefetch {
    pub fn new(pgdata: &Path) -> Prefetch {
        // Absolute, so that messages name the spool in full (PostgreSQL runs fetch in the data
        // directory, whose path is then just ".").
        let pgdata = std::path::absolute(pgdata).unwrap_or_else(|_| pgdata.to_path_buf());
        Prefetch {
            dir: pgdata.join(SPOOL_DIR).join("prefetch"),
            pgdata,
        }
    }

    /// Whether the data directory is in archive recovery or standby mode.
    pub fn in_recovery(&self) -> bool {
        self.pgdata.join("recovery.signal").exists() || self.pgdata.join("standby.signal").exists()
    }

    fn object_path(&self, name: &WalFileName) -> PathBuf {
        self.dir.join(format!("{name}.wal"))
    }

    /// Beside a spooled segment: the newest transaction end in it, from the time index.
    fn commit_path(&self, name: &WalFileName) -> PathBuf {
        self.dir.join(format!("{name}.commit"))
    }

    /// Remove a spooled copy and what goes with it.
    fn drop_copy(&self, name: &WalFileName) {
        let _ = std::fs::remove_file(self.object_path(name));
        let _ = std::fs::remove_file(self.commit_path(name));
    }

    /// The newest transaction end (Unix microseconds) in spooled segment `name`, as the
    /// prefetcher read it from the time index, for the replay progress line.
    pub fn spooled_commit(&self, name: &WalFileName) -> Option<i64> {
        let text = std::fs::read_to_string(self.commit_path(name)).ok()?;
        text.trim().parse().ok()
    }

    /// Move the verified, prefetched `name` to `dest` (durably: rename, then fsync of the
    /// directory; a copy when the spool is on another file system). `None` when there is none.
    pub fn take(&self, name: &WalFileName, dest: &Path) -> Option<std::io::Result<u64>> {
        let path = self.object_path(name);
        let size = std::fs::metadata(&path).ok()?.len();
        let moved = match std::fs::rename(&path, dest) {
            Ok(()) => crate::local::crashsafe::sync_parent(dest),
            // EXDEV: pg_wal on another file system.
            Err(e) if e.raw_os_error() == Some(18) => std::fs::read(&path)
                .and_then(|bytes| crate::local::crashsafe::write_durably(dest, &bytes))
                .and_then(|()| std::fs::remove_file(&path)),
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(self.commit_path(name));
        Some(moved.map(|()| size))
    }

    /// Remove a prefetch spool left behind (a prefetcher killed before recovery ended), once
    /// recovery is over. Called by push, which runs after promotion.
    pub fn clean_if_done(&self) {
        if self.dir.exists() && !self.in_recovery() && !self.running() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Tell the prefetcher where recovery is. The error names the spool (a full disk, say).
    pub fn request(&self, name: &WalFileName) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("wanted.{}", std::process::id()));
        let written = std::fs::create_dir_all(&self.dir)
            .and_then(|()| std::fs::write(&tmp, name.to_string()))
            .and_then(|()| std::fs::rename(&tmp, self.dir.join("wanted")));
        written.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            std::io::Error::new(
                e.kind(),
                format!("cannot write to the spool {}: {e}", self.dir.display()),
            )
        })
    }

    fn wanted(&self) -> Option<SegmentName> {
        let text = std::fs::read_to_string(self.dir.join("wanted")).ok()?;
        match text.trim().parse::<WalFileName>().ok()? {
            WalFileName::Segment(s) => Some(s),
            _ => None,
        }
    }

    /// Whether a prefetcher is running for this data directory.
    pub fn running(&self) -> bool {
        lease::held(&self.dir.join("lock"))
    }

    /// Become the prefetcher of this data directory, unless a live one is.
    fn claim(&self) -> std::io::Result<bool> {
        std::fs::create_dir_all(&self.dir)?;
        lease::acquire(&self.dir.join("lock"))
    }

    /// Spooled copies, by name.
    fn spooled(&self) -> BTreeSet<WalFileName> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return BTreeSet::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".wal").and_then(|n| n.parse().ok()))
            .collect()
    }

    fn spool_bytes(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .map(|it| {
                it.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    #[error(transparent)]
    Store(#[from] crate::repo::StoreError),
    #[error(transparent)]
    Repository(#[from] crate::repo::RepoError),
    #[error("the stored copy cannot be used: {0}")]
    Unusable(String),
    #[error("prefetch spool {path}: {source}")]
    Spool { path: String, source: std::io::Error },
}

impl PrefetchError {
    fn spool(dir: &Path) -> impl FnOnce(std::io::Error) -> PrefetchError + '_ {
        move |source| PrefetchError::Spool {
            path: dir.display().to_string(),
            source,
        }
    }
}

/// How long the prefetcher leaves a spool it could not write (a full disk) alone: recovery
/// fetches straight from the repository meanwhile, and the server log gets one line per pause,
/// not one per segment and second.
const SPOOL_FAILURE_PAUSE: Duration = Duration::from_secs(30);

/// How often the prefetcher makes sure the repository at the URL is still the one it copies from.
const REPOSITORY_CHECK_EVERY: Duration = Duration::from_secs(10);

/// How soon a name the repository did not have yet is asked for again (the archive grows).
/// A copy that failed verification waits longer each time ([`KeyedBackoff`]): a damaged
/// object stays damaged, and is not downloaded in a loop while recovery waits.
const MISSING_RETRY: Duration = Duration::from_secs(1);

/// Run the prefetcher for `pgdata` until recovery ends or nothing is asked for `idle_exit`.
pub async fn run(settings: &Settings, pgdata: &Path, opts: &PrefetchOptions) -> Result<(), PrefetchError> {
    let pf = Prefetch::new(pgdata);
    if !pf.claim().map_err(PrefetchError::spool(&pf.dir))? {
        return Ok(()); // another prefetcher serves this data directory
    }
    let repo = match settings.open_reader().await {
        Ok(r) => std::sync::Arc::new(r),
        Err(e) => {
            lease::release(&pf.dir.join("lock"));
            return Err(e.into());
        }
    };
    // Copies are made from this repository only: if another one replaces it at the URL (or it
    // goes away), every copy is dropped and the prefetcher stops; fetch asks the repository.
    let mut checked_at = Instant::now();
    let Some(seg_size) = repo.cluster().map(|c| c.wal_segment_size) else {
        lease::release(&pf.dir.join("lock"));
        return Ok(()); // no segment archived yet: nothing to prefetch
    };
    // With a replay plan (a restore by walvault), each copy comes with its segment's newest
    // transaction end, which fetch logs as progress.
    let commits = crate::replay::files::plan_for_fetch(pgdata).is_some();
    let mut last_wanted = pf.wanted();
    let mut last_change = Instant::now();
    let mut downloads = Downloads::default();
    // The segments' reads, recorded for the debug log (what they cost, how they overlapped).
    let reads = crate::repo::reads::ReadStats::new();
    loop {
        downloads.collect_finished();
        if !pf.in_recovery() {
            break;
        }
        if checked_at.elapsed() >= REPOSITORY_CHECK_EVERY {
            checked_at = Instant::now();
            if let Err(e) = repo.still_there().await
                && !e.is_transient()
            {
                tracing::warn!("prefetch stopped, its copies dropped: {e}");
                for name in pf.spooled() {
                    pf.drop_copy(&name);
                }
                break;
            }
        }
        let wanted = pf.wanted();
        if wanted != last_wanted {
            last_wanted = wanted;
            last_change = Instant::now();
        } else if last_change.elapsed() > opts.idle_exit && downloads.tasks.is_empty() {
            break;
        }
        if let Some(current) = wanted {
            let ahead = segments_ahead(&current, opts.depth, seg_size);
            // Drop what recovery has passed or what belongs to another timeline.
            for name in pf.spooled() {
                if !ahead.contains(&name) {
                    pf.drop_copy(&name);
                }
            }
            let source = Source {
                pf: &pf,
                repo: &repo,
                reads: &reads,
                commits,
            };
            downloads.start(&source, ahead, opts);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while downloads.tasks.join_next().await.is_some() {}
    tracing::debug!("prefetch reads of WAL: {}", reads.report().summary());
    if !pf.in_recovery() {
        let _ = std::fs::remove_dir_all(&pf.dir);
    } else {
        lease::release(&pf.dir.join("lock"));
    }
    Ok(())
}

/// The `depth` segments after `current` on its timeline (those past the last LSN have no name).
fn segments_ahead(current: &SegmentName, depth: u64, seg_size: u32) -> Vec<WalFileName> {
    (1..=depth)
        .filter_map(|i| {
            let no = current.segment_no(seg_size)?.0.checked_add(i)?;
            // A segment past the last LSN has no name.
            no.checked_mul(u64::from(seg_size))?;
            Some(WalFileName::Segment(SegmentName::from_no(
                current.timeline,
                SegmentNo(no),
                seg_size,
            )))
        })
        .collect()
}

/// Where downloads come from and go: the spool, the repository, the read statistics, and
/// whether each copy comes with its segment's newest transaction end.
struct Source<'a> {
    pf: &'a Prefetch,
    repo: &'a std::sync::Arc<Reader>,
    reads: &'a crate::repo::reads::ReadStats,
    commits: bool,
}

/// The downloads running, and when each name may be tried again.
#[derive(Default)]
struct Downloads {
    tasks: JoinSet<(WalFileName, Result<bool, PrefetchError>)>,
    downloading: BTreeSet<WalFileName>,
    retry: KeyedBackoff<WalFileName>,
    /// Set when the spool could not be written: no new download before then.
    paused_until: Option<Instant>,
}

impl Downloads {
    /// Take the results of the downloads that ended: when to try each name again, a pause
    /// when the spool could not be written, a warning for a copy that failed.
    fn collect_finished(&mut self) {
        while let Some(done) = self.tasks.try_join_next() {
            let (name, result) = done.expect("prefetch task panicked");
            self.downloading.remove(&name);
            match result {
                Ok(true) => self.retry.succeeded(&name),
                Ok(false) => self.retry.wait(name, Instant::now(), MISSING_RETRY),
                Err(e @ PrefetchError::Spool { .. }) => {
                    if self.paused_until.is_none_or(|t| Instant::now() >= t) {
                        tracing::warn!(
                            "prefetch {name}: {e}; prefetching paused for {}s, recovery fetches from the repository meanwhile",
                            SPOOL_FAILURE_PAUSE.as_secs()
                        );
                    }
                    self.paused_until = Some(Instant::now() + SPOOL_FAILURE_PAUSE);
                    self.retry.wait(name, Instant::now(), MISSING_RETRY);
                }
                Err(e) => {
                    let (failures, _) = self.retry.failed(name, Instant::now());
                    // One line for the first failures, then one per power of two.
                    if failures <= 2 || failures.is_power_of_two() {
                        tracing::warn!(
                            "prefetch {name}: {e} (failure {failures}; fetch will report it if recovery asks)"
                        );
                    }
                }
            }
        }
    }

    /// Start downloading the names of `ahead` not spooled, downloading or waiting already, in
    /// order, while the parallelism, the spool's size and any pause allow.
    fn start(&mut self, from: &Source<'_>, ahead: Vec<WalFileName>, opts: &PrefetchOptions) {
        let spooled = from.pf.spooled();
        for name in ahead {
            if self.tasks.len() >= opts.parallel.max(1)
                || from.pf.spool_bytes() >= opts.max_bytes
                || self.paused_until.is_some_and(|t| Instant::now() < t)
            {
                break;
            }
            if spooled.contains(&name)
                || self.downloading.contains(&name)
                || self.retry.waiting(&name, Instant::now())
            {
                continue;
            }
            self.downloading.insert(name);
            let (repo, path) = (std::sync::Arc::clone(from.repo), from.pf.object_path(&name));
            let commit_path = from.commits.then(|| from.pf.commit_path(&name));
            let store = repo.store().recording(from.reads);
            self.tasks
                .spawn(async move { (name, download(&repo, &store, &name, &path, commit_path).await) });
        }
    }
}

/// Download one segment, verify it as fetch would, and leave it decompressed and durable in the
/// spool (temporary name, fsync, rename: fetch never sees a partial file). `false` when the
/// repository does not have it (yet); a copy failing verification is dropped, and fetch then
/// asks the repository itself and reports the corruption. With `commit_path`, the newest
/// transaction end the segment's summary records is written there first (best effort).
async fn download(
    repo: &Reader,
    store: &crate::repo::Store,
    name: &WalFileName,
    path: &Path,
    commit_path: Option<PathBuf>,
) -> Result<bool, PrefetchError> {
    let key = wal_key(name);
    let Some(bytes) = store.get(&key).await? else {
        return Ok(false);
    };
    let latest_commit = match (commit_path.is_some(), name.wal_segment()) {
        (true, Some(seg)) => repo
            .read_if_present::<StoredSummary>(&seg)
            .await
            .ok()
            .flatten()
            .and_then(|s| s.latest_commit_us()),
        _ => None,
    };
    let (name, path, repo, store) = (*name, path.to_path_buf(), repo.clone(), store.clone());
    let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let spool_dir = dir.clone();
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let open = |b: &[u8]| stored::open::<WalObject>(repo.sealer(), &name, b);
        let opened = match open(&bytes) {
            // Rare: the fallback repository's copy, waited for on this blocking thread.
            Err(damage) if store.fallback().is_some() => runtime
                .block_on(store.reread_from_fallback(&key, None, damage.to_string(), open))
                .ok_or(damage),
            opened => opened,
        };
        let WalObject { content, .. } = opened.map_err(|e| PrefetchError::Unusable(e.to_string()))?;
        repo.check_wal(&name, &content)
            .map_err(|e| PrefetchError::Unusable(e.to_string()))?;
        if let (Some(p), Some(t)) = (&commit_path, latest_commit) {
            // Before the copy appears: fetch reads it when it takes the copy. Only a hint.
            let _ = std::fs::write(p, t.to_string());
        }
        let tmp = path.with_extension("part");
        crate::local::crashsafe::write_durably(&tmp, &content)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                PrefetchError::spool(&dir)(e)
            })?;
        Ok(true)
    })
    .await
    .unwrap_or_else(|e| Err(PrefetchError::spool(&spool_dir)(std::io::Error::other(e))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spooled_copy_is_taken_once_and_only_under_its_own_name() {
        let dir = tempfile::tempdir().unwrap();
        let pf = Prefetch::new(dir.path());
        std::fs::create_dir_all(&pf.dir).unwrap();
        let tl1: WalFileName = "000000010000000000000005".parse().unwrap();
        let tl2: WalFileName = "000000020000000000000005".parse().unwrap();
        std::fs::write(pf.object_path(&tl1), b"verified segment").unwrap();
        let dest = dir.path().join("RECOVERYXLOG");
        assert!(
            pf.take(&tl2, &dest).is_none(),
            "another timeline's copy is never handed out"
        );
        std::fs::write(pf.commit_path(&tl1), b"1795359600000000").unwrap();
        assert_eq!(pf.spooled_commit(&tl1), Some(1_795_359_600_000_000));
        assert_eq!(pf.spooled_commit(&tl2), None);
        assert_eq!(pf.take(&tl1, &dest).map(|r| r.unwrap()), Some(16));
        assert!(!pf.commit_path(&tl1).exists(), "taken with its copy");
        assert_eq!(std::fs::read(&dest).unwrap(), b"verified segment");
        assert!(pf.take(&tl1, &dest).is_none());
    }

    #[test]
    fn the_wanted_hint_and_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let pf = Prefetch::new(dir.path());
        let name: WalFileName = "000000010000000000000007".parse().unwrap();
        pf.request(&name).unwrap();
        assert_eq!(pf.wanted().map(WalFileName::Segment), Some(name));
        assert!(!pf.running());
        assert!(pf.claim().unwrap());
        assert!(pf.running(), "our own pid is alive");
        assert!(!pf.claim().unwrap(), "a live holder keeps the lock");
        std::fs::write(pf.dir.join("lock"), "999999999").unwrap();
        assert!(!pf.running(), "a dead holder does not");
        assert!(!pf.in_recovery());
        std::fs::write(dir.path().join("recovery.signal"), b"").unwrap();
        assert!(pf.in_recovery());
    }
}
