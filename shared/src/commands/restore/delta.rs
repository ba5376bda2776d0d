//! `restore --delta`: restore over an existing data directory (an old primary, a lagging copy),
//! rewriting only what differs from the backup.
//!
//! Two phases, the first read-only, so that nothing is written before everything is known:
//! - [`plan`] walks the existing directories without following a single link, and hashes every
//!   existing regular file in chunk-sized slices with the repository's content hash (keyed in an
//!   encrypted repository: [`Sealer::content_hash`], as `chunk_id` names chunks), comparing each
//!   slice with the manifest's chunk id.
//! - [`apply`] removes what the backup does not have (and anything of the wrong kind where the
//!   backup has a file or a directory: a link where a file goes is removed, never written
//!   through), creates missing directories and files, truncates or extends files to their size,
//!   and returns the chunks to write ([`WorkList`]), which the restore then fetches,
//!   each distinct chunk once.
//!
//! What is kept: only what the backup has. Everything else goes, as in a full restore into an
//! empty directory: `pg_wal` contents (recovery takes WAL from the archive), `postmaster.pid` and
//! `postmaster.opts` of a stopped server (a running one is refused before this), signal files,
//! `backup_label` and `tablespace_map` (the restore writes its own), `pg_tblspc` links (PostgreSQL
//! recreates them from `tablespace_map`), a previous recovery's progress files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::direct::{open_for_write, open_nofollow};
use super::placement::destination;
use super::tree::{create_dir, create_parent, create_sized};
use super::work::{PG_CONTROL, WorkList};
use super::{RestoreError, write_err};
use crate::basebackup::chunk::ChunkId;
use crate::basebackup::manifest::{EntryKind, Manifest};
use crate::basebackup::pack::Places;
use crate::repo::object::Sealer;

/// What a delta restore found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeltaReport {
    /// Existing regular files whose content was compared with the backup, chunk by chunk.
    pub files_checked: u64,
    /// Bytes of them read and hashed.
    pub bytes_hashed: u64,
    /// Files already identical to the backup's (content and mode): not touched.
    pub files_unchanged: u64,
    /// Files created: missing, or replacing what was not a regular file of its own there.
    pub files_created: u64,
    /// Chunk positions written: content that differed, was missing, or is in a created file
    /// (or fetched to be compared: below).
    pub chunks_rewritten: u64,
    /// Existing small files that share their chunk with others: nothing on disk can be compared
    /// with such a chunk's id, so the chunk is fetched and each file is compared with its slice
    /// as it arrives, and written only where it differs.
    pub files_compared_as_fetched: u64,
    /// Chunks rewritten that are stored as differences from what the file holds there (from
    /// the backup before): put back together from the file's bytes, not the repository's base.
    pub bases_on_disk: u64,
    /// Files, links and directories the backup does not have (or of the wrong kind), removed; a
    /// directory counts once, with everything in it.
    pub removed: u64,
}

/// What the existing directory holds at a path, seen without following links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    Dir,
    /// A regular file: its length, its mode, and whether another name links to it (writing in
    /// place would change that other file too).
    File {
        len: u64,
        mode: u32,
        shared: bool,
    },
    /// A symbolic link, a socket, a fifo, a device.
    Other,
}

/// How a file of the backup is made ready for its chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prepare {
    /// Created (nothing there, or what was there is removed first).
    Create,
    /// The existing regular file, truncated or extended to the backup's size.
    Resize,
}

#[derive(Debug, Clone)]
struct PlannedFile {
    /// Index of the entry in the manifest.
    entry: usize,
    dest: PathBuf,
    prepare: Prepare,
    /// Chunks to write.
    rewrite: Vec<usize>,
    /// Those of them stored as a difference whose base is what the file holds there now.
    bases_here: Vec<usize>,
    /// Whether the mode on disk differs from the backup's.
    mode_differs: bool,
}

/// Everything a delta restore will do, decided before the first write: the comparison of the
/// directory with the backup (what to remove, which chunks of which files to rewrite).
#[derive(Debug, Clone)]
pub(crate) struct DeltaComparison {
    /// Paths to remove, with whether each is a directory (removed with its contents). Never
    /// followed: a link is removed, not its target.
    remove: Vec<(PathBuf, bool)>,
    files: Vec<PlannedFile>,
    report: DeltaReport,
}

impl DeltaComparison {
    /// What the comparison found, and what applying the plan rewrites and removes.
    pub(crate) fn report(&self) -> DeltaReport {
        self.report.clone()
    }

