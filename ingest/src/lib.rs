//! `evgrid-ingest`: the HTTP front door of the charge pipeline (ingest → dispatcher →
//! substation).
//!
//! It validates `POST /v1/charge-requests` bodies with the rules every stage shares, stores each
//! accepted request in JetStream (`ev.requests`, stream `EV_REQUESTS`, deduplicated by request
//! id) and answers `202 Accepted` only after the PubAck. It also answers
//! `GET /v1/charge-requests/{request_id}` from the `EV_REQUEST_STATE` bucket that the dispatcher
//! and substations keep current, and `GET /v1/substations` from the substations' heartbeats.
//! The HTTP contract is `docs/api.md` and `docs/openapi.yaml`.

pub mod auth;
mod contract;
mod metrics;
mod problem;
mod recent;
mod request;
mod routes;
mod state;
mod substations;
mod view;

use std::sync::Arc;

use anyhow::Context as _;
use evgrid_common::config::{NatsArgs, RenamedEnv};
use evgrid_common::http::{self, Readiness};
use evgrid_common::nats::{self, NatsError};
use evgrid_common::{heartbeats, streams};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use contract::BODY_LIMIT_BYTES;

use crate::auth::{Access, ApiKeys};
use crate::metrics::Metrics;
use crate::state::AppState;

/// Default of `--recent-accepts`: at the rates one instance sustains (tens of thousands of
/// requests a second) this covers the seconds between a 202 and the pipeline's first state
/// write, in about 5 MB.
pub const DEFAULT_RECENT_ACCEPTS: usize = 100_000;
/// `--recent-accepts`.
pub const RECENT_ACCEPTS_ENV: &str = "EVGRID_RECENT_ACCEPTS";
/// The name `--recent-accepts` was read from before every variable became `EVGRID_` and the
/// option's name: still read, with a warning, until the next release.
pub const RENAMED_ENV: &[RenamedEnv] = &[RenamedEnv {
    old: "EVGRID_INGEST_RECENT_ACCEPTS",
    new: RECENT_ACCEPTS_ENV,
    flag: "--recent-accepts",
}];

/// The name this service gives its NATS connection (visible in the server's `/connz`).
const CONNECTION_NAME: &str = "evgrid-ingest";

/// Options of the ingest service (the binary adds `--listen` and the log format).
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    #[command(flatten)]
    pub nats: NatsArgs,

    /// How many recently accepted request ids this process remembers, so that
    /// `GET /v1/charge-requests/{id}` right after the 202 answers `queued` before the pipeline
    /// has written any state for it.
    #[arg(
        long,
        env = RECENT_ACCEPTS_ENV,
        default_value_t = DEFAULT_RECENT_ACCEPTS,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..),
    )]
    pub recent_accepts: usize,

    /// A client must send a request's whole header within this, or its connection is closed
    /// (100 ms to 10 min).
    #[arg(long, env = "EVGRID_HTTP_HEADER_TIMEOUT", default_value = "10s",
          value_parser = parse_header_timeout)]
    pub http_header_timeout: std::time::Duration,

    /// Connections open at once; more wait until one closes. Keep it below the process's file
    /// descriptor limit (`ulimit -n`).
    #[arg(
        long,
        env = "EVGRID_HTTP_MAX_CONNECTIONS",
        default_value_t = http::DEFAULT_MAX_CONNECTIONS,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000),
    )]
    pub http_max_connections: usize,

    /// The API keys file: a `secret` line and one line per key with its SHA-256, scopes and
    /// rate (docs/security.md); `evgrid api-key` writes it. Read at start: restart ingest
    /// to take in a change.
    #[arg(long, env = "EVGRID_API_KEYS", value_name = "FILE", value_parser = parse_api_keys)]
    pub api_keys: Option<Arc<ApiKeys>>,

    /// Serve without API keys: anyone who reaches the API may submit requests and read every
    /// request and the grid. For local experiments only.
    #[arg(long, env = "EVGRID_INSECURE_NO_AUTH", conflicts_with = "api_keys")]
    pub insecure_no_auth: bool,

    /// Requests a second each API key may make (bursts of a second's worth), unless its line
    /// in the keys file sets its own `rate=`.
    #[arg(long, env = "EVGRID_API_RATE_LIMIT", default_value_t = DEFAULT_API_RATE_LIMIT,
          value_parser = auth::parse_per_second)]
    pub api_rate_limit: f64,
}

