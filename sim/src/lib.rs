//! `evgrid-sim`, the library behind `evgrid sim`: a deterministic discrete-event simulator of the whole pipeline (ingest →
//! dispatcher → substation) that runs the very decision and allocation code of the live
//! services on real or synthetic workloads, and compares routing policies × power allocation
//! policies against the pooled reference (one substation holding the combined capacity: what
//! routing could reach if the grid were one bus). docs/dispatch.md has the results and the
//! commands that reproduce them.
//!
//! [`trace`] reads ACN charging sessions, [`workload`](mod@workload) builds the requests, [`engine`] simulates, [`bound`] computes the exact optimum of the pooled energy, [`report`] prints, [`plot`] draws.

pub mod bound;
pub mod engine;
pub mod plot;
pub mod report;
pub mod trace;
pub mod workload;

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use evgrid_model::charging::Allocation;
use evgrid_model::decision::Policy;
use evgrid_model::units::{parse_duration, parse_positive};

use engine::{Run, Setup, simulate};
use report::{Report, Row};
use workload::{Burst, Fold, Range, Request, Synthetic, parse_sim_time};

/// The ACN stations' charging rate: what a car of a trace can draw.
pub const DEFAULT_VEHICLE_MAX_KW: f64 = 6.6;

/// Options of `evgrid sim`.
#[derive(clap::Args, Debug, Clone)]
#[command(group(
    clap::ArgGroup::new("workload")
        .required(true)
        .multiple(true)
        .args(["traces", "poisson", "bursts"])
))]
pub struct SimArgs {
    /// Real charging sessions: ACN CSV or .csv.gz (columns arrival, departure,
    /// requested_energy (kWh)), e.g. data/acn-caltech/*.csv.gz. Repeatable.
    #[arg(long = "trace", value_name = "FILE")]
    pub traces: Vec<PathBuf>,

    /// Lay trace sessions onto one week (weekday and time of day kept, UTC) or one day,
    /// stacking a long trace into city-scale load.
    #[arg(long, value_enum, default_value_t = Fold::None)]
    pub fold: Fold,

    /// Max power of every car, kW (trace and synthetic requests).
    #[arg(long, default_value_t = DEFAULT_VEHICLE_MAX_KW, value_parser = parse_max_power)]
    pub vehicle_max_kw: f64,

    /// Synthetic Poisson arrivals, in requests per hour, over --duration.
    #[arg(long, value_name = "PER_HOUR", value_parser = parse_positive)]
    pub poisson: Option<f64>,

    /// How long Poisson arrivals go on (simulated): 90s, 30m, 8h, 2d.
    #[arg(long, default_value = "24h", value_parser = parse_sim_time)]
    pub duration: f64,

    /// A burst of N synthetic requests within one second from TIME (simulated, e.g. 500@8h:
    /// a depot at shift change). Repeatable.
    #[arg(long = "burst", value_name = "N@TIME")]
    pub bursts: Vec<Burst>,

    /// Energy of synthetic requests, kWh, uniform in MIN..MAX (capped at what the car can take
    /// before it leaves).
    #[arg(long, default_value = "5..40", value_name = "MIN..MAX")]
    pub energy: Range,

    /// Stay of synthetic cars from arrival to departure, hours, uniform in MIN..MAX; `none`:
    /// cars without a departure.
    #[arg(long, default_value = "2..10", value_name = "MIN..MAX|none", value_parser = parse_stay)]
    pub stay: Stay,

    /// Seed of the synthetic workload and of the dispatcher's random choices (p2c).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Number of substations, each of --capacity-kw.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub substations: u32,

    /// Capacity of each of --substations, kW.
    #[arg(long, default_value_t = 150.0, value_parser = parse_positive)]
    pub capacity_kw: f64,

    /// Capacities in kW, comma-separated (their count sets the number of substations).
    #[arg(long, value_delimiter = ',', value_parser = parse_positive, value_name = "KW,KW,...")]
    pub capacities: Vec<f64>,

