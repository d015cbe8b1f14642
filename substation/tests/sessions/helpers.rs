//! Test harness: a real nats-server per test, the substation's `run` in-process (exactly the
//! code the binary runs), and the test playing the dispatcher on `ev.dispatch.<id>`.

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use chrono::Utc;
use evgrid_common::config::NatsArgs;
use evgrid_common::streams;
use evgrid_model::charging::Allocation;
use evgrid_model::messages::{Dispatch, Heartbeat, RequestRecord, SessionEvent, Telemetry};
use evgrid_model::{headers, subjects};
use evgrid_substation::Config;
use evgrid_test_support::NatsServer;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Longest wait for any one thing a test expects.
pub const WAIT: Duration = Duration::from_secs(15);

/// A nats-server with the pipeline's streams, and a client playing the other services.
pub struct Grid {
    pub server: NatsServer,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub kv: kv::Store,
}

impl Grid {
    pub async fn start() -> Self {
        evgrid_common::telemetry::init_for_tests();
        let server = NatsServer::start().expect("nats-server starts");
        let client = server.client().await.expect("client connects");
        let js = jetstream::new(client.clone());
        let kv = streams::ensure(&js, &streams::Retention::default())
            .await
            .expect("streams");
        Self {
            server,
            client,
            js,
            kv,
        }
    }

    /// Options of substation `id` on this server: heartbeats every 50 ms, an hour per second.
    pub fn config(&self, id: &str, capacity_kw: f64) -> Config {
        Config {
            nats: NatsArgs::new(self.server.url()),
            id: id.to_owned(),
            capacity_kw,
            time_scale: 3600.0,
            heartbeat_interval: Duration::from_millis(50),
            allocation: Allocation::Fcfs,
            chargers: evgrid_substation::Chargers::Simulated,
            ocpp: evgrid_substation::config::OcppArgs::default(),
        }
    }

    /// Publishes `d` as the dispatcher does; returns its `EV_DISPATCH` sequence.
    pub async fn dispatch(&self, d: &Dispatch) -> u64 {
        self.dispatch_with_id(d, &format!("dispatch-{}", d.request_id))
            .await
    }

    /// Publishes `d` with the given `Nats-Msg-Id` (a new one stores a duplicate).
    pub async fn dispatch_with_id(&self, d: &Dispatch, msg_id: &str) -> u64 {
        try_dispatch(&self.js, d, msg_id)
            .await
            .expect("dispatch stored")
    }

    /// The substation's durable consumer as the server sees it now.
    pub async fn consumer(&self, id: &str) -> consumer::Info {
        let stream = self.js.get_stream(streams::DISPATCH).await.unwrap();
        stream
            .consumer_info(streams::substation_consumer_name(id))
            .await
            .expect("consumer exists")
    }

    /// Waits until every dispatch message of substation `id` is acked.
    pub async fn all_acked(&self, id: &str) -> consumer::Info {
        evgrid_test_support::eventually(WAIT, Duration::from_millis(20), || async {
            let info = self.consumer(id).await;
            (info.num_ack_pending == 0 && info.num_pending == 0).then_some(info)
        })
        .await
        .expect("every dispatch acked")
    }

    pub async fn record(&self, request_id: Uuid) -> RequestRecord {
        self.try_record(request_id)
            .await
            .expect("request state exists")
    }

    /// The request's state, if written yet: as readers see it when a dispatcher's record is
    /// there (a test wrote one), else the session record a substation wrote
    /// (`<request id>.<substation>`; no dispatcher runs in these tests).
    pub async fn try_record(&self, request_id: Uuid) -> Option<RequestRecord> {
        if let Some(record) = streams::read_request(&self.kv, request_id).await.unwrap() {
            return Some(record);
        }
        let prefix = format!("{request_id}.");
        let mut keys = self.kv.keys().await.unwrap();
        while let Some(key) = keys.next().await {
            let key = key.unwrap();
            if key.starts_with(&prefix)
                && let Some(record) = streams::read_record(&self.kv, &key).await.unwrap()
            {
                return Some(record);
            }
        }
        None
    }

    pub async fn subscribe<T: DeserializeOwned>(&self, subject: String) -> Messages<T> {
        let sub = self.client.subscribe(subject).await.unwrap();
        // The subscription is registered at the server before anything is published.
        self.client.flush().await.unwrap();
        Messages {
            sub,
            _t: std::marker::PhantomData,
        }
    }

