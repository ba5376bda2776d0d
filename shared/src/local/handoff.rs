//! The local spool beside a data directory (`<pgdata>/walvault.spool/`): how the daemon tells
//! `archive-agent push` that a file is already durable in the repository.
//!
//! The handoff is a marker file per archived WAL file, `archived/<name>`, written (temp name,
//! fsync, rename) only after the upload is durable, recording the repository and the blake3 and
//! size of the bytes stored. push trusts a marker only when the repository is the one it was
//! told to use and the file it was handed hashes to the same value, so a stale, copied (base
//! backup of the data directory) or foreign marker can never make it report an unarchived file
//! as archived: at worst push does the work itself.

use crate::local::lease;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::repo::RepoId;
use crate::wal::WalFileName;

/// Name of the spool directory inside the data directory (left out of walvault's base backups).
pub const SPOOL_DIR: &str = "walvault.spool";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Marker {
    /// The repository's id (`walvault.json`), not its URL: a repository recreated at the same
    /// URL has another id, so these markers never vouch for it.
    repo_id: RepoId,
    blake3: String,
    size: u64,
    /// Identity of the file the daemon read (device, inode, modification time in nanoseconds):
    /// while they are unchanged, so are the bytes, and push need not read and hash 16 MiB again.
    #[serde(default)]
    file_id: Option<(u64, u64, i128)>,
}

/// `repository.json`: the repository the daemon last found at its store, and when.
#[derive(Debug, Serialize, Deserialize)]
struct RepositoryCheck {
    /// [`crate::repo::store::store_identity`] of the daemon's settings.
    store: String,
    repo_id: RepoId,
    /// Wall clock, microseconds since the epoch.
    checked_at: i64,
}

/// Carries kept in `carry/` (the daemon uploads a few segments at once, out of order).
const KEPT_CARRIES: usize = 8;

/// `carry/<segment>`: the time index's carry at the end of that segment, for one repository.
#[derive(Debug, Serialize, Deserialize)]
struct CarryFile {
    repo_id: RepoId,
    carry: crate::wal::summary::Carry,
}

fn file_id(meta: &std::fs::Metadata) -> (u64, u64, i128) {
    use std::os::unix::fs::MetadataExt;
    (
        meta.dev(),
        meta.ino(),
        i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
    )
}

/// Whether two views of a file's metadata are of the same, unchanged file (device, inode, size,
/// modification time): while they are, so are its bytes.
pub fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    a.len() == b.len() && file_id(a) == file_id(b)
}

