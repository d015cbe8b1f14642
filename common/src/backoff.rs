//! The one retry policy of every loop that waits on NATS: opening a consumer, setting up the
//! streams, publishing again, reconnecting. Exponential from [`FIRST`] to [`MAX`], with jitter so
//! that the services of a grid that lost their server together do not all come back in the same
//! millisecond.

use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::error::chain;

/// The first delay: a server that is merely restarting is usually back within a few of these.
pub const FIRST: Duration = Duration::from_millis(100);
/// The longest delay: a server that returns is in use again within about this.
pub const MAX: Duration = Duration::from_secs(2);

/// Delays that double from `first` up to `max`; each one is drawn at random from the upper half
/// of its step ("equal jitter"), so it is never shorter than half the step.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    step: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(FIRST, MAX)
    }
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            step: first,
        }
    }

    /// The next delay; the step after it is twice as long (up to the maximum).
    pub fn next_delay(&mut self) -> Duration {
        let delay = jittered(self.step);
        self.step = (self.step * 2).min(self.max);
        delay
    }

    /// Back to the first step, after a success.
    pub fn reset(&mut self) {
        self.step = self.first;
    }

    /// Sleeps the next delay. False when `stop` fired first.
    pub async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// The delay before reconnect attempt `attempt` (0, 1, …): the same curve as [`Backoff`], for the
/// NATS client's reconnect callback, which counts attempts itself.
pub fn for_attempt(attempt: usize) -> Duration {
    let step = FIRST.saturating_mul(1 << attempt.min(8) as u32).min(MAX);
    jittered(step)
}

fn jittered(step: Duration) -> Duration {
    let half = step / 2;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(rand::rng().random_range(0..=nanos))
}

/// Calls `f` until it succeeds, waiting with a [`Backoff`] in between and logging each failure as
/// "cannot {what} yet". `None` when `stop` fires first.
pub async fn retry<T, E, Fut>(
    what: &str,
    stop: &CancellationToken,
    f: impl FnMut() -> Fut,
) -> Option<T>
where
    E: std::error::Error + 'static,
    Fut: Future<Output = Result<T, E>>,
{
    retry_expecting(what, stop, |_| false, f).await
}

/// [`retry`], logging the failures that are `expected` (waiting for another service, say) at
/// info level rather than as warnings.
pub async fn retry_expecting<T, E, Fut>(
    what: &str,
    stop: &CancellationToken,
    expected: impl Fn(&E) -> bool,
    mut f: impl FnMut() -> Fut,
) -> Option<T>
where
    E: std::error::Error + 'static,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::default();
    loop {
        let attempt = tokio::select! {
            _ = stop.cancelled() => return None,
            attempt = f() => attempt,
        };
        match attempt {
            Ok(value) => return Some(value),
            Err(e) if expected(&e) => {
                tracing::info!(error = %chain(&e), "cannot {what} yet; retrying");
            }
            Err(e) => tracing::warn!(error = %chain(&e), "cannot {what} yet; retrying"),
        }
        if !backoff.wait(stop).await {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_jitter_up_to_the_maximum() {
        let mut b = Backoff::default();
        let mut step = FIRST;
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} outside the step {step:?}"
            );
            step = (step * 2).min(MAX);
        }
        b.reset();
        assert!(b.next_delay() <= FIRST);
    }

    #[test]
    fn reconnect_delays_follow_the_same_curve() {
        assert!(for_attempt(0) <= FIRST);
        for attempt in [5, 50, usize::MAX] {
            let d = for_attempt(attempt);
            assert!(d >= MAX / 2 && d <= MAX, "{d:?}");
        }
    }
}
