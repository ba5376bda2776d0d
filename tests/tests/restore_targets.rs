//! Restores of a backup with a tablespace, and recovery targets other than a time: each restore
//! must bring back exactly the state recorded at its target.
//!
//! - A tablespace goes only where the DBA says (`--tablespace-map-all`, `--tablespace-map`), never
//!   over the source's own location nor into a directory that holds something.
//! - `--target-xid`, `--target-lsn`, `--target-name`, `--target immediate` and
//!   `--target-action pause` against a ledger whose state was recorded after every commit.

use std::fs;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use walvault_testkit::backup::{self, BackupSummary, Restore, restore_new_cluster, take_backup};
use walvault_testkit::fixtures::{
    BETWEEN_TRANSACTIONS, RECOVERY_TIMEOUT, archive_everything, archiving_cluster,
};
use walvault_testkit::host::{ScratchDir, snapshot, write_for_pg};
use walvault_testkit::workload::{
    self, Ledger, LedgerCommit, LedgerContents, TableFingerprint, format_lsn, parse_lsn,
};
use walvault_testkit::{Cluster, Repo};

// ---------------------------------------------------------------------------------------------
// Tablespaces

/// The tables the tablespace test compares, with their row order.
const TS_TABLES: &[(&str, &str)] = &[("in_ts1", "id"), ("in_default", "id")];

fn ts_fingerprints(cluster: &Cluster) -> Result<Vec<TableFingerprint>> {
    workload::fingerprints_of(cluster, TS_TABLES)
}

