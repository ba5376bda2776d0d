//! The clock the daemon's services share: monotonic time for schedules and backoffs, wall-clock
//! time for the timestamps the metrics export. Injected, so that what becomes due when can be
//! tested without waiting (the one place in the daemon that reads the system's clocks).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where the daemon's services read the time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Monotonic time: deadlines, schedules, durations.
    fn now(&self) -> Instant;
    /// Wall-clock time in Unix microseconds: what the metrics and the repository record.
    fn now_micros(&self) -> i64;
}

/// The system's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn now_micros(&self) -> i64 {
        crate::time::now_micros()
    }
}

/// A clock that moves only when told to (tests): both readings advance together.
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    /// Time advanced since `start`, and the wall clock at that point.
    state: Mutex<(Duration, i64)>,
}

impl ManualClock {
    /// A clock reading `unix_micros` on the wall.
    pub fn new(unix_micros: i64) -> Self {
        ManualClock {
            start: Instant::now(),
            state: Mutex::new((Duration::ZERO, unix_micros)),
        }
    }

    /// Move both readings forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.0 += by;
        state.1 = state
            .1
            .saturating_add(i64::try_from(by.as_micros()).unwrap_or(i64::MAX));
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    fn now_micros(&self) -> i64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::new(1_700_000_000_000_000);
        let (t0, w0) = (clock.now(), clock.now_micros());
        assert_eq!((clock.now(), clock.now_micros()), (t0, w0));
        clock.advance(Duration::from_millis(1500));
        assert_eq!(clock.now() - t0, Duration::from_millis(1500));
        assert_eq!(clock.now_micros() - w0, 1_500_000);
    }

    #[test]
    fn the_system_clock_reads_the_wall() {
        let unix = SystemClock.now_micros() / 1_000_000;
        // After 2023-11 and before 2100: a Unix time in seconds, not micros or millis.
        assert!((1_700_000_000..4_102_444_800).contains(&unix), "{unix}");
    }

    /// The daemon's services read the time through the clock only (slatedb bans the direct calls
    /// with clippy; here, one look at the sources).
    #[test]
    fn services_read_the_time_through_the_clock() {
        let sources = [
            ("mod.rs", include_str!("mod.rs")),
            ("uploader.rs", include_str!("uploader.rs")),
            ("scheduler.rs", include_str!("scheduler.rs")),
            ("metrics.rs", include_str!("metrics.rs")),
            ("jobs.rs", include_str!("jobs.rs")),
            ("repo_watch.rs", include_str!("repo_watch.rs")),
            ("indexer.rs", include_str!("indexer.rs")),
            ("listing.rs", include_str!("listing.rs")),
            ("backups.rs", include_str!("backups.rs")),
            ("verifies.rs", include_str!("verifies.rs")),
            ("drills.rs", include_str!("drills.rs")),
            ("copies.rs", include_str!("copies.rs")),
            ("window.rs", include_str!("window.rs")),
            ("wal_switch.rs", include_str!("wal_switch.rs")),
        ];
        let banned = [
            concat!("Instant", "::now("),
            concat!("SystemTime", "::now("),
            concat!("time::", "now_micros("),
            concat!(".elap", "sed()"),
        ];
        for (file, text) in sources {
            for call in banned {
                assert!(
                    !text.contains(call),
                    "daemon/{file} calls {call} instead of the clock"
                );
            }
        }
    }
}
