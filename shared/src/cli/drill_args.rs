//! Restore drills from the command line: `restore-agent drill`'s flags and archive-agent daemon's
//! `--drill-*` flags, the [`DrillOptions`] they make, and where the evidence is shown.

use std::path::{Path, PathBuf};

use crate::cli::target_args::{TargetArgs, TargetError, parse_timeline};
use crate::commands::drill::{DrillOptions, DrillTarget, Evidence};
use crate::commands::restore::{RecoveryTarget, TimelineTarget};
use crate::config::RepoArgs;
use crate::config::{ConfigError, Settings, parse_duration};
use crate::invocation::restore_command_line;
use crate::report::Format;

/// How long a scheduled drill waits for recovery.
const SCHEDULED_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(6 * 3600);
/// Chunks a scheduled drill fetches and writes at once.
const SCHEDULED_PARALLEL: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum DrillArgsError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{flag} {source}")]
    CheckSql {
        flag: &'static str,
        source: crate::commands::drill::ChecksError,
    },
    #[error("--drill-every needs restore-agent beside archive-agent ({0} is missing)")]
    NoRestoreAgent(String),
    #[error("--json {path}: {source}")]
    Evidence { path: String, source: std::io::Error },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What `restore-agent drill --target` restores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DrillWhat {
    /// Everything archived
    Latest,
    /// An instant inside the restorable window
    Random,
    /// The backup's consistency point
    Immediate,
}

/// What the daemon's scheduled drills restore (`--drill-target`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScheduledWhat {
    /// An instant inside the restorable window
    Random,
    /// Everything archived
    Latest,
}

/// `restore-agent drill`'s flags.
#[derive(Debug, clap::Args)]
pub struct DrillArgs {
    /// What the drill restores [default: latest]
    #[arg(long, value_name = "WHAT", value_enum)]
    pub target: Option<DrillWhat>,
    #[command(flatten)]
    pub goal: TargetArgs,
    /// Directory with the backup's PostgreSQL version's postgres and pg_ctl [default:
    /// /usr/lib/postgresql/<version>/bin, /usr/pgsql-<version>/bin, or pg_config --bindir]
    #[arg(long, value_name = "DIR")]
    pub pg_bin: Option<PathBuf>,
    /// Where to make the scratch directory [default: the temp dir]
    #[arg(long, value_name = "DIR")]
    pub scratch: Option<PathBuf>,
    /// OS user to run PostgreSQL as when the drill runs as root
    #[arg(long, value_name = "USER", default_value = "postgres")]
    pub run_as: String,
    /// Database role the checks connect as [default: the OS user PostgreSQL runs as]
    #[arg(long, value_name = "ROLE")]
    pub pg_user: Option<String>,
    /// File of SQL queries separated by ';', each of which must return true (repeatable)
    #[arg(long, value_name = "FILE")]
    pub check_sql: Vec<PathBuf>,
    /// Database the --check-sql queries run in
    #[arg(long, value_name = "DB", default_value = "postgres")]
    pub check_db: String,
    /// Also check every B-tree index (and from PostgreSQL 14 every table) with amcheck
    #[arg(long)]
    pub amcheck: bool,
    /// Recovery time objective, like 15m: the drill fails when restore and recovery take longer
    #[arg(long, value_name = "DURATION")]
    pub rto_target: Option<String>,
    /// Recovery point objective, like 5m: the drill fails when the newest restorable commit is older
    #[arg(long, value_name = "DURATION")]
    pub rpo_target: Option<String>,
    /// Longest wait for recovery
    #[arg(long, value_name = "DURATION", default_value = "6h")]
    pub timeout: String,
    /// Chunks fetched and written in parallel
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub parallel: usize,
    /// Write the evidence as JSON to FILE ('-' for standard output)
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Keep the scratch directory afterwards
    #[arg(long)]
    pub keep: bool,
}

impl DrillArgs {
    /// The drill these flags ask for; its server fetches WAL with `restore_agent` (this program).
    pub fn options(
        &self,
        repo: &RepoArgs,
        settings: &Settings,
        restore_agent: &Path,
    ) -> Result<DrillOptions, DrillArgsError> {
        let target = match (self.goal.target()?, self.target) {
            (Some(t), _) => DrillTarget::Target(t),
            (None, Some(DrillWhat::Random)) => DrillTarget::Random,
            (None, Some(DrillWhat::Immediate)) => DrillTarget::Target(RecoveryTarget::Immediate),
            (None, Some(DrillWhat::Latest) | None) => DrillTarget::Latest,
        };
        Ok(DrillOptions {
            target,
            timeline: parse_timeline(&self.goal.target_timeline)?,
            exclusive: self.goal.target_exclusive,
            pg_bin: self.pg_bin.clone(),
            scratch: self.scratch.clone(),
            run_as: Some(self.run_as.clone()),
            pg_user: self.pg_user.clone(),
            check_sql: check_sql("--check-sql", &self.check_sql)?,
            check_db: self.check_db.clone(),
            amcheck: self.amcheck,
            rto_target: self.rto_target.as_deref().map(parse_duration).transpose()?,
            rpo_target: self.rpo_target.as_deref().map(parse_duration).transpose()?,
            timeout: parse_duration(&self.timeout)?,
            parallel: self.parallel,
            restore_command: restore_command_line(restore_agent, settings, repo)?,
            keep: self.keep,
        })
    }

