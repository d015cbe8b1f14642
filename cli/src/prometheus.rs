//! The Prometheus config `evgrid up` generates for its local stack: the same jobs, labels and
//! rules as the compose stack (rendered by `evgrid_observability`), on this stack's ports.

use std::path::PathBuf;
use std::time::Duration;

use evgrid_observability::{SubstationTarget, Targets, prometheus_config};

use crate::up::Endpoints;

/// Renders `prometheus.yml` scraping every component of `endpoints` every `scrape_interval`
/// (rules evaluated as often), Prometheus itself on `port`.
pub fn local_config(endpoints: &Endpoints, port: u16, scrape_interval: Duration) -> String {
    let rules =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../observability/prometheus/rules/*.yml");
    prometheus_config(&Targets {
        scrape_interval,
        rule_files: vec![rules.display().to_string()],
        ingest: vec![endpoints.ingest.to_string()],
        dispatcher: vec![endpoints.dispatcher_metrics.to_string()],
        substations: endpoints
            .substations
            .iter()
            .map(|(id, _, addr)| SubstationTarget {
                id: id.clone(),
                address: addr.to_string(),
            })
            .collect(),
        // No NATS exporter runs locally; the NATS dashboard is a compose-stack feature.
        nats_exporter: Vec::new(),
        prometheus: vec![format!("127.0.0.1:{port}")],
    })
}
