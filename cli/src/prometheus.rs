//! The Prometheus config `evgrid up` generates for its local stack: the same jobs, labels and
//! rules as the compose stack (rendered by `evgrid_observability`), on this stack's ports. The
//! rules are built into the binary and written beside the config, so `evgrid up` works from any
//! directory, not only from the repository.

use std::path::Path;
use std::time::Duration;

use evgrid_observability::{SubstationTarget, Targets, prometheus_config};

use crate::up::Endpoints;

/// The repository's rule files, by file name, as built into this binary.
pub const RULE_FILES: [(&str, &str); 1] = [(
    "evgrid.rules.yml",
    include_str!("../../observability/prometheus/rules/evgrid.rules.yml"),
)];

/// Writes [`RULE_FILES`] into `dir/rules/` and `prometheus.yml` into `dir`, scraping every
/// component of `endpoints` every `scrape_interval` (rules evaluated as often), Prometheus itself
/// on `port`.
pub fn write_local_config(
    dir: &Path,
    endpoints: &Endpoints,
    port: u16,
    scrape_interval: Duration,
) -> std::io::Result<()> {
    let rules = dir.join("rules");
    std::fs::create_dir_all(&rules)?;
    for (name, text) in RULE_FILES {
        std::fs::write(rules.join(name), text)?;
    }
    let config = local_config(endpoints, port, scrape_interval);
    std::fs::write(dir.join("prometheus.yml"), config)
}

/// Renders `prometheus.yml` for `endpoints`, loading every `*.yml` in `rules/` beside it.
fn local_config(endpoints: &Endpoints, port: u16, scrape_interval: Duration) -> String {
    prometheus_config(&Targets {
        scrape_interval,
        // Prometheus resolves rule paths from the config file's directory.
        rule_files: vec!["rules/*.yml".to_owned()],
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
