//! When a substation counts as up: the liveness rule over its heartbeats (`ev.telemetry.<id>`)
//! that the dispatcher routes by, ingest shows in `GET /v1/substations` and `evgrid up`'s live
//! line marks. Pure: the caller passes the time.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::messages::Heartbeat;

/// The least margin past a missed heartbeat before a substation is out.
pub const MIN_STALE_MARGIN: Duration = Duration::from_millis(500);

/// A substation silent for longer than this since its last heartbeat is out: one `interval`
/// (the next heartbeat was due) plus a margin for delivery and scheduling jitter, half an
/// interval and at least [`MIN_STALE_MARGIN`]. Short, because a dead substation keeps getting
/// work until it is out; a live one that is a little late only has requests wait a moment.
pub fn stale_after(interval: Duration) -> Duration {
    interval.saturating_add((interval / 2).max(MIN_STALE_MARGIN))
}

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

    /// Up = heard from within [`stale_after`] its heartbeat interval.
    pub fn is_up(&self, now: DateTime<Utc>) -> bool {
        let limit = stale_after(Duration::from_millis(self.heartbeat.interval_ms));
        self.age_seconds(now) <= limit.as_secs_f64()
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
    fn silent_for_one_interval_and_a_half_is_out() {
        let t0 = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let o = observed(1000, t0);
        assert!(o.is_up(t0 + chrono::Duration::milliseconds(1499)));
        assert!(o.is_up(t0 + chrono::Duration::milliseconds(1500)));
        assert!(!o.is_up(t0 + chrono::Duration::milliseconds(1501)));
        assert_eq!(o.age_seconds(t0 - chrono::Duration::seconds(5)), 0.0);
    }

    #[test]
    fn the_margin_has_a_floor_and_nothing_overflows() {
        let ms = Duration::from_millis;
        assert_eq!(stale_after(ms(200)), ms(700));
        assert_eq!(stale_after(ms(4000)), ms(6000));
        assert_eq!(stale_after(Duration::MAX), Duration::MAX);
        let t0 = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        assert!(observed(u64::MAX, t0).is_up(t0 + chrono::Duration::days(365)));
    }
}
