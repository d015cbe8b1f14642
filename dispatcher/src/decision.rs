//! The dispatch decision: which substation takes a charge request, or why the request waits or
//! is rejected.
//!
//! This is the functional core of the dispatcher (ingest → **dispatcher** → substation): plain
//! data in — the dispatcher's view of the grid ([`Grid`]), what the car needs ([`Demand`]) and the
//! time — and a [`Decision`] out. No clock reads, no NATS, no randomness, so the live service and
//! a simulator make the same decisions from the same inputs. A decision scans the substations
//! once and allocates nothing.
//!
//! The grid view is the last heartbeat of every substation plus the assignments sent to it since
//! that heartbeat (pending). A heartbeat's `dispatch_seq` echoes the highest `EV_DISPATCH`
//! sequence the substation has taken, so pending assignments up to it are dropped: from then on
//! they are part of the reported load, and nothing is counted twice.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use evgrid_common::SECONDS_PER_HOUR;
use evgrid_common::heartbeats::{Observed, STALE_AFTER_INTERVALS};
use evgrid_common::messages::{ChargeRequest, RejectReason};

/// How the dispatcher chooses among the substations that are up.
///
/// Only `headroom` exists today; round-robin, least-loaded, power-of-two-choices and predictive
/// policies are planned. Every policy shares the rules of [`decide`] that do not depend on the
/// choice (nothing up → defer, undeliverable → reject, no room → defer).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    /// The up substation with the most headroom (capacity minus estimated load); ties go to the
    /// lowest substation id.
    #[default]
    Headroom,
}

impl Policy {
    /// The name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Headroom => "headroom",
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
    /// Every up substation is at or above its capacity, counting the assignments in flight.
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

/// An assignment sent to a substation whose effect is not in its heartbeats yet.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pending {
    ticket: u64,
    /// `EV_DISPATCH` sequence, once the PubAck told it.
    seq: Option<u64>,
    power_kw: f64,
}

/// The numbers a decision reads for one substation, packed apart from everything else so a scan
/// over thousands of substations stays in cache.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Load {
    /// Up while the time (µs since the epoch) is at most this: stored_at + 3 intervals.
    up_until_us: i64,
    capacity_kw: f64,
    /// The larger of the reported load and the reported demand (a saturated substation's demand
    /// is above its capacity).
    reported_kw: f64,
    /// Power of the pending assignments.
    pending_kw: f64,
}

impl Load {
    fn of(observed: &Observed, pending_kw: f64) -> Self {
        let hb = &observed.heartbeat;
        let stale_after_us = i64::try_from(hb.interval_ms)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000 * i64::from(STALE_AFTER_INTERVALS));
        Self {
            up_until_us: observed
                .stored_at
                .timestamp_micros()
                .saturating_add(stale_after_us),
            capacity_kw: hb.capacity_kw,
            reported_kw: hb.load_kw.max(hb.demand_kw),
            pending_kw,
        }
    }

    fn is_up(&self, now_us: i64) -> bool {
        now_us <= self.up_until_us
    }

    fn headroom_kw(&self) -> f64 {
        self.capacity_kw - (self.reported_kw + self.pending_kw)
    }
}

/// What the grid keeps per substation besides its [`Load`].
#[derive(Debug, Clone)]
struct Entry {
    id: Arc<str>,
    observed: Observed,
    /// In ticket order (the order of decisions).
    pending: Vec<Pending>,
}

impl Entry {
    fn pending_index(&self, ticket: u64) -> Option<usize> {
        self.pending
            .binary_search_by_key(&ticket, |p| p.ticket)
            .ok()
    }
}

/// One substation as the dispatcher sees it: its newest heartbeat and what was sent to it
/// since. A view into a [`Grid`].
#[derive(Debug, Clone, Copy)]
pub struct Substation<'a> {
    entry: &'a Entry,
    load: &'a Load,
}

