//! What `evgrid sim` reports for each policy × allocation and for the pooled reference: the
//! fields docs/dispatch.md compares, as a table for people or one JSON object for scripts.

use std::fmt::Write;

use serde::Serialize;

/// The outcome of one simulation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    /// Energy the requests asked for (kWh).
    pub energy_requested_kwh: f64,
    /// Energy the cars got before they left (kWh).
    pub energy_delivered_kwh: f64,
    pub energy_delivered_ratio: f64,
    /// Requests whose energy was delivered in full, over all requests.
    pub sessions_fully_served_ratio: f64,
    /// Instants at which any substation drew above its capacity (0: the allocation holds).
    pub capacity_violations: u64,
    /// Highest load ÷ capacity of any substation at any instant.
    pub peak_utilization: f64,
    /// Largest requests sent to one substation in one heartbeat interval ÷ its
    /// capacity-weighted fair share of that interval's requests, over intervals with at least
    /// 10 requests; `null` when there are none.
    pub herd_factor: Option<f64>,
    /// 95th percentile of the wait from request to first power (a car that never got power
    /// waited until it left or was rejected); requests rejected at once do not count.
    pub wait_p95_s: f64,
    /// Decisions per second of the decision function in this run (wall clock; the only field
    /// that is not deterministic).
    pub decisions_per_s: f64,
    /// Wall-clock seconds this simulation took (not deterministic either).
    pub sim_seconds: f64,
}

/// One row of the results: the policies and their metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub policy: String,
    pub allocation: String,
    #[serde(flatten)]
    pub metrics: Metrics,
    /// Energy delivered ÷ the pooled reference's.
    pub energy_of_pooled_ratio: f64,
    /// Energy delivered ÷ [`Report::energy_upper_bound_kwh`].
    pub energy_upper_bound_ratio: f64,
}

/// `--json`: `{"results": [...], "pooled_reference": {...}, "energy_upper_bound_kwh": ...,
/// "energy_upper_bound_seconds": ...}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub results: Vec<Row>,
    pub pooled_reference: Row,
    /// The most energy any allocation could deliver on the pooled grid (`crate::bound`).
    pub energy_upper_bound_kwh: f64,
    /// Wall-clock seconds computing it took.
    pub energy_upper_bound_seconds: f64,
}

const COLUMNS: [&str; 14] = [
    "policy",
    "allocation",
    "energy_requested_kwh",
    "energy_delivered_kwh",
    "energy_delivered_ratio",
    "energy_of_pooled_ratio",
    "energy_upper_bound_ratio",
    "sessions_fully_served_ratio",
    "capacity_violations",
    "peak_utilization",
    "herd_factor",
    "wait_p95_s",
    "decisions_per_s",
    "sim_seconds",
];

impl Row {
    fn cells(&self) -> [String; 14] {
        let m = &self.metrics;
        [
            self.policy.clone(),
            self.allocation.clone(),
            format!("{:.1}", m.energy_requested_kwh),
            format!("{:.1}", m.energy_delivered_kwh),
            format!("{:.4}", m.energy_delivered_ratio),
            format!("{:.4}", self.energy_of_pooled_ratio),
            format!("{:.4}", self.energy_upper_bound_ratio),
            format!("{:.4}", m.sessions_fully_served_ratio),
            m.capacity_violations.to_string(),
            format!("{:.3}", m.peak_utilization),
            m.herd_factor
                .map_or_else(|| "null".to_owned(), |h| format!("{h:.2}")),
            format!("{:.0}", m.wait_p95_s),
            format!("{:.0}", m.decisions_per_s),
            format!("{:.2}", m.sim_seconds),
        ]
    }
}

impl Report {
    /// A plain-text table: one line per result, then the pooled reference.
    pub fn table(&self) -> String {
        self.table_after(&[])
    }