    /// Bytes the plan writes into files.
    pub(crate) fn bytes_to_write(&self, m: &Manifest) -> u64 {
        self.files
            .iter()
            .flat_map(|f| {
                let e = &m.entries[f.entry];
                f.rewrite.iter().map(move |&i| match e.within {
                    Some(_) => e.size,
                    None => e.chunk_len(i, m.chunk_size),
                })
            })
            .sum()
    }
}

/// Walk `root` (itself followed if it is a link: the DBA named it), recording every path below
/// it by `lstat`. A link is never entered, whatever it points at.
fn scan(root: &Path, out: &mut BTreeMap<PathBuf, Found>) -> Result<(), RestoreError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir == root => return Ok(()),
            Err(e) => return Err(write_err(&dir)(e)),
        };
        for e in entries {
            let path = e.map_err(write_err(&dir))?.path();
            let meta = std::fs::symlink_metadata(&path).map_err(write_err(&path))?;
            let t = meta.file_type();
            let found = if t.is_dir() {
                stack.push(path.clone());
                Found::Dir
            } else if t.is_file() {
                Found::File {
                    len: meta.len(),
                    mode: meta.permissions().mode() & 0o7777,
                    shared: meta.nlink() > 1,
                }
            } else {
                Found::Other
            };
            out.insert(path, found);
        }
    }
    Ok(())
}

/// A non-empty directory a delta restore may rewrite: a data directory (it has `PG_VERSION`), or
/// a tablespace location (it has a `PG_<version>_<catalog>` directory). Anything else is refused,
/// as pgBackRest does: a mistyped `--pgdata` must not have its contents replaced.
fn check_restorable(dir: &Path, is_tablespace: bool) -> Result<(), RestoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(write_err(dir)(e)),
    };
    let names: Vec<std::ffi::OsString> = entries
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(write_err(dir))?;
    let looks_right = names.is_empty()
        || if is_tablespace {
            names.iter().any(|n| n.to_string_lossy().starts_with("PG_"))
        } else {
            names.iter().any(|n| n == "PG_VERSION")
        };
    if looks_right {
        Ok(())
    } else {
        Err(RestoreError::NotRestorable {
            dir: dir.display().to_string(),
            what: if is_tablespace {
                "a tablespace location (no PG_<version> directory)"
            } else {
                "a PostgreSQL data directory (no PG_VERSION)"
            },
        })
    }
}

/// Decide what a delta restore of `m` into `pgdata` (and the tablespace locations `spaces`)
/// does. Reads only.
pub(crate) async fn plan(
    sealer: &Sealer,
    m: &Manifest,
    pgdata: &Path,
    spaces: &BTreeMap<u32, PathBuf>,
) -> Result<DeltaComparison, RestoreError> {
    check_restorable(pgdata, false)?;
    for location in spaces.values() {
        check_restorable(location, true)?;
    }
    let mut found = BTreeMap::new();
    scan(pgdata, &mut found)?;
    for location in spaces.values() {
        scan(location, &mut found)?;
    }
    let wanted = Wanted::of(m, pgdata, spaces);
    let (remove, candidates) = sort_existing(m, &found, &wanted);
    let compared = compare_all(sealer, m, candidates, COMPARE_SLICE).await?;
    let mut report = DeltaReport {
        removed: remove.len() as u64,
        ..DeltaReport::default()
    };
    let files = plan_files(m, pgdata, spaces, compared, &mut report);
    Ok(DeltaComparison {
        remove,
        files,
        report,
    })
}

/// Where the backup puts things.
struct Wanted {
    /// What must be a directory: the backup's directories and every parent of its entries.
    dirs: BTreeSet<PathBuf>,
    /// Each file of the backup, with the index of its entry.
    files: BTreeMap<PathBuf, usize>,
}

impl Wanted {
    fn of(m: &Manifest, pgdata: &Path, spaces: &BTreeMap<u32, PathBuf>) -> Wanted {
        let roots: BTreeSet<PathBuf> = std::iter::once(pgdata.to_path_buf())
            .chain(spaces.values().cloned())
            .collect();
        let mut wanted = Wanted {
            dirs: BTreeSet::new(),
            files: BTreeMap::new(),
        };
        for (i, e) in m.entries.iter().enumerate() {
            let dest = destination(pgdata, spaces, &e.path);
            // The parents between the entry and its root (the data directory or its location).
            for parent in dest.ancestors().skip(1) {
                if roots.contains(parent) || !roots.iter().any(|r| parent.starts_with(r)) {
                    break;
                }
                wanted.dirs.insert(parent.to_path_buf());
            }
            match e.kind {
                EntryKind::Dir => {
                    wanted.dirs.insert(dest);
                }
                EntryKind::File => {
                    wanted.files.insert(dest, i);
                }
            }
        }
        wanted
    }
}

