//! Replay you can watch: a restore to a time several segments past the backup. Each segment
//! `restore-agent fetch` hands PostgreSQL is logged in the server log as "replay progress:
//! segment ... (n of N, ...)", n climbing from the backup's first segment to the target's;
//! `restore-agent status --pgdata` reports the recovery in progress while it is paused at the
//! target, and finished, with the final progress, once promoted.

use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use serde_json::Value;
use walvault_testkit::agents::{RESTORE_AGENT, agents};
use walvault_testkit::backup::{Restore, restore_new_cluster, take_backup};
use walvault_testkit::fixtures::{RECOVERY_TIMEOUT, archive_everything, archiving_cluster};
use walvault_testkit::host::{Finished, ScratchDir};
use walvault_testkit::workload::{self, Ledger, format_lsn, parse_lsn};
use walvault_testkit::{Cluster, Repo};

/// One progress line of the server log: (segment, n, N).
fn progress_lines(log: &str) -> Result<Vec<(String, u64, u64)>> {
    log.lines()
        .filter_map(|l| l.split("replay progress: segment ").nth(1))
        .map(|rest| {
            // `(n of N, p%)`, or past the plan's last segment `(n, past the N planned ...)`.
            let parse = || -> Option<(String, u64, u64)> {
                let (segment, rest) = rest.split_once(" (")?;
                let (n, rest) = rest
                    .split_once(" of ")
                    .or_else(|| rest.split_once(", past the "))?;
                let total = rest.split([',', ' ', ')']).next()?;
                Some((segment.to_string(), n.parse().ok()?, total.parse().ok()?))
            };
            parse().ok_or_else(|| anyhow!("unexpected progress line: {rest}"))
        })
        .collect()
}

