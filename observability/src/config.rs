//! The Prometheus scrape configuration for a set of evgrid targets: one job per component
//! (ingest, dispatcher, substation, the NATS exporter, Prometheus itself), each substation
//! target labelled with its id so `up{job="substation"}` names the substation that is down.

use std::fmt::Write as _;
use std::time::Duration;

/// Scrape job names. Rules and dashboards select on them (`up{job="substation"}`).
pub mod jobs {
    pub const INGEST: &str = "ingest";
    pub const DISPATCHER: &str = "dispatcher";
    pub const SUBSTATION: &str = "substation";
    /// prometheus-nats-exporter, which reads the NATS server's monitoring port.
    pub const NATS: &str = "nats";
    pub const PROMETHEUS: &str = "prometheus";
}

/// A substation's `/metrics` endpoint and the id it runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubstationTarget {
    /// The substation id (`--id`), set as the target's `substation` label.
    pub id: String,
    /// `host:port` of its HTTP endpoint.
    pub address: String,
}

/// Everything Prometheus scrapes, as `host:port` addresses. A job with no target is left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    /// Scrape and rule evaluation interval. Grafana's datasource `timeInterval` must match it,
    /// since `$__rate_interval` is computed from it.
    pub scrape_interval: Duration,
    /// Rule files (globs allowed), relative to the config file or absolute.
    pub rule_files: Vec<String>,
    pub ingest: Vec<String>,
    pub dispatcher: Vec<String>,
    pub substations: Vec<SubstationTarget>,
    /// prometheus-nats-exporter endpoints (job `nats`).
    pub nats_exporter: Vec<String>,
    /// Prometheus itself.
    pub prometheus: Vec<String>,
}

impl Targets {
    /// The compose stack: the ingest replicas `ingest` and `ingest-2` (8080 each, scraped one
    /// by one, not through the `api` balancer in front of them), `dispatcher` (9101),
    /// `substation-1..3` (9102 each), `nats-exporter` (7777) and `prometheus` (9090), rules
    /// mounted beside the config in `/etc/prometheus/rules/`.
    pub fn compose() -> Self {
        Self {
            scrape_interval: Duration::from_secs(5),
            rule_files: vec!["rules/*.yml".to_owned()],
            ingest: vec!["ingest:8080".to_owned(), "ingest-2:8080".to_owned()],
            dispatcher: vec!["dispatcher:9101".to_owned()],
            substations: (1..=3)
                .map(|n| SubstationTarget {
                    id: format!("substation-{n}"),
                    address: format!("substation-{n}:9102"),
                })
                .collect(),
            nats_exporter: vec!["nats-exporter:7777".to_owned()],
            prometheus: vec!["localhost:9090".to_owned()],
        }
    }
}

/// Renders `prometheus.yml` for `targets`. The output is deterministic, so the checked-in
/// compose file can be compared with the rendering of [`Targets::compose`].
pub fn prometheus_config(targets: &Targets) -> String {
    let interval = duration(targets.scrape_interval);
    let mut out = String::new();
    out.push_str(
        "# Prometheus configuration of the evgrid stack, rendered by\n\
         # evgrid_observability::prometheus_config. Do not edit by hand: the compose file is checked\n\
         # against the rendering of Targets::compose (EVGRID_UPDATE_ASSETS=1 cargo test -p\n\
         # evgrid-observability rewrites it).\n",
    );
    let _ = write!(
        out,
        "global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n  evaluation_interval: {interval}\n"
    );
    if !targets.rule_files.is_empty() {
        out.push_str("\nrule_files:\n");
        for file in &targets.rule_files {
            let _ = writeln!(out, "  - {}", quote(file));
        }
    }
    out.push_str("\nscrape_configs:\n");
    simple_job(&mut out, jobs::INGEST, &targets.ingest);
    simple_job(&mut out, jobs::DISPATCHER, &targets.dispatcher);
    if !targets.substations.is_empty() {
        let _ = writeln!(out, "  - job_name: {}", jobs::SUBSTATION);
        // The target's `substation` label names the substation on `up` (SubstationDown);
        // honor_labels keeps the identical label the service exports on its own metrics
        // instead of renaming it to `exported_substation`.
        out.push_str("    honor_labels: true\n    static_configs:\n");
        for s in &targets.substations {
            let _ = writeln!(
                out,
                "      - targets: [{}]\n        labels:\n          substation: {}",
                quote(&s.address),
                quote(&s.id)
            );
        }
    }
    simple_job(&mut out, jobs::NATS, &targets.nats_exporter);
    simple_job(&mut out, jobs::PROMETHEUS, &targets.prometheus);
    out
}

fn simple_job(out: &mut String, job: &str, addresses: &[String]) {
    if addresses.is_empty() {
        return;
    }
    let list = addresses
        .iter()
        .map(|a| quote(a))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(
        out,
        "  - job_name: {job}\n    static_configs:\n      - targets: [{list}]"
    );
}

/// A YAML double-quoted scalar.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(q, "\\u{:04x}", c as u32);
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// A Prometheus duration: whole seconds as `5s`, anything finer in milliseconds.
fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> Targets {
        Targets {
            scrape_interval: Duration::from_millis(2500),
            rule_files: vec!["/repo/observability/prometheus/rules/*.yml".to_owned()],
            ingest: vec!["127.0.0.1:18080".to_owned()],
            dispatcher: vec!["127.0.0.1:19101".to_owned(), "127.0.0.1:19111".to_owned()],
            substations: vec![SubstationTarget {
                id: "north".to_owned(),
                address: "127.0.0.1:19102".to_owned(),
            }],
            nats_exporter: vec![],
            prometheus: vec!["127.0.0.1:19090".to_owned()],
        }
    }

    #[test]
    fn renders_every_job_with_its_targets() {
        let yaml = prometheus_config(&local());
        let config: serde_norway::Value = serde_norway::from_str(&yaml).unwrap();
        assert_eq!(config["global"]["scrape_interval"], "2500ms");
        assert_eq!(
            config["rule_files"][0],
            "/repo/observability/prometheus/rules/*.yml"
        );
        let jobs: Vec<&str> = config["scrape_configs"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|j| j["job_name"].as_str().unwrap())
            .collect();
        // No exporter in this stack: its job is left out rather than left empty.
        assert_eq!(jobs, ["ingest", "dispatcher", "substation", "prometheus"]);
        let dispatcher = &config["scrape_configs"][1]["static_configs"][0]["targets"];
        assert_eq!(dispatcher[1], "127.0.0.1:19111");
        let substation = &config["scrape_configs"][2];
        assert_eq!(substation["honor_labels"], true);
        assert_eq!(
            substation["static_configs"][0]["labels"]["substation"],
            "north"
        );
        assert_eq!(
            substation["static_configs"][0]["targets"][0],
            "127.0.0.1:19102"
        );
    }

    #[test]
    fn strings_are_quoted_for_yaml() {
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
        let parsed: String = serde_norway::from_str(&quote("x: [y] # z\n")).unwrap();
        assert_eq!(parsed, "x: [y] # z\n");
    }

    #[test]
    fn durations_in_prometheus_syntax() {
        assert_eq!(duration(Duration::from_secs(5)), "5s");
        assert_eq!(duration(Duration::from_secs(60)), "60s");
        assert_eq!(duration(Duration::from_millis(250)), "250ms");
    }
}
