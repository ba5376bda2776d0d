//! Faults of the S3 store and of the daemon while a busy primary archives into it, each test on a
//! Garage of its own: the S3 server down for 30 seconds, one of three replicas lost, the daemon
//! killed mid-upload again and again. What a DBA needs afterwards: PostgreSQL's archiver rode it
//! out (it retried, it never died, it never called a segment archived that the store did not
//! hold), no segment is missing, every stored object is intact, and a point-in-time restore from
//! a backup taken before the fault brings back exactly what was committed.

use std::collections::BTreeSet;
use std::fs;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use rand::Rng;
use walvault_testkit::agents::exit;
use walvault_testkit::backup::{
    BackupSummary, Restore, assert_restores_to, restore_and_recover, take_backup,
};
use walvault_testkit::daemon::{self, Daemon};
use walvault_testkit::fixtures::{
    ARCHIVE_TIMEOUT, BETWEEN_TRANSACTIONS, archive_everything, archiving_cluster,
};
use walvault_testkit::garage::Garage;
use walvault_testkit::host::{self, Poll};
use walvault_testkit::object::{KIND_SUMMARY, KIND_WAL_FILE, Sealed};
use walvault_testkit::workload::{self, Ledger, LedgerState, TableFingerprint};
use walvault_testkit::{Cluster, Repo};

/// How the writer loads the cluster besides the ledger: payload rows (WAL volume) and forced
/// segment switches (segments for the archiver).
#[derive(Debug, Clone, Copy)]
struct Shape {
    payload_rows: u32,
    payload_every: Duration,
    switch_every: Duration,
    /// Rows per statement of a second writer that inserts payload rows without pause (0: none).
    bulk_rows: u32,
}

/// What the writer has done so far, shared with the test driving the fault.
#[derive(Debug, Default)]
struct Progress {
    /// The ledger's state after each commit, in commit order.
    states: Mutex<Vec<LedgerState>>,
    /// Set by the driver: the writers stop.
    stop: AtomicBool,
    /// Set by a writer that failed.
    writer_failed: AtomicBool,
}

