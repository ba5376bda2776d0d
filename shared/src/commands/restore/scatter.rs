//! Fetch each distinct chunk once and write it at every position that references it.
//!
//! A backup references a chunk as many times as its content occurs: a relation full of zeroed
//! pages, identical files in several databases (`template0`, `template1` and `postgres` share most
//! of theirs), a file copied twice. Fetching per reference would read such a chunk from the store
//! as many times; [`group`] turns the references into one [`Group`] per chunk id, and
//! [`fetch_and_scatter`] fetches each group once and `pwrite`s it to all its positions.
//!
//! Bounded: at most `parallel` + [`WAITING_IN_FLIGHT`] chunks are in memory and files open at
//! once (a file is opened for the run of consecutive positions of one group that fall into it,
//! then closed), whatever the number of files.
//!
//! Also here: a file's chunk references listed for the fill ([`add_refs`]), and one chunk read
//! and verified ([`fetch_chunk`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{Progress, RestoreError, SyncMethod, write_err};
use crate::basebackup::chunk::{Chunk, ChunkError, ChunkId, MisnamedChunk};
use crate::basebackup::manifest::Entry;
use crate::repo::Store;
use crate::repo::object::{ObjectError, Sealer};
use crate::repo::stored::{self, Damage, StoredKind};

/// Where one reference to a chunk goes: a file (index into the files [`fetch_and_scatter`] is
/// given) and the byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    pub file: usize,
    pub offset: u64,
}

/// One distinct chunk: its id, its length, and every position it goes to (in reference order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Group {
    pub id: ChunkId,
    pub len: u64,
    pub positions: Vec<Position>,
}

/// One reference, as a plan lists it: chunk `id`, `len` bytes, at `at`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reference<'a> {
    pub id: &'a ChunkId,
    pub len: u64,
    pub at: Position,
}

/// Group references by chunk id, in the order of each id's first reference (file order for a
/// manifest, which keeps the writes close to sequential). The same id with two lengths is a
/// contradiction no honest manifest holds (the id names the content, so its length): refused
/// before anything is fetched or written.
pub(crate) fn group<'a>(
    refs: impl IntoIterator<Item = Reference<'a>>,
    files: &[PathBuf],
) -> Result<Vec<Group>, RestoreError> {
    let mut index: HashMap<&'a ChunkId, usize> = HashMap::new();
    let mut groups: Vec<Group> = Vec::new();
    for r in refs {
        match index.get(r.id) {
            Some(&i) => {
                let g = &mut groups[i];
                if g.len != r.len {
                    let at = files
                        .get(r.at.file)
                        .map(|p| p.display().to_string())
                        .unwrap_or_default();
                    return Err(RestoreError::Corrupt(format!(
                        "chunk {} is referenced as {} bytes and as {} bytes (at offset {} of {at})",
                        r.id, g.len, r.len, r.at.offset
                    )));
                }
                g.positions.push(r.at);
            }
            None => {
                index.insert(r.id, groups.len());
                groups.push(Group {
                    id: *r.id,
                    len: r.len,
                    positions: vec![r.at],
                });
            }
        }
    }
    Ok(groups)
}

/// What [`fetch_and_scatter`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Scattered {
    /// Distinct chunks fetched from the store.
    pub chunks_fetched: u64,
    /// Their bytes, decompressed.
    pub bytes_fetched: u64,
    /// Bytes written into files (each chunk times its positions).
    pub bytes_written: u64,
}

/// Chunks in flight beyond `--parallel`: fetches waiting on the store and writes waiting on the
/// disk take no CPU, so they overlap the `parallel` decompressions. Measured on this 2-core
/// machine with `--parallel 2` (bench/rivals.py, pgbench scale 50): without them a restore took
/// 2.9 s from file:// and 17 s from Garage through TLS, latency-bound.
pub const WAITING_IN_FLIGHT: usize = 16;

