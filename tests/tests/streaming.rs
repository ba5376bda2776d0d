//! `archive-agent daemon --stream` against real servers, with the repository on Garage (S3),
//! not on the database host's disk, and `archive_mode = off`: the stream is the only way WAL
//! reaches the repository.
//!
//! - A writer records every commit the server acknowledged while pgbench runs beside it, then
//!   the primary is killed with SIGKILL. A restore to the end of the archive holds every commit
//!   acknowledged more than `--stream-flush` + 1 s before the kill, and nothing that was not
//!   written (issue 25's first "done when").
//! - With `--synchronous` and `synchronous_standby_names = 'walvault'`, it holds every
//!   acknowledged commit; the commit latency with and without it is printed.
//! - A failover to a promoted standby: the daemon follows `target_session_attrs=read-write` to
//!   it, stores timeline 2's history, and the archive goes on without a gap.
//! - One clear error line for a wrong password, a role without REPLICATION, and a server that
//!   cannot stream.
//!
//! The daemon connects as `walvault`, a role with only the REPLICATION attribute, through
//! SCRAM (`pg_hba.conf`: `host all walvault 127.0.0.1/32 scram-sha-256`). Named `matrix_` so
//! that they run once, in the matrix part of the suite, not again on each store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use walvault_testkit::backup::{self, Restore, take_backup};
use walvault_testkit::cluster::InitOptions;
use walvault_testkit::daemon::Daemon;
use walvault_testkit::garage::Garage;
use walvault_testkit::host::{self, Poll};
use walvault_testkit::pg::PgInstall;
use walvault_testkit::{Cluster, Repo, agents};

const PASSWORD: &str = "stream-secret";
/// The daemon's `--stream-flush`.
const FLUSH: Duration = Duration::from_secs(1);

/// A started cluster that streams (and does not archive), with the role `walvault`.
fn streaming_cluster(pg: &'static PgInstall, name: &str, extra: &[(&str, &str)]) -> Result<Cluster> {
    walvault_testkit::cluster::streaming_cluster(pg, name, &["walvault"], PASSWORD, extra)
}

fn pg_url(cluster: &Cluster) -> String {
    format!(
        "host=127.0.0.1 port={} user=walvault password={PASSWORD}",
        cluster.port()
    )
}

/// Commits the server acknowledged: id and when.
struct Writer {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<Vec<(i64, Instant)>>,
}

/// Insert ids 1, 2, ... one transaction each until told to stop or the server goes away.
fn start_writer(cluster: &Cluster) -> Result<Writer> {
    cluster
        .execute("CREATE TABLE acked (id bigint PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())")?;
    let mut client = cluster.connect()?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let handle = thread::spawn(move || {
        let mut acked = Vec::new();
        let mut id = 1i64;
        while !flag.load(Ordering::Relaxed) {
            if client
                .execute("INSERT INTO acked (id) VALUES ($1)", &[&id])
                .is_err()
            {
                break;
            }
            acked.push((id, Instant::now()));
            id += 1;
        }
        acked
    });
    Ok(Writer { stop, handle })
}

impl Writer {
    fn finish(self) -> Vec<(i64, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("the writer does not panic")
    }
}

/// pgbench beside the writer for `secs` (it fails once the server is killed: ignored).
fn pgbench_beside(cluster: &Cluster, secs: u32) -> Result<thread::JoinHandle<()>> {
    cluster.pgbench(&["-i", "-q", "-s", "3"])?;
    let port = cluster.port();
    let secs = secs.to_string();
    Ok(thread::spawn(move || {
        let mut cmd = host::pg_user_command(host::pg_bin("pgbench"));
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .args(["-n", "-c", "2", "-T", &secs, "postgres"]);
        let _ = host::run(&mut cmd, Duration::from_secs(600));
    }))
}

