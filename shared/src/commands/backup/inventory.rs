//! What a backup takes: the data directory and its tablespaces walked with PostgreSQL's
//! exclusions, in the order they are copied, and the previous backup it builds on, from which
//! files that did not change are taken over unread (the rule is [`crate::basebackup::reuse`]).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::BackupError;
use super::control::CONTROL_FILE;
use super::names::Names;
use super::prior_files::PriorFiles;
use super::walk::{At, Source, Walk};
use crate::basebackup::chunk::ChunkId;
use crate::basebackup::exclude::{self, Decision};
use crate::basebackup::manifest::paged::PagedManifest;
use crate::basebackup::manifest::{BackupId, FileStat, Manifest, Tablespace};
use crate::basebackup::pack::Places;
use crate::repo::Store;
use crate::repo::object::Sealer;

/// Whether a backup may take unchanged files over from the previous backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FileReading {
    /// Read only the files that changed since the previous backup read them (see
    /// [`crate::basebackup::reuse`]); take the others over with their chunks.
    #[default]
    Changed,
    /// Read every file, whatever its `stat` says; chunks the previous backup holds are still not
    /// stored again (`archive-agent backup --read-all`).
    All,
}

/// The files and directories a backup copies.
#[derive(Debug)]
pub(super) struct Inventory {
    /// In the order they are copied: by path, but `global/pg_control` last. A standby backup
    /// ends at the minRecoveryPoint recorded in the copy, which must be at least as new as
    /// every page copied (basebackup.c sends it last for this reason).
    /// Shared with the list of what the backup copied and with the previous backup's files,
    /// which name its paths.
    pub sources: Arc<Walk>,
    pub tablespaces: Vec<Tablespace>,
    /// Where the sources are on disk.
    pub roots: Roots,
    /// This host's wall clock (Unix ns) before the walk: every file is examined after it, the
    /// bound the next backup's reuse rule compares file times with.
    pub examined_after_ns: i64,
}

impl Inventory {
    /// Walk `pgdata`, whose examination starts at `examined_after_ns` on this host's clock.
    pub fn take(pgdata: &Path, examined_after_ns: i64) -> Result<Inventory, BackupError> {
        let (sources, tablespaces, roots) = walk(pgdata)?;
        Ok(Inventory {
            sources: Arc::new(sources.sorted(CONTROL_FILE)?),
            tablespaces,
            roots,
            examined_after_ns,
        })
    }
}

/// Where a backup's sources are on disk: the data directory, and each tablespace's location
/// (what its link `pg_tblspc/<oid>` pointed to when the walk read it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Roots {
    pgdata: PathBuf,
    /// `pg_tblspc/<oid>` and its location.
    tablespaces: Vec<(String, PathBuf)>,
}

impl Roots {
    /// Just a data directory, no tablespace.
    pub fn of(pgdata: &Path) -> Roots {
        Roots {
            pgdata: pgdata.to_path_buf(),
            tablespaces: Vec::new(),
        }
    }

    /// Where the source at manifest path `rel` is on disk: under its tablespace's location when
    /// it is in one, else under the data directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        for (link, location) in &self.tablespaces {
            if let Some(rest) = rel.strip_prefix(link.as_str()) {
                if rest.is_empty() {
                    return location.clone();
                }
                if let Some(rest) = rest.strip_prefix('/') {
                    return location.join(rest);
                }
            }
        }
        self.pgdata.join(rel)
    }
}

