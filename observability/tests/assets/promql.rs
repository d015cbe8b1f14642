//! PromQL as the rules and dashboards write it: Grafana variables replaced by values PromQL
//! accepts, parsed with `promql-parser`, and the parts the checks look at (selectors, metric
//! names, range windows, thresholds) pulled out of the syntax tree.

use std::collections::BTreeMap;
use std::time::Duration;

use evgrid_observability::KnownMetric;
use promql_parser::label::MatchOp;
use promql_parser::parser::{self, Expr, VectorSelector};
use promql_parser::util::{ExprVisitor, walk_expr};

/// Stand-ins for Grafana's interval variables: durations no query would write by hand, so a
/// range equal to one of them came from the variable.
pub const RATE_INTERVAL: Duration = Duration::from_secs(3 * 3600 + 7 * 60 + 11);
const INTERVALS: &[(&str, Duration)] = &[
    ("__rate_interval", RATE_INTERVAL),
    ("__interval", Duration::from_secs(3 * 3600 + 7 * 60 + 12)),
    ("__range", Duration::from_secs(3 * 3600 + 7 * 60 + 13)),
];

/// Grafana's global variables the dashboards may use.
pub const BUILTIN_VARIABLES: &[&str] = &["__rate_interval", "__interval", "__range"];

/// The names of the variables a text refers to: `$name`, `${name}`, `${name:format}`,
/// `[[name]]`.
pub fn variables(text: &str) -> Vec<String> {
    references(text).into_iter().map(|r| r.name).collect()
}

struct Reference {
    start: usize,
    end: usize,
    name: String,
}

fn references(text: &str) -> Vec<Reference> {
    let bytes = text.as_bytes();
    let ident = |from: usize| {
        let len = text[from..]
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        &text[from..from + len]
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let found = match (bytes[i], bytes.get(i + 1)) {
            (b'$', Some(b'{')) => {
                let name = ident(i + 2);
                text[i..].find('}').map(|close| (name, i + close + 1))
            }
            (b'$', _) => Some((ident(i + 1), i + 1 + ident(i + 1).len())),
            (b'[', Some(b'[')) => {
                let name = ident(i + 2);
                text[i..]
                    .starts_with(&format!("[[{name}]]"))
                    .then(|| (name, i + name.len() + 4))
            }
            _ => None,
        };
        match found {
            Some((name, end)) if !name.is_empty() => {
                out.push(Reference {
                    start: i,
                    end,
                    name: name.to_owned(),
                });
                i = end;
            }
            _ => i += 1,
        }
    }
    out
}

/// The text with every variable replaced: interval variables by their stand-in durations,
/// any other by `var_<name>` (a valid label value, regex, or — misused — metric name).
pub fn substitute(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for r in references(text) {
        out.push_str(&text[last..r.start]);
        match INTERVALS.iter().find(|(name, _)| *name == r.name) {
            Some((_, d)) => out.push_str(&format!("{}s", d.as_secs())),
            None => out.push_str(&format!("var_{}", r.name)),
        }
        last = r.end;
    }
    out.push_str(&text[last..]);
    out
}

/// The variable name a stand-in duration came from.
pub fn interval_variable(d: Duration) -> Option<&'static str> {
    INTERVALS
        .iter()
        .find(|(_, x)| *x == d)
        .map(|(name, _)| *name)
}

/// Parses an expression as written in a rule or a panel.
pub fn parse(text: &str) -> Result<Expr, String> {
    parser::parse(&substitute(text))
}

/// Parses, panicking with where the expression is from.
pub fn parse_or_panic(text: &str, whence: &str) -> Expr {
    parse(text).unwrap_or_else(|e| panic!("{whence}: PromQL does not parse: {e}\n  {text}"))
}

struct Collect<'a, F: FnMut(&Expr)>(&'a mut F);

impl<F: FnMut(&Expr)> ExprVisitor for Collect<'_, F> {
    type Error = std::convert::Infallible;
    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, Self::Error> {
        (self.0)(expr);
        Ok(true)
    }
}

/// Calls `f` on every node of the tree.
pub fn visit(expr: &Expr, mut f: impl FnMut(&Expr)) {
    let Ok(_) = walk_expr(&mut Collect(&mut f), expr);
}

