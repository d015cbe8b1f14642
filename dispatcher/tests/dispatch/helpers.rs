//! The dispatcher as it runs in production, on its own nats-server, plus the test's peers: a
//! publisher of requests and substations that heartbeat and watch `ev.dispatch.>`.

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use async_nats::{Client, HeaderMap, Subscriber};
use chrono::Utc;
use evgrid_common::streams;
use evgrid_dispatcher::{Config, Policy};
use evgrid_model::messages::{Dispatch, Heartbeat};
use evgrid_model::subjects;
use evgrid_test_support::{NatsServer, eventually};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a test waits for anything to happen.
pub const WAIT: Duration = Duration::from_secs(10);
/// Tests defer briefly so waiting requests come back quickly.
pub const TEST_DEFER_DELAY: Duration = Duration::from_millis(100);

/// A running dispatcher on a fresh nats-server.
pub struct TestApp {
    pub nats: NatsServer,
    pub client: Client,
    pub js: jetstream::Context,
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Starts a nats-server and a dispatcher on it (default policy), and waits until it is ready.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(Policy::default()).await
}

/// [`spawn_app`] with a routing policy.
pub async fn spawn_app_with(policy: Policy) -> TestApp {
    spawn_app_configured(|config| config.policy = policy).await
}

/// [`spawn_app`] with the test defaults changed by `configure`.
pub async fn spawn_app_configured(configure: impl FnOnce(&mut Config)) -> TestApp {
    evgrid_common::telemetry::init_for_tests();
    let nats = NatsServer::start().expect("nats-server starts");
    let client = nats.client().await.expect("test client connects");
    let js = jetstream::new(client.clone());
    let (addr, shutdown, handle) = start_dispatcher_configured(&nats, configure).await;
    let app = TestApp {
        nats,
        client,
        js,
        addr,
        shutdown,
        handle: Some(handle),
    };
    app.wait_ready().await;
    app
}

/// One more dispatcher on the same server (a second instance, or a restart).
pub async fn start_dispatcher(
    nats: &NatsServer,
) -> (
    SocketAddr,
    CancellationToken,
    JoinHandle<anyhow::Result<()>>,
) {
    start_dispatcher_with(nats, Policy::default()).await
}

/// [`start_dispatcher`] with a routing policy.
pub async fn start_dispatcher_with(
    nats: &NatsServer,
    policy: Policy,
) -> (
    SocketAddr,
    CancellationToken,
    JoinHandle<anyhow::Result<()>>,
) {
    start_dispatcher_configured(nats, |config| config.policy = policy).await
}

/// [`start_dispatcher`] with the test defaults changed by `configure`.
pub async fn start_dispatcher_configured(
    nats: &NatsServer,
    configure: impl FnOnce(&mut Config),
) -> (
    SocketAddr,
    CancellationToken,
    JoinHandle<anyhow::Result<()>>,
) {
    let mut config = Config::new(nats.url());
    config.defer_delay = TEST_DEFER_DELAY;
    configure(&mut config);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("bound address");
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(evgrid_dispatcher::run(config, listener, shutdown.clone()));
    (addr, shutdown, handle)
}

impl TestApp {
    pub async fn wait_ready(&self) {
        let addr = self.addr;
        eventually(WAIT, Duration::from_millis(20), || async move {
            (http_get(addr, "/readyz").await.0 == 200).then_some(())
        })
        .await
        .expect("dispatcher becomes ready");
    }

