//! `evgrid-bench chaos`: the fault-tolerance suite (#10). For each scenario it starts a fresh
//! local grid of separate processes (one nats-server or a 3-node cluster, ingest → dispatcher →
//! 3 substations, with two ingests or dispatchers where one of two is killed), drives an open
//! loop of HTTP requests with idempotency keys, injects one fault (kill -9 with or without a
//! restart, SIGSTOP), waits for the accepted requests to finish, and then accounts for every 202
//! from what NATS holds: completed exactly once, rejected with a reason, or LOST, STUCK, DOUBLED;
//! plus 202s the store does not hold, heartbeats above capacity, 503s, recovery time per fault,
//! and p99 accept → completed against the no-fault run. docs/reliability.md has the latest
//! table.
//!
//! The parts: [`fault`] (scenarios as data), [`grid`] (the processes and what a fault does to
//! them), [`drive`] (the load), [`read`] (reading NATS), [`check`] and [`recovery`] (the pure
//! accounting), [`report`] (table and JSON).

pub mod check;
pub mod drive;
pub mod fault;
pub mod grid;
pub mod read;
pub mod recovery;
pub mod report;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use evgrid_common::streams;
use evgrid_model::headers;
use evgrid_model::messages::{ChargeRequest, Dispatch, RequestRecord, SessionReport};
use tokio::time::Instant;
use uuid::Uuid;

use self::check::Event;
use self::drive::{LoadOutcome, LoadSpec};
pub use self::fault::Scenario;
use self::fault::{Blow, Target, VICTIM};
use self::grid::{GridSpec, LocalGrid};
use self::read::HeartbeatWatch;
use self::recovery::Recovery;
pub use self::report::{ChaosReport, ScenarioResult};
use crate::setup;

/// How often the drain window asks the bucket whether every accepted request is final.
const DRAIN_POLL: Duration = Duration::from_millis(250);

/// Options of `evgrid-bench chaos`.
#[derive(clap::Args, Clone, Debug)]
pub struct ChaosArgs {
    /// A scenario to run (repeatable), or `all`. Each runs on a fresh grid.
    #[arg(long = "scenario", value_name = "NAME", default_value = "all", value_parser = parse_scenarios)]
    pub scenarios: Vec<Vec<Scenario>>,
    /// Requests per second of the open loop.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Length of the load phase.
    #[arg(long, default_value = "20s", value_parser = evgrid_common::config::parse_duration)]
    pub duration: Duration,
    /// When the fault strikes, after the load starts.
    #[arg(long, default_value = "5s", value_parser = evgrid_common::config::parse_duration)]
    pub fault_at: Duration,
    /// After the load: how long accepted requests may take to become final (ends early once
    /// every one is).
    #[arg(long, default_value = "30s", value_parser = evgrid_common::config::parse_duration)]
    pub drain: Duration,
    /// Capacity of each of the 3 substations, kW: at the default load (100 req/s of 5–30 kWh
    /// at 11 kW, 1.6 s of charging on average at 3600×) about 1800 kW is drawn, so 3 × 800 kW
    /// leaves headroom and 2 × 800 kW (one substation gone) almost none.
    #[arg(long, default_value_t = 800.0)]
    pub capacity_kw: f64,
    /// Simulated seconds per real second at the substations (3600: an hour of charging takes
    /// a second, so a session lasts 0.5–3 s of wall time).
    #[arg(long, default_value_t = 3600.0)]
    pub time_scale: f64,
    /// Energy per request (`evgrid load` syntax).
    #[arg(long, default_value = "uniform:5..30")]
    pub energy_kwh: String,
    /// Car max power (`evgrid load` syntax).
    #[arg(long, default_value = "11")]
    pub max_power_kw: String,
    /// Writes every figure of the run as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Directory of the service binaries (default: beside this one).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

fn parse_scenarios(s: &str) -> Result<Vec<Scenario>, String> {
    use clap::ValueEnum as _;
    if s == "all" {
        return Ok(Scenario::ALL.to_vec());
    }
    Scenario::from_str(s, false).map(|x| vec![x]).map_err(|_| {
        let names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
        format!("unknown scenario {s:?}: one of all, {}", names.join(", "))
    })
}

impl ChaosArgs {
    /// The scenarios to run, once each, `none` first (the p99 reference).
    pub fn scenarios(&self) -> Vec<Scenario> {
        let mut all: Vec<Scenario> = self.scenarios.iter().flatten().copied().collect();
        all.sort();
        all.dedup();
        all
    }
}

/// Runs every scenario of `args`, prints the table, writes the JSON; fails when a scenario lost,
/// doubled or overloaded anything (after printing).
pub async fn main(args: &ChaosArgs, logs: &Path) -> Result<String> {
    let report = run(args, logs).await?;
    let text = report.markdown();
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let failing = report.failing();
    if !failing.is_empty() {
        println!("{text}");
        anyhow::bail!("{}", failing.join("; "));
    }
    Ok(text)
}

/// Runs every scenario of `args`, one after the other, each on a fresh grid of its shape.
pub async fn run(args: &ChaosArgs, logs: &Path) -> Result<ChaosReport> {
    let bins = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => crate::procs::bin_dir()?,
    };
    let spec = GridSpec {
        bins,
        capacities_kw: vec![args.capacity_kw; 3],
        time_scale: args.time_scale,
    };
    let mut report = ChaosReport::new(args);
    for scenario in args.scenarios() {
        eprintln!("chaos: {} …", scenario.name());
        let result = run_scenario(args, &spec, scenario, logs)
            .await
            .with_context(|| format!("scenario {}", scenario.name()))?;
        report.push(result);
        if let Some(done) = report.scenarios.last() {
            eprintln!("chaos: {}", report::summary_line(done));
        }
    }
    Ok(report)
}