/// Every vector selector, those inside range selectors included.
pub fn selectors(expr: &Expr) -> Vec<VectorSelector> {
    let mut out = Vec::new();
    visit(expr, |e| match e {
        Expr::VectorSelector(vs) => out.push(vs.clone()),
        Expr::MatrixSelector(ms) => out.push(ms.vs.clone()),
        _ => {}
    });
    out
}

/// The metric a selector reads, from `name{…}` or `{__name__="name"}`.
pub fn metric_name(vs: &VectorSelector) -> Option<String> {
    vs.name.clone().or_else(|| {
        vs.matchers
            .matchers
            .iter()
            .find(|m| m.name == "__name__" && m.op == MatchOp::Equal)
            .map(|m| m.value.clone())
    })
}

/// `(function, window)` for every function applied to a range selector.
pub fn range_calls(expr: &Expr) -> Vec<(&'static str, Duration)> {
    let mut out = Vec::new();
    visit(expr, |e| {
        if let Expr::Call(call) = e {
            for arg in &call.args.args {
                if let Expr::MatrixSelector(ms) = arg.as_ref() {
                    out.push((call.func.name, ms.range));
                }
            }
        }
    });
    out
}

/// Every range window of the expression.
pub fn ranges(expr: &Expr) -> Vec<Duration> {
    let mut out = Vec::new();
    visit(expr, |e| {
        if let Expr::MatrixSelector(ms) = e {
            out.push(ms.range);
        }
    });
    out
}

/// Checks that every selector reads a known metric (or a recording rule) with labels it has.
/// Returns the problems, one line each.
pub fn check_names(
    expr: &Expr,
    whence: &str,
    known: &BTreeMap<String, KnownMetric>,
    recorded: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for vs in selectors(expr) {
        let Some(name) = metric_name(&vs) else {
            problems.push(format!("{whence}: a selector without a metric name: {vs}"));
            continue;
        };
        if recorded.contains_key(&name) {
            continue;
        }
        let Some(metric) = known.get(&name) else {
            problems.push(format!(
                "{whence}: unknown metric {name} (not in known-metrics.yml nor recorded)"
            ));
            continue;
        };
        for m in &vs.matchers.matchers {
            let allowed = m.name == "__name__"
                || m.name == "job"
                || m.name == "instance"
                || (m.name == "le" && name.ends_with("_bucket"))
                || metric.labels.contains(&m.name);
            if !allowed {
                problems.push(format!("{whence}: {name} has no label {}", m.name));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_in_every_grafana_syntax() {
        assert_eq!(
            variables("rate(x{a=~\"$sub\", b=\"${other:regex}\"}[$__rate_interval]) [[old]]"),
            ["sub", "other", "__rate_interval", "old"]
        );
        assert!(variables("sum by (le) (x)").is_empty());
        assert!(variables("price in $ only").is_empty());
    }

    #[test]
    fn substitution_makes_grafana_queries_parse() {
        let text = "sum(rate(evgrid_x_total{substation=~\"$substation\"}[$__rate_interval]))";
        let expr = parse(text).unwrap();
        assert_eq!(range_calls(&expr), [("rate", RATE_INTERVAL)]);
        let vs = &selectors(&expr)[0];
        assert_eq!(metric_name(vs).as_deref(), Some("evgrid_x_total"));
        assert_eq!(vs.matchers.matchers[0].value, "var_substation");
        assert!(parse("rate(x[5m]").is_err());
    }

    #[test]
    fn unknown_names_and_labels_are_reported() {
        let known = crate::support::known_by_series();
        let recorded = BTreeMap::new();
        let ok = parse("sum by (le) (rate(evgrid_http_request_duration_seconds_bucket{route=\"other\", job=\"ingest\"}[5m]))").unwrap();
        assert!(check_names(&ok, "ok", &known, &recorded).is_empty());
        let typo =
            parse("evgrid_substation_load_wats + evgrid_substation_capacity_watts{reason=\"x\"}")
                .unwrap();
        let problems = check_names(&typo, "typo", &known, &recorded);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("evgrid_substation_load_wats"));
        assert!(problems[1].contains("no label reason"));
    }
}