#[test]
fn tablespaces_are_restored_only_where_the_dba_says() -> Result<()> {
    let repo = Repo::new()?;
    let mut source = archiving_cluster("ts-source", &repo, "")?;
    let original_parent = ScratchDir::new("ts-original")?;
    let original = original_parent.subdir("ts1")?;
    source.execute(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}'",
        original.display()
    ))?;
    // A table and its index in the tablespace, another table in the default one.
    source.execute(
        "CREATE TABLE in_ts1 (id integer PRIMARY KEY USING INDEX TABLESPACE ts1, body text NOT NULL)
             TABLESPACE ts1;
         CREATE TABLE in_default (id integer PRIMARY KEY, body text NOT NULL);
         INSERT INTO in_ts1 SELECT g, md5(g::text) FROM generate_series(1, 5000) g;
         INSERT INTO in_default SELECT g, md5((-g)::text) FROM generate_series(1, 5000) g",
    )?;
    let oid = source.query_one_string("SELECT oid::text FROM pg_tablespace WHERE spcname = 'ts1'")?;
    let backup = take_backup(&source, &repo)?;
    // After the backup: only the archived WAL holds these.
    source.execute(
        "INSERT INTO in_ts1 SELECT g, md5(g::text) FROM generate_series(5001, 7000) g;
         UPDATE in_ts1 SET body = md5(body) WHERE id % 10 = 0;
         DELETE FROM in_ts1 WHERE id % 13 = 0;
         INSERT INTO in_default SELECT g, md5((-g)::text) FROM generate_series(5001, 6000) g;
         DELETE FROM in_default WHERE id % 7 = 0",
    )?;
    archive_everything(&source)?;
    let expected = ts_fingerprints(&source)?;
    source.stop()?;
    let original_before = snapshot(&original)?.context("the tablespace directory exists")?;
    assert!(
        original_before.keys().any(|k| k.starts_with("PG_15_")),
        "the source's tablespace holds its version directory: {original_before:?}"
    );

    // (a) No placement chosen: refused, nothing written.
    let scratch = ScratchDir::new("ts-refused")?;
    let pgdata = scratch.path().join("data");
    let run = backup::restore(&repo, &pgdata, &[])?;
    run.assert_failed_naming(&[
        "has tablespaces",
        &oid,
        "--tablespace-map",
        "--tablespace-map-all",
        "--tablespace-original",
    ]);
    assert!(
        !pgdata.exists(),
        "a refused restore must not create {}",
        pgdata.display()
    );

    // (c) A location that already holds something: refused, even with --force, and left alone.
    let occupied = scratch.subdir("occupied")?;
    write_for_pg(&occupied.join("keep-me.txt"), b"the DBA's notes")?;
    let occupied_before = snapshot(&occupied)?;
    for extra in [&[][..], &["--force"][..]] {
        let mut args = vec![
            "--tablespace-map".to_string(),
            format!("{oid}={}", occupied.display()),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = backup::restore(&repo, &pgdata, &args)?;
        run.assert_failed_naming(&["not empty", &occupied.display().to_string()]);
        assert_eq!(
            snapshot(&occupied)?,
            occupied_before,
            "{args:?}: the occupied location changed"
        );
        assert!(
            !pgdata.exists(),
            "{args:?}: a refused restore must not create {}",
            pgdata.display()
        );
    }
    // A location inside the new data directory: refused too.
    let inside = pgdata.join("ts");
    let run = backup::restore(
        &repo,
        &pgdata,
        &["--tablespace-map", &format!("{oid}={}", inside.display())],
    )?;
    run.assert_failed_naming(&["overlaps"]);
    assert!(
        !pgdata.exists(),
        "a refused restore must not create {}",
        pgdata.display()
    );

    // (b) Every tablespace under a fresh directory: the data comes back, the tablespace lives
    // there, and the source's own location is never touched.
    let chosen_parent = ScratchDir::new("ts-chosen")?;
    let chosen = chosen_parent.subdir("spaces")?;
    let chosen_str = chosen.to_str().context("UTF-8 scratch path")?;
    let (mut restored, run) = restore_new_cluster(
        &repo,
        "ts-restored",
        Restore::with(&["--tablespace-map-all", chosen_str]),
    )?;
    assert!(
        run.stdout.contains(&backup.id),
        "the only backup is restored:\n{run}"
    );
    restored
        .start_and_wait_recovery_end(RECOVERY_TIMEOUT)
        .context("recovery of the restore with --tablespace-map-all")?;
    assert_eq!(
        ts_fingerprints(&restored)?,
        expected,
        "the restored tables differ from the source's\n{}",
        restored.log_tail()
    );
    let location = chosen.join(&oid);
    let link = restored.data_dir().join("pg_tblspc").join(&oid);
    assert_eq!(
        fs::read_link(&link).with_context(|| format!("{} must be a symbolic link", link.display()))?,
        location,
        "pg_tblspc/{oid} must point into the chosen directory"
    );
    assert_eq!(
        restored.query_one_string(&format!("SELECT pg_tablespace_location({oid})"))?,
        location.display().to_string(),
        "the server must see the tablespace at its new location"
    );
    assert!(
        fs::read_dir(&location)?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("PG_15_")),
        "the tablespace's files must be in {}",
        location.display()
    );
    // Stopped first: a shutdown checkpoint would write to wherever the server keeps it.
    restored.stop()?;
    assert_eq!(
        snapshot(&original)?.as_ref(),
        Some(&original_before),
        "the source's tablespace directory {} changed",
        original.display()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Recovery targets other than a time

/// A repository holding one backup and the archived WAL of a ledger workload around and after
/// it, with the state recorded after each commit. Shared by the target tests, which only read it.
struct Recorded {
    repo: Repo,
    backup: BackupSummary,
    /// Commits while the backup ran, from the last one before it began to the first one after it
    /// ended.
    around_backup: Vec<LedgerCommit>,
    /// Commits after the backup, in order.
    after: Vec<LedgerCommit>,
    /// `pg_create_restore_point('rp1')` ran between `after[rp1]` and `after[rp1 + 1]`.
    rp1: usize,
}

fn recorded() -> &'static Recorded {
    static RECORDED: OnceLock<Recorded> = OnceLock::new();
    RECORDED.get_or_init(|| record().unwrap_or_else(|e| panic!("{e:#}")))
}

