//! Issue 4's live proof of the observability assets, on the services as they run in production
//! (ingest → dispatcher → substations on a real nats-server):
//!
//! - every service's `/metrics` passes `promtool check metrics` and exports exactly what
//!   `observability/known-metrics.yml` lists for it (names, types, label names), so the list the
//!   rules and dashboards are checked against never drifts from the code;
//! - a real Prometheus, started by the built `evgrid up --demo` with its generated config and the
//!   repository's rules, scrapes the stack under a small load until every dashboard query, every
//!   dashboard variable and every recording rule returns data, and every rule evaluates cleanly;
//!   the panels of charging stations, with `evgrid up --chargers ocpp` and cars charging.
//!
//! Both need Debian's `prometheus` package (`promtool`, `prometheus`; `.ci/run` installs it).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use evgrid_observability::{KnownMetric, MetricType, Source, known_metrics};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::pipeline::{Options, Pipeline};
use crate::up::UpProcess;

/// Bound on the wait for the pipeline's sessions to start.
const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// promtool check metrics, and the known-metrics list against every /metrics page
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metrics_page_passes_promtool_and_exports_its_known_metrics() {
    let pipeline = Pipeline::start(Options::default()).await;
    let client = pipeline.nats.client().await.unwrap();
    let mut started = client.subscribe("ev.sessions.*.started").await.unwrap();
    client.flush().await.unwrap();

    // A few requests through the whole flow, so the histograms and counters have samples: the
    // HTTP ones, the publish acks, the decisions and the accept → charging latency.
    const REQUESTS: usize = 6;
    for i in 0..REQUESTS {
        let status = post_request(&pipeline.http, &pipeline.url(""), i).await;
        assert_eq!(status, 202, "request {i}");
    }
    let status = post_malformed(&pipeline.http, &pipeline.url("")).await;
    assert_eq!(status, 400);
    for n in 0..REQUESTS {
        tokio::time::timeout(WAIT, started.next())
            .await
            .unwrap_or_else(|_| panic!("only {n} of {REQUESTS} sessions started within {WAIT:?}"))
            .expect("subscription ended");
    }

    let known = known_metrics().expect("known-metrics.yml");
    let mut pages = vec![
        ("ingest".to_owned(), Source::Ingest, pipeline.ingest),
        (
            "dispatcher".to_owned(),
            Source::Dispatcher,
            pipeline.dispatcher,
        ),
    ];
    for ((id, _), addr) in pipeline.substations.iter().zip(&pipeline.substation_ops) {
        pages.push((format!("substation {id}"), Source::Substation, *addr));
    }
    let mut problems = Vec::new();
    for (name, source, addr) in &pages {
        let page = pipeline
            .http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .text()
            .await
            .unwrap();
        if let Err(output) = promtool_check_metrics(&page) {
            problems.push(format!("{name}: promtool check metrics:\n{output}"));
        }
        problems.extend(
            drift(*source, &parse_exposition(&page), &known)
                .into_iter()
                .map(|p| format!("{name}: {p}")),
        );
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) with the /metrics pages:\n{}",
        problems.len(),
        problems.join("\n")
    );
    pipeline.stop().await;
}

