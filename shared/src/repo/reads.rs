//! What a command's requests to the store cost and how they overlapped: how many (each attempt of
//! a retried request counts: each is billed), their sizes, how many were in flight over time, the
//! time to the first byte of each answer and the bytes per second while reading. A restore
//! reports it with `--json` and at debug level, so that where an object-store restore waits can
//! be seen rather than guessed.
//!
//! Recording is a few atomic-free updates under one uncontended mutex per request (a restore
//! makes about one request per 4 MiB); the samples are bounded ([`MAX_SAMPLES`]) and the
//! timeline is one entry per second.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Requests whose size and time to first byte are kept for the percentiles (the first ones; the
/// counts and sums cover every request).
pub const MAX_SAMPLES: usize = 1 << 18;

/// The requests of one command, shared by every clone of the store that records into it.
#[derive(Clone, Debug)]
pub struct ReadStats {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    start: Instant,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Requests by operation (read, check, list).
    requests: BTreeMap<&'static str, u64>,
    failed: u64,
    bytes: u64,
    /// Bytes of each answered read, then its time to first byte in microseconds.
    sizes: Vec<u64>,
    first_byte_us: Vec<u64>,
    in_flight: usize,
    max_in_flight: usize,
    /// Since the start: when the in-flight count last changed, the integral of in-flight over
    /// time (request-seconds) and the time at least one request was in flight.
    last_change: Duration,
    in_flight_seconds: f64,
    busy: Duration,
    /// Per second since the start: the most in flight, request-seconds, and bytes answered.
    timeline: Vec<Second>,
}

/// One second of the timeline.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq)]
pub struct Second {
    /// Seconds since the command began.
    pub at: u64,
    pub max_in_flight: usize,
    /// Mean requests in flight over this second.
    pub mean_in_flight: f64,
    /// Bytes of the answers that ended in this second.
    pub bytes: u64,
}

impl State {
    fn second(&mut self, at: u64) -> &mut Second {
        let i = usize::try_from(at).unwrap_or(usize::MAX);
        while self.timeline.len() <= i {
            let at = self.timeline.len() as u64;
            self.timeline.push(Second {
                at,
                max_in_flight: self.in_flight,
                ..Second::default()
            });
        }
        &mut self.timeline[i]
    }

    /// Account the time since the last change at the current in-flight count, then apply `delta`.
    fn change(&mut self, now: Duration, delta: isize) {
        let mut from = self.last_change;
        while from < now {
            let sec = from.as_secs();
            let until = now.min(Duration::from_secs(sec + 1));
            let span = (until - from).as_secs_f64();
            let n = self.in_flight;
            self.second(sec).mean_in_flight += n as f64 * span;
            self.in_flight_seconds += n as f64 * span;
            if n > 0 {
                self.busy += until - from;
            }
            from = until;
        }
        self.last_change = now;
        self.in_flight = self.in_flight.saturating_add_signed(delta);
        self.max_in_flight = self.max_in_flight.max(self.in_flight);
        let n = self.in_flight;
        let s = self.second(now.as_secs());
        s.max_in_flight = s.max_in_flight.max(n);
    }
}

impl Default for ReadStats {
    fn default() -> Self {
        ReadStats::new()
    }
}

