//! A bandwidth cap on what one process sends to the store (`--max-rate`): a token bucket
//! shared by every parallel write of the process, so that a backup, the daemon's uploads or a
//! copy never take more of a host's uplink than the DBA allowed.
//!
//! Each write reserves its bytes on one clock: the moment the bytes sent so far are paid for at
//! the rate. A write waits until its own bytes are paid for, then goes; idle time earns no
//! credit, so over any run the bytes sent never exceed the rate times the time taken (what the
//! end-to-end test holds a backup to). Retried writes pay again: they are sent again.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A rate in bytes per second, as `--max-rate` and `max_rate` spell it: `20MiB`, `500KiB`,
/// `10MB`, `1GiB`, plain bytes; `/s` may follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rate(u64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?}: not a rate; use bytes per second like 20MiB, 500KiB or 10MB (at least 1KiB)")]
pub struct RateParseError(String);

impl Rate {
    /// The slowest rate accepted: below it, one 8 MiB part would take over two hours.
    pub const MIN: Rate = Rate(1024);

    pub fn bytes_per_second(self) -> u64 {
        self.0
    }
}

impl std::str::FromStr for Rate {
    type Err = RateParseError;

    fn from_str(s: &str) -> Result<Rate, RateParseError> {
        let bad = || RateParseError(s.to_string());
        let t = s.trim();
        let t = t.strip_suffix("/s").unwrap_or(t).trim_end();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(digits);
        let n: u64 = number.parse().map_err(|_| bad())?;
        let factor: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "kB" | "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return Err(bad()),
        };
        let rate = Rate(n.checked_mul(factor).ok_or_else(bad)?);
        match rate >= Rate::MIN {
            true => Ok(rate),
            false => Err(bad()),
        }
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        match b {
            _ if b.is_multiple_of(1 << 30) => write!(f, "{}GiB/s", b >> 30),
            _ if b.is_multiple_of(1 << 20) => write!(f, "{}MiB/s", b >> 20),
            _ if b.is_multiple_of(1 << 10) => write!(f, "{}KiB/s", b >> 10),
            _ => write!(f, "{b}B/s"),
        }
    }
}

/// The cap shared by every write of one process.
#[derive(Debug)]
pub struct RateLimit {
    rate: Rate,
    /// When the bytes reserved so far are paid for.
    paid: Mutex<Instant>,
    sent: AtomicU64,
    started: Instant,
}

/// What a capped process sent.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Sent {
    /// The cap, in bytes per second.
    pub max_rate: u64,
    /// Bytes sent to the store (retries included).
    pub bytes_sent: u64,
    pub seconds: f64,
    /// Bytes sent per second, over the whole run.
    pub effective_rate: f64,
}

impl RateLimit {
    pub fn new(rate: Rate) -> RateLimit {
        let now = Instant::now();
        RateLimit {
            rate,
            paid: Mutex::new(now),
            sent: AtomicU64::new(0),
            started: now,
        }
    }

    /// How long a write of `bytes` must wait, reserving them: until they are paid for.
    fn reserve(&self, bytes: u64, now: Instant) -> Duration {
        self.sent.fetch_add(bytes, Ordering::Relaxed);
        let cost = Duration::from_secs_f64(bytes as f64 / self.rate.0 as f64);
        let mut paid = self.paid.lock().unwrap_or_else(|e| e.into_inner());
        *paid = (*paid).max(now) + cost;
        *paid - now
    }

    /// Wait until `bytes` more may be sent.
    pub async fn acquire(&self, bytes: u64) {
        let wait = self.reserve(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// What was sent since the cap was set.
    pub fn sent(&self) -> Sent {
        let bytes_sent = self.sent.load(Ordering::Relaxed);
        let seconds = self.started.elapsed().as_secs_f64();
        Sent {
            max_rate: self.rate.0,
            bytes_sent,
            seconds,
            effective_rate: match seconds > 0.0 {
                true => bytes_sent as f64 / seconds,
                false => 0.0,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_as_a_dba_writes_them() {
        let r = |s: &str| s.parse::<Rate>().map(Rate::bytes_per_second);
        assert_eq!(r("20MiB"), Ok(20 << 20));
        assert_eq!(r("4MiB/s"), Ok(4 << 20));
        assert_eq!(r("500KiB"), Ok(500 << 10));
        assert_eq!(r("10MB"), Ok(10_000_000));
        assert_eq!(r("1GiB"), Ok(1 << 30));
        assert_eq!(r("65536"), Ok(65536));
        for bad in [
            "",
            "fast",
            "20 MiB/h",
            "-1MiB",
            "1.5MiB",
            "100",
            "99999999999999999GiB",
        ] {
            assert!(r(bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!("20MiB".parse::<Rate>().unwrap().to_string(), "20MiB/s");
    }

    #[test]
    fn writes_wait_until_their_bytes_are_paid_for_and_idle_time_earns_nothing() {
        let limit = RateLimit::new("1MiB".parse().unwrap());
        let t0 = Instant::now();
        // Two writes at once share the clock: the second waits for both.
        assert_eq!(limit.reserve(1 << 20, t0), Duration::from_secs(1));
        assert_eq!(limit.reserve(1 << 19, t0), Duration::from_millis(1500));
        // Long after, no credit was saved up: a write pays its own time from now.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(limit.reserve(1 << 20, later), Duration::from_secs(1));
        assert_eq!(limit.sent().bytes_sent, (1 << 21) + (1 << 19));
    }
}