/// This host's wall clock, Unix nanoseconds (before 1970: 0, which reuses nothing).
pub(super) fn wall_clock_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// List the data directory and tablespaces, applying PostgreSQL's exclusions (in no order).
fn walk(pgdata: &Path) -> Result<(Walk, Vec<Tablespace>, Roots), BackupError> {
    let mut out = Walk::default();
    let mut tablespaces = Vec::new();
    let mut roots = Roots::of(pgdata);
    let mut stack = vec![(pgdata.to_path_buf(), String::new())];
    while let Some((dir, rel_dir)) = stack.pop() {
        let Some(listed) = list_dir(&dir, &rel_dir)? else {
            continue;
        };
        let unlogged = exclude::unlogged_files(listed.iter());
        for name in listed.iter() {
            let abs = dir.join(name);
            let rel = if rel_dir.is_empty() {
                name.to_string()
            } else {
                format!("{rel_dir}/{name}")
            };
            let meta = match std::fs::symlink_metadata(&abs) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(read_err(&abs, e)),
            };
            let ft = meta.file_type();
            // Tablespaces: pg_tblspc/<oid> links to their location; back up its contents there.
            if ft.is_symlink() && rel_dir == "pg_tblspc" {
                let target = std::fs::read_link(&abs).map_err(|err| read_err(&abs, err))?;
                if let Ok(oid) = name.parse::<u32>() {
                    tablespaces.push(Tablespace {
                        oid,
                        location: target.display().to_string(),
                    });
                    roots.tablespaces.push((rel.clone(), target.clone()));
                    out.push(Source {
                        rel: rel.clone(),
                        is_dir: true,
                        mode: 0o700,
                    })?;
                    stack.push((target, rel));
                }
                continue;
            }
            // pg_wal may be a link to another disk; its contents are skipped anyway.
            let is_dir = ft.is_dir() || (ft.is_symlink() && rel == "pg_wal");
            if !is_dir && !ft.is_file() {
                continue; // sockets, stray symlinks: not part of a cluster
            }
            let mode = meta.permissions().mode() & 0o7777;
            let source = Source { rel, is_dir, mode };
            match exclude::decide(&source.rel, is_dir) {
                Decision::Skip => {}
                Decision::EmptyDir => push_empty_dir(&mut out, source, &abs)?,
                Decision::Include if is_dir => {
                    stack.push((abs, source.rel.clone()));
                    out.push(source)?;
                }
                Decision::Include => {
                    if !unlogged.contains(name) {
                        out.push(source)?;
                    }
                }
            }
        }
    }
    Ok((out, tablespaces, roots))
}

fn read_err(p: &Path, source: std::io::Error) -> BackupError {
    BackupError::Read {
        path: p.display().to_string(),
        source,
    }
}

/// The UTF-8 names in `dir` (`rel_dir` in the backup); `None` when the directory was dropped
/// while the walk went (DROP DATABASE): not an error, WAL replays it. (Names only, in one
/// string: a path beside each took 100 bytes a file of a directory of 300,000 files, a
/// `String` each some 40.)
fn list_dir(dir: &Path, rel_dir: &str) -> Result<Option<Names>, BackupError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !rel_dir.is_empty() => return Ok(None),
        Err(e) => return Err(read_err(dir, e)),
    };
    let mut listed = Names::default();
    for e in entries {
        let e = e.map_err(|err| read_err(dir, err))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else {
            tracing::warn!(path = %e.path().display(), "skipping a file whose name is not UTF-8");
            continue;
        };
        listed.push(name)?;
    }
    Ok(Some(listed))
}

/// A directory kept empty; for `pg_wal`, its subdirectories kept empty too, as basebackup.c
/// sends them: archive_status, and from PostgreSQL 17 the WAL summarizer's summaries.
fn push_empty_dir(out: &mut Walk, dir: Source, abs: &Path) -> Result<(), BackupError> {
    let subdirs: Vec<Source> = if dir.rel == "pg_wal" {
        ["archive_status", "summaries"]
            .into_iter()
            .filter(|sub| *sub == "archive_status" || abs.join(sub).is_dir())
            .map(|sub| Source {
                rel: format!("pg_wal/{sub}"),
                is_dir: true,
                mode: dir.mode,
            })
            .collect()
    } else {
        vec![]
    };
    out.push(dir)?;
    subdirs.into_iter().try_for_each(|s| out.push(s))
}

