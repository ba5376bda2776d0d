//! `restore-agent fetch`: hand PostgreSQL's recovery one archived file.
//!
//! "Not found" (exit 1) tells PostgreSQL the archive ends here: during archive recovery it then
//! promotes. So only a confirmed absence from a confirmed repository may be reported as not found;
//! a store that cannot be read, or a stored copy that fails verification, is an error that must
//! stop recovery (see [`crate::exit::FATAL`]).

use std::path::Path;

use crate::config::Settings;
use crate::exit;
use crate::fsutil;
use crate::prefetch::Prefetch;
use crate::repo::layout::wal_key;
use crate::repo::object::{ObjectError, ObjectKind};
use crate::repo::{Reader, RepoError, Store, StoreError, WalCheckError};
use crate::wal::{NameError, WalFileName};

/// What a fetch found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchOutcome {
    Restored {
        name: WalFileName,
        size: u64,
        stored_size: u64,
        /// Taken from the prefetch spool rather than downloaded now.
        prefetched: bool,
    },
    NotFound {
        name: WalFileName,
    },
}

/// Why a fetch failed. Everything except [`FetchError::Name`] means "cannot tell", never "absent".
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Name(#[from] NameError),
    #[error("repository {repo} did not answer within {}s", after.as_secs())]
    TimedOut {
        repo: String,
        after: std::time::Duration,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No repository at this location (a volume not mounted, a wrong URL) is never "not found":
    /// recovery would end and promote on the word of a location that holds nothing.
    #[error(transparent)]
    Repository(#[from] RepoError),
    #[error("archived {name} ({key} in {repo}) is corrupt: {source}")]
    Corrupt {
        name: String,
        key: String,
        repo: String,
        source: Box<ObjectError>,
    },
    #[error("archived {name} ({key} in {repo}) cannot be used: {source}")]
    Unusable {
        name: String,
        key: String,
        repo: String,
        source: Box<WalCheckError>,
    },
    #[error("cannot write {dest}: {source}")]
    Write { dest: String, source: std::io::Error },
}

impl FetchError {
    /// Exit status for PostgreSQL: [`exit::fetch_failure`]. A name walvault cannot parse is no
    /// exception: PostgreSQL never asks for one, so it means a misconfigured restore_command,
    /// and a low status would end recovery as if the file were missing.
    pub fn exit_code(&self, standby: bool) -> u8 {
        exit::fetch_failure(standby)
    }
}

/// Fetch `name` from the repository into `dest`, verifying it end to end first. With a
/// prefetch spool, a copy downloaded ahead by the prefetcher is used when there is one (verified
/// exactly like a download; an unusable copy is dropped and the repository asked instead).
///
/// Never takes longer than [`Settings::call_bound`]: a hung store stops recovery with an error
/// rather than hanging it forever.
pub async fn fetch(
    settings: &Settings,
    name: &str,
    dest: &Path,
    prefetch: Option<&Prefetch>,
) -> Result<FetchOutcome, FetchError> {
    let bound = settings.call_bound();
    tokio::time::timeout(bound, fetch_unbounded(settings, name, dest, prefetch))
        .await
        .unwrap_or_else(|_| {
            Err(FetchError::TimedOut {
                repo: settings.repo.to_string(),
                after: bound,
            })
        })
}

async fn fetch_unbounded(
    settings: &Settings,
    name: &str,
    dest: &Path,
    prefetch: Option<&Prefetch>,
) -> Result<FetchOutcome, FetchError> {
    let name: WalFileName = name.parse()?;
    let name_str = name.to_string();
    let key = wal_key(&name);
    let repo = settings.repo.to_string();

    if let Some(taken) = prefetch.and_then(|p| p.take(&name, dest)) {
        match taken {
            Ok(size) => {
                return Ok(FetchOutcome::Restored {
                    name,
                    size,
                    stored_size: 0,
                    prefetched: true,
                });
            }
            Err(e) => tracing::warn!("prefetched {name_str} unusable ({e}); fetching it from the repository"),
        }
    }

    // A corrupt read is re-read once: a flipped bit in transit is not worth stopping recovery for,
    // a corrupt stored object is.
    let mut rereads = 1;
    let store = Store::open_retrying(&settings.repo, &settings.store_options()).await?;
    let (reader, stored, content) = loop {
        // The descriptor and the file in one round trip; an absent file counts as absent only
        // once the descriptor proves this is the repository.
        let (reader, object) = tokio::try_join!(
            async {
                Reader::on_store(store.clone(), settings.key.as_ref())
                    .await
                    .map_err(FetchError::from)
            },
            async { store.get(&key).await.map_err(FetchError::from) }
        )?;
        let Some(bytes) = object else {
            return Ok(FetchOutcome::NotFound { name });
        };
        match reader.sealer().open(&bytes, ObjectKind::WalFile, &name_str) {
            Ok((_, content)) => break (reader, bytes.len() as u64, content),
            Err(source) if rereads == 0 => {
                return Err(FetchError::Corrupt {
                    name: name_str,
                    key,
                    repo,
                    source: Box::new(source),
                });
            }
            Err(source) => {
                tracing::warn!(key, "{source}; reading it again");
                rereads -= 1;
            }
        }
    };
    reader
        .check_wal(&name, &content)
        .map_err(|source| FetchError::Unusable {
            name: name_str,
            key,
            repo,
            source: Box::new(source),
        })?;
    write_out(name, dest, content, stored)
}

fn write_out(
    name: WalFileName,
    dest: &Path,
    content: Vec<u8>,
    stored: u64,
) -> Result<FetchOutcome, FetchError> {
    fsutil::write_durably(dest, &content).map_err(|source| FetchError::Write {
        dest: dest.display().to_string(),
        source,
    })?;
    Ok(FetchOutcome::Restored {
        name,
        size: content.len() as u64,
        stored_size: stored,
        prefetched: false,
    })
}
