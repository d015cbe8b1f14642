//! Figures of a benchmark: one [`Sample`] per variant per round (variants alternate within a
//! round, A B A B …), medians per variant, and ratios of ours to a reference taken round by
//! round, so a slow moment of a shared machine hits both sides of a ratio alike. Printed as
//! Markdown tables, ready for docs/benchmarks.md.

use std::fmt::Write as _;

/// One measurement of one variant.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Requests (or messages) per second.
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU µs per request of the process under test (ingest, dispatcher, or the reference).
    pub service_cpu_us: f64,
    /// CPU µs per request of nats-server.
    pub nats_cpu_us: f64,
    /// CPU µs per request of the load generator (`evgrid load`), when it is one.
    pub load_cpu_us: f64,
}

impl Default for Sample {
    fn default() -> Self {
        Self {
            rate: f64::NAN,
            p50_ms: f64::NAN,
            p99_ms: f64::NAN,
            service_cpu_us: f64::NAN,
            nats_cpu_us: f64::NAN,
            load_cpu_us: f64::NAN,
        }
    }
}

/// Every round's sample of one variant.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub samples: Vec<Sample>,
}

impl Series {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            samples: Vec::new(),
        }
    }

    pub fn median(&self, field: fn(&Sample) -> f64) -> f64 {
        median(self.samples.iter().map(field))
    }
}

/// The median of the finite values (NaN when there are none).
pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Round-by-round ratios of `ours` to `reference` for one field: (median, min, max).
pub fn ratio(ours: &Series, reference: &Series, field: fn(&Sample) -> f64) -> (f64, f64, f64) {
    let ratios: Vec<f64> = ours
        .samples
        .iter()
        .zip(&reference.samples)
        .map(|(a, b)| field(a) / field(b))
        .filter(|r| r.is_finite())
        .collect();
    let min = ratios.iter().copied().fold(f64::NAN, f64::min);
    let max = ratios.iter().copied().fold(f64::NAN, f64::max);
    (median(ratios.into_iter()), min, max)
}

/// A number for a table: thousands separated, or "–" when unknown.
pub fn fmt(x: f64, decimals: usize) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    let s = format!("{x:.decimals$}");
    let (int, frac) = s
        .split_once('.')
        .map_or((s.as_str(), None), |(i, f)| (i, Some(f)));
    let (sign, digits) = int.strip_prefix('-').map_or(("", int), |d| ("-", d));
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

/// The table of medians: one row per variant.
pub fn table(title: &str, rate_unit: &str, latency: bool, series: &[Series]) -> String {
    let rounds = series.iter().map(|s| s.samples.len()).max().unwrap_or(0);
    let mut out = format!("\n#### {title} (median of {rounds} alternating rounds)\n\n");
    let _ = write!(out, "| variant | {rate_unit} |");
    if latency {
        out.push_str(" p50 ms | p99 ms |");
    }
    out.push_str(" its CPU µs/req | nats-server CPU µs/req |");
    if latency {
        out.push_str(" evgrid load CPU µs/req |");
    }
    out.push_str("\n|---|---:|");
    if latency {
        out.push_str("---:|---:|---:|");
    }
    out.push_str("---:|---:|\n");
    for s in series {
        let _ = write!(out, "| {} | {} |", s.name, fmt(s.median(|x| x.rate), 0));
        if latency {
            let _ = write!(
                out,
                " {} | {} |",
                fmt(s.median(|x| x.p50_ms), 2),
                fmt(s.median(|x| x.p99_ms), 2)
            );
        }
        let _ = write!(
            out,
            " {} | {} |",
            fmt(s.median(|x| x.service_cpu_us), 1),
            fmt(s.median(|x| x.nats_cpu_us), 1)
        );
        if latency {
            let _ = write!(out, " {} |", fmt(s.median(|x| x.load_cpu_us), 1));
        }
        out.push('\n');
    }
    out
}

/// A ratio row: `ours / reference`, throughput (and p99), median of the per-round ratios with
/// their range, against the targets.
pub fn ratio_line(
    ours: &Series,
    reference: &Series,
    min_rate_ratio: f64,
    max_p99_ratio: Option<f64>,
) -> String {
    let (r, lo, hi) = ratio(ours, reference, |x| x.rate);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut line = format!(
        "- {} / {}: throughput **{:.2}×** (rounds {:.2}–{:.2}; target ≥ {min_rate_ratio}: {})",
        ours.name,
        reference.name,
        r,
        lo,
        hi,
        verdict(r >= min_rate_ratio)
    );
    if let Some(max_p99) = max_p99_ratio {
        let (p, lo, hi) = ratio(ours, reference, |x| x.p99_ms);
        let _ = write!(
            line,
            ", p99 **{p:.2}×** (rounds {lo:.2}–{hi:.2}; target ≤ {max_p99}: {})",
            verdict(p <= max_p99)
        );
    }
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(name: &str, rates: &[f64]) -> Series {
        Series {
            name: name.into(),
            samples: rates
                .iter()
                .map(|&rate| Sample {
                    rate,
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn medians_skip_unknowns() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, f64::NAN, 2.0, 3.0].into_iter()), 2.5);
        assert!(median(std::iter::empty()).is_nan());
    }

    #[test]
    fn ratios_are_taken_round_by_round() {
        let ours = series("ours", &[90.0, 45.0, 100.0]);
        let reference = series("ref", &[100.0, 50.0, 200.0]);
        assert_eq!(ratio(&ours, &reference, |x| x.rate), (0.9, 0.5, 0.9));
        let line = ratio_line(&ours, &reference, 0.8, None);
        assert!(
            line.contains("**0.90×**") && line.contains(": met"),
            "{line}"
        );
    }

    #[test]
    fn numbers_for_tables() {
        assert_eq!(fmt(1234567.4, 0), "1,234,567");
        assert_eq!(fmt(999.0, 0), "999");
        assert_eq!(fmt(-12345.678, 2), "-12,345.68");
        assert_eq!(fmt(f64::NAN, 1), "–");
    }
}
