//! The recording and alert rules, beyond what promtool checks: every expression parses with
//! `promql-parser` and reads known metrics with labels they have, every alert is labelled and
//! annotated (naming the substation when it is about one), latency thresholds sit on bucket
//! boundaries, and range windows span enough scrapes.

use std::collections::{BTreeMap, BTreeSet};

use evgrid_observability::{Source, Targets};
use promql_parser::parser::Expr;

use crate::promql;
use crate::support::{self, Rule};

#[test]
fn every_rule_reads_known_metrics() {
    let known = support::known_by_series();
    let recorded = support::recorded();
    let mut problems = Vec::new();
    for rule in support::rules() {
        let expr = promql::parse_or_panic(&rule.expr, rule.name());
        problems.extend(promql::check_names(&expr, rule.name(), &known, &recorded));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn names_are_unique_and_recordings_follow_the_convention() {
    let file: support::RuleFile =
        serde_norway::from_str(&support::read(&support::crate_path(support::RULES_FILE))).unwrap();
    let mut groups = BTreeSet::new();
    let mut names = BTreeSet::new();
    for group in &file.groups {
        assert!(groups.insert(&group.name), "group {} twice", group.name);
        for rule in &group.rules {
            assert!(
                rule.record.is_some() != rule.alert.is_some(),
                "{}: a rule records or alerts",
                rule.name()
            );
            assert!(names.insert(rule.name()), "{} defined twice", rule.name());
            if let Some(record) = &rule.record {
                // level:metric:operations
                let parts: Vec<&str> = record.split(':').collect();
                assert!(
                    parts.len() == 3 && parts.iter().all(|p| !p.is_empty()),
                    "{record}: recording rules are named level:metric:operations"
                );
                assert!(parts[1].starts_with("evgrid_"), "{record}");
            }
        }
    }
}

/// Whether an alert is about one substation, so its texts must name it.
fn about_a_substation(rule: &Rule, expr: &Expr) -> bool {
    let known = support::known_by_series();
    rule.expr.contains("by (substation)")
        || promql::selectors(expr).iter().any(|vs| {
            let name = promql::metric_name(vs).unwrap_or_default();
            name.starts_with("substation:")
                || known
                    .get(&name)
                    .is_some_and(|m| m.source == Source::Substation)
        })
}

#[test]
fn every_alert_has_severity_summary_and_description() {
    let mut about_substations = 0;
    for rule in support::alerts() {
        let name = rule.name();
        // A single odd sample never pages: every alert holds for a while first.
        assert!(rule.for_.is_some(), "{name}: no `for`");
        let severity = rule.labels.get("severity").map(String::as_str);
        assert!(
            matches!(severity, Some("critical" | "warning")),
            "{name}: severity must be critical or warning, not {severity:?}"
        );
        for key in ["summary", "description"] {
            let text = rule.annotations.get(key).map(String::as_str);
            assert!(
                text.is_some_and(|t| t.trim().len() > 10),
                "{name}: no {key}"
            );
        }
        let expr = promql::parse_or_panic(&rule.expr, name);
        if about_a_substation(&rule, &expr) {
            about_substations += 1;
            for key in ["summary", "description"] {
                assert!(
                    rule.annotations[key].contains("{{ $labels.substation }}"),
                    "{name}: the {key} must name the substation"
                );
            }
        }
    }
    assert!(
        about_substations >= 4,
        "SubstationOverloaded, NearCapacity, Down, EndToEnd…"
    );
}

/// The histogram a quantile expression (or the recording rule holding one) reads.
fn quantile_of(expr: &Expr, recorded: &BTreeMap<String, String>) -> Option<String> {
    match expr {
        Expr::Paren(p) => quantile_of(&p.expr, recorded),
        Expr::VectorSelector(vs) => {
            let name = promql::metric_name(vs)?;
            let inner = recorded.get(&name)?;
            quantile_of(&promql::parse_or_panic(inner, &name), recorded)
        }
        Expr::Call(call) if call.func.name == "histogram_quantile" => {
            promql::selectors(&call.args.args[1])
                .iter()
                .filter_map(promql::metric_name)
                .find_map(|n| n.strip_suffix("_bucket").map(str::to_owned))
        }
        _ => None,
    }
}

#[test]
fn latency_thresholds_sit_on_bucket_boundaries() {
    let recorded = support::recorded();
    let known: BTreeMap<String, Vec<f64>> = support::known()
        .into_iter()
        .map(|m| (m.name, m.boundaries))
        .collect();
    let mut checked = Vec::new();
    for rule in support::alerts() {
        let expr = promql::parse_or_panic(&rule.expr, rule.name());
        promql::visit(&expr, |e| {
            let Expr::Binary(b) = e else { return };
            if !b.op.is_comparison_operator() {
                return;
            }
            let (Some(histogram), Expr::NumberLiteral(n)) =
                (quantile_of(&b.lhs, &recorded), b.rhs.as_ref())
            else {
                return;
            };
            let boundaries = &known[&histogram];
            assert!(
                boundaries.contains(&n.val),
                "{}: threshold {} of {histogram} is not one of its declared bucket \
                 boundaries {boundaries:?} (known-metrics.yml)",
                rule.name(),
                n.val
            );
            checked.push(rule.name().to_owned());
        });
    }
    assert!(
        checked.contains(&"EndToEndLatencyHigh".to_owned())
            && checked.contains(&"IngestLatencyHigh".to_owned()),
        "latency alerts not recognised: {checked:?}"
    );
}

#[test]
fn range_windows_span_at_least_four_scrapes() {
    let min = Targets::compose().scrape_interval * 4;
    for rule in support::rules() {
        let expr = promql::parse_or_panic(&rule.expr, rule.name());
        for range in promql::ranges(&expr) {
            assert!(
                range >= min,
                "{}: a {range:?} window holds fewer than 4 scrapes",
                rule.name()
            );
        }
    }
}