/// An existing regular file where the backup has one: compared chunk by chunk.
struct Candidate {
    /// Index of the backup's entry.
    entry: usize,
    dest: PathBuf,
    len: u64,
    mode: u32,
}

/// Sort what exists into what is removed (with whether it is a directory, which goes with all
/// it holds) and the files compared with the backup's. Kept: the directories the backup wants,
/// and its regular files that no other name links to, except `pg_control`.
fn sort_existing(
    m: &Manifest,
    found: &BTreeMap<PathBuf, Found>,
    wanted: &Wanted,
) -> (Vec<(PathBuf, bool)>, Vec<Candidate>) {
    let mut remove: Vec<(PathBuf, bool)> = Vec::new();
    let mut candidates = Vec::new();
    // Sorted: a directory comes before what it holds, so removing it covers its contents.
    let mut removed_dir: Option<PathBuf> = None;
    for (path, kind) in found {
        if removed_dir.as_ref().is_some_and(|d| path.starts_with(d)) {
            continue;
        }
        let keep = match (kind, wanted.files.get(path)) {
            (Found::Dir, _) => wanted.dirs.contains(path),
            (Found::File { len, mode, shared }, Some(&i)) => {
                // pg_control is always written afresh, last (see `WorkList::pg_control`).
                let ok = !shared && m.entries[i].path != PG_CONTROL;
                if ok {
                    candidates.push(Candidate {
                        entry: i,
                        dest: path.clone(),
                        len: *len,
                        mode: *mode,
                    });
                }
                ok
            }
            _ => false,
        };
        if !keep {
            let is_dir = *kind == Found::Dir;
            if is_dir {
                removed_dir = Some(path.clone());
            }
            remove.push((path.clone(), is_dir));
        }
    }
    (remove, candidates)
}

/// A candidate compared with the backup's file.
struct Compared {
    dest: PathBuf,
    /// Its length and mode on disk.
    len: u64,
    mode: u32,
    /// Bytes read and hashed.
    hashed: u64,
    /// The chunks whose content differs or is missing.
    differ: Vec<usize>,
    /// Those of them stored as a difference ([`crate::basebackup::manifest::Delta`]) whose base
    /// the file holds at their place: the restore reads it there rather than from the
    /// repository (a cluster restored over the directory of the backup before).
    bases_here: Vec<usize>,
}

/// Bytes of a file compared by one task at most: a large file (a relation's 1 GiB segment) is
/// compared by every core at once, each reading its own slice, rather than by one core while the
/// others are idle (pgbench scale 50's table was half a delta restore's time, read and hashed by
/// one thread).
const COMPARE_SLICE: u64 = 32 << 20;

/// Compare each candidate with the backup's chunks, in slices of `slice_bytes` (at least a
/// chunk), as many at once as there are cores (reading and hashing is the work). By entry index.
async fn compare_all(
    sealer: &Sealer,
    m: &Manifest,
    candidates: Vec<Candidate>,
    slice_bytes: u64,
) -> Result<BTreeMap<usize, Compared>, RestoreError> {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let permits = Arc::new(Semaphore::new(workers));
    let mut tasks: JoinSet<Result<(usize, Compared), RestoreError>> = JoinSet::new();
    let chunk_size = m.chunk_size;
    let per_slice = usize::try_from(slice_bytes / chunk_size.max(1))
        .unwrap_or(1)
        .max(1);
    let places = Arc::new(m.places());
    let mut compared = BTreeMap::new();
    for c in candidates {
        let e = &m.entries[c.entry];
        let (size, shared) = (e.size, e.within.is_some());
        let chunks: Arc<[ChunkId]> = e.chunks.clone().into();
        // A small file's shared chunk names the bytes of its neighbours too: nothing on disk
        // can be compared with it. The file is compared with its slice as the chunk arrives
        // (`FileToWrite::compare`), and written only where it differs.
        let n = if shared { 0 } else { chunks.len() };
        let mut start = 0;
        loop {
            let slice = start..n.min(start + per_slice);
            let permit = Arc::clone(&permits)
                .acquire_owned()
                .await
                .expect("semaphore is never closed");
            let (sealer, chunks, places) = (sealer.clone(), Arc::clone(&chunks), Arc::clone(&places));
            let (entry, dest, len, mode) = (c.entry, c.dest.clone(), c.len, c.mode);
            tasks.spawn_blocking(move || {
                let (hashed, differ, bases_here) = match shared {
                    true => (0, vec![0], vec![]),
                    false => compare(&sealer, &places, &dest, (len, size, chunk_size), &chunks, slice)?,
                };
                drop(permit);
                let c = Compared {
                    dest,
                    len,
                    mode,
                    hashed,
                    differ,
                    bases_here,
                };
                Ok((entry, c))
            });
            while let Some(r) = tasks.try_join_next() {
                merge(&mut compared, r.expect("hash task panicked")?);
            }
            start += per_slice;
            if start >= n {
                break;
            }
        }
    }
    while let Some(r) = tasks.join_next().await {
        merge(&mut compared, r.expect("hash task panicked")?);
    }
    for c in compared.values_mut() {
        c.differ.sort_unstable();
        c.bases_here.sort_unstable();
    }
    Ok(compared)
}

