//! `archive-agent`'s command line: its flags and subcommands, in the library so that man pages
//! and shell completions are generated from the same definitions (`walvault-gen-docs`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::cli::backup_args::BackupArgs;
use crate::cli::daemon_args::DaemonArgs;
use crate::config::RepoArgs;

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
pub struct Cli {
    #[command(flatten)]
    pub repo: RepoArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the repository (once, before archive_command is set): a new walvault.json with a
    /// random repository id. push, backup and daemon never create one, so a backup volume that is
    /// not mounted or a mistyped bucket prefix fails loudly instead of growing a new, empty
    /// repository. Refuses when a repository exists there already.
    Init {
        /// The data directory of the cluster whose WAL the repository will hold: its identity
        /// (system identifier, segment and block size, version) is read from the WAL in pg_wal
        /// and recorded, so that no other cluster's WAL is ever accepted. Without it, the first
        /// segment archived binds the repository.
        #[arg(long, env = "PGDATA", value_name = "DIR")]
        pgdata: Option<PathBuf>,
        /// Encrypt everything stored (XChaCha20-Poly1305 under a random master key, wrapped by
        /// the key from key_file or key_command in the [encryption] table, or from
        /// WALVAULT_ENCRYPTION_KEY_FILE / WALVAULT_ENCRYPTION_KEY_COMMAND). Every later command
        /// needs that key; without it the repository cannot be read by anyone, you included.
        #[arg(long, conflicts_with = "copy_of")]
        encrypt: bool,
        /// Create a second copy of the repository at URL instead of a new repository: same id,
        /// cluster and encryption (the same key opens both), empty until `archive-agent copy`
        /// or `daemon --copy-to` fills it. The 3-2-1 rule: a second copy on another store.
        #[arg(long, value_name = "URL", conflicts_with = "pgdata")]
        copy_of: Option<String>,
        /// Print the repository's id and URL as JSON
        #[arg(long)]
        json: bool,
    },
    /// Copy the repository to its second copy (made by `init --copy-of`): everything the target
    /// lacks (backups, WAL, time index, history files, finder and retention records), each
    /// object checked as the target opens it before it is written, at most --parallel at once;
    /// a backup appears there only once all its data is there. Incremental (a second run right
    /// after the first writes nothing) and resumable (run it again). Deletes nothing on the
    /// target unless --prune. Exit status: 0 complete; 1 failed; 3 incomplete (objects damaged
    /// in the source or different on the target: each named)
    Copy {
        /// The second copy's URL (file://, s3://, az://, gs://)
        #[arg(long, value_name = "URL")]
        to: String,
        /// TOML file with the target's [s3] / [azure] / [gcs] credentials, when they differ
        /// from the source's [default: the source's configuration]
        #[arg(long, value_name = "FILE")]
        to_config: Option<PathBuf>,
        /// Objects read, checked and written at once
        #[arg(long, default_value_t = crate::commands::copy::DEFAULT_PARALLEL, value_name = "N")]
        parallel: usize,
        /// Also delete from the target what expire deleted from the source (backups older than
        /// the source's newest, WAL below its oldest segment, data no remaining backup needs);
        /// never anything while the source holds no backup
        #[arg(long)]
        prune: bool,
        /// Cap on the bytes written per second (like 20MiB) [default: the file's max_rate]
        #[arg(long, env = "WALVAULT_MAX_RATE", value_name = "RATE")]
        max_rate: Option<crate::repo::rate::Rate>,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Rotate an encrypted repository's key: the master key is wrapped again under the new key
    /// (nothing else is rewritten), and the old key no longer opens the repository. Opens it with
    /// the current key source, then point the configuration at the new one.
    Rekey {
        /// A file holding the new key (64 hex digits: openssl rand -hex 32) or passphrase
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with = "new_key_command",
            required_unless_present = "new_key_command"
        )]
        new_key_file: Option<PathBuf>,
        /// A shell command printing the new key or passphrase (Vault, a KMS CLI)
        #[arg(long, value_name = "COMMAND")]
        new_key_command: Option<String>,
    },
    /// Archive one WAL file: archive_command = 'archive-agent push %p'
    #[command(after_help = AFTER_HELP)]
    Push {
        /// Path of the file to archive (%p); its last component is the WAL file name
        wal_path: PathBuf,
        #[command(flatten)]
        compress: crate::config::CompressArgs,
    },
    /// Take an online base backup into the repository: of the cluster in --pgdata, read from
    /// disk, or without --pgdata over the replication protocol (BASE_BACKUP) from --pg-url.
    /// Exit status: 0 recorded; 1 failed, nothing recorded; 3 recorded, but pages of the
    /// cluster failed their checksum (each named in the log and listed in the manifest)
    Backup {
        #[command(flatten)]
        args: BackupArgs,
    },
    /// Delete the backups no retention rule keeps, and the WAL, history files, time index
    /// summaries and chunks nothing kept needs. Rules come from the [retention] table of the
    /// TOML file, or from these flags (which then replace the table's rules). Says what it kept,
    /// by which rule, and what it deleted. Safe while backups run: chunks are only collected when
    /// no backup is in progress.
    Expire {
        #[command(flatten)]
        rules: crate::config::RetentionSettings,
        /// Show what would be kept and deleted, and delete nothing
        #[arg(long)]
        dry_run: bool,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Pin a backup: no expire deletes it (nor the WAL to its consistency point) until unpinned
    Pin {
        /// The backup id (restore-agent list)
        id: String,
        /// Why it is kept (shown by restore-agent info)
        #[arg(long, value_name = "TEXT")]
        note: Option<String>,
    },
    /// Remove a backup's pin: the next expire applies the policy to it
    Unpin {
        /// The backup id
        id: String,
    },
    /// Run beside PostgreSQL: upload .ready WAL files ahead of the archiver, in parallel, so that
    /// archive_command = 'archive-agent push %p' answers at once; optionally take scheduled
    /// backups and force WAL switches on an idle cluster. Or, with --stream, receive WAL over the
    /// replication protocol from anywhere, as a replica would. Stops cleanly on SIGTERM or SIGINT.
    Daemon {
        #[command(flatten)]
        args: Box<DaemonArgs>,
    },
}

impl Command {
    /// The subcommand's name, for the line that says it failed.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Init { .. } => "init",
            Command::Rekey { .. } => "rekey",
            Command::Copy { .. } => "copy",
            Command::Push { .. } => "push",
            Command::Backup { .. } => "backup",
            Command::Expire { .. } => "expire",
            Command::Pin { .. } => "pin",
            Command::Unpin { .. } => "unpin",
            Command::Daemon { .. } => "daemon",
        }
    }
}
