//! `restore-agent restore` from the command line: its flags and the [`RestoreOptions`] they give.

use std::path::{Path, PathBuf};

use crate::basebackup::manifest::BackupIdError;
use crate::cli::target_args::{TargetArgs, TargetError, parse_timeline};
use crate::commands::restore::{
    RecoveryTarget, RestoreOptions, SyncMethod, TablespacePlacement, TargetAction, default_parallel,
};
use crate::config::RepoArgs;
use crate::config::Settings;
use crate::invocation::restore_command_line;

#[derive(Debug, thiserror::Error)]
pub enum RestoreArgsError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("--tablespace-map {0:?}: expected OID=DIR")]
    TablespaceMap(String),
    #[error("--backup: {0}")]
    Backup(#[from] BackupIdError),
    #[error("cannot write the restore_command line: {0}")]
    RestoreCommand(std::io::Error),
}

/// `restore-agent restore`'s flags.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The new data directory (empty, replaced with --force, or rewritten with --delta)
    #[arg(long, value_name = "DIR")]
    pub pgdata: PathBuf,
    #[command(flatten)]
    pub goal: TargetArgs,
    /// 'immediate': stop as soon as the backup is consistent
    #[arg(long, value_name = "immediate", value_parser = ["immediate"])]
    pub target: Option<String>,
    /// What PostgreSQL does at the target
    #[arg(long, value_enum, default_value_t)]
    pub target_action: TargetAction,
    /// Restore only this database (a name, or an oid; repeatable), besides the system ones
    /// (template0, template1, postgres) and the cluster-wide files: every other database's
    /// files are left as holes, nothing fetched, and that database cannot be used after recovery
    /// (drop it). Needs full_page_writes = on since the backup (PostgreSQL's default)
    #[arg(long = "database", value_name = "NAME", conflicts_with = "delta")]
    pub databases: Vec<String>,
    /// Backup to restore [default: the newest one consistent before the target]
    #[arg(long, value_name = "ID")]
    pub backup: Option<String>,
    /// Replace the contents of a non-empty --pgdata
    #[arg(long, conflicts_with = "delta")]
    pub force: bool,
    /// Restore over an existing data directory (an old primary, a lagging copy) with the
    /// server stopped: only chunks whose content differs are fetched and rewritten; files and
    /// directories the backup does not have are removed (pg_wal contents too)
    #[arg(long)]
    pub delta: bool,
    /// Chunks fetched and written in parallel [default: 16 for file://, 32 for s3://, az:// and
    /// gs:// (measured)]
    #[arg(long, value_name = "N")]
    pub parallel: Option<usize>,
    /// Restore tablespace OID into DIR (repeatable)
    #[arg(long, value_name = "OID=DIR")]
    pub tablespace_map: Vec<String>,
    /// Restore every other tablespace into DIR/<oid>
    #[arg(long, value_name = "DIR")]
    pub tablespace_map_all: Option<PathBuf>,
    /// Restore every other tablespace to its location on the source
    #[arg(long)]
    pub tablespace_original: bool,
    /// How the restored files are made durable before pg_control is written: fsync (each file)
    /// or syncfs (one call per file system, also flushing other writers' data there; Linux 5.8
    /// and later report its write errors)
    #[arg(long, value_enum, default_value_t)]
    pub sync_method: SyncMethod,
    /// Print the restore's plan (backup, target, timeline, files, tablespaces, recovery
    /// settings, replay) and write nothing: not even --pgdata is created
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report (or with --dry-run the plan) as JSON
    #[arg(long)]
    pub json: bool,
}

impl RestoreArgs {
    /// The restore these flags ask for, from a repository with `settings` (named on the command
    /// line by `repo`), whose recovery runs `restore_agent fetch`.
    pub fn options(
        &self,
        settings: &Settings,
        repo: &RepoArgs,
        restore_agent: &Path,
    ) -> Result<RestoreOptions, RestoreArgsError> {
        let target = match (self.goal.target()?, &self.target) {
            (Some(t), _) => t,
            (None, Some(_)) => RecoveryTarget::Immediate,
            (None, None) => RecoveryTarget::End,
        };
        let restore_command =
            restore_command_line(restore_agent, settings, repo).map_err(RestoreArgsError::RestoreCommand)?;
        Ok(RestoreOptions {
            tablespaces: self.tablespaces()?,
            databases: self.databases.clone(),
            pgdata: self.pgdata.clone(),
            backup: self.backup.as_deref().map(str::parse).transpose()?,
            target,
            timeline: parse_timeline(&self.goal.target_timeline)?,
            action: self.target_action,
            exclusive: self.goal.target_exclusive,
            force: self.force,
            delta: self.delta,
            parallel: self
                .parallel
                .unwrap_or_else(|| default_parallel(&settings.repo.location())),
            sync: self.sync_method,
            restore_command,
        })
    }