/// One slice of a file compared, added to what the file's other slices found.
fn merge(compared: &mut BTreeMap<usize, Compared>, (entry, slice): (usize, Compared)) {
    match compared.entry(entry) {
        std::collections::btree_map::Entry::Vacant(v) => {
            v.insert(slice);
        }
        std::collections::btree_map::Entry::Occupied(mut o) => {
            let c = o.get_mut();
            c.hashed += slice.hashed;
            c.differ.extend(slice.differ);
            c.bases_here.extend(slice.bases_here);
        }
    }
}

/// Each file of the backup, in manifest order: compared and identical (counted, left alone),
/// compared and rewritten in place where it differs, or created whole. Counts them in `report`.
fn plan_files(
    m: &Manifest,
    pgdata: &Path,
    spaces: &BTreeMap<u32, PathBuf>,
    mut compared: BTreeMap<usize, Compared>,
    report: &mut DeltaReport,
) -> Vec<PlannedFile> {
    let mut planned = Vec::new();
    for (i, e) in m.entries.iter().enumerate() {
        if e.kind != EntryKind::File {
            continue;
        }
        let p = match compared.remove(&i) {
            Some(c) => {
                if e.within.is_some() {
                    report.files_compared_as_fetched += 1;
                } else {
                    report.files_checked += 1;
                }
                report.bytes_hashed += c.hashed;
                let mode_differs = c.mode != e.mode & 0o7777;
                if c.differ.is_empty() && !mode_differs && c.len == e.size {
                    report.files_unchanged += 1;
                    continue;
                }
                PlannedFile {
                    entry: i,
                    dest: c.dest,
                    prepare: Prepare::Resize,
                    rewrite: c.differ,
                    bases_here: c.bases_here,
                    mode_differs,
                }
            }
            None => {
                report.files_created += 1;
                PlannedFile {
                    entry: i,
                    dest: destination(pgdata, spaces, &e.path),
                    prepare: Prepare::Create,
                    rewrite: (0..e.chunks.len()).collect(),
                    bases_here: vec![],
                    mode_differs: true,
                }
            }
        };
        report.chunks_rewritten += p.rewrite.len() as u64;
        report.bases_on_disk += p.bases_here.len() as u64;
        planned.push(p);
    }
    planned
}

/// Compare the existing file `dest` (`len` bytes) with the backup's `chunks` of a file of `size`
/// bytes, those of `slice` (indexes): the bytes hashed, the indexes of the chunks whose content
/// differs or is missing, and those of them stored as a difference from what the file holds
/// there ([`Compared::bases_here`]).
fn compare(
    sealer: &Sealer,
    places: &Places,
    dest: &Path,
    (len, size, chunk_size): (u64, u64, u64),
    chunks: &[ChunkId],
    slice: std::ops::Range<usize>,
) -> Result<(u64, Vec<usize>, Vec<usize>), RestoreError> {
    use std::os::unix::fs::FileExt;
    let file = open_nofollow(dest, false)?;
    let mut buf = vec![0u8; usize::try_from(chunk_size.min(size.min(len))).unwrap_or(0)];
    let (mut hashed, mut differ, mut bases_here) = (0u64, Vec::new(), Vec::new());
    for (idx, id) in chunks.iter().enumerate().take(slice.end).skip(slice.start) {
        let offset = idx as u64 * chunk_size;
        let want = chunk_size.min(size - offset);
        if offset + want > len {
            // Not (wholly) there: written from the repository.
            differ.push(idx);
            continue;
        }
        let slice = &mut buf[..want as usize];
        file.read_exact_at(slice, offset).map_err(write_err(dest))?;
        hashed += want;
        let found = sealer.content_hash(slice);
        if found != *id.hash() {
            differ.push(idx);
            if places.delta(id).is_some_and(|d| *d.base.hash() == found) {
                bases_here.push(idx);
            }
        }
    }
    Ok((hashed, differ, bases_here))
}