/// `restore-agent status --pgdata <dir> [extra]`, as the PostgreSQL user.
fn status(pgdata: &std::path::Path, extra: &[&str]) -> Finished {
    let mut args = vec![
        "status".to_string(),
        "--pgdata".into(),
        pgdata.display().to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    agents().run(RESTORE_AGENT, args)
}

fn status_json(cluster: &Cluster) -> Result<Value> {
    let run = status(&cluster.data_dir(), &["--json"]).check()?;
    serde_json::from_str(&run.stdout).with_context(|| format!("status JSON: {}", run.stdout))
}

#[test]
fn replay_progress_is_logged_and_reported_by_status() -> Result<()> {
    let repo = Repo::new()?;
    let mut source = archiving_cluster("progress-source", &repo, "")?;
    workload::create_ledger(&source)?;
    let mut ledger = Ledger::connect(&source)?;
    ledger.commit()?;
    let backup = take_backup(&source, &repo)?;
    // One ledger commit per segment after the backup.
    let mut commits = Vec::new();
    for _ in 0..10 {
        commits.push(ledger.commit()?);
        thread::sleep(Duration::from_millis(20));
        source.switch_wal()?;
    }
    drop(ledger);
    archive_everything(&source)?;
    source.stop()?;

    // Paused at the target, then promoted by hand: status sees both states.
    let target = &commits[6];
    let (mut cluster, run) = restore_new_cluster(
        &repo,
        "progress-restored",
        Restore::with(&["--target-time", &target.state.time, "--target-action", "pause"]),
    )?;
    let plan: Value =
        serde_json::from_slice(&std::fs::read(cluster.data_dir().join("walvault-recovery.json"))?)?;
    assert_eq!(plan["format"], "walvault-recovery-plan", "{plan}");
    assert_eq!(plan["backup"].as_str(), Some(backup.id.as_str()), "{plan}");
    assert_eq!(
        plan["first_segment"].as_str(),
        Some(backup.start_wal.as_str()),
        "{plan}"
    );
    assert_eq!(
        plan["last_is_upper_bound"], false,
        "the time index places the target: {plan}"
    );
    let before = status(&cluster.data_dir(), &[]);
    assert!(
        before.code() == Some(0) && before.stdout.contains("no segment fetched yet"),
        "{before}"
    );

    cluster.start()?;
    cluster
        .wait_replay_paused(RECOVERY_TIMEOUT)
        .with_context(|| format!("restored with:\n{}\n{}", run.stdout, cluster.log_tail()))?;
    assert_eq!(
        workload::ledger_contents(&cluster)?,
        target.state.contents,
        "paused at the target"
    );

    // The plan placed the target where PostgreSQL stopped: replay paused in its last segment.
    let replayed = parse_lsn(&cluster.query_one_string("SELECT pg_last_wal_replay_lsn()::text")?)?;
    assert_eq!(
        replayed / SEGMENT_SIZE,
        segment_no(&plan, "last_segment")?,
        "paused at {} ({plan})",
        format_lsn(replayed)
    );

    let log = cluster.log();
    let lines = progress_lines(&log)?;
    let shown: Vec<&str> = log.lines().filter(|l| l.contains("replay progress:")).collect();
    eprintln!("{}", shown.join("\n"));
    let total = segment_no(&plan, "last_segment")? - segment_no(&plan, "first_segment")? + 1;
    assert!(
        run.stdout.contains(&format!("replay: {total} segments")),
        "restore names the replay ahead: {}",
        run.stdout
    );
    ensure!(
        lines.len() >= 3 && total >= 7,
        "a replay of several segments logs a line for each ({total} planned):\n{log}"
    );
    assert_eq!(lines[0].1, 1, "the first segment is the backup's: {shown:?}");
    assert!(
        lines.windows(2).all(|w| w[0].1 <= w[1].1),
        "n never goes back: {shown:?}"
    );
    assert!(
        lines.iter().all(|l| l.2 == total),
        "every line counts against the plan's {total}: {shown:?}"
    );
    let last_n = lines.last().map_or(0, |l| l.1);
    assert!(last_n >= total, "replay reached the target's segment: {shown:?}");
    assert!(
        shown.iter().any(|l| l.contains(", commits replayed up to 20")),
        "the commit time reached is logged: {shown:?}"
    );
    assert!(
        shown.iter().any(|l| l.contains(" to the target")),
        "an ETA is logged once there is a rate: {shown:?}"
    );

    // Paused at the target: in recovery, the server running.
    let paused = status_json(&cluster)?;
    assert_eq!(paused["state"], "in_progress", "{paused}");
    assert_eq!(paused["signal_file"], "recovery.signal", "{paused}");
    assert_eq!(paused["progress"]["n"].as_u64(), Some(last_n), "{paused}");
    let text = status(&cluster.data_dir(), &[]).check()?.stdout;
    assert!(
        text.contains("in progress (recovery.signal, PostgreSQL running)"),
        "{text}"
    );

    // Ending recovery, PostgreSQL reads the segment where replay stopped once more.
    cluster.execute("SELECT pg_promote()")?;
    let log = cluster.log();
    let lines = progress_lines(&log)?;
    let last = lines.last().context("progress lines")?;
    let done = status_json(&cluster)?;
    assert_eq!(done["state"], "finished", "{done}");
    assert_eq!(done["backup"].as_str(), Some(backup.id.as_str()), "{done}");
    assert_eq!(done["segments"].as_u64(), Some(total), "{done}");
    let progress = &done["progress"];
    assert_eq!(progress["n"].as_u64(), Some(last.1), "{done}");
    assert_eq!(progress["total"].as_u64(), Some(total), "{done}");
    assert_eq!(progress["segment"].as_str(), Some(last.0.as_str()), "{done}");
    let reached = progress["commits_replayed_up_to"]
        .as_str()
        .context("the commit time reached")?;
    assert!(
        walvault::time::parse_time(reached)? <= target.state.unix_micros,
        "replay stopped at the target, so did the commit time reached: {done}"
    );
    let text = status(&cluster.data_dir(), &[]).check()?.stdout;
    eprintln!("{text}");
    assert!(text.contains("recovery finished"), "{text}");
    assert!(
        text.contains(&format!("{} of {total}", last.1))
            || text.contains(&format!("{}, past the {total}", last.1)),
        "{text}"
    );

    // Anything else: one line, exit 1.
    let elsewhere = ScratchDir::new("progress-none")?;
    let none = status(elsewhere.path(), &[]);
    assert_eq!(none.code(), Some(1), "{none}");
    assert!(none.stderr.contains("no walvault recovery here"), "{none}");
    cluster.stop()?;
    Ok(())
}

/// PostgreSQL's default, which the test clusters use.
const SEGMENT_SIZE: u64 = 16 << 20;

/// The number of segment `plan[key]` (by LSN).
fn segment_no(plan: &Value, key: &str) -> Result<u64> {
    let name = plan[key]
        .as_str()
        .with_context(|| format!("plan has no {key}: {plan}"))?;
    ensure!(name.len() == 24, "{key} {name:?} is not a segment name");
    let log = u64::from_str_radix(&name[8..16], 16)?;
    let seg = u64::from_str_radix(&name[16..24], 16)?;
    Ok(log * 256 + seg)
}
