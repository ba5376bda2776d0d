//! `archive-agent daemon --stream`: WAL received over the replication protocol (the connection,
//! the stream's messages and the pieces in the repository are in [`crate::replication`]): the receive
//! loop ([`receiver`]) and the storing task ([`storer`]) that puts whole segments through push's
//! own path.

mod receiver;
mod storer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use self::receiver::run;

/// How the daemon streams.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    pub target: crate::replication::conninfo::Target,
    /// Store the segment being received at most this often while WAL flows.
    pub flush_every: Duration,
    /// Report the flush position as soon as the repository holds more (for synchronous
    /// replication), and store pieces back to back rather than on the tick.
    pub synchronous: bool,
    /// The physical replication slot to use (created when missing); `None` streams without one.
    pub slot: Option<String>,
    /// Local working directory: segments are written here before push's path stores them.
    pub dir: PathBuf,
    /// Standby status updates at least this often.
    pub status_every: Duration,
}

/// Why streaming stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    Source(#[from] crate::replication::source::SourceError),
    #[error(
        "{host} is cluster {system_id}, but the repository belongs to {stored}; refusing to mix clusters (use a separate repository for this cluster)"
    )]
    ForeignCluster {
        host: String,
        system_id: u64,
        stored: String,
    },
    #[error("replication protocol: {0}")]
    Protocol(#[from] crate::replication::assembler::StreamProtocolError),
    #[error("{0}")]
    Store(#[from] storer::StorerError),
    #[error("cannot use the stream directory {path}: {source}")]
    Dir { path: String, source: std::io::Error },
    #[error("stream: {0}")]
    Task(String),
}

/// The working directory's default: one per repository, under the system's temporary directory.
pub fn default_dir(repo: &crate::repo::RepoId) -> PathBuf {
    std::env::temp_dir().join(format!("walvault-stream-{repo}"))
}

/// Open the repository and stream into it until `shutdown`.
pub async fn serve(
    settings: Arc<crate::config::Settings>,
    mut opts: StreamOptions,
    metrics: Arc<super::Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), super::DaemonError> {
    // Unknown until the first look at the slot.
    metrics
        .stream_slot_safe_wal_bytes
        .store(-1, std::sync::atomic::Ordering::Relaxed);
    let repo = crate::commands::push::open_repository(&settings).await?;
    if opts.dir.as_os_str().is_empty() {
        opts.dir = default_dir(repo.id());
    }
    run(settings, opts, repo, metrics, shutdown)
        .await
        .map_err(super::DaemonError::Stream)
}
