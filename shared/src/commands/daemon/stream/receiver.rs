//! The receive loop of `archive-agent daemon --stream`, after `pg_receivewal`
//! (`receivelog.c`: `HandleCopyStream`, `ProcessXLogDataMsg`, the keepalive reply): connect,
//! check the cluster, keep the slot, stream from a segment boundary, hand whole segments and
//! pieces to the [`storer`](super::storer), and tell the server what is durable.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::storer::{self, Job, Storer};
use super::{StreamError, StreamOptions};
use crate::commands::daemon::Metrics;
use crate::config::Settings;
use crate::replication::assembler::{Assembler, Message, parse};
use crate::replication::conninfo::Target;
use crate::replication::pieces::CONSOLIDATE_AFTER;
use crate::replication::source::{self, Source, SourceError, Streaming};
use crate::repo::Writer;
use crate::timeline::TimelineHistory;
use crate::wal::{Lsn, TimelineId, WalFileName};

/// Where the next connection starts: the first byte of the segment being received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resume {
    timeline: TimelineId,
    start: Lsn,
}

/// How a connection's streaming ended.
enum Ended {
    Shutdown,
    /// The server ended the timeline (or went away): reconnect now.
    Reconnect,
    /// Reconnect after a pause.
    Failed(SourceError),
}