/// Posts a valid charge request to ingest at `base`; returns the status.
async fn post_request(http: &reqwest::Client, base: &str, i: usize) -> u16 {
    let body = serde_json::json!({
        "vehicle_id": format!("ev-obs-{i}"),
        "energy_kwh": 5.0,
        "max_power_kw": 11.0,
    });
    http.post(format!("{base}/v1/charge-requests"))
        .json(&body)
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

/// Posts a body that is not JSON (ingest's `malformed_json` rejection); returns the status.
async fn post_malformed(http: &reqwest::Client, base: &str) -> u16 {
    http.post(format!("{base}/v1/charge-requests"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

/// `$PROMTOOL`, else `promtool` on PATH.
fn promtool() -> PathBuf {
    std::env::var_os("PROMTOOL").map_or_else(|| PathBuf::from("promtool"), PathBuf::from)
}

/// Pipes a `/metrics` page to `promtool check metrics`; Err is its output.
fn promtool_check_metrics(page: &str) -> Result<(), String> {
    let mut child = std::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}. Install Debian's prometheus package (apt-get install \
                 prometheus) or set PROMTOOL",
                promtool().display()
            )
        });
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(page.as_bytes())
        .expect("promtool reads the page");
    let output = child.wait_with_output().expect("promtool finishes");
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "({}) {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// One metric family of a `/metrics` page.
#[derive(Debug, Default)]
struct Family {
    kind: Option<String>,
    /// Label names of its samples, `le` of histogram buckets left out.
    labels: BTreeSet<String>,
    samples: usize,
}

/// The families of a page in the text exposition format, by name (a histogram's samples under
/// its base name).
fn parse_exposition(page: &str) -> BTreeMap<String, Family> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                families.entry(name.to_owned()).or_default().kind = Some(kind.to_owned());
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let series = &line[..end];
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| series.strip_suffix(suffix))
            .find(|base| {
                families
                    .get(*base)
                    .is_some_and(|f| f.kind.as_deref() == Some("histogram"))
            })
            .unwrap_or(series);
        let family = families.entry(name.to_owned()).or_default();
        family.samples += 1;
        if line[end..].starts_with('{') {
            family.labels.extend(
                label_names(&line[end + 1..])
                    .into_iter()
                    .filter(|l| l != "le"),
            );
        }
    }
    families
}

/// The label names of `a="x",b="y\"z"} 1`, the text after a sample's `{`.
fn label_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut chars = text.chars();
    loop {
        let name: String = chars
            .by_ref()
            .take_while(|c| *c != '=' && *c != '}')
            .collect();
        let name = name.trim().trim_start_matches(',').trim();
        if name.is_empty() {
            return names;
        }
        names.push(name.to_owned());
        // The quoted value: skip to its closing quote, minding escapes.
        let mut escaped = false;
        for c in chars.by_ref().skip_while(|c| *c != '"').skip(1) {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => break,
                _ => escaped = false,
            }
        }
    }
}

/// Where a page and `known-metrics.yml` disagree for a service of `source`: a listed metric
/// missing or of another type or label set, or an exported metric the list does not have.
fn drift(source: Source, page: &BTreeMap<String, Family>, known: &[KnownMetric]) -> Vec<String> {
    let mine = |m: &&KnownMetric| m.source == source || m.source == Source::Process;
    let mut problems = Vec::new();
    for metric in known.iter().filter(mine) {
        let Some(family) = page.get(&metric.name).filter(|f| f.samples > 0) else {
            // Per-station series exist only with --chargers ocpp; the OCPP test shows them.
            if !metric.ocpp_only {
                problems.push(format!("{} is listed but not exported", metric.name));
            }
            continue;
        };
        let kind = match metric.kind {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
            MetricType::Histogram => "histogram",
        };
        if family.kind.as_deref() != Some(kind) {
            problems.push(format!(
                "{} is listed as a {kind}, exported as {:?}",
                metric.name, family.kind
            ));
        }
        let listed: BTreeSet<String> = metric.labels.iter().cloned().collect();
        if family.labels != listed {
            problems.push(format!(
                "{} is listed with labels {listed:?}, exported with {:?}",
                metric.name, family.labels
            ));
        }
    }
    for name in page.keys() {
        if !known.iter().filter(mine).any(|m| &m.name == name) {
            problems.push(format!(
                "{name} is exported but not listed in known-metrics.yml for this service \
                 (add it there and to docs/metrics.md)"
            ));
        }
    }
    problems
}

