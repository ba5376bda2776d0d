//! What a repository holds, read back: backups, timelines, WAL coverage per timeline.
//! Used by `restore-agent list`, `info` and `restore`.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::backup::BackupId;
use crate::backup::chunk::ChunkError;
use crate::backup::manifest::{Manifest, ManifestError};
use crate::backup::take::manifest_key;
use crate::repo::layout::DESCRIPTOR_KEY;
use crate::repo::object::{self, ObjectError, ObjectKind};
use crate::repo::{RepoDescriptor, Store, StoreError};
use crate::timeline::{HistoryError, TimelineHistory, TimelineTree};
use crate::wal::{SegmentName, WalFileName};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("repository {0} has no walvault.json: it is not a walvault repository (wrong --repo?)")]
    NotARepository(String),
    #[error("repository descriptor: {0}")]
    Descriptor(String),
    #[error("{key} is corrupt: {source}")]
    Corrupt { key: String, source: Box<ObjectError> },
    #[error("{key}: {source}")]
    Manifest { key: String, source: Box<ManifestError> },
    #[error("{key}: {source}")]
    History { key: String, source: HistoryError },
    #[error(transparent)]
    Chunk(#[from] ChunkError),
}

/// The summary of a backup shown by `list` and `info --json`.
#[derive(Debug, Clone, Serialize)]
pub struct BackupInfo {
    pub id: String,
    pub timeline: u32,
    pub start_time: String,
    pub stop_time: String,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub start_wal: String,
    pub stop_wal: String,
    pub files: u64,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    pub new_bytes: u64,
    pub new_chunks: u64,
    pub chunks: u64,
}

impl From<&Manifest> for BackupInfo {
    fn from(m: &Manifest) -> Self {
        BackupInfo {
            id: m.id.to_string(),
            timeline: m.timeline,
            start_time: crate::time::format_micros(m.start_time * 1_000_000),
            stop_time: crate::time::format_micros(m.stop_time * 1_000_000),
            start_lsn: m.start_lsn.to_string(),
            stop_lsn: m.stop_lsn.to_string(),
            start_wal: m.start_wal.clone(),
            stop_wal: m.stop_wal.clone(),
            files: m.stats.files,
            logical_bytes: m.stats.logical_bytes,
            stored_bytes: m.stats.stored_bytes,
            new_bytes: m.stats.new_bytes,
            new_chunks: m.stats.new_chunks,
            chunks: m.stats.chunks,
        }
    }
}

/// A run of consecutive archived segments on one timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SegmentRange {
    pub first: String,
    pub last: String,
    pub segments: u64,
}

/// Everything `restore` needs to decide, loaded once.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub descriptor: RepoDescriptor,
    /// Oldest first.
    pub backups: Vec<Manifest>,
    pub timelines: TimelineTree,
    /// Archived segment numbers per timeline, ascending.
    pub segments: BTreeMap<u32, Vec<u64>>,
}

impl Catalog {
    pub async fn load(store: &Store) -> Result<Catalog, CatalogError> {
        let descriptor = store
            .get(DESCRIPTOR_KEY)
            .await?
            .ok_or_else(|| CatalogError::NotARepository(store.url().to_string()))?;
        let descriptor =
            RepoDescriptor::parse(&descriptor).map_err(|e| CatalogError::Descriptor(e.to_string()))?;
        let seg_size = descriptor.cluster.wal_segment_size;

        let mut backups = Vec::new();
        for (key, _) in store.list("backups/").await? {
            let Some(id) = key
                .strip_prefix("backups/")
                .and_then(|k| k.strip_suffix("/manifest.wvo"))
                .and_then(|id| id.parse::<BackupId>().ok())
            else {
                continue; // not a manifest (or a foreign file): ignored
            };
            backups.push(load_manifest(store, &id).await?);
        }
        backups.sort_by(|a, b| a.id.cmp(&b.id));

        let mut timelines = TimelineTree::default();
        let mut segments: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for (key, _) in store.list("wal/").await? {
            let Some(name) = key.rsplit('/').next().and_then(|n| n.strip_suffix(".wvo")) else {
                continue;
            };
            match name.parse::<WalFileName>() {
                Ok(WalFileName::History(tli)) => {
                    let bytes = store.get(&key).await?.unwrap_or_default();
                    let (_, content) = object::open(&bytes, ObjectKind::WalFile, name).map_err(|e| {
                        CatalogError::Corrupt {
                            key: key.clone(),
                            source: Box::new(e),
                        }
                    })?;
                    let h =
                        TimelineHistory::parse(tli, &content).map_err(|source| CatalogError::History {
                            key: key.clone(),
                            source,
                        })?;
                    timelines.insert(h);
                }
                Ok(WalFileName::Segment(s)) => {
                    if let Some(no) = s.segment_no(seg_size) {
                        segments.entry(s.timeline.get()).or_default().push(no);
                    }
                }
                _ => {}
            }
        }
        for v in segments.values_mut() {
            v.sort_unstable();
        }
        Ok(Catalog {
            descriptor,
            backups,
            timelines,
            segments,
        })
    }

    /// Consecutive runs of archived segments on `timeline`; more than one run means gaps.
    pub fn ranges(&self, timeline: u32) -> Vec<SegmentRange> {
        let seg_size = self.descriptor.cluster.wal_segment_size;
        let name = |no: u64| {
            SegmentName::containing(
                crate::wal::TimelineId::new(timeline).expect("timelines in the catalog are non-zero"),
                crate::wal::Lsn(no * u64::from(seg_size)),
                seg_size,
            )
            .to_string()
        };
        let mut out: Vec<SegmentRange> = Vec::new();
        let mut run: Option<(u64, u64)> = None;
        for &no in self.segments.get(&timeline).map(Vec::as_slice).unwrap_or(&[]) {
            run = match run {
                Some((a, b)) if no == b + 1 => Some((a, no)),
                Some((a, b)) => {
                    out.push(SegmentRange {
                        first: name(a),
                        last: name(b),
                        segments: b - a + 1,
                    });
                    Some((no, no))
                }
                None => Some((no, no)),
            };
        }
        if let Some((a, b)) = run {
            out.push(SegmentRange {
                first: name(a),
                last: name(b),
                segments: b - a + 1,
            });
        }
        out
    }

    /// Every timeline with archived WAL or a history file.
    pub fn timeline_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .segments
            .keys()
            .chain(self.timelines.histories.keys())
            .copied()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// Read and verify one backup manifest.
pub async fn load_manifest(store: &Store, id: &BackupId) -> Result<Manifest, CatalogError> {
    let key = manifest_key(id);
    let bytes = store.get(&key).await?.ok_or_else(|| CatalogError::Manifest {
        key: key.clone(),
        source: Box::new(ManifestError::Invalid("missing".into())),
    })?;
    let (_, json) =
        object::open(&bytes, ObjectKind::Manifest, id.as_str()).map_err(|e| CatalogError::Corrupt {
            key: key.clone(),
            source: Box::new(e),
        })?;
    let m = Manifest::parse(&json).map_err(|e| CatalogError::Manifest {
        key: key.clone(),
        source: Box::new(e),
    })?;
    if &m.id != id {
        return Err(CatalogError::Manifest {
            key,
            source: Box::new(ManifestError::Implausible(format!(
                "manifest of {} stored as {id}",
                m.id
            ))),
        });
    }
    Ok(m)
}
