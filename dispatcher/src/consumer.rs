//! The dispatcher's pull loop on `EV_REQUESTS` (durable consumer `dispatcher`): the intake of
//! ingest → **dispatcher** → substation.
//!
//! Decisions are made one message at a time, in order of delivery; the publishes and acks they
//! lead to run concurrently, at most `--max-in-flight` at once, and the loop asks the server for
//! the room it has plus one window ahead, so the next messages are already here when room frees
//! rather than a round trip away, and the server delivers in fuller batches. When the consumer
//! fails (server restart, consumer deleted) it is rebuilt with backoff while in-flight work
//! finishes. On shutdown the loop stops pulling, hands back what reached it unstarted, finishes
//! every in-flight publish and ack, and returns.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{self, PullConsumer, pull};
use evgrid_common::streams;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::pull::{Pulled, Puller, SILENCE_LIMIT};
use crate::request::Handler;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Pause before asking again after the server refused a pull request.
const REQUEST_RETRY: Duration = Duration::from_millis(100);

/// The consumer's `max_ack_pending` for `max_in_flight` publishes: up to twice that is in flight
/// or waiting in the inbox (the look-ahead), and deferred requests stay ack-pending while they
/// wait for their redelivery, so they need room next to those.
pub(crate) fn max_ack_pending(max_in_flight: usize) -> i64 {
    (max_in_flight as i64).saturating_mul(4)
}

/// Runs until `shutdown`, then drains.
pub(crate) async fn run(
    handler: Arc<Handler>,
    max_in_flight: usize,
    mut connection: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let desired = streams::dispatcher_consumer(max_ack_pending(max_in_flight));
    let mut work = Work {
        handler,
        in_flight: FuturesUnordered::new(),
        max_in_flight,
    };
    let mut backoff = MIN_BACKOFF;
    loop {
        let opened = tokio::select! {
            _ = shutdown.cancelled() => break,
            opened = open(&work.handler.js, &desired) => opened,
        };
        match opened {
            Ok(consumer) => match Puller::new(work.handler.js.clone(), consumer).await {
                Ok(mut puller) => {
                    let outcome = work
                        .pull(&mut puller, &mut connection, &shutdown, &mut backoff)
                        .await;
                    let returned = puller.hand_back().await;
                    if returned > 0 {
                        tracing::info!(returned, "handed back request messages not started");
                    }
                    if let Err(reason) = outcome {
                        tracing::warn!(%reason, "request consumer failed; rebuilding it");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot subscribe for requests yet; retrying"),
            },
            Err(e) => tracing::warn!(error = %e, "cannot open the request consumer yet; retrying"),
        }
        if shutdown.is_cancelled() || !work.pause(backoff, &shutdown).await {
            break;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    work.finish().await;
}

/// The decisions' in-flight effects.
struct Work {
    handler: Arc<Handler>,
    in_flight: FuturesUnordered<BoxFuture<'static, ()>>,
    max_in_flight: usize,
}

impl Work {
    fn room(&self) -> usize {
        self.max_in_flight.saturating_sub(self.in_flight.len())
    }

    /// Pulls and handles messages until `shutdown` (`Ok`) or until the consumer breaks (`Err`).
    async fn pull(
        &mut self,
        puller: &mut Puller,
        connection: &mut watch::Receiver<bool>,
        shutdown: &CancellationToken,
        backoff: &mut Duration,
    ) -> Result<(), String> {
        // Ask again when at least this much room is free: fewer, fuller pull requests.
        let low_water = (self.max_in_flight / 4).max(1);
        let mut silence_until = Instant::now() + SILENCE_LIMIT;
        let mut retry_at = Instant::now();
        connection.mark_unchanged();
        loop {
            if !puller.is_open()
                && Instant::now() >= retry_at
                && (self.room() >= low_water || self.in_flight.is_empty())
            {
                // One window ahead: those wait in the inbox (handed back on shutdown).
                puller
                    .request(self.room() + self.max_in_flight)
                    .await
                    .map_err(|e| format!("cannot send a pull request: {e}"))?;
                silence_until = Instant::now() + SILENCE_LIMIT;
            }
            let listening = self.room() > 0;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                Some(()) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    // Busy with our own work is not silence from the server.
                    silence_until = Instant::now() + SILENCE_LIMIT;
                }
                pulled = puller.next(), if listening => {
                    silence_until = Instant::now() + SILENCE_LIMIT;
                    match pulled {
                        Pulled::Message(msg) => {
                            *backoff = MIN_BACKOFF;
                            if let Some(effect) = self.handler.handle(*msg) {
                                self.in_flight.push(effect.boxed());
                            }
                        }
                        Pulled::Alive => {}
                        Pulled::Ended { retry_soon } => {
                            if retry_soon {
                                retry_at = Instant::now() + REQUEST_RETRY;
                            }
                        }
                        Pulled::Broken(reason) => return Err(reason),
                    }
                }
                Ok(()) = connection.changed() => {
                    // A restarted server has forgotten the open pull request: ask again now
                    // rather than after the silence limit. (Were it still there, the extra
                    // messages would only wait in the inbox.)
                    if *connection.borrow_and_update() && puller.is_open() {
                        tracing::debug!("reconnected; renewing the pull request");
                        puller.forget();
                    }
                }
                _ = sleep_until(retry_at), if !puller.is_open() && Instant::now() < retry_at => {}
                _ = sleep_until(silence_until), if puller.is_open() && listening => {
                    // No message and no heartbeat: the server lost the request (it restarted).
                    tracing::debug!("pull request went silent; asking again");
                    puller.forget();
                }
            }
        }
    }

    /// Sleeps `backoff` while in-flight work goes on. False when `shutdown` came first.
    async fn pause(&mut self, backoff: Duration, shutdown: &CancellationToken) -> bool {
        let pause = sleep(backoff);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return false,
                _ = &mut pause => return true,
                Some(()) = self.in_flight.next(), if !self.in_flight.is_empty() => {}
            }
        }
    }

    /// Finishes every in-flight publish and ack.
    async fn finish(mut self) {
        if !self.in_flight.is_empty() {
            tracing::info!(
                in_flight = self.in_flight.len(),
                "finishing in-flight publishes and acks"
            );
        }
        while self.in_flight.next().await.is_some() {}
    }
}

