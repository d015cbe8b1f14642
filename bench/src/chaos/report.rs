//! The chaos suite's output: one row per scenario (the Markdown table of docs/reliability.md),
//! the same figures and more as JSON, and the verdict: which scenarios lost, doubled or
//! overloaded anything, which fails the run.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use super::ChaosArgs;
use super::check::{Accounting, Verdict};
use super::drive::LoadOutcome;
use super::fault::{Scenario, Shape};
use super::read::HeartbeatCheck;
use super::recovery::Recovery;

/// Everything one scenario measured.
#[derive(Debug, serde::Serialize)]
pub struct ScenarioResult {
    pub scenario: Scenario,
    pub shape: Shape,
    /// Seconds after the load started when the fault struck, and when its target was back.
    pub fault_at_s: Option<f64>,
    pub back_at_s: Option<f64>,
    pub load: LoadOutcome,
    /// Seconds after the load until every accepted request was final; `None`: not within the
    /// drain window.
    pub drained_s: Option<f64>,
    pub accounting: Accounting,
    pub heartbeats: HeartbeatCheck,
    pub recovery: Option<Recovery>,
    /// p99 accept → completed against the `none` run's.
    pub p99_ratio: Option<f64>,
    /// A service that died though no fault hit it.
    pub crashed: Option<String>,
}

impl ScenarioResult {
    /// Why this scenario fails the run (lost, stuck, doubled, inconsistent, a 202 not stored,
    /// above capacity, crashed).
    pub fn failures(&self) -> Vec<String> {
        let a = &self.accounting;
        let mut out = Vec::new();
        if a.unstored > 0 {
            out.push(format!("{} accepted but not in EV_REQUESTS", a.unstored));
        }
        for v in [
            Verdict::Lost,
            Verdict::Stuck,
            Verdict::Doubled,
            Verdict::Inconsistent,
        ] {
            if a.count(v) > 0 {
                out.push(format!("{} {v:?}", a.count(v)));
            }
        }
        if self.heartbeats.above_capacity > 0 {
            out.push(format!(
                "{} heartbeats above capacity",
                self.heartbeats.above_capacity
            ));
        }
        if let Some(c) = &self.crashed {
            out.push(c.clone());
        }
        out
    }
}

/// The whole run.
#[derive(Debug, serde::Serialize)]
pub struct ChaosReport {
    pub finished_at: DateTime<Utc>,
    pub rate: f64,
    pub duration_s: f64,
    pub fault_at_s: f64,
    pub drain_s: f64,
    pub capacity_kw: f64,
    pub time_scale: f64,
    pub energy_kwh: String,
    pub max_power_kw: String,
    pub scenarios: Vec<ScenarioResult>,
}

impl ChaosReport {
    pub fn new(args: &ChaosArgs) -> Self {
        Self {
            finished_at: Utc::now(),
            rate: args.rate,
            duration_s: args.duration.as_secs_f64(),
            fault_at_s: args.fault_at.as_secs_f64(),
            drain_s: args.drain.as_secs_f64(),
            capacity_kw: args.capacity_kw,
            time_scale: args.time_scale,
            energy_kwh: args.energy_kwh.clone(),
            max_power_kw: args.max_power_kw.clone(),
            scenarios: Vec::new(),
        }
    }

    /// Adds a scenario's result, its p99 compared with its reference's (`none` or
    /// `none-cluster`) when that ran.
    pub fn push(&mut self, mut result: ScenarioResult) {
        let reference = self
            .scenarios
            .iter()
            .find(|r| r.scenario == result.scenario.reference())
            .and_then(|r| r.accounting.p99_ms);
        if let (Some(p99), Some(reference)) = (result.accounting.p99_ms, reference) {
            result.p99_ratio = Some(p99 / reference);
        }
        self.finished_at = Utc::now();
        self.scenarios.push(result);
    }

    /// One line per failing scenario; empty when the run passes.
    pub fn failing(&self) -> Vec<String> {
        self.scenarios
            .iter()
            .filter_map(|r| {
                let f = r.failures();
                (!f.is_empty()).then(|| format!("{}: {}", r.scenario.name(), f.join(", ")))
            })
            .collect()
    }