impl ReadStats {
    pub fn new() -> ReadStats {
        ReadStats {
            inner: Arc::new(Inner {
                start: Instant::now(),
                state: Mutex::new(State::default()),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request begins (`op`: read, check, list); it is in flight until the guard is answered
    /// or dropped (a failed attempt).
    pub fn begin(&self, op: &'static str) -> Request {
        let now = self.inner.start.elapsed();
        let mut s = self.lock();
        *s.requests.entry(op).or_default() += 1;
        s.change(now, 1);
        Request {
            stats: self.clone(),
            began: now,
            first_byte: None,
            ended: false,
        }
    }

    /// What was recorded so far.
    pub fn report(&self) -> ReadReport {
        let now = self.inner.start.elapsed();
        let mut s = self.lock();
        s.change(now, 0);
        let requests: u64 = s.requests.values().sum();
        let elapsed = now.as_secs_f64();
        let mut timeline = s.timeline.clone();
        if let Some(last) = timeline.last_mut() {
            // The last second is partial: its mean over the part that passed.
            let part = elapsed - last.at as f64;
            if part > 0.0 && part < 1.0 {
                last.mean_in_flight /= part;
            }
        }
        for t in timeline.iter_mut() {
            t.mean_in_flight = (t.mean_in_flight * 100.0).round() / 100.0;
        }
        let busy = s.busy.as_secs_f64();
        ReadReport {
            requests,
            by_operation: s.requests.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            failed: s.failed,
            bytes: s.bytes,
            size: Spread::of(&s.sizes, 1.0),
            first_byte_ms: Spread::of(&s.first_byte_us, 1e-3),
            max_in_flight: s.max_in_flight,
            mean_in_flight: round2(if elapsed > 0.0 {
                s.in_flight_seconds / elapsed
            } else {
                0.0
            }),
            mean_in_flight_while_busy: round2(if busy > 0.0 {
                s.in_flight_seconds / busy
            } else {
                0.0
            }),
            seconds: round2(elapsed),
            busy_seconds: round2(busy),
            bytes_per_second: if busy > 0.0 {
                (s.bytes as f64 / busy) as u64
            } else {
                0
            },
            timeline,
        }
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// One request in flight.
#[derive(Debug)]
pub struct Request {
    stats: ReadStats,
    began: Duration,
    first_byte: Option<Duration>,
    ended: bool,
}

impl Request {
    /// The answer's head arrived (status and headers: the body follows).
    pub fn first_byte(&mut self) {
        self.first_byte
            .get_or_insert_with(|| self.stats.inner.start.elapsed());
    }

    /// The whole answer arrived: `bytes` of body.
    pub fn answered(mut self, bytes: u64) {
        let now = self.stats.inner.start.elapsed();
        let first = self.first_byte.unwrap_or(now);
        self.ended = true;
        let mut s = self.stats.lock();
        s.change(now, -1);
        s.bytes += bytes;
        s.second(now.as_secs()).bytes += bytes;
        if s.sizes.len() < MAX_SAMPLES {
            s.sizes.push(bytes);
            let us = first.saturating_sub(self.began).as_micros();
            s.first_byte_us.push(u64::try_from(us).unwrap_or(u64::MAX));
        }
    }
}

/// A request, if recorded, answered with `bytes` of body.
pub fn answered(req: Option<Request>, bytes: usize) {
    if let Some(r) = req {
        r.answered(bytes as u64);
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if !self.ended {
            let now = self.stats.inner.start.elapsed();
            let mut s = self.stats.lock();
            s.change(now, -1);
            s.failed += 1;
        }
    }
}

/// Percentiles of a sample.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Spread {
    fn of(values: &[u64], scale: f64) -> Spread {
        if values.is_empty() {
            return Spread::default();
        }
        let mut v = values.to_vec();
        v.sort_unstable();
        let at = |q: f64| {
            let i = ((v.len() - 1) as f64 * q).round() as usize;
            round2(v[i] as f64 * scale)
        };
        let sum: f64 = v.iter().map(|&x| x as f64).sum();
        Spread {
            min: at(0.0),
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: at(1.0),
            mean: round2(sum / v.len() as f64 * scale),
        }
    }
}

/// The requests of a command, as `--json` shows them.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ReadReport {
    /// Requests made, every attempt counted.
    pub requests: u64,
    pub by_operation: BTreeMap<String, u64>,
    /// Attempts that failed (retried, or the command failed).
    pub failed: u64,
    /// Bytes of the answers' bodies.
    pub bytes: u64,
    /// Bytes per answered request.
    pub size: Spread,
    /// Milliseconds from sending a request to its answer's head.
    pub first_byte_ms: Spread,
    pub max_in_flight: usize,
    /// Mean requests in flight over the whole command, and over the time any was.
    pub mean_in_flight: f64,
    pub mean_in_flight_while_busy: f64,
    /// Seconds since recording began, and those with a request in flight.
    pub seconds: f64,
    pub busy_seconds: f64,
    /// Bytes answered per second with a request in flight.
    pub bytes_per_second: u64,
    /// Second by second.
    pub timeline: Vec<Second>,
}

impl ReadReport {
    /// One line for people: what the requests were and how they overlapped.
    pub fn summary(&self) -> String {
        format!(
            "{} requests ({} failed), {} bytes, {:.0} KiB each (median), first byte after {} ms (median, p90 {} ms), {} in flight at most ({:.1} on average while reading), {:.1} MiB/s while reading ({:.1} of {:.1} s)",
            self.requests,
            self.failed,
            self.bytes,
            self.size.p50 / 1024.0,
            self.first_byte_ms.p50,
            self.first_byte_ms.p90,
            self.max_in_flight,
            self.mean_in_flight_while_busy,
            self.bytes_per_second as f64 / f64::from(1 << 20),
            self.busy_seconds,
            self.seconds
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_sized_and_overlapped() {
        let stats = ReadStats::new();
        let mut a = stats.begin("read");
        let b = stats.begin("read");
        let c = stats.begin("check");
        a.first_byte();
        std::thread::sleep(Duration::from_millis(20));
        a.answered(4 << 20);
        b.answered(1 << 20);
        drop(c);
        let r = stats.report();
        assert_eq!(r.requests, 3);
        assert_eq!(r.by_operation["read"], 2);
        assert_eq!(r.by_operation["check"], 1);
        assert_eq!(r.failed, 1, "the dropped one");
        assert_eq!(r.bytes, 5 << 20);
        assert_eq!(r.max_in_flight, 3);
        assert_eq!(r.size.max, (4 << 20) as f64);
        assert_eq!(r.size.min, (1 << 20) as f64);
        // a's head came before the sleep; b's, never seen apart, counts as its whole answer.
        assert!(r.first_byte_ms.min < 20.0, "{r:?}");
        assert!(r.first_byte_ms.max >= 20.0, "{r:?}");
        assert!(r.busy_seconds >= 0.02 && r.busy_seconds <= r.seconds, "{r:?}");
        // Three in flight for the whole busy time, give or take the instants between calls.
        assert!(r.mean_in_flight_while_busy > 2.5, "{r:?}");
        assert_eq!(r.timeline.len(), 1);
        assert_eq!(r.timeline[0].bytes, 5 << 20);
        assert_eq!(r.timeline[0].max_in_flight, 3);
    }

    #[test]
    fn the_timeline_has_a_second_per_second_and_an_empty_report_is_zero() {
        let empty = ReadStats::new().report();
        assert_eq!((empty.requests, empty.bytes, empty.max_in_flight), (0, 0, 0));
        assert_eq!(empty.size, Spread::default());
        let mut s = State::default();
        s.change(Duration::from_millis(500), 2);
        s.change(Duration::from_millis(2500), -1);
        // 2 in flight from 0.5 s to 2.5 s: half a second of the first, all of the second, half
        // of the third.
        assert_eq!(s.timeline.len(), 3);
        assert!((s.timeline[0].mean_in_flight - 1.0).abs() < 1e-9);
        assert!((s.timeline[1].mean_in_flight - 2.0).abs() < 1e-9);
        assert!((s.timeline[2].mean_in_flight - 1.0).abs() < 1e-9);
        assert_eq!(s.timeline[1].max_in_flight, 2);
        assert_eq!(s.busy, Duration::from_secs(2));
    }
}
