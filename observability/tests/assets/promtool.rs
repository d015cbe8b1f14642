//! Prometheus' own checks, by `promtool` (Debian's `prometheus` package, the release the compose
//! stack runs): the scrape configs, the rule file, and the rule unit tests in
//! `prometheus/tests/`, which must cover every alert firing and not firing and every recording
//! rule.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use evgrid_observability::{Targets, prometheus_config};

use crate::support::{self, RULES_FILE, crate_path};

const TESTS_DIR: &str = "prometheus/tests";

/// `$PROMTOOL`, else `promtool` on PATH.
fn promtool() -> PathBuf {
    std::env::var_os("PROMTOOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("promtool"))
}

/// Runs promtool in this crate's directory and fails the test with its output on an error.
fn run(args: &[&std::ffi::OsStr]) -> String {
    let output = Command::new(promtool())
        .args(args)
        .current_dir(crate_path(""))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}. The asset tests need promtool: install Debian's prometheus \
                 package (`apt-get install prometheus`) or set PROMTOOL to its path",
                promtool().display()
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool {:?} failed:\n{text}",
        args
    );
    text
}

fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

#[test]
fn compose_scrape_config_is_valid() {
    let out = run(&[os("check"), os("config"), os("prometheus/prometheus.yml")]);
    // The rule files the config points at were found and checked with it.
    assert!(out.contains("evgrid.rules.yml"), "{out}");
}

#[test]
fn a_rendered_local_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let rules_glob = crate_path("prometheus/rules/*.yml");
    let targets = Targets {
        scrape_interval: std::time::Duration::from_millis(2500),
        rule_files: vec![rules_glob.to_string_lossy().into_owned()],
        ..local_targets()
    };
    let path = dir.path().join("prometheus.yml");
    std::fs::write(&path, prometheus_config(&targets)).unwrap();
    let out = run(&[os("check"), os("config"), path.as_os_str()]);
    assert!(out.contains("SUCCESS"), "{out}");
}

fn local_targets() -> Targets {
    let compose = Targets::compose();
    let port = |n: u16| format!("127.0.0.1:{n}");
    Targets {
        ingest: vec![port(18080)],
        dispatcher: vec![port(19101)],
        substations: compose
            .substations
            .iter()
            .zip(19102..)
            .map(|(s, p)| evgrid_observability::SubstationTarget {
                id: s.id.clone(),
                address: port(p),
            })
            .collect(),
        nats_exporter: vec![],
        prometheus: vec![port(19090)],
        ..compose
    }
}

#[test]
fn rule_file_is_valid() {
    let out = run(&[os("check"), os("rules"), os(RULES_FILE)]);
    assert!(out.contains("SUCCESS"), "{out}");
}

fn test_files() -> Vec<PathBuf> {
    support::files(TESTS_DIR, "yml")
}

#[test]
fn rule_unit_tests_pass() {
    let files = test_files();
    let mut args = vec![os("test"), os("rules")];
    args.extend(files.iter().map(|f| f.as_os_str()));
    let out = run(&args);
    assert!(out.contains("SUCCESS"), "{out}");
}

/// What the unit tests exercise.
#[derive(Default)]
struct Coverage {
    firing: BTreeSet<String>,
    not_firing: BTreeSet<String>,
    exprs: Vec<String>,
}

fn coverage(files: &[PathBuf]) -> Coverage {
    let mut c = Coverage::default();
    for file in files {
        let doc: serde_norway::Value = serde_norway::from_str(&support::read(file)).unwrap();
        check_rule_files_point_at_ours(file, &doc);
        for test in doc["tests"].as_sequence().expect("tests") {
            for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
                let name = case["alertname"].as_str().unwrap().to_owned();
                let fired = case["exp_alerts"]
                    .as_sequence()
                    .is_some_and(|a| !a.is_empty());
                if fired {
                    c.firing.insert(name);
                } else {
                    c.not_firing.insert(name);
                }
            }
            for case in test["promql_expr_test"].as_sequence().into_iter().flatten() {
                c.exprs.push(case["expr"].as_str().unwrap().to_owned());
            }
        }
    }
    c
}

fn check_rule_files_point_at_ours(file: &Path, doc: &serde_norway::Value) {
    let rule_files = doc["rule_files"].as_sequence().expect("rule_files");
    for rf in rule_files {
        let resolved = file.parent().unwrap().join(rf.as_str().unwrap());
        assert_eq!(
            resolved.canonicalize().unwrap(),
            crate_path(RULES_FILE).canonicalize().unwrap(),
            "{} tests another rule file",
            file.display()
        );
    }
}

#[test]
fn every_alert_is_tested_firing_and_not_firing() {
    let c = coverage(&test_files());
    for alert in support::alerts() {
        let name = alert.name();
        assert!(c.firing.contains(name), "no test where {name} fires");
        assert!(
            c.not_firing.contains(name),
            "no test where {name} stays quiet"
        );
    }
    let defined: BTreeSet<String> = support::alerts()
        .iter()
        .map(|a| a.name().to_owned())
        .collect();
    for name in c.firing.union(&c.not_firing) {
        assert!(defined.contains(name), "tests of an unknown alert {name}");
    }
}

#[test]
fn every_recording_rule_value_is_tested() {
    let c = coverage(&test_files());
    for name in support::recorded().keys() {
        assert!(
            c.exprs.iter().any(|e| e.contains(name.as_str())),
            "no promql_expr_test reads {name}"
        );
    }
}
