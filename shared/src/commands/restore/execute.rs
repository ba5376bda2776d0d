//! The executor of a [`RestorePlan`], as a list of plain steps:
//!
//! 1. empty the data directory when the plan says so ([`execute`]);
//! 2. lay out the directories and list the files to write: all of them, a page of
//!    [`PAGE_FILES`] at a time, or with `--delta` what differs ([`Pages`]);
//! 3. write every file but `global/pg_control`, page by page, each distinct chunk of a page
//!    fetched once and each file written from one descriptor ([`super::pipeline`]), and make them
//!    durable;
//! 4. write the recovery files ([`super::recovery_files`]) and make every name durable;
//! 5. write `global/pg_control`, last: until it lands no server starts on the directory;
//! 6. write the replay plan.
//!
//! It decides nothing the plan has not: the plan is the restore a dry run prints. On failure it
//! removes what it wrote: a half-restored directory must never be mistaken for a restore.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::delta::{self, DeltaComparison, DeltaReport};
use super::error::damaged;
use super::pipeline::{self, ChunkStore, Transfer};
use super::placement::destination;
use super::plan::{DirectoryUse, RestorePlan};
use super::recovery_files::{write_recovery_files, write_replay_plan};
use super::tree::{clear_dir, create_dir, create_parent};
use super::work::{BasesHere, PG_CONTROL, WorkList};
use super::{Progress, RestoreError, RestoreReport, SyncMethod, write_err};
use crate::basebackup::BackupId;
use crate::basebackup::manifest::paged::{EntriesError, FileEntries, PagedManifest};
use crate::basebackup::manifest::{Entry, EntryKind, Manifest};
use crate::repo::Store;
use crate::repo::object::Sealer;
use crate::repo::reads::{ReadReport, ReadStats};

/// Carry out `plan` with `manifest`, the manifest of its backup, from repository `repo`. The
/// report's `seconds` is left at zero for the caller, who knows when the restore began.
pub(crate) async fn execute(
    repo: &crate::repo::Reader,
    manifest: PagedManifest,
    mut plan: RestorePlan,
    progress: Arc<dyn Progress>,
) -> Result<RestoreReport, RestoreError> {
    // Files are written from the manifest of the plan's backup, its entries checked, never from
    // another backup's.
    if manifest.id() != &plan.backup.id || manifest.counts().is_none() {
        return Err(RestoreError::UnknownBackup(plan.backup.id.clone()));
    }
    let created = !plan.pgdata.exists();
    if plan.files.directory == DirectoryUse::Replace {
        clear_dir(&plan.pgdata)?;
    }
    progress.start(plan.files.bytes_to_write);
    let delta = plan.delta_work.take();
    let is_delta = delta.is_some();
    // The data's reads are recorded: what they cost and where the restore waited.
    let reads = ReadStats::new();
    let store = repo.store().recording(&reads);
    let written = write_backup(&store, repo.sealer(), &plan, manifest, delta, progress).await;
    let written = written.and_then(|done| write_replay_plan(&plan).map(|()| done));
    let written = match written {
        Ok(w) => w,
        Err(e) => return Err(undo(&plan, created, is_delta, e)),
    };
    let reads = reads.report();
    log_reads(&reads, &written.transfer);
    Ok(RestoreReport {
        backup: plan.backup.id.clone(),
        pg_version: plan.backup.pg_version,
        files: written.files,
        bytes: written.transfer.bytes_written,
        chunks_fetched: written.transfer.chunks_fetched,
        bytes_fetched: written.transfer.bytes_fetched,
        reads,
        waits: written.transfer.waits,
        timeline: plan.timeline.description.clone(),
        target: plan.recovery.target().describe(),
        delta: written.delta,
        replay: plan.replay.clone(),
        pgdata: plan.pgdata.clone(),
        seconds: 0.0,
        plan,
    })
}

/// After a failed restore: a full restore removes what it wrote (and the data directory, if it
/// created it); a failed delta restore changed a directory the DBA kept, which is left (it cannot
/// start: its pg_control was removed) and said to be incomplete.
fn undo(plan: &RestorePlan, created: bool, is_delta: bool, e: RestoreError) -> RestoreError {
    if is_delta && !matches!(e, RestoreError::NotRestorable { .. }) {
        return RestoreError::Incomplete {
            dir: plan.pgdata.display().to_string(),
            source: Box::new(e),
        };
    }
    for t in &plan.roots() {
        if let Err(e) = clear_dir(t) {
            tracing::warn!("cleaning up after the failed restore: {e}");
        }
    }
    if created {
        let _ = std::fs::remove_dir(&plan.pgdata);
    }
    e
}

