//! The previous backup's entries and file records as a new backup holds them ([`PriorFiles`]):
//! read from its stored manifest as the document is decompressed, each kept compactly, never
//! parsed whole.
//!
//! A second backup asks of the previous one, for each file it walks, whether the file was read
//! and how it looked then (to take it over unread), its chunks (to take them over, or to store a
//! changed chunk as its difference from the old one), and the stored length of every chunk.
//! Parsed whole, the manifest's lists took some 230 bytes a file (70 MiB of a second backup's
//! 146 MiB peak at 300,963 files), held until the copy ended. Here a file takes 32 bytes of
//! item, 4 for each chunk it names (the distinct chunk ids are kept once each, in the order met:
//! the small files of a shared chunk name the same), 32 bytes of record and 4 for each stored
//! length. Its path is the walk's: the backup walks its data directory first and reads the
//! previous manifest against it, both in path order, so an entry names the walk's path by its
//! index there (the same paths held twice took 6.3 MiB at 300,963 files); only the paths the
//! walk does not have (files gone since), or every path when there is no walk (a backup over
//! the replication protocol), are held here.

use std::sync::Arc;

use super::BackupError;
use super::names::Names;
use super::walk::Walk;
use crate::basebackup::chunk::ChunkId;
use crate::basebackup::manifest::paged::{EntriesError, PagedManifest};
use crate::basebackup::manifest::{BackupId, Entry, EntryKind, FileRecord, FileStat, Within};

const DIR: u8 = 1;
const WITHIN: u8 = 2;
/// Its record has a stat (it vouches for the file as it was read).
const STAT: u8 = 4;
/// It has a file record (`records[at]`).
const RECORD: u8 = 8;
/// Its path is `own`'s, not the walk's.
const OWN: u8 = 16;

/// An entry: 32 bytes.
#[derive(Debug, Clone, Copy)]
struct Item {
    size: u64,
    /// Its chunks are `refs[first..first + count]`, their stored lengths
    /// `stored[first..first + count]`.
    first: u32,
    count: u32,
    /// [`Within`], when `WITHIN` is set.
    at: u32,
    of: u32,
    /// Its path: the walk's source `name`, or `own`'s name `name` with `OWN`.
    name: u32,
    mode: u16,
    flags: u8,
}

/// A file record, at its entry's index: 32 bytes. Its stat's size is its entry's (a record
/// whose stat disagrees is refused as [`Manifest::validate`] refuses it); its stored lengths
/// are beside its entry's chunks.
///
/// [`Manifest::validate`]: crate::basebackup::manifest::Manifest::validate
#[derive(Debug, Clone, Copy, Default)]
struct Record {
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
    /// Its device: `devs[dev]` (a backup's files are on a few).
    dev: u32,
    /// 1 + the index of the backup that read it in `readers`; 0: none named (the previous
    /// backup read it).
    read_by: u32,
}

/// Why a previous backup's lists cannot be built on.
fn refused(path: &str, why: &str) -> BackupError {
    BackupError::Unsound(format!("the previous backup's {path:?}: {why}"))
}

/// See the module's documentation.
#[derive(Debug, Default)]
pub(super) struct PriorFiles {
    /// The new backup's walk, whose paths name the entries it has.
    walk: Option<Arc<Walk>>,
    /// The paths of the entries the walk does not have (every entry's without a walk).
    own: Names,
    /// In path order.
    items: Vec<Item>,
    /// The distinct chunk ids, each once for a run of references to it.
    ids: Vec<ChunkId>,
    /// Each entry's chunks, as indexes into `ids`.
    refs: Vec<u32>,
    /// One per entry once the first record is met; an entry's is its record when `RECORD` is
    /// set.
    records: Vec<Record>,
    /// Beside `refs`: each chunk's stored length, when its entry has a record (else 0).
    stored: Vec<u32>,
    devs: Vec<u64>,
    readers: Vec<BackupId>,
    /// Where the next record's entry is looked for: records come in path order too.
    cursor: usize,
    /// Where the next entry's path is looked for in the walk.
    walked: usize,
}

