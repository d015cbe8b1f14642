//! Putting a benchmark's world in place: the streams, a backlog of stored charge requests (as
//! ingest would have stored them, at the front of ingest → dispatcher → substation), stand-in
//! substation heartbeats, and whole pipelines of separate processes — evgrid's own, or one
//! built from the references.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use evgrid_common::{nats, streams};
use evgrid_model::messages::Heartbeat;
use evgrid_model::{headers, subjects};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::procs::{Nats, Proc};

/// Acks awaited at once while preloading.
const PRELOAD_IN_FLIGHT: usize = 1024;

/// A connection for the benchmark itself (not measured).
pub async fn connect(url: &str) -> Result<nats::Nats> {
    let token = CancellationToken::new();
    let auth = evgrid_common::config::NatsAuth::default();
    let connecting = nats::connect(url, &auth, "evgrid-bench", &token);
    match tokio::time::timeout(Duration::from_secs(10), connecting).await {
        Ok(result) => Ok(result?),
        Err(_) => bail!("cannot reach NATS at {url}"),
    }
}

/// Creates the pipeline's streams, as every service does at start.
pub async fn ensure_streams(url: &str) -> Result<nats::Nats> {
    let nats = connect(url).await?;
    streams::ensure(&nats.js, &streams::Retention::default()).await?;
    Ok(nats)
}

/// The body of stored request `i`: the default `evgrid load` mix (10–60 kWh at 11 kW).
fn body(i: u64, id: Uuid) -> Bytes {
    let energy = 10.0 + (i.wrapping_mul(7919) % 5000) as f64 / 100.0;
    format!(r#"{{"request_id":"{id}","vehicle_id":"bench-{i}","energy_kwh":{energy},"max_power_kw":11}}"#)
        .into()
}

/// Stores `n` charge requests in `EV_REQUESTS` exactly as ingest does (message id and headers),
/// pipelined.
pub async fn preload(client: &async_nats::Client, n: u64) -> Result<()> {
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .max_ack_inflight(PRELOAD_IN_FLIGHT * 2)
        .build(client.clone());
    let mut acks = FuturesUnordered::new();
    for i in 0..n {
        if acks.len() >= PRELOAD_IN_FLIGHT {
            acks.next().await.expect("non-empty")?;
        }
        let id = Uuid::new_v4();
        let text = id.to_string();
        let message = PublishMessage::build()
            .payload(body(i, id))
            .message_id(&text)
            .header(headers::REQUEST_ID, text)
            .header(
                headers::ACCEPTED_AT,
                Utc::now().to_rfc3339_opts(SecondsFormat::Nanos, true),
            );
        let ack = js.send_publish(subjects::REQUESTS, message).await?;
        acks.push(ack.into_future());
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    Ok(())
}

/// Heartbeats for `ids` every second, as substations with (practically) unlimited capacity that
/// take every dispatch at once would send: the dispatcher routes, and nothing consumes its
/// dispatches. Runs until `stop`.
pub async fn stand_in_heartbeats(
    js: jetstream::Context,
    ids: Vec<String>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut seq = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        seq += 1;
        // Echo every dispatch so far, so the dispatcher's pending assignments stay few.
        let dispatch_seq = match js.get_stream(streams::DISPATCH).await {
            Ok(mut s) => s.info().await.map_or(0, |i| i.state.last_sequence),
            Err(_) => 0,
        };
        for id in &ids {
            let heartbeat = Heartbeat {
                substation_id: id.clone(),
                seq,
                sent_at: Utc::now(),
                // The most a heartbeat may state: effectively unlimited here.
                capacity_kw: evgrid_model::messages::CAPACITY_KW_MAX,
                load_kw: 0.0,
                active_sessions: 0,
                queued_sessions: 0,
                demand_kw: 0.0,
                dispatch_seq,
                interval_ms: 1000,
            };
            let payload = serde_json::to_vec(&heartbeat).expect("a heartbeat serializes");
            if let Err(e) = js.publish(subjects::telemetry(id), payload.into()).await {
                tracing::warn!(error = %e, "stand-in heartbeat not sent");
            }
        }
    }
}

/// Waits (bounded) until `EV_TELEMETRY` holds a heartbeat of each of `n` substations, so a
/// dispatcher starting now sees the whole grid at once.
pub async fn await_heartbeats(js: &jetstream::Context, n: usize) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let seen = match js.get_stream(streams::TELEMETRY).await {
            Ok(mut s) => s
                .info()
                .await
                .map_or(0, |i| i.state.subjects_count as usize),
            Err(_) => 0,
        };
        if seen >= n {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("only {seen} of {n} substations heartbeated within 20 s");
        }
        // Heartbeats are stored in a stream: asking is the only way to know.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Which front and router a pipeline runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// evgrid-ingest and evgrid-dispatcher.
    Evgrid,
    /// The minimal handler (with the contract's message id and headers) and the forwarder.
    Reference,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Evgrid => "evgrid (ingest + dispatcher)",
            Kind::Reference => "reference (minimal handler + forwarder)",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Kind::Evgrid => "evgrid",
            Kind::Reference => "reference",
        }
    }
}

