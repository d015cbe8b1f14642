//! How the grid took a load run, from what `--wait-complete` saw at the end of the flow
//! (dispatches from session events, substation heartbeats): peak utilization and the herd
//! factor. Pure functions over plain data; the follower collects the data.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use evgrid_model::liveness::stale_after;

/// Windows with fewer dispatches than this say nothing about herding.
pub const HERD_MIN_DISPATCHES: usize = 10;

/// One heartbeat as the follower saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatSample {
    pub substation: String,
    /// When the server stored it (one clock for every substation).
    pub stored_at: DateTime<Utc>,
    pub capacity_kw: f64,
    pub load_kw: f64,
    pub interval: Duration,
}

/// The highest load ÷ capacity in heartbeats stored at or after `from`; `None` without any.
pub fn peak_utilization(samples: &[HeartbeatSample], from: DateTime<Utc>) -> Option<f64> {
    samples
        .iter()
        .filter(|s| s.stored_at >= from && s.capacity_kw > 0.0)
        .map(|s| s.load_kw / s.capacity_kw)
        .reduce(f64::max)
}

/// The substations taking part in a run that started at `from`: up then (heard from within
/// [`stale_after`] their interval) or heard from since, with their latest capacity. A
/// substation that died days ago still has its last heartbeat stored, and must not count.
pub fn capacities(samples: &[HeartbeatSample], from: DateTime<Utc>) -> BTreeMap<String, f64> {
    let mut latest: BTreeMap<String, &HeartbeatSample> = BTreeMap::new();
    for s in samples {
        let stale_by = stale_after(s.interval);
        if s.stored_at + stale_by < from {
            continue;
        }
        match latest.get(&s.substation) {
            Some(seen) if seen.stored_at > s.stored_at => {}
            _ => {
                latest.insert(s.substation.clone(), s);
            }
        }
    }
    latest
        .into_iter()
        .filter(|(_, s)| s.capacity_kw > 0.0)
        .map(|(id, s)| (id, s.capacity_kw))
        .collect()
}

/// The heartbeat interval of the grid: the longest any substation reports (1 s if none).
pub fn heartbeat_interval(samples: &[HeartbeatSample]) -> Duration {
    samples
        .iter()
        .map(|s| s.interval)
        .max()
        .unwrap_or(Duration::from_secs(1))
}

/// The herd factor: cut time into windows of `interval` from the first dispatch; in each window
/// with at least `min_dispatches`, a substation's share of the window's dispatches divided by its
/// fair share (its capacity ÷ the total capacity); the largest such ratio. 1 means load spread in
/// proportion to capacity; N substations of equal size all piling onto one gives N. `None`
/// when no window qualifies or no capacity is known.
pub fn herd_factor(
    dispatches: &[(DateTime<Utc>, &str)],
    capacities: &BTreeMap<String, f64>,
    interval: Duration,
    min_dispatches: usize,
) -> Option<f64> {
    let total_capacity: f64 = capacities.values().sum();
    let start = dispatches.iter().map(|(t, _)| *t).min()?;
    if total_capacity <= 0.0 || interval.is_zero() {
        return None;
    }
    let width = interval.as_micros() as i64;
    let mut windows: BTreeMap<i64, HashMap<&str, u64>> = BTreeMap::new();
    for (t, substation) in dispatches {
        let offset = (*t - start).num_microseconds().unwrap_or(i64::MAX);
        *windows
            .entry(offset / width)
            .or_default()
            .entry(substation)
            .or_default() += 1;
    }
    windows
        .values()
        .filter_map(|counts| {
            let n: u64 = counts.values().sum();
            if (n as usize) < min_dispatches {
                return None;
            }
            counts
                .iter()
                .filter_map(|(s, k)| {
                    let fair = capacities.get(*s)? / total_capacity;
                    Some((*k as f64 / n as f64) / fair)
                })
                .reduce(f64::max)
        })
        .reduce(f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    fn at(ms: i64) -> DateTime<Utc> {
        t0() + chrono::Duration::milliseconds(ms)
    }

    fn caps(list: &[(&str, f64)]) -> BTreeMap<String, f64> {
        list.iter().map(|(s, c)| (s.to_string(), *c)).collect()
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn spread_in_proportion_to_capacity_is_one() {
        let c = caps(&[("a", 100.0), ("b", 100.0), ("c", 200.0)]);
        let names = ["a", "b", "c", "c"];
        let d: Vec<_> = (0..40)
            .map(|i| (at(i * 10), names[i as usize % 4]))
            .collect();
        let h = herd_factor(&d, &c, SECOND, HERD_MIN_DISPATCHES).unwrap();
        assert!((h - 1.0).abs() < 1e-9, "{h}");
    }

    #[test]
    fn a_burst_on_one_of_three_is_three() {
        let c = caps(&[("a", 100.0), ("b", 100.0), ("c", 100.0)]);
        let mut d: Vec<_> = (0..12).map(|i| (at(i), "a")).collect();
        // A later, well-spread window does not hide the burst.
        d.extend((0..30).map(|i| (at(5_000 + i), ["a", "b", "c"][i as usize % 3])));
        let h = herd_factor(&d, &c, SECOND, HERD_MIN_DISPATCHES).unwrap();
        assert!((h - 3.0).abs() < 1e-9, "{h}");
    }

    #[test]
    fn small_windows_and_unknown_capacities_say_nothing() {
        let c = caps(&[("a", 100.0), ("b", 100.0)]);
        let d: Vec<_> = (0..9).map(|i| (at(i), "a")).collect();
        assert_eq!(herd_factor(&d, &c, SECOND, HERD_MIN_DISPATCHES), None);
        let d: Vec<_> = (0..20).map(|i| (at(i * 200), "a")).collect();
        assert_eq!(
            herd_factor(&d, &c, SECOND, HERD_MIN_DISPATCHES),
            None,
            "5 per second"
        );
        assert_eq!(herd_factor(&[], &c, SECOND, 1), None);
        assert_eq!(
            herd_factor(&[(at(0), "a")], &BTreeMap::new(), SECOND, 1),
            None
        );
    }

    fn sample(s: &str, ms: i64, capacity_kw: f64, load_kw: f64) -> HeartbeatSample {
        HeartbeatSample {
            substation: s.into(),
            stored_at: at(ms),
            capacity_kw,
            load_kw,
            interval: SECOND,
        }
    }

    #[test]
    fn peak_utilization_counts_only_heartbeats_of_the_run() {
        let samples = [
            sample("a", -500, 100.0, 100.0),
            sample("a", 500, 100.0, 40.0),
            sample("b", 700, 50.0, 45.0),
        ];
        assert_eq!(peak_utilization(&samples, at(0)), Some(0.9));
        assert_eq!(peak_utilization(&samples, at(1_000)), None);
    }

    #[test]
    fn capacities_keep_live_substations_at_their_latest_size() {
        let samples = [
            sample("dead", -60_000, 500.0, 0.0),
            sample("a", -500, 100.0, 0.0),
            sample("a", 500, 150.0, 0.0),
            sample("b", 900, 50.0, 0.0),
        ];
        assert_eq!(
            capacities(&samples, at(0)),
            caps(&[("a", 150.0), ("b", 50.0)])
        );
        assert_eq!(heartbeat_interval(&samples), SECOND);
        assert_eq!(heartbeat_interval(&[]), SECOND);
    }
}
