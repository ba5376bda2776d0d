//! walvault-demo: the story walvault exists for, on a real PostgreSQL. A repository is created,
//! a base backup taken with walvault, a workload runs, and at a recorded moment a table full of
//! data is dropped by accident while work goes on. `restore-agent find` names the accident and
//! prints the restore command for the moment before it; that command, run as printed, brings the
//! table back with exactly its rows. A restore drill then proves the repository restores, with
//! its RTO and RPO.
//!
//! `scripts/demo.sh` (installs PostgreSQL when missing, builds, runs this).
//!
//! Everything happens in throwaway clusters and directories under the temp dir, removed at the
//! end whatever the outcome.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use walvault_testkit::agents::RESTORE_AGENT;
use walvault_testkit::backup::take_backup;
use walvault_testkit::fixtures::{RECOVERY_TIMEOUT, archive_everything, archiving_cluster};
use walvault_testkit::host::{self, ScratchDir};
use walvault_testkit::workload::{Workload, table_fingerprint};
use walvault_testkit::{Cluster, Repo, agents};

const MIB: f64 = 1024.0 * 1024.0;
/// Rows of the table the accident drops.
const ORDERS: u32 = 50_000;

fn main() -> ExitCode {
    let outcome = run();
    // All clusters are stopped by now (dropped inside `run`); remove what outlives them.
    host::remove_own_scratch_dirs();
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            println!("\nDEMO FAILED: see above");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("\ndemo failed: {e:?}");
            ExitCode::FAILURE
        }
    }
}