/// The ids a restored cluster holds, checked to be 1..=n without a hole.
fn restored_ids(cluster: &Cluster) -> Result<i64> {
    let n: i64 = cluster
        .query_one_string("SELECT count(*)::text FROM acked")?
        .parse()?;
    let max: i64 = cluster
        .query_one_string("SELECT coalesce(max(id), 0)::text FROM acked")?
        .parse()?;
    ensure!(
        n == max,
        "the restored ledger has holes: {n} rows, ids up to {max}"
    );
    Ok(max)
}

/// SIGKILL the postmaster (its children die with it) and wait until it is gone.
fn kill9(cluster: &Cluster) -> Result<Instant> {
    let pid = cluster.postmaster_pid().context("no postmaster")?;
    let killed = Instant::now();
    host::run(
        std::process::Command::new("kill").args(["-9", &pid.to_string()]),
        Duration::from_secs(10),
    )?
    .check()?;
    host::wait_for(
        "the killed server to go",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || {
            Ok(match cluster.is_up() {
                true => Poll::Waiting("still up".into()),
                false => Poll::Done(()),
            })
        },
    )?;
    Ok(killed)
}

/// How the daemon streams: whether commits wait for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replication {
    /// Commits do not wait: the daemon flushes every [`FLUSH`].
    Asynchronous,
    /// `--synchronous`, named in `synchronous_standby_names`: a commit is acknowledged once the
    /// daemon has it.
    Synchronous,
}

/// Stream, back up, write, kill, restore to the end: every commit acknowledged more than
/// `FLUSH` + 1 s before the kill is restored (all of them with [`Replication::Synchronous`]).
fn kill_and_restore(major: u32, replication: Replication) -> Result<()> {
    let pg = PgInstall::of_major(major)?;
    let repo = Repo::new_s3(Garage::shared())?;
    let cluster = streaming_cluster(pg, &format!("stream{major}"), &[])?;
    let flush = format!("{}ms", FLUSH.as_millis());
    let mut flags = vec!["--stream-flush", &flush];
    if replication == Replication::Synchronous {
        flags.push("--synchronous");
    }
    let daemon = Daemon::start_streaming(&repo, &pg_url(&cluster), &flags)?;
    if replication == Replication::Synchronous {
        // Commits wait for the daemon from now on.
        cluster.execute("ALTER SYSTEM SET synchronous_standby_names = 'walvault'")?;
        cluster.execute("SELECT pg_reload_conf()")?;
        host::wait_for(
            "the daemon to be the synchronous standby",
            Duration::from_secs(60),
            Duration::from_millis(100),
            || {
                let state = cluster.query_rows(
                    "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'walvault'",
                )?;
                Ok(match state.first().and_then(|r| r[0].as_deref()) {
                    Some("sync") => Poll::Done(()),
                    other => Poll::Waiting(format!("{other:?}")),
                })
            },
        )
        .with_context(|| daemon.log())?;
    }
    take_backup(&cluster, &repo).with_context(|| daemon.log())?;
    let bench = pgbench_beside(&cluster, 60)?;
    let writer = start_writer(&cluster)?;
    thread::sleep(Duration::from_secs(8));
    let killed = kill9(&cluster)?;
    let acked = writer.finish();
    let _ = bench.join();
    ensure!(acked.len() > 50, "the writer made only {} commits", acked.len());
    // Let the daemon find the server gone, then stop it as an operator would.
    thread::sleep(Duration::from_secs(2));
    let log = daemon.log();
    let ended = daemon.stop()?;
    ensure!(ended.code() == Some(0), "daemon: {ended:?}\n{log}");

    let (restored, _) =
        backup::restore_and_recover(&repo, &format!("restored{major}"), Restore::default().on(pg))?;
    let max = restored_ids(&restored)?;
    let newest = acked.last().map_or(0, |a| a.0);
    ensure!(
        max <= newest + 1,
        "restored id {max}, but only {newest} were written"
    );
    let lost: Vec<&(i64, Instant)> = acked.iter().filter(|(id, _)| *id > max).collect();
    let window = match replication {
        Replication::Synchronous => Duration::ZERO,
        Replication::Asynchronous => FLUSH + Duration::from_secs(1),
    };
    if let Some((id, at)) = lost.first() {
        let before_kill = killed.saturating_duration_since(*at);
        ensure!(
            *at > killed || before_kill <= window,
            "commit {id}, acknowledged {before_kill:?} before the kill, is not in the restore (window {window:?}); restored up to {max} of {newest}\n{log}"
        );
    }
    // The writer commits one row at a time: the gaps between acknowledgements are the commit
    // latency, which is what --synchronous costs.
    let mut gaps: Vec<Duration> = acked.windows(2).map(|w| w[1].1 - w[0].1).collect();
    gaps.sort();
    let pct = |p: usize| gaps[(gaps.len() - 1) * p / 100];
    let lost_before = lost.iter().filter(|(_, at)| *at <= killed).count();
    let oldest_lost = lost.first().map(|(_, at)| killed.saturating_duration_since(*at));
    eprintln!(
        "PostgreSQL {major}{}: {} commits acknowledged in 8 s, commit latency p50 {:?} p99 {:?}; restored {max}; lost {} acknowledged before the kill (the oldest {oldest_lost:?} before it), {} after",
        match replication {
            Replication::Synchronous => " --synchronous",
            Replication::Asynchronous => "",
        },
        acked.len(),
        pct(50),
        pct(99),
        lost_before,
        lost.len() - lost_before
    );
    Ok(())
}

