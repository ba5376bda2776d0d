//! restore-agent: PostgreSQL's restore_command. Thin: flags in, library call, exit code out.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use walvault::cli::{self, RepoArgs};
use walvault::exit;
use walvault::restore::{self, FetchOutcome};

const AFTER_HELP: &str = "\
In postgresql.conf (or postgresql.auto.conf) of the server being recovered:
    restore_command = 'restore-agent fetch %f %p'

with the repository in WALVAULT_REPO (the server's environment), in /etc/walvault/walvault.toml,
or on the line itself: restore_command = 'restore-agent fetch --repo file:///var/lib/walvault %f %p'

Exit status: 0 restored (verified), 1 not in the repository (PostgreSQL ends recovery there), 2 bad
arguments or file name, 200 the repository could not be read or the stored copy is corrupt:
recovery stops with FATAL instead of ending early. In standby mode (standby.signal present)
failures exit 1 instead, as PostgreSQL retries there.";

/// Restore PostgreSQL WAL from a walvault repository.
#[derive(Debug, Parser)]
#[command(name = "restore-agent", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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
    },
}

fn main() -> ExitCode {
    let cli: Cli = cli::parse_or_exit("restore-agent");
    cli::init_logging();
    match cli.command {
        Command::Fetch {
            wal_name,
            dest_path,
            pgdata,
        } => ExitCode::from(fetch(&cli.repo, &wal_name, &dest_path, pgdata)),
    }
}

fn fetch(repo: &RepoArgs, name: &str, dest: &std::path::Path, pgdata: Option<PathBuf>) -> u8 {
    let started = Instant::now();
    let standby = pgdata
        .unwrap_or_else(|| PathBuf::from("."))
        .join("standby.signal")
        .exists();
    let shown = name.escape_debug().to_string();
    let fail = |message: String, code: u8| {
        if code == exit::NOT_FOUND_OR_RETRY && standby {
            tracing::error!("fetch {shown}: not available (standby mode, PostgreSQL will retry): {message}");
        } else if code == exit::FATAL {
            tracing::error!("fetch {shown}: {message}; stopping recovery rather than ending it early");
        } else {
            tracing::error!("fetch {shown}: {message}");
        }
        code
    };
    let settings = match repo.settings(None) {
        Ok(s) => s,
        Err(e) => {
            return fail(
                e.to_string(),
                if standby {
                    exit::NOT_FOUND_OR_RETRY
                } else {
                    exit::FATAL
                },
            );
        }
    };
    let result = match cli::runtime() {
        Ok(rt) => rt.block_on(restore::fetch(&settings, name, dest)),
        Err(e) => return fail(format!("cannot start: {e}"), exit::FATAL),
    };
    let ms = started.elapsed().as_millis();
    match result {
        Ok(FetchOutcome::Restored {
            name,
            size,
            stored_size,
        }) => {
            tracing::info!("fetch {name}: restored, {size} bytes, stored {stored_size} bytes, {ms} ms");
            exit::SUCCESS
        }
        Ok(FetchOutcome::NotFound { name }) => {
            tracing::info!("fetch {name}: not in the repository, {ms} ms");
            exit::NOT_FOUND_OR_RETRY
        }
        Err(e) => fail(e.to_string(), e.exit_code(standby)),
    }
}