impl<'a> Substation<'a> {
    pub fn id(&self) -> &'a str {
        &self.entry.id
    }

    /// The newest heartbeat and when the server stored it.
    pub fn observed(&self) -> &'a Observed {
        &self.entry.observed
    }

    /// Up = heard from within 3 heartbeat intervals of when its last heartbeat was stored
    /// (the rule of [`Observed::is_up`], at microsecond resolution).
    pub fn is_up(&self, now: DateTime<Utc>) -> bool {
        self.load.is_up(now.timestamp_micros())
    }

    /// Power of the assignments sent since the last heartbeat that did not echo them.
    pub fn pending_kw(&self) -> f64 {
        self.load.pending_kw
    }

    /// Number of assignments sent since the last heartbeat that did not echo them.
    pub fn pending_count(&self) -> usize {
        self.entry.pending.len()
    }

    /// Estimated load: the larger of the reported load and the reported demand, plus the
    /// pending assignments.
    pub fn estimated_load_kw(&self) -> f64 {
        self.load.reported_kw + self.load.pending_kw
    }

    /// Capacity minus estimated load; zero or less means full.
    pub fn headroom_kw(&self) -> f64 {
        self.load.headroom_kw()
    }
}

/// A pending assignment recorded before its `EV_DISPATCH` sequence is known (the publish is
/// still awaiting its PubAck). [`Grid::confirm`] or [`Grid::cancel`] settles it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    substation_id: Arc<str>,
    id: u64,
}

impl Ticket {
    pub fn substation_id(&self) -> &str {
        &self.substation_id
    }
}

/// The dispatcher's view of the grid: every substation ever heard from, sorted by id (so a scan
/// meets ties in id order), with its newest heartbeat and pending assignments.
#[derive(Debug, Clone, Default)]
pub struct Grid {
    /// Parallel to `loads`: same substations, same order.
    entries: Vec<Entry>,
    loads: Vec<Load>,
    next_ticket: u64,
}

impl Grid {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every known substation (up or not), sorted by id.
    pub fn substations(&self) -> impl ExactSizeIterator<Item = Substation<'_>> + '_ {
        self.entries
            .iter()
            .zip(&self.loads)
            .map(|(entry, load)| Substation { entry, load })
    }

