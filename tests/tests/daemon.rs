//! `archive-agent daemon` beside a busy primary: it uploads `.ready` WAL ahead of PostgreSQL's
//! archiver so that `archive_command = 'archive-agent push %p'` answers at once; crashes and
//! clean stops of the daemon lose nothing, and archiving works as well without it. Every test
//! ends with what a user cares about: every segment is in the repository, and replaying it
//! rebuilds the same rows.

use std::collections::BTreeSet;
use std::fs;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use rand::Rng;
use walvault::commands::daemon::REPOSITORY_CHECK_EVERY;
use walvault_testkit::daemon::{self, Daemon};
use walvault_testkit::dirwatch::DirWatch;
use walvault_testkit::fixtures::{
    ARCHIVE_TIMEOUT, RECOVERY_TIMEOUT, archive_everything, archiving_cluster, prepare_restore, segment_range,
};
use walvault_testkit::host::{self, Poll};
use walvault_testkit::workload::{self, TableFingerprint, Workload};
use walvault_testkit::{Cluster, Repo};

/// The two tests that load the server take turns: on a small machine, two loads at once would
/// measure the machine, not the daemon.
static LOAD: Mutex<()> = Mutex::new(());
/// How often the load tests look at the cluster.
const TICK: Duration = Duration::from_millis(200);
/// `pgbench -i -s` of the load tests.
const SCALE: &str = "2";
/// Payload rows inserted per statement while pgbench runs.
const PAYLOAD_BATCH: u32 = 200;

/// Run `pgbench -c 2 -T <seconds>` together with a stream of payload inserts (ids from
/// `first_id` on) until pgbench ends, calling `tick` every [`TICK`] meanwhile with the time
/// since the start. Returns the next unused payload id.
fn under_load(
    cluster: &Cluster,
    seconds: u32,
    first_id: u32,
    mut tick: impl FnMut(Duration) -> Result<()>,
) -> Result<u32> {
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        let bench = s.spawn(|| {
            let seconds = seconds.to_string();
            let run = cluster.pgbench(&["-c", "2", "-j", "2", "-T", &seconds]);
            done.store(true, Ordering::Relaxed);
            run
        });
        let inserts = s.spawn(|| -> Result<u32> {
            let mut next = first_id;
            while !done.load(Ordering::Relaxed) {
                workload::insert_payload(cluster, next, next + PAYLOAD_BATCH - 1)?;
                next += PAYLOAD_BATCH;
            }
            Ok(next)
        });
        let start = Instant::now();
        let ticked = (|| -> Result<()> {
            while !done.load(Ordering::Relaxed) {
                tick(start.elapsed())?;
                thread::sleep(TICK);
            }
            Ok(())
        })();
        let bench = bench.join().map_err(|_| anyhow!("the pgbench thread panicked"))?;
        let inserts = inserts
            .join()
            .map_err(|_| anyhow!("the payload thread panicked"))?;
        ticked?;
        bench?;
        inserts
    })
}

/// A started archiving cluster with the payload and pgbench tables, and a `pg_basebackup -X
/// none` of it (not started) with the first segment its recovery needs.
fn source_and_backup(name: &str, repo: &Repo) -> Result<(Cluster, Cluster, String)> {
    let source = archiving_cluster(name, repo, "")?;
    workload::create_payload_table(&source)?;
    source.pgbench(&["-i", "-s", SCALE, "-q"])?;
    // No WAL in the backup: recovery can only succeed through restore_command.
    let backup = source.base_backup(&format!("{name}-restored"))?;
    let first = backup.backup_start_segment()?;
    Ok((source, backup, first))
}

/// Every segment from `first` to `last` is in the repository; returns how many.
fn assert_all_archived(repo: &Repo, first: &str, last: &str) -> Result<usize> {
    let segments = segment_range(first, last)?;
    let missing: Vec<_> = segments.iter().filter(|s| !repo.has_object(s)).collect();
    assert!(
        missing.is_empty(),
        "segments {first}..={last} not in the repository: {missing:?}"
    );
    Ok(segments.len())
}

