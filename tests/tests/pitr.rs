//! Point-in-time recovery as a DBA uses it: a live table changed by many small transactions, the
//! state after each commit recorded, online base backups taken while it changes; then
//! `restore-agent restore --target-time <a recorded instant>` must bring back exactly the state
//! recorded at that instant, on the timeline asked for.

use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use walvault_testkit::Repo;
use walvault_testkit::backup::{
    self, BackupSummary, Restore, assert_restores_to, next_backup_second, take_backup,
};
use walvault_testkit::fixtures::{BETWEEN_TRANSACTIONS, archive_everything, archiving_cluster};
use walvault_testkit::workload::{self, Ledger, LedgerState, parse_lsn};

/// Which backup a restore says it restored.
fn restored_backup(report: &str) -> Option<&str> {
    report.split("restored backup ").nth(1)?.split_whitespace().next()
}

#[test]
fn restores_to_recorded_instants_around_two_online_backups() -> Result<()> {
    let repo = Repo::new()?;
    let source = archiving_cluster("pitr-source", &repo, "")?;
    workload::create_ledger(&source)?;

    // The ledger changes without pause while both backups run, as on a live server.
    let (states, backups) = workload::ledger_while(&source, BETWEEN_TRANSACTIONS, || {
        thread::sleep(Duration::from_millis(500));
        let first = take_backup(&source, &repo)?;
        let first_done = source.clock_micros()?;
        next_backup_second();
        thread::sleep(Duration::from_millis(400));
        let second_begun = source.clock_micros()?;
        let second = take_backup(&source, &repo)?;
        thread::sleep(Duration::from_millis(1500));
        Ok((first, first_done, second_begun, second))
    })?;
    let (first, first_done, second_begun, second): (BackupSummary, i64, i64, BackupSummary) = backups;
    archive_everything(&source)?;
    eprintln!(
        "{} ledger transactions; backups {} (stop {}, {}) and {} (stop {}, {})",
        states.len(),
        first.id,
        first.stop_time,
        first.stop_lsn,
        second.id,
        second.stop_time,
        second.stop_lsn
    );

    // Between the backups: only the first one can serve it.
    let between: Vec<&LedgerState> = states
        .iter()
        .filter(|s| s.unix_micros > first_done && s.unix_micros < second_begun)
        .collect();
    ensure!(!between.is_empty(), "no transaction between the two backups");
    let (restored, report) = assert_restores_to(
        &repo,
        "pitr-between",
        between[between.len() / 2],
        Restore::default(),
    )?;
    assert_eq!(
        restored_backup(&report),
        Some(first.id.as_str()),
        "a target between the backups must be served by the first:\n{report}"
    );
    drop(restored);

    // The first state at or after the second backup's stop time as the agents report it: the
    // edge of the second backup's window, with transactions committing while it ended.
    let second_stop = source.unix_micros(&second.stop_time)?;
    let second_stop_lsn = parse_lsn(&second.stop_lsn)?;
    let edge = states
        .iter()
        .find(|s| s.unix_micros >= second_stop)
        .context("no transaction after the second backup")?;
    eprintln!(
        "edge state {} (LSN {:X}); second backup stopped at LSN {:X}",
        edge.time, edge.lsn, second_stop_lsn
    );
    drop(assert_restores_to(&repo, "pitr-edge", edge, Restore::default())?);

    // Near the end, in the last archived segment, with a few transactions after it.
    let late = &states[states.len() - 4];
    let (_restored, report) = assert_restores_to(&repo, "pitr-late", late, Restore::default())?;
    assert_eq!(
        restored_backup(&report),
        Some(second.id.as_str()),
        "a late target must be served by the newest backup:\n{report}"
    );
    Ok(())
}

#[test]
fn restores_follow_the_timeline_asked_for() -> Result<()> {
    let repo = Repo::new()?;
    let mut source = archiving_cluster("tli-source", &repo, "")?;
    workload::create_ledger(&source)?;
    let base = take_backup(&source, &repo)?;
    let mut ledger = Ledger::connect(&source)?;
    let mut on_first = Vec::new();
    for _ in 0..60 {
        on_first.push(ledger.step()?);
        thread::sleep(BETWEEN_TRANSACTIONS);
    }
    drop(ledger);
    archive_everything(&source)?;
    source.stop()?;
    let (before_branch, branch_point, first_only) = (&on_first[15], &on_first[35], &on_first[55]);
    ensure!(
        before_branch.contents != branch_point.contents && branch_point.contents != first_only.contents,
        "the workload should change the ledger between the chosen states"
    );

    // Recover to the branch point and write on: PostgreSQL promotes to timeline 2, archived
    // into the same repository (history file and WAL) from the start.
    let (mut branch, _) =
        assert_restores_to(&repo, "tli-branch", branch_point, Restore::default().archiving())?;
    assert_eq!(branch.timeline()?, 2, "recovery to a target must open timeline 2");
    let mut ledger = Ledger::connect(&branch)?;
    let mut on_second = Vec::new();
    for _ in 0..30 {
        on_second.push(ledger.step()?);
        thread::sleep(BETWEEN_TRANSACTIONS);
    }
    drop(ledger);
    archive_everything(&branch)?;
    branch.stop()?;
    assert!(
        repo.has_object("00000002.history"),
        "timeline 2's history file was not archived: {:?}",
        repo.archived_names()?
    );

    let info = backup::info(&repo)?;
    let timelines = info["timelines"].as_array().context("info has timelines")?;
    let second = timelines
        .iter()
        .find(|t| t["timeline"] == 2)
        .with_context(|| format!("info shows no timeline 2: {info:#}"))?;
    assert_eq!(
        second["parent"], 1,
        "timeline 2 branches off timeline 1: {second}"
    );
    assert!(
        second["wal"].as_array().is_some_and(|w| !w.is_empty()),
        "timeline 2 has archived WAL: {second}"
    );
    let mut list = vec!["list".to_string()];
    list.extend(repo.args());
    let listed = walvault_testkit::agents()
        .run(walvault_testkit::agents::RESTORE_AGENT, list)
        .check()?;
    assert!(
        listed.stdout.contains(&base.id),
        "list shows the backup:\n{listed}"
    );

    // Latest timeline, after the branch's writes: timeline 2's data.
    let late_on_second = &on_second[on_second.len() - 5];
    drop(assert_restores_to(
        &repo,
        "tli-latest",
        late_on_second,
        Restore::with(&["--target-timeline", "latest"]),
    )?);
    // Before the branch point: the history both timelines share.
    drop(assert_restores_to(
        &repo,
        "tli-before-branch",
        before_branch,
        Restore::default(),
    )?);
    // Timeline 1 explicitly, after the branch point: what only timeline 1 holds.
    drop(assert_restores_to(
        &repo,
        "tli-first",
        first_only,
        Restore::with(&["--target-timeline", "1"]),
    )?);
    Ok(())
}