/// Where `value` is in `list`, a list of the few distinct values met (backups that read a
/// file, devices), added at its end when first met.
fn index_in<T: PartialEq + Clone>(list: &mut Vec<T>, value: &T) -> usize {
    list.iter().position(|v| v == value).unwrap_or_else(|| {
        list.push(value.clone());
        list.len() - 1
    })
}

fn u32_of(n: u64, path: &str, what: &str) -> Result<u32, BackupError> {
    u32::try_from(n).map_err(|_| refused(path, &format!("{what} beyond what a backup's list holds")))
}

impl PriorFiles {
    /// The lists of `manifest`, read once from its stored object to its end: entries checked as
    /// [`Manifest::validate`] checks them, and each file record as it does (in path order,
    /// naming a file entry, a stored length for each chunk, a stat of the entry's size). Paths
    /// the new backup's `walk` has are named by their place there.
    ///
    /// [`Manifest::validate`]: crate::basebackup::manifest::Manifest::validate
    pub(super) fn read(manifest: &PagedManifest, walk: Option<Arc<Walk>>) -> Result<PriorFiles, BackupError> {
        let mut files = std::cell::RefCell::new(PriorFiles {
            walk,
            ..PriorFiles::default()
        });
        manifest
            .lists(
                |e| files.borrow_mut().push_entry(e),
                |r| files.borrow_mut().push_record(r),
            )
            .map_err(|e| match e {
                EntriesError::Stopped(e) => e,
                other => BackupError::Unsound(format!("the previous backup's manifest: {other}")),
            })?;
        let f = files.get_mut();
        f.own.shrink_to_fit();
        f.items.shrink_to_fit();
        f.ids.shrink_to_fit();
        f.refs.shrink_to_fit();
        f.stored.shrink_to_fit();
        Ok(files.into_inner())
    }

    /// Where `path` is named: the walk's index of it, or its place in `own` (with `OWN`).
    /// Paths come in path order, as the walk's are (but its last, the control file).
    fn name(&mut self, path: &str) -> Result<(u32, u8), BackupError> {
        if let Some(walk) = &self.walk
            && let Some(at) = walk.position(path, &mut self.walked)
        {
            return Ok((u32_of(at as u64, path, "files")?, 0));
        }
        let at = self.own.push(path)?;
        Ok((u32_of(at as u64, path, "files")?, OWN))
    }

    fn push_entry(&mut self, e: Entry) -> Result<(), BackupError> {
        if !self.records.is_empty() {
            return Err(refused(&e.path, "an entry after the file records"));
        }
        let mode = u16::try_from(e.mode).map_err(|_| refused(&e.path, "a mode of more than 16 bits"))?;
        let (at, of) = match e.within {
            Some(w) => (
                u32_of(w.at, &e.path, "an offset")?,
                u32_of(w.of, &e.path, "a chunk")?,
            ),
            None => (0, 0),
        };
        let first = u32_of(self.refs.len() as u64, &e.path, "chunks")?;
        // Its end fits too: `first + count` is computed in 32 bits.
        u32_of((self.refs.len() + e.chunks.len()) as u64, &e.path, "chunks")?;
        for id in &e.chunks {
            if self.ids.last() != Some(id) {
                self.ids.push(*id);
            }
            self.refs
                .push(u32_of(self.ids.len() as u64 - 1, &e.path, "chunks")?);
            self.stored.push(0);
        }
        let (name, own) = self.name(&e.path)?;
        self.items.push(Item {
            size: e.size,
            first,
            count: u32_of(e.chunks.len() as u64, &e.path, "chunks")?,
            at,
            of,
            name,
            mode,
            flags: if e.kind == EntryKind::Dir { DIR } else { 0 }
                | if e.within.is_some() { WITHIN } else { 0 }
                | own,
        });
        Ok(())
    }

