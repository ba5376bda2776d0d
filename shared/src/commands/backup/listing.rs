//! What a backup copied, held compactly until its manifest is written from it ([`Listing`]):
//! every path in one string, a fixed-size item per entry, the chunk ids in one list, and a
//! record of how each file read looked. Its manifest's entries and file records are built one
//! at a time as the manifest is checked and written ([`Lists`]), never all at once.
//!
//! Held as manifest entries and file records, each file took some 250 bytes (two copies of its
//! path, a list of chunk ids of its own, a record with room for what is not known yet): 76 MiB
//! of a backup's 123 MiB peak at 300,963 files. Here a file read takes its path's bytes, 32
//! bytes of item, 32 of record, and 32 for each chunk of its own (the small files of a shared
//! chunk name the same one). A backup that builds on a previous one gives each source of its
//! walk a 4-byte slot instead: a file taken over unread is its slot alone (the previous
//! backup's entry it names, [`Listing::taken_at`]), and only what is read or found gets an
//! item (an item each took 9.2 MiB of a second backup's peak at 300,963 files, most of them
//! files taken over).

use std::collections::HashMap;
use std::sync::Arc;

use super::BackupError;
use super::names::Names;
use super::prior_files::PriorFiles;
use super::walk::{At, Walk};
use crate::basebackup::chunk::ChunkId;
use crate::basebackup::manifest::written::{EachFile, Lists};
use crate::basebackup::manifest::{BackupId, Entry, EntryKind, FileRecord, FileStat, ManifestError, Within};

/// A chunk place whose chunk has not finished yet.
const UNFILLED: ChunkId = ChunkId::from_hash([0; 32]);

/// An index into [`Listing`]'s items: an entry, in the order entries were added.
pub(super) type ItemNo = usize;

/// An index into [`Listing`]'s chunk places.
pub(super) type Place = usize;

const DIR: u8 = 1;
const WITHIN: u8 = 2;
/// Left out of the manifest ([`Listing::take_out`]).
const GONE: u8 = 4;
/// Its record's stat vouches for it (else its record has none).
const STAT: u8 = 8;
const NO_RECORD: u32 = u32::MAX;

/// A slot of a source not copied (yet): left out of the manifest.
const EMPTY: u32 = u32::MAX;
/// A slot of a file taken over from the previous backup unread: its chunks, stored lengths and
/// stat are those of the previous backup's entry in the low 30 bits, named there rather than
/// copied, and its mode the walk's.
const TAKEN: u32 = 1 << 31;
/// With `TAKEN`: left out of the manifest ([`Listing::take_out`]).
const TAKEN_OUT: u32 = 1 << 30;

/// What an item number stands for ([`Listing::slot`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// `items[i]`.
    Item(usize),
    /// The previous backup's entry `prior`, taken over; `out`: left out of the manifest.
    Taken { prior: usize, out: bool },
    /// A source of the walk not copied (yet).
    Empty,
}

/// 32 bytes.
#[derive(Debug, Clone, Copy)]
struct Item {
    size: u64,
    /// A file's mode fits in 16 bits (type and permissions); see [`mode_of`].
    mode: u16,
    /// Its chunks are places `first..first + count`.
    first: u32,
    count: u32,
    /// [`Within`], when `WITHIN` is set (under 4 GiB: a shared chunk holds at most a chunk).
    at: u32,
    of: u32,
    record: u32,
    flags: u8,
}

/// How `stat` saw a file this backup read, beyond its entry: 32 bytes (a file taken over has
/// none: it names the previous backup's, [`TAKEN`]).
#[derive(Debug, Clone, Copy, Default)]
struct Record {
    /// `stat` less its size, which is the entry's ([`FileStat`]), when its item has `STAT`.
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
    dev: u64,
}

/// See the module's documentation.
#[derive(Debug, Default)]
pub(super) struct Listing {
    /// A backup of a data directory: its walk, whose sources are the first items, named by the
    /// walk's own names (not copied again), and not in the manifest until copied.
    walk: Option<Arc<Walk>>,
    /// The names of the items after the walk's.
    names: Names,
    /// One per item number, when the list builds on a previous backup ([`Slot`]); else an item
    /// number is its index in `items`, the walk's sources first.
    slots: Option<Vec<u32>>,
    items: Vec<Item>,
    places: Vec<ChunkId>,
    records: Vec<Record>,
    /// The previous backup's files, and its id: what the files taken over name.
    prior: Option<(Arc<PriorFiles>, BackupId)>,
    /// Once sorted ([`Listing::seal`]): the items in path order.
    order: Vec<u32>,
    /// The stored length of every distinct chunk this backup stored or met.
    lens: HashMap<[u8; 32], u64>,
    /// The item whose chunks are being read ([`Listing::next_place`]).
    reading: Option<ItemNo>,
}

