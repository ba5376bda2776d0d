//! The receive loop of `archive-agent daemon --stream`, after `pg_receivewal`
//! (`receivelog.c`: `HandleCopyStream`, `ProcessXLogDataMsg`, the keepalive reply): connect,
//! check the cluster, keep the slot, stream from a segment boundary, hand whole segments and
//! pieces to the [`storer`](super::storer), and tell the server what is durable.

use std::collections::VecDeque;
use std::ops::ControlFlow;
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
use crate::timeline::{HistoryEntry, TimelineHistory};
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
        let source = match source {
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
        same_cluster(cluster.as_ref(), &source)?;
        if storer.is_none() {
            let Some(r) = repo.take() else {
                unreachable!("the repository is taken once")
            };
            storer = Some(start_storer(&settings, r, &opts, &metrics)?);
        }
        let Some(st) = storer.as_mut() else { unreachable!() };
        connected_once = true;
        let conn = match start_streaming(source, &opts, st, resume).await {
            Ok(c) => c,
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
        let (ended, stopped_at) = receive(conn, st, &opts, &metrics, &mut shutdown).await;
        resume = Some(stopped_at);
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
    match storer {
        Some(st) => stop_storer(st).await,
        None => Ok(()),
    }
}

/// Refuse a server of another cluster than the repository's (or with another segment size).
fn same_cluster(cluster: Option<&crate::repo::ClusterIdentity>, source: &Source) -> Result<(), StreamError> {
    let id = &source.identity;
    if let Some(c) = cluster
        && (c.system_identifier != id.system_id || c.wal_segment_size != id.segment_size)
    {
        return Err(StreamError::ForeignCluster {
            host: source.host.clone(),
            system_id: id.system_id,
            stored: c.to_string(),
        });
    }
    Ok(())
}

/// Start the storing task, into `repo` through the spool in the stream's directory.
fn start_storer(
    settings: &Arc<Settings>,
    repo: Writer,
    opts: &StreamOptions,
    metrics: &Arc<Metrics>,
) -> Result<Storer, StreamError> {
    std::fs::create_dir_all(opts.dir.join(crate::local::handoff::SPOOL_DIR).join("archived")).map_err(
        |source| StreamError::Dir {
            path: opts.dir.display().to_string(),
            source,
        },
    )?;
    Ok(storer::start(
        Arc::clone(settings),
        repo,
        opts.dir.clone(),
        Lsn(0),
        Arc::clone(metrics),
    ))
}

/// Let the storing task store what it was handed, for [`SHUTDOWN_GRACE`] at most.
async fn stop_storer(mut st: Storer) -> Result<(), StreamError> {
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
    Ok(())
}

/// A connection streaming: from where, on which timeline, and the server's entry in the host
/// list (for the slot watch's own connection).
struct Connection {
    streaming: Streaming,
    plan: Plan,
    server: crate::replication::conninfo::Host,
    segment_size: u32,
}

/// Plan where to start on `source`, then start streaming there.
async fn start_streaming(
    mut source: Source,
    opts: &StreamOptions,
    st: &Storer,
    resume: Option<Resume>,
) -> Result<Connection, SourceError> {
    let plan = plan_start(&mut source, opts, st, resume).await?;
    tracing::info!(
        host = %source.host,
        timeline = plan.timeline.get(),
        start = %plan.start,
        "stream: replicating from {} on timeline {} at {}",
        source.host,
        plan.timeline,
        plan.start
    );
    let (server, segment_size) = (source.target.clone(), source.identity.segment_size);
    let slot = opts.slot.clone();
    let streaming = tokio::task::block_in_place(|| source.start(slot.as_deref(), plan.start, plan.timeline))?;
    Ok(Connection {
        streaming,
        plan,
        server,
        segment_size,
    })
}

/// Receive on `conn` until it ends, the slot watched meanwhile; where the next connection
/// resumes: the first byte of the segment being received.
async fn receive(
    conn: Connection,
    st: &mut Storer,
    opts: &StreamOptions,
    metrics: &Arc<Metrics>,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> (Result<Ended, StreamError>, Resume) {
    metrics.stream_connected.store(1, Ordering::Relaxed);
    let watch = opts
        .slot
        .clone()
        .map(|name| tokio::spawn(watch_slot(conn.server.clone(), name, Arc::clone(metrics))));
    let mut asm = Assembler::new(conn.plan.timeline, conn.segment_size, conn.plan.start);
    let ended = stream(conn.streaming, &mut asm, st, opts, metrics, shutdown).await;
    if let Some(w) = watch {
        w.abort();
    }
    metrics.stream_connected.store(0, Ordering::Relaxed);
    let (seg, _) = asm.current();
    let resume = Resume {
        timeline: asm.timeline(),
        start: seg.start_lsn(conn.segment_size).unwrap_or(conn.plan.start),
    };
    (ended, resume)
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
#[derive(Debug, Clone, Copy)]
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
    let slot_start = match &opts.slot {
        Some(name) => keep_slot(source, name)?,
        None => None,
    };
    let ancestors = match id.timeline > TimelineId::FIRST {
        true => store_history(source, storer).await?,
        false => Vec::new(),
    };
    let fresh = segment_start(slot_start.unwrap_or(id.position), id.segment_size);
    // The timeline that holds `fresh`: the first ancestor that ended after it, else the
    // server's (a slot may still hold WAL from before a promotion).
    let fresh_timeline = ancestors
        .iter()
        .find(|e| e.switch_lsn > fresh)
        .map_or(id.timeline, |e| e.timeline);
    let fresh = Plan {
        timeline: fresh_timeline,
        start: fresh,
    };
    match resume {
        None => Ok(fresh),
        Some(r) => resume_plan(r, fresh, &ancestors, &id, &source.host),
    }
}

/// The first byte of the segment holding `l`.
fn segment_start(l: Lsn, segment_size: u32) -> Lsn {
    Lsn(l.0 - l.0 % u64::from(segment_size))
}

/// The slot `name` on `source` (created when missing), with a word in the log when it lost or
/// is about to lose the WAL it holds: where its reserved WAL starts.
fn keep_slot(source: &mut Source, name: &str) -> Result<Option<Lsn>, SourceError> {
    let mut state = tokio::task::block_in_place(|| source.slot(name))?;
    if state.is_none() {
        tokio::task::block_in_place(|| source.create_slot(name))?;
        tracing::info!(
            "stream: created physical replication slot {name:?} on {}",
            source.host
        );
        state = tokio::task::block_in_place(|| source.slot(name))?;
    }
    let Some(s) = &state else { return Ok(None) };
    match s.wal_status.as_deref() {
        Some("lost") => tracing::error!(
            "stream: replication slot {name:?} lost the WAL it held (max_slot_wal_keep_size): the archive has a gap from where the stream stopped; take a new base backup"
        ),
        Some("unreserved") => tracing::warn!(
            "stream: replication slot {name:?} is about to lose its WAL (wal_status unreserved, max_slot_wal_keep_size)"
        ),
        _ => {}
    }
    Ok(s.restart_lsn)
}

/// The server's timeline history, handed to the storer: its ancestors, oldest first.
async fn store_history(source: &mut Source, storer: &Storer) -> Result<Vec<HistoryEntry>, SourceError> {
    let timeline = source.identity.timeline;
    let (name, bytes) = tokio::task::block_in_place(|| source.timeline_history(timeline))?;
    let parsed = TimelineHistory::parse(timeline, &bytes).map_err(|e| SourceError::Unreadable {
        host: source.host.clone(),
        what: "TIMELINE_HISTORY",
        got: e.to_string(),
    })?;
    if let Ok(name) = name.parse::<WalFileName>() {
        let _ = storer.jobs.send(Job::History { name, bytes }).await;
    }
    Ok(parsed.ancestors)
}

/// Where to go on from `r`, where the last connection stopped, on a server (`server`, at
/// `host`) with these timeline `ancestors`: on the same timeline, from there; on a later one,
/// the rest of the old timeline's whole segments, else the new timeline from the switch;
/// `fresh` when the server's history does not include the stream's timeline. Pure.
fn resume_plan(
    r: Resume,
    fresh: Plan,
    ancestors: &[HistoryEntry],
    server: &source::Identity,
    host: &str,
) -> Result<Plan, SourceError> {
    if r.timeline > server.timeline {
        // An old primary not fenced yet, or a standby behind: never follow a timeline back.
        return Err(SourceError::Server {
            host: host.to_string(),
            message: format!(
                "is on timeline {}, older than timeline {} the stream is on; waiting for a server on timeline {} or later",
                server.timeline, r.timeline, r.timeline
            ),
            permanent: false,
        });
    }
    if r.timeline == server.timeline {
        return Ok(Plan {
            timeline: r.timeline,
            start: r.start,
        });
    }
    // Another timeline: where did ours end, and which one followed it?
    let Some(i) = ancestors.iter().position(|e| e.timeline == r.timeline) else {
        tracing::error!(
            "stream: {} is on timeline {}, whose history does not include timeline {}, where the stream was: starting afresh (the archive may have a gap)",
            host,
            server.timeline,
            r.timeline
        );
        return Ok(fresh);
    };
    let switch = ancestors[i].switch_lsn;
    let next = ancestors.get(i + 1).map_or(server.timeline, |e| e.timeline);
    let seg_end = Lsn(r.start.0 + u64::from(server.segment_size));
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
        start: segment_start(switch.min(r.start), server.segment_size),
    })
}