    pub fn get(&self, substation_id: &str) -> Option<Substation<'_>> {
        let i = self.position(substation_id).ok()?;
        Some(Substation {
            entry: &self.entries[i],
            load: &self.loads[i],
        })
    }

    /// How many substations are up at `now`.
    pub fn up_count(&self, now: DateTime<Utc>) -> usize {
        let now_us = now.timestamp_micros();
        self.loads.iter().filter(|l| l.is_up(now_us)).count()
    }

    fn position(&self, substation_id: &str) -> Result<usize, usize> {
        self.entries
            .binary_search_by(|e| (*e.id).cmp(substation_id))
    }

    /// Takes in a heartbeat. Returns false (and changes nothing) when it is older than the one
    /// already held for that substation: a replay after a reconnect must not roll the view back.
    ///
    /// The pending assignments the heartbeat echoes (`EV_DISPATCH` sequence ≤ its `dispatch_seq`)
    /// are dropped: they are in its load now.
    pub fn observe(&mut self, observed: Observed) -> bool {
        match self.position(&observed.heartbeat.substation_id) {
            Ok(i) => {
                let entry = &mut self.entries[i];
                if observed.stored_at < entry.observed.stored_at {
                    return false;
                }
                let echoed = observed.heartbeat.dispatch_seq;
                entry
                    .pending
                    .retain(|p| p.seq.is_none_or(|seq| seq > echoed));
                // Summed afresh: no rounding drift survives a heartbeat.
                let pending_kw = entry.pending.iter().map(|p| p.power_kw).sum();
                self.loads[i] = Load::of(&observed, pending_kw);
                entry.observed = observed;
            }
            Err(i) => {
                self.loads.insert(i, Load::of(&observed, 0.0));
                self.entries.insert(
                    i,
                    Entry {
                        id: Arc::from(observed.heartbeat.substation_id.as_str()),
                        observed,
                        pending: Vec::new(),
                    },
                );
            }
        }
        true
    }

    /// Records an assignment of `power_kw` to a substation at decision time, before its
    /// `EV_DISPATCH` sequence is known, so the next decision already counts it. `None` when the
    /// substation is unknown.
    pub fn assign(&mut self, substation_id: &str, power_kw: f64) -> Option<Ticket> {
        let i = self.position(substation_id).ok()?;
        self.next_ticket += 1;
        let entry = &mut self.entries[i];
        entry.pending.push(Pending {
            ticket: self.next_ticket,
            seq: None,
            power_kw,
        });
        self.loads[i].pending_kw += power_kw;
        Some(Ticket {
            substation_id: entry.id.clone(),
            id: self.next_ticket,
        })
    }

    /// The assignment was stored at `EV_DISPATCH` sequence `seq`. If a heartbeat already echoed
    /// that sequence (the substation took it before the PubAck came back), it is dropped now.
    pub fn confirm(&mut self, ticket: &Ticket, seq: u64) {
        let Ok(i) = self.position(&ticket.substation_id) else {
            return;
        };
        let entry = &mut self.entries[i];
        let Some(k) = entry.pending_index(ticket.id) else {
            return;
        };
        if seq <= entry.observed.heartbeat.dispatch_seq {
            self.remove_pending(i, k);
        } else {
            entry.pending[k].seq = Some(seq);
        }
    }

    /// The assignment was not stored (publish failed) or was a duplicate of one counted before:
    /// it adds nothing.
    pub fn cancel(&mut self, ticket: &Ticket) {
        let Ok(i) = self.position(&ticket.substation_id) else {
            return;
        };
        if let Some(k) = self.entries[i].pending_index(ticket.id) {
            self.remove_pending(i, k);
        }
    }

    fn remove_pending(&mut self, i: usize, k: usize) {
        let entry = &mut self.entries[i];
        let removed = entry.pending.remove(k);
        let load = &mut self.loads[i];
        load.pending_kw = if entry.pending.is_empty() {
            0.0
        } else {
            load.pending_kw - removed.power_kw
        };
    }

    /// Records an assignment whose `EV_DISPATCH` sequence is already known (a simulator, or a
    /// caller that publishes before recording). False when the substation is unknown.
    pub fn record_assignment(&mut self, substation_id: &str, seq: u64, power_kw: f64) -> bool {
        match self.assign(substation_id, power_kw) {
            Some(ticket) => {
                self.confirm(&ticket, seq);
                true
            }
            None => false,
        }
    }
}

