//! `evgrid replay`: looks back at what a live grid did. It reads a window of the request log at
//! the front of ingest → dispatcher → substation (`EV_REQUESTS`, each original request arriving
//! when it was stored), the substations, their capacities and the grid-operator limits in force,
//! and runs those requests through the simulator of `evgrid sim` (the same dispatch and
//! allocation code), side by side with what the live grid actually delivered, read from the far
//! end (`EV_REQUEST_STATE`, `EV_SESSIONS`).
//!
//! [`read`] fetches the window from NATS; [`window`] is the pure part (the simulator's requests
//! and clock, the live grid's figures); [`export`] writes the requests as a trace; [`inject`]
//! sends them again into another grid.

pub mod export;
pub mod inject;
pub mod read;
pub mod window;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use chrono::{DateTime, Utc};
use evgrid_common::config::{DEFAULT_NATS_URL, NATS_URL_ENV, NatsAuth, parse_nats_url};
use evgrid_common::nats::read::Start;
use evgrid_model::charging::Allocation;
use evgrid_model::decision::Policy;
use evgrid_model::units::{parse_duration, parse_positive};
use evgrid_sim::report::{Report, Row};
use evgrid_sim::{Allocations, Choices, Policies, SimArgs, Stay};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use self::read::{LeftOut, Point, Recorded};
use self::window::{Clock, Outcomes, Record, Substation, SubstationFigures};