    /// Heartbeat interval of every substation, simulated time (500ms, 1s, 1m): the dispatcher's
    /// view is this stale.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub heartbeat: Duration,

    /// How long a deferred request waits before it is offered again, simulated time (default:
    /// one heartbeat, as the live dispatcher's --defer-delay).
    #[arg(long, value_parser = parse_duration)]
    pub defer_delay: Option<Duration>,

    /// Routing policies: a name, a comma-separated list, or `all` (round-robin, least-loaded,
    /// p2c, headroom, predictive).
    #[arg(long, default_value_t = Choices(vec![Policy::default()]), value_name = "NAME|all")]
    pub policy: Policies,

    /// Power allocation policies: a name, a comma-separated list, or `all` (equal-share, edf,
    /// llf, fcfs, triage).
    #[arg(long, default_value_t = Choices(vec![Allocation::default()]), value_name = "NAME|all")]
    pub allocation: Allocations,

    /// Print one JSON object ({"results": [...], "pooled_reference": {...},
    /// "energy_upper_bound_kwh": ..., ...}) instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Draw load vs capacity per substation over time (SVG) for the default policy and
    /// allocation, or the first ones asked for.
    #[arg(long, value_name = "FILE.svg", value_parser = parse_svg_path)]
    pub plot: Option<PathBuf>,

    /// Grid-operator limits over simulated time, per substation of the grid (`engine::Setup`):
    /// not an option; `evgrid replay` sets them from the limits a live grid recorded.
    #[arg(skip)]
    pub capacity_changes: Vec<Vec<(f64, f64)>>,
}

/// `--plot` writes SVG: a file named otherwise (`.png`) would hold SVG under the wrong name.
pub fn parse_svg_path(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("svg") => Ok(path),
        _ => Err(format!(
            "the plot is SVG, so its file must end in .svg, not {s:?}; a browser shows it, and \
             `rsvg-convert -o plot.png plot.svg` makes a PNG"
        )),
    }
}

/// Synthetic stays: a range of hours, or no departure at all.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stay(pub Option<Range>);

fn parse_stay(s: &str) -> Result<Stay, String> {
    if s.trim() == "none" {
        Ok(Stay(None))
    } else {
        s.parse().map(|r| Stay(Some(r)))
    }
}

fn parse_max_power(s: &str) -> Result<f64, String> {
    use evgrid_model::validate::{MAX_POWER_KW_MAX, MAX_POWER_KW_MIN};
    match parse_positive(s) {
        Ok(kw) if (MAX_POWER_KW_MIN..=MAX_POWER_KW_MAX).contains(&kw) => Ok(kw),
        _ => Err(format!(
            "expected kW from {MAX_POWER_KW_MIN} to {MAX_POWER_KW_MAX} (the request contract), got {s:?}"
        )),
    }
}

/// Values of a policy enum chosen on the command line: a name, `a,b`, or `all` (every value,
/// in declaration order).
#[derive(Debug, Clone, PartialEq)]
pub struct Choices<T>(pub Vec<T>);

/// `--policy`.
pub type Policies = Choices<Policy>;
/// `--allocation`.
pub type Allocations = Choices<Allocation>;

fn name<T: clap::ValueEnum>(value: &T) -> String {
    value
        .to_possible_value()
        .map_or_else(String::new, |p| p.get_name().to_owned())
}