fn too_many(what: &str) -> BackupError {
    BackupError::Unsound(format!("more {what} than a backup's list holds (4 GiB)"))
}

fn u32_of(n: usize, what: &str) -> Result<u32, BackupError> {
    u32::try_from(n).map_err(|_| too_many(what))
}

/// `mode` in an item's 16 bits. A mode from `stat` always fits; one that does not (from a
/// stream) is kept as all ones, which the manifest's checks refuse as a file type, as they
/// would have refused it.
fn mode_of(mode: u32) -> u16 {
    u16::try_from(mode).unwrap_or(u16::MAX)
}

/// Source `src` of the walk as an item not copied (yet): left out of the manifest.
fn fresh(src: At<'_>) -> Item {
    Item {
        size: 0,
        mode: mode_of(src.mode),
        first: 0,
        count: 0,
        at: 0,
        of: 0,
        record: NO_RECORD,
        flags: GONE | if src.is_dir { DIR } else { 0 },
    }
}

impl Record {
    fn of(stat: Option<FileStat>) -> Record {
        stat.map_or_else(Record::default, |s| Record {
            mtime_ns: s.mtime_ns,
            ctime_ns: s.ctime_ns,
            ino: s.ino,
            dev: s.dev,
        })
    }
}

impl Listing {
    /// A list with room for about `entries` entries.
    pub(super) fn with_capacity(entries: usize) -> Listing {
        Listing {
            items: Vec::with_capacity(entries),
            records: Vec::with_capacity(entries),
            ..Listing::default()
        }
    }

    /// A list whose first items are `walk`'s sources, each left out of the manifest until it
    /// is copied ([`Listing::found`], [`Listing::file_at`], [`Listing::taken_at`]). The files
    /// it takes over are `prior`'s: the previous backup's files, and its id.
    pub(super) fn of_walk(walk: Arc<Walk>, prior: Option<(Arc<PriorFiles>, BackupId)>) -> Listing {
        let mut l = match prior {
            Some(prior) => Listing {
                // Most files are taken over: a slot each, and an item and a record only for
                // what is read.
                slots: Some(vec![EMPTY; walk.len()]),
                items: Vec::with_capacity(walk.len() / 8),
                records: Vec::with_capacity(walk.len() / 8),
                prior: Some(prior),
                ..Listing::default()
            },
            None => {
                let mut l = Listing::with_capacity(walk.len());
                l.items.extend(walk.iter().map(fresh));
                l
            }
        };
        l.walk = Some(walk);
        l
    }

    fn walked(&self) -> usize {
        self.walk.as_ref().map_or(0, |w| w.len())
    }

    /// How many item numbers: the walk's sources, then those pushed.
    fn len(&self) -> usize {
        self.walked() + self.names.len()
    }

    /// What item number `at` stands for.
    fn slot(&self, at: ItemNo) -> Slot {
        match &self.slots {
            None => Slot::Item(at),
            Some(slots) => match slots[at] {
                EMPTY => Slot::Empty,
                v if v & TAKEN != 0 => Slot::Taken {
                    prior: (v & (TAKEN_OUT - 1)) as usize,
                    out: v & TAKEN_OUT != 0,
                },
                v => Slot::Item(v as usize),
            },
        }
    }

    /// Whether item number `at` is in the manifest.
    fn is_live(&self, at: ItemNo) -> bool {
        match self.slot(at) {
            Slot::Item(i) => self.items[i].flags & GONE == 0,
            Slot::Taken { out, .. } => !out,
            Slot::Empty => false,
        }
    }

    /// Item number `at`'s item; a source of the walk with none (not copied, or taken over and
    /// now read after all) gets one, left out as the walk saw it.
    fn item_mut(&mut self, at: ItemNo) -> Result<&mut Item, BackupError> {
        let i = match self.slot(at) {
            Slot::Item(i) => i,
            Slot::Empty | Slot::Taken { .. } => {
                let item = fresh(
                    self.walk
                        .as_ref()
                        .expect("a slot without an item is the walk's")
                        .get(at),
                );
                let i = self.next_item()?;
                self.items.push(item);
                self.slots.as_mut().expect("only slots are empty or taken")[at] = i;
                i as usize
            }
        };
        Ok(&mut self.items[i])
    }