#[test]
fn exposition_parsing_finds_families_kinds_and_labels() {
    let page = "# HELP h x\n# TYPE h histogram\nh_bucket{route=\"/v1/{id}\",le=\"0.1\"} 1\n\
                h_sum{route=\"a\\\"b,c\"} 1\nh_count{route=\"a\"} 1\n# TYPE g gauge\ng 2\n\
                # TYPE c_total counter\nc_total{substation=\"s1\",outcome=\"x\"} 3\n";
    let families = parse_exposition(page);
    assert_eq!(families.len(), 3, "{families:?}");
    assert_eq!(families["h"].kind.as_deref(), Some("histogram"));
    assert_eq!(families["h"].samples, 3);
    assert_eq!(families["h"].labels, BTreeSet::from(["route".to_owned()]));
    assert!(families["g"].labels.is_empty());
    assert_eq!(
        families["c_total"].labels,
        BTreeSet::from(["outcome".to_owned(), "substation".to_owned()])
    );
}

// ---------------------------------------------------------------------------------------------
// A real Prometheus scraping `evgrid up --demo`
// ---------------------------------------------------------------------------------------------

/// Scrape (and rule evaluation) interval of the test's Prometheus: 1 s, so rates have two
/// samples within seconds of the start.
const SCRAPE_INTERVAL: &str = "1s";

/// Grafana's interval variables, as they resolve for a dashboard over a short range with the
/// scrape interval above (`$__rate_interval` is at least 4 scrape intervals).
const INTERVALS: &[(&str, &str)] = &[
    ("__rate_interval", "30s"),
    ("__interval", "5s"),
    ("__range", "5m"),
];

