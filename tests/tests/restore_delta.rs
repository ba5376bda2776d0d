//! `restore-agent restore --delta` over an existing data directory: a cluster restored from a
//! backup, started, changed (rows written, a table dropped, files added), stopped, then brought
//! back by a delta restore to the backup and to a point in time after it, each time with exactly
//! the data recorded then, fetching far fewer chunks than a full restore. A running server is
//! refused; links planted in the old directory are replaced, never written through.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow};
use walvault_testkit::backup::{self, BackupSummary, Restore, restore_new_cluster, take_backup};
use walvault_testkit::fixtures::{RECOVERY_TIMEOUT, archive_everything, archiving_cluster};
use walvault_testkit::host::{Finished, ScratchDir, snapshot, write_for_pg};
use walvault_testkit::workload::{self, TableFingerprint};
use walvault_testkit::{Cluster, Repo};

/// The tables compared, with their row order.
const TABLES: &[(&str, &str)] = &[
    ("pgbench_accounts", "aid"),
    ("pgbench_branches", "bid"),
    ("pgbench_tellers", "tid"),
    ("notes", "id"),
];

/// The restore point past the backup that the PITR delta restore targets.
const TARGET: &str = "delta_target";

fn fingerprints(cluster: &Cluster) -> Result<Vec<TableFingerprint>> {
    workload::fingerprints_of(cluster, TABLES)
}

/// A repository with one backup of a small pgbench database, and the archive past it up to and
/// beyond a restore point; the tables' contents at the backup and at the restore point.
struct Backed {
    repo: Repo,
    backup: BackupSummary,
    at_backup: Vec<TableFingerprint>,
    at_target: Vec<TableFingerprint>,
}

fn backed_up() -> &'static Backed {
    static BACKED: OnceLock<Backed> = OnceLock::new();
    BACKED.get_or_init(|| make_backed().unwrap_or_else(|e| panic!("{e:#}")))
}

fn make_backed() -> Result<Backed> {
    let repo = Repo::new()?;
    let mut source = archiving_cluster("delta-source", &repo, "")?;
    source.pgbench(&["-i", "-q", "-s", "3"])?;
    source.execute(
        "CREATE TABLE notes (id integer PRIMARY KEY, body text NOT NULL);
         INSERT INTO notes SELECT g, md5(g::text) FROM generate_series(1, 2000) g;
         CHECKPOINT",
    )?;
    // Nothing writes between these fingerprints and the backup.
    let at_backup = fingerprints(&source)?;
    let backup = take_backup(&source, &repo)?;
    source.execute(
        "UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid BETWEEN 1000 AND 1500;
         INSERT INTO notes SELECT g, 'after ' || g FROM generate_series(2001, 2100) g",
    )?;
    let at_target = fingerprints(&source)?;
    source.execute(&format!("SELECT pg_create_restore_point('{TARGET}')"))?;
    // Past the target: must not be replayed.
    source.execute("DELETE FROM notes WHERE id > 1900")?;
    archive_everything(&source)?;
    source.stop()?;
    Ok(Backed {
        repo,
        backup,
        at_backup,
        at_target,
    })
}

/// A number printed after `label` in a restore's output (`fetched 12 distinct chunks`).
fn reported(run: &Finished, label: &str) -> Result<u64> {
    run.stdout
        .split(label)
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("no number after {label:?} in the restore's output:\n{run}"))
}

/// `restore --delta` into `cluster`'s (stopped) directory with `args`, which must succeed;
/// archiving off again (the restored postgresql.conf is the source's).
fn delta_restore(b: &Backed, cluster: &Cluster, args: &[&str]) -> Result<Finished> {
    let mut all = vec!["--delta"];
    all.extend_from_slice(args);
    let run = backup::restore(&b.repo, &cluster.data_dir(), &all)?
        .check()
        .with_context(|| format!("delta restore of {} with {args:?}", cluster.name()))?;
    cluster.set_conf(&[("archive_mode", "off")])?;
    Ok(run)
}