fn restore_agent(args: Vec<String>) -> Result<String> {
    Ok(agents().run(RESTORE_AGENT, args).check()?.stdout)
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

/// `Ok(true)` when the dropped table came back exactly and the drill passed.
fn run() -> Result<bool> {
    let started = Instant::now();
    let step = |msg: &str| println!("[{:>6.1}s] {msg}", started.elapsed().as_secs_f64());

    walvault_testkit::agents::find_bin_dir()?;
    let agents = agents();
    let repo = Repo::new()?;
    step(&format!("archive-agent init --repo {}", repo.url()));
    let mut source = archiving_cluster("source", &repo, "")?;
    step(&format!(
        "PostgreSQL {} up on port {}, archive_command = '{}'",
        source.pg().major(),
        source.port(),
        agents.archive_command(&repo, "")
    ));

    source.execute(&format!(
        "CREATE TABLE orders (id integer PRIMARY KEY, customer integer NOT NULL, amount numeric(12,2) NOT NULL, placed timestamptz NOT NULL);
         INSERT INTO orders SELECT g, g % 997, (g * 7919 % 100000) / 100.0, '2026-01-01'::timestamptz + g * interval '1 minute'
           FROM generate_series(1, {ORDERS}) g"
    ))?;
    let work = Workload::default();
    source.pgbench(&["-i", "-s", &work.scale.to_string(), "-q"])?;
    step(&format!(
        "tables created: orders ({ORDERS} rows), pgbench -i -s {}",
        work.scale
    ));

    let t = Instant::now();
    let backup = take_backup(&source, &repo)?;
    step(&format!(
        "archive-agent backup: {} ({:.0} MiB of data directory stored in {:.1} MiB, {} chunks) in {:.1}s",
        backup.id,
        backup.logical_bytes as f64 / MIB,
        backup.stored_bytes as f64 / MIB,
        backup.chunks,
        t.elapsed().as_secs_f64()
    ));

    source.pgbench(&[
        "-c",
        &work.clients.to_string(),
        "-t",
        &work.transactions.to_string(),
    ])?;
    source
        .execute("INSERT INTO orders SELECT g, g % 997, 12.34, now() FROM generate_series(50001, 50500) g")?;
    step(&format!(
        "workload: pgbench -c {} -t {}, 500 new orders",
        work.clients, work.transactions
    ));

    let before = table_fingerprint(&source, "orders", "id")?;
    let accident_at = source.query_one_string("SELECT clock_timestamp()::text")?;
    source.execute("DROP TABLE orders")?;
    step(&format!(
        "ACCIDENT at {accident_at}: DROP TABLE orders ({} rows, md5 {})",
        before.rows, before.md5
    ));
    source.pgbench(&[
        "-c",
        &work.clients.to_string(),
        "-t",
        &(work.transactions / 2).to_string(),
    ])?;
    let last = archive_everything(&source)?;
    step(&format!("work went on; WAL archived through {last}"));
    let accounts = table_fingerprint(&source, "pgbench_accounts", "aid")?;
    source.stop()?;

    // Find the accident.
    let mut restored = Cluster::uninitialized("restored")?;
    let pgdata = restored.data_dir();
    let mut find = vec!["find".to_string()];
    find.extend(repo.args());
    find.extend(["--pgdata".to_string(), pgdata.display().to_string()]);
    let t = Instant::now();
    let human = restore_agent(find.clone())?;
    step(&format!(
        "restore-agent find ({:.1}s):\n\n{}",
        t.elapsed().as_secs_f64(),
        indent(&human)
    ));
    find.push("--json".into());
    let found: Value = serde_json::from_str(&restore_agent(find)?)?;
    let event = found["events"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| {
            e["actions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|a| a["kind"] == "drop" && a["object"] == "public.orders")
        })
        .context("find did not name the DROP TABLE orders")?;
    let command = event["restore_command"]
        .as_str()
        .context("the event has no restore command")?
        .to_string();

    // Restore to just before it, with the printed command.
    let t = Instant::now();
    let mut sh = host::pg_user_command("sh");
    sh.args(["-c", &command]);
    let out = host::run(&mut sh, Duration::from_secs(600))?.check()?;
    print!("{}", indent(&out.stdout));
    // The restored copy must not archive into the repository as a new timeline.
    restored.set_conf(&[("archive_mode", "off")])?;
    restored.start_and_wait_recovery_end(RECOVERY_TIMEOUT)?;
    step(&format!(
        "restored with the printed command and recovered in {:.1}s ({} segments replayed)",
        t.elapsed().as_secs_f64(),
        restored.restored_from_archive().len()
    ));
    let back = table_fingerprint(&restored, "orders", "id")?;
    let same = back == before;
    println!(
        "\n    orders before the accident: {:>6} rows  md5 {}\n    orders restored:            {:>6} rows  md5 {}  {}\n",
        before.rows,
        before.md5,
        back.rows,
        back.md5,
        if same { "IDENTICAL" } else { "DIFFERENT" }
    );
    restored.stop()?;

    // A drill: latest state, with a check of the work done after the accident.
    let scratch = ScratchDir::new("demo-drill")?;
    let checks = scratch.path().join("checks.sql");
    host::write_for_pg(
        &checks,
        format!(
            "SELECT count(*) = {} FROM pgbench_accounts;\nSELECT to_regclass('orders') IS NULL;\n",
            accounts.rows
        )
        .as_bytes(),
    )?;
    let mut drill = vec!["drill".to_string()];
    drill.extend(repo.args());
    drill.extend(
        [
            "--scratch",
            &scratch.path().display().to_string(),
            "--check-sql",
            &checks.display().to_string(),
            "--amcheck",
            "--rto-target",
            "10m",
            "--rpo-target",
            "1h",
        ]
        .map(String::from),
    );
    let t = Instant::now();
    let run = agents.run(RESTORE_AGENT, drill);
    step(&format!(
        "restore-agent drill ({:.1}s):\n\n{}",
        t.elapsed().as_secs_f64(),
        indent(&run.stdout)
    ));
    let drill_passed = run.code() == Some(0);
    if !drill_passed {
        println!("{run}");
    }
    if !same {
        bail!("the restored orders differ from the table before the accident");
    }
    println!(
        "the dropped table is back with exactly its rows, and the drill {} ({:.1}s in total)",
        if drill_passed { "passed" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    Ok(same && drill_passed)
}