    /// The index the next item takes in `items`; with slots, one a slot can hold.
    fn next_item(&self) -> Result<u32, BackupError> {
        let i = u32_of(self.items.len(), "entries")?;
        if self.slots.is_some() && i & TAKEN != 0 {
            return Err(too_many("entries"));
        }
        Ok(i)
    }

    fn push(&mut self, path: &str, mode: u32, flags: u8) -> Result<ItemNo, BackupError> {
        let i = self.next_item()?;
        if let Some(slots) = &mut self.slots {
            slots.push(i);
        }
        self.names.push(path)?;
        self.items.push(Item {
            size: 0,
            mode: mode_of(mode),
            first: 0,
            count: 0,
            at: 0,
            of: 0,
            record: NO_RECORD,
            flags,
        });
        Ok(self.len() - 1)
    }

    /// A directory.
    pub(super) fn push_dir(&mut self, path: &str, mode: u32) -> Result<ItemNo, BackupError> {
        self.push(path, mode, DIR)
    }

    /// A file about to be read, as `stat` saw it (`None`: nothing vouches for it); its size and
    /// chunks come as it is read.
    pub(super) fn push_file(
        &mut self,
        path: &str,
        mode: u32,
        stat: Option<FileStat>,
    ) -> Result<ItemNo, BackupError> {
        let at = self.push(path, mode, 0)?;
        self.file_at(at, stat)?;
        Ok(at)
    }

    /// Source `at` of the walk, a directory, is copied.
    pub(super) fn found(&mut self, at: ItemNo) -> Result<(), BackupError> {
        self.item_mut(at)?.flags &= !GONE;
        Ok(())
    }

    /// Item `at` is a file about to be read, as `stat` saw it (`None`: nothing vouches for it).
    pub(super) fn file_at(&mut self, at: ItemNo, stat: Option<FileStat>) -> Result<(), BackupError> {
        self.add_record(at, Record::of(stat), stat.is_some())?;
        self.item_mut(at)?.size = stat.map_or(0, |s| s.size);
        Ok(())
    }

    fn add_record(&mut self, at: ItemNo, r: Record, has_stat: bool) -> Result<(), BackupError> {
        let record = u32_of(self.records.len(), "file records")?;
        self.records.push(r);
        let item = self.item_mut(at)?;
        item.record = record;
        item.flags &= !GONE;
        if has_stat {
            item.flags |= STAT;
        } else {
            item.flags &= !STAT;
        }
        Ok(())
    }

    /// The previous backup's files, when it builds on one.
    pub(super) fn prior_files(&self) -> Option<&Arc<PriorFiles>> {
        self.prior.as_ref().map(|(f, _)| f)
    }

    /// Source `at` of the walk is a file taken over unread: the previous backup's entry
    /// `prior_at`, whose size, chunks, stored lengths and stat it names there
    /// ([`Listing::of_walk`]), with the mode the walk saw. Nothing is copied: its 4-byte slot
    /// is all it costs.
    pub(super) fn taken_at(&mut self, at: ItemNo, prior_at: usize) -> Result<(), BackupError> {
        let refused = |why: &str| BackupError::Unsound(format!("{} was taken over {why}", self.path(at)));
        let (Some((files, _)), Some(_)) = (&self.prior, &self.slots) else {
            return Err(refused("from no previous backup"));
        };
        if at >= self.walked() {
            return Err(refused("but not walked"));
        }
        if !files.is_file(prior_at) || files.stored_of(prior_at).is_none() {
            return Err(refused("from an entry with no file record"));
        }
        let prior = u32_of(prior_at, "file records")?;
        if prior & (TAKEN | TAKEN_OUT) != 0 {
            return Err(too_many("file records"));
        }
        self.slots.as_mut().expect("checked above")[at] = TAKEN | prior;
        Ok(())
    }

    /// An entry as a stream gives it (its chunks to come): a directory, or a file no stat
    /// vouches for.
    pub(super) fn push_entry(&mut self, entry: &Entry) -> Result<ItemNo, BackupError> {
        match entry.kind {
            EntryKind::Dir => self.push_dir(&entry.path, entry.mode),
            EntryKind::File => self.push_file(&entry.path, entry.mode, None),
        }
    }