/// Rows written, a table dropped, a relation-like file, a directory and a file the backup does
/// not have: the divergence of an old primary. Stops the cluster.
fn diverge(cluster: &mut Cluster) -> Result<()> {
    cluster.execute(
        "UPDATE pgbench_accounts SET abalance = -1 WHERE aid BETWEEN 100 AND 400;
         INSERT INTO notes SELECT g, 'diverged' FROM generate_series(5000, 5100) g;
         DROP TABLE pgbench_tellers;
         CREATE TABLE extra AS SELECT g FROM generate_series(1, 1000) g;
         CHECKPOINT",
    )?;
    cluster.stop()?;
    let data = cluster.data_dir();
    write_for_pg(&data.join("stray.conf"), b"left behind")?;
    let junk = data.join("junk");
    fs::create_dir(&junk)?;
    write_for_pg(&junk.join("file"), b"junk")?;
    walvault_testkit::host::give_to_pg_user(&junk)?;
    write_for_pg(&data.join("base/1/999999"), &[7u8; 8192])?;
    Ok(())
}

#[track_caller]
fn assert_gone(data: &Path, names: &[&str]) {
    for n in names {
        assert!(
            fs::symlink_metadata(data.join(n)).is_err(),
            "{n} should have been removed by the delta restore"
        );
    }
}

#[test]
fn delta_restore_brings_a_diverged_cluster_back_to_the_backup_and_to_a_target() -> Result<()> {
    let b = backed_up();
    let (mut old, full) =
        restore_new_cluster(&b.repo, "delta-old", Restore::with(&["--target", "immediate"]))?;
    let (full_chunks, full_written) = (reported(&full, "fetched ")?, reported(&full, ", wrote ")?);
    old.start_and_wait_recovery_end(RECOVERY_TIMEOUT)?;
    assert_eq!(fingerprints(&old)?, b.at_backup, "the full restore itself");

    // Back to the backup's consistent state.
    diverge(&mut old)?;
    let run = delta_restore(b, &old, &["--target", "immediate"])?;
    let delta_chunks = reported(&run, "fetched ")?;
    eprintln!(
        "full restore fetched {full_chunks} chunks; delta restore:\n{}",
        run.stdout
    );
    // It fetches the changed chunks of large files, and the chunks small files share (compared
    // as they arrive: nothing on disk can be compared with a shared chunk's id); it writes only
    // what differs.
    assert!(
        delta_chunks < full_chunks && reported(&run, ", wrote ")? * 4 < full_written,
        "a delta restore over a lightly changed directory must fetch fewer chunks than a full \
         restore ({full_chunks}) and write far fewer bytes ({full_written}):\n{run}"
    );
    assert!(reported(&run, "removed ")? >= 3, "{run}");
    assert!(
        reported(&run, "checked ")? + reported(&run, "compared ")? > 500,
        "{run}"
    );
    assert_gone(
        &old.data_dir(),
        &["stray.conf", "junk", "base/1/999999", "postmaster.pid"],
    );
    assert!(
        fs::read_dir(old.data_dir().join("pg_wal"))?
            .filter_map(Result::ok)
            .all(|e| e.file_name() == "archive_status"),
        "pg_wal must hold no WAL of the diverged cluster"
    );
    old.start_and_wait_recovery_end(RECOVERY_TIMEOUT)?;
    assert_eq!(
        fingerprints(&old)?,
        b.at_backup,
        "after the delta restore to the backup\n{run}"
    );
    assert_eq!(
        old.query_one_string("SELECT count(*)::text FROM pg_class WHERE relname = 'extra'")?,
        "0",
        "a table created after the backup must be gone"
    );

    // Diverge again, then to the restore point past the backup (replayed from the archive).
    diverge(&mut old)?;
    let run = delta_restore(b, &old, &["--target-name", TARGET, "--backup", &b.backup.id])?;
    assert!(
        reported(&run, "fetched ")? < full_chunks && reported(&run, ", wrote ")? * 4 < full_written,
        "full restore fetched {full_chunks} chunks and wrote {full_written} bytes:\n{run}"
    );
    old.start_and_wait_recovery_end(RECOVERY_TIMEOUT)?;
    assert_eq!(
        fingerprints(&old)?,
        b.at_target,
        "after the delta restore to {TARGET}\n{run}"
    );
    old.stop()?;
    Ok(())
}

