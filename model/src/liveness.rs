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
        seconds_since(self.stored_at, now)
    }

    /// Up = heard from within [`stale_after`] its heartbeat interval.
    pub fn is_up(&self, now: DateTime<Utc>) -> bool {
        let limit = stale_after(Duration::from_millis(self.heartbeat.interval_ms));
        self.age_seconds(now) <= limit.as_secs_f64()
    }
}

/// How long the grid's heartbeats have been heard without a gap, so that a substation's silence
/// is judged only over time in which it could have been heard.
///
/// When no substation's heartbeat was stored for longer than [`stale_after`] their interval,
/// the silence is the observer's or its server's (NATS down, a stream electing a leader, a
/// dispatcher starting), not the substations': every one of them would look dead at once, and
/// failing them all would move every car for nothing. The clock of every silence restarts at the
/// first heartbeat after such a gap, and while the grid is not heard at all, nobody's silence
/// counts. The cost: a substation that died during the gap is failed one timeout after it ends.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hearing {
    /// The newest stored heartbeat of any substation, and its interval.
    newest: Option<(DateTime<Utc>, Duration)>,
    /// Since when heartbeats have been stored without a gap.
    since: Option<DateTime<Utc>>,
}

impl Hearing {
    /// Takes a heartbeat into account (any order: an older one changes nothing).
    pub fn heard(&mut self, observed: &Observed) {
        let interval = Duration::from_millis(observed.heartbeat.interval_ms);
        let at = observed.stored_at;
        match self.newest {
            Some((newest, _)) if at <= newest => return,
            Some((newest, newest_interval)) if !gap(newest, newest_interval, at) => {}
            _ => self.since = Some(at),
        }
        self.newest = Some((at, interval));
    }

    /// Seconds of `observed`'s substation's silence at `now` during which the grid was heard:
    /// since its last heartbeat or the end of the last gap, whichever is later; 0 while the grid
    /// is not heard at all.
    pub fn silence_seconds(&self, observed: &Observed, now: DateTime<Utc>) -> f64 {
        let (Some((newest, interval)), Some(since)) = (self.newest, self.since) else {
            return 0.0;
        };
        if gap(newest, interval, now) {
            return 0.0;
        }
        seconds_since(observed.stored_at.max(since), now)
    }
}

/// Seconds from `from` to `now`, never negative.
fn seconds_since(from: DateTime<Utc>, now: DateTime<Utc>) -> f64 {
    ((now - from).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6).max(0.0)
}

/// True when nothing heard from `last` (a heartbeat every `interval`) until `at` is a gap.
fn gap(last: DateTime<Utc>, interval: Duration, at: DateTime<Utc>) -> bool {
    let limit = chrono::Duration::from_std(stale_after(interval)).unwrap_or(chrono::Duration::MAX);
    at.signed_duration_since(last) > limit
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A heartbeat of `s1` every `interval_ms`, stored at `stored_at`.
    pub(crate) fn observed(interval_ms: u64, stored_at: DateTime<Utc>) -> Observed {
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

    #[test]
    fn silence_counts_only_while_the_grid_is_heard() {
        let t0 = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let at = |ms: i64| t0 + chrono::Duration::milliseconds(ms);
        let mut hearing = Hearing::default();
        let s1 = observed(1000, t0);
        assert_eq!(
            hearing.silence_seconds(&s1, at(5000)),
            0.0,
            "nothing heard yet"
        );
        hearing.heard(&s1);
        // Another substation heard every second: s1's silence counts from its last heartbeat.
        for ms in (1000..=12_000).step_by(1000) {
            hearing.heard(&observed(1000, at(ms)));
        }
        assert_eq!(hearing.silence_seconds(&s1, at(12_000)), 12.0);
        // Then nothing for 5 s (NATS away): nobody's silence counts meanwhile...
        assert_eq!(hearing.silence_seconds(&s1, at(17_000)), 0.0);
        // ...and afterwards it counts from the first heartbeat after the gap.
        hearing.heard(&observed(1000, at(17_000)));
        assert_eq!(hearing.silence_seconds(&s1, at(17_500)), 0.5);
        hearing.heard(&observed(1000, at(18_000)));
        assert_eq!(hearing.silence_seconds(&s1, at(18_400)), 1.4);
        // A heartbeat older than the newest changes nothing; s1's own fresh one counts.
        hearing.heard(&observed(1000, at(3000)));
        assert_eq!(hearing.silence_seconds(&s1, at(18_400)), 1.4);
        assert_eq!(
            hearing.silence_seconds(&observed(1000, at(18_000)), at(18_400)),
            0.4
        );
    }
}