    /// Item `at`'s path.
    pub(super) fn path(&self, at: ItemNo) -> &str {
        match &self.walk {
            Some(w) if at < w.len() => w.names.get(at),
            _ => self.names.get(at - self.walked()),
        }
    }

    /// Item `at` is `size` bytes long; a stat of another size no longer vouches for it
    /// (written while read: the next backup reads it again anyway).
    pub(super) fn set_size(&mut self, at: ItemNo, size: u64) -> Result<(), BackupError> {
        let item = self.item_mut(at)?;
        if item.size != size {
            item.flags &= !STAT;
        }
        item.size = size;
        Ok(())
    }

    /// The place of chunk `idx` of item `at`, whose chunks are read one after the other: its
    /// first chunk starts its places, and each next chunk takes the next one, with no other
    /// place taken in between.
    pub(super) fn next_place(&mut self, at: ItemNo, idx: usize) -> Result<Place, BackupError> {
        let end = self.places.len();
        let item = *self.item_mut(at)?;
        let in_order = match idx {
            0 => item.count == 0,
            _ => {
                self.reading == Some(at)
                    && idx == item.count as usize
                    && (item.first + item.count) as usize == end
            }
        };
        if !in_order {
            return Err(BackupError::Unsound(format!(
                "chunk {idx} of {} came out of its order",
                self.path(at)
            )));
        }
        if idx == 0 {
            self.item_mut(at)?.first = u32_of(end, "chunks")?;
            self.reading = Some(at);
        }
        self.item_mut(at)?.count += 1;
        self.places.push(UNFILLED);
        Ok(end)
    }

    /// A place of its own, for a chunk several small files share ([`Listing::share`]).
    pub(super) fn shared_place(&mut self) -> Result<Place, BackupError> {
        u32_of(self.places.len(), "chunks")?;
        self.places.push(UNFILLED);
        Ok(self.places.len() - 1)
    }

    /// Item `at`'s only chunk is the shared one at `place`.
    pub(super) fn share(&mut self, at: ItemNo, place: Place) -> Result<(), BackupError> {
        let first = u32_of(place, "chunks")?;
        let item = self.item_mut(at)?;
        item.first = first;
        item.count = 1;
        Ok(())
    }

    /// Item `at`'s bytes lie at `w` in its only chunk.
    pub(super) fn set_within(&mut self, at: ItemNo, w: Within) -> Result<(), BackupError> {
        let (Ok(a), Ok(o)) = (u32::try_from(w.at), u32::try_from(w.of)) else {
            return Err(BackupError::Unsound(format!(
                "{} lies beyond 4 GiB in a shared chunk",
                self.path(at)
            )));
        };
        let item = self.item_mut(at)?;
        item.at = a;
        item.of = o;
        item.flags |= WITHIN;
        Ok(())
    }

    /// The chunk at `place` finished as `id`, stored in `stored` bytes when this backup is the
    /// first to meet it.
    pub(super) fn fill(&mut self, place: Place, id: ChunkId, stored: Option<u64>) {
        self.places[place] = id;
        if let Some(len) = stored {
            self.lens.insert(*id.hash(), len);
        }
    }

    /// A chunk named again without its bytes, `stored` bytes long.
    pub(super) fn note_len(&mut self, id: &ChunkId, stored: u64) {
        self.lens.insert(*id.hash(), stored);
    }

    /// Whether any file lies within a shared chunk.
    pub(super) fn any_within(&self) -> bool {
        (0..self.len()).any(|at| match self.slot(at) {
            Slot::Item(i) => self.items[i].flags & (GONE | WITHIN) == WITHIN,
            Slot::Taken { prior, out: false } => self.prior_files().is_some_and(|f| f.is_within(prior)),
            Slot::Taken { out: true, .. } | Slot::Empty => false,
        })
    }

