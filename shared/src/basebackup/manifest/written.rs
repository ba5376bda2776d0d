//! A manifest written from its lists given one item at a time ([`Lists`]), never held as
//! vectors: a backup of 300,000 files held its entries and file records whole to write them,
//! some 250 bytes a file, where its own compact list of what it copied takes under half that.
//! The JSON written is byte for byte what [`Manifest`]'s own `Serialize` writes for the same
//! lists (the tests compare them), and [`Manifest::validate_lists`] checks the lists as
//! [`Manifest::validate`] checks a manifest that holds them.

use serde::ser::{Error as _, SerializeSeq};
use serde::{Serialize, Serializer};

use super::{
    BackupId, BackupStats, Delta, Entry, FileRecord, Manifest, ManifestError, PackRecord, PageChecks,
    StoredBlob, Tablespace, entry_err, is_zero_u32,
};
use crate::wal::{Lsn, TimelineId};

/// What is given each file record and its entry (`None`: the record names no entry).
pub type EachFile<'f> = dyn FnMut(&FileRecord, Option<&Entry>) -> Result<(), ManifestError> + 'f;

/// What a manifest's `entries` and `files` list, given in path order, one at a time.
pub trait Lists: Sync {
    /// How many entries [`Lists::each_entry`] gives.
    fn entry_count(&self) -> u64;
    /// How many records [`Lists::each_file`] gives.
    fn file_count(&self) -> u64;
    /// Give `each` every entry in order; stop at its first error.
    fn each_entry(
        &self,
        each: &mut dyn FnMut(&Entry) -> Result<(), ManifestError>,
    ) -> Result<(), ManifestError>;
    /// Give `each` every file record in order with its entry (`None`: the record names no
    /// entry); stop at its first error.
    fn each_file(&self, each: &mut EachFile<'_>) -> Result<(), ManifestError>;
}

/// The lists a [`Manifest`] holds.
#[derive(Debug)]
pub struct Held<'a> {
    pub entries: &'a [Entry],
    pub files: &'a [FileRecord],
}

impl<'a> Held<'a> {
    pub fn of(m: &'a Manifest) -> Held<'a> {
        Held {
            entries: &m.entries,
            files: &m.files,
        }
    }
}

impl Lists for Held<'_> {
    fn entry_count(&self) -> u64 {
        self.entries.len() as u64
    }

    fn file_count(&self) -> u64 {
        self.files.len() as u64
    }

    fn each_entry(
        &self,
        each: &mut dyn FnMut(&Entry) -> Result<(), ManifestError>,
    ) -> Result<(), ManifestError> {
        self.entries.iter().try_for_each(each)
    }

    fn each_file(&self, each: &mut EachFile<'_>) -> Result<(), ManifestError> {
        // Both lists are sorted: one pass over the entries finds every record's entry.
        let mut entries = self.entries.iter();
        for f in self.files {
            each(f, entries.find(|e| e.path == f.path))?;
        }
        Ok(())
    }
}

/// Check file record `f` of entry `e`, following the record of path `prev`.
pub(super) fn check_file(f: &FileRecord, e: Option<&Entry>, prev: Option<&str>) -> Result<(), ManifestError> {
    if prev.is_some_and(|p| p.as_bytes() >= f.path.as_bytes()) {
        return Err(entry_err(
            &f.path,
            "file records are not sorted by path, or repeat one",
        ));
    }
    let Some(e) = e.filter(|e| e.path == f.path) else {
        return Err(entry_err(&f.path, "a file record names no entry"));
    };
    if e.kind != super::EntryKind::File {
        return Err(entry_err(&f.path, "a file record names a directory"));
    }
    if e.chunks.len() != f.stored.len() {
        return Err(entry_err(
            &f.path,
            format!(
                "its file record has {} stored lengths for {} chunks",
                f.stored.len(),
                e.chunks.len()
            ),
        ));
    }
    if f.stat.is_some_and(|st| st.size != e.size) {
        return Err(entry_err(
            &f.path,
            "its file record's stat disagrees with its size",
        ));
    }
    Ok(())
}

