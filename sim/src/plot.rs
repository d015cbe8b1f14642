//! `evgrid sim --plot FILE.svg`: each substation's load against its capacity over simulated
//! time, one panel per substation, as a hand-written SVG (no plotting dependency).

use std::fmt::Write;

use evgrid_model::charging::LoadPoint;

/// Panels drawn at most: a plot of hundreds of substations is unreadable anyway.
pub const MAX_PANELS: usize = 12;

const WIDTH: f64 = 1000.0;
const PANEL_HEIGHT: f64 = 150.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 50.0;
const GAP: f64 = 40.0;
/// Columns the time axis is cut into: each shows the highest load within it.
const BINS: usize = 900;

/// The SVG document: `title`, then one panel per substation (`ids[i]`, `load[i]`).
pub fn svg(title: &str, ids: &[String], load: &[Vec<LoadPoint>]) -> String {
    let panels = ids.len().min(MAX_PANELS);
    let end = load
        .iter()
        .filter_map(|log| log.last().map(|p| p.at))
        .fold(0.0_f64, f64::max)
        .max(1.0);
    let start = load
        .iter()
        .filter_map(|log| log.first().map(|p| p.at))
        .fold(end, f64::min);
    let span = (end - start).max(1.0);
    let height = TOP + panels as f64 * (PANEL_HEIGHT + GAP) + 10.0;
    let plot_width = WIDTH - LEFT - RIGHT;
    let x = |t: f64| LEFT + (t - start) / span * plot_width;

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{LEFT}" y="20" font-size="14">{}</text>"#,
        escape(title)
    );
    let _ = writeln!(
        out,
        r##"<text x="{LEFT}" y="38"><tspan fill="#1f77b4">— load (highest per {:.0} min)</tspan>  <tspan fill="#d62728">- - capacity</tspan>  time in {}</text>"##,
        span / BINS as f64 / 60.0,
        if span > 2.0 * 86400.0 {
            "days"
        } else {
            "hours"
        }
    );
    for (panel, (id, log)) in ids.iter().zip(load).take(panels).enumerate() {
        let top = TOP + panel as f64 * (PANEL_HEIGHT + GAP) + 10.0;
        let bottom = top + PANEL_HEIGHT;
        let peak_kw = log
            .iter()
            .map(|p| p.load_kw.max(p.capacity_kw))
            .fold(0.0_f64, f64::max)
            .max(1.0)
            * 1.1;
        let y = |kw: f64| bottom - kw / peak_kw * PANEL_HEIGHT;
        let capacity_kw = log.last().map_or(0.0, |p| p.capacity_kw);
        let _ = writeln!(
            out,
            r##"<text x="{LEFT}" y="{:.1}">{}: capacity {capacity_kw:.0} kW</text><rect x="{LEFT}" y="{top:.1}" width="{plot_width}" height="{PANEL_HEIGHT}" fill="none" stroke="#999"/>"##,
            top - 4.0,
            escape(id)
        );
        // Axes: kW on the left, time below.
        for step in 0..=2 {
            let kw = peak_kw / 1.1 * f64::from(step) / 2.0;
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{kw:.0} kW</text>"#,
                LEFT - 4.0,
                y(kw) + 4.0
            );
        }
        let tick = if span > 2.0 * 86400.0 {
            86400.0
        } else {
            tick_hours(span) * 3600.0
        };
        let mut t = (start / tick).ceil() * tick;
        while t <= end {
            let label = if tick >= 86400.0 {
                t / 86400.0
            } else {
                t / 3600.0
            };
            let _ = writeln!(
                out,
                r##"<line x1="{0:.1}" x2="{0:.1}" y1="{top:.1}" y2="{bottom:.1}" stroke="#eee"/><text x="{0:.1}" y="{1:.1}" text-anchor="middle">{label:.0}</text>"##,
                x(t),
                bottom + 13.0
            );
            t += tick;
        }
        let _ = writeln!(
            out,
            r##"<polyline fill="none" stroke="#d62728" stroke-dasharray="6 4" points="{}"/>"##,
            steps(log, start, end, |p| p.capacity_kw, &x, &y)
        );
        let _ = writeln!(
            out,
            r##"<polyline fill="none" stroke="#1f77b4" points="{}"/>"##,
            binned(log, start, end, &x, &y)
        );
    }
    if ids.len() > panels {
        let _ = writeln!(
            out,
            r#"<text x="{LEFT}" y="{:.1}">… and {} more substations</text>"#,
            height - 4.0,
            ids.len() - panels
        );
    }
    out.push_str("</svg>\n");
    out
}

/// Hours between time ticks for a span under two days.
fn tick_hours(span_s: f64) -> f64 {
    match span_s / 3600.0 {
        h if h <= 6.0 => 1.0,
        h if h <= 24.0 => 3.0,
        _ => 6.0,
    }
}

/// A step line of `value` over the log.
fn steps(
    log: &[LoadPoint],
    start: f64,
    end: f64,
    value: impl Fn(&LoadPoint) -> f64,
    x: &impl Fn(f64) -> f64,
    y: &impl Fn(f64) -> f64,
) -> String {
    let mut points = String::new();
    let mut last: Option<f64> = None;
    for p in log {
        let v = value(p);
        if last == Some(v) {
            continue;
        }
        if let Some(prev) = last {
            let _ = write!(points, "{:.1},{:.1} ", x(p.at), y(prev));
        }
        let _ = write!(points, "{:.1},{:.1} ", x(p.at.max(start)), y(v));
        last = Some(v);
    }
    if let Some(v) = last {
        let _ = write!(points, "{:.1},{:.1}", x(end), y(v));
    }
    points
}

/// The load as a step line over [`BINS`] columns, each at the highest load within it.
fn binned(
    log: &[LoadPoint],
    start: f64,
    end: f64,
    x: &impl Fn(f64) -> f64,
    y: &impl Fn(f64) -> f64,
) -> String {
    let width = (end - start) / BINS as f64;
    let mut highest = vec![0.0_f64; BINS];
    for (i, p) in log.iter().enumerate() {
        let until = log.get(i + 1).map_or(end, |next| next.at);
        let first = (((p.at - start) / width) as usize).min(BINS - 1);
        let last = ((((until - start) / width).ceil() as usize).max(first + 1)).min(BINS);
        for bin in &mut highest[first..last] {
            *bin = bin.max(p.load_kw);
        }
    }
    let mut points = String::new();
    for (bin, kw) in highest.iter().enumerate() {
        let from = start + bin as f64 * width;
        let _ = write!(
            points,
            "{:.1},{:.1} {:.1},{:.1} ",
            x(from),
            y(*kw),
            x(from + width),
            y(*kw)
        );
    }
    points
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_one_panel_per_substation_with_load_and_capacity() {
        let log = |cap: f64| {
            vec![
                LoadPoint {
                    at: 0.0,
                    load_kw: 10.0,
                    capacity_kw: cap,
                },
                LoadPoint {
                    at: 3600.0,
                    load_kw: cap,
                    capacity_kw: cap,
                },
                LoadPoint {
                    at: 7200.0,
                    load_kw: 0.0,
                    capacity_kw: cap,
                },
            ]
        };
        let svg = svg(
            "predictive & llf <test>",
            &["s1".into(), "s2".into()],
            &[log(50.0), log(80.0)],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert!(svg.contains("s2: capacity 80 kW"));
        assert!(svg.contains("&amp; llf &lt;test&gt;"));
    }
}