    /// Store the evidence where `--json` says and tell how to show it: as JSON with `--json -`,
    /// else as the summary.
    pub fn deliver(&self, evidence: &Evidence) -> Result<Format, DrillArgsError> {
        match self.json.as_deref() {
            Some(p) if p == Path::new("-") => Ok(Format::Json),
            Some(p) => {
                let doc = serde_json::to_string_pretty(evidence).map_err(std::io::Error::other);
                doc.and_then(|doc| crate::local::crashsafe::write_durably(p, doc.as_bytes()))
                    .map_err(|source| DrillArgsError::Evidence {
                        path: p.display().to_string(),
                        source,
                    })?;
                Ok(Format::Text)
            }
            None => Ok(Format::Text),
        }
    }
}

/// `archive-agent daemon --drill-every` and the drills' settings.
#[derive(Debug, clap::Args)]
pub struct ScheduledDrillArgs {
    /// Run a restore drill this often (e.g. 7d); evidence is stored in the repository (see
    /// restore-agent info) and the walvault_last_drill_* metrics
    #[arg(long, value_name = "DURATION")]
    pub drill_every: Option<String>,
    /// What the drills restore
    #[arg(long, value_name = "WHAT", value_enum, default_value_t = ScheduledWhat::Random)]
    pub drill_target: ScheduledWhat,
    /// Directory with postgres and pg_ctl of the cluster's version [default: the usual places]
    #[arg(long, value_name = "DIR")]
    pub drill_pg_bin: Option<PathBuf>,
    /// Where drills make their scratch directory [default: the temp dir]
    #[arg(long, value_name = "DIR")]
    pub drill_scratch: Option<PathBuf>,
    /// OS user the drill's PostgreSQL runs as when the daemon runs as root
    #[arg(long, value_name = "USER", default_value = "postgres")]
    pub drill_run_as: String,
    /// SQL file whose queries must each return true (repeatable)
    #[arg(long, value_name = "FILE")]
    pub drill_check_sql: Vec<PathBuf>,
    /// Database the --drill-check-sql queries run in
    #[arg(long, value_name = "DB", default_value = "postgres")]
    pub drill_check_db: String,
    /// Also run amcheck in drills
    #[arg(long)]
    pub drill_amcheck: bool,
    /// Recovery time objective the drills are held to (e.g. 1h)
    #[arg(long, value_name = "DURATION")]
    pub drill_rto_target: Option<String>,
    /// Recovery point objective the drills are held to (e.g. 15m)
    #[arg(long, value_name = "DURATION")]
    pub drill_rpo_target: Option<String>,
}

impl ScheduledDrillArgs {
    /// The drills the daemon runs; their server fetches WAL with restore-agent, installed beside
    /// `archive_agent` (this program).
    pub fn options(
        &self,
        repo: &RepoArgs,
        settings: &Settings,
        archive_agent: &Path,
    ) -> Result<DrillOptions, DrillArgsError> {
        let restore_agent = archive_agent.with_file_name("restore-agent");
        if !restore_agent.exists() {
            return Err(DrillArgsError::NoRestoreAgent(
                restore_agent.display().to_string(),
            ));
        }
        Ok(DrillOptions {
            target: match self.drill_target {
                ScheduledWhat::Latest => DrillTarget::Latest,
                ScheduledWhat::Random => DrillTarget::Random,
            },
            timeline: TimelineTarget::Latest,
            exclusive: false,
            pg_bin: self.drill_pg_bin.clone(),
            scratch: self.drill_scratch.clone(),
            run_as: Some(self.drill_run_as.clone()),
            pg_user: None,
            check_sql: check_sql("--drill-check-sql", &self.drill_check_sql)?,
            check_db: self.drill_check_db.clone(),
            amcheck: self.drill_amcheck,
            rto_target: self.drill_rto_target.as_deref().map(parse_duration).transpose()?,
            rpo_target: self.drill_rpo_target.as_deref().map(parse_duration).transpose()?,
            timeout: SCHEDULED_TIMEOUT,
            parallel: SCHEDULED_PARALLEL,
            restore_command: restore_command_line(&restore_agent, settings, repo)?,
            keep: false,
        })
    }
}

fn check_sql(flag: &'static str, files: &[PathBuf]) -> Result<Vec<PathBuf>, DrillArgsError> {
    crate::commands::drill::check_sql_files(files).map_err(|source| DrillArgsError::CheckSql { flag, source })
}
