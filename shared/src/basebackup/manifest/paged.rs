//! The manifest a restore writes from, held as it is stored ([`PagedManifest`]): its frame
//! parsed (every field but the entries and the file records), its entries read again from the
//! stored object each time they are needed, a page at a time, never all at once.
//!
//! A manifest's entries grow with the number of files (some 150 bytes a file once parsed: 45 MB
//! at 300,000 files), its stored object far less (some 21 bytes a file: 4.3 MB at 200,000
//! files, chunk ids shared by neighbouring small files compressing well). A restore keeps the
//! stored object and reads it three times: for the plan (every entry checked, as
//! [`Manifest::validate`] checks them, with the restore's own checks), and for the files it
//! writes, a page at a time. Each read opens the same bytes, verified again to their end; the
//! first read to its end, before anything is written, is what lets the later ones be used as
//! they are parsed.

use std::io::Read;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::{DeserializeSeed, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::entry_checks::EntryChecks;
use super::outline::{Held, frame_of_json, is_stored_as, streamed_frame};
use super::{BackupId, Entry, EntryKind, FileRecord, Manifest, ManifestError};
use crate::repo::object::{ObjectKind, Sealer};
use crate::repo::stored::{Damage, Envelope, Opened, Opening, StoredKind};

/// A backup's manifest held as stored: see the module's documentation.
#[derive(Debug, Clone)]
pub struct PagedManifest {
    /// Everything but the entries and file records ([`Held::Paged`]); once [`Self::check`]
    /// read the entries, the directories are its entries.
    frame: Manifest,
    source: EntrySource,
    /// What [`Self::check`] counted; `None` until it read every entry.
    counted: Option<EntryCounts>,
    /// The frame's packs and differences were let go ([`Self::let_go_of_places`]).
    places_let_go: bool,
}

/// What reading every entry of a manifest once counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntryCounts {
    pub files: u64,
    pub directories: u64,
    /// Bytes the files add up to.
    pub bytes: u64,
}

/// Why entries could not be read to their end.
#[derive(Debug, thiserror::Error)]
pub enum EntriesError<E> {
    /// The stored manifest: damaged, or an entry refused.
    #[error(transparent)]
    Manifest(Damage<ManifestError>),
    /// What the caller did with an entry.
    #[error(transparent)]
    Stopped(E),
    /// The entries were read before they were all checked once ([`PagedManifest::check`]).
    #[error("the manifest's entries were not checked before they were used")]
    Unchecked,
}

/// Where the entries are read from: the stored object, or (a manifest parsed from its JSON, as
/// tests make one) the document itself.
#[derive(Debug, Clone)]
struct EntrySource {
    held: HeldBytes,
    /// The frame without its lists: what each entry's checks need.
    header: Arc<Manifest>,
}

#[derive(Clone)]
enum HeldBytes {
    Sealed {
        stored: Bytes,
        sealer: Sealer,
        kind: ObjectKind,
    },
    Json(Bytes),
}

impl std::fmt::Debug for HeldBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeldBytes::Sealed { stored, .. } => write!(f, "Sealed({} bytes)", stored.len()),
            HeldBytes::Json(json) => write!(f, "Json({} bytes)", json.len()),
        }
    }
}

impl PagedManifest {
    /// The manifest of JSON document `json`, its frame validated (its entries are checked by
    /// [`Self::check`]).
    pub fn from_json(json: Vec<u8>) -> Result<PagedManifest, ManifestError> {
        let frame = frame_of_json(&json)?;
        Ok(PagedManifest::new(frame, HeldBytes::Json(Bytes::from(json))))
    }

    /// `m`, held as its JSON document (a manifest already in memory: a catalog's, a test's).
    pub fn of(m: &Manifest) -> Result<PagedManifest, ManifestError> {
        PagedManifest::from_json(m.to_json())
    }

    fn new(frame: Manifest, held: HeldBytes) -> PagedManifest {
        let mut header = frame.clone();
        header.packs = Vec::new();
        header.deltas = Vec::new();
        PagedManifest {
            source: EntrySource {
                held,
                header: Arc::new(header),
            },
            frame,
            counted: None,
            places_let_go: false,
        }
    }

    /// Everything but the entries and the file records; once [`Self::check`] read the entries,
    /// the directories are its entries.
    pub fn frame(&self) -> &Manifest {
        &self.frame
    }

    pub fn id(&self) -> &BackupId {
        &self.frame.id
    }

