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

mod chargers;
mod clock;
pub mod config;
mod feed;
mod limits;
pub mod metrics;
mod plan;
mod publisher;
mod session;
mod shell;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use evgrid_common::http::{self, Readiness};
use evgrid_common::nats::{self, NatsError};
use evgrid_common::streams;

use crate::feed::Feed;
use crate::limits::LimitFeed;
use crate::metrics::Metrics;
use crate::publisher::Publisher;
use crate::shell::{DRAIN_TIMEOUT, Ocpp, Shell};

pub use config::{Chargers, Config};

/// Runs one substation until `shutdown` fires: serves `/metrics`, `/healthz` and `/readyz` on
/// `listener`, charges the sessions dispatched to it, and on shutdown records and hands back
/// the sessions still charging (a restarted substation resumes them). Returns `Ok` after a
/// clean shutdown; an error only for what retrying cannot fix (e.g. a too-old nats-server).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let ocpp_listener = match config.chargers {
        Chargers::Simulated => None,
        Chargers::Ocpp => Some(
            http::bind(config.ocpp.ocpp_listen)
                .await
                .map_err(|e| e.context("OCPP stations"))?,
        ),
    };
    run_with_ocpp(config, listener, ocpp_listener, shutdown).await
}

/// [`run`], with the OCPP stations' listener bound by the caller (`--chargers ocpp`; tests
/// bind port 0): stations connect to `ws://<its address>/ocpp/<station id>`.
pub async fn run_with_ocpp(
    config: Config,
    listener: TcpListener,
    ocpp_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let registry = evgrid_common::metrics::registry();
    let metrics = Metrics::new(&registry, &config.id);
    let readiness = Readiness::new();
    // The ops endpoints stop with the service, also when it fails.
    let stop_http = shutdown.child_token();
    let server = tokio::spawn(http::serve(
        listener,
        http::ops_routes(registry, readiness.clone()),
        stop_http.clone(),
    ));
    let span = tracing::info_span!("substation", substation = %config.id);
    let (ocpp, ocpp_server) = match (config.chargers, ocpp_listener) {
        (Chargers::Ocpp, Some(ocpp_listener)) => {
            let (ocpp, server) = serve_ocpp(&config, ocpp_listener, stop_http.clone())?;
            (Some(ocpp), Some(server))
        }
        (Chargers::Ocpp, None) => anyhow::bail!("--chargers ocpp needs a listener for stations"),
        (Chargers::Simulated, _) => (None, None),
    };
    let result =
        tracing::Instrument::instrument(charge(config, metrics, readiness, ocpp, shutdown), span)
            .await;
    stop_http.cancel();
    for server in [Some(server), ocpp_server].into_iter().flatten() {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    }
    result
}

/// Serves the CSMS stations connect to on `listener` until `stop`.
fn serve_ocpp(
    config: &Config,
    listener: TcpListener,
    stop: CancellationToken,
) -> anyhow::Result<(Ocpp, tokio::task::JoinHandle<()>)> {
    use evgrid_ocpp::messages::ChargingRateUnit;
    use evgrid_ocpp::server::{Csms, Settings, serve_stations};

    let stations = config
        .ocpp
        .ocpp_stations
        .clone()
        .ok_or_else(|| anyhow::anyhow!("--chargers ocpp needs --ocpp-stations"))?;
    let settings = Settings {
        rate_unit: match config.ocpp.ocpp_rate_unit {
            config::RateUnit::W => ChargingRateUnit::W,
            config::RateUnit::A => ChargingRateUnit::A,
        },
        ..Settings::default()
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(url = %format!("ws://{addr}/ocpp/<station id>"), "OCPP stations connect here");
    }
    let (csms, events) = Csms::with_events(stations, settings);
    let server = tokio::spawn(serve_stations(csms.clone(), listener, stop));
    Ok((
        Ocpp::new(csms, events, config.ocpp.ocpp_station_max_kw),
        server,
    ))
}

/// Connects, makes sure the streams and the consumer exist, then charges until `shutdown`.
async fn charge(
    config: Config,
    metrics: Metrics,
    readiness: Readiness,
    ocpp: Option<Ocpp>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let name = format!("evgrid-substation-{}", config.id);
    let nats = match nats::connect(&config.nats.nats_url, &config.nats.auth, &name, &shutdown).await
    {
        Ok(nats) => nats,
        Err(NatsError::Shutdown) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    readiness.set_nats(nats.clone());
    let retention = streams::Retention::with_replicas(config.nats.replicas);
    let Some(kv) =
        streams::ensure_until_done(&nats.js, &retention, config.nats.manage_streams, &shutdown)
            .await?
    else {
        return Ok(());
    };
    readiness.set_streams_ready(true);

    let (publisher, writer) = Publisher::start(nats.js.clone());
    let mut feed = Feed::new(&nats, &config.id, config.nats.replicas, kv.clone());
    let mut limit_feed = LimitFeed::new(&nats, &config.id);
    let mut shell = Shell::new(&config, kv, publisher, metrics, ocpp);
    if !shell.replay_limits(&mut limit_feed, &shutdown).await {
        return Ok(());
    }
    tracing::info!(
        capacity_kw = shell.capacity_kw(),
        time_scale = config.time_scale,
        allocation = config.allocation.as_str(),
        "substation charging"
    );
    shell
        .serve(
            &mut feed,
            &mut limit_feed,
            config.heartbeat_interval,
            &shutdown,
        )
        .await;
    shell.stop(feed).await;
    drop(shell);

    // Every handle is gone: the writer finishes what it holds (heartbeats) and returns.
    let abort = writer.abort_handle();
    if tokio::time::timeout(DRAIN_TIMEOUT, writer).await.is_err() {
        abort.abort();
        tracing::warn!("gave up on writes NATS did not acknowledge within {DRAIN_TIMEOUT:?}");
    }
    // Acks and naks are plain publishes: make sure they left before the connection closes.
    if let Err(e) = tokio::time::timeout(DRAIN_TIMEOUT, nats.client.flush()).await {
        tracing::warn!(error = %e, "cannot flush the NATS connection");
    }
    tracing::info!("substation stopped");
    Ok(())
}
