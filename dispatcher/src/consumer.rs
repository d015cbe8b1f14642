//! The dispatcher's pull loop on `EV_REQUESTS` (durable consumer `dispatcher`): the intake of
//! ingest → **dispatcher** → substation.
//!
//! Decisions are made one message at a time, in order of delivery; the publishes and acks they
//! lead to run concurrently, at most `--max-in-flight` at once. The [`Intake`] asks the server
//! for the room there is plus one window ahead and rebuilds the consumer when it fails, while
//! in-flight work goes on. On shutdown the loop stops pulling, hands back what reached it
//! unstarted, finishes every in-flight publish and ack, and returns.

use std::sync::Arc;
use std::time::Duration;

use evgrid_common::nats::{Intake, Nats, hand_back};
use evgrid_common::streams;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::request::Handler;

/// The consumer's `max_ack_pending` for `max_in_flight` publishes: up to twice that is in flight
/// or waiting in the inbox (the look-ahead), and deferred requests stay ack-pending while they
/// wait for their redelivery, so they need room next to those.
pub(crate) fn max_ack_pending(max_in_flight: usize) -> i64 {
    (max_in_flight as i64).saturating_mul(4)
}

/// How long the server keeps each of the dispatcher's pull requests.
const PULL_EXPIRY: Duration = Duration::from_secs(2);

/// Runs until `shutdown`, then drains.
pub(crate) async fn run(
    handler: Arc<Handler>,
    nats: &Nats,
    max_in_flight: usize,
    replicas: usize,
    shutdown: CancellationToken,
) {
    let config = streams::dispatcher_consumer(max_ack_pending(max_in_flight), replicas);
    // Short pull requests: a frozen dispatcher stops being handed requests (the ones the ack
    // wait takes back from it included) within seconds, so another replica gets them.
    let mut intake = Intake::new(
        nats,
        streams::REQUESTS,
        config,
        "request consumer",
        max_in_flight,
    )
    .with_pull_expiry(PULL_EXPIRY);
    let mut in_flight: FuturesUnordered<BoxFuture<'static, ()>> = FuturesUnordered::new();
    loop {
        let room = max_in_flight.saturating_sub(in_flight.len());
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {
                // Busy with our own work is not silence from the server.
                intake.busy();
            }
            msg = intake.next(room), if room > 0 => {
                if let Some(effect) = handler.handle(msg) {
                    in_flight.push(effect.boxed());
                }
            }
        }
    }
    let returned = hand_back(intake.close().await).await;
    if returned > 0 {
        tracing::info!(returned, "handed back request messages not started");
    }
    if !in_flight.is_empty() {
        tracing::info!(
            in_flight = in_flight.len(),
            "finishing in-flight publishes and acks"
        );
    }
    while in_flight.next().await.is_some() {}
}