/// Stream until the server ends, an error, or `shutdown`.
async fn stream(
    conn: Streaming,
    asm: &mut Assembler,
    st: &mut Storer,
    opts: &StreamOptions,
    metrics: &Metrics,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Result<Ended, StreamError> {
    // A handle of its own, so that a permit to send does not hold the storer borrowed.
    let jobs = st.jobs.clone();
    st.flushed.borrow_and_update();
    // What precedes the start is reported flushed: nothing after it is acknowledged by that,
    // and a server counts a standby that reports no flush position as asynchronous.
    let floor = asm.position();
    let mut s = Session {
        conn,
        asm,
        st,
        handoff: Handoff::default(),
        metrics,
        floor,
    };
    let mut flush_tick = tokio::time::interval(opts.flush_every);
    let mut status_tick = tokio::time::interval(opts.status_every);
    flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut flush_due = false;
        tokio::select! {
            biased;
            () = shutdown.as_mut() => return Ok(s.shut_down().await),
            r = s.st.flushed.changed() => {
                if r.is_err() {
                    return Err(storer_failed(s.st).await);
                }
                metrics.stream_flushed_lsn.store(s.flushed_now().0, Ordering::Relaxed);
                if opts.synchronous
                    && let Err(e) = s.status().await
                {
                    return Ok(Ended::Failed(e));
                }
                flush_due = opts.synchronous;
            }
            _ = flush_tick.tick() => flush_due = true,
            _ = status_tick.tick() => {
                if let Err(e) = s.status().await {
                    return Ok(Ended::Failed(e));
                }
            }
            permit = jobs.reserve(), if !s.handoff.pending.is_empty() => {
                let permit = permit.map_err(|_| StreamError::Task("the storing task stopped".into()))?;
                if let Some(job) = s.handoff.pending.pop_front() {
                    permit.send(job);
                }
            }
            msg = s.conn.next(), if s.handoff.pending.len() < MAX_PENDING => {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => return s.connection_lost(e).await,
                };
                match s.take(&msg).await? {
                    ControlFlow::Break(ended) => return Ok(ended),
                    ControlFlow::Continue(wal) => flush_due = wal && opts.synchronous,
                }
            }
        }
        s.hand_piece_when_due(flush_due, opts.synchronous);
    }
}

