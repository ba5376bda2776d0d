//! Retention as a DBA relies on it: backups on two timelines, `archive-agent expire` with a
//! policy, then every instant the policy promises restores exactly and one outside it is refused;
//! pinned and newest backups survive; `restore-agent verify` passes, then names the object when
//! a chunk, a WAL segment or a history file is removed or corrupted. And the race every
//! content-addressed store must win: a backup and an expire started together, many times, every
//! backup restorable afterwards.

use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use walvault_testkit::agents::{ARCHIVE_AGENT, RESTORE_AGENT, agents};
use walvault_testkit::backup::{
    self, BackupSummary, Restore, assert_restores_to, next_backup_second, take_backup,
};
use walvault_testkit::fixtures::{BETWEEN_TRANSACTIONS, archive_everything, archiving_cluster};
use walvault_testkit::host::{Finished, write_for_pg};
use walvault_testkit::workload::{self, Ledger, LedgerState};
use walvault_testkit::{Cluster, Repo};

fn archive_agent(repo: &Repo, args: &[&str]) -> Finished {
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    all.extend(repo.args());
    agents().run(ARCHIVE_AGENT, all)
}

fn verify(repo: &Repo, extra: &[&str]) -> Finished {
    let mut all = vec!["verify".to_string()];
    all.extend(repo.args());
    all.extend(extra.iter().map(|a| a.to_string()));
    agents().run(RESTORE_AGENT, all)
}

fn steps(cluster: &Cluster, n: usize) -> Result<Vec<LedgerState>> {
    let mut ledger = Ledger::connect(cluster)?;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(ledger.step()?);
        thread::sleep(BETWEEN_TRANSACTIONS);
    }
    Ok(out)
}

/// A restore to `state` on `timeline` must be refused, writing nothing.
fn assert_refused(repo: &Repo, name: &str, state: &LedgerState, timeline: &str) -> Result<()> {
    let target = Cluster::uninitialized(name)?;
    let args = [
        "--target-time",
        state.time.as_str(),
        "--target-timeline",
        timeline,
    ];
    let run = backup::restore(repo, &target.data_dir(), &args)?;
    if run.code() != Some(1) {
        let info = backup::info(repo).map(|i| i.to_string()).unwrap_or_default();
        panic!(
            "{name}: a restore to {} outside the window must fail\n{}\n{}\narchived: {:?}\ninfo: {info}",
            state.time,
            run.stdout,
            run.stderr,
            repo.archived_names()
        );
    }
    assert!(
        run.stderr.contains("no backup can reach"),
        "{name}: the refusal says why: {}",
        run.stderr
    );
    Ok(())
}

