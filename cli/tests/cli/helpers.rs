//! Test doubles around `evgrid load`: a real nats-server with the pipeline's streams, a tiny
//! HTTP ingest stand-in that answers 202 or 500 on demand, and a stand-in grid that answers
//! requests on `ev.requests` with session events and heartbeats as substations would.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use chrono::Utc;
use clap::Parser;
use evgrid::load::LoadArgs;
use evgrid_common::streams;
use evgrid_model::messages::{
    Heartbeat, SessionEvent, SessionEventKind, SessionOutcome, SessionReport,
};
use evgrid_model::validate::parse_charge_request;
use evgrid_model::{headers, subjects};
use evgrid_test_support::NatsServer;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use warp::Filter;
use warp::http::StatusCode;

/// Bound on every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(20);

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    load: LoadArgs,
}

/// `evgrid load` options parsed exactly as the binary parses them (progress bar off).
pub fn args(list: &[&str]) -> LoadArgs {
    Cli::try_parse_from(["load", "--quiet"].iter().chain(list))
        .unwrap_or_else(|e| panic!("{e}"))
        .load
}

/// A nats-server with every stream of the pipeline, and a JetStream context on it.
pub async fn nats_with_streams() -> (NatsServer, jetstream::Context) {
    evgrid_common::telemetry::init_for_tests();
    let server = NatsServer::start().expect("nats-server starts");
    let js = jetstream::new(server.client().await.expect("connects"));
    streams::ensure(&js, &streams::Retention::default())
        .await
        .expect("streams");
    (server, js)
}

/// Messages stored in `stream`.
pub async fn stored(js: &jetstream::Context, stream: &str) -> u64 {
    let mut s = js.get_stream(stream).await.expect("stream exists");
    s.info().await.expect("info").state.messages
}

/// The bodies stored in `EV_REQUESTS`, in stream order.
pub async fn stored_requests(js: &jetstream::Context) -> Vec<serde_json::Value> {
    let stream = js.get_stream(streams::REQUESTS).await.expect("stream");
    let n = stored(js, streams::REQUESTS).await;
    let mut out = Vec::new();
    for seq in 1..=n {
        let msg = stream.get_raw_message(seq).await.expect("stored message");
        out.push(serde_json::from_slice(&msg.payload).expect("JSON"));
    }
    out
}

/// How the HTTP stand-in answers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Behaviour {
    /// Answer 500 to every n-th request (0: never).
    pub fail_every: u64,
    /// Hold every answer this long (a slow ingest).
    pub delay: Duration,
}

/// What the HTTP stand-in saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub requests: AtomicU64,
    pub ids: Mutex<HashSet<String>>,
}

