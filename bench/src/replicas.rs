//! Benchmark 7, the middle of ingest → dispatcher → substation with more than one dispatcher:
//! a burst of cars through 1, 2 and 3 evgrid-dispatcher replicas sharing the request consumer,
//! alternating within each round, each on a fresh pipeline. What it shows is whether the
//! replicas count each other's sends (issue #10): a replica that counted only its own would
//! pile its share of a burst onto the substation with the most room as if alone, and the herd
//! factor would grow with the replicas. Throughput is compared with one dispatcher's in the same
//! run.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::load;
use crate::measure::{self, fmt};
use crate::setup::{Grid, Kind, Pipeline};

/// Bound on one burst, completion included.
const BURST_LIMIT: Duration = Duration::from_secs(300);

/// Options of `evgrid-bench replicas`.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Rounds; each runs every replica count once, in turn.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Cars in the burst: all sent at once (one connection each), 11 kWh at 11 kW, an hour of
    /// charging that lasts 1 s at time scale 3600.
    #[arg(long, default_value_t = 500)]
    pub cars: u64,
    /// Dispatcher replica counts to compare; the first is the reference of the ratios.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub dispatchers: Vec<usize>,
    /// Capacities of the substations, kW: unequal, so a fair spread is not an even one; 6 MW in
    /// all, room for 545 cars at 11 kW.
    #[arg(long, value_delimiter = ',', default_value = "1000,2000,3000")]
    pub capacities_kw: Vec<f64>,
}

/// One burst's figures.
#[derive(Debug, Clone, Copy)]
struct Burst {
    herd: Option<f64>,
    peak_utilization: Option<f64>,
    /// Cars completed per second of wall time, from the first POST to the last completion.
    completed_rps: f64,
    dispatch_p99_ms: Option<f64>,
}

/// Runs the benchmark; returns its Markdown report.
pub async fn run(args: &Args, logs: &Path) -> Result<String> {
    anyhow::ensure!(!args.dispatchers.is_empty(), "no replica count to measure");
    let grid = Grid {
        capacities_kw: args.capacities_kw.clone(),
        time_scale: 3600.0,
    };
    let mut runs: Vec<Vec<Burst>> = vec![Vec::new(); args.dispatchers.len()];
    for round in 1..=args.rounds {
        for (i, &n) in args.dispatchers.iter().enumerate() {
            let burst = burst(&grid, n, args.cars, logs).await?;
            eprintln!(
                "replicas round {round}, {n} dispatcher(s): herd {:?}, peak utilization {:?}, {:.0} completed/s",
                burst.herd, burst.peak_utilization, burst.completed_rps
            );
            runs[i].push(burst);
        }
    }
    Ok(report(args, &runs))
}

async fn burst(grid: &Grid, dispatchers: usize, cars: u64, logs: &Path) -> Result<Burst> {
    let mut p = Pipeline::start_with(Kind::Evgrid, grid, dispatchers, logs).await?;
    let concurrency = u32::try_from(cars).unwrap_or(u32::MAX);
    let mut words = load::closed_http(&p.url(), concurrency, cars);
    words.extend(
        [
            "--energy-kwh",
            "11",
            "--max-power-kw",
            "11",
            "--wait-complete",
            "--complete-timeout",
            "120s",
            "--events-nats-url",
            p.nats.url(),
        ]
        .map(str::to_owned),
    );
    let started = Instant::now();
    let report = load::run(&words, BURST_LIMIT).await?;
    let wall = started.elapsed().as_secs_f64();
    report.require_clean("the burst")?;
    p.check_alive()?;
    let completed = report.completed.unwrap_or(0);
    anyhow::ensure!(
        completed == cars,
        "{dispatchers} dispatcher(s): {completed} of {cars} cars completed"
    );
    Ok(Burst {
        herd: report.herd_factor,
        peak_utilization: report.peak_utilization,
        completed_rps: completed as f64 / wall,
        dispatch_p99_ms: report.dispatch_latency_ms.map(|l| l.p99),
    })
}

fn report(args: &Args, runs: &[Vec<Burst>]) -> String {
    let median = |n: usize, f: &dyn Fn(&Burst) -> Option<f64>| {
        let values: Vec<f64> = runs[n].iter().filter_map(f).collect();
        (!values.is_empty()).then(|| measure::median(values.into_iter()))
    };
    let cell = |x: Option<f64>, digits| x.map_or("–".into(), |x| fmt(x, digits));
    let reference = median(0, &|b| Some(b.completed_rps));
    let mut out = String::from("\n### 7. Dispatcher replicas\n\n");
    let _ = writeln!(
        out,
        "A burst of {} cars (11 kWh at 11 kW, 1 s of charging at 3600×) at once on substations of {} kW, heartbeats every 1 s; each count of replicas on a fresh pipeline, alternating within each of {} rounds. Medians; the worst herd factor and peak utilization of any round in brackets.\n",
        args.cars,
        args.capacities_kw
            .iter()
            .map(|c| fmt(*c, 0))
            .collect::<Vec<_>>()
            .join(" / "),
        args.rounds
    );
    out.push_str("| dispatchers | herd factor | peak utilization | dispatch p99 ms | completed req/s | vs the first |\n|---:|---:|---:|---:|---:|---:|\n");
    for (i, n) in args.dispatchers.iter().enumerate() {
        let worst =
            |f: &dyn Fn(&Burst) -> Option<f64>| runs[i].iter().filter_map(f).reduce(f64::max);
        let rps = median(i, &|b| Some(b.completed_rps));
        let _ = writeln!(
            out,
            "| {n} | {} ({}) | {} ({}) | {} | {} | {} |",
            cell(median(i, &|b| b.herd), 2),
            cell(worst(&|b| b.herd), 2),
            cell(median(i, &|b| b.peak_utilization), 2),
            cell(worst(&|b| b.peak_utilization), 2),
            cell(median(i, &|b| b.dispatch_p99_ms), 1),
            cell(rps, 0),
            match (rps, reference) {
                (Some(r), Some(base)) => format!("{:.2}×", r / base),
                _ => "–".into(),
            }
        );
    }
    out
}
