//! Base backups and restores through the agents, as a DBA runs them: `archive-agent backup`
//! against a running cluster, `restore-agent restore` into a new data directory, and
//! `restore-agent info --json`.

use std::path::Path;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde_json::Value;

use crate::agents::{ARCHIVE_AGENT, RESTORE_AGENT, agents};
use crate::cluster::Cluster;
use crate::fixtures::RECOVERY_TIMEOUT;
use crate::host::Finished;
use crate::pg::PgInstall;
use crate::repo::Repo;
use crate::workload::{self, LedgerState};

/// What `archive-agent backup --json` printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    pub id: String,
    pub timeline: u32,
    /// As printed: `YYYY-MM-DD HH:MM:SS[.ffffff]+00`.
    pub start_time: String,
    pub stop_time: String,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub start_wal: String,
    pub stop_wal: String,
    pub files: u64,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    pub new_bytes: u64,
    pub new_chunks: u64,
    pub chunks: u64,
    /// Files taken over from the previous backup unread, and their bytes.
    pub reused_files: u64,
    pub reused_bytes: u64,
}

impl BackupSummary {
    /// Read the JSON object a backup printed.
    pub fn parse(json: &str) -> Result<BackupSummary> {
        let v: Value = serde_json::from_str(json.trim()).with_context(|| format!("backup JSON: {json}"))?;
        let text = |k: &str| {
            v[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("backup JSON has no string {k:?}: {v}"))
        };
        let num = |k: &str| {
            v[k].as_u64()
                .ok_or_else(|| anyhow!("backup JSON has no number {k:?}: {v}"))
        };
        Ok(BackupSummary {
            id: text("id")?,
            timeline: u32::try_from(num("timeline")?)?,
            start_time: text("start_time")?,
            stop_time: text("stop_time")?,
            start_lsn: text("start_lsn")?,
            stop_lsn: text("stop_lsn")?,
            start_wal: text("start_wal")?,
            stop_wal: text("stop_wal")?,
            files: num("files")?,
            logical_bytes: num("logical_bytes")?,
            stored_bytes: num("stored_bytes")?,
            new_bytes: num("new_bytes")?,
            new_chunks: num("new_chunks")?,
            chunks: num("chunks")?,
            reused_files: num("reused_files")?,
            reused_bytes: num("reused_bytes")?,
        })
    }
}

/// Take an online base backup of the running `cluster` into `repo` (`archive-agent backup
/// --json`, as the PostgreSQL user). The cluster must archive into `repo`.
pub fn take_backup(cluster: &Cluster, repo: &Repo) -> Result<BackupSummary> {
    take_backup_with(cluster, repo, &[])
}

/// [`take_backup`] with more `archive-agent backup` flags.
pub fn take_backup_with(cluster: &Cluster, repo: &Repo, extra: &[&str]) -> Result<BackupSummary> {
    let data_dir = cluster.data_dir();
    let mut args = vec!["backup".to_string()];
    args.extend(repo.args());
    args.extend(
        [
            "--pgdata",
            path_str(&data_dir)?,
            "--pg-url",
            &cluster.conn_string(),
            "--json",
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|a| a.to_string()));
    let run = agents()
        .run(ARCHIVE_AGENT, args)
        .check()
        .with_context(|| format!("backup of cluster {}\n{}", cluster.name(), cluster.log_tail()))?;
    BackupSummary::parse(&run.stdout)
}

/// Wait long enough that the next backup gets a new id (ids have a one-second resolution).
pub fn next_backup_second() {
    thread::sleep(Duration::from_millis(1100));
}

/// `restore-agent restore --repo <repo> --pgdata <dir> --retry-timeout 5s <args...>` (unless
/// `args` give their own `--retry-timeout`), as the
/// PostgreSQL user (so the restored files belong to the server). Not checked: see
/// [`Finished::check`].
pub fn restore(repo: &Repo, pgdata: &Path, args: &[&str]) -> Result<Finished> {
    let mut all = vec!["restore".to_string()];
    all.extend(repo.args());
    all.extend(["--pgdata", path_str(pgdata)?].map(String::from));
    if !args.contains(&"--retry-timeout") {
        all.extend(["--retry-timeout", "5s"].map(String::from));
    }
    all.extend(args.iter().map(|a| a.to_string()));
    Ok(agents().run(RESTORE_AGENT, all))
}

