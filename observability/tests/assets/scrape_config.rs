//! The compose `prometheus.yml` is exactly what the library renders for the compose targets,
//! Grafana's idea of the scrape interval matches it, and every `job` the rules and dashboards
//! select exists in it.

use std::collections::BTreeSet;

use evgrid_observability::{Targets, jobs, prometheus_config};
use promql_parser::label::MatchOp;

use crate::promql;
use crate::support::{self, crate_path};

const CONFIG: &str = "prometheus/prometheus.yml";

#[test]
fn compose_config_is_the_rendering_of_the_compose_targets() {
    let rendered = prometheus_config(&Targets::compose());
    let path = crate_path(CONFIG);
    if std::env::var_os("EVGRID_UPDATE_ASSETS").is_some() {
        std::fs::write(&path, &rendered).unwrap();
    }
    let checked_in = support::read(&path);
    assert!(
        checked_in == rendered,
        "{CONFIG} differs from prometheus_config(&Targets::compose()); run \
         `EVGRID_UPDATE_ASSETS=1 cargo test -p evgrid-observability` to rewrite it.\n\
         --- checked in\n{checked_in}\n--- rendered\n{rendered}"
    );
}

#[test]
fn compose_config_scrapes_every_component() {
    let config = support::yaml(CONFIG);
    let scrape = config["scrape_configs"].as_sequence().unwrap();
    let job = |name: &str| {
        scrape
            .iter()
            .find(|j| j["job_name"] == name)
            .unwrap_or_else(|| panic!("no job {name}"))
    };
    let targets = |name: &str| -> Vec<String> {
        job(name)["static_configs"]
            .as_sequence()
            .unwrap()
            .iter()
            .flat_map(|sc| sc["targets"].as_sequence().unwrap().clone())
            .map(|t| t.as_str().unwrap().to_owned())
            .collect()
    };
    // Each replica by itself: through the balancer a scrape would reach either at random.
    assert_eq!(targets(jobs::INGEST), ["ingest:8080", "ingest-2:8080"]);
    assert_eq!(targets(jobs::DISPATCHER), ["dispatcher:9101"]);
    assert_eq!(
        targets(jobs::SUBSTATION),
        [
            "substation-1:9102",
            "substation-2:9102",
            "substation-3:9102"
        ]
    );
    assert_eq!(targets(jobs::NATS), ["nats-exporter:7777"]);
    assert_eq!(targets(jobs::PROMETHEUS), ["localhost:9090"]);
    let ids: Vec<&str> = job(jobs::SUBSTATION)["static_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|sc| sc["labels"]["substation"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["substation-1", "substation-2", "substation-3"]);
    assert_eq!(config["global"]["scrape_interval"], "5s");
}

#[test]
fn grafana_knows_the_scrape_interval() {
    // $__rate_interval is max($__interval + scrape interval, 4 × scrape interval), with the
    // scrape interval taken from the datasource's timeInterval.
    let datasources = support::yaml("grafana/provisioning/datasources/prometheus.yml");
    let config = support::yaml(CONFIG);
    assert_eq!(
        datasources["datasources"][0]["jsonData"]["timeInterval"],
        config["global"]["scrape_interval"]
    );
}

#[test]
fn every_selected_job_is_scraped() {
    let config = support::yaml(CONFIG);
    let scraped: BTreeSet<String> = config["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|j| j["job_name"].as_str().unwrap().to_owned())
        .collect();
    let mut exprs: Vec<(String, String)> = support::rules()
        .into_iter()
        .map(|r| (r.name().to_owned(), r.expr))
        .collect();
    for d in support::dashboards() {
        for panel in support::panels(&d.json) {
            for t in panel["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or_default().to_owned();
                exprs.push((format!("{} {}", d.file, panel["title"]), expr));
            }
        }
    }
    let mut checked = 0;
    for (whence, text) in exprs {
        let expr = promql::parse_or_panic(&text, &whence);
        for vs in promql::selectors(&expr) {
            for m in vs.matchers.matchers.iter().filter(|m| m.name == "job") {
                // Equality, or a regex that is a plain alternation of job names.
                let names: Vec<&str> = match &m.op {
                    MatchOp::Equal | MatchOp::NotEqual => vec![m.value.as_str()],
                    MatchOp::Re(_) | MatchOp::NotRe(_) => m.value.split('|').collect(),
                };
                for name in names {
                    assert!(
                        scraped.contains(name),
                        "{whence}: job {name:?} is not scraped ({scraped:?})"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(
        checked >= 5,
        "expected job selectors in rules and dashboards"
    );
}