/// Fetch every group once, `parallel` decompressing at a time (and [`WAITING_IN_FLIGHT`] more
/// waiting on the store or the disk), and write it at each of its positions in `files`, which
/// must exist as regular files (see [`open_for_write`]). Files are not synced here: the caller
/// syncs each once, after all its chunks landed.
pub(crate) async fn fetch_and_scatter(
    store: &Store,
    sealer: &Sealer,
    files: Arc<Vec<PathBuf>>,
    groups: Vec<Group>,
    parallel: usize,
    progress: Arc<dyn Progress>,
) -> Result<Scattered, RestoreError> {
    let permits = Arc::new(Semaphore::new(parallel.max(1) + WAITING_IN_FLIGHT));
    let cpu = Arc::new(Semaphore::new(parallel.max(1)));
    let mut tasks: JoinSet<Result<Scattered, RestoreError>> = JoinSet::new();
    let mut done = Scattered::default();
    let add = |done: &mut Scattered, s: Scattered| {
        done.chunks_fetched += s.chunks_fetched;
        done.bytes_fetched += s.bytes_fetched;
        done.bytes_written += s.bytes_written;
    };
    for g in groups {
        let permit = Arc::clone(&permits)
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        let (store, sealer, files, progress, cpu) = (
            store.clone(),
            sealer.clone(),
            Arc::clone(&files),
            Arc::clone(&progress),
            Arc::clone(&cpu),
        );
        tasks.spawn(async move {
            let first = &files[g.positions[0].file];
            let data = fetch_chunk(&store, &sealer, &g.id, g.len, first, &cpu).await?;
            let written = tokio::task::spawn_blocking(move || {
                let written = write_positions(&files, &data, &g.positions, &*progress)?;
                drop(permit);
                Ok::<_, RestoreError>(written)
            })
            .await
            .expect("write task panicked")?;
            Ok(Scattered {
                chunks_fetched: 1,
                bytes_fetched: g.len,
                bytes_written: written,
            })
        });
        while let Some(r) = tasks.try_join_next() {
            add(&mut done, r.expect("restore task panicked")?);
        }
    }
    while let Some(r) = tasks.join_next().await {
        add(&mut done, r.expect("restore task panicked")?);
    }
    Ok(done)
}

/// Write `data` at each position, opening each file once per run of positions in it.
fn write_positions(
    files: &[PathBuf],
    data: &[u8],
    positions: &[Position],
    progress: &dyn Progress,
) -> Result<u64, RestoreError> {
    use std::os::unix::fs::FileExt;
    let mut open: Option<(usize, std::fs::File)> = None;
    let mut written = 0u64;
    for p in positions {
        let path = &files[p.file];
        let file = match &open {
            Some((i, f)) if *i == p.file => f,
            _ => {
                open = Some((p.file, open_for_write(path)?));
                &open.as_ref().expect("just set").1
            }
        };
        file.write_all_at(data, p.offset).map_err(write_err(path))?;
        written += data.len() as u64;
        progress.advance(data.len() as u64);
    }
    Ok(written)
}

/// Open an existing regular file for writing, never through a symbolic link (`O_NOFOLLOW`): the
/// plan checked each file's type before writing, and a link planted since must fail, not be
/// written through.
pub(crate) fn open_for_write(path: &std::path::Path) -> Result<std::fs::File, RestoreError> {
    open_nofollow(path, true)
}

/// Open `path` for reading, or writing, never through a symbolic link.
pub(crate) fn open_nofollow(path: &std::path::Path, write: bool) -> Result<std::fs::File, RestoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(write_err(path))
}

/// The files a restore fills and the chunk references to write into them.
#[derive(Debug, Default)]
pub(crate) struct Fill {
    /// Each file's destination and mode; the file exists, at its final size.
    pub files: Vec<(PathBuf, u32)>,
    /// (file index, chunk index in the manifest entry, chunk id, length).
    pub refs: Vec<(usize, u64, ChunkId, u64)>,
    /// The file written after every other one is synced: `global/pg_control`. Until it lands the
    /// directory cannot be started, so a restore that fails half-way never looks like a cluster.
    pub last: Option<usize>,
}