    pub async fn events(&self, id: &str) -> Messages<SessionEvent> {
        self.subscribe(format!("ev.sessions.{id}.>")).await
    }

    pub async fn heartbeats(&self, id: &str) -> Messages<Heartbeat> {
        self.subscribe(subjects::telemetry(id)).await
    }

    /// Heartbeats with their additions: the projection and the limit in force.
    pub async fn telemetry(&self, id: &str) -> Messages<Telemetry> {
        self.subscribe(subjects::telemetry(id)).await
    }

    /// Publishes a grid operator's limit message (any body) to `ev.limits.<id>`.
    pub async fn limit(&self, id: &str, body: &str) {
        self.js
            .publish(subjects::limits(id), body.to_owned().into())
            .await
            .expect("publish limit")
            .await
            .expect("limit stored");
    }
}

/// JSON messages on a core subscription.
pub struct Messages<T> {
    sub: async_nats::Subscriber,
    _t: std::marker::PhantomData<T>,
}

impl<T: DeserializeOwned> Messages<T> {
    pub async fn next(&mut self) -> T {
        let msg = tokio::time::timeout(WAIT, self.sub.next())
            .await
            .expect("a message within the wait")
            .expect("subscription open");
        serde_json::from_slice(&msg.payload).expect("valid JSON")
    }

    /// The next message for which `f` holds.
    pub async fn until(&mut self, mut f: impl FnMut(&T) -> bool) -> T {
        loop {
            let m = self.next().await;
            if f(&m) {
                return m;
            }
        }
    }
}

/// Publishes `d` to `ev.dispatch.<id>` with headers as the dispatcher sets them.
pub async fn try_dispatch(
    js: &jetstream::Context,
    d: &Dispatch,
    msg_id: &str,
) -> Result<u64, async_nats::Error> {
    let message = jetstream::message::PublishMessage::build()
        .payload(serde_json::to_vec(d)?.into())
        .message_id(msg_id)
        .header(headers::REQUEST_ID, d.request_id.to_string())
        .header(headers::ACCEPTED_AT, d.accepted_at.to_rfc3339());
    let ack = js
        .send_publish(subjects::dispatch(&d.substation_id), message)
        .await?
        .await?;
    Ok(ack.sequence)
}

/// A substation running in this process.
pub struct Running {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub async fn start(config: Config) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(evgrid_substation::run(config, listener, shutdown.clone()));
        Self {
            addr,
            shutdown,
            handle,
        }
    }

    /// A substation with `--chargers ocpp` (`config` says so), its stations' listener bound
    /// here; returns it with the base URL stations connect to (`<url>/ocpp/<station id>`).
    pub async fn start_ocpp(config: Config) -> (Self, String) {
        Self::start_ocpp_at(config, "127.0.0.1:0").await
    }

    /// [`Running::start_ocpp`] with the stations' listener on `ocpp_addr` (a restarted
    /// substation serves where its stations reconnect).
    pub async fn start_ocpp_at(config: Config, ocpp_addr: &str) -> (Self, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ocpp = tokio::net::TcpListener::bind(ocpp_addr).await.unwrap();
        let url = format!("ws://{}", ocpp.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(evgrid_substation::run_with_ocpp(
            config,
            listener,
            Some(ocpp),
            shutdown.clone(),
        ));
        let running = Self {
            addr,
            shutdown,
            handle,
        };
        (running, url)
    }

    /// SIGTERM's path: cancel, and wait for `run` to return.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("stops in time")
            .expect("does not panic")
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("http://{}{path}", self.addr))
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }
}

/// An assignment of a new request to substation `substation_id`.
pub fn dispatch(substation_id: &str, energy_kwh: f64, max_power_kw: f64) -> Dispatch {
    let now = Utc::now();
    Dispatch {
        request_id: Uuid::new_v4(),
        substation_id: substation_id.to_owned(),
        vehicle_id: format!("ev-{}", &Uuid::new_v4().to_string()[..8]),
        energy_kwh,
        energy_expected_kwh: None,
        max_power_kw,
        departure: Some(now + chrono::Duration::hours(8)),
        accepted_at: now,
        dispatched_at: now,
        request_seq: 1,
    }
}

/// The value of the sample `name{substation="<id>"}` on a `/metrics` page.
pub fn sample(page: &str, name: &str, substation: &str) -> Option<f64> {
    let prefix = format!("{name}{{substation=\"{substation}\"}} ");
    page.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}