/// Options of `evgrid replay`.
#[derive(clap::Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("to").args(["to_url", "to_nats_url"])))]
pub struct ReplayArgs {
    /// The NATS server (or cluster, comma-separated) of the live grid.
    #[arg(long, env = NATS_URL_ENV, default_value = DEFAULT_NATS_URL, value_name = "nats://HOST:PORT",
          value_parser = parse_nats_url, help_heading = "Window")]
    pub nats_url: String,

    /// Replay the requests stored within this long before now: 30m, 24h, 7d.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, conflicts_with = "from",
          help_heading = "Window")]
    pub since: Option<Duration>,

    /// Replay from this time (RFC 3339) or stream sequence of EV_REQUESTS on (default: the
    /// oldest request it holds).
    #[arg(long, value_name = "TIME|SEQ", help_heading = "Window")]
    pub from: Option<Point>,

    /// Replay up to this time (RFC 3339) or stream sequence, inclusive (default: the last request
    /// stored when the replay starts).
    #[arg(long, value_name = "TIME|SEQ", help_heading = "Window")]
    pub until: Option<Point>,

    /// The live substations' --time-scale (simulated seconds per real second; `evgrid up` runs
    /// 3600): arrivals keep their distance stretched by it, as the live grid saw them.
    #[arg(long, default_value_t = 1.0, value_parser = parse_positive, help_heading = "Simulation")]
    pub time_scale: f64,

    /// Heartbeat interval of the simulated substations, simulated time (default: the live
    /// substations' interval × --time-scale, so the simulated dispatcher's view is as stale as
    /// the live one's).
    #[arg(long, value_parser = parse_duration, help_heading = "Simulation")]
    pub heartbeat: Option<Duration>,

    /// Routing policies to simulate: a name, a comma-separated list, or `all`.
    #[arg(long, default_value_t = Choices(vec![Policy::default()]), value_name = "NAME|all",
          help_heading = "Simulation")]
    pub policy: Policies,

    /// How the live substations share their capacity (their --allocation): the live load,
    /// which heartbeats carried but are not kept, is rebuilt with it.
    #[arg(long, value_enum, default_value_t = Allocation::default(), help_heading = "Window")]
    pub live_allocation: Allocation,

    /// Power allocation policies to simulate: a name, a comma-separated list, or `all`.
    #[arg(long, default_value_t = Choices(vec![Allocation::default()]), value_name = "NAME|all",
          help_heading = "Simulation")]
    pub allocation: Allocations,

    /// Print one JSON object (as `evgrid sim --json`, with `window`, `arrivals` and `recorded`)
    /// instead of tables.
    #[arg(long, help_heading = "Output")]
    pub json: bool,

    /// Draw the simulated load vs capacity per substation (SVG), as `evgrid sim --plot`.
    #[arg(long, value_name = "FILE.svg", value_parser = evgrid_sim::parse_svg_path,
          help_heading = "Output")]
    pub plot: Option<PathBuf>,

    /// Write the recorded requests as an ACN CSV trace (.csv, or .csv.gz gzipped) that
    /// `evgrid sim --trace` and `evgrid load --trace` read, times on the simulated clock.
    #[arg(long, value_name = "FILE.csv", help_heading = "Output")]
    pub export: Option<PathBuf>,

    /// Instead of simulating, send the window's requests again, with new ids, to this ingest
    /// (e.g. a staging grid), and report as `evgrid load` does.
    #[arg(long, value_name = "http://HOST:PORT", value_parser = crate::load::parse_http_url,
          conflicts_with = "to_nats_url", help_heading = "Re-inject")]
    pub to_url: Option<reqwest::Url>,

    /// Instead of simulating, publish the window's requests again, with new ids, to
    /// `ev.requests` on this NATS server (a JetStream publish awaiting each PubAck).
    #[arg(long, value_name = "nats://HOST:PORT", value_parser = parse_nats_url,
          help_heading = "Re-inject")]
    pub to_nats_url: Option<String>,

    /// With --to-url: the file whose first line is the target ingest's API key (as `evgrid
    /// load --api-key-file`; `evgrid up` keeps its operator key in `<data-dir>/api-key`).
    #[arg(long, value_name = "FILE", value_parser = evgrid_common::config::read_secret_file,
          requires = "to_url", help_heading = "Re-inject")]
    pub to_api_key_file: Option<evgrid_common::config::Secret>,

    /// Re-injection pace: request i is sent at (its stored time − the first's) ÷ SPEED. Run
    /// the target's substations at --time-scale × SPEED for the cars' stays to match.
    #[arg(long, default_value_t = 1.0, value_parser = parse_positive, requires = "to",
          help_heading = "Re-inject")]
    pub speed: f64,

    /// Follow every re-injected request to `completed`, as `evgrid load --wait-complete`.
    #[arg(long, requires = "to", help_heading = "Re-inject")]
    pub wait_complete: bool,

    /// With --to-url --wait-complete: the target grid's NATS, where its session events are.
    #[arg(long, value_name = "nats://HOST:PORT", value_parser = parse_nats_url,
          requires = "to", conflicts_with = "to_nats_url", help_heading = "Re-inject")]
    pub to_events_nats_url: Option<String>,

    /// Credentials and TLS for every NATS connection this command makes.
    #[command(flatten)]
    pub auth: NatsAuth,
}

impl ReplayArgs {
    /// Where the window starts, at time `now`.
    fn start(&self, now: DateTime<Utc>) -> Start {
        match (self.since, self.from) {
            (Some(since), _) => Start::Time(
                now - chrono::Duration::from_std(since).unwrap_or(chrono::Duration::MAX),
            ),
            (None, Some(Point::Time(t))) => Start::Time(t),
            (None, Some(Point::Sequence(s))) => Start::Sequence(s),
            (None, None) => Start::All,
        }
    }

    /// `--from` after `--until` (both times or both sequences) is a mistake, not an empty window.
    fn check(&self) -> anyhow::Result<()> {
        match (self.from, self.until) {
            (Some(Point::Time(a)), Some(Point::Time(b))) if a > b => {
                bail!(
                    "--from {} is after --until {}",
                    a.to_rfc3339(),
                    b.to_rfc3339()
                )
            }
            (Some(Point::Sequence(a)), Some(Point::Sequence(b))) if a > b => {
                bail!("--from sequence {a} is after --until sequence {b}")
            }
            _ => Ok(()),
        }
    }
}

