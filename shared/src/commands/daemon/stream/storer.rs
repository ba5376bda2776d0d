//! What the receiver hands on, stored in order: whole segments through push's own path (the
//! same objects, time index entries and no-overwrite rule as `archive-agent push`), timeline
//! history files the same way, and pieces of the segment still being received. The end of what
//! is durable is published after each job: that, and nothing more, is the flush position the
//! server is told.
//!
//! A repository that fails is retried without end (the slot holds the WAL on the server
//! meanwhile, and the bounded queue stops the receiver reading); a refusal that no retry can
//! change (another cluster's WAL, different bytes under a stored name) stops the daemon.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::commands::daemon::Metrics;
use crate::commands::push::{self, Archiving, PushError};
use crate::config::Settings;
use crate::local::handoff::Spool;
use crate::replication::pieces::{self, Piece};
use crate::repo::Writer;
use crate::wal::{Lsn, SegmentName, WalFileName};

/// One thing to store.
#[derive(Debug)]
pub enum Job {
    /// A whole segment; `end` is its last byte's LSN plus one; `connection` is the number of
    /// the connection that received it.
    Segment {
        name: SegmentName,
        bytes: Vec<u8>,
        end: Lsn,
        connection: u64,
    },
    /// The segment's bytes from offset `from`; `end` is where they end.
    Piece {
        segment: SegmentName,
        from: u32,
        bytes: Vec<u8>,
        end: Lsn,
        connection: u64,
    },
    /// A timeline history file (does not move the flush position).
    History { name: WalFileName, bytes: Vec<u8> },
}

/// Why the storer stopped.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StorerError(pub PushError);

/// The storing task's handle.
#[derive(Debug)]
pub struct Storer {
    pub jobs: mpsc::Sender<Job>,
    /// The end of what is durable, and the connection that received it: a position a former
    /// connection reached says nothing of this one's WAL (another timeline may have taken over).
    pub flushed: watch::Receiver<(u64, Lsn)>,
    /// The end of the last segment or piece handed on.
    pub sent_end: Lsn,
    /// The number of the current connection (see [`Job`]).
    pub connection: u64,
    pub task: tokio::task::JoinHandle<Result<(), StorerError>>,
}

/// Jobs queued at most: two segments' worth of memory beside the one being received.
const QUEUE: usize = 2;

/// Start storing into `repo`, through files in `dir` (the segment is handed to push's path as
/// a file, like a segment PostgreSQL archives).
pub fn start(
    settings: Arc<Settings>,
    repo: Writer,
    dir: PathBuf,
    flushed_from: Lsn,
    metrics: Arc<Metrics>,
) -> Storer {
    let (jobs, rx) = mpsc::channel(QUEUE);
    let (tx, flushed) = watch::channel((0, flushed_from));
    let task = tokio::spawn(run(settings, repo, dir, rx, tx, metrics));
    Storer {
        jobs,
        flushed,
        sent_end: flushed_from,
        connection: 0,
        task,
    }
}