/// Carry out the plan's changes to the directory tree, leaving every file of the plan at its
/// size; returns the chunks to write. `global/pg_control` is removed first: from then until the
/// restore completes, no server can start on the directory.
pub(crate) fn apply(
    plan: DeltaComparison,
    m: &Manifest,
    pgdata: &Path,
    spaces: &BTreeMap<u32, PathBuf>,
) -> Result<(WorkList, DeltaReport), RestoreError> {
    let control = pgdata.join(PG_CONTROL);
    let mut remove = plan.remove;
    remove.sort_by_key(|(p, _)| *p != control);
    for (path, is_dir) in &remove {
        let r = if *is_dir {
            // remove_dir_all never follows a link inside.
            std::fs::remove_dir_all(path)
        } else {
            std::fs::remove_file(path)
        };
        match r {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(write_err(path)(e)),
            _ => {}
        }
    }
    create_dir(pgdata, 0o700)?;
    for e in m.entries.iter().filter(|e| e.kind == EntryKind::Dir) {
        let dest = destination(pgdata, spaces, &e.path);
        create_parent(&dest)?;
        create_dir(&dest, e.mode)?;
    }
    let mut fill = WorkList::default();
    for f in plan.files {
        let e = &m.entries[f.entry];
        match f.prepare {
            Prepare::Create => {
                create_parent(&f.dest)?;
                create_sized(&f.dest, e.size)?;
            }
            Prepare::Resize => {
                use std::os::unix::fs::PermissionsExt;
                // A small file compared as its chunk arrives keeps its mode unless it must change
                // (it is written only if it differs, and its owner can write it).
                let compared_as_fetched = e.within.is_some() && !f.mode_differs && e.mode & 0o200 != 0;
                if (!f.rewrite.is_empty() || f.mode_differs) && !compared_as_fetched {
                    // Owner-writable while it is rewritten; `fill` sets the backup's mode after.
                    let file = open_nofollow(&f.dest, false)?;
                    file.set_permissions(std::fs::Permissions::from_mode(0o600))
                        .map_err(write_err(&f.dest))?;
                }
                open_for_write(&f.dest)?
                    .set_len(e.size)
                    .map_err(write_err(&f.dest))?;
            }
        }
        for &idx in &f.bases_here {
            fill.base_here(e.chunks[idx], f.dest.clone(), idx as u64 * m.chunk_size);
        }
        fill.add(e, f.dest, false, f.rewrite.into_iter(), m.chunk_size);
    }
    Ok((fill, plan.report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::basebackup::chunk::chunk_id;
    use crate::basebackup::manifest::Entry;

    /// A large file is compared by several tasks, each its own slice: together they find what
    /// one pass finds, every differing chunk in order, whichever slice ends first; chunks past
    /// the end of the file on disk differ; every byte on disk is hashed once.
    #[tokio::test]
    async fn a_file_compared_in_slices_finds_each_differing_chunk_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = Sealer::plain();
        let mut m = super::super::testing::fixture();
        m.chunk_size = 4096;
        let on_disk: Vec<u8> = (0..10 * 4096u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut backed = on_disk.clone();
        for at in [0usize, 3, 4, 9] {
            backed[at * 4096 + 100] ^= 1;
        }
        backed.extend_from_slice(&[5u8; 2 * 4096 - 10]);
        m.entries = vec![Entry {
            within: None,
            path: "base/1/1234".into(),
            kind: EntryKind::File,
            mode: 0o600,
            size: backed.len() as u64,
            chunks: backed.chunks(4096).map(|c| chunk_id(&sealer, c)).collect(),
        }];
        let dest = dir.path().join("1234");
        std::fs::write(&dest, &on_disk).unwrap();
        for slice in [4096, 3 * 4096, 1 << 30] {
            let candidates = vec![Candidate {
                entry: 0,
                dest: dest.clone(),
                len: on_disk.len() as u64,
                mode: 0o600,
            }];
            let found = compare_all(&sealer, &m, candidates, slice).await.unwrap();
            let c = &found[&0];
            assert_eq!(c.differ, vec![0, 3, 4, 9, 10, 11], "slices of {slice} bytes");
            assert_eq!(c.hashed, on_disk.len() as u64, "slices of {slice} bytes");
            assert!(c.bases_here.is_empty());
        }
    }
}
