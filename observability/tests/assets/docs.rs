//! The docs keep up with the assets: docs/metrics.md names every evgrid metric, recording rule,
//! alert, dashboard and panel, and the README records the pinned versions.

use evgrid_observability::{
    GRAFANA_IMAGE, GRAFANA_SCHEMA_VERSION, NATS_EXPORTER_IMAGE, PROMETHEUS_IMAGE, Source,
};

use crate::support::{self, panels, read, repo_path};

#[test]
fn metrics_doc_covers_every_metric_rule_alert_and_panel() {
    let doc = read(&repo_path("docs/metrics.md"));
    let mut missing = Vec::new();
    for m in support::known() {
        if matches!(
            m.source,
            Source::Ingest | Source::Dispatcher | Source::Substation
        ) && !doc.contains(&format!("`{}`", m.name))
        {
            missing.push(format!("metric {}", m.name));
        }
    }
    for rule in support::rules() {
        if !doc.contains(&format!("`{}`", rule.name()))
            && !doc.contains(&format!("### {}", rule.name()))
        {
            missing.push(format!("rule {}", rule.name()));
        }
    }
    for d in support::dashboards() {
        let title = d.json["title"].as_str().unwrap();
        if !doc.contains(title) {
            missing.push(format!("dashboard {title}"));
        }
        for p in panels(&d.json) {
            let title = p["title"].as_str().unwrap();
            if !doc.contains(title) {
                missing.push(format!("{} panel {title}", d.file));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/metrics.md does not mention:\n{}",
        missing.join("\n")
    );
}

#[test]
fn readme_records_the_pinned_versions() {
    let readme = read(&support::crate_path("README.md"));
    for pinned in [GRAFANA_IMAGE, PROMETHEUS_IMAGE, NATS_EXPORTER_IMAGE] {
        assert!(readme.contains(pinned), "README.md does not pin {pinned}");
    }
    assert!(readme.contains(&format!("schemaVersion {GRAFANA_SCHEMA_VERSION}")));
}
