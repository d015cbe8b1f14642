//! The discrete-event simulation behind `evgrid sim`: the whole of ingest → dispatcher →
//! substation on one simulated clock, running the very code of the live services — the
//! dispatcher's [`decide`] over its [`GridView`] view, and each substation's charging model
//! ([`Station`]) with its allocation policy.
//!
//! Stale information is modelled as the live pipeline has it: the dispatcher's view of a
//! substation changes only at that substation's heartbeats (every `heartbeat_s`, substations at
//! evenly spread phases), plus the assignments the dispatcher itself sent since (echoed by the
//! next heartbeat's `dispatch_seq`). Assignments reach their substation at once. A deferred
//! request is offered again after `defer_delay_s`; at each offer, one whose departure has passed
//! is rejected, as the live dispatcher's validation does, and one whose energy no longer fits
//! before its departure asks only for what does (best effort, [`Demand::cut_to_what_fits`]).
//!
//! Substations only interact through decisions, so each station is advanced lazily: to the
//! heartbeat a decision needs, to an arrival, and at the end until its last car has left. A
//! heartbeat nobody reads before the next one is never computed. Likewise a request deferred by
//! a policy that judges room (least-loaded, p2c, headroom) skips the offers that cannot end
//! differently: until a heartbeat can show a change (the first after its station's next event,
//! or one echoing an assignment) or the request can be rejected, every offer would defer again.
//! It resumes at the first of its offers (every `defer_delay_s` from its deferral) after that.
//! Results are the same as if every heartbeat and offer were computed.
//!
//! Grid-operator limits change a substation's capacity at given times (`capacity_changes`): the
//! station is advanced to each change and re-allocates at once, as the live substation does.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::Instant;

use chrono::{DateTime, Utc};
use evgrid_model::charging::{Allocation, Arrival, Event, EventKind, LoadPoint, Station};
use evgrid_model::decision::{Decision, Demand, GridView, Policy, decide, hours_to_deliver};
use evgrid_model::liveness::Observed;
use evgrid_model::messages::Heartbeat;
use evgrid_model::units::Ordered;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use uuid::Uuid;

use super::report::Metrics;
use super::workload::Request;

/// Intervals with fewer dispatches than this do not count for the herd factor.
pub const HERD_MIN_REQUESTS: usize = 10;

/// One decision in this many is timed for `decisions_per_s` (a clock read costs about as much
/// as a decision among a few substations).
const TIME_ONE_IN: u64 = 64;

/// Simulated time zero, a Monday (the decision function reads wall-clock times).
fn origin() -> DateTime<Utc> {
    DateTime::from_timestamp(1_704_067_200, 0).expect("valid date")
}

fn wall(t: f64) -> DateTime<Utc> {
    origin() + chrono::Duration::microseconds((t * 1e6).round() as i64)
}

/// One simulation's grid and policies.
#[derive(Debug, Clone)]
pub struct Setup {
    /// kW, one per substation.
    pub capacities: Vec<f64>,
    /// Grid-operator limits: for substation `i`, `(time, kW)` steps in time order, each the
    /// capacity in force from then on. Empty (or shorter than `capacities`): `capacities[i]`
    /// throughout.
    pub capacity_changes: Vec<Vec<(f64, f64)>>,
    pub policy: Policy,
    pub allocation: Allocation,
    /// Simulated seconds between a substation's heartbeats.
    pub heartbeat_s: f64,
    /// Simulated seconds before a deferred request is offered again.
    pub defer_delay_s: f64,
    /// Seeds the dispatcher's random choices (`p2c`).
    pub seed: u64,
    /// Keep every substation's load over time (for `--plot`).
    pub record_load: bool,
    /// Skip the offers of deferred requests that cannot end differently (see the module doc).
    /// Only tests turn it off, to check that it changes nothing.
    pub skip_futile_offers: bool,
}

