//! The Grafana side, without a Grafana: provisioning points at the folders in the repository
//! (through the compose mounts), and each dashboard is well formed for the pinned Grafana
//! (schemaVersion, unique ids, no overlapping panels, core panel types), uses only the
//! provisioned datasource, defines every variable it uses, filters by its variables, takes rates
//! over `$__rate_interval`, and queries only known metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use evgrid_observability::{
    COMPOSE_MOUNTS, GRAFANA_DATASOURCE_UID, GRAFANA_SCHEMA_VERSION, KnownMetric,
};
use promql_parser::label::MatchOp;
use serde_json::Value;

use crate::promql;
use crate::support::{self, Dashboard, panels, repo_path};

/// Panel types that ship with Grafana (no plugin to install).
const CORE_PANELS: &[&str] = &["row", "timeseries", "stat", "heatmap", "state-timeline"];

/// Maps a path as a container sees it back to the repository, through the compose mounts.
fn in_repo(service: &str, container_path: &str) -> PathBuf {
    let mount = COMPOSE_MOUNTS
        .iter()
        .filter(|m| m.service == service)
        .find(|m| container_path.starts_with(m.container_path))
        .unwrap_or_else(|| panic!("{service} does not mount {container_path}"));
    let rest = container_path[mount.container_path.len()..].trim_start_matches('/');
    repo_path(mount.repo_path).join(rest)
}

#[test]
fn mounts_exist_in_the_repository() {
    for m in COMPOSE_MOUNTS {
        assert!(
            repo_path(m.repo_path).is_dir(),
            "{} mounts {}, which is not a directory",
            m.service,
            m.repo_path
        );
    }
}

#[test]
fn provisioning_points_at_the_repository_folders() {
    // Grafana reads its provisioning from /etc/grafana/provisioning/{datasources,dashboards}.
    for kind in ["datasources", "dashboards"] {
        let dir = in_repo("grafana", &format!("/etc/grafana/provisioning/{kind}"));
        let yamls = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "yml")
            })
            .count();
        assert!(yamls > 0, "no provisioning file in {}", dir.display());
    }

    let providers = support::yaml("grafana/provisioning/dashboards/evgrid.yml");
    let providers = providers["providers"].as_sequence().unwrap();
    assert_eq!(providers.len(), 1);
    let path = providers[0]["options"]["path"].as_str().unwrap();
    let dir = in_repo("grafana", path);
    assert_eq!(
        dir.canonicalize().unwrap(),
        support::crate_path(support::DASHBOARDS_DIR)
            .canonicalize()
            .unwrap(),
        "the dashboard provider reads {path}, which is not where the dashboards are"
    );

    let datasources = support::yaml("grafana/provisioning/datasources/prometheus.yml");
    let datasources = datasources["datasources"].as_sequence().unwrap();
    assert_eq!(datasources.len(), 1);
    let ds = &datasources[0];
    assert_eq!(ds["uid"], GRAFANA_DATASOURCE_UID);
    assert_eq!(ds["type"], "prometheus");
    assert_eq!(ds["url"], "http://prometheus:9090");
}

#[test]
fn dashboards_are_well_formed_for_the_pinned_grafana() {
    let dashboards = support::dashboards();
    assert_eq!(
        dashboards
            .iter()
            .map(|d| d.file.as_str())
            .collect::<Vec<_>>(),
        ["grid.json", "nats.json", "pipeline.json"]
    );
    let mut uids = BTreeSet::new();
    for d in &dashboards {
        let json = &d.json;
        assert_eq!(
            json["schemaVersion"], GRAFANA_SCHEMA_VERSION,
            "{}: schemaVersion of the pinned Grafana",
            d.file
        );
        let uid = json["uid"].as_str().expect("uid");
        assert!(uid.len() <= 40, "{}: uid too long for Grafana", d.file);
        assert!(uids.insert(uid), "uid {uid} twice");
        assert!(json["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(
            json["id"].is_null(),
            "{}: a provisioned dashboard has no id",
            d.file
        );

        let mut ids = BTreeSet::new();
        for panel in panels(json) {
            let title = panel["title"].as_str().unwrap_or_default();
            let id = panel["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{}: {title}: no id", d.file));
            assert!(ids.insert(id), "{}: panel id {id} twice", d.file);
            let kind = panel["type"].as_str().unwrap();
            assert!(
                CORE_PANELS.contains(&kind),
                "{}: {title}: panel type {kind}",
                d.file
            );
            assert!(!title.is_empty(), "{}: panel {id} has no title", d.file);
            if kind != "row" {
                let targets = panel["targets"].as_array();
                assert!(
                    targets.is_some_and(|t| !t.is_empty()),
                    "{}: {title}: no query",
                    d.file
                );
                assert!(
                    panel["description"].as_str().is_some_and(|s| !s.is_empty()),
                    "{}: {title}: say what the panel shows",
                    d.file
                );
            }
        }
        check_layout(d);
    }
}