/// Stop `source`, replay `backup` from `repo` through restore_command, and check it holds
/// exactly `expected`.
fn assert_replays_to(
    mut source: Cluster,
    mut backup: Cluster,
    repo: &Repo,
    expected: &[TableFingerprint],
) -> Result<()> {
    source.stop()?;
    drop(source);
    prepare_restore(&backup, repo, "")?;
    backup.start_and_wait_recovery_end(RECOVERY_TIMEOUT)?;
    assert_eq!(
        workload::fingerprints(&backup)?,
        expected,
        "replayed data differs from the source"
    );
    Ok(())
}

/// `push <name>: ...` lines PostgreSQL's archive_command logged: (name, rest of the line).
fn push_lines(server_log: &str) -> Vec<(String, String)> {
    server_log
        .lines()
        .filter_map(|l| {
            let rest = l.split(" push ").nth(1)?;
            let (name, what) = rest.split_once(": ")?;
            (name.len() == 24 || name.ends_with(".history")).then(|| (name.to_string(), what.to_string()))
        })
        .collect()
}

/// Whether a push line says push answered from the daemon's marker, storing nothing.
fn answered_from_spool(what: &str) -> bool {
    what.starts_with("already archived, identical") && what.contains("stored 0 bytes")
}

/// Names the daemon logged as archived (`daemon <name>: archived, ...`).
fn daemon_archived(log: &str) -> BTreeSet<String> {
    log.lines()
        .filter_map(|l| l.split(" daemon ").nth(1)?.split_once(": archived,"))
        .map(|(name, _)| name.to_string())
        .collect()
}

/// Files the daemon found already stored (push got there first) and marked without uploading.
fn daemon_found_stored(log: &str) -> BTreeSet<String> {
    log.lines()
        .filter_map(|l| {
            l.split(" daemon ")
                .nth(1)?
                .split_once(": already archived, identical")
        })
        .map(|(name, _)| name.to_string())
        .collect()
}

/// Wait until the daemon's `/metrics` shows no `.ready` file.
fn wait_metrics_drained(d: &Daemon) -> Result<()> {
    host::wait_for(
        "the daemon to report no .ready file",
        ARCHIVE_TIMEOUT,
        TICK,
        || {
            let ready = d.metric("walvault_ready_files")?;
            Ok(match ready {
                Some(0.0) => Poll::Done(()),
                other => Poll::Waiting(format!("walvault_ready_files {other:?}")),
            })
        },
    )
}