    pub fn markdown(&self) -> String {
        let mut out = format!(
            "\n### Chaos: every 202 accounted for\n\n{} req/s for {} s ({} kWh at {} kW), one fault {} s in, drain window {} s; 3 substations of {} kW at time scale {}. Each scenario runs on a fresh grid: one nats-server, or a 3-node cluster at R3 (`none-cluster` and after), and one ingest and one dispatcher, or two where the scenario kills one of two.\n\n",
            self.rate,
            self.duration_s,
            self.energy_kwh,
            self.max_power_kw,
            self.fault_at_s,
            self.drain_s,
            self.capacity_kw,
            self.time_scale
        );
        out.push('|');
        for header in COLUMNS {
            let _ = write!(out, " {header} |");
        }
        // Numbers right-aligned, the recovery's words left.
        out.push_str("\n|---|");
        out.push_str(&"---:|".repeat(COLUMNS.len() - 3));
        out.push_str("---|---:|\n");
        for r in &self.scenarios {
            out.push('|');
            for cell in row(r) {
                let _ = write!(out, " {cell} |");
            }
            out.push('\n');
        }
        out.push_str("\n| scenario | NATS nodes / ingests / dispatchers | fault at s | back at s | connection errors | unanswered | all final after s | p50 / p99 / max accept → completed, s | heartbeats |\n|---|---|---:|---:|---:|---:|---:|---|---:|\n");
        for r in &self.scenarios {
            let a = &r.accounting;
            let s = |x: Option<f64>| x.map_or("–".into(), |x| format!("{x:.2}"));
            let ms = |x: Option<f64>| s(x.map(|x| x / 1e3));
            let _ = writeln!(
                out,
                "| {} | {} / {} / {} | {} | {} | {} | {} | {} | {} / {} / {} | {} |",
                r.scenario.name(),
                r.shape.nats_nodes,
                r.shape.ingests,
                r.shape.dispatchers,
                s(r.fault_at_s),
                s(r.back_at_s),
                r.load.connection_errors,
                r.load.unanswered,
                r.drained_s
                    .map_or_else(|| "not within the window".into(), |x| format!("{x:.2}")),
                ms(a.p50_ms),
                ms(a.p99_ms),
                ms(a.max_ms),
                r.heartbeats.heartbeats,
            );
        }
        out
    }
}

fn recovery_cell(r: Option<&Recovery>) -> String {
    let Some(r) = r else {
        return "–".into();
    };
    let time = r.seconds.map_or("never".into(), |s| format!("{s:.2} s"));
    match &r.sessions {
        Some(h) => {
            let mut cell = format!(
                "{time} ({} held, {} resumed, {} from 0 kWh",
                h.held, h.resumed, h.from_zero
            );
            if h.elsewhere > 0 {
                let _ = write!(cell, ", {} completed elsewhere", h.elsewhere);
            }
            cell + ")"
        }
        None => format!("{time} ({})", r.what),
    }
}

/// The columns of the main table.
const COLUMNS: [&str; 12] = [
    "scenario",
    "accepted",
    "202 not stored",
    "completed once",
    "rejected",
    "lost",
    "stuck",
    "doubled",
    "above capacity",
    "503s",
    "recovery",
    "p99 ratio",
];

/// A scenario's cells of the main table, in [`COLUMNS`] order.
fn row(r: &ScenarioResult) -> [String; 12] {
    let a = &r.accounting;
    let stuck = a.count(Verdict::Stuck).to_string();
    let mut doubled = a.count(Verdict::Doubled).to_string();
    if a.count(Verdict::Inconsistent) > 0 {
        let _ = write!(
            doubled,
            " (+{} inconsistent)",
            a.count(Verdict::Inconsistent)
        );
    }
    [
        r.scenario.name().to_owned(),
        a.accepted.to_string(),
        a.unstored.to_string(),
        a.count(Verdict::CompletedOnce).to_string(),
        a.count(Verdict::Rejected).to_string(),
        a.count(Verdict::Lost).to_string(),
        stuck,
        doubled,
        r.heartbeats.above_capacity.to_string(),
        r.load.status_503.to_string(),
        recovery_cell(r.recovery.as_ref()),
        r.p99_ratio.map_or("–".into(), |x| format!("{x:.2}×")),
    ]
}

/// One line for stderr as each scenario ends: the table's row in words.
pub fn summary_line(r: &ScenarioResult) -> String {
    let cells = row(r);
    let words: Vec<String> = COLUMNS[1..]
        .iter()
        .zip(&cells[1..])
        .map(|(header, cell)| format!("{header} {cell}"))
        .collect();
    format!("{}: {}", cells[0], words.join(", "))
}
