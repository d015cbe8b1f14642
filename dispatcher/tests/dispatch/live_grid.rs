//! The dispatcher with real substations: `evgrid_substation::run` for each, exactly as the
//! binaries run, heartbeating every second on the test's nats-server. Requests are published
//! raw to `ev.requests`, as `nats pub` would.

use std::collections::{BTreeMap, HashSet};

use futures::{FutureExt, StreamExt};
use std::time::Duration;

use evgrid_common::config::NatsArgs;
use evgrid_dispatcher::Policy;
use evgrid_model::charging::Allocation;
use evgrid_test_support::NatsServer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{WAIT, next_dispatch, spawn_app_with, start_dispatcher_with};

/// A substation process, in this process.
struct Substation {
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Substation {
    async fn start(nats: &NatsServer, id: &str, capacity_kw: f64) -> Self {
        let config = evgrid_substation::Config {
            nats: NatsArgs::new(nats.url()),
            id: id.to_owned(),
            capacity_kw,
            // An hour of charging per second: each car of the burst is done within a second.
            time_scale: 3600.0,
            heartbeat_interval: Duration::from_secs(1),
            allocation: Allocation::default(),
            chargers: evgrid_substation::Chargers::Simulated,
            ocpp: evgrid_substation::config::OcppArgs::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(evgrid_substation::run(config, listener, shutdown.clone()));
        Self { shutdown, handle }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("substation stops in time")
            .expect("no panic")
            .expect("substation returns Ok");
    }
}

#[tokio::test]
async fn headroom_spreads_a_burst_over_real_substations_by_capacity() {
    const REQUESTS: usize = 300;
    let capacities = [("s1", 300.0), ("s2", 600.0), ("s3", 900.0)];
    let mut app = spawn_app_with(Policy::Headroom).await;
    let mut substations = Vec::new();
    for (id, capacity_kw) in capacities {
        substations.push(Substation::start(&app.nats, id, capacity_kw).await);
    }
    app.wait_for_metric("evgrid_substations_up 3").await;
    let mut dispatches = app.subscribe("ev.dispatch.>").await;

    // 300 cars of 11 kW at once: 3,300 kW against 1,800. Each substation takes cars while its
    // estimated headroom (last heartbeat + assignments counted since) is above zero:
    // ceil(capacity / 11) of them, 165 in all. The cars need 200 kWh (18 simulated hours, 18
    // real seconds), so none finishes during the test and the other 135 wait in the stream.
    let bodies = (0..REQUESTS).map(|n| {
        format!(
            r#"{{"request_id":"{}","vehicle_id":"depot-{n}","energy_kwh":200,"max_power_kw":11}}"#,
            Uuid::new_v4()
        )
    });
    app.publish_requests(bodies).await;
    let fits: usize = capacities
        .iter()
        .map(|c| (c.1 / 11.0_f64).ceil() as usize)
        .sum();

    let mut seen = HashSet::new();
    let mut per_substation: BTreeMap<String, usize> = BTreeMap::new();
    while seen.len() < fits {
        let got = next_dispatch(&mut dispatches).await;
        assert!(seen.insert(got.dispatch.request_id), "dispatched twice");
        *per_substation
            .entry(got.dispatch.substation_id)
            .or_default() += 1;
    }
    let total_kw: f64 = capacities.iter().map(|c| c.1).sum();
    for (id, capacity_kw) in capacities {
        let fair = fits as f64 * capacity_kw / total_kw;
        let got = per_substation.get(id).copied().unwrap_or(0) as f64;
        assert!(
            got <= 1.2 * fair,
            "{id} got {got} of {fits}, fair share {fair:.0}: {per_substation:?}"
        );
    }
    // Two more heartbeats of every substation (each saying it is full): nothing more is sent,
    // the excess waits in the stream, un-acked.
    let mut heartbeats = app.subscribe("ev.telemetry.*").await;
    for _ in 0..2 * capacities.len() {
        tokio::time::timeout(WAIT, heartbeats.next())
            .await
            .expect("heartbeats go on");
    }
    assert!(
        dispatches.next().now_or_never().is_none(),
        "dispatched beyond the capacity"
    );
    assert_eq!(app.dispatch_stream_messages().await, fits as u64);
    let waiting = app.dispatcher_consumer().await;
    assert_eq!(
        waiting.num_pending + waiting.num_ack_pending as u64,
        (REQUESTS - fits) as u64
    );
    for s in substations {
        s.stop().await;
    }
    app.stop().await;
}

#[tokio::test]
async fn every_policy_routes_the_live_grid() {
    let mut app = spawn_app_with(Policy::RoundRobin).await;
    let substations = [
        Substation::start(&app.nats, "a", 100.0).await,
        Substation::start(&app.nats, "b", 200.0).await,
    ];
    app.wait_for_metric("evgrid_substations_up 2").await;
    app.stop().await;
    let mut dispatches = app.subscribe("ev.dispatch.>").await;
    let departure = (chrono::Utc::now() + chrono::Duration::hours(8)).to_rfc3339();
    // One dispatcher at a time on the shared durable consumer, each with its policy.
    for policy in Policy::ALL {
        let (_, shutdown, handle) = start_dispatcher_with(&app.nats, policy).await;
        let bodies = (0..6).map(|n| {
            format!(
                r#"{{"vehicle_id":"{}-{n}","energy_kwh":1,"max_power_kw":11,"departure":"{departure}"}}"#,
                policy.as_str()
            )
        });
        app.publish_requests(bodies).await;
        let mut got = BTreeMap::<String, usize>::new();
        for _ in 0..6 {
            let d = next_dispatch(&mut dispatches).await;
            assert!(d.dispatch.vehicle_id.starts_with(policy.as_str()));
            *got.entry(d.dispatch.substation_id).or_default() += 1;
        }
        if policy == Policy::RoundRobin {
            assert_eq!(got.values().copied().collect::<Vec<_>>(), [3, 3]);
        }
        app.wait_until_all_settled().await;
        shutdown.cancel();
        tokio::time::timeout(WAIT, handle)
            .await
            .expect("dispatcher stops in time")
            .expect("no panic")
            .expect("dispatcher returns Ok");
    }
    for s in substations {
        s.stop().await;
    }
}
