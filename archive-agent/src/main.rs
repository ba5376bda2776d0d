//! archive-agent: PostgreSQL's archive_command. Thin: flags in, library call, exit code out.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use walvault::archive::{self, PushOutcome};
use walvault::cli::{self, RepoArgs};
use walvault::exit;

const AFTER_HELP: &str = "\
In postgresql.conf:
    archive_mode = on
    archive_command = 'archive-agent push %p'

with the repository in WALVAULT_REPO (the server's environment), in /etc/walvault/walvault.toml,
or on the line itself: archive_command = 'archive-agent push --repo file:///var/lib/walvault %p'

Exit status: 0 archived (or already archived with identical content), 1 failed (PostgreSQL
retries), 2 bad arguments or file name, 3 refused (conflicting content, another cluster's WAL,
invalid WAL: needs a human). Never above 125, which would stop PostgreSQL's archiver.";

/// Archive PostgreSQL WAL to a walvault repository.
#[derive(Debug, Parser)]
#[command(name = "archive-agent", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Archive one WAL file: archive_command = 'archive-agent push %p'
    #[command(after_help = AFTER_HELP)]
    Push {
        /// Path of the file to archive (%p); its last component is the WAL file name
        wal_path: PathBuf,
        /// zstd level, 1 (fastest) to 19 (smallest) [default: 3]
        #[arg(long, env = "WALVAULT_COMPRESS_LEVEL", value_name = "LEVEL")]
        compress_level: Option<i32>,
    },
}

fn main() -> ExitCode {
    let cli: Cli = cli::parse_or_exit("archive-agent");
    cli::init_logging();
    match cli.command {
        Command::Push {
            wal_path,
            compress_level,
        } => ExitCode::from(push(&cli.repo, &wal_path, compress_level)),
    }
}

fn push(repo: &RepoArgs, wal_path: &std::path::Path, compress_level: Option<i32>) -> u8 {
    let started = Instant::now();
    let settings = match repo.settings(compress_level) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("push {}: {e}", wal_path.display());
            return exit::USAGE;
        }
    };
    let result = match cli::runtime() {
        Ok(rt) => rt.block_on(archive::push(&settings, wal_path)),
        Err(e) => {
            tracing::error!("push {}: cannot start: {e}", wal_path.display());
            return exit::NOT_FOUND_OR_RETRY;
        }
    };
    let ms = started.elapsed().as_millis();
    match result {
        Ok(PushOutcome {
            name,
            size,
            stored_size,
            newly_stored,
        }) => {
            let what = if newly_stored {
                "archived"
            } else {
                "already archived, identical"
            };
            tracing::info!("push {name}: {what}, {size} bytes, stored {stored_size} bytes, {ms} ms");
            exit::SUCCESS
        }
        Err(e) => {
            tracing::error!("push {}: {e}", wal_path.display());
            e.exit_code()
        }
    }
}
