//! `archive-agent backup --max-rate`: the bytes a backup sends to the repository never come faster
//! than the cap, over all its parallel uploads, and `--json` says what was sent at what rate.
//! A lower bound on the time only: a slow machine makes it longer, never shorter.

use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use serde_json::Value;
use walvault_testkit::Repo;
use walvault_testkit::agents::agents;
use walvault_testkit::fixtures::{archive_everything, archiving_cluster};

/// 4 MiB per second.
const RATE: u64 = 4 << 20;

#[test]
fn a_capped_backup_takes_no_less_time_than_its_bytes_at_the_rate() -> Result<()> {
    let repo = Repo::new()?;
    let source = archiving_cluster("max-rate", &repo, "")?;
    // About 16 MB of md5 text: it compresses to about half, so the backup sends several
    // seconds' worth at the cap.
    source.execute(
        "CREATE TABLE payload (id integer, body text);
         INSERT INTO payload SELECT g, md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text)
         FROM generate_series(1, 120000) g",
    )?;
    archive_everything(&source)?;
    let data_dir = source.data_dir();
    let mut args = vec!["backup".to_string()];
    args.extend(repo.args());
    args.extend(
        [
            "--pgdata",
            data_dir.to_str().context("data directory path")?,
            "--pg-url",
            &source.conn_string(),
            "--parallel",
            "8",
            "--max-rate",
            "4MiB",
            "--json",
        ]
        .map(String::from),
    );
    let started = Instant::now();
    let run = agents().run("archive-agent", args).check()?;
    let elapsed = started.elapsed().as_secs_f64();
    let report: Value = serde_json::from_str(&run.stdout).with_context(|| format!("no JSON:\n{run}"))?;
    let sent = &report["sent"];
    let bytes = sent["bytes_sent"]
        .as_u64()
        .ok_or_else(|| anyhow!("no sent.bytes_sent in {report:#}"))?;
    let effective = sent["effective_rate"].as_f64().unwrap_or(f64::MAX);
    eprintln!(
        "backup --max-rate 4MiB --parallel 8: {bytes} bytes sent in {elapsed:.1}s (at least {:.1}s at the \
         cap), effective {:.2} MiB/s",
        bytes as f64 / RATE as f64,
        effective / f64::from(1 << 20)
    );
    assert_eq!(sent["max_rate"].as_u64(), Some(RATE), "{report:#}");
    assert!(
        bytes > 2 * RATE,
        "the test needs over two seconds' worth of bytes: {bytes}"
    );
    assert!(
        elapsed >= bytes as f64 / RATE as f64,
        "{bytes} bytes at 4 MiB/s take {:.2}s at least, the backup took {elapsed:.2}s",
        bytes as f64 / RATE as f64
    );
    assert!(
        effective <= RATE as f64,
        "effective rate {effective} above the cap: {report:#}"
    );
    Ok(())
}