/// The window that was replayed.
#[derive(Debug, Clone, Serialize)]
pub struct WindowInfo {
    /// Stored times of the first and last request.
    pub first: DateTime<Utc>,
    pub last: DateTime<Utc>,
    pub first_sequence: u64,
    pub last_sequence: u64,
    /// When the request states were read (open requests have waited until then).
    pub read_at: DateTime<Utc>,
    pub time_scale: f64,
    /// The simulated substations' heartbeat interval (simulated seconds).
    pub heartbeat_s: f64,
    pub substations: Vec<Substation>,
    /// Grid-operator limit messages of these substations (all of `EV_LIMITS`).
    pub limit_messages: usize,
}

/// The requests that arrived in the window.
#[derive(Debug, Clone, Serialize)]
pub struct Arrivals {
    pub count: usize,
    /// What they asked for, as stored (kWh).
    pub energy_kwh: f64,
    /// Requests of the window that are not arrivals.
    pub left_out: LeftOut,
}

/// The live grid's figures: the fields of every simulated result, then how it got there.
#[derive(Debug, Clone, Serialize)]
pub struct RecordedRow {
    #[serde(flatten)]
    pub row: Row,
    pub outcomes: Outcomes,
    pub per_substation: Vec<SubstationFigures>,
}

/// `evgrid replay --json`.
#[derive(Debug, Clone, Serialize)]
pub struct Output {
    pub window: WindowInfo,
    pub arrivals: Arrivals,
    #[serde(flatten)]
    pub report: Report,
    pub recorded: RecordedRow,
    /// Readable reasons the live grid differs from the simulations.
    pub differences: Vec<String>,
    /// What `--export` wrote.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub export: Option<export::Exported>,
}

