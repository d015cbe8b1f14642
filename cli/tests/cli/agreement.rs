//! The simulator and the live grid agree (#13): one day of real ACN sessions, time-scaled,
//! through `evgrid sim` and through the live pipeline (`evgrid load --trace` into ingest →
//! dispatcher → substations), with the same substations, heartbeat staleness and deferral in
//! simulated time. What differs is only what the simulator cannot copy: the live grid's timing
//! (tokio timers, messages in flight) on a clock running thousands of times faster than a real
//! one. docs/dispatch.md quotes the figures.

use std::io::Write as _;
use std::path::Path;

use chrono::{DateTime, Utc};
use evgrid_sim::trace::{self, ARRIVAL, DEPARTURE, REQUESTED_ENERGY};
use tokio_util::sync::CancellationToken;

use crate::helpers::{WAIT, args, evgrid};
use crate::pipeline::{Options, Pipeline};

/// Simulated seconds per wall-clock second: the day runs in 12 s.
const SPEED: f64 = 7200.0;
/// Three small substations: the day's peak (33 cars at once, 218 kW) does not fit, so the
/// allocation decides who gets what.
const CAPACITIES: [f64; 3] = [15.0, 15.0, 15.0];

/// The sessions that arrived on Wednesday 1 May 2019 (Pacific time) at Caltech, written as an
/// ACN CSV file.
fn one_day(dir: &Path) -> std::path::PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let sessions = trace::read(repo.join("data/acn-caltech/2019-05_2019-08.csv.gz")).unwrap();
    let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
    let (from, until) = (at("2019-05-01T07:00:00Z"), at("2019-05-02T07:00:00Z"));
    let path = dir.join("2019-05-01.csv");
    let mut out = std::fs::File::create(&path).unwrap();
    writeln!(out, "{ARRIVAL},{DEPARTURE},{REQUESTED_ENERGY}").unwrap();
    let mut n = 0;
    for s in sessions
        .iter()
        .filter(|s| s.arrival >= from && s.arrival < until)
    {
        writeln!(
            out,
            "{},{},{}",
            s.arrival.to_rfc3339(),
            s.departure.to_rfc3339(),
            s.energy_kwh
        )
        .unwrap();
        n += 1;
    }
    assert_eq!(n, 38, "the day's sessions");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_and_the_live_grid_serve_a_real_day_alike() {
    let dir = tempfile::tempdir().unwrap();
    let day = one_day(dir.path());
    let day = day.to_str().unwrap();
    let capacities = CAPACITIES.map(|c| c.to_string()).join(",");
    // Heartbeats every 100 ms and deferral after 100 ms: 12 simulated minutes at SPEED.
    let (ok, out, err) = evgrid(&[
        "sim",
        "--trace",
        day,
        "--capacities",
        &capacities,
        "--heartbeat",
        "12m",
        "--defer-delay",
        "12m",
        "--json",
    ])
    .await;
    assert!(ok, "{err}");
    let sim: serde_json::Value = serde_json::from_str(&out).unwrap();
    let sim = &sim["results"][0];
    let sim_energy = sim["energy_delivered_kwh"].as_f64().unwrap();
    let sim_full = sim["sessions_fully_served_ratio"].as_f64().unwrap();

    let pipeline = Pipeline::start(Options {
        capacities: &CAPACITIES,
        time_scale: SPEED,
        heartbeat_interval: "100ms",
        dispatcher_args: &["--defer-delay", "100ms"],
        ..Options::default()
    })
    .await;
    let live = tokio::time::timeout(
        WAIT * 2,
        evgrid::load::run(
            args(&[
                "--url",
                &pipeline.url(""),
                "--events-nats-url",
                pipeline.nats.url(),
                "--trace",
                day,
                "--speed",
                &SPEED.to_string(),
                "--wait-complete",
                "--complete-timeout",
                "30s",
            ]),
            CancellationToken::new(),
        ),
    )
    .await
    .expect("the day ends in time")
    .expect("the run succeeds");
    pipeline.stop().await;
    let c = live.completion.clone().expect("completion figures");
    assert_eq!(live.errors.total, 0, "{:?}", live.error_examples);
    assert_eq!(
        (c.completed, c.rejected, c.incomplete),
        (live.accepted, 0, 0),
        "every car charged what it could: {c:?}"
    );
    let served = live.accepted as f64;
    let live_full = (c.completed - c.left_short) as f64 / served;
    let peak = c.peak_utilization.expect("heartbeats");
    let start_ms = c.charging_start_latency_ms.expect("starts").p50;
    eprintln!(
        "sim: {sim_energy:.1} kWh, {:.1} % fully served; live: {:.1} kWh, {:.1} % fully served, \
         peak utilization {peak:.3}, accept → charging p50 {start_ms:.0} ms",
        sim_full * 100.0,
        c.energy_delivered_kwh,
        live_full * 100.0
    );
    assert!(peak <= 1.0 + 1e-9, "never above capacity: {peak}");
    // The tolerance is the live grid's timing on a clock SPEED times faster than a real one:
    // every live car waits for its dispatch and first power (3–15 ms of wall time, up to 2
    // simulated minutes), and the substations act on events and heartbeats in wall-clock order
    // with millisecond jitter (1 ms = 7.2 simulated seconds), so a few choices flip from run to
    // run. Measured at these capacities: live 4.8 % below to 0.9 % above the simulator's
    // energy (14 runs at 1800×–7200×), the share fully served within 2 sessions; with the
    // triage that decides rigid cars on purpose (5 December), 1.7 % below to level (4 runs
    // at 7200×).
    let energy_gap = (c.energy_delivered_kwh - sim_energy).abs() / sim_energy;
    assert!(energy_gap <= 0.07, "energy {energy_gap:.3} apart");
    assert!(
        (live_full - sim_full).abs() <= 3.0 / served + 1e-9,
        "fully served: live {live_full:.3}, sim {sim_full:.3}"
    );
}
