//! The pure core of `evgrid replay`: what the live grid recorded over a window (the original
//! requests of `EV_REQUESTS`, their states, the session events, the substations and the limits
//! in force), turned into the simulator's requests and clock, and into the same figures the
//! simulator reports, as the live grid achieved them. No NATS here: [`super::read`] fetches.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use evgrid_model::charging::{Allocation, Arrival, Station};
use evgrid_model::limits::resolve;
use evgrid_model::messages::{
    ChargeRequest, Limit, RequestRecord, RequestState, SessionEventKind, SessionOutcome,
    SessionReport,
};
use evgrid_sim::engine::{herd_factor, percentile};
use evgrid_sim::report::Metrics;
use evgrid_sim::workload::{MAX_ENERGY_KWH, Request, feasible, monday_before};
use serde::Serialize;
use uuid::Uuid;

/// An original charge request as `EV_REQUESTS` stored it (a client's, not a failover's move
/// offer).
#[derive(Debug, Clone, PartialEq)]
pub struct Original {
    pub request_id: Uuid,
    pub sequence: u64,
    /// When the stream stored it: its arrival.
    pub stored_at: DateTime<Utc>,
    /// When ingest accepted it (header `Evgrid-Accepted-At`; the stored time without one), from
    /// which the pipeline counts its stay.
    pub accepted_at: DateTime<Utc>,
    pub request: ChargeRequest,
}

impl Original {
    /// Milliseconds from acceptance to departure: the stay the pipeline gives the car on its
    /// simulated clock.
    pub fn stay_ms(&self) -> Option<i64> {
        self.request
            .departure
            .map(|d| (d - self.accepted_at).num_milliseconds())
    }
}

/// A substation as its last heartbeat describes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Substation {
    pub id: String,
    /// Its configured capacity (kW), without any limit.
    pub capacity_kw: f64,
    /// Its heartbeat interval (real time, ms).
    pub interval_ms: u64,
}

/// A grid-operator limit message, when it was stored.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitChange {
    pub substation_id: String,
    pub at: DateTime<Utc>,
    pub limit: Limit,
}

/// The live grid's wall clock mapped onto the simulator's: arrivals keep their distance from
/// the first, stretched by the substations' `--time-scale` (the pipeline runs that much faster
/// than real time), and the simulated clock starts, as for an unfolded trace, on the Monday
/// before the first arrival, so an exported CSV simulates exactly as the replay does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clock {
    pub first: DateTime<Utc>,
    pub time_scale: f64,
    /// Milliseconds from the Monday before `first` to `first`.
    offset_ms: i64,
}

impl Clock {
    pub fn new(first: DateTime<Utc>, time_scale: f64) -> Self {
        Self {
            first,
            time_scale,
            offset_ms: (first - monday_before(first)).num_milliseconds(),
        }
    }

    /// Simulated milliseconds since the clock's Monday at wall time `t`.
    pub fn sim_ms(&self, t: DateTime<Utc>) -> i64 {
        let since = (t - self.first).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e3;
        self.offset_ms + (since * self.time_scale).round() as i64
    }

    /// Simulated seconds at wall time `t`.
    pub fn sim_s(&self, t: DateTime<Utc>) -> f64 {
        self.sim_ms(t) as f64 / 1e3
    }

    /// Wall time `t` as a date on the simulated clock (what `--export` writes).
    pub fn sim_date(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        monday_before(self.first) + chrono::Duration::milliseconds(self.sim_ms(t))
    }
}

/// The simulator's request for `o`: arriving when it was stored, leaving after its stay, and,
/// unless it asked for all or nothing, asking no more than it can take before it leaves (what
/// the live dispatcher charges it, best effort; an all-or-nothing request that cannot be filled
/// is rejected in the simulation as it was live).
pub fn to_sim(o: &Original, clock: &Clock) -> Request {
    let at = clock.sim_ms(o.stored_at) as f64 / 1e3;
    let r = &o.request;
    match o.stay_ms() {
        Some(stay) if stay > 0 && !r.all_or_nothing => feasible(
            at,
            r.energy_kwh,
            r.max_power_kw,
            Some(at + stay as f64 / 1e3),
        ),
        stay => Request {
            at,
            energy_kwh: r.energy_kwh.min(MAX_ENERGY_KWH),
            max_power_kw: r.max_power_kw,
            departure: stay.map(|s| at + s as f64 / 1e3),
        },
    }
}