/// How the substations of a pipeline run.
#[derive(Debug, Clone)]
pub struct Grid {
    pub capacities_kw: Vec<f64>,
    pub time_scale: f64,
}

impl Grid {
    pub fn ids(&self) -> Vec<String> {
        (1..=self.capacities_kw.len())
            .map(|i| format!("s{i}"))
            .collect()
    }
}

/// A whole pipeline on a fresh nats-server: substations, a router (or several evgrid
/// dispatchers sharing the work), a front door, each a separate process.
pub struct Pipeline {
    pub nats: Nats,
    pub front: Proc,
    pub routers: Vec<Proc>,
    pub substations: Vec<Proc>,
}

impl Pipeline {
    pub async fn start(kind: Kind, grid: &Grid, logs: &Path) -> Result<Self> {
        Self::start_with(kind, grid, 1, logs).await
    }

    /// [`Pipeline::start`] with `dispatchers` replicas of evgrid-dispatcher (the reference
    /// pipeline has one forwarder whatever this says).
    pub async fn start_with(
        kind: Kind,
        grid: &Grid,
        dispatchers: usize,
        logs: &Path,
    ) -> Result<Self> {
        let nats = Nats::start()?;
        let url = nats.url().to_owned();
        let nats_arg = || vec!["--nats-url".to_owned(), url.clone()];
        let mut substations = Vec::new();
        for (id, capacity) in grid.ids().into_iter().zip(&grid.capacities_kw) {
            let mut words = nats_arg();
            words.extend([
                "--id".into(),
                id.clone(),
                "--capacity-kw".into(),
                capacity.to_string(),
                "--time-scale".into(),
                grid.time_scale.to_string(),
            ]);
            substations.push(Proc::service(&id, "evgrid-substation", words, logs).await?);
        }
        let own = connect(&url).await?;
        await_heartbeats(&own.js, substations.len()).await?;
        let this = std::env::current_exe()?;
        let (routers, front) = match kind {
            Kind::Evgrid => {
                let mut routers = Vec::new();
                let n = dispatchers.max(1);
                for i in 1..=n {
                    // One keeps the plain name the other benchmarks' tables show.
                    let name = if n == 1 {
                        "dispatcher".to_owned()
                    } else {
                        format!("dispatcher-{i}")
                    };
                    routers
                        .push(Proc::service(&name, "evgrid-dispatcher", nats_arg(), logs).await?);
                }
                // Without API keys, as the reference has none: the benchmarks compare the
                // pipelines; what keys cost is `evgrid-bench ingest --api-key`'s ratio.
                let mut words = nats_arg();
                words.push("--insecure-no-auth".to_owned());
                (
                    routers,
                    Proc::service("ingest", "evgrid-ingest", words, logs).await?,
                )
            }
            Kind::Reference => {
                let mut forward = vec!["forwarder".to_owned()];
                forward.extend(nats_arg());
                forward.extend(["--substations".into(), grid.ids().join(",")]);
                let mut minimal = vec!["minimal-ingest".to_owned(), "--headers".into()];
                minimal.extend(nats_arg());
                (
                    vec![Proc::spawn("forwarder", &this, &forward, logs)?],
                    Proc::spawn_http("minimal", &this, minimal, "/readyz", logs).await?,
                )
            }
        };
        Ok(Self {
            nats,
            front,
            routers,
            substations,
        })
    }

    /// The front door's base URL, for `evgrid load --url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.front.http.expect("the front serves HTTP"))
    }

    /// Every process of the pipeline, front first.
    pub fn procs(&mut self) -> impl Iterator<Item = &mut Proc> {
        std::iter::once(&mut self.front)
            .chain(self.routers.iter_mut())
            .chain(self.substations.iter_mut())
    }

    /// Fails when a process died during the run (its figures would be meaningless).
    pub fn check_alive(&mut self) -> Result<()> {
        for p in self.procs() {
            p.check_alive()
                .with_context(|| format!("{} died during the benchmark", p.name))?;
        }
        Ok(())
    }
}
