//! Time helpers for the agent's loops: retries that back off, and a deadline that may be absent.

use std::time::Duration;

/// Retry delays that start at `first` and double on each failure, up to `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self { first, max }
    }

    /// The delay before the retry that follows `failures` earlier retries (0: the first retry).
    pub fn delay(self, failures: u32) -> Duration {
        self.first
            .saturating_mul(2u32.saturating_pow(failures))
            .min(self.max)
    }
}

/// Sleeps until `deadline`, or forever when there is none: for a `select!` branch of a loop
/// that has a retry due only sometimes.
pub async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