fn record() -> Result<Recorded> {
    let repo = Repo::new()?;
    let mut source = archiving_cluster("targets-source", &repo, "")?;
    workload::create_ledger(&source)?;
    let mut ledger = Ledger::connect(&source)?;
    for _ in 0..5 {
        ledger.commit()?;
    }

    // The ledger changes without pause while the backup runs, so the point where it becomes
    // consistent falls between commits.
    let stop = AtomicBool::new(false);
    let (mut during, began, backup, ended) = thread::scope(|s| -> Result<_> {
        let writer = s.spawn(|| -> Result<Vec<LedgerCommit>> {
            let mut commits = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                commits.push(ledger.commit()?);
                thread::sleep(BETWEEN_TRANSACTIONS);
            }
            Ok(commits)
        });
        let backup = (|| -> Result<_> {
            thread::sleep(Duration::from_millis(200));
            let began = source.clock_micros()?;
            let backup = take_backup(&source, &repo)?;
            let ended = source.clock_micros()?;
            thread::sleep(Duration::from_millis(200));
            Ok((began, backup, ended))
        })();
        stop.store(true, Ordering::Relaxed);
        let commits = writer
            .join()
            .map_err(|_| anyhow!("the ledger writer panicked"))??;
        let (began, backup, ended) = backup?;
        Ok((commits, began, backup, ended))
    })?;
    let first = during
        .iter()
        .rposition(|c| c.state.unix_micros < began)
        .context("no commit before the backup began")?;
    let last = during
        .iter()
        .position(|c| c.state.unix_micros > ended)
        .context("no commit after the backup ended")?;
    during.truncate(last + 1);
    let around_backup = during.split_off(first);

    // After the backup, one commit at a time; the restore point follows a commit that changed
    // the ledger, and the workload goes on until a later commit changed it again.
    let mut after: Vec<LedgerCommit> = Vec::new();
    let mut rp1: Option<usize> = None;
    let changed_after = |after: &[LedgerCommit], i: usize| {
        after[i + 1..]
            .iter()
            .any(|c| c.state.contents != after[i].state.contents)
    };
    while after.len() < 40 || !rp1.is_some_and(|i| changed_after(&after, i)) {
        ensure!(after.len() < 200, "the ledger stopped changing");
        after.push(ledger.commit()?);
        let n = after.len();
        if rp1.is_none() && n >= 20 && after[n - 1].state.contents != after[n - 2].state.contents {
            source.execute("SELECT pg_create_restore_point('rp1')")?;
            rp1 = Some(n - 1);
        }
        thread::sleep(BETWEEN_TRANSACTIONS);
    }
    drop(ledger);
    archive_everything(&source)?;
    source.stop()?;
    let rp1 = rp1.context("no restore point created")?;
    eprintln!(
        "backup {} (stop {} at {}); {} commits around it, {} after, rp1 after commit {}",
        backup.id,
        backup.stop_time,
        backup.stop_lsn,
        around_backup.len(),
        after.len(),
        rp1
    );
    Ok(Recorded {
        repo,
        backup,
        around_backup,
        after,
        rp1,
    })
}

impl Recorded {
    /// The first commit after the backup, from `from` on, whose state differs from both the
    /// state before it and the one after it: a restore one commit off cannot match it.
    fn distinct_commit(&self, from: usize) -> Result<&LedgerCommit> {
        (from.max(1)..self.after.len() - 1)
            .find(|&i| {
                let c = &self.after[i].state.contents;
                c != &self.after[i - 1].state.contents && c != &self.after[i + 1].state.contents
            })
            .map(|i| &self.after[i])
            .with_context(|| format!("no commit from {from} on changed the ledger twice in a row"))
    }
}

/// Restore with `args` into a new cluster, start it, wait until it has ended recovery, and
/// check the ledger holds `expected`.
fn assert_recovers_to(name: &str, args: &[&str], expected: &LedgerContents) -> Result<Cluster> {
    let r = recorded();
    let (mut cluster, run) = restore_new_cluster(&r.repo, name, Restore::with(args))?;
    cluster
        .start_and_wait_recovery_end(RECOVERY_TIMEOUT)
        .with_context(|| format!("recovery of {name} ({args:?}), restored with:\n{}", run.stdout))?;
    let found = workload::ledger_contents(&cluster)?;
    assert_eq!(
        &found,
        expected,
        "{name}: restored with {args:?}, the ledger differs from the state recorded at the target\n\
         restore said:\n{}\n{}",
        run.stdout,
        cluster.log_tail()
    );
    Ok(cluster)
}