/// A stand-in for ingest's `POST /v1/charge-requests`, checking each body with the API's own
/// validation. Stops when the returned token is cancelled (or dropped with the test).
pub async fn http_stub(behaviour: Behaviour) -> (SocketAddr, Arc<Seen>, CancellationToken) {
    let seen = Arc::new(Seen::default());
    let counter = seen.clone();
    let route = warp::post()
        .and(warp::path!("v1" / "charge-requests"))
        .and(warp::body::bytes())
        .then(move |body: Bytes| {
            let seen = counter.clone();
            async move {
                let n = seen.requests.fetch_add(1, Ordering::SeqCst) + 1;
                if !behaviour.delay.is_zero() {
                    tokio::time::sleep(behaviour.delay).await;
                }
                let request = parse_charge_request(&body, Utc::now()).expect("a valid request");
                let id = request.request_id.expect("load sends an id").to_string();
                seen.ids.lock().unwrap().insert(id.clone());
                if behaviour.fail_every > 0 && n.is_multiple_of(behaviour.fail_every) {
                    return warp::reply::with_status(
                        warp::reply::json(&serde_json::json!({"title": "boom"})),
                        StatusCode::INTERNAL_SERVER_ERROR,
                    );
                }
                warp::reply::with_status(
                    warp::reply::json(&serde_json::json!({"request_id": id, "state": "queued"})),
                    StatusCode::ACCEPTED,
                )
            }
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    tokio::spawn(evgrid_common::http::serve(listener, route, stop.clone()));
    (addr, seen, stop)
}

/// A stand-in grid of two 100 kW substations `a` and `b`: takes each request from
/// `ev.requests` in turn, rejects every `reject_every`-th (0: none) on `ev.rejected`, and
/// otherwise publishes accepted → started → completed events, alternating substations, with a
/// heartbeat of both (load 50 kW) every 10 requests. Every third completion is a car that left
/// at its departure (outcome `departed`), the others are `delivered`. Subscribed before this
/// returns.
pub async fn fake_grid(js: jetstream::Context, reject_every: u64) -> CancellationToken {
    let client = js.client();
    let mut requests = client.subscribe(subjects::REQUESTS).await.expect("sub");
    client.flush().await.expect("flush");
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            let msg = tokio::select! {
                _ = stopped.cancelled() => return,
                msg = requests.next() => match msg { Some(m) => m, None => return },
            };
            n += 1;
            if n % 10 == 1 {
                for s in ["a", "b"] {
                    heartbeat(&js, s, n).await;
                }
            }
            let request = parse_charge_request(&msg.payload, Utc::now()).expect("valid");
            let id = request.request_id.expect("id");
            if reject_every > 0 && n.is_multiple_of(reject_every) {
                let mut h = async_nats::HeaderMap::new();
                h.insert(headers::REQUEST_ID, id.to_string().as_str());
                h.insert(headers::REJECT_REASON, "undeliverable");
                h.insert(headers::REJECT_DETAIL, "test rejection");
                js.publish_with_headers(subjects::REJECTED, h, msg.payload.clone())
                    .await
                    .expect("publish")
                    .await
                    .expect("ack");
                continue;
            }
            let substation = if n.is_multiple_of(2) { "a" } else { "b" };
            let accepted_at = Utc::now();
            for (kind, ms) in [
                (SessionEventKind::Accepted, 2),
                (SessionEventKind::Started, 3),
                (SessionEventKind::Completed, 5),
            ] {
                let departed = n.is_multiple_of(3);
                let event = SessionEvent {
                    event: kind,
                    request_id: id,
                    substation_id: substation.into(),
                    vehicle_id: request.vehicle_id.clone(),
                    at: accepted_at + chrono::Duration::milliseconds(ms),
                    energy_kwh: request.energy_kwh,
                    energy_delivered_kwh: 0.0,
                    accepted_at,
                    dispatched_at: accepted_at + chrono::Duration::milliseconds(1),
                };
                let report = SessionReport {
                    event,
                    outcome: (kind == SessionEventKind::Completed).then_some(if departed {
                        SessionOutcome::Departed
                    } else {
                        SessionOutcome::Delivered
                    }),
                };
                js.publish(
                    subjects::sessions(substation, kind.as_str()),
                    serde_json::to_vec(&report).unwrap().into(),
                )
                .await
                .expect("publish")
                .await
                .expect("ack");
            }
        }
    });
    stop
}

async fn heartbeat(js: &jetstream::Context, substation: &str, seq: u64) {
    let hb = Heartbeat {
        substation_id: substation.into(),
        seq,
        sent_at: Utc::now(),
        capacity_kw: 100.0,
        load_kw: 50.0,
        active_sessions: 1,
        queued_sessions: 0,
        demand_kw: 50.0,
        dispatch_seq: 0,
        interval_ms: 1000,
    };
    js.publish(
        subjects::telemetry(substation),
        serde_json::to_vec(&hb).unwrap().into(),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
}

/// Runs the built `evgrid` binary with `args`; returns exit success, stdout and stderr.
pub async fn evgrid(args: &[&str]) -> (bool, String, String) {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_evgrid"))
        .args(args)
        .env_remove("NATS_URL")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, run)
        .await
        .expect("evgrid finishes in time")
        .expect("evgrid runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// POSTs `body` (JSON text) to the ingest at `api`, requires a 202 and returns the request id.
pub async fn submit(http: &reqwest::Client, api: &str, body: String) -> String {
    let response = http
        .post(format!("{api}/v1/charge-requests"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    response.json::<serde_json::Value>().await.unwrap()["request_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// `GET url` read as JSON; `None` while it cannot be read (yet), for `eventually` loops.
pub async fn get_json(http: &reqwest::Client, url: &str) -> Option<serde_json::Value> {
    http.get(url).send().await.ok()?.json().await.ok()
}