    /// The previous backup's entries of the files taken over, and whether each is left out.
    fn taken(&self) -> impl Iterator<Item = (ItemNo, usize, bool)> + '_ {
        (0..self.slots.as_ref().map_or(0, Vec::len)).filter_map(|at| match self.slot(at) {
            Slot::Taken { prior, out } => Some((at, prior, out)),
            _ => None,
        })
    }

    /// Every chunk an entry names (those left out too: what they name is still the backup's).
    pub(super) fn chunk_ids(&self) -> impl Iterator<Item = &ChunkId> {
        let taken = self
            .prior_files()
            .into_iter()
            .flat_map(|files| self.taken().flat_map(|(_, prior, _)| files.chunks(prior)));
        self.places.iter().chain(taken)
    }

    /// The paths of the files taken over unread.
    pub(super) fn taken_paths(&self) -> impl Iterator<Item = &str> {
        self.taken()
            .filter(|&(_, _, out)| !out)
            .map(|(at, _, _)| self.path(at))
    }

    /// Leave the entry at `path` out of the manifest, and give it.
    pub(super) fn take_out(&mut self, path: &str) -> Option<Entry> {
        let at = (0..self.len()).find(|&at| self.is_live(at) && self.path(at) == path)?;
        let e = self.entry(at);
        match self.slot(at) {
            Slot::Item(i) => self.items[i].flags |= GONE,
            Slot::Taken { .. } => self.slots.as_mut().expect("a taken slot")[at] |= TAKEN_OUT,
            Slot::Empty => {}
        }
        self.order.retain(|&i| i as usize != at);
        Some(e)
    }

    /// Every place filled, the items put in path order: ready to be written.
    pub(super) fn seal(&mut self) -> Result<(), BackupError> {
        if let Some(at) = self.places.iter().position(|p| *p == UNFILLED) {
            let owner = (0..self.len())
                .find(|&n| match self.slot(n) {
                    Slot::Item(i) => {
                        let it = self.items[i];
                        (it.first as usize..(it.first + it.count) as usize).contains(&at)
                    }
                    _ => false,
                })
                .map_or("a file", |n| self.path(n));
            return Err(BackupError::Unsound(format!(
                "a chunk of {owner} was never attached"
            )));
        }
        let n = u32_of(self.len(), "entries")?;
        let mut order: Vec<u32> = Vec::with_capacity(self.len());
        order.extend((0..n).filter(|&at| self.is_live(at as usize)));
        // Paths are unique: sorted in place, with no scratch.
        order.sort_unstable_by(|&a, &b| self.path(a as usize).cmp(self.path(b as usize)));
        self.order = order;
        Ok(())
    }

    /// Item `at` as a manifest entry.
    fn entry(&self, at: ItemNo) -> Entry {
        let i = match self.slot(at) {
            Slot::Item(i) => self.items[i],
            Slot::Taken { prior, .. } => {
                let files = self
                    .prior_files()
                    .expect("a file taken over names the previous backup");
                return Entry {
                    path: self.path(at).to_string(),
                    kind: EntryKind::File,
                    mode: u32::from(mode_of(
                        self.walk.as_ref().expect("taken over from the walk").get(at).mode,
                    )),
                    size: files.size(prior),
                    chunks: files.chunks(prior).copied().collect(),
                    within: files.within(prior),
                };
            }
            Slot::Empty => fresh(self.walk.as_ref().expect("an empty slot is the walk's").get(at)),
        };
        Entry {
            path: self.path(at).to_string(),
            kind: if i.flags & DIR != 0 {
                EntryKind::Dir
            } else {
                EntryKind::File
            },
            mode: u32::from(i.mode),
            size: i.size,
            chunks: self.places[i.first as usize..(i.first + i.count) as usize].to_vec(),
            within: (i.flags & WITHIN != 0).then_some(Within {
                at: u64::from(i.at),
                of: u64::from(i.of),
            }),
        }
    }

    /// Item `at`'s file record, when it has one and chunks.
    fn record(&self, at: ItemNo, e: &Entry) -> Result<Option<FileRecord>, ManifestError> {
        if e.chunks.is_empty() {
            return Ok(None);
        }
        let i = match self.slot(at) {
            Slot::Item(i) => self.items[i],
            Slot::Empty => return Ok(None),
            Slot::Taken { prior: p, .. } => {
                let (files, id) = self
                    .prior
                    .as_ref()
                    .expect("a file taken over names the previous backup");
                return Ok(Some(FileRecord {
                    path: e.path.clone(),
                    stored: files
                        .stored_of(p)
                        .unwrap_or(&[])
                        .iter()
                        .map(|&l| u64::from(l))
                        .collect(),
                    stat: files.stat(p),
                    read_by: Some(files.reader(p).unwrap_or(id).clone()),
                }));
            }
        };
        let Some(r) = self.records.get(i.record as usize) else {
            return Ok(None);
        };
        let stored = e
            .chunks
            .iter()
            .map(|c| {
                self.lens
                    .get(c.hash())
                    .copied()
                    .ok_or_else(|| ManifestError::Entry {
                        path: e.path.clone(),
                        why: format!("its chunk {c} has no stored length"),
                    })
            })
            .collect::<Result<Vec<u64>, _>>()?;
        Ok(Some(FileRecord {
            path: e.path.clone(),
            stored,
            stat: (i.flags & STAT != 0).then_some(FileStat {
                size: e.size,
                mtime_ns: r.mtime_ns,
                ctime_ns: r.ctime_ns,
                ino: r.ino,
                dev: r.dev,
            }),
            read_by: None,
        }))
    }

    /// Whether item `at` is a file with chunks and a record of how it was read (its own, or the
    /// previous backup's when taken over).
    fn has_record(&self, at: ItemNo) -> bool {
        match self.slot(at) {
            Slot::Item(i) => self.items[i].count > 0 && self.items[i].record != NO_RECORD,
            Slot::Taken { prior, .. } => self.prior_files().is_some_and(|f| f.chunk_count(prior) > 0),
            Slot::Empty => false,
        }
    }

    /// The entries and file records, whole (for tests).
    #[cfg(test)]
    pub(super) fn lists(&self) -> (Vec<Entry>, Vec<FileRecord>) {
        let mut entries = Vec::new();
        let mut files = Vec::new();
        self.each_entry(&mut |e| {
            entries.push(e.clone());
            Ok(())
        })
        .unwrap();
        self.each_file(&mut |f, _| {
            files.push(f.clone());
            Ok(())
        })
        .unwrap();
        (entries, files)
    }
}