    /// Stops the dispatcher and asserts it returned `Ok` in time.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        let handle = self.handle.take().expect("running");
        let result = tokio::time::timeout(WAIT, handle)
            .await
            .expect("dispatcher stops in time")
            .expect("dispatcher task does not panic");
        result.expect("dispatcher returns Ok on shutdown");
    }

    /// Publishes a request body to `ev.requests` (as `nats pub` would), returning its stream
    /// sequence.
    pub async fn publish_request(&self, body: impl Into<bytes::Bytes>) -> u64 {
        self.js
            .publish(subjects::REQUESTS, body.into())
            .await
            .expect("publish")
            .await
            .expect("stored")
            .sequence
    }

    /// Publishes many request bodies at once (acks awaited together), in order.
    pub async fn publish_requests(&self, bodies: impl IntoIterator<Item = String>) {
        let mut acks = Vec::new();
        for body in bodies {
            let ack = self
                .js
                .publish(subjects::REQUESTS, body.into())
                .await
                .expect("publish");
            acks.push(ack);
        }
        for ack in acks {
            ack.await.expect("stored");
        }
    }

    /// A substation peer heartbeating on this server.
    pub fn substation(&self, id: &str, capacity_kw: f64) -> Substation {
        Substation {
            js: self.js.clone(),
            id: id.to_owned(),
            capacity_kw,
            interval_ms: 60_000,
            seq: 0,
        }
    }

    /// Subscribes (core NATS) and makes sure the server knows before returning.
    pub async fn subscribe(&self, subject: &str) -> Subscriber {
        let sub = self
            .client
            .subscribe(subject.to_owned())
            .await
            .expect("subscribe");
        self.client.flush().await.expect("flush");
        sub
    }

    pub async fn metrics(&self) -> String {
        http_get(self.addr, "/metrics").await.1
    }

    /// Waits until `/metrics` shows `line` (gauges and counters move after the event itself).
    pub async fn wait_for_metric(&self, line: &str) {
        let addr = self.addr;
        let found = eventually(WAIT, Duration::from_millis(50), || async move {
            http_get(addr, "/metrics")
                .await
                .1
                .lines()
                .any(|l| l == line)
                .then_some(())
        })
        .await;
        assert!(
            found.is_ok(),
            "metric line {line:?} never appeared:\n{}",
            self.metrics().await
        );
    }

    /// Waits until the dispatcher has settled every request message for good (acked or
    /// terminated, none waiting).
    pub async fn wait_until_all_settled(&self) {
        let js = self.js.clone();
        eventually(WAIT, Duration::from_millis(50), || {
            let js = js.clone();
            async move {
                let info = dispatcher_consumer(&js).await.ok()?;
                (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
            }
        })
        .await
        .expect("every request settled");
    }

    /// The dispatcher's durable consumer as the server sees it now.
    pub async fn dispatcher_consumer(&self) -> consumer::Info {
        dispatcher_consumer(&self.js)
            .await
            .expect("dispatcher consumer")
    }

    pub async fn dispatch_stream_messages(&self) -> u64 {
        self.js
            .get_stream(streams::DISPATCH)
            .await
            .expect("EV_DISPATCH")
            .info()
            .await
            .expect("info")
            .state
            .messages
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A test substation: publishes heartbeats like a real one (JetStream, `ev.telemetry.<id>`).
pub struct Substation {
    js: jetstream::Context,
    pub id: String,
    pub capacity_kw: f64,
    /// The interval its heartbeats announce: a minute unless a test makes it go stale sooner.
    pub interval_ms: u64,
    seq: u64,
}

impl Substation {
    /// Heartbeats with `load_kw` drawn, having taken every dispatch up to `dispatch_seq`. With
    /// the default interval (a minute) it stays up for the whole test without heartbeating
    /// again.
    pub async fn heartbeat(&mut self, load_kw: f64, dispatch_seq: u64) {
        self.seq += 1;
        let hb = Heartbeat {
            substation_id: self.id.clone(),
            seq: self.seq,
            sent_at: Utc::now(),
            capacity_kw: self.capacity_kw,
            load_kw,
            active_sessions: 0,
            queued_sessions: 0,
            demand_kw: load_kw,
            dispatch_seq,
            interval_ms: self.interval_ms,
        };
        self.js
            .publish(
                subjects::telemetry(&self.id),
                serde_json::to_vec(&hb).unwrap().into(),
            )
            .await
            .expect("publish heartbeat")
            .await
            .expect("heartbeat stored");
    }
}

/// A dispatch as a substation receives it.
#[derive(Debug)]
pub struct Received {
    pub subject: String,
    pub headers: HeaderMap,
    pub dispatch: Dispatch,
}

/// The next message on a `ev.dispatch.>` subscription, within [`WAIT`].
pub async fn next_dispatch(sub: &mut Subscriber) -> Received {
    let msg = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("a dispatch arrives in time")
        .expect("subscription open");
    Received {
        subject: msg.subject.to_string(),
        headers: msg.headers.clone().unwrap_or_default(),
        dispatch: serde_json::from_slice(&msg.payload).expect("a Dispatch"),
    }
}

pub fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|v| v.as_str().to_owned())
}

/// `GET path` on the ops endpoint: status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub async fn dispatcher_consumer(
    js: &jetstream::Context,
) -> Result<consumer::Info, async_nats::Error> {
    Ok(js
        .get_stream_no_info(streams::REQUESTS)
        .await?
        .consumer_info(streams::DISPATCHER_CONSUMER)
        .await?)
}
