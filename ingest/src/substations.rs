//! The live view of the grid behind `GET /v1/substations`: the newest heartbeat of every
//! substation (`ev.telemetry.<id>`, followed by [`evgrid_common::heartbeats::follow`]) and
//! whether each is up, judged at the time of the request by the shared liveness rule.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::time::Duration;

use chrono::{DateTime, Utc};
use evgrid_model::liveness::Observed;
use serde::Serialize;

use evgrid_model::units::round3;

/// Substations shown at most (the dispatcher's default `--max-substations`): heartbeats of
/// made-up substation ids cannot grow the view, or the page, without bound.
pub(crate) const MAX_SUBSTATIONS: usize = 10_000;
/// A substation not up and silent this long leaves the view (the dispatcher's default
/// `--forget-after`); it shows again with its next heartbeat.
pub(crate) const FORGET_AFTER: Duration = Duration::from_secs(600);

/// The newest heartbeat per substation, ordered by substation id, for at most
/// [`MAX_SUBSTATIONS`].
#[derive(Debug, Default)]
pub(crate) struct LatestHeartbeats {
    latest: BTreeMap<String, Observed>,
    /// When a full view was last swept for room. A flood of new ids meets a full view at every
    /// heartbeat; sweeping 10,000 entries for each would cost more than the flood itself.
    last_sweep: Option<DateTime<Utc>>,
    sweeps: u64,
}

/// A full view is swept for room at most this often (by the heartbeats' stored times).
const SWEEP_EVERY: chrono::TimeDelta = chrono::TimeDelta::seconds(1);

/// One substation as `GET /v1/substations` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct SubstationStatus {
    pub(crate) substation_id: String,
    pub(crate) capacity_kw: f64,
    pub(crate) load_kw: f64,
    pub(crate) active_sessions: u32,
    pub(crate) queued_sessions: u32,
    pub(crate) seconds_since_heartbeat: f64,
    pub(crate) status: Status,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Status {
    /// Heard from within the last 1.5 heartbeat intervals (`liveness::stale_after`).
    Up,
    /// Silent for longer: the dispatcher sends it nothing.
    Stale,
}

impl LatestHeartbeats {
    /// Keeps `observed` unless a heartbeat stored later is already known (the follower replays
    /// the last heartbeat per substation after every reconnect). False when it is of a new
    /// substation and [`MAX_SUBSTATIONS`] are known even after the long-silent ones are
    /// forgotten: it is dropped.
    pub(crate) fn observe(&mut self, observed: Observed) -> bool {
        let full = |latest: &BTreeMap<String, Observed>| latest.len() >= MAX_SUBSTATIONS;
        let id = &observed.heartbeat.substation_id;
        if full(&self.latest) && !self.latest.contains_key(id) {
            let due = self
                .last_sweep
                .is_none_or(|at| observed.stored_at - at >= SWEEP_EVERY);
            if !due {
                return false;
            }
            self.last_sweep = Some(observed.stored_at);
            self.sweeps += 1;
            self.forget_silent(observed.stored_at);
            if full(&self.latest) {
                return false;
            }
        }
        match self.latest.entry(observed.heartbeat.substation_id.clone()) {
            Entry::Vacant(slot) => {
                slot.insert(observed);
            }
            Entry::Occupied(mut slot) => {
                if observed.stored_at > slot.get().stored_at {
                    slot.insert(observed);
                }
            }
        }
        true
    }

    /// Forgets the substations that are not up and silent for longer than [`FORGET_AFTER`].
    fn forget_silent(&mut self, now: DateTime<Utc>) {
        let after_s = FORGET_AFTER.as_secs_f64();
        self.latest
            .retain(|_, o| o.is_up(now) || o.age_seconds(now) <= after_s);
    }