    /// [`Report::table`] with `recorded` rows first (what a live grid did, beside the
    /// simulations of the same requests: `evgrid replay`).
    pub fn table_after(&self, recorded: &[&Row]) -> String {
        let rows: Vec<[String; 14]> = recorded
            .iter()
            .copied()
            .chain(&self.results)
            .chain(std::iter::once(&self.pooled_reference))
            .map(Row::cells)
            .collect();
        let widths: Vec<usize> = (0..COLUMNS.len())
            .map(|c| {
                rows.iter()
                    .map(|r| r[c].len())
                    .chain(std::iter::once(COLUMNS[c].len()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        let line = |out: &mut String, cells: &[&str]| {
            for (c, cell) in cells.iter().enumerate() {
                let sep = if c == 0 { "" } else { "  " };
                // Names left, numbers right.
                if c < 2 {
                    let _ = write!(out, "{sep}{cell:<w$}", w = widths[c]);
                } else {
                    let _ = write!(out, "{sep}{cell:>w$}", w = widths[c]);
                }
            }
            out.push('\n');
        };
        let _ = writeln!(
            out,
            "exact upper bound of the pooled energy: {:.1} kWh (max flow over time slots, {:.2} s)",
            self.energy_upper_bound_kwh, self.energy_upper_bound_seconds
        );
        line(&mut out, &COLUMNS);
        for (i, row) in rows.iter().enumerate() {
            if !recorded.is_empty() && i == recorded.len() {
                out.push_str("simulated on the same requests:\n");
            }
            if i == recorded.len() + self.results.len() {
                out.push_str("pooled reference (one substation holding the combined capacity):\n");
            }
            let cells: Vec<&str> = row.iter().map(String::as_str).collect();
            line(&mut out, &cells);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(policy: &str, herd: Option<f64>) -> Row {
        Row {
            policy: policy.into(),
            allocation: "llf".into(),
            metrics: Metrics {
                energy_requested_kwh: 100.0,
                energy_delivered_kwh: 95.5,
                energy_delivered_ratio: 0.955,
                sessions_fully_served_ratio: 0.9,
                capacity_violations: 0,
                peak_utilization: 1.0,
                herd_factor: herd,
                wait_p95_s: 12.0,
                decisions_per_s: 5e6,
                sim_seconds: 0.2,
            },
            energy_of_pooled_ratio: 1.0,
            energy_upper_bound_ratio: 0.99,
        }
    }

    #[test]
    fn json_has_results_and_the_pooled_reference_with_the_issue_fields() {
        let report = Report {
            results: vec![row("predictive", Some(1.1))],
            pooled_reference: row("pooled", None),
            energy_upper_bound_kwh: 96.0,
            energy_upper_bound_seconds: 0.01,
        };
        let json = serde_json::to_value(&report).unwrap();
        let result = &json["results"][0];
        for field in COLUMNS {
            assert!(result.get(field).is_some(), "{field} missing");
            assert!(
                json["pooled_reference"].get(field).is_some(),
                "{field} missing"
            );
        }
        assert_eq!(
            json["pooled_reference"]["herd_factor"],
            serde_json::Value::Null
        );
        assert_eq!(result.as_object().unwrap().len(), COLUMNS.len());
        assert_eq!(json["energy_upper_bound_kwh"], 96.0);
        assert!(json["energy_upper_bound_seconds"].is_number());
    }

    #[test]
    fn the_table_lines_up() {
        let report = Report {
            results: vec![row("predictive", Some(1.1)), row("round-robin", None)],
            pooled_reference: row("pooled", None),
            energy_upper_bound_kwh: 96.0,
            energy_upper_bound_seconds: 0.01,
        };
        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 6);
        assert!(lines[0].starts_with("exact upper bound") && lines[0].contains("96.0 kWh"));
        let lines = &lines[1..];
        assert!(lines[0].starts_with("policy"));
        assert!(lines[2].starts_with("round-robin") && lines[2].contains("null"));
        assert_eq!(lines[1].len(), lines[0].len());
    }
}