impl Progress {
    /// How many ledger transactions have committed.
    fn commits(&self) -> usize {
        self.states.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Wait until `more` further ledger transactions have committed: the workload goes on.
    fn wait_commits(&self, more: usize) -> Result<()> {
        let target = self.commits() + more;
        host::wait_for(
            &format!("{more} more ledger commits"),
            Duration::from_secs(60),
            Duration::from_millis(50),
            || {
                let now = self.commits();
                if self.writer_failed.load(Ordering::Relaxed) {
                    bail!("a writer failed (its error follows)");
                }
                Ok(if now >= target {
                    Poll::Done(())
                } else {
                    Poll::Waiting(format!("{now} of {target} commits"))
                })
            },
        )
    }
}

/// Run the ledger (one transaction every [`BETWEEN_TRANSACTIONS`]) with payload inserts and WAL
/// switches as `shape` says, on a thread of its own, while `drive` plays the fault. Returns what
/// `drive` returned and every ledger state recorded. The writer stops when `drive` returns.
fn under_load<T>(
    cluster: &Cluster,
    shape: Shape,
    drive: impl FnOnce(&Progress) -> Result<T>,
) -> Result<(T, Vec<LedgerState>)> {
    let progress = Progress::default();
    thread::scope(|s| {
        let writer = s.spawn(|| {
            let written = (|| -> Result<()> {
                let mut ledger = Ledger::connect(cluster)?;
                let (mut last_payload, mut last_switch) = (Instant::now(), Instant::now());
                // Ids from 1_000_000 on: below them, rows written before the load.
                let mut next_id = 1_000_000;
                while !progress.stop.load(Ordering::Relaxed) {
                    let state = ledger.step()?;
                    progress
                        .states
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(state);
                    if last_payload.elapsed() >= shape.payload_every {
                        workload::insert_payload(cluster, next_id, next_id + shape.payload_rows - 1)?;
                        next_id += shape.payload_rows;
                        last_payload = Instant::now();
                    }
                    if last_switch.elapsed() >= shape.switch_every {
                        cluster.switch_wal()?;
                        last_switch = Instant::now();
                    }
                    thread::sleep(BETWEEN_TRANSACTIONS);
                }
                Ok(())
            })();
            if written.is_err() {
                progress.writer_failed.store(true, Ordering::Relaxed);
            }
            written
        });
        let bulk = s.spawn(|| {
            let written = (|| -> Result<()> {
                // Ids from 100_000_000 on, apart from the first writer's.
                let mut next_id = 100_000_000;
                while shape.bulk_rows > 0 && !progress.stop.load(Ordering::Relaxed) {
                    workload::insert_payload(cluster, next_id, next_id + shape.bulk_rows - 1)?;
                    next_id += shape.bulk_rows;
                }
                Ok(())
            })();
            if written.is_err() {
                progress.writer_failed.store(true, Ordering::Relaxed);
            }
            written
        });
        let driven = drive(&progress);
        progress.stop.store(true, Ordering::Relaxed);
        let written = writer.join().map_err(|_| anyhow!("the writer thread panicked"))?;
        let bulk = bulk
            .join()
            .map_err(|_| anyhow!("the bulk writer thread panicked"))?;
        // A writer's failure first: it explains why the driver gave up waiting for commits.
        written.with_context(|| format!("the writer failed\n{}", cluster.log_tail()))?;
        bulk.with_context(|| format!("the bulk writer failed\n{}", cluster.log_tail()))?;
        driven
    })
    .map(|driven| {
        let states = progress.states.into_inner().unwrap_or_else(|e| e.into_inner());
        (driven, states)
    })
}

/// A started cluster archiving into `repo` with `push_flags`, with the ledger and payload tables
/// and some rows, and a base backup of it taken through `archive-agent backup`.
fn source_with_backup(name: &str, repo: &Repo, push_flags: &str) -> Result<(Cluster, BackupSummary)> {
    let source = archiving_cluster(name, repo, push_flags)?;
    // Keep every segment in pg_wal, to compare the stored copies with at the end.
    source.execute("ALTER SYSTEM SET wal_keep_size = '2GB'")?;
    source.execute("SELECT pg_reload_conf()")?;
    workload::create_ledger(&source)?;
    workload::create_payload_table(&source)?;
    workload::insert_payload(&source, 1, 300)?;
    let backup = take_backup(&source, repo)?;
    Ok((source, backup))
}

/// `pg_stat_archiver`'s (last archived file, failed count).
fn archiver_stats(cluster: &Cluster) -> Result<(String, u64)> {
    let rows = cluster
        .query_rows("SELECT coalesce(last_archived_wal, ''), failed_count::text FROM pg_stat_archiver")?;
    match rows.as_slice() {
        [r] => Ok((
            r[0].clone().unwrap_or_default(),
            r[1].as_deref()
                .unwrap_or_default()
                .parse()
                .context("failed_count")?,
        )),
        _ => bail!("pg_stat_archiver returned {rows:?}"),
    }
}

/// The segment names from `first` to `last` inclusive, from a WAL file name on (a `.backup`
/// file names its segment first).
fn segments_between(first: &str, last: &str) -> Result<Vec<String>> {
    walvault_testkit::fixtures::segment_range(first.get(..24).unwrap_or(first), last)
}

/// Every segment from `first` to `last` is in the repository; returns how many there are.
fn assert_none_missing(repo: &Repo, source: &Cluster, first: &str, last: &str) -> Result<usize> {
    let segments = segments_between(first, last)?;
    let archived: BTreeSet<String> = repo.archived_names()?.into_iter().collect();
    let missing: Vec<&String> = segments.iter().filter(|s| !archived.contains(*s)).collect();
    assert!(
        missing.is_empty(),
        "segments {first}..={last} missing from {}: {missing:?}\n{}",
        repo.url(),
        source.log_tail()
    );
    // And nothing PostgreSQL calls archived is absent.
    for done in source.archive_status("done")? {
        assert!(
            archived.contains(&done),
            "PostgreSQL marked {done} archived, but {} lacks it\n{}",
            repo.url(),
            source.log_tail()
        );
    }
    Ok(segments.len())
}

/// The ledger and payload tables, compared after a restore to the end of the archive.
fn fingerprints(cluster: &Cluster) -> Result<Vec<TableFingerprint>> {
    workload::fingerprints_of(cluster, &[(workload::LEDGER_TABLE, "id"), ("payload", "id")])
}

/// Restore to the end of the archive and check every table holds what `expected` says.
fn assert_restores_everything(repo: &Repo, name: &str, expected: &[TableFingerprint]) -> Result<()> {
    let (restored, report) = restore_and_recover(repo, name, Restore::default())?;
    let found = fingerprints(&restored)?;
    assert_eq!(
        found,
        expected,
        "{name}: restored to the end of the archive, the data differs from the source's\nrestore said:\n{report}\n{}",
        restored.log_tail()
    );
    Ok(())
}

/// Exit codes of failed archive commands, per the server log.
fn archive_command_failures(log: &str) -> Vec<i32> {
    log.lines()
        .filter_map(|l| l.split("archive command failed with exit code ").nth(1))
        .filter_map(|c| c.trim().parse().ok())
        .collect()
}

/// Server log lines saying the archiver died or that an archive command ended it (exit code
/// above 125 or a signal: PostgreSQL then stops the archiver with FATAL).
fn archiver_deaths(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            l.contains("archiver process")
                || l.contains("archive command was terminated")
                || (l.contains("FATAL") && l.contains("archive"))
        })
        .collect()
}

