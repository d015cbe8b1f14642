//! Keeps the dispatcher's [`GridView`] current from substation heartbeats (`ev.telemetry.<id>`: the
//! substation → dispatcher feedback of the flow), and keeps the gauges that are read rather than
//! counted: substations up, heartbeat age per substation, and the backlog of the dispatcher's
//! JetStream consumer.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use evgrid_common::heartbeats;
use evgrid_common::nats::Nats;
use evgrid_common::streams;
use evgrid_model::liveness::Observed;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::request::lock;
use evgrid_model::decision::GridView;

/// Heartbeat ages move every second; so do these gauges.
const GRID_GAUGES_EVERY: Duration = Duration::from_secs(1);
/// Consumer info is a request to the server: every few seconds is enough for a backlog.
const BACKLOG_EVERY: Duration = Duration::from_secs(3);

/// Feeds every heartbeat into `grid` until `shutdown` (the last of each substation first, then
/// live ones; rebuilt after server restarts).
pub(crate) async fn follow_heartbeats(
    nats: Nats,
    grid: Arc<Mutex<GridView>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let refusals = metrics.clone();
    heartbeats::follow_telemetry(
        nats,
        shutdown,
        move |observed: Observed, telemetry| {
            // The id is the subject's, checked as a subject token (so fit for a metric label).
            let id = observed.heartbeat.substation_id.clone();
            let mut grid = lock(&grid);
            let new = grid.get(&id).is_none();
            let taken = grid.observe_with(observed, telemetry.projection);
            drop(grid);
            match (new, taken) {
                (true, true) => {
                    metrics.substation_seen(&id);
                    tracing::info!(substation = %id, "substation joined the grid");
                }
                (true, false) => {
                    // Debug: a flood of made-up ids must not flood the logs; the metric counts.
                    tracing::debug!(substation = %id, "too many substations; dropping a new one's heartbeat");
                    metrics.too_many_substations();
                }
                _ => {}
            }
        },
        move |refused| refusals.heartbeat_refused(refused),
    )
    .await;
}

/// Updates the gauges until `shutdown`, and forgets the substations silent for `forget_after`
/// (with their metric series).
pub(crate) async fn keep_gauges(
    js: jetstream::Context,
    grid: Arc<Mutex<GridView>>,
    metrics: Arc<Metrics>,
    forget_after: Duration,
    shutdown: CancellationToken,
) {
    let mut grid_tick = tokio::time::interval(GRID_GAUGES_EVERY);
    let mut backlog_tick = tokio::time::interval(BACKLOG_EVERY);
    grid_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    backlog_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = grid_tick.tick() => {
                forget(&grid, &metrics, forget_after);
                grid_gauges(&grid, &metrics);
            }
            _ = backlog_tick.tick() => tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = backlog_gauges(&js, &metrics) => {}
            },
        }
    }
}

async fn backlog_gauges(js: &jetstream::Context, metrics: &Metrics) {
    let info = match js.get_stream_no_info(streams::REQUESTS).await {
        Ok(requests) => requests
            .consumer_info(streams::DISPATCHER_CONSUMER)
            .await
            .map_err(async_nats::Error::from),
        Err(e) => Err(e.into()),
    };
    match info {
        Ok(info) => {
            metrics.consumer_pending.set(gauge(info.num_pending));
            metrics
                .consumer_ack_pending
                .set(gauge(info.num_ack_pending as u64));
            metrics
                .consumer_redelivered
                .set(gauge(info.num_redelivered as u64));
        }
        // Normal while NATS restarts or before the consumer exists.
        Err(e) => tracing::debug!(error = %e, "cannot read the consumer backlog"),
    }
}

fn forget(grid: &Mutex<GridView>, metrics: &Metrics, after: Duration) {
    let forgotten = lock(grid).forget_silent(Utc::now(), after);
    for id in forgotten {
        metrics.substation_forgotten(&id);
        tracing::info!(substation = %id, silent_for = ?after, "substation forgotten");
    }
}

fn grid_gauges(grid: &Mutex<GridView>, metrics: &Metrics) {
    let now = Utc::now();
    let grid = lock(grid);
    let mut up = 0;
    for s in grid.substations() {
        up += i64::from(s.is_up(now));
        metrics
            .heartbeat_age_of(s.id())
            .set(s.observed().age_seconds(now));
    }
    metrics.substations_up.set(up);
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
