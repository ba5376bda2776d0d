//! `archive-agent daemon` from the command line: its flags, the [`DaemonOptions`] they make, and
//! the daemon run until SIGTERM or SIGINT.

use std::path::PathBuf;

use crate::cli::default_pg_conn;
use crate::cli::drill_args::{DrillArgsError, ScheduledDrillArgs};
use crate::commands::daemon::DaemonOptions;
use crate::config::{ConfigError, Settings, parse_duration};
use crate::config::{RepoArgs, RetentionSettings};

#[derive(Debug, thiserror::Error)]
pub enum DaemonArgsError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Drill(#[from] DrillArgsError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Usage(String),
}

/// `archive-agent daemon`'s flags.
#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// The data directory of the cluster to serve (not with --stream)
    #[arg(long, env = "PGDATA", value_name = "DIR", required_unless_present = "stream")]
    pub pgdata: Option<PathBuf>,
    /// Stream WAL over the replication protocol from --pg-url (a replica's connection; several
    /// hosts and target_session_attrs=read-write follow a failover) instead of watching
    /// pg_wal/archive_status: no access to the data directory is needed
    #[arg(long, requires = "pg_url")]
    pub stream: bool,
    /// The most the daemon sends per second to the repository, over all its uploads and
    /// scheduled backups (like 20MiB); PostgreSQL's own archive_command (push) is never capped
    /// [default: the file's max_rate, else no cap]
    #[arg(long, env = "WALVAULT_MAX_RATE", value_name = "RATE")]
    pub max_rate: Option<crate::repo::rate::Rate>,
    /// With --stream: store the segment being received at most this often while WAL flows
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub stream_flush: String,
    /// With --stream: report WAL as flushed only once it is in the repository, and store it as
    /// soon as it arrives; with synchronous_standby_names naming the daemon's application_name
    /// (walvault), every acknowledged commit is in the repository
    #[arg(long, requires = "stream")]
    pub synchronous: bool,
    /// With --stream: the physical replication slot that keeps the WAL on the server while the
    /// daemon is down (created when missing)
    #[arg(long, default_value = "walvault", value_name = "NAME")]
    pub slot: String,
    /// With --stream: stream without a replication slot (the server may recycle WAL the daemon
    /// has not received)
    #[arg(long, requires = "stream", conflicts_with = "slot")]
    pub no_slot: bool,
    /// With --stream: local working directory [default: walvault-stream-<repository id> in the
    /// temporary directory]
    #[arg(long, value_name = "DIR")]
    pub stream_dir: Option<PathBuf>,
    /// Uploads at once; each holds about 40 MiB (a 16 MiB segment and its compressed copy)
    /// [default: the number of CPUs, at most 4]
    #[arg(long, value_name = "N")]
    pub parallel: Option<usize>,
    /// Rescan pg_wal/archive_status at least this often, whatever the file watcher reports
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub rescan_every: String,
    /// The cluster, for --stream, --backup-every and --max-wal-age
    #[command(flatten)]
    pub conn: crate::cli::PgUrlArgs,
    /// Take a base backup this often (e.g. 24h); with --stream, over the replication protocol
    /// from --pg-url (PostgreSQL 15+, see `backup` without --pgdata), the first one interval
    /// after the start
    #[arg(long, value_name = "DURATION")]
    pub backup_every: Option<String>,
    /// Scheduled backups from --pgdata do not verify page checksums (see `backup
    /// --no-page-checksums`; `page_checksums = false` in the TOML file does the same)
    #[arg(long)]
    pub no_page_checksums: bool,
    /// Force a WAL switch when nothing was archived for this long but WAL was written (e.g. 5m)
    #[arg(long, value_name = "DURATION")]
    pub max_wal_age: Option<String>,
    /// Serve Prometheus metrics on http://ADDR/metrics and a probe on /health
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Run restore-agent's verify (listing-based) this often (e.g. 24h); results in the log
    /// and the walvault_last_verify_* metrics
    #[arg(long, value_name = "DURATION")]
    pub verify_every: Option<String>,
    /// Expire after each scheduled backup with these rules (or the [retention] table's)
    #[command(flatten)]
    pub rules: RetentionSettings,
    /// Restore drills on a schedule (evidence stored in the repository)
    #[command(flatten)]
    pub drill: Box<ScheduledDrillArgs>,
    /// Keep a second copy of the repository at URL (created by `archive-agent init --copy-of`):
    /// a copy pass (see `archive-agent copy`) every --copy-every, on its own, so a slow second
    /// store never holds up archiving; metrics walvault_copy_lag_seconds and _bytes
    #[arg(long, value_name = "URL")]
    pub copy_to: Option<String>,
    /// A copy pass at least this often: the lag the second copy is kept within, plus the time
    /// a pass takes
    #[arg(long, default_value = "1m", value_name = "DURATION", requires = "copy_to")]
    pub copy_every: String,
    /// TOML file with the second repository's store credentials, when they differ from the
    /// first's [default: the daemon's configuration]
    #[arg(long, value_name = "FILE", requires = "copy_to")]
    pub copy_to_config: Option<PathBuf>,
    /// Objects each copy pass moves at once
    #[arg(long, default_value_t = 4, value_name = "N", requires = "copy_to")]
    pub copy_parallel: usize,
    /// Each copy pass also deletes from the second repository what expire deleted from the
    /// first (see `archive-agent copy --prune`)
    #[arg(long, requires = "copy_to")]
    pub copy_prune: bool,
}