/// What the data's reads cost and where the pipeline waited, at debug level.
fn log_reads(reads: &ReadReport, transfer: &Transfer) {
    let w = &transfer.waits;
    tracing::debug!(
        "reads: {}; waited: files {:.2} s for data, reads {:.2} s for room, decompression {:.2} s for reads",
        reads.summary(),
        w.writing_waited_for_data,
        w.reading_waited_for_room,
        w.decoding_waited_for_reads
    );
    for s in &reads.timeline {
        tracing::debug!(
            "reads at {} s: {} in flight at most, {:.1} on average, {} bytes answered",
            s.at,
            s.max_in_flight,
            s.mean_in_flight,
            s.bytes
        );
    }
}

/// The most files a full restore writes at once. What grows with a backup's files is its work
/// list (some 150 bytes a file) and the manifest's entries (some 150): a page bounds both, the
/// entries read from the stored manifest a page ahead of the one written. Each page is written
/// as a batch of its own, its chunks in pack order, so a chunk two pages share is fetched by
/// each. Restoring 300,963 files (50,000 tables, file://), peak RSS in two rounds: 63.6 and 65.8
/// MiB with pages of 16,384; 59.6 and 60.7 with 8,192; 67.5 and 72.4 with 4,096, whose many
/// more batches each start and end their pipeline (the times differed by less than the disk's
/// noise).
pub(crate) const PAGE_FILES: usize = 8_192;

/// Write the backup's directories and files (over the existing ones with a `delta` plan), the
/// recovery files, then `global/pg_control`: steps 2 to 5 of the module's list.
///
/// A full restore lays out its directories, then writes its files a page of [`PAGE_FILES`] at a
/// time, in path order, as the manifest's entries are read; `--delta` writes what differs in one
/// batch.
pub(crate) async fn write_backup(
    store: &Store,
    sealer: &Sealer,
    plan: &RestorePlan,
    manifest: PagedManifest,
    delta: Option<DeltaComparison>,
    progress: Arc<dyn Progress>,
) -> Result<Written, RestoreError> {
    write_in_pages(store, sealer, plan, manifest, delta, progress, PAGE_FILES).await
}

/// [`write_backup`] in pages of `page_files` files.
async fn write_in_pages(
    store: &Store,
    sealer: &Sealer,
    plan: &RestorePlan,
    mut manifest: PagedManifest,
    delta: Option<DeltaComparison>,
    progress: Arc<dyn Progress>,
    page_files: usize,
) -> Result<Written, RestoreError> {
    let places = Arc::new(manifest.frame().places());
    let dirs = directories(plan, manifest.frame());
    let files = manifest.counts().map_or(0, |c| c.files);
    let (mut pages, mut delta, bases_here) = match delta {
        Some(d) => {
            let whole = manifest.whole().map_err(|r| damaged(manifest.id().clone(), r))?;
            let (mut work, report) = delta::apply(d, &whole, &plan.pgdata, &plan.tablespaces)?;
            drop(whole);
            work.roots = plan.roots();
            let bases = std::mem::take(&mut work.bases_here);
            (Pages::One(Some(work)), Some(report), bases)
        }
        None => (
            Pages::lay_out(plan, &manifest, page_files)?,
            None,
            BasesHere::default(),
        ),
    };
    manifest.let_go_of_places();
    let frame = manifest.frame();
    let from = ChunkStore {
        store,
        sealer,
        places,
        chunk_size: frame.chunk_size,
        bases_here: Arc::new(bases_here),
    };
    let mut transfer = Transfer::default();
    let mut pg_control = None;
    while let Some(work) = pages.next(plan, frame.chunk_size).await? {
        let (batch, last) = work.into_batches(&from.places)?;
        pg_control = pg_control.or(last);
        transfer.add(pipeline::write(&from, batch, plan.parallel, plan.sync, &progress).await?);
    }
    // Everything but pg_control is durable before pg_control is written: the files, the recovery
    // files (a pg_control without its backup_label would start as crash recovery from the
    // backup's checkpoint, silently wrong) and every name.
    write_recovery_files(plan, frame)?;
    sync_dirs(&dirs)?;
    if let Some(pg_control) = pg_control {
        transfer.add(pipeline::write(&from, pg_control, 1, SyncMethod::Fsync, &progress).await?);
        // pg_control's own name (rewritten in place, or removed and created again by --delta).
        let dest = destination(&plan.pgdata, &plan.tablespaces, PG_CONTROL);
        sync_dirs(&[dest
            .parent()
            .map_or_else(|| plan.pgdata.clone(), Path::to_path_buf)])?;
    }
    if let Some(d) = delta.as_mut() {
        // Small files compared as their shared chunks arrived, found as the backup has them:
        // unchanged, their one chunk position not rewritten.
        d.files_unchanged += transfer.files_found_equal;
        d.chunks_rewritten -= transfer.files_found_equal;
    }
    Ok(Written {
        files,
        transfer,
        delta,
    })
}

