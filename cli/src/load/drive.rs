//! The senders of `evgrid load`, feeding the front of ingest → dispatcher → substation: a closed
//! loop (N workers, each sending its next request when the last is answered) and an open loop
//! (requests due on a fixed schedule whatever the target does, so a slow target shows as
//! latency rather than a slower schedule: no coordinated omission).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::follow::Tracker;
use super::plan::{Mix, RunIds, Schedule, encode};
use super::stats::{ErrorKind, Recorder, SendError};
use super::target::Target;

/// Everything a sender needs, shared by all of them.
#[derive(Debug)]
pub struct Driver {
    pub target: Target,
    pub mix: Mix,
    pub ids: RunIds,
    pub recorder: Arc<Recorder>,
    pub tracker: Option<Arc<Tracker>>,
    /// Bound on each request's wait for its answer.
    pub timeout: Duration,
    /// `--retry-for`: resend an unanswered or 5xx request, for up to this long.
    pub retry_for: Option<Duration>,
}

/// Resends back off from this, doubling, to [`RETRY_MAX_DELAY`].
const RETRY_FIRST_DELAY: Duration = Duration::from_millis(100);
const RETRY_MAX_DELAY: Duration = Duration::from_secs(1);

impl Driver {
    /// Encodes request `i` into `buf` (reused by the caller) and returns its body.
    fn body(&self, i: u64, buf: &mut Vec<u8>) -> Bytes {
        encode(buf, self.ids.id(i), i, &self.mix.spec(i), Utc::now());
        Bytes::copy_from_slice(buf)
    }

    /// Sends request `i` (resending it as `--retry-for` allows) and records the outcome;
    /// latency counts from `due`.
    async fn send(&self, i: u64, body: Bytes, due: Instant) {
        let retry_until = self.retry_for.map(|d| Instant::now() + d);
        let mut delay = RETRY_FIRST_DELAY;
        let mut attempt = 0;
        loop {
            let sent = self.target.send(self.ids.id(i), body.clone(), i, attempt);
            let result = match tokio::time::timeout(self.timeout, sent).await {
                Ok(result) => result,
                Err(_) => Err(SendError::new(
                    ErrorKind::Timeout,
                    format!("no answer within {:?}", self.timeout),
                )),
            };
            let error = match result {
                Ok(()) => {
                    self.recorder.accepted(due.elapsed());
                    if let Some(t) = &self.tracker {
                        t.accepted(i);
                    }
                    return;
                }
                Err(e) => e,
            };
            let retry = retry_until.is_some_and(|until| Instant::now() + delay < until)
                && error.kind.is_transient();
            if !retry {
                self.recorder.error(error);
                return;
            }
            self.recorder.retried();
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_MAX_DELAY);
            attempt += 1;
        }
    }
}

/// Runs `schedule` to its end (or until `shutdown`), returning when every request sent has its
/// answer. `max_in_flight` bounds the open loop's outstanding requests.
pub async fn run(
    driver: Arc<Driver>,
    schedule: &Schedule,
    max_in_flight: usize,
    shutdown: &CancellationToken,
) {
    match schedule {
        Schedule::Closed {
            concurrency,
            requests,
        } => closed(driver, *concurrency, *requests, shutdown).await,
        _ => open(driver, schedule, max_in_flight, shutdown).await,
    }
}

async fn closed(
    driver: Arc<Driver>,
    concurrency: usize,
    requests: u64,
    shutdown: &CancellationToken,
) {
    let next = Arc::new(AtomicU64::new(0));
    let workers = TaskTracker::new();
    for _ in 0..concurrency.min(requests as usize) {
        let (driver, next, shutdown) = (driver.clone(), next.clone(), shutdown.clone());
        workers.spawn(async move {
            let mut buf = Vec::with_capacity(256);
            // A stop signal ends the loop between requests; the one in flight is finished.
            while !shutdown.is_cancelled() {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                let body = driver.body(i, &mut buf);
                driver.recorder.sent();
                driver.send(i, body, Instant::now()).await;
            }
        });
    }
    workers.close();
    workers.wait().await;
}

async fn open(
    driver: Arc<Driver>,
    schedule: &Schedule,
    max_in_flight: usize,
    shutdown: &CancellationToken,
) {
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    let senders = TaskTracker::new();
    let mut buf = Vec::with_capacity(256);
    let start = Instant::now();
    for i in 0..schedule.requests() {
        let due = start + schedule.due(i).unwrap_or_default();
        if due > Instant::now() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(due) => {}
            }
        } else if shutdown.is_cancelled() {
            break;
        }
        driver.recorder.sent();
        // Behind schedule, the overdue requests go out at once, each timed from when it was
        // due; beyond the in-flight cap they are dropped and counted, never delayed.
        match in_flight.clone().try_acquire_owned() {
            Ok(permit) => {
                let body = driver.body(i, &mut buf);
                let driver = driver.clone();
                senders.spawn(async move {
                    driver.send(i, body, due).await;
                    drop(permit);
                });
            }
            Err(_) => driver.recorder.error(SendError::new(
                ErrorKind::Overload,
                format!("{max_in_flight} requests already in flight (--max-in-flight)"),
            )),
        }
    }
    senders.close();
    senders.wait().await;
}
