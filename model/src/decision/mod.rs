//! The dispatch decision: which substation takes a charge request, or why the request waits or
//! is rejected.
//!
//! This is the functional core of the dispatcher (ingest → **dispatcher** → substation): plain
//! data in — the dispatcher's view of the grid ([`GridView`]), what the car needs ([`Demand`]), the
//! time, the [`Policy`] and a seeded random number generator — and a [`Decision`] out. No clock
//! reads, no NATS, no other randomness, so the live service and the simulator (`evgrid sim`)
//! make the same decisions from the same inputs. A decision scans the substations once and
//! allocates nothing.
//!
//! The grid view is the last heartbeat of every substation plus the assignments sent to it since
//! that heartbeat (pending). A heartbeat's `dispatch_seq` echoes the highest `EV_DISPATCH`
//! sequence the substation has taken, so pending assignments up to it are dropped: from then on
//! they are part of the reported load (and projection), and nothing is counted twice.

use std::sync::Arc;

use crate::SECONDS_PER_HOUR;
use crate::messages::{ChargeRequest, PROJECTION_HORIZONS_S, RejectReason};
use chrono::{DateTime, Utc};
use rand::Rng;

mod grid;

pub use grid::{GridView, SubstationView, Ticket};

/// Number of departure horizons of the predictive outlook ([`PROJECTION_HORIZONS_S`]).
const HORIZONS: usize = PROJECTION_HORIZONS_S.len();

/// How the dispatcher chooses among the substations that are up (`--policy`).
///
/// Every policy shares the rules of [`decide`] that do not depend on the choice (nothing up →
/// defer, undeliverable → reject). docs/dispatch.md compares them on real data.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    /// Each up substation in turn, whatever its load (a baseline): never defers for lack of
    /// room, the substation queues.
    RoundRobin,
    /// The lowest reported utilization on the last heartbeat only, not counting what was sent
    /// since (the original design, kept as the baseline that herds on stale data); defers when
    /// that substation reported no room.
    LeastLoaded,
    /// Power of two choices: the lower estimated utilization of two random up substations
    /// (estimated = heartbeat + assignments since); when neither has room, the one with the most
    /// headroom if any has room, else defer.
    P2c,
    /// The most headroom: capacity − (reported load + assignments since the heartbeat, echo
    /// corrected); defers when no substation has room.
    Headroom,
    /// Where the request is expected to get its energy soonest against its departure, from each
    /// substation's projection (energy its sessions still need, by departure) plus the
    /// assignments since: the most spare time (capacity-hours not yet owed) at the car's
    /// departure and every later horizon, less the extra time a substation smaller than the
    /// car's max power would take. Never defers for lack of room: the substation's allocation
    /// shares its capacity by deadline.
    #[default]
    Predictive,
}

impl Policy {
    /// Every policy, for sweeps (`--policy all` in the simulator).
    pub const ALL: [Policy; 5] = [
        Policy::RoundRobin,
        Policy::LeastLoaded,
        Policy::P2c,
        Policy::Headroom,
        Policy::Predictive,
    ];

    /// The name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "round-robin",
            Self::LeastLoaded => "least-loaded",
            Self::P2c => "p2c",
            Self::Headroom => "headroom",
            Self::Predictive => "predictive",
        }
    }
}

/// What a charge request asks of the grid.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Demand {
    pub energy_kwh: f64,
    pub max_power_kw: f64,
    pub departure: Option<DateTime<Utc>>,
}

impl From<&ChargeRequest> for Demand {
    fn from(r: &ChargeRequest) -> Self {
        Self {
            energy_kwh: r.energy_kwh,
            max_power_kw: r.max_power_kw,
            departure: r.departure,
        }
    }
}

/// Just under what fits: a best-effort demand cut to exactly what the car can take before it
/// leaves could, by rounding, come out as undeliverable in [`decide`].
const BEST_EFFORT_MARGIN: f64 = 1.0 - 1e-9;

