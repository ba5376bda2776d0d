//! `restore-agent restore`: rebuild a data directory from a base backup and configure PostgreSQL
//! to replay the archive up to a recovery target. Starting PostgreSQL on the directory completes
//! the point-in-time recovery.
//!
//! Three phases, each a module:
//! - the plan ([`mod@plan`], [`RestorePlan`]): which backup ([`select`]), where each file and
//!   tablespace goes ([`placement`]), what the directory holds (with `--delta`, [`delta`]'s
//!   comparison), the recovery settings and the replay ahead, decided with reads only;
//!   `restore-agent restore --dry-run` prints it;
//! - the executor ([`execute`]): empties or creates the directory and writes the backup's files,
//!   from the work list ([`work`]), each distinct chunk fetched once ([`chunk_reader`]) and each
//!   file written from one descriptor ([`file_writer`]) by the [`pipeline`] within the memory
//!   bound ([`budget`]), on the tree [`tree`] creates;
//! - the writer of the recovery configuration ([`recovery_files`]).
//!
//! Everything that can be refused is refused before the first byte is written: an unknown
//! timeline, a target no backup can reach, a non-empty directory, an unsafe manifest. The
//! manifest is treated as hostile (anyone who can write to the repository writes it): it is
//! validated in full ([`Manifest::validate`], [`check_before_writing`]) before anything is created.

use std::sync::Arc;
use std::time::Instant;

pub use self::budget::OPEN_FILES;
pub use self::waits::Waits;
use crate::basebackup::manifest::paged::PagedManifest;
use crate::catalog::Catalog;
use crate::config::Settings;

mod budget;
mod chunk_reader;
mod delta;
mod direct;
mod error;
mod execute;
mod file_writer;
mod options;
mod order;
mod partial;
mod pipeline;
mod placement;
mod plan;
mod progress;
mod recovery_files;
mod restored;
mod select;
mod tree;
mod waits;
mod work;

pub use delta::DeltaReport;
pub use error::RestoreError;
use error::write_err;
pub use options::{RestoreOptions, SyncMethod, TablespacePlacement, default_parallel};
pub use partial::{NamedDatabase, PlannedDatabases};
pub use placement::check_before_writing;
pub use plan::{DirectoryUse, PlannedBackup, PlannedFiles, PlannedRecovery, PlannedTimeline, RestorePlan};
pub use progress::{NoProgress, Progress};
pub use restored::RestoreReport;
pub use select::{ReplaySpan, choose_backup, replay_span, resolve_timeline};

pub use crate::recovery_conf::{RecoveryTarget, TargetAction, TimelineTarget};