impl<T: clap::ValueEnum + Clone> FromStr for Choices<T> {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "all" {
            return Ok(Self(T::value_variants().to_vec()));
        }
        s.split(',')
            .map(|one| {
                T::from_str(one.trim(), false).map_err(|_| {
                    let names: Vec<String> = T::value_variants().iter().map(name).collect();
                    format!(
                        "unknown {one:?}: expected one of {}, a comma-separated list, or all",
                        names.join(", ")
                    )
                })
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

impl<T: clap::ValueEnum> fmt::Display for Choices<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.0.iter().map(name).collect();
        f.write_str(&names.join(","))
    }
}

/// The requests of `args`, sorted by time, and how many trace sessions were skipped.
pub fn workload(args: &SimArgs) -> anyhow::Result<(Vec<Request>, usize)> {
    let mut requests = Vec::new();
    let mut skipped = 0;
    for path in &args.traces {
        let sessions = crate::trace::read(path)?;
        let (from_trace, skipped_here) =
            workload::from_sessions(&sessions, args.fold, args.vehicle_max_kw);
        requests.extend(from_trace);
        skipped += skipped_here;
    }
    let shape = Synthetic {
        energy_kwh: args.energy,
        stay_h: args.stay.0,
        max_power_kw: args.vehicle_max_kw,
    };
    requests.extend(workload::synthetic(
        args.poisson,
        args.duration,
        &args.bursts,
        &shape,
        args.seed,
    ));
    workload::sort(&mut requests);
    Ok((requests, skipped))
}

/// What one simulation is asked to do.
#[derive(Debug, Clone)]
struct Job {
    setup: Setup,
    pooled: bool,
}

/// The run `--plot` draws.
#[derive(Debug, Clone)]
pub struct Plotted {
    pub policy: Policy,
    pub allocation: Allocation,
    pub run: Run,
}

/// Runs every policy × allocation of `args` and the pooled reference on `requests`. Returns the
/// report and the run to plot.
pub fn compare(args: &SimArgs, requests: &[Request]) -> (Report, Plotted) {
    let capacities = if args.capacities.is_empty() {
        vec![args.capacity_kw; args.substations as usize]
    } else {
        args.capacities.clone()
    };
    let heartbeat_s = args.heartbeat.as_secs_f64();
    let base = Setup {
        capacities: capacities.clone(),
        capacity_changes: args.capacity_changes.clone(),
        policy: Policy::default(),
        allocation: Allocation::default(),
        heartbeat_s,
        defer_delay_s: args.defer_delay.map_or(heartbeat_s, |d| d.as_secs_f64()),
        seed: args.seed,
        record_load: false,
        skip_futile_offers: true,
    };
    // The plot and the pooled reference use the defaults when they were asked for.
    let pick = |all: &[Allocation]| {
        *all.iter()
            .find(|&&a| a == Allocation::default())
            .unwrap_or(&all[0])
    };
    let plotted_policy = *args
        .policy
        .0
        .iter()
        .find(|&&p| p == Policy::default())
        .unwrap_or(&args.policy.0[0]);
    let plotted_allocation = pick(&args.allocation.0);
    let mut jobs: Vec<Job> = Vec::new();
    for &policy in &args.policy.0 {
        for &allocation in &args.allocation.0 {
            jobs.push(Job {
                setup: Setup {
                    policy,
                    allocation,
                    record_load: args.plot.is_some()
                        && policy == plotted_policy
                        && allocation == plotted_allocation,
                    ..base.clone()
                },
                pooled: false,
            });
        }
    }
    // Last, so its run is the last one.
    jobs.push(Job {
        setup: Setup {
            capacities: vec![capacities.iter().sum()],
            capacity_changes: vec![pooled_changes(&capacities, &args.capacity_changes)],
            // With one substation every policy sends every request there; round-robin never
            // defers, so each car is at the bus the moment it asks.
            policy: Policy::RoundRobin,
            allocation: plotted_allocation,
            ..base
        },
        pooled: true,
    });

    // Under limits, the most the pooled grid ever had: the bound stays a bound (a looser one).
    let pooled_capacity_kw: f64 = pooled_changes(&capacities, &args.capacity_changes)
        .iter()
        .map(|&(_, kw)| kw)
        .fold(capacities.iter().sum(), f64::max);
    let runs = run_all(&jobs, requests);
    let bound_started = std::time::Instant::now();
    let upper_bound_kwh = bound::energy_upper_bound_kwh(requests, pooled_capacity_kw);
    let upper_bound_seconds = bound_started.elapsed().as_secs_f64();
    let pooled_kwh = runs
        .last()
        .map_or(0.0, |run| run.metrics.energy_delivered_kwh);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let mut results = Vec::new();
    let mut pooled = None;
    let mut plotted = None;
    for (job, run) in jobs.iter().zip(runs) {
        let row = Row {
            policy: if job.pooled {
                "pooled".to_owned()
            } else {
                job.setup.policy.as_str().to_owned()
            },
            allocation: job.setup.allocation.as_str().to_owned(),
            metrics: run.metrics.clone(),
            energy_of_pooled_ratio: ratio(run.metrics.energy_delivered_kwh, pooled_kwh),
            energy_upper_bound_ratio: ratio(run.metrics.energy_delivered_kwh, upper_bound_kwh),
        };
        if job.pooled {
            pooled = Some(row);
        } else {
            results.push(row);
            if job.setup.policy == plotted_policy && job.setup.allocation == plotted_allocation {
                plotted = Some(Plotted {
                    policy: plotted_policy,
                    allocation: plotted_allocation,
                    run,
                });
            }
        }
    }
    let report = Report {
        results,
        pooled_reference: pooled.expect("the pooled reference ran"),
        energy_upper_bound_kwh: upper_bound_kwh,
        energy_upper_bound_seconds: upper_bound_seconds,
    };
    (report, plotted.expect("the plotted run is one of the jobs"))
}

/// The pooled substation's capacity steps under the limits `changes` of the substations of
/// `capacities`: at every change of any of them, the sum of the capacities then in force.
pub fn pooled_changes(capacities: &[f64], changes: &[Vec<(f64, f64)>]) -> Vec<(f64, f64)> {
    let mut times: Vec<f64> = changes.iter().flatten().map(|&(at, _)| at).collect();
    times.sort_by(f64::total_cmp);
    times.dedup();
    times
        .into_iter()
        .map(|t| {
            let total = capacities
                .iter()
                .enumerate()
                .map(|(i, &configured)| {
                    engine::capacity_at(configured, changes.get(i).map(Vec::as_slice), t)
                })
                .sum();
            (t, total)
        })
        .collect()
}

/// Runs the jobs on every core, results in job order.
fn run_all(jobs: &[Job], requests: &[Request]) -> Vec<Run> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len());
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<Option<Run>>> = Mutex::new(vec![None; jobs.len()]);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let run = simulate(requests, &job.setup);
                    done.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(run);
                }
            });
        }
    });
    done.into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .map(|run| run.expect("every job ran"))
        .collect()
}

