//! `restore-agent fetch`: hand PostgreSQL's recovery one archived file.
//!
//! "Not found" (exit 1) tells PostgreSQL the archive ends here: during archive recovery it then
//! promotes. So only a confirmed absence from a confirmed repository may be reported as not found;
//! a store that cannot be read, or a stored copy that fails verification, is an error that must
//! stop recovery (see [`crate::exit::FATAL`]).

use std::path::Path;

use crate::commands::prefetch::Prefetch;
use crate::config::Settings;
use crate::exit;
use crate::local::crashsafe;
use crate::repo::layout::wal_key;
use crate::repo::object::{ObjectError, Sealer};
use crate::repo::stored::{self, Damage, WalObject};
use crate::repo::{Reader, RepoError, Store, StoreError, WalCheckError};
use crate::timeindex::StoredSummary;
use crate::wal::{NameError, SegmentName, WalFileName};

/// What a fetch found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchOutcome {
    Restored {
        name: WalFileName,
        size: u64,
        stored_size: u64,
        /// Taken from the prefetch spool rather than downloaded now.
        prefetched: bool,
        /// Unix microseconds: the newest transaction end in the segment, from the time index,
        /// when [`fetch_for_replay`] asked for it and it could be read in time.
        latest_commit: Option<i64>,
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
    #[error("the streamed end of {name} ({key} in {repo}) cannot be used: {message}")]
    Streamed {
        name: String,
        key: String,
        repo: String,
        message: String,
    },
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
    fetch_for_replay(settings, name, dest, prefetch, false).await
}

/// How long a fetch that has written its segment still waits for the segment's summary (asked
/// for at the same time as the segment, so normally already there).
const SUMMARY_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// [`fetch`], and with `commit_time`, for a segment, the newest transaction end in it
/// (`latest_commit`, for the replay progress line): from the time index, one small GET made
/// beside the segment's, or from the prefetch spool. Best effort, within the same time bound:
/// a summary missing, unreadable or late is left out and never changes the outcome.
pub async fn fetch_for_replay(
    settings: &Settings,
    name: &str,
    dest: &Path,
    prefetch: Option<&Prefetch>,
    commit_time: bool,
) -> Result<FetchOutcome, FetchError> {
    let bound = settings.call_bound();
    let deadline = tokio::time::Instant::now() + bound;
    let (mut outcome, pending) = tokio::time::timeout_at(
        deadline,
        fetch_unbounded(settings, name, dest, prefetch, commit_time),
    )
    .await
    .unwrap_or_else(|_| {
        Err(FetchError::TimedOut {
            repo: settings.repo.to_string(),
            after: bound,
        })
    })?;
    if let (Some(pending), FetchOutcome::Restored { latest_commit, .. }) = (pending, &mut outcome) {
        let until = deadline.min(tokio::time::Instant::now() + SUMMARY_GRACE);
        *latest_commit = pending.finish(until).await;
    }
    Ok(outcome)
}

/// A segment's summary being read beside it; aborted when dropped.
struct PendingSummary {
    get: tokio::task::JoinHandle<Result<Option<bytes::Bytes>, StoreError>>,
    segment: SegmentName,
    /// The repository's, once its descriptor is read (beside the segment).
    sealer: Option<Sealer>,
}

impl Drop for PendingSummary {
    fn drop(&mut self) {
        self.get.abort();
    }
}

impl PendingSummary {
    fn start(store: &Store, segment: SegmentName) -> PendingSummary {
        let (store, key) = (store.clone(), crate::timeindex::summary_key(&segment));
        PendingSummary {
            get: tokio::spawn(async move { store.get(&key).await }),
            segment,
            sealer: None,
        }
    }

    /// The newest transaction end the summary records, if it arrives by `until` and opens.
    async fn finish(mut self, until: tokio::time::Instant) -> Option<i64> {
        let sealer = self.sealer.take()?;
        let bytes = match tokio::time::timeout_at(until, &mut self.get).await {
            Ok(Ok(Ok(Some(bytes)))) => bytes,
            Ok(Ok(Err(e))) => {
                tracing::debug!("summary of {}: {e}", self.segment);
                return None;
            }
            _ => return None,
        };
        match stored::open::<StoredSummary>(&sealer, &self.segment, &bytes) {
            Ok(s) => s.latest_commit_us(),
            Err(e) => {
                tracing::debug!(
                    "summary {} is unreadable: {e}",
                    crate::timeindex::summary_key(&self.segment)
                );
                None
            }
        }
    }
}

/// The prefetcher's copy of `name`, moved to `dest`, with the newest transaction end spooled
/// beside it when `with_commit` (a segment whose commit time is wanted); `None` when there is no
/// copy or it is unusable (then the repository is asked).
fn take_prefetched(p: &Prefetch, name: WalFileName, dest: &Path, with_commit: bool) -> Option<FetchOutcome> {
    // Read before the copy is taken, which removes it.
    let latest_commit = if with_commit {
        p.spooled_commit(&name)
    } else {
        None
    };
    match p.take(&name, dest) {
        Some(Ok(size)) => Some(FetchOutcome::Restored {
            name,
            size,
            stored_size: 0,
            prefetched: true,
            latest_commit,
        }),
        Some(Err(e)) => {
            tracing::warn!("prefetched {name} unusable ({e}); fetching it from the repository");
            None
        }
        None => None,
    }
}

