//! `restore-agent restore` refuses what it cannot do right, says why, and leaves the target
//! directory as it found it: a target before the earliest backup, a non-empty directory, an
//! unknown timeline, a manifest whose paths leave the data directory, a corrupt chunk.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result};
use walvault_testkit::backup::{self, BackupSummary, next_backup_second, take_backup};
use walvault_testkit::fixtures::{archive_everything, archiving_cluster};
use walvault_testkit::host::{ScratchDir, write_for_pg};
use walvault_testkit::object::{KIND_MANIFEST, Sealed};
use walvault_testkit::{Repo, workload};

/// A repository holding one backup, shared by the tests that only read it.
struct Backed {
    repo: Repo,
    backup: BackupSummary,
    /// A time at which the cluster ran, before the backup started.
    before_backup: String,
}

fn backed_up() -> &'static Backed {
    static BACKED: OnceLock<Backed> = OnceLock::new();
    BACKED.get_or_init(|| make_backed().unwrap_or_else(|e| panic!("{e:#}")))
}

fn make_backed() -> Result<Backed> {
    let repo = Repo::new()?;
    let mut source = archiving_cluster("refusals-source", &repo, "")?;
    workload::create_ledger(&source)?;
    let before_backup = source.query_one_string(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'",
    )?;
    next_backup_second();
    let backup = take_backup(&source, &repo)?;
    archive_everything(&source)?;
    source.stop()?;
    Ok(Backed {
        repo,
        backup,
        before_backup,
    })
}

/// Every path under `dir` (relative), or `None` when `dir` does not exist.
fn tree(dir: &Path) -> Result<Option<BTreeSet<String>>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) -> Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            out.insert(path.strip_prefix(root)?.display().to_string());
            if path.is_dir() && !path.is_symlink() {
                walk(root, &path, out)?;
            }
        }
        Ok(())
    }
    if !dir.exists() {
        return Ok(None);
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out)?;
    Ok(Some(out))
}

#[test]
fn target_before_the_first_backup_is_refused() -> Result<()> {
    let b = backed_up();
    let scratch = ScratchDir::new("refuse-early")?;
    let pgdata = scratch.path().join("data");
    let run = backup::restore(&b.repo, &pgdata, &["--target-time", &b.before_backup])?;
    run.assert_failed_naming(&["earliest restorable point"]);
    assert!(
        run.stderr.contains(&b.backup.stop_time),
        "the error should say where the window starts (the backup's stop time {}): {run}",
        b.backup.stop_time
    );
    assert_eq!(tree(&pgdata)?, None, "the data directory must not be created");
    Ok(())
}

#[test]
fn non_empty_directory_is_refused_and_left_alone() -> Result<()> {
    let b = backed_up();
    let scratch = ScratchDir::new("refuse-nonempty")?;
    let pgdata = scratch.subdir("data")?;
    let keep = pgdata.join("keep-me.txt");
    write_for_pg(&keep, b"the DBA's notes")?;
    let run = backup::restore(&b.repo, &pgdata, &[])?;
    run.assert_failed_naming(&["not empty"]);
    assert_eq!(
        tree(&pgdata)?,
        Some(BTreeSet::from(["keep-me.txt".to_string()])),
        "nothing may be added to the directory"
    );
    assert_eq!(fs::read(&keep)?, b"the DBA's notes");
    Ok(())
}

/// `--force` replaces a directory's contents, but never a running server's: restoring over a
/// live cluster would corrupt both.
#[test]
fn force_never_restores_over_a_running_server() -> Result<()> {
    let b = backed_up();
    let mut live = walvault_testkit::Cluster::init("refuse-running", &Default::default())?;
    live.start()?;
    live.execute("CREATE TABLE still_here AS SELECT 42 AS answer")?;
    let run = backup::restore(&b.repo, &live.data_dir(), &["--force"])?;
    run.assert_failed_naming(&["belongs to a running PostgreSQL"]);
    // The server's own files are all there, and restore wrote none of its own.
    for kept in ["PG_VERSION", "global/pg_control", "postmaster.pid", "base"] {
        assert!(live.data_dir().join(kept).exists(), "{kept} is gone");
    }
    for written in ["backup_label", "recovery.signal"] {
        assert!(!live.data_dir().join(written).exists(), "restore wrote {written}");
    }
    assert_eq!(
        live.query_one_string("SELECT answer::text FROM still_here")?,
        "42"
    );
    live.stop()?;
    Ok(())
}

#[test]
fn unknown_timeline_is_refused() -> Result<()> {
    let b = backed_up();
    let scratch = ScratchDir::new("refuse-timeline")?;
    let pgdata = scratch.path().join("data");
    let run = backup::restore(&b.repo, &pgdata, &["--target-timeline", "7"])?;
    run.assert_failed_naming(&["unknown to the repository"]);
    assert_eq!(tree(&pgdata)?, None, "the data directory must not be created");
    Ok(())
}

