//! What a repository holds, read back: backups, timelines, WAL coverage per timeline.
//! Used by `restore-agent list`, `info` and `restore`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::basebackup::BackupId;
use crate::basebackup::chunk::ChunkError;
use crate::basebackup::manifest::outline::{Held, ManifestOutline, ManifestWithoutRecords};
use crate::basebackup::manifest::paged::PagedManifest;
use crate::basebackup::manifest::{Manifest, ManifestError};
use crate::repo::layout::{self, Kind};
use crate::repo::object::{ObjectError, Sealer};
use crate::repo::stored::{Damage, Objects, ReadError, WalObject};
use crate::repo::{ClusterIdentity, Reader, RepoId, Store, StoreError};
use crate::timeline::{HistoryError, TimelineHistory, TimelineTree};
use crate::wal::summary::SegmentSummary;
use crate::wal::{Lsn, SegmentName, SegmentNo, TimelineId, WalFileName};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Store(#[from] StoreError),
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
    pub timeline: TimelineId,
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
    /// Files taken over unread from the previous backup (unchanged since it read them), and
    /// their bytes.
    pub reused_files: u64,
    pub reused_bytes: u64,
    /// Pinned: expire never deletes it.
    pub pinned: bool,
    /// Damaged pages the backup found in the cluster (absent: pages were not checked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bad_pages: Option<u64>,
}

impl From<&Manifest> for BackupInfo {
    fn from(m: &Manifest) -> Self {
        BackupInfo {
            id: m.id.to_string(),
            timeline: m.timeline,
            start_time: crate::time::format_micros(m.start_time_us),
            stop_time: crate::time::format_micros(m.stop_time_us),
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
            reused_files: m.stats.reused_files,
            reused_bytes: m.stats.reused_bytes,
            pinned: false,
            bad_pages: m.page_checks.as_ref().map(|c| c.bad_total),
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

/// An object the catalog could not use, and why. One damaged manifest or history file is
/// reported (list, info) and left out; it never hides the healthy ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Damaged {
    /// The object's key in the repository.
    pub key: String,
    /// What it is: `backup <id>` or `timeline <n> history`.
    pub what: String,
    pub reason: String,
    /// The backup, when the damaged object is a manifest.
    #[serde(skip)]
    pub backup: Option<BackupId>,
}

/// PostgreSQL's default WAL segment size, for a repository no segment has been archived into.
const DEFAULT_SEGMENT_SIZE: u32 = 16 << 20;

/// Everything `restore` needs to decide, loaded once.
#[derive(Debug, Clone)]
pub struct Catalog {
    repo_id: RepoId,
    /// `None` until the first segment is archived into a repository created without `--pgdata`.
    cluster: Option<ClusterIdentity>,
    /// Oldest first.
    backups: Vec<Manifest>,
    timelines: TimelineTree,
    /// Archived segment numbers per timeline, ascending.
    segments: BTreeMap<TimelineId, Vec<SegmentNo>>,
    /// The time index: summaries by (timeline, segment number).
    summaries: BTreeMap<(TimelineId, SegmentNo), SegmentSummary>,
    /// Manifests and history files that could not be read or did not validate.
    damaged: Vec<Damaged>,
    /// Backups with a pin (expire never deletes them).
    pinned: BTreeSet<BackupId>,
    /// Every WAL object listed (segments, partial segments, backup history and timeline history
    /// files) with its stored size.
    wal_files: Vec<(WalFileName, u64)>,
    /// Every time index summary listed, with its stored size.
    summary_files: Vec<(SegmentName, u64)>,
    /// The stored size of each manifest listed.
    manifest_bytes: BTreeMap<BackupId, u64>,
    /// Size of each relation map (`backups/<id>/relations.wvo`), whether or not its backup
    /// finished.
    relation_map_bytes: BTreeMap<BackupId, u64>,
}

/// The span of time a restore can reach on one timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Window {
    /// Unix microseconds: when the earliest usable backup became consistent.
    pub earliest: i64,
    /// Unix microseconds: the last transaction end archived after it (a target must be before
    /// it, so that PostgreSQL sees a transaction end past the target); `None` when the time
    /// index has no transaction end there.
    pub latest: Option<i64>,
    /// Last LSN archived contiguously after the earliest backup.
    pub end_lsn: Lsn,
}

impl Window {
    pub fn describe(&self) -> String {
        format!(
            "earliest restorable point {}, latest {}, WAL archived through {}",
            crate::time::format_micros(self.earliest),
            self.latest
                .map_or("unknown (no time index)".to_string(), |l| format!(
                    "just before {} (the last archived transaction)",
                    crate::time::format_micros(l)
                )),
            self.end_lsn
        )
    }
}

impl Catalog {
    /// Read everything the repository holds: every manifest, history file and summary.
    pub async fn load(repo: &Reader) -> Result<Catalog, CatalogError> {
        Catalog::read(repo, None, Summaries::Whole, Held::Whole).await
    }

    /// [`Catalog::load`] with each manifest's outline only ([`crate::basebackup::manifest::outline`]):
    /// what choosing a backup and the restorable windows need, in memory that does not grow with
    /// the backups' files. A restore then reads its one backup's manifest ([`load_paged_manifest`]).
    /// The summaries are read for their times and restore points alone
    /// ([`Summaries::Times`]).
    pub async fn load_outlines(repo: &Reader) -> Result<Catalog, CatalogError> {
        Catalog::refresh_outlines(repo, None).await
    }

