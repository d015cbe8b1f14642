//! Benchmark 8, the substation as the CSMS of real chargers (`--chargers ocpp`, issue #12):
//! one evgrid-substation process with 1,000 connected stations, each with a car charging, the
//! stations simulated in this process by `evgrid_ocpp::simulator` (what `evgrid stations`
//! runs). A grid operator's limit halves the capacity, then restores it, each round: how long
//! until every station has its new limit (a full reallocation, decreases first), against the
//! reference of the same run, how long the substation takes to heartbeat the new capacity
//! (the limit's way in, over NATS). Also the substation's peak RSS, and its CPU per meter
//! reading in a steady window.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use evgrid_common::config::parse_duration;
use evgrid_model::messages::Telemetry;
use evgrid_model::subjects;
use evgrid_ocpp::simulator::{self, SimConfig, SimEvent};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::procs::{Nats, Proc, free_addr};
use crate::setup;

/// The substation's id.
const ID: &str = "ocpp-bench";
/// What each simulated station can draw (W): an AC wallbox.
const STATION_MAX_W: f64 = 22_000.0;
/// Bound on the stations connecting and their cars starting.
const START_LIMIT: Duration = Duration::from_secs(120);
/// Bound on one round reaching every station.
const ROUND_LIMIT: Duration = Duration::from_secs(60);
/// The target for a full reallocation.
const TARGET: Duration = Duration::from_secs(1);

/// Options of `evgrid-bench ocpp`.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Simulated stations, one car each.
    #[arg(long, default_value_t = 1000)]
    pub stations: usize,
    /// Rounds; each halves the capacity, then restores it (two reallocations).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Real time between a station's meter reports (OCPP stations commonly report every
    /// 10-60 s; 1 s is a heavy load).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub meter_interval: Duration,
    /// The steady window the CPU per meter reading is measured over.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub window: Duration,
}

/// Every limit a station took, with when.
type Limits = Arc<Mutex<Vec<(String, f64, Instant)>>>;

/// Runs the benchmark; returns its Markdown report.
pub async fn run(args: &Args, logs: &Path) -> Result<String> {
    anyhow::ensure!(args.stations > 0, "no stations to simulate");
    let nats = Nats::start()?;
    let own = setup::ensure_streams(nats.url()).await?;
    let stations: Vec<(String, String)> = (1..=args.stations)
        .map(|i| {
            (
                format!("st-{i:04}"),
                format!("bench-station-password-{i:04}"),
            )
        })
        .collect();
    let file = logs.join("stations");
    let lines: String = stations.iter().map(|(s, p)| format!("{s}:{p}\n")).collect();
    std::fs::write(&file, lines).context("cannot write the stations file")?;
    let ocpp_addr = free_addr()?;
    // Half of what the cars could draw: the policy shares, every limit below the maximum.
    let capacity_kw = args.stations as f64 * STATION_MAX_W / 1000.0 / 2.0;
    let words = [
        "--nats-url",
        nats.url(),
        "--id",
        ID,
        "--capacity-kw",
        &capacity_kw.to_string(),
        "--allocation",
        "equal-share",
        "--chargers",
        "ocpp",
        "--ocpp-listen",
        &ocpp_addr.to_string(),
        "--ocpp-stations",
        &file.display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let mut substation = Proc::service("substation", "evgrid-substation", words, logs).await?;

    let limits: Limits = Arc::default();
    let (observer, mut events) = tokio::sync::mpsc::unbounded_channel();
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let collect = {
        let limits = limits.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                match event {
                    SimEvent::Limit {
                        station,
                        limit_w,
                        at,
                        ..
                    } => limits
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push((station, limit_w, at)),
                    SimEvent::Started { .. } => {
                        let _ = started_tx.send(());
                    }
                    _ => {}
                }
            }
        })
    };
    let config = SimConfig {
        max_power_w: STATION_MAX_W,
        meter_interval: args.meter_interval,
        walk_in_every: Some(Duration::from_millis(100)),
        // Cars that stay and charge for the whole benchmark.
        walk_in_energy_wh: 1e7..=1e7,
        walk_in_stay: Duration::from_secs(24 * 3600)..=Duration::from_secs(24 * 3600),
        seed: 12,
        ..SimConfig::new(format!("ws://{ocpp_addr}/ocpp"), stations)
    };
    let stop = CancellationToken::new();
    let sim = tokio::spawn(simulator::run(config, Some(observer), stop.clone()));

    let begin = Instant::now();
    for n in 0..args.stations {
        tokio::time::timeout_at((begin + START_LIMIT).into(), started.recv())
            .await
            .with_context(|| format!("{n} of {} cars started", args.stations))?;
    }
    eprintln!(
        "ocpp: {} stations charging after {:.1} s",
        args.stations,
        begin.elapsed().as_secs_f64()
    );
    let mut telemetry = own
        .client
        .subscribe(subjects::telemetry(ID))
        .await
        .context("cannot subscribe to heartbeats")?;
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        for capacity in [capacity_kw / 2.0, capacity_kw] {
            let expected_w = (capacity * 1000.0 / args.stations as f64).min(STATION_MAX_W);
            let t0 = Instant::now();
            own.js
                .publish(
                    subjects::limits(ID),
                    format!("{{\"capacity_kw\": {capacity}}}").into(),
                )
                .await?
                .await
                .context("limit not stored")?;
            let reference = loop {
                let msg = tokio::time::timeout(ROUND_LIMIT, telemetry.next())
                    .await
                    .context("no heartbeat with the new capacity")?
                    .context("heartbeats ended")?;
                let t: Telemetry = serde_json::from_slice(&msg.payload)?;
                if (t.heartbeat.capacity_kw - capacity).abs() < 1e-6 {
                    break t0.elapsed();
                }
            };
            let reached = reached_all(&limits, t0, expected_w, args.stations).await?;
            eprintln!(
                "ocpp round {round}, {capacity} kW: every station in {:.0} ms, heartbeat in {:.0} ms",
                reached.as_secs_f64() * 1e3,
                reference.as_secs_f64() * 1e3
            );
            rounds.push((capacity, reached, reference));
        }
    }

    // CPU per meter reading: a window of steady charging, from the substation's own count.
    let metrics_url = format!(
        "http://{}/metrics",
        substation.http.context("the substation serves HTTP")?
    );
    let readings_before =
        scrape(&metrics_url, "evgrid_substation_ocpp_meter_readings_total").await?;
    let cpu_before = substation.cpu_seconds();
    tokio::time::sleep(args.window).await;
    let readings = scrape(&metrics_url, "evgrid_substation_ocpp_meter_readings_total").await?
        - readings_before;
    let cpu = substation
        .cpu_seconds()
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    substation.check_alive()?;
    let peak_rss_mb = substation.peak_rss_mb();
    stop.cancel();
    let report = sim.await?;
    collect.abort();
    Ok(render(
        args,
        capacity_kw,
        &rounds,
        readings,
        cpu,
        peak_rss_mb,
        &report,
    ))
}

