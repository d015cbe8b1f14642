//! `evgrid-substation`: the last stage of the charge pipeline, ingest → dispatcher →
//! **substation**. A substation takes the requests the dispatcher assigns to it on
//! `ev.dispatch.<id>`, charges them in simulated time without ever drawing more than its
//! capacity, reports every session's lifecycle on `ev.sessions.<id>.<event>` and in the
//! request-state bucket, and heartbeats its load on `ev.telemetry.<id>` so the dispatcher can
//! route by it. Cars leave at their departure; grid operators change the capacity at run time
//! on `ev.limits.<id>`.
//!
//! The pure charging model is `evgrid_model::charging` (also run by the simulator); [`run`] is
//! the live service
//! around it. docs/substation.md describes both.

pub mod config;
mod limits;
mod live;
pub mod metrics;
mod publisher;
mod reopen;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use evgrid_common::http::{self, Readiness};

pub use config::Config;

/// Runs one substation until `shutdown` fires: serves `/metrics`, `/healthz` and `/readyz` on
/// `listener`, charges the sessions dispatched to it, and on shutdown records and hands back
/// the sessions still charging (a restarted substation resumes them). Returns `Ok` after a
/// clean shutdown; an error only for what retrying cannot fix (e.g. a too-old nats-server).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let registry = evgrid_common::metrics::registry();
    let metrics = metrics::Metrics::new(&registry, &config.id);
    let readiness = Readiness::new();
    // The ops endpoints stop with the service, also when it fails.
    let stop_http = shutdown.child_token();
    let server = tokio::spawn(http::serve(
        listener,
        http::ops_routes(registry, readiness.clone()),
        stop_http.clone(),
    ));
    let span = tracing::info_span!("substation", substation = %config.id);
    let result =
        tracing::Instrument::instrument(live::run(config, metrics, readiness, shutdown), span)
            .await;
    stop_http.cancel();
    if let Err(e) = server.await {
        tracing::error!(error = %e, "ops HTTP server failed");
    }
    result
}