/// Each substation's capacity over simulated time: `(at, capacity_kw)` steps in time order, the
/// first at or before the first arrival, as the limits of `changes` put them in force (the
/// rule the substations apply: [`resolve`]).
pub fn capacity_steps(
    substations: &[Substation],
    changes: &[LimitChange],
    clock: &Clock,
) -> Vec<Vec<(f64, f64)>> {
    substations
        .iter()
        .map(|s| {
            let start = clock.sim_s(clock.first).min(0.0);
            let mut steps = vec![(start, s.capacity_kw)];
            let mut pending_end: Option<DateTime<Utc>> = None;
            let push = |steps: &mut Vec<(f64, f64)>, at: DateTime<Utc>, kw: f64| {
                let t = clock.sim_s(at).max(start);
                steps.retain(|&(when, _)| when < t);
                steps.push((t, kw));
            };
            for c in changes.iter().filter(|c| c.substation_id == s.id) {
                if let Some(end) = pending_end.take_if(|end| *end <= c.at) {
                    push(&mut steps, end, s.capacity_kw);
                }
                let in_force = resolve(&c.limit, s.capacity_kw, c.at);
                push(&mut steps, c.at, in_force.capacity_kw);
                pending_end = in_force.until;
            }
            if let Some(end) = pending_end {
                push(&mut steps, end, s.capacity_kw);
            }
            steps
        })
        .collect()
}

/// What became of the window's requests, from their states.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Outcomes {
    /// `completed`, all their energy delivered.
    pub delivered: usize,
    /// `completed` when the car left, with less than it asked for.
    pub departed: usize,
    pub rejected: usize,
    /// Not final when read (`queued`, `dispatched`, `charging`).
    pub open: usize,
    /// Without a state in `EV_REQUEST_STATE` (not handled yet, or expired).
    pub without_state: usize,
    /// Moves away from a failed substation (failover).
    pub moves: usize,
}

/// One substation as it ran over the window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubstationFigures {
    pub substation_id: String,
    pub capacity_kw: f64,
    /// Requests that ended here (their last substation).
    pub requests: usize,
    /// Energy delivered here, including to cars later moved away (kWh).
    pub energy_delivered_kwh: f64,
    /// Requests that ended here with all their energy.
    pub sessions_fully_served: usize,
    /// Highest load ÷ capacity in force, reconstructed from the session events by the
    /// substation's own charging model (heartbeats, which carry the load, are not kept).
    pub peak_utilization: f64,
    /// Sessions interrupted here (a shutdown or restart, or failover moving them away).
    pub interruptions: usize,
    /// Sessions taken again after an interruption (a restart resuming them).
    pub resumed: usize,
    /// Requests moved away from here.
    pub moved_away: usize,
}

/// The live grid's figures over the window.
#[derive(Debug, Clone, PartialEq)]
pub struct Live {
    pub metrics: Metrics,
    pub outcomes: Outcomes,
    pub per_substation: Vec<SubstationFigures>,
}

/// What the live grid recorded, ready to measure.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub originals: &'a [Original],
    /// The simulator's requests, in the order of `originals`.
    pub requests: &'a [Request],
    pub states: &'a HashMap<Uuid, RequestRecord>,
    /// Session events of the window's requests, in stream order.
    pub sessions: &'a [SessionReport],
    pub substations: &'a [Substation],
    pub capacity_steps: &'a [Vec<(f64, f64)>],
    pub clock: Clock,
    /// When the states were read: open requests have waited until then.
    pub read_at: DateTime<Utc>,
    /// How the live substations share their capacity (their `--allocation`).
    pub allocation: Allocation,
}