/// The backup a new one builds on: the newest of the same cluster, read once the backup holds
/// its lock, so that every chunk it names stays in the repository until the new manifest is
/// written (an expire collects chunks only when no backup lock is live).
pub(super) struct Previous {
    /// Its manifest but for the entries and file records ([`PriorFiles`]): the packs, the
    /// differences, the page checks.
    pub frame: Arc<Manifest>,
    /// Its entries and file records, shared with the chunk tasks'
    /// [`super::differences::DeltaBases`].
    pub files: Arc<PriorFiles>,
    /// Whether its unchanged files may be taken over unread ([`FileReading::Changed`]).
    pub take_over: bool,
    /// Chunks it names that are not to be relied on: with [`FileReading::All`], those whose
    /// pack or object is missing from the repository, or shorter than the manifest says. They
    /// are stored again.
    pub absent: HashSet<ChunkId>,
}

/// What a backup of `sysid` (PostgreSQL `pg_version`, chunks of `chunk_size`) builds on: the
/// newest backup in the repository when it fits, its files taken over when `reading` allows.
/// Called under the backup lock: the chunks and packs the newest backup names stay until this
/// one's manifest is written.
pub(super) async fn base_of(
    store: &Store,
    sealer: &Sealer,
    reading: FileReading,
    sysid: u64,
    pg_version: u32,
    chunk_size: u64,
    walk: Option<&Arc<Walk>>,
) -> Result<Option<Previous>, BackupError> {
    let newest = newest_backup(store).await?;
    let Some(mut previous) = (match &newest {
        Some(id) => Previous::load(store, sealer, id, sysid, pg_version, chunk_size, walk).await,
        None => None,
    }) else {
        return Ok(None);
    };
    if reading == FileReading::All {
        previous.take_over = false;
        previous.absent = previous.absent_from(store).await?;
        if !previous.absent.is_empty() {
            tracing::warn!(
                backup = %previous.frame.id,
                chunks = previous.absent.len(),
                "chunks of the previous backup are missing from the repository; storing them again"
            );
        }
    }
    Ok(Some(previous))
}

/// The newest backup in the repository, of any cluster.
async fn newest_backup(store: &Store) -> Result<Option<BackupId>, BackupError> {
    Ok(store
        .list("backups/")
        .await?
        .iter()
        .filter_map(|(key, _)| crate::repo::layout::parse_manifest_key(key))
        .max())
}

