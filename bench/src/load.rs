//! Drives load at the front of the pipeline with the real `evgrid load` binary (the tool users
//! point at a deployment), as a separate process, and reads its `--json` report.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use crate::procs;

/// The fields of `evgrid load --json` the benchmarks read (docs/load.md, "Output").
#[derive(Debug, Clone, Deserialize)]
pub struct Report {
    pub sent: u64,
    pub accepted: u64,
    pub errors: Errors,
    #[serde(default)]
    pub error_examples: BTreeMap<String, String>,
    pub throughput_rps: f64,
    pub latency_ms: Option<Latency>,
    #[serde(default)]
    pub completed: Option<u64>,
    #[serde(default)]
    pub dispatch_latency_ms: Option<Latency>,
    #[serde(default)]
    pub charging_start_latency_ms: Option<Latency>,
    #[serde(default)]
    pub per_substation: Option<BTreeMap<String, u64>>,
    #[serde(default)]
    pub peak_utilization: Option<f64>,
    #[serde(default)]
    pub herd_factor: Option<f64>,
    pub elapsed_s: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Errors {
    pub total: u64,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Report {
    /// Fails when anything went wrong: a benchmark's figures only count for a clean run.
    pub fn require_clean(&self, what: &str) -> Result<()> {
        if self.errors.total > 0 {
            bail!(
                "{what}: {} of {} requests failed ({:?})",
                self.errors.total,
                self.sent,
                self.error_examples
            );
        }
        Ok(())
    }

    pub fn p50(&self) -> f64 {
        self.latency_ms.map_or(f64::NAN, |l| l.p50)
    }

    pub fn p99(&self) -> f64 {
        self.latency_ms.map_or(f64::NAN, |l| l.p99)
    }
}

/// Runs `evgrid load <args> --json --quiet` and returns its report. Errors are reported in it,
/// not as a failed exit (`--max-error-ratio 1`); the run is bounded by `limit`.
pub async fn run(args: &[String], limit: Duration) -> Result<Report> {
    let evgrid = procs::sibling("evgrid")?;
    let mut command = tokio::process::Command::new(evgrid);
    command
        .arg("load")
        .args(args)
        .args(["--json", "--quiet", "--max-error-ratio", "1"])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    let output = tokio::time::timeout(limit, command.output())
        .await
        .with_context(|| {
            format!(
                "evgrid load {} did not finish within {limit:?}",
                args.join(" ")
            )
        })?
        .context("cannot run evgrid load")?;
    if !output.status.success() {
        bail!(
            "evgrid load {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("unreadable evgrid load report: {line}"))
}

/// Arguments of a closed-loop HTTP run against `url`.
pub fn closed_http(url: &str, concurrency: u32, requests: u64) -> Vec<String> {
    vec![
        "--url".into(),
        url.into(),
        "--concurrency".into(),
        concurrency.to_string(),
        "--requests".into(),
        requests.to_string(),
    ]
}