/// Gets the durable consumer (creating it on a fresh server) and rolls its editable settings
/// forward when they drifted.
async fn open(
    js: &jetstream::Context,
    desired: &pull::Config,
) -> Result<PullConsumer, async_nats::Error> {
    let stream = js.get_stream_no_info(streams::REQUESTS).await?;
    let consumer: PullConsumer = stream
        .get_or_create_consumer(streams::DISPATCHER_CONSUMER, desired.clone())
        .await?;
    if !drifted(&consumer.cached_info().config, desired) {
        return Ok(consumer);
    }
    match stream.update_consumer(desired.clone()).await {
        Ok(updated) => {
            tracing::info!("updated the dispatcher consumer to the current definition");
            Ok(updated)
        }
        // Keep working with what is there: an operator may have changed it on purpose.
        Err(e) => {
            tracing::warn!(error = %e, "cannot update the dispatcher consumer; using it as it is");
            Ok(consumer)
        }
    }
}

/// Whether the consumer's editable settings differ from ours. Fields the server fills in
/// itself (replicas, max_waiting…) are not compared.
fn drifted(current: &consumer::Config, desired: &pull::Config) -> bool {
    current.description != desired.description
        || current.ack_wait != desired.ack_wait
        || current.max_deliver != desired.max_deliver
        || current.max_ack_pending != desired.max_ack_pending
        || current.backoff != desired.backoff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_editable_settings_count_as_drift() {
        let desired = streams::dispatcher_consumer(max_ack_pending(256));
        let mut current = consumer::Config {
            durable_name: desired.durable_name.clone(),
            description: desired.description.clone(),
            ack_policy: desired.ack_policy,
            ack_wait: desired.ack_wait,
            max_deliver: desired.max_deliver,
            max_ack_pending: desired.max_ack_pending,
            // Filled in by the server: not ours to compare.
            max_waiting: 512,
            num_replicas: 1,
            ..Default::default()
        };
        assert!(!drifted(&current, &desired));
        current.max_ack_pending = 1000;
        assert!(drifted(&current, &desired));
    }
}