async fn run(
    settings: Arc<Settings>,
    mut repo: Writer,
    dir: PathBuf,
    mut jobs: mpsc::Receiver<Job>,
    flushed: watch::Sender<(u64, Lsn)>,
    metrics: Arc<Metrics>,
) -> Result<(), StorerError> {
    let spool = Spool::new(&dir);
    // The pieces this process stored of the segment being received.
    let mut stored: Vec<(SegmentName, Piece)> = Vec::new();
    while let Some(job) = jobs.recv().await {
        let mut delay = Duration::from_millis(200);
        loop {
            match store(&settings, &mut repo, &dir, &spool, &job, &mut stored).await {
                Ok(()) => break,
                Err(e) if fatal(&e) => return Err(StorerError(e)),
                Err(e) => {
                    let behind = metrics
                        .stream_server_lsn
                        .load(Ordering::Relaxed)
                        .saturating_sub(flushed.borrow().1.0);
                    tracing::warn!(
                        "stream: storing {} failed, retrying in {:.1}s; the repository is {behind} bytes behind the server, whose slot keeps that WAL meanwhile: {e}",
                        describe(&job),
                        delay.as_secs_f64()
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
        match job {
            Job::Segment { end, connection, .. } | Job::Piece { end, connection, .. } => {
                flushed.send_replace((connection, end));
            }
            Job::History { .. } => {}
        }
    }
    Ok(())
}

fn describe(job: &Job) -> String {
    match job {
        Job::Segment { name, .. } => format!("segment {name}"),
        Job::Piece {
            segment, from, bytes, ..
        } => {
            format!("{segment} bytes {from}..{}", *from as usize + bytes.len())
        }
        Job::History { name, .. } => name.to_string(),
    }
}

/// A refusal a retry cannot change.
fn fatal(e: &PushError) -> bool {
    matches!(
        e,
        PushError::ForeignCluster { .. }
            | PushError::Conflict { .. }
            | PushError::InvalidWal { .. }
            | PushError::StoredCorrupt { .. }
            | PushError::TooLarge { .. }
            | PushError::Name(_)
    )
}

async fn store(
    settings: &Settings,
    repo: &mut Writer,
    dir: &std::path::Path,
    spool: &Spool,
    job: &Job,
    stored: &mut Vec<(SegmentName, Piece)>,
) -> Result<(), PushError> {
    match job {
        Job::Segment { name, bytes, .. } => {
            archive_file(settings, repo, dir, spool, &WalFileName::Segment(*name), bytes).await?;
            // Its pieces are garbage now, and so are those a stopped stream left of earlier
            // segments, once those are stored whole (until then they are the only copy).
            let reader = repo.writable().reader();
            let mut garbage = pieces::list(&reader, name).await.unwrap_or_default();
            let mut earlier = pieces::list_before(&reader, name).await.unwrap_or_default();
            earlier.sort_by_key(|(s, _)| *s);
            let mut whole = std::collections::BTreeMap::new();
            for (seg, piece) in earlier {
                let is_whole = match whole.get(&seg) {
                    Some(w) => *w,
                    None => {
                        let key = crate::repo::layout::wal_key(&WalFileName::Segment(seg));
                        let w = matches!(reader.head(&key).await, Ok(Some(_)));
                        whole.insert(seg, w);
                        w
                    }
                };
                if is_whole {
                    garbage.push(piece);
                }
            }
            pieces::remove(repo.writable(), &garbage).await;
            stored.clear();
            Ok(())
        }
        Job::Piece {
            segment, from, bytes, ..
        } => {
            let piece = pieces::store(repo.writable(), repo.sealer(), segment, *from, bytes)
                .await
                .map_err(|e| match e {
                    pieces::PieceError::Store(s) => PushError::Store(s),
                    other => PushError::Read {
                        path: segment.to_string(),
                        source: std::io::Error::other(other.to_string()),
                    },
                })?;
            // Pieces of another segment (or timeline) are no business of this one's.
            stored.retain(|(s, _)| s == segment);
            if *from == 0 {
                // A consolidation: the pieces it covers go; one reaching further (stored before
                // a reconnect restarted the segment) stays.
                let (covered, kept): (Vec<_>, Vec<_>) = std::mem::take(stored)
                    .into_iter()
                    .partition(|(_, p)| p.key != piece.key && p.to <= piece.to);
                *stored = kept;
                let covered: Vec<Piece> = covered.into_iter().map(|(_, p)| p).collect();
                pieces::remove(repo.writable(), &covered).await;
            }
            stored.push((*segment, piece));
            Ok(())
        }
        Job::History { name, bytes } => archive_file(settings, repo, dir, spool, name, bytes).await,
    }
}

/// Write `bytes` to `dir/<name>` and archive that file exactly as push would.
async fn archive_file(
    settings: &Settings,
    repo: &mut Writer,
    dir: &std::path::Path,
    spool: &Spool,
    name: &WalFileName,
    bytes: &[u8],
) -> Result<(), PushError> {
    let path = dir.join(name.to_string());
    let write_err = |source| PushError::Read {
        path: path.display().to_string(),
        source,
    };
    std::fs::write(&path, bytes).map_err(write_err)?;
    let src = push::open_wal_file(&path)?;
    let outcome = push::archive_source(
        settings,
        repo,
        src,
        Archiving {
            spool: Some(spool),
            indexing: push::Indexing::Inline,
            listed_absent: false,
        },
    )
    .await;
    let _ = std::fs::remove_file(&path);
    let outcome = outcome?;
    tracing::info!(
        name = %name,
        newly_stored = outcome.newly_stored,
        "stream: archived {name}{}",
        if outcome.newly_stored { "" } else { " (already archived, same bytes)" }
    );
    Ok(())
}
