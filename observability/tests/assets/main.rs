//! Checks every observability asset without a running Prometheus or Grafana: the scrape config
//! against its renderer, promtool's config/rule checks and rule unit tests, every PromQL
//! expression of the rules and dashboards parsed and its metric names looked up in
//! `known-metrics.yml`, the dashboards' structure against the Grafana provisioning, and the
//! docs against all of them.

mod dashboards;
mod docs;
mod promql;
mod promtool;
mod rules;
mod scrape_config;
mod support;
