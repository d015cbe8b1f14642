//! Substation failover, the dispatcher's answer to a substation that went silent: the detection
//! half. A substation whose last heartbeat (`ev.telemetry.<id>`) is older than
//! `--substation-timeout` is failed; every dispatch it may still hold — those at or above its
//! consumer's ack floor on `ev.dispatch.<id>` — is offered back to the dispatchers as a *move*: a
//! copy of the request on `ev.requests` with the [`headers::MOVED_FROM`] and [`headers::MOVE_OF`]
//! headers, deduplicated by `move-<request id>-<dispatch seq>`.
//!
//! The move itself is carried out like any request, by whichever dispatcher pulls it
//! (`request::Handler::take_over`): it takes the request from the failed substation by
//! compare-and-set on its state, so it happens once however many dispatchers offered it, never
//! for a request that finished or a substation that came back, and the failed substation, if it
//! returns, finds the request is another's. Offering through the stream makes the move durable:
//! a dispatcher that dies halfway leaves the offer to be redelivered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::DirectGetErrorKind;
use async_nats::jetstream::{self};
use chrono::Utc;
use evgrid_common::streams;
use evgrid_model::messages::{ChargeRequest, Dispatch};
use evgrid_model::{headers, subjects};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::request::lock;
use evgrid_model::decision::GridView;

/// How often the heartbeat ages are compared with the timeout.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// Watches the grid until `shutdown` and offers the held dispatches of every substation silent
/// for `timeout` for a move, once per silence (again if its heartbeats resume and stop again,
/// and again on the next check when an offer failed).
pub(crate) async fn watch(
    js: jetstream::Context,
    grid: Arc<Mutex<GridView>>,
    timeout: Duration,
    shutdown: CancellationToken,
) {
    // Substation → the heartbeat seq its held dispatches were offered at.
    let mut offered: HashMap<String, u64> = HashMap::new();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (id, seq, age) in failed(&grid, timeout) {
            if offered.get(&id) == Some(&seq) {
                continue;
            }
            let done = tokio::select! {
                _ = shutdown.cancelled() => return,
                done = offer_held(&js, &id, age) => done,
            };
            match done {
                Ok(n) => {
                    if n > 0 {
                        tracing::warn!(substation = %id, silent_s = age, offered = n, "substation failed; its requests are offered to move");
                    }
                    offered.insert(id, seq);
                }
                Err(e) => {
                    tracing::warn!(substation = %id, error = %e, "cannot offer a failed substation's requests yet; retrying")
                }
            }
        }
    }
}

/// The substations silent for longer than `timeout` (and out: a substation that heartbeats
/// less often than that is not failed between two heartbeats): id, last heartbeat seq, silence
/// in s. Silence counts only while the grid was heard ([`Hearing`]): when NATS was away, every
/// substation was silent, and none of them failed.
///
/// [`Hearing`]: evgrid_model::liveness::Hearing
fn failed(grid: &Mutex<GridView>, timeout: Duration) -> Vec<(String, u64, f64)> {
    let now = Utc::now();
    let grid = lock(grid);
    grid.substations()
        .filter_map(|s| {
            let age = grid.hearing().silence_seconds(s.observed(), now);
            (age > timeout.as_secs_f64() && !s.is_up(now)).then(|| {
                (
                    s.id().to_owned(),
                    s.observed().heartbeat.seq,
                    (age * 10.0).round() / 10.0,
                )
            })
        })
        .collect()
}

/// Offers every dispatch substation `id` may hold for a move; returns how many were new offers.
async fn offer_held(
    js: &jetstream::Context,
    id: &str,
    silent_s: f64,
) -> Result<usize, async_nats::Error> {
    let dispatches = js.get_stream_no_info(streams::DISPATCH).await?;
    let floor = match dispatches
        .consumer_info(streams::substation_consumer_name(id))
        .await
    {
        Ok(info) => info.ack_floor.stream_sequence,
        // It never took anything (or its consumer was removed): all it was sent is held.
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => 0,
        Err(e) => return Err(e.into()),
    };
    let subject = subjects::dispatch(id);
    let mut next = floor + 1;
    let mut offered = 0;
    loop {
        let stored = match dispatches
            .direct_get_next_for_subject(subject.as_str(), Some(next))
            .await
        {
            Ok(stored) => stored,
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(offered),
            Err(e) => return Err(e.into()),
        };
        next = stored.sequence + 1;
        // Acked ones above the floor, and junk, are told apart by the move (state) and ignored.
        let Ok(dispatch) = serde_json::from_slice::<Dispatch>(&stored.payload) else {
            continue;
        };
        let ack = js
            .send_publish(subjects::REQUESTS, offer(&dispatch, id, stored.sequence))
            .await?
            .await?;
        if !ack.duplicate {
            offered += 1;
            tracing::debug!(request_id = %dispatch.request_id, substation = %id, silent_s, "offered to move");
        }
    }
}

/// The request of `dispatch` (at `seq` of substation `from`) as a move offer.
fn offer(dispatch: &Dispatch, from: &str, seq: u64) -> PublishMessage {
    let request = ChargeRequest {
        request_id: Some(dispatch.request_id),
        vehicle_id: dispatch.vehicle_id.clone(),
        energy_kwh: dispatch.energy_kwh,
        max_power_kw: dispatch.max_power_kw,
        departure: dispatch.departure,
        all_or_nothing: false,
    };
    PublishMessage::build()
        .payload(
            serde_json::to_vec(&request)
                .expect("a ChargeRequest serializes")
                .into(),
        )
        .message_id(format!("move-{}-{seq}", dispatch.request_id))
        .header(headers::REQUEST_ID, dispatch.request_id.to_string())
        .header(headers::ACCEPTED_AT, dispatch.accepted_at.to_rfc3339())
        .header(headers::MOVED_FROM, from)
        .header(headers::MOVE_OF, seq.to_string())
}
