//! The requests `evgrid sim` replays: real sessions from ACN traces (optionally folded onto one
//! week or day) and synthetic ones (Poisson arrivals, bursts), as charge requests would reach
//! ingest → dispatcher → substation. Times are simulated seconds from the start of the run.
//!
//! Every request obeys the live contract: energy in (0, 200] kWh, and no more than the car can
//! take at its max power before it leaves (the dispatcher would reject it as `undeliverable`),
//! so trace sessions asking for more are capped at that; sessions asking for nothing, or
//! leaving as they arrive, are skipped.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration, NaiveTime, Timelike, Utc};
use evgrid_model::SECONDS_PER_HOUR;
use evgrid_model::units::parse_duration_in;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::trace::Session;

/// The most energy one request may ask for (the contract of `ev.requests`).
pub const MAX_ENERGY_KWH: f64 = 200.0;

/// A request is capped just below its full-power energy, so float rounding can never make it
/// undeliverable at its own arrival.
const FEASIBLE_MARGIN: f64 = 1.0 - 1e-9;

/// One charge request of the workload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Request {
    /// When it reaches the dispatcher (simulated seconds).
    pub at: f64,
    pub energy_kwh: f64,
    pub max_power_kw: f64,
    /// When the car leaves (simulated seconds), if it says.
    pub departure: Option<f64>,
}

/// How trace sessions are laid onto the simulated clock.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fold {
    /// As recorded: the run starts on the Monday (00:00 UTC) before the first arrival.
    #[default]
    None,
    /// Every session keeps its weekday and time of day (UTC) within one week: years of sessions
    /// stacked into city-scale load with the real weekly pattern.
    Week,
    /// Every session keeps its time of day (UTC) within one day.
    Day,
}

/// A range `MIN..MAX` of a synthetic quantity, drawn uniformly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    pub min: f64,
    pub max: f64,
}

impl Range {
    fn draw(&self, rng: &mut SmallRng) -> f64 {
        if self.max > self.min {
            rng.random_range(self.min..self.max)
        } else {
            self.min
        }
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.min, self.max)
    }
}

impl FromStr for Range {
    type Err = String;

    /// `5..40`, or a single number for a fixed value.
    fn from_str(s: &str) -> Result<Self, String> {
        let number = |t: &str| match t.trim().parse::<f64>() {
            Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
            _ => Err(format!(
                "expected MIN..MAX with numbers above 0 (e.g. 5..40), got {s:?}"
            )),
        };
        let (min, max) = match s.split_once("..") {
            Some((a, b)) => (number(a)?, number(b)?),
            None => (number(s)?, number(s)?),
        };
        if min > max {
            return Err(format!("{s:?}: the minimum is above the maximum"));
        }
        Ok(Self { min, max })
    }
}

/// `N@T`: N requests within one second from simulated time T (a depot at shift change).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Burst {
    pub count: u32,
    pub at: f64,
}

impl FromStr for Burst {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || format!("expected N@TIME such as 500@8h or 300@90s, got {s:?}");
        let (count, at) = s.split_once('@').ok_or_else(usage)?;
        let count = count.trim().parse().map_err(|_| usage())?;
        Ok(Self {
            count,
            at: parse_sim_time(at)?,
        })
    }
}

/// A simulated time or duration in seconds, written with its unit: `90s`, `30m`, `8h`, `2d`
/// (evgrid's one duration syntax; a plain number is refused).
pub fn parse_sim_time(s: &str) -> Result<f64, String> {
    use std::time::Duration;
    parse_duration_in(s, Duration::ZERO..=Duration::MAX).map(|d| d.as_secs_f64())
}

/// What synthetic requests look like.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Synthetic {
    /// Energy asked for, kWh.
    pub energy_kwh: Range,
    /// Hours from arrival to departure; `None`: cars without a departure.
    pub stay_h: Option<Range>,
    pub max_power_kw: f64,
}

impl Synthetic {
    fn request(&self, at: f64, rng: &mut SmallRng) -> Request {
        let energy = self.energy_kwh.draw(rng);
        let departure = self
            .stay_h
            .map(|stay| at + stay.draw(rng) * SECONDS_PER_HOUR);
        feasible(at, energy, self.max_power_kw, departure)
    }
}

