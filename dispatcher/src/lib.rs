//! `evgrid-dispatcher`: routes every charge request to a substation.
//!
//! The middle of ingest → `ev.requests` → **dispatcher** → `ev.dispatch.<id>` → substation. It
//! reads `EV_REQUESTS` through the durable pull consumer `dispatcher`, keeps the live view of the
//! grid from the substations' heartbeats (`ev.telemetry.<id>`, with their projections), and for
//! each request either publishes an assignment to the substation its `--policy` picks (then
//! acks), lets it wait in the stream (nak with a delay), or publishes it to `ev.rejected` (then
//! terminates it). The decision itself is the pure [`evgrid_model::decision::decide`]; docs/dispatch.md
//! describes the policies and how `evgrid sim` compares them.

pub mod config;
mod consumer;
mod failover;
mod grid_feed;
pub mod metrics;
mod peers;
mod request;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use evgrid_common::http::{self, Readiness};
use evgrid_common::nats::{self, NatsError};
use evgrid_common::streams;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use evgrid_model::decision::Policy;

use crate::metrics::Metrics;
use crate::request::Handler;
use evgrid_model::decision::GridView;

/// The client name the dispatcher shows the NATS server.
pub const CLIENT_NAME: &str = "evgrid-dispatcher";

/// How long shutdown waits for the last acks to reach the server.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the dispatcher until `shutdown`: serves `/metrics`, `/healthz` and `/readyz` on
/// `listener`, connects to NATS (waiting for it if needed), ensures the streams, then routes
/// requests. Returns `Ok` after a clean shutdown (in-flight publishes and acks finished); an error
/// only for what waiting cannot fix, such as a server older than evgrid supports.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Our own token: an error below stops the helpers without cancelling the caller's token.
    let stop = shutdown.child_token();
    let registry = evgrid_common::metrics::registry();
    let metrics = Arc::new(Metrics::new(&registry));
    let readiness = Readiness::new();
    let tasks = TaskTracker::new();
    tasks.spawn(http::serve(
        listener,
        http::ops_routes(registry, readiness.clone()),
        stop.clone(),
    ));
    tracing::info!(
        policy = config.policy.as_str(),
        max_in_flight = config.max_in_flight,
        defer_delay = ?config.defer_delay,
        substation_timeout = ?config.substation_timeout,
        "dispatcher starting"
    );

    let result = route(&config, metrics, &readiness, &tasks, &stop).await;
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    result
}

async fn route(
    config: &Config,
    metrics: Arc<Metrics>,
    readiness: &Readiness,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let nats =
        match nats::connect(&config.nats.nats_url, &config.nats.auth, CLIENT_NAME, stop).await {
            Ok(nats) => nats,
            Err(NatsError::Shutdown) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
    readiness.set_nats(nats.clone());
    let retention = streams::Retention::with_replicas(config.nats.replicas);
    let Some(kv) =
        streams::ensure_until_done(&nats.js, &retention, config.nats.manage_streams, stop).await?
    else {
        return Ok(());
    };
    readiness.set_streams_ready(true);

    let grid = Arc::new(Mutex::new(
        GridView::new().with_max_substations(config.max_substations),
    ));
    tasks.spawn(grid_feed::follow_heartbeats(
        nats.clone(),
        grid.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    tasks.spawn(grid_feed::keep_gauges(
        nats.js.clone(),
        grid.clone(),
        metrics.clone(),
        config.effective_forget_after(),
        stop.clone(),
    ));
    tasks.spawn(failover::watch(
        nats.js.clone(),
        grid.clone(),
        config.substation_timeout,
        stop.clone(),
    ));
    let instance: Arc<str> = Arc::from(uuid::Uuid::new_v4().to_string());
    tasks.spawn(peers::follow(
        nats.clone(),
        grid.clone(),
        instance.clone(),
        stop.clone(),
    ));
    let handler = Arc::new(Handler {
        js: nats.js.clone(),
        kv,
        grid,
        metrics,
        policy: config.policy,
        rng: Mutex::new(SmallRng::from_os_rng()),
        defer_delay: config.defer_delay,
        instance,
    });
    consumer::run(
        handler,
        &nats,
        config.max_in_flight,
        config.nats.replicas,
        stop.clone(),
    )
    .await;

    // Acks are fire-and-forget publishes: make sure the last ones left the process.
    match tokio::time::timeout(FLUSH_TIMEOUT, nats.client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot flush the last acks"),
        Err(_) => tracing::warn!("timed out flushing the last acks"),
    }
    tracing::info!("dispatcher stopped");
    Ok(())
}
