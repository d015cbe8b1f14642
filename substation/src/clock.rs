//! The substation's simulated clock: how the pure charging model's simulated seconds map to
//! the tokio clock (when to wake for the next completion) and to wall time (what events and
//! states report). Simulated seconds since start = wall seconds since start × `--time-scale`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

/// Maps the simulated clock of the charging model to wall time: simulated seconds since start
/// = wall seconds since start × time scale.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SimClock {
    start: Instant,
    start_wall: DateTime<Utc>,
    scale: f64,
}

impl SimClock {
    pub fn new(start: Instant, start_wall: DateTime<Utc>, scale: f64) -> Self {
        Self {
            start,
            start_wall,
            scale,
        }
    }

    /// Simulated seconds per wall second (`--time-scale`).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Simulated seconds at `instant`.
    pub fn sim_at(&self, instant: Instant) -> f64 {
        instant.saturating_duration_since(self.start).as_secs_f64() * self.scale
    }

    /// The instant the simulated clock reads `sim` (far future when out of range).
    pub fn instant_at(&self, sim: f64) -> Instant {
        let real = Duration::try_from_secs_f64((sim / self.scale).max(0.0))
            .unwrap_or(Duration::from_secs(365 * 24 * 3600));
        self.start + real.min(Duration::from_secs(365 * 24 * 3600))
    }

    /// The wall-clock time at simulated time `sim`.
    pub fn wall_at(&self, sim: f64) -> DateTime<Utc> {
        self.start_wall + chrono::Duration::microseconds((sim / self.scale * 1e6) as i64)
    }

    pub fn now(&self) -> f64 {
        self.sim_at(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_simulated_clock_runs_time_scale_times_faster() {
        let start = Instant::now();
        let wall = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let clock = SimClock::new(start, wall, 3600.0);
        assert_eq!(clock.sim_at(start + Duration::from_millis(500)), 1800.0);
        assert_eq!(clock.instant_at(7200.0), start + Duration::from_secs(2));
        assert_eq!(clock.wall_at(3600.0), wall + chrono::Duration::seconds(1));
        assert_eq!(clock.sim_at(start - Duration::from_secs(1)), 0.0);
        assert!(clock.instant_at(f64::INFINITY) > start + Duration::from_secs(3600));
    }
}