/// Replace the first file entry's path in the backup's manifest with `hostile`, in a valid
/// envelope (hash and CRC recomputed), so only the manifest's own checks can catch it.
fn plant_path(repo: &Repo, id: &str, hostile: &str) -> Result<()> {
    let key = repo.manifest_key(id);
    let mut obj = Sealed::open(&repo.read(&key)?).context("reading the manifest object")?;
    assert_eq!((obj.kind, obj.name.as_str()), (KIND_MANIFEST, id));
    let mut manifest: serde_json::Value = serde_json::from_slice(&obj.content)?;
    let entry = manifest["entries"]
        .as_array_mut()
        .context("manifest entries")?
        .iter_mut()
        .find(|e| e["kind"] == "file")
        .context("no file entry in the manifest")?;
    entry["path"] = hostile.into();
    obj.content = serde_json::to_vec(&manifest)?;
    repo.write(&key, &obj.seal()?)
}

#[test]
fn manifest_with_a_path_outside_the_data_directory_is_refused_before_writing() -> Result<()> {
    let b = backed_up();
    let repo = b.repo.copy()?;
    let manifest_key = repo.manifest_key(&b.backup.id);
    let original = repo.read(&manifest_key)?;

    // Control: the envelope this test writes is one restore-agent accepts.
    let mut same = Sealed::open(&original)?;
    same.content = serde_json::to_vec(&serde_json::from_slice::<serde_json::Value>(&same.content)?)?;
    repo.write(&manifest_key, &same.seal()?)?;
    let info = backup::info(&repo)?;
    assert_eq!(
        info["backups"][0]["id"], b.backup.id,
        "a re-sealed, unchanged manifest must still be readable: {info:#}"
    );

    let scratch = ScratchDir::new("refuse-traversal")?;
    // `../../escape` from <scratch>/a/b/data lands in <scratch>/a/escape.
    let pgdata = scratch.subdir("a/b")?.join("data");
    let absolute = scratch.path().join("absolute-escape");
    let escapes: [(String, PathBuf); 2] = [
        ("../../escape".into(), scratch.path().join("a/escape")),
        (absolute.display().to_string(), absolute.clone()),
    ];
    for (hostile, lands_at) in &escapes {
        repo.write(&manifest_key, &original)?;
        plant_path(&repo, &b.backup.id, hostile)?;
        let run = backup::restore(&repo, &pgdata, &[])?;
        run.assert_failed_naming(&["unsafe"]);
        assert!(
            run.stderr.contains(hostile.as_str()),
            "the error must name the path {hostile:?}: {run}"
        );
        assert_eq!(
            tree(&pgdata)?,
            None,
            "{hostile}: the data directory must not be created"
        );
        assert!(
            !lands_at.exists(),
            "{hostile}: {} was written",
            lands_at.display()
        );
    }
    assert_eq!(
        tree(scratch.path())?,
        Some(BTreeSet::from(["a".to_string(), "a/b".to_string()])),
        "nothing may be written anywhere"
    );
    Ok(())
}

#[test]
fn corrupt_chunk_fails_the_restore_without_leaving_a_data_directory() -> Result<()> {
    let b = backed_up();
    let repo = b.repo.copy()?;
    // The largest chunk: part of a relation file, not one shared by many small files.
    let (victim, _) = repo
        .backup_objects()?
        .into_iter()
        .max_by_key(|(_, size)| *size)
        .context("the backup stored no chunk")?;
    let id = Repo::object_id(&victim).context("chunk object name")?;
    repo.flip_middle_byte(&victim)?;

    let scratch = ScratchDir::new("refuse-corrupt")?;
    let pgdata = scratch.path().join("data");
    let run = backup::restore(&repo, &pgdata, &[])?;
    run.assert_failed_naming(&["corrupt"]);
    assert!(run.stderr.contains(&id), "the error must name chunk {id}: {run}");
    // Never a half-restored directory PostgreSQL would start on...
    for marker in ["backup_label", "recovery.signal"] {
        assert!(
            !pgdata.join(marker).exists(),
            "a failed restore left {marker} in {}",
            pgdata.display()
        );
    }
    // ...and, like every refused restore, nothing at all.
    let left = tree(&pgdata)?;
    assert!(
        left.is_none(),
        "a failed restore must leave the data directory as it found it (absent), but {} holds {} \
         entries, e.g. {:?}",
        pgdata.display(),
        left.as_ref().map_or(0, BTreeSet::len),
        left.iter().flatten().take(5).collect::<Vec<_>>()
    );
    Ok(())
}