#[test]
fn matrix_stream_pg15_kill9_restores_every_commit_older_than_the_flush_interval() -> Result<()> {
    kill_and_restore(15, Replication::Asynchronous)
}

#[test]
fn matrix_stream_pg18_kill9_restores_every_commit_older_than_the_flush_interval() -> Result<()> {
    kill_and_restore(18, Replication::Asynchronous)
}

#[test]
fn matrix_stream_pg15_synchronous_restores_every_acknowledged_commit() -> Result<()> {
    kill_and_restore(15, Replication::Synchronous)
}

#[test]
fn matrix_stream_pg18_synchronous_restores_every_acknowledged_commit() -> Result<()> {
    kill_and_restore(18, Replication::Synchronous)
}

/// `archive-agent daemon --stream` with `pg_url`: it must exit at once with one error line
/// containing `words`.
fn refused(repo: &Repo, pg_url: &str, words: &str) -> Result<()> {
    let mut args = vec!["daemon".to_string()];
    args.extend(repo.args());
    args.extend(["--stream", "--pg-url", pg_url].map(String::from));
    let run = agents().run("archive-agent", &args);
    ensure!(run.code() == Some(1), "{run}");
    let errors: Vec<&str> = run.stderr.lines().filter(|l| l.contains("ERROR")).collect();
    if errors.len() != 1 || !errors[0].contains(words) {
        bail!("expected one error line with {words:?}:\n{}", run.stderr);
    }
    Ok(())
}

#[test]
fn matrix_stream_refusals_are_one_clear_line_each() -> Result<()> {
    let pg = PgInstall::of_major(15)?;
    let repo = Repo::new_s3(Garage::shared())?;
    let cluster = streaming_cluster(pg, "refusals", &[])?;
    cluster.execute("CREATE ROLE plain LOGIN PASSWORD 'plain'")?;
    let port = cluster.port();
    refused(
        &repo,
        &format!("host=127.0.0.1 port={port} user=walvault password=wrong"),
        "password authentication failed",
    )?;
    refused(
        &repo,
        &format!("host=127.0.0.1 port={port} user=plain password=plain"),
        "replication",
    )?;
    refused(&repo, "host=127.0.0.1 port=1,2,3 user=x", "3 ports for 1 hosts")?;
    let mut off = Cluster::init(
        "nosenders",
        &InitOptions {
            pg: Some(pg),
            ..InitOptions::default()
        },
    )?;
    off.set_conf(&[
        ("wal_level", "minimal"),
        ("max_wal_senders", "0"),
        ("archive_mode", "off"),
    ])?;
    off.start()?;
    refused(
        &repo,
        &format!("host=127.0.0.1 port={} user=postgres", off.port()),
        "max_wal_senders",
    )?;
    Ok(())
}

