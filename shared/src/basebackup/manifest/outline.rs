//! A manifest read whole, or only for what it says of its backup: its outline.
//!
//! Choosing a backup (restore's selection, the restorable windows, `find`, a drill's plan) needs
//! each backup's LSNs, times, timeline and counts, never its files. A catalog of outlines holds
//! none of the entries, file records, packs or differences, which grow with the number of files:
//! a repository of 14 backups of 61,000 files held 14 manifests of some 12 MB each in every
//! restore and in the daemon. The one backup a restore writes is then read whole
//! ([`Manifest`]'s [`StoredKind`]), once.
//!
//! An outline is parsed from the same stored document (`docs/FORMAT.md`, "Manifest"): the lists
//! are skipped as they are read, never allocated, and what is kept is validated as a whole
//! manifest's is.

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::{
    BackupId, BackupStats, Delta, Entry, Manifest, ManifestError, PackRecord, StoredBlob, Tablespace,
    check_format, check_size,
};
use crate::basebackup::page_checksum::PageChecks;
use serde::de::DeserializeOwned;

use super::{MAX_ENTRIES, MAX_MANIFEST_BYTES, Probe};
use crate::repo::object::{ObjectKind, Sealer};
use crate::repo::stored::{Damage, Envelope, Opened, Opening, StoredKind};
use crate::wal::{Lsn, TimelineId};

/// How much of its stored manifest a [`Manifest`] value holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Held {
    /// Everything stored, as written (a catalog may still drop the file records, which only
    /// the next backup reads).
    #[default]
    Whole,
    /// The outline: `entries`, `files`, `packs` and `deltas` are left empty. Never written,
    /// restored or compared with a directory.
    Outline,
    /// A restore's frame ([`super::paged::PagedManifest`]): the packs and differences, the
    /// directories alone as `entries` once the entries were read, and no file records. The files
    /// are read from the stored manifest as they are written.
    Paged,
}

/// The manifest of a backup, read for its outline only (see the module's documentation).
#[derive(Debug, Clone)]
pub struct ManifestOutline(pub Manifest);

/// What a partial read keeps of the stored document: every field but the file records, and the
/// entries, packs and differences as `E`, `P` and `D` say (kept, or skipped as read). A field
/// added to [`Manifest`] must be added here too: [`Parts::into_manifest`] names every field and
/// does not compile without it.
#[derive(Deserialize)]
#[serde(bound = "E: Kept<Entry>, P: Kept<PackRecord>, D: Kept<Delta>")]
struct Parts<E, P, D> {
    format: String,
    version: u32,
    id: BackupId,
    #[serde(with = "crate::repo::identity::u64_string")]
    system_identifier: u64,
    pg_version: u32,
    timeline: TimelineId,
    start_lsn: Lsn,
    stop_lsn: Lsn,
    start_time_us: i64,
    stop_time_us: i64,
    start_wal: String,
    stop_wal: String,
    chunk_size: u64,
    backup_label: String,
    #[serde(default)]
    tablespace_map: Option<String>,
    #[serde(default)]
    tablespaces: Vec<Tablespace>,
    /// Required, as in a whole manifest.
    entries: E,
    stats: BackupStats,
    #[serde(default)]
    files_examined_after_us: Option<i64>,
    #[serde(default)]
    server_manifest: Option<StoredBlob>,
    #[serde(default)]
    incremental_from: Option<BackupId>,
    #[serde(default)]
    page_checks: Option<PageChecks>,
    #[serde(default)]
    generation: u32,
    #[serde(default)]
    packs: P,
    #[serde(default)]
    deltas: D,
}

/// A list a partial read keeps ([`Vec`], at its length) or skips as it is read ([`IgnoredAny`]).
trait Kept<T>: for<'de> Deserialize<'de> + Default {
    fn kept(self) -> Vec<T>;
}

impl<T: for<'de> Deserialize<'de>> Kept<T> for Vec<T> {
    fn kept(mut self) -> Vec<T> {
        self.shrink_to_fit();
        self
    }
}

/// A list read into room for as many elements as the probe counted ([`streamed_checked`]): a
/// list read from JSON otherwise grows by doubling, and its last doubling and the copy that
/// shrinks it back were, for a moment, twice the list (17 MB of entries at 200,000 files).
struct Presized<T>(Vec<T>);

impl<T> Default for Presized<T> {
    fn default() -> Presized<T> {
        Presized(Vec::new())
    }
}