    /// [`Catalog::load_outlines`] with whole summaries, the changes and catalog rows each
    /// records included: what `find` searches.
    pub async fn load_outlines_and_changes(repo: &Reader) -> Result<Catalog, CatalogError> {
        Catalog::read(repo, None, Summaries::Whole, Held::Outline).await
    }

    /// [`Catalog::load_outlines`], reusing what `previous` (an earlier load of the same
    /// repository) read: the listings are made again, but only manifests and summaries that
    /// appeared since are downloaded (both are written once and never change); those gone are
    /// dropped. History files, a few small objects, and damaged objects are read again.
    pub async fn refresh_outlines(
        repo: &Reader,
        previous: Option<&Catalog>,
    ) -> Result<Catalog, CatalogError> {
        Catalog::read(repo, previous, Summaries::Times, Held::Outline).await
    }

    /// [`Catalog::load`] without reading the time index: summaries are listed
    /// ([`Catalog::summary_files`]) but not downloaded, so a repository of any size costs a few
    /// LIST requests plus one GET per manifest and history file. For expire and verify;
    /// [`Catalog::read_window_summaries`] then reads the few a window needs.
    pub async fn load_listing(repo: &Reader) -> Result<Catalog, CatalogError> {
        Catalog::read(repo, None, Summaries::None, Held::Whole).await
    }

    /// [`Catalog::load_listing`] again, downloading only the manifests `previous` lacks.
    pub async fn refresh_listing(repo: &Reader, previous: &Catalog) -> Result<Catalog, CatalogError> {
        Catalog::read(repo, Some(previous), Summaries::None, Held::Whole).await
    }

    /// Read the summaries the restorable windows need: on each timeline, from the end of the
    /// WAL its window reaches, backwards until one records a transaction end (at most 64).
    pub async fn read_window_summaries(&mut self, repo: &Reader) {
        let (store, sealer) = (repo.store(), repo.sealer());
        let seg_size = self.wal_segment_size();
        for t in self.timeline_ids() {
            let Some((_, chain)) = self.window_chain(t) else {
                continue;
            };
            for &(tli, no) in chain.iter().rev().take(64) {
                if let std::collections::btree_map::Entry::Vacant(slot) = self.summaries.entry((tli, no)) {
                    let seg = SegmentName::from_no(tli, no, seg_size);
                    match crate::timeindex::load(store, sealer, &seg).await {
                        Ok(Some(s)) => {
                            slot.insert(s.summary);
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!("{e}"),
                    }
                }
                if self
                    .summaries
                    .get(&(tli, no))
                    .is_some_and(|s| s.max_commit.is_some())
                {
                    break;
                }
            }
        }
    }

    /// The three listings (`backups/`, `wal/`, `index/`), each read by a function of its own,
    /// put together, each manifest `held` whole or as its outline. `previous` is reused only if
    /// it is a catalog of this repository and cluster.
    async fn read(
        repo: &Reader,
        previous: Option<&Catalog>,
        read_summaries: Summaries,
        held: Held,
    ) -> Result<Catalog, CatalogError> {
        let previous = previous.filter(|p| p.repo_id == *repo.id() && p.cluster.as_ref() == repo.cluster());
        let cluster = repo.cluster().copied();
        let seg_size = cluster.map_or(DEFAULT_SEGMENT_SIZE, |c| c.wal_segment_size);
        let mut damaged = Vec::new();
        let backups = read_backups(repo, previous, held, &mut damaged).await?;
        let wal = read_wal(repo, seg_size, &mut damaged).await?;
        let index = read_index(repo, seg_size, previous, read_summaries).await?;
        Ok(Catalog {
            repo_id: repo.id().clone(),
            cluster,
            backups: backups.manifests,
            timelines: wal.timelines,
            segments: wal.segments,
            summaries: index.summaries,
            damaged,
            pinned: backups.pinned,
            wal_files: wal.files,
            summary_files: index.files,
            manifest_bytes: backups.manifest_bytes,
            relation_map_bytes: backups.relation_map_bytes,
        })
    }

    /// The repository's id.
    pub fn repo_id(&self) -> &RepoId {
        &self.repo_id
    }

    /// The cluster whose WAL the repository holds: `None` until the first segment is archived
    /// into a repository created without `--pgdata`.
    pub fn cluster(&self) -> Option<&ClusterIdentity> {
        self.cluster.as_ref()
    }

    /// Every backup whose manifest was read and validated, oldest first.
    pub fn backups(&self) -> &[Manifest] {
        &self.backups
    }

    /// Backup `id`, if its manifest was read and validated.
    pub fn backup(&self, id: &BackupId) -> Option<&Manifest> {
        self.backups.iter().find(|m| &m.id == id)
    }

    /// Backups with a pin (expire never deletes them).
    pub fn pinned(&self) -> &BTreeSet<BackupId> {
        &self.pinned
    }

    /// Whether backup `id` has a pin.
    pub fn is_pinned(&self, id: &BackupId) -> bool {
        self.pinned.contains(id)
    }

    /// Manifests and history files that could not be read or did not validate, in listing
    /// order.
    pub fn damaged(&self) -> &[Damaged] {
        &self.damaged
    }

    /// Why backup `id`'s manifest is unusable, if it is.
    pub fn damage_of(&self, id: &BackupId) -> Option<&Damaged> {
        self.damaged.iter().find(|d| d.backup.as_ref() == Some(id))
    }

    /// The newest timeline with a history file (what `recovery_target_timeline = 'latest'`
    /// follows); timeline 1 without any.
    pub fn latest_timeline(&self) -> TimelineId {
        self.timelines.latest()
    }

    /// The history of `timeline`; timeline 1 (or any without a history file) has no ancestors.
    pub fn history(&self, timeline: TimelineId) -> TimelineHistory {
        self.timelines.history(timeline)
    }

    /// Whether the history file of `timeline` was read.
    pub fn has_history(&self, timeline: TimelineId) -> bool {
        self.timelines.histories.contains_key(&timeline)
    }

    /// Timelines after the first with archived WAL but no history file: their ancestry is
    /// unknown.
    pub fn timelines_without_history(&self) -> impl Iterator<Item = TimelineId> + '_ {
        self.segments
            .keys()
            .copied()
            .filter(|&t| t > TimelineId::FIRST && !self.has_history(t))
    }