/// What one simulation produced.
#[derive(Debug, Clone)]
pub struct Run {
    pub metrics: Metrics,
    /// Substation ids, in the order of `capacities`.
    pub ids: Vec<String>,
    /// Each substation's load over time, when `record_load` was set.
    pub load: Vec<Vec<LoadPoint>>,
    /// Times a request was deferred (one request may be deferred many times).
    pub deferrals: u64,
    /// Requests rejected (undeliverable, or departed while waiting).
    pub rejected: usize,
}

/// What became of one request.
#[derive(Debug, Clone, Copy, Default)]
struct Fate {
    /// Offered to the dispatcher at least once before.
    offered: bool,
    /// Rejected: undeliverable, or its departure passed while it waited.
    rejected: bool,
    /// Rejected at its first offer: it never waited.
    rejected_at_once: bool,
    /// When it stopped waiting: first power, or gave up (left or rejected) without any.
    waited_until: Option<f64>,
    delivered_kwh: f64,
    fully_served: bool,
    /// What it asked for when dispatched: fully served is delivering it, so a car charged best
    /// effort on a later offer, with less, is not (an arrival cut by rounding alone still is).
    asked_kwh: f64,
}

/// One substation of the simulation.
struct Sub {
    id: String,
    station: Station,
    phase_s: f64,
    /// Time of the last heartbeat the dispatcher has seen.
    observed_at: f64,
    heartbeat_seq: u64,
    /// Assignments taken and not yet echoed by a heartbeat: (when, `EV_DISPATCH` sequence).
    taken: VecDeque<(f64, u64)>,
    echoed: u64,
    /// Capacity changes still to come: (time, kW).
    changes: VecDeque<(f64, f64)>,
}

impl Sub {
    /// Advances the station to `t`, applying the capacity changes due by then in order.
    fn advance(&mut self, t: f64, fates: &mut [Fate]) {
        while let Some(&(at, kw)) = self.changes.front() {
            if at > t {
                break;
            }
            self.changes.pop_front();
            let at = at.max(self.station.now());
            record(&self.station.advance_to(at), fates);
            record(&self.station.set_capacity(kw), fates);
        }
        record(&self.station.advance_to(t), fates);
    }

    /// When the station next changes on its own or by a limit.
    fn next_change(&self) -> Option<f64> {
        let limit = self.changes.front().map(|&(at, _)| at);
        match (self.station.next_event_time(), limit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Runs `requests` (sorted by time) through the grid of `setup`.
pub fn simulate(requests: &[Request], setup: &Setup) -> Run {
    let started = Instant::now();
    let n = setup.capacities.len();
    assert!(n > 0, "a grid needs at least one substation");
    let width = n.to_string().len();
    let start = requests.first().map_or(0.0, |r| r.at.min(0.0));
    let mut subs: Vec<Sub> = setup
        .capacities
        .iter()
        .enumerate()
        .map(|(i, &capacity)| {
            let mut station = Station::new(capacity, setup.allocation, start);
            if setup.record_load {
                station.record_load();
            }
            Sub {
                // Zero-padded, so the grid's id order is this order.
                id: format!("s{:0width$}", i + 1),
                station,
                phase_s: setup.heartbeat_s * i as f64 / n as f64,
                observed_at: f64::NEG_INFINITY,
                heartbeat_seq: 0,
                taken: VecDeque::new(),
                echoed: 0,
                changes: setup
                    .capacity_changes
                    .get(i)
                    .map_or_else(VecDeque::new, |c| c.iter().copied().collect()),
            }
        })
        .collect();
    let index: HashMap<String, usize> = subs
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.clone(), i))
        .collect();

    let mut grid = GridView::new();
    let mut rng = SmallRng::seed_from_u64(setup.seed);
    let mut fates = vec![Fate::default(); requests.len()];
    // Offers in time order; ties in request order, first offers before retries of the same time.
    let mut offers: BinaryHeap<Reverse<(Ordered, usize)>> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| Reverse((Ordered(r.at), i)))
        .collect();
    let mut dispatches: Vec<(i64, usize)> = Vec::with_capacity(requests.len());
    let mut dispatch_seq = 0_u64;
    let (mut decisions, mut timed, mut deciding) = (0_u64, 0_u64, std::time::Duration::ZERO);
    let mut deferrals = 0_u64;
    let interval_ms = ((setup.heartbeat_s * 1000.0).round() as u64).max(1);
    let judges_room = matches!(
        setup.policy,
        Policy::LeastLoaded | Policy::P2c | Policy::Headroom
    );
    let largest_capacity_kw = least_largest_capacity(setup);