/// Whether a restored cluster archives once started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Archiving {
    /// `archive_mode = off`: once started, the cluster leaves the repository as it found it.
    Off,
    /// The source's `archive_command` kept, into the same repository: a new timeline's WAL once
    /// promoted.
    Kept,
}

/// How [`restore_new_cluster`], [`restore_and_recover`] and [`assert_restores_to`] restore a new
/// cluster: more `restore-agent restore` flags (a backup, a target, a timeline), the server that
/// runs it, and whether it archives. [`Restore::default`]: no flags, the default server,
/// archiving off.
#[derive(Debug, Clone, Copy)]
pub struct Restore<'a> {
    /// More `restore-agent restore` flags, after `--repo` and `--pgdata`.
    pub args: &'a [&'a str],
    /// The server that runs the restored cluster.
    pub pg: &'static PgInstall,
    pub archiving: Archiving,
}

impl Default for Restore<'_> {
    fn default() -> Self {
        Restore::with(&[])
    }
}

impl<'a> Restore<'a> {
    /// With the flags `args`, on the default server, archiving off.
    pub fn with(args: &'a [&'a str]) -> Restore<'a> {
        Restore {
            args,
            pg: PgInstall::default_install(),
            archiving: Archiving::Off,
        }
    }

    /// Run by server `pg`.
    pub fn on(self, pg: &'static PgInstall) -> Restore<'a> {
        Restore { pg, ..self }
    }

    /// Archiving kept ([`Archiving::Kept`]).
    pub fn archiving(self) -> Restore<'a> {
        Restore {
            archiving: Archiving::Kept,
            ..self
        }
    }
}

/// A new cluster named `name` (not started) restored from `repo` by [`restore`] as `how` says,
/// which must succeed. Returns it with the restore's output.
pub fn restore_new_cluster(repo: &Repo, name: &str, how: Restore) -> Result<(Cluster, Finished)> {
    let cluster = Cluster::uninitialized_on(name, how.pg)?;
    let args = how.args;
    let run = restore(repo, &cluster.data_dir(), args)?
        .check()
        .with_context(|| format!("restore of {name} with {args:?}"))?;
    if how.archiving == Archiving::Off {
        cluster.set_conf(&[("archive_mode", "off")])?;
    }
    Ok((cluster, run))
}

/// [`restore_new_cluster`], then started, recovered and promoted; returns the cluster with
/// what restore printed.
pub fn restore_and_recover(repo: &Repo, name: &str, how: Restore) -> Result<(Cluster, String)> {
    let (mut cluster, run) = restore_new_cluster(repo, name, how)?;
    let args = how.args;
    cluster
        .start_and_wait_recovery_end(RECOVERY_TIMEOUT)
        .with_context(|| format!("recovery of {name} ({args:?}), restored with:\n{}", run.stdout))?;
    Ok((cluster, run.stdout))
}

/// [`restore_and_recover`] to the instant `state` was recorded (`--target-time`, then `how`'s
/// flags: a timeline, a backup), asserting that the restored ledger holds exactly that state.
/// Returns the cluster with what restore printed.
pub fn assert_restores_to(
    repo: &Repo,
    name: &str,
    state: &LedgerState,
    how: Restore,
) -> Result<(Cluster, String)> {
    let mut args = vec!["--target-time", state.time.as_str()];
    args.extend_from_slice(how.args);
    let (cluster, report) = restore_and_recover(repo, name, Restore { args: &args, ..how })?;
    let found = workload::ledger_contents(&cluster)?;
    assert_eq!(
        found,
        state.contents,
        "{name}: restored to {} ({args:?}), the ledger differs from the state recorded then\n\
         restore said:\n{report}\n{}",
        state.time,
        cluster.log_tail()
    );
    Ok((cluster, report))
}

/// `restore-agent info --repo <repo> --json`, parsed.
pub fn info(repo: &Repo) -> Result<Value> {
    let mut args = vec!["info".to_string()];
    args.extend(repo.args());
    args.push("--json".into());
    let run = agents().run(RESTORE_AGENT, args).check()?;
    serde_json::from_str(&run.stdout).with_context(|| format!("info JSON: {}", run.stdout))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| anyhow!("{} is not UTF-8", p.display()))
}