/// What writing a backup's files did.
#[derive(Debug, Clone)]
pub(crate) struct Written {
    /// The backup's files (with `--delta`, those left unchanged included).
    pub files: u64,
    pub transfer: Transfer,
    pub delta: Option<DeltaReport>,
}

/// The work lists a restore writes one after the other.
enum Pages {
    /// `--delta`: what differs, in one list.
    One(Option<WorkList>),
    /// A full restore: pages of file entries, in path order, as a thread reads them from the
    /// stored manifest ([`read_pages`]), one page ahead of the one written; `started` once the
    /// first page was given (a backup without files still gives one, empty, so that its file
    /// systems are synced).
    Full {
        pages: tokio::sync::mpsc::Receiver<Vec<Entry>>,
        reader: Option<tokio::task::JoinHandle<Result<u64, EntriesError<Gone>>>>,
        /// The files the plan's read of the entries counted.
        expected: u64,
        backup: BackupId,
        started: bool,
    },
}

/// The writer of the pages is gone (it stopped on an error of its own).
#[derive(Debug, thiserror::Error)]
#[error("the restore stopped")]
struct Gone;

impl Pages {
    /// Create the backup's directories and start reading its file entries. Entries are sorted,
    /// so a directory comes before what it holds; a parent the manifest does not list is created
    /// 0700 (validation made sure no entry goes through a file).
    fn lay_out(
        plan: &RestorePlan,
        manifest: &PagedManifest,
        page_files: usize,
    ) -> Result<Pages, RestoreError> {
        let backup = manifest.id().clone();
        let entries = manifest.file_entries().map_err(|e| bug(&backup, e))?;
        create_dir(&plan.pgdata, 0o700)?;
        for e in manifest
            .frame()
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::Dir)
        {
            let dest = destination(&plan.pgdata, &plan.tablespaces, &e.path);
            create_parent(&dest)?;
            create_dir(&dest, e.mode)?;
        }
        let (tx, pages) = tokio::sync::mpsc::channel(1);
        let page_files = page_files.max(1);
        let reader = tokio::task::spawn_blocking(move || read_pages(&entries, page_files, &tx));
        Ok(Pages::Full {
            pages,
            reader: Some(reader),
            expected: manifest.counts().map_or(0, |c| c.files),
            backup,
            started: false,
        })
    }

    /// The next page's work list: for a full restore, up to a page of files to create with
    /// all their chunk references (their parents created), their entries let go.
    async fn next(&mut self, plan: &RestorePlan, chunk_size: u64) -> Result<Option<WorkList>, RestoreError> {
        let (pages, reader, expected, backup, started) = match self {
            Pages::One(work) => return Ok(work.take()),
            Pages::Full {
                pages,
                reader,
                expected,
                backup,
                started,
            } => (pages, reader, *expected, backup, started),
        };
        let page = match pages.recv().await {
            Some(page) => page,
            None => {
                // The reader is done: whatever it stopped on is the restore's error.
                if let Some(reader) = reader.take() {
                    let read = reader.await.map_err(|e| bug(backup, e))?;
                    let files = read.map_err(|e| match e {
                        EntriesError::Manifest(reason) => damaged(backup.clone(), reason),
                        other => bug(backup, other),
                    })?;
                    if files != expected {
                        return Err(bug(
                            backup,
                            format!("{files} files read, {expected} counted when they were checked"),
                        ));
                    }
                }
                if std::mem::replace(started, true) {
                    return Ok(None);
                }
                Vec::new()
            }
        };
        *started = true;
        let mut work = WorkList {
            roots: plan.roots(),
            ..WorkList::default()
        };
        for e in &page {
            let dest = destination(&plan.pgdata, &plan.tablespaces, &e.path);
            create_parent(&dest)?;
            // A database a partial restore leaves out: its files at their size, holes, nothing
            // fetched (see `restore::partial`).
            let chunks = match &plan.databases {
                Some(d) if d.zeroes(&e.path) => 0..0,
                _ => 0..e.chunks.len(),
            };
            work.add(e, dest, true, chunks, chunk_size);
        }
        Ok(Some(work))
    }
}