    /// The archived segment numbers of each timeline with any, ascending.
    pub fn segments(&self) -> impl Iterator<Item = (TimelineId, &[SegmentNo])> {
        self.segments.iter().map(|(&t, nos)| (t, nos.as_slice()))
    }

    /// The archived segment numbers of `timeline`, ascending.
    pub fn segments_of(&self, timeline: TimelineId) -> &[SegmentNo] {
        self.segments.get(&timeline).map_or(&[], Vec::as_slice)
    }

    /// Whether any summary of the time index was read.
    pub fn has_time_index(&self) -> bool {
        !self.summaries.is_empty()
    }

    /// The summary of a segment (timeline, number), if it was read.
    pub fn summary(&self, at: (TimelineId, SegmentNo)) -> Option<&SegmentSummary> {
        self.summaries.get(&at)
    }

    /// Every summary read, by (timeline, segment number).
    pub fn summaries(&self) -> impl Iterator<Item = ((TimelineId, SegmentNo), &SegmentSummary)> {
        self.summaries.iter().map(|(&at, s)| (at, s))
    }

    /// Every WAL object listed (segments, partial segments, backup history and timeline history
    /// files), with its stored size.
    pub fn wal_files(&self) -> &[(WalFileName, u64)] {
        &self.wal_files
    }

    /// Every time index summary listed, read or not, with its stored size.
    pub fn summary_files(&self) -> &[(SegmentName, u64)] {
        &self.summary_files
    }

    /// Every manifest listed, usable or damaged, with its stored size.
    pub fn manifest_files(&self) -> impl Iterator<Item = (&BackupId, u64)> {
        self.manifest_bytes.iter().map(|(id, &size)| (id, size))
    }

    /// The stored size of backup `id`'s manifest, if it was listed.
    pub fn manifest_size(&self, id: &BackupId) -> Option<u64> {
        self.manifest_bytes.get(id).copied()
    }

    /// Every relation map listed (`backups/<id>/relations.wvo`), whether or not its backup
    /// finished, with its stored size.
    pub fn relation_maps(&self) -> impl Iterator<Item = (&BackupId, u64)> {
        self.relation_map_bytes.iter().map(|(id, &size)| (id, size))
    }

    /// The stored size of backup `id`'s relation map, if it was listed.
    pub fn relation_map_size(&self, id: &BackupId) -> Option<u64> {
        self.relation_map_bytes.get(id).copied()
    }

    fn segment_size(&self) -> u64 {
        u64::from(self.wal_segment_size())
    }

    /// The cluster's WAL segment size (PostgreSQL's default before any segment is archived).
    pub fn wal_segment_size(&self) -> u32 {
        self.cluster.map_or(DEFAULT_SEGMENT_SIZE, |c| c.wal_segment_size)
    }

    /// The timeline PostgreSQL reads segment `no` from when following `timeline`: the newest
    /// timeline of its history that had begun by that segment (`XLogFileReadAnyTLI`).
    pub fn timeline_of_segment(&self, timeline: TimelineId, no: SegmentNo) -> TimelineId {
        let h = self.timelines.history(timeline);
        let begins = |i: usize| {
            if i == 0 {
                SegmentNo(0)
            } else {
                SegmentNo(h.ancestors[i - 1].switch_lsn.0 / self.segment_size())
            }
        };
        // Timelines in order: ancestors, then `timeline` itself.
        let ids: Vec<TimelineId> = h.ancestors.iter().map(|a| a.timeline).chain([timeline]).collect();
        (0..ids.len())
            .rev()
            .find(|&i| begins(i) <= no)
            .map_or(timeline, |i| ids[i])
    }

    /// The segments recovery from `backup` replays following `timeline`, in order, up to the
    /// first one missing from the archive.
    pub fn chain(&self, backup: &Manifest, timeline: TimelineId) -> Vec<(TimelineId, SegmentNo)> {
        let mut out = Vec::new();
        let mut no = backup.wal_needed(self.wal_segment_size()).0;
        loop {
            let tli = self.timeline_of_segment(timeline, no);
            let present = self
                .segments
                .get(&tli)
                .is_some_and(|v| v.binary_search(&no).is_ok());
            if !present {
                return out;
            }
            out.push((tli, no));
            no = no.plus(1);
        }
    }

    /// Whether `chain`, replayed from backup `m`, reaches the segment where `m` becomes consistent.
    pub fn reaches_consistency(&self, m: &Manifest, chain: &[(TimelineId, SegmentNo)]) -> bool {
        let (_, consistent) = m.wal_needed(self.wal_segment_size());
        chain.iter().any(|&(_, no)| no >= consistent)
    }

    /// Whether recovery following `timeline` can start from backup `m`.
    pub fn on_history(&self, m: &Manifest, timeline: TimelineId) -> bool {
        self.timelines.history(timeline).timeline_at(m.stop_lsn) == m.timeline
    }

