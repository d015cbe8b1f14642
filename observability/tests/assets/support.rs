//! Loading the assets: paths relative to the crate, the rule file, the dashboards, the list of
//! known metrics.

use std::collections::BTreeMap;
use std::path::PathBuf;

use evgrid_observability::KnownMetric;
use serde::Deserialize;

/// A path inside this crate.
pub fn crate_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A path inside the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate is inside the repository")
        .join(rel)
}

pub fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

pub fn yaml(rel: &str) -> serde_norway::Value {
    let path = crate_path(rel);
    serde_norway::from_str(&read(&path)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The files of a directory of this crate with the given extension, sorted.
pub fn files(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(crate_path(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .{ext} file in {dir}");
    files
}

pub const RULES_FILE: &str = "prometheus/rules/evgrid.rules.yml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    pub groups: Vec<RuleGroup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleGroup {
    pub name: String,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub record: Option<String>,
    pub alert: Option<String>,
    pub expr: String,
    #[serde(rename = "for")]
    pub for_: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl Rule {
    pub fn name(&self) -> &str {
        self.record
            .as_deref()
            .or(self.alert.as_deref())
            .expect("a rule records or alerts")
    }
}

pub fn rules() -> Vec<Rule> {
    let file: RuleFile =
        serde_norway::from_str(&read(&crate_path(RULES_FILE))).expect("rule file shape");
    file.groups.into_iter().flat_map(|g| g.rules).collect()
}

/// Recording rule name → its expression.
pub fn recorded() -> BTreeMap<String, String> {
    rules()
        .into_iter()
        .filter_map(|r| r.record.map(|name| (name, r.expr)))
        .collect()
}

pub fn alerts() -> Vec<Rule> {
    rules().into_iter().filter(|r| r.alert.is_some()).collect()
}

pub fn known() -> Vec<KnownMetric> {
    evgrid_observability::known_metrics().expect("known-metrics.yml")
}

/// Series name → the known metric it belongs to.
pub fn known_by_series() -> BTreeMap<String, KnownMetric> {
    known()
        .into_iter()
        .flat_map(|m| {
            m.series_names()
                .into_iter()
                .map(move |name| (name, m.clone()))
        })
        .collect()
}

pub struct Dashboard {
    pub file: String,
    pub json: serde_json::Value,
}

pub const DASHBOARDS_DIR: &str = "grafana/dashboards";

pub fn dashboards() -> Vec<Dashboard> {
    files(DASHBOARDS_DIR, "json")
        .into_iter()
        .map(|path| {
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            let json = serde_json::from_str(&read(&path))
                .unwrap_or_else(|e| panic!("{file} is not valid JSON: {e}"));
            Dashboard { file, json }
        })
        .collect()
}

/// Every panel of a dashboard, rows' nested panels included.
pub fn panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        out.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}
