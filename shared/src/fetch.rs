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
use crate::repo::descriptor::DescriptorError;
use crate::repo::layout::{DESCRIPTOR_KEY, wal_key};
use crate::repo::object::{self, ObjectError, ObjectKind};
use crate::repo::store::Access;
use crate::repo::{ClusterIdentity, RepoDescriptor, StoreError};
use crate::retry::RetryPolicy;
use crate::wal::{NameError, PageError, WalFileName};

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
    #[error("{source} (gave up after {attempts} attempts)")]
    Store { source: StoreError, attempts: u32 },
    #[error(
        "repository {repo} has no walvault.json and no {name}: it is not a walvault repository (wrong --repo or WALVAULT_REPO?)"
    )]
    NoRepository { repo: String, name: String },
    #[error("repository {repo}: {source}")]
    Descriptor { repo: String, source: DescriptorError },
    #[error("archived {name} ({key} in {repo}) is corrupt: {source}")]
    Corrupt {
        name: String,
        key: String,
        repo: String,
        source: Box<ObjectError>,
    },
    #[error("archived {name} ({key} in {repo}) is not a valid WAL segment: {source}")]
    InvalidWal {
        name: String,
        key: String,
        repo: String,
        source: Box<PageError>,
    },
    #[error("archived {name} is from {found}, but repository {repo} belongs to {expected}")]
    ForeignCluster {
        name: String,
        repo: String,
        found: ClusterIdentity,
        expected: ClusterIdentity,
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

    let retry = RetryPolicy::with_total(settings.retry_timeout);
    // A corrupt read is re-read once: a flipped bit in transit is not worth stopping recovery for,
    // a corrupt stored object is.
    let mut rereads = 1;
    let (descriptor, stored, content) = loop {
        let (descriptor, object) = retry
            .run(&format!("fetching {name_str}"), || async {
                let store = settings.open_store(Access::ReadOnly)?;
                tokio::try_join!(store.get(DESCRIPTOR_KEY), store.get(&key))
            })
            .await
            .map_err(|(source, attempts)| FetchError::Store { source, attempts })?;
        let descriptor = descriptor
            .map(|b| RepoDescriptor::parse(&b))
            .transpose()
            .map_err(|source| FetchError::Descriptor {
                repo: repo.clone(),
                source,
            })?;
        let Some(bytes) = object else {
            if descriptor.is_none() {
                return Err(FetchError::NoRepository { repo, name: name_str });
            }
            return Ok(FetchOutcome::NotFound { name });
        };
        match object::open(&bytes, ObjectKind::WalFile, &name_str) {
            Ok((_, content)) => break (descriptor, bytes.len() as u64, content),
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
    check_segment(&name, &content, descriptor.as_ref(), &key, &repo)?;
    write_out(name, dest, content, stored)
}

/// For segments: the page header against the name and the repository's cluster.
pub(crate) fn check_segment(
    name: &WalFileName,
    content: &[u8],
    descriptor: Option<&RepoDescriptor>,
    key: &str,
    repo: &str,
) -> Result<(), FetchError> {
    let Some(seg) = name.wal_segment() else {
        return Ok(());
    };
    let info =
        crate::wal::page::validate_segment(content, &seg).map_err(|source| FetchError::InvalidWal {
            name: name.to_string(),
            key: key.to_string(),
            repo: repo.to_string(),
            source: Box::new(source),
        })?;
    if let Some(d) = descriptor {
        let found = ClusterIdentity::from(&info);
        if found != d.cluster {
            return Err(FetchError::ForeignCluster {
                name: name.to_string(),
                repo: repo.to_string(),
                found,
                expected: d.cluster,
            });
        }
    }
    Ok(())
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