async fn fetch_unbounded(
    settings: &Settings,
    name: &str,
    dest: &Path,
    prefetch: Option<&Prefetch>,
    commit_time: bool,
) -> Result<(FetchOutcome, Option<PendingSummary>), FetchError> {
    let name: WalFileName = name.parse()?;
    let name_str = name.to_string();
    let key = wal_key(&name);
    let repo = settings.repo.to_string();
    let segment = match name {
        WalFileName::Segment(s) if commit_time => Some(s),
        _ => None,
    };

    if let Some(outcome) = prefetch.and_then(|p| take_prefetched(p, name, dest, segment.is_some())) {
        return Ok((outcome, None));
    }

    // A corrupt read is re-read once: a flipped bit in transit is not worth stopping recovery for,
    // a corrupt stored object is.
    let mut rereads = 1;
    // A segment not stored whole is looked for again after its stream pieces are read: the
    // daemon may store it whole (and delete its pieces) in between, and then the whole segment
    // is what is served, never the pieces, and never "not found".
    let mut streamed: Option<Vec<u8>> = None;
    let mut looked_twice = false;
    let store = settings.open_store().await?;
    let mut summary = segment.map(|s| PendingSummary::start(&store, s));
    let (reader, stored, content) = loop {
        // The descriptor and the file in one round trip; an absent file counts as absent only
        // once the descriptor proves this is the repository.
        let (reader, object) = tokio::try_join!(
            async {
                Reader::on_stores(store.clone(), settings.key.as_ref())
                    .await
                    .map_err(FetchError::from)
            },
            async { store.get(&key).await.map_err(FetchError::from) }
        )?;
        let Some(bytes) = object else {
            if let WalFileName::Segment(seg) = name {
                if !looked_twice {
                    looked_twice = true;
                    streamed = streamed_end(&store, &reader, &seg).await?;
                    continue;
                }
                if let Some(content) = streamed.take() {
                    return Ok((serve_streamed(&seg, dest, content)?, None));
                }
            }
            return Ok((FetchOutcome::NotFound { name }, None));
        };
        match stored::open::<WalObject>(reader.sealer(), &name, &bytes) {
            Ok(file) => break (reader, file.stored_len, file.content),
            Err(Damage::Content(never)) => match never {},
            Err(Damage::Envelope(source)) if rereads == 0 => {
                let open = |b: &[u8]| stored::open::<WalObject>(reader.sealer(), &name, b);
                if let Some(file) = store
                    .reread_from_fallback(&key, None, source.to_string(), open)
                    .await
                {
                    break (reader, file.stored_len, file.content);
                }
                return Err(FetchError::Corrupt {
                    name: name_str,
                    key,
                    repo,
                    source: Box::new(source),
                });
            }
            Err(Damage::Envelope(source)) => {
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
    if let Some(s) = summary.as_mut() {
        s.sealer = Some(reader.sealer().clone());
    }
    Ok((write_out(name, dest, content, stored)?, summary))
}

/// A segment the repository does not hold whole, as far as a streaming daemon stored it (the
/// end of the archive on its timeline): its bytes, then zeroes to the segment's size, as
/// `pg_receivewal`'s `.partial` file is used. Replay stops cleanly where the stream stopped
/// (the zeroes are no valid record), and a standby asks again, getting the whole segment once it
/// is stored. `None` when no stream piece starts it.
async fn streamed_end(
    store: &Store,
    reader: &Reader,
    seg: &SegmentName,
) -> Result<Option<Vec<u8>>, FetchError> {
    let key = crate::repo::layout::stream_segment_prefix(seg);
    let corrupt = |message: String| FetchError::Streamed {
        name: seg.to_string(),
        key: key.clone(),
        repo: store.url().to_string(),
        message,
    };
    let bytes = match crate::replication::pieces::read(store, reader.sealer(), seg).await {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(None),
        Err(crate::replication::pieces::PieceError::Store(e)) => return Err(e.into()),
        Err(e) => return Err(corrupt(e.to_string())),
    };
    let size = reader.cluster().map_or(16 << 20, |c| c.wal_segment_size) as usize;
    if bytes.len() >= size {
        return Err(corrupt(format!(
            "{} bytes is not a part of a {size}-byte segment",
            bytes.len()
        )));
    }
    let mut content = bytes;
    content.resize(size, 0);
    // Its first page, against the name and the repository's cluster, as for a whole segment.
    reader
        .check_wal(&WalFileName::Segment(*seg), &content)
        .map_err(|e| corrupt(e.to_string()))?;
    Ok(Some(content))
}

fn serve_streamed(seg: &SegmentName, dest: &Path, content: Vec<u8>) -> Result<FetchOutcome, FetchError> {
    let received = content.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1) as u64;
    tracing::warn!(
        "{seg} is not archived whole: serving the {received} bytes a streaming daemon stored of it, then zeroes (the end of the archive)"
    );
    write_out(WalFileName::Segment(*seg), dest, content, received)
}

fn write_out(
    name: WalFileName,
    dest: &Path,
    content: Vec<u8>,
    stored: u64,
) -> Result<FetchOutcome, FetchError> {
    crashsafe::write_durably(dest, &content).map_err(|source| FetchError::Write {
        dest: dest.display().to_string(),
        source,
    })?;
    Ok(FetchOutcome::Restored {
        name,
        size: content.len() as u64,
        stored_size: stored,
        prefetched: false,
        latest_commit: None,
    })
}