/// How long the stack may take until every check has data (Prometheus typically needs a few
/// seconds after its first scrape).
const DATA_WITHIN: Duration = Duration::from_secs(45);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scraping_evgrid_up_has_data_for_every_panel_and_recording_rule() {
    let started = Instant::now();
    let up = UpProcess::start(&[
        "--demo",
        "--demo-rate",
        "20",
        "--time-scale",
        "3600",
        "--prometheus-scrape-interval",
        SCRAPE_INTERVAL,
    ])
    .await;
    let prometheus = up.banner("Prometheus").to_owned();
    assert!(
        prometheus.starts_with("http://"),
        "evgrid up did not start Prometheus (install Debian's prometheus package): {prometheus}"
    );
    let http = up.http();

    // The small load beside the demo's (which publishes to NATS directly): HTTP requests, so
    // ingest's panels (requests, latency, publish acks, 5xx ratio, rejections) have data.
    let load = CancellationToken::new();
    let driver = tokio::spawn(http_load(
        http.clone(),
        up.banner("API (ingest)").to_owned(),
        load.clone(),
    ));

    let (checks, exempt, _) = checks();
    assert!(checks.len() > 40, "only {} checks", checks.len());
    eprintln!(
        "{} checks; not required to have data here ({}):\n  {}",
        checks.len(),
        exempt.len(),
        exempt.join("\n  ")
    );

    let prometheus = PrometheusApi {
        base: prometheus,
        http,
    };
    wait_for_data(&prometheus, &checks).await;
    eprintln!(
        "every check had data {:.1} s after the start",
        started.elapsed().as_secs_f64()
    );

    load.cancel();
    let posted = driver.await.unwrap();
    assert!(posted > 0, "the HTTP load posted nothing");
    drop(up.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scraping_evgrid_up_with_ocpp_stations_has_data_for_the_station_panels() {
    let up = UpProcess::start(&[
        "--chargers",
        "ocpp",
        "--ocpp-base-port",
        "0",
        "--prometheus-scrape-interval",
        SCRAPE_INTERVAL,
    ])
    .await;
    let prometheus = up.banner("Prometheus").to_owned();
    assert!(prometheus.starts_with("http://"), "{prometheus}");
    let http = up.http();
    let api = up.banner("API (ingest)").to_owned();
    crate::pipeline::wait_until_grid_is_up(&http, &api, 3, Duration::from_secs(30)).await;
    // Cars that charge for several scrapes: 100 kWh at 11 kW, about 9 s at the time scale.
    for i in 0..6 {
        let body = format!(r#"{{"vehicle_id":"ev-ocpp-{i}","energy_kwh":100,"max_power_kw":11}}"#);
        crate::helpers::submit(&http, &api, body).await;
    }
    let (_, _, station_checks) = checks();
    assert!(
        !station_checks.is_empty(),
        "no panel reads the stations' series"
    );
    let prometheus = PrometheusApi {
        base: prometheus,
        http,
    };
    wait_for_data(&prometheus, &station_checks).await;
    drop(up.stop().await);
}

/// Waits until every check has data and every rule evaluates cleanly, within [`DATA_WITHIN`];
/// else fails, with each check still empty and what it returned.
async fn wait_for_data(prometheus: &PrometheusApi, checks: &[Check]) {
    let deadline = tokio::time::Instant::now() + DATA_WITHIN;
    let mut waiting: Vec<&Check> = checks.iter().collect();
    loop {
        let mut still = Vec::new();
        for check in waiting {
            if !prometheus.has_data(check).await {
                still.push(check);
            }
        }
        waiting = still;
        let rules = prometheus.rules_evaluated_cleanly().await;
        if waiting.is_empty() && rules.is_ok() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let mut report = Vec::new();
            for check in &waiting {
                let result = match prometheus.query(&check.promql).await {
                    Ok(data) => data["result"].to_string(),
                    Err(e) => e.to_string(),
                };
                report.push(format!(
                    "{}\n    {}\n    -> {result}",
                    check.whence, check.promql
                ));
            }
            panic!(
                "after {DATA_WITHIN:?}, {} of {} checks have no data:\n{}\nrules: {rules:?}",
                waiting.len(),
                checks.len(),
                report.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Posts charge requests to ingest at `api` (~5 per second, every fifth one malformed) until
/// `stop`; returns how many were accepted.
async fn http_load(http: reqwest::Client, api: String, stop: CancellationToken) -> usize {
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    let mut accepted = 0;
    for i in 0.. {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        if i % 5 == 4 {
            post_malformed(&http, &api).await;
        } else if post_request(&http, &api, i).await == 202 {
            accepted += 1;
        }
    }
    accepted
}

/// One query that must return data: a panel target, a dashboard variable or a recording rule.
#[derive(Debug)]
struct Check {
    whence: String,
    promql: String,
}

/// What the live Prometheus must have data for: the checks of a simulated grid, those exempt
/// there (and why), and those of a grid with OCPP stations.
fn checks() -> (Vec<Check>, Vec<String>, Vec<Check>) {
    let mut candidates = Vec::new();
    let mut exempt = Vec::new();
    let mut station_checks = Vec::new();
    for (file, dashboard) in dashboards() {
        let variables = dashboard["templating"]["list"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let names: Vec<String> = variables
            .iter()
            .map(|v| v["name"].as_str().expect("variable name").to_owned())
            .collect();
        for (variable, name) in variables.iter().zip(&names) {
            let query = variable["query"]["query"]
                .as_str()
                .or(variable["query"].as_str())
                .unwrap_or_else(|| panic!("{file}: variable {name} has no query"));
            candidates.push(Check {
                whence: format!("{file} variable ${name}"),
                promql: label_values_promql(query)
                    .unwrap_or_else(|| panic!("{file}: variable {name}: unknown query {query}")),
            });
        }
        for panel in panels(&dashboard) {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let Some(expr) = target["expr"].as_str() else {
                    continue;
                };
                candidates.push(Check {
                    whence: format!(
                        "{file} panel {} {} target {}",
                        panel["id"], panel["title"], target["refId"]
                    ),
                    promql: substitute(expr, &names),
                });
            }
        }
    }
    for (file, rules) in rule_files() {
        for group in rules["groups"].as_sequence().expect("groups") {
            for rule in group["rules"].as_sequence().expect("rules") {
                if let Some(record) = rule["record"].as_str() {
                    // Querying the recorded series (not the expression) proves the rule file
                    // was loaded and the rule evaluated into data.
                    candidates.push(Check {
                        whence: format!("{file} recording rule"),
                        promql: record.to_owned(),
                    });
                } else {
                    // An alert's expression is empty on a healthy stack by design; promtool's
                    // rule unit tests make each fire and stay quiet, and here every alert must
                    // evaluate without error (rules_evaluated_cleanly).
                    exempt.push(format!(
                        "{file} alert {}: empty while healthy (promtool tests cover it)",
                        rule["alert"].as_str().expect("a rule records or alerts")
                    ));
                }
            }
        }
    }

    // No prometheus-nats-exporter runs here (the compose stack runs it), so the queries reading
    // only its metrics cannot have data; the evgrid-observability asset tests hold their names
    // and labels to the exporter's documented ones (known-metrics.yml, from its source).
    let known = known_metrics().expect("known-metrics.yml");
    let series = |source: Option<Source>| -> BTreeSet<String> {
        known
            .iter()
            .filter(|m| source.is_none_or(|s| m.source == s))
            .flat_map(|m| m.series_names())
            .collect()
    };
    let (listed, exporter) = (series(None), series(Some(Source::NatsExporter)));
    let stations: BTreeSet<String> = known
        .iter()
        .filter(|m| m.ocpp_only)
        .flat_map(|m| m.series_names())
        .collect();
    let mut checks = Vec::new();
    for check in candidates {
        let metrics: Vec<&str> = words(&check.promql)
            .into_iter()
            .filter(|w| listed.contains(*w))
            .collect();
        if !metrics.is_empty() && metrics.iter().all(|m| exporter.contains(*m)) {
            exempt.push(format!(
                "{}: NATS exporter metrics only (no exporter here)",
                check.whence
            ));
        } else if metrics.iter().any(|m| stations.contains(*m)) {
            exempt.push(format!(
                "{}: charging stations' series (the OCPP test has data for them)",
                check.whence
            ));
            station_checks.push(check);
        } else {
            checks.push(check);
        }
    }
    (checks, exempt, station_checks)
}

/// The identifiers of a PromQL text (metric names among them).
fn words(text: &str) -> Vec<&str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| !w.is_empty())
        .collect()
}

/// Grafana's `label_values(metric, label)` as PromQL that returns one series per value.
fn label_values_promql(query: &str) -> Option<String> {
    let args = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (metric, label) = args.split_once(',')?;
    let (metric, label) = (metric.trim(), label.trim());
    Some(format!("count by ({label}) ({metric}{{{label}!=\"\"}})"))
}

/// A panel's expression with Grafana's variables replaced: interval variables by durations,
/// the dashboard's own variables by `.*` ("All"; the dashboards match them with `=~`).
fn substitute(expr: &str, variables: &[String]) -> String {
    let mut names: Vec<(String, String)> = INTERVALS
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .chain(variables.iter().map(|v| (v.clone(), ".*".to_owned())))
        .collect();
    // Longest first, so `$__rate_interval` is not read as `$__r…` of a shorter name.
    names.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    let mut out = expr.to_owned();
    for (name, value) in &names {
        out = out
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    assert!(
        !out.contains('$'),
        "a variable left in {expr} (known: {names:?})"
    );
    out
}

#[test]
fn grafana_variables_become_promql() {
    let vars = ["substation".to_owned()];
    assert_eq!(
        substitute(
            "sum(rate(x{substation=~\"$substation\"}[$__rate_interval])) + y[${__interval}]",
            &vars
        ),
        "sum(rate(x{substation=~\".*\"}[30s])) + y[5s]"
    );
    assert_eq!(
        label_values_promql("label_values(evgrid_substation_capacity_watts, substation)")
            .as_deref(),
        Some("count by (substation) (evgrid_substation_capacity_watts{substation!=\"\"})")
    );
    assert_eq!(
        words("sum by (le) (rate(a:b:c[5m]))"),
        ["sum", "by", "le", "rate", "a:b:c", "5m"]
    );
}

/// The files of `observability/<dir>` ending in `.ext`, sorted, each parsed by `parse`.
fn assets<T, E: std::fmt::Display>(
    dir: &str,
    ext: &str,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Vec<(String, T)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../observability")
        .join(dir);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no .{ext} file in {}", dir.display());
    paths
        .into_iter()
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path).unwrap();
            let parsed = parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, parsed)
        })
        .collect()
}

fn dashboards() -> Vec<(String, serde_json::Value)> {
    assets("grafana/dashboards", "json", |t| serde_json::from_str(t))
}

fn rule_files() -> Vec<(String, serde_norway::Value)> {
    assets("prometheus/rules", "yml", |t| serde_norway::from_str(t))
}

/// Every panel of a dashboard, rows' nested panels included.
fn panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        out.push(panel);
        out.extend(panel["panels"].as_array().into_iter().flatten());
    }
    out
}

