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

/// The flags of the drill's server and checks, declared once for `restore-agent drill` and
/// once more, by the same declaration, for the daemon's scheduled drills (their names prefixed
/// `drill-`: `--drill-pg-bin`); both give a [`DrillServer`].
macro_rules! drill_server_flags {
    ($(#[$meta:meta])* $name:ident, $prefix:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, clap::Args)]
        pub struct $name {
            /// Directory with the backup's PostgreSQL version's postgres and pg_ctl [default:
            /// /usr/lib/postgresql/<version>/bin, /usr/pgsql-<version>/bin, or pg_config --bindir]
            #[arg(long = concat!($prefix, "pg-bin"), value_name = "DIR")]
            pub pg_bin: Option<PathBuf>,
            /// Where to make the scratch directory [default: the temp dir]
            #[arg(long = concat!($prefix, "scratch"), value_name = "DIR")]
            pub scratch: Option<PathBuf>,
            /// OS user to run PostgreSQL as when running as root
            #[arg(long = concat!($prefix, "run-as"), value_name = "USER", default_value = "postgres")]
            pub run_as: String,
            /// File of SQL queries separated by ';', each of which must return true (repeatable)
            #[arg(long = concat!($prefix, "check-sql"), value_name = "FILE")]
            pub check_sql: Vec<PathBuf>,
            /// Database the check queries run in
            #[arg(long = concat!($prefix, "check-db"), value_name = "DB", default_value = "postgres")]
            pub check_db: String,
            /// Also check every B-tree index (and from PostgreSQL 14 every table) with amcheck
            #[arg(long = concat!($prefix, "amcheck"))]
            pub amcheck: bool,
            /// Recovery time objective, like 15m: a drill fails when restore and recovery take
            /// longer
            #[arg(long = concat!($prefix, "rto-target"), value_name = "DURATION")]
            pub rto_target: Option<String>,
            /// Recovery point objective, like 5m: a drill fails when the newest restorable commit
            /// is older
            #[arg(long = concat!($prefix, "rpo-target"), value_name = "DURATION")]
            pub rpo_target: Option<String>,
        }

        impl $name {
            /// The server and checks these flags ask for.
            pub fn server(&self) -> Result<DrillServer, DrillArgsError> {
                Ok(DrillServer {
                    pg_bin: self.pg_bin.clone(),
                    scratch: self.scratch.clone(),
                    run_as: self.run_as.clone(),
                    check_sql: check_sql(concat!("--", $prefix, "check-sql"), &self.check_sql)?,
                    check_db: self.check_db.clone(),
                    amcheck: self.amcheck,
                    rto_target: self.rto_target.as_deref().map(parse_duration).transpose()?,
                    rpo_target: self.rpo_target.as_deref().map(parse_duration).transpose()?,
                })
            }
        }
    };
}

drill_server_flags!(
    /// `restore-agent drill`'s server and checks.
    DrillServerArgs,
    ""
);
drill_server_flags!(
    /// The daemon's scheduled drills' server and checks (`--drill-*`).
    ScheduledDrillServerArgs,
    "drill-"
);

/// A drill's server and checks, as the flags give them.
#[derive(Debug, Clone)]
pub struct DrillServer {
    pub pg_bin: Option<PathBuf>,
    pub scratch: Option<PathBuf>,
    pub run_as: String,
    pub check_sql: Vec<PathBuf>,
    pub check_db: String,
    pub amcheck: bool,
    pub rto_target: Option<std::time::Duration>,
    pub rpo_target: Option<std::time::Duration>,
}

/// `restore-agent drill`'s flags.
#[derive(Debug, clap::Args)]
pub struct DrillArgs {
    /// What the drill restores [default: latest]
    #[arg(long, value_name = "WHAT", value_enum)]
    pub target: Option<DrillWhat>,
    #[command(flatten)]
    pub goal: TargetArgs,
    #[command(flatten)]
    pub server: DrillServerArgs,
    /// Database role the checks connect as [default: the OS user PostgreSQL runs as]
    #[arg(long, value_name = "ROLE")]
    pub pg_user: Option<String>,
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
        let server = self.server.server()?;
        Ok(DrillOptions {
            target,
            timeline: parse_timeline(&self.goal.target_timeline)?,
            exclusive: self.goal.target_exclusive,
            pg_bin: server.pg_bin,
            scratch: server.scratch,
            run_as: Some(server.run_as),
            pg_user: self.pg_user.clone(),
            check_sql: server.check_sql,
            check_db: server.check_db,
            amcheck: server.amcheck,
            rto_target: server.rto_target,
            rpo_target: server.rpo_target,
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
    #[command(flatten)]
    pub server: ScheduledDrillServerArgs,
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
        let server = self.server.server()?;
        Ok(DrillOptions {
            target: match self.drill_target {
                ScheduledWhat::Latest => DrillTarget::Latest,
                ScheduledWhat::Random => DrillTarget::Random,
            },
            timeline: TimelineTarget::Latest,
            exclusive: false,
            pg_bin: server.pg_bin,
            scratch: server.scratch,
            run_as: Some(server.run_as),
            pg_user: None,
            check_sql: server.check_sql,
            check_db: server.check_db,
            amcheck: server.amcheck,
            rto_target: server.rto_target,
            rpo_target: server.rpo_target,
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Drill {
        #[command(flatten)]
        args: DrillArgs,
    }

    #[derive(Debug, clap::Parser)]
    struct Daemon {
        #[command(flatten)]
        args: ScheduledDrillArgs,
    }

    /// One declaration, two spellings: `drill --pg-bin` and `daemon --drill-pg-bin` give the same
    /// server and checks.
    #[test]
    fn a_drill_and_a_scheduled_drill_read_the_same_flags() {
        let flags = |prefix: &str| {
            [
                ("pg-bin", "/usr/lib/postgresql/15/bin"),
                ("scratch", "/srv/scratch"),
                ("run-as", "pgdrill"),
                ("check-db", "app"),
                ("rto-target", "15m"),
                ("rpo-target", "5m"),
            ]
            .iter()
            .flat_map(|(k, v)| [format!("--{prefix}{k}"), v.to_string()])
            .chain([format!("--{prefix}amcheck")])
            .collect::<Vec<_>>()
        };
        let drill = Drill::try_parse_from(std::iter::once("drill".to_string()).chain(flags("")))
            .unwrap()
            .args
            .server
            .server()
            .unwrap();
        let daemon = Daemon::try_parse_from(std::iter::once("daemon".to_string()).chain(flags("drill-")))
            .unwrap()
            .args
            .server
            .server()
            .unwrap();
        for s in [&drill, &daemon] {
            assert_eq!(s.pg_bin.as_deref(), Some(Path::new("/usr/lib/postgresql/15/bin")));
            assert_eq!(
                (s.run_as.as_str(), s.check_db.as_str(), s.amcheck),
                ("pgdrill", "app", true)
            );
            assert_eq!(s.rto_target, Some(std::time::Duration::from_secs(900)));
            assert_eq!(s.rpo_target, Some(std::time::Duration::from_secs(300)));
        }
        assert_eq!(drill.scratch, daemon.scratch);
        // Each command knows only its own spelling.
        assert!(Drill::try_parse_from(["drill", "--drill-pg-bin", "/x"]).is_err());
        assert!(Daemon::try_parse_from(["daemon", "--pg-bin", "/x"]).is_err());
    }
}
