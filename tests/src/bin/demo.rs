//! walvault-demo: archive a real workload with `archive-agent`, restore it with `restore-agent`,
//! and show that the restored cluster holds the same rows.
//!
//! `cargo build --release --workspace --bins && cargo run --release -p walvault-testkit --bin walvault-demo`
//!
//! Everything happens in throwaway clusters and directories under the temp dir, removed at the
//! end whatever the outcome.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use walvault_testkit::fixtures::{
    RECOVERY_TIMEOUT, archive_everything, archiving_cluster, prepare_restore, segment_range,
};
use walvault_testkit::workload::{self, Workload};
use walvault_testkit::{Repo, agents, host};

const MIB: f64 = 1024.0 * 1024.0;

fn main() -> ExitCode {
    let outcome = run();
    // All clusters are stopped by now (dropped inside `run`); remove what outlives them.
    host::remove_own_scratch_dirs();
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            println!("\nDATA MISMATCH: the restored cluster differs from the source");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("\ndemo failed: {e:?}");
            ExitCode::FAILURE
        }
    }
}

/// `Ok(true)` when the restored data matches.
fn run() -> Result<bool> {
    let started = Instant::now();
    let step = |msg: &str| println!("[{:>6.1}s] {msg}", started.elapsed().as_secs_f64());

    walvault_testkit::agents::find_bin_dir()?;
    let agents = agents();
    step(&format!(
        "agents staged: {}, {}",
        agents.archive_agent().display(),
        agents.restore_agent().display()
    ));

    let repo = Repo::new()?;
    step(&format!(
        "repository created: archive-agent init --repo {} (push never creates one)",
        repo.url()
    ));
    let mut source = archiving_cluster("source", &repo, "")?;
    step(&format!(
        "source cluster up on port {}, archive_command = '{}'",
        source.port(),
        agents.archive_command(&repo, "")
    ));

    workload::create_payload_table(&source)?;
    let mut restored = source.base_backup("restored")?;
    let first = restored.backup_start_segment()?;
    step(&format!(
        "base backup taken (pg_basebackup -X none, no WAL inside), starts in segment {first}"
    ));

    let work = Workload::default();
    step(&format!(
        "workload: pgbench -i -s {}, pgbench -c {} -t {}, {} random 1-4 KiB payload rows, updates, deletes",
        work.scale, work.clients, work.transactions, work.payload_rows
    ));
    let t = Instant::now();
    workload::run(&source, &work)?;
    step(&format!("workload done in {:.1}s", t.elapsed().as_secs_f64()));

    let t = Instant::now();
    let last = archive_everything(&source)?;
    let segments = segment_range(&first, &last)?;
    let wal_bytes = segments.len() as f64 * 16.0 * MIB;
    let repo_bytes = repo.size()? as f64;
    step(&format!(
        "WAL switched and archived through {last} ({:.1}s after the workload)",
        t.elapsed().as_secs_f64()
    ));
    step(&format!(
        "repository: {} files; {} segments since the backup = {:.0} MiB of WAL stored in {:.1} MiB ({:.1}x smaller)",
        repo.files()?.len(),
        segments.len(),
        wal_bytes / MIB,
        repo_bytes / MIB,
        wal_bytes / repo_bytes.max(1.0)
    ));

    let expected = workload::fingerprints(&source)?;
    source.stop()?;
    step("source fingerprinted and stopped");

    prepare_restore(&restored, &repo, "")?;
    step(&format!(
        "restoring: restore_command = '{}', recovery.signal",
        agents.restore_command(&repo, "")
    ));
    let t = Instant::now();
    restored.start_and_wait_recovery_end(RECOVERY_TIMEOUT)?;
    let fetched = restored.restored_from_archive().len();
    step(&format!(
        "recovery done in {:.1}s: {fetched} segments fetched, end of archive reached, promoted",
        t.elapsed().as_secs_f64()
    ));

    let actual = workload::fingerprints(&restored)?;
    println!(
        "\n{:<18} {:>9} {:>9}  {:<32}  {:<32}",
        "table", "source", "restored", "source md5", "restored md5"
    );
    let mut matches = expected.len() == actual.len();
    for (e, a) in expected.iter().zip(&actual) {
        let same = e == a;
        matches &= same;
        println!(
            "{:<18} {:>9} {:>9}  {:<32}  {:<32}  {}",
            e.table,
            e.rows,
            a.rows,
            e.md5,
            a.md5,
            if same { "ok" } else { "DIFFERENT" }
        );
    }
    if matches {
        println!(
            "\ndata matches ({:.1}s in total)",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(matches)
}