impl Manifest {
    /// Write this manifest's JSON with `lists` as its entries and file records (its own lists
    /// are not written: they are left empty by whoever calls this).
    pub fn write_json<W: std::io::Write>(&self, w: W, lists: &dyn Lists) -> serde_json::Result<()> {
        serde_json::to_writer(w, &Out::of(self, lists))
    }
}

/// [`Manifest`]'s fields in its order, with its attributes, its lists taken from [`Lists`].
/// Built by naming every field of [`Manifest`]: a field added there does not compile here
/// until it is written too.
#[derive(Serialize)]
struct Out<'a> {
    format: &'a str,
    version: u32,
    id: &'a BackupId,
    #[serde(with = "crate::repo::identity::u64_string")]
    system_identifier: u64,
    pg_version: u32,
    timeline: TimelineId,
    start_lsn: Lsn,
    stop_lsn: Lsn,
    start_time_us: i64,
    stop_time_us: i64,
    start_wal: &'a str,
    stop_wal: &'a str,
    chunk_size: u64,
    backup_label: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tablespace_map: Option<&'a str>,
    tablespaces: &'a [Tablespace],
    entries: Entries<'a>,
    stats: &'a BackupStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    files_examined_after_us: Option<i64>,
    #[serde(skip_serializing_if = "Files::is_empty")]
    files: Files<'a>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    packs: &'a [PackRecord],
    #[serde(skip_serializing_if = "Option::is_none")]
    server_manifest: Option<&'a StoredBlob>,
    #[serde(skip_serializing_if = "Option::is_none")]
    incremental_from: Option<&'a BackupId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    page_checks: Option<&'a PageChecks>,
    #[serde(skip_serializing_if = "is_zero_u32")]
    generation: u32,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    deltas: &'a [Delta],
}

impl<'a> Out<'a> {
    fn of(m: &'a Manifest, lists: &'a dyn Lists) -> Out<'a> {
        let Manifest {
            format,
            version,
            id,
            system_identifier,
            pg_version,
            timeline,
            start_lsn,
            stop_lsn,
            start_time_us,
            stop_time_us,
            start_wal,
            stop_wal,
            chunk_size,
            backup_label,
            tablespace_map,
            tablespaces,
            entries: _,
            stats,
            files_examined_after_us,
            files: _,
            packs,
            server_manifest,
            incremental_from,
            page_checks,
            generation,
            deltas,
            held: _,
        } = m;
        Out {
            format,
            version: *version,
            id,
            system_identifier: *system_identifier,
            pg_version: *pg_version,
            timeline: *timeline,
            start_lsn: *start_lsn,
            stop_lsn: *stop_lsn,
            start_time_us: *start_time_us,
            stop_time_us: *stop_time_us,
            start_wal,
            stop_wal,
            chunk_size: *chunk_size,
            backup_label,
            tablespace_map: tablespace_map.as_deref(),
            tablespaces,
            entries: Entries(lists),
            stats,
            files_examined_after_us: *files_examined_after_us,
            files: Files(lists),
            packs,
            server_manifest: server_manifest.as_ref(),
            incremental_from: incremental_from.as_ref(),
            page_checks: page_checks.as_ref(),
            generation: *generation,
            deltas,
        }
    }
}

/// Write as a sequence of `count` what `walk` gives its callback, one at a time: the first
/// error of the serializer, or of `walk`, ends it.
fn write_seq<S: Serializer, T: Serialize>(
    s: S,
    count: u64,
    walk: impl FnOnce(&mut dyn FnMut(&T) -> Result<(), ManifestError>) -> Result<(), ManifestError>,
) -> Result<S::Ok, S::Error> {
    let mut seq = s.serialize_seq(usize::try_from(count).ok())?;
    let mut failed = None;
    let walked = walk(&mut |item| {
        seq.serialize_element(item).map_err(|err| {
            failed = Some(err);
            ManifestError::Invalid("written".into())
        })
    });
    match (failed, walked) {
        (Some(err), _) => Err(err),
        (None, Err(e)) => Err(S::Error::custom(e)),
        (None, Ok(())) => seq.end(),
    }
}

struct Entries<'a>(&'a dyn Lists);

impl Serialize for Entries<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        write_seq(s, self.0.entry_count(), |each| self.0.each_entry(each))
    }
}