/// A standby streaming from `primary` (`pg_basebackup -R`), started.
fn standby_of(primary: &Cluster, name: &str) -> Result<Cluster> {
    let mut standby = primary.base_backup(name)?;
    std::fs::write(standby.data_dir().join("standby.signal"), b"")?;
    host::give_to_pg_user(&standby.data_dir().join("standby.signal"))?;
    standby.set_conf(&[(
        "primary_conninfo",
        &format!("host=127.0.0.1 port={} user=postgres", primary.port()),
    )])?;
    standby.start()?;
    Ok(standby)
}

/// `pg_promote()` on `standby`, then wait until it has left recovery.
fn promote(standby: &Cluster) -> Result<()> {
    standby.execute("SELECT pg_promote()")?;
    host::wait_for(
        "the promotion",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            Ok(
                match standby
                    .query_one_string("SELECT pg_is_in_recovery()::text")?
                    .as_str()
                {
                    "false" => Poll::Done(()),
                    _ => Poll::Waiting("in recovery".into()),
                },
            )
        },
    )
}

/// Wait until `standby` has replayed everything `primary` wrote.
fn wait_caught_up(primary: &Cluster, standby: &Cluster) -> Result<()> {
    let target = primary.query_one_string("SELECT pg_current_wal_lsn()::text")?;
    host::wait_for(
        "the standby to catch up",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            let behind =
                standby.query_one_string(&format!("SELECT (pg_last_wal_replay_lsn() < '{target}')::text"))?;
            Ok(match behind.as_str() {
                "false" => Poll::Done(()),
                _ => Poll::Waiting(format!("replayed < {target}")),
            })
        },
    )
}

/// Wait until the daemon reports everything up to `lsn` durable.
fn wait_flushed(daemon: &Daemon, cluster: &Cluster) -> Result<()> {
    let lsn = cluster.query_one_string("SELECT (pg_current_wal_lsn() - '0/0')::text")?;
    let lsn: f64 = lsn.parse()?;
    host::wait_for(
        "the daemon to store the WAL",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let flushed = daemon.metric("walvault_stream_flushed_lsn")?.unwrap_or(0.0);
            Ok(match flushed >= lsn {
                true => Poll::Done(()),
                false => Poll::Waiting(format!("flushed {flushed} < {lsn}")),
            })
        },
    )
}

#[test]
fn matrix_stream_pg15_follows_a_failover_to_the_promoted_standby() -> Result<()> {
    let pg = PgInstall::of_major(15)?;
    let repo = Repo::new_s3(Garage::shared())?;
    let mut primary = streaming_cluster(pg, "failover-primary", &[])?;
    let standby = standby_of(&primary, "failover-standby")?;
    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=walvault password={PASSWORD} target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let daemon = Daemon::start_streaming(&repo, &url, &["--stream-flush", "500ms"])?;
    take_backup(&primary, &repo).with_context(|| daemon.log())?;
    primary.execute("CREATE TABLE ledger (id int PRIMARY KEY, tli int)")?;
    primary
        .execute("INSERT INTO ledger SELECT g, 1 FROM generate_series(1, 1000) g; SELECT pg_switch_wal()")?;
    primary.execute("INSERT INTO ledger SELECT g, 1 FROM generate_series(1001, 2000) g")?;
    wait_caught_up(&primary, &standby)?;
    primary.stop()?;
    promote(&standby)?;
    standby.execute("INSERT INTO ledger SELECT g, 2 FROM generate_series(2001, 3000) g")?;
    wait_flushed(&daemon, &standby).with_context(|| daemon.log())?;
    let log = daemon.log();
    ensure!(daemon.stop()?.code() == Some(0), "{log}");
    ensure!(
        log.contains("following timeline 2"),
        "no timeline switch logged:\n{log}"
    );

    let (restored, _) = backup::restore_and_recover(&repo, "failover-restored", Restore::default().on(pg))?;
    let rows = restored
        .query_rows("SELECT tli, count(*), min(id), max(id) FROM ledger GROUP BY tli ORDER BY tli")?;
    let expected = vec![
        vec![
            Some("1".into()),
            Some("2000".into()),
            Some("1".into()),
            Some("2000".into()),
        ],
        vec![
            Some("2".into()),
            Some("1000".into()),
            Some("2001".into()),
            Some("3000".into()),
        ],
    ];
    ensure!(rows == expected, "restored {rows:?}\n{log}");
    ensure!(
        restored.timeline()? >= 3,
        "the restore should have followed timeline 2 and promoted past it"
    );
    Ok(())
}