/// `evgrid replay` from the command line.
pub async fn main(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let shutdown = evgrid_common::shutdown::on_signals();
    if args.to_url.is_some() || args.to_nats_url.is_some() {
        let report = reinject(&args, shutdown).await?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", report.to_text());
        }
        return Ok(if report.errors.total == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let output = run(&args, shutdown).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&output)?);
    } else {
        print!("{}", output.to_text());
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads the window of `args` and simulates it.
pub async fn run(args: &ReplayArgs, shutdown: CancellationToken) -> anyhow::Result<Output> {
    let recorded = read_window(args, &shutdown).await?;
    let (mut output, plotted) = simulate(args, &recorded);
    output.export = export_if_asked(args, &recorded)?;
    if let Some(path) = &args.plot {
        let title = format!(
            "evgrid replay: {} routing, {} allocation, {} recorded requests, heartbeat {:.1} s",
            plotted.policy.as_str(),
            plotted.allocation.as_str(),
            output.arrivals.count,
            output.window.heartbeat_s
        );
        evgrid_sim::write_plot(path, &title, &plotted)?;
    }
    Ok(output)
}

/// Reads the window of `args` and sends its requests again to `--to-url` or `--to-nats-url`.
pub async fn reinject(
    args: &ReplayArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<crate::load::stats::Report> {
    let recorded = read_window(args, &shutdown).await?;
    export_if_asked(args, &recorded)?;
    let url = args.to_url.as_ref().map(|u| u.to_string());
    let target = match (&url, &args.to_nats_url) {
        (Some(url), _) => ("--url", url.as_str()),
        (None, Some(nats)) => ("--nats-url", nats.as_str()),
        (None, None) => bail!("nowhere to send: give --to-url or --to-nats-url"),
    };
    if args.wait_complete && url.is_some() && args.to_events_nats_url.is_none() {
        bail!(
            "--to-url --wait-complete follows session events on the target's NATS: give --to-events-nats-url"
        );
    }
    let how = inject::Injection {
        target,
        wait_complete: args.wait_complete,
        events_nats_url: args.to_events_nats_url.as_deref(),
        quiet: args.json,
        auth: &args.auth,
        api_key: args.to_api_key_file.as_ref(),
    };
    inject::run(&recorded.originals, args.speed, how, shutdown).await
}

async fn read_window(args: &ReplayArgs, shutdown: &CancellationToken) -> anyhow::Result<Recorded> {
    args.check()?;
    let nats = crate::load::connect_nats(&args.nats_url, &args.auth, shutdown).await?;
    Ok(read::window(&nats, args.start(Utc::now()), args.until).await?)
}

/// Writes `--export`, if asked, and says so on stderr.
fn export_if_asked(
    args: &ReplayArgs,
    recorded: &Recorded,
) -> anyhow::Result<Option<export::Exported>> {
    let Some(path) = &args.export else {
        return Ok(None);
    };
    let clock = Clock::new(recorded.originals[0].stored_at, args.time_scale);
    let exported = export::write(path, &recorded.originals, &clock)?;
    let left_out = if exported.left_out > 0 {
        format!(
            " ({} left out: no departure, which ACN rows need, or one already passed)",
            exported.left_out
        )
    } else {
        String::new()
    };
    eprintln!(
        "export: {} requests to {}{left_out}",
        exported.rows,
        path.display()
    );
    Ok(Some(exported))
}

/// Simulates the recorded requests and measures the live grid on them.
pub fn simulate(args: &ReplayArgs, recorded: &Recorded) -> (Output, evgrid_sim::Plotted) {
    let first = &recorded.originals[0];
    let clock = Clock::new(first.stored_at, args.time_scale);
    let requests: Vec<_> = recorded
        .originals
        .iter()
        .map(|o| window::to_sim(o, &clock))
        .collect();
    let interval_ms = recorded
        .substations
        .iter()
        .map(|s| s.interval_ms)
        .max()
        .unwrap_or(1000);
    let heartbeat = args
        .heartbeat
        .unwrap_or_else(|| Duration::from_secs_f64(interval_ms as f64 * args.time_scale / 1e3));
    let steps = window::capacity_steps(&recorded.substations, &recorded.limits, &clock);
    let sim = sim_args(args, &recorded.substations, steps.clone(), heartbeat);
    let (report, plotted) = evgrid_sim::compare(&sim, &requests);
    let live = window::measure(Record {
        originals: &recorded.originals,
        requests: &requests,
        states: &recorded.states,
        sessions: &recorded.sessions,
        substations: &recorded.substations,
        capacity_steps: &steps,
        clock,
        read_at: recorded.read_at,
        allocation: args.live_allocation,
    });
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let delivered = live.metrics.energy_delivered_kwh;
    let row = Row {
        policy: "recorded".to_owned(),
        allocation: "live".to_owned(),
        energy_of_pooled_ratio: ratio(
            delivered,
            report.pooled_reference.metrics.energy_delivered_kwh,
        ),
        energy_upper_bound_ratio: ratio(delivered, report.energy_upper_bound_kwh),
        metrics: live.metrics,
    };
    let last = &recorded.originals[recorded.originals.len() - 1];
    let output = Output {
        window: WindowInfo {
            first: first.stored_at,
            last: last.stored_at,
            first_sequence: recorded.sequences.0,
            last_sequence: recorded.sequences.1,
            read_at: recorded.read_at,
            time_scale: args.time_scale,
            heartbeat_s: heartbeat.as_secs_f64(),
            substations: recorded.substations.clone(),
            limit_messages: recorded.limits.len(),
        },
        arrivals: Arrivals {
            count: recorded.originals.len(),
            energy_kwh: recorded
                .originals
                .iter()
                .map(|o| o.request.energy_kwh)
                .sum(),
            left_out: recorded.left_out,
        },
        differences: Vec::new(),
        export: None,
        recorded: RecordedRow {
            row,
            outcomes: live.outcomes,
            per_substation: live.per_substation,
        },
        report,
    };
    let differences = differences(&output);
    (
        Output {
            differences,
            ..output
        },
        plotted,
    )
}

/// `evgrid sim`'s options for this grid: its substations' capacities and limits over time, the
/// heartbeat, and the policies asked for (the workload options are unused: the requests are the recorded ones).
fn sim_args(
    args: &ReplayArgs,
    substations: &[Substation],
    capacity_changes: Vec<Vec<(f64, f64)>>,
    heartbeat: Duration,
) -> SimArgs {
    SimArgs {
        traces: Vec::new(),
        fold: evgrid_sim::workload::Fold::None,
        vehicle_max_kw: evgrid_sim::DEFAULT_VEHICLE_MAX_KW,
        poisson: None,
        duration: 0.0,
        bursts: Vec::new(),
        energy: evgrid_sim::workload::Range { min: 1.0, max: 1.0 },
        stay: Stay(None),
        seed: 1,
        substations: substations.len() as u32,
        capacity_kw: substations[0].capacity_kw,
        capacities: substations.iter().map(|s| s.capacity_kw).collect(),
        heartbeat,
        defer_delay: None,
        policy: args.policy.clone(),
        allocation: args.allocation.clone(),
        json: args.json,
        plot: args.plot.clone(),
        capacity_changes,
    }
}

/// Where the live grid's figures part from the simulations', in words.
fn differences(o: &Output) -> Vec<String> {
    let mut out = Vec::new();
    let live = &o.recorded.row.metrics;
    for r in &o.report.results {
        let m = &r.metrics;
        let behind = m.energy_delivered_kwh - live.energy_delivered_kwh;
        out.push(format!(
            "{} + {}: the live grid delivered {:.1} kWh {} than simulated ({:.2} % of it), {:+.1} points of sessions fully served",
            r.policy,
            r.allocation,
            behind.abs(),
            if behind >= 0.0 { "less" } else { "more" },
            100.0 * live.energy_delivered_kwh / m.energy_delivered_kwh.max(f64::MIN_POSITIVE),
            100.0 * (live.sessions_fully_served_ratio - m.sessions_fully_served_ratio),
        ));
    }
    out.push(format!(
        "pooled reference: the live grid reached {:.2} % of its energy, {:.2} % of the exact upper bound",
        100.0 * o.recorded.row.energy_of_pooled_ratio,
        100.0 * o.recorded.row.energy_upper_bound_ratio
    ));
    out.push(format!(
        "heartbeat staleness: the simulated dispatcher sees heartbeats every {:.1} simulated s (the live interval × time scale {})",
        o.window.heartbeat_s, o.window.time_scale
    ));
    let c = &o.recorded.outcomes;
    if c.open + c.without_state > 0 {
        out.push(format!(
            "{} requests were not finished when read ({} without a state yet): their energy is still to come, the simulations count it",
            c.open + c.without_state,
            c.without_state
        ));
    }
    for s in &o.recorded.per_substation {
        if s.interruptions + s.resumed + s.moved_away > 0 {
            out.push(format!(
                "{}: {} sessions interrupted, {} resumed after a restart, {} moved away (failover)",
                s.substation_id, s.interruptions, s.resumed, s.moved_away
            ));
        }
    }
    if o.window.limit_messages > 0 {
        out.push(format!(
            "{} grid-operator limit messages: the live substations ran below (or above) their configured capacity for a while",
            o.window.limit_messages
        ));
    }
    out
}

impl Output {
    /// The report for people: the window, the live grid beside the simulations, per substation,
    /// and the differences.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let w = &self.window;
        let a = &self.arrivals;
        let _ = writeln!(
            out,
            "window: {} requests ({:.1} kWh asked) stored {} .. {} (EV_REQUESTS {}..{}), time scale {}, simulated heartbeat {:.1} s",
            a.count,
            a.energy_kwh,
            w.first.to_rfc3339(),
            w.last.to_rfc3339(),
            w.first_sequence,
            w.last_sequence,
            w.time_scale,
            w.heartbeat_s
        );
        let l = &a.left_out;
        if l.moves + l.repeats + l.invalid > 0 {
            let _ = writeln!(
                out,
                "left out: {} move offers (failover), {} repeated ids, {} invalid",
                l.moves, l.repeats, l.invalid
            );
        }
        let grid: Vec<String> = w
            .substations
            .iter()
            .map(|s| format!("{} {} kW", s.id, s.capacity_kw))
            .collect();
        let _ = writeln!(
            out,
            "grid: {}; {} limit messages",
            grid.join(", "),
            w.limit_messages
        );
        out.push_str("as recorded (the live grid):\n");
        out.push_str(&self.report.table_after(&[&self.recorded.row]));
        let c = &self.recorded.outcomes;
        let _ = writeln!(
            out,
            "\nrecorded outcomes: {} delivered, {} departed with less, {} rejected, {} open, {} without a state, {} moves",
            c.delivered, c.departed, c.rejected, c.open, c.without_state, c.moves
        );
        out.push_str("per substation (as recorded):\n");
        let _ = writeln!(
            out,
            "{:<12} {:>9} {:>8} {:>12} {:>11} {:>9} {:>11} {:>7} {:>6}",
            "substation",
            "capacity",
            "requests",
            "energy_kwh",
            "fully_served",
            "peak_util",
            "interrupted",
            "resumed",
            "moved"
        );
        for s in &self.recorded.per_substation {
            let _ = writeln!(
                out,
                "{:<12} {:>9.1} {:>8} {:>12.1} {:>11} {:>9.3} {:>11} {:>7} {:>6}",
                s.substation_id,
                s.capacity_kw,
                s.requests,
                s.energy_delivered_kwh,
                s.sessions_fully_served,
                s.peak_utilization,
                s.interruptions,
                s.resumed,
                s.moved_away
            );
        }
        out.push_str("\ndifferences:\n");
        for d in &self.differences {
            let _ = writeln!(out, "- {d}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        replay: ReplayArgs,
    }

    fn parse(args: &[&str]) -> Result<ReplayArgs, String> {
        Cli::try_parse_from(std::iter::once("replay").chain(args.iter().copied()))
            .map(|c| c.replay)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn windows_and_targets_parse_or_say_why_not() {
        let now = DateTime::parse_from_rfc3339("2026-12-05T10:00:00Z")
            .unwrap()
            .to_utc();
        let a = parse(&["--since", "30m"]).unwrap();
        assert_eq!(
            a.start(now),
            Start::Time(now - chrono::Duration::minutes(30))
        );
        let a = parse(&["--from", "1000", "--until", "2026-12-05T11:00:00Z"]).unwrap();
        assert_eq!(a.start(now), Start::Sequence(1000));
        assert!(a.check().is_ok());
        assert_eq!(parse(&[]).unwrap().start(now), Start::All);
        assert!(parse(&["--since", "1h", "--from", "5"]).is_err());
        assert!(
            parse(&["--from", "5", "--until", "4"])
                .unwrap()
                .check()
                .is_err()
        );
        assert!(parse(&["--from", "soon"]).unwrap_err().contains("RFC 3339"));
        // Re-injection options need a target; one target at most.
        assert!(parse(&["--wait-complete"]).is_err());
        assert!(parse(&["--speed", "2"]).is_err());
        assert!(parse(&["--to-url", "http://a:1", "--to-nats-url", "nats://b:2"]).is_err());
        assert!(
            parse(&[
                "--to-nats-url",
                "nats://b:2",
                "--to-events-nats-url",
                "nats://c:3"
            ])
            .is_err()
        );
        let a = parse(&["--to-url", "http://a:1", "--speed", "60", "--wait-complete"]).unwrap();
        assert_eq!(a.to_url.unwrap().as_str(), "http://a:1/");
        assert!(parse(&["--to-url", "https://a:1"]).is_err());
        assert!(parse(&["--plot", "x.png"]).is_err());
    }
}