    /// Let go of the frame's packs and differences, once what reads chunks holds their places
    /// ([`Manifest::places`]): a list of every chunk the backup's packs hold, which the restore
    /// held twice (40 MB each at 1,000,000 chunks). [`Self::whole`] is refused from then on.
    pub fn let_go_of_places(&mut self) {
        self.frame.packs = Vec::new();
        self.frame.deltas = Vec::new();
        self.places_let_go = true;
    }

    /// What [`Self::check`] counted, once it read every entry.
    pub fn counts(&self) -> Option<EntryCounts> {
        self.counted
    }

    /// Read every entry once: each checked as [`Manifest::validate`] checks it, then given to
    /// `each` (the caller's own checks), the content verified to its end. The directories become
    /// the frame's entries, and the entries may be used from then on ([`Self::files`]).
    pub fn check<E>(
        &mut self,
        mut each: impl FnMut(&Entry) -> Result<(), E>,
    ) -> Result<EntryCounts, EntriesError<E>> {
        let mut counts = EntryCounts::default();
        let mut dirs = Vec::new();
        self.source.read(&mut |e: Entry| {
            each(&e)?;
            match e.kind {
                EntryKind::Dir => {
                    counts.directories += 1;
                    dirs.push(e);
                }
                EntryKind::File => {
                    counts.files += 1;
                    // validate() bounded the sum.
                    counts.bytes += e.size;
                }
            }
            Ok(())
        })?;
        dirs.shrink_to_fit();
        self.frame.entries = dirs;
        self.counted = Some(counts);
        Ok(counts)
    }

    /// Give `each` every file entry, in path order, checked again as it is read. Refused until
    /// [`Self::check`] read them all once: what `each` does with an entry cannot wait for the
    /// end of the content, which that first read verified.
    pub fn files<E>(&self, mut each: impl FnMut(Entry) -> Result<(), E>) -> Result<u64, EntriesError<E>> {
        if self.counted.is_none() {
            return Err(EntriesError::Unchecked);
        }
        self.source.files(&mut each)
    }

    /// Read the stored manifest once to its end, giving `each` every entry in path order, each
    /// checked as [`Manifest::validate`] checks it, and `record` every file record as it is
    /// (the caller checks them against the entries). Nothing given may be acted on before this
    /// returns `Ok`: the content is verified at its end. What a backup builds on reads
    /// ([`crate::commands`]' previous backup), never holding the document or its lists parsed.
    pub fn lists<E>(
        &self,
        mut each: impl FnMut(Entry) -> Result<(), E>,
        mut record: impl FnMut(FileRecord) -> Result<(), E>,
    ) -> Result<(), EntriesError<E>> {
        self.source.read_lists(&mut each, Some(&mut record))
    }

    /// A handle that reads the same file entries from another thread ([`FileEntries::files`]).
    pub fn file_entries(&self) -> Result<FileEntries, EntriesError<std::convert::Infallible>> {
        match self.counted {
            Some(_) => Ok(FileEntries(self.source.clone())),
            None => Err(EntriesError::Unchecked),
        }
    }

    /// The whole manifest (its file records aside), every entry held: for what compares every
    /// file at once (`--delta`).
    pub fn whole(&self) -> Result<Manifest, Damage<ManifestError>> {
        if self.places_let_go {
            return Err(Damage::Content(ManifestError::Invalid(
                "its packs were let go before it was read whole".into(),
            )));
        }
        let mut m = self.frame.clone();
        m.held = Held::Whole;
        let mut entries = Vec::with_capacity(self.counted.map_or(0, |c| (c.files + c.directories) as usize));
        self.source
            .read(&mut |e: Entry| {
                entries.push(e);
                Ok::<(), std::convert::Infallible>(())
            })
            .map_err(|e| match e {
                EntriesError::Manifest(d) => d,
                EntriesError::Stopped(never) => match never {},
                EntriesError::Unchecked => unreachable!("the source reads whatever it holds"),
            })?;
        m.entries = entries;
        m.validate().map_err(Damage::Content)?;
        Ok(m)
    }
}

/// The file entries of a checked [`PagedManifest`], for a thread of their own.
#[derive(Debug, Clone)]
pub struct FileEntries(EntrySource);

impl FileEntries {
    /// As [`PagedManifest::files`].
    pub fn files<E>(&self, mut each: impl FnMut(Entry) -> Result<(), E>) -> Result<u64, EntriesError<E>> {
        self.0.files(&mut each)
    }
}

