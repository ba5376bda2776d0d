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
                    tracing::warn!(
                        attempt = attempts,
                        retry_in_ms = sleep.as_millis() as u64,
                        "{what}: {e}"
                    );
                    tokio::time::sleep(sleep).await;
                    backoff = (backoff * 2).min(self.max_backoff);
                }
            }
        }
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
}