#[test]
fn matrix_stream_pg15_beside_archive_command_both_store_the_same_segments() -> Result<()> {
    let pg = PgInstall::of_major(15)?;
    let repo = Repo::new_s3(Garage::shared())?;
    let archive_command = agents().archive_command(&repo, "");
    let cluster = streaming_cluster(
        pg,
        "beside",
        &[("archive_mode", "on"), ("archive_command", &archive_command)],
    )?;
    let daemon = Daemon::start_streaming(&repo, &pg_url(&cluster), &[])?;
    take_backup(&cluster, &repo).with_context(|| daemon.log())?;
    cluster.pgbench(&["-i", "-q", "-s", "4"])?;
    let last = walvault_testkit::fixtures::archive_everything(&cluster)?;
    wait_flushed(&daemon, &cluster).with_context(|| daemon.log())?;
    let log = daemon.log();
    ensure!(daemon.stop()?.code() == Some(0), "{log}");
    // Whichever came second found the same bytes: no conflict, no failure on either side.
    ensure!(
        !log.contains("different content") && !log.contains("ERROR"),
        "{log}"
    );
    let server_log = cluster.log();
    ensure!(!server_log.contains("archive command failed"), "{server_log}");
    // Both stored every segment, in either order or at once (Garage ignores create-only
    // writes, and each writer makes sure afterwards that what is stored is its own bytes): never
    // a conflict, never a failure.
    ensure!(repo.archived_names()?.contains(&last), "{last} is not archived");
    let (restored, _) = backup::restore_and_recover(&repo, "beside-restored", Restore::default().on(pg))?;
    let n = restored.query_one_string("SELECT count(*)::text FROM pgbench_accounts")?;
    ensure!(n == "400000", "restored {n} accounts");
    Ok(())
}

