//! `archive-agent backup` from the command line: its flags and the options they give.

use std::path::PathBuf;

use crate::cli::default_pg_conn;
use crate::commands::backup::{BackupOptions, DEFAULT_CHUNK_SIZE, FileReading};
use crate::config::{ConfigError, parse_duration};

/// `archive-agent backup`'s flags.
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// The data directory of the running cluster, read directly from disk. Without it the
    /// backup is taken over the replication protocol (BASE_BACKUP, PostgreSQL 15 and newer):
    /// no access to the data directory, only a role with REPLICATION, from any host
    #[arg(long, env = "PGDATA", value_name = "DIR")]
    pub pgdata: Option<PathBuf>,
    #[command(flatten)]
    pub conn: crate::cli::PgUrlArgs,
    #[command(flatten)]
    pub compress: crate::config::CompressArgs,
    /// Chunks compressed and uploaded in parallel (memory: this many chunks)
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub parallel: usize,
    /// How long to wait for the backup's WAL to be archived
    #[arg(long, default_value = "5m", value_name = "DURATION")]
    pub wal_timeout: String,
    /// When --pgdata/--pg-url are a streaming standby: a connection to its primary, used only
    /// to switch WAL there so the backup's last segment is archived at once (without it,
    /// the backup waits for the primary's archive_timeout or traffic)
    #[arg(long, env = "WALVAULT_PRIMARY_URL", value_name = "CONN")]
    pub primary_url: Option<String>,
    /// Read every file, even those unchanged since the previous backup (by size, mtime,
    /// ctime, inode and device), and store again every chunk of the previous backup whose
    /// pack or object is missing from the repository or short (one listing of each). Without
    /// it, unchanged files are taken over from the previous backup unread: see README, "Base
    /// backups".
    #[arg(long)]
    pub read_all: bool,
    /// Without --pgdata, on PostgreSQL 17 and newer with summarize_wal = on: an incremental
    /// backup (BASE_BACKUP INCREMENTAL) on top of the newest backup, when that one was taken over
    /// the protocol too; only the changed blocks cross the network, and the backup is still
    /// stored complete. Otherwise a full backup, with a warning saying why
    #[arg(long)]
    pub incremental: bool,
    /// Do not verify page checksums. By default, from --pgdata in a cluster with data
    /// checksums on (initdb --data-checksums, or pg_checksums --enable), every page of every
    /// relation file read is verified as PostgreSQL does; the backup still completes, names each
    /// damaged page (database, relation, fork, block), records it in the manifest and exits 3
    #[arg(long)]
    pub no_page_checksums: bool,
    /// The most this backup sends per second to the repository, over all its parallel uploads
    /// (like 20MiB, 500KiB, 10MB) [default: the file's max_rate, else no cap]
    #[arg(long, env = "WALVAULT_MAX_RATE", value_name = "RATE")]
    pub max_rate: Option<crate::repo::rate::Rate>,
    /// Print the manifest summary as JSON
    #[arg(long)]
    pub json: bool,
}

impl BackupArgs {
    pub fn options(&self) -> Result<BackupOptions, ConfigError> {
        Ok(BackupOptions {
            pgdata: self.pgdata.clone(),
            pg_conn: self.conn.pg_url.clone().unwrap_or_else(default_pg_conn),
            chunk_size: DEFAULT_CHUNK_SIZE,
            parallel: self.parallel,
            wal_timeout: parse_duration(&self.wal_timeout)?,
            primary_conn: self.primary_url.clone(),
            incremental: self.incremental,
            page_checksums: !self.no_page_checksums,
        })
    }

    pub fn reading(&self) -> FileReading {
        if self.read_all {
            FileReading::All
        } else {
            FileReading::Changed
        }
    }
}