/// The spool of one data directory.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    pub fn new(pgdata: &Path) -> Spool {
        Spool {
            dir: pgdata.join(SPOOL_DIR),
        }
    }

    /// The spool of the data directory a `%p` path belongs to (`pg_wal/<name>`, relative to the
    /// data directory PostgreSQL runs the command in), if it exists.
    pub fn for_wal_path(wal_path: &Path) -> Option<Spool> {
        let pg_wal = wal_path.parent()?;
        let pgdata = match pg_wal.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::env::current_dir().ok()?,
        };
        let spool = Spool::new(&pgdata);
        spool.dir.is_dir().then_some(spool)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn marker_path(&self, name: &WalFileName) -> PathBuf {
        self.dir.join("archived").join(name.to_string())
    }

    /// Record that `name`, with this hash and size, read from a file with metadata `meta` taken
    /// before reading it, is durable in `repo`.
    pub fn mark_archived(
        &self,
        repo: &RepoId,
        name: &WalFileName,
        hash: &blake3::Hash,
        size: u64,
        meta: Option<&std::fs::Metadata>,
    ) -> std::io::Result<()> {
        let marker = Marker {
            repo_id: repo.clone(),
            blake3: hash.to_hex().to_string(),
            size,
            file_id: meta.filter(|m| m.len() == size).map(file_id),
        };
        let path = self.marker_path(name);
        std::fs::create_dir_all(path.parent().unwrap_or(&self.dir))?;
        crate::local::crashsafe::write_durably(
            &path,
            &serde_json::to_vec(&marker).expect("marker serializes"),
        )
    }

    /// Record that the repository `repo` was found at `store` at `now_micros` (wall clock): the
    /// daemon, on each reading of `walvault.json`. Not synced: a lost record only makes push
    /// read `walvault.json` itself.
    pub fn record_repository(&self, store: &str, repo: &RepoId, now_micros: i64) -> std::io::Result<()> {
        let record = RepositoryCheck {
            store: store.to_string(),
            repo_id: repo.clone(),
            checked_at: now_micros,
        };
        let json = serde_json::to_vec(&record).expect("record serializes");
        let tmp = self.dir.join(format!(".repository.json.{}", std::process::id()));
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, self.dir.join("repository.json"))
    }

    /// The repository the daemon found at `store` no longer than `within` before `now_micros`
    /// (a record from the future, a clock set back, is not trusted).
    pub fn repository_checked(
        &self,
        store: &str,
        now_micros: i64,
        within: std::time::Duration,
    ) -> Option<RepoId> {
        let bytes = std::fs::read(self.dir.join("repository.json")).ok()?;
        let record: RepositoryCheck = serde_json::from_slice(&bytes).ok()?;
        let age = u128::try_from(now_micros.checked_sub(record.checked_at)?).ok()?;
        (record.store == store && age <= within.as_micros()).then_some(record.repo_id)
    }

    /// Drop the record: the daemon found no repository at its store.
    pub fn forget_repository(&self) {
        let _ = std::fs::remove_file(self.dir.join("repository.json"));
    }

    /// Whether a marker for `name` exists (whatever it says).
    pub fn has_marker(&self, name: &WalFileName) -> bool {
        self.marker_path(name).exists()
    }

    /// Whether `name` with exactly this content is recorded as durable in `repo`.
    pub fn is_archived(&self, repo: &RepoId, name: &WalFileName, hash: &blake3::Hash, size: u64) -> bool {
        let Ok(bytes) = std::fs::read(self.marker_path(name)) else {
            return false;
        };
        let Ok(m) = serde_json::from_slice::<Marker>(&bytes) else {
            return false;
        };
        m.repo_id == *repo && m.size == size && m.blake3 == hash.to_hex().as_str()
    }

    /// Whether the file at `path` is, by its metadata alone, the very file recorded as durable
    /// in `repo` (same device, inode, size and modification time).
    pub fn is_archived_unchanged(&self, repo: &RepoId, name: &WalFileName, path: &Path) -> bool {
        let Ok(bytes) = std::fs::read(self.marker_path(name)) else {
            return false;
        };
        let Ok(m) = serde_json::from_slice::<Marker>(&bytes) else {
            return false;
        };
        let Ok(meta) = std::fs::metadata(path) else {
            return false;
        };
        m.repo_id == *repo && m.size == meta.len() && m.file_id == Some(file_id(&meta))
    }

    /// Remember the time index's carry at the end of segment `seg` (what summarizing the next
    /// segment continues from), so the next push need not read it back from the repository.
    /// Derived data, best effort: a carry that cannot be kept is read from the repository.
    /// Keeps the newest few.
    pub fn keep_carry(
        &self,
        repo: &RepoId,
        seg: &crate::wal::SegmentName,
        carry: &crate::wal::summary::Carry,
    ) {
        let dir = self.dir.join("carry");
        let kept = CarryFile {
            repo_id: repo.clone(),
            carry: carry.clone(),
        };
        let Ok(json) = serde_json::to_vec(&kept) else {
            return;
        };
        if std::fs::create_dir_all(&dir).is_err() {
            return;
        }
        // No fsync: losing it in a crash only costs a read from the repository.
        let tmp = dir.join(format!(".{seg}.{}", std::process::id()));
        if std::fs::write(&tmp, &json).is_err() || std::fs::rename(&tmp, dir.join(seg.to_string())).is_err() {
            let _ = std::fs::remove_file(&tmp);
            return;
        }
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        names.retain(|n| !n.starts_with('.'));
        names.sort();
        let excess = names.len().saturating_sub(KEPT_CARRIES);
        for n in &names[..excess] {
            let _ = std::fs::remove_file(dir.join(n));
        }
    }

    /// The carry kept for the end of segment `seg` in `repo`, if any.
    pub fn carry(&self, repo: &RepoId, seg: &crate::wal::SegmentName) -> Option<crate::wal::summary::Carry> {
        let bytes = std::fs::read(self.dir.join("carry").join(seg.to_string())).ok()?;
        let kept: CarryFile = serde_json::from_slice(&bytes).ok()?;
        (kept.repo_id == *repo).then_some(kept.carry)
    }

    fn inflight_path(&self, name: &WalFileName) -> PathBuf {
        self.dir.join("inflight").join(name.to_string())
    }

    /// Note that this process is uploading `name` (advisory: lets push wait instead of
    /// uploading the same bytes a second time). The entry names this process by pid and start
    /// time, so a dead uploader's entry is never mistaken for a live one after pid reuse.
    pub fn begin_upload(&self, name: &WalFileName) {
        let path = self.inflight_path(name);
        let _ = std::fs::create_dir_all(path.parent().unwrap_or(&self.dir));
        let _ = std::fs::write(path, lease::own_tag().unwrap_or_default());
    }

    /// This process is done with `name`: remove its entry, and only its own.
    pub fn end_upload(&self, name: &WalFileName) {
        lease::release(&self.inflight_path(name));
    }

    /// Whether a live process (the daemon) is uploading `name` right now. An entry left by a
    /// killed process names a dead one (or a pid since reused, with another start time): it is
    /// ignored, and removed.
    pub fn upload_in_progress(&self, name: &WalFileName) -> bool {
        let path = self.inflight_path(name);
        let Ok(tag) = std::fs::read_to_string(&path) else {
            return false;
        };
        let live = lease::tag_alive(&tag);
        if !live {
            let _ = std::fs::remove_file(path);
        }
        live
    }

    /// Names with a marker.
    pub fn archived_names(&self) -> Vec<WalFileName> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("archived")) else {
            return vec![];
        };
        entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok()?.parse().ok())
            .collect()
    }

    /// Forget `name` (PostgreSQL has recycled or removed the file).
    pub fn forget(&self, name: &WalFileName) {
        let _ = std::fs::remove_file(self.marker_path(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflight_entries_name_live_processes_only() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        let name: WalFileName = "000000010000000000000001".parse().unwrap();
        assert!(!spool.upload_in_progress(&name));
        spool.begin_upload(&name);
        assert!(spool.upload_in_progress(&name));
        // Our pid with another start time: a process that died, its pid since reused.
        let pid = std::process::id();
        std::fs::write(spool.inflight_path(&name), format!("{pid} 1")).unwrap();
        assert!(!spool.upload_in_progress(&name));
        assert!(!spool.inflight_path(&name).exists(), "a stale entry is removed");
        // Another live process's entry is not ours to remove.
        std::fs::write(spool.inflight_path(&name), lease::process_tag(1).unwrap()).unwrap();
        spool.end_upload(&name);
        assert!(spool.upload_in_progress(&name));
        spool.begin_upload(&name);
        spool.end_upload(&name);
        assert!(!spool.inflight_path(&name).exists());
    }

    /// push trusts the daemon's reading of walvault.json only for the same store, while recent,
    /// never from the future, and not once the daemon found the repository gone.
    #[test]
    fn the_repository_record_counts_for_the_same_store_while_recent() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        std::fs::create_dir_all(spool.dir()).unwrap();
        let repo = RepoId::random();
        let within = std::time::Duration::from_secs(30);
        let at = 1_000_000_000_000_000;
        assert_eq!(spool.repository_checked("s3://b/p endpoint=x", at, within), None);
        spool.record_repository("s3://b/p endpoint=x", &repo, at).unwrap();
        assert_eq!(
            spool.repository_checked("s3://b/p endpoint=x", at + 30_000_000, within),
            Some(repo.clone())
        );
        assert_eq!(
            spool.repository_checked("s3://b/p endpoint=x", at + 30_000_001, within),
            None
        );
        assert_eq!(
            spool.repository_checked("s3://b/p endpoint=y", at, within),
            None,
            "another endpoint"
        );
        assert_eq!(
            spool.repository_checked("s3://b/p endpoint=x", at - 1, within),
            None,
            "from the future"
        );
        spool.forget_repository();
        assert_eq!(spool.repository_checked("s3://b/p endpoint=x", at, within), None);
    }

    #[test]
    fn a_marker_counts_only_for_the_same_repo_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        // The same URL recreated is another repository: another id.
        let repo = RepoId::random();
        let other = RepoId::random();
        let name: WalFileName = "000000010000000000000001".parse().unwrap();
        let hash = blake3::hash(b"segment");
        assert!(!spool.is_archived(&repo, &name, &hash, 7));
        spool.mark_archived(&repo, &name, &hash, 7, None).unwrap();
        assert!(spool.is_archived(&repo, &name, &hash, 7));
        assert!(!spool.is_archived(&other, &name, &hash, 7));
        assert!(!spool.is_archived(&repo, &name, &blake3::hash(b"other bytes"), 7));
        assert!(!spool.is_archived(&repo, &name, &hash, 8));
        assert_eq!(spool.archived_names(), vec![name]);
        spool.forget(&name);
        assert!(!spool.is_archived(&repo, &name, &hash, 7));
    }

    #[test]
    fn an_unchanged_file_is_recognised_by_its_metadata_and_a_rewritten_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        let repo = RepoId::random();
        let name: WalFileName = "000000010000000000000001".parse().unwrap();
        let path = dir.path().join("seg");
        std::fs::write(&path, b"segment").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(!spool.is_archived_unchanged(&repo, &name, &path));
        spool
            .mark_archived(&repo, &name, &blake3::hash(b"segment"), 7, Some(&meta))
            .unwrap();
        assert!(spool.is_archived_unchanged(&repo, &name, &path));
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, b"SEGMENT").unwrap();
        assert!(
            !spool.is_archived_unchanged(&repo, &name, &path),
            "same size, new mtime"
        );
    }

    #[test]
    fn finds_the_spool_from_a_percent_p_path() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("pg_wal/000000010000000000000001");
        assert!(Spool::for_wal_path(&wal).is_none());
        std::fs::create_dir_all(dir.path().join(SPOOL_DIR)).unwrap();
        assert_eq!(
            Spool::for_wal_path(&wal).unwrap().dir(),
            dir.path().join(SPOOL_DIR)
        );
    }
}