/// Assert the archiver never died and every archive command failure was "retry" (exit 1).
fn assert_archiver_survived(source: &Cluster) {
    let log = source.log();
    let deaths = archiver_deaths(&log);
    assert!(
        deaths.is_empty(),
        "PostgreSQL's archiver must never be stopped by archive_command:\n{}\n{}",
        deaths.join("\n"),
        source.log_tail()
    );
    let codes = archive_command_failures(&log);
    assert!(
        codes.iter().all(|&c| c == exit::NOT_FOUND_OR_RETRY),
        "a push that could not reach the store must exit {} (PostgreSQL retries), saw exit codes {codes:?}\n{}",
        exit::NOT_FOUND_OR_RETRY,
        source.log_tail()
    );
}

/// Every object in `repo` opens and verifies (envelope, CRC, length, blake3) independently of
/// the library; each archived WAL file names itself, lives under its documented key, and holds
/// the bytes of the file of that name in `wal_dir` when that file is still there. Returns the
/// names of the WAL files compared with the cluster's own copy.
fn assert_objects_intact(repo: &Repo, wal_dir: &std::path::Path) -> Result<BTreeSet<String>> {
    let mut compared = BTreeSet::new();
    for key in repo.files()?.keys() {
        if !key.ends_with(".wvo") {
            continue;
        }
        let bytes = repo.read(key)?;
        let sealed =
            Sealed::open(&bytes).map_err(|e| anyhow!("{key} in {} is damaged: {e:#}", repo.url()))?;
        if key.starts_with("wal/") {
            assert_eq!(
                sealed.kind, KIND_WAL_FILE,
                "{key} holds a kind {} object",
                sealed.kind
            );
            assert_eq!(
                repo.object_key(&sealed.name),
                *key,
                "{key} holds an object named {:?}",
                sealed.name
            );
            if let Ok(local) = fs::read(wal_dir.join(&sealed.name)) {
                assert!(
                    local == sealed.content,
                    "{key} does not hold the bytes of {} ({} stored bytes, {} in pg_wal)",
                    sealed.name,
                    sealed.content.len(),
                    local.len()
                );
                compared.insert(sealed.name);
            }
        } else if key.starts_with("index/") {
            assert_eq!(
                sealed.kind, KIND_SUMMARY,
                "{key} holds a kind {} object",
                sealed.kind
            );
            assert!(
                key.ends_with(&format!("/{}.wvo", sealed.name)),
                "{key} holds the summary of {:?}",
                sealed.name
            );
        }
    }
    Ok(compared)
}

/// Stop `source` (then its WAL files no longer change) and check every object of `repo` with
/// [`assert_objects_intact`]: every segment from `first` to `last` (kept in pg_wal by
/// `wal_keep_size`) must have been compared byte for byte. Returns how many were.
fn stop_and_check_objects(mut source: Cluster, repo: &Repo, first: &str, last: &str) -> Result<usize> {
    source.stop()?;
    let compared = assert_objects_intact(repo, &source.wal_dir())?;
    let unchecked: Vec<String> = segments_between(first, last)?
        .into_iter()
        .filter(|s| !compared.contains(s))
        .collect();
    assert!(
        unchecked.is_empty(),
        "these segments could not be compared with pg_wal: {unchecked:?}"
    );
    Ok(compared.len())
}