    fn tablespaces(&self) -> Result<TablespacePlacement, RestoreArgsError> {
        let mut plan = TablespacePlacement {
            all_under: self.tablespace_map_all.clone(),
            original: self.tablespace_original,
            ..Default::default()
        };
        for m in &self.tablespace_map {
            let (oid, dir) = m
                .split_once('=')
                .and_then(|(o, d)| Some((o.parse::<u32>().ok()?, PathBuf::from(d))))
                .ok_or_else(|| RestoreArgsError::TablespaceMap(m.clone()))?;
            plan.map.insert(oid, dir);
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        restore: RestoreArgs,
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(
            [
                "restore-agent",
                "--repo",
                "file:///srv/repo",
                "--pgdata",
                "/srv/new",
            ]
            .iter()
            .chain(args),
        )
        .unwrap()
    }

    fn options(args: &[&str]) -> Result<RestoreOptions, RestoreArgsError> {
        let cli = parse(args);
        let settings = cli.repo.settings(None).unwrap();
        cli.restore
            .options(&settings, &cli.repo, Path::new("/usr/bin/restore-agent"))
    }

    /// A closed choice given a value outside it is refused by the parser, naming the allowed
    /// values: never a silent default.
    #[test]
    fn an_unknown_choice_names_the_allowed_ones() {
        for (flag, allowed) in [
            ("--target-action", "promote, pause, shutdown"),
            ("--sync-method", "fsync, syncfs"),
        ] {
            let e = Cli::try_parse_from(["restore-agent", "--pgdata", "/srv/new", flag, "sometimes"])
                .unwrap_err()
                .to_string();
            assert!(e.contains("invalid value 'sometimes'"), "{e}");
            assert!(e.contains(&format!("[possible values: {allowed}]")), "{e}");
        }
        let o = options(&["--sync-method", "syncfs"]).unwrap();
        assert_eq!((o.sync, o.action), (SyncMethod::Syncfs, TargetAction::Promote));
    }

    #[test]
    fn flags_become_the_options_restore_takes() {
        let o = options(&[
            "--target-time",
            "2026-11-21 14:31:59+00",
            "--target-action",
            "pause",
            "--tablespace-map",
            "16400=/srv/ts",
            "--backup",
            "20261121T100000Z",
        ])
        .unwrap();
        assert!(matches!(o.target, RecoveryTarget::Time(_)));
        assert_eq!(o.action, TargetAction::Pause);
        assert_eq!(o.tablespaces.map.get(&16400), Some(&PathBuf::from("/srv/ts")));
        assert_eq!(
            o.backup.map(|b| b.to_string()).as_deref(),
            Some("20261121T100000Z")
        );
        // file:// restores 16 chunks at once unless told otherwise.
        assert_eq!(o.parallel, 16);
        assert!(
            o.restore_command.contains("/usr/bin/restore-agent"),
            "{}",
            o.restore_command
        );
        assert!(o.restore_command.contains("fetch"), "{}", o.restore_command);
    }

    #[test]
    fn no_target_recovers_to_the_end_and_immediate_to_consistency() {
        assert!(matches!(options(&[]).unwrap().target, RecoveryTarget::End));
        assert!(matches!(
            options(&["--target", "immediate"]).unwrap().target,
            RecoveryTarget::Immediate
        ));
    }

    #[test]
    fn bad_flags_are_named() {
        let e = options(&["--tablespace-map", "16400"]).unwrap_err().to_string();
        assert!(e.contains("--tablespace-map \"16400\""), "{e}");
        let e = options(&["--backup", "yesterday"]).unwrap_err().to_string();
        assert!(e.starts_with("--backup"), "{e}");
        let e = options(&["--target-timeline", "0"]).unwrap_err().to_string();
        assert!(e.contains("--target-timeline"), "{e}");
    }
}