#[test]
fn daemon_keeps_archive_status_drained_under_load() -> Result<()> {
    let repo = Repo::new()?;
    let (source, backup, first) = source_and_backup("daemon-load", &repo)?;
    let d = Daemon::start(&source, &repo, &[])?;
    // The daemon uploads, push confirms from its markers: what this test checks, whoever would
    // win the race to each `.ready` file on a given machine.
    daemon::archiver_waits_for_daemon(&source, &repo)?;
    // Segments before this one were complete before the daemon started (the insert position is
    // past a segment boundary, the write position may be exactly on it).
    let daemon_first = source.query_one_string("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")?;

    let serial = LOAD.lock().unwrap_or_else(|e| e.into_inner());
    let mut ready_samples = Vec::new();
    under_load(&source, 20, 1, |_| {
        ready_samples.push(source.archive_status("ready")?.len());
        Ok(())
    })?;
    drop(serial);
    let last = archive_everything(&source)?;

    let max_ready = ready_samples.iter().copied().max().unwrap_or_default();
    eprintln!(
        "{} samples of pg_wal/archive_status during the load, at most {max_ready} .ready files: {ready_samples:?}",
        ready_samples.len()
    );
    let segments = assert_all_archived(&repo, &first, &last)?;

    // The daemon did the uploads; PostgreSQL's archive_command mostly just confirmed them.
    wait_metrics_drained(&d)?;
    let metrics = d.http_get("/metrics")?;
    let by_daemon = daemon::metric_value(&metrics, "walvault_segments_archived_total").unwrap_or_default();
    // Pushes of the segments completed while the daemon ran.
    let served = segment_range(&daemon_first, &last)?;
    let pushes: Vec<_> = push_lines(&source.log())
        .into_iter()
        .filter(|(name, _)| served.contains(name))
        .collect();
    let fast = pushes
        .iter()
        .filter(|(_, what)| answered_from_spool(what))
        .count();
    eprintln!(
        "{segments} segments since the backup; the daemon archived {by_daemon} files; {fast} of {} \
         pushes answered from its spool; the others: {:#?}",
        pushes.len(),
        pushes
            .iter()
            .filter(|(_, what)| !answered_from_spool(what))
            .collect::<Vec<_>>()
    );
    // How few .ready files pile up, and the daemon's parallel draining of a backlog, are the
    // machine's speed: measured in bench/archive_bench.py, never asserted here. Here: the daemon
    // uploads and push answers from its markers.
    assert!(
        by_daemon >= 1.0,
        "the daemon should have archived some of the {} segments completed while it ran, /metrics \
         says {by_daemon}\n{metrics}",
        served.len()
    );
    assert!(
        daemon_archived(&d.log()).len() as f64 >= by_daemon,
        "the daemon's log should name every file it archived:\n{}",
        host::tail(&d.log(), 40)
    );
    assert!(
        fast >= 1 && !pushes.is_empty(),
        "some pushes should be answered from the daemon's spool ({fast} of {}): {pushes:#?}",
        pushes.len()
    );
    assert_eq!(d.http_get("/health")?.trim(), "ok");
    let last_archived = metrics
        .lines()
        .find_map(|l| l.strip_prefix("walvault_last_archived_info{file=\""))
        .and_then(|l| l.split('"').next())
        .with_context(|| format!("no walvault_last_archived_info in /metrics:\n{metrics}"))?;
    assert!(
        repo.has_object(last_archived),
        "/metrics names {last_archived:?} as last archived, which the repository lacks"
    );
    daemon::assert_markers_match_repository(&source, &repo)?;

    let expected = workload::fingerprints(&source)?;
    let stopped = d.stop()?;
    assert_eq!(
        stopped.code(),
        Some(0),
        "daemon:\n{}",
        host::tail(&stopped.log, 20)
    );
    // The daemon summarizes what it uploads for the time index after the upload (by the time it
    // has stopped): every segment it archived has its summary.
    let keys = repo.files()?;
    let unindexed: Vec<String> = daemon_archived(&stopped.log)
        .into_iter()
        .filter(|n| n.len() == 24)
        .filter(|n| !keys.contains_key(&format!("index/{}/{n}.wvo", &n[..16])))
        .collect();
    assert!(
        unindexed.is_empty(),
        "segments the daemon archived without a summary: {unindexed:?}\n{}",
        host::tail(&stopped.log, 40)
    );
    assert_replays_to(source, backup, &repo, &expected)
}