#[test]
fn fault_s3_server_down_30s_during_archiving() -> Result<()> {
    const OUTAGE: Duration = Duration::from_secs(30);
    let started = Instant::now();
    let mut garage = Garage::start(1)?;
    let repo = Repo::new_s3(&garage)?;
    // Each attempt gives up after 5 s, so PostgreSQL sees failures and retries while S3 is down.
    let (source, backup) = source_with_backup("s3-down", &repo, "--retry-timeout 5s")?;
    let shape = Shape {
        payload_rows: 100,
        payload_every: Duration::from_millis(250),
        switch_every: Duration::from_secs(1),
        bulk_rows: 0,
    };

    let (outage, states) = under_load(&source, shape, |progress| -> Result<_> {
        progress.wait_commits(100)?;
        let (before, _) = archiver_stats(&source)?;
        garage.stop_node(0)?;
        let down_at = Instant::now();
        let first_down = progress.commits();
        // Pushes in flight when the server died fail within their 5 s retry bound; after that,
        // nothing may be reported archived until the server is back.
        thread::sleep(Duration::from_secs(8));
        let (settled, _) = archiver_stats(&source)?;
        thread::sleep(OUTAGE.saturating_sub(down_at.elapsed()));
        let (at_end, failed_while_down) = archiver_stats(&source)?;
        let last_down = progress.commits();
        garage.start_node(0)?;
        // The workload goes on against a store that is back.
        progress.wait_commits(100)?;
        Ok((before, settled, at_end, failed_while_down, first_down..last_down))
    })?;
    let (before, settled, at_end, failed_while_down, down_commits) = outage;
    let last = archive_everything(&source)?;
    let (_, failed) = archiver_stats(&source)?;
    eprintln!(
        "{} ledger commits, {} while S3 was down; last archived before the outage {before}, \
         8 s into it {settled}, at its end {at_end}; {failed_while_down} failed archive attempts \
         while down, {failed} in all; everything archived up to {last}",
        states.len(),
        down_commits.len()
    );

    assert!(
        failed_while_down > 0,
        "PostgreSQL's archiver should have seen archive_command fail while S3 was down\n{}",
        source.log_tail()
    );
    assert_eq!(
        settled,
        at_end,
        "PostgreSQL was told a segment was archived while the S3 server was down\n{}",
        source.log_tail()
    );
    assert!(
        !archive_command_failures(&source.log()).is_empty(),
        "the server log should show the failed archive commands\n{}",
        source.log_tail()
    );
    assert_archiver_survived(&source);
    let segments = assert_none_missing(&repo, &source, &backup.start_wal, &last)?;
    assert!(
        segments >= 20,
        "the workload should have switched through dozens of segments, not {segments}"
    );

    // Back to an instant committed while the store was down: the WAL holding it was archived
    // only after the server came back.
    let during = &states[down_commits.start + down_commits.len() / 2];
    assert_restores_to(&repo, "s3-down-pitr", during, Restore::default())?;
    let expected = fingerprints(&source)?;
    assert_eq!(
        expected[0].rows,
        states.last().context("no ledger commit")?.contents.rows
    );
    stop_and_check_objects(source, &repo, &backup.start_wal, &last)?;
    assert_restores_everything(&repo, "s3-down-all", &expected)?;
    eprintln!(
        "fault_s3_server_down_30s_during_archiving: {:.1?}",
        started.elapsed()
    );
    Ok(())
}