/// Write every reference of `fill` (each distinct chunk fetched once), then set each file's mode
/// and make it durable (`sync`); then run `before_last`; the `last` file after all of that.
pub(crate) async fn fill(
    store: &Store,
    sealer: &Sealer,
    fill: Fill,
    chunk_size: u64,
    (parallel, sync): (usize, SyncMethod),
    before_last: impl FnOnce() -> Result<(), RestoreError>,
    progress: Arc<dyn Progress>,
) -> Result<Scattered, RestoreError> {
    let (paths, modes): (Vec<PathBuf>, Vec<u32>) = fill.files.into_iter().unzip();
    let paths = Arc::new(paths);
    fn reference(r: &(usize, u64, ChunkId, u64), chunk_size: u64) -> Reference<'_> {
        Reference {
            id: &r.2,
            len: r.3,
            at: Position {
                file: r.0,
                offset: r.1 * chunk_size,
            },
        }
    }
    let is_last = |r: &&(usize, u64, ChunkId, u64)| Some(r.0) == fill.last;
    // Both groupings before the first fetch: a contradiction anywhere is refused up front.
    let early = group(
        fill.refs
            .iter()
            .filter(|r| !is_last(r))
            .map(|r| reference(r, chunk_size)),
        &paths,
    )?;
    let late = group(
        fill.refs.iter().filter(is_last).map(|r| reference(r, chunk_size)),
        &paths,
    )?;
    let mut done = fetch_and_scatter(
        store,
        sealer,
        Arc::clone(&paths),
        early,
        parallel,
        Arc::clone(&progress),
    )
    .await?;
    let all: Vec<usize> = (0..paths.len()).filter(|i| Some(*i) != fill.last).collect();
    match sync {
        // Syncing waits on the disk: as many at once as chunks may wait.
        SyncMethod::Fsync => finish(&paths, &modes, all, parallel + WAITING_IN_FLIGHT).await?,
        SyncMethod::Syncfs => {
            let paths = Arc::clone(&paths);
            let modes = modes.clone();
            tokio::task::spawn_blocking(move || set_modes_and_syncfs(&paths, &modes, &all))
                .await
                .expect("sync task panicked")?
        }
    }
    before_last()?;
    if let Some(last) = fill.last {
        let s = fetch_and_scatter(store, sealer, Arc::clone(&paths), late, 1, progress).await?;
        done.chunks_fetched += s.chunks_fetched;
        done.bytes_fetched += s.bytes_fetched;
        done.bytes_written += s.bytes_written;
        finish(&paths, &modes, vec![last], 1).await?;
    }
    Ok(done)
}

/// Set the modes of files `which`, then `syncfs` each file system that holds one of them: once
/// that returns, every byte and name written there is durable, whatever the number of files.
fn set_modes_and_syncfs(paths: &[PathBuf], modes: &[u32], which: &[usize]) -> Result<(), RestoreError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut dirs: std::collections::BTreeSet<&std::path::Path> = std::collections::BTreeSet::new();
    for &i in which {
        let path = &paths[i];
        let file = open_nofollow(path, false)?;
        file.set_permissions(std::fs::Permissions::from_mode(modes[i] & 0o7777))
            .map_err(write_err(path))?;
        dirs.extend(path.parent());
    }
    let mut devices = std::collections::BTreeSet::new();
    for dir in dirs {
        let d = std::fs::File::open(dir).map_err(write_err(dir))?;
        let dev = d.metadata().map_err(write_err(dir))?.dev();
        if devices.insert(dev) {
            rustix::fs::syncfs(&d).map_err(|e| write_err(dir)(e.into()))?;
        }
    }
    Ok(())
}