#[test]
fn daemon_killed_mid_upload_and_restarted_loses_nothing() -> Result<()> {
    let repo = Repo::new()?;
    let (source, backup, first) = source_and_backup("daemon-kill", &repo)?;
    let inflight = daemon::spool_dir(&source.data_dir()).join("inflight");
    let mut d = Some(Daemon::start(&source, &repo, &[])?);
    let mut rng = rand::rng();
    let mut kill_at: Vec<Duration> = (0..3)
        .map(|i| Duration::from_millis(2_000 + i * 4_000 + rng.random_range(0..2_000)))
        .collect();
    kill_at.reverse();
    let mut killed_mid_upload = 0;
    let mut logs = Vec::new();

    let serial = LOAD.lock().unwrap_or_else(|e| e.into_inner());
    under_load(&source, 15, 1, |elapsed| {
        if kill_at.last().is_none_or(|at| elapsed < *at) {
            return Ok(());
        }
        kill_at.pop();
        let running = d.take().context("a daemon runs")?;
        // Kill it while it uploads: complete a segment now, so that it has one to upload
        // whatever the load's pace, and strike as soon as it has begun.
        source.switch_wal()?;
        let uploading = host::wait_for(
            "an upload",
            Duration::from_secs(5),
            Duration::from_millis(2),
            || {
                let busy = daemon::uploading(&inflight, running.pid());
                Ok(if busy {
                    Poll::Done(())
                } else {
                    Poll::Waiting("no upload".into())
                })
            },
        )
        .is_ok();
        let ended = running.kill9()?;
        killed_mid_upload += usize::from(uploading);
        logs.push(ended.log);
        d = Some(Daemon::start(&source, &repo, &[])?);
        Ok(())
    })?;
    drop(serial);
    let last = archive_everything(&source)?;
    let d = d.context("a daemon runs")?;
    eprintln!(
        "killed the daemon {} times, {killed_mid_upload} of them during an upload",
        logs.len()
    );
    assert!(
        logs.len() >= 2 && killed_mid_upload >= 1,
        "the test should kill the daemon during an upload at least once (killed {} times, {killed_mid_upload} during one)",
        logs.len()
    );

    let segments = assert_all_archived(&repo, &first, &last)?;
    let failed = source.query_one_string("SELECT failed_count::text FROM pg_stat_archiver")?;
    assert_eq!(
        failed,
        "0",
        "no push should fail because the daemon died:\n{}",
        source.log_tail()
    );
    wait_metrics_drained(&d)?;
    daemon::assert_markers_match_repository(&source, &repo)?;
    logs.push(d.log());
    let by_daemons: BTreeSet<String> = logs.iter().flat_map(|l| daemon_archived(l)).collect();
    eprintln!(
        "{segments} segments since the backup; the daemons archived {} files",
        by_daemons.len()
    );
    assert!(
        !by_daemons.is_empty(),
        "the daemons archived nothing:\n{}",
        logs.join("\n")
    );

    let expected = workload::fingerprints(&source)?;
    drop(d);
    assert_replays_to(source, backup, &repo, &expected)
}

#[test]
fn archiving_works_without_a_daemon_after_one_ran() -> Result<()> {
    let repo = Repo::new()?;
    let source = archiving_cluster("no-daemon", &repo, "")?;
    workload::create_payload_table(&source)?;
    let backup = source.base_backup("no-daemon-restored")?;
    let first = backup.backup_start_segment()?;

    // A daemon ran for a while and was stopped: its spool stays behind in the data directory.
    let d = Daemon::start(&source, &repo, &[])?;
    workload::insert_payload(&source, 1, 2_000)?;
    let with_daemon = archive_everything(&source)?;
    let stopped = d.stop()?;
    assert_eq!(
        stopped.code(),
        Some(0),
        "daemon:\n{}",
        host::tail(&stopped.log, 20)
    );
    assert!(
        daemon::spool_dir(&source.data_dir()).is_dir(),
        "the daemon should leave its spool behind"
    );

    let small = Workload {
        scale: 1,
        clients: 2,
        transactions: 500,
        payload_rows: 0,
    };
    workload::run(&source, &small)?;
    workload::insert_payload(&source, 2_001, 5_000)?;
    let last = archive_everything(&source)?;
    assert_all_archived(&repo, &first, &last)?;

    // With nobody ahead of it, push uploaded every segment written after the daemon stopped.
    let after_stop = segment_range(&with_daemon, &last)?;
    let pushes = push_lines(&source.log());
    for name in after_stop.iter().skip(1) {
        assert!(
            pushes
                .iter()
                .any(|(n, what)| n == name && what.starts_with("archived,")),
            "push should have uploaded {name} itself: {pushes:#?}"
        );
    }
    daemon::assert_markers_match_repository(&source, &repo)?;
    let expected = workload::fingerprints(&source)?;
    assert_replays_to(source, backup, &repo, &expected)
}

