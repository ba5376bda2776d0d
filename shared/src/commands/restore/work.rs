//! A restore's work list: the files it writes ([`FileToWrite`]) and the chunk references to
//! write into them ([`WorkList`]), built from the manifest by the executor (a whole backup) or by
//! [`super::delta`] (what differs); then cut into the batches the pipeline writes, with the
//! decision, for each reference, whether it fetches its chunk or reuses one an earlier reference
//! kept ([`sources`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::RestoreError;
use super::budget::{OPEN_FILES, REPEAT_BUDGET};
use super::order::{ChunkRef, in_pack_order};
use crate::basebackup::chunk::ChunkId;
use crate::basebackup::manifest::Entry;
use crate::basebackup::pack::Places;

/// The file a server cannot start without, written last (see [`WorkList::pg_control`]).
pub(crate) const PG_CONTROL: &str = "global/pg_control";

/// One file a restore writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileToWrite {
    pub path: PathBuf,
    /// The mode the file ends with (set before it is synced).
    pub mode: u32,
    /// Its size once written.
    pub size: u64,
    /// Create it (it must not exist: never follows or replaces anything); otherwise it exists
    /// at its size and is opened without following a link (`--delta`).
    pub create: bool,
    /// An existing file (`--delta`) the plan could not compare with the backup: a small file
    /// sharing its chunk, whose id names its neighbours' bytes too. Its bytes on disk are
    /// compared with the backup's as they arrive, and written only where they differ.
    pub compare: bool,
}

/// The files a restore writes and the chunk references to write into them.
#[derive(Debug, Default)]
pub(crate) struct WorkList {
    pub files: Vec<FileToWrite>,
    /// In file order, and within a file in chunk order (as [`add_file`] adds them).
    pub refs: Vec<ChunkRef>,
    /// `global/pg_control`, written after every other file is durable. Until it lands the
    /// directory cannot be started, so a restore that fails half-way never looks like a
    /// cluster.
    pub pg_control: Option<usize>,
    /// The data directory and every tablespace directory: with `--sync-method syncfs`, their
    /// file systems are synced even when no file is written (a `--delta` that only removed).
    pub roots: Vec<PathBuf>,
    /// Chunks stored as differences whose base a file being rewritten holds (`--delta`): the
    /// file and the offset to read it at ([`BasesHere`]).
    pub bases_here: BasesHere,
}

/// Chunks stored as a difference whose base is on disk, in a file a delta restore rewrites: the
/// file and the offset of the chunk's place. The base is read there, before the chunk is written
/// over it (a place is written only with its own chunk, once that is put back together), rather
/// than from the repository; a restore checks what it puts back together against the chunk's id,
/// and reads the base from the repository when the bytes on disk do not give it.
pub(crate) type BasesHere = HashMap<ChunkId, (PathBuf, u64)>;

impl WorkList {
    /// Add file entry `e` at `dest`, with its chunks `which` to write; `create`: see
    /// [`FileToWrite::create`]. `global/pg_control` becomes [`WorkList::pg_control`].
    pub(crate) fn add(
        &mut self,
        e: &Entry,
        dest: PathBuf,
        create: bool,
        which: impl Iterator<Item = usize>,
        chunk_size: u64,
    ) {
        let file = self.files.len();
        for idx in which {
            // validate() checked the chunk count against the size.
            self.refs.push(ChunkRef {
                file,
                index: idx as u64,
                id: e.chunks[idx],
                len: e.chunk_len(idx, chunk_size),
                within: e.within.map(|w| w.at),
            });
        }
        if e.path == PG_CONTROL {
            self.pg_control = Some(file);
        }
        self.files.push(FileToWrite {
            path: dest,
            mode: e.mode,
            size: e.size,
            create,
            compare: !create && e.within.is_some(),
        });
    }

    /// Chunk `id`, stored as a difference, may read its base from `file` at `offset`.
    pub(crate) fn base_here(&mut self, id: ChunkId, file: PathBuf, offset: u64) {
        self.bases_here.entry(id).or_insert((file, offset));
    }

