//! The operations endpoints every service serves (`/metrics`, `/healthz`, `/readyz`) and the
//! one way a service runs its HTTP server: on a listener bound by the caller, until shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

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
    /// Until when a write refused for a full store keeps the service unready.
    store_full_until: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How long one write refused for a full store keeps `/readyz` at 503: long enough for a load
/// balancer to notice, short enough that the service is tried again once room is made.
pub const STORE_FULL_UNREADY: Duration = Duration::from_secs(30);

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

    /// Records that NATS refused a write because its store (or a stream) is full: the
    /// service is unready for [`STORE_FULL_UNREADY`].
    pub fn set_store_full(&self) {
        *self
            .0
            .store_full_until
            .lock()
            .unwrap_or_else(|e| e.into_inner()) =
            Some(std::time::Instant::now() + STORE_FULL_UNREADY);
    }

    /// Whether a write was refused for a full store within the last [`STORE_FULL_UNREADY`].
    pub fn store_full(&self) -> bool {
        self.0
            .store_full_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|until| std::time::Instant::now() < until)
    }

    pub fn is_ready(&self) -> bool {
        self.nats_connected() && self.0.streams.load(Ordering::Acquire) && !self.store_full()
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
            "store": if readiness.store_full() { "full" } else { "ok" },
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

/// Bounds of an HTTP server against clients that hold connections open (slowloris).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A client must send a request's whole header within this, or the connection is closed.
    pub header_timeout: Duration,
    /// Connections open at once; more wait in the listen backlog until one closes. Below the
    /// process's file descriptor limit, so the server never runs out of them.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Default [`Limits::header_timeout`]: a real client sends its header in milliseconds.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`Limits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Serves `routes` on `listener` with the default [`Limits`] until `shutdown` fires, then lets
/// in-flight requests finish.
///
/// The error type is fixed to [`warp::Rejection`] because the bound warp itself needs
/// (`IsReject`) is private: any filter chain, and a `.recover(…)` returning
/// `Result<_, Rejection>`, fits.
pub async fn serve<F>(listener: TcpListener, routes: F, shutdown: CancellationToken)
where
    F: Filter<Error = warp::Rejection> + Clone + Send + Sync + 'static,
    F::Extract: Reply,
{
    serve_with(listener, routes, shutdown, Limits::default()).await;
}

/// Accepts connections at most `max` at once: a connection holds its slot (the permit) until
/// it is dropped, and beyond the limit new ones wait in the listen backlog. Shared by the HTTP
/// servers and the substations' OCPP endpoint.
#[derive(Debug)]
pub struct Acceptor {
    slots: Arc<tokio::sync::Semaphore>,
}

impl Acceptor {
    pub fn new(max: usize) -> Self {
        Self {
            slots: Arc::new(tokio::sync::Semaphore::new(max.max(1))),
        }
    }

    /// The next connection on `listener`, with its slot; `None` once `shutdown` fires.
    pub async fn accept(
        &self,
        listener: &TcpListener,
        shutdown: &CancellationToken,
    ) -> Option<(tokio::net::TcpStream, tokio::sync::OwnedSemaphorePermit)> {
        // A free slot before accepting: beyond the limit, connections wait in the backlog.
        let slot = tokio::select! {
            slot = self.slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            _ = shutdown.cancelled() => return None,
        };
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => return Some((stream, slot)),
                    Err(error) => {
                        // Out of descriptors, say: wait a moment rather than spin.
                        tracing::warn!(%error, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = shutdown.cancelled() => return None,
            }
        }
    }
}

/// [`serve`] within `limits`. warp's own loop sets neither bound: 3,000 half-sent request heads
/// stayed open for ever, and at a 256-descriptor limit `/healthz` stopped answering (issue #11).
pub async fn serve_with<F>(
    listener: TcpListener,
    routes: F,
    shutdown: CancellationToken,
    limits: Limits,
) where
    F: Filter<Error = warp::Rejection> + Clone + Send + Sync + 'static,
    F::Extract: Reply,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let acceptor = Acceptor::new(limits.max_connections);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    while let Some((stream, slot)) = acceptor.accept(&listener, &shutdown).await {
        let service = hyper_util::service::TowerToHyperService::new(warp::service(routes.clone()));
        let connection = graceful.watch(
            builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned(),
        );
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// A GET of `/` on `addr`, answered within `within`: its status line.
    async fn get(addr: SocketAddr, within: Duration) -> String {
        tokio::time::timeout(within, async {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer.lines().next().unwrap_or_default().to_owned()
        })
        .await
        .expect("answered in time")
    }

    #[tokio::test]
    async fn half_sent_headers_are_cut_off_and_their_slots_serve_others() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let limits = Limits {
            header_timeout: Duration::from_millis(300),
            max_connections: 3,
        };
        let routes = warp::path::end().map(|| "ok");
        let server = tokio::spawn(serve_with(listener, routes, stop.clone(), limits));

        // Every slot taken by a request head that never ends.
        let mut slow = Vec::new();
        for _ in 0..3 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n")
                .await
                .unwrap();
            slow.push(stream);
        }
        // A real client waits for a slot, and gets one when the heads time out.
        assert_eq!(get(addr, Duration::from_secs(5)).await, "HTTP/1.1 200 OK");
        for mut stream in slow {
            let mut rest = Vec::new();
            let closed =
                tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
                    .await
                    .expect("the server closes a half-sent head within 5 s");
            assert!(closed.is_ok() || closed.is_err(), "closed: {closed:?}");
        }

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("stops within 5 s")
            .unwrap();
    }
}