/// Every panel inside the 24-column grid, none overlapping another.
fn check_layout(d: &Dashboard) {
    let boxes: Vec<(String, [u64; 4])> = panels(&d.json)
        .iter()
        .map(|p| {
            let g = &p["gridPos"];
            let n = |k: &str| {
                g[k].as_u64()
                    .unwrap_or_else(|| panic!("{}: gridPos.{k}", d.file))
            };
            (p["title"].to_string(), [n("x"), n("y"), n("w"), n("h")])
        })
        .collect();
    for (title, [x, _, w, h]) in &boxes {
        assert!(
            x + w <= 24 && *w > 0 && *h > 0,
            "{}: {title} is off the grid",
            d.file
        );
    }
    for (i, (a, [ax, ay, aw, ah])) in boxes.iter().enumerate() {
        for (b, [bx, by, bw, bh]) in &boxes[i + 1..] {
            let apart = ax + aw <= *bx || bx + bw <= *ax || ay + ah <= *by || by + bh <= *ay;
            assert!(apart, "{}: panels {a} and {b} overlap", d.file);
        }
    }
}

/// Every `datasource` object anywhere in the dashboard (panels, queries, variables).
fn datasources<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                if k == "datasource" {
                    out.push(child);
                } else {
                    datasources(child, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|c| datasources(c, out)),
        _ => {}
    }
}

#[test]
fn every_query_uses_the_provisioned_datasource() {
    for d in support::dashboards() {
        let mut found = Vec::new();
        datasources(&d.json, &mut found);
        for ds in &found {
            assert_eq!(
                ds["uid"], GRAFANA_DATASOURCE_UID,
                "{}: datasource {ds}",
                d.file
            );
            assert_eq!(ds["type"], "prometheus", "{}: datasource {ds}", d.file);
        }
        for panel in panels(&d.json).into_iter().filter(|p| p["type"] != "row") {
            assert!(
                !panel["datasource"].is_null(),
                "{}: {}",
                d.file,
                panel["title"]
            );
            for t in panel["targets"].as_array().unwrap() {
                assert!(!t["datasource"].is_null(), "{}: {}", d.file, panel["title"]);
            }
        }
    }
}

/// A dashboard's query variables: name → (metric, label) of `label_values(metric, label)`.
fn query_variables(d: &Dashboard) -> BTreeMap<String, (String, String)> {
    let mut vars = BTreeMap::new();
    for var in d.json["templating"]["list"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap().to_owned();
        assert_eq!(var["type"], "query", "{}: variable {name}", d.file);
        let query = var["query"]["query"].as_str().unwrap();
        assert_eq!(var["definition"], query, "{}: variable {name}", d.file);
        let args = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{}: {name}: expected label_values(metric, label)", d.file));
        let (metric, label) = args.split_once(',').unwrap();
        vars.insert(name, (metric.trim().to_owned(), label.trim().to_owned()));
    }
    vars
}

/// Texts of a panel that Grafana interpolates variables into.
fn interpolated(panel: &Value) -> Vec<String> {
    let mut texts = vec![
        panel["title"].as_str().unwrap_or_default().to_owned(),
        panel["description"].as_str().unwrap_or_default().to_owned(),
    ];
    for t in panel["targets"].as_array().into_iter().flatten() {
        for key in ["expr", "legendFormat"] {
            texts.push(t[key].as_str().unwrap_or_default().to_owned());
        }
    }
    texts
}

#[test]
fn every_variable_used_is_defined_and_valid() {
    let known = support::known_by_series();
    for d in support::dashboards() {
        let vars = query_variables(&d);
        for (name, (metric, label)) in &vars {
            let m: &KnownMetric = known
                .get(metric)
                .unwrap_or_else(|| panic!("{}: ${name} reads unknown metric {metric}", d.file));
            assert!(
                m.labels.contains(label),
                "{}: ${name}: {metric} has no label {label}",
                d.file
            );
        }
        for panel in panels(&d.json) {
            for text in interpolated(panel) {
                for used in promql::variables(&text) {
                    assert!(
                        vars.contains_key(&used)
                            || promql::BUILTIN_VARIABLES.contains(&used.as_str()),
                        "{}: {}: ${used} is not defined",
                        d.file,
                        panel["title"]
                    );
                }
            }
        }
    }
}