    /// Latest transaction end in a chain, per the time index.
    pub fn latest_commit(&self, chain: &[(TimelineId, SegmentNo)]) -> Option<i64> {
        chain
            .iter()
            .filter_map(|k| self.summaries.get(k))
            .filter_map(|s| s.max_commit)
            .filter_map(|t| t.to_unix_micros())
            .max()
    }

    /// Whether every segment of a chain has its summary (only then can the absence of a later
    /// transaction end be trusted).
    pub fn index_complete(&self, chain: &[(TimelineId, SegmentNo)]) -> bool {
        chain.iter().all(|k| self.summaries.contains_key(k))
    }

    /// End of the WAL a chain holds.
    pub fn chain_end(&self, chain: &[(TimelineId, SegmentNo)]) -> Lsn {
        chain.last().map_or(Lsn(0), |&(tli, no)| {
            self.summaries
                .get(&(tli, no))
                .and_then(|s| s.end_of_wal)
                .unwrap_or(Lsn((no.0 + 1) * self.segment_size()))
        })
    }

    /// The restorable window of `timeline`: from its earliest usable backup to the last
    /// transaction end archived contiguously after it. `None` without a usable backup.
    /// A backup whose WAL stops short of the others' (one kept to its consistency point only, by
    /// a calendar rule or a pin, or one before a gap) does not open the window: it starts at the
    /// oldest backup from which the WAL runs on to the end.
    pub fn window(&self, timeline: TimelineId) -> Option<Window> {
        let (first, chain) = self.window_chain(timeline)?;
        Some(Window {
            earliest: first.stop_time_us,
            latest: self.latest_commit(&chain),
            end_lsn: self.chain_end(&chain),
        })
    }

    /// The backup a window on `timeline` starts from, and its chain: the oldest usable backup
    /// (its WAL reaches its consistency point) whose WAL runs on as far as any backup's does.
    fn window_chain(&self, timeline: TimelineId) -> Option<(&Manifest, Vec<(TimelineId, SegmentNo)>)> {
        let usable: Vec<(&Manifest, Vec<(TimelineId, SegmentNo)>)> = self
            .backups
            .iter()
            .filter(|m| self.on_history(m, timeline))
            .map(|m| (m, self.chain(m, timeline)))
            .filter(|(m, chain)| self.reaches_consistency(m, chain))
            .collect();
        let end = usable.iter().map(|(_, c)| c.last().map(|&(_, no)| no)).max()?;
        usable
            .into_iter()
            .find(|(_, c)| c.last().map(|&(_, no)| no) == end)
    }

    /// Restore points (name, LSN, unix micros) a restore can reach on `timeline`: those after
    /// its earliest usable backup's consistency point, in the WAL archived after it.
    pub fn reachable_restore_points(&self, timeline: TimelineId) -> Vec<(String, Lsn, Option<i64>)> {
        let Some(first) = self.backups.iter().find(|m| self.on_history(m, timeline)) else {
            return Vec::new();
        };
        let mut points = self.restore_points(&self.chain(first, timeline));
        points.retain(|(_, lsn, _)| *lsn >= first.stop_lsn);
        points
    }

    /// Restore points (name, LSN, unix micros) in a chain.
    pub fn restore_points(&self, chain: &[(TimelineId, SegmentNo)]) -> Vec<(String, Lsn, Option<i64>)> {
        chain
            .iter()
            .filter_map(|k| self.summaries.get(k))
            .flat_map(|s| s.restore_points.iter())
            .map(|r| (r.name.clone(), r.lsn, r.time.to_unix_micros()))
            .collect()
    }

