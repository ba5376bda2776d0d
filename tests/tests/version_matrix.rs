//! The version matrix: every supported PostgreSQL release the suite has a real server of (13 to
//! 18; `scripts/ensure-deps.sh` installs them), each driven end to end on a `file://`
//! repository the way a DBA uses walvault:
//!
//! - archiving through `archive_command = 'archive-agent push %p'` with the daemon beside it,
//!   under a workload (pgbench, payload rows, a ledger of small transactions);
//! - an online `archive-agent backup`;
//! - the time index: `restore-agent info` reports the restorable window ending exactly at the
//!   last commit PostgreSQL made (`track_commit_timestamp`) and the restore point it created,
//!   at the time and LSN it was created;
//! - replay of all of it through `restore-agent fetch`, every table identical;
//! - `--target-time` and `--target-name` restores, exact ledger contents; paused at the restore
//!   point, the prefetcher has the WAL after it spooled, and removes its spool once recovery ends;
//! - a branch: a restore promoted to timeline 2 that keeps archiving, then a restore to an
//!   instant on timeline 2 with `--target-timeline latest`.
//!
//! The tests are named `matrix_pg<N>` so that the suite's S3 and Azure passes, which run the
//! rest on PostgreSQL 15, can leave them out (`--skip matrix_`).

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use walvault_testkit::backup::{self, Restore, take_backup};
use walvault_testkit::daemon::{self, Daemon};
use walvault_testkit::fixtures::{
    BETWEEN_TRANSACTIONS, RECOVERY_TIMEOUT, archive_everything, archiving_cluster_on,
};
use walvault_testkit::host::{self, Poll};
use walvault_testkit::pg::PgInstall;
use walvault_testkit::workload::{self, Ledger, LedgerState, format_lsn};
use walvault_testkit::{Cluster, Repo};

const RESTORE_POINT: &str = "matrix-before-change";

#[test]
fn matrix_pg13() -> Result<()> {
    end_to_end(13)
}

#[test]
fn matrix_pg14() -> Result<()> {
    end_to_end(14)
}

#[test]
fn matrix_pg15() -> Result<()> {
    end_to_end(15)
}

#[test]
fn matrix_pg16() -> Result<()> {
    end_to_end(16)
}

#[test]
fn matrix_pg17() -> Result<()> {
    end_to_end(17)
}

#[test]
fn matrix_pg18() -> Result<()> {
    end_to_end(18)
}

fn ledger_steps(ledger: &mut Ledger, n: usize) -> Result<Vec<LedgerState>> {
    let mut states = Vec::with_capacity(n);
    for _ in 0..n {
        states.push(ledger.step()?);
        thread::sleep(BETWEEN_TRANSACTIONS);
    }
    Ok(states)
}