    fn push_record(&mut self, r: FileRecord) -> Result<(), BackupError> {
        if self.records.is_empty() {
            // Every entry is in: a record each, at its entry's index, set where there is one.
            self.items.shrink_to_fit();
            self.records = vec![Record::default(); self.items.len()];
        }
        // Both lists are in path order: the record's entry is at or after the last one's.
        while self.cursor < self.items.len() && self.path(self.cursor) < r.path.as_str() {
            self.cursor += 1;
        }
        let at = self.cursor;
        if at == self.items.len() || self.path(at) != r.path {
            return Err(refused(
                &r.path,
                "a file record names no entry, or is out of order",
            ));
        }
        let item = self.items[at];
        if item.flags & DIR != 0 {
            return Err(refused(&r.path, "a file record names a directory"));
        }
        if item.flags & RECORD != 0 {
            return Err(refused(&r.path, "it has two file records"));
        }
        if r.stored.len() != item.count as usize {
            return Err(refused(
                &r.path,
                "its file record's stored lengths are not one per chunk",
            ));
        }
        if r.stat.is_some_and(|s| s.size != item.size) {
            return Err(refused(&r.path, "its file record's stat disagrees with its size"));
        }
        let read_by = match &r.read_by {
            None => 0,
            Some(id) => 1 + index_in(&mut self.readers, id),
        };
        let first = item.first as usize;
        for (k, len) in r.stored.iter().enumerate() {
            self.stored[first + k] = u32_of(*len, &r.path, "a stored length")?;
        }
        let s = r.stat.unwrap_or(FileStat {
            size: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            ino: 0,
            dev: 0,
        });
        let dev = index_in(&mut self.devs, &s.dev);
        self.records[at] = Record {
            mtime_ns: s.mtime_ns,
            ctime_ns: s.ctime_ns,
            ino: s.ino,
            dev: u32_of(dev as u64, &r.path, "devices")?,
            read_by: u32_of(read_by as u64, &r.path, "backups")?,
        };
        let item = &mut self.items[at];
        item.flags |= RECORD;
        if r.stat.is_some() {
            item.flags |= STAT;
        }
        Ok(())
    }

    /// The lists of a manifest held whole (tests).
    #[cfg(test)]
    pub(super) fn of(m: &crate::basebackup::manifest::Manifest) -> PriorFiles {
        PriorFiles::read(&PagedManifest::of(m).expect("a valid manifest"), None).expect("a valid manifest")
    }

    /// The files of a previous backup `20260101T000000Z` that listed `entries` and `files`
    /// (tests).
    #[cfg(test)]
    pub(super) fn testing(entries: Vec<Entry>, files: Vec<FileRecord>) -> PriorFiles {
        let mut m = crate::catalog::testing::manifest("20260101T000000Z", 1, 5, 2_000_000);
        "000000010000000000000005".clone_into(&mut m.start_wal);
        "000000010000000000000005".clone_into(&mut m.stop_wal);
        m.version = crate::basebackup::manifest::FORMAT_VERSION_WITHIN;
        m.entries = entries;
        m.files = files;
        PriorFiles::of(&m)
    }