#[test]
fn target_xid_stops_right_after_that_transaction_commits() -> Result<()> {
    let r = recorded();
    let target = r.distinct_commit(5)?;
    let xid = target.xid.to_string();
    assert_recovers_to("target-xid", &["--target-xid", &xid], &target.state.contents)?;
    Ok(())
}

#[test]
fn target_lsn_after_a_commit_stops_with_that_commit() -> Result<()> {
    let r = recorded();
    let target = r.distinct_commit(12)?;
    let lsn = format_lsn(target.state.lsn);
    assert_recovers_to("target-lsn", &["--target-lsn", &lsn], &target.state.contents)?;
    Ok(())
}

#[test]
fn target_name_stops_at_the_restore_point_and_unknown_names_are_refused() -> Result<()> {
    let r = recorded();
    let at_rp1 = &r.after[r.rp1].state.contents;
    ensure!(
        at_rp1 != &r.after.last().context("commits after the backup")?.state.contents,
        "the ledger must change after the restore point"
    );
    assert_recovers_to("target-name", &["--target-name", "rp1"], at_rp1)?;

    let scratch = ScratchDir::new("target-name-nope")?;
    let pgdata = scratch.path().join("data");
    let run = backup::restore(&r.repo, &pgdata, &["--target-name", "nope"])?;
    run.assert_failed_naming(&["nope", "rp1"]);
    assert!(
        !pgdata.exists(),
        "a refused restore must not create {}",
        pgdata.display()
    );
    Ok(())
}

#[test]
fn target_immediate_stops_where_the_backup_became_consistent() -> Result<()> {
    let r = recorded();
    let cluster = assert_recovers_to_any("target-immediate", &["--target", "immediate"])?;
    let found = workload::ledger_contents(&cluster)?;
    let states: Vec<String> = r
        .around_backup
        .iter()
        .map(|c| {
            format!(
                "{} {} rows {}",
                format_lsn(c.state.lsn),
                c.state.contents.rows,
                c.state.contents.md5
            )
        })
        .collect();
    let at = r
        .around_backup
        .iter()
        .position(|c| c.state.contents == found)
        .with_context(|| {
            format!(
                "the ledger ({} rows, md5 {}) is none of the states recorded from just before the \
                 backup began to just after it ended:\n{}\n{}",
                found.rows,
                found.md5,
                states.join("\n"),
                cluster.log_tail()
            )
        })?;
    // The backup's stop LSN ends its backup-end record, where recovery becomes consistent: every
    // commit recorded before it is in, no commit begun after the next one was recorded is.
    let stop = parse_lsn(&r.backup.stop_lsn)?;
    let last_before = r
        .around_backup
        .iter()
        .rposition(|c| c.state.lsn <= stop)
        .context("no commit recorded before the backup's stop LSN")?;
    let allowed: Vec<&LedgerContents> = r.around_backup[last_before..]
        .iter()
        .take(2)
        .map(|c| &c.state.contents)
        .collect();
    eprintln!(
        "--target immediate: the state after commit {at} of {} around the backup; the last one \
         recorded before its stop LSN {} is {last_before}",
        r.around_backup.len(),
        r.backup.stop_lsn
    );
    assert!(
        allowed.contains(&&found),
        "the ledger equals the state recorded after commit {at} of those around the backup, not \
         the last one before its stop LSN {} (commit {last_before}) or the next:\n{}",
        r.backup.stop_lsn,
        states.join("\n")
    );
    Ok(())
}

/// Like [`assert_recovers_to`], for a target whose state is checked by the caller.
fn assert_recovers_to_any(name: &str, args: &[&str]) -> Result<Cluster> {
    let (mut cluster, run) = restore_new_cluster(&recorded().repo, name, Restore::with(args))?;
    cluster
        .start_and_wait_recovery_end(RECOVERY_TIMEOUT)
        .with_context(|| format!("recovery of {name} ({args:?}), restored with:\n{}", run.stdout))?;
    Ok(cluster)
}