impl Previous {
    /// Backup `id`, when it can serve as a base for `sysid`'s backup in chunks of `chunk_size`.
    /// `None` when it cannot be read or does not fit: the backup then reads every file, which
    /// is always safe.
    /// Its files name the paths `walk` has by their place there ([`PriorFiles::read`]).
    async fn load(
        store: &Store,
        sealer: &Sealer,
        id: &BackupId,
        sysid: u64,
        pg_version: u32,
        chunk_size: u64,
        walk: Option<&Arc<Walk>>,
    ) -> Option<Previous> {
        let paged = match crate::catalog::load_paged_manifest(store, sealer, id).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(backup = %id, "the previous backup cannot be read ({e}); reading every file");
                return None;
            }
        };
        let m = paged.frame();
        if m.system_identifier != sysid || m.pg_version != pg_version || m.chunk_size != chunk_size {
            tracing::info!(
                backup = %id,
                "the previous backup is of another cluster, version or chunk size; reading every file"
            );
            return None;
        }
        match Previous::of_paged(&paged, walk.cloned()) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(backup = %id, "the previous backup cannot be read ({e}); reading every file");
                None
            }
        }
    }

    /// The previous backup whose stored manifest `paged` holds, its lists read compactly.
    fn of_paged(paged: &PagedManifest, walk: Option<Arc<Walk>>) -> Result<Previous, BackupError> {
        let files = PriorFiles::read(paged, walk)?;
        Ok(Previous {
            frame: Arc::new(paged.frame().clone()),
            files: Arc::new(files),
            take_over: true,
            absent: HashSet::new(),
        })
    }

    /// Backup `m` as the previous one, as a backup reads it from the repository.
    #[cfg(test)]
    pub fn of(m: &Manifest) -> Previous {
        Previous::of_paged(&PagedManifest::of(m).expect("a valid manifest"), None).expect("a valid manifest")
    }

    /// The chunks it names whose pack (or, for a chunk stored on its own, whose object) the
    /// repository does not list, or lists shorter than the manifest says: one listing of
    /// `packs/` and one of `chunks/`.
    async fn absent_from(&self, store: &Store) -> Result<HashSet<ChunkId>, BackupError> {
        use crate::repo::layout::{Kind, parse_chunk_key, parse_pack_key};
        let packs: HashMap<_, u64> = store
            .list(Kind::Pack.dirname())
            .await?
            .iter()
            .filter_map(|(k, size)| Some((parse_pack_key(k)?, *size)))
            .collect();
        let chunks: HashSet<ChunkId> = store
            .list(Kind::Chunk.dirname())
            .await?
            .iter()
            .filter_map(|(k, size)| parse_chunk_key(k).filter(|_| *size > 0))
            .collect();
        let whole: HashSet<_> = self
            .frame
            .packs
            .iter()
            .filter(|p| packs.get(&p.id).is_some_and(|&size| size >= p.len()))
            .map(|p| p.id)
            .collect();
        let places = self.frame.places();
        let stored = |c: &ChunkId| match places.get(c) {
            Some(place) => whole.contains(&place.pack),
            None => chunks.contains(c),
        };
        let mut absent = HashSet::new();
        self.files.each_chunk(|c, _| {
            // A chunk stored as a difference needs its base too.
            if !stored(c) || places.delta(c).is_some_and(|d| !stored(&d.base)) {
                absent.insert(*c);
            }
        });
        absent.extend(self.frame.deltas.iter().map(|d| d.base).filter(|b| !stored(b)));
        Ok(absent)
    }

    /// The stored length of every chunk it references and that is not [`Previous::absent`],
    /// when it recorded one (`None`: ask).
    pub fn chunk_lengths(&self) -> HashMap<[u8; 32], Option<u64>> {
        let mut lens: HashMap<[u8; 32], Option<u64>> = HashMap::new();
        // A length recorded for any reference to the chunk is its length.
        let mut note = |id: &ChunkId, len: Option<u64>| {
            if !self.absent.contains(id) {
                let known = lens.entry(*id.hash()).or_insert(len);
                *known = known.or(len);
            }
        };
        self.files.each_chunk(&mut note);
        // The bases of its chunks stored as differences are stored whole: met again as content,
        // they are named as they are, never stored as a difference themselves (which would
        // leave the differences from them without a base to read).
        if !self.frame.deltas.is_empty() {
            let places = Places::of(&self.frame.packs);
            for d in &self.frame.deltas {
                note(&d.base, places.get(&d.base).map(|p| p.len));
            }
        }
        lens
    }

    /// Whether a file it read may be taken over as it is now, for a thread of its own (see
    /// [`Unchanged`]); `None` when its files may not be taken over.
    pub fn unchanged(&self, clock_ns: i64) -> Option<Unchanged> {
        Some(Unchanged {
            files: Arc::clone(&self.files),
            prev_ns: self.frame.files_examined_after_us?.saturating_mul(1000),
            clock_ns,
        })
        .filter(|_| self.take_over)
    }

    /// Its files, indexed for taking them over.
    pub fn base(&self) -> Base<'_> {
        Base {
            files: &self.files,
            examined_after_ns: self
                .frame
                .files_examined_after_us
                .map(|us| us.saturating_mul(1000)),
        }
    }
}

/// The previous backup's files by path, and when it started examining them.
pub(super) struct Base<'a> {
    files: &'a PriorFiles,
    examined_after_ns: Option<i64>,
}