impl Demand {
    /// Best effort, the same in the live dispatcher and the simulator: a car that leaves before
    /// its energy fits at its max power is charged what it can take by then, as a real charger
    /// would. Cuts the demand to (just under) that and returns it. `None`, leaving the demand as
    /// it is, when the whole energy fits, or when what fits is below
    /// [`MIN_BEST_EFFORT_KWH`](crate::messages::MIN_BEST_EFFORT_KWH): nearly nothing is still
    /// nothing, and `decide` rejects it as undeliverable.
    pub fn cut_to_what_fits(&mut self, now: DateTime<Utc>) -> Option<f64> {
        let expected = crate::messages::expected_energy_kwh(
            self.energy_kwh,
            self.max_power_kw,
            self.departure,
            now,
        )
        .filter(|e| *e >= crate::messages::MIN_BEST_EFFORT_KWH)?;
        self.energy_kwh = expected * BEST_EFFORT_MARGIN;
        Some(expected)
    }
}

/// The outcome of [`decide`].
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum Decision {
    /// Send the request to this substation. `power_kw` is what the assignment adds to the
    /// substation's estimated load until a heartbeat echoes it: `min(max_power_kw, capacity)`.
    Dispatch {
        substation_id: Arc<str>,
        power_kw: f64,
    },
    /// Not now: the request waits and is offered again later.
    Defer { reason: DeferReason },
    /// Never: the request can not be served.
    Reject {
        reason: RejectReason,
        detail: String,
    },
}

/// Why a request waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeferReason {
    /// No substation has sent a heartbeat recently enough to count as up.
    NoSubstationUp,
    /// No up substation has room by the policy's estimate.
    NoHeadroom,
}

impl DeferReason {
    /// The word used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoSubstationUp => "no_substation_up",
            Self::NoHeadroom => "no_headroom",
        }
    }
}

/// The best substation so far of a scan, by a score where higher wins; ties keep the earlier
/// (lower) id.
#[derive(Debug, Clone, Copy)]
struct Best {
    index: usize,
    score: f64,
}

fn keep_best(best: &mut Option<Best>, index: usize, score: f64) {
    // Strictly greater: on a tie the earlier (lower) id stays.
    if best.is_none_or(|b| score > b.score) {
        *best = Some(Best { index, score });
    }
}

/// Decides where a request goes, at `now`, by `policy`; `rng` is used by `p2c` only.
///
/// 1. No substation up → [`DeferReason::NoSubstationUp`].
/// 2. A departure is given and the energy cannot be delivered before it even at
///    `min(max_power_kw, largest capacity among the up substations)` → reject `undeliverable`.
/// 3. The policy picks an up substation → dispatch; a policy that judges room (least-loaded,
///    p2c, headroom) defers with [`DeferReason::NoHeadroom`] when none has any. A car asking more
///    power than the headroom is still dispatched: it charges slower.
pub fn decide<R: Rng + ?Sized>(
    grid: &GridView,
    demand: &Demand,
    now: DateTime<Utc>,
    policy: Policy,
    rng: &mut R,
) -> Decision {
    let now_us = now.timestamp_micros();
    let departure_us = demand.departure.map(|d| d.timestamp_micros());
    let mut up = 0_usize;
    let mut largest_capacity_kw = 0.0_f64;
    // The policy's own pick, and the most headroom (p2c falls back to it).
    let mut best: Option<Best> = None;
    let mut roomiest: Option<Best> = None;
    let mut first_up: Option<usize> = None;
    for (i, load) in grid.loads.iter().enumerate() {
        if !load.is_up(now_us) {
            continue;
        }
        up += 1;
        largest_capacity_kw = largest_capacity_kw.max(load.capacity_kw);
        first_up.get_or_insert(i);
        match policy {
            Policy::RoundRobin => {
                if i >= grid.round_robin_next && best.is_none() {
                    best = Some(Best {
                        index: i,
                        score: 0.0,
                    });
                }
            }
            Policy::LeastLoaded => keep_best(&mut best, i, -load.reported_utilization()),
            Policy::P2c | Policy::Headroom => keep_best(&mut roomiest, i, load.headroom_kw()),
            Policy::Predictive => {
                let spare = grid.outlooks[i].spare_hours(departure_us, now_us);
                keep_best(
                    &mut best,
                    i,
                    spare - slowdown_hours(demand, load.capacity_kw),
                );
            }
        }
    }

    if up == 0 {
        return Decision::Defer {
            reason: DeferReason::NoSubstationUp,
        };
    }
    if largest_capacity_kw <= 0.0 {
        // Up but with no capacity at all (e.g. in maintenance): nothing can be judged yet.
        return Decision::Defer {
            reason: DeferReason::NoHeadroom,
        };
    }
    if let Some(departure) = demand.departure {
        let power_kw = demand.max_power_kw.min(largest_capacity_kw);
        let hours_needed = hours_to_deliver(demand, largest_capacity_kw);
        let hours_left = hours_between(now, departure);
        if hours_needed > hours_left {
            return Decision::Reject {
                reason: RejectReason::Undeliverable,
                detail: format!(
                    "{} kWh takes {hours_needed:.2} h at {power_kw} kW (the most any substation \
                     can give this car), but departure is in {:.2} h",
                    demand.energy_kwh,
                    hours_left.max(0.0)
                ),
            };
        }
    }

    let chosen = match policy {
        // Wrapped around: the first up substation.
        Policy::RoundRobin => best.map(|b| b.index).or(first_up),
        Policy::LeastLoaded => best.map(|b| b.index).filter(|&i| {
            // Room as the last heartbeat reported it.
            let load = &grid.loads[i];
            load.capacity_kw - load.reported_kw > 0.0
        }),
        Policy::Headroom => roomiest.filter(|b| b.score > 0.0).map(|b| b.index),
        // No draw when nothing has room: the random sequence only moves with dispatches.
        Policy::P2c => roomiest.filter(|b| b.score > 0.0).map(|b| {
            two_choices(grid, now_us, up, rng)
                .filter(|&i| grid.loads[i].headroom_kw() > 0.0)
                .unwrap_or(b.index)
        }),
        Policy::Predictive => best.map(|b| b.index),
    };
    match chosen {
        Some(i) => Decision::Dispatch {
            substation_id: grid.entries[i].id.clone(),
            power_kw: demand.max_power_kw.min(grid.loads[i].capacity_kw),
        },
        None => Decision::Defer {
            reason: DeferReason::NoHeadroom,
        },
    }
}

