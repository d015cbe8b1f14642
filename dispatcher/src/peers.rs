//! Dispatcher replicas: counting what the others send. Several dispatchers share the durable
//! consumer on `EV_REQUESTS`, and each decides with its own [`GridView`], whose pending
//! assignments (sent, not yet in a heartbeat) are what spreads a burst between two heartbeats.
//! A replica that counted only its own sends would pile each burst onto the same substation
//! once per replica; so every dispatcher follows `ev.dispatch.*` and counts the assignments
//! the others made (header [`headers::DISPATCHER`] not its own), with the power they counted
//! ([`headers::POWER_KW`]), until the substation's heartbeat echoes them.

use std::sync::{Arc, Mutex};

use async_nats::jetstream::consumer;
use evgrid_common::nats::{Nats, follow_ordered};
use evgrid_common::streams;
use evgrid_model::decision::{Demand, GridView};
use evgrid_model::messages::Dispatch;
use evgrid_model::{headers, subjects};
use tokio_util::sync::CancellationToken;

use crate::request::lock;

/// At start, the dispatches looked back on: older ones are in the substations' heartbeats by
/// now (a heartbeat a second), newer ones may still be pending.
const LOOKBACK: time::Duration = time::Duration::seconds(5);

/// Counts every other dispatcher's assignments into `grid` until `stop`.
pub(crate) async fn follow(
    nats: Nats,
    grid: Arc<Mutex<GridView>>,
    instance: Arc<str>,
    stop: CancellationToken,
) {
    let since = time::OffsetDateTime::now_utc() - LOOKBACK;
    let config = move |next: u64| consumer::pull::OrderedConfig {
        filter_subject: subjects::DISPATCH_ALL.into(),
        deliver_policy: if next > 0 {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: next,
            }
        } else {
            consumer::DeliverPolicy::ByStartTime { start_time: since }
        },
        ..Default::default()
    };
    follow_ordered(
        &nats,
        streams::DISPATCH,
        "peer dispatch feed",
        config,
        &stop,
        |msg| {
            let headers = msg.headers.as_ref();
            let sender = headers.and_then(|h| h.get(headers::DISPATCHER));
            if sender.is_none_or(|s| s.as_str() == &*instance) {
                // Ours (counted when decided), or not from a dispatcher.
                return;
            }
            let power_kw = headers
                .and_then(|h| h.get(headers::POWER_KW))
                .and_then(|v| v.as_str().parse::<f64>().ok())
                .filter(|p| p.is_finite() && *p > 0.0);
            let (Some(power_kw), Ok(info), Ok(dispatch)) = (
                power_kw,
                msg.info(),
                serde_json::from_slice::<Dispatch>(&msg.payload),
            ) else {
                return;
            };
            let demand = Demand {
                energy_kwh: dispatch.energy_kwh,
                max_power_kw: dispatch.max_power_kw,
                departure: dispatch.departure,
            };
            lock(&grid).record_assignment(
                &dispatch.substation_id,
                info.stream_sequence,
                power_kw,
                &demand,
            );
        },
    )
    .await;
}