impl EntrySource {
    /// Give `each` every file entry in order, each checked first; how many there were.
    fn files<E>(&self, each: &mut dyn FnMut(Entry) -> Result<(), E>) -> Result<u64, EntriesError<E>> {
        let mut files = 0u64;
        self.read(&mut |e: Entry| match e.kind {
            EntryKind::Dir => Ok(()),
            EntryKind::File => {
                files += 1;
                each(e)
            }
        })?;
        Ok(files)
    }

    /// Give `each` every entry in order, each checked first; the content verified at its end.
    fn read<E>(&self, each: &mut dyn FnMut(Entry) -> Result<(), E>) -> Result<(), EntriesError<E>> {
        self.read_lists(each, None)
    }

    /// [`Self::read`], and every file record to `record` when given (else they are skipped).
    fn read_lists<E>(
        &self,
        each: &mut dyn FnMut(Entry) -> Result<(), E>,
        record: Option<&mut dyn FnMut(FileRecord) -> Result<(), E>>,
    ) -> Result<(), EntriesError<E>> {
        let content = |e: ManifestError| EntriesError::Manifest(Damage::Content(e));
        match &self.held {
            HeldBytes::Json(json) => lists_from(&mut &json[..], &self.header, each, record),
            HeldBytes::Sealed { stored, sealer, kind } => {
                let mut r = sealer
                    .open_reader(stored, *kind, self.header.id.as_str())
                    .map_err(|e| EntriesError::Manifest(Damage::Envelope(e)))?;
                let parsed = lists_from(&mut r, &self.header, each, record);
                if let Some(e) = r.failure() {
                    return Err(EntriesError::Manifest(Damage::Envelope(e.clone())));
                }
                parsed?;
                match r.verified() {
                    true => Ok(()),
                    false => Err(content(ManifestError::Invalid(
                        "the document ends before its content does".into(),
                    ))),
                }
            }
        }
    }
}

/// Parse document `r`'s entries, giving each to `each` once checked ([`EntryChecks`], with
/// `header`'s version, chunk size and tablespaces), and its file records to `record` as they
/// are (when given; else they are skipped with every other field).
fn lists_from<E>(
    r: &mut dyn Read,
    header: &Manifest,
    each: &mut dyn FnMut(Entry) -> Result<(), E>,
    mut record: Option<&mut dyn FnMut(FileRecord) -> Result<(), E>>,
) -> Result<(), EntriesError<E>> {
    let content = |e: ManifestError| EntriesError::Manifest(Damage::Content(e));
    let mut checks = EntryChecks::new(header).map_err(content)?;
    let stop: std::cell::RefCell<Option<EntriesError<E>>> = std::cell::RefCell::new(None);
    let stopped = |outcome: Result<(), EntriesError<E>>| match outcome {
        Ok(()) => true,
        Err(e) => {
            *stop.borrow_mut() = Some(e);
            false
        }
    };
    let mut on_entry = |e: Entry| -> bool {
        stopped(match checks.check(&e) {
            Ok(()) => each(e).map_err(EntriesError::Stopped),
            Err(refused) => Err(content(refused)),
        })
    };
    let wants_records = record.is_some();
    let mut on_record = |f: FileRecord| -> bool {
        let give = record.as_mut().expect("records are read only when asked for");
        stopped(give(f).map_err(EntriesError::Stopped))
    };
    let mut de = serde_json::Deserializer::from_reader(std::io::BufReader::with_capacity(1 << 16, r));
    let parsed = Document {
        on_entry: &mut on_entry,
        on_record: wants_records.then_some(&mut on_record as &mut dyn FnMut(FileRecord) -> bool),
    }
    .deserialize(&mut de)
    .and_then(|()| de.end());
    if let Some(e) = stop.into_inner() {
        return Err(e);
    }
    parsed.map_err(|e| content(ManifestError::Invalid(e.to_string())))
}

/// The manifest document, its `entries` given one at a time to `on_entry` and its `files` to
/// `on_record` when set (each says whether to go on), everything else skipped.
struct Document<'a> {
    on_entry: &'a mut dyn FnMut(Entry) -> bool,
    on_record: Option<&'a mut dyn FnMut(FileRecord) -> bool>,
}

impl<'de> DeserializeSeed<'de> for Document<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Document<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a manifest")
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let (mut entries, mut files) = (false, false);
        while let Some(key) = map.next_key::<String>()? {
            match (key.as_str(), &mut self.on_record) {
                ("entries", _) => {
                    if std::mem::replace(&mut entries, true) {
                        return Err(A::Error::duplicate_field("entries"));
                    }
                    map.next_value_seed(Each {
                        on: &mut *self.on_entry,
                        what: "a list of entries",
                    })?;
                }
                ("files", Some(on_record)) => {
                    if std::mem::replace(&mut files, true) {
                        return Err(A::Error::duplicate_field("files"));
                    }
                    map.next_value_seed(Each {
                        on: &mut **on_record,
                        what: "a list of file records",
                    })?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        match entries {
            true => Ok(()),
            false => Err(A::Error::missing_field("entries")),
        }
    }
}

/// A list, each element given to `on` as it is parsed.
struct Each<'a, T> {
    on: &'a mut dyn FnMut(T) -> bool,
    what: &'static str,
}

