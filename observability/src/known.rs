//! The checked-in list of every metric the rules and dashboards may use
//! (`known-metrics.yml`): what ingest, the dispatcher and the substations export, the process
//! metrics, Prometheus' own scrape series, and the prometheus-nats-exporter's names. A name
//! missing from it (a typo in a panel, a renamed metric) fails the asset tests.

use serde::Deserialize;

/// The text of `known-metrics.yml`, compiled in.
pub const KNOWN_METRICS_YAML: &str = include_str!("../known-metrics.yml");

/// Prometheus metric types, as in `# TYPE` lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
}

/// Who exports a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    Ingest,
    Dispatcher,
    Substation,
    /// The process collector, in every evgrid service (and Prometheus itself).
    Process,
    /// Series Prometheus writes for every scrape (`up`, `scrape_*`).
    Prometheus,
    /// prometheus-nats-exporter.
    NatsExporter,
}

/// One entry of the list.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnownMetric {
    /// The name as exported (a histogram's base name, without `_bucket`/`_sum`/`_count`).
    pub name: String,
    #[serde(rename = "type")]
    pub kind: MetricType,
    pub source: Source,
    /// The unit, when the name's suffix does not say it all (e.g. `kW`).
    #[serde(default)]
    pub unit: Option<String>,
    /// Labels besides `job` and `instance` (and `le` on buckets).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Histograms: the bucket boundaries alert thresholds sit on; the service exports at
    /// least these.
    #[serde(default)]
    pub boundaries: Vec<f64>,
    /// Exported with samples only by substations with `--chargers ocpp` (per-station series).
    #[serde(default)]
    pub ocpp_only: bool,
    pub help: String,
}

impl KnownMetric {
    /// The series names the metric appears under in queries.
    pub fn series_names(&self) -> Vec<String> {
        match self.kind {
            MetricType::Histogram => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|suffix| format!("{}{suffix}", self.name))
                .collect(),
            MetricType::Counter | MetricType::Gauge => vec![self.name.clone()],
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// Shared label lists, referenced from the metrics with YAML aliases.
    #[serde(default, rename = "label_sets")]
    _label_sets: serde_norway::Value,
    metrics: Vec<KnownMetric>,
}

/// Why the list cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum KnownMetricsError {
    #[error("known-metrics.yml is not valid: {0}")]
    Yaml(#[from] serde_norway::Error),
    #[error("known-metrics.yml lists {0} twice")]
    Duplicate(String),
}

/// Every known metric, in the order of the file.
pub fn known_metrics() -> Result<Vec<KnownMetric>, KnownMetricsError> {
    let file: File = serde_norway::from_str(KNOWN_METRICS_YAML)?;
    let mut seen = std::collections::BTreeSet::new();
    for m in &file.metrics {
        for name in m.series_names() {
            if !seen.insert(name.clone()) {
                return Err(KnownMetricsError::Duplicate(name));
            }
        }
    }
    Ok(file.metrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_parses_without_duplicates() {
        let metrics = known_metrics().unwrap();
        assert!(metrics.len() > 50);
        let e2e = metrics
            .iter()
            .find(|m| m.name == "evgrid_request_accept_to_charging_seconds")
            .unwrap();
        assert_eq!(e2e.kind, MetricType::Histogram);
        assert_eq!(
            e2e.series_names(),
            [
                "evgrid_request_accept_to_charging_seconds_bucket",
                "evgrid_request_accept_to_charging_seconds_sum",
                "evgrid_request_accept_to_charging_seconds_count"
            ]
        );
    }

    #[test]
    fn evgrid_names_follow_the_conventions() {
        // Issue 4: one `evgrid_` prefix (the legacy kW gauge excepted), counters end in
        // `_total`, base units.
        for m in known_metrics().unwrap() {
            if !matches!(
                m.source,
                Source::Ingest | Source::Dispatcher | Source::Substation
            ) {
                continue;
            }
            if m.name == "substation_current_load" {
                assert_eq!(m.unit.as_deref(), Some("kW"));
                continue;
            }
            assert!(m.name.starts_with("evgrid_"), "{}", m.name);
            assert_eq!(
                m.kind == MetricType::Counter,
                m.name.ends_with("_total"),
                "{}: counters, and only counters, end in _total",
                m.name
            );
            if m.kind == MetricType::Histogram {
                assert!(m.name.ends_with("_seconds"), "{}", m.name);
            }
            for forbidden in ["_kw", "_kwh", "_milliseconds", "_ms"] {
                assert!(!m.name.contains(forbidden), "{}: not a base unit", m.name);
            }
            for label in &m.labels {
                assert!(
                    !label.ends_with("_id") && label != "request" && label != "vehicle",
                    "{}: label {label} would hold ids",
                    m.name
                );
            }
        }
    }
}