impl Lists for Listing {
    fn entry_count(&self) -> u64 {
        self.order.len() as u64
    }

    fn file_count(&self) -> u64 {
        self.order
            .iter()
            .filter(|&&at| self.has_record(at as usize))
            .count() as u64
    }

    fn each_entry(
        &self,
        each: &mut dyn FnMut(&Entry) -> Result<(), ManifestError>,
    ) -> Result<(), ManifestError> {
        for &at in &self.order {
            each(&self.entry(at as usize))?;
        }
        Ok(())
    }

    fn each_file(&self, each: &mut EachFile<'_>) -> Result<(), ManifestError> {
        for &at in &self.order {
            if !self.has_record(at as usize) {
                continue;
            }
            let e = self.entry(at as usize);
            if let Some(f) = self.record(at as usize, &e)? {
                each(&f, Some(&e))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::walk::Source;
    use super::*;

    fn id(i: u8) -> ChunkId {
        ChunkId::from_hash([i + 1; 32])
    }

    fn stat(size: u64) -> FileStat {
        FileStat {
            size,
            mtime_ns: 10,
            ctime_ns: 20,
            ino: 30,
            dev: 40,
        }
    }

    /// What a file costs the list: 32 bytes of item and 32 of record, besides its path and
    /// chunks. A mode that does not fit an item's 16 bits stays one the manifest refuses.
    #[test]
    fn items_and_records_stay_small_and_an_odd_mode_stays_refused() {
        assert_eq!(std::mem::size_of::<Item>(), 32);
        assert_eq!(std::mem::size_of::<Record>(), 32);
        assert_eq!(mode_of(0o600), 0o600);
        assert_eq!(mode_of(0o100_600), 0o100_600);
        assert_ne!(
            u32::from(mode_of(0o1_000_600)) & !0o7777,
            0,
            "the file type bits refuse it"
        );
        // A stat is kept only while the size it saw is the file's.
        let mut l = Listing::default();
        let at = l.push_file("base/1", 0o600, Some(stat(7))).unwrap();
        assert_ne!(l.items[at].flags & STAT, 0);
        l.set_size(at, 7).unwrap();
        assert_ne!(l.items[at].flags & STAT, 0);
        l.set_size(at, 8).unwrap();
        assert_eq!(l.items[at].flags & STAT, 0);
    }

    /// A walk (one file of it gone before it was copied) and chunks finishing in any order,
    /// small files sharing a chunk, a file taken over: written in path order (`1.2` before
    /// `1/2`), each file with its chunks in place.
    #[test]
    fn entries_and_records_come_out_in_path_order_with_their_chunks_in_place() {
        let src = |rel: &str, is_dir: bool| Source {
            rel: rel.into(),
            is_dir,
            mode: if is_dir { 0o700 } else { 0o600 },
        };
        let walk = Walk::of(vec![
            src("base", true),
            src("base/0", false),
            src("base/1", true),
            src("base/1.2", false),
            src("base/1/2", false),
            src("base/1/3", false),
            src("base/gone", false),
        ])
        .unwrap();
        let previous = Entry {
            path: "base/0".into(),
            kind: EntryKind::File,
            mode: 0o640,
            size: 7,
            chunks: vec![id(9)],
            within: None,
        };
        let by: BackupId = "20251201T000000Z".parse().unwrap();
        let files = PriorFiles::testing(
            vec![previous.clone()],
            vec![FileRecord {
                path: "base/0".into(),
                stored: vec![99],
                stat: Some(stat(7)),
                read_by: Some(by.clone()),
            }],
        );
        let prior = (Arc::new(files), "20260101T000000Z".parse().unwrap());
        let mut l = Listing::of_walk(Arc::new(walk), Some(prior));
        l.found(0).unwrap();
        l.found(2).unwrap();
        let big = 4;
        l.file_at(big, Some(stat(3 << 20))).unwrap();
        let places: Vec<Place> = (0..3).map(|i| l.next_place(big, i).unwrap()).collect();
        let shared = l.shared_place().unwrap();
        let (a, b) = (5, 3);
        l.file_at(a, Some(stat(100))).unwrap();
        l.file_at(b, Some(stat(50))).unwrap();
        l.share(a, shared).unwrap();
        l.share(b, shared).unwrap();
        l.taken_at(1, 0).unwrap();
        // A directory of a stream, after the walk's.
        l.push_dir("pg_wal", 0o700).unwrap();
        // Backwards, the shared chunk among them; one chunk met twice is stored once.
        l.fill(places[2], id(2), Some(12));
        l.fill(shared, id(5), Some(15));
        l.fill(places[1], id(1), Some(11));
        assert!(
            matches!(l.seal(), Err(BackupError::Unsound(m)) if m.contains("base/1/2")),
            "a place never filled is refused"
        );
        l.fill(places[0], id(1), None);
        l.set_within(a, Within { at: 0, of: 150 }).unwrap();
        l.set_within(b, Within { at: 100, of: 150 }).unwrap();
        l.set_size(big, 3 << 20).unwrap();
        l.set_size(a, 100).unwrap();
        // Written while read: its stat no longer vouches for it.
        l.set_size(b, 49).unwrap();
        l.seal().unwrap();
        let (entries, files) = l.lists();
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "base", "base/0", "base/1", "base/1.2", "base/1/2", "base/1/3", "pg_wal"
            ],
            "in path order, the file gone since the walk left out"
        );
        assert_eq!(entries[4].chunks, [id(1), id(1), id(2)]);
        assert_eq!(entries[3].within, Some(Within { at: 100, of: 150 }));
        assert_eq!(entries[1].chunks, previous.chunks);
        assert_eq!((entries[1].mode, entries[1].size), (0o600, 7), "the walk's mode");
        let record =
            |path: &str, stored: &[u64], stat: Option<FileStat>, read_by: Option<&BackupId>| FileRecord {
                path: path.into(),
                stored: stored.to_vec(),
                stat,
                read_by: read_by.cloned(),
            };
        assert_eq!(
            files,
            [
                record("base/0", &[99], Some(stat(7)), Some(&by)),
                record("base/1.2", &[15], None, None),
                record("base/1/2", &[11, 11, 12], Some(stat(3 << 20)), None),
                record("base/1/3", &[15], Some(stat(100)), None),
            ]
        );
        assert_eq!(l.taken_paths().collect::<Vec<_>>(), ["base/0"]);
        // What the manifest's own checks say of it.
        let mut frame = crate::basebackup::manifest::Manifest::parse(include_bytes!(
            "../../../tests/fixtures/manifest-v1.json"
        ))
        .unwrap();
        frame.entries = vec![];
        frame.files = vec![];
        frame.version = 3;
        frame.validate_lists(&l).unwrap();
    }

    /// Files taken over name the previous backup's chunks, stored lengths and stat where it
    /// holds them: no item, chunk place or record of their own, only their slot. Its own reads
    /// are named after it. One left out is not written, but what it names is still named.
    #[test]
    fn files_taken_over_cost_their_slot_alone() {
        let file = |path: &str, within: Option<Within>, chunk: u8| Entry {
            path: path.into(),
            kind: EntryKind::File,
            mode: 0o600,
            size: 10,
            chunks: vec![id(chunk)],
            within,
        };
        let record = |path: &str, read_by: Option<&str>| FileRecord {
            path: path.into(),
            stored: vec![20],
            stat: Some(stat(10)),
            read_by: read_by.map(|b| b.parse().unwrap()),
        };
        let entries = vec![
            file("a", Some(Within { at: 0, of: 30 }), 1),
            file("b", Some(Within { at: 10, of: 30 }), 1),
            file("c", None, 2),
            file("d", None, 3),
        ];
        let files = PriorFiles::testing(
            entries.clone(),
            vec![
                record("a", None),
                record("b", Some("20251201T000000Z")),
                record("c", None),
            ],
        );
        let walk = Walk::of(
            ["a", "b", "c"]
                .map(|rel| Source {
                    rel: rel.into(),
                    is_dir: false,
                    mode: 0o600,
                })
                .to_vec(),
        )
        .unwrap();
        let prior = (Arc::new(files), "20260101T000000Z".parse().unwrap());
        let mut l = Listing::of_walk(Arc::new(walk), Some(prior));
        for at in 0..3 {
            assert!(l.taken_at(at, 3).is_err(), "an entry without a record is read");
            l.taken_at(at, at).unwrap();
        }
        let pushed = l.push_dir("pg_wal", 0o700).unwrap();
        assert!(
            l.taken_at(pushed, 0).is_err(),
            "only the walk's files are taken over"
        );
        assert_eq!(l.items.len(), 1, "the pushed directory's item alone");
        assert!(l.places.is_empty() && l.records.is_empty());
        assert!(l.any_within());
        l.seal().unwrap();
        let (got, records) = l.lists();
        assert_eq!(got[..3], entries[..3]);
        let readers: Vec<String> = records
            .iter()
            .map(|r| r.read_by.as_ref().unwrap().to_string())
            .collect();
        assert_eq!(
            readers,
            ["20260101T000000Z", "20251201T000000Z", "20260101T000000Z"]
        );
        assert!(
            records
                .iter()
                .all(|r| r.stored == [20] && r.stat == Some(stat(10)))
        );
        assert_eq!(l.chunk_ids().collect::<Vec<_>>(), [&id(1), &id(1), &id(2)]);
        // Left out (as the server's manifest is), given back whole; its chunks still named.
        assert_eq!(l.take_out("b"), Some(entries[1].clone()));
        assert_eq!(l.take_out("b"), None);
        let (got, records) = l.lists();
        assert_eq!(
            got.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(),
            ["a", "c", "pg_wal"]
        );
        assert_eq!(records.len(), 2);
        assert_eq!(l.taken_paths().collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(l.chunk_ids().collect::<Vec<_>>(), [&id(1), &id(1), &id(2)]);
        // A file taken over and then read after all has an item of its own.
        l.file_at(2, Some(stat(10))).unwrap();
        assert_eq!(l.taken_paths().collect::<Vec<_>>(), ["a"]);
        assert_eq!(l.items.len(), 2);
    }

    #[test]
    fn a_chunk_out_of_its_files_order_is_refused_and_an_entry_taken_out_is_not_written() {
        let mut l = Listing::default();
        let f = l.push_file("a", 0o600, None).unwrap();
        let g = l.push_file("b", 0o600, None).unwrap();
        let p = l.next_place(g, 0).unwrap();
        assert!(l.next_place(g, 2).is_err(), "chunk 1 comes before chunk 2");
        assert!(l.next_place(g, 0).is_err(), "chunk 0 comes once");
        let q = l.next_place(f, 0).unwrap();
        assert!(
            l.next_place(g, 1).is_err(),
            "g's chunks do not resume once f's began"
        );
        l.fill(p, id(0), Some(5));
        l.fill(q, id(1), Some(6));
        l.set_size(g, 5).unwrap();
        // Taken out once sealed, as the server's manifest is.
        l.seal().unwrap();
        let e = l.take_out("b").unwrap();
        assert_eq!(e.chunks, [id(0)]);
        assert!(l.take_out("b").is_none());
        let (entries, files) = l.lists();
        assert_eq!(entries.len(), 1);
        assert_eq!(files.len(), 1);
        assert_eq!(
            l.chunk_ids().collect::<Vec<_>>(),
            [&id(0), &id(1)],
            "what it named is still named"
        );
    }
}