thread_local! {
    /// The entries the probe of the manifest being parsed on this thread counted (0: unknown);
    /// taken by the first [`Presized`] list read.
    static COUNTED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Sets [`COUNTED`] for one parse, and clears it whatever the parse did.
struct Counted;

impl Counted {
    fn set(n: u64) -> Counted {
        COUNTED.with(|c| c.set(usize::try_from(n).unwrap_or(0).min(MAX_ENTRIES)));
        Counted
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        COUNTED.with(|c| c.set(0));
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Presized<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Presized<T>, D::Error> {
        use serde::de::{SeqAccess, Visitor};
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Presized<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Presized<T>, A::Error> {
                let mut v = Vec::with_capacity(COUNTED.with(|c| c.take()));
                while let Some(x) = seq.next_element()? {
                    v.push(x);
                }
                Ok(Presized(v))
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

impl<T: for<'de> Deserialize<'de>> Kept<T> for Presized<T> {
    fn kept(self) -> Vec<T> {
        let mut v = self.0;
        v.shrink_to_fit();
        v
    }
}

impl<T> Kept<T> for IgnoredAny {
    fn kept(self) -> Vec<T> {
        Vec::new()
    }
}

impl<E: Kept<Entry>, P: Kept<PackRecord>, D: Kept<Delta>> Parts<E, P, D> {
    fn into_manifest(self, held: Held) -> Manifest {
        Manifest {
            format: self.format,
            version: self.version,
            id: self.id,
            system_identifier: self.system_identifier,
            pg_version: self.pg_version,
            timeline: self.timeline,
            start_lsn: self.start_lsn,
            stop_lsn: self.stop_lsn,
            start_time_us: self.start_time_us,
            stop_time_us: self.stop_time_us,
            start_wal: self.start_wal,
            stop_wal: self.stop_wal,
            chunk_size: self.chunk_size,
            backup_label: self.backup_label,
            tablespace_map: self.tablespace_map,
            tablespaces: self.tablespaces,
            entries: self.entries.kept(),
            stats: self.stats,
            files_examined_after_us: self.files_examined_after_us,
            files: Vec::new(),
            packs: self.packs.kept(),
            server_manifest: self.server_manifest,
            incremental_from: self.incremental_from,
            page_checks: self.page_checks,
            generation: self.generation,
            deltas: self.deltas.kept(),
            held,
        }
    }
}

impl Manifest {
    /// The outline of the manifest `bytes` hold, validated as [`Manifest::parse`] validates a
    /// whole one (the lists aside, which it does not hold).
    pub fn parse_outline(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        check_size(bytes)?;
        outline_of(serde_json::from_slice(bytes).map_err(|e| ManifestError::Invalid(e.to_string()))?)
    }

    /// The manifest `bytes` hold without its file records, which only the next backup reads
    /// (they were a third of a manifest's memory: 10 MiB at 61,000 files), validated as
    /// [`Manifest::parse`] validates it. What a catalog and a restore hold.
    pub fn parse_without_records(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        Manifest::check_before_parsing(bytes)?;
        without_records_of(serde_json::from_slice(bytes).map_err(|e| ManifestError::Invalid(e.to_string()))?)
    }

    /// Whether this value holds the whole manifest (not only its outline).
    pub fn is_whole(&self) -> bool {
        self.held == Held::Whole
    }
}

type Lists = Parts<Presized<Entry>, Vec<PackRecord>, Vec<Delta>>;
type NoLists = Parts<IgnoredAny, IgnoredAny, IgnoredAny>;
type NoEntries = Parts<IgnoredAny, Vec<PackRecord>, Vec<Delta>>;

/// A restore's frame of the manifest `bytes` hold ([`Held::Paged`], no entries yet), validated
/// as far as it goes.
pub(super) fn frame_of_json(bytes: &[u8]) -> Result<Manifest, ManifestError> {
    Manifest::check_before_parsing(bytes)?;
    frame_of(serde_json::from_slice(bytes).map_err(|e| ManifestError::Invalid(e.to_string()))?)
}

/// [`frame_of_json`] of manifest object `bytes`, parsed as it is decompressed.
pub(super) fn streamed_frame(
    sealer: &Sealer,
    kind: ObjectKind,
    bytes: &[u8],
    id: &BackupId,
) -> Result<Manifest, Damage<ManifestError>> {
    let m = frame_of(streamed_checked(sealer, kind, bytes, id)?).map_err(Damage::Content)?;
    stored_as(m, id).map_err(Damage::Content)
}

fn frame_of(p: NoEntries) -> Result<Manifest, ManifestError> {
    let m = p.into_manifest(Held::Paged);
    m.validate()?;
    Ok(m)
}

fn outline_of(o: NoLists) -> Result<Manifest, ManifestError> {
    check_format(&o.format, o.version)?;
    let m = o.into_manifest(Held::Outline);
    m.validate()?;
    Ok(m)
}

fn without_records_of(p: Lists) -> Result<Manifest, ManifestError> {
    let m = p.into_manifest(Held::Whole);
    m.validate()?;
    Ok(m)
}

/// `T`, parsed from manifest object `bytes` of backup `id` as its content is decompressed
/// ([`Sealer::open_reader`]): the document is never held whole (some 80 MB of JSON at 300,000
/// files). Content that does not verify at its end is a damaged object, whatever the parser
/// made of it.
fn streamed<T: DeserializeOwned>(
    sealer: &Sealer,
    kind: ObjectKind,
    bytes: &[u8],
    id: &BackupId,
) -> Result<T, Damage<ManifestError>> {
    let mut r = sealer
        .open_reader(bytes, kind, id.as_str())
        .map_err(Damage::Envelope)?;
    if r.header().original_len > MAX_MANIFEST_BYTES {
        return Err(Damage::Content(ManifestError::Implausible(format!(
            "{} bytes of JSON, more than the limit of {MAX_MANIFEST_BYTES}",
            r.header().original_len
        ))));
    }
    let parsed = serde_json::from_reader::<_, T>(std::io::BufReader::with_capacity(1 << 16, &mut r));
    if let Some(e) = r.failure() {
        return Err(Damage::Envelope(e.clone()));
    }
    let value = parsed.map_err(|e| Damage::Content(ManifestError::Invalid(e.to_string())))?;
    match r.verified() {
        true => Ok(value),
        false => Err(Damage::Content(ManifestError::Invalid(
            "the document ends before its content does".into(),
        ))),
    }
}

/// [`streamed`], the format, version and counts first checked in a pass of their own (the
/// content decompressed twice, never held), before any entry is allocated.
fn streamed_checked<T: DeserializeOwned>(
    sealer: &Sealer,
    kind: ObjectKind,
    bytes: &[u8],
    id: &BackupId,
) -> Result<T, Damage<ManifestError>> {
    let probe = streamed::<Probe>(sealer, kind, bytes, id)?;
    probe.check().map_err(Damage::Content)?;
    let _counted = Counted::set(probe.entries.0);
    streamed(sealer, kind, bytes, id)
}

fn stored_as(m: Manifest, id: &BackupId) -> Result<Manifest, ManifestError> {
    is_stored_as(&m, id).map(|()| m)
}

/// `m` is the manifest of the backup its key names, `id`.
pub(super) fn is_stored_as(m: &Manifest, id: &BackupId) -> Result<(), ManifestError> {
    match &m.id == id {
        true => Ok(()),
        false => Err(ManifestError::Implausible(format!(
            "manifest of {} stored as {id}",
            m.id
        ))),
    }
}

/// `backups/<id>/manifest.wvo`: a manifest is read back whole and validated, and must be the
/// manifest of the backup its key names.
impl StoredKind for Manifest {
    type Id = BackupId;
    type Error = ManifestError;
    const ENVELOPE: Envelope = Envelope::Sealed(ObjectKind::Manifest);

    fn key(id: &BackupId) -> String {
        crate::repo::layout::manifest_key(id)
    }

    fn name(id: &BackupId) -> String {
        id.as_str().to_string()
    }

    fn parse(opened: Opened, id: &BackupId) -> Result<Manifest, ManifestError> {
        stored_as(Manifest::parse(&opened.content)?, id)
    }

    fn open_sealed(
        sealer: &Sealer,
        kind: ObjectKind,
        bytes: &[u8],
        id: &BackupId,
        _: Vec<u8>,
    ) -> Opening<Manifest> {
        let m: Manifest = streamed_checked(sealer, kind, bytes, id)?;
        m.validate()
            .and_then(|()| stored_as(m, id))
            .map_err(Damage::Content)
    }
}

/// The same object as [`Manifest`]'s under the same key and name, parsed by a view of its own:
/// `$parse` from content opened whole, `$streamed` as it is decompressed.
macro_rules! manifest_view {
    ($view:ident, $parse:path, $streamed:path) => {
        impl StoredKind for $view {
            type Id = BackupId;
            type Error = ManifestError;
            const ENVELOPE: Envelope = <Manifest as StoredKind>::ENVELOPE;

            fn key(id: &BackupId) -> String {
                <Manifest as StoredKind>::key(id)
            }

            fn name(id: &BackupId) -> String {
                <Manifest as StoredKind>::name(id)
            }

            fn parse(opened: Opened, id: &BackupId) -> Result<$view, ManifestError> {
                stored_as($parse(&opened.content)?, id).map($view)
            }

            fn open_sealed(
                sealer: &Sealer,
                kind: ObjectKind,
                bytes: &[u8],
                id: &BackupId,
                _: Vec<u8>,
            ) -> Opening<$view> {
                let m = $streamed(sealer, kind, bytes, id)?;
                stored_as(m, id).map($view).map_err(Damage::Content)
            }
        }
    };
}

/// The outline of manifest object `bytes`, parsed as it is decompressed.
fn streamed_outline(
    sealer: &Sealer,
    kind: ObjectKind,
    bytes: &[u8],
    id: &BackupId,
) -> Result<Manifest, Damage<ManifestError>> {
    outline_of(streamed(sealer, kind, bytes, id)?).map_err(Damage::Content)
}

/// Manifest object `bytes` without its file records, parsed as it is decompressed.
fn streamed_without_records(
    sealer: &Sealer,
    kind: ObjectKind,
    bytes: &[u8],
    id: &BackupId,
) -> Result<Manifest, Damage<ManifestError>> {
    without_records_of(streamed_checked(sealer, kind, bytes, id)?).map_err(Damage::Content)
}

manifest_view!(ManifestOutline, Manifest::parse_outline, streamed_outline);

/// The manifest of a backup, read without its file records ([`Manifest::parse_without_records`]).
#[derive(Debug, Clone)]
pub struct ManifestWithoutRecords(pub Manifest);

manifest_view!(
    ManifestWithoutRecords,
    Manifest::parse_without_records,
    streamed_without_records
);

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::basebackup::manifest::{Entry, EntryKind};

    /// Every stored version's fixture, with its lists.
    pub(in crate::basebackup::manifest) const FIXTURES: [&[u8]; 7] = [
        include_bytes!("../../../tests/fixtures/manifest-v1.json"),
        include_bytes!("../../../tests/fixtures/manifest-v1-files.json"),
        include_bytes!("../../../tests/fixtures/manifest-v2.json"),
        include_bytes!("../../../tests/fixtures/manifest-v2-page-checks.json"),
        include_bytes!("../../../tests/fixtures/manifest-v2-repacked.json"),
        include_bytes!("../../../tests/fixtures/manifest-v3-within.json"),
        include_bytes!("../../../tests/fixtures/manifest-v4-delta.json"),
    ];

    #[test]
    fn an_outline_is_the_whole_manifest_without_its_lists() {
        for bytes in FIXTURES {
            let m = Manifest::parse(bytes).unwrap();
            assert!(m.is_whole() && !m.entries.is_empty());
            let o = Manifest::parse_outline(bytes).unwrap();
            assert!(!o.is_whole());
            assert!(o.entries.is_empty() && o.files.is_empty() && o.packs.is_empty() && o.deltas.is_empty());
            let mut expected = m.clone();
            expected.entries.clear();
            expected.files.clear();
            expected.packs.clear();
            expected.deltas.clear();
            expected.held = Held::Outline;
            assert_eq!(o, expected, "every other field as stored (version {})", m.version);
        }
    }

    #[test]
    fn a_manifest_without_records_is_the_whole_manifest_without_its_file_records() {
        for bytes in FIXTURES {
            let mut m = Manifest::parse(bytes).unwrap();
            let lean = Manifest::parse_without_records(bytes).unwrap();
            assert!(lean.is_whole() && lean.files.is_empty());
            m.files.clear();
            assert_eq!(lean, m, "version {}", m.version);
        }
        let mut hostile = Manifest::parse(FIXTURES[1]).unwrap();
        assert!(!hostile.files.is_empty());
        hostile.files[0].path = "base/../../etc/passwd".into();
        assert!(Manifest::parse(&hostile.to_json()).is_err());
        assert!(
            Manifest::parse_without_records(&hostile.to_json()).is_ok(),
            "records are not read"
        );
        hostile.entries[1].path = "base/../../etc/passwd".into();
        assert!(
            Manifest::parse_without_records(&hostile.to_json()).is_err(),
            "entries are"
        );
    }

    /// What each kind reads from a stored manifest, parsed as its content is decompressed, is
    /// what it parses from the content whole; damage is the envelope's, never the document's.
    #[test]
    fn manifests_read_as_they_are_decompressed_are_those_parsed_whole() {
        use crate::repo::object::{ObjectError, SealedObject};
        use crate::repo::stored::open;
        let sealer = Sealer::plain();
        for bytes in FIXTURES {
            let m = Manifest::parse(bytes).unwrap();
            let sealed = SealedObject::seal(ObjectKind::Manifest, m.id.as_str(), bytes, 3).unwrap();
            let whole = open::<Manifest>(&sealer, &m.id, &sealed.bytes).unwrap();
            assert_eq!(whole, m);
            let outline = open::<ManifestOutline>(&sealer, &m.id, &sealed.bytes).unwrap().0;
            assert_eq!(outline, Manifest::parse_outline(bytes).unwrap());
            let lean = open::<ManifestWithoutRecords>(&sealer, &m.id, &sealed.bytes)
                .unwrap()
                .0;
            assert_eq!(lean, Manifest::parse_without_records(bytes).unwrap());
            assert_eq!(lean.entries.capacity(), lean.entries.len());
            assert_eq!(COUNTED.with(|c| c.get()), 0, "the probe's count is for one parse");
            // Stored under another backup's name: refused by each.
            let other: BackupId = "20200101T000000Z".parse().unwrap();
            assert!(open::<Manifest>(&sealer, &other, &sealed.bytes).is_err());
            assert!(open::<ManifestOutline>(&sealer, &other, &sealed.bytes).is_err());
        }
        let m = Manifest::parse(FIXTURES[0]).unwrap();
        // Bytes changed inside the compressed payload: the object is damaged, whatever JSON the
        // parser was given before the end showed it.
        let sealed = SealedObject::seal(ObjectKind::Manifest, m.id.as_str(), FIXTURES[0], 3).unwrap();
        let mut bad = sealed.bytes.to_vec();
        let at = bad.len() - 20;
        bad[at] ^= 0x20;
        for result in [
            open::<Manifest>(&sealer, &m.id, &bad).map(|_| ()),
            open::<ManifestOutline>(&sealer, &m.id, &bad).map(|_| ()),
            open::<ManifestWithoutRecords>(&sealer, &m.id, &bad).map(|_| ()),
        ] {
            assert!(
                matches!(
                    result,
                    Err(Damage::Envelope(
                        ObjectError::ContentHash { .. }
                            | ObjectError::Decompress(_)
                            | ObjectError::ContentLength { .. }
                    ))
                ),
                "{result:?}"
            );
        }
        // A sound object whose document is not a manifest: the content's fault.
        let sealed = SealedObject::seal(ObjectKind::Manifest, m.id.as_str(), b"{\"format\": 1}", 3).unwrap();
        for result in [
            open::<Manifest>(&sealer, &m.id, &sealed.bytes).map(|_| ()),
            open::<ManifestOutline>(&sealer, &m.id, &sealed.bytes).map(|_| ()),
            open::<ManifestWithoutRecords>(&sealer, &m.id, &sealed.bytes).map(|_| ()),
        ] {
            assert!(matches!(result, Err(Damage::Content(_))), "{result:?}");
        }
    }

    #[test]
    fn an_outline_is_refused_where_the_whole_manifest_is() {
        let m = Manifest::parse(FIXTURES[0]).unwrap();
        let json = |m: &Manifest| m.to_json();
        let mut later = m.clone();
        later.version = 99;
        assert!(matches!(
            Manifest::parse_outline(&json(&later)),
            Err(ManifestError::UnsupportedVersion(99))
        ));
        let mut reversed = m.clone();
        reversed.start_lsn = Lsn(reversed.stop_lsn.0 + 1);
        assert!(Manifest::parse(&json(&reversed)).is_err());
        assert!(Manifest::parse_outline(&json(&reversed)).is_err());
        let mut no_entries: serde_json::Value = serde_json::from_slice(&json(&m)).unwrap();
        no_entries.as_object_mut().unwrap().remove("entries");
        let bytes = serde_json::to_vec(&no_entries).unwrap();
        assert!(Manifest::parse(&bytes).is_err());
        assert!(
            Manifest::parse_outline(&bytes).is_err(),
            "entries are required in both"
        );
        // A hostile entry is the whole manifest's to refuse: an outline never holds one, and
        // nothing is written from an outline.
        let mut hostile = m.clone();
        hostile.entries.push(Entry {
            path: "base/../../etc/passwd".into(),
            kind: EntryKind::File,
            mode: 0o600,
            size: 0,
            chunks: vec![],
            within: None,
        });
        assert!(Manifest::parse(&json(&hostile)).is_err());
        assert!(
            Manifest::parse_outline(&json(&hostile))
                .unwrap()
                .entries
                .is_empty()
        );
    }
}