#[test]
fn fault_garage_rf3_loses_a_node_during_archiving() -> Result<()> {
    let started = Instant::now();
    let mut garage = Garage::start(3)?;
    let repo = Repo::new_s3(&garage)?;
    let (source, backup) = source_with_backup("rf3", &repo, "--retry-timeout 10s")?;
    let shape = Shape {
        payload_rows: 100,
        payload_every: Duration::from_millis(200),
        switch_every: Duration::from_secs(1),
        bulk_rows: 0,
    };

    let ((at_kill, after_kill, failed_before), states) =
        under_load(&source, shape, |progress| -> Result<_> {
            progress.wait_commits(100)?;
            let (at_kill, failed_before) = archiver_stats(&source)?;
            let first_after = progress.commits();
            garage.stop_node(1)?;
            // Archiving goes on with two replicas of three: several segments completed after the
            // loss reach the store.
            host::wait_for(
                "segments archived after the loss of a Garage node",
                ARCHIVE_TIMEOUT,
                Duration::from_millis(200),
                || {
                    let (last, _) = archiver_stats(&source)?;
                    let done = segments_between(&at_kill, &last).map_or(0, |r| r.len().saturating_sub(1));
                    Ok(if done >= 5 {
                        Poll::Done(())
                    } else {
                        Poll::Waiting(format!("last archived {last} (at the kill: {at_kill})"))
                    })
                },
            )
            .with_context(|| source.log_tail())?;
            progress.wait_commits(50)?;
            Ok((at_kill, first_after, failed_before))
        })?;
    let last = archive_everything(&source)?;
    let (_, failed) = archiver_stats(&source)?;
    eprintln!(
        "{} ledger commits, {} after node 1 died; last archived at the kill {at_kill}; failed archive \
         attempts: {failed_before} before the kill, {failed} in all; everything archived up to {last}",
        states.len(),
        states.len() - after_kill
    );
    assert_archiver_survived(&source);
    assert_none_missing(&repo, &source, &backup.start_wal, &last)?;

    // With node 1 still down: reads need two replicas of three, as writes did.
    let target = &states[after_kill + (states.len() - after_kill) / 2];
    assert_restores_to(&repo, "rf3-pitr", target, Restore::default())?;
    let expected = fingerprints(&source)?;
    stop_and_check_objects(source, &repo, &backup.start_wal, &last)?;
    assert_restores_everything(&repo, "rf3-all", &expected)?;
    eprintln!(
        "fault_garage_rf3_loses_a_node_during_archiving: {:.1?}",
        started.elapsed()
    );
    Ok(())
}

/// Whether the daemon with `pid` has an upload in progress: an `inflight/<name>` spool file
/// naming it (`<pid> <start time>`, docs/FORMAT.md).
fn uploading(inflight: &std::path::Path, pid: u32) -> bool {
    daemon::uploading(inflight, pid)
}

#[test]
fn fault_daemon_sigkill_mid_upload_repeatedly() -> Result<()> {
    const KILLS: usize = 6;
    let started = Instant::now();
    let garage = Garage::start(1)?;
    let repo = Repo::new_s3(&garage)?;
    let (source, backup) = source_with_backup("daemon-sigkill", &repo, "")?;
    let inflight = daemon::spool_dir(&source.data_dir()).join("inflight");
    // Segments of several MiB: uploads that last long enough to be cut.
    let shape = Shape {
        payload_rows: 200,
        payload_every: Duration::from_millis(100),
        switch_every: Duration::from_secs(2),
        bulk_rows: 500,
    };

    let (kills, states) = under_load(&source, shape, |progress| -> Result<_> {
        let mut rng = rand::rng();
        let mut kills = Vec::new();
        let mut logs = Vec::new();
        progress.wait_commits(50)?;
        for _ in 0..KILLS {
            let d = Daemon::start(&source, &repo, &[])?;
            let pid = d.pid();
            let wait_upload = |limit: Duration| {
                host::wait_for("an upload by the daemon", limit, Duration::from_millis(2), || {
                    Ok(if uploading(&inflight, pid) {
                        Poll::Done(())
                    } else {
                        Poll::Waiting("no upload in progress".into())
                    })
                })
                .is_ok()
            };
            // Strike a while after it has begun uploading (a segment completes at least every
            // 2 s, so one comes soon); when that upload is over by then, early in the next one.
            let began = wait_upload(Duration::from_secs(20));
            let delay = Duration::from_millis(rng.random_range(100..=700));
            thread::sleep(delay);
            let waited_for_next = !uploading(&inflight, pid) && wait_upload(Duration::from_secs(10));
            let mid_upload = uploading(&inflight, pid);
            let ended = d.kill9()?;
            ensure!(
                ended.code().is_none() || ended.code() == Some(137) || ended.code() == Some(128 + 9),
                "the daemon should have died of SIGKILL: {:?}\n{}",
                ended.status,
                host::tail(&ended.log, 20)
            );
            kills.push((began, delay, waited_for_next, mid_upload));
            logs.push(ended.log);
            progress.wait_commits(10)?;
        }
        // A last daemon, left running: it and PostgreSQL's pushes finish the work.
        let d = Daemon::start(&source, &repo, &[])?;
        progress.wait_commits(50)?;
        Ok((kills, logs, d))
    })?;
    let (kills, logs, d) = kills;
    let last = archive_everything(&source)?;
    let (_, failed) = archiver_stats(&source)?;
    eprintln!(
        "{} ledger commits; daemon kills (had begun an upload, after, waited for the next upload, an upload in flight at the kill): {kills:?}; \
         {failed} failed archive attempts; everything archived up to {last}",
        states.len()
    );
    let mid = kills.iter().filter(|k| k.3).count();
    assert!(
        kills.len() >= 4 && mid >= 4,
        "the test should kill the daemon at least 4 times during an upload: {kills:?}\n{}",
        logs.join("\n---\n")
    );
    assert_archiver_survived(&source);
    assert_eq!(
        failed,
        0,
        "no push should fail because a daemon died\n{}",
        source.log_tail()
    );
    let segments = assert_none_missing(&repo, &source, &backup.start_wal, &last)?;
    let markers = daemon::assert_markers_match_repository(&source, &repo)?.len();
    let stopped = d.stop()?;
    assert_eq!(
        stopped.code(),
        Some(0),
        "the last daemon should stop cleanly:\n{}",
        host::tail(&stopped.log, 20)
    );

    let expected = fingerprints(&source)?;
    let compared = stop_and_check_objects(source, &repo, &backup.start_wal, &last)?;
    eprintln!("{segments} segments since the backup, {markers} spool markers, {compared} compared");

    let target = &states[states.len() * 2 / 3];
    assert_restores_to(&repo, "daemon-sigkill-pitr", target, Restore::default())?;
    assert_restores_everything(&repo, "daemon-sigkill-all", &expected)?;
    eprintln!(
        "fault_daemon_sigkill_mid_upload_repeatedly: {:.1?}",
        started.elapsed()
    );
    Ok(())
}