impl<'de, T: serde::Deserialize<'de>> DeserializeSeed<'de> for Each<'_, T> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, T: serde::Deserialize<'de>> Visitor<'de> for Each<'_, T> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.what)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(e) = seq.next_element::<T>()? {
            if !(self.on)(e) {
                return Err(A::Error::custom("stopped"));
            }
        }
        Ok(())
    }
}

/// `backups/<id>/manifest.wvo`, read for a restore: the frame parsed as the object is
/// decompressed, the object itself kept for the entries (see the module's documentation).
impl StoredKind for PagedManifest {
    type Id = BackupId;
    type Error = ManifestError;
    const ENVELOPE: Envelope = <Manifest as StoredKind>::ENVELOPE;

    fn key(id: &BackupId) -> String {
        <Manifest as StoredKind>::key(id)
    }

    fn name(id: &BackupId) -> String {
        <Manifest as StoredKind>::name(id)
    }

    fn parse(opened: Opened, id: &BackupId) -> Result<PagedManifest, ManifestError> {
        let m = PagedManifest::from_json(opened.content)?;
        is_stored_as(&m.frame, id)?;
        Ok(m)
    }

    /// Bytes not read by this process's store (a fallback repository's copy): copied.
    fn open_sealed(
        sealer: &Sealer,
        kind: ObjectKind,
        bytes: &[u8],
        id: &BackupId,
        _: Vec<u8>,
    ) -> Opening<PagedManifest> {
        Self::open_sealed_read(sealer, kind, &Bytes::copy_from_slice(bytes), id)
    }

    /// The bytes read, kept as they are (4.3 MB at 200,000 files: a copy was that much more).
    fn open_sealed_read(
        sealer: &Sealer,
        kind: ObjectKind,
        bytes: &Bytes,
        id: &BackupId,
    ) -> Opening<PagedManifest> {
        let frame = streamed_frame(sealer, kind, bytes, id)?;
        let held = HeldBytes::Sealed {
            stored: bytes.clone(),
            sealer: sealer.clone(),
            kind,
        };
        Ok(PagedManifest::new(frame, held))
    }
}

#[cfg(test)]
mod tests {
    use super::super::outline::tests::FIXTURES;
    use super::*;
    use crate::repo::stored::open;

    /// The entries `paged` gives: its directories, then its files.
    fn read(paged: &PagedManifest) -> (Vec<Entry>, Vec<Entry>) {
        let mut files = Vec::new();
        let n = paged
            .files(|e| {
                files.push(e);
                Ok::<(), std::convert::Infallible>(())
            })
            .unwrap();
        assert_eq!(n, files.len() as u64);
        (paged.frame().entries.clone(), files)
    }

    /// Read from its JSON or from the stored object, plain or encrypted, a manifest held as
    /// stored gives the entries, frame and whole manifest that parsing it whole gives.
    #[test]
    fn a_paged_manifest_gives_what_the_whole_manifest_holds() {
        let keyed = crate::repo::keys::testing::sealer("0123456789abcdef0123456789abcdef");
        for bytes in FIXTURES {
            let whole = Manifest::parse_without_records(bytes).unwrap();
            let dirs: Vec<Entry> = whole
                .entries
                .iter()
                .filter(|e| e.kind == EntryKind::Dir)
                .cloned()
                .collect();
            let files: Vec<Entry> = whole
                .entries
                .iter()
                .filter(|e| e.kind == EntryKind::File)
                .cloned()
                .collect();
            let plain = Sealer::plain();
            let stored = |sealer: &Sealer| {
                let sealed = sealer
                    .seal(ObjectKind::Manifest, whole.id.as_str(), bytes, 3)
                    .unwrap();
                open::<PagedManifest>(sealer, &whole.id, &sealed.bytes).unwrap()
            };
            for mut paged in [
                PagedManifest::from_json(bytes.to_vec()).unwrap(),
                stored(&plain),
                stored(&keyed),
            ] {
                assert!(matches!(
                    paged.files(|_| Ok::<(), ()>(())),
                    Err(EntriesError::Unchecked)
                ));
                let mut seen = 0;
                let counts = paged
                    .check(|_| {
                        seen += 1;
                        Ok::<(), ()>(())
                    })
                    .unwrap();
                assert_eq!(seen, whole.entries.len());
                assert_eq!(
                    counts,
                    EntryCounts {
                        files: files.len() as u64,
                        directories: dirs.len() as u64,
                        bytes: files.iter().map(|e| e.size).sum(),
                    }
                );
                assert_eq!(paged.counts(), Some(counts));
                assert_eq!(
                    read(&paged),
                    (dirs.clone(), files.clone()),
                    "version {}",
                    whole.version
                );
                assert_eq!(paged.whole().unwrap(), whole);
                let mut frame = whole.clone();
                frame.entries = dirs.clone();
                frame.held = Held::Paged;
                assert_eq!(paged.frame(), &frame, "every other field as stored");
                assert!(!paged.frame().is_whole());
                // Once the places are held elsewhere: the files still read, never the whole.
                paged.let_go_of_places();
                assert!(paged.frame().packs.is_empty() && paged.frame().deltas.is_empty());
                assert_eq!(read(&paged).1, files);
                assert!(paged.whole().is_err());
            }
        }
    }