    /// The work in the two batches a restore writes one after the other: every file but
    /// `global/pg_control`, in the order the packs hold their chunks, each chunk fetched once
    /// while it fits in [`REPEAT_BUDGET`]; then `global/pg_control` alone (none if the backup has
    /// none). A contradiction anywhere is refused before anything is fetched.
    pub(crate) fn into_batches(self, places: &Places) -> Result<(Batch, Option<Batch>), RestoreError> {
        let WorkList {
            files,
            refs,
            pg_control,
            roots,
            bases_here: _,
        } = self;
        let (early, late) = split_last(refs, &files, pg_control, places)?;
        let files = Arc::new(files);
        let first = Batch {
            files: Arc::clone(&files),
            which: (0..files.len()).filter(|&i| Some(i) != pg_control).collect(),
            refs: early,
            roots,
        };
        let last = pg_control.map(|i| Batch {
            files,
            which: vec![i],
            // Kept bytes are not carried over: pg_control fetches what it needs.
            refs: late
                .into_iter()
                .map(|r| (r, Source::Fetch { keep: false }))
                .collect(),
            roots: vec![],
        });
        Ok((first, last))
    }
}

/// Files written together by the pipeline ([`super::pipeline::write`]).
#[derive(Debug)]
pub(crate) struct Batch {
    /// Every file of the restore (references name them by index).
    pub files: Arc<Vec<FileToWrite>>,
    /// The files this batch writes, those without a reference (empty files) included.
    pub which: Vec<usize>,
    /// Their references in write order, each with where its bytes come from.
    pub refs: Planned,
    /// The directories whose file systems `--sync-method syncfs` syncs (see
    /// [`WorkList::roots`]).
    pub roots: Vec<PathBuf>,
}

/// References in write order, each with where its bytes come from.
type Planned = Vec<(ChunkRef, Source)>;

/// Where a reference's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Fetched from the store; `keep`: kept for a later reference.
    Fetch { keep: bool },
    /// The bytes an earlier reference fetched and kept; `last`: no later reference needs them.
    Kept { last: bool },
}

/// Decide, for each reference in order, whether it fetches or reuses what an earlier one kept,
/// keeping at most `budget` bytes at any time.
pub(crate) fn sources(refs: &[ChunkRef], budget: u64) -> Vec<Source> {
    let mut left: HashMap<&ChunkId, usize> = HashMap::new();
    for r in refs {
        *left.entry(&r.id).or_default() += 1;
    }
    let mut kept: HashMap<&ChunkId, u64> = HashMap::new();
    let mut kept_bytes = 0u64;
    let mut out = Vec::with_capacity(refs.len());
    for r in refs {
        let later = left.get_mut(&r.id).expect("counted above");
        *later -= 1;
        let later = *later;
        if kept.contains_key(&r.id) {
            if later == 0 {
                kept_bytes -= kept.remove(&r.id).expect("present");
            }
            out.push(Source::Kept { last: later == 0 });
        } else {
            let keep = later > 0 && kept_bytes + r.len <= budget;
            if keep {
                kept.insert(&r.id, r.len);
                kept_bytes += r.len;
            }
            out.push(Source::Fetch { keep });
        }
    }
    out
}

/// The same id with two lengths is a contradiction no honest manifest holds (the id names the
/// content, so its length): refused before anything is fetched or written.
fn lengths_agree(refs: &[ChunkRef], files: &[FileToWrite]) -> Result<(), RestoreError> {
    let mut len_of: HashMap<&ChunkId, u64> = HashMap::new();
    for r in refs {
        let len = *len_of.entry(&r.id).or_insert(r.len);
        if len != r.len {
            let at = files
                .get(r.file)
                .map(|f| f.path.display().to_string())
                .unwrap_or_default();
            return Err(RestoreError::ChunkLengths {
                id: r.id.to_string(),
                first: len,
                second: r.len,
                index: r.index,
                path: at,
            });
        }
    }
    Ok(())
}

