//! `evgrid-observability`: how Prometheus and Grafana watch the charge pipeline
//! (ingest → dispatcher → substations, with NATS JetStream underneath).
//!
//! The assets are files beside this crate, mounted as they are by the compose stack
//! ([`COMPOSE_MOUNTS`]): `prometheus/` (scrape config, recording and alert rules, `promtool`
//! rule tests), `grafana/` (provisioning and dashboards) and `known-metrics.yml` (every metric
//! name the rules and dashboards may use). This library renders the Prometheus scrape config
//! for any set of targets ([`prometheus_config`]; the compose file is the rendering of
//! [`Targets::compose`], and `evgrid up` renders one for a local stack on other ports) and reads
//! the list of known metrics ([`known_metrics`]). The crate's tests check every asset.

mod config;
mod known;

pub use config::{SubstationTarget, Targets, jobs, prometheus_config};
pub use known::{
    KNOWN_METRICS_YAML, KnownMetric, KnownMetricsError, MetricType, Source, known_metrics,
};

/// The Grafana image the compose stack runs. The dashboards are written in its classic JSON
/// model, at [`GRAFANA_SCHEMA_VERSION`]; upgrade the two together.
pub const GRAFANA_IMAGE: &str = "grafana/grafana:12.1.1";

/// The dashboard `schemaVersion` Grafana 12.1 saves (its migration to v42 came after 12.1).
pub const GRAFANA_SCHEMA_VERSION: u64 = 41;

/// The Prometheus image the compose stack runs: the release of Debian's `prometheus` package,
/// whose `promtool` runs the rule tests, so the rules are tested by the engine that runs them.
pub const PROMETHEUS_IMAGE: &str = "prom/prometheus:v2.42.0";

/// The NATS exporter image (flags `-varz -connz -jsz=all http://nats:8222`); its metric names
/// are in `known-metrics.yml`, taken from this release's source.
pub const NATS_EXPORTER_IMAGE: &str = "natsio/prometheus-nats-exporter:0.20.1";

/// The uid of the provisioned Prometheus datasource every dashboard panel refers to.
pub const GRAFANA_DATASOURCE_UID: &str = "evgrid-prometheus";

/// A directory of this crate that the compose stack mounts into a container, read-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mount {
    /// The compose service.
    pub service: &'static str,
    /// Path relative to the repository root.
    pub repo_path: &'static str,
    /// Where the service sees it.
    pub container_path: &'static str,
}

/// Every mount the compose stack needs for these assets. Paths inside the assets (rule files,
/// the dashboards folder) are written as the containers see them; a test resolves them back
/// through this table to the files in the repository.
pub const COMPOSE_MOUNTS: &[Mount] = &[
    Mount {
        service: "prometheus",
        repo_path: "observability/prometheus",
        container_path: "/etc/prometheus",
    },
    Mount {
        service: "grafana",
        repo_path: "observability/grafana/provisioning",
        container_path: "/etc/grafana/provisioning",
    },
    Mount {
        service: "grafana",
        repo_path: "observability/grafana/dashboards",
        container_path: "/var/lib/grafana/dashboards",
    },
];