/// The figures [`evgrid_sim::report::Metrics`] holds, as the live grid achieved them: energy
/// and full sessions from the request states, waits from the states' timestamps (in simulated
/// seconds), herd factor from the dispatch times, peak utilization reconstructed from the
/// session events by the substations' charging model. Capacity violations are not measurable after the fact (heartbeats are not kept) and
/// read 0: a substation never draws above its capacity by construction. Decision rates and
/// simulation times do not apply and read 0.
pub fn measure(r: Record<'_>) -> Live {
    let requested: f64 = r.requests.iter().map(|q| q.energy_kwh).sum();
    let index: HashMap<&str, usize> = r
        .substations
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    let mut per: Vec<SubstationFigures> = r
        .substations
        .iter()
        .map(|s| SubstationFigures {
            substation_id: s.id.clone(),
            capacity_kw: s.capacity_kw,
            requests: 0,
            energy_delivered_kwh: 0.0,
            sessions_fully_served: 0,
            peak_utilization: 0.0,
            interruptions: 0,
            resumed: 0,
            moved_away: 0,
        })
        .collect();
    let mut outcomes = Outcomes::default();
    let (mut delivered, mut served) = (0.0, 0_usize);
    let mut waits = Vec::with_capacity(r.originals.len());
    let mut dispatches = Vec::new();
    let interval_s = r
        .substations
        .iter()
        .map(|s| s.interval_ms)
        .max()
        .unwrap_or(1000)
        .max(1) as f64
        / 1e3;
    for o in r.originals {
        let Some(state) = r.states.get(&o.request_id) else {
            outcomes.without_state += 1;
            // Never handled: it has waited since it arrived.
            waits.push(sim_seconds(o.stored_at, r.read_at, r.clock.time_scale));
            continue;
        };
        delivered += state.energy_delivered_kwh;
        // Fully served as the simulator counts it: all it could take when it arrived. A car
        // charged best effort on a later offer completes `delivered` with less; it is not.
        let full = state.state == RequestState::Completed
            && state.reason.as_deref() == Some(SessionOutcome::Delivered.as_str())
            && state.energy_delivered_kwh >= to_sim(o, &r.clock).energy_kwh * (1.0 - 1e-6);
        match state.state {
            RequestState::Completed if full => outcomes.delivered += 1,
            RequestState::Completed => outcomes.departed += 1,
            RequestState::Rejected => outcomes.rejected += 1,
            _ => outcomes.open += 1,
        }
        served += usize::from(full);
        // Energy per substation: each move closes the share of the substation it left.
        let mut before = 0.0;
        for m in &state.moved {
            outcomes.moves += 1;
            if let Some(&i) = index.get(m.substation_id.as_str()) {
                per[i].energy_delivered_kwh += m.energy_delivered_kwh - before;
                per[i].moved_away += 1;
            }
            before = m.energy_delivered_kwh;
        }
        if let Some(&i) = state.substation_id.as_deref().and_then(|s| index.get(s)) {
            per[i].requests += 1;
            per[i].energy_delivered_kwh += state.energy_delivered_kwh - before;
            per[i].sessions_fully_served += usize::from(full);
            if let Some(at) = state.dispatched_at {
                dispatches.push((at, i));
            }
        }
        // As the simulator counts waits: to first power, or until the request gave up; one
        // rejected at once (never dispatched) does not count.
        let rejected_at_once = state.state == RequestState::Rejected
            && state.dispatched_at.is_none()
            && state.moved.is_empty();
        if !rejected_at_once {
            let until = state
                .charging_started_at
                .or(state.completed_at)
                .or(state.rejected_at)
                .unwrap_or(r.read_at);
            waits.push(sim_seconds(o.stored_at, until, r.clock.time_scale));
        }
    }
    dispatches.sort_by_key(|&(at, _)| at);
    let intervals: Vec<(i64, usize)> = dispatches
        .iter()
        .map(|&(at, i)| {
            let since = (at - r.clock.first).num_milliseconds() as f64 / 1e3;
            ((since / interval_s).floor() as i64, i)
        })
        .collect();
    let capacities: Vec<f64> = r.substations.iter().map(|s| s.capacity_kw).collect();
    sessions_into(&mut per, &index, r);
    waits.sort_by(f64::total_cmp);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let metrics = Metrics {
        energy_requested_kwh: requested,
        energy_delivered_kwh: delivered,
        energy_delivered_ratio: ratio(delivered, requested),
        sessions_fully_served_ratio: ratio(served as f64, r.originals.len() as f64),
        capacity_violations: 0,
        peak_utilization: per.iter().map(|s| s.peak_utilization).fold(0.0, f64::max),
        herd_factor: herd_factor(&intervals, &capacities),
        wait_p95_s: percentile(&waits, 0.95),
        decisions_per_s: 0.0,
        sim_seconds: 0.0,
    };
    Live {
        metrics,
        outcomes,
        per_substation: per,
    }
}