#[test]
fn delta_restore_refuses_a_running_server_and_replaces_planted_links() -> Result<()> {
    let b = backed_up();
    let (mut old, _) =
        restore_new_cluster(&b.repo, "delta-links", Restore::with(&["--target", "immediate"]))?;
    old.start_and_wait_recovery_end(RECOVERY_TIMEOUT)?;
    old.execute("CREATE TABLE still_here AS SELECT 42 AS answer")?;
    let run = backup::restore(&b.repo, &old.data_dir(), &["--delta", "--target", "immediate"])?;
    assert_ne!(
        run.code(),
        Some(0),
        "a delta restore over a running server must fail: {run}"
    );
    assert!(run.stderr.contains("belongs to a running PostgreSQL"), "{run}");
    assert!(
        !old.data_dir().join("backup_label").exists(),
        "restore wrote backup_label"
    );
    assert_eq!(old.query_one_string("SELECT answer::text FROM still_here")?, "42");
    old.stop()?;

    // Links where the backup has a file and a directory, and one it does not have, all pointing
    // out of the data directory; and the pid file a crashed server leaves.
    let outside = ScratchDir::new("delta-outside")?;
    let precious = outside.path().join("precious");
    write_for_pg(&precious, b"not PostgreSQL's")?;
    let outside_dir = outside.subdir("dir")?;
    write_for_pg(&outside_dir.join("keep"), b"keep me")?;
    let before = snapshot(outside.path())?;
    let data = old.data_dir();
    let relation = fs::read_dir(data.join("base/1"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| fs::metadata(p).is_ok_and(|m| m.len() == 8192))
        .context("a one-page relation in base/1")?;
    for (at, target) in [
        (data.join("PG_VERSION"), &precious),
        (relation.clone(), &precious),
        (data.join("pg_stat"), &outside_dir),
        (data.join("elsewhere"), &outside_dir),
    ] {
        if at.is_dir() {
            fs::remove_dir_all(&at)?;
        } else if at.exists() {
            fs::remove_file(&at)?;
        }
        symlink(target, &at)?;
    }
    write_for_pg(&data.join("postmaster.pid"), b"999999999\n")?;

    let elsewhere = ScratchDir::new("delta-not-pgdata")?;
    let not_pgdata = elsewhere.subdir("not-pgdata")?;
    write_for_pg(&not_pgdata.join("notes.txt"), b"the DBA's notes")?;
    let run = backup::restore(&b.repo, &not_pgdata, &["--delta"])?;
    assert!(
        run.stderr
            .contains("does not look like a PostgreSQL data directory"),
        "{run}"
    );
    assert_eq!(fs::read(not_pgdata.join("notes.txt"))?, b"the DBA's notes");

    let run = delta_restore(b, &old, &["--target", "immediate"])?;
    assert_eq!(
        snapshot(outside.path())?,
        before,
        "nothing outside the data directory may change\n{run}"
    );
    for (p, dir) in [
        (data.join("PG_VERSION"), false),
        (relation, false),
        (data.join("pg_stat"), true),
    ] {
        let m = fs::symlink_metadata(&p)?;
        assert!(
            if dir { m.is_dir() } else { m.is_file() },
            "{} must be a real {} again",
            p.display(),
            if dir { "directory" } else { "file" }
        );
    }
    assert_eq!(
        fs::read_to_string(data.join("PG_VERSION"))?.trim(),
        old.pg().major().to_string()
    );
    assert_gone(&data, &["elsewhere", "postmaster.pid"]);
    old.start_and_wait_recovery_end(RECOVERY_TIMEOUT)?;
    assert_eq!(fingerprints(&old)?, b.at_backup, "after the delta restore\n{run}");
    old.stop()?;
    Ok(())
}