/// Sync files `which` and set their modes, `parallel` files at a time (one open at a time each).
async fn finish(
    paths: &Arc<Vec<PathBuf>>,
    modes: &[u32],
    which: Vec<usize>,
    parallel: usize,
) -> Result<(), RestoreError> {
    let per_task = which.len().div_ceil(parallel.max(1)).max(1);
    let mut tasks: JoinSet<Result<(), RestoreError>> = JoinSet::new();
    for part in which.chunks(per_task) {
        let work: Vec<(usize, u32)> = part.iter().map(|&i| (i, modes[i])).collect();
        let paths = Arc::clone(paths);
        tasks.spawn_blocking(move || {
            use std::os::unix::fs::PermissionsExt;
            for (i, mode) in work {
                let path = &paths[i];
                // Read-only is enough to sync (and to chmod through the descriptor).
                let file = open_nofollow(path, false)?;
                file.sync_all().map_err(write_err(path))?;
                file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(write_err(path))?;
            }
            Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("sync task panicked")?;
    }
    Ok(())
}

/// The file a server cannot start without, written last (see [`Fill::last`]).
pub(crate) const PG_CONTROL: &str = "global/pg_control";

/// Add chunks `which` of file entry `e` (the next file of `fill`) to `fill`'s references.
pub(crate) fn add_refs(fill: &mut Fill, e: &Entry, which: impl Iterator<Item = usize>, chunk_size: u64) {
    let file = fill.files.len();
    for idx in which {
        let offset = idx as u64 * chunk_size;
        // validate() checked the chunk count against the size: offset < size.
        let len = chunk_size.min(e.size - offset);
        fill.refs.push((file, idx as u64, e.chunks[idx], len));
    }
}

/// Read chunk `id`, which the manifest says holds `expected` bytes of `path`, and verify it. The
/// header's length is compared before decompressing, so a hostile chunk object cannot make the
/// restore allocate more than the chunk size (times `--parallel`); the rest is the typed read of a
/// [`Chunk`] (envelope, hash, and that the content is what the id names).
async fn fetch_chunk(
    store: &Store,
    sealer: &Sealer,
    id: &ChunkId,
    expected: u64,
    path: &std::path::Path,
    cpu: &tokio::sync::Semaphore,
) -> Result<Vec<u8>, RestoreError> {
    let bytes = store
        .get(&Chunk::key(id))
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
    let (id_owned, sealer) = (*id, sealer.clone());
    // Decompressing and hashing is the CPU's share: `--parallel` chunks at once.
    let _cpu = cpu.acquire().await.expect("semaphore is never closed");
    let opened = tokio::task::spawn_blocking(move || stored::open::<Chunk>(&sealer, &id_owned, &bytes))
        .await
        .expect("chunk decoding panicked");
    match opened {
        Ok(Chunk(content)) => Ok(content),
        Err(Damage::Envelope(e)) => Err(corrupt(e).into()),
        Err(Damage::Content(MisnamedChunk { found })) => Err(corrupt(ObjectError::ContentHash {
            expected: id.to_string(),
            found,
        })
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunk ids by name, for reading the tests.
    const ZERO: ChunkId = ChunkId::from_hash([0; 32]);
    const ONE: ChunkId = ChunkId::from_hash([1; 32]);
    const TAIL: ChunkId = ChunkId::from_hash([0x7a; 32]);

    fn r(id: &ChunkId, len: u64, file: usize, offset: u64) -> Reference<'_> {
        Reference {
            id,
            len,
            at: Position { file, offset },
        }
    }

    #[test]
    fn references_are_grouped_by_id_in_first_reference_order() {
        let files = vec![PathBuf::from("a"), PathBuf::from("b")];
        let groups = group(
            [
                r(&ZERO, 8, 0, 0),
                r(&ONE, 8, 0, 8),
                r(&ZERO, 8, 0, 16),
                r(&ZERO, 8, 1, 0),
                r(&TAIL, 3, 1, 8),
            ],
            &files,
        )
        .unwrap();
        let summary: Vec<(ChunkId, Vec<(usize, u64)>)> = groups
            .iter()
            .map(|g| (g.id, g.positions.iter().map(|p| (p.file, p.offset)).collect()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (ZERO, vec![(0, 0), (0, 16), (1, 0)]),
                (ONE, vec![(0, 8)]),
                (TAIL, vec![(1, 8)]),
            ]
        );
    }

    #[test]
    fn one_id_with_two_lengths_is_refused() {
        let files = vec![PathBuf::from("/data/base/1/1259")];
        let err = group([r(&ONE, 8, 0, 0), r(&ONE, 3, 0, 8)], &files).unwrap_err();
        assert!(
            err.to_string().contains("referenced as 8 bytes and as 3 bytes"),
            "{err}"
        );
        assert!(err.to_string().contains("/data/base/1/1259"), "{err}");
    }
}