/// Sort `refs` into file and chunk order and split off those of the `last` file; plan the
/// others' sources. The plan covers only what is written before the last file: a chunk the last
/// file shares with a later one must not count as fetched (and kept) by the last file, which is
/// written after them. A contradiction anywhere, the last file's references included, is refused
/// up front.
fn split_last(
    mut refs: Vec<ChunkRef>,
    files: &[FileToWrite],
    last: Option<usize>,
    places: &Places,
) -> Result<(Planned, Vec<ChunkRef>), RestoreError> {
    // Each (file, index) once: sorted in place, with no scratch the size of the list.
    refs.sort_unstable_by_key(|r| (r.file, r.index));
    lengths_agree(&refs, files)?;
    let (late, early): (Vec<ChunkRef>, Vec<ChunkRef>) = refs.into_iter().partition(|r| Some(r.file) == last);
    let early = in_pack_order(early, places, OPEN_FILES / 2);
    let plan = sources(&early, REPEAT_BUDGET);
    Ok((early.into_iter().zip(plan).collect(), late))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunk ids by name, for reading the tests.
    const ZERO: ChunkId = ChunkId::from_hash([0; 32]);
    const ONE: ChunkId = ChunkId::from_hash([1; 32]);
    const TAIL: ChunkId = ChunkId::from_hash([0x7a; 32]);

    use super::super::testing::r;

    fn targets(n: usize) -> Vec<FileToWrite> {
        (0..n)
            .map(|i| FileToWrite {
                path: PathBuf::from(format!("/data/base/1/{}", 16384 + i)),
                mode: 0o600,
                size: 0,
                create: true,
                compare: false,
            })
            .collect()
    }

    #[test]
    fn a_repeated_chunk_is_fetched_once_and_kept_until_its_last_reference() {
        let refs = [
            r(ZERO, 8, 0, 0),
            r(ONE, 8, 0, 1),
            r(ZERO, 8, 0, 2),
            r(ZERO, 8, 1, 0),
            r(TAIL, 3, 1, 1),
        ];
        let s = sources(&refs, 1 << 20);
        use Source::*;
        assert_eq!(
            s,
            vec![
                Fetch { keep: true },
                Fetch { keep: false },
                Kept { last: false },
                Kept { last: true },
                Fetch { keep: false },
            ]
        );
    }

    #[test]
    fn a_repeated_chunk_beyond_the_budget_is_fetched_again() {
        // ZERO is kept (8 of 12 bytes); ONE would exceed the budget, so both its references
        // fetch; once ZERO's last reference passed, TAIL fits.
        let refs = [
            r(ZERO, 8, 0, 0),
            r(ONE, 8, 0, 1),
            r(ZERO, 8, 0, 2),
            r(ONE, 8, 0, 3),
            r(TAIL, 3, 1, 0),
            r(TAIL, 3, 1, 1),
        ];
        let s = sources(&refs, 12);
        use Source::*;
        assert_eq!(
            s,
            vec![
                Fetch { keep: true },
                Fetch { keep: false },
                Kept { last: true },
                Fetch { keep: false },
                Fetch { keep: true },
                Kept { last: true },
            ]
        );
    }

    /// pg_control (the last file) sorts before `global/pg_filenode.map` and `pg_xact/`: a chunk
    /// it shares with one of them must be fetched by that file, not counted as kept by
    /// pg_control, which is written after everything else.
    #[test]
    fn a_chunk_the_last_file_shares_is_fetched_by_the_early_file() {
        let refs = vec![
            r(ZERO, 8, 0, 0),
            r(ONE, 8, 0, 1),
            r(ZERO, 8, 1, 0),
            r(ONE, 8, 2, 0),
        ];
        let (early, late) = split_last(refs, &targets(3), Some(0), &Places::default()).unwrap();
        use Source::*;
        assert_eq!(
            early,
            vec![
                (r(ZERO, 8, 1, 0), Fetch { keep: false }),
                (r(ONE, 8, 2, 0), Fetch { keep: false })
            ]
        );
        assert_eq!(late, vec![r(ZERO, 8, 0, 0), r(ONE, 8, 0, 1)]);
        // A contradiction in the last file's references is refused too.
        let err = split_last(
            vec![r(ONE, 8, 0, 0), r(ONE, 3, 1, 0)],
            &targets(2),
            Some(0),
            &Places::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("referenced as"), "{err}");
    }

    #[test]
    fn one_id_with_two_lengths_is_refused() {
        let err = lengths_agree(&[r(ONE, 8, 0, 0), r(ONE, 3, 0, 1)], &targets(1)).unwrap_err();
        assert!(
            err.to_string().contains("referenced as 8 bytes and as 3 bytes"),
            "{err}"
        );
        assert!(err.to_string().contains("/data/base/1/16384"), "{err}");
    }
}