/// How long a stop waits for the repository to take what was received.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Jobs waiting for room in the storer's queue before the socket is read again: a segment
/// completed and a piece.
const MAX_PENDING: usize = 2;

/// One connection's streaming: the server, the segments being assembled, the storer and what
/// is handed to it.
struct Session<'a> {
    conn: Streaming,
    asm: &'a mut Assembler,
    st: &'a mut Storer,
    handoff: Handoff,
    metrics: &'a Metrics,
    /// The position streaming started from, reported flushed until the storer reports more.
    floor: Lsn,
}

impl Session<'_> {
    /// The end of what is durable from this connection.
    fn flushed_now(&self) -> Lsn {
        match *self.st.flushed.borrow() {
            (c, l) if c == self.st.connection => l.max(self.floor),
            _ => self.floor,
        }
    }

    /// Tell the server what was received and what is durable.
    async fn status(&mut self) -> Result<(), SourceError> {
        let (received, flushed) = (self.asm.position(), self.flushed_now());
        self.conn.status(received, flushed, false).await
    }

    /// Store what was received, for [`SHUTDOWN_GRACE`] at most, and tell the server what is
    /// durable before going (best effort).
    async fn shut_down(&mut self) -> Ended {
        self.handoff.hand_piece(self.asm, self.st);
        if tokio::time::timeout(SHUTDOWN_GRACE, self.handoff.drain(self.st))
            .await
            .is_err()
        {
            tracing::warn!(
                "stream: stopping with WAL not stored (the repository does not answer); the slot keeps it for the next start"
            );
            return Ended::Shutdown;
        }
        let end = self.st.sent_end;
        let _ = wait_flushed(self.st, end, SHUTDOWN_GRACE).await;
        let _ = self.status().await;
        Ended::Shutdown
    }

    /// The connection failed or the server ended the timeline: what was received is stored
    /// before anything else happens.
    async fn connection_lost(&mut self, e: SourceError) -> Result<Ended, StreamError> {
        self.handoff.hand_piece(self.asm, self.st);
        self.handoff.drain(self.st).await?;
        if e.to_string().contains("CopyDone") {
            tracing::info!(
                "stream: the server ended timeline {} at {}",
                self.asm.timeline(),
                self.asm.position()
            );
            return Ok(Ended::Reconnect);
        }
        Ok(Ended::Failed(e))
    }

    /// Take one message from the server: WAL (whole segments are queued for the storer;
    /// `Continue(true)`), or a keepalive, answered when the server asks.
    async fn take(&mut self, msg: &bytes::Bytes) -> Result<ControlFlow<Ended, bool>, StreamError> {
        match parse(msg).map_err(StreamError::Protocol)? {
            Message::XLogData {
                start,
                server_end,
                data,
            } => {
                self.metrics
                    .stream_server_lsn
                    .store(server_end.0, Ordering::Relaxed);
                let seg_size = self.asm.segment_size();
                for done in self.asm.feed(start, data).map_err(StreamError::Protocol)? {
                    let end = Lsn(done.name.start_lsn(seg_size).map_or(0, |l| l.0) + u64::from(seg_size));
                    let connection = self.st.connection;
                    let job = Job::Segment {
                        name: done.name,
                        bytes: done.bytes,
                        end,
                        connection,
                    };
                    self.handoff.segment_done(self.st, job);
                }
                let received = self.asm.position();
                self.metrics
                    .stream_received_lsn
                    .store(received.0, Ordering::Relaxed);
                Ok(ControlFlow::Continue(true))
            }
            Message::Keepalive {
                server_end,
                reply_requested,
            } => {
                self.metrics
                    .stream_server_lsn
                    .store(server_end.0, Ordering::Relaxed);
                if reply_requested && let Err(e) = self.status().await {
                    return Ok(ControlFlow::Break(Ended::Failed(e)));
                }
                Ok(ControlFlow::Continue(false))
            }
        }
    }

    /// Synchronous: a piece as soon as the previous one is stored; otherwise on the tick. The
    /// storer is idle once what is durable reaches the end of what was handed on. Nothing is
    /// added while jobs wait: the next piece will hold these bytes too.
    fn hand_piece_when_due(&mut self, flush_due: bool, synchronous: bool) {
        let idle = self.flushed_now() >= self.st.sent_end;
        if flush_due && self.handoff.pending.is_empty() && (idle || !synchronous) {
            if self.handoff.pieces >= CONSOLIDATE_AFTER {
                (self.handoff.piece_from, self.handoff.pieces) = (0, 0);
            }
            self.handoff.hand_piece(self.asm, self.st);
        }
    }
}