    /// How many entries.
    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    /// The entry at `path`.
    pub(super) fn find(&self, path: &str) -> Option<usize> {
        let (mut lo, mut hi) = (0, self.items.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.path(mid).cmp(path) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(mid),
            }
        }
        None
    }

    /// Entry `at`'s path.
    pub(super) fn path(&self, at: usize) -> &str {
        let i = &self.items[at];
        match (&self.walk, i.flags & OWN) {
            (Some(walk), 0) => walk.names.get(i.name as usize),
            _ => self.own.get(i.name as usize),
        }
    }

    /// Entry `at`'s file record, when it has one.
    fn record_of(&self, at: usize) -> Option<&Record> {
        (self.items[at].flags & RECORD != 0).then(|| &self.records[at])
    }

    /// Whether entry `at` is a file that lies within a shared chunk.
    pub(super) fn is_within(&self, at: usize) -> bool {
        self.items[at].flags & WITHIN != 0
    }

    /// Whether entry `at` is a file.
    pub(super) fn is_file(&self, at: usize) -> bool {
        self.items[at].flags & DIR == 0
    }

    /// How many chunks entry `at` names.
    pub(super) fn chunk_count(&self, at: usize) -> usize {
        self.items[at].count as usize
    }

    /// Entry `at`'s chunk `idx`.
    pub(super) fn chunk(&self, at: usize, idx: usize) -> Option<&ChunkId> {
        let i = self.items[at];
        (idx < i.count as usize).then(|| &self.ids[self.refs[i.first as usize + idx] as usize])
    }

    /// Entry `at`'s chunks, in order.
    pub(super) fn chunks(&self, at: usize) -> impl Iterator<Item = &ChunkId> + '_ {
        let i = self.items[at];
        self.refs[i.first as usize..(i.first + i.count) as usize]
            .iter()
            .map(|&r| &self.ids[r as usize])
    }

    /// Every chunk every entry names, with its recorded stored length (`None`: not recorded).
    pub(super) fn each_chunk(&self, mut each: impl FnMut(&ChunkId, Option<u64>)) {
        for (at, i) in self.items.iter().enumerate() {
            let lens = self.stored_of(at);
            for (k, id) in self.chunks(at).enumerate() {
                each(id, lens.map(|l| u64::from(l[k])));
            }
            debug_assert!(lens.is_none_or(|l| l.len() == i.count as usize));
        }
    }

    /// Entry `at`'s size.
    pub(super) fn size(&self, at: usize) -> u64 {
        self.items[at].size
    }

    /// Where entry `at`'s bytes lie in its only chunk, when it shares one.
    pub(super) fn within(&self, at: usize) -> Option<Within> {
        let i = self.items[at];
        (i.flags & WITHIN != 0).then_some(Within {
            at: u64::from(i.at),
            of: u64::from(i.of),
        })
    }

    /// The backup its file record names as the one that read entry `at`'s file, when one is
    /// named (else the previous backup read it, or it has no record).
    pub(super) fn reader(&self, at: usize) -> Option<&BackupId> {
        let r = self.record_of(at)?;
        r.read_by.checked_sub(1).map(|n| &self.readers[n as usize])
    }

    /// Entry `at`'s stored lengths, one per chunk, when it has a record.
    pub(super) fn stored_of(&self, at: usize) -> Option<&[u32]> {
        self.record_of(at)?;
        let i = self.items[at];
        Some(&self.stored[i.first as usize..(i.first + i.count) as usize])
    }

    /// Entry `at`, as the manifest listed it.
    pub(super) fn entry(&self, at: usize) -> Entry {
        let i = self.items[at];
        Entry {
            path: self.path(at).to_string(),
            kind: if i.flags & DIR != 0 {
                EntryKind::Dir
            } else {
                EntryKind::File
            },
            mode: u32::from(i.mode),
            size: i.size,
            chunks: self.chunks(at).copied().collect(),
            within: self.within(at),
        }
    }

    /// What entry `at`'s file record says `stat` saw, when it has a record with a stat.
    pub(super) fn stat(&self, at: usize) -> Option<FileStat> {
        let i = self.items[at];
        let r = self.record_of(at)?;
        (i.flags & STAT != 0).then_some(FileStat {
            size: i.size,
            mtime_ns: r.mtime_ns,
            ctime_ns: r.ctime_ns,
            ino: r.ino,
            dev: self.devs[r.dev as usize],
        })
    }

    /// Entry `at`'s file record, as the manifest listed it, when it has one (tests).
    #[cfg(test)]
    pub(super) fn record(&self, at: usize) -> Option<FileRecord> {
        let r = self.record_of(at)?;
        Some(FileRecord {
            path: self.path(at).to_string(),
            stored: self.stored_of(at)?.iter().map(|&l| u64::from(l)).collect(),
            stat: self.stat(at),
            read_by: (r.read_by != 0).then(|| self.readers[r.read_by as usize - 1].clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::basebackup::manifest::Manifest;

    fn id(c: char) -> ChunkId {
        c.to_string().repeat(64).parse().unwrap()
    }

    fn entry(path: &str, kind: EntryKind, size: u64, chunks: &[char], within: Option<Within>) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode: if kind == EntryKind::Dir { 0o700 } else { 0o600 },
            size,
            chunks: chunks.iter().map(|&c| id(c)).collect(),
            within,
        }
    }

    fn stat(size: u64, t: i64) -> FileStat {
        FileStat {
            size,
            mtime_ns: t,
            ctime_ns: t + 1,
            ino: 77 + t as u64,
            dev: 2049,
        }
    }

    /// A manifest of directories, files of several chunks, small files sharing a chunk, files
    /// with and without records, stats and readers.
    fn manifest() -> Manifest {
        let mut m = crate::catalog::testing::manifest("20260101T000000Z", 1, 5, 2_000_000);
        "000000010000000000000005".clone_into(&mut m.start_wal);
        "000000010000000000000005".clone_into(&mut m.stop_wal);
        m.chunk_size = 4;
        m.version = crate::basebackup::manifest::FORMAT_VERSION_WITHIN;
        let w = |at, of| Some(Within { at, of });
        m.entries = vec![
            entry("PG_VERSION", EntryKind::File, 3, &['a'], None),
            entry("base", EntryKind::Dir, 0, &[], None),
            entry("base/1", EntryKind::Dir, 0, &[], None),
            entry("base/1/1", EntryKind::File, 2, &['b'], w(0, 4)),
            entry("base/1/2", EntryKind::File, 2, &['b'], w(2, 4)),
            entry("base/1/3", EntryKind::File, 10, &['c', 'd', 'c'], None),
            entry("base/1/4", EntryKind::File, 0, &[], None),
            entry("global", EntryKind::Dir, 0, &[], None),
            entry("global/pg_control", EntryKind::File, 4, &['e'], None),
        ];
        let older: BackupId = "20251231T000000Z".parse().unwrap();
        m.files = vec![
            FileRecord {
                path: "PG_VERSION".into(),
                stored: vec![30],
                stat: Some(stat(3, 10)),
                read_by: None,
            },
            FileRecord {
                path: "base/1/1".into(),
                stored: vec![44],
                stat: Some(stat(2, 11)),
                read_by: Some(older.clone()),
            },
            FileRecord {
                path: "base/1/3".into(),
                stored: vec![1, 2, 1],
                stat: Some(stat(10, 12)),
                read_by: Some(older),
            },
            FileRecord {
                path: "global/pg_control".into(),
                stored: vec![9],
                stat: None,
                read_by: None,
            },
        ];
        m
    }

    fn read(m: &Manifest) -> Result<PriorFiles, BackupError> {
        PriorFiles::read(&PagedManifest::of(m).unwrap(), None)
    }

    #[test]
    fn an_entry_and_a_record_take_32_bytes_each() {
        assert_eq!(std::mem::size_of::<Item>(), 32);
        assert_eq!(std::mem::size_of::<Record>(), 32);
    }

    #[test]
    fn paths_the_walk_has_are_named_by_their_place_in_it() {
        use super::super::walk::Source;
        let m = manifest();
        // A new backup's walk: in path order but for the control file, last; "base/1/2" and
        // "base/1/4" gone since, "base/1/0" and "pg_wal" new.
        let walk: Vec<&str> = vec![
            "PG_VERSION",
            "base",
            "base/1",
            "base/1/0",
            "base/1/1",
            "base/1/3",
            "global",
            "pg_wal",
            "global/pg_control",
        ];
        let walk = Arc::new(
            Walk::of(
                walk.iter()
                    .map(|rel| Source {
                        rel: (*rel).into(),
                        is_dir: false,
                        mode: 0o600,
                    })
                    .collect(),
            )
            .unwrap(),
        );
        let p = PriorFiles::read(&PagedManifest::of(&m).unwrap(), Some(Arc::clone(&walk))).unwrap();
        // Only the paths the walk lacks are held again.
        assert_eq!(p.own.iter().collect::<Vec<_>>(), ["base/1/2", "base/1/4"]);
        let back: Vec<Entry> = (0..p.len()).map(|at| p.entry(at)).collect();
        assert_eq!(back, m.entries);
        let records: Vec<FileRecord> = (0..p.len()).filter_map(|at| p.record(at)).collect();
        assert_eq!(records, m.files);
        for (at, e) in m.entries.iter().enumerate() {
            assert_eq!(p.find(&e.path), Some(at), "{}", e.path);
        }
        for missing in ["base/1/0", "pg_wal", "zzz", ""] {
            assert_eq!(p.find(missing), None, "{missing}");
        }
        // The control file, last in the walk, is named there.
        let control = p.find("global/pg_control").unwrap();
        assert_eq!(p.items[control].flags & OWN, 0);
        assert_eq!(p.items[control].name as usize, walk.len() - 1);
    }

    #[test]
    fn a_walk_is_found_in_one_pass_in_path_order() {
        use super::super::walk::Source;
        let source = |rel: &str| Source {
            rel: rel.into(),
            is_dir: false,
            mode: 0o600,
        };
        let walk = Walk::of(["a", "b/1", "b/2", "d", "c"].map(source).to_vec()).unwrap();
        let mut cursor = 0;
        let asked: Vec<_> = ["0", "a", "b", "b/2", "c", "c/1", "d", "e"]
            .iter()
            .map(|rel| walk.position(rel, &mut cursor))
            .collect();
        assert_eq!(
            asked,
            [None, Some(0), None, Some(2), Some(4), None, Some(3), None]
        );
        // The last source alone, and an empty walk.
        let one = Walk::of(vec![source("x")]).unwrap();
        assert_eq!(one.position("x", &mut 0), Some(0));
        assert_eq!(one.position("y", &mut 0), None);
        assert_eq!(Walk::of(vec![]).unwrap().position("x", &mut 0), None);
    }

    #[test]
    fn every_entry_and_record_comes_back_as_the_manifest_listed_it() {
        let m = manifest();
        m.validate().unwrap();
        let p = read(&m).unwrap();
        assert_eq!(p.len(), m.entries.len());
        let back: Vec<Entry> = (0..p.len()).map(|at| p.entry(at)).collect();
        assert_eq!(back, m.entries);
        let records: Vec<FileRecord> = (0..p.len()).filter_map(|at| p.record(at)).collect();
        assert_eq!(records, m.files);
        // Found by path; a path not listed is not found.
        for (at, e) in m.entries.iter().enumerate() {
            assert_eq!(p.find(&e.path), Some(at));
        }
        for missing in ["", "base/1/0", "base/1/5", "zzz", "base/"] {
            assert_eq!(p.find(missing), None, "{missing}");
        }
        // The shared chunk is kept once; a chunk named again after another, again.
        assert_eq!(p.ids.len(), 6);
        let mut met = Vec::new();
        p.each_chunk(|c, len| met.push((*c, len)));
        assert_eq!(
            met,
            [
                (id('a'), Some(30)),
                (id('b'), Some(44)),
                (id('b'), None),
                (id('c'), Some(1)),
                (id('d'), Some(2)),
                (id('c'), Some(1)),
                (id('e'), Some(9)),
            ]
        );
        assert_eq!(p.chunk(5, 2), Some(&id('c')));
        assert_eq!(p.chunk(5, 3), None);
        assert!(p.is_within(3) && !p.is_within(5) && p.is_file(3) && !p.is_file(1));
    }

    #[test]
    fn records_that_a_manifest_would_refuse_are_refused() {
        let refuses = |change: &dyn Fn(&mut Manifest), why: &str| {
            let mut m = manifest();
            change(&mut m);
            assert!(m.validate().is_err(), "{why}: the manifest's own check passes it");
            let err = read(&m).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        };
        refuses(&|m| m.files[0].path = "PG_VERSIONS".into(), "names no entry");
        refuses(&|m| m.files.swap(1, 2), "names no entry, or is out of order");
        refuses(&|m| m.files[1].path = "base".into(), "names a directory");
        refuses(&|m| m.files[2].stored.pop().map(drop).unwrap(), "one per chunk");
        refuses(
            &|m| m.files[0].stat.as_mut().unwrap().size = 4,
            "disagrees with its size",
        );
        refuses(
            &|m| {
                let again = m.files[2].clone();
                m.files.insert(2, again);
            },
            "two file records",
        );
        // An entry the manifest's checks refuse is refused as it is read.
        let mut m = manifest();
        m.entries.swap(5, 6);
        assert!(read(&m).is_err());
    }
}