struct Files<'a>(&'a dyn Lists);

impl Files<'_> {
    fn is_empty(&self) -> bool {
        self.0.file_count() == 0
    }
}

impl Serialize for Files<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        write_seq(s, self.0.file_count(), |each| {
            self.0.each_file(&mut |f, _| each(f))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::basebackup::chunk::ChunkId;
    use crate::basebackup::manifest::{EntryKind, FileStat, Within};

    /// A manifest with every optional field set, and files that share a chunk.
    fn full() -> Manifest {
        let mut m = Manifest::parse(include_bytes!("../../../tests/fixtures/manifest-v1.json")).unwrap();
        let id = |b: u8| ChunkId::from_hash([b; 32]);
        m.version = 4;
        m.tablespace_map = Some("16500 /srv/ts\n".into());
        m.files_examined_after_us = Some(1_700_000_000_000_000);
        m.incremental_from = Some("20260101T000000Z".parse().unwrap());
        m.server_manifest = Some(StoredBlob {
            size: 10,
            chunks: vec![id(9)],
        });
        m.generation = 2;
        m.entries = vec![
            Entry {
                path: "base".into(),
                kind: EntryKind::Dir,
                mode: 0o700,
                size: 0,
                chunks: vec![],
                within: None,
            },
            Entry {
                path: "base/1".into(),
                kind: EntryKind::File,
                mode: 0o600,
                size: 5,
                chunks: vec![id(1)],
                within: Some(Within { at: 0, of: 12 }),
            },
            Entry {
                path: "base/2".into(),
                kind: EntryKind::File,
                mode: 0o600,
                size: 7,
                chunks: vec![id(1)],
                within: Some(Within { at: 5, of: 12 }),
            },
            Entry {
                path: "base/3".into(),
                kind: EntryKind::File,
                mode: 0o600,
                size: 0,
                chunks: vec![],
                within: None,
            },
        ];
        m.files = vec![
            FileRecord {
                path: "base/1".into(),
                stored: vec![30],
                stat: Some(FileStat {
                    size: 5,
                    mtime_ns: 1,
                    ctime_ns: 2,
                    ino: 3,
                    dev: 4,
                }),
                read_by: None,
            },
            FileRecord {
                path: "base/2".into(),
                stored: vec![30],
                stat: None,
                read_by: Some("20251231T000000Z".parse().unwrap()),
            },
        ];
        m
    }

    #[test]
    fn lists_given_one_at_a_time_write_the_bytes_the_manifest_itself_writes() {
        for m in [
            full(),
            Manifest::parse(include_bytes!("../../../tests/fixtures/manifest-v1.json")).unwrap(),
        ] {
            let whole = serde_json::to_vec(&m).unwrap();
            let mut frame = m.clone();
            frame.entries = vec![];
            frame.files = vec![];
            let mut streamed = Vec::new();
            frame.write_json(&mut streamed, &Held::of(&m)).unwrap();
            assert_eq!(
                String::from_utf8(streamed).unwrap(),
                String::from_utf8(whole).unwrap()
            );
        }
    }

    #[test]
    fn lists_are_checked_as_the_manifest_holding_them_is() {
        let m = full();
        let mut frame = m.clone();
        frame.entries = vec![];
        frame.files = vec![];
        m.validate().unwrap();
        frame.validate_lists(&Held::of(&m)).unwrap();
        // Out of order, a record without its entry, a record of a directory, a stat that
        // disagrees: refused either way.
        let mut swapped = m.clone();
        swapped.entries.swap(1, 2);
        let mut orphan = m.clone();
        orphan.files[0].path = "base/0".into();
        let mut dir = m.clone();
        dir.files.insert(
            0,
            FileRecord {
                path: "base".into(),
                stored: vec![],
                stat: None,
                read_by: None,
            },
        );
        let mut stat = m.clone();
        stat.files[0].stat.as_mut().unwrap().size = 6;
        for bad in [swapped, orphan, dir, stat] {
            let whole = bad.validate().unwrap_err().to_string();
            let lists = frame.validate_lists(&Held::of(&bad)).unwrap_err().to_string();
            assert_eq!(lists, whole);
        }
    }
}