/// Two distinct up substations drawn at random (of `up` up ones): the one with the lower
/// estimated utilization (ties: the lower id).
fn two_choices<R: Rng + ?Sized>(
    grid: &GridView,
    now_us: i64,
    up: usize,
    rng: &mut R,
) -> Option<usize> {
    let a = rng.random_range(0..up);
    let b = if up > 1 {
        // Uniform over the others.
        let b = rng.random_range(0..up - 1);
        if b >= a { b + 1 } else { b }
    } else {
        a
    };
    let nth_up = |n: usize| -> Option<usize> {
        if up == grid.loads.len() {
            // Everything is up (the usual case): the n-th substation, no scan.
            return Some(n);
        }
        grid.loads
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_up(now_us))
            .nth(n)
            .map(|(i, _)| i)
    };
    let (a, b) = (nth_up(a)?, nth_up(b)?);
    let (lo, hi) = (a.min(b), a.max(b));
    if grid.loads[hi].estimated_utilization() < grid.loads[lo].estimated_utilization() {
        Some(hi)
    } else {
        Some(lo)
    }
}

/// How much longer (hours) `demand` takes at a substation of `capacity_kw` than at its own max
/// power: zero unless the whole substation is smaller than the car.
fn slowdown_hours(demand: &Demand, capacity_kw: f64) -> f64 {
    if capacity_kw >= demand.max_power_kw {
        0.0
    } else if capacity_kw > 0.0 {
        demand.energy_kwh * (1.0 / capacity_kw - 1.0 / demand.max_power_kw)
    } else {
        f64::INFINITY
    }
}

/// The shortest time `demand` can be delivered in (hours): at its max power, or the largest
/// capacity if that is less. [`decide`] rejects a request as `undeliverable` once less than
/// this is left before its departure.
pub fn hours_to_deliver(demand: &Demand, largest_capacity_kw: f64) -> f64 {
    demand.energy_kwh / demand.max_power_kw.min(largest_capacity_kw)
}