    while let Some(Reverse((Ordered(t), r))) = offers.pop() {
        for sub in &mut subs {
            heartbeat_due(
                sub,
                t,
                setup.heartbeat_s,
                interval_ms,
                &mut grid,
                &mut fates,
            );
        }
        let request = &requests[r];
        let first_offer = !std::mem::replace(&mut fates[r].offered, true);
        if request.departure.is_some_and(|d| d <= t) {
            // The live dispatcher rejects a request whose departure has passed.
            fates[r].rejected = true;
            fates[r].waited_until = Some(t);
            continue;
        }
        let mut demand = Demand {
            energy_kwh: request.energy_kwh,
            max_power_kw: request.max_power_kw,
            departure: request.departure.map(wall),
        };
        // Best effort, as live: offered again when its energy no longer fits before the car
        // leaves, it is charged what still fits.
        demand.cut_to_what_fits(wall(t));
        let decision = if decisions % TIME_ONE_IN == 0 {
            let clock = Instant::now();
            let decision = decide(&grid, &demand, wall(t), setup.policy, &mut rng);
            deciding += clock.elapsed();
            timed += 1;
            decision
        } else {
            decide(&grid, &demand, wall(t), setup.policy, &mut rng)
        };
        decisions += 1;
        match decision {
            Decision::Dispatch {
                substation_id,
                power_kw,
            } => {
                let i = index[&*substation_id];
                dispatch_seq += 1;
                grid.record_assignment(&substation_id, dispatch_seq, power_kw, &demand);
                fates[r].asked_kwh = request.energy_kwh;
                let sub = &mut subs[i];
                sub.taken.push_back((t, dispatch_seq));
                if sub.changes.front().is_some_and(|&(at, _)| at <= t) {
                    sub.advance(t, &mut fates);
                }
                let events = sub.station.arrive(
                    t,
                    Arrival {
                        id: Uuid::from_u128(r as u128),
                        max_power_kw: request.max_power_kw,
                        energy_kwh: demand.energy_kwh,
                        departure: request.departure,
                    },
                );
                record(&events, &mut fates);
                dispatches.push(((t / setup.heartbeat_s).floor() as i64, i));
            }
            Decision::Defer { .. } => {
                let mut next = t + setup.defer_delay_s;
                deferrals += 1;
                if judges_room && setup.skip_futile_offers {
                    let still = next_view_change(&subs, t, setup.heartbeat_s).min(rejectable_from(
                        &demand,
                        request,
                        largest_capacity_kw,
                    ));
                    // The offers the live dispatcher would make until then, each deferred.
                    while next < still {
                        next += setup.defer_delay_s;
                        deferrals += 1;
                    }
                }
                offers.push(Reverse((Ordered(next), r)));
            }
            Decision::Reject { .. } => {
                fates[r].rejected = true;
                fates[r].rejected_at_once = first_offer;
                fates[r].waited_until = Some(t);
            }
        }
    }
    for sub in &mut subs {
        while let Some(t) = sub.next_change() {
            sub.advance(t, &mut fates);
        }
    }

    let rejected = fates.iter().filter(|f| f.rejected).count();
    let mut metrics = measure(requests, &fates, &subs, setup, &dispatches, timed, deciding);
    metrics.sim_seconds = started.elapsed().as_secs_f64();
    Run {
        metrics,
        ids: subs.iter().map(|s| s.id.clone()).collect(),
        load: subs.iter().map(|s| s.station.load_log().to_vec()).collect(),
        deferrals,
        rejected,
    }
}

