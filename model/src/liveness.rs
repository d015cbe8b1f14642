//! When a substation counts as up: the liveness rule over its heartbeats (`ev.telemetry.<id>`)
//! that the dispatcher routes by, ingest shows in `GET /v1/substations` and `evgrid up`'s live
//! line marks. Pure: the caller passes the time.

use chrono::{DateTime, Utc};

use crate::messages::Heartbeat;

/// A substation silent for this many of its heartbeat intervals is out.
pub const STALE_AFTER_INTERVALS: u32 = 3;

/// A heartbeat and when the server stored it. Ages are measured from the server's timestamp
/// rather than the substation's `sent_at`, so a substation's clock skew cannot keep it "up".
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub heartbeat: Heartbeat,
    pub stored_at: DateTime<Utc>,
}

impl Observed {
    /// Seconds since the heartbeat was stored, at `now` (never negative).
    pub fn age_seconds(&self, now: DateTime<Utc>) -> f64 {
        ((now - self.stored_at)
            .num_microseconds()
            .unwrap_or(i64::MAX) as f64
            / 1e6)
            .max(0.0)
    }

    /// Up = heard from within [`STALE_AFTER_INTERVALS`] heartbeat intervals.
    pub fn is_up(&self, now: DateTime<Utc>) -> bool {
        let limit = self.heartbeat.interval_ms as f64 / 1000.0 * f64::from(STALE_AFTER_INTERVALS);
        self.age_seconds(now) <= limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(interval_ms: u64, stored_at: DateTime<Utc>) -> Observed {
        Observed {
            heartbeat: Heartbeat {
                substation_id: "s1".into(),
                seq: 1,
                sent_at: stored_at,
                capacity_kw: 100.0,
                load_kw: 0.0,
                active_sessions: 0,
                queued_sessions: 0,
                demand_kw: 0.0,
                dispatch_seq: 0,
                interval_ms,
            },
            stored_at,
        }
    }

    #[test]
    fn silent_for_three_intervals_is_out() {
        let t0 = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let o = observed(1000, t0);
        assert!(o.is_up(t0 + chrono::Duration::milliseconds(2999)));
        assert!(o.is_up(t0 + chrono::Duration::milliseconds(3000)));
        assert!(!o.is_up(t0 + chrono::Duration::milliseconds(3001)));
        assert_eq!(o.age_seconds(t0 - chrono::Duration::seconds(5)), 0.0);
    }
}