#[test]
fn sigterm_finishes_uploads_and_leaves_only_true_markers() -> Result<()> {
    let repo = Repo::new()?;
    let source = archiving_cluster("daemon-term", &repo, "")?;
    workload::create_payload_table(&source)?;
    let d = Daemon::start(&source, &repo, &[])?;
    let mut next = 1;
    for _ in 0..6 {
        workload::insert_payload(&source, next, next + 499)?;
        next += 500;
        source.switch_wal()?;
    }
    // Stop while those segments are still being uploaded.
    let daemon_pid = d.pid().to_string();
    let stopped = d.stop()?;
    eprintln!("{}", host::tail(&stopped.log, 12));
    assert_eq!(
        stopped.code(),
        Some(0),
        "SIGTERM should end the daemon with exit code 0:\n{}",
        stopped.log
    );
    assert!(
        stopped.log.contains("daemon stopped"),
        "the daemon should say it stopped:\n{}",
        stopped.log
    );

    let markers = daemon::assert_markers_match_repository(&source, &repo)?;
    let logged: BTreeSet<String> = daemon_archived(&stopped.log)
        .union(&daemon_found_stored(&stopped.log))
        .cloned()
        .collect();
    assert_eq!(
        markers.iter().cloned().collect::<BTreeSet<_>>(),
        logged,
        "a marker for every file the daemon reported archived or found stored, and for nothing else"
    );
    assert!(
        !markers.is_empty(),
        "the daemon archived nothing:\n{}",
        stopped.log
    );
    let inflight = daemon::spool_dir(&source.data_dir()).join("inflight");
    // Only the daemon's own entries count: PostgreSQL's archive_command may still be storing a
    // file (its entry names that push's pid), which takes longer on the slower stores.
    let left: Vec<_> = fs::read_dir(&inflight)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            fs::read_to_string(e.path())
                .is_ok_and(|tag| tag.split_whitespace().next() == Some(daemon_pid.as_str()))
        })
        .map(|e| e.file_name())
        .collect();
    assert!(
        left.is_empty(),
        "a clean stop should finish every upload in flight, yet these are left: {left:?}"
    );

    // PostgreSQL's own pushes archive the rest, confirming the daemon's uploads.
    let last = archive_everything(&source)?;
    let pushes = push_lines(&source.log());
    for name in &markers {
        assert!(
            pushes.iter().any(|(n, _)| n == name),
            "PostgreSQL should have pushed {name}: {pushes:#?}"
        );
    }
    let first = markers.first().cloned().unwrap_or_else(|| last.clone());
    assert_all_archived(&repo, &first, &last)?;
    Ok(())
}

/// The daemon's housekeeping tick (`commands/daemon/mod.rs`): a pass of its loop, which lists
/// archive_status.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(5);
/// The full rescan of archive_status the idle test asks for (`--rescan-every`, its default).
const RESCAN_EVERY: Duration = Duration::from_secs(10);
/// How often PostgreSQL's archiver wakes by itself and lists archive_status
/// (`PGARCH_AUTOWAKE_INTERVAL`).
const ARCHIVER_WAKES_EVERY: Duration = Duration::from_secs(60);

