//! Starts the real service (`evgrid_ingest::run`) against a real nats-server, and talks to it
//! over real HTTP. Every answer is checked against docs/openapi.yaml on the way.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use evgrid_common::config::NatsArgs;
use evgrid_ingest::auth::{ApiKeys, Rate, Scope, Scopes, new_key, new_secret_line};
use evgrid_test_support::{NatsServer, eventually};
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::openapi;

/// Bound on every wait of a test.
pub const WAIT: Duration = Duration::from_secs(10);

/// A running ingest, stopped when dropped.
pub struct TestApp {
    pub addr: SocketAddr,
    client: reqwest::Client,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Starts ingest against `nats` and waits until it is ready.
pub async fn spawn_app(nats: &NatsServer) -> TestApp {
    let app = spawn_app_at(nats.url()).await;
    app.wait_ready().await;
    app
}

/// Starts ingest against `nats_url` without waiting for NATS.
pub async fn spawn_app_at(nats_url: &str) -> TestApp {
    spawn_app_with(config(nats_url)).await
}

/// The options of a test's ingest: without API keys (`--insecure-no-auth`) unless a test is
/// about them (`auth.rs`), so that the others speak to the API as before.
pub fn config(nats_url: &str) -> evgrid_ingest::Config {
    evgrid_ingest::Config {
        nats: NatsArgs::new(nats_url),
        recent_accepts: 1000,
        http_header_timeout: evgrid_common::http::DEFAULT_HEADER_TIMEOUT,
        http_max_connections: evgrid_common::http::DEFAULT_MAX_CONNECTIONS,
        api_keys: None,
        insecure_no_auth: true,
        api_rate_limit: evgrid_ingest::DEFAULT_API_RATE_LIMIT,
    }
}

/// Starts ingest against `nats` with API keys (name, scopes, rate), as `evgrid api-key` would
/// write them, and waits until it is ready; returns it and each key by name.
pub async fn spawn_app_with_keys(
    nats: &NatsServer,
    keys: &[(&str, &[Scope], Rate)],
) -> (TestApp, HashMap<String, String>) {
    let mut text = format!("{}\n", new_secret_line());
    let mut plain = HashMap::new();
    for (name, scopes, rate) in keys {
        let (key, line) = new_key(name, Scopes::of(scopes), *rate).unwrap();
        text.push_str(&line);
        text.push('\n');
        plain.insert((*name).to_owned(), key);
    }
    let app = spawn_app_with(evgrid_ingest::Config {
        api_keys: Some(Arc::new(ApiKeys::parse(&text).unwrap())),
        insecure_no_auth: false,
        ..config(nats.url())
    })
    .await;
    app.wait_ready().await;
    (app, plain)
}

/// Starts ingest with `config` without waiting for NATS.
pub async fn spawn_app_with(config: evgrid_ingest::Config) -> TestApp {
    evgrid_common::telemetry::init_for_tests();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(evgrid_ingest::run(config, listener, shutdown.clone()));
    TestApp {
        addr,
        client: reqwest::Client::builder().timeout(WAIT).build().unwrap(),
        shutdown,
        handle: Some(handle),
    }
}

/// An answer, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// Asserts a problem document with `status` and `type` ending in `kind`; returns it.
    #[track_caller]
    pub fn problem(&self, status: u16, kind: &str) -> Value {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json")
        );
        let body = self.json();
        assert_eq!(
            body["type"],
            format!("https://evgrid.dev/problems/{kind}"),
            "{body}"
        );
        assert_eq!(body["status"], status);
        body
    }

    /// The request id of a 202, checked against its `Location`.
    #[track_caller]
    pub fn accepted_id(&self) -> String {
        assert_eq!(self.status, 202, "{}", self.text);
        let body = self.json();
        assert_eq!(body["state"], "queued");
        let id = body["request_id"].as_str().unwrap().to_owned();
        assert_eq!(
            self.header("location"),
            Some(format!("/v1/charge-requests/{id}").as_str())
        );
        id
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends `method path` (with `build` adding headers and body) and checks the answer
    /// against the OpenAPI document.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        build: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Reply {
        let response = build(self.client.request(method.clone(), self.url(path)))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let reply = Reply {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            text: response.text().await.unwrap(),
        };
        openapi::check(&method, path, &reply);
        reply
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, |r| r).await
    }

    /// `POST /v1/charge-requests` with a JSON body.
    pub async fn post(&self, body: &Value) -> Reply {
        self.post_with(Some("application/json"), None, body.to_string())
            .await
    }

    /// `POST /v1/charge-requests` with any content type, idempotency key and body.
    pub async fn post_with(
        &self,
        content_type: Option<&str>,
        idempotency_key: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Reply {
        self.send(Method::POST, "/v1/charge-requests", |mut r| {
            if let Some(ct) = content_type {
                r = r.header("content-type", ct);
            }
            if let Some(key) = idempotency_key {
                r = r.header("idempotency-key", key);
            }
            r.body(body)
        })
        .await
    }

    pub async fn metrics(&self) -> String {
        let reply = self.get("/metrics").await;
        assert_eq!(reply.status, 200);
        reply.text
    }

    /// Waits until `/readyz` answers `status`.
    pub async fn wait_readyz(&self, status: u16) {
        eventually(WAIT, Duration::from_millis(20), || async {
            (self.get("/readyz").await.status == status).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("/readyz never answered {status}: {e}"));
    }

    pub async fn wait_ready(&self) {
        self.wait_readyz(200).await;
    }

    /// Cancels the shutdown token, as SIGTERM would.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Shuts down and returns what `run` returned (bounded wait).
    pub async fn stopped(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(WAIT, handle)
            .await
            .expect("run returns promptly after shutdown")
            .expect("run did not panic")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn jetstream(nats: &NatsServer) -> jetstream::Context {
    jetstream::new(nats.client().await.unwrap())
}

/// How many messages `EV_REQUESTS` holds.
pub async fn stored_requests(js: &jetstream::Context) -> u64 {
    let mut stream = js.get_stream("EV_REQUESTS").await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// A request that passes every rule.
pub fn valid_request() -> Value {
    json!({"vehicle_id": "ev-1", "energy_kwh": 30, "max_power_kw": 11})
}

/// The value of the sample `name{labels}` on a metrics page (0 when absent).
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// The start of a raw `POST /v1/charge-requests` (headers still open), for what reqwest does
/// not send: chunked bodies, bodies that arrive late.
pub const RAW_POST: &str = "POST /v1/charge-requests HTTP/1.1\r\nHost: ingest\r\n\
                            Content-Type: application/json\r\n";

/// Connects to `addr` and writes `bytes`.
pub async fn raw_send(addr: SocketAddr, bytes: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes.as_bytes()).await.unwrap();
    tcp
}

/// Reads the raw answer until the server closes the connection (bounded).
pub async fn raw_answer(tcp: &mut TcpStream) -> String {
    let mut answer = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut answer))
        .await
        .expect("answered in time")
        .unwrap();
    answer
}
