//! The substation's simulated clock: how the pure charging model's simulated seconds map to
//! the tokio clock (when to wake for the next completion) and to wall time (what events and
//! states report). Simulated seconds since start = wall seconds the process was running since
//! start × `--time-scale`.
//!
//! Time the process was not running does not count: the service's loop reads the clock at least
//! every heartbeat interval, so a gap between two readings longer than [`SimClock::max_step`]
//! means the process was frozen (SIGSTOP, a stalled VM) and only `max_step` of it is counted.
//! Otherwise 10 s frozen at `--time-scale 3600` would become 10 hours of charging that no car
//! received, completed the moment the process resumed.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

/// Maps the simulated clock of the charging model to wall time: simulated seconds since start
/// = wall seconds since start, less the time the process was frozen, × time scale.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SimClock {
    start: Instant,
    start_wall: DateTime<Utc>,
    scale: f64,
    /// The longest gap between two readings that counts in full.
    max_step: Duration,
    /// Wall time not counted: the excess of every longer gap.
    frozen: Duration,
    /// The latest reading.
    last: Instant,
}

impl SimClock {
    pub fn new(start: Instant, start_wall: DateTime<Utc>, scale: f64, max_step: Duration) -> Self {
        Self {
            start,
            start_wall,
            scale,
            max_step,
            frozen: Duration::ZERO,
            last: start,
        }
    }

    /// The longest gap between two readings a running service can show when it reads the clock
    /// every `heartbeat`: twice that, plus a second for a busy machine.
    pub fn max_step_for(heartbeat: Duration) -> Duration {
        heartbeat.saturating_mul(2) + Duration::from_secs(1)
    }

    /// Wall time not counted so far because the process was frozen.
    #[cfg(test)]
    pub fn frozen(&self) -> Duration {
        self.frozen
    }

    /// Simulated seconds per wall second (`--time-scale`).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Reads the clock at `instant`: simulated seconds, not counting what a gap longer than
    /// `max_step` since the last reading exceeds it by.
    pub fn read_at(&mut self, instant: Instant) -> f64 {
        let gap = instant.saturating_duration_since(self.last);
        if gap > self.max_step {
            let skipped = gap - self.max_step;
            self.frozen += skipped;
            tracing::warn!(
                ?gap,
                not_counted = ?skipped,
                "the substation was not running (frozen or starved); that time is not counted as charging"
            );
        }
        self.last = self.last.max(instant);
        instant
            .saturating_duration_since(self.start)
            .saturating_sub(self.frozen)
            .as_secs_f64()
            * self.scale
    }

    /// Reads the clock now.
    pub fn now(&mut self) -> f64 {
        self.read_at(Instant::now())
    }

    /// The instant the simulated clock reads `sim` (far future when out of range).
    pub fn instant_at(&self, sim: f64) -> Instant {
        let real = Duration::try_from_secs_f64((sim / self.scale).max(0.0))
            .unwrap_or(Duration::from_secs(365 * 24 * 3600));
        self.start + self.frozen + real.min(Duration::from_secs(365 * 24 * 3600))
    }

    /// The wall-clock time at simulated time `sim`.
    pub fn wall_at(&self, sim: f64) -> DateTime<Utc> {
        let frozen = chrono::Duration::from_std(self.frozen).unwrap_or_default();
        self.start_wall + frozen + chrono::Duration::microseconds((sim / self.scale * 1e6) as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_simulated_clock_runs_time_scale_times_faster() {
        let start = Instant::now();
        let wall = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let mut clock = SimClock::new(start, wall, 3600.0, Duration::from_secs(3));
        assert_eq!(clock.read_at(start + Duration::from_millis(500)), 1800.0);
        assert_eq!(clock.instant_at(7200.0), start + Duration::from_secs(2));
        assert_eq!(clock.wall_at(3600.0), wall + chrono::Duration::seconds(1));
        assert_eq!(clock.read_at(start - Duration::from_secs(1)), 0.0);
        assert!(clock.instant_at(f64::INFINITY) > start + Duration::from_secs(3600));
    }

    #[test]
    fn time_the_process_was_frozen_is_not_counted() {
        let start = Instant::now();
        let wall = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let max_step = SimClock::max_step_for(Duration::from_secs(1));
        assert_eq!(max_step, Duration::from_secs(3));
        let mut clock = SimClock::new(start, wall, 3600.0, max_step);
        let at = |s: u64| start + Duration::from_secs(s);
        // Readings every second: all of it counts.
        assert_eq!(clock.read_at(at(1)), 3600.0);
        assert_eq!(clock.read_at(at(2)), 7200.0);
        // Frozen for 10 s (SIGSTOP): only the 3 s a running loop could have taken count.
        assert_eq!(clock.read_at(at(12)), 5.0 * 3600.0);
        assert_eq!(clock.frozen(), Duration::from_secs(7));
        assert_eq!(clock.read_at(at(13)), 6.0 * 3600.0);
        // The mappings back to real time skip the frozen stretch too.
        assert_eq!(clock.instant_at(6.0 * 3600.0), at(13));
        assert_eq!(
            clock.wall_at(6.0 * 3600.0),
            wall + chrono::Duration::seconds(13)
        );
        // A reading from before the last one moves nothing.
        assert_eq!(clock.read_at(at(12)), 5.0 * 3600.0);
        assert_eq!(clock.frozen(), Duration::from_secs(7));
    }
}
