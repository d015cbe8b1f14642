//! Benchmark 2, the middle of ingest → dispatcher → substation: how fast evgrid-dispatcher drains
//! a backlog of stored requests, against the forwarder (consume → publish → ack), alternating,
//! each on a fresh nats-server with the same backlog.
//!
//! Two grids: stand-in heartbeats from this process (nothing consumes the dispatches, so only
//! the router's own cost shows), and three live evgrid-substation processes with huge capacity
//! and time scale, charging every dispatch at once on the same two cores.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use async_nats::jetstream;
use evgrid_common::streams;
use tokio_util::sync::CancellationToken;

use crate::measure::{self, Sample, Series};
use crate::procs::{self, CpuMeter, Nats, Proc};
use crate::setup;

/// Substation capacity and time scale in the live grid: never the limit (no deferral, sessions
/// of milliseconds).
const LIVE_CAPACITY_KW: f64 = 1e9;
const LIVE_TIME_SCALE: f64 = 1e6;
/// How often the drain is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// Longest drain before the measurement is abandoned.
const DRAIN_LIMIT: Duration = Duration::from_secs(300);

/// Options of `evgrid-bench dispatcher`.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Stored requests to drain per measurement.
    #[arg(long, default_value_t = 200_000)]
    pub requests: u64,
    /// Rounds; each measures the dispatcher and the forwarder once, in turn.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Grids to measure with: `beats` (stand-in heartbeats, the router alone) and `live` (three
    /// evgrid-substation processes).
    #[arg(long, value_delimiter = ',', default_value = "beats,live")]
    pub grids: Vec<GridKind>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum GridKind {
    Beats,
    Live,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Router {
    Dispatcher,
    Forwarder,
}

impl Router {
    fn name(self) -> &'static str {
        match self {
            Router::Dispatcher => "evgrid-dispatcher",
            Router::Forwarder => "forwarder (consume → publish → ack)",
        }
    }
}

const IDS: [&str; 3] = ["s1", "s2", "s3"];

/// Runs the benchmark and returns its Markdown report.
pub async fn run(args: &Args, logs: &Path) -> Result<String> {
    let mut out = String::from("\n### 2. Dispatcher\n");
    for &grid in &args.grids {
        let routers = [Router::Dispatcher, Router::Forwarder];
        let mut series: Vec<Series> = routers.iter().map(|r| Series::new(r.name())).collect();
        for round in 1..=args.rounds {
            for (i, router) in routers.iter().enumerate() {
                let sample = measure(*router, grid, args, logs).await?;
                eprintln!(
                    "dispatcher {grid:?} round {round}: {:<40} {:>8.0} msg/s",
                    router.name(),
                    sample.rate
                );
                series[i].samples.push(sample);
            }
        }
        let title = match grid {
            GridKind::Beats => format!(
                "draining {} requests, stand-in heartbeats (the router alone)",
                args.requests
            ),
            GridKind::Live => format!(
                "draining {} requests, 3 live substations on the same cores",
                args.requests
            ),
        };
        out += &measure::table(&title, "requests/s", false, &series);
        out.push('\n');
        out += &measure::ratio_line(&series[0], &series[1], 0.8, None);
    }
    Ok(out)
}

async fn measure(router: Router, grid: GridKind, args: &Args, logs: &Path) -> Result<Sample> {
    let nats = Nats::start()?;
    let url = nats.url().to_owned();
    let own = setup::ensure_streams(&url).await?;
    let stop_beats = CancellationToken::new();
    let _stop_beats_on_return = stop_beats.clone().drop_guard();
    let mut substations = Vec::new();
    match grid {
        GridKind::Beats => {
            let ids = IDS.iter().map(|s| s.to_string()).collect();
            tokio::spawn(setup::stand_in_heartbeats(
                own.js.clone(),
                ids,
                stop_beats.clone(),
            ));
        }
        GridKind::Live => {
            for id in IDS {
                let words = vec![
                    "--nats-url".into(),
                    url.clone(),
                    "--id".into(),
                    id.into(),
                    "--capacity-kw".into(),
                    LIVE_CAPACITY_KW.to_string(),
                    "--time-scale".into(),
                    LIVE_TIME_SCALE.to_string(),
                ];
                substations.push(Proc::service(id, "evgrid-substation", words, logs).await?);
            }
        }
    }
    setup::await_heartbeats(&own.js, IDS.len()).await?;
    setup::preload(&own.client, args.requests).await?;

    let nats_cpu = CpuMeter::start(nats.cpu_seconds());
    let words = vec!["--nats-url".to_owned(), url.clone()];
    let mut service = match router {
        Router::Dispatcher => {
            let mut words = words;
            words.extend(["--listen".into(), procs::free_addr()?.to_string()]);
            Proc::spawn(
                "dispatcher",
                &procs::sibling("evgrid-dispatcher")?,
                &words,
                logs,
            )?
        }
        Router::Forwarder => {
            let mut all = vec!["forwarder".to_owned()];
            all.extend(words);
            Proc::spawn("forwarder", &std::env::current_exe()?, &all, logs)?
        }
    };
    let rate = drain_rate(&own.js, args.requests, &mut service).await?;
    let sample = Sample {
        rate,
        service_cpu_us: service
            .cpu_seconds()
            .map_or(f64::NAN, |s| s * 1e6 / args.requests as f64),
        nats_cpu_us: nats_cpu
            .per(nats.cpu_seconds(), args.requests)
            .unwrap_or(f64::NAN),
        ..Default::default()
    };
    for s in &mut substations {
        s.check_alive()?;
    }
    Ok(sample)
}

/// Samples the `dispatcher` consumer until every request is acked, and returns the rate
/// between 10% and 90% acked (start-up and the tail left out).
async fn drain_rate(js: &jetstream::Context, total: u64, service: &mut Proc) -> Result<f64> {
    let stream = js.get_stream(streams::REQUESTS).await?;
    let started = Instant::now();
    let mut points: Vec<(f64, f64)> = Vec::new();
    loop {
        // The backlog is the server's to report: asking is the only way to watch it.
        tokio::time::sleep(SAMPLE_EVERY).await;
        service.check_alive()?;
        let Ok(info) = stream.consumer_info(streams::DISPATCHER_CONSUMER).await else {
            continue;
        };
        let acked = total.saturating_sub(info.num_pending + info.num_ack_pending as u64);
        points.push((started.elapsed().as_secs_f64(), acked as f64));
        if acked >= total {
            break;
        }
        if started.elapsed() > DRAIN_LIMIT {
            bail!("{acked} of {total} requests drained within {DRAIN_LIMIT:?}");
        }
    }
    let at = |fraction: f64| crossing(&points, fraction * total as f64);
    let (t10, t90) = (at(0.1), at(0.9));
    Ok(0.8 * total as f64 / (t90 - t10))
}

/// When the acked count crossed `level`, interpolated between samples.
fn crossing(points: &[(f64, f64)], level: f64) -> f64 {
    let mut previous = (0.0, 0.0);
    for &(t, n) in points {
        if n >= level {
            let (t0, n0) = previous;
            return if n > n0 {
                t0 + (t - t0) * (level - n0) / (n - n0)
            } else {
                t
            };
        }
        previous = (t, n);
    }
    f64::NAN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crossings_are_interpolated() {
        let points = [(1.0, 0.0), (2.0, 100.0), (3.0, 300.0)];
        assert_eq!(crossing(&points, 50.0), 1.5);
        assert_eq!(crossing(&points, 200.0), 2.5);
        assert!(crossing(&points, 400.0).is_nan());
    }
}