/// The request for `energy_kwh`, capped at what the car can take before it leaves and at the
/// contract's maximum.
pub fn feasible(at: f64, energy_kwh: f64, max_power_kw: f64, departure: Option<f64>) -> Request {
    let deliverable = departure.map_or(f64::INFINITY, |d| {
        max_power_kw * (d - at) / SECONDS_PER_HOUR * FEASIBLE_MARGIN
    });
    Request {
        at,
        energy_kwh: energy_kwh.min(deliverable).min(MAX_ENERGY_KWH),
        max_power_kw,
        departure,
    }
}

/// Poisson arrivals at `per_hour` requests per hour over `[0, duration_s)`.
pub fn poisson(
    per_hour: f64,
    duration_s: f64,
    shape: &Synthetic,
    rng: &mut SmallRng,
) -> Vec<Request> {
    let mut requests = Vec::new();
    let rate_per_s = per_hour / SECONDS_PER_HOUR;
    let mut t = 0.0;
    loop {
        // Exponential gaps; 1 − U is in (0, 1], so the logarithm is finite.
        t += -(1.0 - rng.random::<f64>()).ln() / rate_per_s;
        if t >= duration_s {
            return requests;
        }
        requests.push(shape.request(t, rng));
    }
}

/// `burst.count` requests at uniform times within one second from `burst.at`.
pub fn burst(burst: Burst, shape: &Synthetic, rng: &mut SmallRng) -> Vec<Request> {
    (0..burst.count)
        .map(|_| {
            let at = burst.at + rng.random_range(0.0..1.0);
            shape.request(at, rng)
        })
        .collect()
}

/// Requests from trace sessions, every car at `max_power_kw`. Returns them with how many
/// sessions were skipped (nothing asked, or no time parked).
pub fn from_sessions(sessions: &[Session], fold: Fold, max_power_kw: f64) -> (Vec<Request>, usize) {
    let Some(first) = sessions.iter().map(|s| s.arrival).min() else {
        return (Vec::new(), 0);
    };
    let origin = monday_before(first);
    let mut skipped = 0;
    let requests = sessions
        .iter()
        .filter_map(|s| {
            let stay_s = (s.departure - s.arrival).num_milliseconds() as f64 / 1e3;
            if s.energy_kwh <= 0.0 || stay_s <= 0.0 {
                skipped += 1;
                return None;
            }
            let at = match fold {
                Fold::None => seconds_between(origin, s.arrival),
                Fold::Week => seconds_between(monday_before(s.arrival), s.arrival),
                Fold::Day => f64::from(s.arrival.time().num_seconds_from_midnight()),
            };
            Some(feasible(at, s.energy_kwh, max_power_kw, Some(at + stay_s)))
        })
        .collect();
    (requests, skipped)
}

/// Synthetic requests drawn from `seed`: Poisson arrivals and bursts.
pub fn synthetic(
    poisson_per_hour: Option<f64>,
    duration_s: f64,
    bursts: &[Burst],
    shape: &Synthetic,
    seed: u64,
) -> Vec<Request> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut requests = match poisson_per_hour {
        Some(rate) => poisson(rate, duration_s, shape, &mut rng),
        None => Vec::new(),
    };
    for &b in bursts {
        requests.extend(burst(b, shape, &mut rng));
    }
    requests
}

/// Sorts by arrival time (stable: equal times keep their order).
pub fn sort(requests: &mut [Request]) {
    requests.sort_by(|a, b| a.at.total_cmp(&b.at));
}

/// 00:00 UTC of the Monday on or before `t`: where an unfolded trace's simulated clock starts.
pub fn monday_before(t: DateTime<Utc>) -> DateTime<Utc> {
    let days = i64::from(t.weekday().num_days_from_monday());
    (t.date_naive() - Duration::days(days))
        .and_time(NaiveTime::MIN)
        .and_utc()
}

fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_milliseconds() as f64 / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(arrival: &str, hours: i64, energy_kwh: f64) -> Session {
        let arrival = DateTime::parse_from_rfc3339(arrival).unwrap().to_utc();
        Session {
            arrival,
            departure: arrival + Duration::hours(hours),
            energy_kwh,
        }
    }

    #[test]
    fn folding_keeps_weekday_and_time_of_day() {
        // A Wednesday 08:00 UTC in 2019 and a Monday 09:30 UTC in 2021.
        let sessions = [
            session("2019-05-01T08:00:00Z", 4, 10.0),
            session("2021-08-30T09:30:00Z", 2, 5.0),
        ];
        let (week, skipped) = from_sessions(&sessions, Fold::Week, 6.6);
        assert_eq!(skipped, 0);
        assert_eq!(week[0].at, 2.0 * 86400.0 + 8.0 * 3600.0);
        assert_eq!(week[0].departure, Some(week[0].at + 4.0 * 3600.0));
        assert_eq!(week[1].at, 9.5 * 3600.0);
        let (day, _) = from_sessions(&sessions, Fold::Day, 6.6);
        assert_eq!((day[0].at, day[1].at), (8.0 * 3600.0, 9.5 * 3600.0));
        // Unfolded: from the Monday before the first arrival.
        let (asis, _) = from_sessions(&sessions, Fold::None, 6.6);
        assert_eq!(asis[0].at, week[0].at);
        assert!(asis[1].at > 800.0 * 86400.0);
    }

    #[test]
    fn requests_never_ask_more_than_the_car_can_take_before_leaving() {
        let sessions = [
            // 60 kWh in 2 h at 6.6 kW: capped at 13.2 kWh.
            session("2019-05-01T08:00:00Z", 2, 60.0),
            session("2019-05-01T08:00:00Z", 2, 0.0),
            session("2019-05-01T08:00:00Z", 0, 5.0),
        ];
        let (requests, skipped) = from_sessions(&sessions, Fold::Week, 6.6);
        assert_eq!((requests.len(), skipped), (1, 2));
        assert!((requests[0].energy_kwh - 13.2).abs() < 1e-6);
        assert!(requests[0].energy_kwh < 13.2);
    }

    #[test]
    fn synthetic_workloads_are_reproducible() {
        let shape = Synthetic {
            energy_kwh: "5..40".parse().unwrap(),
            stay_h: Some("1..8".parse().unwrap()),
            max_power_kw: 11.0,
        };
        let bursts = ["300@8h".parse::<Burst>().unwrap()];
        let a = synthetic(Some(60.0), 86400.0, &bursts, &shape, 42);
        assert_eq!(a, synthetic(Some(60.0), 86400.0, &bursts, &shape, 42));
        assert_ne!(a, synthetic(Some(60.0), 86400.0, &bursts, &shape, 43));
        let in_burst = a
            .iter()
            .filter(|r| (8.0 * 3600.0..8.0 * 3600.0 + 1.0).contains(&r.at))
            .count();
        assert!(in_burst >= 300);
        // About 60 an hour for a day.
        assert!((1200..1700).contains(&(a.len() - 300)), "{}", a.len());
        for r in &a {
            let stay_h = (r.departure.unwrap() - r.at) / 3600.0;
            assert!(r.energy_kwh <= 11.0 * stay_h && r.energy_kwh <= 40.0);
        }
    }

    #[test]
    fn options_parse_or_say_why_not() {
        assert_eq!(parse_sim_time("90s"), Ok(90.0));
        assert!(parse_sim_time("90").is_err());
        assert_eq!(parse_sim_time("30m"), Ok(1800.0));
        assert_eq!(parse_sim_time("8h"), Ok(28800.0));
        assert_eq!(parse_sim_time("2d"), Ok(172800.0));
        assert!(parse_sim_time("soon").is_err());
        assert_eq!(
            "500@8h".parse::<Burst>(),
            Ok(Burst {
                count: 500,
                at: 28800.0
            })
        );
        assert!("500".parse::<Burst>().is_err());
        assert_eq!(
            "5..40".parse::<Range>(),
            Ok(Range {
                min: 5.0,
                max: 40.0
            })
        );
        assert!("40..5".parse::<Range>().is_err());
        assert!("0..5".parse::<Range>().is_err());
    }
}