/// The earliest time after `t` at which a heartbeat could show the dispatcher something new
/// about room: before it, every substation's heartbeats repeat what the dispatcher saw at `t`.
/// Room is judged on capacity and demand (a heartbeat's `max(load, demand)` is its demand: no
/// car draws above its max), which change only when a car arrives or leaves, when a limit
/// changes the capacity, or when a heartbeat echoes an assignment. Conservative (one heartbeat early), so float rounding can only skip
/// less.
fn next_view_change(subs: &[Sub], t: f64, heartbeat_s: f64) -> f64 {
    subs.iter()
        .map(|sub| {
            let beat = |k: f64| sub.phase_s + k * heartbeat_s;
            let seen = ((t - sub.phase_s) / heartbeat_s).floor();
            if !sub.taken.is_empty() {
                // The next heartbeat echoes an assignment.
                return beat(seen + 1.0);
            }
            let limit = sub.changes.front().map(|&(at, _)| at);
            match (sub.station.earliest_end(), limit) {
                (None, None) => f64::INFINITY,
                // The heartbeat before the first one at or after the event.
                (e, l) => {
                    let e = e.unwrap_or(f64::INFINITY).min(l.unwrap_or(f64::INFINITY));
                    beat(((e - sub.phase_s) / heartbeat_s).ceil() - 1.0)
                }
            }
        })
        .fold(f64::INFINITY, f64::min)
}

/// The capacity in force at `t` on a substation configured with `configured` kW and limited by
/// the `(time, kW)` steps of `changes`.
pub fn capacity_at(configured: f64, changes: Option<&[(f64, f64)]>, t: f64) -> f64 {
    changes
        .and_then(|c| c.iter().take_while(|&&(at, _)| at <= t).last())
        .map_or(configured, |&(_, kw)| kw)
}

/// The grid's largest capacity at its lowest over time: a request is undeliverable once even
/// the largest substation cannot fill it, and under limits that can be any time the largest is
/// smaller, so skipping offers must count with the smallest it gets.
fn least_largest_capacity(setup: &Setup) -> f64 {
    let largest_at = |t: f64| {
        setup
            .capacities
            .iter()
            .enumerate()
            .map(|(i, &configured)| {
                capacity_at(
                    configured,
                    setup.capacity_changes.get(i).map(Vec::as_slice),
                    t,
                )
            })
            .fold(0.0, f64::max)
    };
    setup
        .capacity_changes
        .iter()
        .flatten()
        .map(|&(at, _)| largest_at(at))
        .fold(largest_at(f64::NEG_INFINITY), f64::min)
}

/// From when `request` may be rejected (undeliverable or departed) or asks for less (best
/// effort, once its energy stops fitting before its departure; after that it may change at
/// every offer, and none is skipped), with a second of margin for the decision's millisecond
/// arithmetic.
fn rejectable_from(demand: &Demand, request: &Request, largest_capacity_kw: f64) -> f64 {
    request.departure.map_or(f64::INFINITY, |departure| {
        departure - hours_to_deliver(demand, largest_capacity_kw) * 3600.0 - 1.0
    })
}

/// Shows the dispatcher the last heartbeat `sub` sent at or before `t`, if it has not seen it:
/// the station at that instant, echoing the assignments it had taken before it.
fn heartbeat_due(
    sub: &mut Sub,
    t: f64,
    heartbeat_s: f64,
    interval_ms: u64,
    grid: &mut GridView,
    fates: &mut [Fate],
) {
    let h = sub.phase_s + ((t - sub.phase_s) / heartbeat_s).floor() * heartbeat_s;
    if h <= sub.observed_at {
        return;
    }
    // The station has seen nothing after `h` yet: every arrival since the previous heartbeat
    // the dispatcher saw happened before `h` (decisions come in time order).
    sub.advance(h, fates);
    while let Some(&(at, seq)) = sub.taken.front() {
        if at >= h {
            break;
        }
        sub.echoed = sub.echoed.max(seq);
        sub.taken.pop_front();
    }
    let s = sub.station.snapshot();
    sub.heartbeat_seq += 1;
    let heartbeat = Heartbeat {
        substation_id: sub.id.clone(),
        seq: sub.heartbeat_seq,
        sent_at: wall(h),
        capacity_kw: s.capacity_kw,
        load_kw: s.load_kw,
        active_sessions: s.active,
        queued_sessions: s.queued,
        demand_kw: s.demand_kw,
        dispatch_seq: sub.echoed,
        interval_ms,
    };
    let observed = Observed {
        heartbeat,
        stored_at: wall(h),
    };
    grid.observe_with(observed, Some(sub.station.projection()));
    sub.observed_at = h;
}

