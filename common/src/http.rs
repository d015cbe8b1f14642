//! The operations endpoints every service serves (`/metrics`, `/healthz`, `/readyz`) and the
//! one way a service runs its HTTP server: on a listener bound by the caller, until shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warp::Filter;
use warp::http::StatusCode;
use warp::reply::Reply;

use crate::nats::Nats;

/// Ready = connected to NATS with the streams in place. Shared between the service's work and
/// its `/readyz`.
#[derive(Clone, Default, Debug)]
pub struct Readiness(Arc<ReadinessInner>);

#[derive(Default, Debug)]
struct ReadinessInner {
    nats: OnceLock<Nats>,
    streams: AtomicBool,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the connection once it is first established.
    pub fn set_nats(&self, nats: Nats) {
        let _ = self.0.nats.set(nats);
    }

    /// Records that every stream the service needs exists.
    pub fn set_streams_ready(&self, ready: bool) {
        self.0.streams.store(ready, Ordering::Release);
    }

    pub fn nats_connected(&self) -> bool {
        self.0.nats.get().is_some_and(Nats::is_connected)
    }

    pub fn is_ready(&self) -> bool {
        self.nats_connected() && self.0.streams.load(Ordering::Acquire)
    }
}

/// `GET /metrics`, `GET /healthz`, `GET /readyz`.
pub fn ops_routes(
    registry: Registry,
    readiness: Readiness,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection>
+ Clone
+ Send
+ Sync
+ 'static {
    let metrics = warp::path!("metrics").and(warp::get()).map(move || {
        warp::reply::with_header(
            crate::metrics::encode(&registry),
            "content-type",
            "text/plain; version=0.0.4; charset=utf-8",
        )
        .into_response()
    });
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::json(&serde_json::json!({"status": "alive"})).into_response());
    let readyz = warp::path!("readyz").and(warp::get()).map(move || {
        let ready = readiness.is_ready();
        let body = serde_json::json!({
            "ready": ready,
            "nats": if readiness.nats_connected() { "connected" } else { "disconnected" },
            "streams": readiness.0.streams.load(Ordering::Acquire),
        });
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        warp::reply::with_status(warp::reply::json(&body), status).into_response()
    });
    metrics.or(healthz).unify().or(readyz).unify()
}

/// Binds `addr`, reporting the error with the address in it.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}

/// Serves `routes` on `listener` until `shutdown` fires, then lets in-flight requests finish.
///
/// The error type is fixed to [`warp::Rejection`] because the bound warp itself needs
/// (`IsReject`) is private: any filter chain, and a `.recover(…)` returning
/// `Result<_, Rejection>`, fits.
pub async fn serve<F>(listener: TcpListener, routes: F, shutdown: CancellationToken)
where
    F: Filter<Error = warp::Rejection> + Clone + Send + Sync + 'static,
    F::Extract: Reply,
{
    warp::serve(routes)
        .incoming(listener)
        .graceful(async move { shutdown.cancelled().await })
        .run()
        .await;
}