/// Faults injected between the agents and Garage by a proxy (`503 Slow Down` on a quarter of
/// connections, resets at once and midway through a request or response, stalls of 3 s), all
/// the time: while PostgreSQL archives, while a base backup uploads its chunks and manifest,
/// while restore downloads them, and while recovery replays through fetch and its prefetcher.
/// Every step completes, and the restored cluster holds exactly the source's rows.
#[test]
fn fault_5xx_storm_during_backup_restore_and_prefetching_replay() -> Result<()> {
    use walvault_testkit::faultproxy::{FaultProxy, Storm};
    let garage = Garage::start(1)?;
    let repo = Repo::new_s3(&garage)?;
    let upstream = garage
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .context("Garage's address")?;
    let proxy = FaultProxy::start(upstream, Storm::heavy())?;
    repo.route_through(&proxy.endpoint())?;

    let source = archiving_cluster("storm", &repo, "")?;
    workload::create_payload_table(&source)?;
    workload::insert_payload(&source, 1, 20_000)?;
    let before_backup = proxy.injected().faults();
    // A backup keeps its few connections open (it writes a few packs): make sure it meets faults.
    proxy.fault_next(2);
    let backup = take_backup(&source, &repo)?;
    let during_backup = proxy.injected().faults() - before_backup;
    // Enough WAL (about 16 segments) that the prefetcher, started by the first fetch and slowed
    // by the storm like everything else, gets ahead of the replay: with 6 segments, a replay
    // could end before it had one ready.
    workload::insert_payload(&source, 20_001, 120_000)?;
    source.execute("UPDATE payload SET body = md5(body) WHERE id % 7 = 0")?;
    let last = archive_everything(&source)?;
    let expected = workload::table_fingerprint(&source, "payload", "id")?;
    eprintln!(
        "backup {} ({} files), WAL archived up to {last}; {during_backup} faults during the backup",
        backup.id, backup.files
    );

    let before_restore = proxy.injected().faults();
    proxy.fault_next(2);
    // Retries get the default minute, as in production: in a storm, 5 s can pass with no luck.
    let (restored, printed) = restore_and_recover(
        &repo,
        "storm-restored",
        Restore::with(&["--retry-timeout", "60s"]),
    )?;
    let during_restore = proxy.injected().faults() - before_restore;
    let log = restored.log();
    let prefetched = log
        .lines()
        .filter(|l| l.contains(": restored,") && l.contains("prefetched"))
        .count();
    eprintln!(
        "{}; {during_restore} during restore and replay, {prefetched} segments replayed from the prefetcher",
        proxy.injected().summary()
    );
    ensure!(during_backup > 0, "no fault was injected during the backup");
    ensure!(during_restore > 0, "no fault was injected during the restore");
    ensure!(prefetched > 0, "the replay never used the prefetcher:\n{printed}");
    let got = workload::table_fingerprint(&restored, "payload", "id")?;
    ensure!(got == expected, "restored {got}, expected {expected}");
    assert_archiver_survived(&source);
    Ok(())
}