fn hours_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_milliseconds() as f64 / 1000.0 / SECONDS_PER_HOUR
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::messages::Heartbeat;
    use chrono::Duration;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    use super::*;
    use crate::liveness::Observed;
    use crate::messages::Projection;

    fn rng() -> SmallRng {
        SmallRng::seed_from_u64(7)
    }

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    #[test]
    fn a_demand_that_does_not_fit_is_cut_to_just_under_what_does() {
        let now = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let demand = |energy_kwh: f64, minutes: i64| Demand {
            energy_kwh,
            max_power_kw: 6.0,
            departure: Some(now + chrono::Duration::minutes(minutes)),
        };
        let mut d = demand(26.0, 90);
        assert_eq!(d.cut_to_what_fits(now), Some(9.0));
        assert!(d.energy_kwh < 9.0 && d.energy_kwh > 9.0 - 1e-6);
        let mut fits = demand(9.0, 90);
        assert_eq!(fits.cut_to_what_fits(now), None);
        assert_eq!(fits.energy_kwh, 9.0);
        // Less than 0.1 kWh fits (a minute at 6 kW): nothing to cut to; decide rejects it.
        let mut leaving = demand(26.0, 0);
        assert_eq!(leaving.cut_to_what_fits(now), None);
        assert_eq!(leaving.energy_kwh, 26.0);
    }

    fn heartbeat(id: &str, capacity_kw: f64, load_kw: f64, at: DateTime<Utc>) -> Observed {
        Observed {
            heartbeat: Heartbeat {
                substation_id: id.into(),
                seq: 1,
                sent_at: at,
                capacity_kw,
                load_kw,
                active_sessions: 0,
                queued_sessions: 0,
                demand_kw: load_kw,
                dispatch_seq: 0,
                interval_ms: 1000,
            },
            stored_at: at,
        }
    }

    fn echo(mut o: Observed, dispatch_seq: u64) -> Observed {
        o.heartbeat.dispatch_seq = dispatch_seq;
        o
    }

    fn grid(substations: &[(&str, f64, f64)]) -> GridView {
        let mut g = GridView::new();
        for &(id, capacity, load) in substations {
            g.observe(heartbeat(id, capacity, load, t0()));
        }
        g
    }

    fn demand(max_power_kw: f64) -> Demand {
        Demand {
            energy_kwh: 30.0,
            max_power_kw,
            departure: None,
        }
    }

    fn run(grid: &GridView, d: &Demand) -> Decision {
        decide(grid, d, t0(), Policy::Headroom, &mut rng())
    }

    /// Decides by `policy` and records like the live service: the assignment counts at once.
    fn dispatch_by(
        policy: Policy,
        grid: &mut GridView,
        d: &Demand,
        seq: u64,
        rng: &mut SmallRng,
    ) -> Option<Arc<str>> {
        match decide(grid, d, t0(), policy, rng) {
            Decision::Dispatch {
                substation_id,
                power_kw,
            } => {
                assert!(grid.record_assignment(&substation_id, seq, power_kw, d));
                Some(substation_id)
            }
            _ => None,
        }
    }

    fn dispatch_one(grid: &mut GridView, d: &Demand, seq: u64) -> Option<Arc<str>> {
        dispatch_by(Policy::Headroom, grid, d, seq, &mut rng())
    }

    /// Requests sent to each substation by `policy` out of `n` identical ones, no heartbeat in
    /// between.
    fn burst(policy: Policy, grid: &mut GridView, d: &Demand, n: u64) -> BTreeMap<Arc<str>, usize> {
        let mut rng = rng();
        let mut got = BTreeMap::new();
        for seq in 1..=n {
            if let Some(id) = dispatch_by(policy, grid, d, seq, &mut rng) {
                *got.entry(id).or_default() += 1;
            }
        }
        got
    }

    #[test]
    fn chooses_the_most_headroom() {
        let g = grid(&[("a", 100.0, 90.0), ("b", 50.0, 0.0), ("c", 200.0, 180.0)]);
        assert_eq!(
            run(&g, &demand(11.0)),
            Decision::Dispatch {
                substation_id: "b".into(),
                power_kw: 11.0
            }
        );
    }

    #[test]
    fn ties_go_to_the_lowest_id_whatever_the_arrival_order() {
        let mut g = GridView::new();
        for id in ["s3", "s1", "s2"] {
            g.observe(heartbeat(id, 100.0, 0.0, t0()));
        }
        let ids: Vec<&str> = g.substations().map(|s| s.id()).collect();
        assert_eq!(ids, ["s1", "s2", "s3"]);
        assert!(
            matches!(run(&g, &demand(11.0)), Decision::Dispatch { substation_id, .. } if &*substation_id == "s1")
        );
    }

    #[test]
    fn a_burst_between_heartbeats_is_spread_by_capacity() {
        let capacities = [("s1", 100.0), ("s2", 200.0), ("s3", 300.0)];
        let mut g = grid(&capacities.map(|(id, c)| (id, c, 0.0)));
        let mut got: BTreeMap<Arc<str>, usize> = BTreeMap::new();
        let mut deferred = 0;
        for seq in 1..=300 {
            match dispatch_one(&mut g, &demand(11.0), seq) {
                Some(id) => *got.entry(id).or_default() += 1,
                None => deferred += 1,
            }
        }
        let dispatched: usize = got.values().sum();
        // Each substation takes requests while its headroom is above zero: ceil(capacity / 11).
        assert_eq!(dispatched, 10 + 19 + 28);
        assert_eq!(deferred, 300 - dispatched);
        let total_capacity: f64 = capacities.iter().map(|c| c.1).sum();
        for (id, capacity) in capacities {
            let share = dispatched as f64 * capacity / total_capacity;
            let n = got[id] as f64;
            assert!(n <= 1.2 * share, "{id} got {n}, fair share {share:.1}");
        }
        assert_eq!(
            run(&g, &demand(11.0)),
            Decision::Defer {
                reason: DeferReason::NoHeadroom
            }
        );
    }

    #[test]
    fn no_room_defers_but_a_big_car_is_not_rejected() {
        let g = grid(&[("a", 100.0, 100.0), ("b", 50.0, 60.0)]);
        assert_eq!(
            run(&g, &demand(11.0)),
            Decision::Defer {
                reason: DeferReason::NoHeadroom
            }
        );
        // 1 kW of room and a 350 kW car: dispatched, it charges slower; counted at capacity.
        let g = grid(&[("a", 100.0, 99.0)]);
        assert_eq!(
            run(&g, &demand(350.0)),
            Decision::Dispatch {
                substation_id: "a".into(),
                power_kw: 100.0
            }
        );
    }

    #[test]
    fn reported_demand_above_load_counts_as_load() {
        let mut o = heartbeat("a", 100.0, 60.0, t0());
        o.heartbeat.demand_kw = 120.0;
        let mut g = GridView::new();
        g.observe(o);
        assert_eq!(g.get("a").unwrap().headroom_kw(), -20.0);
        assert!(matches!(run(&g, &demand(11.0)), Decision::Defer { .. }));
    }

    #[test]
    fn nothing_up_defers() {
        assert_eq!(
            run(&GridView::new(), &demand(11.0)),
            Decision::Defer {
                reason: DeferReason::NoSubstationUp
            }
        );
        let g = grid(&[("a", 100.0, 0.0)]);
        let later = t0() + Duration::milliseconds(3001);
        assert_eq!(
            decide(&g, &demand(11.0), later, Policy::Headroom, &mut rng()),
            Decision::Defer {
                reason: DeferReason::NoSubstationUp
            }
        );
    }

    #[test]
    fn stale_substations_are_ignored() {
        let mut g = GridView::new();
        // "a" has lots of room but went silent 5 s ago; "b" is fresh and nearly full.
        g.observe(heartbeat("a", 500.0, 0.0, t0() - Duration::seconds(5)));
        g.observe(heartbeat("b", 100.0, 95.0, t0()));
        assert!(
            matches!(run(&g, &demand(11.0)), Decision::Dispatch { substation_id, .. } if &*substation_id == "b")
        );
        assert_eq!(g.up_count(t0()), 1);
    }

    #[test]
    fn an_older_heartbeat_does_not_replace_a_newer_one() {
        let mut g = GridView::new();
        assert!(g.observe(heartbeat("a", 100.0, 10.0, t0())));
        assert!(!g.observe(heartbeat("a", 100.0, 90.0, t0() - Duration::seconds(1))));
        assert_eq!(g.get("a").unwrap().observed().heartbeat.load_kw, 10.0);
    }

    #[test]
    fn an_echo_drops_pending_without_double_counting() {
        let mut g = grid(&[("a", 100.0, 0.0)]);
        for seq in 1..=3 {
            assert!(g.record_assignment("a", seq, 11.0, &demand(11.0)));
        }
        assert_eq!(g.get("a").unwrap().pending_kw(), 33.0);

        // A heartbeat that echoes nothing new keeps every pending assignment.
        g.observe(heartbeat(
            "a",
            100.0,
            0.0,
            t0() + Duration::milliseconds(500),
        ));
        assert_eq!(g.get("a").unwrap().pending_kw(), 33.0);

        // It took seq 1 and 2 (now in its load); seq 3 is still pending.
        g.observe(echo(
            heartbeat("a", 100.0, 22.0, t0() + Duration::seconds(1)),
            2,
        ));
        let a = g.get("a").unwrap();
        assert_eq!((a.pending_count(), a.pending_kw()), (1, 11.0));
        assert_eq!(a.estimated_load_kw(), 33.0);
    }

    #[test]
    fn tickets_count_at_once_and_settle_later() {
        let mut g = grid(&[("a", 100.0, 0.0)]);
        let d = demand(11.0);
        let t1 = g.assign("a", 11.0, &d).unwrap();
        let t2 = g.assign("a", 11.0, &d).unwrap();
        let t3 = g.assign("a", 11.0, &d).unwrap();
        assert_eq!(g.get("a").unwrap().pending_kw(), 33.0);
        // An echo never drops an assignment whose sequence is still unknown.
        g.observe(echo(
            heartbeat("a", 100.0, 0.0, t0() + Duration::seconds(1)),
            10,
        ));
        assert_eq!(g.get("a").unwrap().pending_kw(), 33.0);
        // Stored at 5: already echoed by the heartbeat above, so it is in the load.
        g.confirm(&t1, 5);
        // Stored at 11: still pending.
        g.confirm(&t2, 11);
        // Publish failed: never counted.
        g.cancel(&t3);
        let a = g.get("a").unwrap();
        assert_eq!((a.pending_count(), a.pending_kw()), (1, 11.0));
        assert!(g.assign("nowhere", 1.0, &d).is_none());
    }

    #[test]
    fn undeliverable_energy_is_rejected() {
        let g = grid(&[("a", 50.0, 0.0), ("b", 22.0, 0.0)]);
        let in_two_hours = Demand {
            energy_kwh: 60.0,
            max_power_kw: 11.0,
            departure: Some(t0() + Duration::hours(2)),
        };
        // 60 kWh at 11 kW is 5.5 h.
        assert!(matches!(
            run(&g, &in_two_hours),
            Decision::Reject { reason: RejectReason::Undeliverable, ref detail } if detail.contains("5.45 h")
        ));
        // The same car at 40 kW: 1.5 h, fits (the largest capacity is 50 kW).
        let fast = Demand {
            max_power_kw: 40.0,
            ..in_two_hours
        };
        assert!(matches!(run(&g, &fast), Decision::Dispatch { .. }));
        // A 400 kW car is limited by the largest capacity: 60 kWh at 50 kW is 1.2 h.
        let huge = Demand {
            max_power_kw: 400.0,
            departure: Some(t0() + Duration::minutes(70)),
            ..in_two_hours
        };
        assert!(matches!(run(&g, &huge), Decision::Reject { .. }));
    }

    #[test]
    fn undeliverable_is_judged_only_when_something_is_up() {
        let d = Demand {
            energy_kwh: 200.0,
            max_power_kw: 1.0,
            departure: Some(t0() + Duration::hours(1)),
        };
        assert_eq!(
            run(&GridView::new(), &d),
            Decision::Defer {
                reason: DeferReason::NoSubstationUp
            }
        );
        // Full, but up: the energy can never arrive in time whatever frees up.
        let g = grid(&[("a", 100.0, 100.0)]);
        assert!(matches!(run(&g, &d), Decision::Reject { .. }));
    }

    #[test]
    fn decisions_are_deterministic_for_every_policy() {
        let build = || {
            let mut g = GridView::new();
            for (i, id) in ["n", "m", "k", "z", "a"].iter().enumerate() {
                g.observe(heartbeat(id, 50.0 + 25.0 * i as f64, 5.0 * i as f64, t0()));
            }
            g
        };
        for policy in Policy::ALL {
            let sequence = |mut g: GridView, seed: u64| -> Vec<Option<Arc<str>>> {
                let mut rng = SmallRng::seed_from_u64(seed);
                (1..=60)
                    .map(|seq| {
                        let d = demand(7.0 + (seq % 5) as f64);
                        dispatch_by(policy, &mut g, &d, seq, &mut rng)
                    })
                    .collect()
            };
            assert_eq!(sequence(build(), 1), sequence(build(), 1), "{policy:?}");
        }
    }

    #[test]
    fn round_robin_takes_each_up_substation_in_turn_whatever_its_load() {
        let mut g = grid(&[("a", 100.0, 100.0), ("b", 10.0, 0.0), ("c", 100.0, 0.0)]);
        g.observe(heartbeat("d", 100.0, 0.0, t0() - Duration::seconds(10)));
        let mut rng = rng();
        let order: Vec<Option<Arc<str>>> = (1..=5)
            .map(|seq| dispatch_by(Policy::RoundRobin, &mut g, &demand(11.0), seq, &mut rng))
            .collect();
        // "d" is down; "a" is full and still gets its turn.
        let ids = |names: &[&str]| -> Vec<Option<Arc<str>>> {
            names.iter().map(|n| Some(Arc::from(*n))).collect()
        };
        assert_eq!(order, ids(&["a", "b", "c", "a", "b"]));
    }

    #[test]
    fn least_loaded_herds_a_burst_onto_the_last_reported_emptiest() {
        let mut g = grid(&[("a", 100.0, 50.0), ("b", 100.0, 40.0), ("c", 300.0, 150.0)]);
        let got = burst(Policy::LeastLoaded, &mut g, &demand(11.0), 30);
        // All 30 to "b" (40 %), far past its room: it only learns at the next heartbeat.
        assert_eq!(got.get("b"), Some(&30));
        assert_eq!(got.len(), 1);
        // A heartbeat saying every substation is full: it defers.
        let mut g = grid(&[("a", 100.0, 100.0), ("b", 50.0, 70.0)]);
        assert_eq!(
            decide(&g, &demand(11.0), t0(), Policy::LeastLoaded, &mut rng()),
            Decision::Defer {
                reason: DeferReason::NoHeadroom
            }
        );
        assert!(burst(Policy::LeastLoaded, &mut g, &demand(11.0), 3).is_empty());
    }

    #[test]
    fn p2c_takes_the_less_loaded_of_two_and_falls_back_to_any_room() {
        let pick = |g: &GridView, seed: u64| match decide(
            g,
            &demand(11.0),
            t0(),
            Policy::P2c,
            &mut SmallRng::seed_from_u64(seed),
        ) {
            Decision::Dispatch { substation_id, .. } => substation_id.to_string(),
            other => panic!("seed {seed}: {other:?}"),
        };
        // "c" is the most loaded: never the lower of two distinct choices.
        let g = grid(&[("a", 100.0, 10.0), ("b", 100.0, 20.0), ("c", 100.0, 90.0)]);
        assert!((0..200).all(|seed| pick(&g, seed) != "c"));
        // Two full choices: the one with room, found by the scan.
        let g = grid(&[("a", 100.0, 100.0), ("b", 100.0, 100.0), ("c", 100.0, 99.0)]);
        assert!((0..50).all(|seed| pick(&g, seed) == "c"));
        // A burst counts what it sent (estimated load): spread over the three.
        let mut g = grid(&[("a", 100.0, 0.0), ("b", 100.0, 0.0), ("c", 100.0, 0.0)]);
        let got = burst(Policy::P2c, &mut g, &demand(10.0), 27);
        assert!(got.values().all(|&n| (8..=10).contains(&n)), "{got:?}");
    }

    /// A heartbeat of a substation drawing its capacity, with twice that demand.
    fn saturated(id: &str, capacity_kw: f64) -> Observed {
        let mut o = heartbeat(id, capacity_kw, capacity_kw, t0());
        o.heartbeat.demand_kw = capacity_kw * 2.0;
        o
    }

    fn projection(due: &[(f64, f64)], remaining_kwh: f64) -> Projection {
        // Energy due per departure time (seconds after the heartbeat) → cumulative buckets.
        let due_kwh = PROJECTION_HORIZONS_S
            .iter()
            .map(|&h| {
                due.iter()
                    .filter(|(at, _)| *at <= h)
                    .map(|(_, kwh)| kwh)
                    .sum()
            })
            .collect();
        Projection {
            horizons_s: PROJECTION_HORIZONS_S.to_vec(),
            due_kwh,
            remaining_kwh,
        }
    }

    #[test]
    fn predictive_sends_a_car_where_its_departure_is_met_soonest() {
        let mut g = GridView::new();
        // Both are saturated right now (demand above capacity). "a" must deliver 90 kWh within
        // the next hour; "b" has 400 kWh to deliver, but by tomorrow evening.
        g.observe_with(
            saturated("a", 100.0),
            Some(projection(&[(3000.0, 90.0)], 90.0)),
        );
        g.observe_with(
            saturated("b", 100.0),
            Some(projection(&[(30.0 * 3600.0, 400.0)], 400.0)),
        );
        let leaving_in = |hours: i64| Demand {
            energy_kwh: 10.0,
            max_power_kw: 11.0,
            departure: Some(t0() + Duration::hours(hours)),
        };
        let pick = |d: &Demand| match decide(&g, d, t0(), Policy::Predictive, &mut rng()) {
            Decision::Dispatch { substation_id, .. } => substation_id.to_string(),
            other => panic!("{other:?}"),
        };
        // Leaving in 2 h: "b" has the whole capacity free until then.
        assert_eq!(pick(&leaving_in(2)), "b");
        // Not leaving before tomorrow night, or never: "a" is done in an hour; "b" is busy.
        assert_eq!(pick(&leaving_in(40)), "a");
        assert_eq!(pick(&demand(11.0)), "a");
        // Full by heartbeat, yet it never defers: the allocation shares by deadline.
        assert!(g.substations().all(|s| s.headroom_kw() < 0.0));
    }

    #[test]
    fn predictive_avoids_a_substation_smaller_than_the_car() {
        let mut g = GridView::new();
        g.observe_with(heartbeat("a", 20.0, 0.0, t0()), Some(projection(&[], 0.0)));
        g.observe_with(
            heartbeat("b", 100.0, 0.0, t0()),
            Some(projection(&[(3600.0, 50.0)], 50.0)),
        );
        let fast_car = Demand {
            energy_kwh: 40.0,
            max_power_kw: 50.0,
            departure: Some(t0() + Duration::hours(3)),
        };
        // "a" is idle, but a 50 kW car would charge at 20 kW there: 2 h instead of 0.8 h.
        let d = decide(&g, &fast_car, t0(), Policy::Predictive, &mut rng());
        assert!(matches!(d, Decision::Dispatch { substation_id, .. } if &*substation_id == "b"));
        // A car that fits in "a" goes to the idle one.
        let d = decide(&g, &demand(11.0), t0(), Policy::Predictive, &mut rng());
        assert!(matches!(d, Decision::Dispatch { substation_id, .. } if &*substation_id == "a"));
    }

    #[test]
    fn predictive_spreads_a_burst_by_capacity_and_counts_what_it_sent() {
        let capacities = [("s1", 100.0), ("s2", 200.0), ("s3", 300.0)];
        let mut g = GridView::new();
        for (id, capacity) in capacities {
            g.observe_with(
                heartbeat(id, capacity, 0.0, t0()),
                Some(projection(&[], 0.0)),
            );
        }
        let d = Demand {
            departure: Some(t0() + Duration::hours(8)),
            ..demand(11.0)
        };
        let got = burst(Policy::Predictive, &mut g, &d, 300);
        assert_eq!(got.values().sum::<usize>(), 300);
        for (id, capacity) in capacities {
            let share = 300.0 * capacity / 600.0;
            let n = got[id] as f64;
            assert!(
                n <= 1.2 * share && n >= 0.8 * share,
                "{id}: {n} of fair {share}"
            );
        }
        // An echo moves the pending energy into the reported projection: no double count.
        let s1 = g.get("s1").unwrap().pending_count() as u64;
        assert!(s1 > 0);
        let before = g.entries[0].owed;
        let mut echoed = echo(
            heartbeat("s1", 100.0, 100.0, t0() + Duration::seconds(1)),
            300,
        );
        echoed.heartbeat.demand_kw = 100.0;
        let energy = 30.0 * s1 as f64;
        g.observe_with(echoed, Some(projection(&[(8.0 * 3600.0, energy)], energy)));
        assert_eq!(g.get("s1").unwrap().pending_count(), 0);
        let after = g.entries[0].owed;
        assert!((after.remaining_kwh - before.remaining_kwh).abs() < 1e-9);
        assert!((after.due_kwh[HORIZONS - 1] - before.due_kwh[HORIZONS - 1]).abs() < 1e-9);
    }
}