#[test]
fn expire_keeps_exactly_what_the_policy_promises_across_a_timeline_branch() -> Result<()> {
    let repo = Repo::new()?;
    let mut source = archiving_cluster("ret-source", &repo, "")?;
    workload::create_ledger(&source)?;
    let at_b1 = workload::ledger_contents(&source)?;
    let b1 = take_backup(&source, &repo)?;
    let a = steps(&source, 40)?;
    next_backup_second();
    let b2 = take_backup(&source, &repo)?;
    let b = steps(&source, 40)?;
    next_backup_second();
    let b3 = take_backup(&source, &repo)?;
    let c = steps(&source, 40)?;
    archive_everything(&source)?;
    source.stop()?;

    // Branch from a moment between B2 and B3: timeline 2, archived into the same repository.
    let args = ["--target-time", b[20].time.as_str()];
    let (mut branch, _) = backup::restore_and_recover(&repo, "ret-branch", Restore::with(&args).archiving())?;
    assert_eq!(branch.timeline()?, 2);
    let d = steps(&branch, 30)?;
    let chunks_before_b4 = repo.backup_objects()?;
    next_backup_second();
    let b4 = take_backup(&branch, &repo)?;
    let e = steps(&branch, 30)?;
    archive_everything(&branch)?;
    branch.stop()?;
    let b4_chunks: Vec<String> = repo
        .backup_objects()?
        .into_keys()
        .filter(|k| !chunks_before_b4.contains_key(k))
        .collect();
    ensure!(
        !b4_chunks.is_empty(),
        "the backup on timeline 2 stored no chunk of its own"
    );

    archive_agent(&repo, &["pin", &b1.id, "--note", "quarter-end"]).check()?;
    let listed = agents().run(RESTORE_AGENT, [vec!["list".to_string()], repo.args()].concat());
    assert!(
        listed
            .stdout
            .lines()
            .any(|l| l.starts_with(&b1.id) && l.ends_with("pinned")),
        "list shows the pin:\n{}",
        listed.stdout
    );
    let ok = verify(&repo, &[]);
    assert_eq!(
        ok.code(),
        Some(0),
        "verify of an intact repository\n{}{}",
        ok.stdout,
        ok.stderr
    );
    assert!(ok.stdout.contains("0 problems"), "{}", ok.stdout);

    // No policy: refused. A dry run deletes nothing.
    let none = archive_agent(&repo, &["expire"]);
    assert_eq!(none.code(), Some(1));
    assert!(none.stderr.contains("no retention policy"), "{}", none.stderr);
    let before = repo.files()?;
    let dry = archive_agent(&repo, &["expire", "--keep-last", "2", "--dry-run"]).check()?;
    assert!(
        dry.stdout.contains(&format!("expire  {}", b2.id)),
        "{}",
        dry.stdout
    );
    assert_eq!(repo.files()?, before, "a dry run deletes nothing");

    let run = archive_agent(&repo, &["expire", "--keep-last", "2", "--json"]).check()?;
    let report: serde_json::Value = serde_json::from_str(&run.stdout).context("expire --json")?;
    let kept = |id: &str| -> Vec<String> {
        report["kept"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|k| k["id"] == id)
            .flat_map(|k| k["reasons"].as_array().cloned().unwrap_or_default())
            .filter_map(|r| r.as_str().map(str::to_string))
            .collect()
    };
    assert_eq!(kept(&b1.id), vec!["pinned"], "{report:#}");
    assert_eq!(kept(&b3.id), vec!["last"], "{report:#}");
    assert_eq!(
        kept(&b4.id),
        vec!["newest", "latest_timeline", "last"],
        "{report:#}"
    );
    assert_eq!(report["expired"], serde_json::json!([b2.id]), "{report:#}");
    assert!(report["wal"]["objects"].as_u64().unwrap_or(0) > 0, "{report:#}");

    let after = repo.files()?;
    assert!(!after.contains_key(&repo.manifest_key(&b2.id)));
    for survivor in [&b1, &b3, &b4] {
        assert!(
            after.contains_key(&repo.manifest_key(&survivor.id)),
            "{} survives",
            survivor.id
        );
    }
    // The one object expire adds: the policy it applied, which verify reads.
    let record = after
        .get("retention.json")
        .copied()
        .context("expire records its policy")?;
    let freed: u64 = before.values().sum::<u64>() + record - after.values().sum::<u64>();
    let deleted: u64 = ["backups", "wal", "history", "summaries", "chunks"]
        .iter()
        .map(|k| report[*k]["bytes"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        freed, deleted,
        "the repository shrank by what expire says it deleted"
    );

    // Promised: every instant after B3 on timeline 1, after B4 on timeline 2, and B1 to its
    // consistency point.
    assert_restores_to(&repo, "ret-c", &c[20], Restore::with(&["--target-timeline", "1"]))?;
    assert_restores_to(&repo, "ret-e", &e[15], Restore::with(&["--target-timeline", "2"]))?;
    let (pinned, _) = backup::restore_and_recover(
        &repo,
        "ret-b1",
        Restore::with(&["--backup", &b1.id, "--target", "immediate"]),
    )?;
    assert_eq!(
        workload::ledger_contents(&pinned)?,
        at_b1,
        "the pinned backup restores"
    );
    drop(pinned);
    // Not promised any more: between B1 and B2 on timeline 1, and on timeline 2 before B4.
    assert_refused(&repo, "ret-a", &a[20], "1")?;
    assert_refused(&repo, "ret-d", &d[10], "2")?;

    // Expire again: nothing left to do.
    let again = archive_agent(&repo, &["expire", "--keep-last", "2"]).check()?;
    assert!(
        again.stdout.contains("deleted 0 bytes in all"),
        "{}",
        again.stdout
    );
    let ok = verify(&repo, &["--deep"]);
    assert_eq!(
        ok.code(),
        Some(0),
        "verify after expire\n{}{}",
        ok.stdout,
        ok.stderr
    );

    // Damage, each in its own copy: verify names the object and what depends on it.
    let damaged = |what: &str, flags: &[&str], damage: &dyn Fn(&Repo) -> Result<String>| -> Result<()> {
        let copy = repo.copy()?;
        let key = damage(&copy)?;
        let run = verify(&copy, flags);
        assert_eq!(
            run.code(),
            Some(1),
            "{what}: verify must fail\n{}{}",
            run.stdout,
            run.stderr
        );
        assert!(
            run.stdout
                .lines()
                .any(|l| l.starts_with("ERROR") && l.contains(&key)),
            "{what}: verify names {key}:\n{}",
            run.stdout
        );
        Ok(())
    };
    damaged("chunk removed", &[], &|r| {
        r.delete(&b4_chunks[0])?;
        Ok(b4_chunks[0].clone())
    })?;
    damaged("chunk corrupted", &["--deep"], &|r| {
        r.flip_middle_byte(&b4_chunks[0])?;
        Ok(b4_chunks[0].clone())
    })?;
    damaged("WAL segment removed", &[], &|r| {
        let key = r.object_key(&b4.stop_wal);
        r.delete(&key)?;
        Ok(key)
    })?;
    damaged("WAL segment corrupted", &["--deep"], &|r| {
        let key = r.object_key(&b4.stop_wal);
        r.flip_middle_byte(&key)?;
        Ok(key)
    })?;
    damaged("history file corrupted", &[], &|r| {
        let key = r.object_key("00000002.history");
        r.flip_middle_byte(&key)?;
        Ok(key)
    })?;
    damaged("history file removed", &[], &|r| {
        r.delete(&r.object_key("00000002.history"))?;
        Ok(r.object_key("00000002.history"))
    })?;

    // Unpinned, B1 goes with the next expire.
    archive_agent(&repo, &["unpin", &b1.id]).check()?;
    let run = archive_agent(&repo, &["expire", "--keep-last", "2"]).check()?;
    assert!(
        run.stdout.contains(&format!("expire  {}", b1.id)),
        "{}",
        run.stdout
    );
    assert!(!repo.has(&repo.manifest_key(&b1.id)));
    Ok(())
}

/// Alternate the content of a file in the data directory, so that each backup reuses the chunks
/// of the one before last, which the expire running beside it deletes.
fn write_payload(cluster: &Cluster, which: u8) -> Result<()> {
    let mut bytes = vec![0u8; 3 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(which);
    for b in bytes.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    write_for_pg(&cluster.data_dir().join("walvault_race_payload"), &bytes)
}

#[test]
fn a_backup_and_an_expire_started_together_never_lose_a_chunk() -> Result<()> {
    let repo = Repo::new()?;
    let source = archiving_cluster("race-source", &repo, "")?;
    workload::create_ledger(&source)?;
    write_payload(&source, 0)?;
    take_backup(&source, &repo)?;
    let mut last: Option<BackupSummary> = None;
    let mut deferred = 0;
    for round in 1..=8u8 {
        write_payload(&source, round % 2)?;
        steps(&source, 3)?;
        next_backup_second();
        let (taken, expired) = thread::scope(|s| {
            let backup = s.spawn(|| take_backup(&source, &repo));
            // Started a little later each round, so that across the rounds the expire meets
            // the backup before it starts, while it looks chunks up, and as it finishes.
            let expire = s.spawn(|| {
                thread::sleep(Duration::from_millis(150) * u32::from(round - 1));
                archive_agent(&repo, &["expire", "--keep-last", "1"])
            });
            (backup.join(), expire.join())
        });
        let taken = taken.expect("backup thread")?;
        let expired = expired.expect("expire thread").check()?;
        if expired.stdout.contains("left for the next expire") {
            deferred += 1;
        }
        let v = verify(&repo, &[]);
        assert_eq!(
            v.code(),
            Some(0),
            "round {round}: after a backup and an expire ran together, verify fails\n{}\nexpire said:\n{}",
            v.stdout,
            expired.stdout
        );
        last = Some(taken);
    }
    eprintln!("chunk collection deferred in {deferred} of 8 rounds");
    archive_everything(&source)?;
    let last = last.context("a backup")?;
    // The newest backup restores, payload included.
    let (restored, _) = backup::restore_and_recover(
        &repo,
        "race-restored",
        Restore::with(&["--backup", &last.id, "--target", "immediate"]),
    )?;
    let payload = std::fs::read(restored.data_dir().join("walvault_race_payload"))?;
    assert_eq!(
        payload,
        std::fs::read(source.data_dir().join("walvault_race_payload"))?
    );
    let ok = verify(&repo, &["--deep"]);
    assert_eq!(ok.code(), Some(0), "{}", ok.stdout);
    Ok(())
}

fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[test]
fn keep_within_and_calendar_rules_from_the_command_line() -> Result<()> {
    let repo = Repo::new()?;
    let source = archiving_cluster("ret-rules", &repo, "")?;
    workload::create_ledger(&source)?;
    let b1 = take_backup(&source, &repo)?;
    steps(&source, 20)?;
    next_backup_second();
    let b2 = take_backup(&source, &repo)?;
    let between = steps(&source, 60)?;
    next_backup_second();
    let b3 = take_backup(&source, &repo)?;
    steps(&source, 20)?;
    archive_everything(&source)?;

    // keep_within reaching back to halfway between B2 and B3: B3 is inside, and B2, the newest
    // before the window's start, is kept too so that the instants between them stay restorable.
    let ms = |t: &str| source.unix_micros(t).map(|us| us / 1000);
    let (b2_stop, b3_stop) = (ms(&b2.stop_time)?, ms(&b3.stop_time)?);
    let within = format!("{}ms", unix_ms_now() - (b2_stop + b3_stop) / 2);
    let run = archive_agent(&repo, &["expire", "--keep-within", &within, "--json"]).check()?;
    let report: serde_json::Value = serde_json::from_str(&run.stdout)?;
    assert_eq!(report["expired"], serde_json::json!([b1.id]), "{report:#}");
    assert_eq!(report["window_from"], serde_json::json!(b2.id), "{report:#}");
    let early = between
        .iter()
        .find(|s| s.unix_micros / 1000 < (b2_stop + b3_stop) / 2 && s.unix_micros / 1000 > b2_stop + 100)
        .context("a transaction early between B2 and B3")?;
    assert_restores_to(
        &repo,
        "ret-within",
        early,
        Restore::with(&["--target-timeline", "1"]),
    )?;

    // keep_daily: the newest backup of each day. B2 and B3 share a day unless the test ran
    // across midnight (UTC).
    let same_day = b2.stop_time[..10] == b3.stop_time[..10];
    let run = archive_agent(
        &repo,
        &["expire", "--keep-daily", "7", "--timezone", "UTC", "--json"],
    )
    .check()?;
    let report: serde_json::Value = serde_json::from_str(&run.stdout)?;
    let expect: Vec<&str> = if same_day { vec![&b2.id] } else { vec![] };
    assert_eq!(report["expired"], serde_json::json!(expect), "{report:#}");
    assert!(repo.has(&repo.manifest_key(&b3.id)));
    let ok = verify(&repo, &[]);
    assert_eq!(ok.code(), Some(0), "{}{}", ok.stdout, ok.stderr);
    let bad = archive_agent(
        &repo,
        &["expire", "--keep-daily", "7", "--timezone", "Mars/Olympus"],
    );
    assert_eq!(bad.code(), Some(1));
    assert!(bad.stderr.contains("unknown time zone"), "{}", bad.stderr);

    // Locks of other processes, as they write them. Another expire running: this one steps aside.
    let now_us = unix_ms_now() * 1000;
    let lock = |kind: &str| {
        format!(
            r#"{{"format":"walvault-lock","version":1,"kind":"{kind}","holder":"elsewhere 1","what":"{kind} by the test","created_us":{now_us},"refreshed_us":{now_us}}}"#
        )
    };
    let expire_lock = "locks/expire-0123456789abcdef0123456789abcdef.json";
    repo.write(expire_lock, lock("expire").as_bytes())?;
    let busy = archive_agent(&repo, &["expire", "--keep-last", "1"]);
    assert_eq!(busy.code(), Some(1), "{}", busy.stdout);
    assert!(
        busy.stderr.contains("another expire is running"),
        "{}",
        busy.stderr
    );
    repo.delete(expire_lock)?;
    // A backup in progress: the expired backups go, WAL, summaries and chunks wait. B4 makes B3
    // expire under keep_last 1, with the WAL between them.
    steps(&source, 10)?;
    next_backup_second();
    take_backup(&source, &repo)?;
    let backup_lock = "locks/backup-0123456789abcdef0123456789abcdef.json";
    repo.write(backup_lock, lock("backup").as_bytes())?;
    // The keys, not their number: PostgreSQL's archiver may add a segment meanwhile.
    let wal_and_chunks = |r: &Repo| -> Result<std::collections::BTreeSet<String>> {
        Ok(r.files()?
            .into_keys()
            .filter(|k| k.starts_with("wal/") || k.starts_with("index/") || k.starts_with("chunks/"))
            .collect())
    };
    let before = wal_and_chunks(&repo)?;
    let run = archive_agent(&repo, &["expire", "--keep-last", "1", "--json"]).check()?;
    let report: serde_json::Value = serde_json::from_str(&run.stdout)?;
    assert!(
        report["deferred"]
            .as_str()
            .is_some_and(|d| d.contains("backup by the test")),
        "{report:#}"
    );
    let after = wal_and_chunks(&repo)?;
    let gone: Vec<&String> = before.difference(&after).collect();
    assert!(
        gone.is_empty(),
        "nothing a running backup may need is deleted, yet {gone:?} went"
    );
    assert!(
        !repo.has(&repo.manifest_key(&b2.id)),
        "the expired backup itself goes"
    );
    repo.delete(backup_lock)?;
    let run = archive_agent(&repo, &["expire", "--keep-last", "1", "--json"]).check()?;
    let report: serde_json::Value = serde_json::from_str(&run.stdout)?;
    assert!(report["deferred"].is_null(), "{report:#}");
    assert!(
        !before.is_subset(&wal_and_chunks(&repo)?),
        "the next expire collects what waited"
    );
    let ok = verify(&repo, &[]);
    assert_eq!(ok.code(), Some(0), "{}{}", ok.stdout, ok.stderr);
    Ok(())
}