/// Decides where a request goes, at `now`.
///
/// 1. No substation up → [`DeferReason::NoSubstationUp`].
/// 2. A departure is given and the energy cannot be delivered before it even at
///    `min(max_power_kw, largest capacity among the up substations)` → reject `undeliverable`.
/// 3. The policy picks an up substation with headroom > 0 → dispatch; none has room →
///    [`DeferReason::NoHeadroom`]. A car asking more power than the headroom is still
///    dispatched: it charges slower.
pub fn decide(grid: &Grid, demand: &Demand, now: DateTime<Utc>, policy: Policy) -> Decision {
    let now_us = now.timestamp_micros();
    let mut any_up = false;
    let mut largest_capacity_kw = 0.0_f64;
    let mut best: Option<(usize, f64)> = None;
    for (i, load) in grid.loads.iter().enumerate() {
        if !load.is_up(now_us) {
            continue;
        }
        any_up = true;
        largest_capacity_kw = largest_capacity_kw.max(load.capacity_kw);
        match policy {
            Policy::Headroom => {
                let headroom = load.headroom_kw();
                // Strictly greater: on a tie the earlier (lower) id stays.
                if best.is_none_or(|(_, b)| headroom > b) {
                    best = Some((i, headroom));
                }
            }
        }
    }

    if !any_up {
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
        let hours_needed = demand.energy_kwh / power_kw;
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
    match best {
        Some((i, headroom)) if headroom > 0.0 => Decision::Dispatch {
            substation_id: grid.entries[i].id.clone(),
            power_kw: demand.max_power_kw.min(grid.loads[i].capacity_kw),
        },
        _ => Decision::Defer {
            reason: DeferReason::NoHeadroom,
        },
    }
}

fn hours_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_milliseconds() as f64 / 1000.0 / SECONDS_PER_HOUR
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::Duration;
    use evgrid_common::messages::Heartbeat;

    use super::*;

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
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

    fn grid(substations: &[(&str, f64, f64)]) -> Grid {
        let mut g = Grid::new();
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

    fn run(grid: &Grid, d: &Demand) -> Decision {
        decide(grid, d, t0(), Policy::Headroom)
    }

    /// Decides and records like the live service: the assignment counts at once.
    fn dispatch_one(grid: &mut Grid, d: &Demand, seq: u64) -> Option<Arc<str>> {
        match run(grid, d) {
            Decision::Dispatch {
                substation_id,
                power_kw,
            } => {
                assert!(grid.record_assignment(&substation_id, seq, power_kw));
                Some(substation_id)
            }
            _ => None,
        }
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
        let mut g = Grid::new();
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
        let mut g = Grid::new();
        g.observe(o);
        assert_eq!(g.get("a").unwrap().headroom_kw(), -20.0);
        assert!(matches!(run(&g, &demand(11.0)), Decision::Defer { .. }));
    }

    #[test]
    fn nothing_up_defers() {
        assert_eq!(
            run(&Grid::new(), &demand(11.0)),
            Decision::Defer {
                reason: DeferReason::NoSubstationUp
            }
        );
        let g = grid(&[("a", 100.0, 0.0)]);
        let later = t0() + Duration::milliseconds(3001);
        assert_eq!(
            decide(&g, &demand(11.0), later, Policy::Headroom),
            Decision::Defer {
                reason: DeferReason::NoSubstationUp
            }
        );
    }

    #[test]
    fn stale_substations_are_ignored() {
        let mut g = Grid::new();
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
        let mut g = Grid::new();
        assert!(g.observe(heartbeat("a", 100.0, 10.0, t0())));
        assert!(!g.observe(heartbeat("a", 100.0, 90.0, t0() - Duration::seconds(1))));
        assert_eq!(g.get("a").unwrap().observed().heartbeat.load_kw, 10.0);
    }

    #[test]
    fn an_echo_drops_pending_without_double_counting() {
        let mut g = grid(&[("a", 100.0, 0.0)]);
        for seq in 1..=3 {
            assert!(g.record_assignment("a", seq, 11.0));
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
        let t1 = g.assign("a", 11.0).unwrap();
        let t2 = g.assign("a", 11.0).unwrap();
        let t3 = g.assign("a", 11.0).unwrap();
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
        assert!(g.assign("nowhere", 1.0).is_none());
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
            run(&Grid::new(), &d),
            Decision::Defer {
                reason: DeferReason::NoSubstationUp
            }
        );
        // Full, but up: the energy can never arrive in time whatever frees up.
        let g = grid(&[("a", 100.0, 100.0)]);
        assert!(matches!(run(&g, &d), Decision::Reject { .. }));
    }

    #[test]
    fn decisions_are_deterministic() {
        let build = || {
            let mut g = Grid::new();
            for (i, id) in ["n", "m", "k", "z", "a"].iter().enumerate() {
                g.observe(heartbeat(id, 50.0 + 25.0 * i as f64, 5.0 * i as f64, t0()));
            }
            g
        };
        let sequence = |mut g: Grid| -> Vec<Option<Arc<str>>> {
            (1..=60)
                .map(|seq| dispatch_one(&mut g, &demand(7.0 + (seq % 5) as f64), seq))
                .collect()
        };
        assert_eq!(sequence(build()), sequence(build()));
    }
}