impl Config {
    /// What the options cannot say by themselves: that one of `--api-keys` and
    /// `--insecure-no-auth` is given.
    pub fn check(&self) -> Result<(), String> {
        if self.api_keys.is_none() && !self.insecure_no_auth {
            return Err("no API keys: give --api-keys FILE (`evgrid api-key` makes one), or --insecure-no-auth for a local experiment".into());
        }
        Ok(())
    }
}

/// Default of `--api-rate-limit`: requests a second per API key.
pub const DEFAULT_API_RATE_LIMIT: f64 = 100.0;

fn parse_api_keys(path: &str) -> Result<Arc<ApiKeys>, String> {
    ApiKeys::read(std::path::Path::new(path))
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

fn parse_header_timeout(s: &str) -> Result<std::time::Duration, String> {
    evgrid_common::config::parse_duration_in(
        s,
        std::time::Duration::from_millis(100)..=std::time::Duration::from_secs(600),
    )
}

/// Serves the HTTP API on `listener` until `shutdown`, then lets in-flight requests finish.
///
/// HTTP is served at once (`/readyz` answers 503 and `POST` answers 503 until NATS is reachable
/// and the streams exist). Returns an error only for a NATS server it can never use (bad URL,
/// too old, JetStream disabled); a server that is merely down is waited for.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.check().map_err(anyhow::Error::msg)?;
    let access = match &config.api_keys {
        Some(keys) => Access::Keys {
            keys: keys.clone(),
            default_rate: config.api_rate_limit,
        },
        None => {
            tracing::warn!(
                "serving without API keys (--insecure-no-auth): anyone who reaches the API may submit, and read every request"
            );
            Access::Open
        }
    };
    let registry = evgrid_common::metrics::registry();
    let readiness = Readiness::new();
    let state = Arc::new(AppState::new(
        access,
        config.recent_accepts,
        Metrics::register(&registry),
        readiness.clone(),
    ));
    // A fatal NATS error stops the HTTP server too, without cancelling the caller's token.
    let stop = shutdown.child_token();

    let addr = listener.local_addr().context("listener has no address")?;
    tracing::info!(%addr, "serving HTTP");
    let server = http::serve_with(
        listener,
        routes::routes(state.clone(), registry, readiness.clone()),
        stop.clone(),
        http::Limits {
            header_timeout: config.http_header_timeout,
            max_connections: config.http_max_connections,
        },
    );
    let nats_side = async {
        let result = connect_and_follow(&config, &state, &readiness, &stop).await;
        if result.is_err() {
            stop.cancel();
        }
        result
    };
    let ((), result) = tokio::join!(server, nats_side);
    tracing::info!("stopped");
    result
}

/// Connects, puts the streams in place, then keeps the live substation view until `stop`.
async fn connect_and_follow(
    config: &Config,
    state: &Arc<AppState>,
    readiness: &Readiness,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let nats = match nats::connect(
        &config.nats.nats_url,
        &config.nats.auth,
        CONNECTION_NAME,
        stop,
    )
    .await
    {
        Ok(nats) => nats,
        Err(NatsError::Shutdown) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    readiness.set_nats(nats.clone());
    let retention = streams::Retention::with_replicas(config.nats.replicas);
    let Some(request_states) =
        streams::ensure_until_done(&nats.js, &retention, config.nats.manage_streams, stop).await?
    else {
        return Ok(());
    };
    let requests = nats
        .js
        .get_stream_no_info(streams::REQUESTS)
        .await
        .context("EV_REQUESTS handle")?;
    state.set_connected(nats.clone(), requests, request_states);
    readiness.set_streams_ready(true);
    tracing::info!("ready: accepting charge requests");

    let grid = state.clone();
    let refusals = state.clone();
    heartbeats::follow(
        nats.clone(),
        stop.clone(),
        move |observed| {
            if !grid.observe_heartbeat(observed) {
                grid.metrics.too_many_substations();
            }
        },
        move |refused| refusals.metrics.heartbeat_refused(refused),
    )
    .await;
    Ok(())
}
