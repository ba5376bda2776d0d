//! walvault-restore-parallel: how fast `restore-agent restore` rebuilds one backup from each kind
//! of store (file://, S3 on Garage, Azure on Azurite) at several `--parallel` values, to choose
//! the default per store. A measurement, never a pass/fail test.
//!
//! One cluster with a pgbench database (`--scale`, default 20) archives into three repositories at
//! once and is backed up into each; then each backup is restored `--repeat` times at each value of
//! `--parallel`, into a fresh directory (page cache dropped before each run when root). Prints one
//! line per (store, parallel): median seconds, MiB/s, distinct chunks fetched.
//!
//! Usage: walvault-restore-parallel [--scale N] [--repeat N] [--parallel 1,2,4,8,16]
//! (as root: clusters run as postgres). Builds nothing: run `cargo build --release --workspace
//! --bins` first.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use walvault_testkit::agents::agents;
use walvault_testkit::azurite::Azurite;
use walvault_testkit::backup::{self, take_backup};
use walvault_testkit::fixtures::archive_everything;
use walvault_testkit::garage::Garage;
use walvault_testkit::host::ScratchDir;
use walvault_testkit::{Cluster, Repo};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("walvault-restore-parallel: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn run() -> Result<()> {
    let scale = arg("--scale", "20");
    let repeat: usize = arg("--repeat", "3").parse().context("--repeat")?;
    let parallels: Vec<usize> = arg("--parallel", "1,2,4,8,16")
        .split(',')
        .map(|p| p.parse().context("--parallel"))
        .collect::<Result<_>>()?;
    let garage = Garage::start(1)?;
    let azurite = Azurite::start()?;
    let repos = [
        ("file", Repo::new_file()?),
        ("s3", Repo::new_s3(&garage)?),
        ("azure", Repo::new_azure(&azurite)?),
    ];
    let mut cluster = Cluster::init("restore-parallel", &Default::default())?;
    let archive_command = repos
        .iter()
        .map(|(_, r)| agents().archive_command(r, ""))
        .collect::<Vec<_>>()
        .join(" && ");
    cluster.set_conf(&[
        ("wal_level", "replica"),
        ("archive_mode", "on"),
        ("archive_command", &archive_command),
        ("max_wal_size", "4GB"),
    ])?;
    cluster.start()?;
    cluster.pgbench(&["-i", "-q", "-s", &scale])?;
    cluster.execute("CHECKPOINT")?;
    let mut summaries = vec![];
    for (_, repo) in &repos {
        summaries.push(take_backup(&cluster, repo)?);
    }
    archive_everything(&cluster)?;
    cluster.stop()?;
    let s = &summaries[0];
    println!(
        "backup: {} files, {:.0} MiB, {} chunk references, pgbench scale {scale}",
        s.files,
        s.logical_bytes as f64 / 1048576.0,
        s.chunks
    );
    println!("store   parallel  median_s  min_s   max_s   MiB/s   chunks_fetched");
    let scratch = ScratchDir::new("restore-parallel")?;
    for (kind, repo) in &repos {
        for &p in &parallels {
            let mut times = vec![];
            let mut fetched = String::new();
            for i in 0..repeat {
                let dir = scratch.path().join(format!("{kind}-{p}-{i}"));
                drop_caches();
                let started = Instant::now();
                let run = backup::restore(repo, &dir, &["--parallel", &p.to_string()])?.check()?;
                times.push(started.elapsed().as_secs_f64());
                fetched = run
                    .stdout
                    .split("fetched ")
                    .nth(1)
                    .and_then(|t| t.split_whitespace().next())
                    .unwrap_or("?")
                    .to_string();
                std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            }
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            println!(
                "{kind:<7} {p:>8}  {median:>8.2}  {:>6.2}  {:>6.2}  {:>6.1}  {fetched}",
                times[0],
                times[times.len() - 1],
                s.logical_bytes as f64 / 1048576.0 / median
            );
        }
    }
    if summaries.iter().any(|x| x.chunks != s.chunks) {
        bail!("the three backups differ: {summaries:?}");
    }
    Ok(())
}

/// Drop the page cache (root only), so each restore reads a file repository from disk alike.
fn drop_caches() {
    let _ = std::process::Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}