    /// An entry is refused as [`Manifest::validate`] refuses it, by the read that meets it; the
    /// caller's own check stops the read with its error.
    #[test]
    fn a_bad_entry_is_refused_as_it_is_read() {
        let m = Manifest::parse(FIXTURES[2]).unwrap();
        let mut bad = m.clone();
        let last = bad.entries.len() - 1;
        bad.entries[last].path = "base/../../etc/passwd".into();
        let expected = bad.validate().unwrap_err().to_string();
        let mut paged = PagedManifest::of(&bad).unwrap();
        let mut given = 0;
        match paged.check(|_| {
            given += 1;
            Ok::<(), ()>(())
        }) {
            Err(EntriesError::Manifest(Damage::Content(e))) => assert_eq!(e.to_string(), expected),
            other => panic!("{other:?}"),
        }
        assert_eq!(given, last, "every entry before it was given");
        assert_eq!(paged.counts(), None);
        assert!(matches!(paged.file_entries(), Err(EntriesError::Unchecked)));

        let mut paged = PagedManifest::of(&m).unwrap();
        let err = paged.check(|e| {
            if e.kind == EntryKind::File {
                Err("no files")
            } else {
                Ok(())
            }
        });
        assert!(matches!(err, Err(EntriesError::Stopped("no files"))), "{err:?}");
        assert_eq!(paged.counts(), None);
    }

    /// Nothing may be restored through a file, however the names between sort: checked one entry
    /// at a time as when the manifest is held whole.
    #[test]
    fn an_entry_under_a_file_is_refused_whatever_sorts_between() {
        let with = |paths: &[(&str, EntryKind)]| {
            let mut m = Manifest::parse(FIXTURES[0]).unwrap();
            m.entries = paths
                .iter()
                .map(|(path, kind)| Entry {
                    within: None,
                    path: path.to_string(),
                    kind: *kind,
                    mode: if *kind == EntryKind::Dir { 0o700 } else { 0o600 },
                    size: 0,
                    chunks: vec![],
                })
                .collect();
            m
        };
        use EntryKind::{Dir, File};
        for (paths, through) in [
            (
                vec![("a", File), ("a-b", File), ("a.1", File), ("a/b", File)],
                Some("a"),
            ),
            (vec![("a", File), ("a.1", File), ("a.1/x", File)], Some("a.1")),
            (
                vec![("a", File), ("a.1", File), ("a.2", File), ("a/x", Dir)],
                Some("a"),
            ),
            (
                vec![("a", File), ("a.1", Dir), ("a.1/x", File), ("b", File)],
                None,
            ),
            (
                vec![("a", Dir), ("a/b", File), ("a/b.c", File), ("a/c", File)],
                None,
            ),
        ] {
            let m = with(&paths);
            let whole = m.validate();
            let mut paged = PagedManifest::of(&m).unwrap();
            let streamed = paged.check(|_| Ok::<(), ()>(()));
            match through {
                Some(file) => {
                    let err = whole.unwrap_err().to_string();
                    assert!(err.contains(&format!("goes through {file:?}")), "{err}");
                    match streamed {
                        Err(EntriesError::Manifest(Damage::Content(e))) => assert_eq!(e.to_string(), err),
                        other => panic!("{other:?}"),
                    }
                }
                None => {
                    whole.unwrap();
                    streamed.unwrap();
                }
            }
        }
    }
}