#[test]
fn matrix_stream_pg15_a_repository_outage_makes_the_stream_wait_and_loses_nothing() -> Result<()> {
    use walvault_testkit::faultproxy::{FaultProxy, Storm};
    let pg = PgInstall::of_major(15)?;
    let garage = Garage::shared();
    let repo = Repo::new_s3(garage)?;
    let upstream = garage
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .context("Garage's address")?;
    let proxy = FaultProxy::start(upstream, Storm::calm())?;
    repo.route_through(&proxy.endpoint())?;
    let cluster = streaming_cluster(pg, "outage", &[])?;
    let daemon = Daemon::start_streaming(&repo, &pg_url(&cluster), &[])?;
    take_backup(&cluster, &repo).with_context(|| daemon.log())?;
    cluster.execute("CREATE TABLE rows (id int PRIMARY KEY, pad text)")?;
    cluster.execute("INSERT INTO rows SELECT g, repeat('x', 100) FROM generate_series(1, 1000) g")?;
    wait_flushed(&daemon, &cluster).with_context(|| daemon.log())?;
    let before = daemon.metric("walvault_stream_flushed_lsn")?.unwrap_or(0.0);

    proxy.set_down(true);
    cluster.execute("INSERT INTO rows SELECT g, repeat('x', 100) FROM generate_series(1001, 200000) g")?;
    host::wait_for(
        "the daemon to report the outage",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            Ok(match daemon.log().contains("failed, retrying") {
                true => Poll::Done(()),
                false => Poll::Waiting(host::tail(&daemon.log(), 5)),
            })
        },
    )?;
    let lag = daemon.metric("walvault_stream_lag_bytes")?.unwrap_or(0.0);
    ensure!(lag > 0.0, "no lag reported during the outage:\n{}", daemon.log());
    // The slot holds what the repository does not have: it has not moved past where the
    // repository stood when the outage began, while the server wrote megabytes since.
    let held: f64 = cluster
        .query_one_string(
            "SELECT (restart_lsn - '0/0')::text FROM pg_replication_slots WHERE slot_name = 'walvault'",
        )?
        .parse()?;
    let now: f64 = cluster
        .query_one_string("SELECT (pg_current_wal_lsn() - '0/0')::text")?
        .parse()?;
    ensure!(
        held <= before,
        "the slot let go of WAL from {held} on, the repository held up to {before}"
    );
    ensure!(now - held > 8e6, "the slot holds only {} bytes", now - held);

    proxy.set_down(false);
    wait_flushed(&daemon, &cluster).with_context(|| daemon.log())?;
    let log = daemon.log();
    ensure!(daemon.stop()?.code() == Some(0), "{log}");
    ensure!(
        log.contains("bytes behind the server"),
        "the log does not say how far behind:\n{log}"
    );
    let (restored, _) = backup::restore_and_recover(&repo, "outage-restored", Restore::default().on(pg))?;
    let n = restored.query_one_string("SELECT count(*)::text FROM rows")?;
    ensure!(n == "200000", "restored {n} rows");
    Ok(())
}

#[test]
fn matrix_stream_pg14_kill9_restores_every_commit_older_than_the_flush_interval() -> Result<()> {
    kill_and_restore(14, Replication::Asynchronous)
}

#[test]
fn matrix_stream_pg15_follows_a_kill9_failover_and_restores_what_the_new_primary_has() -> Result<()> {
    let pg = PgInstall::of_major(15)?;
    let repo = Repo::new_s3(Garage::shared())?;
    let primary = streaming_cluster(pg, "crash-primary", &[])?;
    let standby = standby_of(&primary, "crash-standby")?;
    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=walvault password={PASSWORD} target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let daemon = Daemon::start_streaming(&repo, &url, &["--stream-flush", "200ms"])?;
    take_backup(&primary, &repo).with_context(|| daemon.log())?;
    // The writer's table is `acked`; the standby replays it asynchronously, a little behind.
    let writer = start_writer(&primary)?;
    thread::sleep(Duration::from_secs(4));
    kill9(&primary)?;
    let acked = writer.finish();
    promote(&standby)?;
    let survived: i64 = standby
        .query_one_string("SELECT coalesce(max(id), 0)::text FROM acked")?
        .parse()?;
    standby.execute("CREATE TABLE after (id int); INSERT INTO after SELECT generate_series(1, 500)")?;
    wait_flushed(&daemon, &standby).with_context(|| daemon.log())?;
    let log = daemon.log();
    ensure!(daemon.stop()?.code() == Some(0), "{log}");

    // The restore holds exactly what the new primary holds: the commits the standby had when it
    // was promoted (not those only the killed primary had), and what came after.
    let (restored, _) = backup::restore_and_recover(&repo, "crash-restored", Restore::default().on(pg))?;
    let max = restored_ids(&restored)?;
    ensure!(
        max == survived,
        "restored ids up to {max}, the new primary has up to {survived} ({} acknowledged by the old one)\n{log}",
        acked.len()
    );
    let after = restored.query_one_string("SELECT count(*)::text FROM after")?;
    ensure!(
        after == "500",
        "restored {after} rows written after the failover\n{log}"
    );
    eprintln!(
        "failover after kill -9: {} commits acknowledged by the old primary, {survived} on the promoted standby, all restored",
        acked.len()
    );
    Ok(())
}