    /// Every substation at `now`, sorted by id (the long-silent ones forgotten first).
    pub(crate) fn view(&mut self, now: DateTime<Utc>) -> Vec<SubstationStatus> {
        self.forget_silent(now);
        self.latest
            .values()
            .map(|o| SubstationStatus {
                substation_id: o.heartbeat.substation_id.clone(),
                capacity_kw: round3(o.heartbeat.capacity_kw),
                load_kw: round3(o.heartbeat.load_kw),
                active_sessions: o.heartbeat.active_sessions,
                queued_sessions: o.heartbeat.queued_sessions,
                seconds_since_heartbeat: round3(o.age_seconds(now)),
                status: if o.is_up(now) {
                    Status::Up
                } else {
                    Status::Stale
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;
    use evgrid_model::messages::Heartbeat;

    use super::*;

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    fn observed(id: &str, load_kw: f64, stored_at: DateTime<Utc>) -> Observed {
        Observed {
            heartbeat: Heartbeat {
                substation_id: id.into(),
                seq: 1,
                sent_at: stored_at,
                capacity_kw: 100.0,
                load_kw,
                active_sessions: 2,
                queued_sessions: 1,
                demand_kw: 0.0,
                dispatch_seq: 0,
                interval_ms: 1000,
            },
            stored_at,
        }
    }

    #[test]
    fn sorted_by_id_with_age_and_status() {
        let mut grid = LatestHeartbeats::default();
        grid.observe(observed("s2", 10.0, t0()));
        grid.observe(observed("s1", 20.0, t0() - Duration::seconds(10)));
        let view = grid.view(t0() + Duration::milliseconds(500));
        let ids: Vec<&str> = view.iter().map(|v| v.substation_id.as_str()).collect();
        assert_eq!(ids, ["s1", "s2"]);
        assert_eq!(view[0].status, Status::Stale);
        assert_eq!(view[0].seconds_since_heartbeat, 10.5);
        assert_eq!(view[1].status, Status::Up);
        assert_eq!(view[1].load_kw, 10.0);
        assert_eq!(
            serde_json::to_value(&view[1]).unwrap(),
            serde_json::json!({
                "substation_id": "s2", "capacity_kw": 100.0, "load_kw": 10.0,
                "active_sessions": 2, "queued_sessions": 1,
                "seconds_since_heartbeat": 0.5, "status": "up"
            })
        );
    }

    #[test]
    fn loads_are_shown_to_the_watt() {
        let mut grid = LatestHeartbeats::default();
        grid.observe(observed("s1", 49.999_999_999_999_99, t0()));
        let view = grid.view(t0() + Duration::nanoseconds(123_456_789));
        assert_eq!(view[0].load_kw, 50.0);
        assert_eq!(view[0].seconds_since_heartbeat, 0.123);
    }

    #[test]
    fn the_view_is_bounded_and_forgets_the_long_silent() {
        let mut grid = LatestHeartbeats::default();
        for i in 0..MAX_SUBSTATIONS {
            assert!(grid.observe(observed(&format!("s{i}"), 0.0, t0())));
        }
        let later = t0() + Duration::seconds(1);
        assert!(!grid.observe(observed("new", 0.0, later)), "full");
        assert!(grid.observe(observed("s0", 1.0, later)), "a known one");
        // Past FORGET_AFTER, the silent make room; the one heard since stays.
        let much_later = t0() + Duration::seconds(601);
        assert!(grid.observe(observed("s0", 2.0, much_later)));
        assert!(grid.observe(observed("new", 0.0, much_later)));
        let ids: Vec<String> = grid
            .view(much_later)
            .into_iter()
            .map(|v| v.substation_id)
            .collect();
        assert_eq!(ids, ["new", "s0"]);
    }

    #[test]
    fn a_flood_of_new_ids_sweeps_a_full_view_once_a_second() {
        let mut grid = LatestHeartbeats::default();
        for i in 0..MAX_SUBSTATIONS {
            grid.observe(observed(&format!("s{i}"), 0.0, t0()));
        }
        for i in 0..1000 {
            let at = t0() + Duration::milliseconds(i);
            assert!(!grid.observe(observed(&format!("ghost{i}"), 0.0, at)));
        }
        assert_eq!(grid.sweeps, 1, "one sweep in the first second");
        assert!(!grid.observe(observed("ghost", 0.0, t0() + Duration::seconds(2))));
        assert_eq!(grid.sweeps, 2);
    }

    #[test]
    fn an_older_or_replayed_heartbeat_never_replaces_a_newer_one() {
        let mut grid = LatestHeartbeats::default();
        grid.observe(observed("s1", 30.0, t0()));
        grid.observe(observed("s1", 99.0, t0() - Duration::seconds(1)));
        grid.observe(observed("s1", 98.0, t0()));
        assert_eq!(grid.view(t0())[0].load_kw, 30.0);
        grid.observe(observed("s1", 40.0, t0() + Duration::seconds(1)));
        assert_eq!(grid.view(t0())[0].load_kw, 40.0);
    }
}