/// When the fault struck and when its target was back.
#[derive(Debug, Clone, Default)]
struct Timeline {
    struck: Option<DateTime<Utc>>,
    back: Option<DateTime<Utc>>,
    /// The bucket just before a substation was killed (energy recorded so far).
    before: HashMap<Uuid, RequestRecord>,
}

async fn run_scenario(
    args: &ChaosArgs,
    spec: &GridSpec,
    scenario: Scenario,
    logs: &Path,
) -> Result<ScenarioResult> {
    let shape = scenario.shape();
    let mut grid = LocalGrid::start(spec, shape, logs).await?;
    let own = setup::connect(grid.nats_url()).await?;
    let watch = HeartbeatWatch::start(&own.client).await?;
    let load = LoadSpec {
        rate: args.rate,
        duration: args.duration,
        energy_kwh: args.energy_kwh.clone(),
        max_power_kw: args.max_power_kw.clone(),
        seed: 1,
    };
    let urls = grid.ingest_urls();
    let started = Utc::now();
    let (outcome, timeline) = tokio::join!(
        drive::drive(&urls, &load),
        inject(&mut grid, &own.js, scenario, args.fault_at)
    );
    let (outcome, timeline) = (outcome?, timeline?);
    let drained = drain(&own.js, &outcome, args.drain).await;
    let heartbeats = watch.finish();
    let crashed = grid.check_alive().err().map(|e| format!("{e:#}"));
    let found = gather(&own.js, &outcome).await?;
    let accounting = check::account(
        &outcome.accepted,
        &found.stored.keys().copied().collect(),
        &found.records,
        &found.events,
    );
    let recovery = measure_recovery(scenario, &grid, &timeline, &found, &outcome);
    let offset = |t: Option<DateTime<Utc>>| t.map(|t| (t - started).as_seconds_f64());
    Ok(ScenarioResult {
        scenario,
        shape,
        fault_at_s: offset(timeline.struck),
        back_at_s: offset(timeline.back),
        load: outcome,
        drained_s: drained.map(|d| d.as_secs_f64()),
        accounting,
        heartbeats,
        recovery,
        p99_ratio: None,
        crashed,
    })
}

/// Sleeps until the fault is due, then strikes and (if the scenario says so) brings the target
/// back.
async fn inject(
    grid: &mut LocalGrid,
    js: &async_nats::jetstream::Context,
    scenario: Scenario,
    at: Duration,
) -> Result<Timeline> {
    let mut timeline = Timeline::default();
    let Some(fault) = scenario.fault() else {
        return Ok(timeline);
    };
    // A sleep to schedule the fault, not to synchronize with anything.
    tokio::time::sleep(at).await;
    if matches!(fault.target, Target::Substation(_)) && matches!(fault.blow, Blow::Kill { .. }) {
        let kv = read::bucket(js).await?;
        timeline.before = read::all_records(&kv).await?;
    }
    timeline.struck = Some(Utc::now());
    match fault.blow {
        Blow::Kill { restart_after } => {
            grid.kill(fault.target, js).await?;
            if let Some(after) = restart_after {
                tokio::time::sleep(after).await;
                timeline.back = Some(grid.restart(fault.target).await?);
            }
        }
        Blow::Freeze { during } => {
            grid.freeze(fault.target, true)?;
            tokio::time::sleep(during).await;
            grid.freeze(fault.target, false)?;
            timeline.back = Some(Utc::now());
        }
    }
    Ok(timeline)
}