fn record(events: &[Event], fates: &mut [Fate]) {
    for e in events {
        let fate = &mut fates[e.id.as_u128() as usize];
        match e.kind {
            EventKind::Started => {
                fate.waited_until.get_or_insert(e.at);
            }
            EventKind::Completed => {
                fate.delivered_kwh = e.delivered_kwh;
                fate.fully_served = e.delivered_kwh >= fate.asked_kwh * (1.0 - 1e-6);
                fate.waited_until.get_or_insert(e.at);
            }
            EventKind::Departed => {
                fate.delivered_kwh = e.delivered_kwh;
                fate.waited_until.get_or_insert(e.at);
            }
        }
    }
}

fn measure(
    requests: &[Request],
    fates: &[Fate],
    subs: &[Sub],
    setup: &Setup,
    dispatches: &[(i64, usize)],
    timed_decisions: u64,
    deciding: std::time::Duration,
) -> Metrics {
    let requested: f64 = requests.iter().map(|r| r.energy_kwh).sum();
    let delivered: f64 = fates.iter().map(|f| f.delivered_kwh).sum();
    let served = fates.iter().filter(|f| f.fully_served).count();
    let mut waits: Vec<f64> = fates
        .iter()
        .zip(requests)
        .filter(|(f, _)| !f.rejected_at_once)
        .map(|(f, r)| f.waited_until.map_or(0.0, |until| (until - r.at).max(0.0)))
        .collect();
    waits.sort_by(f64::total_cmp);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    Metrics {
        energy_requested_kwh: requested,
        energy_delivered_kwh: delivered,
        energy_delivered_ratio: ratio(delivered, requested),
        sessions_fully_served_ratio: ratio(served as f64, requests.len() as f64),
        capacity_violations: subs.iter().map(|s| s.station.stats().overloads).sum(),
        peak_utilization: subs
            .iter()
            .map(|s| s.station.stats().peak_utilization)
            .fold(0.0, f64::max),
        herd_factor: herd_factor(dispatches, &setup.capacities),
        wait_p95_s: percentile(&waits, 0.95),
        decisions_per_s: ratio(timed_decisions as f64, deciding.as_secs_f64()),
        sim_seconds: 0.0,
    }
}

/// The largest number of requests sent to one substation within one heartbeat interval,
/// divided by its capacity-weighted fair share of that interval's requests, over intervals
/// with at least [`HERD_MIN_REQUESTS`] requests; `None` when there are none. `dispatches` holds
/// (interval, substation) in time order.
pub fn herd_factor(dispatches: &[(i64, usize)], capacities: &[f64]) -> Option<f64> {
    let total_capacity: f64 = capacities.iter().sum();
    let mut worst: Option<f64> = None;
    let mut counts = vec![0_usize; capacities.len()];
    for chunk in dispatches.chunk_by(|a, b| a.0 == b.0) {
        if chunk.len() < HERD_MIN_REQUESTS {
            continue;
        }
        counts.fill(0);
        for &(_, s) in chunk {
            counts[s] += 1;
        }
        for (s, &count) in counts.iter().enumerate() {
            let fair = chunk.len() as f64 * capacities[s] / total_capacity;
            let factor = count as f64 / fair;
            worst = Some(worst.map_or(factor, |w: f64| w.max(factor)));
        }
    }
    worst
}

/// Nearest-rank percentile of sorted values (0 when there are none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