impl DaemonArgs {
    /// The daemon these flags ask for. Warns when a retention policy is set but nothing would
    /// apply it (expire runs after the daemon's own scheduled backups only).
    pub fn options(&self, repo: &RepoArgs, settings: &Settings) -> Result<DaemonOptions, DaemonArgsError> {
        let drill_every = self.drill_every()?;
        let drill = match drill_every {
            Some(_) => Some(self.drill.options(repo, settings, &std::env::current_exe()?)?),
            None => None,
        };
        let retention = Some(settings.retention.policy(&self.rules)?).filter(|p| !p.is_empty());
        if retention.is_some() && self.backup_every.is_none() {
            tracing::warn!(
                "a retention policy is set but no --backup-every: the daemon expires only after its own scheduled backups"
            );
        }
        let needs_conn = self.backup_every.is_some() || self.max_wal_age.is_some();
        // With --stream, backups go over the protocol (to --pg-url) and need nothing more.
        if self.stream && (self.max_wal_age.is_some() || drill_every.is_some() || self.verify_every.is_some())
        {
            return Err(DaemonArgsError::Usage(
                "--stream takes scheduled backups (--backup-every) over the protocol, and needs no WAL switches; schedule verifies and drills with a second daemon or cron".into(),
            ));
        }
        let stream = match (self.stream, &self.conn.pg_url) {
            (true, Some(url)) => Some(crate::commands::daemon::stream::StreamOptions {
                target: crate::replication::conninfo::parse(url)
                    .map_err(|e| DaemonArgsError::Usage(e.to_string()))?,
                flush_every: parse_duration(&self.stream_flush)?,
                synchronous: self.synchronous,
                slot: (!self.no_slot).then(|| self.slot.clone()),
                dir: self.stream_dir.clone().unwrap_or_default(),
                status_every: std::time::Duration::from_secs(10),
            }),
            _ => None,
        };
        let every = |d: &Option<String>| d.as_deref().map(parse_duration).transpose();
        Ok(DaemonOptions {
            pgdata: self.pgdata.clone(),
            stream,
            parallel: self
                .parallel
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get().min(4))),
            rescan_every: parse_duration(&self.rescan_every)?,
            pg_conn: match (&self.conn.pg_url, needs_conn) {
                (None, true) => Some(default_pg_conn()),
                (url, _) => url.clone(),
            },
            backup_every: every(&self.backup_every)?,
            page_checksums: !self.no_page_checksums && settings.page_checksums,
            max_wal_age: every(&self.max_wal_age)?,
            metrics_addr: self.metrics_addr,
            retention,
            verify_every: every(&self.verify_every)?,
            drill_every,
            drill,
            copy: self.copy_job(repo, settings)?,
        })
    }

    /// The second repository to keep, with the daemon's write cap shared.
    fn copy_job(
        &self,
        repo: &RepoArgs,
        settings: &Settings,
    ) -> Result<Option<crate::commands::daemon::CopyJob>, DaemonArgsError> {
        let Some(url) = &self.copy_to else {
            return Ok(None);
        };
        let mut target = repo
            .elsewhere(url, self.copy_to_config.as_deref())
            .settings(None)?;
        target.rate_limit = settings.rate_limit.clone();
        Ok(Some(crate::commands::daemon::CopyJob {
            target,
            every: parse_duration(&self.copy_every)?,
            opts: crate::commands::copy::CopyOptions {
                parallel: self.copy_parallel.max(1),
                prune: self.copy_prune,
            },
        }))
    }

    fn drill_every(&self) -> Result<Option<std::time::Duration>, ConfigError> {
        self.drill.drill_every.as_deref().map(parse_duration).transpose()
    }
}