#[test]
fn target_action_pause_holds_the_server_in_recovery_at_the_target() -> Result<()> {
    let r = recorded();
    let target = r.distinct_commit(25)?;
    let (mut cluster, run) = restore_new_cluster(
        &r.repo,
        "target-pause",
        Restore::with(&["--target-time", &target.state.time, "--target-action", "pause"]),
    )?;
    // Hot standby: the server answers once consistent, then replays on to the target.
    cluster.start()?;
    cluster
        .wait_replay_paused(RECOVERY_TIMEOUT)
        .with_context(|| format!("restored with:\n{}\n{}", run.stdout, cluster.log_tail()))?;
    assert_eq!(
        cluster.query_one_string("SELECT pg_is_in_recovery()::text")?,
        "true",
        "paused at the target, the server must still be in recovery"
    );
    assert_eq!(
        workload::ledger_contents(&cluster)?,
        target.state.contents,
        "paused at {}, the ledger differs from the state recorded then\n{}",
        target.state.time,
        cluster.log_tail()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The backup's own recovery settings

/// A backup whose `postgresql.auto.conf` carries a previous life's recovery settings (as a cluster
/// that was itself restored to a target, or ran as a delayed standby, has): a target that never
/// comes, `shutdown` at it, an hour's apply delay, a primary to stream from, another archive's
/// `restore_command`. Restored with no target, it must replay the whole archive with walvault's
/// `restore_command`, and with a target, stop exactly there.
#[test]
fn a_backups_own_recovery_settings_never_steer_the_restore() -> Result<()> {
    let repo = Repo::new()?;
    let source = archiving_cluster("owned-source", &repo, "")?;
    for setting in [
        "recovery_target_name = 'never-created'",
        "recovery_target_action = 'shutdown'",
        "recovery_min_apply_delay = '1h'",
        "primary_conninfo = 'host=192.0.2.1 connect_timeout=1'",
        "primary_slot_name = 'gone'",
        "restore_command = 'cp /nonexistent/%f %p'",
        "recovery_end_command = 'false'",
    ] {
        // One statement each: ALTER SYSTEM refuses to run in a transaction block.
        source.execute(&format!("ALTER SYSTEM SET {setting}"))?;
    }
    workload::create_payload_table(&source)?;
    workload::insert_payload(&source, 1, 2000)?;
    take_backup(&source, &repo)?;
    workload::insert_payload(&source, 2001, 4000)?;
    source.execute("SELECT pg_create_restore_point('owned-rp')")?;
    let at_rp = payload(&source)?;
    workload::insert_payload(&source, 4001, 6000)?;
    let at_end = payload(&source)?;
    archive_everything(&source)?;

    let (end, restored) = backup::restore_and_recover(&repo, "owned-end", Restore::default())?;
    ensure!(
        payload(&end)? == at_end,
        "restored with no target, the data must be the source's last state\n{restored}"
    );
    for (setting, expected) in [
        ("primary_conninfo", ""),
        ("primary_slot_name", ""),
        ("recovery_min_apply_delay", "0"),
        ("recovery_target_name", ""),
        ("recovery_end_command", ""),
    ] {
        let value = end.query_one_string(&format!("SHOW {setting}"))?;
        ensure!(value == expected, "{setting} is {value:?} after the restore");
    }
    let conf = fs::read_to_string(end.data_dir().join("postgresql.auto.conf"))?;
    ensure!(
        conf.contains(
            "# replaced by walvault restore: primary_conninfo = 'host=192.0.2.1 connect_timeout=1'"
        ),
        "the backup's own line must be visible, commented out:\n{conf}"
    );

    let (rp, _) =
        backup::restore_and_recover(&repo, "owned-rp", Restore::with(&["--target-name", "owned-rp"]))?;
    ensure!(
        payload(&rp)? == at_rp,
        "restored to owned-rp, the data must be the state at the restore point"
    );
    Ok(())
}

fn payload(cluster: &Cluster) -> Result<TableFingerprint> {
    workload::table_fingerprint(cluster, "payload", "id")
}
