//! Ready-made setups the end-to-end tests and the demo share: a cluster archiving through
//! `archive-agent`, a restore through `restore-agent`, and real WAL files to push by hand; and
//! the constants they share (timeouts, the ledger's pace).

use std::fs;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::agents::agents;
use crate::cluster::{Cluster, InitOptions};
use crate::host::ScratchDir;
use crate::pg::PgInstall;
use crate::repo::Repo;

/// How long archiving everything written so far may take.
pub const ARCHIVE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long archive recovery may take.
pub const RECOVERY_TIMEOUT: Duration = Duration::from_secs(180);
/// Pause between two ledger transactions, so that their commit times are well apart (restores
/// to a recorded instant tell them apart).
pub const BETWEEN_TRANSACTIONS: Duration = Duration::from_millis(20);

/// A started cluster (`wal_level = replica`) whose `archive_command` is
/// `archive-agent push --repo <repo> <push_flags> %p`.
pub fn archiving_cluster(name: &str, repo: &Repo, push_flags: &str) -> Result<Cluster> {
    archiving_cluster_on(PgInstall::default_install(), name, repo, push_flags)
}

/// [`archiving_cluster`], run by the server `pg`.
pub fn archiving_cluster_on(
    pg: &'static PgInstall,
    name: &str,
    repo: &Repo,
    push_flags: &str,
) -> Result<Cluster> {
    let opts = InitOptions {
        pg: Some(pg),
        ..InitOptions::default()
    };
    let mut cluster = Cluster::init(name, &opts)?;
    let archive_command = agents().archive_command(repo, push_flags);
    cluster.set_conf(&[
        ("wal_level", "replica"),
        ("archive_mode", "on"),
        ("archive_command", &archive_command),
    ])?;
    cluster.start()?;
    Ok(cluster)
}

/// Complete the current WAL segment and wait until everything up to it is archived. Returns
/// the last segment archived.
pub fn archive_everything(cluster: &Cluster) -> Result<String> {
    let segment = cluster.switch_wal()?;
    cluster.wait_archived(&segment, ARCHIVE_TIMEOUT)?;
    Ok(segment)
}

/// Point `backup` (from [`Cluster::base_backup`]) at `repo` with
/// `restore_command = 'restore-agent fetch --repo <repo> <fetch_flags> %f %p'`.
pub fn prepare_restore(backup: &Cluster, repo: &Repo, fetch_flags: &str) -> Result<()> {
    backup.prepare_recovery(&agents().restore_command(repo, fetch_flags), &[])
}

/// Recovery stopped at `segment`, as PostgreSQL's `log` shows it: a FATAL naming the segment, and
/// restore-agent's line naming it with `cause`.
pub fn assert_fatal_at(log: &str, segment: &str, cause: &str) {
    assert!(
        log.lines().any(|l| l.contains("FATAL") && l.contains(segment)),
        "recovery must stop with a FATAL naming {segment}:\n{log}"
    );
    assert!(
        log.lines().any(|l| l.contains(segment) && l.contains(cause)),
        "restore-agent must say {segment}: {cause}:\n{log}"
    );
}

/// The WAL segment names from `first` to `last` inclusive (16 MiB segments).
pub fn segment_range(first: &str, last: &str) -> Result<Vec<String>> {
    let parse = |n: &str| -> Result<(u32, u32, u32)> {
        let field = |i: usize| {
            n.get(i * 8..i * 8 + 8)
                .and_then(|f| u32::from_str_radix(f, 16).ok())
                .with_context(|| format!("{n:?} is not a WAL segment name"))
        };
        anyhow::ensure!(n.len() == 24, "{n:?} is not a WAL segment name");
        Ok((field(0)?, field(1)?, field(2)?))
    };
    let (tli, mut log, mut seg) = parse(first)?;
    let end = parse(last)?;
    anyhow::ensure!(
        end.0 == tli && (end.1, end.2) >= (log, seg),
        "bad segment range {first}..={last}"
    );
    let mut names = Vec::new();
    while (log, seg) <= (end.1, end.2) {
        names.push(format!("{tli:08X}{log:08X}{seg:08X}"));
        // 256 segments of 16 MiB per 4 GiB log file.
        (log, seg) = if seg == 0xFF { (log + 1, 0) } else { (log, seg + 1) };
    }
    Ok(names)
}