/// The rule that takes a file over ([`crate::basebackup::reuse`]) against the previous backup's
/// files, owned: what opens files ahead asks it first, on a `stat` of the path, and opens only
/// the files it does not take (a file taken over needs no descriptor: its `open`, `fstat` and
/// `close` were most of a backup that changed nothing).
pub(super) struct Unchanged {
    files: Arc<PriorFiles>,
    prev_ns: i64,
    clock_ns: i64,
}

impl Unchanged {
    /// Whether the file at `rel`, as `stat` sees it now, is the one the previous backup read.
    pub fn holds(&self, rel: &str, stat: &FileStat) -> bool {
        self.files.find(rel).is_some_and(|at| {
            crate::basebackup::reuse::may_reuse(
                self.files.stat(at).as_ref(),
                self.prev_ns,
                stat,
                self.clock_ns,
            )
            .is_ok()
        })
    }
}

/// A file taken over from the previous backup unread: the previous backup's entry `at` in its
/// [`PriorFiles`], whose chunks, stored lengths and stat are the file's (the new backup's list
/// names them there rather than copying them: [`super::listing::Listing::taken_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TakenOver {
    pub at: usize,
}

impl Base<'_> {
    /// `src` taken over, when its `stat` (taken on the open file, before any read) shows no
    /// write since the previous backup read it; `clock_ns` is this backup's examination start.
    /// `None`: the file must be read.
    pub fn take_over(&self, src: At<'_>, stat: FileStat, clock_ns: i64) -> Option<TakenOver> {
        let at = self.files.find(src.rel)?;
        let prev_ns = self.examined_after_ns?;
        if let Err(why) =
            crate::basebackup::reuse::may_reuse(self.files.stat(at).as_ref(), prev_ns, &stat, clock_ns)
        {
            tracing::debug!(path = %src.rel, ?why, "reading");
            return None;
        }
        // A file with no record names no stored lengths: read (never the case for a stat).
        self.files.stored_of(at)?;
        Some(TakenOver { at })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn write(path: &Path, mode: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"x").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn the_inventory_follows_exclusions_and_tablespaces_and_ends_with_pg_control() {
        let pgdata = tempfile::tempdir().unwrap();
        let space = tempfile::tempdir().unwrap();
        let d = pgdata.path();
        for f in [
            "PG_VERSION",
            "postmaster.pid",
            "backup_label",
            "global/pg_control",
            "global/1262",
            "global/pg_internal.init",
            "base/5/16384",
            "base/5/16390",
            "base/5/16390_fsm",
            "base/5/16390_init",
            "base/5/t3_16400",
            "base/pgsql_tmp/pgsql_tmp1.0",
            "pg_wal/000000010000000000000001",
            "pg_wal/archive_status/000000010000000000000001.done",
            "pg_stat_tmp/global.stat",
        ] {
            write(&d.join(f), 0o600);
        }
        write(&d.join("postgresql.conf"), 0o640);
        write(&space.path().join("PG_15_202209061/5/16501"), 0o600);
        std::fs::create_dir(d.join("pg_tblspc")).unwrap();
        symlink(space.path(), d.join("pg_tblspc/16500")).unwrap();
        // A stray link elsewhere is not part of the cluster.
        symlink("/nonexistent", d.join("stray")).unwrap();

        let inv = Inventory::take(d, 42).unwrap();
        let rels: Vec<&str> = inv.sources.iter().map(|s| s.rel).collect();
        assert_eq!(
            rels,
            [
                "PG_VERSION",
                "base",
                "base/5",
                "base/5/16384",
                "base/5/16390_init",
                "global",
                "global/1262",
                "pg_stat_tmp",
                "pg_tblspc",
                "pg_tblspc/16500",
                "pg_tblspc/16500/PG_15_202209061",
                "pg_tblspc/16500/PG_15_202209061/5",
                "pg_tblspc/16500/PG_15_202209061/5/16501",
                "pg_wal",
                "pg_wal/archive_status",
                "postgresql.conf",
                "global/pg_control",
            ]
        );
        assert_eq!(inv.examined_after_ns, 42);
        assert_eq!(
            inv.tablespaces,
            [Tablespace {
                oid: 16500,
                location: space.path().display().to_string(),
            }]
        );
        let by_rel = |rel: &str| inv.sources.iter().find(|s| s.rel == rel).unwrap();
        let ts = by_rel("pg_tblspc/16500");
        assert_eq!((ts.is_dir, ts.mode), (true, 0o700));
        assert_eq!(inv.roots.path(ts.rel), space.path());
        assert_eq!(
            inv.roots.path("pg_tblspc/16500/PG_15_202209061/5/16501"),
            space.path().join("PG_15_202209061/5/16501")
        );
        // A tablespace whose oid starts another's is not taken for it.
        assert_eq!(inv.roots.path("pg_tblspc/165001"), d.join("pg_tblspc/165001"));
        assert_eq!(inv.roots.path("global/1262"), d.join("global/1262"));
        let conf = by_rel("postgresql.conf");
        assert_eq!((conf.is_dir, conf.mode), (false, 0o640));
        assert!(by_rel("pg_wal/archive_status").is_dir);
    }

    #[test]
    fn pg_wal_keeps_its_summaries_directory_only_when_there_is_one() {
        let pgdata = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(pgdata.path().join("pg_wal/summaries")).unwrap();
        let inv = Inventory::take(pgdata.path(), 0).unwrap();
        let rels: Vec<&str> = inv.sources.iter().map(|s| s.rel).collect();
        // archive_status is kept even when the source has none.
        assert_eq!(rels, ["pg_wal", "pg_wal/archive_status", "pg_wal/summaries"]);
    }

    const S: i64 = 1_000_000_000;

    use crate::basebackup::manifest::{Entry, EntryKind, FileRecord};

    fn stat(size: u64, mtime_s: i64) -> FileStat {
        FileStat {
            size,
            mtime_ns: mtime_s * S,
            ctime_ns: mtime_s * S,
            ino: 77,
            dev: 2049,
        }
    }

    fn file(path: &str, size: u64, chunks: &[&str]) -> Entry {
        Entry {
            within: None,
            path: path.into(),
            kind: EntryKind::File,
            mode: 0o600,
            size,
            chunks: chunks.iter().map(|c| c.repeat(32).parse().unwrap()).collect(),
        }
    }

    /// A previous backup that examined its files at t = 1000 s: `base/5/16384` read by it,
    /// `base/5/16390` taken over from an older backup, `base/5/16391` without a record.
    fn previous(examined_after_us: Option<i64>) -> Previous {
        let record = |path: &str, size: u64, stored: Vec<u64>, read_by: Option<&str>| FileRecord {
            path: path.into(),
            stored,
            stat: Some(stat(size, 900)),
            read_by: read_by.map(|id| id.parse().unwrap()),
        };
        let mut m = crate::catalog::testing::manifest("20261122T143200Z", 1, 5, 1_000_000);
        m.version = crate::basebackup::manifest::FORMAT_VERSION_WITHIN;
        "000000010000000000000005".clone_into(&mut m.start_wal);
        "000000010000000000000005".clone_into(&mut m.stop_wal);
        m.chunk_size = 8192;
        m.entries = vec![
            file("base/5/16384", 16384, &["ab", "cd"]),
            file("base/5/16390", 8192, &["ef"]),
            file("base/5/16391", 8192, &["01"]),
            crate::basebackup::manifest::Entry {
                within: Some(crate::basebackup::manifest::Within { at: 4096, of: 8192 }),
                ..file("base/5/16392", 4096, &["23"])
            },
        ];
        m.files_examined_after_us = examined_after_us;
        m.files = vec![
            record("base/5/16384", 16384, vec![100, 200], None),
            record("base/5/16390", 8192, vec![300], Some("20261121T143200Z")),
            record("base/5/16392", 4096, vec![400], None),
        ];
        Previous::of(&m)
    }

    fn source(rel: &str) -> At<'_> {
        At {
            rel,
            is_dir: false,
            mode: 0o600,
        }
    }

    /// Taken over, a file is written with the previous backup's chunks and stored lengths, its
    /// stat, the walk's mode and the backup that read it.
    #[test]
    fn unchanged_files_are_taken_over_with_their_chunks_and_reader() {
        use crate::basebackup::manifest::Within;
        let prev = previous(Some(1000 * 1_000_000));
        let base = prev.base();
        let now = 2000 * S;
        let paths = ["base/5/16384", "base/5/16390", "base/5/16392"];
        let walk = Walk::of(
            paths
                .iter()
                .map(|p| Source {
                    rel: (*p).into(),
                    is_dir: false,
                    mode: 0o640,
                })
                .collect(),
        )
        .unwrap();
        let prior = Some((Arc::clone(&prev.files), prev.frame.id.clone()));
        let mut listing = super::super::listing::Listing::of_walk(Arc::new(walk), prior);
        for (at, (path, size)) in paths.iter().zip([16384, 8192, 4096]).enumerate() {
            let taken = base.take_over(source(path), stat(size, 900), now).unwrap();
            assert_eq!(prev.files.path(taken.at), *path);
            listing.taken_at(at, taken.at).unwrap();
        }
        listing.seal().unwrap();
        let (entries, files) = listing.lists();
        let mode = |e: Entry| Entry { mode: 0o640, ..e };
        assert_eq!(
            entries,
            [
                mode(file("base/5/16384", 16384, &["ab", "cd"])),
                mode(file("base/5/16390", 8192, &["ef"])),
                Entry {
                    within: Some(Within { at: 4096, of: 8192 }),
                    ..mode(file("base/5/16392", 4096, &["23"]))
                },
            ]
        );
        let record = |path: &str, size: u64, stored: Vec<u64>, read_by: &str| FileRecord {
            path: path.into(),
            stored,
            stat: Some(stat(size, 900)),
            read_by: Some(read_by.parse().unwrap()),
        };
        assert_eq!(
            files,
            [
                record("base/5/16384", 16384, vec![100, 200], "20261122T143200Z"),
                // Taken over twice: still named after the backup that read it.
                record("base/5/16390", 8192, vec![300], "20261121T143200Z"),
                record("base/5/16392", 4096, vec![400], "20261122T143200Z"),
            ]
        );
        assert_eq!(listing.taken_paths().count(), 3);
    }

    #[test]
    fn changed_unrecorded_or_new_files_are_read() {
        let prev = previous(Some(1000 * 1_000_000));
        let base = prev.base();
        let now = 2000 * S;
        assert_eq!(
            base.take_over(source("base/5/16384"), stat(32768, 900), now),
            None
        );
        assert_eq!(
            base.take_over(source("base/5/16384"), stat(16384, 1500), now),
            None
        );
        assert_eq!(base.take_over(source("base/5/16391"), stat(8192, 900), now), None);
        assert_eq!(base.take_over(source("base/5/99999"), stat(8192, 900), now), None);
        // The clock went back: nothing is compared.
        assert_eq!(
            base.take_over(source("base/5/16384"), stat(16384, 900), 999 * S),
            None
        );
        // A manifest from before files were reused says nothing of when it examined them.
        let old = previous(None);
        assert_eq!(
            old.base()
                .take_over(source("base/5/16384"), stat(16384, 900), now),
            None
        );
    }

    #[test]
    fn chunk_lengths_are_known_where_the_previous_backup_recorded_them() {
        let lens = previous(None).chunk_lengths();
        let hash = |c: &str| {
            let mut h = [0u8; 32];
            hex::decode_to_slice(c.repeat(32), &mut h).unwrap();
            h
        };
        assert_eq!(lens.len(), 5);
        assert_eq!(lens[&hash("23")], Some(400));
        assert_eq!(lens[&hash("ab")], Some(100));
        assert_eq!(lens[&hash("cd")], Some(200));
        assert_eq!(lens[&hash("ef")], Some(300));
        assert_eq!(lens[&hash("01")], None);
    }
}
