//! The units evgrid's options are given in: durations with their unit (humantime's syntax,
//! `500ms`, `2s`, `1m 30s`) and positive numbers (capacities, time scales). Pure value parsers
//! with one-line errors, used by every binary's options and by the simulator's; the
//! precision numbers are shown with ([`round3`]); and [`Ordered`] numbers for heaps.

use std::ops::RangeInclusive;
use std::time::Duration;

/// A number with a total order (`f64::total_cmp`), for heaps and sorted queues of times,
/// energies or laxities: the charging model's triage and the simulator's offer queue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ordered(pub f64);

impl Eq for Ordered {}

impl PartialOrd for Ordered {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ordered {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// A positive, finite number (capacities, time scales).
pub fn parse_positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("expected a number greater than 0, got {s:?}")),
    }
}

/// A substation capacity in kW: above 0 and at most
/// [`CAPACITY_KW_MAX`](crate::messages::CAPACITY_KW_MAX), the most a heartbeat may state.
pub fn parse_capacity(s: &str) -> Result<f64, String> {
    let max = crate::messages::CAPACITY_KW_MAX;
    match parse_positive(s) {
        Ok(kw) if kw <= max => Ok(kw),
        _ => Err(format!(
            "expected a number greater than 0 and at most {max} kW, got {s:?}"
        )),
    }
}

/// The range of service durations (heartbeat intervals, retry delays, scrape intervals).
pub const SERVICE_DURATIONS: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(3600);

/// A duration option from 1 ms to 1 hour (heartbeat intervals, retry delays): see
/// [`parse_duration_in`] for the syntax.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    parse_duration_in(s, SERVICE_DURATIONS)
}

/// A duration above zero, with no upper bound (timeouts and run lengths of `evgrid load`).
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    parse_duration_in(s, Duration::from_nanos(1)..=Duration::MAX)
}

/// Every duration option of evgrid is read here, in humantime's syntax: a number with its unit
/// (`500ms`, `2s`, `1.5s`, `1m` or `1min`, `8h`, `2d`, also `1m 30s`), within `range`. A plain
/// number is refused: options used to read it as milliseconds in some places and seconds in
/// others, and `--heartbeat 1` silently meant 1 ms.
pub fn parse_duration_in(s: &str, range: RangeInclusive<Duration>) -> Result<Duration, String> {
    let t = s.trim();
    if t.starts_with(|c: char| c.is_ascii_digit()) && t.parse::<f64>().is_ok() {
        return Err(format!(
            "{t:?} has no unit: write e.g. {t}ms or {t}s (units: ms, s, m, h, d)"
        ));
    }
    let d = humantime::parse_duration(t).map_err(|e| {
        format!("expected a duration with its unit such as 500ms, 2s or 1m, got {s:?} ({e})")
    })?;
    if range.contains(&d) {
        Ok(d)
    } else if *range.start() == Duration::from_nanos(1) {
        Err(format!("expected a duration above zero, got {s:?}"))
    } else {
        Err(format!(
            "expected a duration from {} to {}, got {s:?}",
            humantime::format_duration(*range.start()),
            humantime::format_duration(*range.end())
        ))
    }
}

/// Rounds to 3 decimals: Wh for kWh, W for kW, ms for seconds. What a reading can mean, without
/// float noise such as `49.99999999999999`, in request bodies and API answers alike.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1min"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in [
            "", "0", "0s", "2h", "s", "1.2.3s", "-1s", "fast", "61m", "750",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_positive_duration("10 days"),
            Ok(Duration::from_secs(864_000))
        );
        assert!(parse_positive_duration("0s").is_err());
    }

    #[test]
    fn a_plain_number_is_refused_with_a_unit_to_try() {
        let e = parse_duration("1").unwrap_err();
        assert_eq!(
            e,
            r#""1" has no unit: write e.g. 1ms or 1s (units: ms, s, m, h, d)"#
        );
        assert!(!e.contains('\n'));
        let e = parse_duration("2h").unwrap_err();
        assert_eq!(e, r#"expected a duration from 1ms to 1h, got "2h""#);
    }

    #[test]
    fn positive_numbers() {
        assert_eq!(parse_positive("2.5"), Ok(2.5));
        assert!(parse_positive("0").is_err());
        assert!(parse_positive("-3").is_err());
        assert!(parse_positive("inf").is_err());
        assert!(parse_positive("ten").is_err());
    }
}