/// Interruptions and resumptions of each substation, from the session events, and its peak
/// utilization, reconstructed.
///
/// Heartbeats, which carry the live load, are not kept (`EV_TELEMETRY` holds the last one), so
/// the load is rebuilt by running each substation's own charging model (the code the live
/// substation runs, [`Station`]) on what it recorded: each session from its `accepted` event
/// (with the energy it still needed and its departure) until it completed or was interrupted
/// there, under the capacity in force, allocated by `r.allocation` (the live substations'
/// `--allocation`).
fn sessions_into(per: &mut [SubstationFigures], index: &HashMap<&str, usize>, r: Record<'_>) {
    let requests: HashMap<Uuid, &Original> =
        r.originals.iter().map(|o| (o.request_id, o)).collect();
    let mut accepted: HashMap<(Uuid, usize), usize> = HashMap::new();
    // What happened at each substation, in simulated time.
    let mut steps: Vec<Vec<(f64, Step)>> = r
        .capacity_steps
        .iter()
        .map(|c| c.iter().map(|&(at, kw)| (at, Step::Capacity(kw))).collect())
        .collect();
    for report in r.sessions {
        let e = &report.event;
        let (Some(&i), Some(o)) = (
            index.get(e.substation_id.as_str()),
            requests.get(&e.request_id),
        ) else {
            continue;
        };
        let at = r.clock.sim_s(e.at);
        match e.event {
            SessionEventKind::Accepted => {
                let n = accepted.entry((e.request_id, i)).or_default();
                if *n > 0 {
                    per[i].resumed += 1;
                }
                *n += 1;
                let target = r
                    .states
                    .get(&e.request_id)
                    .map_or(o.request.energy_kwh, |s| {
                        s.energy_expected_kwh
                            .map_or(s.energy_kwh, |x| x.min(s.energy_kwh))
                    });
                // A car keeps its stay from its dispatch, as the substation counts it.
                let departure = o
                    .stay_ms()
                    .map(|ms| r.clock.sim_s(e.dispatched_at) + ms as f64 / 1e3);
                // Taken again without an interruption (a crash): the old session is gone.
                steps[i].push((at, Step::Leave(e.request_id)));
                steps[i].push((
                    at,
                    Step::Arrive(Arrival {
                        id: e.request_id,
                        max_power_kw: o.request.max_power_kw,
                        energy_kwh: (target - e.energy_delivered_kwh).max(0.0),
                        departure,
                    }),
                ));
            }
            SessionEventKind::Started => {}
            SessionEventKind::Completed | SessionEventKind::Interrupted => {
                if e.event == SessionEventKind::Interrupted {
                    per[i].interruptions += 1;
                }
                steps[i].push((at, Step::Leave(e.request_id)));
            }
        }
    }
    for (i, mut steps) in steps.into_iter().enumerate() {
        // Stable: what happened at one instant keeps its order.
        steps.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (start, capacity) = r.capacity_steps[i].first().copied().unwrap_or((0.0, 0.0));
        let mut station = Station::new(capacity, r.allocation, start);
        for (at, step) in steps {
            station.advance_to(at);
            match step {
                Step::Capacity(kw) => {
                    station.set_capacity(kw);
                }
                Step::Arrive(car) => {
                    station.arrive(at, car);
                }
                Step::Leave(id) => {
                    station.remove(id);
                }
            }
        }
        per[i].peak_utilization = station.stats().peak_utilization;
    }
}

/// One change at a substation whose load [`sessions_into`] rebuilds.
#[derive(Debug, Clone)]
enum Step {
    Capacity(f64),
    Arrive(Arrival),
    Leave(Uuid),
}

/// The capacity in force at simulated time `t` on a substation's steps (the first step's
/// before it).
pub fn capacity_at(steps: &[(f64, f64)], t: f64) -> f64 {
    let first = steps.first().map_or(0.0, |&(_, kw)| kw);
    evgrid_sim::engine::capacity_at(first, Some(steps), t)
}