/// With nothing to archive, the daemon acts on its timers only. Counted from outside (inotify)
/// while it idles: its listings of archive_status (each pass of its loop makes one) and its
/// repository checks (each rewrites the spool's `repository.json`). A loop that spins, or wakes
/// on its own listing, makes thousands of them.
#[test]
fn an_idle_daemon_stays_idle() -> Result<()> {
    let repo = Repo::new()?;
    let source = archiving_cluster("daemon-idle", &repo, "")?;
    let rescan = format!("{}s", RESCAN_EVERY.as_secs());
    let d = Daemon::start(&source, &repo, &["--rescan-every", &rescan])?;
    archive_everything(&source)?;
    wait_metrics_drained(&d)?;

    let status_dir = source.data_dir().join("pg_wal/archive_status");
    let spool = daemon::spool_dir(&source.data_dir());
    let started = Instant::now();
    let (listings, records) = (DirWatch::start(&status_dir)?, DirWatch::start(&spool)?);
    // Nothing is written now.
    thread::sleep(Duration::from_secs(20));
    let (listings, records) = (listings.stop(), records.stop());
    let watched = started.elapsed();

    // A timer fires at most once per period, however loaded the machine (ticks it could not
    // serve on time are made up later, never added): the bounds grow with the time watched.
    // Twice what the timers schedule leaves room for ticks owed from before the watch began; a
    // loop that spins, or wakes on its own listing, makes thousands.
    let fires = |every: Duration| (watched.as_secs_f64() / every.as_secs_f64()).floor() as usize + 1;
    let listed = listings.opened(&status_dir);
    let listings_scheduled = fires(HOUSEKEEPING_EVERY) + fires(RESCAN_EVERY) + fires(ARCHIVER_WAKES_EVERY);
    let checked = records.renamed_to(&spool.join("repository.json"));
    let checks_scheduled = fires(REPOSITORY_CHECK_EVERY);
    eprintln!(
        "idle for {watched:?}: archive_status listed {listed} times ({listings_scheduled} \
         scheduled), the repository checked {checked} times ({checks_scheduled} scheduled)"
    );
    assert!(
        listed <= 2 * listings_scheduled,
        "with nothing to archive, archive_status was listed {listed} times in {watched:?}, where \
         the daemon's and PostgreSQL's timers schedule {listings_scheduled}:\n{}",
        listings.describe()
    );
    assert!(
        checked <= 2 * checks_scheduled,
        "the repository was checked {checked} times in {watched:?}, where the daemon schedules \
         {checks_scheduled} (every {REPOSITORY_CHECK_EVERY:?}):\n{}",
        records.describe()
    );

    let stopped = d.stop()?;
    assert_eq!(
        stopped.code(),
        Some(0),
        "daemon:\n{}",
        host::tail(&stopped.log, 20)
    );
    Ok(())
}

/// The positions `pg_switch_wal()` returned to the daemon's forced switches, as it logged them.
fn forced_switches(daemon_log: &str) -> Vec<String> {
    daemon_log
        .lines()
        .filter_map(|l| {
            l.split("forced a WAL switch at ")
                .nth(1)?
                .split_whitespace()
                .next()
        })
        .map(str::to_string)
        .collect()
}

/// `--max-wal-age`: on an idle cluster, one small transaction still reaches the archive within
/// about that age, through a WAL switch the daemon forces; and the decision comes from what
/// PostgreSQL archived (`pg_stat_archiver`) and what was written since the daemon's last switch,
/// so an idle cluster is not switched on every housekeeping tick once its WAL is archived.
#[test]
fn max_wal_age_archives_a_quiet_commit_without_switching_in_a_loop() -> Result<()> {
    let repo = Repo::new()?;
    let source = archiving_cluster("daemon-max-age", &repo, "")?;
    source.execute("CREATE TABLE quiet (v int)")?;
    archive_everything(&source)?;
    let d = Daemon::start(
        &source,
        &repo,
        &["--pg-url", &source.conn_string(), "--max-wal-age", "3s"],
    )?;
    source.execute("INSERT INTO quiet VALUES (1)")?;
    let segment = source.query_one_string("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")?;
    wait_archived(&repo, &segment, Duration::from_secs(60), &d)?;
    let before = forced_switches(&d.log()).len();
    assert!(before >= 1, "the daemon forced no switch:\n{}", d.log());

    // Idle through several housekeeping ticks, each a look at pg_stat_archiver. The daemon may
    // switch again only when WAL was written since its last switch (the bgwriter's standby
    // snapshot, logged after a switch, is such WAL). A switch with nothing written ends no
    // segment: PostgreSQL returns the start of the empty segment in use, which pg_walfile_name
    // names as the segment the switch before ended.
    thread::sleep(Duration::from_secs(20));
    let forced = forced_switches(&d.log());
    let mut ended = Vec::new();
    for lsn in &forced {
        ended.push(source.query_one_string(&format!("SELECT pg_walfile_name('{lsn}'::pg_lsn)"))?);
    }
    let distinct: BTreeSet<&String> = ended.iter().collect();
    assert_eq!(
        distinct.len(),
        ended.len(),
        "every forced switch must end a segment of its own, yet the switches at {forced:?} ended \
         {ended:?}:\n{}",
        d.log()
    );
    for segment in &ended {
        wait_archived(&repo, segment, ARCHIVE_TIMEOUT, &d)?;
    }
    eprintln!(
        "max-wal-age: {before} forced switch(es) to archive the commit, {} while idle; segments \
         ended and archived: {ended:?}",
        forced.len() - before
    );
    d.stop()?;
    Ok(())
}