/// Waits (at most `window`) until every accepted request is final in the bucket; returns how
/// long that took, `None` when the window ended first. A final state is only observable by
/// asking the bucket: poll it.
async fn drain(
    js: &async_nats::jetstream::Context,
    load: &LoadOutcome,
    window: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let mut pending: HashSet<Uuid> = load.accepted.iter().map(|a| a.request_id).collect();
    loop {
        let read = match read::bucket(js).await {
            Ok(kv) => read::records(&kv, pending.iter().copied()).await,
            Err(e) => Err(e),
        };
        match read {
            Ok(records) => {
                pending.retain(|id| !records.get(id).is_some_and(|r| r.state.is_final()))
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot read the bucket yet"),
        }
        if pending.is_empty() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= window {
            return None;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// What NATS holds about the run.
struct Found {
    /// Request ids in `EV_REQUESTS`, and when the first copy of each was stored.
    stored: HashMap<Uuid, DateTime<Utc>>,
    records: HashMap<Uuid, RequestRecord>,
    events: Vec<Event>,
    /// The request of each message of `EV_DISPATCH`, and when it was stored.
    dispatches: Vec<(Uuid, DateTime<Utc>)>,
}

async fn gather(js: &async_nats::jetstream::Context, load: &LoadOutcome) -> Result<Found> {
    let mut stored = HashMap::new();
    for m in read::read_stream(js, streams::REQUESTS).await? {
        let header = m
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::REQUEST_ID))
            .and_then(|v| v.as_str().parse().ok());
        let id = header.or_else(|| {
            serde_json::from_slice::<ChargeRequest>(&m.payload)
                .ok()?
                .request_id
        });
        if let Some(id) = id {
            stored.entry(id).or_insert(m.published);
        }
    }
    let events = read::read_stream(js, streams::SESSIONS)
        .await?
        .into_iter()
        .filter_map(|m| {
            let report: SessionReport = serde_json::from_slice(&m.payload).ok()?;
            Some(Event {
                stored: m.published,
                report,
            })
        })
        .collect();
    let dispatches = read::read_stream(js, streams::DISPATCH)
        .await?
        .into_iter()
        .filter_map(|m| {
            let dispatch: Dispatch = serde_json::from_slice(&m.payload).ok()?;
            Some((dispatch.request_id, m.published))
        })
        .collect();
    let kv = read::bucket(js).await?;
    let records = read::records(&kv, load.accepted.iter().map(|a| a.request_id)).await?;
    Ok(Found {
        stored,
        records,
        events,
        dispatches,
    })
}

fn measure_recovery(
    scenario: Scenario,
    grid: &LocalGrid,
    timeline: &Timeline,
    found: &Found,
    load: &LoadOutcome,
) -> Option<Recovery> {
    let victim = grid
        .substation_ids()
        .get(VICTIM)
        .cloned()
        .unwrap_or_default();
    let recovery = |what: &str, seconds| Recovery {
        what: what.into(),
        seconds,
        sessions: None,
    };
    let dispatched = || found.dispatches.iter().map(|(_, at)| *at);
    let answered = || load.accepted.iter().map(|a| a.at);
    // Faults nothing comes back from: measured from the blow.
    let struck = timeline.struck?;
    match scenario {
        Scenario::KillSubstationForever => {
            // From the kill to the last of its requests moved elsewhere (failover, after the
            // dispatcher's --substation-timeout).
            let moved = found
                .records
                .values()
                .flat_map(|r| &r.moved)
                .filter(|m| m.substation_id == victim)
                .map(|m| m.moved_at);
            return Some(recovery(
                "last request moved off the dead substation (timeout 10 s)",
                recovery::last_after(moved, struck),
            ));
        }
        Scenario::KillDispatcherOfTwo => {
            // What the dead replica held goes to the survivor after its ack wait: the last
            // dispatch of a request stored before the kill.
            let held: Vec<DateTime<Utc>> = found
                .dispatches
                .iter()
                .filter(|(id, at)| {
                    *at >= struck && found.stored.get(id).is_some_and(|s| *s < struck)
                })
                .map(|(_, at)| *at)
                .collect();
            let what = format!(
                "{} in flight at the kill, all dispatched by the other (ack wait 1 s)",
                held.len()
            );
            // None in flight: nothing waited (a request never dispatched is STUCK).
            let seconds = recovery::last_after(held, struck).or(Some(0.0));
            return Some(recovery(&what, seconds));
        }
        Scenario::KillIngestOfTwo => {
            let sent_after = load.accepted.iter().filter(|a| a.sent >= struck);
            return Some(recovery(
                "slowest 202 of a request sent after the kill",
                recovery::slowest(sent_after.map(|a| (a.sent, a.at))),
            ));
        }
        Scenario::KillNatsNode | Scenario::KillNatsNodeForever => {
            let pause = [answered().collect(), dispatched().collect()]
                .map(|times: Vec<_>| recovery::longest_pause(times, struck));
            return Some(recovery(
                "longest pause in 202s or dispatches after the kill",
                pause.into_iter().flatten().reduce(f64::max),
            ));
        }
        _ => {}
    }
    let back = timeline.back?;
    let first =
        |what: &str, times: Vec<DateTime<Utc>>| recovery(what, recovery::first_after(times, back));
    Some(match scenario {
        Scenario::KillDispatcher | Scenario::KillNats | Scenario::RestartCluster => {
            first("first dispatch after the restart", dispatched().collect())
        }
        Scenario::KillSubstation => {
            recovery::held_sessions(&found.events, &victim, struck, back, &timeline.before)
        }
        Scenario::StopSubstation => first(
            "first session event after SIGCONT",
            found
                .events
                .iter()
                .filter(|e| e.report.event.substation_id == victim)
                .map(|e| e.stored)
                .collect(),
        ),
        Scenario::KillIngest => first("first 202 after the restart", answered().collect()),
        _ => return None,
    })
}
