//! `restore-agent`'s command line: its flags and subcommands, in the library so that man pages
//! and shell completions are generated from the same definitions (`walvault-gen-docs`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::cli::drill_args::DrillArgs;
use crate::cli::extract_args::ExtractArgs;
use crate::cli::restore_args::RestoreArgs;
use crate::config::{FallbackArgs, RepoArgs};

const AFTER_HELP: &str = "\
In postgresql.conf (or postgresql.auto.conf) of the server being recovered:
    restore_command = 'restore-agent fetch %f %p'

with the repository in WALVAULT_REPO (the server's environment), in /etc/walvault/walvault.toml,
or on the line itself: restore_command = 'restore-agent fetch --repo file:///var/lib/walvault %f %p'

Exit status of fetch: 0 restored (verified), 1 not in the repository (PostgreSQL ends recovery
there), 200 anything else (the repository could not be read, the stored copy is corrupt, a bad
argument or file name, an internal error): recovery stops with FATAL instead of ending early. In
standby mode (standby.signal present) failures exit 1 instead, as PostgreSQL retries there. Other
commands exit 2 on bad arguments.

With a second copy of the repository (archive-agent copy), --fallback-repo reads from it whatever
the first lacks or holds damaged, e.g.
    restore_command = 'restore-agent fetch --fallback-repo s3://dr-bucket/walvault %f %p'
A file missing from both is still not found (exit 1).";

/// Restore PostgreSQL WAL from a walvault repository.
#[derive(Debug, Parser)]
#[command(name = "restore-agent", version, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub repo: RepoArgs,
    #[command(flatten)]
    pub fallback: FallbackArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fetch one WAL file: restore_command = 'restore-agent fetch %f %p'
    #[command(after_help = AFTER_HELP)]
    Fetch {
        /// WAL file name PostgreSQL asks for (%f)
        wal_name: String,
        /// Where to write it (%p)
        dest_path: PathBuf,
        /// Data directory, to detect standby mode (standby.signal) [default: the current directory,
        /// which is the data directory when PostgreSQL runs the command]
        #[arg(long, value_name = "DIR")]
        pgdata: Option<PathBuf>,
        /// Do not start the background prefetcher
        #[arg(long, env = "WALVAULT_NO_PREFETCH")]
        no_prefetch: bool,
    },
    /// Download the next WAL segments ahead of recovery (started by fetch; runs until recovery ends)
    #[command(hide = true)]
    Prefetch {
        #[arg(long, value_name = "DIR")]
        pgdata: PathBuf,
        /// Segments kept ahead of recovery
        #[arg(long, default_value_t = 8)]
        depth: u64,
        /// Downloads at once
        #[arg(long, default_value_t = 4)]
        parallel: usize,
    },
    /// Rebuild a data directory from a base backup, set up to recover to a target
    #[command(group(clap::ArgGroup::new("goal").args(["target_time", "target_lsn", "target_xid", "target_name", "target"])))]
    Restore(RestoreArgs),
    /// Check that every backup can be restored: manifests and chunks present, WAL continuous from
    /// each backup's start to the end of its timelines, history files and summaries readable;
    /// prints one line per problem (the object, and what depends on it), the restorable windows
    /// and a summary. Read-only: runs with read-only credentials. Exit status 0 when everything
    /// restorable is intact, 1 when something is at risk or the repository could not be read.
    Verify {
        /// Also read every WAL file, summary and chunk, decompress it and check its hashes
        #[arg(long)]
        deep: bool,
        /// Objects read at once with --deep
        #[arg(long, default_value_t = 4, value_name = "N")]
        parallel: usize,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// List the destructive transactions in the archived WAL, newest first: DROP, TRUNCATE (or
    /// a rewrite), DROP DATABASE, and DELETE or UPDATE of many rows of one table. Each comes
    /// with the restore command that recovers the moment just before it, and an extract command
    /// for each table it destroyed rows of (a restore of just the database for DROP DATABASE).
    /// Tables are named from the relation map of the newest backup before the event, and those
    /// created after it from the pg_class rows the WAL carries.
    Find {
        /// Only events at or after this time ('YYYY-MM-DD HH:MM:SS[+TZ]', UTC without a zone)
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Only events at or before this time
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// Only events touching this table (name or schema.name)
        #[arg(long, value_name = "TABLE")]
        table: Option<String>,
        /// Rows of one table a DELETE or UPDATE transaction must change to be listed (100 or more)
        #[arg(long, default_value_t = 1000, value_name = "N")]
        min_rows: u64,
        /// Data directory to put in the printed restore commands
        #[arg(long, value_name = "DIR", default_value = "NEW_PGDATA")]
        pgdata: PathBuf,
        /// Print the events as JSON
        #[arg(long)]
        json: bool,
    },
    /// Restore drill: restore into a scratch directory, start PostgreSQL there (private socket,
    /// archiving off), wait until recovery reaches the target and the server answers, run the
    /// checks, stop it and remove the directory. Reports RTO (start until the server answered)
    /// and RPO (now minus the newest restorable commit) against their targets. Exit status 0
    /// only when every check passed and every target was met.
    #[command(group(clap::ArgGroup::new("goal").args(["target_time", "target_lsn", "target_xid", "target_name", "target"])))]
    Drill {
        #[command(flatten)]
        args: DrillArgs,
    },
    /// One table (or several, or whole schemas) of one database back from any instant: restores
    /// only that database to the target in a scratch directory, starts a private PostgreSQL
    /// there (socket only, archiving off), dumps the tables with pg_dump, and writes the dump
    /// (--to) or restores it into the live database under new names in one transaction
    /// (--into). The server is stopped and the scratch directory removed however it ends,
    /// Ctrl-C included. `restore-agent find` prints this command for each destructive event
    #[command(group(clap::ArgGroup::new("goal").args(["target_time", "target_lsn", "target_xid", "target_name", "target"])))]
    Extract(ExtractArgs),
    /// How far the recovery of a data directory restored by `restore-agent restore` has got:
    /// segment n of the segments up to the target, the commit time reached, an ETA; or that it
    /// finished. Reads only the data directory. Exit status 1 when it holds no walvault recovery.
    Status {
        /// The restored data directory
        #[arg(long, value_name = "DIR")]
        pgdata: PathBuf,
        /// Print the status as JSON
        #[arg(long)]
        json: bool,
    },
    /// List backups, timelines and archived WAL
    List,
    /// Describe the repository (backups, timelines, WAL coverage); --json for machines
    Info {
        #[arg(long)]
        json: bool,
    },
}