/// Wait up to `limit` until `segment` is in `repo` (the daemon's log on failure).
fn wait_archived(repo: &Repo, segment: &str, limit: Duration, d: &Daemon) -> Result<()> {
    host::wait_for(&format!("{segment} to be archived"), limit, TICK, || {
        Ok(match repo.has_object(segment) {
            true => Poll::Done(()),
            false => Poll::Waiting(format!("{segment} not archived yet")),
        })
    })
    .with_context(|| d.log())
}

/// A repository removed and created again at the same URL (`init` gives it a new id) is another
/// repository: the daemon's markers, written for the old one, never answer push for it. Push
/// uploads the file itself, so the new repository has it.
#[test]
fn markers_never_vouch_for_a_repository_recreated_at_the_same_url() -> Result<()> {
    let repo = Repo::new()?;
    let source = archiving_cluster("recreated", &repo, "")?;
    let d = Daemon::start(&source, &repo, &[])?;
    // The markers this test needs are the daemon's.
    daemon::archiver_waits_for_daemon(&source, &repo)?;
    workload::create_payload_table(&source)?;
    workload::insert_payload(&source, 1, 500)?;
    archive_everything(&source)?;
    d.stop()?;
    // A file the daemon marked that is still in pg_wal (no checkpoint has recycled it).
    let marked = daemon::archived_markers(&source.data_dir())?;
    let last = marked
        .iter()
        .rev()
        .find(|n| source.data_dir().join("pg_wal").join(n).exists())
        .cloned()
        .with_context(|| format!("no marked file left in pg_wal: {marked:?}"))?;
    let wal = source.data_dir().join("pg_wal").join(&last);
    let old_id = repo.id()?;
    for key in repo.files()?.keys() {
        repo.delete(key)?;
    }
    repo.init(&[]).check()?;
    anyhow::ensure!(repo.id()? != old_id, "init must choose a new id");

    let pushed = walvault_testkit::agents().push(&repo, &wal, &[]);
    pushed.assert_code(0);
    assert!(
        pushed.stderr.contains(&format!("push {last}: archived,")),
        "push must upload, not answer from the old repository's marker:\n{pushed}"
    );
    assert!(repo.has_object(&last));
    Ok(())
}

