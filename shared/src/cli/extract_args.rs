//! `restore-agent extract` from the command line: its flags and the [`ExtractOptions`] they give.

use std::path::{Path, PathBuf};

use crate::cli::target_args::{TargetArgs, TargetError, parse_timeline};
use crate::commands::extract::{DEFAULT_TIMEOUT, Destination, ExtractOptions, Selection, SelectionError};
use crate::commands::restore::{RecoveryTarget, default_parallel};
use crate::config::{ConfigError, RepoArgs, Settings, parse_duration};
use crate::invocation::restore_command_line;

#[derive(Debug, thiserror::Error)]
pub enum ExtractArgsError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Selection(#[from] SelectionError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot write the restore_command line: {0}")]
    RestoreCommand(std::io::Error),
}

/// `restore-agent extract`'s flags.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("destination").required(true).args(["to", "into"])))]
pub struct ExtractArgs {
    /// The database holding the tables (a name, or an oid)
    #[arg(long, value_name = "NAME")]
    pub database: String,
    /// A table to extract: SCHEMA.NAME, or NAME for public.NAME (repeatable); its indexes,
    /// constraints, defaults and owned sequences come with it
    #[arg(long = "table", value_name = "SCHEMA.NAME")]
    pub tables: Vec<String>,
    /// A whole schema to extract, every object in it (repeatable; not with --table)
    #[arg(long = "schema", value_name = "NAME")]
    pub schemas: Vec<String>,
    #[command(flatten)]
    pub goal: TargetArgs,
    /// 'immediate': the backup's consistency point
    #[arg(long, value_name = "immediate", value_parser = ["immediate"])]
    pub target: Option<String>,
    /// Write a custom-format dump (pg_restore reads it) to FILE, names as recorded; never
    /// overwrites
    #[arg(long, value_name = "FILE")]
    pub to: Option<PathBuf>,
    /// Restore into this live database (a libpq connection string or URI; PGPASSWORD and
    /// ~/.pgpass apply) under new names, in one transaction; never replaces or alters a live
    /// object. Foreign keys to tables outside the extract are left out
    #[arg(long, value_name = "CONNINFO")]
    pub into: Option<String>,
    /// With --into: the name of the one table (or schema) extracted [default:
    /// <name>_restored_<target>]; indexes and sequences get _restored_<target> appended
    #[arg(long, value_name = "NAME", requires = "into")]
    pub rename_to: Option<String>,
    /// Only the rows for which this SQL condition holds (evaluated on the restored copy)
    #[arg(long = "where", value_name = "CONDITION")]
    pub row_filter: Option<String>,
    /// Directory with the backup's PostgreSQL version's postgres and pg_ctl (and pg_dump, when
    /// it has them) [default: /usr/lib/postgresql/<version>/bin, /usr/pgsql-<version>/bin, or
    /// pg_config --bindir]. pg_dump, pg_restore and psql may be of a newer version, found the
    /// same way or on PATH
    #[arg(long, value_name = "DIR")]
    pub pg_bin: Option<PathBuf>,
    /// Where to make the scratch directory that holds the database restored [default: the temp
    /// dir]; its free space is checked before anything is fetched
    #[arg(long, value_name = "DIR")]
    pub scratch: Option<PathBuf>,
    /// OS user to run PostgreSQL as when running as root
    #[arg(long, value_name = "USER", default_value = "postgres")]
    pub run_as: String,
    /// Longest wait for the private server's recovery, like 30m
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// Chunks fetched and written in parallel [default: as restore]
    #[arg(long, value_name = "N")]
    pub parallel: Option<usize>,
    /// Keep the scratch directory (to look at after a failure)
    #[arg(long)]
    pub keep: bool,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

impl ExtractArgs {
    /// The extract these flags ask for, from a repository with `settings` (named on the
    /// command line by `repo`), whose private server's recovery runs `restore_agent fetch`.
    pub fn options(
        &self,
        settings: &Settings,
        repo: &RepoArgs,
        restore_agent: &Path,
    ) -> Result<ExtractOptions, ExtractArgsError> {
        let target = match (self.goal.target()?, &self.target) {
            (Some(t), _) => t,
            (None, Some(_)) => RecoveryTarget::Immediate,
            (None, None) => RecoveryTarget::End,
        };
        let destination = match (&self.to, &self.into) {
            (Some(path), _) => Destination::File(path.clone()),
            (None, Some(conninfo)) => Destination::Into {
                conninfo: conninfo.clone(),
                rename_to: self.rename_to.clone(),
            },
            (None, None) => unreachable!("clap requires --to or --into"),
        };
        Ok(ExtractOptions {
            database: self.database.clone(),
            selection: Selection::parse(&self.tables, &self.schemas)?,
            row_filter: self.row_filter.clone(),
            destination,
            target,
            timeline: parse_timeline(&self.goal.target_timeline)?,
            exclusive: self.goal.target_exclusive,
            pg_bin: self.pg_bin.clone(),
            scratch: self.scratch.clone(),
            run_as: Some(self.run_as.clone()),
            timeout: self
                .timeout
                .as_deref()
                .map(parse_duration)
                .transpose()?
                .unwrap_or(DEFAULT_TIMEOUT),
            parallel: self
                .parallel
                .unwrap_or_else(|| default_parallel(&settings.repo.location())),
            restore_command: restore_command_line(restore_agent, settings, repo)
                .map_err(ExtractArgsError::RestoreCommand)?,
            keep: self.keep,
        })
    }
}
