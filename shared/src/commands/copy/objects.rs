//! What `archive-agent copy` copies: each kind of object it recognises by its key, the phase it is
//! copied in, and how it is checked before it is written to the second repository.
//!
//! A key is recognised only through [`crate::repo::layout`]'s parsers, so a foreign object, a lock
//! or a probe is never copied. Every object is opened as the target repository opens it (envelope,
//! content hash, in an encrypted repository the AEAD under the target's key, and the content's own
//! checks), so what arrives is readable there, and a damaged source object is refused, not
//! spread.

use std::collections::BTreeSet;

use crate::basebackup::BackupId;
use crate::basebackup::chunk::{Chunk, MisnamedChunk, PackDamage, check_pack};
use crate::basebackup::chunk_id::{ChunkId, PackId};
use crate::basebackup::manifest::{Manifest, ManifestError};
use crate::basebackup::pack::PackRecord;
use crate::basebackup::relmap::{RelMapFormatError, RelationMap};
use crate::repo::layout;
use crate::repo::object::{ObjectError, ObjectKind};
use crate::repo::stored::{self, Damage, WalObject};
use crate::repo::{Repository, Store};
use crate::timeindex::{StoredSummary, SummaryError};
use crate::wal::{SegmentName, WalFileName};

/// One object of the repository, named by what its key says it holds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Object {
    Chunk(ChunkId),
    Pack(PackId),
    Wal(WalFileName),
    Summary(SegmentName),
    StreamPiece(SegmentName, u32, u32),
    /// `cluster.json`: the cluster the first segment bound.
    Cluster,
    RelationMap(BackupId),
    Manifest(BackupId),
    Pin(BackupId),
    Drill(BackupId),
    /// `retention.json`: the policy the last expire applied.
    Retention,
}

/// When an object is copied: every phase completes before the next begins, so the target never
/// holds a manifest whose chunks are not there yet, nor a summary of WAL it does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Chunks and packs.
    Data,
    /// WAL, history files, stream pieces, the time index, `cluster.json`.
    Wal,
    /// Relation maps and manifests.
    Backups,
    /// Pins, drill evidence and the retention record: about backups, so after them.
    Records,
}

/// The directory of backups: listed first by a copy, so that each manifest it sees has its
/// data in the listings of [`LISTED_AFTER_BACKUPS`] (a backup writes its data first).
pub const BACKUPS: &str = "backups/";

/// The other directories listed to find every object copy knows; `cluster.json` and
/// `retention.json` are read by name.
pub const LISTED_AFTER_BACKUPS: [&str; 6] = ["chunks/", "packs/", "wal/", "index/", "stream/", "drills/"];