/// Real, complete WAL segments of one cluster, copied out by a plain `cp` archive_command, for
/// tests that push and fetch by hand.
#[derive(Debug)]
pub struct WalSamples {
    /// Sorted by name; at least the number asked for.
    pub segments: Vec<PathBuf>,
    /// The producing cluster's system identifier (decimal, as PostgreSQL prints it).
    pub system_identifier: String,
    _dir: ScratchDir,
}

impl WalSamples {
    /// Run a throwaway cluster long enough to complete `count` segments, then stop it.
    pub fn produce(name: &str, count: usize) -> Result<WalSamples> {
        let dir = ScratchDir::new(&format!("samples-{name}"))?;
        let mut cluster = Cluster::init(name, &InitOptions::default())?;
        let archive_command = format!("test ! -f {0}/%f && cp %p {0}/%f", dir.path().display());
        cluster.set_conf(&[("archive_mode", "on"), ("archive_command", &archive_command)])?;
        cluster.start()?;
        cluster.execute("CREATE TABLE filler (id serial, body text)")?;
        for _ in 0..count {
            cluster
                .execute("INSERT INTO filler (body) SELECT md5(g::text) FROM generate_series(1, 1000) g")?;
            archive_everything(&cluster)?;
        }
        let system_identifier = cluster.system_identifier()?;
        cluster.stop()?;
        let mut segments: Vec<PathBuf> = fs::read_dir(dir.path())?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        segments.retain(|p| p.file_name().is_some_and(|n| n.len() == 24));
        segments.sort();
        if segments.len() < count {
            bail!("expected {count} archived segments from {name}, got {segments:?}");
        }
        Ok(WalSamples {
            segments,
            system_identifier,
            _dir: dir,
        })
    }

    /// The `i`th segment's path and name.
    pub fn segment(&self, i: usize) -> (PathBuf, String) {
        let path = self.segments[i].clone();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        (path, name)
    }

    /// The `i`th segment's bytes.
    pub fn bytes(&self, i: usize) -> Vec<u8> {
        fs::read(&self.segments[i]).unwrap_or_else(|e| panic!("reading {}: {e}", self.segments[i].display()))
    }
}

/// Three segments of one cluster, produced once per test process.
pub fn wal_samples() -> &'static WalSamples {
    static SAMPLES: OnceLock<WalSamples> = OnceLock::new();
    SAMPLES.get_or_init(|| WalSamples::produce("samples", 3).unwrap_or_else(|e| panic!("{e:#}")))
}

/// One segment of a second, unrelated cluster (another system identifier).
pub fn foreign_wal_samples() -> &'static WalSamples {
    static SAMPLES: OnceLock<WalSamples> = OnceLock::new();
    SAMPLES.get_or_init(|| WalSamples::produce("foreign", 1).unwrap_or_else(|e| panic!("{e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_ranges_cross_log_boundaries() {
        let r = segment_range("0000000100000000000000FE", "000000010000000100000001").unwrap();
        assert_eq!(
            r,
            [
                "0000000100000000000000FE",
                "0000000100000000000000FF",
                "000000010000000100000000",
                "000000010000000100000001"
            ]
        );
        assert_eq!(
            segment_range("000000010000000000000003", "000000010000000000000003")
                .unwrap()
                .len(),
            1
        );
        assert!(segment_range("000000010000000000000003", "000000010000000000000002").is_err());
        assert!(segment_range("00000001000000000000000", "000000010000000000000002").is_err());
    }
}