    /// Consecutive runs of archived segments on `timeline`; more than one run means gaps.
    pub fn ranges(&self, timeline: TimelineId) -> Vec<SegmentRange> {
        let seg_size = self.wal_segment_size();
        let name = |no: SegmentNo| SegmentName::from_no(timeline, no, seg_size).to_string();
        let mut out: Vec<SegmentRange> = Vec::new();
        let mut run: Option<(SegmentNo, SegmentNo)> = None;
        for &no in self.segments.get(&timeline).map(Vec::as_slice).unwrap_or(&[]) {
            run = match run {
                Some((a, b)) if no == b.plus(1) => Some((a, no)),
                Some((a, b)) => {
                    out.push(SegmentRange {
                        first: name(a),
                        last: name(b),
                        segments: b.since(a) + 1,
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
                segments: b.since(a) + 1,
            });
        }
        out
    }

    /// Every timeline with archived WAL or a history file.
    pub fn timeline_ids(&self) -> Vec<TimelineId> {
        let mut ids: Vec<TimelineId> = self
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

/// What `backups/` lists.
#[derive(Default)]
struct BackupListing {
    /// The manifests read, oldest first.
    manifests: Vec<Manifest>,
    pinned: BTreeSet<BackupId>,
    /// The stored size of each manifest listed, read or not.
    manifest_bytes: BTreeMap<BackupId, u64>,
    relation_map_bytes: BTreeMap<BackupId, u64>,
}

/// List `backups/`: pins, relation maps, and manifests, each read (or taken from `previous`:
/// a manifest never changes). An unusable manifest is set aside in `damaged`.
async fn read_backups(
    repo: &Reader,
    previous: Option<&Catalog>,
    held: Held,
    damaged: &mut Vec<Damaged>,
) -> Result<BackupListing, CatalogError> {
    let mut out = BackupListing::default();
    for (key, size) in repo.store().list(Kind::Backup.dirname()).await? {
        if let Some(id) = layout::parse_pin_key(&key) {
            out.pinned.insert(id);
        } else if let Some(id) = layout::parse_relation_map_key(&key) {
            out.relation_map_bytes.insert(id, size);
        } else if let Some(id) = layout::parse_manifest_key(&key) {
            out.manifest_bytes.insert(id.clone(), size);
            match manifest_of(repo, previous, &id, held).await {
                Ok(m) => out.manifests.push(m),
                Err(e) => set_aside(damaged, &key, format!("backup {id}"), Some(id), e)?,
            }
        }
        // Anything else is a foreign file: ignored.
    }
    out.manifests.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Backup `id`'s manifest, `held` whole or as its outline: `previous`'s copy when it has one
/// held so, else read from the repository.
async fn manifest_of(
    repo: &Reader,
    previous: Option<&Catalog>,
    id: &BackupId,
    held: Held,
) -> Result<Manifest, CatalogError> {
    match previous.and_then(|p| p.backup(id)).filter(|m| m.held == held) {
        Some(m) => Ok(m.clone()),
        None if held == Held::Outline => Objects::new(repo.store(), repo.sealer())
            .read::<ManifestOutline>(id)
            .await
            .map(|o| o.0)
            .map_err(CatalogError::of_manifest),
        // Each file's stat and stored lengths are for the next backup, which reads its base's
        // manifest itself (backup/inventory.rs): never parsed into a catalog.
        None => load_manifest_without_records(repo.store(), repo.sealer(), id).await,
    }
}

/// What `wal/` lists.
#[derive(Default)]
struct WalListing {
    /// The history files read.
    timelines: TimelineTree,
    /// Segment numbers per timeline, ascending.
    segments: BTreeMap<TimelineId, Vec<SegmentNo>>,
    /// Every WAL object listed, with its stored size.
    files: Vec<(WalFileName, u64)>,
}

/// List `wal/`: every WAL object, each history file read (an unusable one is set aside in
/// `damaged`), the segments numbered by `seg_size`.
async fn read_wal(
    repo: &Reader,
    seg_size: u32,
    damaged: &mut Vec<Damaged>,
) -> Result<WalListing, CatalogError> {
    let mut out = WalListing::default();
    for (key, size) in repo.store().list(Kind::Wal.dirname()).await? {
        let Some(name) = layout::parse_wal_key(&key) else {
            continue;
        };
        out.files.push((name, size));
        match name {
            WalFileName::History(tli) => match read_history(repo, &key, tli).await {
                Ok(h) => out.timelines.insert(h),
                Err(e) => set_aside(damaged, &key, format!("timeline {tli} history"), None, e)?,
            },
            WalFileName::Segment(s) => {
                if let Some(no) = s.segment_no(seg_size) {
                    out.segments.entry(s.timeline).or_default().push(no);
                }
            }
            _ => {}
        }
    }
    for v in out.segments.values_mut() {
        v.sort_unstable();
    }
    Ok(out)
}

/// Read and parse the history file of timeline `tli`, listed as `key`.
async fn read_history(repo: &Reader, key: &str, tli: TimelineId) -> Result<TimelineHistory, CatalogError> {
    let corrupt = |source| CatalogError::Corrupt {
        key: key.to_string(),
        source: Box::new(source),
    };
    match repo.read::<WalObject>(&WalFileName::History(tli)).await {
        Ok(file) => TimelineHistory::parse(tli, &file.content).map_err(|source| CatalogError::History {
            key: key.to_string(),
            source,
        }),
        Err(ReadError::Store(e)) => Err(e.into()),
        // Listed, then gone: as unusable as an empty object.
        Err(ReadError::Missing { .. }) => Err(corrupt(ObjectError::TooShort { len: 0 })),
        Err(ReadError::Damaged { reason, .. }) => match reason {
            Damage::Envelope(e) => Err(corrupt(e)),
            Damage::Content(never) => match never {},
        },
    }
}

/// What `index/` lists.
#[derive(Default)]
struct IndexListing {
    /// The summaries read, by (timeline, segment number).
    summaries: BTreeMap<(TimelineId, SegmentNo), SegmentSummary>,
    /// Every summary listed, with its stored size.
    files: Vec<(SegmentName, u64)>,
}

/// How much of the time index a catalog reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Summaries {
    /// Listed, not read.
    None,
    /// Each summary read without the changes and catalog rows it records ([`SegmentSummary`]'s
    /// `events` and `catalog_rows`, some 4,096 each a segment): only `find` searches them, and a
    /// repository's WAL of 50,000 tables created held 36 MB of them in every restore.
    Times,
    /// Each summary read whole.
    Whole,
}

/// List `index/`: every summary, and unless `read_summaries` is [`Summaries::None`], each read
/// (or taken from `previous`, read the same way: a summary never changes).
async fn read_index(
    repo: &Reader,
    seg_size: u32,
    previous: Option<&Catalog>,
    read_summaries: Summaries,
) -> Result<IndexListing, CatalogError> {
    let mut out = IndexListing::default();
    for (key, size) in repo.store().list(Kind::Index.dirname()).await? {
        let Some(seg) = layout::parse_summary_key(&key) else {
            continue;
        };
        out.files.push((seg, size));
        if read_summaries != Summaries::None {
            let at = seg.segment_no(seg_size).map(|no| (seg.timeline, no));
            if let (Some(at), Some(mut s)) = (at, summary_of(repo, previous, &seg, at).await) {
                if read_summaries == Summaries::Times {
                    s.events = None;
                    s.catalog_rows = Vec::new();
                }
                out.summaries.insert(at, s);
            }
        }
    }
    Ok(out)
}

/// The summary of `seg` (at `at` in the time index, if numbered): `previous`'s copy when it has
/// one, else read from the repository; `None` when there is none or it cannot be read.
async fn summary_of(
    repo: &Reader,
    previous: Option<&Catalog>,
    seg: &SegmentName,
    at: Option<(TimelineId, SegmentNo)>,
) -> Option<SegmentSummary> {
    if let Some(known) = at.and_then(|at| previous?.summaries.get(&at)) {
        return Some(known.clone());
    }
    match crate::timeindex::load(repo.store(), repo.sealer(), seg).await {
        Ok(s) => s.map(|s| s.summary),
        // Derived data: an unreadable summary costs precision, not the restore.
        Err(e) => {
            tracing::warn!("{e}");
            None
        }
    }
}

/// Set the unusable object `key` (`what` it is, and its backup if a manifest) aside in
/// `damaged`. A store that cannot be read is returned instead: it fails the load (nothing can be
/// told), where an object that was read but is unusable never hides the healthy ones.
fn set_aside(
    damaged: &mut Vec<Damaged>,
    key: &str,
    what: String,
    backup: Option<BackupId>,
    e: CatalogError,
) -> Result<(), CatalogError> {
    if let CatalogError::Store(_) = e {
        return Err(e);
    }
    tracing::warn!("{what} is damaged and left out: {e}");
    damaged.push(Damaged {
        key: key.to_string(),
        what,
        reason: e.to_string(),
        backup,
    });
    Ok(())
}

/// Read and verify one backup manifest.
pub async fn load_manifest(store: &Store, sealer: &Sealer, id: &BackupId) -> Result<Manifest, CatalogError> {
    Objects::new(store, sealer)
        .read::<Manifest>(id)
        .await
        .map_err(CatalogError::of_manifest)
}

/// Backup `id`'s manifest without its file records ([`Manifest::parse_without_records`]): what a
/// restore writes from.
pub async fn load_manifest_without_records(
    store: &Store,
    sealer: &Sealer,
    id: &BackupId,
) -> Result<Manifest, CatalogError> {
    Objects::new(store, sealer)
        .read::<ManifestWithoutRecords>(id)
        .await
        .map(|m| m.0)
        .map_err(CatalogError::of_manifest)
}

/// Backup `id`'s manifest held as stored, its frame parsed ([`PagedManifest`]): what a restore
/// writes from, reading the entries a page at a time.
pub async fn load_paged_manifest(
    store: &Store,
    sealer: &Sealer,
    id: &BackupId,
) -> Result<PagedManifest, CatalogError> {
    Objects::new(store, sealer)
        .read::<PagedManifest>(id)
        .await
        .map_err(CatalogError::of_manifest)
}

impl CatalogError {
    /// A manifest that could not be read, as the catalog reports it.
    fn of_manifest(e: ReadError<ManifestError>) -> CatalogError {
        match e {
            ReadError::Store(e) => CatalogError::Store(e),
            ReadError::Missing { key } => CatalogError::Manifest {
                key,
                source: Box::new(ManifestError::Invalid("missing".into())),
            },
            ReadError::Damaged { key, reason } => CatalogError::of_damaged_manifest(key, reason),
        }
    }

    /// Manifest `key`, read, found damaged (as its entries are read again, too: see
    /// [`PagedManifest`]).
    pub fn of_damaged_manifest(key: String, reason: Damage<ManifestError>) -> CatalogError {
        match reason {
            Damage::Envelope(e) => CatalogError::Corrupt {
                key,
                source: Box::new(e),
            },
            Damage::Content(e) => CatalogError::Manifest {
                key,
                source: Box::new(e),
            },
        }
    }
}

/// Catalogs and manifests built by hand, for the unit tests of the modules that read them.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::basebackup::manifest::{BackupStats, FORMAT_NAME, FORMAT_VERSION};

    /// PostgreSQL's default segment size, which these catalogs use.
    pub(crate) const SEG: u64 = 16 << 20;

    /// An empty catalog of a PostgreSQL 15 cluster with 16 MiB segments.
    pub(crate) fn empty_catalog(system_identifier: u64) -> Catalog {
        Catalog {
            repo_id: RepoId::random(),
            cluster: Some(ClusterIdentity {
                system_identifier,
                wal_segment_size: SEG as u32,
                wal_block_size: 8192,
                pg_version: 15,
            }),
            backups: vec![],
            timelines: TimelineTree::default(),
            segments: BTreeMap::new(),
            summaries: BTreeMap::new(),
            damaged: Vec::new(),
            pinned: Default::default(),
            wal_files: Vec::new(),
            summary_files: Vec::new(),
            manifest_bytes: BTreeMap::new(),
            relation_map_bytes: BTreeMap::new(),
        }
    }

    /// Catalogs built up by hand, one part at a time.
    impl Catalog {
        /// With `backups` after those it has (give them oldest first).
        pub(crate) fn with_backups(mut self, backups: impl IntoIterator<Item = Manifest>) -> Catalog {
            self.backups.extend(backups);
            self
        }

        /// With the history file of timeline `t`, whose text is `history`.
        pub(crate) fn with_history(mut self, t: u32, history: &[u8]) -> Catalog {
            self.timelines
                .insert(TimelineHistory::parse(crate::wal::lsn::tl(t), history).unwrap());
            self
        }

        /// With archived segments: each timeline's given, replacing what it had.
        pub(crate) fn with_segments(mut self, segments: BTreeMap<TimelineId, Vec<SegmentNo>>) -> Catalog {
            self.segments.extend(segments);
            self
        }

        /// With summaries in the time index, by (timeline, segment number).
        pub(crate) fn with_summaries(
            mut self,
            summaries: impl IntoIterator<Item = ((TimelineId, SegmentNo), SegmentSummary)>,
        ) -> Catalog {
            self.summaries.extend(summaries);
            self
        }

        /// With backup `id` pinned.
        pub(crate) fn with_pin(mut self, id: &BackupId) -> Catalog {
            self.pinned.insert(id.clone());
            self
        }

        /// With the listings of a repository holding what the catalog describes: its history
        /// files, and each segment with its summary.
        pub(crate) fn listed(mut self) -> Catalog {
            let seg_size = self.wal_segment_size();
            self.wal_files = self
                .timelines
                .histories
                .keys()
                .map(|&t| (WalFileName::History(t), 1))
                .collect();
            for (&tli, nos) in &self.segments {
                for &no in nos {
                    let seg = SegmentName::from_no(tli, no, seg_size);
                    self.wal_files.push((WalFileName::Segment(seg), 1));
                    self.summary_files.push((seg, 1));
                }
            }
            self
        }
    }

    /// Segment `no` of timeline `t`, as the catalog keys it.
    pub(crate) fn at(t: u32, no: u64) -> (TimelineId, SegmentNo) {
        (crate::wal::lsn::tl(t), SegmentNo(no))
    }

    /// Archived segments: runs of segment numbers per timeline.
    pub(crate) fn runs<const N: usize>(
        runs: [(u32, std::ops::RangeInclusive<u64>); N],
    ) -> BTreeMap<TimelineId, Vec<SegmentNo>> {
        runs.into_iter()
            .map(|(t, r)| (crate::wal::lsn::tl(t), r.map(SegmentNo).collect()))
            .collect()
    }

    /// Segment numbers.
    pub(crate) fn nos(v: &[u64]) -> Vec<SegmentNo> {
        v.iter().copied().map(SegmentNo).collect()
    }

    /// A chain as plain numbers, to compare with.
    pub(crate) fn plain(chain: &[(TimelineId, SegmentNo)]) -> Vec<(u32, u64)> {
        chain.iter().map(|&(t, n)| (t.get(), n.0)).collect()
    }

    /// The summary of segment `no`, with one transaction end, at `max_commit_unix_secs`.
    pub(crate) fn summary(no: u64, max_commit_unix_secs: i64) -> SegmentSummary {
        let t = crate::wal::pgtime::PgTime::from_unix_micros(max_commit_unix_secs * 1_000_000).unwrap();
        serde_json::from_value(serde_json::json!({
            "start": Lsn(no * SEG), "pg_version": 15, "end_of_records": Lsn(no * SEG), "records": 1,
            "first_record": null, "last_record": null, "commits": 1, "aborts": 0,
            "first_commit": t, "last_commit": t, "min_commit": t, "max_commit": t,
            "restore_points": [], "ends_with_switch": false, "skipped_continuation": false, "end_of_wal": null
        }))
        .unwrap()
    }

    /// The manifest of a backup of system 1 on timeline `tli` that started in segment
    /// `start_seg` and became consistent in it at `stop_us` (Unix microseconds), a second after
    /// it started.
    pub(crate) fn manifest(id: &str, tli: u32, start_seg: u64, stop_us: i64) -> Manifest {
        Manifest {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            id: id.parse().unwrap(),
            system_identifier: 1,
            pg_version: 15,
            timeline: crate::wal::lsn::tl(tli),
            start_lsn: Lsn(start_seg * SEG + 0x28),
            stop_lsn: Lsn(start_seg * SEG + 0x100),
            start_time_us: stop_us - 1_000_000,
            stop_time_us: stop_us,
            start_wal: String::new(),
            stop_wal: String::new(),
            chunk_size: 1 << 20,
            backup_label: String::new(),
            tablespace_map: None,
            tablespaces: vec![],
            entries: vec![],
            stats: BackupStats::default(),
            files_examined_after_us: None,
            packs: vec![],
            server_manifest: None,
            incremental_from: None,
            generation: 0,
            deltas: vec![],
            held: Default::default(),
            page_checks: None,
            files: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{SEG, at, empty_catalog, manifest, nos, plain, runs, summary};
    use super::*;
    use crate::repo::layout::manifest_key;
    use crate::repo::object::ObjectKind;
    use crate::wal::lsn::tl;

    /// Timeline 2 branched from 1 in segment 5; segments 2..=7 on 1, 5..=9 on 2.
    fn catalog() -> Catalog {
        empty_catalog(1)
            .with_backups([
                manifest("20261121T100000Z", 1, 2, 900_000_000),
                manifest("20261121T110000Z", 2, 7, 1_900_000_000),
            ])
            .with_history(2, b"1\t0/5000100\tx\n")
            .with_segments(runs([(1, 2..=7), (2, 5..=9)]))
            .with_summaries((2..=7).map(|no| (at(1, no), summary(no, 1000 + no as i64))))
            .with_summaries((5..=9).map(|no| (at(2, no), summary(no, 2000 + no as i64))))
    }

    #[test]
    fn chains_switch_timeline_at_the_branch_segment() {
        let cat = catalog();
        let b1 = &cat.backups[0];
        assert_eq!(
            plain(&cat.chain(b1, tl(1))),
            vec![(1, 2), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7)]
        );
        assert_eq!(
            plain(&cat.chain(b1, tl(2))),
            vec![(1, 2), (1, 3), (1, 4), (2, 5), (2, 6), (2, 7), (2, 8), (2, 9)]
        );
        assert!(cat.on_history(b1, tl(2)));
        // The timeline-2 backup is not on timeline 1's history.
        assert!(!cat.on_history(&cat.backups[1], tl(1)));
    }

    #[test]
    fn windows_follow_each_timeline() {
        let cat = catalog();
        let w1 = cat.window(tl(1)).unwrap();
        assert_eq!(w1.earliest, 900_000_000);
        assert_eq!(w1.latest, Some(1_007_000_000));
        assert_eq!(w1.end_lsn, Lsn(8 * SEG));
        let w2 = cat.window(tl(2)).unwrap();
        assert_eq!(w2.latest, Some(2_009_000_000));
        assert!(w2.describe().contains("earliest restorable point"));
    }

    #[test]
    fn a_gap_ends_the_chain() {
        let cat = catalog().with_segments(BTreeMap::from([(tl(2), nos(&[5, 6, 8, 9]))]));
        assert_eq!(cat.chain(&cat.backups[0], tl(2)).last(), Some(&at(2, 6)));
        assert_eq!(cat.ranges(tl(2)).len(), 2, "two runs: one gap");
    }

    #[tokio::test]
    async fn a_refresh_downloads_only_what_is_new() {
        use crate::repo::fault::{Fault, FaultStore};
        use crate::repo::object::SealedObject;
        use crate::repo::store::{CreateSemantics, WritableStore};
        use crate::repo::{RepoDescriptor, Writer};
        use std::sync::Arc;

        let faults = Arc::new(FaultStore::new(Fault::None));
        let store = WritableStore::with_backend(
            Arc::clone(&faults) as Arc<dyn object_store::ObjectStore>,
            "s3://b/r".parse().unwrap(),
            CreateSemantics::CheckThenWrite,
            crate::retry::RetryPolicy::with_total(std::time::Duration::from_secs(1)),
        );
        let json = include_bytes!("../tests/fixtures/manifest-v1.json");
        let m = Manifest::parse(json).unwrap();
        let cluster = ClusterIdentity {
            system_identifier: m.system_identifier,
            wal_segment_size: 16 << 20,
            wal_block_size: 8192,
            pg_version: 15,
        };
        let d = RepoDescriptor::new(Some(cluster), 0);
        store.put("walvault.json", d.to_json().into()).await.unwrap();
        let sealed = SealedObject::seal(ObjectKind::Manifest, m.id.as_str(), json, 3).unwrap();
        store.put(&manifest_key(&m.id), sealed.bytes).await.unwrap();
        let repo = Writer::on_store(store, None).await.unwrap().reader();

        let before = faults.requests();
        let first = Catalog::load_outlines(&repo).await.unwrap();
        assert_eq!(first.backups.len(), 1, "{:?}", first.damaged);
        assert_eq!(faults.requests() - before, 4, "three listings and one manifest");
        assert!(!first.backups[0].is_whole() && first.backups[0].entries.is_empty());
        let before = faults.requests();
        let again = Catalog::refresh_outlines(&repo, Some(&first)).await.unwrap();
        assert_eq!(again.backups[0].id, m.id);
        assert_eq!(faults.requests() - before, 3, "the listings only");
        // Outlines are never taken for whole manifests: a catalog that needs the files reads
        // them.
        let before = faults.requests();
        let whole = Catalog::read(&repo, Some(&again), Summaries::None, Held::Whole)
            .await
            .unwrap();
        assert_eq!(
            faults.requests() - before,
            4,
            "the listings and the manifest, whole"
        );
        assert_eq!(whole.backups[0].entries, m.entries);
        assert!(whole.backups[0].is_whole());
    }

    /// A restore's catalog reads each summary for its times and restore points: the changes
    /// only `find` searches are left out, and `find`'s catalog keeps them.
    #[tokio::test]
    async fn summaries_are_read_without_their_changes_unless_searched() {
        use crate::repo::fault::{Fault, FaultStore};
        use crate::repo::store::{CreateSemantics, WritableStore};
        use crate::repo::{RepoDescriptor, Writer};
        use crate::timeindex::{SummaryWrite, store_summary};
        use std::sync::Arc;

        let store = WritableStore::with_backend(
            Arc::new(FaultStore::new(Fault::None)) as Arc<dyn object_store::ObjectStore>,
            "s3://b/r".parse().unwrap(),
            CreateSemantics::CheckThenWrite,
            crate::retry::RetryPolicy::with_total(std::time::Duration::from_secs(1)),
        );
        let cluster = ClusterIdentity {
            system_identifier: 1,
            wal_segment_size: 16 << 20,
            wal_block_size: 8192,
            pg_version: 15,
        };
        store
            .put(
                "walvault.json",
                RepoDescriptor::new(Some(cluster), 0).to_json().into(),
            )
            .await
            .unwrap();
        let mut s = testing::summary(3, 1_795_271_550);
        s.events = Some(Vec::new());
        let seg = SegmentName::from_no(tl(1), SegmentNo(3), 16 << 20);
        store_summary(
            &store,
            &Sealer::plain(),
            &seg,
            s.clone(),
            None,
            SummaryWrite::Replace,
        )
        .await
        .unwrap();
        let repo = Writer::on_store(store, None).await.unwrap().reader();
        let at = (tl(1), SegmentNo(3));
        let restore = Catalog::load_outlines(&repo).await.unwrap();
        let read = &restore.summaries[&at];
        assert_eq!((read.events.as_ref(), read.catalog_rows.len()), (None, 0));
        assert_eq!((read.max_commit, read.commits), (s.max_commit, s.commits));
        let search = Catalog::load_outlines_and_changes(&repo).await.unwrap();
        assert_eq!(search.summaries[&at], s, "find reads it whole");
    }
}