/// Restore a backup into `opts.pgdata` and write the recovery settings: [`prepare`], then the
/// executor. The catalog holds outlines ([`Catalog::load_outlines`]) and is let go before the
/// files are written: what the restore holds from there is one manifest, as stored.
pub async fn restore(
    settings: &Settings,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let repo = settings.open_reader().await?;
    let cat = Catalog::load_outlines(&repo).await?;
    let (plan, manifest) = prepare(settings, &repo, &cat, opts).await?;
    drop(cat);
    let mut report = execute::execute(&repo, manifest, plan, progress).await?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// [`restore`] from a repository already open and its catalog already read (a drill has read
/// both to plan its target).
pub async fn restore_from(
    settings: &Settings,
    repo: &crate::repo::Reader,
    cat: &Catalog,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let (plan, manifest) = prepare(settings, repo, cat, opts).await?;
    let mut report = execute::execute(repo, manifest, plan, progress).await?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Carry out a plan made by [`prepare`], with the manifest it returned (a caller that checks the
/// plan before writing, as `extract` checks its room).
pub async fn restore_planned(
    repo: &crate::repo::Reader,
    plan: RestorePlan,
    manifest: PagedManifest,
    progress: Arc<dyn Progress>,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let mut report = execute::execute(repo, manifest, plan, progress).await?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// What [`restore`] would do, decided with reads only: `restore-agent restore --dry-run`.
/// Nothing is created, not even the data directory.
pub async fn plan(settings: &Settings, opts: &RestoreOptions) -> Result<RestorePlan, RestoreError> {
    let repo = settings.open_reader().await?;
    let cat = Catalog::load_outlines(&repo).await?;
    plan_from(settings, &repo, &cat, opts).await
}

/// [`plan`] from a repository already open and its catalog already read.
pub async fn plan_from(
    settings: &Settings,
    repo: &crate::repo::Reader,
    cat: &Catalog,
    opts: &RestoreOptions,
) -> Result<RestorePlan, RestoreError> {
    prepare(settings, repo, cat, opts).await.map(|(plan, _)| plan)
}

/// [`plan_from`], with the chosen backup's manifest held as stored, read once (the catalog may
/// hold only outlines), its entries checked, for the executor to write from.
pub async fn prepare(
    settings: &Settings,
    repo: &crate::repo::Reader,
    cat: &Catalog,
    opts: &RestoreOptions,
) -> Result<(RestorePlan, PagedManifest), RestoreError> {
    plan::build(repo.store(), repo.sealer(), settings.repo.to_string(), cat, opts).await
}

#[cfg(test)]
mod testing {
    //! What the restore's unit tests share: a manifest fixture, catalogs, options, a repository
    //! in memory holding a backup, and a plan made without a catalog.

    use std::path::Path;
    use std::sync::Arc;

    use super::delta::DeltaComparison;
    use super::*;
    use crate::basebackup::manifest::{Entry, EntryKind, Manifest, Tablespace};
    use crate::repo::Store;
    use crate::repo::object::Sealer;

    pub(super) const SYSID: u64 = 7_441_234_567_890_123_456;

    pub(super) fn fixture() -> Manifest {
        Manifest::parse(include_bytes!("../../tests/fixtures/manifest-v1.json")).unwrap()
    }

    /// Directory entries of a manifest, mode 0700.
    pub(super) fn dirs(paths: &[&str]) -> Vec<Entry> {
        paths
            .iter()
            .map(|d| Entry {
                within: None,
                path: d.to_string(),
                kind: EntryKind::Dir,
                mode: 0o700,
                size: 0,
                chunks: vec![],
            })
            .collect()
    }

    /// A reference to chunk `id` of `len` bytes, chunk `index` of file `file`.
    pub(super) fn r(
        id: crate::basebackup::chunk::ChunkId,
        len: u64,
        file: usize,
        index: u64,
    ) -> super::order::ChunkRef {
        super::order::ChunkRef {
            file,
            index,
            id,
            len,
            within: None,
        }
    }

    /// `m` held as a restore holds the manifest it writes from, its entries checked.
    pub(super) fn paged(m: &Manifest) -> PagedManifest {
        let mut p = PagedManifest::of(m).unwrap();
        p.check(|_| Ok::<(), RestoreError>(())).unwrap();
        p
    }

    pub(super) fn catalog(sysid: u64) -> Catalog {
        crate::catalog::testing::empty_catalog(sysid)
    }

    pub(super) fn options(pgdata: &Path) -> RestoreOptions {
        RestoreOptions::new(pgdata, "true")
    }

    /// A store in memory holding nothing.
    pub(super) fn empty_store() -> Store {
        use crate::repo::fault::{Fault, FaultStore};
        use crate::repo::store::{CreateSemantics, WritableStore};
        WritableStore::with_backend(
            Arc::new(FaultStore::new(Fault::None)) as Arc<dyn object_store::ObjectStore>,
            "s3://bucket/repo".parse().unwrap(),
            CreateSemantics::CheckThenWrite,
            crate::retry::RetryPolicy::with_total(std::time::Duration::from_secs(5)),
        )
        .reader()
    }

    pub(super) fn with_tablespace(location: &str) -> Manifest {
        let mut m = fixture();
        m.tablespaces = vec![Tablespace {
            oid: 16400,
            location: location.into(),
        }];
        m.entries.push(Entry {
            within: None,
            path: "pg_tblspc/16400".into(),
            kind: EntryKind::Dir,
            mode: 0o700,
            size: 0,
            chunks: vec![],
        });
        m
    }

    /// A repository in memory that counts the requests it serves, holding the chunks of `files`
    /// (path, content) cut at `chunk_size`, and a manifest of them (under `base/1`).
    pub(super) async fn stored_backup(
        files: &[(&str, Vec<u8>)],
        chunk_size: u64,
    ) -> (Arc<crate::repo::fault::FaultStore>, Store, Sealer, Manifest) {
        stored_backup_sealed(files, chunk_size, Sealer::plain()).await
    }

    /// [`stored_backup`] sealed by `sealer` (an encrypted repository's names chunks by a keyed
    /// hash). The chunks of the first file and of every other one after it are in one pack, as a
    /// backup stores them; the others' are stored on their own, as older backups stored them.
    pub(super) async fn stored_backup_sealed(
        files: &[(&str, Vec<u8>)],
        chunk_size: u64,
        sealer: Sealer,
    ) -> (Arc<crate::repo::fault::FaultStore>, Store, Sealer, Manifest) {
        use crate::basebackup::chunk::{ChunkId, chunk_id, seal_chunk};
        use crate::basebackup::pack::PackBuilder;
        use crate::repo::fault::{Fault, FaultStore};
        use crate::repo::layout::{chunk_key, pack_key};
        use crate::repo::store::{CreateSemantics, WritableStore};
        let faults = Arc::new(FaultStore::new(Fault::None));
        let writable = WritableStore::with_backend(
            Arc::clone(&faults) as Arc<dyn object_store::ObjectStore>,
            "s3://bucket/repo".parse().unwrap(),
            CreateSemantics::CheckThenWrite,
            crate::retry::RetryPolicy::with_total(std::time::Duration::from_secs(5)),
        );
        let mut m = fixture();
        m.chunk_size = chunk_size;
        m.entries = dirs(&["base", "base/1"]);
        let mut pack = PackBuilder::default();
        let mut packed = std::collections::HashSet::new();
        for (i, (name, content)) in files.iter().enumerate() {
            let mut chunks = vec![];
            for piece in content.chunks(chunk_size as usize) {
                let hash = sealer.content_hash(piece);
                let id = ChunkId::from_hash(hash);
                let sealed = seal_chunk(&sealer, hash, piece, 1).unwrap();
                if i % 2 == 1 {
                    writable.put(&chunk_key(&id), sealed).await.unwrap();
                } else if packed.insert(id) {
                    pack.add(id, &sealed);
                }
                chunks.push(chunk_id(&sealer, piece));
            }
            m.entries.push(Entry {
                within: None,
                path: format!("base/1/{name}"),
                kind: EntryKind::File,
                mode: 0o600,
                size: content.len() as u64,
                chunks,
            });
        }
        if !pack.is_empty() {
            let (bytes, record) = pack.seal();
            writable.put(&pack_key(&record.id), bytes).await.unwrap();
            m.version = 2;
            m.packs = vec![record];
        }
        m.entries.sort_by(|a, b| a.path.cmp(&b.path));
        m.validate().unwrap();
        (faults, writable.reader(), sealer, m)
    }

    /// The plan a restore of `m` with `opts` carries out (the tablespaces as `opts` maps them,
    /// timeline 1), made without choosing the backup from a catalog.
    pub(super) fn plan_of(
        m: &Manifest,
        opts: &RestoreOptions,
        delta_work: Option<DeltaComparison>,
    ) -> RestorePlan {
        plan::RestorePlan {
            pgdata: opts.pgdata.clone(),
            repository: "s3://bucket/repo".into(),
            backup: plan::planned_backup(m),
            timeline: plan::planned_timeline(opts.timeline, crate::wal::lsn::tl(1)),
            files: PlannedFiles {
                directory: DirectoryUse::Create,
                files: 0,
                directories: 0,
                bytes: 0,
                bytes_to_write: 0,
                delta: None,
            },
            tablespaces: opts.tablespaces.map.clone(),
            databases: None,
            recovery: plan::planned_recovery(
                opts,
                crate::wal::lsn::tl(1),
                !opts.tablespaces.map.is_empty(),
                false,
            ),
            replay: None,
            checks: vec![],
            wal_segment_size: 16 << 20,
            parallel: opts.parallel,
            sync: opts.sync,
            delta_work,
        }
    }
}