/// A manifest's entries read against what reading them before found: a bug.
fn bug(backup: &BackupId, what: impl std::fmt::Display) -> RestoreError {
    RestoreError::Manifest {
        backup: backup.clone(),
        source: Box::new(crate::basebackup::manifest::ManifestError::Invalid(format!(
            "its entries, read again: {what}"
        ))),
    }
}

/// Read the file entries of `entries` in pages of `page_files`, each sent to `tx` once full
/// (the last as it is); how many there were.
fn read_pages(
    entries: &FileEntries,
    page_files: usize,
    tx: &tokio::sync::mpsc::Sender<Vec<Entry>>,
) -> Result<u64, EntriesError<Gone>> {
    let mut page = Vec::with_capacity(page_files);
    let files = entries.files(|e| {
        page.push(e);
        if page.len() == page_files {
            let full = std::mem::replace(&mut page, Vec::with_capacity(page_files));
            tx.blocking_send(full).map_err(|_| Gone)?;
        }
        Ok(())
    })?;
    if !page.is_empty() {
        tx.blocking_send(page).map_err(|_| EntriesError::Stopped(Gone))?;
    }
    Ok(files)
}

/// The directories whose entries name what the restore wrote: the backup's, every root, and the
/// data directory's parent. Without syncing them, a crash right after "restored" could leave
/// files missing.
fn directories(plan: &RestorePlan, manifest: &Manifest) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = manifest
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::Dir)
        .map(|e| destination(&plan.pgdata, &plan.tablespaces, &e.path))
        .collect();
    dirs.extend(plan.roots());
    dirs.extend(plan.pgdata.parent().map(Path::to_path_buf));
    dirs
}