/// Prometheus' HTTP API.
struct PrometheusApi {
    base: String,
    http: reqwest::Client,
}

/// Why an API call gave no data.
#[derive(Debug)]
enum ApiError {
    /// No answer (yet): Prometheus still starting, or busy.
    Unreachable(String),
    /// Prometheus answered with an error, e.g. `bad_data` for a query it cannot parse.
    Refused { kind: String, error: String },
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreachable(e) => write!(f, "no answer: {e}"),
            Self::Refused { kind, error } => write!(f, "refused ({kind}): {error}"),
        }
    }
}

impl PrometheusApi {
    /// The `data` of `GET /api/v1/<path>?<params>`.
    async fn get(
        &self,
        path: &str,
        params: &[(&str, &str)],
    ) -> Result<serde_json::Value, ApiError> {
        let url = reqwest::Url::parse_with_params(&format!("{}/api/v1/{path}", self.base), params)
            .expect("a valid URL");
        let unreachable = |e: reqwest::Error| ApiError::Unreachable(e.to_string());
        let body: serde_json::Value = self
            .http
            .get(url)
            .send()
            .await
            .map_err(unreachable)?
            .json()
            .await
            .map_err(unreachable)?;
        if body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(ApiError::Refused {
                kind: body["errorType"].as_str().unwrap_or("").to_owned(),
                error: body["error"].as_str().unwrap_or("").to_owned(),
            })
        }
    }

    /// An instant query's result.
    async fn query(&self, promql: &str) -> Result<serde_json::Value, ApiError> {
        self.get("query", &[("query", promql)]).await
    }

    /// Whether the check returns at least one sample that is a number (a `NaN`, e.g. a
    /// quantile of no observations, shows in Grafana as no data). A query Prometheus refuses
    /// fails the test at once: waiting longer cannot fix it.
    async fn has_data(&self, check: &Check) -> bool {
        let data = match self.query(&check.promql).await {
            Ok(data) => data,
            Err(ApiError::Refused { kind, error }) if kind == "bad_data" => {
                panic!(
                    "{}: Prometheus refuses {}: {error}",
                    check.whence, check.promql
                )
            }
            Err(_) => return false,
        };
        let number = |v: &serde_json::Value| {
            v[1].as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .is_some_and(|x| !x.is_nan())
        };
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .is_some_and(|r| r.iter().any(|s| number(&s["value"]))),
            Some("scalar") => number(&data["result"]),
            _ => false,
        }
    }

    /// Ok when Prometheus has loaded every rule of the repository's rule files and evaluated
    /// each (alerts included) without error.
    async fn rules_evaluated_cleanly(&self) -> Result<(), String> {
        let data = self.get("rules", &[]).await.map_err(|e| e.to_string())?;
        let mut loaded = BTreeMap::new();
        for group in data["groups"].as_array().into_iter().flatten() {
            for rule in group["rules"].as_array().into_iter().flatten() {
                let name = rule["name"].as_str().unwrap_or("?").to_owned();
                loaded.insert(name, (rule["health"].clone(), rule["lastError"].clone()));
            }
        }
        let mut problems = Vec::new();
        for (_, rules) in rule_files() {
            for group in rules["groups"].as_sequence().into_iter().flatten() {
                for rule in group["rules"].as_sequence().into_iter().flatten() {
                    let name = rule["record"].as_str().or(rule["alert"].as_str()).unwrap();
                    match loaded.get(name) {
                        None => problems.push(format!("{name} not loaded")),
                        Some((health, _)) if health == "ok" => {}
                        Some((health, error)) => {
                            problems.push(format!("{name}: health {health}, {error}"))
                        }
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}
