//! The indexer: the time-index summary of each segment the daemon uploads, made after the upload
//! instead of in its pass, so that decoding WAL is off the upload's critical path (push answers
//! PostgreSQL as soon as the segment is durable) and each segment continues its predecessor's
//! carry even though uploads run in parallel and end out of order.
//!
//! Uploads hand their segments over ([`IndexJob`]); the indexer decodes them one at a time, in
//! name order, each once its predecessor's carry is in the spool or its predecessor is no longer
//! being uploaded (by the daemon or by a push), waiting at most [`WAIT_FOR_PREDECESSOR`]. Without
//! a carry a summary only loses the record that crosses into the segment. The summaries are then
//! written, a few at once. Derived data: a summary that cannot be made or written is logged, and
//! restore only loses precision for that segment.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use super::clock::Clock;
use crate::commands::push;
use crate::local::handoff::Spool;
use crate::repo::Writer;
use crate::timeindex::SummaryWrite;
use crate::wal::{Lsn, SegmentName, WalFileName};

/// How long a segment waits for its predecessor's carry while that one is being uploaded.
const WAIT_FOR_PREDECESSOR: Duration = Duration::from_secs(30);

/// Summaries written at once.
const WRITES_IN_FLIGHT: usize = 4;

/// How often a waiting indexer looks at the spool again.
const POLL: Duration = Duration::from_millis(20);

/// A segment durable in the repository, to be summarized.
#[derive(Debug)]
pub(crate) struct IndexJob {
    pub(crate) seg: SegmentName,
    pub(crate) segment_size: u32,
    /// The file, opened again when the upload opened it (see [`push::summarize_archived`]).
    pub(crate) source: push::WalSource,
    /// The file's metadata when the upload opened it: the summary is made only from that file.
    pub(crate) meta: std::fs::Metadata,
    /// Whether the upload stored the segment (else an identical copy was there already).
    pub(crate) newly_stored: bool,
    pub(crate) repo: Writer,
}

/// The indexer's task and the way to hand it segments.
#[derive(Debug)]
pub(crate) struct Indexer {
    tx: mpsc::UnboundedSender<IndexJob>,
    task: JoinHandle<()>,
}

impl Indexer {
    pub(crate) fn start(spool: Spool, clock: Arc<dyn Clock>) -> Indexer {
        let (tx, rx) = mpsc::unbounded_channel();
        Indexer {
            tx,
            task: tokio::spawn(run(rx, spool, clock)),
        }
    }

    /// Where uploads hand their segments.
    pub(crate) fn sender(&self) -> mpsc::UnboundedSender<IndexJob> {
        self.tx.clone()
    }

    /// Summarize what was handed over (the uploads have ended) and write it.
    pub(crate) async fn finish(self) {
        drop(self.tx);
        let _ = self.task.await;
    }
}

async fn run(mut rx: mpsc::UnboundedReceiver<IndexJob>, spool: Spool, clock: Arc<dyn Clock>) {
    let mut pending: BTreeMap<SegmentName, (IndexJob, Instant)> = BTreeMap::new();
    let mut writes = JoinSet::new();
    let mut open = true;
    loop {
        while let Ok(job) = rx.try_recv() {
            pending.insert(job.seg, (job, clock.now()));
        }
        let next = pending
            .first_key_value()
            .map(|(_, (job, since))| !open || ready(&spool, job, clock.now() - *since));
        match next {
            Some(true) => {
                let (job, _) = pending.pop_first().expect("a first entry").1;
                while writes.len() >= WRITES_IN_FLIGHT {
                    writes.join_next().await;
                }
                if let Some(write) = summarize(&spool, job).await {
                    writes.spawn(write);
                }
            }
            None if !open => break,
            _ => {
                tokio::select! {
                    job = rx.recv(), if open => match job {
                        Some(job) => {
                            pending.insert(job.seg, (job, clock.now()));
                        }
                        None => open = false,
                    },
                    () = tokio::time::sleep(POLL), if !pending.is_empty() => {}
                }
            }
        }
    }
    while writes.join_next().await.is_some() {}
}

/// The segment before `seg`, if any.
fn predecessor(seg: &SegmentName, segment_size: u32) -> Option<SegmentName> {
    let start = crate::timeindex::segment_start(seg, segment_size).ok()?;
    let prev = start.0.checked_sub(u64::from(segment_size))?;
    Some(SegmentName::containing(seg.timeline, Lsn(prev), segment_size))
}

/// Whether `job` can be summarized now: its predecessor's carry is kept, or nobody is uploading
/// the predecessor, or it has waited long enough.
fn ready(spool: &Spool, job: &IndexJob, waited: Duration) -> bool {
    let Some(prev) = predecessor(&job.seg, job.segment_size) else {
        return true;
    };
    waited >= WAIT_FOR_PREDECESSOR
        || spool.carry(job.repo.id(), &prev).is_some()
        || !spool.upload_in_progress(&WalFileName::Segment(prev))
}

/// Decode `job`'s segment, keep its carry for the next one, and return the write of its summary.
async fn summarize(spool: &Spool, job: IndexJob) -> Option<impl Future<Output = ()> + Send + 'static> {
    let (store, sealer) = (job.repo.writable().clone(), job.repo.sealer().clone());
    let repo = job.repo.id().clone();
    match push::summarize_archived(&store, &sealer, &repo, spool, job.source, &job.meta).await {
        Ok((seg, result)) => {
            if let Ok((_, Some(next))) = &result {
                spool.keep_carry(&repo, &seg, next);
            }
            let write = SummaryWrite::for_segment(job.newly_stored);
            Some(async move {
                push::record_summary(&store, &sealer, &seg, Some(result), &repo, None, write).await;
            })
        }
        Err(e) => {
            tracing::warn!("time index for {} not recorded: {e}", job.seg);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_predecessor_is_the_segment_before_on_the_same_timeline() {
        let tli = crate::wal::TimelineId::new(3).unwrap();
        let size = 16 << 20;
        let seg = SegmentName::containing(tli, Lsn(0x1_0000_0000), size);
        let prev = predecessor(&seg, size).unwrap();
        assert_eq!(prev.to_string(), "0000000300000000000000FF");
        assert_eq!(
            predecessor(&SegmentName::containing(tli, Lsn(0), size), size),
            None
        );
    }
}