fn sim_seconds(from: DateTime<Utc>, to: DateTime<Utc>, time_scale: f64) -> f64 {
    ((to - from).num_milliseconds() as f64 / 1e3 * time_scale).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use evgrid_model::messages::{Move, SessionEvent};

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn original(n: u128, stored: &str, energy_kwh: f64, departure: Option<&str>) -> Original {
        Original {
            request_id: Uuid::from_u128(n),
            sequence: n as u64,
            stored_at: t(stored),
            accepted_at: t(stored),
            request: ChargeRequest {
                request_id: Some(Uuid::from_u128(n)),
                vehicle_id: format!("ev-{n}"),
                energy_kwh,
                max_power_kw: 10.0,
                departure: departure.map(t),
                all_or_nothing: false,
            },
        }
    }

    #[test]
    fn the_clock_stretches_wall_time_from_the_monday_before() {
        // Wednesday 2026-12-02 10:00 UTC.
        let clock = Clock::new(t("2026-12-02T10:00:00Z"), 3600.0);
        let monday = (2 * 24 + 10) * 3600 * 1000;
        assert_eq!(clock.sim_ms(t("2026-12-02T10:00:00Z")), monday);
        // One real second later is an hour later on the simulated clock.
        assert_eq!(clock.sim_ms(t("2026-12-02T10:00:01Z")), monday + 3_600_000);
        assert_eq!(
            clock.sim_date(t("2026-12-02T10:00:01Z")),
            t("2026-12-02T11:00:00Z")
        );
    }

    #[test]
    fn requests_keep_their_stay_and_ask_what_fits_unless_all_or_nothing() {
        let clock = Clock::new(t("2026-11-30T00:00:00Z"), 3600.0);
        // Stored 2 s (2 simulated hours) in, leaving 3 h after acceptance: 30 kWh fit at 10 kW.
        let o = original(
            1,
            "2026-11-30T00:00:02Z",
            50.0,
            Some("2026-11-30T03:00:02Z"),
        );
        let r = to_sim(&o, &clock);
        assert_eq!(r.at, 7200.0);
        assert_eq!(r.departure, Some(7200.0 + 3.0 * 3600.0));
        assert!(
            r.energy_kwh < 30.0 && r.energy_kwh > 29.99,
            "{}",
            r.energy_kwh
        );
        let mut all = o.clone();
        all.request.all_or_nothing = true;
        assert_eq!(to_sim(&all, &clock).energy_kwh, 50.0);
        let open = original(2, "2026-11-30T00:00:00Z", 50.0, None);
        assert_eq!(to_sim(&open, &clock).departure, None);
        assert_eq!(to_sim(&open, &clock).energy_kwh, 50.0);
    }

    #[test]
    fn limits_become_capacity_steps_as_substations_apply_them() {
        let clock = Clock::new(t("2026-11-30T00:00:00Z"), 1.0);
        let subs = [
            Substation {
                id: "s1".into(),
                capacity_kw: 150.0,
                interval_ms: 1000,
            },
            Substation {
                id: "s2".into(),
                capacity_kw: 50.0,
                interval_ms: 1000,
            },
        ];
        let change = |at: &str, kw: Option<f64>, until: Option<&str>| LimitChange {
            substation_id: "s1".into(),
            at: t(at),
            limit: Limit {
                capacity_kw: kw,
                until: until.map(t),
            },
        };
        let changes = [
            // Before the window: in force from its start.
            change("2026-11-29T23:00:00Z", Some(100.0), None),
            change(
                "2026-11-30T00:10:00Z",
                Some(80.0),
                Some("2026-11-30T00:20:00Z"),
            ),
            change("2026-11-30T00:30:00Z", Some(60.0), None),
            change("2026-11-30T00:40:00Z", None, None),
        ];
        let steps = capacity_steps(&subs, &changes, &clock);
        assert_eq!(
            steps[0],
            [
                (0.0, 100.0),
                (600.0, 80.0),
                (1200.0, 150.0),
                (1800.0, 60.0),
                (2400.0, 150.0)
            ]
        );
        assert_eq!(steps[1], [(0.0, 50.0)]);
        assert_eq!(capacity_at(&steps[0], 700.0), 80.0);
        assert_eq!(capacity_at(&steps[0], 1200.0), 150.0);
    }

    #[test]
    fn the_live_figures_come_from_the_states_and_the_events() {
        let clock = Clock::new(t("2026-11-30T00:00:00Z"), 3600.0);
        let originals = [
            original(1, "2026-11-30T00:00:00Z", 10.0, None),
            original(2, "2026-11-30T00:00:00Z", 20.0, None),
            original(3, "2026-11-30T00:00:01Z", 5.0, None),
        ];
        let requests: Vec<Request> = originals.iter().map(|o| to_sim(o, &clock)).collect();
        let subs = [
            Substation {
                id: "a".into(),
                capacity_kw: 10.0,
                interval_ms: 1000,
            },
            Substation {
                id: "b".into(),
                capacity_kw: 10.0,
                interval_ms: 1000,
            },
        ];
        let record = |o: &Original, state, sub: &str, kwh: f64, reason: &str| RequestRecord {
            state,
            substation_id: Some(sub.into()),
            energy_delivered_kwh: kwh,
            reason: Some(reason.into()),
            dispatched_at: Some(o.stored_at),
            // Charging 1 s (an hour) after it arrived.
            charging_started_at: Some(o.stored_at + chrono::Duration::seconds(1)),
            ..RequestRecord::new(o.request_id, state, &o.request, o.accepted_at, o.stored_at)
        };
        let mut moved = record(
            &originals[1],
            RequestState::Completed,
            "b",
            20.0,
            "delivered",
        );
        moved.moved.push(Move {
            substation_id: "a".into(),
            dispatch_seq: 1,
            state: RequestState::Charging,
            energy_delivered_kwh: 4.0,
            moved_at: t("2026-11-30T00:00:01Z"),
            reason: "no heartbeat".into(),
        });
        let states: HashMap<Uuid, RequestRecord> = [
            record(
                &originals[0],
                RequestState::Completed,
                "a",
                10.0,
                "delivered",
            ),
            moved,
            record(&originals[2], RequestState::Completed, "b", 3.0, "departed"),
        ]
        .into_iter()
        .map(|r| (r.request_id, r))
        .collect();
        let event = |kind, id: u128, sub: &str, at: &str, kwh: f64| SessionReport {
            event: SessionEvent {
                event: kind,
                request_id: Uuid::from_u128(id),
                substation_id: sub.into(),
                vehicle_id: "ev".into(),
                at: t(at),
                energy_kwh: 10.0,
                energy_delivered_kwh: kwh,
                accepted_at: t(at),
                dispatched_at: t(at),
            },
            outcome: None,
        };
        use SessionEventKind::*;
        let sessions = [
            event(Accepted, 1, "a", "2026-11-30T00:00:00Z", 0.0),
            // 10 kWh in one simulated hour: 10 kW, all of a's capacity.
            event(Started, 1, "a", "2026-11-30T00:00:01Z", 0.0),
            event(Completed, 1, "a", "2026-11-30T00:00:02Z", 10.0),
            event(Accepted, 2, "a", "2026-11-30T00:00:00Z", 0.0),
            event(Interrupted, 2, "a", "2026-11-30T00:00:01Z", 4.0),
            event(Accepted, 3, "b", "2026-11-30T00:00:01Z", 0.0),
            event(Accepted, 3, "b", "2026-11-30T00:00:02Z", 0.0),
        ];
        let steps = capacity_steps(&subs, &[], &clock);
        let live = measure(Record {
            originals: &originals,
            requests: &requests,
            states: &states,
            sessions: &sessions,
            substations: &subs,
            capacity_steps: &steps,
            clock,
            read_at: t("2026-11-30T00:00:10Z"),
            allocation: Allocation::Triage,
        });
        let m = &live.metrics;
        assert_eq!(m.energy_requested_kwh, 35.0);
        assert_eq!(m.energy_delivered_kwh, 33.0);
        assert!((m.sessions_fully_served_ratio - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.wait_p95_s, 3600.0);
        assert_eq!(m.peak_utilization, 1.0);
        assert_eq!(
            live.outcomes,
            Outcomes {
                delivered: 2,
                departed: 1,
                moves: 1,
                ..Outcomes::default()
            }
        );
        let (a, b) = (&live.per_substation[0], &live.per_substation[1]);
        assert_eq!((a.requests, b.requests), (1, 2));
        assert_eq!(
            (a.energy_delivered_kwh, b.energy_delivered_kwh),
            (14.0, 19.0)
        );
        assert_eq!((a.interruptions, a.moved_away, b.resumed), (1, 1, 1));
    }
}