fn sync_dirs(dirs: &[PathBuf]) -> Result<(), RestoreError> {
    dirs.iter()
        .try_for_each(|d| crate::local::crashsafe::sync_dir(d).map_err(write_err(d)))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::testing::{options, paged, plan_of, stored_backup, stored_backup_sealed};
    use super::*;
    use crate::commands::restore::{NoProgress, SyncMethod};

    #[tokio::test]
    async fn each_distinct_chunk_is_fetched_once_however_often_it_is_referenced() {
        const CS: usize = 4096;
        let zero = vec![0u8; CS];
        let other = vec![7u8; CS];
        let page = [zero.clone(), other.clone(), zero.clone()].concat();
        let files = [
            // Zeroed pages, an identical copy, and a short tail.
            ("16384", page.clone()),
            ("16385", page.clone()),
            ("16386", [zero.clone(), vec![9u8; 100]].concat()),
            ("16387", vec![]),
        ];
        let (faults, store, sealer, m) = stored_backup(&files, CS as u64).await;
        // Either way of making the files durable writes the same files with the same modes.
        for sync in [SyncMethod::Syncfs, SyncMethod::Fsync] {
            let dir = tempfile::tempdir().unwrap();
            let mut opts = options(&dir.path().join("data"));
            opts.parallel = 3;
            opts.sync = sync;
            let before = faults.requests();
            let written = write_backup(
                &store,
                &sealer,
                &plan_of(&m, &opts, None),
                paged(&m),
                None,
                Arc::new(NoProgress),
            )
            .await
            .unwrap();
            // The three distinct chunks (zeroes, sevens, the tail) are neighbours in their pack:
            // read in one run, never once per reference (8).
            assert_eq!(
                faults.requests() - before,
                1,
                "one read per run of neighbouring chunks, not one per reference"
            );
            assert_eq!(written.transfer.chunks_fetched, 3);
            assert_eq!(written.transfer.bytes_fetched, 2 * CS as u64 + 100);
            assert_eq!(written.files, 4);
            let total: usize = files.iter().map(|(_, c)| c.len()).sum();
            assert_eq!(written.transfer.bytes_written, total as u64);
            for (name, content) in &files {
                let path = opts.pgdata.join("base/1").join(name);
                assert_eq!(&std::fs::read(&path).unwrap(), content, "{name}");
                use std::os::unix::fs::PermissionsExt;
                assert_eq!(
                    std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
                    0o600
                );
            }
        }
    }

    /// Pages of any size write every file, `global/pg_control` among them, and a backup of
    /// directories alone still lays them out.
    #[tokio::test]
    async fn a_restore_in_pages_writes_every_file_pg_control_included() {
        const CS: usize = 4096;
        let contents: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; CS + 100 * usize::from(i)]).collect();
        let named: Vec<(String, Vec<u8>)> = contents
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("{}", 16384 + i), c.clone()))
            .collect();
        let files: Vec<(&str, Vec<u8>)> = named.iter().map(|(n, c)| (n.as_str(), c.clone())).collect();
        let (_, store, sealer, mut m) = stored_backup(&files, CS as u64).await;
        // pg_control (in the middle of the path order), with the bytes of the first file.
        let first = m
            .entries
            .iter()
            .find(|e| e.path == "base/1/16384")
            .unwrap()
            .clone();
        m.entries.extend(super::super::testing::dirs(&["global"]));
        m.entries.push(Entry {
            path: PG_CONTROL.into(),
            ..first
        });
        m.validate().unwrap();
        let expected: Vec<(String, &Vec<u8>)> = named
            .iter()
            .map(|(n, c)| (format!("base/1/{n}"), c))
            .chain([(PG_CONTROL.to_string(), &contents[0])])
            .collect();
        for page in [1, 2, 4, 100] {
            let dir = tempfile::tempdir().unwrap();
            let opts = options(&dir.path().join("data"));
            let plan = plan_of(&m, &opts, None);
            let written = write_in_pages(
                &store,
                &sealer,
                &plan,
                paged(&m),
                None,
                Arc::new(NoProgress),
                page,
            )
            .await
            .unwrap();
            assert_eq!(written.files, 6, "page of {page}");
            let total: usize = expected.iter().map(|(_, c)| c.len()).sum();
            assert_eq!(written.transfer.bytes_written, total as u64, "page of {page}");
            for (path, content) in &expected {
                assert_eq!(
                    &&std::fs::read(opts.pgdata.join(path)).unwrap(),
                    content,
                    "{path}, page of {page}"
                );
            }
        }
        // A backup of directories only still lays them out.
        let mut empty = m.clone();
        empty.entries.retain(|e| e.kind == EntryKind::Dir);
        let dir = tempfile::tempdir().unwrap();
        let opts = options(&dir.path().join("data"));
        let written = write_in_pages(
            &store,
            &sealer,
            &plan_of(&empty, &opts, None),
            paged(&empty),
            None,
            Arc::new(NoProgress),
            2,
        )
        .await
        .unwrap();
        assert_eq!((written.files, written.transfer.bytes_written), (0, 0));
        assert!(opts.pgdata.join("global").is_dir() && opts.pgdata.join("base/1").is_dir());
    }

    /// A store that refuses every read fails the restore with that error, and once the error is
    /// returned nothing is still writing: the caller may remove the directory safely.
    #[tokio::test]
    async fn a_failed_fetch_fails_the_restore_and_leaves_no_writer_running() {
        const CS: usize = 4096;
        let files: Vec<(String, Vec<u8>)> = (0..40)
            .map(|i| (format!("{}", 16384 + i), vec![i as u8; CS * 3 + i]))
            .collect();
        let named: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, c)| (n.as_str(), c.clone())).collect();
        let (faults, store, sealer, m) = stored_backup(&named, CS as u64).await;
        faults.set(crate::repo::fault::Fault::Denied);
        let dir = tempfile::tempdir().unwrap();
        let opts = options(&dir.path().join("data"));
        let err = write_backup(
            &store,
            &sealer,
            &plan_of(&m, &opts, None),
            paged(&m),
            None,
            Arc::new(NoProgress),
        )
        .await
        .unwrap_err();
        assert!(
            !matches!(
                err,
                RestoreError::ChunkLength { .. }
                    | RestoreError::ShortPack { .. }
                    | RestoreError::NeverRead(_)
            ),
            "{err}"
        );
        let list = || {
            let mut names: Vec<(String, u64)> = std::fs::read_dir(opts.pgdata.join("base/1"))
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        e.metadata().unwrap().len(),
                    )
                })
                .collect();
            names.sort();
            names
        };
        let after = list();
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(list(), after, "something kept writing after the restore failed");
        assert!(!opts.pgdata.join("global/pg_control").exists());
    }

    #[tokio::test]
    async fn delta_rewrites_only_what_differs_and_never_writes_through_a_link() {
        delta_case(Sealer::plain()).await;
    }

    /// In an encrypted repository chunk ids are keyed hashes: the delta must compare with the
    /// same hash, or it would fetch every chunk.
    #[tokio::test]
    async fn delta_in_an_encrypted_repository_compares_with_the_keyed_hash() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "ab".repeat(32)).unwrap();
        let repo_id = crate::repo::RepoId::try_from("0123456789abcdef0123456789abcdef".to_string()).unwrap();
        let (keys, _) =
            crate::repo::keys::RepoKeys::generate(&crate::repo::keys::KeySource::File(key), &repo_id, None)
                .unwrap();
        delta_case(Sealer::encrypted(keys)).await;
    }

    async fn delta_case(sealer: Sealer) {
        const CS: usize = 4096;
        let a = [vec![1u8; CS], vec![2u8; CS], vec![3u8; 10]].concat();
        let b = vec![4u8; 100];
        let files = [("16384", a.clone()), ("16385", b.clone())];
        let (faults, store, sealer, m) = stored_backup_sealed(&files, CS as u64, sealer).await;
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(&dir.path().join("data"));
        let none = BTreeMap::new();
        write_backup(
            &store,
            &sealer,
            &plan_of(&m, &opts, None),
            paged(&m),
            None,
            Arc::new(NoProgress),
        )
        .await
        .unwrap();
        let data = opts.pgdata.clone();
        // The old directory diverged: a chunk of 16384 changed and the file grew, 16385 is now
        // a link out of the directory, and files and a directory the backup lacks appeared.
        let mut changed = a.clone();
        changed[CS + 5] = 99;
        changed.extend_from_slice(b"appended");
        std::fs::write(data.join("base/1/16384"), &changed).unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"precious").unwrap();
        std::fs::remove_file(data.join("base/1/16385")).unwrap();
        std::os::unix::fs::symlink(&outside, data.join("base/1/16385")).unwrap();
        std::fs::write(data.join("PG_VERSION"), b"15\n").unwrap();
        std::fs::create_dir_all(data.join("junk/deeper")).unwrap();
        std::fs::write(data.join("junk/deeper/x"), b"x").unwrap();

        opts.delta = true;
        let delta_write = |plan| {
            let (store, sealer, opts, m) = (&store, &sealer, &opts, &m);
            async move {
                write_backup(
                    store,
                    sealer,
                    &plan_of(m, opts, None),
                    paged(m),
                    Some(plan),
                    Arc::new(NoProgress),
                )
                .await
                .unwrap()
            }
        };
        let before = faults.requests();
        let plan = delta::plan(&sealer, &m, &data, &none).await.unwrap();
        assert_eq!(
            faults.requests(),
            before,
            "planning reads the directory, not the store"
        );
        let written = delta_write(plan).await;
        assert_eq!(
            faults.requests() - before,
            2,
            "the changed chunk of 16384 and the chunk of 16385, nothing else"
        );
        let report = written.delta.unwrap();
        assert_eq!(report.files_checked, 1);
        assert_eq!(report.files_created, 1);
        assert_eq!(report.chunks_rewritten, 2);
        // 16385's link, PG_VERSION, junk/, and the recovery files of the first restore (written
        // afresh).
        assert_eq!(report.removed, 6, "{report:?}");
        assert_eq!(std::fs::read(data.join("base/1/16384")).unwrap(), a);
        assert!(
            std::fs::symlink_metadata(data.join("base/1/16385"))
                .unwrap()
                .is_file()
        );
        assert_eq!(std::fs::read(data.join("base/1/16385")).unwrap(), b);
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
        assert!(!data.join("junk").exists());
        assert!(data.join("recovery.signal").exists() && data.join("backup_label").exists());

        // Restoring again over the restored directory (the data directory PostgreSQL would
        // have: this backup has no PG_VERSION) fetches nothing.
        std::fs::write(data.join("PG_VERSION"), b"15\n").unwrap();
        let before = faults.requests();
        let plan = delta::plan(&sealer, &m, &data, &none).await.unwrap();
        let written = delta_write(plan).await;
        assert_eq!(faults.requests(), before);
        assert_eq!(written.delta.unwrap().files_unchanged, 2);
    }

    /// Small files sharing one chunk (as a backup stores them) are each restored from their
    /// slice, with the chunk fetched once; a delta restore compares each with its slice as the
    /// chunk arrives and writes only the one that differs.
    #[tokio::test]
    async fn files_sharing_a_chunk_are_restored_from_their_slices_and_compared_by_delta() {
        use crate::basebackup::manifest::{Entry, Within};
        let small: Vec<Vec<u8>> = (0..3u8)
            .map(|i| vec![i + 1; 3000 + usize::from(i) * 700])
            .collect();
        let joined = small.concat();
        // The shared chunk, stored as the content of one file, then named by three.
        let (faults, store, sealer, mut m) = stored_backup(&[("shared", joined.clone())], 1 << 16).await;
        let chunk = m.entries.pop().unwrap().chunks[0];
        m.version = crate::basebackup::manifest::FORMAT_VERSION_WITHIN;
        let mut at = 0;
        for (i, content) in small.iter().enumerate() {
            m.entries.push(Entry {
                path: format!("base/1/{}", 16384 + i),
                kind: EntryKind::File,
                mode: 0o600,
                size: content.len() as u64,
                chunks: vec![chunk],
                within: Some(Within {
                    at,
                    of: joined.len() as u64,
                }),
            });
            at += content.len() as u64;
        }
        m.validate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(&dir.path().join("data"));
        let before = faults.requests();
        let written = write_backup(
            &store,
            &sealer,
            &plan_of(&m, &opts, None),
            paged(&m),
            None,
            Arc::new(NoProgress),
        )
        .await
        .unwrap();
        assert_eq!(faults.requests() - before, 1, "the shared chunk is read once");
        assert_eq!(written.transfer.chunks_fetched, 1);
        let data = opts.pgdata.clone();
        let file = |i: usize| data.join(format!("base/1/{}", 16384 + i));
        for (i, content) in small.iter().enumerate() {
            assert_eq!(&std::fs::read(file(i)).unwrap(), content, "file {i}");
        }

        // The second file changed (same size) in the old directory: only it is written.
        std::fs::write(file(1), vec![9u8; small[1].len()]).unwrap();
        std::fs::write(data.join("PG_VERSION"), b"15\n").unwrap();
        opts.delta = true;
        let plan = delta::plan(&sealer, &m, &data, &BTreeMap::new()).await.unwrap();
        let written = write_backup(
            &store,
            &sealer,
            &plan_of(&m, &opts, None),
            paged(&m),
            Some(plan),
            Arc::new(NoProgress),
        )
        .await
        .unwrap();
        for (i, content) in small.iter().enumerate() {
            assert_eq!(
                &std::fs::read(file(i)).unwrap(),
                content,
                "file {i} after the delta"
            );
        }
        let report = written.delta.unwrap();
        assert_eq!(report.files_compared_as_fetched, 3, "{report:?}");
        assert_eq!(
            (report.files_unchanged, report.chunks_rewritten),
            (2, 1),
            "{report:?}"
        );
        assert_eq!(written.transfer.bytes_written, small[1].len() as u64);
    }

    #[tokio::test]
    async fn delta_refuses_a_directory_that_is_not_a_data_directory() {
        let (_, _, sealer, m) = stored_backup(&[("1", vec![1])], 4096).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
        let err = delta::plan(&sealer, &m, dir.path(), &BTreeMap::new())
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("does not look like a PostgreSQL data directory"),
            "{err}"
        );
        assert_eq!(std::fs::read(dir.path().join("notes.txt")).unwrap(), b"mine");
    }
}