fn end_to_end(major: u32) -> Result<()> {
    let started = Instant::now();
    let pg = PgInstall::of_major(major)?;
    let repo = Repo::new_file()?;
    let name = |what: &str| format!("pg{major}-{what}");
    let mut source = archiving_cluster_on(pg, &name("source"), &repo, "")?;
    // Exact commit times to compare the time index with; no autovacuum commits after them.
    source.set_conf(&[("track_commit_timestamp", "on"), ("autovacuum", "off")])?;
    source.stop()?;
    source.start()?;
    let version: u32 = source.query_one_string("SHOW server_version_num")?.parse()?;
    assert_eq!(
        version / 10000,
        major,
        "the server runs PostgreSQL {version}, not {major}"
    );
    let daemon = Daemon::start(&source, &repo, &[])?;

    workload::create_ledger(&source)?;
    workload::create_payload_table(&source)?;
    let base = take_backup(&source, &repo).with_context(|| format!("backup on PostgreSQL {major}"))?;
    // Several segments of WAL after the backup, for the replay (and the prefetcher) to work on.
    source.pgbench(&["-i", "-s", "5", "-q"])?;

    let mut ledger = Ledger::connect(&source)?;
    let early = ledger_steps(&mut ledger, 20)?;
    let rp_before = ledger.state()?;
    source.execute(&format!("SELECT pg_create_restore_point('{RESTORE_POINT}')"))?;
    let rp_after = ledger.state()?;
    source.pgbench(&["-c", "2", "-j", "2", "-t", "300"])?;
    workload::insert_payload(&source, 1, 3000)?;
    let late = ledger_steps(&mut ledger, 20)?;
    drop(ledger);
    let last_commit = source.query_one_string(
        "SELECT (extract(epoch FROM timestamp) * 1000000)::bigint::text FROM pg_last_committed_xact()",
    )?;
    let last_commit: i64 = last_commit.parse()?;
    let expected = workload::fingerprints(&source)?;
    let final_ledger = workload::ledger_contents(&source)?;
    let last_segment = archive_everything(&source)?;

    // The daemon uploaded alongside the archiver: its markers name objects in the repository.
    host_wait_markers(&source, &repo)?;
    let ended = daemon.stop()?;
    ensure!(
        ended.code() == Some(0),
        "the daemon did not stop cleanly:\n{}",
        ended.log
    );

    // The time index agrees with what the server did.
    let info = backup::info(&repo)?;
    let tl1 = info["timelines"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["timeline"] == 1))
        .context("timeline 1 in info")?
        .clone();
    // The source parses the times info prints.
    let probe = &source;
    let latest = probe.unix_micros(
        tl1["restorable"]["latest_before"]
            .as_str()
            .context("latest_before")?,
    )?;
    assert_eq!(
        latest, last_commit,
        "PostgreSQL {major}: the restorable window should end at the last commit archived\n{tl1:#}"
    );
    let earliest = probe.unix_micros(tl1["restorable"]["earliest"].as_str().context("earliest")?)?;
    assert_eq!(
        earliest,
        probe.unix_micros(&base.stop_time)?,
        "PostgreSQL {major}: the window starts when the backup became consistent\n{tl1:#}"
    );
    ensure!(
        earliest < early[0].unix_micros,
        "the backup ended before the ledger steps"
    );
    let points = tl1["restore_points"].as_array().context("restore_points")?;
    let rp = points
        .iter()
        .find(|p| p["name"] == RESTORE_POINT)
        .with_context(|| format!("PostgreSQL {major}: restore point {RESTORE_POINT} not in info: {tl1:#}"))?;
    let rp_time = probe.unix_micros(rp["time"].as_str().context("restore point time")?)?;
    assert!(
        (rp_before.unix_micros..=rp_after.unix_micros).contains(&rp_time),
        "PostgreSQL {major}: restore point at {rp_time}, created between {} and {}",
        rp_before.unix_micros,
        rp_after.unix_micros
    );
    let rp_lsn = walvault_testkit::workload::parse_lsn(rp["lsn"].as_str().context("restore point lsn")?)?;
    assert!(
        (rp_before.lsn..=rp_after.lsn).contains(&rp_lsn),
        "PostgreSQL {major}: restore point at {}, created between {} and {}",
        format_lsn(rp_lsn),
        format_lsn(rp_before.lsn),
        format_lsn(rp_after.lsn)
    );
    source.stop()?;
    drop(source);
    let index_checked = started.elapsed();

    // All of it replayed through restore-agent fetch, with the prefetcher.
    let (replayed, report) =
        backup::restore_and_recover(&repo, &name("replayed"), Restore::default().on(pg))?;
    ensure!(
        report.contains(&format!("start PostgreSQL {major} to complete the recovery")),
        "restore should name the server version that must recover it:\n{report}"
    );
    assert_eq!(
        workload::fingerprints(&replayed)?,
        expected,
        "PostgreSQL {major}: replayed data differs from the source"
    );
    assert_eq!(workload::ledger_contents(&replayed)?, final_ledger);
    if major >= 17 {
        // The WAL summarizer's directory, kept empty in the backup as basebackup.c keeps it.
        ensure!(
            replayed.data_dir().join("pg_wal/summaries").is_dir(),
            "PostgreSQL {major}: the restored pg_wal has no summaries directory"
        );
    }
    let log = replayed.log();
    let prefetched = log
        .lines()
        .filter(|l| l.contains(": restored,") && l.contains("prefetched"))
        .count();
    let restored = log.lines().filter(|l| l.contains(": restored,")).count();
    eprintln!(
        "PostgreSQL {major}: replay fetched {restored} files through {last_segment}, {prefetched} of them prefetched"
    );
    drop(replayed);

    // Points in time: a recorded instant, and the restore point by name.
    let target = &early[10];
    let (at_time, _) = backup::restore_and_recover(
        &repo,
        &name("at-time"),
        Restore::with(&["--target-time", &target.time]).on(pg),
    )?;
    assert_eq!(
        workload::ledger_contents(&at_time)?,
        target.contents,
        "PostgreSQL {major}: --target-time {}",
        target.time
    );
    drop(at_time);
    // By name, pausing there: while recovery waits, the prefetcher has the archived WAL after
    // the restore point downloaded, verified and spooled (it is not racing replay then).
    let (mut at_name, _) = backup::restore_new_cluster(
        &repo,
        &name("at-name"),
        Restore::with(&["--target-name", RESTORE_POINT, "--target-action", "pause"]).on(pg),
    )?;
    at_name.start()?;
    let spool = daemon::spool_dir(&at_name.data_dir()).join("prefetch");
    host::wait_for(
        "recovery to pause at the restore point with WAL prefetched",
        RECOVERY_TIMEOUT,
        Duration::from_millis(200),
        || {
            let paused = at_name.query_one_string("SELECT pg_is_wal_replay_paused()::text")? == "true";
            let spooled: Vec<String> = fs::read_dir(&spool)
                .map(|d| {
                    d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                        .filter(|n| n.len() == 28 && n.ends_with(".wal"))
                        .collect()
                })
                .unwrap_or_default();
            Ok(match paused && !spooled.is_empty() {
                true => Poll::Done(()),
                false => Poll::Waiting(format!("paused {paused}, spooled {spooled:?}")),
            })
        },
    )
    .with_context(|| at_name.log_tail())?;
    assert_eq!(
        workload::ledger_contents(&at_name)?,
        rp_before.contents,
        "PostgreSQL {major}: --target-name {RESTORE_POINT}"
    );
    // Resumed at its target, recovery ends; the prefetcher sees it and removes its spool.
    at_name.execute("SELECT pg_wal_replay_resume()")?;
    host::wait_for(
        "promotion and the prefetch spool removed",
        RECOVERY_TIMEOUT,
        Duration::from_millis(200),
        || {
            let in_recovery = at_name.query_one_string("SELECT pg_is_in_recovery()::text")? == "true";
            Ok(match in_recovery || spool.exists() {
                false => Poll::Done(()),
                true => Poll::Waiting(format!(
                    "in recovery {in_recovery}, spool there {}",
                    spool.exists()
                )),
            })
        },
    )
    .with_context(|| at_name.log_tail())?;
    drop(at_name);

    // A branch: back to an instant among the late transactions, promoted to timeline 2 and
    // archiving there; then a restore to an instant on timeline 2.
    let branch_at = &late[5];
    let (mut branch, _) = backup::restore_and_recover(
        &repo,
        &name("branch"),
        Restore::with(&["--target-time", &branch_at.time])
            .on(pg)
            .archiving(),
    )?;
    assert_eq!(workload::ledger_contents(&branch)?, branch_at.contents);
    assert_eq!(
        branch.timeline()?,
        2,
        "PostgreSQL {major}: the branch is timeline 2"
    );
    let mut ledger = Ledger::connect(&branch)?;
    let on_branch = ledger_steps(&mut ledger, 15)?;
    drop(ledger);
    archive_everything(&branch)?;
    branch.stop()?;
    drop(branch);
    let target = &on_branch[8];
    let (followed, report) = backup::restore_and_recover(
        &repo,
        &name("followed"),
        Restore::with(&["--target-time", &target.time, "--target-timeline", "latest"]).on(pg),
    )?;
    assert_eq!(
        workload::ledger_contents(&followed)?,
        target.contents,
        "PostgreSQL {major}: --target-timeline latest to {} on timeline 2\n{report}",
        target.time
    );
    assert_eq!(followed.timeline()?, 3, "promoted from timeline 2");
    eprintln!(
        "PostgreSQL {major}: archive, backup and time index {:.1}s; all checks {:.1}s",
        index_checked.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Wait until the daemon has left at least one spool marker, and check every marker names an
/// object in the repository.
fn host_wait_markers(cluster: &Cluster, repo: &Repo) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let markers = daemon::archived_markers(&cluster.data_dir())?;
        if !markers.is_empty() {
            for m in &markers {
                ensure!(
                    repo.has_object(m),
                    "daemon marker {m} but no object in the repository"
                );
            }
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "the daemon archived nothing in 60 s");
        thread::sleep(Duration::from_millis(200));
    }
}