/// Every query of a dashboard with where it is from.
fn queries(d: &Dashboard) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in panels(&d.json) {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: {}: a query without expr", d.file, panel["title"]));
            out.push((format!("{}: {}", d.file, panel["title"]), expr.to_owned()));
        }
    }
    out
}

#[test]
fn every_query_parses_and_reads_known_metrics() {
    let known = support::known_by_series();
    let recorded = support::recorded();
    let mut problems = Vec::new();
    let mut count = 0;
    for d in support::dashboards() {
        for (whence, text) in queries(&d) {
            let expr = promql::parse_or_panic(&text, &whence);
            problems.extend(promql::check_names(&expr, &whence, &known, &recorded));
            count += 1;
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(count >= 40, "only {count} queries?");
}

#[test]
fn rates_use_rate_interval() {
    for d in support::dashboards() {
        for (whence, text) in queries(&d) {
            let expr = promql::parse_or_panic(&text, &whence);
            for (function, range) in promql::range_calls(&expr) {
                let variable = promql::interval_variable(range);
                if matches!(function, "rate" | "irate" | "increase") {
                    assert_eq!(
                        range,
                        promql::RATE_INTERVAL,
                        "{whence}: {function}() must take [$__rate_interval]\n  {text}"
                    );
                }
                assert!(
                    variable.is_some(),
                    "{whence}: a hard-coded {range:?} window; use Grafana's interval variables"
                );
            }
        }
    }
}

#[test]
fn variables_filter_every_panel_they_apply_to() {
    // A dashboard variable over label L (e.g. $substation) must filter every selector of a
    // metric that has L; grid-wide figures read recording rules, which have no such label.
    let known = support::known_by_series();
    let mut filtered = 0;
    for d in support::dashboards() {
        for (var, (_, label)) in query_variables(&d) {
            for (whence, text) in queries(&d) {
                let expr = promql::parse_or_panic(&text, &whence);
                for vs in promql::selectors(&expr) {
                    let name = promql::metric_name(&vs).unwrap_or_default();
                    if !known.get(&name).is_some_and(|m| m.labels.contains(&label)) {
                        continue;
                    }
                    let ok = vs.matchers.matchers.iter().any(|m| {
                        m.name == label
                            && matches!(m.op, MatchOp::Re(_))
                            && m.value == format!("var_{var}")
                    });
                    assert!(
                        ok,
                        "{whence}: {name} is not filtered by {label}=~\"${var}\""
                    );
                    filtered += 1;
                }
            }
        }
    }
    assert!(filtered >= 15, "only {filtered} filtered selectors?");
}

#[test]
fn grid_shows_what_issue_4_asks_for() {
    let expect = |file: &str, metrics: &[&str]| {
        let d = support::dashboards()
            .into_iter()
            .find(|d| d.file == file)
            .unwrap();
        let all: String = queries(&d)
            .into_iter()
            .map(|(_, q)| q)
            .collect::<Vec<_>>()
            .join("\n");
        for m in metrics {
            assert!(all.contains(m), "{file} shows no {m}");
        }
    };
    expect(
        "grid.json",
        &[
            "evgrid_substation_load_watts",
            "evgrid_substation_capacity_watts",
            "evgrid_substation_utilization_ratio",
            "evgrid_substation_active_sessions",
            "evgrid_substation_queued_sessions",
            "evgrid_substation_energy_delivered_joules_total",
            "evgrid_substation_heartbeat_age_seconds",
            "grid:evgrid_substation_headroom_watts:sum",
        ],
    );
    expect(
        "pipeline.json",
        &[
            "evgrid_http_requests_total",
            "evgrid_http_request_duration_seconds_bucket",
            "evgrid_dispatch_consumer_pending_messages",
            "evgrid_dispatch_decisions_total",
            "evgrid_request_accept_to_charging_seconds_bucket",
            "evgrid_ingest_rejected_total",
            "evgrid_dispatch_rejected_total",
        ],
    );
    expect(
        "nats.json",
        &[
            "gnatsd_varz_",
            "jetstream_stream_total_messages",
            "jetstream_consumer_num_pending",
            "jetstream_consumer_num_ack_pending",
        ],
    );
    // The end-to-end latency is a heatmap of the histogram's buckets.
    let pipeline = support::dashboards()
        .into_iter()
        .find(|d| d.file == "pipeline.json")
        .unwrap();
    let heatmap = panels(&pipeline.json)
        .into_iter()
        .find(|p| p["type"] == "heatmap")
        .expect("a heatmap");
    let target = &heatmap["targets"][0];
    assert_eq!(target["format"], "heatmap");
    assert!(
        target["expr"]
            .as_str()
            .unwrap()
            .contains("evgrid_request_accept_to_charging_seconds_bucket")
    );
}