/// With a retention policy, the daemon expires after each scheduled backup, and with
/// `--verify-every` it verifies the repository on a schedule; both show in `/metrics`.
#[test]
fn scheduled_backups_are_expired_and_verified_by_the_daemon() -> Result<()> {
    let repo = Repo::new()?;
    let source = archiving_cluster("daemon-retention", &repo, "")?;
    source.execute("CREATE TABLE kept (v int); INSERT INTO kept SELECT generate_series(1, 1000)")?;
    archive_everything(&source)?;
    let d = Daemon::start(
        &source,
        &repo,
        &[
            "--pg-url",
            &source.conn_string(),
            "--backup-every",
            "4s",
            "--keep-last",
            "1",
            "--verify-every",
            "3s",
        ],
    )?;
    let metric = |name: &str| d.metric(name).map(|v| v.unwrap_or_default());
    host::wait_for(
        "an expire after a scheduled backup to delete the one before, and a verify after it",
        Duration::from_secs(120),
        TICK,
        || {
            let expired = metric("walvault_last_expire_deleted_backups")? >= 1.0
                && metric("walvault_last_expire_success")? == 1.0;
            let verified_after = metric("walvault_last_verify_timestamp_seconds")?
                > metric("walvault_last_expire_timestamp_seconds")?;
            Ok(match expired && verified_after {
                true => Poll::Done(()),
                false => Poll::Waiting(host::tail(&d.log(), 10)),
            })
        },
    )
    .with_context(|| d.log())?;
    assert_eq!(metric("walvault_last_verify_success")?, 1.0, "{}", d.log());
    // Problems that put nothing at risk (a segment archived a moment ago whose summary is not
    // written yet) may be counted; none may put a restore at risk.
    assert!(metric("walvault_repository_bytes")? > 0.0);
    assert!(metric("walvault_repository_objects")? > 0.0);
    d.stop()?;
    // keep_last 1: the newest backup, and at most one taken after the last expire.
    let manifests = repo
        .files()?
        .keys()
        .filter(|k| k.ends_with("/manifest.wvo"))
        .count();
    assert!(
        (1..=2).contains(&manifests),
        "{manifests} backups left with keep_last 1"
    );
    Ok(())
}

/// `--drill-every`: the daemon runs restore drills on a schedule, stores each evidence record in
/// the repository (shown by `restore-agent info`) and exports the last one's outcome, RTO and
/// RPO.
#[test]
fn scheduled_drills_leave_evidence_in_the_repository_and_metrics() -> Result<()> {
    let repo = Repo::new()?;
    let source = archiving_cluster("daemon-drill", &repo, "")?;
    source.execute("CREATE TABLE proof (v int); INSERT INTO proof SELECT generate_series(1, 1000)")?;
    walvault_testkit::backup::take_backup(&source, &repo)?;
    source.execute("INSERT INTO proof SELECT generate_series(1001, 2000)")?;
    archive_everything(&source)?;
    let d = Daemon::start(
        &source,
        &repo,
        &["--drill-every", "2s", "--drill-rpo-target", "1h"],
    )?;
    let metric = |name: &str| d.metric(name).map(|v| v.unwrap_or_default());
    host::wait_for(
        "a scheduled drill to finish",
        Duration::from_secs(180),
        TICK,
        || {
            Ok(match metric("walvault_last_drill_timestamp_seconds")? > 0.0 {
                true => Poll::Done(()),
                false => Poll::Waiting(host::tail(&d.log(), 10)),
            })
        },
    )
    .with_context(|| d.log())?;
    assert_eq!(metric("walvault_last_drill_success")?, 1.0, "{}", d.log());
    assert!(metric("walvault_last_drill_rto_seconds")? > 0.0, "{}", d.log());
    d.stop()?;
    let info = walvault_testkit::backup::info(&repo)?;
    let drills = info["drills"].as_array().context("drills in info")?;
    let last = drills.first().context("a drill recorded")?;
    assert_eq!(last["outcome"], "passed", "{last:#}");
    assert!(
        last["target_time"].is_string(),
        "a random instant by default: {last:#}"
    );
    assert!(last["rpo"]["measured_seconds"].as_f64().is_some(), "{last:#}");
    assert!(
        repo.files()?
            .keys()
            .any(|k| k.starts_with("drills/") && k.ends_with(".json")),
        "evidence stored under drills/"
    );
    Ok(())
}