/// Waits until every station has taken a limit of `expected_w` since `t0`; how long that took.
async fn reached_all(
    limits: &Limits,
    t0: Instant,
    expected_w: f64,
    stations: usize,
) -> Result<Duration> {
    let deadline = t0 + ROUND_LIMIT;
    loop {
        {
            let limits = limits.lock().unwrap_or_else(PoisonError::into_inner);
            let mut first: HashMap<&str, Instant> = HashMap::new();
            for (station, limit, at) in limits.iter().rev() {
                if *at >= t0 && (limit - expected_w).abs() < 1.0 {
                    first.insert(station, *at);
                }
            }
            if first.len() == stations {
                return Ok(*first.values().max().expect("stations") - t0);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} of {stations} stations got their {expected_w} W within {ROUND_LIMIT:?}",
                    first.len()
                );
            }
        }
        // Polling what the simulator recorded: its events are in a shared log.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of a label-free (apart from `substation`) sample on a `/metrics` page.
async fn scrape(url: &str, name: &str) -> Result<f64> {
    let page = reqwest::get(url).await?.text().await?;
    page.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .with_context(|| format!("no {name} on {url}"))
}

fn render(
    args: &Args,
    capacity_kw: f64,
    rounds: &[(f64, Duration, Duration)],
    readings: f64,
    cpu: Option<f64>,
    peak_rss_mb: Option<f64>,
    report: &simulator::Report,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## 8. OCPP: one substation, {} stations charging\n\n\
         Capacity {capacity_kw} kW (half of what the cars could draw), `--allocation equal-share`, \
         meter reports every {:?}. Each round a grid-operator limit halves the capacity, then \
         restores it: every station's limit changes. Reference: the substation's heartbeat \
         showing the new capacity (the limit's way in over NATS).\n\n\
         | capacity (kW) | every station has its limit (ms) | heartbeat (ms) | ratio |\n|---|---|---|---|",
        args.stations, args.meter_interval
    );
    let mut worst = Duration::ZERO;
    for (capacity, reached, reference) in rounds {
        worst = worst.max(*reached);
        let _ = writeln!(
            out,
            "| {capacity} | {:.0} | {:.0} | {:.1}× |",
            reached.as_secs_f64() * 1e3,
            reference.as_secs_f64() * 1e3,
            reached.as_secs_f64() / reference.as_secs_f64().max(1e-9)
        );
    }
    let verdict = if worst <= TARGET { "within" } else { "over" };
    let _ = writeln!(
        out,
        "\nSlowest full reallocation: {:.0} ms, {verdict} the 1 s target.",
        worst.as_secs_f64() * 1e3
    );
    let rss = peak_rss_mb.map_or("unknown".to_owned(), |mb| format!("{mb:.1} MB"));
    let _ = writeln!(out, "Substation peak RSS: {rss} (target 100 MB).");
    match cpu {
        Some(cpu) if readings > 0.0 => {
            let _ = writeln!(
                out,
                "Substation CPU per meter reading: {:.1} µs ({readings} readings in {:?}, {cpu:.2} CPU-seconds).",
                cpu / readings * 1e6,
                args.window
            );
        }
        _ => {
            let _ = writeln!(out, "Substation CPU per meter reading: not measured.");
        }
    }
    let _ = writeln!(out, "\nSimulated stations: {report}.");
    out
}