/// Why an object read from the source cannot be copied.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Envelope(#[from] ObjectError),
    #[error(transparent)]
    Wal(#[from] Damage<std::convert::Infallible>),
    #[error(transparent)]
    Chunk(#[from] Damage<MisnamedChunk>),
    #[error(transparent)]
    Summary(#[from] Damage<SummaryError>),
    #[error(transparent)]
    Manifest(#[from] Damage<ManifestError>),
    #[error(transparent)]
    RelationMap(#[from] Damage<RelMapFormatError>),
    #[error("it is not a JSON record: {0}")]
    Record(serde_json::Error),
    #[error("a segment of another cluster, or not a segment: {0}")]
    ForeignWal(#[from] crate::repo::WalCheckError),
    #[error(transparent)]
    Pack(#[from] PackDamage),
}

/// What a checked object needs on the target before it may be written there.
#[derive(Debug, Default)]
pub struct Needs {
    pub packs: BTreeSet<PackId>,
    pub chunks: BTreeSet<ChunkId>,
    /// A manifest's generation: one an expire's repack wrote again replaces a lower one.
    pub generation: u32,
}

impl Object {
    /// The object a listed key stores; `None` for anything copy leaves alone.
    pub fn of_key(key: &str) -> Option<Object> {
        if let Some(id) = layout::parse_chunk_key(key) {
            return Some(Object::Chunk(id));
        }
        if let Some(id) = layout::parse_pack_key(key) {
            return Some(Object::Pack(id));
        }
        if let Some(name) = layout::parse_wal_key(key) {
            return Some(Object::Wal(name));
        }
        if let Some(seg) = layout::parse_summary_key(key) {
            return Some(Object::Summary(seg));
        }
        if let Some((seg, from, to)) = layout::parse_stream_piece_key(key) {
            return Some(Object::StreamPiece(seg, from, to));
        }
        if let Some(id) = layout::parse_manifest_key(key) {
            return Some(Object::Manifest(id));
        }
        if let Some(id) = layout::parse_relation_map_key(key) {
            return Some(Object::RelationMap(id));
        }
        if let Some(id) = layout::parse_pin_key(key) {
            return Some(Object::Pin(id));
        }
        if let Some(id) = layout::parse_drill_key(key) {
            return Some(Object::Drill(id));
        }
        match key {
            layout::CLUSTER_KEY => Some(Object::Cluster),
            layout::RETENTION_KEY => Some(Object::Retention),
            _ => None,
        }
    }

    /// Its key (what [`Object::of_key`] parsed).
    pub fn key(&self) -> String {
        match self {
            Object::Chunk(id) => layout::chunk_key(id),
            Object::Pack(id) => layout::pack_key(id),
            Object::Wal(name) => layout::wal_key(name),
            Object::Summary(seg) => layout::summary_key(seg),
            Object::StreamPiece(seg, from, to) => layout::stream_piece_key(seg, *from, *to),
            Object::Cluster => layout::CLUSTER_KEY.to_string(),
            Object::RelationMap(id) => layout::relation_map_key(id),
            Object::Manifest(id) => layout::manifest_key(id),
            Object::Pin(id) => layout::pin_key(id),
            Object::Drill(id) => layout::drill_key(id),
            Object::Retention => layout::RETENTION_KEY.to_string(),
        }
    }

    pub fn phase(&self) -> Phase {
        match self {
            Object::Chunk(_) | Object::Pack(_) => Phase::Data,
            Object::Wal(_) | Object::Summary(_) | Object::StreamPiece(..) | Object::Cluster => Phase::Wal,
            Object::RelationMap(_) | Object::Manifest(_) => Phase::Backups,
            Object::Pin(_) | Object::Drill(_) | Object::Retention => Phase::Records,
        }
    }

    /// Whether the object under this key is written once and never replaced, so that one of the
    /// same size on the target is the same object. The others (a pin's note, the retention
    /// record) are replaced by their writers and are compared byte for byte.
    pub fn write_once(&self) -> bool {
        !matches!(self, Object::Pin(_) | Object::Retention | Object::Drill(_))
    }

    /// Whether the object must never replace a different one already on the target (PostgreSQL's
    /// WAL, a backup's manifest): written create-only, as push and backup write them.
    pub fn create_only(&self) -> bool {
        matches!(self, Object::Wal(_) | Object::Manifest(_))
    }

    /// Open `bytes`, read from the source under this object's key, as `target` opens them, and say
    /// what the target must hold before they are written (a manifest's packs and chunks).
    /// `records` are the pack records the source's manifests list, to open a pack's chunks too.
    pub fn check<S: AsRef<Store>>(
        &self,
        target: &Repository<S>,
        bytes: &[u8],
        records: &std::collections::HashMap<PackId, PackRecord>,
    ) -> Result<Needs, CheckError> {
        let sealer = target.sealer();
        match self {
            Object::Chunk(id) => {
                stored::open::<Chunk>(sealer, id, bytes)?;
            }
            Object::Pack(id) => check_pack(sealer, *id, bytes, records.get(id))?,
            Object::Wal(name) => {
                let file = stored::open::<WalObject>(sealer, name, bytes)?;
                target.check_wal(name, &file.content)?;
            }
            Object::Summary(seg) => {
                stored::open::<StoredSummary>(sealer, seg, bytes)?;
            }
            Object::StreamPiece(seg, from, to) => {
                sealer.open(
                    bytes,
                    ObjectKind::StreamPiece,
                    &layout::stream_piece_name(seg, *from, *to),
                )?;
            }
            Object::RelationMap(id) => {
                stored::open::<RelationMap>(sealer, id, bytes)?;
            }
            Object::Manifest(id) => {
                let m = stored::open::<Manifest>(sealer, id, bytes)?;
                return Ok(needs_of(&m));
            }
            Object::Cluster | Object::Pin(_) | Object::Drill(_) | Object::Retention => {
                let json = sealer.open_record(&self.key(), bytes)?;
                serde_json::from_slice::<serde_json::Value>(&json).map_err(CheckError::Record)?;
            }
        }
        Ok(Needs::default())
    }
}

/// Whether two sealed manifests of backup `id` describe the same backup: equal but for the packs
/// they list and their generation (what an expire's repack changes).
pub fn same_backup(sealer: &crate::repo::object::Sealer, id: &BackupId, a: &[u8], b: &[u8]) -> bool {
    let open = |bytes: &[u8]| {
        stored::open::<Manifest>(sealer, id, bytes).ok().map(|mut m| {
            m.packs = Vec::new();
            m.generation = 0;
            m
        })
    };
    matches!((open(a), open(b)), (Some(a), Some(b)) if a == b)
}

/// The packs and the chunks stored on their own that a backup's restore reads.
pub fn needs_of(m: &Manifest) -> Needs {
    Needs {
        packs: crate::retention::referenced_packs([m]),
        chunks: crate::retention::referenced_chunks([m]),
        generation: m.generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repacked_manifest_is_the_same_backup_and_another_is_not() {
        use crate::repo::object::{ObjectKind, Sealer};
        let sealer = Sealer::plain();
        let mut m = crate::catalog::testing::manifest("20261121T143200Z", 1, 2, 1_000_000);
        m.start_wal = "000000010000000000000002".into();
        m.stop_wal = "000000010000000000000002".into();
        let seal = |m: &Manifest| {
            sealer
                .seal(ObjectKind::Manifest, m.id.as_str(), &m.to_json(), 3)
                .unwrap()
                .bytes
        };
        let mut repacked = m.clone();
        repacked.generation = 1;
        repacked.packs = vec![PackRecord {
            id: PackId::of(b"new"),
            chunks: vec!["ab".repeat(32).parse().unwrap()],
            lengths: vec![100],
        }];
        let mut other = m.clone();
        other.stop_time_us += 1;
        assert!(same_backup(&sealer, &m.id, &seal(&m), &seal(&repacked)));
        assert!(!same_backup(&sealer, &m.id, &seal(&m), &seal(&other)));
        assert!(!same_backup(&sealer, &m.id, &seal(&m), b"not a manifest"));
    }

    #[test]
    fn every_object_kind_round_trips_through_its_key() {
        let id: BackupId = "20261121T143200Z".parse().unwrap();
        let seg = match "000000010000000000000003".parse() {
            Ok(WalFileName::Segment(s)) => s,
            other => panic!("{other:?}"),
        };
        let objects = [
            Object::Chunk("ab".repeat(32).parse().unwrap()),
            Object::Pack(PackId::of(b"pack")),
            Object::Wal("000000010000000000000003".parse().unwrap()),
            Object::Wal("00000002.history".parse().unwrap()),
            Object::Wal("000000010000000000000002.00000028.backup".parse().unwrap()),
            Object::Summary(seg),
            Object::StreamPiece(seg, 0, 8192),
            Object::Cluster,
            Object::RelationMap(id.clone()),
            Object::Manifest(id.clone()),
            Object::Pin(id.clone()),
            Object::Drill(id),
            Object::Retention,
        ];
        for o in objects {
            assert_eq!(Object::of_key(&o.key()).as_ref(), Some(&o), "{}", o.key());
        }
    }

    #[test]
    fn locks_probes_and_foreign_keys_are_never_copied() {
        for key in [
            "walvault.json",
            &format!("locks/backup-{}.json", "0a".repeat(16)),
            "probe/create-only-3f2c0a7d9b1e4c5a8d6f0e2b4a6c8e10",
            "wal/0000000100000000/notes.txt",
            "backups/../manifest.wvo",
            "chunks/00/x.wvo",
        ] {
            assert_eq!(Object::of_key(key), None, "{key}");
        }
    }

    #[test]
    fn phases_put_data_before_wal_before_catalog() {
        let id: BackupId = "20261121T143200Z".parse().unwrap();
        assert!(
            Object::Pack(PackId::of(b"x")).phase() < Object::Wal("00000002.history".parse().unwrap()).phase()
        );
        assert!(Object::Cluster.phase() < Object::Manifest(id.clone()).phase());
        assert!(Object::Manifest(id.clone()).phase() < Object::Pin(id.clone()).phase());
        assert!(Object::Manifest(id.clone()).create_only());
        assert!(!Object::Pin(id).write_once());
    }
}