/// Draws `plotted` (`--plot`) into `path`, and says where on stderr.
pub fn write_plot(path: &std::path::Path, title: &str, plotted: &Plotted) -> anyhow::Result<()> {
    let svg = plot::svg(title, &plotted.run.ids, &plotted.run.load);
    std::fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("plot: {}", path.display());
    Ok(())
}

/// `evgrid sim`.
pub fn main(args: SimArgs) -> anyhow::Result<ExitCode> {
    let (requests, skipped) = workload(&args)?;
    if requests.is_empty() {
        anyhow::bail!("the workload has no requests");
    }
    let requested: f64 = requests.iter().map(|r| r.energy_kwh).sum();
    let span_h = (requests[requests.len() - 1].at - requests[0].at) / 3600.0;
    eprintln!(
        "workload: {} requests, {requested:.0} kWh, over {span_h:.1} h{}",
        requests.len(),
        if skipped > 0 {
            format!(" ({skipped} trace sessions skipped: no energy asked or no time parked)")
        } else {
            String::new()
        }
    );
    let started = std::time::Instant::now();
    let (report, plotted) = compare(&args, &requests);
    eprintln!(
        "simulated {} runs in {:.2} s",
        report.results.len() + 1,
        started.elapsed().as_secs_f64()
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "evgrid sim: {} routing, {} allocation, {} requests, heartbeat {:?}",
            plotted.policy.as_str(),
            plotted.allocation.as_str(),
            requests.len(),
            args.heartbeat
        );
        write_plot(path, &title, &plotted)?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests;