/// Run until `shutdown`, reconnecting as needed. The first connection's refusals (a password,
/// a privilege, `wal_level`) are returned; later ones are logged and retried.
pub async fn run(
    settings: Arc<Settings>,
    opts: StreamOptions,
    repo: Writer,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StreamError> {
    tokio::pin!(shutdown);
    let cluster = repo.cluster().copied();
    let mut storer: Option<Storer> = None;
    let mut repo = Some(repo);
    let mut resume: Option<Resume> = None;
    let mut connected_once = false;
    // Whether streaming ever started: refusals after that are retried, not fatal (a failover
    // in progress can look like one).
    let mut started_once = false;
    let mut delay = Duration::from_secs(1);
    loop {
        let target = opts.target.clone();
        let source = tokio::select! {
            () = &mut shutdown => break,
            s = connect(target) => s,
        };
        let mut source = match source {
            Ok(s) => s,
            Err(e) if !connected_once && e.is_permanent() => return Err(StreamError::Source(e)),
            Err(e) => {
                tracing::error!("stream: cannot connect, retrying in {}s: {e}", delay.as_secs());
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let id = source.identity.clone();
        if let Some(c) = cluster
            && (c.system_identifier != id.system_id || c.wal_segment_size != id.segment_size)
        {
            return Err(StreamError::ForeignCluster {
                host: source.host.clone(),
                system_id: id.system_id,
                stored: c.to_string(),
            });
        }
        if storer.is_none() {
            let Some(r) = repo.take() else {
                unreachable!("the repository is taken once")
            };
            std::fs::create_dir_all(opts.dir.join(crate::local::handoff::SPOOL_DIR).join("archived"))
                .map_err(|source| StreamError::Dir {
                    path: opts.dir.display().to_string(),
                    source,
                })?;
            storer = Some(storer::start(
                Arc::clone(&settings),
                r,
                opts.dir.clone(),
                Lsn(0),
                Arc::clone(&metrics),
            ));
        }
        let Some(st) = storer.as_mut() else { unreachable!() };
        connected_once = true;
        let plan = match plan_start(&mut source, &opts, st, resume).await {
            Ok(p) => p,
            Err(e) if e.is_permanent() && !started_once => return Err(StreamError::Source(e)),
            Err(e) => {
                tracing::error!("stream: {e}");
                back_off(&mut delay).await;
                continue;
            }
        };
        tracing::info!(
            host = %source.host,
            timeline = plan.timeline.get(),
            start = %plan.start,
            "stream: replicating from {} on timeline {} at {}",
            source.host,
            plan.timeline,
            plan.start
        );
        let slot = opts.slot.clone();
        let source_host = source.target.clone();
        let streaming =
            match tokio::task::block_in_place(|| source.start(slot.as_deref(), plan.start, plan.timeline)) {
                Ok(s) => s,
                Err(e) if e.is_permanent() && !started_once => return Err(StreamError::Source(e)),
                Err(e) => {
                    tracing::error!("stream: {e}");
                    back_off(&mut delay).await;
                    continue;
                }
            };
        delay = Duration::from_secs(1);
        started_once = true;
        st.connection += 1;
        metrics.stream_connected.store(1, Ordering::Relaxed);
        let watch = opts
            .slot
            .clone()
            .map(|name| tokio::spawn(watch_slot(source_host.clone(), name, Arc::clone(&metrics))));
        let mut asm = Assembler::new(plan.timeline, id.segment_size, plan.start);
        let ended = stream(streaming, &mut asm, st, &opts, &metrics, &mut shutdown).await;
        if let Some(w) = watch {
            w.abort();
        }
        metrics.stream_connected.store(0, Ordering::Relaxed);
        let (seg, _) = asm.current();
        resume = Some(Resume {
            timeline: asm.timeline(),
            start: seg.start_lsn(id.segment_size).unwrap_or(plan.start),
        });
        match ended? {
            Ended::Shutdown => break,
            Ended::Reconnect => {}
            Ended::Failed(e) => {
                tracing::warn!("stream: {e}; reconnecting in {}s", delay.as_secs());
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    if let Some(mut st) = storer {
        drop(st.jobs);
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut st.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(StreamError::Store(e)),
            Ok(Err(e)) => return Err(StreamError::Task(e.to_string())),
            Err(_) => {
                st.task.abort();
                tracing::warn!(
                    "stream: stopping with WAL not stored (the repository does not answer); the slot keeps it for the next start"
                );
            }
        }
    }
    Ok(())
}

/// Wait `delay` before the next attempt, and double it up to 30 s.
async fn back_off(delay: &mut Duration) {
    tokio::time::sleep(*delay).await;
    *delay = (*delay * 2).min(Duration::from_secs(30));
}

async fn connect(target: Target) -> Result<Source, SourceError> {
    tokio::task::block_in_place(|| source::connect(&target))
}

/// How often the slot's state is looked at while streaming.
const SLOT_CHECK_EVERY: Duration = Duration::from_secs(30);

/// Look at the slot on `host` every [`SLOT_CHECK_EVERY`]: its state in the metrics, and a warning
/// (at most one a minute) when the server is about to give up the WAL it holds for the daemon
/// (`max_slot_wal_keep_size`), an error once it has.
async fn watch_slot(host: crate::replication::conninfo::Host, name: String, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(SLOT_CHECK_EVERY);
    let mut last_said: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        let state = tokio::task::block_in_place(|| source::slot_state(&host, &name));
        let state = match state {
            Ok(Some(s)) => s,
            Ok(None) => {
                tracing::warn!("stream: replication slot {name:?} is gone from {}", host.label);
                continue;
            }
            Err(e) => {
                tracing::debug!("stream: slot check: {e}");
                continue;
            }
        };
        let code = match state.wal_status.as_deref() {
            Some("reserved") => 1,
            Some("extended") => 2,
            Some("unreserved") => 3,
            Some("lost") => 4,
            _ => 0,
        };
        metrics.stream_slot_wal_status.store(code, Ordering::Relaxed);
        metrics
            .stream_slot_safe_wal_bytes
            .store(state.safe_wal_size.unwrap_or(-1), Ordering::Relaxed);
        let due = last_said.is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
        if code >= 3 && due {
            last_said = Some(tokio::time::Instant::now());
            match code {
                3 => tracing::warn!(
                    "stream: replication slot {name:?} on {} is about to lose the WAL it holds (wal_status unreserved: max_slot_wal_keep_size); the repository is {} bytes behind",
                    host.label,
                    metrics
                        .stream_server_lsn
                        .load(Ordering::Relaxed)
                        .saturating_sub(metrics.stream_flushed_lsn.load(Ordering::Relaxed))
                ),
                _ => tracing::error!(
                    "stream: replication slot {name:?} on {} has lost WAL the repository does not have (wal_status lost): the archive will have a gap; take a new base backup",
                    host.label
                ),
            }
        }
    }
}

/// Where and on which timeline to start.
struct Plan {
    timeline: TimelineId,
    start: Lsn,
}

/// The slot (created when missing), the history of a new timeline (stored), and the start:
/// where the last connection stopped, else the slot's reserved WAL or the segment after the
/// newest one stored, whichever is later.
async fn plan_start(
    source: &mut Source,
    opts: &StreamOptions,
    storer: &Storer,
    resume: Option<Resume>,
) -> Result<Plan, SourceError> {
    let id = source.identity.clone();
    let seg_start = |l: Lsn| Lsn(l.0 - l.0 % u64::from(id.segment_size));
    let mut slot_start = None;
    if let Some(name) = &opts.slot {
        let mut state = tokio::task::block_in_place(|| source.slot(name))?;
        if state.is_none() {
            tokio::task::block_in_place(|| source.create_slot(name))?;
            tracing::info!(
                "stream: created physical replication slot {name:?} on {}",
                source.host
            );
            state = tokio::task::block_in_place(|| source.slot(name))?;
        }
        if let Some(s) = &state {
            match s.wal_status.as_deref() {
                Some("lost") => tracing::error!(
                    "stream: replication slot {name:?} lost the WAL it held (max_slot_wal_keep_size): the archive has a gap from where the stream stopped; take a new base backup"
                ),
                Some("unreserved") => tracing::warn!(
                    "stream: replication slot {name:?} is about to lose its WAL (wal_status unreserved, max_slot_wal_keep_size)"
                ),
                _ => {}
            }
            slot_start = s.restart_lsn;
        }
    }
    let mut history = None;
    if id.timeline > TimelineId::FIRST {
        let (name, bytes) = tokio::task::block_in_place(|| source.timeline_history(id.timeline))?;
        let parsed = TimelineHistory::parse(id.timeline, &bytes).map_err(|e| SourceError::Unreadable {
            host: source.host.clone(),
            what: "TIMELINE_HISTORY",
            got: e.to_string(),
        })?;
        if let Ok(name) = name.parse::<WalFileName>() {
            let _ = storer.jobs.send(Job::History { name, bytes }).await;
        }
        history = Some(parsed);
    }
    let fresh = seg_start(slot_start.unwrap_or(id.position));
    let entries = history.map(|h| h.ancestors).unwrap_or_default();
    // The timeline that holds `fresh`: the first ancestor that ended after it, else the
    // server's (a slot may still hold WAL from before a promotion).
    let fresh_timeline = entries
        .iter()
        .find(|e| e.switch_lsn > fresh)
        .map_or(id.timeline, |e| e.timeline);
    let Some(r) = resume else {
        return Ok(Plan {
            timeline: fresh_timeline,
            start: fresh,
        });
    };
    if r.timeline > id.timeline {
        // An old primary not fenced yet, or a standby behind: never follow a timeline back.
        return Err(SourceError::Server {
            host: source.host.clone(),
            message: format!(
                "is on timeline {}, older than timeline {} the stream is on; waiting for a server on timeline {} or later",
                id.timeline, r.timeline, r.timeline
            ),
            permanent: false,
        });
    }
    if r.timeline == id.timeline {
        return Ok(Plan {
            timeline: r.timeline,
            start: r.start,
        });
    }
    // Another timeline: where did ours end, and which one followed it?
    let Some(i) = entries.iter().position(|e| e.timeline == r.timeline) else {
        tracing::error!(
            "stream: {} is on timeline {}, whose history does not include timeline {}, where the stream was: starting afresh (the archive may have a gap)",
            source.host,
            id.timeline,
            r.timeline
        );
        return Ok(Plan {
            timeline: fresh_timeline,
            start: fresh,
        });
    };
    let switch = entries[i].switch_lsn;
    let next = entries.get(i + 1).map_or(id.timeline, |e| e.timeline);
    let seg_end = Lsn(r.start.0 + u64::from(id.segment_size));
    if seg_end <= switch {
        // Whole segments of the old timeline are still to come: the server sends them and ends.
        return Ok(Plan {
            timeline: r.timeline,
            start: r.start,
        });
    }
    if r.start > switch {
        tracing::warn!(
            "stream: timeline {} ended at {switch}, before {}, where the stream had got: the WAL after {switch} on timeline {} was discarded by the failover (its pieces stay under timeline {})",
            r.timeline,
            r.start,
            r.timeline,
            r.timeline
        );
    }
    tracing::info!(
        "stream: timeline {} ended at {switch}; following timeline {next}",
        r.timeline
    );
    Ok(Plan {
        timeline: next,
        start: seg_start(switch.min(r.start)),
    })
}

/// Stream until the server ends, an error, or `shutdown`.
async fn stream(
    mut conn: Streaming,
    asm: &mut Assembler,
    st: &mut Storer,
    opts: &StreamOptions,
    metrics: &Metrics,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Result<Ended, StreamError> {
    let seg_size = asm.segment_size();
    // The offset in the current segment up to which pieces were handed on, and how many.
    let (mut piece_from, mut pieces) = (0u32, 0usize);
    // Jobs the storer's queue has no room for yet. While they wait, the socket is not read (the
    // server holds the WAL), but status updates still go out, so the server never times the
    // connection out during a repository outage.
    let mut pending: VecDeque<Job> = VecDeque::new();
    // A handle of its own, so that a permit to send does not hold the storer borrowed.
    let jobs = st.jobs.clone();
    st.flushed.borrow_and_update();
    // What precedes the start is reported flushed: nothing after it is acknowledged by that,
    // and a server counts a standby that reports no flush position as asynchronous.
    let floor = asm.position();
    let mut flush_tick = tokio::time::interval(opts.flush_every);
    let mut status_tick = tokio::time::interval(opts.status_every);
    flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let flushed_now = |st: &Storer| match *st.flushed.borrow() {
        (c, l) if c == st.connection => l.max(floor),
        _ => floor,
    };
    loop {
        let mut flush_due = false;
        tokio::select! {
            biased;
            () = shutdown.as_mut() => {
                hand_piece(asm, st, &mut pending, &mut piece_from, &mut pieces);
                if tokio::time::timeout(SHUTDOWN_GRACE, drain(st, &mut pending)).await.is_err() {
                    tracing::warn!("stream: stopping with WAL not stored (the repository does not answer); the slot keeps it for the next start");
                    return Ok(Ended::Shutdown);
                }
                // Tell the server what is durable before going (best effort).
                let _ = wait_flushed(st, st.sent_end, SHUTDOWN_GRACE).await;
                let _ = conn.status(asm.position(), flushed_now(st), false).await;
                return Ok(Ended::Shutdown);
            }
            r = st.flushed.changed() => {
                if r.is_err() {
                    return Err(storer_failed(st).await);
                }
                let f = flushed_now(st);
                metrics.stream_flushed_lsn.store(f.0, Ordering::Relaxed);
                if opts.synchronous
                    && let Err(e) = conn.status(asm.position(), f, false).await
                {
                    return Ok(Ended::Failed(e));
                }
                flush_due = opts.synchronous;
            }
            _ = flush_tick.tick() => flush_due = true,
            _ = status_tick.tick() => {
                if let Err(e) = conn.status(asm.position(), flushed_now(st), false).await {
                    return Ok(Ended::Failed(e));
                }
            }
            permit = jobs.reserve(), if !pending.is_empty() => {
                let permit = permit.map_err(|_| StreamError::Task("the storing task stopped".into()))?;
                if let Some(job) = pending.pop_front() {
                    permit.send(job);
                }
            }
            msg = conn.next(), if pending.len() < MAX_PENDING => {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        // What was received is stored before anything else happens.
                        hand_piece(asm, st, &mut pending, &mut piece_from, &mut pieces);
                        drain(st, &mut pending).await?;
                        if e.to_string().contains("CopyDone") {
                            tracing::info!("stream: the server ended timeline {} at {}", asm.timeline(), asm.position());
                            return Ok(Ended::Reconnect);
                        }
                        return Ok(Ended::Failed(e));
                    }
                };
                match parse(&msg).map_err(StreamError::Protocol)? {
                    Message::XLogData { start, server_end, data } => {
                        metrics.stream_server_lsn.store(server_end.0, Ordering::Relaxed);
                        for done in asm.feed(start, data).map_err(StreamError::Protocol)? {
                            let end = Lsn(done.name.start_lsn(seg_size).map_or(0, |l| l.0) + u64::from(seg_size));
                            let connection = st.connection;
                            queue(st, &mut pending, Job::Segment { name: done.name, bytes: done.bytes, end, connection });
                            (piece_from, pieces) = (0, 0);
                        }
                        metrics.stream_received_lsn.store(asm.position().0, Ordering::Relaxed);
                        flush_due = opts.synchronous;
                    }
                    Message::Keepalive { server_end, reply_requested } => {
                        metrics.stream_server_lsn.store(server_end.0, Ordering::Relaxed);
                        if reply_requested
                            && let Err(e) = conn.status(asm.position(), flushed_now(st), false).await
                        {
                            return Ok(Ended::Failed(e));
                        }
                    }
                }
            }
        }
        // Synchronous: a piece as soon as the previous one is stored; otherwise on the tick. The
        // storer is idle once what is durable reaches the end of what was handed on. Nothing is
        // added while jobs wait: the next piece will hold these bytes too.
        let idle = flushed_now(st) >= st.sent_end;
        if flush_due && pending.is_empty() && (idle || !opts.synchronous) {
            if pieces >= CONSOLIDATE_AFTER {
                (piece_from, pieces) = (0, 0);
            }
            hand_piece(asm, st, &mut pending, &mut piece_from, &mut pieces);
        }
    }
}

/// How long a stop waits for the repository to take what was received.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Jobs waiting for room in the storer's queue before the socket is read again: a segment
/// completed and a piece.
const MAX_PENDING: usize = 2;

/// Queue the bytes received since the last piece, if any.
fn hand_piece(
    asm: &Assembler,
    st: &mut Storer,
    pending: &mut VecDeque<Job>,
    piece_from: &mut u32,
    pieces: &mut usize,
) {
    let (segment, bytes) = asm.current();
    if bytes.len() as u32 <= *piece_from {
        return;
    }
    let from = *piece_from;
    let end = asm.position();
    queue(
        st,
        pending,
        Job::Piece {
            segment,
            from,
            bytes: bytes[from as usize..].to_vec(),
            end,
            connection: st.connection,
        },
    );
    *piece_from = bytes.len() as u32;
    *pieces += 1;
}

fn queue(st: &mut Storer, pending: &mut VecDeque<Job>, job: Job) {
    if let Job::Segment { end, .. } | Job::Piece { end, .. } = &job {
        st.sent_end = *end;
    }
    pending.push_back(job);
}

/// Hand every waiting job to the storer, waiting for room.
async fn drain(st: &Storer, pending: &mut VecDeque<Job>) -> Result<(), StreamError> {
    while let Some(job) = pending.pop_front() {
        if st.jobs.send(job).await.is_err() {
            return Err(StreamError::Task("the storing task stopped".into()));
        }
    }
    Ok(())
}

/// Wait until everything handed on is stored, or `limit` passes.
async fn wait_flushed(st: &mut Storer, end: Lsn, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while st.flushed.borrow().0 != st.connection || st.flushed.borrow().1 < end {
        match tokio::time::timeout_at(deadline, st.flushed.changed()).await {
            Ok(Ok(())) => {}
            _ => return false,
        }
    }
    true
}

/// The storer's own error, once its channel closed.
async fn storer_failed(st: &mut Storer) -> StreamError {
    match (&mut st.task).await {
        Ok(Err(e)) => StreamError::Store(e),
        Ok(Ok(())) => StreamError::Task("the storing task ended".into()),
        Err(e) => StreamError::Task(e.to_string()),
    }
}