/// What is handed to the storer: the jobs waiting for room in its queue, and how far pieces of
/// the current segment went.
#[derive(Default)]
struct Handoff {
    /// Jobs the storer's queue has no room for yet. While they wait, the socket is not read (the
    /// server holds the WAL), but status updates still go out, so the server never times the
    /// connection out during a repository outage.
    pending: VecDeque<Job>,
    /// The offset in the current segment up to which pieces were handed on, and how many.
    piece_from: u32,
    pieces: usize,
}

impl Handoff {
    /// Queue the bytes received since the last piece, if any.
    fn hand_piece(&mut self, asm: &Assembler, st: &mut Storer) {
        let (segment, bytes) = asm.current();
        if bytes.len() as u32 <= self.piece_from {
            return;
        }
        let from = self.piece_from;
        let end = asm.position();
        self.queue(
            st,
            Job::Piece {
                segment,
                from,
                bytes: bytes[from as usize..].to_vec(),
                end,
                connection: st.connection,
            },
        );
        self.piece_from = bytes.len() as u32;
        self.pieces += 1;
    }

    /// Queue a segment completed; the next piece starts the next segment.
    fn segment_done(&mut self, st: &mut Storer, job: Job) {
        self.queue(st, job);
        (self.piece_from, self.pieces) = (0, 0);
    }

    fn queue(&mut self, st: &mut Storer, job: Job) {
        if let Job::Segment { end, .. } | Job::Piece { end, .. } = &job {
            st.sent_end = *end;
        }
        self.pending.push_back(job);
    }

    /// Hand every waiting job to the storer, waiting for room.
    async fn drain(&mut self, st: &Storer) -> Result<(), StreamError> {
        while let Some(job) = self.pending.pop_front() {
            if st.jobs.send(job).await.is_err() {
                return Err(StreamError::Task("the storing task stopped".into()));
            }
        }
        Ok(())
    }
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
