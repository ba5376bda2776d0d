//! The one retry policy: exponential backoff for errors classified as transient, within a total
//! time bound, so that no command PostgreSQL calls can hang its archiver or its recovery forever.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// Whether an error is worth another attempt.
pub trait Retryable {
    fn is_transient(&self) -> bool;
}

/// Backoff and total time bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// No new attempt starts after this much time has passed since the first one.
    pub total: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    pub fn with_total(total: Duration) -> Self {
        RetryPolicy {
            total,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }

    /// Run `op` until it succeeds, fails permanently, or the time bound is spent. Returns the last
    /// error and the number of attempts made.
    pub async fn run<T, E, F, Fut>(&self, what: &str, mut op: F) -> Result<T, (E, u32)>
    where
        E: Retryable + std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let deadline = Instant::now() + self.total;
        let mut backoff = self.initial_backoff;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if !e.is_transient() => return Err((e, attempts)),
                Err(e) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err((e, attempts));
                    }
                    let sleep = backoff.min(deadline - now);
                    // PostgreSQL's log gets every line of every archive attempt: one warning
                    // while this call waits, the rest at debug level; the caller reports the end.
                    if attempts == 1 {
                        tracing::warn!("{what}: {e}; trying again for up to {:?}", self.total);
                    } else {
                        tracing::debug!(
                            attempt = attempts,
                            retry_in_ms = sleep.as_millis() as u64,
                            "{what}: {e}"
                        );
                    }
                    tokio::time::sleep(sleep).await;
                    backoff = (backoff * 2).min(self.max_backoff);
                }
            }
        }
    }
}

/// Per-key waits before the next attempt at something that failed (a file to upload, a copy to
/// download): 1 s after the first failure, doubling to 60 s; a key that succeeds is forgotten.
/// For background work that comes back to the same keys on its own, unlike [`RetryPolicy`],
/// which bounds one call.
#[derive(Debug)]
pub struct KeyedBackoff<K> {
    /// Failures in a row, and when the next attempt may start.
    by_key: std::collections::HashMap<K, (u32, std::time::Instant)>,
}

impl<K> Default for KeyedBackoff<K> {
    fn default() -> Self {
        KeyedBackoff {
            by_key: std::collections::HashMap::new(),
        }
    }
}

/// The first wait after a failure; each further failure doubles it, up to [`BACKOFF_MAX`].
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

impl<K: std::hash::Hash + Eq> KeyedBackoff<K> {
    /// Record a failure of `key`; returns how many in a row it has had and how long it waits.
    pub fn failed(&mut self, key: K, now: std::time::Instant) -> (u32, Duration) {
        let failures = self.by_key.get(&key).map_or(0, |(n, _)| *n) + 1;
        let wait = BACKOFF_FIRST
            .saturating_mul(1 << (failures - 1).min(6))
            .min(BACKOFF_MAX);
        self.by_key.insert(key, (failures, now + wait));
        (failures, wait)
    }

    /// Wait `wait` before `key`'s next attempt without counting a failure (nothing was wrong:
    /// the thing was not there yet).
    pub fn wait(&mut self, key: K, now: std::time::Instant, wait: Duration) {
        self.by_key.insert(key, (0, now + wait));
    }

    pub fn succeeded(&mut self, key: &K) {
        self.by_key.remove(key);
    }

    /// Whether `key` must not be tried yet.
    pub fn waiting(&self, key: &K, now: std::time::Instant) -> bool {
        self.by_key.get(key).is_some_and(|(_, at)| now < *at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[derive(Debug)]
    struct E(bool);
    impl Retryable for E {
        fn is_transient(&self) -> bool {
            self.0
        }
    }
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "transient={}", self.0)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_until_the_deadline() {
        let calls = Cell::new(0);
        let policy = RetryPolicy::with_total(Duration::from_secs(10));
        let started = Instant::now();
        let r: Result<(), _> = policy
            .run("op", || {
                calls.set(calls.get() + 1);
                async { Err(E(true)) }
            })
            .await;
        let (_, attempts) = r.unwrap_err();
        assert_eq!(attempts, calls.get());
        assert!(attempts > 3);
        let spent = started.elapsed();
        assert!(
            spent >= Duration::from_secs(10) && spent < Duration::from_secs(11),
            "{spent:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_and_successes_stop_at_once() {
        let policy = RetryPolicy::with_total(Duration::from_secs(10));
        let r: Result<(), _> = policy.run("op", || async { Err(E(false)) }).await;
        assert_eq!(r.unwrap_err().1, 1);
        let calls = Cell::new(0);
        let r = policy
            .run("op", || {
                calls.set(calls.get() + 1);
                let n = calls.get();
                async move { if n < 3 { Err(E(true)) } else { Ok(n) } }
            })
            .await;
        assert_eq!(r.ok(), Some(3));
    }

    #[test]
    fn keyed_backoff_doubles_to_a_minute_and_forgets_successes() {
        let t0 = std::time::Instant::now();
        let mut b = KeyedBackoff::default();
        b.wait("a", t0, BACKOFF_FIRST);
        assert!(b.waiting(&"a", t0) && !b.waiting(&"a", t0 + Duration::from_millis(1001)));
        let waits: Vec<(u32, u64)> = (0..9)
            .map(|_| b.failed("a", t0))
            .map(|(n, w)| (n, w.as_secs()))
            .collect();
        assert_eq!(
            waits,
            [
                (1, 1),
                (2, 2),
                (3, 4),
                (4, 8),
                (5, 16),
                (6, 32),
                (7, 60),
                (8, 60),
                (9, 60)
            ]
        );
        assert!(b.waiting(&"a", t0 + Duration::from_secs(59)));
        assert!(!b.waiting(&"b", t0));
        b.succeeded(&"a");
        assert!(!b.waiting(&"a", t0));
        assert_eq!(b.failed("a", t0), (1, BACKOFF_FIRST));
    }
}
